"""Which backend runs an op: the ``backend`` argument, else ``$FUSEDADAPTERS_BACKEND``, else automatic.

Automatic: CUDA tensors run on ``native`` where a crossover table measured on a GPU of the same
kind says it is at least as fast as Triton for the call's shape (``fusedadapters.ops.crossover``; no
table is shipped yet, so today never), else on Triton when it imports, for adapters narrower than
``TRITON_MAX_AUTO_HIDDEN`` (wider ones run on the reference, which measured faster there); CPU
tensors of float32, float16 or bfloat16 run
on ``native`` when its library is already built (see ``fusedadapters.ops.native``: automatic choice
never starts a build), anything else on the reference. A backend that cannot run the given tensors
is an error that says why, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from . import crossover, native

__all__ = ["BACKENDS", "ENV_VAR", "resolve_backend", "triton_available", "triton_interpreter_enabled"]

BACKENDS = ("reference", "triton", "native")
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The widest adapter (H) the automatic choice gives Triton on CUDA. Measured on an H100
# (bench/results/2026-11-25-nvidia-h100-80gb-hbm3/summary.md, bf16, N = 65536, D = 4096): at H = 64 the
# Triton kernels beat the reference 4.3x forward and 1.6x backward; at H = 256 the reference was faster in
# every mode (Triton 0.92x forward, 0.46x backward). H = 128 was not measured.
TRITON_MAX_AUTO_HIDDEN = 128
ENV_VAR = "FUSEDADAPTERS_BACKEND"


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec (a blocked import)
        return False


# Looked up once, at import: the answer does not change within a process, and torch.compile cannot
# trace importlib (dispatch runs inside compiled graphs).
_TRITON_FOUND = _find_triton()


def triton_available() -> bool:
    """Whether ``import triton`` can succeed (looked up without importing it, when this module loads)."""
    return _TRITON_FOUND


def triton_interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set, which makes Triton run kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _native_measured_faster(device: torch.device, dtype: torch.dtype, d: int, h: int, rows: int,
                            training: bool) -> bool:
    """The crossover table says native, and a library with CUDA kernels is built (never a build here)."""
    if not crossover.native_wins(device, dtype, d, h, rows, training) or not native.is_built():
        return False
    native.ensure_loaded()
    return native.supports_device(device)[0]


def resolve_backend(
    requested: Optional[str],
    device: torch.device,
    source: str = "the backend argument",
    dtype: Optional[torch.dtype] = None,
    hidden: Optional[int] = None,
    rows: Optional[int] = None,
    width: Optional[int] = None,
    training: bool = False,
) -> str:
    """The backend name for tensors on ``device``; ``requested`` wins over the environment.

    ``source`` says where ``requested`` came from (an argument, an attribute), for the error messages.
    ``dtype`` is the dtype of the op's input: automatic choice picks ``native`` only when it is given.
    ``hidden`` is the adapter's H, where the op has one: automatic choice on CUDA gives adapters wider
    than ``TRITON_MAX_AUTO_HIDDEN`` to the reference. ``rows`` (N), ``width`` (D) and ``training``
    (whether the call records gradients) let it consult the native crossover table on CUDA.
    """
    name = requested
    if name is None:
        name, source = os.environ.get(ENV_VAR) or "auto", f"${ENV_VAR}"
    name = name.strip().lower()
    if name == "auto":
        if device.type == "cuda":
            if None not in (rows, width, hidden, dtype) and _native_measured_faster(
                    device, dtype, width, hidden, rows, training):
                return "native"
            narrow = hidden is None or hidden <= TRITON_MAX_AUTO_HIDDEN
            return "triton" if triton_available() and narrow else "reference"
        native_fits = device.type == "cpu" and dtype in NATIVE_DTYPES
        return "native" if native_fits and native.is_built() else "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} from {source}; expected 'auto' or one of {BACKENDS}")
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{source} asks for the triton backend, but triton is not installed")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreter_enabled()):
            raise RuntimeError(
                f"{source} asks for the triton backend on {device.type} tensors: Triton runs CUDA "
                "tensors, or CPU tensors when TRITON_INTERPRET=1 is set before triton is imported"
            )
    if name == "native":
        try:
            native.ensure_loaded()
        except native.NativeBuildError as error:
            raise RuntimeError(f"{source} asks for the native backend, but {error}") from error
        supported, why_not = native.supports_device(device)
        if not supported:
            raise RuntimeError(f"{source} asks for the native backend on {device.type} tensors, but {why_not}")
    return name
