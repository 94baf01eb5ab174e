"""``bench/gpu_run.py --dry-run`` works end to end on the CPU, and records failures as failures.

Two subprocess runs, as a user starts them: a passing dry run (real test subset, real benchmark parts,
the many-adapter sweeps ``chain`` and ``mixed`` included, a synthetic static report so that the
prediction column is filled), and a failing one (a test selection with a deliberately failing test, a
benchmark backend that raises, no static report; single-adapter parts only, to keep CI short) that
must exit non-zero and say why in every file it writes. How a failed or unfinished many-adapter point
is counted is checked on results files written here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_run.py"
MODES = ("forward", "backward", "full")
JSON_FILES = ("run.json", "environment.json", "native-build.json", "native_crossover.json", "tests.json",
              "predictions.json", "bench/results.json",
              "bench/parts/core/results.json", "bench/parts/dtypes/results.json", "chain/results.json",
              "mixed/results.json")
TEXT_FILES = ("summary.md", "command.txt", "install.log", "pytest.log", "junit.xml", "bench/report.md",
              "chain/report.md", "mixed/report.md", "chain/bench.log", "mixed/bench.log")


def gpu_run():
    return load_script(SCRIPT, "gpu_run_under_test")


def _prediction(direction, dtype, d, h, arch="sm_90", features="plain", fraction=None, **extra):
    """A static-report prediction record; its fraction encodes its key, so a test can tell which one matched."""
    if fraction is None:
        fraction = round(0.05 + 0.1 * (direction == "backward") + 0.01 * (d // 1024) + 0.001 * h, 4)
    return dict(direction=direction, norm_position="pre", dtype=dtype, D=d, H=h, N=2**26 // d, features=features,
                arch=arch, status="ok", predicted_fraction=fraction, **extra)


def synthetic_static_report():
    records = [_prediction(direction, dtype, d, h, arch=arch, features=features)
               for direction in ("forward", "backward") for dtype in ("fp32", "fp16") for d in (1024, 4096)
               for h in (16, 64) for arch in ("sm_90", "sm_80") for features in ("plain", "all")]
    # sm_80 and "all" records get fractions no sm_90 plain record has
    for r in records:
        if r["arch"] == "sm_80" or r["features"] == "all":
            r["predicted_fraction"] = 0.9
    return {"grid": {"D": [1024, 4096]}, "predictions": records}


def _run(out: Path, *extra: str):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDADAPTERS_BACKEND")}
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc, json.loads((out / "run.json").read_text()), (out / "summary.md").read_text()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_run")
    report = tmp / "static" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps(synthetic_static_report()))
    out = tmp / "run"
    proc, run, summary = _run(out, "--archive", str(tmp / "run.tar.gz"), "--static-report", str(report))
    return dict(proc=proc, out=out, run=run, summary=summary, archive=tmp / "run.tar.gz")


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_run_failing")
    tests = tmp / "test_deliberate.py"
    tests.write_text("def test_passes():\n    assert True\n\n\n"
                     "def test_fails_on_purpose():\n    assert 1 + 1 == 3, 'deliberate failure'\n")
    out = tmp / "run"
    proc, run, summary = _run(out, "--tests", str(tests), "--bench-backends", "eager,selftest-raise",
                              "--bench-parts", "core,dtypes", "--static-report", str(tmp / "absent.json"))
    return dict(proc=proc, out=out, run=run, summary=summary)


def _output(run) -> str:
    return run["proc"].stdout[-4000:] + run["proc"].stderr[-4000:]


def test_dry_run_passes_and_writes_the_layout(dry_run):
    out = dry_run["out"]
    assert dry_run["proc"].returncode == 0, _output(dry_run)
    assert dry_run["run"]["exit_status"] == 0 and dry_run["run"]["failures"] == []
    for name in JSON_FILES:
        json.loads((out / name).read_text())
    for name in TEXT_FILES:
        assert (out / name).read_text().strip(), name
    steps = dry_run["run"]["steps"]
    assert {k: steps[k]["status"] for k in steps} == {
        "install": "ok", "environment": "ok", "native-build": "ok", "tests": "ok", "sanitizer": "skipped",
        "bench": "ok", "predictions": "ok"}
    assert "CUDA device" in steps["sanitizer"]["reason"]  # skipped, and says why
    # the archive holds the whole folder under its own name
    with tarfile.open(dry_run["archive"]) as tar:
        names = set(tar.getnames())
    files = {f"{out.name}/{p.relative_to(out)}" for p in out.rglob("*") if p.is_file()}
    assert files <= names


def test_environment_names_the_cpu(dry_run):
    env = json.loads((dry_run["out"] / "environment.json").read_text())
    harness = load_script(REPO / "bench" / "harness.py", "harness")
    assert env["device_type"] == "cpu" and env["device_name"] == harness._cpu_name() and env["arch"] is None
    assert env["env"]["TRITON_INTERPRET"] == "1" and env["mode"] == "dry-run"
    assert "gpu_run.py" in env["command"] and "--dry-run" in env["command"]
    assert env["torch"] and env["python"] and env["timestamp_utc"] and "commit" in env["git"]
    assert (dry_run["out"] / "command.txt").read_text().strip() == env["command"]
    assert env["device_name"] in dry_run["summary"]


def test_tests_step_ran_and_the_quick_selection_resolves(dry_run):
    tests = json.loads((dry_run["out"] / "tests.json").read_text())
    assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == tests["unfinished"] == 0
    assert tests["total"] == tests["passed"] + tests["skipped"]
    quick = tests["quick_selection"]
    assert quick["returncode"] == 0 and quick["collected"] > 0, quick["error"]
    assert f"{tests['passed']} passed" in dry_run["summary"]


def test_summary_has_a_row_per_fused_point(dry_run):
    summary = dry_run["summary"]
    assert "Dry run on the CPU" in summary
    results = json.loads((dry_run["out"] / "bench" / "results.json").read_text())
    triton = [r for r in results["rows"] if r["backend"] == "triton"]
    assert {(r["mode"], r["dtype"], r["n"]) for r in triton} == {
        (m, dt, n) for m in MODES for dt, n in (("fp32", 1), ("fp32", 64), ("fp16", 64))}
    for mode in MODES:
        section = summary.split(f"### {mode}\n", 1)[1].split("###", 1)[0]
        for r in (r for r in triton if r["mode"] == mode):
            assert r["status"] == "ok" and r["ms"] > 0, r
            assert f"| {r['n']} | {r['d']} | {r['h']} | {r['dtype']} | triton | {r['ms']:.4g} |" in section
    # the dry run evaluates the targets at every point (a GPU run from N·D = 2**26): each cell says met or missed
    forward = summary.split("### forward\n", 1)[1].split("###", 1)[0]
    triton_lines = [line for line in forward.splitlines() if "| triton |" in line]
    assert len(triton_lines) == sum(r["mode"] == "forward" for r in triton)
    assert all(" ≥ 85 %)" in line and " ≥ 3×)" in line for line in triton_lines), triton_lines
    targets = {t["target"] for t in results["targets"]}
    assert targets == {"fwd-bandwidth", "fwd-vs-eager", "fwd-vs-compile", "bwd-bandwidth", "bwd-vs-eager"}
    # the copy bandwidth was measured by each part, in the same run as the kernels
    assert all(run["copy_bandwidth"]["gbps"] > 0 for run in results["runs"]) and len(results["runs"]) == 2


def test_many_adapter_sweeps_ran_in_their_own_folders_and_are_in_the_summary(dry_run):
    out, summary = dry_run["out"], dry_run["summary"]
    many = load_script(REPO / "bench" / "many_adapters.py", "many_adapters")
    parts = {p["name"]: p for p in dry_run["run"]["steps"]["bench"]["parts"]}
    assert list(parts) == ["core", "chain", "mixed", "dtypes"]  # after the core part, before the others
    for name, counts in (("chain", (1, 2)), ("mixed", (1, 4))):
        part = parts[name]
        assert (part["sweep"], part["dir"], part["status"], part["error_rows"]) == (name, name, "ok", 0), part
        assert "--sweep" in part["command"] and part["unmeasured_shapes"] == []
        data = json.loads((out / name / "results.json").read_text())
        assignments = many.ASSIGNMENTS if name == "mixed" else ("-",)
        # every planned point, every backend of the sweep, forward and full, timed
        assert {(r["count"], r["assignment"], r["backend"], r["mode"]) for r in data["rows"]} == {
            (c, a, b, m) for c in counts for a in assignments for b in many.BACKENDS[name] for m in many.MODES}
        assert all(r["status"] == "ok" and r["ms"] > 0 for r in data["rows"])
        assert part["rows"] == len(data["rows"]) and part["shapes"] == len(counts) * len(assignments)
        # the summary: the part in the parts table, its section, one line per mode and point
        assert f"| {name} | {name} | {part['shapes']} |" in summary
        section = summary.split(f"### {name} (`--sweep {name}`, `{name}/`)\n", 1)[1].split("\n### ", 1)[0]
        fused = next(r for r in data["rows"] if r["backend"] == many.BACKENDS[name][0] and r["mode"] == "forward")
        lines = [line for line in section.splitlines() if line.startswith(("| forward |", "| full |"))]
        assert len(lines) == len(data["rows"]) // len(many.BACKENDS[name])
        assert any(f"| {fused['count']} | {harness_fmt4(fused['ms'])} |" in line for line in lines), section
        # on the CPU the sweep evaluates no target, and the summary says so instead of inventing any
        assert data["targets"] == [] and f"Targets: none in `{name}/results.json`" in section
    # the merged single-adapter results hold the single-adapter parts only
    merged = json.loads((out / "bench" / "results.json").read_text())
    assert {r["op"] for r in merged["rows"] if "op" in r} <= {"linear_adapter"} and len(merged["runs"]) == 2
    assert not any("count" in r for r in merged["rows"])
    assert not (out / "bench" / "parts" / "chain").exists()


def harness_fmt4(value):
    return load_script(REPO / "bench" / "harness.py", "harness").fmt(value, ".4g")


def _sweep_results(sweep, rows, targets=()):
    return {"schema": 1, "op": "adapter_chain" if sweep == "chain" else "routed_adapter", "rows": rows,
            "checks": [], "targets": list(targets),
            "runs": [{"copy_bandwidth": {"gbps": 100.0, "bytes": 1 << 20}, "config": {"sweep": sweep}}]}


def _sweep_row(sweep, count, backend, mode, status="ok", assignment="-", ms=1.0):
    return dict(op="x", run=0, mode=mode, sweep=sweep, n=16384, d=4096, h=64, dtype="bf16", count=count,
                assignment=assignment, backend=backend, status=status, stage=None if status == "ok" else "check",
                error=None if status == "ok" else "boom", ms=ms if status == "ok" else None, bytes=1, gbps=None,
                frac_copy_bw=None, ratio_vs_one_adapter=None, speedup_vs_loop=None, max_rel_err=0.0)


def test_a_failed_or_unmeasured_many_adapter_point_is_counted(tmp_path):
    """A point that failed in a sweep fails the bench step, as in the single-adapter sweep; the points its
    time budget left out (the sweep writes no row for them) are listed; the targets are the sweep's own."""
    module = gpu_run()
    part = next(p for p in module.PLANS["full"].parts if p.name == "chain")
    proc = {"returncode": 0, "interrupted": False}
    rows = [_sweep_row("chain", k, b, m) for k in (1, 2) for b in ("chain", "loop", "one-adapter", "eager")
            for m in ("forward", "full")]
    rows[3] = _sweep_row("chain", 1, "loop", "full", status="error")
    # a value no row supports: the summary must show what results.json says, not a recomputation
    target = dict(target="chain of 4 ≤ 1.6× one fused adapter", mode="forward", dtype="bf16", n=16384, d=4096, h=64,
                  assignment="-", value=1.234, threshold=1.6, status="met", row_error=None)
    results = tmp_path / "chain" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps(_sweep_results("chain", rows, [target])))
    record = {"name": "chain", "sweep": "chain", "backends": ["chain", "loop", "one-adapter", "eager"],
              "dir": "chain", "shapes": 4}
    module.read_sweep_part(part, record, results, proc)
    assert record["error_rows"] == 1 and record["status"] == "partial"
    assert record["unmeasured_shapes"] == ["bf16 N=16384 D=4096 H=64 K=4", "bf16 N=16384 D=4096 H=64 K=8"]
    problems = module.bench_problems([record], None)
    assert problems == ["1 points of the chain sweep (part chain) failed"]
    section = "\n".join(module._sweep_section(type("Ctx", (), {"out": tmp_path})(), record))
    assert ("| chain of 4 ≤ 1.6× one fused adapter | forward | bf16 | 16384 | 4096 | 64 | - | 1.23 | 1.6 | met |"
            in section)
    assert "| full | 16384 | 1 | - | loop | check | boom |" in section  # the failed point, listed
    # every point there and none failed: ok, and nothing to report
    clean = [_sweep_row("chain", k, b, m) for k in part.counts for b in ("chain", "loop", "one-adapter", "eager")
             for m in ("forward", "full")]
    results.write_text(json.dumps(_sweep_results("chain", clean)))
    module.read_sweep_part(part, record, results, proc)
    assert (record["status"], record["error_rows"], record["unmeasured_shapes"]) == ("ok", 0, [])
    assert module.bench_problems([record], None) == []
    # a sweep that exits non-zero has failed, whatever it wrote
    module.read_sweep_part(part, record, results, {"returncode": 1, "interrupted": False})
    assert record["status"] == "failed" and module.bench_problems([record], None) == ["parts failed: ['chain']"]


