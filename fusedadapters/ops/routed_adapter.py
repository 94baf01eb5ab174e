"""The routed (mixed-batch) adapter op: each row picks one adapter of a stack, or none.

The math is ``fusedadapters.ops.reference_multi.routed_adapter`` (the specification). The triton backend
sorts the rows by adapter (a stable argsort of ``adapter_index``, no host synchronisation) into segments,
as Punica's SGMV does, and runs every segment in one launch: row blocks never cross a segment, and each
block reads its own adapter's weights. Backward: ``dx`` per row block; each adapter's weight gradients
from its own segment only (chunks of the segment write partials that a second kernel sums in a fixed
order: deterministic, no atomics). Two ``torch.library`` custom ops carry it:

    fusedadapters::routed_adapter_fwd(x, adapter_index, ln_weight, ln_bias, down_weight, up_weight,
        dropout_seed?, scale?, dropout_p[], activation, norm_position, eps, residual, compute_row_sq)
        -> (out, row_sq, hidden, mean, rstd, proj)
    fusedadapters::routed_adapter_bwd(grad_out, grad_row_sq?, x, adapter_index, ln_weight, ln_bias,
        down_weight, up_weight, dropout_seed?, scale?, hidden, mean, rstd, proj, dropout_p[],
        activation, norm_position, residual, need_dx, need_dln, need_dwd, need_dwu)
        -> (dx, d_ln_weight, d_ln_bias, d_down_weight, d_up_weight)

``stack_adapter_params`` builds the stacked weights from per-adapter ``AdapterParams``, once per weight
version: the stack is cached, keyed by the parameters' identity and ``_version`` (an optimizer step or
any in-place write restacks), and gradients flow back to each adapter's own parameters.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import reference, reference_multi
from .adapter_params import AdapterParams
from .backend import resolve_backend
from .linear_adapter import forward_outputs_like

__all__ = ["routed_adapter", "stack_adapter_params"]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_MAX_HIDDEN = 1024


def routed_adapter(
    x: Tensor,
    adapter_index: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    down_weight: Tensor,
    up_weight: Tensor,
    *,
    activation: str = "swish",
    norm_position: str = "pre",
    eps: float = 1e-5,
    dropout_p: Union[float, Sequence[float]] = 0.0,
    dropout_seed: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    residual: bool = True,
    return_row_sq: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Row ``n`` gets ``[x +] s_k · drop_k(adapter_k(x[n]))`` with ``k = adapter_index[n]`` (nothing added for -1).

    Shapes: ``x (..., D)``; ``adapter_index`` int64 of shape ``x.shape[:-1]`` with values in ``[-1, A)``;
    stacked weights ``ln_weight, ln_bias (A, D)``, ``down_weight (A, H, D)``, ``up_weight (A, D, H)``
    (see ``stack_adapter_params``); ``dropout_p`` one float for all adapters or one per adapter;
    ``scale`` None or ``(A,)`` (no gradient on the triton backend). With ``return_row_sq`` also
    ``Σ_d y[n, d]²`` per row (float32, shape ``x.shape[:-1]``). All adapters share ``activation``,
    ``norm_position`` and ``eps``. Values of ``adapter_index`` are not range-checked on the device
    (that would synchronise); the caller builds them.
    """
    a_count = _check_shapes(x, adapter_index, ln_weight, ln_bias, down_weight, up_weight)
    probs = _dropout_list(dropout_p, a_count)
    for p in probs:
        reference.check_options(activation, norm_position, p)
    if any(p > 0.0 for p in probs) and dropout_seed is None:
        dropout_seed = reference.draw_dropout_seed(x.device)
    if scale is not None and (scale.shape != (a_count,) or scale.device != x.device):
        raise ValueError(f"scale must have shape ({a_count},) on {x.device}, got {tuple(scale.shape)} on {scale.device}")
    name = resolve_backend(backend, x.device)
    if name == "triton":
        _check_triton_inputs(x, ln_weight, ln_bias, down_weight, up_weight)
        if scale is not None:
            scale = scale.detach().to(torch.float32)
        out, row_sq, *_ = torch.ops.fusedadapters.routed_adapter_fwd(
            x, adapter_index, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, probs,
            activation, norm_position, float(eps), bool(residual), bool(return_row_sq),
        )
    else:
        out, row_sq = reference_multi.routed_adapter(
            x, adapter_index, ln_weight, ln_bias, down_weight, up_weight,
            activation=activation, norm_position=norm_position, eps=eps,
            dropout_p=probs if any(p > 0.0 for p in probs) else (), dropout_seed=dropout_seed,
            scale=scale, residual=residual,
        )
    return (out, row_sq) if return_row_sq else out


