"""The chain and mixed-batch sweeps of bench_linear_adapter.py run end to end on tiny shapes and record
what they checked and timed (on the CPU under the interpreter, or on CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from fusedadapters.ops import backend as backend_mod

from .test_bench_linear_adapter import SCRIPT, _load_script

pytestmark = pytest.mark.skipif(not backend_mod.triton_available(), reason="needs triton")

TINY = ["--n", "16", "--d", "16", "--h", "8", "--warmup-ms", "0.1", "--rep-ms", "0.1", "--min-reps", "1",
        "--max-reps", "1", "--modes", "forward,full"]


@pytest.mark.parametrize("sweep,count_flag,backends", [
    ("chain", ["--k", "2"], ["chain", "fused", "loop", "one-adapter", "eager"]),
    ("mixed", ["--a", "3"], ["routed", "masked-loop", "one-adapter", "eager"]),
])
def test_sweep_checks_times_and_reports(tmp_path, sweep, count_flag, backends):
    script = _load_script()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status = script.main(["--sweep", sweep, "--device", device, "--out", str(tmp_path), "--fail-on-error",
                          *count_flag, *TINY])
    assert status == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["backend"] for r in data["rows"]} == set(backends)
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in data["rows"])
    assert all(c["passed"] and c["max_rel_err"] < 1e-4 for c in data["checks"])
    one = [r for r in data["rows"] if r["backend"] == "one-adapter"]
    assert all(r["ratio_vs_one_adapter"] == 1.0 for r in one)
    report = (tmp_path / "report.md").read_text()
    assert f"({sweep} sweep)" in report and str(SCRIPT.name) in report
