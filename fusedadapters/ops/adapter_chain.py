"""The adapter chain op: K adapters under the residual strategy, applied one after another.

The math is ``fusedadapters.ops.reference_multi.adapter_chain`` (the specification)::

    x_0 = x,   x_{k+1} = x_k + s_k · drop_k(adapter_k(x_k)),   out = x_K,   row_sq_k = Σ_d (x_{k+1} - x_k)²

Adapters may differ in H, eps, dropout, scale, activation and norm position. The triton backend runs
the chain one of two ways, with the same results:

* fused: one launch for the whole chain (``fusedadapters.ops.triton.adapter_chain``): each block of
  rows passes through every adapter before the next block starts, so the rows between adapters stay
  in L2 (plus one small LayerNorm fold launch per pre-norm adapter). Its backward runs the single
  adapter's backward once per adapter, in reverse.
* a loop: one call of the single-adapter fused op per adapter, autograd chaining the calls.

Both backwards ask each adapter only for the gradients its tensors need (a frozen adapter costs only
its dx). Which is faster: each adapter's weights are re-read from L2 once per row block either way,
which keeps L2 about as busy as memory in the single-adapter launch at H = 64; the fused launch also
serves the rows between adapters from L2, which the loop reads from memory, so it pays only where
L2 has room to spare: small H, few row blocks, no x_k to write for a backward
(``triton.adapter_chain.fused_chain_pays``, from ``bench/static_many_adapters.py``'s chain model; an
earlier fused chain measured about 2× the loop on an H100, bench/results/2026-11-25-nvidia-h100-80gb-hbm3/).
Reading x once for the whole chain needs the row block on chip, which takes the cluster design of
the single-read forward (CUDA, Hopper).
Other backends run the reference chain. One ``torch.library`` custom op carries the fused forward,
its autograd formula calling ``fusedadapters::linear_adapter_bwd``::

    fusedadapters::adapter_chain_fwd(x, ln_weights[], ln_biases[], down_weights[], up_weights[],
        dropout_seeds?[], scales?[], config, eps[], dropout_p[], compute_row_sq, save_inputs)
        -> (out, row_sqs[], inputs[], hiddens[], means[], rstds[], projs[])

``config`` is ``"norm_position:activation"`` per adapter, comma-separated (schemas take no lists of
strings). ``save_inputs`` keeps x_1 … x_{K-1} for the backward; without it the kernel writes ``out``
in place and ``inputs`` is empty.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import reference, reference_multi
from .adapter_params import AdapterParams
from .backend import resolve_backend
from .linear_adapter import _TRITON_MAX_HIDDEN, _check_kernel_inputs, forward_outputs_like, linear_adapter

__all__ = ["adapter_chain"]


def adapter_chain(
    x: Tensor,
    adapters: Sequence[AdapterParams],
    *,
    dropout_seeds: Optional[Sequence[Optional[Tensor]]] = None,
    scales: Optional[Sequence[Optional[Tensor]]] = None,
    return_row_sq: bool = False,
    backend: Optional[str] = None,
    fused: Optional[bool] = None,
) -> Union[Tensor, Tuple[Tensor, List[Tensor]]]:
    """``x`` through every adapter in turn under the residual strategy; with ``return_row_sq`` also the
    list of each adapter's ``Σ_d (s_k · drop_k(adapter_k(x_k)))²`` per row (float32, ``x.shape[:-1]``).

    ``x (..., D)``; ``adapters[k]`` holds adapter k's tensors (in ``x``'s dtype for the triton backend)
    and options; ``dropout_seeds[k]`` a one-element int64 tensor (drawn when adapter k has dropout and
    none is given), ``scales[k]`` a one-element tensor or None for 1 (no gradient on the triton backend).
    ``fused`` (triton backend): True runs the chain as one fused launch, False as one single-adapter
    call per adapter, None chooses (``triton.adapter_chain.fused_chain_pays``: fused where the static
    model puts it ahead: fp16/bf16 inference, the row blocks within one wave of the device, 2·H at
    most the row block's rows). The results are the same bits either way.
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
    for p, seed, scale in zip(adapters, seeds, scale_list):
        _check_kernel_inputs("triton", x, *p[:4], p.activation, p.norm_position, p.dropout_p, seed, scale)
        if p.hidden_size > _TRITON_MAX_HIDDEN:
            raise ValueError(f"the triton backend takes hidden sizes up to {_TRITON_MAX_HIDDEN}, got {p.hidden_size}; "
                             "use backend='reference'")
    tensors = [x] + [t for p in adapters for t in p[:4]]
    save_inputs = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if fused is None:
        from .triton.adapter_chain import fused_chain_pays

        fused = fused_chain_pays(x, [p.hidden_size for p in adapters], save_inputs)
    if not fused:
        return _single_adapter_loop(x, adapters, seeds, scale_list, return_row_sq)
    scale_list = [s if s is None else s.detach().reshape(1).to(x.dtype) for s in scale_list]
    out, row_sqs, *_ = torch.ops.fusedadapters.adapter_chain_fwd(
        x, *([p[i] for p in adapters] for i in range(4)), seeds, scale_list,
        ",".join(f"{p.norm_position}:{p.activation}" for p in adapters), [float(p.eps) for p in adapters],
        [float(p.dropout_p) for p in adapters], bool(return_row_sq), save_inputs,
    )
    return (out, list(row_sqs)) if return_row_sq else out


def _single_adapter_loop(x: Tensor, adapters: List[AdapterParams], seeds: List[Optional[Tensor]],
                         scales: List[Optional[Tensor]], return_row_sq: bool):
    """The chain as one call of the single-adapter fused op per adapter; autograd chains the calls."""
    row_sqs: List[Tensor] = []
    for p, seed, scale in zip(adapters, seeds, scales):
        result = linear_adapter(
            x, *p[:4], activation=p.activation, norm_position=p.norm_position, eps=p.eps, dropout_p=p.dropout_p,
            dropout_seed=seed, scale=scale, residual=True, return_row_sq=return_row_sq, backend="triton",
        )
        if return_row_sq:
            x, row_sq = result
            row_sqs.append(row_sq)
        else:
            x = result
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


# ----------------------------------------------------------------------------------------------
# The custom op of the triton backend and its autograd formula
# ----------------------------------------------------------------------------------------------


def _positions_and_activations(config: str) -> List[Tuple[str, str]]:
    """``config``'s ``"norm_position:activation"`` entries, one per adapter."""
    return [tuple(entry.split(":")) for entry in config.split(",")]


def _adapters(ln_weights, ln_biases, down_weights, up_weights, config: str, eps, dropout_p) -> List[AdapterParams]:
    options = zip(_positions_and_activations(config), eps, dropout_p)
    return [AdapterParams(*tensors, activation=act, norm_position=pos, eps=e, dropout_p=p)
            for *tensors, ((pos, act), e, p) in zip(ln_weights, ln_biases, down_weights, up_weights, options)]


@torch.library.custom_op("fusedadapters::adapter_chain_fwd", mutates_args=())
def _adapter_chain_fwd(
    x: Tensor, ln_weights: List[Tensor], ln_biases: List[Tensor], down_weights: List[Tensor],
    up_weights: List[Tensor], dropout_seeds: List[Optional[Tensor]], scales: List[Optional[Tensor]], config: str,
    eps: List[float], dropout_p: List[float], compute_row_sq: bool, save_inputs: bool,
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """Forward: ``(out, row_sqs, inputs, hiddens, means, rstds, projs)``, see ``plan_chain_forward``."""
    from .triton.adapter_chain import adapter_chain_forward

    adapters = _adapters(ln_weights, ln_biases, down_weights, up_weights, config, eps, dropout_p)
    return adapter_chain_forward(x, adapters, dropout_seeds, scales, compute_row_sq, save_inputs)


@_adapter_chain_fwd.register_fake
def _adapter_chain_fwd_fake(x, ln_weights, ln_biases, down_weights, up_weights, dropout_seeds, scales, config, eps,
                            dropout_p, compute_row_sq, save_inputs):
    per_adapter = [forward_outputs_like(x, w.shape[0], (2, w.shape[0]) if pos == "pre" else (0,), compute_row_sq)
                   for w, (pos, _) in zip(down_weights, _positions_and_activations(config))]
    outs, row_sqs, hiddens, means, rstds, projs = (list(t) for t in zip(*per_adapter))
    return outs[-1], row_sqs, outs[:-1] if save_inputs else [], hiddens, means, rstds, projs


def _setup_context(ctx, inputs, output) -> None:
    x, ln_weights, ln_biases, down_weights, up_weights, seeds, scales, config, eps, dropout_p, _, save_inputs = inputs
    _out, _row_sqs, saved_inputs, hiddens, means, rstds, projs = output
    if not save_inputs:  # nothing needed a gradient when the forward ran
        ctx.k_count = 0
        return
    k_count = len(down_weights)
    ctx.save_for_backward(x, *ln_weights, *ln_biases, *down_weights, *up_weights, *seeds, *scales,
                          *saved_inputs, *hiddens, *means, *rstds, *projs)
    ctx.k_count = k_count
    ctx.need_x = x.requires_grad
    # autograd matches the backward's return against the inputs' structure, where a list holding a None is a leaf
    ctx.no_grads = [[None] * k_count if all(t is not None for t in ts) else None for ts in (seeds, scales)]
    ctx.need = [[t.requires_grad for t in tensors] for tensors in zip(ln_weights, ln_biases, down_weights, up_weights)]
    ctx.options = [(act, pos, p) for (pos, act), p in zip(_positions_and_activations(config), dropout_p)]
    ctx.mark_non_differentiable(*saved_inputs, *hiddens, *means, *rstds, *projs)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_row_sqs, *_unused):
    k_count = ctx.k_count
    if k_count == 0:
        raise RuntimeError("adapter_chain: the forward ran without saving its inputs (no tensor needed a gradient)")
    saved = list(ctx.saved_tensors)
    x = saved[0]
    groups = [saved[1 + i * k_count: 1 + (i + 1) * k_count] for i in range(6)]
    ln_weights, ln_biases, down_weights, up_weights, seeds, scales = groups
    rest = saved[1 + 6 * k_count:]
    inputs, rest = [x] + rest[: k_count - 1], rest[k_count - 1:]
    hiddens, means, rstds, projs = (rest[i * k_count: (i + 1) * k_count] for i in range(4))
    need = ctx.need  # per adapter: γ, β, Wd, Wu
    need_x_before = [ctx.need_x]  # need_x_before[k]: x or an adapter before k needs a gradient
    for k in range(k_count - 1):
        need_x_before.append(need_x_before[-1] or any(need[k]))
    grads: List[List[Optional[Tensor]]] = [[None] * k_count for _ in range(4)]
    grad = grad_out
    for k in reversed(range(k_count)):
        if not (need_x_before[k] or any(need[k])):
            break  # neither adapter k nor anything before it needs a gradient
        activation, norm_position, dropout_p = ctx.options[k]
        grad_sq = grad_row_sqs[k] if grad_row_sqs is not None else None
        if grad is None and grad_sq is None:
            continue  # nothing from adapter k onwards reached the loss
        if grad is None:  # only row_sq reached the loss: a zero dout that occupies no memory
            grad = x.new_zeros(()).expand(x.shape)
        need_ln = need[k][0] or need[k][1]
        dx, d_ln_w, d_ln_b, d_down, d_up = torch.ops.fusedadapters.linear_adapter_bwd(
            grad, grad_sq, inputs[k], ln_weights[k], ln_biases[k], down_weights[k], up_weights[k], seeds[k],
            scales[k], hiddens[k], means[k], rstds[k], projs[k], activation, norm_position, dropout_p, True,
            need_x_before[k], need_ln, need[k][2], need[k][3], "triton",
        )
        for i, g in enumerate((d_ln_w, d_ln_b, d_down, d_up)):
            grads[i][k] = g if need[k][i] else None
        grad = dx if need_x_before[k] else None
    return (grad if ctx.need_x else None, *grads, *ctx.no_grads) + (None,) * 5


torch.library.register_autograd("fusedadapters::adapter_chain_fwd", _backward, setup_context=_setup_context)
