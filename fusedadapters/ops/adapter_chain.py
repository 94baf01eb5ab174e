"""The fused adapter chain op: K adapters under the residual strategy, applied one after another.

The math is ``fusedadapters.ops.reference_multi.adapter_chain`` (the specification)::

    x_0 = x,   x_{k+1} = x_k + s_k · drop_k(adapter_k(x_k)),   out = x_K,   row_sq_k = Σ_d (x_{k+1} - x_k)²

The triton backend runs each maximal run of consecutive adapters that share activation and norm
position as one launch (a row block passes through all of them before it leaves the chip; see
``fusedadapters.ops.triton.adapter_chain``); a run of one adapter is ``ops.linear_adapter``. Adapters may
differ in H (stacked with zero padding), eps, dropout and scale. Two ``torch.library`` custom ops carry a
run:

    fusedadapters::adapter_chain_fwd(x, ln_weight, ln_bias, down_weight, up_weight, dropout_seeds?,
        scales?, dropout_p[], eps[], activation, norm_position, compute_row_sq, save_inputs, trainable[])
        -> (out, row_sq, xs, hidden, mean, rstd)
    fusedadapters::adapter_chain_bwd(grad_out, grad_row_sq?, x, xs, ln_weight, ln_bias, down_weight,
        up_weight, dropout_seeds?, scales?, hidden, mean, rstd, dropout_p[], activation, norm_position,
        need_dx, need_dln, need_dwd, need_dwu, trainable[])
        -> (dx, d_ln_weight, d_ln_bias, d_down_weight, d_up_weight)

``trainable[k]`` False (adapter k's tensors need no gradient) skips adapter k's weight-gradient work.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import reference, reference_multi
from .adapter_params import AdapterParams
from .backend import resolve_backend
from .linear_adapter import linear_adapter
from .routed_adapter import stack_adapter_params

__all__ = ["adapter_chain"]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_MAX_HIDDEN = 1024


def adapter_chain(
    x: Tensor,
    adapters: Sequence[AdapterParams],
    *,
    dropout_seeds: Optional[Sequence[Optional[Tensor]]] = None,
    scales: Optional[Sequence[Optional[Tensor]]] = None,
    return_row_sq: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, List[Tensor]]]:
    """``x`` through every adapter in turn under the residual strategy; with ``return_row_sq`` also the
    list of each adapter's ``Σ_d (s_k · drop_k(adapter_k(x_k)))²`` per row (float32, ``x.shape[:-1]``).

    ``x (..., D)``; ``adapters[k]`` holds adapter k's tensors (in ``x``'s dtype for the triton backend)
    and options; ``dropout_seeds[k]`` a one-element int64 tensor (drawn when adapter k has dropout and
    none is given), ``scales[k]`` a one-element tensor or None for 1 (no gradient on the triton backend).
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapter_chain needs at least one adapter")
    k_count = len(adapters)
    seeds = list(dropout_seeds) if dropout_seeds is not None else [None] * k_count
    scale_list = list(scales) if scales is not None else [None] * k_count
    if len(seeds) != k_count or len(scale_list) != k_count:
        raise ValueError(f"adapter_chain got {k_count} adapters, {len(seeds)} dropout_seeds and {len(scale_list)} scales")
    _check(x, adapters)
    seeds = [reference.draw_dropout_seed(x.device) if p.dropout_p > 0.0 and s is None else s for p, s in zip(adapters, seeds)]
    if resolve_backend(backend, x.device) != "triton":
        out, row_sqs = reference_multi.adapter_chain(x, adapters, dropout_seeds=seeds, scales=scale_list)
        return (out, row_sqs) if return_row_sq else out
    row_sqs: List[Tensor] = []
    position = 0
    for _, run in itertools.groupby(adapters, key=lambda p: (p.activation, p.norm_position)):
        run = list(run)
        part = slice(position, position + len(run))
        position += len(run)
        x, run_sq = _run_triton(x, run, seeds[part], scale_list[part], return_row_sq)
        row_sqs += run_sq
    return (x, row_sqs) if return_row_sq else x


