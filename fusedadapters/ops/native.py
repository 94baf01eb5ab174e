"""The ``native`` backend: the compiled kernels of ``csrc/``, loaded as the ``fusedadapters_native`` library.

``csrc/`` holds torch-free C++ kernels for CPU tensors, CUDA kernels for CUDA tensors, and one
binding file that registers them as the operators
``torch.ops.fusedadapters_native.linear_adapter_forward/backward``; the custom ops of
``fusedadapters.ops.linear_adapter`` call them (this module's ``linear_adapter_forward`` and
``linear_adapter_backward`` take the same arguments as the Triton launchers). The CUDA kernels join
the build when torch is a CUDA build and the CUDA toolkit (nvcc) is found, unless
``$FUSEDADAPTERS_NATIVE_CUDA=0``; they are compiled for ``$TORCH_CUDA_ARCH_LIST``, or else for the
GPUs that are visible.

Where the library comes from, first match wins:

1. a library built into the package ahead of time (``fusedadapters/_native*.so``, see setup.py);
2. the build cache: ``$FUSEDADAPTERS_CACHE/native/<key>/`` (default ``~/.cache/fusedadapters/native/<key>/``),
   where ``<key>`` names the torch version, CUDA version and GPU architectures (or ``cpu``), machine,
   CPU, Python version and a hash of the sources and compiler flags, so that each combination builds
   once;
3. a just-in-time build into that cache through ``torch.utils.cpp_extension`` and ninja, when the
   native backend is asked for and not built (with a progress message on stderr; seconds to a minute
   for the CPU kernels; the build with the CUDA kernels has not been timed yet). ``python -m
   fusedadapters.build`` does the same ahead of time.

The JIT build compiles for the CPU it runs on (``-march=native``; ``$FUSEDADAPTERS_NATIVE_CFLAGS``
replaces the flags). The automatic backend choice only looks for a built library, never builds one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

__all__ = [
    "CACHE_ENV_VAR",
    "CUDA_ENV_VAR",
    "NativeBuildError",
    "build",
    "cache_dir",
    "ensure_loaded",
    "is_built",
    "linear_adapter_backward",
    "linear_adapter_forward",
    "supports_device",
    "with_cuda",
]

CACHE_ENV_VAR = "FUSEDADAPTERS_CACHE"
CFLAGS_ENV_VAR = "FUSEDADAPTERS_NATIVE_CFLAGS"
LIBRARY_NAME = "fusedadapters_native"
HOW_TO_BUILD = (
    "build it with `python -m fusedadapters.build` (needs a C++17 compiler and ninja: "
    "`apt-get install g++`, `pip install ninja`), or install with "
    "`FUSEDADAPTERS_BUILD_NATIVE=1 pip install --no-build-isolation .`"
)
JIT_CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp-simd"]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
_loaded_from: Optional[Path] = None
_devices: Tuple[str, ...] = ()  # device types with kernels in the loaded library


class NativeBuildError(RuntimeError):
    """The native library is not built and cannot be built (no compiler, no ninja, a failed build); the
    message says why and what to do."""


def source_dir() -> Path:
    """``csrc/``: next to the package in a source checkout, ``fusedadapters/_csrc`` in an installed wheel."""
    installed = _PACKAGE_DIR / "_csrc"
    return installed if installed.is_dir() else _PACKAGE_DIR.parent / "csrc"


CUDA_ENV_VAR = "FUSEDADAPTERS_NATIVE_CUDA"
CUDA_CFLAGS = ["-O3", "-DFA_WITH_CUDA"]


@functools.lru_cache(maxsize=None)
def _cuda_toolkit() -> Optional[str]:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def with_cuda() -> bool:
    """Whether the build compiles the CUDA kernels: a CUDA build of torch, the CUDA toolkit found, and
    ``$FUSEDADAPTERS_NATIVE_CUDA`` not ``0``."""
    return (torch.version.cuda is not None and os.environ.get(CUDA_ENV_VAR, "1") != "0"
            and _cuda_toolkit() is not None)


def cuda_arch_tag() -> str:
    """The GPU architectures a CUDA build compiles for, as they enter the cache key."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs and torch.cuda.is_available():
        archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
    return "sm" + "_".join((archs or "all").replace(" ", ";").replace(".", "").replace("+PTX", "ptx").split(";"))


