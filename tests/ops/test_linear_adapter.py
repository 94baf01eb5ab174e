"""The triton backend of ``ops.linear_adapter`` against the reference computed in float64.

Runs on CPU tensors under Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` when
CUDA is absent) and on CUDA when present. Every launch writes into poisoned memory: deterministic
mode makes ``torch.empty`` fill with NaN, so an element a kernel fails to write shows up as NaN.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from fusedadapters.ops import backend as backend_mod
from fusedadapters.ops import linear_adapter, reference
from helpers import rel_err

DEVICES = (["cpu"] if backend_mod.triton_interpreter_enabled() else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
PARAM_NAMES = ("x", "ln_weight", "ln_bias", "down_weight", "up_weight")

pytestmark = pytest.mark.skipif(not backend_mod.triton_available(), reason="needs triton")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
devices = pytest.mark.parametrize("device", DEVICES)




def make_params(d: int, h: int, dtype=torch.float32, device="cpu", up_mean: float = 0.0):
    """Random non-zero LayerNorm, down and up weights (the module zero-inits the up weight)."""
    return [
        (1.0 + 0.5 * torch.randn(d, device=device)).to(dtype).requires_grad_(),
        (0.5 * torch.randn(d, device=device)).to(dtype).requires_grad_(),
        (torch.randn(h, d, device=device) / math.sqrt(d)).to(dtype).requires_grad_(),
        (up_mean + torch.randn(d, h, device=device) / math.sqrt(h)).to(dtype).requires_grad_(),
    ]


def make_x(shape, dtype=torch.float32, device="cpu", mean: float = 0.0):
    return (mean + torch.randn(shape, device=device)).to(dtype).requires_grad_()


def run(x, params, *, backend, grad_row_sq=True, **kw):
    """(out, row_sq, {name: grad}) with a random dout and row_sq gradient (seeded by the caller)."""
    out, row_sq = linear_adapter(x, *params, return_row_sq=True, backend=backend, **kw)
    loss = (out.float() * _cached_randn("dout", out.shape, x.device)).sum()
    if grad_row_sq:
        loss = loss + (row_sq.float() * _cached_randn("dsq", row_sq.shape, x.device)).sum()
    named = [(n, t) for n, t in zip(PARAM_NAMES, (x, *params)) if t.requires_grad]
    grads = torch.autograd.grad(loss, [t for _, t in named]) if named else ()
    return out, row_sq, {n: g for (n, _), g in zip(named, grads)}


_RANDN = {}


def _cached_randn(key, shape, device):
    """The same upstream gradients for the triton and the reference run of one check."""
    t = _RANDN.get(key)
    if t is None or t.shape != shape or t.device != torch.device(device):
        t = _RANDN[key] = torch.randn(shape, device=device, dtype=torch.float64)
    return t


def as_float64(x, params, kw):
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    p64 = [p.detach().double().requires_grad_(p.requires_grad) for p in params]
    kw64 = dict(kw)
    if kw.get("scale") is not None:
        kw64["scale"] = kw["scale"].double()
    return x64, p64, kw64


def check(x, params, *, grad_row_sq=True, backend="triton", vanishing=None, **kw):
    """Output, row_sq and every gradient of ``backend`` within TOL of the float64 reference.

    ``vanishing``: {gradient name: scale} for gradients that are zero in exact arithmetic and come out
    as the rounding left over from cancelling terms of size ``scale``; they are held to TOL × scale."""
    _RANDN.clear()
    tol = TOL[x.dtype]
    out, row_sq, grads = run(x, params, backend=backend, grad_row_sq=grad_row_sq, **kw)
    x64, p64, kw64 = as_float64(x, params, kw)
    ref_out, ref_sq, ref_grads = run(x64, p64, backend="reference", grad_row_sq=grad_row_sq, **kw64)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert row_sq.shape == x.shape[:-1] and row_sq.dtype == torch.float32
    errors = {"out": (rel_err(out, ref_out), tol), "row_sq": (rel_err(row_sq, ref_sq), tol)}
    if kw.get("residual", True):
        # The output can be dominated by x: check the adapter's own contribution too, allowing for
        # the rounding of x + y to the dtype of x.
        y_ref = ref_out - x64
        rounding = torch.finfo(x.dtype).eps * (x64.norm() / y_ref.norm()).item()
        errors["out - x"] = (rel_err(out.double() - x.double(), y_ref), tol + rounding)
    for name, g in grads.items():
        assert g.shape == ref_grads[name].shape and g.dtype == x.dtype, name
        floor = (vanishing or {}).get(name)
        if floor is None:
            errors[f"d{name}"] = (rel_err(g, ref_grads[name]), tol)
        else:
            errors[f"d{name}"] = ((g.double().cpu() - ref_grads[name].cpu()).norm().item() / floor, tol)
    bad = {k: v for k, v in errors.items() if not v[0] < v[1]}
    assert not bad, f"(relative error, bound) out of bounds: {bad}"
    return out, row_sq, grads


# ----------------------------------------------------------------------------------------------
# Parity with the reference
# ----------------------------------------------------------------------------------------------


@devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_activations(device, norm_position, activation, dtype):
    torch.manual_seed(0)
    x = make_x((19, 37), dtype, device)
    check(x, make_params(37, 20, dtype, device), activation=activation, norm_position=norm_position)


@devices
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_activation_kinks(device, activation):
    """h exactly at relu's 0 and hardtanh's ±1: post norm with one-hot rows makes h = Wd[:, d] exactly."""
    torch.manual_seed(17)
    d, h = 24, 16
    x = torch.eye(d, device=device)[torch.randint(0, d, (40,), device=device)].requires_grad_()
    params = make_params(d, h, device=device)
    kinks = torch.tensor([-1.0, 0.0, 1.0, 0.5, -2.0], device=device)
    with torch.no_grad():
        params[2].copy_(kinks[torch.randint(0, len(kinks), (h, d), device=device)])
    check(x, params, activation=activation, norm_position="post")


@devices
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(device, norm_position, dtype):
    torch.manual_seed(1)
    x = make_x((2, 35, 100), dtype, device)
    check(x, make_params(100, 24, dtype, device), activation="gelu", norm_position=norm_position,
          dropout_p=0.25, dropout_seed=torch.tensor([7], device=device), scale=torch.tensor([0.8], device=device))


@devices
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_large_mean(device, norm_position, residual):
    """Statistics of a row whose mean is large next to its spread (x for pre norm, u for post)."""
    torch.manual_seed(2)
    pre = norm_position == "pre"
    x = make_x((21, 100), device=device, mean=1e3 if pre else 0.0)
    params = make_params(100, 16, device=device, up_mean=0.0 if pre else 10.0)
    check(x, params, activation="relu" if pre else "swish", norm_position=norm_position, residual=residual)


@devices
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_columns_pass_split_in_two_at_large_hidden(device, norm_position):
    """From H = 256 the columns pass runs as two launches (dWu's and dWd's accumulators apart)."""
    from fusedadapters.ops.triton import linear_adapter as kernels

    torch.manual_seed(5)
    x = make_x((33, 70), torch.float16, device)
    params = make_params(70, 300, torch.float16, device)
    outs, _ = kernels.plan_forward(x, *params, None, None, "gelu", norm_position, 1e-5, 0.0, True, True,
                                   kernels.device_limits(x.device))
    _, launches = kernels.plan_backward(x, None, x, *params, None, None, *outs[2:], "gelu", norm_position, 0.0,
                                        True, True, True, True, True, kernels.device_limits(x.device))
    assert [launch.name for launch in launches].count("bwd_cols") == 2
    check(x, params, activation="gelu", norm_position=norm_position)


@devices
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize(
    "dtype, d, grid_stride, first_read",
    [(torch.bfloat16, 300, True, "evict_last"), (torch.bfloat16, 1000, False, ""),
     (torch.float32, 150, False, "evict_last")],
    ids=["one-block-per-SM-fits-L2", "streams", "fp32-fits-L2"],
)
def test_forward_grid(device, norm_position, dtype, d, grid_stride, first_read):
    """Where one row block per SM fits the L2, the forward is one program per SM walking the row blocks
    (pid, pid + P, ...) in fp16/bf16; where none fits, or in float32, one program per row block. The
    device's limits are shrunk to the interpreter's (2 "SMs", 64 KB of L2), so that a GPU runs these
    grids too: the planned launches run as they are, against the float64 reference."""
    from fusedadapters.ops.triton import linear_adapter as kernels

    torch.manual_seed(9)
    x = make_x((300, d), dtype, device)
    params = make_params(d, 16, dtype, device)
    limits = kernels.device_limits(x.device)
    if limits is not kernels.INTERPRETER:
        limits = limits._replace(sm_count=kernels.INTERPRETER.sm_count, l2_size=kernels.INTERPRETER.l2_size)
    outs, launches = kernels.plan_forward(x.detach(), *(p.detach() for p in params), None, None, "gelu",
                                          norm_position, 1e-5, 0.0, True, True, limits)
    fwd = launches[-1]
    blocks = -(-300 // fwd.meta["BM"])
    assert fwd.meta["GRID_STRIDE"] is grid_stride and fwd.meta["FIRST_READ"] == first_read
    assert (fwd.grid[0], fwd.work_units) == ((limits.sm_count, blocks) if grid_stride else (blocks, 0))
    kernels._run(launches, limits)
    x64, p64, _ = as_float64(x, params, {})
    want = reference.linear_adapter(x64, *p64, activation="gelu", norm_position=norm_position)[0]
    assert rel_err(outs[0], want) < TOL[dtype]
    check(x, params, activation="gelu", norm_position=norm_position)


@devices
@pytest.mark.parametrize("activation", ["gelu", "hardtanh"])
def test_post_norm_folds_the_up_weight_over_split_rows(device, activation):
    """Post norm's backward folds the up weight (Wu shifted, its centred Gram matrix) over groups of 256
    rows of D added in order: D = 700 makes three, with an up weight whose column means (2) are large
    next to its spread, so that the fold's centring matters."""
    from fusedadapters.ops.triton import linear_adapter as kernels

    torch.manual_seed(12)
    x = make_x((45, 700), device=device)
    params = make_params(700, 40, device=device, up_mean=2.0)
    outs, _ = kernels.plan_forward(x, *params, None, None, activation, "post", 1e-5, 0.0, True, True,
                                   kernels.device_limits(x.device))
    _, launches = kernels.plan_backward(x, None, x, *params, None, None, *outs[2:], activation, "post", 0.0,
                                        True, True, True, True, True, kernels.device_limits(x.device))
    assert [launch.name for launch in launches][:2] == ["fold_up", "gram_up"] and launches[0].grid[1] == 3  # splits
    check(x, params, activation=activation, norm_position="post")


