"""The main job: ``python -m fusedadapters`` trains an adapter, saves it, restores it and checks it."""

import io
import subprocess
import sys
import tempfile

import pytest
from omegaconf import OmegaConf

from fusedadapters import UnsafeTargetError, demo


@pytest.mark.parametrize("adapter", ["linear", "fused"])
def test_run_trains_saves_and_restores(tmp_path, adapter, capsys):
    report = demo.run(steps=60, dim=24, hidden=4, adapter=adapter, out_dir=tmp_path)
    assert report["final_eval_loss"] < 0.5 * report["initial_eval_loss"]
    assert report["restored_matches"] and report["restored_max_abs_diff"] == 0.0
    assert report["adapter_file_bytes"] < report["base_file_bytes"]
    assert report["trainable_params"] == 2 * (2 * 24 + 2 * 24 * 4)  # one adapter per decoder block
    assert (tmp_path / "adapter.safetensors").is_file() and report["out_dir"] == str(tmp_path)
    out = capsys.readouterr().out
    assert "60/60" in out and "match exactly" in out


@pytest.fixture
def private_tempdir(tmp_path, monkeypatch):
    """The temporary directory the job uses, private to the test (other processes share the real one)."""
    tempdir = tmp_path / "tmp"
    tempdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tempdir))
    return tempdir


def test_without_out_dir_nothing_is_left_behind(private_tempdir, capsys):
    report = demo.run(steps=5, dim=8, hidden=2)
    assert report["out_dir"] is None and report["restored_matches"]
    assert list(private_tempdir.glob("fusedadapters-*")) == []
    assert "deleted now; pass --out DIR to keep them" in capsys.readouterr().out


def test_without_out_dir_a_failure_leaves_nothing_behind(private_tempdir, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo.DemoModel, "save_adapters", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        demo.run(steps=2, dim=8, hidden=2)
    assert list(private_tempdir.glob("fusedadapters-*")) == []


def test_progress_on_a_pipe_is_one_line_per_report():
    stream = io.StringIO()
    demo.run(steps=20, dim=8, hidden=2, stream=stream)
    text = stream.getvalue()
    assert "\r" not in text
    steps = [line for line in text.splitlines() if line.startswith("training step")]
    assert [line.split()[2] for line in steps] == [f"{s}/20" for s in range(2, 21, 2)]


def test_progress_on_a_terminal_is_a_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    demo.run(steps=7, dim=8, hidden=2, stream=stream)
    assert "7/7" in stream.getvalue() and "training step" not in stream.getvalue()


BAD_OPTIONS = [
    (["--steps", "-5"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--dim", "0"], "--dim"),
    (["--dim", "-3"], "--dim"),
    (["--hidden", "0"], "--hidden"),
    (["--hidden", "-1"], "--hidden"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--adapter", "lora"], "--adapter"),
]


@pytest.mark.parametrize("argv, option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_wrong_option_is_one_line_and_status_2(argv, option, capsys, monkeypatch):
    monkeypatch.setattr(demo, "run", lambda **kwargs: pytest.fail("the job ran on a wrong option"))
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m fusedadapters: error: argument") and option in line


def test_out_naming_a_file_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "run", lambda **kwargs: pytest.fail("the job ran on a wrong option"))
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    for out in (existing, existing / "below"):
        with pytest.raises(SystemExit) as exc:
            demo.main(["--out", str(out)])
        assert exc.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "--out" in line and "a_file" in line and "not a directory" in line
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize(
    "kwargs, name",
    [({"steps": 0}, "steps"), ({"dim": -3}, "dim"), ({"hidden": 0}, "hidden"), ({"batch": 0}, "batch"),
     ({"lr": 0.0}, "lr"), ({"seed": -1}, "seed"), ({"adapter": "lora"}, "adapter")],
)
def test_run_refuses_wrong_values_before_any_work(kwargs, name, monkeypatch):
    monkeypatch.setattr(demo, "DemoModel", None)  # any work would fail on this
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        demo.run(**kwargs)


def test_seed_has_help_text():
    help_text = demo.build_parser().format_help()
    assert "--seed SEED" in help_text and "seed of the weights" in help_text


def test_model_config_targets_are_checked(tmp_path):
    cfg = demo.model_config(8)
    cfg.encoder = OmegaConf.create({"_target_": "os.system", "command": f"touch '{tmp_path / 'ran'}'"})
    with pytest.raises(UnsafeTargetError, match="cfg.encoder.*os.system"):
        demo.DemoModel(cfg)
    assert not (tmp_path / "ran").exists()


def test_module_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fusedadapters", "--steps", "20", "--dim", "16", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "restored into a fresh model: outputs match exactly" in result.stdout
    assert "\r" not in result.stdout
    assert (tmp_path / "base_model.nemo").is_file() and (tmp_path / "adapter.safetensors").is_file()


def test_module_entry_point_wrong_option():
    result = subprocess.run([sys.executable, "-m", "fusedadapters", "--dim", "-3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "python -m fusedadapters: error: argument --dim: must be an integer at least 1, got -3 "
        "(--help lists the options)\n"
    )
