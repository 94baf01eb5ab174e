"""The adapter chain (K adapters under the residual strategy, one after another) as one Triton launch.

Math as in ``fusedadapters.ops.reference_multi.adapter_chain``::

    x_0 = x,   x_{k+1} = x_k + s_k · drop_k(adapter_k(x_k)),   out = x_K

``_chain_fwd_kernel`` (one program per block of rows) runs its rows through every adapter: the single
adapter's forward (``_pre_norm_fwd_block`` or ``_post_norm_fwd_block``, with that adapter's H,
activation, norm position, eps, dropout and scale) K times over the same rows, with a barrier between
adapters. Adapter k writes x_{k+1} for the block and adapter k + 1 reads it straight back, so the rows
between adapters come from L2 rather than memory: where the resident row blocks fit in L2
(``_forward_config``), x crosses HBM once on the way in and once on the way out, however long the
chain. No grid-stride loop over row blocks as in the single forward, and 8 warps: with either the
loop or 4 warps, four adapters' code spilled (compiled for sm_90). Without saved inputs (inference, or
nothing in the chain needs a gradient) every adapter writes ``out`` in place (adapter k reads element
(n, d) before it writes it, in the same program); for training, x_1 … x_{K-1} are written to their
own tensors, which the backward reads.

What it saves and what it costs: the weights are re-read from L2 once per row block, as in the loop
of single-adapter launches, and the rows between adapters now come from L2 too, so the launch is
L2-bound where the loop is HBM-bound; ``bench/static_many_adapters.py`` models both (its chain model
table), and ``fused_chain_pays`` takes the fused launch by default only where that model puts it
ahead. The host time of one chain call barely changes (``bench/host_overhead.py --chain``): the
plans and allocations are per adapter either way.

Per adapter the launch takes tuples of pointers and constexprs (one entry per adapter, unrolled), so
adapters of different H, activation and norm position share the launch, and nothing is stacked.
Pre-norm adapters fold their LayerNorm first (``plan_fold_ln``, one small launch each).

Backward: adapter by adapter in reverse, each the single adapter's backward
(``linear_adapter.plan_backward``) on its saved input, statistics and hidden activations; its dx is
the next one's dout.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..adapter_params import AdapterParams
from .linear_adapter import (
    DeviceLimits, Launch, _cdiv, _dot_f32, _dropout_args, _forward_config, _optional, _padded_hidden,
    _post_norm_fwd_block, _pre_norm_fwd_block, device_limits, plan_fold_ln,
)
from .routed_adapter import _run_or_record

__all__ = ["adapter_chain_forward", "plan_chain_forward"]


@triton.jit
def _chain_fwd_kernel(
    X, OUTS, ROW_SQS, HIDS, MEANS, RSTDS, W0, W1, W2, W3, SEEDS, SCALES,
    N, D, HS, stride_xn, stride_xd, EPS, DROP_PS, KEEPS,
    PRE: tl.constexpr, ACTS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
    STORE_ROW_SQ: tl.constexpr, DOT_F32: tl.constexpr, READS: tl.constexpr, WRITES: tl.constexpr,
    BM: tl.constexpr, BDS: tl.constexpr, BHS: tl.constexpr,
):
    """Row block pid through adapters 0 … K - 1 (tuple arguments: one entry per adapter): adapter k
    reads X (k = 0) or OUTS[k - 1] and writes OUTS[k], with the L2 policies READS[k] (its first reads)
    and WRITES[k] (its stores). Pre-norm adapter k's W0..W2 are (g b, Wg, Wu); post-norm ones' W0..W3
    are (γ, β, Wd, Wu)."""
    first = tl.program_id(0) * BM
    end = tl.minimum(first + BM, N)
    adapter = tl.full((), 0, tl.int32)
    for k in tl.static_range(len(ACTS)):
        if k == 0:
            src, sn, sd = X, stride_xn, stride_xd
        else:
            tl.debug_barrier()  # x_k of the block, stored by every thread of the program, is read back
            src, sn, sd = OUTS[k - 1], D, 1
        if PRE[k]:
            _pre_norm_fwd_block(
                adapter, first, end, src, OUTS[k], ROW_SQS[k], HIDS[k], MEANS[k], RSTDS[k], W0[k], W1[k], W2[k],
                SEEDS[k], SCALES[k], SEEDS[k], SEEDS[k], SEEDS[k], N, D, HS[k], sn, sd, EPS[k], DROP_PS[k],
                KEEPS[k], tl.constexpr(ACTS[k]), HAS_DROPOUT[k], HAS_SCALE[k], True, STORE_ROW_SQ, DOT_F32[k],
                tl.constexpr(READS[k]), tl.constexpr(WRITES[k]), False, BM, BDS[k], BHS[k])
        else:
            _post_norm_fwd_block(
                adapter, first, end, src, OUTS[k], ROW_SQS[k], HIDS[k], MEANS[k], RSTDS[k], W0[k], W1[k], W2[k],
                W3[k], SEEDS[k], SCALES[k], SEEDS[k], SEEDS[k], SEEDS[k], N, D, HS[k], sn, sd, EPS[k], DROP_PS[k],
                KEEPS[k], tl.constexpr(ACTS[k]), HAS_DROPOUT[k], HAS_SCALE[k], True, STORE_ROW_SQ, DOT_F32[k],
                tl.constexpr(READS[k]), tl.constexpr(WRITES[k]), False, BM, BDS[k], BHS[k])


def plan_chain_forward(
    x: torch.Tensor,
    adapters: Sequence[AdapterParams],
    dropout_seeds: Sequence[Optional[torch.Tensor]],
    scales: Sequence[Optional[torch.Tensor]],
    compute_row_sq: bool,
    save_inputs: bool,
    limits: DeviceLimits,
) -> Tuple[Tuple[torch.Tensor, List[torch.Tensor], ...], List[Launch]]:
    """The chain forward's outputs (allocated, not computed) and its launches.

    Outputs ``(out, row_sqs, inputs, hiddens, means, rstds, projs)``: ``out`` like ``x``; per adapter k
    ``row_sqs[k]`` float32 ``x.shape[:-1]`` (``(0,)`` without ``compute_row_sq``) and, as
    ``plan_forward`` saves them for the backward, ``hiddens[k]`` (N, H_k), ``means[k]`` (2, N),
    ``rstds[k]`` (N,), ``projs[k]`` (2, H_k) or (0,); ``inputs`` is x_1 … x_{K-1} (each like ``x``,
    contiguous) with ``save_inputs``, else empty (the adapters then write ``out`` in place).
    ``scales[k]`` is None or a one-element tensor in ``x``'s dtype."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    f32 = dict(device=x.device, dtype=torch.float32)
    out = x.new_empty(x.shape)
    inputs = [x.new_empty(x.shape) for _ in adapters[1:]] if save_inputs else []
    row_sqs = [torch.empty(x.shape[:-1] if compute_row_sq else (0,), **f32) for _ in adapters]
    hiddens = [torch.empty((n, p.hidden_size), **f32) for p in adapters]
    means = [torch.empty((2, n), **f32) for _ in adapters]
    rstds = [torch.empty((n,), **f32) for _ in adapters]
    projs = [torch.empty((2, p.hidden_size) if p.norm_position == "pre" else (0,), **f32) for p in adapters]
    outputs = (out, row_sqs, inputs, hiddens, means, rstds, projs)
    if n == 0:
        return outputs, []

    launches, weights = [], []
    for p, proj in zip(adapters, projs):
        ln_w, ln_b, down, up = (t.contiguous() for t in p[:4])
        if p.norm_position == "pre":
            folded, fold = plan_fold_ln(down, ln_w, ln_b, proj, x.dtype, limits)
            launches.append(fold)
            weights.append((proj, folded, up, proj))
        else:
            weights.append((ln_w, ln_b, down, up))
    hs = [p.hidden_size for p in adapters]
    cfg, _, first_read = _forward_config(max(hs), d, x.dtype, limits, grid_stride=False)
    blocks = _cdiv(n, cfg.BM)
    dropout = [_dropout_args(p.dropout_p) for p in adapters]
    e, k_count = x.element_size(), len(adapters)
    outs = [t.view(-1, d) for t in inputs] + [out.view(-1, d)] if save_inputs else [out.view(-1, d)] * len(adapters)
    spare = means[0]  # a pointer the kernel never reads (absent seed or scale)
    args = (
        x2, tuple(outs), tuple(row_sqs), tuple(hiddens), tuple(means), tuple(rstds),
        *(tuple(w[i] for w in weights) for i in range(4)),
        tuple(_optional(s, spare) for s in dropout_seeds), tuple(_optional(s, spare) for s in scales),
        n, d, tuple(hs), x2.stride(0), x2.stride(1), tuple(float(p.eps) for p in adapters),
        tuple(p for _, p, _ in dropout), tuple(keep for _, _, keep in dropout),
    )
    meta = dict(
        PRE=tuple(p.norm_position == "pre" for p in adapters), ACTS=tuple(p.activation for p in adapters),
        HAS_DROPOUT=tuple(has for has, _, _ in dropout), HAS_SCALE=tuple(s is not None for s in scales),
        STORE_ROW_SQ=compute_row_sq, DOT_F32=tuple(_dot_f32(x.dtype, limits, h) for h in hs),
        READS=(first_read,) + ("evict_last",) * (k_count - 1),
        WRITES=("evict_last",) * (k_count - 1) + ("evict_first",),
        BM=cfg.BM,
        BDS=tuple(_forward_config(h, d, x.dtype, limits, grid_stride=False)[0].BD for h in hs),
        BHS=tuple(_padded_hidden(h) for h in hs),
        num_warps=max(cfg.num_warps, 8), num_stages=cfg.num_stages,
    )
    side_bytes = sum(n * (4 * h + 12 + (4 if compute_row_sq else 0)) for h in hs)
    intermediate = (k_count - 1) * n * d * e  # x_1 … x_{K-1}: to memory when saved, else L2 only
    launches.append(Launch(
        f"chain{k_count}_fwd", _chain_fwd_kernel, (blocks,), args, meta,
        hbm_bytes=2 * n * d * e + side_bytes + sum(2 * h * d * e for h in hs) + (intermediate if save_inputs else 0),
        reread_bytes=(2 * k_count - 1) * n * d * e + (0 if save_inputs else intermediate),
        live_bytes_per_program=cfg.BM * d * e * (2 if save_inputs else 1),
        l2_bytes=blocks * sum((2 if p.norm_position == "pre" else 3) * h * d * e for p, h in zip(adapters, hs)),
        elements=n * d,  # each of its 2K to 3K tile loops walks N·D
    ))
    return outputs, launches