def test_the_full_run_measures_the_many_adapter_sweeps_in_priority_order():
    module = gpu_run()
    full = module.PLANS["full"]
    assert [p.name for p in full.parts] == ["core", "decode", "chain", "mixed", "hidden", "model", "dtypes", "max-autotune"]
    for name, counts in (("chain", (1, 2, 4, 8)), ("mixed", (1, 8, 64, 256))):
        part = next(p for p in full.parts if p.name == name)
        assert (part.sweep, part.counts, part.modes) == (name, counts, ("forward", "full"))
        assert (part.dtypes, part.d, part.h, part.n) == (("bf16",), (4096,), (64,), (16384,))
        ctx = type("Ctx", (), {"plan": full})()
        cmd = module.part_command(part, ctx, Path("/tmp/x"), ["b1", "b2"], module.part_budget(part, 100.0))
        text = " ".join(cmd)
        assert f"--sweep {name}" in text and "--modes forward,full" in text and "--backends b1,b2" in text
        assert f"{'--k' if name == 'chain' else '--a'} {','.join(map(str, counts))}" in text
        # the sweep stops only between points: the budget it gets leaves room for its start-up and a point
        assert cmd[cmd.index("--time-budget-s") + 1] == f"{100.0 - 20.0 - part.point_s:.0f}"
    assert [p.name for p in module.PLANS["quick"].parts] == ["core"]


