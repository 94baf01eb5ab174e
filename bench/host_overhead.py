"""Host time of the Triton backend: what one call of the fused op costs the CPU, kernels left out.

On the H100 every fused point below N·D = 2^28 took the same time whatever N (about 0.22 ms forward,
0.8-1.1 ms backward at D = 4096: bench/results/2026-11-25-nvidia-h100-80gb-hbm3/summary.md): the host,
not the GPU, set it. This script measures that host path without a GPU: ``ops.linear_adapter`` on
CPU tensors with the Triton launcher's plans built as usual but no kernel launched (``_run`` replaced
by a no-op), so the figure is argument checks, dispatch, the custom op and autograd machinery, the
launch plans and the output allocations. Triton's own per-launch cost comes on top on a GPU and is not
measured here. The forward + backward figure also holds the CPU's own arithmetic where the backward
calls torch on its buffers (the weight-gradient partials' sum over row splits and the cast to the
weights' dtype, which run as GPU kernels there): it is an upper bound of the host path, the forward
figure a close one.

    python bench/host_overhead.py [--out FILE.json] [--calls 2000] [--chain 4]

Prints microseconds per call (median of 7 rounds, the functions timed in turn within each round) for the forward under ``torch.no_grad()`` and for
forward plus backward; ``--out`` also writes them with the environment record. ``--chain K`` adds
``ops.adapter_chain`` over K such adapters, both ways it runs on triton: its fused launch
(``fused=True``) and one single-adapter call per adapter (``fused=False``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fusedadapters.ops import AdapterParams, adapter_chain, linear_adapter  # noqa: E402
from fusedadapters.ops.triton import linear_adapter as kernels  # noqa: E402
from fusedadapters.ops.triton import routed_adapter as routed_kernels  # noqa: E402


def per_call_us(fns: Dict[str, Callable[[], object]], calls: int, rounds: int = 7) -> Dict[str, float]:
    """Median µs per call of each function; the rounds interleave the functions, so that a slow spell of
    a shared machine weighs on all of them alike."""
    for fn in fns.values():
        for _ in range(max(10, calls // 20)):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(n: int, d: int, h: int, calls: int, chain: int = 0) -> Dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(torch.bfloat16).requires_grad_()

    def adapter_tensors() -> List[torch.Tensor]:
        return [torch.randn(*shape, generator=gen).to(torch.bfloat16).requires_grad_()
                for shape in ((d,), (d,), (h, d), (d, h))]

    params = adapter_tensors()
    adapters = [AdapterParams(*adapter_tensors()) for _ in range(chain)]
    leaves = [x, *params] + [t for p in adapters for t in p[:4]]
    dout = torch.randn(n, d, generator=gen).to(torch.bfloat16)

    def both_modes(name: str, fn: Callable[[], torch.Tensor]) -> Dict[str, Callable[[], object]]:
        def forward():
            with torch.no_grad():
                return fn()

        def forward_backward():
            fn().backward(dout)
            for t in leaves:
                t.grad = None

        return {f"{name}forward_us": forward, f"{name}forward_backward_us": forward_backward}

    fns = both_modes("", lambda: linear_adapter(x, *params, backend="triton"))
    for fused in (True, False) if chain else ():
        fns.update(both_modes(f"chain{chain}_{'fused' if fused else 'loop'}_",
                              lambda fused=fused: adapter_chain(x, adapters, backend="triton", fused=fused)))
    no_launch = lambda launches, limits: None  # noqa: E731
    originals, interpret = (kernels._run, routed_kernels._run), os.environ.get("TRITON_INTERPRET")
    kernels._run = routed_kernels._run = no_launch
    os.environ["TRITON_INTERPRET"] = "1"  # lets CPU tensors take the Triton path; nothing is launched
    try:
        return per_call_us(fns, calls)
    finally:
        kernels._run, routed_kernels._run = originals
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--h", type=int, default=64)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--chain", type=int, default=0, help="also adapter_chain over K adapters (0: not)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.n, args.d, args.h, args.calls, args.chain)
    print(f"host time per call, N={args.n} D={args.d} H={args.h} bf16, kernels not launched:")
    for name, us in result.items():
        print(f"  {name[:-3]}: {us:.1f} us")
    if args.out:
        import fusedadapters

        harness.write_json(args.out, dict(result, n=args.n, d=args.d, h=args.h, calls=args.calls, chain=args.chain,
                                          package=str(Path(fusedadapters.__file__).parent),
                                          environment=harness.environment_record(
                                              sys.argv[1:] if argv is None else list(argv), torch.device("cpu"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
