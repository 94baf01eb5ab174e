"""``ops.routed_adapter`` (mixed batch): the triton backend against the float64 reference; stacking.

Runs on CPU tensors under Triton's interpreter (tests/conftest.py) and on CUDA when present. Every
weight is random and non-zero; outputs are poisoned (deterministic mode fills ``torch.empty`` with NaN).
The reference itself is checked against single-adapter ``reference.linear_adapter`` calls.
"""

from __future__ import annotations

import math

import pytest
import torch

from fusedadapters.ops import AdapterParams, reference, reference_multi, routed_adapter, stack_adapter_params
from fusedadapters.ops import backend as backend_mod
from helpers import rel_err

DEVICES = (["cpu"] if backend_mod.triton_interpreter_enabled() else []) + (["cuda"] if torch.cuda.is_available() else [])
needs_triton = pytest.mark.skipif(not backend_mod.triton_available(), reason="needs triton")
WEIGHTS = ("ln_weight", "ln_bias", "down_weight", "up_weight")




def make_adapters(d: int, hidden_sizes, device="cpu", **options):
    """Random non-zero adapters (one AdapterParams each), leaves that require grad."""
    adapters = []
    for h in hidden_sizes:
        tensors = [
            1.0 + 0.5 * torch.randn(d, device=device),
            0.5 * torch.randn(d, device=device),
            torch.randn(h, d, device=device) / math.sqrt(d),
            torch.randn(d, h, device=device) / math.sqrt(h),
        ]
        adapters.append(AdapterParams(*(t.requires_grad_() for t in tensors), **options))
    return adapters


def run(x, index, adapters, *, backend, dtype=torch.float32, **kw):
    """(out, row_sq, grads of x and of every adapter tensor) with random upstream gradients."""
    stacked = stack_adapter_params(adapters, dtype)
    first = adapters[0]
    out, row_sq = routed_adapter(
        x.to(dtype), index, *stacked, activation=first.activation, norm_position=first.norm_position,
        eps=first.eps, return_row_sq=True, backend=backend, **kw,
    )
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    dsq = torch.randn(row_sq.shape, generator=gen, dtype=torch.float64).to(out.device)
    loss = (out.double() * dout).sum() + (row_sq.double() * dsq).sum()
    leaves = [x] + [t for p in adapters for t in p[:4]]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return out, row_sq, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def check(x, index, adapters, *, tol=1e-5, **kw):
    got = run(x, index, adapters, backend="triton", **kw)
    double = [p._replace(**{w: getattr(p, w).detach().double().requires_grad_() for w in WEIGHTS}) for p in adapters]
    x64 = x.detach().double().requires_grad_()
    ref_kw = dict(kw)
    if ref_kw.get("scale") is not None:
        ref_kw["scale"] = ref_kw["scale"].double()
    want = run(x64, index, double, backend="reference", dtype=torch.float64, **ref_kw)
    assert not torch.isnan(got[0]).any()
    assert rel_err(got[0], want[0]) < tol, "out"
    assert rel_err(got[1], want[1]) < tol, "row_sq"
    names = ["x"] + [f"{k}.{w}" for k in range(len(adapters)) for w in WEIGHTS]
    for name, g, w in zip(names, got[2], want[2]):
        assert rel_err(g, w) < tol, name


def index_for(pattern: str, n: int, a_count: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    if pattern == "mixed":
        index = torch.randint(-1, a_count, (n,), generator=gen)
        index[0], index[1] = -1, a_count - 1
        index[index == 1] = 0  # adapter 1 gets no row: an empty segment
    elif pattern == "all_on_one":
        index = torch.full((n,), a_count - 1)
    else:  # "none"
        index = torch.full((n,), -1)
    return index.to(device)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "norm_position,activation,pattern,n",
    [
        ("pre", "swish", "mixed", 37),
        ("post", "gelu", "mixed", 37),
        ("pre", "relu", "all_on_one", 21),
        ("post", "selu", "none", 9),
        ("pre", "hardtanh", "all_on_one", 1),
    ],
)
def test_triton_matches_reference(device, norm_position, activation, pattern, n):
    torch.manual_seed(n)
    d, hidden_sizes = 40, (5, 16, 9)  # different H: padded to 16
    adapters = make_adapters(d, hidden_sizes, device, norm_position=norm_position, activation=activation)
    x = (torch.randn(n, d, device=device) + 3.0).requires_grad_()
    check(x, index_for(pattern, n, len(adapters), device), adapters)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_triton_dropout_scale_no_residual_leading_dims(device, norm_position):
    torch.manual_seed(3)
    d = 24
    adapters = make_adapters(d, (8, 8), device, norm_position=norm_position)
    x = torch.randn(3, 7, d, device=device).requires_grad_()
    index = torch.randint(-1, 2, (3, 7), device=device)
    check(x, index, adapters, dropout_p=[0.3, 0.0], dropout_seed=torch.tensor([1234], device=device),
          scale=torch.tensor([0.7, 1.6], device=device), residual=False)