@devices
@pytest.mark.parametrize(
    "shape, hidden",
    [((1, 37), 1), ((70, 16), 16), ((2, 3, 100), 100), ((65, 1), 3), ((5, 20), 1024), ((130, 24), 8)],
    ids=["N1-H1", "N70-D16", "lead-dims", "D1", "H1024", "N130-split"],
)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_shapes(device, shape, hidden, norm_position):
    torch.manual_seed(3)
    # With H = 1 post norm, LN(a·w) depends on a only through eps: a large eps keeps its gradients
    # well-conditioned enough for the float32 bound.
    eps = 1.0 if hidden == 1 and norm_position == "post" else 1e-5
    x = make_x(shape, device=device)
    vanishing = None
    if shape[-1] == 1 and norm_position == "post":
        # LN over one feature outputs β whatever its input: the projections get no gradient, and the
        # kernels' dû·Wu - (c1 ΣWu + c2 û·Wu)/D cancels to rounding (float32 dots, not exact) times
        # rstd = eps^-1/2; hold that to the bound relative to rstd × ‖dout‖.
        scale = eps ** -0.5 * math.sqrt(x.numel())
        vanishing = {"down_weight": scale, "up_weight": scale}
    check(x, make_params(shape[-1], hidden, device=device), activation="silu", norm_position=norm_position, eps=eps,
          vanishing=vanishing)


