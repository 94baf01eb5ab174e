"""``ops.adapter_chain``: the triton backend against the float64 reference (adapters one by one).

Runs on CPU tensors under Triton's interpreter (tests/conftest.py) and on CUDA when present, with
random non-zero weights in every adapter, poisoned outputs, odd sizes, adapters of different H, eps,
dropout, scale, activation and norm position, and frozen adapters. The triton backend runs
``ops.linear_adapter`` once per adapter: the tests count those calls (so a silent fall-back to the
reference cannot pass) and record which gradients each adapter's backward was asked for.
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


def count_calls(monkeypatch):
    """The backends of the ``linear_adapter`` calls the chain makes, in order."""
    module = chain_module()
    real, calls = module.linear_adapter, []

    def spy(*args, **kwargs):
        calls.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "linear_adapter", spy)
    return calls


def record_backward_needs(monkeypatch):
    """``(need_dx, need_dln, need_dwd, need_dwu)`` of every triton single-adapter backward, in order."""
    from fusedadapters.ops.triton import linear_adapter as kernels

    real, needs = kernels.linear_adapter_backward, []

    def spy(*args):
        needs.append(tuple(args[-4:]))
        return real(*args)

    monkeypatch.setattr(kernels, "linear_adapter_backward", spy)
    return needs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_position,activation", [("pre", "swish"), ("post", "gelu")])
def test_chain_matches_reference(device, norm_position, activation, monkeypatch):
    calls = count_calls(monkeypatch)
    torch.manual_seed(1)
    d = 37
    adapters = make_adapters(d, (5, 16, 3), device, norm_position=norm_position, activation=activation)
    adapters[1] = adapters[1]._replace(eps=1e-3)
    x = (torch.randn(2, 13, d, device=device) + 2.0).requires_grad_()
    check(x, adapters)
    assert calls == ["triton"] * 3  # one single-adapter call per adapter; the reference makes none


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_chain_with_dropout_scales_and_a_frozen_adapter(device):
    """pre/swish, pre/swish, post/relu, pre/gelu, pre/gelu; adapter 1 frozen."""
    torch.manual_seed(2)
    d = 23
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


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_adapters_get_no_weight_gradient_work(device, monkeypatch):
    """Adapter 1 frozen, adapter 2's LayerNorm frozen, x without gradient: each backward is asked only
    for what its tensors need (adapter 0 for no dx), and the gradients still match the reference."""
    torch.manual_seed(4)
    d = 19
    adapters = make_adapters(d, (3, 6, 5), device)
    for t in adapters[1][:4]:
        t.requires_grad_(False)
    for t in adapters[2][:2]:
        t.requires_grad_(False)
    x = torch.randn(7, d, device=device)
    needs = record_backward_needs(monkeypatch)
    check(x, adapters)
    # backward runs the adapters in reverse: 2, 1, 0
    assert needs == [(True, False, True, True), (True, False, False, False), (False, True, True, True)]


@pytest.mark.parametrize("device", DEVICES)
def test_triton_chain_takes_adapters_in_the_dtype_of_x(device):
    adapters = make_adapters(8, (2, 3), device)
    adapters[1] = adapters[1]._replace(**{w: getattr(adapters[1], w).detach().double() for w in WEIGHTS})
    with pytest.raises(TypeError, match="but x is torch.float32"):
        adapter_chain(torch.randn(4, 8, device=device), adapters, backend="triton")


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
