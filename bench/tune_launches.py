"""Per-launch timing and a block-size sweep of the Triton linear adapter, on a CUDA GPU.

The op's benchmark (``bench_linear_adapter.py``) times whole calls; this script takes them apart.
For every point (norm position, dtype, D, H; N = 2^28 / D tokens, features ``plain`` = swish +
residual) it plans the forward and the backward with the launcher's own configuration
(``plan_forward`` / ``plan_backward``) and times each launch alone:

* median ms over repeats, the L2 flushed before each (``harness.do_bench``);
* GB/s of the launch's compulsory traffic (``Launch.hbm_bytes``) and its fraction of the copy bandwidth
  measured in the same process;
* the static report's modelled time of the same launch (``bench/results/static/report.json``, sm_90
  records), and measured / modelled;
* the whole op (``ops.linear_adapter``, forward under no_grad; backward), so that what the launches
  leave out (allocations, the sum of split partials) shows.

``--sweep`` then replaces, one launch kind at a time, the planner's block configuration
(``_forward_config`` for the forward, ``_row_config`` for the backward rows pass, ``_col_config`` for
the columns pass) by each candidate of a grid (BM, BD, num_warps, num_stages, and for the forward its
programs per SM: 0 for one program per row block), re-plans, runs every launch of the direction,
checks the results against the default configuration's (a candidate that disagrees is recorded as
wrong and never timed; one that does not fit is recorded as refused), and times the launches of that
kind. Candidates are compiled first in a process pool (``static_report``'s exact specialisation), which
fills Triton's cache and records registers, spills and shared memory per candidate.

Writes ``results.json`` and ``report.md`` to ``--out``. Needs CUDA; nothing here runs on the CPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import static_report  # noqa: E402

from fusedadapters.ops.triton import linear_adapter as kernels  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENS_TIMES_D = 1 << 28  # x is 512 MB in bf16: far over the L2
# Candidates of the sweep, per launch kind: (BM, BD, num_warps, num_stages).
ROW_CANDIDATES = [c for c in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8), (2, 4))
                  if c[0] * c[1] <= 128 * 128]
# The forward's also name its grid: k >= 1 programs per SM walking the row blocks, 0 one program per block.
FWD_CANDIDATES = [c + (k,) for c in ROW_CANDIDATES for k in (0, 1, 2) if k < 2 or c[0] <= 32]
COL_CANDIDATES = list(itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (1, 2, 3)))
STAGES = {"fwd": "forward", "bwd_rows": "backward", "bwd_cols": "backward"}


def parse_points(text: str) -> List[Tuple[str, str, int, int]]:
    """'pre:bf16:4096:64,post:bf16:4096:64' -> [(norm, dtype, D, H), ...]."""
    points = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        norm, dtype, d, h = item.split(":")
        if norm not in ("pre", "post") or dtype not in DTYPES:
            raise SystemExit(f"bad point {item!r}: norm pre|post, dtype {'|'.join(DTYPES)}")
        points.append((norm, dtype, int(d), int(h)))
    return points


class Case:
    """One point's tensors, its forward outputs and its gradients under the default configuration."""

    def __init__(self, norm: str, dtype: str, d: int, h: int, device: torch.device):
        self.norm, self.dtype_name, self.d, self.h = norm, dtype, d, h
        self.n = TOKENS_TIMES_D // d
        self.device = device
        self.limits = kernels.device_limits(device)
        dt = DTYPES[dtype]
        gen = torch.Generator(device=device).manual_seed(d * 1000 + h)

        def randn(*shape, scale=1.0, shift=0.0):
            return (shift + scale * torch.randn(*shape, device=device, generator=gen)).to(dt)

        self.x = randn(self.n, d)
        self.params = (randn(d, scale=0.5, shift=1.0), randn(d, scale=0.5), randn(h, d, scale=d ** -0.5),
                       randn(d, h, scale=h ** -0.5))
        self.dout = randn(self.n, d)
        self.reference_forward = self.run_forward()
        self.reference_backward = self.run_backward()

    def plan_forward(self):
        return kernels.plan_forward(self.x, *self.params, None, None, "swish", self.norm, 1e-5, 0.0, True, False,
                                    self.limits)

    def run_forward(self) -> Tuple[torch.Tensor, ...]:
        outputs, launches = self.plan_forward()
        kernels._run(launches, self.limits)
        self.saved = outputs[2:]  # hidden, mean, rstd, proj of the last forward run
        return outputs[0], outputs[2]

    def plan_backward(self):
        return kernels.plan_backward(self.dout, None, self.x, *self.params, None, None, *self.saved, "swish",
                                     self.norm, 0.0, True, True, True, True, True, self.limits)

    def run_backward(self) -> Tuple[torch.Tensor, ...]:
        buffers, launches = self.plan_backward()
        kernels._run(launches, self.limits)
        dx, *partials = buffers
        return (dx, *(p.sum(0) for p in partials))


