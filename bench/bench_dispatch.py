"""Python dispatch cost of the adapter mixins: 24 adapter-enabled layers against the same layers written inline.

Each layer is the tutorial's block (``fusedadapters.demo.MLP``: ``LayerNorm(Linear(x))``) with one
enabled ``LinearAdapter`` (pre-norm, swish) under the residual strategy.

* mixin: the block as users write it; its forward calls ``forward_enabled_adapters``, which runs the
  adapter through its strategy.
* inline: the very same modules called one after another, the adapter's layers included, with the
  residual add written out: ``h = ln(fc(x)); h + up(act(down(norm(h))))``. No mixin, no strategy, no
  adapter ``forward`` (with its input check), no ``nn.Sequential``.

Small tensors (batch 8, width 64, bottleneck 8) on the CPU, so the difference is Python dispatch.
The two stacks are timed alternately round by round (so that frequency changes and other load hit
both alike) and the ratio of their medians is reported. The adapters get random non-zero weights
and the two stacks are checked to agree before timing. Target (docs/design.md, "Floors and
targets"): mixin time / inline time <= 1.15.

    python bench/bench_dispatch.py                 # print the result only
    python bench/bench_dispatch.py --save          # also write bench/results/dispatch-cpu.json
    python bench/bench_dispatch.py --out FILE      # also write FILE

The record names the CPU model (from /proc/cpuinfo), versions, git commit and the command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment_record, write_json  # noqa: E402

from fusedadapters.adapter_modules import LinearAdapter, LinearAdapterConfig  # noqa: E402
from fusedadapters.demo import MLP  # noqa: E402

LAYERS, D, H, BATCH = 24, 64, 8, 8
TARGET = 1.15
DEFAULT_RESULT = Path(__file__).resolve().parent / "results" / "dispatch-cpu.json"


class InlineLayer(torch.nn.Module):
    """``MLP`` plus its pre-norm adapter under residual add, written out with the same modules."""

    def __init__(self, block: MLP, adapter: LinearAdapter):
        super().__init__()
        self.fc, self.ln = block.fc, block.ln
        self.norm, self.down, self.act, self.up = adapter.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.fc(x))
        return h + self.up(self.act(self.down(self.norm(h))))


def build_stacks(seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """The mixin stack and the inline stack over the same modules, adapters with random weights."""
    torch.manual_seed(seed)
    mixin = torch.nn.Sequential(*[MLP(D) for _ in range(LAYERS)])
    for layer in mixin:
        layer.add_adapter("adapter", cfg=LinearAdapterConfig(in_features=D, dim=H))
        with torch.no_grad():
            for p in layer.get_adapter_module("adapter").parameters():
                p.normal_(0.0, 0.3)
    inline = torch.nn.Sequential(*[InlineLayer(layer, layer.get_adapter_module("adapter")) for layer in mixin])
    return mixin.eval(), inline.eval()


def check_stacks_agree(mixin: torch.nn.Module, inline: torch.nn.Module, x: torch.Tensor) -> None:
    """The two stacks compute the same function, and the adapters do change it."""
    with torch.no_grad():
        out = mixin(x)
        torch.testing.assert_close(out, inline(x), rtol=0, atol=0)
        for layer in mixin:
            layer.set_enabled_adapters(enabled=False)
        without = mixin(x)
        for layer in mixin:
            layer.set_enabled_adapters(enabled=True)
    if torch.allclose(out, without):
        raise AssertionError("the adapters leave the output unchanged: the comparison would time nothing")


def interleaved_medians(
    stacks: Dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, iterations: int, warmup: int
) -> Dict[str, float]:
    """Median seconds per call of each stack, timing them alternately round by round."""
    times = {name: [] for name in stacks}
    with torch.no_grad():
        for model in stacks.values():
            for _ in range(warmup):
                model(x)
        for _ in range(rounds):
            for name, model in stacks.items():
                start = time.perf_counter()
                for _ in range(iterations):
                    model(x)
                times[name].append((time.perf_counter() - start) / iterations)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(rounds: int = 400, iterations: int = 10, warmup: int = 50, threads: int = 1) -> dict:
    """Build, check and time both stacks; the record written to the results file."""
    torch.set_num_threads(threads)
    mixin, inline = build_stacks()
    x = torch.randn(BATCH, D)
    check_stacks_agree(mixin, inline, x)
    medians = interleaved_medians({"inline": inline, "mixin": mixin}, x, rounds, iterations, warmup)
    ratio = medians["mixin"] / medians["inline"]
    return {
        "benchmark": "dispatch",
        "layers": LAYERS, "D": D, "H": H, "batch": BATCH,
        "rounds": rounds, "iterations": iterations, "torch_threads": threads,
        "median_s_per_forward": medians,
        "ratio": ratio,
        "target": TARGET,
        "target_met": ratio <= TARGET,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true", help="write the record to bench/results/dispatch-cpu.json")
    parser.add_argument("--out", type=Path, default=None, help="write the record to this file")
    parser.add_argument("--rounds", type=int, default=400, help="interleaved rounds (default 400)")
    parser.add_argument("--iterations", type=int, default=10, help="forwards per stack per round (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.iterations < 1 or args.threads < 1:
        parser.error("--rounds, --iterations and --threads must be at least 1")

    record = {"environment": environment_record(list(sys.argv[1:] if argv is None else argv), torch.device("cpu"),
                                                script="bench/bench_dispatch.py")}
    record.update(measure(rounds=args.rounds, iterations=args.iterations, threads=args.threads))
    medians = record["median_s_per_forward"]
    print(f"dispatch on {record['environment']['cpu']}: mixin {medians['mixin'] * 1e6:.0f} us, inline "
          f"{medians['inline'] * 1e6:.0f} us per forward of {LAYERS} layers; ratio {record['ratio']:.3f}x "
          f"(target <= {TARGET}x: {'met' if record['target_met'] else 'MISSED'})")
    for path in ([DEFAULT_RESULT] if args.save else []) + ([args.out] if args.out else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