def _dropout_list(dropout_p: Union[float, Sequence[float]], a_count: int) -> List[float]:
    probs = [float(dropout_p)] * a_count if isinstance(dropout_p, (int, float)) else [float(p) for p in dropout_p]
    if len(probs) != a_count:
        raise ValueError(f"dropout_p has {len(probs)} entries for {a_count} adapters")
    return probs


def _check_shapes(x: Tensor, index: Tensor, ln_weight: Tensor, ln_bias: Tensor, down: Tensor, up: Tensor) -> int:
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {tuple(x.shape)}")
    d = x.shape[-1]
    a, h = (down.shape[0], down.shape[1]) if down.dim() == 3 else (-1, -1)
    expected = ((a, d), (a, d), (a, h, d), (a, d, h))
    got = tuple(tuple(t.shape) for t in (ln_weight, ln_bias, down, up))
    if a < 1 or h < 1 or got != expected:
        raise ValueError(
            f"routed_adapter shapes: x {tuple(x.shape)}, ln_weight {got[0]}, ln_bias {got[1]}, down_weight "
            f"{got[2]}, up_weight {got[3]}; expected (A, D), (A, D), (A, H, D), (A, D, H) with D = {d}"
        )
    if tuple(index.shape) != tuple(x.shape[:-1]) or index.dtype != torch.int64 or index.device != x.device:
        raise ValueError(
            f"adapter_index must be int64 of shape x.shape[:-1] = {tuple(x.shape[:-1])} on {x.device}, "
            f"got {index.dtype} of shape {tuple(index.shape)} on {index.device}"
        )
    return a


def _check_triton_inputs(x: Tensor, *params: Tensor) -> None:
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the triton backend takes x in {_TRITON_DTYPES}, got {x.dtype}; use backend='reference'")
    for t in params:
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"stacked weights are {t.dtype} on {t.device}, but x is {x.dtype} on {x.device}")
    if params[2].shape[1] > _TRITON_MAX_HIDDEN:
        raise ValueError(f"the triton backend takes hidden sizes up to {_TRITON_MAX_HIDDEN}, got {params[2].shape[1]}")


# ----------------------------------------------------------------------------------------------
# Stacked weights, once per weight version
# ----------------------------------------------------------------------------------------------

_STACK_CACHE_SIZE = 32
_STACKS: "OrderedDict[tuple, tuple]" = OrderedDict()


