"""The main job: ``python -m fusedadapters`` trains an adapter, saves it, restores it and checks it."""

import subprocess
import sys

import pytest

from fusedadapters import demo


@pytest.mark.parametrize("adapter", ["linear", "fused"])
def test_run_trains_saves_and_restores(tmp_path, adapter, capsys):
    report = demo.run(steps=60, dim=24, hidden=4, adapter=adapter, out_dir=tmp_path)
    assert report["final_eval_loss"] < 0.5 * report["initial_eval_loss"]
    assert report["restored_matches"] and report["restored_max_abs_diff"] == 0.0
    assert report["adapter_file_bytes"] < report["base_file_bytes"]
    assert report["trainable_params"] == 2 * (2 * 24 + 2 * 24 * 4)  # one adapter per decoder block
    assert (tmp_path / "adapter.safetensors").is_file()
    out = capsys.readouterr().out
    assert "60/60" in out and "match exactly" in out


def test_module_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fusedadapters", "--steps", "20", "--dim", "16", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "restored into a fresh model: outputs match exactly" in result.stdout