@contextlib.contextmanager
def forced_config(stage: str, candidate: Tuple[int, ...]) -> Iterator[None]:
    """The planner with ``candidate`` in place of its own configuration for ``stage``'s launches: (BM, BD,
    warps, stages), and for the forward its row blocks per SM (``_forward_config``). The forward's
    configuration starts from ``_row_config``, which the backward rows pass shares: plan only
    ``stage``'s direction inside."""
    bm, bd, warps, stages = candidate[:4]
    name = {"fwd": "_forward_config", "bwd_rows": "_row_config", "bwd_cols": "_col_config"}[stage]
    original = getattr(kernels, name)

    def config(h, d, dtype, limits, *args, **kwargs):
        default = original(h, d, dtype, limits, *args, **kwargs)
        if stage == "fwd":
            cfg, _, first_read = default
            return (kernels._Config(cfg.BH, bm, kernels._clamp_bd(bd, d), warps, stages), candidate[4],
                    "evict_last" if candidate[4] else first_read)
        return kernels._Config(default.BH, bm, kernels._clamp_bd(bd, d), warps, stages)

    setattr(kernels, name, config)
    try:
        yield
    finally:
        setattr(kernels, name, original)


def stage_launches(stage: str, launches: Sequence[Any]) -> List[int]:
    """Indices of the launches a stage's configuration sets."""
    wanted = {"fwd": ("pre_norm_fwd", "post_norm_fwd"), "bwd_rows": ("pre_norm_bwd_rows", "post_norm_bwd_rows"),
              "bwd_cols": ("bwd_cols",)}[stage]
    return [i for i, launch in enumerate(launches) if launch.name in wanted]


def time_launch(launch: Any, device: torch.device, rep_ms: float) -> harness.Timing:
    return harness.do_bench(lambda: launch.kernel[launch.grid](*launch.args, **launch.meta), device=device,
                            warmup_ms=10.0, rep_ms=rep_ms, min_reps=5, max_reps=200)


def static_predictions(path: Path) -> Dict[Tuple, Dict[str, Any]]:
    """Modelled launch records of the static report (sm_90, features plain), by point and label."""
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    return {(r["direction"], r["norm_position"], r["dtype"], r["D"], r["H"], r["label"]): r
            for r in report.get("launches", []) if r.get("arch") == "sm_90" and r.get("features") == "plain"}


def labels(launches: Sequence[Any]) -> List[str]:
    names = [launch.name for launch in launches]
    seen: Dict[str, int] = {}
    out = []
    for name in names:
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            out.append(f"{name}[{seen[name]}]")
        else:
            out.append(name)
    return out


def add_prediction(row: Dict[str, Any], predictions: Dict[Tuple, Dict[str, Any]]) -> Dict[str, Any]:
    """The static report's modelled time of ``row``'s launch beside its measured time. The report models
    N = 2^26 / D tokens; its launch times scale with N (up to the launch overhead)."""
    predicted = predictions.get((row["direction"], row["norm_position"], row["dtype"], row["D"], row["H"],
                                 row["launch"]), {})
    predicted_ms = (predicted["predicted_us"] / 1e3 * row["N"] / predicted["N"]
                    if predicted.get("predicted_us") else None)
    row.update(predicted_ms=predicted_ms, predicted_bound=predicted.get("bound"),
               measured_over_predicted=row["ms"] / predicted_ms if predicted_ms else None)
    return row


