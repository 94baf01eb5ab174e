"""The native backend's CUDA kernels (csrc/*.cu), run on the CPU simulator of ``csrc/cuda_sim.h``.

No GPU is needed: the .cu sources are compiled by the host compiler with ``FA_CUDA_SIM``, together
with the binding, into the ``fusedadapters_cudasim`` library, whose CPU operators launch the CUDA
kernels on the simulator (every CUDA thread a fiber, barriers and warp shuffles emulated, the order
of the threads shuffled between barriers, a barrier that not all threads reach reported as an error).
The native backend's op then calls that library instead of the CPU kernels, and the parity checks of
the Triton and native tests run unchanged against the float64 reference. Rows up to 64 go through
the decode forward (one cooperative launch), more through the cluster forward on the simulated sm_90
(thread-block clusters, distributed shared memory) or the row-block forward on a simulated sm_80
(the ``arch`` fixture); the backward is the rows pass and the columns pass.

What this cannot check: timing, memory coalescing, races inside one barrier interval (each thread
runs alone until its next barrier), and code that only the GPU compiler sees (inline PTX, intrinsics).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from fusedadapters.ops import linear_adapter, native, reference

from .test_linear_adapter import check, check_non_contiguous, check_row_sq_alone, make_params, make_x
from .test_native import (check_dropout_and_scale, check_empty_input, check_large_mean,
                          check_scale_no_residual)

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CUDA_SOURCES = sorted(CSRC.glob("*.cu"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DECODE_ROWS, BLOCK_ROWS = 19, 83  # the decode forward (N <= 64) and the row-block forward (6 CTAs, the last partial)

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler to build the simulator library"
)


@pytest.fixture(scope="module")
def cudasim(tmp_path_factory):
    """Builds ``fusedadapters_cudasim`` (the binding and every .cu source, for the simulator) and loads it."""
    from torch.utils import cpp_extension

    build = tmp_path_factory.mktemp("cudasim")
    wrappers = []
    for source in CUDA_SOURCES:  # the host compiler takes .cpp files: one wrapper per .cu
        wrapper = build / f"sim_{source.stem}.cpp"
        wrapper.write_text(f'#include "{source.name}"\n')
        wrappers.append(str(wrapper))
    cpp_extension.load(
        name="fusedadapters_cudasim",
        sources=[str(CSRC / "binding.cpp"), *wrappers],
        extra_cflags=["-O2", "-DFA_CUDA_SIM", "-Wall", "-Werror", "-Wno-unused-function"],
        extra_include_paths=[str(CSRC)],
        build_directory=str(build),
        is_python_module=False,
        with_cuda=False,
    )
    return torch.ops.fusedadapters_cudasim


@pytest.fixture(autouse=True)
def native_runs_the_simulator(cudasim, monkeypatch):
    """backend='native' on CPU tensors launches the CUDA kernels on the simulator."""
    monkeypatch.setattr(native, "ensure_loaded", lambda: None)
    monkeypatch.setattr(native, "supports_device", lambda device: (True, ""))
    monkeypatch.setattr(native, "linear_adapter_forward", lambda *args: tuple(cudasim.linear_adapter_forward(*args)))
    monkeypatch.setattr(native, "linear_adapter_backward", lambda *args: tuple(cudasim.linear_adapter_backward(*args)))


@pytest.fixture(params=["sm_90", "sm_80"])
def arch(request, monkeypatch):
    """The simulated device's architecture: sm_90 runs the cluster forward for N > 64, sm_80 the
    row-block forward."""
    monkeypatch.setenv("FA_SIM_CC_MAJOR", request.param[3])
    return request.param


KINKS = {"relu": (0.0,), "hardtanh": (-1.0, 1.0), "selu": (0.0,)}  # where the activation's derivative jumps


def rows_away_from_kinks(rows, d, params, activation, norm_position, dtype, margin=0.05):
    """x of ``rows`` rows whose hidden values h (float64) all lie more than ``margin`` from the
    activation's kinks. In 16 bits the dots' operands are rounded (T(x - c), Wg = T(Wd γ), T(a), as in
    the Triton kernels), which moves h by about 1e-2 here: an h nearer a kink than that takes the
    derivative from its other side (selu's jumps at 0, from λα to λ), a discrete error that no rounding
    tolerance covers."""
    kinks = KINKS.get(activation, ()) if dtype != torch.float32 else ()
    x = make_x((4 * rows, d), dtype).detach()
    if kinks:
        ln_weight, ln_bias, down_weight, _ = (p.detach().double() for p in params)
        v = x.double()
        if norm_position == "pre":
            v = torch.nn.functional.layer_norm(v, (d,), ln_weight, ln_bias, eps=1e-5)
        h = v @ down_weight.T
        near = torch.stack([(h - k).abs() < margin for k in kinks]).any(0).any(1)
        x = x[~near]
    assert len(x) >= rows, "too few rows away from the kinks: draw more"
    return x[:rows].clone().requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_activations(norm_position, activation, dtype, arch):
    torch.manual_seed(0)
    params = make_params(37, 20, dtype)
    x = rows_away_from_kinks(BLOCK_ROWS, 37, params, activation, norm_position, dtype)
    check(x, params, activation=activation, norm_position=norm_position, backend="native")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("rows", [1, DECODE_ROWS, 64], ids=lambda n: f"N{n}")
def test_decode_forward(rows, norm_position, dtype):
    torch.manual_seed(6)
    x = make_x((rows, 300), dtype)  # D over the 8 CTAs of the simulated device: 38 columns each, the last 34
    check(x, make_params(300, 24, dtype), activation="gelu", norm_position=norm_position, backend="native")


@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("rows", [DECODE_ROWS, BLOCK_ROWS], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_with_dropout_and_scale(dtype, rows, norm_position, arch):
    check_dropout_and_scale((rows, 100), dtype, norm_position)


@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_large_mean(norm_position, residual, arch):
    check_large_mean(BLOCK_ROWS, norm_position, residual)


@pytest.mark.parametrize(
    "shape, hidden",
    [((70, 1), 3), ((2, 40, 300), 40), ((65, 529), 33), ((97, 16), 100), ((70, 40), 300), ((66, 8), 749),
     ((200, 4100), 64)],
    ids=["D1", "lead-dims-two-chunks", "D529-three-chunks", "H-above-D", "H300-16-columns", "H749-widest",
         "D4100-clusters-of-16"],
)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_shapes(shape, hidden, norm_position, arch):
    torch.manual_seed(3)
    x = make_x(shape)
    check(x, make_params(shape[-1], hidden), activation="silu", norm_position=norm_position, backend="native")


@pytest.mark.parametrize(
    "d, hidden",
    [(37, 3), (300, 24), (529, 33), (100, 300), (4100, 64), (70, 749), (1024, 64), (4096, 64)],
    ids=["H3-one-tile", "H24-warps-share-K", "D529-odd-slices", "H300-a-tile-per-warp", "D4100-clusters-of-16",
         "H749-widest", "D1024-16-byte-path", "D4096-16-byte-path-clusters-of-8"],
)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_core_shapes(dtype, norm_position, d, hidden):
    """16-bit on the simulated sm_90: both projections of the cluster forward on the (emulated) tensor
    cores, with W and H padded to tiles: H below one tile, H tiles fewer than the warps (K shared out),
    more H tiles than warps, slices not a multiple of 16 wide, clusters of 16, the widest H, and D a
    multiple of 8: x and out in 16-byte chunks, the next row block's x loaded while one computes (83
    rows: 6 row blocks over 2 clusters of 2, or over 1 cluster of 8)."""
    torch.manual_seed(4)
    x = make_x((BLOCK_ROWS, d), dtype)
    check(x, make_params(d, hidden, dtype), activation="silu", norm_position=norm_position, backend="native")


@pytest.mark.parametrize("layout", ["offset-by-one", "row-stride-1028", "column-stride-2", "row-stride-1032"])
def test_16_byte_path_needs_aligned_rows(layout):
    """x whose rows are not 16-byte aligned, or not contiguous, takes the element-wise path (a 16-byte
    access at a misaligned address fails the simulated launch); aligned rows with a padded stride take
    the 16-byte path."""
    torch.manual_seed(8)
    d, rows = 1024, BLOCK_ROWS
    if layout == "offset-by-one":
        x = make_x((rows * d + 1,), torch.bfloat16).detach()[1:].view(rows, d)
    elif layout.startswith("row-stride-"):
        x = make_x((rows, int(layout.split("-")[-1])), torch.bfloat16).detach()[:, :d]
    else:
        x = make_x((rows, 2 * d), torch.bfloat16).detach()[:, ::2]
    check(x.requires_grad_(), make_params(d, 64, torch.bfloat16), activation="gelu", norm_position="pre",
          backend="native")


@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_non_contiguous(norm_position):
    check_non_contiguous(norm_position, "native")


@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_scale_no_residual(norm_position):
    check_scale_no_residual(BLOCK_ROWS, norm_position)


def test_row_sq_alone_reaches_the_loss():
    check_row_sq_alone("cpu", "native")


def test_empty_input():
    check_empty_input()  # the forward launches nothing; the columns pass writes zero weight gradients


@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_results_do_not_depend_on_the_thread_order(norm_position, monkeypatch):
    """The same bits for every order the simulator runs the threads in (no race across a barrier, and
    weight gradients summed in a fixed order)."""
    torch.manual_seed(8)
    x = make_x((BLOCK_ROWS, 70))
    params = make_params(70, 12)
    dout = torch.randn(BLOCK_ROWS, 70)

    def outputs():
        out, row_sq = linear_adapter(x, *params, return_row_sq=True, norm_position=norm_position, backend="native")
        grads = torch.autograd.grad((out * dout).sum() + row_sq.sum(), [x, *params])
        return [out, row_sq, *grads]

    first = outputs()
    for seed in ("1", "2"):
        monkeypatch.setenv("FA_SIM_SEED", seed)
        for a, b in zip(first, outputs()):
            assert torch.equal(a, b)


def test_only_the_needed_gradients():
    torch.manual_seed(9)
    x = make_x((BLOCK_ROWS, 40)).detach()
    params = make_params(40, 8)
    params[0].requires_grad_(False)
    params[1].requires_grad_(False)
    check(x, params, norm_position="pre", backend="native")


def test_hidden_too_large_for_shared_memory_is_a_clear_error():
    x = make_x((4, 8)).detach()
    params = [p.detach() for p in make_params(8, 750)]  # 749 is the widest (test_shapes)
    with pytest.raises(RuntimeError, match="H = 750 does not fit; use backend='triton'"):
        linear_adapter(x, *params, backend="native")
