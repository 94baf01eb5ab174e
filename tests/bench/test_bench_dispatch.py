"""The dispatch benchmark: compares like with like, writes only when asked, names the CPU."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_dispatch.py"
RESULTS = REPO / "bench" / "results"


def _load_script():
    return load_script(SCRIPT, "bench_dispatch_under_test")


def _snapshot(directory: Path):
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} if directory.exists() else {}


def test_inline_stack_computes_what_the_mixin_stack_computes():
    bench = _load_script()
    mixin, inline = bench.build_stacks(seed=3)
    x = torch.randn(bench.BATCH, bench.D)
    bench.check_stacks_agree(mixin, inline, x)  # raises if they differ, or if the adapters change nothing
    # The inline stack calls neither the mixin nor the adapter module's own forward.
    adapter_types = {type(layer.get_adapter_module("adapter")) for layer in mixin}
    assert not any(isinstance(m, tuple(adapter_types)) for m in inline.modules())


def test_a_stack_that_differs_is_refused():
    bench = _load_script()
    mixin, inline = bench.build_stacks(seed=3)
    inline = copy.deepcopy(inline)  # the stacks share their modules
    with torch.no_grad():
        inline[5].up.weight.add_(0.01)
    with pytest.raises(AssertionError):
        bench.check_stacks_agree(mixin, inline, torch.randn(bench.BATCH, bench.D))


def test_runs_without_writing_unless_asked(tmp_path):
    before = _snapshot(RESULTS)
    cmd = [sys.executable, str(SCRIPT), "--rounds", "3", "--iterations", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio" in proc.stdout and "wrote" not in proc.stdout
    assert _snapshot(RESULTS) == before and list(tmp_path.iterdir()) == []


def test_out_writes_a_record_naming_the_cpu(tmp_path):
    out = tmp_path / "dispatch.json"
    cmd = [sys.executable, str(SCRIPT), "--rounds", "3", "--iterations", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    cpu = record["environment"]["cpu"]
    model_names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    if model_names:
        assert cpu == model_names[0]
    assert cpu and cpu not in ("x86_64", "aarch64")
    medians = record["median_s_per_forward"]
    assert set(medians) == {"mixin", "inline"} and all(v > 0 for v in medians.values())
    assert record["ratio"] == pytest.approx(medians["mixin"] / medians["inline"])
    assert record["target"] == 1.15 and record["target_met"] == (record["ratio"] <= 1.15)
    assert "bench_dispatch.py" in record["environment"]["command"] and "--out" in record["environment"]["command"]


@pytest.mark.parametrize("flag", ["--rounds", "--iterations", "--threads"])
def test_wrong_counts_are_refused(flag):
    proc = subprocess.run([sys.executable, str(SCRIPT), flag, "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and flag in proc.stderr
