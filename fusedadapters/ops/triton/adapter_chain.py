"""Triton kernel of a fused adapter chain: K adapters under the residual strategy in one launch.

Math as in ``fusedadapters.ops.reference_multi.adapter_chain``: ``x_{k+1} = x_k + s_k · drop_k(adapter_k(x_k))``.
The adapters of one launch share activation and norm position (``ops.adapter_chain`` splits a chain
where they change) and are stacked like the routed op's: ``γ, β (K, D)``, ``Wd (K, H, D)``, ``Wu (K, D, H)``
(smaller H padded with zeros, exact since act(0) = 0).

Forward (``_chain_fwd_kernel``): one program owns a block of BM rows and runs it through every adapter
in turn with the per-adapter row math of the routed kernel (``_adapter_rows_fwd``): adapter k reads
``x_k`` and writes ``x_{k+1}`` (the last one writes ``out``). The intermediates live in ``XS``: a
(K - 1, N, D) buffer that backward reads as the adapters' inputs when gradients are needed, else a
ring of two (nothing of it is read after the launch, so on a GPU its lines mostly die in L2). Each
adapter k saves its h (N, H), statistics and row_sq in slice k of the outputs, and uses its own
dropout seed, scale, dropout probability and eps.

Backward runs the adapters in reverse, each through the routed backward kernels with one adapter
(``routed_adapter_backward``): ``dx_k`` of adapter k is the upstream gradient of adapter k - 1. A
frozen adapter (``trainable[k]`` False) gets no weight-gradient work, only its dx.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreter_enabled
from . import fix_interpreter_scalar_index
from .linear_adapter import _load_scale, _row_hash
from .routed_adapter import (
    _adapter_rows_fwd,
    _blocks,
    _dot_f32,
    _dropout_tensors,
    _launch,
    _ln_projections,
    device_floats,
    routed_adapter_backward,
)

__all__ = ["adapter_chain_backward", "adapter_chain_forward"]

if triton_interpreter_enabled():
    fix_interpreter_scalar_index()


@triton.jit
def _chain_fwd_kernel(
    X, OUT, XS, ROW_SQ, HID, MEAN, RSTD, LN_W, LN_B, WD, WU, SEEDS, SCALES, DROP_P, KEEP, EPS,
    N, D, H, K, RING,
    ACT: tl.constexpr, PRE_NORM: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
    STORE_ROW_SQ: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    for k in range(K):
        k64 = tl.full((), k, tl.int64)
        if k == 0:
            src = X
        else:
            src = XS + ((k64 - 1) % RING) * N * D
        if k == K - 1:
            dst = OUT
        else:
            dst = XS + (k64 % RING) * N * D
        scale = _load_scale(SCALES + k, HAS_SCALE)
        if HAS_DROPOUT:
            dropout_p = tl.load(DROP_P + k)
            keep_scale = tl.load(KEEP + k)
            row_hash = _row_hash(SEEDS + k, rows)
        else:
            dropout_p = 0.0
            keep_scale = 1.0
            row_hash = rows
        _adapter_rows_fwd(
            src + rows[:, None] * D, 1, dst + rows[:, None] * D, rows, row_ok,
            HID + k64 * N * H, MEAN + k64 * 2 * N, RSTD + k64 * N, ROW_SQ + k64 * N,
            LN_W + k64 * D, LN_B + k64 * D, WD + k64 * H * D, WU + k64 * D * H,
            N, D, H, tl.load(EPS + k), scale, dropout_p, keep_scale, row_hash,
            ACT, PRE_NORM, HAS_DROPOUT, HAS_SCALE, True, STORE_ROW_SQ, DOT_F32, BM, BD, BH,
        )
        tl.debug_barrier()  # x_{k+1} of this row block, written by every thread, is read next


def adapter_chain_forward(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, down_weight: torch.Tensor,
    up_weight: torch.Tensor, dropout_seeds: Optional[torch.Tensor], scales: Optional[torch.Tensor],
    dropout_p: List[float], eps: List[float], activation: str, norm_position: str, compute_row_sq: bool,
    save_inputs: bool,
):
    """Launch the chain; returns ``(out, row_sq, xs, hidden, mean, rstd)``.

    ``out`` like ``x``; ``row_sq`` float32 (K, N) (or (0,)); ``xs`` the inputs of adapters 1..K-1,
    (K - 1, N, D) when ``save_inputs`` (else (0,)); ``hidden`` float32 (K, N, H), ``mean`` (K, 2, N),
    ``rstd`` (K, N). ``dropout_seeds`` is None or (K,) int64, ``scales`` None or (K,) float32.
    """
    d = x.shape[-1]
    k_count, h_size = down_weight.shape[:2]
    x2 = x.reshape(-1, d).contiguous()
    n = x2.shape[0]
    f32 = dict(device=x.device, dtype=torch.float32)
    ring = k_count - 1 if save_inputs else min(k_count - 1, 2)
    out = x.new_empty(x.shape)
    xs = x2.new_empty((max(ring, 1), n, d))
    row_sq = torch.empty((k_count, n) if compute_row_sq else (0,), **f32)
    hidden = torch.empty((k_count, n, h_size), **f32)
    mean = torch.empty((k_count, 2, n), **f32)
    rstd = torch.empty((k_count, n), **f32)
    if n > 0:
        cfg = _blocks(h_size, d)
        has_dropout, probs, keep = _dropout_tensors(dropout_p, x.device)
        _launch(
            _chain_fwd_kernel, (triton.cdiv(n, cfg.BM),),
            x2, out, xs, row_sq, hidden, mean, rstd,
            *(t.contiguous() for t in (ln_weight, ln_bias, down_weight, up_weight)),
            dropout_seeds if dropout_seeds is not None else probs, scales if scales is not None else probs,
            probs, keep, device_floats(tuple(eps), x.device), n, d, h_size, k_count, max(ring, 1),
            ACT=activation, PRE_NORM=norm_position == "pre", HAS_DROPOUT=has_dropout,
            HAS_SCALE=scales is not None, STORE_ROW_SQ=compute_row_sq, DOT_F32=_dot_f32(x.dtype),
            BM=cfg.BM, BD=cfg.BD, BH=cfg.BH, num_warps=cfg.num_warps,
        )
    return out, row_sq, xs if save_inputs else xs.new_empty((0,)), hidden, mean, rstd


def adapter_chain_backward(
    grad_out: torch.Tensor, grad_row_sq: Optional[torch.Tensor], x: torch.Tensor, xs: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, down_weight: torch.Tensor, up_weight: torch.Tensor,
    dropout_seeds: Optional[torch.Tensor], scales: Optional[torch.Tensor], hidden: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, dropout_p: List[float], activation: str, norm_position: str,
    need_dx: bool, need_dln: bool, need_dwd: bool, need_dwu: bool, trainable: List[bool],
):
    """``(dx, d_ln_weight, d_ln_bias, d_down, d_up)`` of the chain (weight gradients stacked (K, ...),
    zero for frozen adapters; empty tensors for what is not needed)."""
    d = x.shape[-1]
    k_count = down_weight.shape[0]
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    index = torch.zeros((n,), dtype=torch.int64, device=x.device)
    pre = norm_position == "pre"
    grads = {name: torch.zeros_like(t) if needed else t.new_empty((0,)) for name, t, needed in (
        ("ln_w", ln_weight, need_dln), ("ln_b", ln_bias, need_dln),
        ("down", down_weight, need_dwd), ("up", up_weight, need_dwu))}
    dout = grad_out.reshape(-1, d)
    for k in reversed(range(k_count)):
        one = slice(k, k + 1)
        weights = (ln_weight[one], ln_bias[one], down_weight[one], up_weight[one])
        x_k = x2 if k == 0 else xs[k - 1]
        step_dx = need_dx or k > 0
        train = trainable[k]
        dout, d_ln_w, d_ln_b, d_down, d_up = routed_adapter_backward(
            dout, None if grad_row_sq is None else grad_row_sq[k], x_k, index, *weights,
            None if dropout_seeds is None else dropout_seeds[one], None if scales is None else scales[one],
            hidden[k], mean[k], rstd[k], _ln_projections(*weights[:3]) if pre else hidden.new_empty((0,)),
            [dropout_p[k]], activation, norm_position, True,
            step_dx, need_dln and train, need_dwd and train, need_dwu and train,
        )
        for name, g in (("ln_w", d_ln_w), ("ln_b", d_ln_b), ("down", d_down), ("up", d_up)):
            if g.numel():
                grads[name][k] = g[0]
        if not step_dx:
            break
    dx = dout.reshape(x.shape) if need_dx else x.new_empty((0,))
    return dx, grads["ln_w"], grads["ln_b"], grads["down"], grads["up"]
