"""Static kernel report of the many-adapter kernels (the routed batch's), without a GPU.

The launchers of ``fusedadapters.ops.triton.routed_adapter`` run on CPU tensors of the real shapes inside ``record_launches()``, which records every launch (kernel, grid, arguments,
constexprs) instead of running it. Each distinct launch is then compiled exactly as Triton's JIT would
specialise it on a GPU, for sm_90a and sm_80, and measured with the machinery of
``bench/static_report.py`` (``compile_job``, ``analyse_job``, ``occupancy``): registers, spill bytes,
shared memory, resident warps per SM and what limits them. No traffic or time model here (that report
has one for the single-adapter kernels). The routed forward and backward are the single adapter's
kernels over the rows grouped by adapter (``ROUTED``), planned with each target's ``DeviceLimits``:
blocks, chunks and grids as the launcher makes them on that GPU.

Grid: pre and post norm; bf16 and fp32; D = 4096; H in {16, 64, 256}; A = 8 adapters over N = 8192
rows (forward, backward rows and columns passes, the per-adapter gradient sum). The adapter chain has
no kernel of its own (``ops.adapter_chain`` runs the single-adapter kernels, which
``bench/static_report.py`` covers). ``--check`` exits 1 when a bf16
launch spills, needs more shared memory than a block gets, or fails to compile.

Usage::

    python bench/static_many_adapters.py            # -> bench/results/static/many_adapters.{json,md}
    python bench/static_many_adapters.py --check --out /tmp/static

Run it without ``TRITON_INTERPRET`` (kernels do not compile under the interpreter).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import static_report  # noqa: E402

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


def build_report() -> Dict[str, Any]:
    records = []
    for norm in GRID["norm"]:
        for dtype_name in GRID["dtype"]:
            for h in GRID["H"]:
                seen = set()
                for arch in GRID["arch"]:
                    gpu = static_report.GPU_MODELS[arch]
                    for launch in planned_launches(norm, DTYPES[dtype_name], h, gpu.limits):
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
    return dict(launches=records, check_failures=check_failures(records))


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
    out = ["# Static kernel report: routed kernels", "",
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
