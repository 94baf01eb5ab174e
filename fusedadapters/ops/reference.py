"""Pure-PyTorch reference of the bottleneck adapter: the specification every kernel is tested against.

Notation: ``x`` is ``(..., D)`` (leading dims flatten to N rows), the hidden size is ``H``, the down
weight ``Wd`` is ``(H, D)``, the up weight ``Wu`` is ``(D, H)``, and ``gamma``/``beta`` are the
LayerNorm's ``(D,)`` weight and bias.

    pre-norm:   y = drop(act(LN(x) Wdᵀ) Wuᵀ)
    post-norm:  y = drop(LN(act(x Wdᵀ) Wuᵀ))
    out         = [x +] s · y                     (x added when ``residual``; s = ``scale`` or 1)
    row_sq[n]   = Σ_d (s · y[n, d])²              (float32; the residual strategy's ``l2_lambda`` loss)

``drop`` keeps element ``(n, d)`` where ``dropout_uniform(seed, n, d) >= p`` and scales kept
elements by ``1 / (1 - p)`` (everything is dropped when ``p >= 1``). The mask is a pure function of
``(seed, n, d)``, defined below in integer arithmetic, so that every backend draws the very same
mask and the backward pass can regenerate it instead of storing it.

Everything here runs in the dtype of its inputs on any device, and autograd differentiates it.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "NORM_POSITIONS",
    "activation_fn",
    "activation_grad",
    "check_options",
    "dropout_uniform",
    "draw_dropout_seed",
    "linear_adapter",
]

ACTIVATIONS = ("identity", "hardtanh", "relu", "selu", "swish", "silu", "gelu")
NORM_POSITIONS = ("pre", "post")

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

# Constants of the dropout hash ("lowbias32", an integer mixer with full avalanche) and the
# golden-ratio increment that spreads row indices before mixing. All arithmetic is modulo 2**32.
HASH_MUL_1 = 0x7FEB352D
HASH_MUL_2 = 0x846CA68B
ROW_STRIDE = 0x9E3779B9
_U32 = 0xFFFFFFFF


def activation_fn(name: str, h: torch.Tensor) -> torch.Tensor:
    """``act(h)`` for one of ``ACTIVATIONS`` (``gelu`` is the exact erf form, ``swish`` is SiLU)."""
    if name == "identity":
        return h
    if name == "hardtanh":
        return F.hardtanh(h)
    if name == "relu":
        return F.relu(h)
    if name == "selu":
        return F.selu(h)
    if name in ("swish", "silu"):
        return F.silu(h)
    if name == "gelu":
        return F.gelu(h)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def activation_grad(name: str, h: torch.Tensor) -> torch.Tensor:
    """``act'(h)``, with PyTorch's conventions at the kinks (0 at relu's 0 and at hardtanh's ±1)."""
    if name == "identity":
        return torch.ones_like(h)
    if name == "hardtanh":
        return ((h > -1) & (h < 1)).to(h.dtype)
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "selu":
        return torch.where(h > 0, SELU_SCALE, SELU_SCALE * SELU_ALPHA * torch.exp(h)).to(h.dtype)
    if name in ("swish", "silu"):
        sig = torch.sigmoid(h)
        return sig * (1 + h * (1 - sig))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(h / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
        return cdf + h * pdf
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def check_options(activation: str, norm_position: str, dropout_p: float = 0.0) -> None:
    """``ValueError`` unless ``activation`` is one of ``ACTIVATIONS``, ``norm_position`` one of
    ``NORM_POSITIONS`` and ``dropout_p`` in [0, 1] (the range of ``torch.nn.Dropout``, hence of the modules)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if norm_position not in NORM_POSITIONS:
        raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {norm_position!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")


def _mul_u32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for 0 <= x < 2**32 held in int64, split in 16-bit halves so nothing overflows.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _U32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul_u32(x, HASH_MUL_1)
    x = x ^ (x >> 15)
    x = _mul_u32(x, HASH_MUL_2)
    return x ^ (x >> 16)


def dropout_uniform(seed: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """The uniform numbers in [0, 1) that decide the dropout mask, as a float32 ``(n_rows, n_cols)``.

    With ``s = seed mod 2**32``, row ``n`` and column ``d`` (all uint32 arithmetic):
        r = mix32(s + n * 0x9E3779B9);  u = (mix32(r xor d) >> 8) / 2**24
    where mix32 is the "lowbias32" mixer: x ^= x>>16; x *= 0x7FEB352D; x ^= x>>15;
    x *= 0x846CA68B; x ^= x>>16. Kernels implement the same formula.
    """
    device = seed.device
    s = seed.reshape(()).to(torch.int64) & _U32
    rows = torch.arange(n_rows, device=device, dtype=torch.int64)
    cols = torch.arange(n_cols, device=device, dtype=torch.int64)
    r = _mix32((s + _mul_u32(rows & _U32, ROW_STRIDE)) & _U32)
    h = _mix32(r[:, None] ^ cols[None, :])
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed from PyTorch's generator for ``device`` (reproducible under
    ``torch.manual_seed``; drawn on the device so that CUDA-graph replays draw anew)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def linear_adapter(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    *,
    activation: str = "swish",
    norm_position: str = "pre",
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    residual: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The adapter as eager PyTorch ops; returns ``(out, row_sq)`` as defined in the module docstring.

    Shapes: ``x (..., D)``, ``ln_weight, ln_bias (D,)``, ``down_weight (H, D)``, ``up_weight (D, H)``,
    ``dropout_seed`` a one-element int64 tensor (needed when ``dropout_p > 0``), ``scale`` a
    one-element tensor or None. ``out`` has the shape and dtype of ``x``; ``row_sq`` has shape
    ``x.shape[:-1]`` and dtype float32 (float64 for float64 inputs).
    """
    check_options(activation, norm_position, dropout_p)
    d = x.shape[-1]
    if norm_position == "pre":
        h = F.linear(F.layer_norm(x, (d,), ln_weight, ln_bias, eps), down_weight)
        y = F.linear(activation_fn(activation, h), up_weight)
    else:
        u = F.linear(activation_fn(activation, F.linear(x, down_weight)), up_weight)
        y = F.layer_norm(u, (d,), ln_weight, ln_bias, eps)
    if dropout_p > 0.0:
        if dropout_seed is None:
            raise ValueError("dropout_p > 0 needs a dropout_seed (see draw_dropout_seed)")
        n_rows = y.numel() // d
        keep = dropout_uniform(dropout_seed, n_rows, d).reshape(y.shape) >= dropout_p
        keep_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
        y = y * keep.to(y.dtype) * keep_scale
    if scale is not None:
        y = y * scale.reshape(()).to(y.dtype)
    row_sq = y.to(torch.promote_types(y.dtype, torch.float32)).square().sum(dim=-1)
    out = x + y if residual else y
    return out, row_sq
