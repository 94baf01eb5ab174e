"""The fused bottleneck adapter op: one entry point, backends behind it.

See ``fusedadapters.ops.reference`` for the math (it is the specification). The triton and native
backends run as two ``torch.library`` custom ops, so that ``torch.compile`` sees them as opaque nodes
with known output shapes and CUDA graphs capture them; their last argument ``backend`` ('triton' or
'native') picks the kernels, and both backends share the one autograd formula below:

    fusedadapters::linear_adapter_fwd(x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed?,
        scale?, activation, norm_position, eps, dropout_p, residual, compute_row_sq, backend)
        -> (out, row_sq, hidden, mean, rstd, proj)
    fusedadapters::linear_adapter_bwd(grad_out, grad_row_sq?, x, ln_weight, ln_bias, down_weight,
        up_weight, dropout_seed?, scale?, hidden, mean, rstd, proj, activation, norm_position,
        dropout_p, residual, need_dx, need_dln, need_dwd, need_dwu, backend)
        -> (dx, d_ln_weight, d_ln_bias, d_down_weight, d_up_weight)

``linear_adapter_bwd`` is the autograd formula of ``linear_adapter_fwd``; gradients not asked for
come back as empty tensors. Triton itself is imported only when a kernel runs.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import reference
from .backend import resolve_backend

__all__ = ["linear_adapter"]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_MAX_HIDDEN = 1024


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
    return_row_sq: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``[x +] s · drop(adapter(x))``; with ``return_row_sq`` also ``Σ_d (s · drop(adapter(x)))²`` per row.

    Shapes: ``x (..., D)``, ``ln_weight, ln_bias (D,)``, ``down_weight (H, D)``, ``up_weight (D, H)``;
    ``dropout_seed`` a one-element int64 tensor (drawn from PyTorch's generator when dropout is on and
    none is given), ``scale`` a one-element tensor or None for 1 (it gets no gradient on the triton
    backend). ``out`` has the shape and dtype of ``x``; ``row_sq`` has shape ``x.shape[:-1]``, float32.
    The triton and native backends take float32, float16 and bfloat16 with every tensor in ``x``'s
    dtype (and Triton ``H <= 1024``, the native CUDA kernels ``H <= 749``).
    """
    _check_shapes(x, ln_weight, ln_bias, down_weight, up_weight)
    reference.check_options(activation, norm_position, dropout_p)  # one check for every backend
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = reference.draw_dropout_seed(x.device)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, ln_weight, ln_bias, down_weight, up_weight))
    name = resolve_backend(backend, x.device, dtype=x.dtype, hidden=down_weight.shape[0],
                           rows=x.numel() // max(x.shape[-1], 1), width=x.shape[-1], training=training)
    if name in ("triton", "native"):
        _check_kernel_inputs(
            name, x, ln_weight, ln_bias, down_weight, up_weight, activation, norm_position, dropout_p,
            dropout_seed, scale,
        )
        if scale is not None:
            scale = scale.detach().reshape(1).to(x.dtype)
        out, row_sq, *_ = torch.ops.fusedadapters.linear_adapter_fwd(
            x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale,
            activation, norm_position, float(eps), float(dropout_p), bool(residual), bool(return_row_sq), name,
        )
    else:
        out, row_sq = reference.linear_adapter(
            x, ln_weight, ln_bias, down_weight, up_weight,
            activation=activation, norm_position=norm_position, eps=eps, dropout_p=dropout_p,
            dropout_seed=dropout_seed, scale=scale, residual=residual,
        )
    return (out, row_sq) if return_row_sq else out


def _check_shapes(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, down_weight: Tensor, up_weight: Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {tuple(x.shape)}")
    d = x.shape[-1]
    h = down_weight.shape[0] if down_weight.dim() == 2 else -1
    expected = ((d,), (d,), (h, d), (d, h))
    got = tuple(tuple(t.shape) for t in (ln_weight, ln_bias, down_weight, up_weight))
    if h < 1 or got != expected:
        raise ValueError(
            f"linear_adapter shapes: x {tuple(x.shape)}, ln_weight {got[0]}, ln_bias {got[1]}, "
            f"down_weight {got[2]}, up_weight {got[3]}; expected ln_weight, ln_bias (D,), down_weight "
            f"(H, D) and up_weight (D, H) with D = x.shape[-1] = {d} and H >= 1"
        )


def _check_kernel_inputs(
    backend: str, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, down_weight: Tensor, up_weight: Tensor,
    activation: str, norm_position: str, dropout_p: float, dropout_seed: Optional[Tensor],
    scale: Optional[Tensor],
) -> None:
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the {backend} backend takes x in {_TRITON_DTYPES}, got {x.dtype}; use backend='reference'")
    params = {"ln_weight": ln_weight, "ln_bias": ln_bias, "down_weight": down_weight, "up_weight": up_weight}
    for name, t in params.items():
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device}, but x is {x.dtype} on {x.device}")
    if backend == "triton" and down_weight.shape[0] > _TRITON_MAX_HIDDEN:
        raise ValueError(
            f"the triton backend takes hidden sizes up to {_TRITON_MAX_HIDDEN}, got down_weight "
            f"{tuple(down_weight.shape)}; use backend='reference'"
        )
    if dropout_seed is not None and (
        dropout_seed.numel() != 1 or dropout_seed.dtype != torch.int64 or dropout_seed.device != x.device
    ):
        raise ValueError(
            f"dropout_seed must be a one-element int64 tensor on {x.device}, got shape "
            f"{tuple(dropout_seed.shape)} {dropout_seed.dtype} on {dropout_seed.device}"
        )
    if scale is not None and (scale.numel() != 1 or not scale.is_floating_point() or scale.device != x.device):
        raise ValueError(
            f"scale must be a one-element floating tensor on {x.device}, got shape {tuple(scale.shape)} "
            f"{scale.dtype} on {scale.device}"
        )


# ----------------------------------------------------------------------------------------------
# Custom ops of the triton and native backends
# ----------------------------------------------------------------------------------------------


def _kernels(backend: str):
    """The module whose ``linear_adapter_forward/backward`` launch ``backend``'s kernels."""
    if backend == "native":
        from . import native

        return native
    from .triton import linear_adapter as triton_kernels

    return triton_kernels


@torch.library.custom_op("fusedadapters::linear_adapter_fwd", mutates_args=())
def _linear_adapter_fwd(
    x: Tensor, ln_weight: Tensor, ln_bias: Tensor, down_weight: Tensor, up_weight: Tensor,
    dropout_seed: Optional[Tensor], scale: Optional[Tensor], activation: str, norm_position: str,
    eps: float, dropout_p: float, residual: bool, compute_row_sq: bool, backend: str = "triton",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward: ``(out, row_sq, hidden, mean, rstd, proj)``, see ``linear_adapter_forward``."""
    return _kernels(backend).linear_adapter_forward(
        x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale,
        activation, norm_position, eps, dropout_p, residual, compute_row_sq,
    )


@_linear_adapter_fwd.register_fake
def _linear_adapter_fwd_fake(
    x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, activation, norm_position,
    eps, dropout_p, residual, compute_row_sq, backend="triton",
):
    h = down_weight.shape[0]
    return forward_outputs_like(x, h, (2, h) if norm_position == "pre" else (0,), compute_row_sq)


def forward_outputs_like(x: Tensor, hidden: int, proj_shape: Tuple[int, ...], compute_row_sq: bool) -> Tuple[Tensor, ...]:
    """Empty tensors shaped as a fused forward's outputs ``(out, row_sq, hidden, mean, rstd, proj)``, for
    the custom ops' fake (meta) kernels; ``proj`` (the folded LayerNorm projections) is ``proj_shape``."""
    n = math.prod(x.shape[:-1])
    f32 = dict(dtype=torch.float32)
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape[:-1] if compute_row_sq else (0,), **f32),
        x.new_empty((n, hidden), **f32),
        x.new_empty((2, n), **f32),
        x.new_empty((n,), **f32),
        x.new_empty(proj_shape, **f32),
    )