def sources() -> List[Path]:
    """The translation units of the build: the binding and the CPU kernels, and the CUDA kernels when
    ``with_cuda()``."""
    src = source_dir()
    cuda = sorted(src.glob("*.cu")) if with_cuda() else []
    return [src / "binding.cpp", src / "linear_adapter_cpu.cpp", *cuda]


@functools.lru_cache(maxsize=None)
def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(source_dir().glob("*")):
        if path.suffix in (".h", ".cpp", ".cu"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _source_hash() -> str:
    """A hash of the sources and the compiler flags: changing either builds into a new folder."""
    flags = " ".join(cflags()) + (" | " + " ".join(CUDA_CFLAGS) if with_cuda() else "")
    return hashlib.sha256((_sources_digest() + flags).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _cpu_tag() -> str:
    """The CPU the JIT build targets (it compiles with -march=native): a hash of its model and flags."""
    identity = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        identity = "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha256(identity.encode()).hexdigest()[:8]


def cache_key() -> str:
    """``torch<ver>-<cpu|cu<ver>-sm<archs>>-<machine>-<cpu hash>-py<ver>-<source hash>``."""
    return _cache_key(os.environ.get(CFLAGS_ENV_VAR, ""), os.environ.get(CUDA_ENV_VAR, ""),
                      os.environ.get("TORCH_CUDA_ARCH_LIST", ""))


@functools.lru_cache(maxsize=None)
def _cache_key(_cflags_env: str, _cuda_env: str, _arch_env: str) -> str:
    device = f"cu{torch.version.cuda}-{cuda_arch_tag()}" if with_cuda() else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    torch_version = torch.__version__.replace("+", "_")
    return f"torch{torch_version}-{device}-{platform.machine()}-{_cpu_tag()}-{python}-{_source_hash()}"


def cache_dir() -> Path:
    """Where the JIT build of this torch, CUDA, machine and source version lives."""
    root = os.environ.get(CACHE_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "fusedadapters")
    return Path(root) / "native" / cache_key()


@functools.lru_cache(maxsize=None)
def _packaged_library() -> Optional[Path]:
    found = sorted(_PACKAGE_DIR.glob("_native*.so")) + sorted(_PACKAGE_DIR.glob("_native*.pyd"))
    return found[0] if found else None


@functools.lru_cache(maxsize=None)
def _is_file(path: Path) -> bool:  # looked up once per path (build() forgets the answers)
    return path.is_file()


def _built_library() -> Optional[Path]:
    packaged = _packaged_library()
    if packaged is not None:
        return packaged
    cached = cache_dir() / f"{LIBRARY_NAME}.so"
    return cached if _is_file(cached) else None


@torch.compiler.assume_constant_result
def is_built() -> bool:
    """Whether the library is built for this torch, CUDA, CPU and source version, in the package or
    in the cache that ``$FUSEDADAPTERS_CACHE`` names, so that it loads without compiling anything
    (``torch.compile`` takes the answer as a constant of the compiled graph)."""
    return _built_library() is not None


def _check_toolchain() -> None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise NativeBuildError(f"the native backend is not built, and there is no C++ compiler ({compiler!r} is not "
                               f"on PATH) to build it; {HOW_TO_BUILD}")
    if not cpp_extension.is_ninja_available():
        raise NativeBuildError(f"the native backend is not built, and ninja is not installed to build it; {HOW_TO_BUILD}")


def cflags() -> List[str]:
    """Compiler flags of the JIT build (``$FUSEDADAPTERS_NATIVE_CFLAGS`` replaces them when set)."""
    custom = os.environ.get(CFLAGS_ENV_VAR)
    return custom.split() if custom else list(JIT_CFLAGS)


def build(verbose: bool = False) -> Path:
    """Compile the library into ``cache_dir()`` (a no-op when it is there and current) and load it.

    Raises ``NativeBuildError`` with the reason and the remedy when it cannot be built.
    """
    from torch.utils import cpp_extension

    _check_toolchain()
    if _loaded_from is not None:
        raise NativeBuildError(f"the native backend is already loaded from {_loaded_from}; build again in a "
                               "fresh process (`python -m fusedadapters.build`)")
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    _is_file.cache_clear()
    cuda = with_cuda()
    try:
        cpp_extension.load(
            name=LIBRARY_NAME,
            sources=[str(p) for p in sources()],
            extra_cflags=cflags() + (["-DFA_WITH_CUDA"] if cuda else []),
            extra_cuda_cflags=CUDA_CFLAGS if cuda else None,
            extra_include_paths=[str(source_dir())],
            build_directory=str(target),
            is_python_module=False,  # a torch library: its operators register themselves when loaded
            with_cuda=cuda,
            verbose=verbose,
        )
    except Exception as error:  # the compiler's output is in the message
        raise NativeBuildError(f"building the native backend in {target} failed: {error}") from error
    _is_file.cache_clear()
    _loaded(target / f"{LIBRARY_NAME}.so")
    return target / f"{LIBRARY_NAME}.so"


def _loaded(library: Path) -> None:
    global _loaded_from, _devices
    _loaded_from = library
    _devices = tuple(torch.ops.fusedadapters_native.devices())


def ensure_loaded() -> None:
    """Load the library, building it just in time (with a progress message) when it is not built."""
    if _loaded_from is not None:
        return
    library = _built_library()
    if library is not None:
        torch.ops.load_library(str(library))
        _loaded(library)
        return
    target = cache_dir()
    what = "CPU and CUDA kernels; it can take minutes" if with_cuda() else "CPU kernels; seconds to a minute"
    print(f"fusedadapters: building the native backend into {target} (once per torch, CUDA and "
          f"source version; {what}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    build()
    print(f"fusedadapters: native backend built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def supports_device(device: torch.device) -> Tuple[bool, str]:
    """(whether the loaded library has kernels for ``device``, why not)."""
    if device.type in _devices:
        return True, ""
    if device.type == "cuda":
        return False, (f"the native library at {_loaded_from} was built without its CUDA kernels (they need "
                       "a CUDA build of torch and the CUDA toolkit's nvcc at build time, and "
                       f"${CUDA_ENV_VAR} not 0); use backend='triton' on CUDA tensors")
    return False, f"the native backend runs on {list(_devices)} tensors, not {device.type}"


def linear_adapter_forward(x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, activation,
                           norm_position, eps, dropout_p, residual, compute_row_sq):
    """Native forward; arguments and results as ``ops.triton.linear_adapter.linear_adapter_forward``."""
    ensure_loaded()
    return tuple(torch.ops.fusedadapters_native.linear_adapter_forward(
        x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, activation, norm_position,
        eps, dropout_p, residual, compute_row_sq,
    ))


def linear_adapter_backward(grad_out, grad_row_sq, x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed,
                            scale, hidden, mean, rstd, proj, activation, norm_position, dropout_p, residual,
                            need_dx, need_dln, need_dwd, need_dwu):
    """Native backward; arguments and results as ``ops.triton.linear_adapter.linear_adapter_backward``."""
    ensure_loaded()
    return tuple(torch.ops.fusedadapters_native.linear_adapter_backward(
        grad_out, grad_row_sq, x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale,
        hidden, mean, rstd, proj, activation, norm_position, dropout_p, residual,
        need_dx, need_dln, need_dwd, need_dwu,
    ))