class _StackedWeights(torch.autograd.Function):
    """Returns the (cached) stack; backward hands each adapter the slice of the stack's gradient that is its own."""

    @staticmethod
    def forward(ctx, stacked, hidden_sizes, *tensors):
        ctx.hidden_sizes = hidden_sizes
        ctx.dtypes = [t.dtype for t in tensors]
        return tuple(s.detach() for s in stacked)

    @staticmethod
    def backward(ctx, d_ln_w, d_ln_b, d_down, d_up):
        grads = []
        for k, h in enumerate(ctx.hidden_sizes):
            grads += [
                None if d_ln_w is None else d_ln_w[k],
                None if d_ln_b is None else d_ln_b[k],
                None if d_down is None else d_down[k, :h],
                None if d_up is None else d_up[k, :, :h],
            ]
        grads = [g if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (None, None, *grads)


def _stack(adapters: Sequence[AdapterParams], dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    h_max = max(p.hidden_size for p in adapters)
    a_count, d = len(adapters), adapters[0].down_weight.shape[1]
    device = adapters[0].down_weight.device
    ln_w = torch.empty((a_count, d), dtype=dtype, device=device)
    ln_b = torch.empty((a_count, d), dtype=dtype, device=device)
    down = torch.zeros((a_count, h_max, d), dtype=dtype, device=device)
    up = torch.zeros((a_count, d, h_max), dtype=dtype, device=device)
    with torch.no_grad():
        for k, p in enumerate(adapters):
            h = p.hidden_size
            ln_w[k].copy_(p.ln_weight)
            ln_b[k].copy_(p.ln_bias)
            down[k, :h].copy_(p.down_weight)
            up[k, :, :h].copy_(p.up_weight)
    return ln_w, ln_b, down, up


def stack_adapter_params(
    adapters: Sequence[AdapterParams], dtype: Optional[torch.dtype] = None, cache: Optional[dict] = None
) -> Tuple[Tensor, ...]:
    """``(ln_weight (A, D), ln_bias (A, D), down_weight (A, H, D), up_weight (A, D, H))`` in ``dtype``.

    ``H`` is the largest hidden size; smaller adapters are padded with zeros (exact, see
    ``reference_multi``). The stack is built once per weight version and reused: it is cached, keyed by
    the tensors' identity, ``_version``, dtype and device, in ``cache`` when given (a dict the caller
    owns, e.g. one per module, which keeps only its latest stack) or else in a small module-wide LRU
    cache. Autograd sends each adapter the gradient of its own slice.
    """
    if not adapters:
        raise ValueError("stack_adapter_params needs at least one adapter")
    tensors = [t for p in adapters for t in (p.ln_weight, p.ln_bias, p.down_weight, p.up_weight)]
    dtype = dtype or tensors[0].dtype
    d = adapters[0].down_weight.shape[1]
    for k, p in enumerate(adapters):
        if p.down_weight.dim() != 2 or p.down_weight.shape[1] != d or p.up_weight.shape != (d, p.hidden_size):
            raise ValueError(f"adapter {k}: down_weight {tuple(p.down_weight.shape)}, up_weight "
                             f"{tuple(p.up_weight.shape)} do not fit D = {d}")
    key = (tuple(id(t) for t in tensors), dtype, tensors[0].device)
    versions = tuple(t._version for t in tensors)
    stacks = _STACKS if cache is None else cache
    entry = stacks.get(key)
    if entry is not None and entry[1] == versions and all(r() is t for r, t in zip(entry[0], tensors)):
        stacked = entry[2]
        if cache is None:
            _STACKS.move_to_end(key)
    else:
        stacked = _stack(adapters, dtype)
        if cache is not None:
            cache.clear()
        stacks[key] = ([weakref.ref(t) for t in tensors], versions, stacked)
        while len(_STACKS) > _STACK_CACHE_SIZE:
            _STACKS.popitem(last=False)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return stacked
    return _StackedWeights.apply(stacked, [p.hidden_size for p in adapters], *tensors)


# ----------------------------------------------------------------------------------------------
# Custom ops of the triton backend
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedadapters::routed_adapter_fwd", mutates_args=())
def _routed_adapter_fwd(
    x: Tensor, adapter_index: Tensor, ln_weight: Tensor, ln_bias: Tensor, down_weight: Tensor,
    up_weight: Tensor, dropout_seed: Optional[Tensor], scale: Optional[Tensor], dropout_p: List[float],
    activation: str, norm_position: str, eps: float, residual: bool, compute_row_sq: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton forward: ``(out, row_sq, hidden, mean, rstd, proj)``, see ``routed_adapter_forward``."""
    from .triton.routed_adapter import routed_adapter_forward

    return routed_adapter_forward(
        x, adapter_index, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, dropout_p,
        activation, norm_position, eps, residual, compute_row_sq,
    )


@_routed_adapter_fwd.register_fake
def _routed_adapter_fwd_fake(
    x, adapter_index, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, dropout_p,
    activation, norm_position, eps, residual, compute_row_sq,
):
    a_count, h = down_weight.shape[:2]
    return forward_outputs_like(x, h, (a_count, 2, h) if norm_position == "pre" else (0,), compute_row_sq)


@torch.library.custom_op("fusedadapters::routed_adapter_bwd", mutates_args=())
def _routed_adapter_bwd(
    grad_out: Tensor, grad_row_sq: Optional[Tensor], x: Tensor, adapter_index: Tensor, ln_weight: Tensor,
    ln_bias: Tensor, down_weight: Tensor, up_weight: Tensor, dropout_seed: Optional[Tensor],
    scale: Optional[Tensor], hidden: Tensor, mean: Tensor, rstd: Tensor, proj: Tensor, dropout_p: List[float],
    activation: str, norm_position: str, residual: bool,
    need_dx: bool, need_dln: bool, need_dwd: bool, need_dwu: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton backward: ``(dx, d_ln_weight, d_ln_bias, d_down, d_up)``, see ``routed_adapter_backward``."""
    from .triton.routed_adapter import routed_adapter_backward

    return routed_adapter_backward(
        grad_out, grad_row_sq, x, adapter_index, ln_weight, ln_bias, down_weight, up_weight, dropout_seed,
        scale, hidden, mean, rstd, proj, dropout_p, activation, norm_position, residual,
        need_dx, need_dln, need_dwd, need_dwu,
    )


@_routed_adapter_bwd.register_fake
def _routed_adapter_bwd_fake(
    grad_out, grad_row_sq, x, adapter_index, ln_weight, ln_bias, down_weight, up_weight, dropout_seed,
    scale, hidden, mean, rstd, proj, dropout_p, activation, norm_position, residual,
    need_dx, need_dln, need_dwd, need_dwu,
):
    def like(t: Tensor, needed: bool) -> Tensor:
        return t.new_empty(t.shape if needed else (0,))

    return (
        like(x, need_dx), like(ln_weight, need_dln), like(ln_bias, need_dln),
        like(down_weight, need_dwd), like(up_weight, need_dwu),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, adapter_index, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, dropout_p, \
        activation, norm_position, _eps, residual, _compute_row_sq = inputs
    _out, _row_sq, hidden, mean, rstd, proj = output
    ctx.save_for_backward(
        x, adapter_index, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, hidden, mean, rstd, proj
    )
    ctx.config = (dropout_p, activation, norm_position, residual)
    ctx.mark_non_differentiable(hidden, mean, rstd, proj)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_row_sq, *_unused):
    x, adapter_index, ln_weight, ln_bias, down_weight, up_weight, *rest = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_ln_w, need_ln_b, need_down, need_up = ctx.needs_input_grad[2:6]
    if grad_out is None:  # only row_sq reached the loss
        grad_out = x.new_zeros(()).expand(x.shape)
    dx, d_ln_w, d_ln_b, d_down, d_up = torch.ops.fusedadapters.routed_adapter_bwd(
        grad_out, grad_row_sq, x, adapter_index, ln_weight, ln_bias, down_weight, up_weight, *rest, *ctx.config,
        need_x, need_ln_w or need_ln_b, need_down, need_up,
    )
    return (
        dx if need_x else None, None,
        d_ln_w if need_ln_w else None, d_ln_b if need_ln_b else None,
        d_down if need_down else None, d_up if need_up else None,
    ) + (None,) * 8


torch.library.register_autograd("fusedadapters::routed_adapter_fwd", _backward, setup_context=_setup_context)
