"""The native crossover table: built from benchmark rows, read by the automatic backend choice."""

from __future__ import annotations

import json

import pytest
import torch

from fusedadapters.ops import backend as backend_mod
from fusedadapters.ops import crossover, native


def row(backend, n, ms, mode="forward", dtype="bf16", d=4096, h=64, status="ok"):
    return dict(backend=backend, n=n, ms=ms, mode=mode, dtype=dtype, d=d, h=h, status=status)


def test_native_counts_up_to_its_first_loss():
    rows = [row("native", 1, 0.005), row("triton", 1, 0.010), row("native", 16, 0.008), row("triton", 16, 0.008),
            row("native", 64, 0.020), row("triton", 64, 0.012),
            row("native", 1024, 0.01), row("triton", 1024, 0.02),  # a win after a loss does not count
            row("eager", 1, 0.001)]
    table = crossover.from_bench_rows(rows, device="GPU", capability="9.0", source="run")
    assert table["rules"] == [{"mode": "forward", "dtype": "bf16", "d": 4096, "h": 64, "native_up_to_rows": 16,
                               "rows_measured": [1, 16, 64, 1024]}]


def test_points_without_both_backends_or_with_errors_make_no_rule():
    rows = [row("native", 1, 0.005), row("triton", 2, 0.010), row("native", 4, 0.005),
            row("triton", 4, 0.001, status="error"), row("native", 8, 0.002, mode="full")]
    assert crossover.from_bench_rows(rows, device="GPU", capability="9.0", source="run")["rules"] == []


def test_native_losing_at_the_smallest_n_gives_zero():
    rows = [row("native", 1, 0.02), row("triton", 1, 0.01), row("native", 2, 0.001), row("triton", 2, 0.01)]
    table = crossover.from_bench_rows(rows, device="GPU", capability="9.0", source="run")
    assert table["rules"][0]["native_up_to_rows"] == 0


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    rows = [row("native", n, 0.001, mode=m) for n in (1, 32) for m in ("forward", "full")]
    rows += [row("triton", n, 0.002, mode=m) for n in (1, 32) for m in ("forward", "full")]
    rows += [row("native", 64, 0.004), row("triton", 64, 0.002)]
    path = tmp_path / "native_crossover.json"
    path.write_text(json.dumps(crossover.from_bench_rows(rows, device="GPU", capability="9.0", source="run")))
    monkeypatch.setenv(crossover.CROSSOVER_ENV_VAR, str(path))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    return path


def test_the_table_decides_per_shape_mode_and_rows(table_file):
    cuda = torch.device("cuda:0")
    assert crossover.native_wins(cuda, torch.bfloat16, 4096, 64, 20, training=False)
    assert crossover.native_wins(cuda, torch.bfloat16, 4096, 64, 32, training=True)
    assert not crossover.native_wins(cuda, torch.bfloat16, 4096, 64, 33, training=False)  # lost at 64
    assert not crossover.native_wins(cuda, torch.bfloat16, 4096, 64, 0, training=False)
    assert not crossover.native_wins(cuda, torch.float16, 4096, 64, 8, training=False)  # not measured
    assert not crossover.native_wins(cuda, torch.bfloat16, 4096, 128, 8, training=False)
    assert not crossover.native_wins(torch.device("cpu"), torch.bfloat16, 4096, 64, 8, training=False)


def test_another_gpu_kind_ignores_the_table(table_file, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert not crossover.native_wins(torch.device("cuda:0"), torch.bfloat16, 4096, 64, 8, training=False)


def test_automatic_choice_follows_the_table_only_with_a_cuda_library(table_file, monkeypatch):
    cuda = torch.device("cuda:0")
    monkeypatch.setattr(backend_mod, "triton_available", lambda: True)
    monkeypatch.setattr(native, "is_built", lambda: True)
    monkeypatch.setattr(native, "ensure_loaded", lambda: None)
    shape = dict(dtype=torch.bfloat16, hidden=64, width=4096)
    monkeypatch.setattr(native, "supports_device", lambda device: (True, ""))
    assert backend_mod.resolve_backend(None, cuda, rows=16, **shape) == "native"
    assert backend_mod.resolve_backend(None, cuda, rows=4096, **shape) == "triton"
    assert backend_mod.resolve_backend(None, cuda, **shape) == "triton"  # rows unknown
    monkeypatch.setattr(native, "supports_device", lambda device: (False, "built without CUDA"))
    assert backend_mod.resolve_backend(None, cuda, rows=16, **shape) == "triton"
    monkeypatch.setattr(native, "is_built", lambda: False)
    assert backend_mod.resolve_backend(None, cuda, rows=16, **shape) == "triton"


def test_a_missing_table_named_by_the_environment_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(crossover.CROSSOVER_ENV_VAR, str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match="absent.json, which is not a file"):
        crossover.load_table()


def test_without_a_table_cuda_stays_on_triton(monkeypatch, tmp_path):
    monkeypatch.delenv(crossover.CROSSOVER_ENV_VAR, raising=False)
    monkeypatch.setattr(crossover, "PACKAGED_TABLE", tmp_path / "native_crossover.json")
    monkeypatch.setattr(backend_mod, "triton_available", lambda: True)
    assert crossover.load_table() is None
    assert backend_mod.resolve_backend(None, torch.device("cuda:0"), dtype=torch.bfloat16, hidden=64, width=4096,
                                       rows=1) == "triton"


def test_a_table_of_another_schema_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"schema": 99, "rules": []}))
    monkeypatch.setenv(crossover.CROSSOVER_ENV_VAR, str(path))
    with pytest.raises(ValueError, match="not a native crossover table of schema 1"):
        crossover.load_table()