def check_non_contiguous(norm_position, backend, device="cpu"):
    """x strided in every dim, a non-contiguous down weight and an expanded (stride 0) upstream gradient."""
    torch.manual_seed(4)
    base = make_x((3, 2, 80), device=device)
    x = base.transpose(0, 1)[..., ::2]  # (2, 3, 40), strides in every dim
    assert not x.is_contiguous()
    params = make_params(40, 12, device=device)
    check(x, params, activation="selu", norm_position=norm_position, backend=backend)
    down_t = params[2].detach().t().contiguous().t().requires_grad_()
    out = linear_adapter(x, params[0], params[1], down_t, params[3], norm_position=norm_position, backend=backend)
    got = torch.autograd.grad(out.sum(), [base, down_t])
    x64, p64, _ = as_float64(base, params, {})
    ref = reference.linear_adapter(x64.transpose(0, 1)[..., ::2], *p64, norm_position=norm_position)[0]
    expected = torch.autograd.grad(ref.sum(), [x64, p64[2]])
    assert rel_err(got[0], expected[0]) < 1e-5 and rel_err(got[1], expected[1]) < 1e-5


@devices
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_non_contiguous(device, norm_position):
    check_non_contiguous(norm_position, "triton", device)


@devices
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_scale_no_residual(device, norm_position):
    torch.manual_seed(5)
    x = make_x((33, 50), device=device)
    scale = torch.tensor([0.37], device=device)
    check(x, make_params(50, 10, device=device), activation="hardtanh", norm_position=norm_position,
          scale=scale, residual=False)


