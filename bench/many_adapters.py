"""Many-adapter sweeps of ``bench/bench_linear_adapter.py``: ``--sweep chain`` and ``--sweep mixed``.

Chain (op ``adapter_chain``): K adapters (K from ``--k``, default 1, 2, 4, 8; all of hidden size H)
applied one after another under the residual strategy. Backends:

* ``chain``: ``ops.adapter_chain`` on triton as it chooses: its fused launch where the static model puts
  it ahead, else one single-adapter call per adapter (see fusedadapters/ops/adapter_chain.py);
* ``fused``: ``ops.adapter_chain(..., fused=True)``: the fused launch at every N (the crossover between
  it and ``loop`` is what the choice above should follow);
* ``loop``: K calls of ``ops.linear_adapter`` on triton written out here (one launch and one round trip
  through memory each): the baseline;
* ``one-adapter``: one ``ops.linear_adapter`` call on triton over the same x (the unit of the target);
* ``eager``: the reference chain (``backend='reference'``).

Mixed batch (op ``routed_adapter``): A adapters (``--a``, default 1, 8, 64, 256) over one batch of N rows
in sequences of 128 rows (fewer when N < 128); each sequence picks an adapter, ``uniform`` (every adapter
equally likely) or ``skewed`` (half of the sequences on adapter 0, the rest uniform). Backends:

* ``routed``: ``ops.routed_adapter`` on triton (one launch; weights stacked once, outside the timing);
* ``masked-loop``: what PEFT does for mixed batches: every adapter over the whole batch
  (``ops.linear_adapter`` on triton, no residual), its rows kept by a mask, summed onto x;
* ``one-adapter``: one ``ops.linear_adapter`` over the whole batch (the unit of the targets);
* ``eager``: the reference routed op.

Modes: ``forward`` (under ``torch.no_grad()``) and ``full`` (forward plus ``backward(dout)`` with the
gradients of x and of every adapter weight). Each backend is checked once per shape against the
reference in float64 (float32 inputs) or float32 (16-bit inputs) before it is timed; one over tolerance
is an error row, not timed. Byte model (``e`` bytes per element, ``W`` bytes of one adapter's weights):
forward ``2·N·D·e + M·W``, full ``5·N·D·e + 3·M·W``, where M = K or A: x read and out written once, as if
every adapter ran in one pass. ``×one`` = ms / ms of ``one-adapter`` at the same point (lower is better;
targets: chain of 4 ≤ 1.6, mixed batch of 64 ≤ 1.3, routing to one adapter ≤ 1.05; a chain that runs
each adapter as its own pass over x_k takes about K× one adapter at large N); ``×loop`` = ms of
``loop`` / ``masked-loop`` over ms (higher is better; target ≥ 10 for 64 adapters).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import harness
from fusedadapters.ops import AdapterParams, adapter_chain, linear_adapter, routed_adapter, stack_adapter_params

SWEEPS = ("chain", "mixed")
MODES = ("forward", "full")
SEQUENCE = 128
OPS = {"chain": "adapter_chain", "mixed": "routed_adapter"}
BACKENDS = {
    "chain": ("chain", "fused", "loop", "one-adapter", "eager"),
    "mixed": ("routed", "masked-loop", "one-adapter", "eager"),
}
BASELINE_LOOP = {"chain": "loop", "mixed": "masked-loop"}
PRESETS = {  # n, d, h, dtypes, counts (K or A)
    "full": ([4096, 65536], [4096], [64], ["bf16"], {"chain": [1, 2, 4, 8], "mixed": [1, 8, 64, 256]}),
    "quick": ([16384], [4096], [64], ["bf16"], {"chain": [1, 2, 4, 8], "mixed": [1, 8, 64, 256]}),
    "cpu-small": ([64], [64], [16], ["fp32"], {"chain": [1, 2], "mixed": [1, 4]}),
}
ASSIGNMENTS = ("uniform", "skewed")


@dataclasses.dataclass(frozen=True)
class Point:
    sweep: str
    n: int
    d: int
    h: int
    dtype: str
    count: int  # K adapters in the chain, or A adapters in the batch
    assignment: str = "-"

    def label(self) -> str:
        what = f"K={self.count}" if self.sweep == "chain" else f"A={self.count} {self.assignment}"
        return f"{self.dtype} N={self.n} D={self.d} H={self.h} {what}"


def make_adapters(point: Point, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> List[AdapterParams]:
    """Random non-zero adapters (up-projections included)."""
    d, h = point.d, point.h

    def rand(*shape: int, scale: float, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    return [
        AdapterParams(rand(d, scale=0.2, shift=1.0), rand(d, scale=0.2), rand(h, d, scale=d**-0.5), rand(d, h, scale=h**-0.5))
        for _ in range(point.count)
    ]


def assign_rows(point: Point, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """The adapter of every row (int64, N): one draw per sequence of SEQUENCE rows."""
    seq = min(SEQUENCE, point.n)
    n_seq = math.ceil(point.n / seq)
    choice = torch.randint(0, point.count, (n_seq,), generator=gen)
    if point.assignment == "skewed":
        choice = torch.where(torch.rand(n_seq, generator=gen) < 0.5, 0, choice)
    return choice.repeat_interleave(seq)[: point.n].to(device)


Fn = Callable[[torch.Tensor, List[AdapterParams]], torch.Tensor]


def build(point: Point, backend: str, index: Optional[torch.Tensor]) -> Fn:
    """``fn(x, adapters) -> out`` for one backend."""
    if point.sweep == "chain":
        if backend in ("chain", "fused"):
            fused = True if backend == "fused" else None
            return lambda x, ps: adapter_chain(x, ps, backend="triton", fused=fused)
        if backend == "eager":
            return lambda x, ps: adapter_chain(x, ps, backend="reference")
        if backend == "loop":
            def loop(x, ps):
                for p in ps:
                    x = linear_adapter(x, *p[:4], backend="triton")
                return x
            return loop
    else:
        if backend in ("routed", "eager"):
            name = "triton" if backend == "routed" else "reference"
            return lambda x, ps: routed_adapter(x, index, *stack_adapter_params(ps, x.dtype), backend=name)
        if backend == "masked-loop":
            masks = [(index == a).unsqueeze(-1) for a in range(point.count)]

            def masked(x, ps):
                out = x
                for p, mask in zip(ps, masks):
                    out = out + linear_adapter(x, *p[:4], residual=False, backend="triton") * mask
                return out
            return masked
    if backend == "one-adapter":
        return lambda x, ps: linear_adapter(x, *ps[0][:4], backend="triton")
    raise ValueError(f"unknown backend {backend!r} for the {point.sweep} sweep")


def _leaves(x: torch.Tensor, adapters: List[AdapterParams], dtype: torch.dtype, grad: bool):
    x = x.detach().to(dtype).requires_grad_(grad)
    ps = [p._replace(**{f: getattr(p, f).detach().to(dtype).requires_grad_(grad)
                        for f in ("ln_weight", "ln_bias", "down_weight", "up_weight")}) for p in adapters]
    return x, ps


def _results(fn: Fn, x: torch.Tensor, adapters: List[AdapterParams], dout: torch.Tensor, dtype: torch.dtype, grads: bool):
    x, ps = _leaves(x, adapters, dtype, grads)
    out = fn(x, ps)
    if not grads:
        return [out.detach()]
    leaves = [x] + [t for p in ps for t in p[:4]]
    g = torch.autograd.grad(out, leaves, dout.to(out.dtype), allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, leaves)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def floor_bytes(point: Point, mode: str, elem: int) -> int:
    w = (2 * point.d + 2 * point.h * point.d) * elem
    nd = point.n * point.d * elem
    return 2 * nd + point.count * w if mode == "forward" else 5 * nd + 3 * point.count * w


def run_point(point: Point, backends: Sequence[str], modes: Sequence[str], device: torch.device, tc, tol: float,
              seed: int, log: Callable[[str], None]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Check, then time, every backend at one point. Returns (rows, checks); never raises."""
    from bench_linear_adapter import DTYPES

    dtype = DTYPES[point.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(seed)
    rows, checks = [], []

    def row(backend: str, mode: str, **fields: Any) -> Dict[str, Any]:
        base = dict(op=OPS[point.sweep], run=0, mode=mode, **dataclasses.asdict(point), backend=backend, status="ok",
                    stage=None, error=None, ms=None, bytes=None, max_rel_err=None)
        base.update(fields)
        return base

    try:
        adapters = make_adapters(point, device, torch.float32, gen)
        x = torch.randn((point.n, point.d), generator=gen).to(device)
        dout = torch.randn((point.n, point.d), generator=gen).to(device)
        index = assign_rows(point, device, gen) if point.sweep == "mixed" else None
        ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        with_grads = "full" in modes
        ref = _results(build(point, "eager", index), x, adapters, dout, ref_dtype, with_grads)
    except Exception as exc:
        msg = harness.format_error(exc)
        log(f"  {point.label()}: reference failed: {msg}")
        return [row(b, m, status="error", stage="reference", error=msg) for b in backends for m in modes], checks

    for backend in backends:
        try:
            fn = build(point, backend, index)
            if backend == "one-adapter":
                one = dataclasses.replace(point, count=1)
                want = _results(build(one, "eager", torch.zeros_like(index) if index is not None else None),
                                x, adapters[:1], dout, ref_dtype, with_grads)
                got = _results(fn, x, adapters[:1], dout, dtype, with_grads)
            else:
                want = ref
                got = _results(fn, x, adapters, dout, dtype, with_grads)
            worst = max(rel_err(g, w) for g, w in zip(got, want))
        except Exception as exc:
            msg = harness.format_error(exc)
            log(f"  {point.label()} {backend}: check failed: {msg}")
            checks.append(dict(point=dataclasses.asdict(point), backend=backend, passed=False, error=msg))
            rows += [row(backend, m, status="error", stage="check", error=msg) for m in modes]
            continue
        passed = math.isfinite(worst) and worst <= tol
        checks.append(dict(point=dataclasses.asdict(point), backend=backend, max_rel_err=worst, tol=tol, passed=passed))
        if not passed:
            msg = f"correctness: relative error {worst:.3g} over tolerance {tol:.1g}; not timed"
            rows += [row(backend, m, status="error", stage="check", error=msg, max_rel_err=worst) for m in modes]
            continue
        used = adapters[:1] if backend == "one-adapter" else adapters
        for mode in modes:
            bench = dict(device=device, warmup_ms=tc.warmup_ms, rep_ms=tc.rep_ms, min_reps=tc.min_reps,
                         max_reps=tc.max_reps, flush_l2=tc.flush_l2)
            try:
                xs, ps = _leaves(x, used, dtype, mode == "full")
                if mode == "forward":
                    with torch.no_grad():
                        timing = harness.do_bench(lambda: fn(xs, ps), **bench)
                else:
                    leaves = [xs] + [t for p in ps for t in p[:4]]
                    d_out = dout.to(dtype)
                    timing = harness.do_bench(lambda: fn(xs, ps).backward(d_out), grad_to_none=leaves, **bench)
            except Exception as exc:
                msg = harness.format_error(exc)
                log(f"  {point.label()} {backend} {mode}: timing failed: {msg}")
                rows.append(row(backend, mode, status="error", stage="time", error=msg, max_rel_err=worst))
                continue
            nbytes = floor_bytes(point, mode, elem)
            rows.append(row(backend, mode, ms=timing.median_ms, timing=timing.as_dict(), bytes=nbytes, max_rel_err=worst))
            log(f"  {point.label()} {mode:8s} {backend:12s} {timing.median_ms:10.4f} ms")
    harness.free_memory(device)
    return rows, checks


def _key(r: Dict[str, Any]) -> Tuple:
    return (r["mode"], r["dtype"], r["n"], r["d"], r["h"], r["count"], r["assignment"])


def derive(rows: List[Dict[str, Any]], sweep: str, copy_gbps: Optional[float]) -> None:
    """GB/s, fraction of copy bandwidth, ×one (ms over one-adapter) and ×loop (loop ms over ms)."""
    by_point: Dict[Tuple, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        by_point.setdefault(_key(r), {})[r["backend"]] = r
    for r in rows:
        ok = r["status"] == "ok" and r["ms"]
        r["gbps"] = harness.gbps(r["bytes"], r["ms"]) if ok else None
        r["frac_copy_bw"] = r["gbps"] / copy_gbps if ok and copy_gbps else None
        peers = by_point[_key(r)]
        one, loop = peers.get("one-adapter"), peers.get(BASELINE_LOOP[sweep])
        r["ratio_vs_one_adapter"] = r["ms"] / one["ms"] if ok and one and one["ms"] else None
        r["speedup_vs_loop"] = loop["ms"] / r["ms"] if ok and loop and loop["ms"] else None


def targets(rows: List[Dict[str, Any]], sweep: str, min_n: int) -> List[Dict[str, Any]]:
    """The many-adapter targets of docs/design.md ('Floors and targets') at the points in scope."""
    if sweep == "chain":
        wanted = [("chain of 4 ≤ 1.6× one fused adapter", "chain", 4, "ratio_vs_one_adapter", "<=", 1.6)]
    else:
        wanted = [
            ("64 adapters ≤ 1.3× one fused adapter", "routed", 64, "ratio_vs_one_adapter", "<=", 1.3),
            ("64 adapters ≥ 10× the masked loop", "routed", 64, "speedup_vs_loop", ">=", 10.0),
            ("routing to one adapter ≤ 1.05× not routing", "routed", 1, "ratio_vs_one_adapter", "<=", 1.05),
        ]
    out = []
    for text, backend, count, field, op, threshold in wanted:
        for r in rows:
            if r["backend"] != backend or r["count"] != count or r["n"] < min_n:
                continue
            value = r.get(field)
            status = "not evaluated" if value is None else (
                "met" if (value <= threshold if op == "<=" else value >= threshold) else "missed")
            out.append(dict(target=text, mode=r["mode"], dtype=r["dtype"], n=r["n"], d=r["d"], h=r["h"],
                            assignment=r["assignment"], value=value, threshold=threshold, status=status,
                            row_error=r["error"]))
    return out


def render(data: Dict[str, Any], sweep: str) -> str:
    f = harness.fmt
    run = data["runs"][-1]
    env, copy = run["environment"], run["copy_bandwidth"]
    what = "K" if sweep == "chain" else "A"
    out = [f"# `{OPS[sweep]}` benchmark ({sweep} sweep)", "",
           "Every figure below was produced by the command listed here; see bench/README.md for the columns.", "",
           "## Run", "", f"`{env['command']}`", ""]
    out.append(harness.markdown_table(["", "value"], [
        ("timestamp (UTC)", env["timestamp_utc"]),
        ("device", env.get("device_name")),
        ("torch / triton", f"{env['torch']} / {env.get('triton')}"),
        ("git commit", f"{env['git'].get('commit')}{' (dirty tree)' if env['git'].get('dirty') else ''}"),
        ("TRITON_INTERPRET", env["env"].get("TRITON_INTERPRET")),
        ("copy bandwidth", f"{f(copy.get('gbps'), '.1f')} GB/s" if copy and copy.get("gbps") else "not measured"),
        ("timing", str(run["config"]["timing"])),
    ]))
    out += ["", "## Byte model", "", f"forward `2·N·D·e + {what}·W`, full `5·N·D·e + 3·{what}·W` "
            "(W = one adapter's weight bytes; x read and out written once).", ""]
    out += ["## Targets (docs/design.md, 'Floors and targets')", ""]
    tgs = data["targets"]
    out.append(harness.markdown_table(
        ["target", "mode", "dtype", "N", "D", "H", "assignment", "value", "threshold", "status"],
        [(t["target"], t["mode"], t["dtype"], t["n"], t["d"], t["h"], t["assignment"], f(t["value"]), t["threshold"],
          t["status"]) for t in tgs]) if tgs else "No point in scope (targets are evaluated on a GPU, at N ≥ 4096).")
    out += ["", "## Correctness checks (before timing)", ""]
    out.append(harness.markdown_table(
        ["backend", "points", "passed", "worst rel err"],
        [(b, len(cs), sum(bool(c["passed"]) for c in cs),
          f(max((c.get("max_rel_err") or 0.0) for c in cs))) for b, cs in _group(data["checks"], "backend").items()]))
    errors = [r for r in data["rows"] if r["status"] == "error"]
    out += ["", f"## Errors ({len(errors)} points)", ""]
    out.append(harness.markdown_table(["mode", "point", "backend", "stage", "error"],
                                      [(r["mode"], Point(**{k: r[k] for k in ("sweep", "n", "d", "h", "dtype", "count",
                                        "assignment")}).label(), r["backend"], r["stage"], r["error"]) for r in errors])
               if errors else "None.")
    out += ["", "## Results", "",
            "ms = median time; GB/s = floor bytes / ms; % BW = GB/s / copy bandwidth; ×one = ms / ms of one fused "
            "adapter (lower is better); ×loop = ms of the loop / ms (higher is better).", ""]
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in data["rows"]:
        groups.setdefault((r["mode"], r["dtype"], r["n"], r["d"], r["h"], r["assignment"]), []).append(r)
    for (mode, dtype, n, d, h, assignment), grp in groups.items():
        tail = f" · {assignment}" if sweep == "mixed" else ""
        out += [f"### {mode} · {dtype} · N={n} · D={d} · H={h}{tail}", ""]
        out.append(harness.markdown_table(
            [what, "backend", "ms", "GB/s", "% BW", "×one", "×loop", "rel err", "status"],
            [(r["count"], r["backend"], f(r["ms"], ".4g"), f(r["gbps"], ".4g"),
              f(100 * r["frac_copy_bw"], ".3g") if r["frac_copy_bw"] is not None else "–",
              f(r["ratio_vs_one_adapter"], ".3g"), f(r["speedup_vs_loop"], ".3g"), f(r["max_rel_err"], ".2g"),
              r["status"] if r["status"] == "ok" else f"{r['status']} ({r['stage']})") for r in grp]))
        out.append("")
    return "\n".join(out)


def _group(items: List[Dict[str, Any]], key: str) -> Dict[str, List[Dict[str, Any]]]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item[key], []).append(item)
    return groups


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the many-adapter sweeps (bench_linear_adapter.py's parser calls this)."""
    p.add_argument("--sweep", default="op", choices=("op",) + SWEEPS,
                   help="op: the single-adapter sweep; chain: K adapters in a chain; mixed: A adapters in one batch")
    p.add_argument("--k", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="chain lengths for --sweep chain (default 1,2,4,8)")
    p.add_argument("--a", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="adapter counts for --sweep mixed (default 1,8,64,256)")


def main(args: argparse.Namespace, argv: Sequence[str], script: str) -> int:
    """Run ``args.sweep`` and write results.json and report.md to ``args.out`` (default
    bench/results/<op>); returns the exit status."""
    from bench_linear_adapter import TOLERANCES, TimingConfig

    sweep = args.sweep
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    preset = "cpu-small" if (args.cpu_small or (not gpu and not args.quick)) else ("quick" if args.quick else "full")
    ns, ds, hs, dts, counts = PRESETS[preset]
    ns, ds, hs, dts = args.n or ns, args.d or ds, args.h or hs, args.dtypes or dts
    counts = (args.k if sweep == "chain" else args.a) or counts[sweep]
    modes = [m for m in args.modes if m in MODES] or list(MODES)
    backends = [b for b in (args.backends or BACKENDS[sweep]) if b in BACKENDS[sweep]]
    out_dir = args.out if args.out.name != "linear_adapter" else args.out.parent / OPS[sweep]
    out_dir.mkdir(parents=True, exist_ok=True)
    tc = TimingConfig(warmup_ms=args.warmup_ms if args.warmup_ms is not None else (25.0 if gpu else 2.0),
                      rep_ms=args.rep_ms if args.rep_ms is not None else (100.0 if gpu else 20.0),
                      min_reps=args.min_reps, max_reps=args.max_reps, flush_l2=gpu and not args.no_flush_l2)
    if not gpu:
        torch.set_num_threads(args.cpu_threads)
    assignments = ASSIGNMENTS if sweep == "mixed" else ("-",)
    points = [Point(sweep, n, d, h, dt, c, asg) for dt in dts for d in ds for h in hs for n in ns
              for asg in assignments for c in counts]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    env = harness.environment_record(list(argv), device, script=script)
    try:
        copy = harness.measure_copy_bandwidth(device, None if gpu else 16 << 20)
    except Exception as exc:
        copy = {"gbps": None, "error": harness.format_error(exc)}
    log(f"{OPS[sweep]} {sweep} sweep on {env['device_name']} ({preset}: {len(points)} points x {backends} x {modes})")
    run = dict(environment=env, copy_bandwidth=copy,
               config=dict(preset=preset, sweep=sweep, backends=list(backends), modes=modes,
                           timing=dataclasses.asdict(tc), seed=args.seed))
    data: Dict[str, Any] = dict(schema=1, op=OPS[sweep], runs=[run], rows=[], checks=[])
    start = time.monotonic()
    for i, point in enumerate(points):
        if args.time_budget_s is not None and i > 0 and time.monotonic() - start > args.time_budget_s:
            log(f"stopping before {point.label()}: time budget of {args.time_budget_s:g} s spent")
            break
        log(f"[{i + 1}/{len(points)}] {point.label()}")
        rows, checks = run_point(point, backends, modes, device, tc, args.tol or TOLERANCES[point.dtype], args.seed, log)
        data["rows"] += rows
        data["checks"] += checks
    derive(data["rows"], sweep, copy.get("gbps"))
    data["targets"] = targets(data["rows"], sweep, 4096) if gpu else []  # interpreter times say nothing
    harness.write_json(out_dir / "results.json", data)
    (out_dir / "report.md").write_text(render(data, sweep) + "\n")
    errors = [r for r in data["rows"] if r["status"] == "error"]
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.md'}; {len(errors)} error rows")
    return 1 if (args.fail_on_error and errors) else 0