def _check(x: Tensor, adapters: List[AdapterParams]) -> None:
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {tuple(x.shape)}")
    d = x.shape[-1]
    for k, p in enumerate(adapters):
        reference.check_options(p.activation, p.norm_position, p.dropout_p)
        h = p.hidden_size if p.down_weight.dim() == 2 else -1
        got = tuple(tuple(t.shape) for t in p[:4])
        if h < 1 or got != ((d,), (d,), (h, d), (d, h)):
            raise ValueError(f"adapter_chain: adapter {k} has shapes {got}; expected (D,), (D,), (H, D), (D, H) with D = {d}")


def _run_triton(
    x: Tensor, run: List[AdapterParams], seeds: List[Optional[Tensor]], scales: List[Optional[Tensor]], return_row_sq: bool
) -> Tuple[Tensor, List[Tensor]]:
    """One launch for a run of adapters sharing activation and norm position (a single adapter: linear_adapter)."""
    if len(run) == 1:
        (p,) = run
        result = linear_adapter(
            x, *p[:4], activation=p.activation, norm_position=p.norm_position, eps=p.eps, dropout_p=p.dropout_p,
            dropout_seed=seeds[0], scale=scales[0], residual=True, return_row_sq=return_row_sq, backend="triton",
        )
        return (result[0], [result[1]]) if return_row_sq else (result, [])
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the triton backend takes x in {_TRITON_DTYPES}, got {x.dtype}; use backend='reference'")
    if max(p.hidden_size for p in run) > _TRITON_MAX_HIDDEN:
        raise ValueError(f"the triton backend takes hidden sizes up to {_TRITON_MAX_HIDDEN}; use backend='reference'")
    tensors = [t for p in run for t in p[:4]]
    if any(t.device != x.device for t in tensors):
        raise TypeError(f"every adapter tensor must be on {x.device}, like x")
    trainable = [any(t.requires_grad for t in p[:4]) for p in run]
    save_inputs = torch.is_grad_enabled() and (x.requires_grad or any(trainable))
    seed_t = None
    if any(p.dropout_p > 0.0 for p in run):
        seed_t = torch.cat([s.reshape(1) if s is not None else torch.zeros(1, dtype=torch.int64, device=x.device) for s in seeds])
    scale_t = None
    if any(s is not None for s in scales):
        scale_t = torch.cat([s.detach().reshape(1).float() if s is not None else torch.ones(1, device=x.device) for s in scales])
    out, row_sq, *_ = torch.ops.fusedadapters.adapter_chain_fwd(
        x, *stack_adapter_params(run, x.dtype), seed_t, scale_t, [p.dropout_p for p in run], [float(p.eps) for p in run],
        run[0].activation, run[0].norm_position, bool(return_row_sq), bool(save_inputs), trainable,
    )
    return out, [row_sq[k].reshape(x.shape[:-1]) for k in range(len(run))] if return_row_sq else []