@devices
def test_row_sq_alone_reaches_the_loss(device):
    check_row_sq_alone(device, "triton")


def check_row_sq_alone(device, backend):
    """row_sq as the whole loss: every gradient against float64."""
    torch.manual_seed(6)
    x = make_x((9, 30), device=device)
    params = make_params(30, 16, device=device)
    _, row_sq = linear_adapter(x, *params, return_row_sq=True, backend=backend)
    grads = torch.autograd.grad(row_sq.sum(), [x, *params])
    x64, p64, _ = as_float64(x, params, {})
    ref_grads = torch.autograd.grad(reference.linear_adapter(x64, *p64)[1].sum(), [x64, *p64])
    for name, g, r in zip(PARAM_NAMES, grads, ref_grads):
        assert rel_err(g, r) < 1e-5, name


@devices
def test_empty_input(device):
    x = make_x((0, 24), device=device)
    params = make_params(24, 8, device=device)
    out, row_sq = linear_adapter(x, *params, return_row_sq=True, backend="triton")
    assert out.shape == (0, 24) and row_sq.shape == (0,)
    grads = torch.autograd.grad((out.sum() + row_sq.sum()), [x, *params], allow_unused=True)
    assert grads[0].shape == (0, 24)
    for p, g in zip(params, grads[1:]):
        assert g.shape == p.shape and not g.any()


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------


@devices
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_dropout_mask_is_the_reference_mask(device, norm_position):
    torch.manual_seed(7)
    p = 0.4
    seed = torch.tensor([2**40 + 12345], device=device)  # only the low 32 bits count
    x = make_x((37, 45), device=device)
    params = make_params(45, 16, device=device)
    kw = dict(norm_position=norm_position, residual=False, backend="triton")
    dropped = linear_adapter(x, *params, dropout_p=p, dropout_seed=seed, **kw).detach()
    full = linear_adapter(x, *params, **kw).detach()
    keep = reference.dropout_uniform(seed, 37, 45).to(device) >= p
    assert torch.equal(dropped != 0, keep)
    torch.testing.assert_close(dropped[keep], full[keep] / (1 - p))
    # Backward regenerates the same mask.
    scale = torch.tensor([1.5], device=device)
    check(x, params, norm_position=norm_position, dropout_p=p, dropout_seed=seed, scale=scale)


@devices
def test_dropout_seed_semantics(device):
    torch.manual_seed(8)
    x = make_x((20, 32), device=device)
    params = make_params(32, 16, device=device)

    def run_with(seed, p=0.5):
        return linear_adapter(x, *params, dropout_p=p, dropout_seed=torch.tensor([seed], device=device),
                              residual=False, backend="triton").detach()

    assert torch.equal(run_with(11), run_with(11))
    assert not torch.equal(run_with(11), run_with(12))
    assert torch.equal(run_with(-1), run_with(2**32 - 1))  # seed mod 2**32
    assert not run_with(11, p=1.0).any()


@devices
def test_dropout_p_one_drops_everything(device):
    torch.manual_seed(9)
    x = make_x((10, 24), device=device)
    params = make_params(24, 8, device=device)
    out, row_sq = linear_adapter(x, *params, dropout_p=1.0, return_row_sq=True, backend="triton")
    assert torch.equal(out, x) and not row_sq.any()
    grads = torch.autograd.grad(out.sum(), [x, *params])
    assert torch.equal(grads[0], torch.ones_like(x))
    assert all(not g.any() for g in grads[1:])


