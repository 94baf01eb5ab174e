"""The native backend of ``ops.linear_adapter`` (the C++ kernels of csrc/) against the float64 reference.

The library is built once per test session from a clean cache (``python -m fusedadapters.build`` in a
subprocess, into a temporary ``$FUSEDADAPTERS_CACHE``) and loaded from there; the tests of this module
see that cache, the rest of the suite the user's. The parity helpers are those of the Triton tests.
Every .cu source and the shared math headers are compiled by nvcc for sm_80 and sm_90 with warnings
as errors, and the binding's CUDA half against torch's headers; the CUDA kernels run here on the
simulator (test_native_cuda_sim.py) and, where a GPU is present, in the ``cuda`` tests below (their
small-shape ones are those the GPU script runs under compute-sanitizer).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedadapters.ops import backend as backend_mod
from fusedadapters.ops import linear_adapter, native, reference

from .test_linear_adapter import PARAM_NAMES, check, check_non_contiguous, check_row_sq_alone, make_params, make_x, rel_err

CSRC = Path(__file__).resolve().parents[2] / "csrc"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler to build the native backend"
)
pytestmark = needs_compiler


TEST_CACHE_ENV_VAR = "FUSEDADAPTERS_TEST_NATIVE_CACHE"


@pytest.fixture(scope="session")
def native_cache(tmp_path_factory):
    """A fresh cache holding the library, built by the command line tool; returns the cache root.

    ``$FUSEDADAPTERS_TEST_NATIVE_CACHE`` names a cache to reuse instead (the GPU script sets it, so that
    its test and sanitizer runs compile the CUDA kernels once)."""
    root = Path(os.environ[TEST_CACHE_ENV_VAR]) if os.environ.get(TEST_CACHE_ENV_VAR) else \
        tmp_path_factory.mktemp("fusedadapters-cache")
    env = dict(os.environ, **{native.CACHE_ENV_VAR: str(root)})
    result = subprocess.run([sys.executable, "-m", "fusedadapters.build"], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "built " in result.stdout
    return root


@pytest.fixture(autouse=True)
def native_backend(native_cache, monkeypatch):
    """This module's tests see the fresh cache (and load the library from it, compiling nothing)."""
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(native_cache))
    assert native.is_built()
    native.ensure_loaded()




# ----------------------------------------------------------------------------------------------
# Build, cache, backend choice
# ----------------------------------------------------------------------------------------------


def test_build_lands_in_the_keyed_cache(native_cache):
    library = native.cache_dir() / f"{native.LIBRARY_NAME}.so"
    assert library.is_file() and library.is_relative_to(native_cache / "native")
    key = native.cache_key()
    assert torch.__version__.replace("+", "_") in key and ("cpu" in key or "cu" in key)


def test_automatic_choice_picks_native_on_cpu_only_when_built(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    assert backend_mod.resolve_backend(None, cpu, dtype=torch.float32) == "native"
    assert backend_mod.resolve_backend(None, cpu, dtype=torch.float64) == "reference"  # it takes no float64
    assert backend_mod.resolve_backend(None, cpu) == "reference"  # dtype unknown
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))  # an empty cache: not built there
    assert not native.is_built()
    assert backend_mod.resolve_backend(None, cpu, dtype=torch.float32) == "reference"


