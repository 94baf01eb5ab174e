"""``ops.adapter_chain``: the triton backend against the float64 reference (adapters one by one).

Runs on CPU tensors under Triton's interpreter (tests/conftest.py) and on CUDA when present, with
random non-zero weights in every adapter, poisoned outputs, adapters of different H, eps, dropout and
scale, chains that split where the activation or norm position changes, and frozen adapters.
"""

from __future__ import annotations

import pytest
import torch

from fusedadapters.ops import adapter_chain, reference
from fusedadapters.ops import backend as backend_mod

from helpers import rel_err

from .test_routed_adapter import WEIGHTS, make_adapters

DEVICES = (["cpu"] if backend_mod.triton_interpreter_enabled() else []) + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(not backend_mod.triton_available(), reason="needs triton")


def chain_module():
    import importlib

    return importlib.import_module("fusedadapters.ops.adapter_chain")


def run(x, adapters, *, backend, seeds, scales):
    out, row_sqs = adapter_chain(x, adapters, dropout_seeds=seeds, scales=scales, return_row_sq=True, backend=backend)
    gen = torch.Generator().manual_seed(11)
    loss = (out.double() * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)).sum()
    for row_sq in row_sqs:
        loss = loss + (row_sq.double() * torch.randn(row_sq.shape, generator=gen, dtype=torch.float64).to(out.device)).sum()
    leaves = [t for t in [x] + [t for p in adapters for t in p[:4]] if t.requires_grad]
    return out, row_sqs, torch.autograd.grad(loss, leaves)


def check(x, adapters, seeds=None, scales=None, tol=1e-5):
    got = run(x, adapters, backend="triton", seeds=seeds, scales=scales)
    double = [p._replace(**{w: getattr(p, w).detach().double().requires_grad_(getattr(p, w).requires_grad) for w in WEIGHTS})
              for p in adapters]
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    want = run(x64, double, backend="reference", seeds=seeds,
               scales=None if scales is None else [s if s is None else s.double() for s in scales])
    assert not torch.isnan(got[0]).any()
    assert rel_err(got[0], want[0]) < tol, "out"
    for k, (a, b) in enumerate(zip(got[1], want[1])):
        assert rel_err(a, b) < tol, f"row_sq {k}"
    assert len(got[2]) == len(want[2])
    for k, (a, b) in enumerate(zip(got[2], want[2])):
        assert rel_err(a, b) < tol, f"gradient {k}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_position,activation", [("pre", "swish"), ("post", "gelu")])
def test_one_launch_chain_matches_reference(device, norm_position, activation, monkeypatch):
    monkeypatch.setattr(chain_module(), "linear_adapter", _must_not_run)  # three adapters, one launch
    torch.manual_seed(1)
    d = 40
    adapters = make_adapters(d, (5, 16, 3), device, norm_position=norm_position, activation=activation)
    adapters[1] = adapters[1]._replace(eps=1e-3)
    x = (torch.randn(2, 13, d, device=device) + 2.0).requires_grad_()
    check(x, adapters)


def _must_not_run(*args, **kwargs):
    raise AssertionError("a run of several adapters went through linear_adapter, not the chain kernel")


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_chain_with_dropout_scales_and_a_frozen_adapter(device):
    """pre/swish, pre/swish | post/relu | pre/gelu, pre/gelu: three runs; adapter 1 frozen."""
    torch.manual_seed(2)
    d = 24
    adapters = (
        make_adapters(d, (8, 4), device, dropout_p=0.25)
        + make_adapters(d, (6,), device, norm_position="post", activation="relu")
        + make_adapters(d, (4, 8), device, activation="gelu")
    )
    for t in adapters[1][:4]:
        t.requires_grad_(False)
    seeds = [torch.tensor([100 + k], device=device) for k in range(len(adapters))]
    scales = [torch.tensor([0.5], device=device), None, torch.tensor([1.5], device=device), None, torch.tensor([2.0], device=device)]
    x = torch.randn(19, d, device=device).requires_grad_()
    check(x, adapters, seeds=seeds, scales=scales)


@pytest.mark.parametrize("device", DEVICES)
def test_chain_without_input_gradient_and_inference(device):
    torch.manual_seed(3)
    d = 16
    adapters = make_adapters(d, (4, 4), device)
    x = torch.randn(5, d, device=device)  # no gradient for x: the first adapter's dx is skipped
    check(x, adapters)
    with torch.no_grad():
        out = adapter_chain(x, adapters, backend="triton")
        want = reference.linear_adapter(reference.linear_adapter(x, *adapters[0][:4])[0], *adapters[1][:4])[0]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
    adapters = make_adapters(6, (2, 3))
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="at least one adapter"):
        adapter_chain(x, [])
    with pytest.raises(ValueError, match="adapter 1 has shapes"):
        adapter_chain(torch.randn(4, 6), [adapters[0], make_adapters(7, (2,))[0]])
    with pytest.raises(ValueError, match="2 adapters, 1 dropout_seeds"):
        adapter_chain(x, adapters, dropout_seeds=[None])
    with pytest.raises(ValueError, match="unknown activation"):
        adapter_chain(x, [adapters[0]._replace(activation="tanh")])