@devices
def test_dropout_draws_a_seed_when_none_is_given(device):
    torch.manual_seed(10)
    x = make_x((8, 24), device=device)
    params = make_params(24, 8, device=device)
    torch.manual_seed(123)
    a = linear_adapter(x, *params, dropout_p=0.5, backend="triton")
    torch.manual_seed(123)
    b = linear_adapter(x, *params, dropout_p=0.5, backend="triton")
    c = linear_adapter(x, *params, dropout_p=0.5, backend="triton")
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------
# Gradients: determinism, frozen parameters
# ----------------------------------------------------------------------------------------------


@devices
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_weight_grads_are_bitwise_deterministic(device, norm_position):
    torch.manual_seed(11)
    x = make_x((200, 40), device=device)  # several row blocks and row splits
    params = make_params(40, 16, device=device)

    def grads():
        out, row_sq = linear_adapter(x, *params, norm_position=norm_position, dropout_p=0.1,
                                     dropout_seed=torch.tensor([5], device=device), return_row_sq=True,
                                     backend="triton")
        return torch.autograd.grad((out * out).sum() + row_sq.sum(), [x, *params])

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@devices
@pytest.mark.parametrize("trainable", [(), ("x",), ("up_weight",), ("ln_bias", "down_weight")], ids=str)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_only_some_inputs_need_grad(device, trainable, norm_position):
    torch.manual_seed(12)
    x = make_x((15, 30), device=device)
    params = make_params(30, 16, device=device)
    for name, t in zip(PARAM_NAMES, (x, *params)):
        t.requires_grad_(name in trainable)
    if not trainable:
        out = linear_adapter(x, *params, norm_position=norm_position, backend="triton")
        assert not out.requires_grad
        return
    _, _, grads = check(x, params, norm_position=norm_position)
    assert set(grads) == set(trainable)


@devices
def test_frozen_adapter_in_front_of_a_trainable_one(device):
    torch.manual_seed(13)
    x = make_x((12, 32), device=device)
    frozen = [p.detach() for p in make_params(32, 8, device=device)]
    trainable = make_params(32, 8, device=device)

    def chain(x, frozen, trainable, backend):
        y = linear_adapter(x, *frozen, backend=backend)
        return linear_adapter(y, *trainable, norm_position="post", backend=backend)

    out = chain(x, frozen, trainable, "triton")
    grads = torch.autograd.grad(out.pow(2).sum(), [x, *trainable])
    x64, t64, _ = as_float64(x, trainable, {})
    ref = chain(x64, [p.double() for p in frozen], t64, "reference")
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x64, *t64])
    for name, g, r in zip(PARAM_NAMES, grads, ref_grads):
        assert rel_err(g, r) < 1e-5, name


# ----------------------------------------------------------------------------------------------
# torch.library registration, torch.compile, CUDA graphs
# ----------------------------------------------------------------------------------------------


@devices
def test_custom_op_registration(device):
    torch.manual_seed(14)
    x = make_x((2, 5, 24), device=device)
    params = make_params(24, 8, device=device)
    seed, scale = torch.tensor([3], device=device), torch.tensor([0.5], device=device)
    for norm_position in reference.NORM_POSITIONS:
        args = (x, *params, seed, scale, "gelu", norm_position, 1e-5, 0.2, True, True)
        torch.library.opcheck(torch.ops.fusedadapters.linear_adapter_fwd.default, args)


@devices
def test_torch_compile_fullgraph(device):
    torch.manual_seed(15)
    x = make_x((2, 9, 24), device=device)
    params = make_params(24, 8, device=device)

    def loss(x, *params):
        y = linear_adapter(x, *params, activation="gelu", dropout_p=0.2, backend="triton")
        out, row_sq = linear_adapter(y, *params, norm_position="post", return_row_sq=True, backend="triton")
        return (out * out).sum() + row_sq.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    torch.manual_seed(99)
    expected = torch.autograd.grad(loss(x, *params), [x, *params])
    torch.manual_seed(99)
    got = torch.autograd.grad(compiled(x, *params), [x, *params])
    for name, g, e in zip(PARAM_NAMES, got, expected):
        assert rel_err(g, e) < 1e-5, name


