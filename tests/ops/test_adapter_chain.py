"""``ops.adapter_chain``: the triton backend against the float64 reference (adapters one by one).

Runs on CPU tensors under Triton's interpreter (tests/conftest.py) and on CUDA when present, with
random non-zero weights in every adapter, odd sizes, adapters of different H, eps, dropout, scale,
activation and norm position, and frozen adapters. The triton backend runs the chain as one fused
launch: the tests record its launches (so a silent fall-back to the reference cannot pass), both of
its grids, its in-place inference path, and which gradients each adapter's backward was asked for.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fusedadapters.ops import AdapterParams, adapter_chain, reference, reference_multi
from fusedadapters.ops import backend as backend_mod

from helpers import rel_err

from .test_routed_adapter import WEIGHTS, make_adapters

DEVICES = (["cpu"] if backend_mod.triton_interpreter_enabled() else []) + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(not backend_mod.triton_available(), reason="needs triton")


def run(x, adapters, *, backend, seeds, scales, fused=None):
    out, row_sqs = adapter_chain(x, adapters, dropout_seeds=seeds, scales=scales, return_row_sq=True, backend=backend,
                                 fused=fused)
    gen = torch.Generator().manual_seed(11)
    loss = (out.double() * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)).sum()
    for row_sq in row_sqs:
        loss = loss + (row_sq.double() * torch.randn(row_sq.shape, generator=gen, dtype=torch.float64).to(out.device)).sum()
    leaves = [t for t in [x] + [t for p in adapters for t in p[:4]] if t.requires_grad]
    return out, row_sqs, torch.autograd.grad(loss, leaves)


def check(x, adapters, seeds=None, scales=None, tol=1e-5, fused=True):
    got = run(x, adapters, backend="triton", seeds=seeds, scales=scales, fused=fused)
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


def record_chain_launches(monkeypatch):
    """The kernel launches of every fused chain forward, by name, one list per forward."""
    from fusedadapters.ops.triton import adapter_chain as kernels

    real, forwards = kernels.plan_chain_forward, []

    def spy(*args):
        outputs, launches = real(*args)
        forwards.append([launch.name for launch in launches])
        return outputs, launches

    monkeypatch.setattr(kernels, "plan_chain_forward", spy)
    return forwards


def record_backward_needs(monkeypatch):
    """``(need_dx, need_dln, need_dwd, need_dwu)`` of every triton single-adapter backward, in order."""
    from fusedadapters.ops.triton import linear_adapter as kernels

    real, needs = kernels.linear_adapter_backward, []

    def spy(*args):
        needs.append(tuple(args[-4:]))
        return real(*args)

    monkeypatch.setattr(kernels, "linear_adapter_backward", spy)
    return needs


def count_single_adapter_calls(monkeypatch):
    """The backends of the ``linear_adapter`` calls the chain's loop makes, in order."""
    module = importlib.import_module("fusedadapters.ops.adapter_chain")  # the package exports the function
    real, calls = module.linear_adapter, []

    def spy(*args, **kwargs):
        calls.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "linear_adapter", spy)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "loop"])
@pytest.mark.parametrize("norm_position,activation", [("pre", "swish"), ("post", "gelu")])
def test_chain_matches_reference(device, norm_position, activation, fused, monkeypatch):
    forwards, calls = record_chain_launches(monkeypatch), count_single_adapter_calls(monkeypatch)
    torch.manual_seed(1)
    d = 37
    adapters = make_adapters(d, (5, 16, 3), device, norm_position=norm_position, activation=activation)
    adapters[1] = adapters[1]._replace(eps=1e-3)
    x = (torch.randn(2, 13, d, device=device) + 2.0).requires_grad_()
    check(x, adapters, fused=fused)
    folds = ["fold_ln"] * 3 if norm_position == "pre" else []
    # one fused launch for the chain, or one single-adapter call per adapter; the reference makes neither
    assert (forwards, calls) == (([folds + ["chain3_fwd"]], []) if fused else ([], ["triton"] * 3))