def adapter_chain_forward(x: torch.Tensor, *args: Any, limits: Optional[DeviceLimits] = None):
    """Run ``plan_chain_forward`` on its arguments (``limits``: default ``x``'s device) and return its outputs."""
    limits = limits or device_limits(x.device)
    outputs, launches = plan_chain_forward(x, *args, limits)
    _run_or_record(launches, limits)
    return outputs


def fused_chain_pays(x: torch.Tensor, hidden_sizes: Sequence[int], save_inputs: bool) -> bool:
    """Whether ``ops.adapter_chain`` runs the fused launch by default: where ``bench/static_many_adapters.py``
    models it faster than the loop of single-adapter launches (its chain model table), that is for an
    fp16/bf16 chain in inference (nothing saved for a backward) whose row blocks fit one wave of the
    device (at most one per SM: the rows between adapters stay in L2) and whose adapters re-read no
    more weights per row block than the block's own rows (2·H·D elements of Wd and Wu against BM·D:
    2·H <= BM, H = 16 at 32-row blocks). Elsewhere the model puts the loop ahead (H = 64: the fused
    launch serves from L2 what the loop reads from memory, and L2 is already busy with the weights),
    or both within about 12 % either way (H = 256, both bound by the weights' L2 re-reads), which a
    model does not settle; float32's tf32x3 tiles make four adapters' code spill."""
    if x.dtype == torch.float32 or save_inputs:
        return False
    limits = device_limits(x.device)
    cfg = _forward_config(max(hidden_sizes), x.shape[-1], x.dtype, limits, grid_stride=False)[0]
    return 2 * max(hidden_sizes) <= cfg.BM and _cdiv(x.numel() // max(1, x.shape[-1]), cfg.BM) <= limits.sm_count