def test_reference_equals_single_adapters():
    torch.manual_seed(0)
    d = 10
    adapters = make_adapters(d, (3, 6))
    x = torch.randn(9, d)
    index = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 1])
    ln_w, ln_b, down, up = stack_adapter_params(adapters)
    seed = torch.tensor([99])
    out, row_sq = reference_multi.routed_adapter(
        x, index, ln_w, ln_b, down, up, dropout_p=[0.2, 0.5], dropout_seed=seed, scale=torch.tensor([2.0, 0.5]))
    uniform = reference.dropout_uniform(seed, 9, d)
    for n in range(9):
        k = int(index[n])
        if k < 0:
            torch.testing.assert_close(out[n], x[n])
            assert float(row_sq[n].detach()) == 0.0
            continue
        p = adapters[k]
        y, _ = reference.linear_adapter(x[n], *p[:4], residual=False)
        y = y * (uniform[n] >= [0.2, 0.5][k]) / (1 - [0.2, 0.5][k]) * [2.0, 0.5][k]
        torch.testing.assert_close(out[n], x[n] + y)
        torch.testing.assert_close(row_sq[n], y.square().sum())


def test_stack_is_cached_per_weight_version_and_sends_each_adapter_its_gradient():
    adapters = make_adapters(6, (2, 4))
    first = stack_adapter_params(adapters)
    again = stack_adapter_params(adapters)
    assert again[2].data_ptr() == first[2].data_ptr()  # same weights: no restack
    with torch.no_grad():
        adapters[1].up_weight.add_(1.0)  # an optimizer step bumps _version
    after = stack_adapter_params(adapters)
    assert after[2].data_ptr() != first[2].data_ptr()
    torch.testing.assert_close(after[3][1, :, :4], adapters[1].up_weight.detach())
    assert float(after[3][0, :, 2:].detach().abs().sum()) == 0.0  # padding is zero
    (after[2].sum() + 2 * after[3].sum()).backward()
    assert adapters[0].down_weight.grad.shape == (2, 6) and torch.all(adapters[0].down_weight.grad == 1)
    assert adapters[1].up_weight.grad.shape == (6, 4) and torch.all(adapters[1].up_weight.grad == 2)


def test_bad_arguments_raise():
    adapters = make_adapters(6, (2,))
    stacked = stack_adapter_params(adapters)
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="adapter_index"):
        routed_adapter(x, torch.zeros(5, dtype=torch.int64), *stacked)
    with pytest.raises(ValueError, match="routed_adapter shapes"):
        routed_adapter(x, torch.zeros(4, dtype=torch.int64), stacked[0], stacked[1], stacked[2][0], stacked[3])
    with pytest.raises(ValueError, match="dropout_p has 2 entries for 1 adapters"):
        routed_adapter(x, torch.zeros(4, dtype=torch.int64), *stacked, dropout_p=[0.1, 0.2])
    with pytest.raises(ValueError, match="fit D"):
        stack_adapter_params(adapters + make_adapters(7, (2,)))


def test_stack_with_a_caller_cache_keeps_only_its_latest_stack():
    adapters, others = make_adapters(6, (2, 4)), make_adapters(6, (3,))
    cache = {}
    first = stack_adapter_params(adapters, cache=cache)
    assert stack_adapter_params(adapters, cache=cache)[2].data_ptr() == first[2].data_ptr()
    stack_adapter_params(others, cache=cache)
    assert len(cache) == 1
    assert stack_adapter_params(adapters, cache=cache)[2].data_ptr() != first[2].data_ptr()


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_triton_hidden_over_128_splits_the_weight_gradient_passes(device, norm_position):
    """H = 200 pads to 256, where the columns pass runs as two launches (dx and dWd; dWu)."""
    torch.manual_seed(5)
    adapters = make_adapters(24, (200, 7), device, norm_position=norm_position)
    x = torch.randn(11, 24, device=device).requires_grad_()
    check(x, index_for("mixed", 11, 2, device), adapters)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_triton_several_blocks_and_chunks_per_adapter(device, norm_position):
    """Enough rows that every adapter's segment spans several row blocks of the rows pass and several
    chunks of the columns pass (whose partials the segment sum adds), next to rows without an adapter."""
    from fusedadapters.ops.triton import linear_adapter as kernels

    torch.manual_seed(11)
    d, n = 24, 500
    adapters = make_adapters(d, (12, 3), device, norm_position=norm_position)
    index = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n)).to(device)
    limits = kernels.device_limits(torch.device(device))
    rows_block = kernels._rows_pass_config(norm_position == "pre", True, 16, d, torch.float32, limits).BM
    cols = kernels._col_config(16, d, torch.float32, limits)
    _, chunk = kernels._row_splits(n, -(-d // cols.BD), cols.BM, limits)
    assert min((index == a).sum().item() for a in range(2)) > max(2 * rows_block, chunk)
    x = torch.randn(n, d, device=device).requires_grad_()
    check(x, index, adapters, dropout_p=[0.2, 0.1], dropout_seed=torch.tensor([77], device=device))


@needs_triton
def test_record_launches_records_instead_of_running():
    from fusedadapters.ops.triton import routed_adapter as routed_kernels

    adapters = make_adapters(16, (4, 4))
    stacked = [t.detach() for t in stack_adapter_params(adapters)]
    x, index = torch.randn(5, 16), torch.tensor([0, 1, -1, 1, 0])
    with routed_kernels.record_launches() as launches:
        out, *_ = routed_kernels.routed_adapter_forward(x, index, *stacked, None, None, [0.0, 0.0], "swish", "pre",
                                                        1e-5, True, False)
    assert [launch.name for launch in launches] == ["_fold_ln_kernel", "_pre_norm_fwd_kernel"]  # pre norm folds first
    assert torch.isnan(out).all()  # poisoned and never written: nothing ran
