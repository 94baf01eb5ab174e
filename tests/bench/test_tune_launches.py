"""bench/tune_launches.py where no GPU is needed: its points, its forced configurations, --rerender."""

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import load_script

REPO = Path(__file__).resolve().parents[2]
tune = load_script(REPO / "bench" / "tune_launches.py", "tune_launches")
kernels = tune.kernels
COMMITTED = REPO / "bench" / "results" / "2026-11-25-h100-tune"


def test_points_parse_and_bad_points_are_refused():
    assert tune.parse_points("pre:bf16:4096:64, post:fp32:1024:16") == [("pre", "bf16", 4096, 64),
                                                                       ("post", "fp32", 1024, 16)]
    assert tune.parse_points("") == []
    with pytest.raises(SystemExit, match="bad point"):
        tune.parse_points("middle:bf16:4096:64")


def _plans(stage=None, candidate=None, n=1000, d=4096, h=64):
    """Forward and backward plans, the stage's direction planned under ``candidate`` (as the script does)."""
    x = torch.empty(n, d, dtype=torch.bfloat16, device="meta")
    params = [torch.empty(s, dtype=torch.bfloat16, device="meta") for s in ((d,), (d,), (h, d), (d, h))]
    forced = tune.forced_config(stage, candidate) if stage else contextlib.nullcontext()
    with forced if stage == "fwd" else contextlib.nullcontext():
        outputs, forward = kernels.plan_forward(x, *params, None, None, "swish", "pre", 1e-5, 0.0, True, False,
                                                kernels.H100)
    with forced if stage in ("bwd_rows", "bwd_cols") else contextlib.nullcontext():
        _, backward = kernels.plan_backward(x, None, x, *params, None, None, *outputs[2:], "swish", "pre", 0.0,
                                            True, True, True, True, True, kernels.H100)
    return forward + backward


@pytest.mark.parametrize("stage", ["fwd", "bwd_rows", "bwd_cols"])
def test_forced_configuration_reaches_only_its_launches_and_is_undone(stage):
    default = _plans(n=8192)
    candidate = (16, 128, 8, 3) + ((2,) if stage == "fwd" else ())  # the forward's: 2 programs per SM
    forced = _plans(stage, candidate, n=8192)
    assert [launch.name for launch in forced] == [launch.name for launch in default]
    chosen = set(tune.stage_launches(stage, forced))
    assert chosen
    for i, (before, after) in enumerate(zip(default, forced)):
        config = tuple(after.meta.get(k) for k in ("BM", "BD", "num_warps", "num_stages"))
        if i in chosen:
            assert config == candidate[:4]
            if stage == "fwd":
                assert after.grid == (2 * kernels.H100.sm_count,) and after.meta["GRID_STRIDE"]
        else:
            assert after.meta == before.meta, after.name
    assert [launch.meta for launch in _plans(n=8192)] == [launch.meta for launch in default]


def test_rerender_puts_the_scaled_model_beside_each_launch(tmp_path):
    out = tmp_path / "tune"
    shutil.copytree(COMMITTED, out)
    results = json.loads((out / "results.json").read_text())
    for row in results["launches"]:
        row["predicted_ms"] = row["measured_over_predicted"] = None
    (out / "results.json").write_text(json.dumps(results))
    assert tune.main(["--out", str(out), "--rerender"]) == 0
    rows = json.loads((out / "results.json").read_text())["launches"]
    report = json.loads((REPO / "bench/results/static/report.json").read_text())
    model = {(r["direction"], r["norm_position"], r["dtype"], r["D"], r["H"], r["label"]): r
             for r in report["launches"] if r["arch"] == "sm_90" and r["features"] == "plain"}
    checked = 0
    for row in rows:
        record = model.get((row["direction"], row["norm_position"], row["dtype"], row["D"], row["H"], row["launch"]))
        if record is None or not record.get("predicted_us"):
            assert row["predicted_ms"] is None
            continue
        expected = record["predicted_us"] / 1e3 * row["N"] / record["N"]
        assert row["predicted_ms"] == pytest.approx(expected)
        assert row["measured_over_predicted"] == pytest.approx(row["ms"] / expected)
        checked += 1
    assert checked >= 10
    assert "measured / predicted" in (out / "report.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_measuring_without_cuda_is_refused(tmp_path, capsys):
    assert tune.main(["--out", str(tmp_path / "x")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
