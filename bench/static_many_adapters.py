"""Static kernel report of the many-adapter kernels (the routed batch's and the fused chain's), without a GPU.

The launchers of ``fusedadapters.ops.triton.routed_adapter`` run on CPU tensors of the real shapes inside
``record_launches()``, which records every launch (kernel, grid, arguments, constexprs) instead of
running it. Each distinct launch is then compiled exactly as Triton's JIT would
specialise it on a GPU, for sm_90a and sm_80, and measured with the machinery of
``bench/static_report.py`` (``compile_job``, ``analyse_job``, ``occupancy``): registers, spill bytes,
shared memory, resident warps per SM and what limits them. No traffic or time model here (that report
has one for the single-adapter kernels). The routed forward and backward are the single adapter's
kernels over the rows grouped by adapter (``ROUTED``), planned with each target's ``DeviceLimits``:
blocks, chunks and grids as the launcher makes them on that GPU.

Grid: pre and post norm; bf16 and fp32; D = 4096; H in {16, 64, 256}; A = 8 adapters over N = 8192
rows (forward, backward rows and columns passes, the per-adapter gradient sum). The fused chain
(``ops.triton.adapter_chain``, K = 4 adapters of the point's H and norm) is compiled the same way, with
and without saved inputs, at N = 4096 and 16384, and modelled with ``bench/static_report.py``'s traffic and time model beside
the loop it replaces (four single-adapter forwards, ``plan_forward``) and one single-adapter forward:
the ``chain model`` table (bf16, sm_90). ``--check`` exits 1 when a bf16 launch spills, needs more
shared memory than a block gets, or fails to compile.

Usage::

    python bench/static_many_adapters.py            # -> bench/results/static/many_adapters.{json,md}
    python bench/static_many_adapters.py --check --out /tmp/static

Run it without ``TRITON_INTERPRET`` (kernels do not compile under the interpreter).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import static_report  # noqa: E402

from fusedadapters.ops import AdapterParams  # noqa: E402
from fusedadapters.ops.triton import adapter_chain as chain_kernels  # noqa: E402
from fusedadapters.ops.triton import linear_adapter as kernels  # noqa: E402
from fusedadapters.ops.triton import routed_adapter as routed_kernels  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GRID = dict(norm=("pre", "post"), dtype=("bf16", "fp32"), H=(16, 64, 256), arch=("sm_90", "sm_80"))
N, D, ADAPTERS = 8192, 4096, 8


def planned_launches(norm: str, dtype: torch.dtype, h: int, limits: Any) -> List[routed_kernels.KernelLaunch]:
    """Every launch of a routed forward and backward at one grid point, sized for ``limits`` (the target
    GPU's, as the launcher would size them there)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((N, D), generator=gen).to(dtype)
    index = torch.randint(-1, ADAPTERS, (N,), generator=gen)
    ln_w, ln_b = torch.ones(ADAPTERS, D, dtype=dtype), torch.zeros(ADAPTERS, D, dtype=dtype)
    down, up = torch.zeros(ADAPTERS, h, D, dtype=dtype), torch.zeros(ADAPTERS, D, h, dtype=dtype)
    f32 = dict(dtype=torch.float32)
    probs = [0.0] * ADAPTERS
    with routed_kernels.record_launches() as launches:
        routed_kernels.routed_adapter_forward(x, index, ln_w, ln_b, down, up, None, None, probs, "swish", norm, 1e-5,
                                              True, True, limits=limits)
        proj = torch.zeros(ADAPTERS, 2, h, **f32) if norm == "pre" else torch.empty(0, **f32)
        routed_kernels.routed_adapter_backward(
            x, torch.ones(N, **f32), x, index, ln_w, ln_b, down, up, None, None, torch.zeros(N, h, **f32),
            torch.zeros(2, N, **f32), torch.ones(N, **f32), proj, probs, "swish", norm, True, True, True, True, True,
            limits=limits)
    return launches


CHAIN_K, CHAIN_ROWS = 4, (4096, 16384)


@dataclasses.dataclass(frozen=True)
class ChainPoint(static_report.Point):
    """A point of the static report's model with its own number of rows."""

    rows: int = 0

    @property
    def N(self) -> int:
        return self.rows


def chain_launches(norm: str, dtype: torch.dtype, h: int, n: int, save_inputs: bool,
                   limits: Any) -> List[kernels.Launch]:
    """The fused chain forward of CHAIN_K adapters over n rows (meta tensors)."""
    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    adapters = [AdapterParams(meta(D), meta(D), meta(h, D), meta(D, h), norm_position=norm) for _ in range(CHAIN_K)]
    return chain_kernels.plan_chain_forward(meta(n, D), adapters, [None] * CHAIN_K, [None] * CHAIN_K, False,
                                            save_inputs, limits)[1]


def modelled_us(point: ChainPoint, launches: Sequence[Any]) -> Any:
    """Σ of the model's launch times (None if a launch did not compile), and the chain launch's bound."""
    gpu = static_report.GPU_MODELS[point.arch]
    records = []
    for launch in launches:
        job = static_report.compile_job(launch, gpu.capability)
        records.append(static_report.launch_record(point, launch, job, static_report.analyse_job(job)))
    if any(r.get("predicted_us") is None for r in records):
        return None, "error"
    return sum(r["predicted_us"] for r in records), records[-1]["bound"]


def chain_model() -> List[Dict[str, Any]]:
    """bf16 on sm_90: the fused chain (inference: out in place; training: x_1 … x_{K-1} saved) against K
    single-adapter forwards and one, at each of CHAIN_ROWS."""
    rows = []
    gpu = static_report.GPU_MODELS["sm_90"]
    for norm in GRID["norm"]:
        for h in GRID["H"]:
            for n in CHAIN_ROWS:
                point = ChainPoint("forward", norm, "bf16", D, h, "plain", "sm_90", rows=n)
                x = torch.empty((n, D), dtype=torch.bfloat16, device="meta")
                params = [torch.empty(s, dtype=torch.bfloat16, device="meta") for s in ((D,), (D,), (h, D), (D, h))]
                single = kernels.plan_forward(x, *params, None, None, "swish", norm, 1e-5, 0.0, True, False,
                                              gpu.limits)[1]
                one, _ = modelled_us(point, single)
                row = dict(norm=norm, H=h, N=n, one_adapter_us=one, loop_us=None if one is None else CHAIN_K * one)
                for save_inputs, name in ((False, "inference"), (True, "training")):
                    us, bound = modelled_us(point, chain_launches(norm, torch.bfloat16, h, n, save_inputs, gpu.limits))
                    row[f"fused_{name}_us"], row[f"fused_{name}_bound"] = us, bound
                rows.append(row)
                print(f"chain model {norm} H={h} N={n}: {row}", flush=True)
    return rows


def build_report() -> Dict[str, Any]:
    records = []
    for norm in GRID["norm"]:
        for dtype_name in GRID["dtype"]:
            for h in GRID["H"]:
                seen = set()
                for arch in GRID["arch"]:
                    gpu = static_report.GPU_MODELS[arch]
                    chain = [routed_kernels.KernelLaunch(l.name, l.kernel, l.grid, l.args, l.meta)
                             for n in CHAIN_ROWS for save in (False, True)
                             for l in chain_launches(norm, DTYPES[dtype_name], h, n, save, gpu.limits)[-1:]]
                    for launch in planned_launches(norm, DTYPES[dtype_name], h, gpu.limits) + chain:
                        job = static_report.compile_job(launch, gpu.capability)
                        if job.key in seen:
                            continue
                        seen.add(job.key)
                        record = dict(kernel=launch.name, norm=norm, dtype=dtype_name, D=D, H=h, arch=arch,
                                      grid=list(launch.grid), constexprs={k: v for k, v in launch.meta.items()
                                                                          if isinstance(v, (bool, int, str))})
                        analysis = static_report.analyse_job(job)
                        record.update({k: v for k, v in analysis.items() if k != "loops"})
                        if "error" not in analysis:
                            shared = analysis["shared_dynamic"] + analysis["shared_static"]
                            record.update(shared_total=shared, shared_limit=gpu.shared_memory_per_block,
                                          **static_report.occupancy(analysis["registers"], shared,
                                                                    analysis["num_warps"], gpu))
                        records.append(record)
                        print(f"{arch} {norm} {dtype_name} H={h} {launch.name}: "
                              f"{record.get('error') or str(record['registers']) + ' registers'}", flush=True)
    return dict(launches=records, check_failures=check_failures(records), chain_model=chain_model())


def check_failures(records: Sequence[Dict[str, Any]]) -> List[str]:
    failures = []
    for r in records:
        where = f"{r['kernel']} {r['arch']} {r['norm']} {r['dtype']} H={r['H']}"
        if "error" in r:
            failures.append(f"{where}: does not compile: {r['error']}")
        elif r["dtype"] == "bf16" and (r["spill_stores"] or r["spill_loads"]):
            failures.append(f"{where}: spills ({r['spill_stores']} bytes stored, {r['spill_loads']} loaded)")
        elif r["shared_total"] > r["shared_limit"]:
            failures.append(f"{where}: {r['shared_total']} bytes of shared memory over {r['shared_limit']}")
    return failures


def render(report: Dict[str, Any], command: str) -> str:
    f = harness.fmt
    out = ["# Static kernel report: routed and chain kernels", "",
           f"Produced by `{command}` (see the script's docstring for the method). One row per distinct "
           f"compiled launch; N = {N}, D = {D}, A = {ADAPTERS}.", ""]
    out.append(harness.markdown_table(
        ["arch", "norm", "dtype", "H", "kernel", "grid", "warps", "registers", "spill st/ld", "smem", "warps/SM",
         "limiter"],
        [(r["arch"], r["norm"], r["dtype"], r["H"], r["kernel"], "×".join(map(str, r["grid"])),
          r.get("num_warps", "–"), r.get("registers", "error"),
          f"{r['spill_stores']}/{r['spill_loads']}" if "spill_stores" in r else "–", f(r.get("shared_total")),
          f(r.get("resident_warps_per_sm")), r.get("occupancy_limiter", r.get("error", "–")))
         for r in report["launches"]]))
    out += ["", "## Chain model (bf16, sm_90)", "",
            f"Modelled µs (`bench/static_report.py`'s model) of K = {CHAIN_K} adapters: the fused launch "
            "(inference: out written in place; training: x_1 … x_{K-1} written for the backward, with the "
            "launch's bound), a loop of K single-adapter forwards (K × one), and one single-adapter forward.", ""]
    out.append(harness.markdown_table(
        ["norm", "H", "N", "one adapter", "loop", "fused inference", "×one", "fused training", "×one"],
        [(r["norm"], r["H"], r["N"], f(r["one_adapter_us"], ".1f"), f(r["loop_us"], ".1f"),
          f"{f(r['fused_inference_us'], '.1f')} ({r['fused_inference_bound']})",
          f(None if r["fused_inference_us"] is None or not r["one_adapter_us"]
            else r["fused_inference_us"] / r["one_adapter_us"], ".2f"),
          f"{f(r['fused_training_us'], '.1f')} ({r['fused_training_bound']})",
          f(None if r["fused_training_us"] is None or not r["one_adapter_us"]
            else r["fused_training_us"] / r["one_adapter_us"], ".2f"))
         for r in report["chain_model"]]))
    out += ["", f"## Check failures ({len(report['check_failures'])})", ""]
    out += [f"- {line}" for line in report["check_failures"]] or ["None."]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=static_report.DEFAULT_OUT)
    p.add_argument("--check", action="store_true", help="exit 1 on a bf16 spill, a shared-memory overflow or a "
                                                          "compile failure")
    args = p.parse_args(argv)
    report = build_report()
    report["environment"] = harness.environment_record(argv, torch.device("cpu"), script=str(Path(__file__)))
    args.out.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.out / "many_adapters.json", report)
    (args.out / "many_adapters.md").write_text(render(report, report["environment"]["command"]))
    print(f"wrote {args.out / 'many_adapters.json'} and {args.out / 'many_adapters.md'}; "
          f"{len(report['check_failures'])} check failures")
    return 1 if args.check and report["check_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