@pytest.mark.parametrize("device", DEVICES)
def test_chain_fuses_where_the_model_puts_it_ahead(device, monkeypatch):
    """By default a chain runs fused in fp16/bf16 inference where its row blocks number at most the SMs
    and 2·H is at most the row block; otherwise (more rows, wider H, float32, training) as a loop."""
    from fusedadapters.ops.triton import adapter_chain as kernels
    from fusedadapters.ops.triton.linear_adapter import _forward_config, device_limits

    forwards, calls = record_chain_launches(monkeypatch), count_single_adapter_calls(monkeypatch)
    bf16 = torch.bfloat16
    adapters = [p._replace(**{w: getattr(p, w).detach().to(bf16) for w in WEIGHTS})
                for p in make_adapters(16, (4, 8), device)]
    limits = device_limits(torch.device(device))
    bm = _forward_config(8, 16, bf16, limits, grid_stride=False)[0].BM
    rows = limits.sm_count * bm
    cases = [(rows, bf16, [4, 8], False, True), (rows + 1, bf16, [4, 8], False, False),
             (rows, torch.float32, [4, 8], False, False), (rows, bf16, [4, 8], True, False),
             (rows, bf16, [4, bm // 2], False, True), (rows, bf16, [4, bm // 2 + 1], False, False)]
    for n, dtype, hs, save_inputs, fused in cases:
        assert kernels.fused_chain_pays(torch.empty(n, 16, device=device, dtype=dtype), hs, save_inputs) is fused
    x = torch.randn(rows, 16, device=device).to(bf16)
    with torch.no_grad():
        adapter_chain(x, adapters, backend="triton")
        adapter_chain(torch.cat([x, x[:1]]), adapters, backend="triton")
    adapter_chain(x.requires_grad_(), adapters, backend="triton")
    assert forwards == [["fold_ln", "fold_ln", "chain2_fwd"]] and calls == ["triton"] * 4


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
    for fused in (True, False):
        check(x, adapters, seeds=seeds, scales=scales, fused=fused)


@pytest.mark.parametrize("device", DEVICES)
def test_chain_without_input_gradient_and_inference(device):
    torch.manual_seed(3)
    d = 16
    adapters = make_adapters(d, (4, 4), device)
    x = torch.randn(5, d, device=device)  # no gradient for x: the first adapter's dx is skipped
    want = reference.linear_adapter(reference.linear_adapter(x, *adapters[0][:4])[0], *adapters[1][:4])[0]
    for fused in (True, False):
        check(x, adapters, fused=fused)
        with torch.no_grad():
            out = adapter_chain(x, adapters, backend="triton", fused=fused)
        torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "loop"])
def test_frozen_adapters_get_no_weight_gradient_work(device, fused, monkeypatch):
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
    check(x, adapters, fused=fused)
    # backward runs the adapters in reverse: 2, 1, 0
    assert needs == [(True, False, True, True), (True, False, False, False), (False, True, True, True)]


def mixed_adapters(d, device, dtype=torch.float32):
    """pre/swish with dropout, post/gelu, pre/relu with dropout: three H, two norm positions."""
    adapters = (make_adapters(d, (8,), device, dropout_p=0.25) + make_adapters(d, (20,), device, norm_position="post",
                activation="gelu") + make_adapters(d, (5,), device, activation="relu", dropout_p=0.5))
    return [p._replace(**{w: getattr(p, w).detach().to(dtype).requires_grad_() for w in WEIGHTS}) for p in adapters]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, d", [(torch.bfloat16, 300), (torch.bfloat16, 1000), (torch.float32, 150)],
                         ids=["bf16-fits-L2", "bf16-streams", "fp32"])