@torch.library.custom_op("fusedadapters::linear_adapter_bwd", mutates_args=())
def _linear_adapter_bwd(
    grad_out: Tensor, grad_row_sq: Optional[Tensor], x: Tensor, ln_weight: Tensor, ln_bias: Tensor,
    down_weight: Tensor, up_weight: Tensor, dropout_seed: Optional[Tensor], scale: Optional[Tensor],
    hidden: Tensor, mean: Tensor, rstd: Tensor, proj: Tensor, activation: str, norm_position: str,
    dropout_p: float, residual: bool, need_dx: bool, need_dln: bool, need_dwd: bool, need_dwu: bool,
    backend: str = "triton",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(dx, d_ln_weight, d_ln_bias, d_down, d_up)``, see ``linear_adapter_backward``."""
    return _kernels(backend).linear_adapter_backward(
        grad_out, grad_row_sq, x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale,
        hidden, mean, rstd, proj, activation, norm_position, dropout_p, residual,
        need_dx, need_dln, need_dwd, need_dwu,
    )


@_linear_adapter_bwd.register_fake
def _linear_adapter_bwd_fake(
    grad_out, grad_row_sq, x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale,
    hidden, mean, rstd, proj, activation, norm_position, dropout_p, residual,
    need_dx, need_dln, need_dwd, need_dwu, backend="triton",
):
    def like(t: Tensor, needed: bool) -> Tensor:
        return t.new_empty(t.shape if needed else (0,))

    return (
        x.new_empty(x.shape if need_dx else (0,)),
        like(ln_weight, need_dln),
        like(ln_bias, need_dln),
        like(down_weight, need_dwd),
        like(up_weight, need_dwu),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, activation, norm_position, \
        _eps, dropout_p, residual, _compute_row_sq, backend = inputs
    _out, _row_sq, hidden, mean, rstd, proj = output
    ctx.save_for_backward(x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, hidden, mean, rstd, proj)
    ctx.config = (activation, norm_position, dropout_p, residual)
    ctx.backend = backend
    ctx.mark_non_differentiable(hidden, mean, rstd, proj)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_row_sq, *_unused):
    x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, hidden, mean, rstd, proj = ctx.saved_tensors
    need_x, need_ln_w, need_ln_b, need_down, need_up = ctx.needs_input_grad[:5]
    if grad_out is None:  # only row_sq reached the loss: a zero dout that occupies no memory
        grad_out = x.new_zeros(()).expand(x.shape)
    dx, d_ln_w, d_ln_b, d_down, d_up = torch.ops.fusedadapters.linear_adapter_bwd(
        grad_out, grad_row_sq, x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale,
        hidden, mean, rstd, proj, *ctx.config,
        need_x, need_ln_w or need_ln_b, need_down, need_up, ctx.backend,
    )
    grads = (dx, d_ln_w, d_ln_b, d_down, d_up)
    needed = (need_x, need_ln_w, need_ln_b, need_down, need_up)
    return (*(g if need else None for g, need in zip(grads, needed)),) + (None,) * 9


torch.library.register_autograd(
    "fusedadapters::linear_adapter_fwd", _backward, setup_context=_setup_context
)