def test_environment_variable_forces_native(monkeypatch):
    monkeypatch.setenv(backend_mod.ENV_VAR, "native")
    assert backend_mod.resolve_backend(None, torch.device("cpu")) == "native"
    x, params = make_x((3, 8)), make_params(8, 4)
    out = linear_adapter(x, *params)
    torch.testing.assert_close(out, linear_adapter(x, *params, backend="reference"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only check: this machine has CUDA")
def test_native_on_cuda_tensors_says_why_not():
    with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
        backend_mod.resolve_backend("native", torch.device("cuda"))


def test_not_built_and_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    """Where the library is neither loaded nor built, and no compiler can build it, the error says why
    and how to build it."""
    monkeypatch.setattr(native, "_loaded_from", None)
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler") as info:
        backend_mod.resolve_backend("native", torch.device("cpu"))
    assert "python -m fusedadapters.build" in str(info.value) and "native backend" in str(info.value)


def test_no_ninja_is_a_clear_error(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(native, "_loaded_from", None)
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(native.NativeBuildError, match="ninja is not installed"):
        native.ensure_loaded()


def test_build_command_reports_failure(tmp_path):
    env = dict(os.environ, **{native.CACHE_ENV_VAR: str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")})
    result = subprocess.run([sys.executable, "-m", "fusedadapters.build"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "no C++ compiler" in result.stderr


# ----------------------------------------------------------------------------------------------
# Parity with the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_activations(norm_position, activation, dtype):
    torch.manual_seed(0)
    x = make_x((19, 37), dtype)
    check(x, make_params(37, 20, dtype), activation=activation, norm_position=norm_position, backend="native")


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_activation_kinks(activation):
    """h exactly at relu's 0 and hardtanh's ±1: post norm with one-hot rows makes h = Wd[:, d] exactly."""
    torch.manual_seed(17)
    d, h = 24, 16
    x = torch.eye(d)[torch.randint(0, d, (40,))].requires_grad_()
    params = make_params(d, h)
    kinks = torch.tensor([-1.0, 0.0, 1.0, 0.5, -2.0])
    with torch.no_grad():
        params[2].copy_(kinks[torch.randint(0, len(kinks), (h, d))])
    check(x, params, activation=activation, norm_position="post", backend="native")


def check_dropout_and_scale(shape, dtype, norm_position):
    """Parity with dropout and a scale (shared with the simulator's tests of the CUDA kernels)."""
    torch.manual_seed(1)
    x = make_x(shape, dtype)
    check(x, make_params(shape[-1], 24, dtype), activation="gelu", norm_position=norm_position, dropout_p=0.25,
          dropout_seed=torch.tensor([7]), scale=torch.tensor([0.8]), backend="native")


def check_large_mean(rows, norm_position, residual):
    """Statistics of a row whose mean is large next to its spread (x for pre norm, u for post)."""
    torch.manual_seed(2)
    pre = norm_position == "pre"
    x = make_x((rows, 100), mean=1e3 if pre else 0.0)
    params = make_params(100, 16, up_mean=0.0 if pre else 10.0)
    check(x, params, activation="relu" if pre else "swish", norm_position=norm_position, residual=residual,
          backend="native")


@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_with_dropout_and_scale(norm_position, dtype):
    check_dropout_and_scale((2, 35, 100), dtype, norm_position)


@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_large_mean(norm_position, residual):
    check_large_mean(21, norm_position, residual)


@pytest.mark.parametrize(
    "shape, hidden",
    [((1, 37), 1), ((70, 16), 16), ((2, 3, 100), 100), ((65, 1), 3), ((5, 20), 1030), ((300, 48), 8),
     ((77, 257), 33)],
    ids=["N1-H1", "N70-D16", "lead-dims", "D1", "H1030", "N300-groups", "D257-H33"],
)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_shapes(shape, hidden, norm_position):
    torch.manual_seed(3)
    eps = 1.0 if hidden == 1 and norm_position == "post" else 1e-5  # see the Triton test
    x = make_x(shape)
    check(x, make_params(shape[-1], hidden), activation="silu", norm_position=norm_position, eps=eps,
          backend="native")


@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_non_contiguous(norm_position):
    check_non_contiguous(norm_position, "native")


@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_scale_no_residual(norm_position):
    check_scale_no_residual(33, norm_position)


def check_scale_no_residual(rows, norm_position):
    """A scale and no residual (shared with the simulator's tests)."""
    torch.manual_seed(5)
    x = make_x((rows, 50))
    check(x, make_params(50, 10), activation="hardtanh", norm_position=norm_position,
          scale=torch.tensor([0.37]), residual=False, backend="native")


def test_row_sq_alone_reaches_the_loss():
    check_row_sq_alone("cpu", "native")


def test_empty_input():
    check_empty_input()


def check_empty_input():
    """No rows: empty outputs and dx, zero weight gradients (shared with the simulator's tests)."""
    x = make_x((0, 24))
    params = make_params(24, 8)
    out, row_sq = linear_adapter(x, *params, return_row_sq=True, backend="native")
    assert out.shape == (0, 24) and row_sq.shape == (0,)
    grads = torch.autograd.grad(out.sum() + row_sq.sum(), [x, *params], allow_unused=True)
    assert grads[0].shape == (0, 24)
    for p, g in zip(params, grads[1:]):
        assert g.shape == p.shape and not g.any()


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_dropout_mask_is_the_reference_mask(norm_position):
    torch.manual_seed(7)
    p = 0.4
    seed = torch.tensor([2**40 + 12345])  # only the low 32 bits count
    x = make_x((37, 45))
    params = make_params(45, 16)
    kw = dict(norm_position=norm_position, residual=False, backend="native")
    dropped = linear_adapter(x, *params, dropout_p=p, dropout_seed=seed, **kw).detach()
    full = linear_adapter(x, *params, **kw).detach()
    keep = reference.dropout_uniform(seed, 37, 45) >= p
    assert torch.equal(dropped != 0, keep)
    torch.testing.assert_close(dropped[keep], full[keep] / (1 - p))
    check(x, params, norm_position=norm_position, dropout_p=p, dropout_seed=seed, scale=torch.tensor([1.5]),
          backend="native")


def test_dropout_seed_semantics():
    torch.manual_seed(8)
    x = make_x((20, 32))
    params = make_params(32, 16)

    def run_with(seed, p=0.5):
        return linear_adapter(x, *params, dropout_p=p, dropout_seed=torch.tensor([seed]), residual=False,
                              backend="native").detach()

    assert torch.equal(run_with(11), run_with(11))
    assert not torch.equal(run_with(11), run_with(12))
    assert torch.equal(run_with(-1), run_with(2**32 - 1))  # seed mod 2**32
    assert not run_with(11, p=1.0).any()


def test_dropout_p_one_drops_everything():
    torch.manual_seed(9)
    x = make_x((10, 24))
    params = make_params(24, 8)
    out, row_sq = linear_adapter(x, *params, dropout_p=1.0, return_row_sq=True, backend="native")
    assert torch.equal(out, x) and not row_sq.any()
    grads = torch.autograd.grad(out.sum(), [x, *params])
    assert torch.equal(grads[0], torch.ones_like(x))
    assert all(not g.any() for g in grads[1:])


# ----------------------------------------------------------------------------------------------
# Gradients: determinism, frozen parameters
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_weight_grads_are_bitwise_deterministic_for_any_thread_count(norm_position):
    torch.manual_seed(11)
    x = make_x((1000, 40))  # many row blocks and row groups
    params = make_params(40, 16)

    def grads(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out, row_sq = linear_adapter(x, *params, norm_position=norm_position, dropout_p=0.1,
                                         dropout_seed=torch.tensor([5]), return_row_sq=True, backend="native")
            return torch.autograd.grad((out * out).sum() + row_sq.sum(), [x, *params])
        finally:
            torch.set_num_threads(previous)

    for a, b in zip(grads(1), grads(2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("trainable", [(), ("x",), ("up_weight",), ("ln_bias", "down_weight")], ids=str)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_only_some_inputs_need_grad(trainable, norm_position):
    torch.manual_seed(12)
    x = make_x((15, 30))
    params = make_params(30, 16)
    for name, t in zip(PARAM_NAMES, (x, *params)):
        t.requires_grad_(name in trainable)
    if not trainable:
        assert not linear_adapter(x, *params, norm_position=norm_position, backend="native").requires_grad
        return
    _, _, grads = check(x, params, norm_position=norm_position, backend="native")
    assert set(grads) == set(trainable)


# ----------------------------------------------------------------------------------------------
# torch.library registration, torch.compile, argument errors
# ----------------------------------------------------------------------------------------------


def test_custom_op_registration():
    torch.manual_seed(14)
    x = make_x((2, 5, 24))
    params = make_params(24, 8)
    seed, scale = torch.tensor([3]), torch.tensor([0.5])
    for norm_position in reference.NORM_POSITIONS:
        args = (x, *params, seed, scale, "gelu", norm_position, 1e-5, 0.2, True, True, "native")
        torch.library.opcheck(torch.ops.fusedadapters.linear_adapter_fwd.default, args)


def test_torch_compile_fullgraph():
    torch.manual_seed(15)
    x = make_x((2, 9, 24))
    params = make_params(24, 8)

    def loss(x, *params):
        y = linear_adapter(x, *params, activation="gelu", dropout_p=0.2, backend="native")
        out, row_sq = linear_adapter(y, *params, norm_position="post", return_row_sq=True, backend="native")
        return (out * out).sum() + row_sq.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.manual_seed(99)
    expected = torch.autograd.grad(loss(x, *params), [x, *params])
    torch.manual_seed(99)
    got = torch.autograd.grad(compiled(x, *params), [x, *params])
    for name, g, e in zip(PARAM_NAMES, got, expected):
        assert rel_err(g, e) < 1e-5, name


def test_bad_arguments_are_clear_errors():
    x, params = make_x((4, 8)), make_params(8, 4)
    with pytest.raises(TypeError, match="the native backend takes x in"):
        linear_adapter(x.double(), *(p.double() for p in params), backend="native")
    with pytest.raises(TypeError, match="down_weight is torch.float16"):
        linear_adapter(x, params[0], params[1], params[2].half(), params[3], backend="native")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        linear_adapter(x, *params, activation="tanh", backend="native")


def test_benchmark_times_the_native_column(native_cache, tmp_path):
    """bench_linear_adapter.py checks the native backend against the reference, then times it."""
    import json

    script = CSRC.parent / "bench" / "bench_linear_adapter.py"
    env = dict(os.environ, **{native.CACHE_ENV_VAR: str(native_cache)})
    env.pop(backend_mod.ENV_VAR, None)
    cmd = [sys.executable, str(script), "--device", "cpu", "--cpu-small", "--n", "1,33", "--backends", "eager,native",
           "--modes", "forward,backward", "--rep-ms", "5", "--no-plot", "--out", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [r for r in json.loads((tmp_path / "results.json").read_text())["rows"] if r["backend"] == "native"]
    assert len(rows) == 4 and all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows


# ----------------------------------------------------------------------------------------------
# CUDA sources, compiled without a GPU
# ----------------------------------------------------------------------------------------------

NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="needs nvcc (the CUDA toolkit)")

# Every shared function used from device code, so that nvcc compiles each of them for the GPU.
_HEADER_CHECK = r"""
#include "fa_math.h"
#include "linear_adapter.h"

__global__ void shared_math_compiles_for_the_device(const float* in, float* out, const int64_t* seed, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float h = in[i];
  float acc = 0.0f;
  for (int a = 0; a <= static_cast<int>(fa::Activation::Gelu); ++a) {
    acc += fa::activate(static_cast<fa::Activation>(a), h) + fa::activate_grad(static_cast<fa::Activation>(a), h);
  }
  const fa::DropScale ds = fa::make_drop_scale(0.1f, 0.5f);
  acc += ds.factor(fa::dropout_row_hash(*seed, i), i) + fa::exp_fast(h);
  fa::RowStats s{1.0f, h, 0.0f};
  s = fa::merge_stats(s, fa::part_stats(3, [&](int64_t k) { return in[(i + k) % n]; }));
  acc += fa::inv_std(s, 1e-5f) + fa::grad_z(h, 0.5f, acc) + fa::output_value(h, acc, true);
  acc += fa::to_float(fa::from_float<fa::Half>(acc)) + fa::to_float(fa::from_float<fa::BFloat16>(acc));
  out[i] = acc;
}
"""


def _nvcc(source: Path, arch: str, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "-c", str(source), "-o", str(tmp_path / f"{source.stem}-{arch}.o"),
           f"-I{CSRC}", "-Werror=all-warnings", "-Xptxas", "-v,-warn-spills,-warn-lmem-usage", "--extended-lambda",
           "-Xcompiler", "-Wall,-Werror"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_shared_headers_compile_for_the_gpu(arch, tmp_path):
    source = tmp_path / "shared_math_check.cu"
    source.write_text(_HEADER_CHECK)
    result = _nvcc(source, arch, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Used" in result.stderr and "spill" not in result.stderr.replace("0 bytes spill", "")


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile(source, arch, tmp_path):
    result = _nvcc(source, arch, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]


_CUDA_MACROS_STUB = "#pragma once\n"  # generated by torch's CMake build; CPU wheels ship c10/cuda without it


def test_binding_cuda_half_compiles_against_torch(tmp_path):
    """binding.cpp with FA_WITH_CUDA (the CUDA operators, guard and stream), syntax-checked against
    this torch's headers, so that a GPU machine's build does not find its mistakes first."""
    from torch.utils import cpp_extension

    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]
    if NVCC:
        candidates.append(Path(NVCC).resolve().parents[1] / "include")
    cuda_include = next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)
    if cuda_include is None:
        pytest.skip("needs the CUDA toolkit's headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text(_CUDA_MACROS_STUB)
    import sysconfig

    includes = [CSRC, tmp_path, *map(Path, cpp_extension.include_paths()), cuda_include,
                Path(sysconfig.get_paths()["include"])]
    cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-DFA_WITH_CUDA",
           *(f"-I{p}" for p in includes), str(CSRC / "binding.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


# ----------------------------------------------------------------------------------------------
# The CUDA kernels on a GPU (the same kernels run on the CPU simulator in test_native_cuda_sim.py)
# ----------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA_ROWS = [1, 16, 64, 65, 1000]  # the decode forward up to 64 rows, then the cluster forward (sm_90) or row-block


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("rows", CUDA_ROWS, ids=lambda n: f"N{n}")
def test_cuda_small_shapes(rows, norm_position, dtype):
    torch.manual_seed(20)
    x = make_x((rows, 129), dtype, "cuda")
    check(x, make_params(129, 24, dtype, "cuda"), activation="gelu", norm_position=norm_position, dropout_p=0.1,
          dropout_seed=torch.tensor([5], device="cuda"), scale=torch.tensor([0.7], device="cuda"), backend="native")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("rows", [65, 1000], ids=lambda n: f"N{n}")
def test_cuda_small_16_byte_path(rows, norm_position, dtype):
    """D a multiple of 8 and aligned rows: on sm_90 the cluster forward moves x and out in 16-byte
    chunks (D = 129 above takes the element-wise path)."""
    torch.manual_seed(24)
    x = make_x((rows, 136), dtype, "cuda")
    check(x, make_params(136, 40, dtype, "cuda"), activation="silu", norm_position=norm_position, backend="native")


@needs_cuda
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
@pytest.mark.parametrize("rows", [16, 4096], ids=lambda n: f"N{n}")
def test_cuda_model_shape_agrees_with_triton(rows, norm_position):
    torch.manual_seed(21)
    x = make_x((rows, 4096), torch.bfloat16, "cuda").detach()
    params = [p.detach() for p in make_params(4096, 64, torch.bfloat16, "cuda")]
    native_out = linear_adapter(x, *params, norm_position=norm_position, backend="native")
    triton_out = linear_adapter(x, *params, norm_position=norm_position, backend="triton")
    assert rel_err(native_out - x, triton_out.double() - x.double()) < 2e-2


@needs_cuda
@pytest.mark.parametrize("norm_position", reference.NORM_POSITIONS)
def test_cuda_small_weight_grads_are_bitwise_deterministic(norm_position):
    torch.manual_seed(22)
    x = make_x((300, 96), device="cuda")
    params = make_params(96, 16, device="cuda")
    dout = torch.randn(300, 96, device="cuda")

    def grads():
        out = linear_adapter(x, *params, norm_position=norm_position, backend="native")
        return torch.autograd.grad((out * dout).sum(), [x, *params])

    first = grads()
    for a, b in zip(first, grads()):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("rows", [8, 200], ids=lambda n: f"N{n}")
def test_cuda_small_graph_capture_and_replay(rows):
    torch.manual_seed(23)
    x = make_x((rows, 64), torch.bfloat16, "cuda").detach()
    params = [p.detach() for p in make_params(64, 16, torch.bfloat16, "cuda")]
    linear_adapter(x, *params, backend="native")  # warm up (and load) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_adapter(x, *params, backend="native")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, linear_adapter(x, *params, backend="native"))
