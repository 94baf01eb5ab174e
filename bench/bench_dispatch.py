"""Python dispatch cost of the adapter mixins: 24 adapter-enabled layers against the same plain layers.

Each layer is the tutorial's block (``fusedadapters.demo.MLP``: ``LayerNorm(Linear(x))``) with one
enabled ``LinearAdapter`` under the residual strategy. The mixin stack runs it through
``is_adapter_available`` / ``forward_enabled_adapters`` and the strategy; the plain stack hard-wires
``x + adapter(x)`` on the very same modules. Small tensors, so
the time is Python dispatch, which is what this measures. Target (DESIGN.md section 5): mixin time
/ plain time <= 1.15.

    python -m pytest bench/bench_dispatch.py --benchmark-only

times each stack with pytest-benchmark, then measures the ratio the target is about with the two
stacks interleaved round by round (so that frequency changes and other load hit both alike), and
writes it to ``bench/results/dispatch-<machine>-cpu.json`` and prints it.
"""

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from fusedadapters.adapter_modules import LinearAdapter, LinearAdapterConfig
from fusedadapters.demo import MLP

LAYERS, D, H, BATCH = 24, 64, 8, 8
TARGET = 1.15
RESULTS = Path(__file__).resolve().parent / "results"


class PlainLayer(torch.nn.Module):
    def __init__(self, block: MLP, adapter: LinearAdapter):
        super().__init__()
        self.fc = block.fc
        self.ln = block.ln
        self.adapter = adapter

    def forward(self, x):
        x = self.ln(self.fc(x))
        return x + self.adapter(x)


def build_stacks():
    torch.manual_seed(0)
    mixin = torch.nn.Sequential(*[MLP(D) for _ in range(LAYERS)])
    for layer in mixin:
        layer.add_adapter("adapter", cfg=LinearAdapterConfig(in_features=D, dim=H))
    plain = torch.nn.Sequential(*[PlainLayer(layer, layer.adapter_layer["adapter"]) for layer in mixin])
    return mixin.eval(), plain.eval()


def interleaved_medians(mixin, plain, x, rounds=400, iterations=10):
    """Median seconds per call of each stack, timing them alternately round by round."""
    times = {"mixin": [], "plain": []}
    with torch.no_grad():
        for _ in range(rounds):
            for name, model in (("plain", plain), ("mixin", mixin)):
                start = time.perf_counter()
                for _ in range(iterations):
                    model(x)
                times[name].append((time.perf_counter() - start) / iterations)
    return {name: statistics.median(t) for name, t in times.items()}


@pytest.fixture(scope="module")
def stacks(request):
    mixin, plain = build_stacks()
    x = torch.randn(BATCH, D)
    with torch.no_grad():
        torch.testing.assert_close(mixin(x), plain(x))
    medians = {}
    yield mixin, plain, x, medians
    if len(medians) == 2:
        interleaved = interleaved_medians(mixin, plain, x)
        ratio = interleaved["mixin"] / interleaved["plain"]
        record = {
            "benchmark": "dispatch",
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "layers": LAYERS, "D": D, "H": H, "batch": BATCH,
            "pytest_benchmark_median_s": medians,
            "interleaved_median_s": interleaved,
            "ratio": ratio,
            "target": TARGET,
            "target_met": ratio <= TARGET,
        }
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"dispatch-{platform.machine()}-cpu.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        line = (f"dispatch: mixin/plain = {ratio:.3f}x over {LAYERS} layers "
                f"(target <= {TARGET}x: {'met' if ratio <= TARGET else 'MISSED'}); wrote {path}")
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print("\n" + line)


def _run(benchmark, stacks, which):
    mixin, plain, x, medians = stacks
    model = mixin if which == "mixin" else plain
    benchmark.group = "dispatch"
    with torch.no_grad():
        benchmark.pedantic(model, args=(x,), rounds=300, iterations=10, warmup_rounds=20)
    medians[which] = benchmark.stats.stats.median


def test_plain_layers(benchmark, stacks):
    _run(benchmark, stacks, "plain")


def test_adapter_mixin_layers(benchmark, stacks):
    _run(benchmark, stacks, "mixin")