def test_predictions_beside_measurements(dry_run):
    pred = json.loads((dry_run["out"] / "predictions.json").read_text())
    assert "stand-in" in pred["arch"]  # no GPU architecture on the CPU: says so
    results = json.loads((dry_run["out"] / "bench" / "results.json").read_text())
    triton = {(r["mode"], r["dtype"], r["n"]): r for r in results["rows"] if r["backend"] == "triton"}
    matches = [m for m in pred["matches"] if m["backend"] == "triton"]
    assert {(m["mode"], m["dtype"], m["n"]) for m in matches} == set(triton)
    # the synthetic report predicts the triton kernels only: any other fused backend is listed, without one
    for m in pred["matches"]:
        if m["backend"] != "triton":
            assert m["predicted_fraction"] is None and "no prediction" in m["note"], m
    expected = {(r["direction"], r["dtype"]): r["predicted_fraction"] for r in synthetic_static_report()["predictions"]
                if r["arch"] == "sm_90" and r["features"] == "plain" and r["D"] == 1024 and r["H"] == 16}
    bench = load_script(REPO / "bench" / "bench_linear_adapter.py", "bench_linear_adapter")
    for m in matches:
        assert (m["prediction_D"], m["prediction_H"]) == (1024, 16) and "nearest" in m["note"]
        row = triton[(m["mode"], m["dtype"], m["n"])]
        if m["mode"] == "full":  # time-weighted: forward and backward bytes at their predicted rates
            b_f, b_b = (bench.floor_bytes(x, m["n"], 64, 16, 4 if m["dtype"] == "fp32" else 2,
                                          4 if m["dtype"] == "fp32" else 2) for x in ("forward", "backward"))
            want = (b_f + b_b) / (b_f / expected[("forward", m["dtype"])] + b_b / expected[("backward", m["dtype"])])
        else:
            want = expected[(m["mode"], m["dtype"])]
        assert m["predicted_fraction"] == pytest.approx(want)
        assert m["measured_fraction"] == pytest.approx(row["frac_copy_bw"])
        assert m["measured_over_predicted"] == pytest.approx(row["frac_copy_bw"] / want)
    forward = next(m for m in matches if m["mode"] == "forward")
    predicted, ratio = forward["predicted_fraction"], forward["measured_over_predicted"]
    cells = f"| {harness_fmt(100 * predicted)} | {harness_fmt(ratio)} |"
    assert cells in dry_run["summary"]