@needs_cuda
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_cuda_graph_capture_and_replay(norm_position):
    torch.manual_seed(16)
    x = make_x((64, 96), device="cuda")
    params = make_params(96, 32, device="cuda")
    seed = torch.tensor([1], device="cuda")
    scale = torch.tensor([0.9], device="cuda")

    def step():
        out, row_sq = linear_adapter(x, *params, norm_position=norm_position, dropout_p=0.3, dropout_seed=seed,
                                     scale=scale, return_row_sq=True, backend="triton")
        return (out, row_sq, *torch.autograd.grad((out * out).sum() + row_sq.sum(), [x, *params]))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        seed.fill_(2)
    graph.replay()
    eager = step()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Backend choice and argument errors
# ----------------------------------------------------------------------------------------------


def test_unknown_backend_is_an_error(monkeypatch):
    x, params = make_x((4, 8)), make_params(8, 4)
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        linear_adapter(x, *params, backend="cuda-magic")
    monkeypatch.setenv(backend_mod.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        linear_adapter(x, *params)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(backend_mod, "triton_interpreter_enabled", lambda: False)
    x, params = make_x((4, 8)), make_params(8, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_adapter(x, *params, backend="triton")


def test_triton_not_installed_is_an_error(monkeypatch):
    monkeypatch.setattr(backend_mod, "triton_available", lambda: False)
    x, params = make_x((4, 8)), make_params(8, 4)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        linear_adapter(x, *params, backend="triton")
    assert backend_mod.resolve_backend(None, torch.device("cuda")) == "reference"


def test_automatic_choice_on_cuda_gives_wide_adapters_to_the_reference(monkeypatch):
    """Measured crossover: Triton on CUDA up to H = TRITON_MAX_AUTO_HIDDEN, the reference above it; an
    explicit backend is never overridden."""
    monkeypatch.setattr(backend_mod, "triton_available", lambda: True)
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    cuda, widest = torch.device("cuda"), backend_mod.TRITON_MAX_AUTO_HIDDEN
    assert backend_mod.resolve_backend(None, cuda, hidden=widest) == "triton"
    assert backend_mod.resolve_backend(None, cuda, hidden=widest + 1) == "reference"
    assert backend_mod.resolve_backend(None, cuda) == "triton"  # ops without an H
    assert backend_mod.resolve_backend("triton", cuda, hidden=4 * widest) == "triton"


@devices
def test_bad_arguments_are_clear_errors(device):
    x, params = make_x((4, 8), device=device), make_params(8, 4, device=device)
    ln_w, ln_b, down, up = params
    with pytest.raises(ValueError, match=r"down_weight \(4, 9\)"):
        linear_adapter(x, ln_w, ln_b, down.detach()[:, :1].expand(4, 9), up, backend="triton")
    with pytest.raises(ValueError, match=r"up_weight \(4, 8\)"):
        linear_adapter(x, ln_w, ln_b, down, up.detach().t(), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        linear_adapter(x.double(), *(p.double() for p in params), backend="triton")
    with pytest.raises(TypeError, match="down_weight is torch.float16"):
        linear_adapter(x, ln_w, ln_b, down.half(), up, backend="triton")
    big = make_params(8, 1025, device=device)
    with pytest.raises(ValueError, match="hidden sizes up to 1024"):
        linear_adapter(x, *big, backend="triton")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        linear_adapter(x, *params, activation="tanh", backend="triton")
    with pytest.raises(ValueError, match="norm_position"):
        linear_adapter(x, *params, norm_position="middle", backend="triton")
    with pytest.raises(ValueError, match="dropout_seed must be a one-element int64"):
        linear_adapter(x, *params, dropout_p=0.1, dropout_seed=torch.tensor([1, 2], device=device), backend="triton")
    with pytest.raises(ValueError, match="scale must be a one-element"):
        linear_adapter(x, *params, scale=torch.ones(2, device=device), backend="triton")


def test_import_does_not_import_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        "import torch, fusedadapters\n"
        "from fusedadapters.ops import linear_adapter\n"
        "x = torch.randn(3, 8)\n"
        "out = linear_adapter(x, torch.ones(8), torch.zeros(8), torch.randn(4, 8), torch.randn(8, 4))\n"
        "assert out.shape == (3, 8)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