# ----------------------------------------------------------------------------------------------
# Custom ops of the triton backend
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedadapters::adapter_chain_fwd", mutates_args=())
def _adapter_chain_fwd(
    x: Tensor, ln_weight: Tensor, ln_bias: Tensor, down_weight: Tensor, up_weight: Tensor,
    dropout_seeds: Optional[Tensor], scales: Optional[Tensor], dropout_p: List[float], eps: List[float],
    activation: str, norm_position: str, compute_row_sq: bool, save_inputs: bool, trainable: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton forward: ``(out, row_sq, xs, hidden, mean, rstd)``, see ``adapter_chain_forward``."""
    from .triton.adapter_chain import adapter_chain_forward

    return adapter_chain_forward(
        x, ln_weight, ln_bias, down_weight, up_weight, dropout_seeds, scales, dropout_p, eps,
        activation, norm_position, compute_row_sq, save_inputs,
    )


@_adapter_chain_fwd.register_fake
def _adapter_chain_fwd_fake(
    x, ln_weight, ln_bias, down_weight, up_weight, dropout_seeds, scales, dropout_p, eps,
    activation, norm_position, compute_row_sq, save_inputs, trainable,
):
    n = x.numel() // x.shape[-1]
    k_count, h = down_weight.shape[:2]
    f32 = dict(dtype=torch.float32)
    return (
        x.new_empty(x.shape),
        x.new_empty((k_count, n) if compute_row_sq else (0,), **f32),
        x.new_empty((k_count - 1, n, x.shape[-1]) if save_inputs else (0,)),
        x.new_empty((k_count, n, h), **f32),
        x.new_empty((k_count, 2, n), **f32),
        x.new_empty((k_count, n), **f32),
    )


@torch.library.custom_op("fusedadapters::adapter_chain_bwd", mutates_args=())
def _adapter_chain_bwd(
    grad_out: Tensor, grad_row_sq: Optional[Tensor], x: Tensor, xs: Tensor, ln_weight: Tensor, ln_bias: Tensor,
    down_weight: Tensor, up_weight: Tensor, dropout_seeds: Optional[Tensor], scales: Optional[Tensor],
    hidden: Tensor, mean: Tensor, rstd: Tensor, dropout_p: List[float], activation: str, norm_position: str,
    need_dx: bool, need_dln: bool, need_dwd: bool, need_dwu: bool, trainable: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton backward, see ``adapter_chain_backward``."""
    from .triton.adapter_chain import adapter_chain_backward

    return adapter_chain_backward(
        grad_out, grad_row_sq, x, xs, ln_weight, ln_bias, down_weight, up_weight, dropout_seeds, scales,
        hidden, mean, rstd, dropout_p, activation, norm_position, need_dx, need_dln, need_dwd, need_dwu, trainable,
    )


@_adapter_chain_bwd.register_fake
def _adapter_chain_bwd_fake(
    grad_out, grad_row_sq, x, xs, ln_weight, ln_bias, down_weight, up_weight, dropout_seeds, scales,
    hidden, mean, rstd, dropout_p, activation, norm_position, need_dx, need_dln, need_dwd, need_dwu, trainable,
):
    def like(t: Tensor, needed: bool) -> Tensor:
        return t.new_empty(t.shape if needed else (0,))

    return (like(x, need_dx), like(ln_weight, need_dln), like(ln_bias, need_dln),
            like(down_weight, need_dwd), like(up_weight, need_dwu))


def _setup_context(ctx, inputs, output) -> None:
    x, ln_weight, ln_bias, down_weight, up_weight, dropout_seeds, scales, dropout_p, _eps, \
        activation, norm_position, _compute_row_sq, save_inputs, trainable = inputs
    _out, _row_sq, xs, hidden, mean, rstd = output
    if not save_inputs and any(ctx.needs_input_grad[:5]):
        raise RuntimeError("adapter_chain_fwd ran with save_inputs=False, but gradients are needed")
    ctx.save_for_backward(x, xs, ln_weight, ln_bias, down_weight, up_weight, dropout_seeds, scales, hidden, mean, rstd)
    ctx.config = (dropout_p, activation, norm_position)
    ctx.trainable = trainable
    ctx.mark_non_differentiable(xs, hidden, mean, rstd)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_row_sq, *_unused):
    x, xs, ln_weight, ln_bias, down_weight, up_weight, *rest = ctx.saved_tensors
    need_x, need_ln_w, need_ln_b, need_down, need_up = ctx.needs_input_grad[:5]
    if grad_out is None:  # only row_sq reached the loss
        grad_out = x.new_zeros(()).expand(x.shape)
    dx, d_ln_w, d_ln_b, d_down, d_up = torch.ops.fusedadapters.adapter_chain_bwd(
        grad_out, grad_row_sq, x, xs, ln_weight, ln_bias, down_weight, up_weight, *rest, *ctx.config,
        need_x, need_ln_w or need_ln_b, need_down, need_up, ctx.trainable,
    )
    grads = (dx, d_ln_w, d_ln_b, d_down, d_up)
    needed = (need_x, need_ln_w, need_ln_b, need_down, need_up)
    return (*(g if need else None for g, need in zip(grads, needed)),) + (None,) * 9


torch.library.register_autograd("fusedadapters::adapter_chain_fwd", _backward, setup_context=_setup_context)