def harness_fmt(value):
    return load_script(REPO / "bench" / "harness.py", "harness").fmt(value, ".3g")


def test_failing_run_exits_non_zero_and_records_why(failing_run):
    out, run, summary = failing_run["out"], failing_run["run"], failing_run["summary"]
    assert failing_run["proc"].returncode == 1, _output(failing_run)
    assert run["exit_status"] == 1 and any(f.startswith("tests:") for f in run["failures"])
    tests = json.loads((out / "tests.json").read_text())
    assert (tests["passed"], tests["failed"], tests["status"]) == (1, 1, "failed")
    assert tests["failures"][0]["test"].endswith("test_fails_on_purpose")
    assert "deliberate failure" in tests["failures"][0]["message"]
    assert "Exit status 1" in summary and "test_fails_on_purpose" in summary
    # the raising benchmark backend is an error row in the raw results and the report, not a time
    results = json.loads((out / "bench" / "results.json").read_text())
    raising = [r for r in results["rows"] if r["backend"] == "selftest-raise"]
    assert raising and all(r["status"] == "error" and r["ms"] is None for r in raising)
    assert "deliberate failure" in (out / "bench" / "report.md").read_text()
    # no static report: the prediction column is empty and the summary says why
    pred = run["steps"]["predictions"]
    assert pred["status"] == "skipped" and "not found" in pred["reason"]
    assert "Predicted column empty" in summary and "not found" in summary


