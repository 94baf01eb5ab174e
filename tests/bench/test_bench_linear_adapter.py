"""The linear_adapter benchmark script runs end to end in its CPU-small mode and records what it
measured, checked and failed.

One subprocess run (as CI and a user run it: ``TRITON_INTERPRET=1``, ``--device cpu``) covers the
real backends plus two self-test backends, one that raises and one that returns a wrong result:
both must appear as errors in results.json and report.md, and the wrong one must never be timed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from helpers import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_linear_adapter.py"
REAL_BACKENDS = ["eager", "compile", "triton"]
SELFTEST_BACKENDS = ["selftest-raise", "selftest-wrong"]
MODES = ["forward", "backward", "full"]
N_VALUES = [1, 64]


def _load_script():
    return load_script(SCRIPT, "bench_linear_adapter_under_test")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """Run the CPU-small sweep once; return (output dir, results.json, report.md, stdout)."""
    out = tmp_path_factory.mktemp("bench_linear_adapter")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FUSEDADAPTERS_BACKEND", None)
    cmd = [
        sys.executable, str(SCRIPT), "--device", "cpu", "--cpu-small", "--out", str(out),
        "--n", ",".join(map(str, N_VALUES)), "--backends", ",".join(REAL_BACKENDS + SELFTEST_BACKENDS),
        "--rep-ms", "10", "--rounds", "2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    return out, results, report, proc.stdout


def _rows(results, backend):
    return [r for r in results["rows"] if r["backend"] == backend]


def _assert_timed(row):
    assert row["status"] == "ok", row
    assert row["ms"] > 0 and row["timing"]["rounds"] == 2
    assert row["timing"]["reps"] >= 2 * 5  # two interleaved rounds of at least min_reps repeats
    assert row["bytes"] > 0
    assert math.isfinite(row["gbps"]) and row["gbps"] > 0
    assert math.isfinite(row["frac_copy_bw"]) and row["frac_copy_bw"] > 0
    assert row["max_rel_err"] is not None and row["max_rel_err"] <= 1e-4


def test_outputs_and_environment(cpu_run):
    out, results, report, _ = cpu_run
    run = results["runs"][0]
    assert run["copy_bandwidth"]["gbps"] > 0
    env = run["environment"]
    assert "bench_linear_adapter.py" in env["command"] and "--cpu-small" in env["command"]
    assert env["torch"] and env["timestamp_utc"] and env["env"]["TRITON_INTERPRET"] == "1"
    assert run["config"]["preset"] == "cpu-small"
    for section in ("## Runs", "## Byte model", "## Targets", "## Correctness checks", "## Errors", "## Results",
                    "## Plots"):
        assert section in report
    # matplotlib is optional: either a figure was written or the report says why not
    assert list(out.glob("gbps_*.png")) or "Plots skipped" in report


def test_every_requested_backend_has_a_row_per_point(cpu_run):
    _, results, report, _ = cpu_run
    for backend in REAL_BACKENDS + SELFTEST_BACKENDS:
        points = {(r["mode"], r["n"]) for r in _rows(results, backend)}
        assert points == {(m, n) for m in MODES for n in N_VALUES}, backend
        assert f"| {backend} |" in report


def test_reference_backends_timed_after_passing_the_check(cpu_run):
    _, results, report, _ = cpu_run
    for backend in ("eager", "compile"):
        for row in _rows(results, backend):
            _assert_timed(row)
        checks = [c for c in results["checks"] if c["backend"] == backend]
        assert len(checks) == len(N_VALUES) and all(c["passed"] for c in checks)
        # the check covers the forward output and every gradient
        assert {"out", "out_train", "dx", "dln_weight", "dln_bias", "ddown_weight", "dup_weight"} <= set(
            checks[0]["rel_err"])
    for row in _rows(results, "eager"):
        assert row["speedup_vs_eager"] == pytest.approx(1.0)


def test_triton_column(cpu_run):
    """Triton points are either all checked and timed, or every failure is an error row that the
    report lists (whether the kernels are right is the parity tests' job; this checks the bench)."""
    _, results, report, _ = cpu_run
    rows = _rows(results, "triton")
    if all(r["status"] == "ok" for r in rows):
        for row in rows:
            _assert_timed(row)
            assert math.isfinite(row["speedup_vs_eager"])
        return
    errors_section = report.split("## Errors", 1)[1].split("## Results", 1)[0]
    for row in rows:
        assert row["status"] == "error" and row["stage"] in ("check", "time"), row
        assert row["error"] and row["ms"] is None
        assert row["error"].replace("|", "\\|") in errors_section
    warnings.warn(f"the triton column of the benchmark did not run: {rows[0]['error']}")


def test_failures_are_recorded_not_swallowed(cpu_run):
    _, results, report, stdout = cpu_run
    raising = _rows(results, "selftest-raise")
    assert raising and all(r["status"] == "error" and "deliberate failure" in r["error"] for r in raising)
    assert all(r["ms"] is None and r["gbps"] is None for r in raising)
    wrong = _rows(results, "selftest-wrong")
    assert wrong and all(r["status"] == "error" and r["stage"] == "check" for r in wrong)
    assert all(r["error"].startswith("correctness") and r["ms"] is None for r in wrong)  # never timed
    assert any(c["backend"] == "selftest-wrong" and not c["passed"] for c in results["checks"])
    error_backends = {e["backend"] for e in results["errors"]}
    assert {"selftest-raise", "selftest-wrong"} <= error_backends
    errors_section = report.split("## Errors", 1)[1].split("## Results", 1)[0]
    assert "deliberate failure" in errors_section and "correctness" in errors_section
    assert "deliberate failure" in stdout


def test_merge_rerenders_the_same_rows(cpu_run, tmp_path):
    out, results, _, _ = cpu_run
    script = _load_script()
    assert script.main(["--merge", str(out), "--out", str(tmp_path), "--no-plot"]) == 0
    merged = json.loads((tmp_path / "results.json").read_text())
    key = lambda r: (r["mode"], r["n"], r["backend"], r["status"], r["ms"])  # noqa: E731
    assert sorted(map(key, merged["rows"])) == sorted(map(key, results["rows"]))
    assert (tmp_path / "report.md").exists()


def test_byte_model():
    script = _load_script()
    n, d, h, e = 1000, 4096, 64, 2
    w = (2 * d + 2 * h * d) * e
    assert script.floor_bytes("forward", n, d, h, e, e) == 2 * n * d * e + w
    assert script.floor_bytes("backward", n, d, h, e, e) == 3 * n * d * e + 2 * w
    assert script.floor_bytes("full", n, d, h, e, e) == 5 * n * d * e + 3 * w


def test_targets_are_marked_met_or_missed():
    """Synthetic rows: the targets of docs/design.md, 'Floors and targets', are evaluated at N·D ≥ 2**26 on the triton rows only."""
    script = _load_script()
    runs = [{"copy_bandwidth": {"gbps": 1000.0}}]
    rows = []
    for n, triton_ms in ((16, 0.001), (2**14, 1.0)):  # N·D = 2**16 (out of scope) and 2**26
        for backend, ms in (("eager", 4.0), ("compile-max-autotune", 1.2), ("triton", triton_ms)):
            rows.append(dict(run=0, mode="forward", dtype="bf16", n=n, d=4096, h=64, backend=backend, status="ok",
                             stage=None, error=None, ms=ms, bytes=900_000_000, max_rel_err=0.0))
    script.derive(rows, runs)
    results = {r["target"]: r for r in script.evaluate_targets(rows, "triton", 2**26)}
    assert set(results) == {"fwd-bandwidth", "fwd-vs-eager", "fwd-vs-compile"}  # no backward rows
    assert all(r["n"] == 2**14 for r in results.values())
    assert results["fwd-bandwidth"]["value"] == pytest.approx(0.9) and results["fwd-bandwidth"]["status"] == "met"
    assert results["fwd-vs-eager"]["value"] == pytest.approx(4.0) and results["fwd-vs-eager"]["status"] == "met"
    assert results["fwd-vs-compile"]["value"] == pytest.approx(1.2)
    assert results["fwd-vs-compile"]["status"] == "missed"


def test_rounds_combine_as_the_median_of_their_medians():
    import harness

    rounds = [harness.Timing(median_ms=m, min_ms=m - 1, max_ms=m + 1, mean_ms=m, reps=5, warmup=1) for m in (3.0, 1.0, 2.0)]
    combined = harness.combine_rounds(rounds)
    assert (combined.median_ms, combined.min_ms, combined.max_ms, combined.reps, combined.warmup) == (2.0, 0.0, 4.0, 15, 3)
