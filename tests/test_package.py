"""The package imports and works without Triton, and exposes the names NeMo code imports."""

import subprocess
import sys

import fusedadapters

NO_TRITON = """
import sys
sys.modules["triton"] = None  # any `import triton` now fails
import torch
import fusedadapters
from fusedadapters.adapter_modules import FusedLinearAdapter
from fusedadapters.ops.backend import triton_available
assert not triton_available()
adapter = FusedLinearAdapter(8, 2)
out, row_sq = adapter.fused_residual_forward(torch.randn(3, 8), return_row_sq=True)
assert out.shape == (3, 8) and row_sq.shape == (3,)
try:
    weights = [p.detach() for p in adapter.parameters()]  # ln weight, ln bias, down, up
    fusedadapters.ops.linear_adapter(torch.randn(2, 8), *weights, backend="triton")
except RuntimeError as exc:
    assert "triton is not installed" in str(exc), exc
else:
    raise AssertionError("forcing triton without triton must fail")
print("ok")
"""


def test_imports_and_runs_without_triton():
    result = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_public_names():
    for name in ("NeuralModule", "ModelPT", "AdapterModuleMixin", "AdapterModelPTMixin", "LinearAdapter",
                 "FusedLinearAdapter", "ResidualAddAdapterStrategy", "ReturnResultAdapterStrategy",
                 "register_adapter", "get_registered_adapter", "instantiate"):
        assert hasattr(fusedadapters, name), name
    from fusedadapters.utils import instantiate, logging, logging_mode  # noqa: F401  (NeMo/Hydra names)

    assert set(fusedadapters.__all__) <= set(dir(fusedadapters))