def test_chain_saved_and_in_place(device, dtype, d):
    """The fused launch with x_1 … x_{K-1} saved and with out written in place, over 300 rows (several
    row blocks), with the first reads' L2 policy of both cases (the device's limits shrunk to the
    interpreter's as in test_linear_adapter.py::test_forward_grid), against the float64 reference."""
    from fusedadapters.ops.triton import adapter_chain as kernels
    from fusedadapters.ops.triton.linear_adapter import INTERPRETER, _run, device_limits

    torch.manual_seed(5)
    adapters = mixed_adapters(d, device, dtype)
    x = torch.randn(300, d, device=device).to(dtype)
    seeds = [torch.tensor([7 + k], device=device) for k in range(3)]
    scales = [None, torch.tensor([0.5], device=device, dtype=dtype), None]
    limits = device_limits(x.device)
    if limits is not INTERPRETER:
        limits = limits._replace(sm_count=INTERPRETER.sm_count, l2_size=INTERPRETER.l2_size)
    double = [p._replace(**{w: getattr(p, w).detach().double() for w in WEIGHTS}) for p in adapters]
    want, want_sq = reference_multi.adapter_chain(x.double(), double, dropout_seeds=seeds,
                                                  scales=[s if s is None else s.double() for s in scales])
    for save_inputs in (True, False):
        outputs, launches = kernels.plan_chain_forward(x, adapters, seeds, scales, True, save_inputs, limits)
        chain = launches[-1]
        assert [launch.name for launch in launches] == ["fold_ln", "fold_ln", "chain3_fwd"]
        assert chain.grid == (-(-300 // chain.meta["BM"]),) and chain.grid[0] > 1
        assert chain.meta["READS"][0] == ("" if d == 1000 else "evict_last")
        assert len(outputs[2]) == (2 if save_inputs else 0)
        _run(launches, limits)
        out, row_sqs, inputs = outputs[:3]
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(out, want) < tol
        for got, exp in zip(row_sqs, want_sq):
            assert rel_err(got, exp) < tol
        if save_inputs:  # x_1, which the backward reads
            x1 = reference.linear_adapter(x.double(), *double[0][:4], dropout_p=0.25, dropout_seed=seeds[0])[0]
            assert rel_err(inputs[0], x1) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_inference_runs_in_place_and_matches_training(device):
    """Without a gradient to compute, the chain writes out in place (no x_k kept); its out and row_sq are
    bitwise those of the forward that keeps x_k for training."""
    from fusedadapters.ops.triton import adapter_chain as kernels

    real, saved = kernels.plan_chain_forward, []

    def spy(*args):
        saved.append(args[5])
        return real(*args)

    torch.manual_seed(6)
    adapters = mixed_adapters(29, device)
    x = torch.randn(3, 11, 29, device=device)
    seeds = [torch.tensor([3 + k], device=device) for k in range(3)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "plan_chain_forward", spy)
        options = dict(dropout_seeds=seeds, return_row_sq=True, backend="triton", fused=True)
        train = adapter_chain(x, adapters, **options)
        with torch.no_grad():
            infer = adapter_chain(x, adapters, **options)
        frozen = [p._replace(**{w: getattr(p, w).detach() for w in WEIGHTS}) for p in adapters]
        plain = adapter_chain(x, frozen, **options)
    assert saved == [True, False, False]
    assert train[0].requires_grad and not infer[0].requires_grad
    for got in (infer, plain):
        assert torch.equal(got[0], train[0].detach())
        assert all(torch.equal(a, b.detach()) for a, b in zip(got[1], train[1]))


@pytest.mark.parametrize("device", DEVICES)
def test_chain_custom_op_and_torch_compile(device):
    torch.manual_seed(8)
    adapters = mixed_adapters(24, device)
    x = torch.randn(2, 9, 24, device=device, requires_grad=True)
    seeds = [torch.tensor([1 + k], device=device) for k in range(3)]
    ws = [[p[i] for p in adapters] for i in range(4)]
    config = ",".join(f"{p.norm_position}:{p.activation}" for p in adapters)
    for save_inputs in (True, False):
        args = (x, *ws, seeds, [None, torch.tensor([0.5], device=device), None], config, [1e-5] * 3,
                [p.dropout_p for p in adapters], True, save_inputs)
        checks = ("test_schema", "test_faketensor") + (("test_aot_dispatch_static",) if save_inputs else ())
        torch.library.opcheck(torch.ops.fusedadapters.adapter_chain_fwd.default, args, test_utils=checks)

    def loss(x, *tensors):
        ps = [AdapterParams(*tensors[4 * k: 4 * k + 4], **{f: getattr(p, f) for f in AdapterParams._fields[4:]})
              for k, p in enumerate(adapters)]
        out, row_sqs = adapter_chain(x, ps, dropout_seeds=seeds, return_row_sq=True, backend="triton",
                                     fused=True)
        return (out * out).sum() + sum(r.sum() for r in row_sqs)

    leaves = [x] + [t for p in adapters for t in p[:4]]
    compiled = torch.compile(loss, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    expected = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-5


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