def test_nearest_prediction():
    module = gpu_run()
    records = synthetic_static_report()["predictions"]
    key = dict(direction="forward", norm="pre", dtype="fp16", arch="sm_90", backend="triton")
    exact, note = module.nearest_prediction(records, d=4096, h=64, **key)
    assert (exact["D"], exact["H"], note) == (4096, 64, "exact")
    near, note = module.nearest_prediction(records, d=8192, h=128, **key)
    assert (near["D"], near["H"]) == (4096, 64) and note == "nearest: D=4096 H=64"
    assert module.nearest_prediction(records, d=4096, h=64, **dict(key, dtype="bf16"))[0] is None
    refused = [dict(records[0], predicted_fraction=None, status="refused", reason="shared memory")]
    match, why = module.nearest_prediction(refused, d=refused[0]["D"], h=refused[0]["H"],
                                           **dict(key, dtype=refused[0]["dtype"]))
    assert match is None and "refused" in why and "shared memory" in why
    # records anywhere in the report are found; dicts without every field are not records
    assert len(list(module.prediction_records({"a": [{"b": records[:3]}], "c": {"direction": "forward"}}))) == 3


def test_parse_junit_counts_an_interrupted_test_as_unfinished(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><failure message="boom">x</failure></testcase>'
        '<testcase classname="t" name="c"><skipped message="needs CUDA"/></testcase>'
        '<testcase time="0.000"/></testsuite></testsuites>')
    parsed = gpu_run().parse_junit(path)
    assert {k: parsed[k] for k in ("total", "passed", "failed", "skipped", "unfinished")} == {
        "total": 3, "passed": 1, "failed": 1, "skipped": 1, "unfinished": 1}
    assert parsed["failures"] == [{"test": "t::b", "kind": "failure", "message": "boom"}]
    assert parsed["skip_reasons"] == {"needs CUDA": 1}


def test_bench_time_budget_records_the_shapes_it_left(tmp_path):
    """The benchmark's --time-budget-s (which gpu_run passes to every part): the first shape always runs,
    the ones that no longer fit are rows with status skipped and stage budget."""
    bench = load_script(REPO / "bench" / "bench_linear_adapter.py", "bench_linear_adapter")
    status = bench.main(["--device", "cpu", "--cpu-small", "--n", "3,5", "--backends", "eager", "--modes", "forward",
                         "--rep-ms", "1", "--warmup-ms", "0", "--no-plot", "--time-budget-s", "0",
                         "--copy-bytes", str(1 << 20), "--out", str(tmp_path)])
    assert status == 0
    rows = {r["n"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows[3]["status"] == "ok" and rows[3]["ms"] > 0 and math.isfinite(rows[3]["gbps"])
    assert rows[5]["status"] == "skipped" and rows[5]["stage"] == "budget" and "time budget" in rows[5]["error"]
    assert "time budget" in (tmp_path / "report.md").read_text()


def test_a_command_past_its_time_is_interrupted_and_its_output_kept(tmp_path):
    """What the test and benchmark steps rely on: SIGINT at the deadline (pytest then writes its report),
    the output up to then in the log, and the status that says it was cut short."""
    code = "import time\nprint('started', flush=True)\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n" \
           "    print('interrupted', flush=True)\n    raise SystemExit(3)\n"
    record = gpu_run().run_streamed("sleeper", [sys.executable, "-c", code], tmp_path / "sleeper.log", 2.0,
                                    dict(os.environ))
    assert record["interrupted"] and record["returncode"] == 3 and record["seconds"] < 30
    log = (tmp_path / "sleeper.log").read_text()
    assert "started" in log and "interrupted" in log


def test_collected_count_reads_pytest_collect_only_lines():
    count = gpu_run().collected_count
    assert count("a\n42 tests collected in 1.0s") == 42
    assert count("3/40 tests collected (37 deselected) in 0.5s") == 3
    assert count("1 test collected in 0.1s") == 1
    assert count("no tests collected (40 deselected) in 0.5s") == 0

