"""Wrong values a user can pass to the modules and ops: each is refused with an error that names it."""

import pytest
import torch

from fusedadapters import ops
from fusedadapters.adapter_modules import FusedLinearAdapter

D, H = 10, 3


@pytest.mark.parametrize("backend", ["cuda", "tritonn", ""])
def test_bad_backend_attribute_is_named(backend):
    adapter = FusedLinearAdapter(D, H)
    adapter.backend = backend
    with pytest.raises(ValueError, match=r"FusedLinearAdapter\.backend"):
        adapter(torch.randn(2, D))


def test_bad_backend_argument_is_named():
    x = torch.randn(2, D)
    with pytest.raises(ValueError, match="the backend argument"):
        ops.linear_adapter(x, torch.ones(D), torch.zeros(D), torch.randn(H, D), torch.randn(D, H), backend="cuda")


def _op_inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, D, generator=generator)
    weights = [torch.randn(D, generator=generator) + 1, torch.randn(D, generator=generator),
               torch.randn(H, D, generator=generator), torch.randn(D, H, generator=generator)]
    return x, weights


def _backends():
    from fusedadapters.ops.backend import triton_available, triton_interpreter_enabled

    kernel = pytest.mark.skipif(
        not (triton_available() and (torch.cuda.is_available() or triton_interpreter_enabled())),
        reason="needs triton with CUDA or TRITON_INTERPRET=1",
    )
    return ["reference", pytest.param("triton", marks=kernel)]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dropout_p", [-0.5, -1e-9, 1.5, 1.0 + 1e-9, float("nan")])
def test_dropout_p_outside_0_1_is_refused_by_every_backend(backend, dropout_p):
    x, weights = _op_inputs(0)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\]"):
        ops.linear_adapter(x.to(device), *(w.to(device) for w in weights), dropout_p=dropout_p, backend=backend)


@pytest.mark.parametrize("backend", _backends())
def test_dropout_p_one_drops_everything_on_every_backend(backend):
    x, weights = _op_inputs(1)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x, weights = x.to(device), [w.to(device) for w in weights]
    out = ops.linear_adapter(x, *weights, dropout_p=1.0, backend=backend)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    kept = ops.linear_adapter(x, *weights, dropout_p=0.0, backend=backend)
    assert (kept - x).abs().max() > 0.1  # random non-zero weights: the adapter does change its input


def test_module_and_op_accept_the_same_range():
    from fusedadapters.adapter_modules import LinearAdapter

    for p in (0.0, 0.5, 1.0):
        LinearAdapter(D, H, dropout=p)
    for p in (-0.5, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            LinearAdapter(D, H, dropout=p)