def launch_rows(case: Case, direction: str, launches: Sequence[Any], copy_gbps: float, rep_ms: float,
                predictions: Dict[Tuple, Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for label, launch in zip(labels(launches), launches):
        timing = time_launch(launch, case.device, rep_ms)
        gbps = harness.gbps(launch.hbm_bytes, timing.median_ms)
        rows.append(add_prediction(dict(
            direction=direction, norm_position=case.norm, dtype=case.dtype_name, N=case.n, D=case.d, H=case.h,
            launch=label, grid=list(launch.grid),
            meta={k: v for k, v in launch.meta.items() if k in ("BM", "BD", "BH", "num_warps", "num_stages")},
            ms=timing.median_ms, timing=timing.as_dict(), hbm_bytes=launch.hbm_bytes, gbps=gbps,
            frac_copy_bw=gbps / copy_gbps,
        ), predictions))
    return rows


def op_times(case: Case, rep_ms: float) -> Dict[str, float]:
    """The whole op through ``ops.linear_adapter`` (backend triton): forward, and backward alone."""
    from fusedadapters.ops import linear_adapter

    x = case.x.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in case.params]

    def forward():
        with torch.no_grad():
            return linear_adapter(case.x, *case.params, backend="triton")

    def setup():
        return linear_adapter(x, *params, backend="triton")

    fwd = harness.do_bench(forward, device=case.device, rep_ms=rep_ms)
    bwd = harness.do_bench(lambda out: out.backward(case.dout), device=case.device, rep_ms=rep_ms, setup=setup,
                           grad_to_none=[x, *params])
    return dict(forward_ms=fwd.median_ms, backward_ms=bwd.median_ms)


def max_rel_err(result: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Worst ‖result - reference‖ / ‖reference‖ over the tensors (inf for a non-finite result)."""
    worst = 0.0
    for a, b in zip(result, reference):
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        worst = max(worst, err if math.isfinite(err) else float("inf"))
    return worst


def precompile(jobs: List[Any], workers: int, log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """static_report.analyse_job over ``jobs`` in a process pool (fills Triton's cache as a side effect)."""
    if not jobs:
        return []
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(static_report.analyse_job, jobs))
    log(f"  compiled {len(jobs)} candidates in {time.perf_counter() - started:.0f} s ({workers} processes)")
    return results


def sweep_stage(case: Case, stage: str, candidates: Sequence[Tuple[int, int, int, int]], copy_gbps: float,
                rep_ms: float, deadline: float, workers: int, log: Callable[[str], None]) -> List[Dict[str, Any]]:
    direction = STAGES[stage]
    plan = case.plan_forward if direction == "forward" else case.plan_backward
    reference = case.reference_forward if direction == "forward" else case.reference_backward
    run = case.run_forward if direction == "forward" else case.run_backward
    tol = 1e-4 if case.dtype_name == "fp32" else 2e-2
    planned = []
    for candidate in candidates:
        with forced_config(stage, candidate):
            _, launches = plan()
        planned.append(launches)
    jobs, owners = [], []
    for index, launches in enumerate(planned):
        for i in stage_launches(stage, launches):
            jobs.append(static_report.compile_job(launches[i], 90))
            owners.append(index)
    analyses: Dict[int, List[Dict[str, Any]]] = {}
    for owner, analysis in zip(owners, precompile(jobs, workers, log)):
        analyses.setdefault(owner, []).append(
            {k: analysis.get(k) for k in ("registers", "spill_stores", "shared_dynamic", "error")})
    rows = []
    for index, candidate in enumerate(candidates):
        row = dict(stage=stage, norm_position=case.norm, dtype=case.dtype_name, N=case.n, D=case.d, H=case.h,
                   BM=candidate[0], BD=candidate[1], num_warps=candidate[2], num_stages=candidate[3],
                   blocks_per_sm=candidate[4] if len(candidate) > 4 else None, compiled=analyses.get(index, []))
        if time.perf_counter() > deadline:
            rows.append(dict(row, status="skipped", reason="time budget"))
            continue
        try:
            with forced_config(stage, candidate):
                result = run()
            err = max_rel_err(result, reference)
            if not err < tol:
                rows.append(dict(row, status="wrong", max_rel_err=err))
                continue
            with forced_config(stage, candidate):
                _, launches = plan()
            ms = sum(time_launch(launches[i], case.device, rep_ms).median_ms for i in stage_launches(stage, launches))
            hbm = sum(launches[i].hbm_bytes for i in stage_launches(stage, launches))
            rows.append(dict(row, status="ok", ms=ms, gbps=harness.gbps(hbm, ms),
                             frac_copy_bw=harness.gbps(hbm, ms) / copy_gbps, max_rel_err=err))
        except Exception as exc:  # a candidate that does not fit or fails is recorded, the sweep goes on
            rows.append(dict(row, status="refused", reason=harness.format_error(exc, 300)))
        finally:
            if direction == "forward":
                case.run_forward()  # the saved tensors the backward reads, from the default configuration
    return rows


def _grid_cell(row: Dict[str, Any]) -> str:
    """The forward candidate's grid: k programs per SM walking the row blocks, or one per block."""
    k = row.get("blocks_per_sm")
    return "–" if k is None else "1 per block" if k == 0 else f"{k} per SM"


def render(results: Dict[str, Any]) -> str:
    lines = ["# Per-launch timing and block-size sweep (`bench/tune_launches.py`)", "",
             f"Command: `{results['environment']['command']}`", "",
             f"Device: {results['device']}; copy bandwidth {results['copy']['gbps']:.0f} GB/s; "
             f"commit {results['environment']['git'].get('commit')}; {results['environment']['timestamp_utc']}.", "",
             "## Launches under the launcher's own configuration", "",
             "GB/s = the launch's compulsory bytes (`Launch.hbm_bytes`) / median ms; predicted = the static "
             "report's modelled time of the same launch (sm_90), scaled from its N = 2^26 / D to this N.", ""]
    lines.append(harness.markdown_table(
        ["dir", "norm", "dtype", "N", "D", "H", "launch", "BM/BD/BH/warps/stages", "ms", "GB/s", "% copy BW",
         "predicted ms", "measured / predicted", "model bound"],
        [[r["direction"], r["norm_position"], r["dtype"], r["N"], r["D"], r["H"], r["launch"],
          "/".join(str(r["meta"].get(k, "–")) for k in ("BM", "BD", "BH", "num_warps", "num_stages")),
          harness.fmt(r["ms"], ".4f"), harness.fmt(r["gbps"], ".0f"), harness.fmt(100 * r["frac_copy_bw"], ".1f"),
          harness.fmt(r["predicted_ms"], ".4f"), harness.fmt(r["measured_over_predicted"], ".2f"),
          r["predicted_bound"] or "–"] for r in results["launches"]]))
    lines += ["", "## The whole op against the sum of its launches", ""]
    lines.append(harness.markdown_table(
        ["norm", "dtype", "N", "D", "H", "forward op ms", "Σ forward launches ms", "backward op ms",
         "Σ backward launches ms"],
        [[o["norm_position"], o["dtype"], o["N"], o["D"], o["H"], harness.fmt(o["forward_ms"], ".4f"),
          harness.fmt(o["forward_launches_ms"], ".4f"), harness.fmt(o["backward_ms"], ".4f"),
          harness.fmt(o["backward_launches_ms"], ".4f")] for o in results["ops"]]))
    if results["sweep"]:
        lines += ["", "## Sweep: the five fastest candidates per launch kind, and the default", ""]
        groups: Dict[Tuple, List[Dict[str, Any]]] = {}
        for r in results["sweep"]:
            groups.setdefault((r["stage"], r["norm_position"], r["dtype"], r["D"], r["H"]), []).append(r)
        for key, rows in groups.items():
            ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["ms"])
            default = results["defaults"].get("|".join(map(str, key)))
            counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "wrong", "refused", "skipped")}
            lines += [f"### {key[0]}, {key[1]} norm, {key[2]}, D={key[3]}, H={key[4]}", "",
                      f"candidates: {len(rows)} ({', '.join(f'{v} {k}' for k, v in counts.items() if v)}); "
                      f"default configuration: {default['config'] if default else '–'}, "
                      f"{harness.fmt(default['ms'] if default else None, '.4f')} ms", ""]
            lines.append(harness.markdown_table(
                ["BM", "BD", "warps", "stages", "grid", "ms", "% copy BW", "× default", "registers", "spill stores"],
                [[r["BM"], r["BD"], r["num_warps"], r["num_stages"], _grid_cell(r), harness.fmt(r["ms"], ".4f"),
                  harness.fmt(100 * r["frac_copy_bw"], ".1f"),
                  harness.fmt(default["ms"] / r["ms"] if default else None, ".2f"),
                  ",".join(str(c.get("registers")) for c in r["compiled"]) or "–",
                  ",".join(str(c.get("spill_stores")) for c in r["compiled"]) or "–"] for r in ok[:5]]))
            lines.append("")
            bad = [r for r in rows if r["status"] in ("wrong", "refused")]
            if bad:
                lines += ["Not timed: " + "; ".join(
                    f"{r['BM']}/{r['BD']}/{r['num_warps']}/{r['num_stages']} {r['status']}"
                    + (f" ({harness.fmt(r.get('max_rel_err'), '.2g')})" if r["status"] == "wrong" else "")
                    for r in bad[:12]) + (" ..." if len(bad) > 12 else ""), ""]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="pre:bf16:4096:16,pre:bf16:4096:64,pre:bf16:4096:256,"
                        "post:bf16:4096:16,post:bf16:4096:64,post:bf16:4096:256,pre:fp32:4096:64",
                        help="norm:dtype:D:H,... timed launch by launch")
    parser.add_argument("--sweep", default="pre:bf16:4096:64,post:bf16:4096:64",
                        help="points whose launch configurations are swept ('' for none)")
    parser.add_argument("--stages", default="fwd,bwd_rows,bwd_cols", help="launch kinds to sweep")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rerender", action="store_true",
                        help="measure nothing: put the static report's predictions beside the launches of "
                        "--out's results.json again and rewrite its results.json and report.md (no GPU needed)")
    parser.add_argument("--rep-ms", type=float, default=40.0)
    parser.add_argument("--budget-s", type=float, default=400.0, help="no sweep candidate starts after this")
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--static-report", type=Path, default=REPO / "bench/results/static/report.json")
    args = parser.parse_args(argv)
    if args.rerender:
        results = json.loads((args.out / "results.json").read_text())
        predictions = static_predictions(args.static_report)
        results["launches"] = [add_prediction(row, predictions) for row in results["launches"]]
        harness.write_json(args.out / "results.json", results)
        (args.out / "report.md").write_text(render(results))
        print(f"rewrote {args.out / 'results.json'} and report.md")
        return 0
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("tune_launches.py needs a CUDA GPU (and TRITON_INTERPRET unset)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    deadline = started + args.budget_s
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = dict(
        environment=harness.environment_record(sys.argv[1:] if argv is None else list(argv), device),
        device=torch.cuda.get_device_name(device), copy=harness.measure_copy_bandwidth(device),
        launches=[], ops=[], sweep=[], defaults={})
    copy_gbps = results["copy"]["gbps"]
    predictions = static_predictions(args.static_report)

    def save() -> None:
        harness.write_json(args.out / "results.json", results)
        (args.out / "report.md").write_text(render(results))

    sweep_points = set(parse_points(args.sweep))
    for point in parse_points(args.points) + [p for p in parse_points(args.sweep) if p not in parse_points(args.points)]:
        case = Case(*point, device)
        print(f"[{time.perf_counter() - started:4.0f} s] {point}: N={case.n}", flush=True)
        _, fwd = case.plan_forward()
        fwd_rows = launch_rows(case, "forward", fwd, copy_gbps, args.rep_ms, predictions)
        case.run_forward()
        _, bwd = case.plan_backward()
        bwd_rows = launch_rows(case, "backward", bwd, copy_gbps, args.rep_ms, predictions)
        results["launches"] += fwd_rows + bwd_rows
        results["ops"].append(dict(norm_position=case.norm, dtype=case.dtype_name, N=case.n, D=case.d, H=case.h,
                                   forward_launches_ms=sum(r["ms"] for r in fwd_rows),
                                   backward_launches_ms=sum(r["ms"] for r in bwd_rows), **op_times(case, args.rep_ms)))
        for r in fwd_rows + bwd_rows:
            print(f"  {r['direction']:8s} {r['launch']:20s} {r['ms']:8.4f} ms {r['gbps']:7.0f} GB/s "
                  f"{100 * r['frac_copy_bw']:5.1f} %  predicted {harness.fmt(r['predicted_ms'], '.4f')} ms", flush=True)
        save()
        if point not in sweep_points:
            continue
        for stage in filter(None, args.stages.split(",")):
            plan = fwd if STAGES[stage] == "forward" else bwd
            idx = stage_launches(stage, plan)
            if not idx:
                continue
            meta = plan[idx[0]].meta
            key = "|".join(map(str, (stage, case.norm, case.dtype_name, case.d, case.h)))
            results["defaults"][key] = dict(
                config=f"{meta['BM']}/{meta['BD']}/{meta['num_warps']}/{meta['num_stages']}" + (
                    f", {plan[idx[0]].grid[0]} programs" + (" walking the row blocks" if meta["GRID_STRIDE"] else "")
                    if "GRID_STRIDE" in meta else ""),
                ms=sum(r["ms"] for r, launch in zip(fwd_rows if STAGES[stage] == "forward" else bwd_rows, plan)
                       if launch.name == plan[idx[0]].name))
            candidates = {"fwd": FWD_CANDIDATES, "bwd_rows": ROW_CANDIDATES, "bwd_cols": COL_CANDIDATES}[stage]
            print(f"[{time.perf_counter() - started:4.0f} s] sweep {stage} {point}: {len(candidates)} candidates",
                  flush=True)
            rows = sweep_stage(case, stage, candidates, copy_gbps, args.rep_ms, deadline, args.workers, print)
            results["sweep"] += rows
            best = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["ms"])[:3]
            for r in best:
                print(f"  best {r['BM']}/{r['BD']}/{r['num_warps']}/{r['num_stages']}: {r['ms']:.4f} ms "
                      f"({100 * r['frac_copy_bw']:.1f} % copy BW)", flush=True)
            save()
        del case
        harness.free_memory(device)
    save()
    print(render(results)[-6000:])
    print(f"done in {time.perf_counter() - started:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
