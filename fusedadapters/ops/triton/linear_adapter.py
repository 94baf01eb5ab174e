"""Fused Triton kernels of the bottleneck adapter, forward and backward, and their launch plans.

Notation as in ``fusedadapters.ops.reference``: ``x`` is N×D, ``Wd`` is H×D, ``Wu`` is D×H, ``γ, β``
the LayerNorm weight and bias (D), ``act`` the activation, ``m = keep / (1 - p)`` the dropout
multiplier (drawn from the integer hash of ``(seed, row, col)``, regenerated in backward, never
stored) and ``s`` the stochastic-depth scale. Every kernel loads in the input dtype, upcasts to
float32 at once, accumulates in float32 and casts at the store. float32 dots run as ``tf32x3``
(three tf32 products: float32 accuracy on the tensor cores); float16 and bfloat16 tiles feed the
tensor cores directly.

Forward, pre norm. LayerNorm folds into the down-projection, ``LN(x) Wdᵀ = r ((x - μ)(Wd∘γ)ᵀ) + Wd β``,
so one pass over x gives the statistics and the projection. ``_fold_ln_kernel`` computes, once per
call, ``Wg = Wd∘γ`` (H×D, input dtype), ``g = Wd γ`` and ``b = Wd β``; then ``_pre_norm_fwd_kernel``
(per block of BM rows)::

    pass 1 over D:  A = (x - c) Wgᵀ,  S1 = Σ_d (x - c),  S2 = Σ_d (x - c)²
                    (c: the row's mean over the first chunk, against cancellation in S2)
                    μ = c + S1/D,  r = 1/sqrt(S2/D - (S1/D)² + eps)
                    h = LN(x) Wdᵀ = r (A - (μ - c) g) + b,  a = act(h)
    pass 2 over D, walking D backwards (the chunks pass 1 read last are the likeliest still in L2):
                    y = a Wuᵀ,  z = s m y,  out = [x +] z,  row_sq = Σ_d z²

Forward, post norm (``_post_norm_fwd_kernel``)::

    pass 1 over D:  h = x Wdᵀ,  a = act(h)
    pass 2 over D:  u = a Wuᵀ (recomputed, H is small),  μ, r of u (shifted like above)
    pass 3 over D (backwards):  û = (u - μ) r,  y = û γ + β,  z = s m y,  out = [x +] z,  row_sq = Σ_d z²

Both save h (N×H), (c, μ - c) (2×N) and r (N) in float32; pre norm also saves (g, b) (2×H).
Both read x twice. Where one row block per SM fits in L2, the grid is one program per SM walking the
row blocks, so that the second read hits L2 (``_forward_config``); otherwise one program per row
block, whose second reads hit L2 only as far as its resident blocks fit.

Backward, given dout and the row_sq gradient q (absent unless row_sq was returned)::

    dz = dout + 2 q z,  dy = s m dz      (the residual sends dout to dx unchanged)

It runs as a rows pass (row-parallel: everything that needs a whole row) and a columns pass
(column-parallel: programs own D slices and loop over rows). The rows pass hands the columns pass
``a = act(h)`` and ``dh`` (N×H, in the dots' operand dtype) and two per-row scalars ``k1 = c1 / D``,
``k2 = c2 / D``, so that the columns pass's inner loop has no transcendental and no division.

Pre norm: ``da = dy Wu``, ``dh = da ⊙ act'(h)``. The LayerNorm's two row reductions collapse to
H-sized products, ``c1 = Σ_d dx̂ = dh·g`` and ``c2 = Σ_d dx̂ ⊙ x̂ = dh·(h - b)`` with ``dx̂ = (dh Wd)⊙γ``:

    rows pass:     dh, a, k1, k2
    columns pass:  t = dh Wd,  dx = [dout +] r (γ t - k1 - x̂ k2),
                   dWd = dhᵀ (x̂ γ + β),  dWu = dyᵀ a,  dγ = Σ_n t ⊙ x̂,  dβ = Σ_n t

Post norm: ``dû = dy γ``, ``c1 = Σ_d dû``, ``c2 = Σ_d dû ⊙ û``, ``du = r (dû - (c1 + û c2)/D)``,
``da = du Wu = r (dû Wc - c2 (û Wu)/D)`` with ``Wc = Wu - w̄`` (w̄ the mean row of Wu). Since
``μ = a·w̄``, ``û_d = r a·Wc_d``, so ``c2 = r a·(dû Wc)`` and ``û Wu = r a Gc`` with ``Gc = Wcᵀ Wc``
(H×H): folded once per backward (``_up_weight_fold_kernel``, ``_up_weight_gram_kernel``), the rows
pass needs one dot over D, as pre norm's does:

    fold:          Ws = Wu - s (s: the columns' means over the first rows), Gc, δ = w̄ - s
    rows pass:     c1, dû Wc = dû Ws - c1 δ, c2, da, dh = da ⊙ act'(h), a, k1, k2
    columns pass:  dx = [dout +] dh Wd,  dWd = dhᵀ x,  du = r (γ dy - k1 - û k2),  dWu = duᵀ a,
                   dγ = Σ_n dy ⊙ û,  dβ = Σ_n dy

The columns pass splits the rows into S groups when the D slices alone cannot fill the device;
each group writes float32 partial weight gradients, summed afterwards in a fixed order. dγ and dβ
accumulate elementwise over a BM×BD tile and reduce once after the row loop. No atomics: the
gradients are bitwise deterministic for a given shape and device.

Mixed batches (``ops.routed_adapter``: row n through adapter ``index[n]`` of a stack, or none) run the
same kernels with ``ROUTED``: a program takes its adapter and its rows from a segment table (rows
grouped by adapter, ``routed_adapter.segment_table``), gathers them through the permutation, and
offsets the weights to its adapter; rows without an adapter pass x (forward) or dout (dx) through.
The columns pass's splits become chunks of one adapter's rows, and ``_segment_sum_kernel`` adds each
adapter's chunk partials in order. ``plan_forward`` and ``plan_backward`` take a ``Routing`` for this.

Launch plans: ``plan_forward`` and ``plan_backward`` return the outputs and the list of ``Launch``es
(kernel, grid, arguments, constexprs, and the launcher's traffic model) without running anything, for
tensors on any device including ``meta``; ``bench/static_report.py`` compiles exactly these launches.
Block sizes come from ``DeviceLimits`` (SM count, shared memory per block, compute capability).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreter_enabled
from ..reference import HASH_MUL_1, HASH_MUL_2, ROW_STRIDE, SELU_ALPHA, SELU_SCALE
from . import fix_interpreter_scalar_index

__all__ = [
    "A100", "H100", "DeviceLimits", "Launch", "Routing", "device_limits", "linear_adapter_backward",
    "linear_adapter_forward", "plan_backward", "plan_forward",
]

if triton_interpreter_enabled():
    fix_interpreter_scalar_index()

_HASH_MUL_1 = tl.constexpr(HASH_MUL_1)
_HASH_MUL_2 = tl.constexpr(HASH_MUL_2)
_ROW_STRIDE = tl.constexpr(ROW_STRIDE)
_SELU_ALPHA = tl.constexpr(SELU_ALPHA)
_SELU_SCALE = tl.constexpr(SELU_SCALE)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TWO_POW_M24 = tl.constexpr(1.0 / (1 << 24))


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _act(h, ACT: tl.constexpr):
    """act(h) elementwise in float32."""
    if ACT == "identity":
        return h
    elif ACT == "hardtanh":
        return tl.minimum(tl.maximum(h, -1.0), 1.0)
    elif ACT == "relu":
        return tl.maximum(h, 0.0)
    elif ACT == "selu":
        return _SELU_SCALE * tl.where(h > 0, h, _SELU_ALPHA * (tl.exp(h) - 1.0))
    elif ACT == "gelu":
        return 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT2))
    else:  # swish / silu
        return h / (1.0 + tl.exp(-h))


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    """act'(h) elementwise in float32, 0 at relu's 0 and hardtanh's ±1 like PyTorch."""
    if ACT == "identity":
        return tl.full(h.shape, 1.0, tl.float32)
    elif ACT == "hardtanh":
        return tl.where((h > -1.0) & (h < 1.0), 1.0, 0.0)
    elif ACT == "relu":
        return tl.where(h > 0, 1.0, 0.0)
    elif ACT == "selu":
        return tl.where(h > 0, _SELU_SCALE, _SELU_SCALE * _SELU_ALPHA * tl.exp(h))
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(h * _INV_SQRT2))
        return cdf + h * _INV_SQRT_2PI * tl.exp(-0.5 * h * h)
    else:  # swish / silu
        sig = 1.0 / (1.0 + tl.exp(-h))
        return sig * (1.0 + h * (1.0 - sig))


@triton.jit
def _mix32(v):
    """The "lowbias32" integer mixer on uint32 (all products wrap modulo 2**32)."""
    v = v ^ (v >> 16)
    v = v * _HASH_MUL_1
    v = v ^ (v >> 15)
    v = v * _HASH_MUL_2
    return v ^ (v >> 16)


@triton.jit
def _row_hash(SEED, rows):
    """Per-row half of the dropout hash: mix32(seed + row · 0x9E3779B9), as uint32."""
    seed = tl.load(SEED).to(tl.uint32)
    return _mix32(seed + rows.to(tl.uint32) * _ROW_STRIDE)


@triton.jit
def _drop_scale(v, row_hash, cols, scale, dropout_p, keep_scale,
                HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """s · m ⊙ v for a BM×BD tile: the mask keeps (n, d) where (mix32(row_hash[n] ^ d) >> 8) / 2²⁴ >= p."""
    if HAS_DROPOUT:
        bits = _mix32(row_hash[:, None] ^ cols.to(tl.uint32)[None, :])
        uniform = (bits >> 8).to(tl.float32) * _TWO_POW_M24
        v = tl.where(uniform >= dropout_p, v * keep_scale, 0.0)
    if HAS_SCALE:
        v = v * scale
    return v


@triton.jit
def _dy(dout, y, grad_sq, row_hash, cols, scale, dropout_p, keep_scale,
        HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ROW_SQ_GRAD: tl.constexpr):
    """dy = s m (dout + 2 q z) with z = s m y (y is only read with HAS_ROW_SQ_GRAD)."""
    dz = dout
    if HAS_ROW_SQ_GRAD:
        z = _drop_scale(y, row_hash, cols, scale, dropout_p, keep_scale, HAS_DROPOUT, HAS_SCALE)
        dz = dz + 2.0 * grad_sq[:, None] * z
    return _drop_scale(dz, row_hash, cols, scale, dropout_p, keep_scale, HAS_DROPOUT, HAS_SCALE)


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """a @ b with float32 accumulation: DOT_DTYPE (fp16/bf16) operands (DOT_F32 = 0), or float32
    operands as tf32x3 (1) or in full float32 (2, no tensor cores; see ``_dot_f32``)."""
    if DOT_F32 == 0:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))
    elif DOT_F32 == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _load_scale(SCALE, HAS_SCALE: tl.constexpr):
    if HAS_SCALE:
        return tl.load(SCALE).to(tl.float32)
    else:
        return 1.0


@triton.jit
def _store_stats(MEAN, RSTD, rows, row_ok, N, shift, mean_c, rstd):
    """Row statistics: MEAN (2, N) holds the shift c and μ - c, so that x - μ = (x - c) - (μ - c)
    keeps its precision when |μ| is large next to the spread; RSTD (N,) holds r."""
    tl.store(MEAN + rows, shift, mask=row_ok)
    tl.store(MEAN + N + rows, mean_c, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _load_stats(MEAN, RSTD, rows, row_ok, N):
    """(c, μ - c, r) per row, zeros where masked (see ``_store_stats``)."""
    shift = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    mean_c = tl.load(MEAN + N + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    return shift, mean_c, rstd


@triton.jit
def _residual_chunk(x_rows, cols, row_ok, D, stride_xd):
    """The BM×BD chunk of x at ``cols`` (zeros outside 0 <= cols < D), as stored. The pre-norm output pass
    reads it one chunk ahead: Triton's pipeliner leaves the load (no dot takes it) synchronous. (The
    post-norm output pass keeps the synchronous load: held there, the chunk spills at H = 16.)"""
    return tl.load(x_rows + cols[None, :] * stride_xd, mask=row_ok[:, None] & ((cols >= 0) & (cols < D))[None, :],
                   other=0.0, eviction_policy="evict_first")


@triton.jit
def _normalize(v, shift, mean_c, rstd, mask):
    """((v - c) - (μ - c)) r on a BM×BD tile, 0 outside mask."""
    return tl.where(mask, ((v - shift[:, None]) - mean_c[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _load_rows(PTR, rows, row_ok, HAS: tl.constexpr, stride):
    """A float32 per-row vector (0 where masked or absent)."""
    if HAS:
        return tl.load(PTR + rows.to(tl.int64) * stride, mask=row_ok, other=0.0).to(tl.float32)
    else:
        return tl.zeros(rows.shape, tl.float32)


# ----------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _program_rows(TABLE, pid, N, rows_per_program, ROUTED: tl.constexpr):
    """(adapter, first, end) of program ``pid``: it owns positions first .. end - 1. Unrouted, the rows
    themselves from pid·rows_per_program, adapter 0; routed, entry ``pid`` of a segment table (int32
    rows of (adapter, first, end), ``routed_adapter.segment_table``), adapter -1 for rows without one."""
    if ROUTED:
        return tl.load(TABLE + pid * 3), tl.load(TABLE + pid * 3 + 1), tl.load(TABLE + pid * 3 + 2)
    else:
        first = pid * rows_per_program
        return tl.full((), 0, tl.int32), first, tl.minimum(first + rows_per_program, N)


@triton.jit
def _gather_rows(PERM, pos, end, ROUTED: tl.constexpr):
    """(rows, row_ok) at positions ``pos`` before ``end``: routed, the rows PERM[pos] (grouped by
    adapter, gathered in place); unrouted, the positions themselves."""
    row_ok = pos < end
    if ROUTED:
        return tl.load(PERM + pos, mask=row_ok, other=0), row_ok
    else:
        return pos, row_ok


@triton.jit
def _adapter_scalars(SCALE, DROP_P, KEEP, adapter, dropout_p, keep_scale, HAS_SCALE: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, ROUTED: tl.constexpr):
    """(s, p, 1 / (1 - p)) of this adapter: its stochastic-depth scale (SCALE holds one per adapter), and
    routed, its dropout from the per-adapter DROP_P and KEEP; unrouted, the arguments."""
    scale = _load_scale(SCALE + adapter, HAS_SCALE)
    if ROUTED and HAS_DROPOUT:
        return scale, tl.load(DROP_P + adapter), tl.load(KEEP + adapter)
    else:
        return scale, dropout_p, keep_scale


@triton.jit
def _fold_ln_kernel(WD, LN_W, LN_B, WG, PROJ, D, H, BR: tl.constexpr, BD: tl.constexpr):
    """``Wg = Wd∘γ`` (stored in WG's dtype), ``g = Wd γ`` and ``b = Wd β`` (PROJ, float32 2×H), for BR
    rows of Wd per program; adapter ``program_id(1)`` of stacked ones (Wd A×H×D, γ and β A×D, Wg A×H×D,
    PROJ A×2×H)."""
    adapter = tl.program_id(1).to(tl.int64)
    WD += adapter * H * D
    WG += adapter * H * D
    LN_W += adapter * D
    LN_B += adapter * D
    PROJ += adapter * 2 * H
    hrows = tl.program_id(0) * BR + tl.arange(0, BR)
    h_ok = hrows < H
    g = tl.zeros((BR,), tl.float32)
    b = tl.zeros((BR,), tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        d_ok = cols < D
        mask = h_ok[:, None] & d_ok[None, :]
        offs = hrows.to(tl.int64)[:, None] * D + cols[None, :]
        wd = tl.load(WD + offs, mask=mask, other=0.0).to(tl.float32)
        gamma = tl.load(LN_W + cols, mask=d_ok, other=0.0).to(tl.float32)
        beta = tl.load(LN_B + cols, mask=d_ok, other=0.0).to(tl.float32)
        wg = wd * gamma[None, :]
        tl.store(WG + offs, wg, mask=mask)
        g += tl.sum(wg, 1)
        b += tl.sum(wd * beta[None, :], 1)
    tl.store(PROJ + hrows, g, mask=h_ok)
    tl.store(PROJ + H + hrows, b, mask=h_ok)


@triton.jit
def _pre_norm_fwd_block(
    adapter, first, end, X, OUT, ROW_SQ, HID, MEAN, RSTD, PROJ, WG, WU, SEED, SCALE, PERM, DROP_P, KEEP,
    N, D, H, stride_xn, stride_xd, eps, dropout_p, keep_scale,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, RESIDUAL: tl.constexpr,
    STORE_ROW_SQ: tl.constexpr, DOT_F32: tl.constexpr, FIRST_READ: tl.constexpr, OUT_POLICY: tl.constexpr,
    ROUTED: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
):
    """The pre-norm forward of the rows at positions first .. end - 1 (``_program_rows``) through
    ``adapter``; x's first reads carry the L2 policy ``FIRST_READ``, its second read is marked evict-first
    (last use), the stores of out carry ``OUT_POLICY`` (evict-first, or evict-last in a chain, where the
    next adapter reads them)."""
    rows, row_ok = _gather_rows(PERM, first + tl.arange(0, BM), end, ROUTED)
    a64 = adapter.to(tl.int64)
    PROJ += a64 * 2 * H
    WG += a64 * H * D
    WU += a64 * D * H
    hcols = tl.arange(0, BH)
    h_ok = hcols < H
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xn
    out_rows = OUT + rows.to(tl.int64)[:, None] * D
    dot_dtype = X.dtype.element_ty

    # Shift: each row's mean over the first chunk.
    cols = tl.arange(0, BD)
    first = row_ok[:, None] & (cols < D)[None, :]
    shift = tl.sum(tl.load(x_rows + cols[None, :] * stride_xd, mask=first, other=0.0,
                           eviction_policy=FIRST_READ).to(tl.float32), 1)
    shift = shift / tl.sum((cols < D).to(tl.float32), 0)

    # Pass 1: A = (x - c) Wgᵀ and the shifted moments.
    acc = tl.zeros((BM, BH), tl.float32)
    s1 = tl.zeros((BM,), tl.float32)
    s2 = tl.zeros((BM,), tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        d_ok = cols < D
        mask = row_ok[:, None] & d_ok[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0,
                    eviction_policy=FIRST_READ).to(tl.float32)
        wg_t = tl.load(WG + hcols[None, :] * D + cols[:, None],  # (BD, BH) = Wg[:, cols]ᵀ
                       mask=d_ok[:, None] & h_ok[None, :], other=0.0)
        xc = tl.where(mask, x - shift[:, None], 0.0)
        s1 += tl.sum(xc, 1)
        s2 += tl.sum(xc * xc, 1)
        acc += _dot(xc, wg_t, DOT_F32, dot_dtype)
    mean_c = s1 / D
    var = tl.maximum(s2 / D - mean_c * mean_c, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    g = tl.load(PROJ + hcols, mask=h_ok, other=0.0)
    b = tl.load(PROJ + H + hcols, mask=h_ok, other=0.0)
    h = rstd[:, None] * (acc - mean_c[:, None] * g[None, :]) + b[None, :]
    tl.store(HID + rows.to(tl.int64)[:, None] * H + hcols[None, :], h, mask=row_ok[:, None] & h_ok[None, :])
    _store_stats(MEAN, RSTD, rows, row_ok, N, shift, mean_c, rstd)
    a = _act(h, ACT)

    # Pass 2, D backwards: out = [x +] s m (a Wuᵀ); the residual is read one chunk ahead.
    scale, dropout_p, keep_scale = _adapter_scalars(SCALE, DROP_P, KEEP, adapter, dropout_p, keep_scale,
                                                    HAS_SCALE, HAS_DROPOUT, ROUTED)
    row_hash = _row_hash(SEED, rows) if HAS_DROPOUT else rows
    sq = tl.zeros((BM,), tl.float32)
    n_chunks = tl.cdiv(D, BD)
    if RESIDUAL:
        nxt_x = _residual_chunk(x_rows, (n_chunks - 1) * BD + tl.arange(0, BD), row_ok, D, stride_xd)
    for i in range(0, n_chunks):
        cols = (n_chunks - 1 - i) * BD + tl.arange(0, BD)
        d_ok = cols < D
        mask = row_ok[:, None] & d_ok[None, :]
        if RESIDUAL:
            x = nxt_x
            nxt_x = _residual_chunk(x_rows, cols - BD, row_ok, D, stride_xd)
        wu_t = tl.load(WU + cols[None, :] * H + hcols[:, None],  # (BH, BD) = Wu[cols, :]ᵀ
                       mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        z = _drop_scale(_dot(a, wu_t, DOT_F32, dot_dtype), row_hash, cols, scale, dropout_p,
                        keep_scale, HAS_DROPOUT, HAS_SCALE)
        if STORE_ROW_SQ:
            sq += tl.sum(z * z, 1)
        if RESIDUAL:
            z += x.to(tl.float32)
        tl.store(out_rows + cols[None, :], z, mask=mask, eviction_policy=OUT_POLICY)
    if STORE_ROW_SQ:
        tl.store(ROW_SQ + rows, sq, mask=row_ok)


@triton.jit
def _pre_norm_fwd_kernel(
    X, OUT, ROW_SQ, HID, MEAN, RSTD, PROJ, WG, WU, SEED, SCALE, PERM, TABLE, DROP_P, KEEP,
    N, D, H, stride_xn, stride_xd, eps, dropout_p, keep_scale,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, RESIDUAL: tl.constexpr,
    STORE_ROW_SQ: tl.constexpr, DOT_F32: tl.constexpr, FIRST_READ: tl.constexpr, GRID_STRIDE: tl.constexpr,
    ROUTED: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
):
    """Row block pid, or with GRID_STRIDE row blocks pid, pid + P, ... of a grid of P programs (see
    ``_forward_config``; the loop costs registers, so a grid of one program per row block goes without).
    ROUTED: entry pid of the segment table (``_program_rows``; rows without an adapter pass through)."""
    if GRID_STRIDE:
        for blk in range(tl.program_id(0), tl.cdiv(N, BM), tl.num_programs(0)):
            adapter, first, end = _program_rows(TABLE, blk, N, BM, False)
            _pre_norm_fwd_block(adapter, first, end, X, OUT, ROW_SQ, HID, MEAN, RSTD, PROJ, WG, WU, SEED, SCALE,
                                PERM, DROP_P, KEEP, N, D, H, stride_xn, stride_xd, eps, dropout_p, keep_scale, ACT,
                                HAS_DROPOUT, HAS_SCALE, RESIDUAL, STORE_ROW_SQ, DOT_F32, FIRST_READ, "evict_first",
                                False, BM, BD, BH)
    else:
        adapter, first, end = _program_rows(TABLE, tl.program_id(0), N, BM, ROUTED)
        if adapter >= 0:
            _pre_norm_fwd_block(adapter, first, end, X, OUT, ROW_SQ, HID, MEAN, RSTD, PROJ, WG, WU, SEED, SCALE,
                                PERM, DROP_P, KEEP, N, D, H, stride_xn, stride_xd, eps, dropout_p, keep_scale, ACT,
                                HAS_DROPOUT, HAS_SCALE, RESIDUAL, STORE_ROW_SQ, DOT_F32, FIRST_READ, "evict_first",
                                ROUTED, BM, BD, BH)
        elif ROUTED:
            _pass_rows_fwd(X, OUT, ROW_SQ, PERM, first, end, D, stride_xn, stride_xd, RESIDUAL, STORE_ROW_SQ, BM, BD)


@triton.jit
def _pass_rows_fwd(X, OUT, ROW_SQ, PERM, first, end, D, stride_xn, stride_xd, RESIDUAL: tl.constexpr,
                   STORE_ROW_SQ: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """Routed rows without an adapter, positions first .. end - 1: out = x (residual) or 0, row_sq = 0."""
    rows, row_ok = _gather_rows(PERM, first + tl.arange(0, BM), end, True)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        mask = row_ok[:, None] & (cols < D)[None, :]
        z = tl.zeros((BM, BD), tl.float32)
        if RESIDUAL:
            z += tl.load(X + rows.to(tl.int64)[:, None] * stride_xn + cols[None, :] * stride_xd, mask=mask,
                         other=0.0).to(tl.float32)
        tl.store(OUT + rows.to(tl.int64)[:, None] * D + cols[None, :], z, mask=mask)
    if STORE_ROW_SQ:
        tl.store(ROW_SQ + rows, tl.zeros((BM,), tl.float32), mask=row_ok)


@triton.jit
def _up_projection_stats(a, WU, hcols, h_ok, D, H, eps, DOT_F32: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         BM: tl.constexpr, BD: tl.constexpr):
    """Post norm's row statistics (c, μ - c, r) of u = a Wuᵀ, recomputed chunk by chunk and shifted by
    each row's mean over the first chunk; ``WU`` is one adapter's (D, H) up weight."""
    cols = tl.arange(0, BD)
    wu_t = tl.load(WU + cols[None, :] * H + hcols[:, None], mask=h_ok[:, None] & (cols < D)[None, :], other=0.0)
    shift = tl.sum(_dot(a, wu_t, DOT_F32, DOT_DTYPE), 1) / tl.sum((cols < D).to(tl.float32), 0)
    s1 = tl.zeros((BM,), tl.float32)
    s2 = tl.zeros((BM,), tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        d_ok = cols < D
        wu_t = tl.load(WU + cols[None, :] * H + hcols[:, None], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        uc = tl.where(d_ok[None, :], _dot(a, wu_t, DOT_F32, DOT_DTYPE) - shift[:, None], 0.0)
        s1 += tl.sum(uc, 1)
        s2 += tl.sum(uc * uc, 1)
    mean_c = s1 / D
    rstd = 1.0 / tl.sqrt(tl.maximum(s2 / D - mean_c * mean_c, 0.0) + eps)
    return shift, mean_c, rstd


@triton.jit
def _post_norm_fwd_block(
    adapter, first, end, X, OUT, ROW_SQ, HID, MEAN, RSTD, LN_W, LN_B, WD, WU, SEED, SCALE, PERM, DROP_P, KEEP,
    N, D, H, stride_xn, stride_xd, eps, dropout_p, keep_scale,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, RESIDUAL: tl.constexpr,
    STORE_ROW_SQ: tl.constexpr, DOT_F32: tl.constexpr, FIRST_READ: tl.constexpr, OUT_POLICY: tl.constexpr,
    ROUTED: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
):
    """The post-norm forward of the rows at positions first .. end - 1 through ``adapter``, with the L2
    policies of ``_pre_norm_fwd_block``."""
    rows, row_ok = _gather_rows(PERM, first + tl.arange(0, BM), end, ROUTED)
    a64 = adapter.to(tl.int64)
    LN_W += a64 * D
    LN_B += a64 * D
    WD += a64 * H * D
    WU += a64 * D * H
    hcols = tl.arange(0, BH)
    h_ok = hcols < H
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xn
    out_rows = OUT + rows.to(tl.int64)[:, None] * D
    dot_dtype = X.dtype.element_ty

    # Pass 1: h = x Wdᵀ.
    h = tl.zeros((BM, BH), tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        d_ok = cols < D
        x = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_ok[:, None] & d_ok[None, :], other=0.0,
                    eviction_policy=FIRST_READ)
        wd_t = tl.load(WD + hcols[None, :] * D + cols[:, None],  # (BD, BH) = Wd[:, cols]ᵀ
                       mask=d_ok[:, None] & h_ok[None, :], other=0.0)
        h += _dot(x, wd_t, DOT_F32, dot_dtype)
    tl.store(HID + rows.to(tl.int64)[:, None] * H + hcols[None, :], h, mask=row_ok[:, None] & h_ok[None, :])
    a = _act(h, ACT)

    # Pass 2: statistics of u = a Wuᵀ.
    shift, mean_c, rstd = _up_projection_stats(a, WU, hcols, h_ok, D, H, eps, DOT_F32, dot_dtype, BM, BD)
    _store_stats(MEAN, RSTD, rows, row_ok, N, shift, mean_c, rstd)

    # Pass 3, D backwards: out = [x +] s m LN(u).
    scale, dropout_p, keep_scale = _adapter_scalars(SCALE, DROP_P, KEEP, adapter, dropout_p, keep_scale,
                                                    HAS_SCALE, HAS_DROPOUT, ROUTED)
    row_hash = _row_hash(SEED, rows) if HAS_DROPOUT else rows
    sq = tl.zeros((BM,), tl.float32)
    n_chunks = tl.cdiv(D, BD)
    for i in range(0, n_chunks):
        cols = (n_chunks - 1 - i) * BD + tl.arange(0, BD)
        d_ok = cols < D
        mask = row_ok[:, None] & d_ok[None, :]
        if RESIDUAL:
            x = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0, eviction_policy="evict_first")
        wu_t = tl.load(WU + cols[None, :] * H + hcols[:, None], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        gamma = tl.load(LN_W + cols, mask=d_ok, other=0.0).to(tl.float32)
        beta = tl.load(LN_B + cols, mask=d_ok, other=0.0).to(tl.float32)
        u = _dot(a, wu_t, DOT_F32, dot_dtype)
        y = _normalize(u, shift, mean_c, rstd, mask) * gamma[None, :] + beta[None, :]
        z = _drop_scale(y, row_hash, cols, scale, dropout_p, keep_scale, HAS_DROPOUT, HAS_SCALE)
        if STORE_ROW_SQ:
            sq += tl.sum(tl.where(mask, z * z, 0.0), 1)
        if RESIDUAL:
            z += x.to(tl.float32)
        tl.store(out_rows + cols[None, :], z, mask=mask, eviction_policy=OUT_POLICY)
    if STORE_ROW_SQ:
        tl.store(ROW_SQ + rows, sq, mask=row_ok)


@triton.jit
def _post_norm_fwd_kernel(
    X, OUT, ROW_SQ, HID, MEAN, RSTD, LN_W, LN_B, WD, WU, SEED, SCALE, PERM, TABLE, DROP_P, KEEP,
    N, D, H, stride_xn, stride_xd, eps, dropout_p, keep_scale,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr, RESIDUAL: tl.constexpr,
    STORE_ROW_SQ: tl.constexpr, DOT_F32: tl.constexpr, FIRST_READ: tl.constexpr, GRID_STRIDE: tl.constexpr,
    ROUTED: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
):
    """Row block pid, or with GRID_STRIDE row blocks pid, pid + P, ..., or ROUTED (as ``_pre_norm_fwd_kernel``)."""
    if GRID_STRIDE:
        for blk in range(tl.program_id(0), tl.cdiv(N, BM), tl.num_programs(0)):
            adapter, first, end = _program_rows(TABLE, blk, N, BM, False)
            _post_norm_fwd_block(adapter, first, end, X, OUT, ROW_SQ, HID, MEAN, RSTD, LN_W, LN_B, WD, WU, SEED,
                                 SCALE, PERM, DROP_P, KEEP, N, D, H, stride_xn, stride_xd, eps, dropout_p, keep_scale,
                                 ACT, HAS_DROPOUT, HAS_SCALE, RESIDUAL, STORE_ROW_SQ, DOT_F32, FIRST_READ,
                                 "evict_first", False, BM, BD, BH)
    else:
        adapter, first, end = _program_rows(TABLE, tl.program_id(0), N, BM, ROUTED)
        if adapter >= 0:
            _post_norm_fwd_block(adapter, first, end, X, OUT, ROW_SQ, HID, MEAN, RSTD, LN_W, LN_B, WD, WU, SEED,
                                 SCALE, PERM, DROP_P, KEEP, N, D, H, stride_xn, stride_xd, eps, dropout_p, keep_scale,
                                 ACT, HAS_DROPOUT, HAS_SCALE, RESIDUAL, STORE_ROW_SQ, DOT_F32, FIRST_READ,
                                 "evict_first", ROUTED, BM, BD, BH)
        elif ROUTED:
            _pass_rows_fwd(X, OUT, ROW_SQ, PERM, first, end, D, stride_xn, stride_xd, RESIDUAL, STORE_ROW_SQ, BM, BD)


# ----------------------------------------------------------------------------------------------
# Backward kernels: a row-parallel pass (a, dh and per-row scalars), then a column-parallel pass.
# Rows past N load as zeros (a, dh, dout, statistics), which makes their contributions vanish.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pre_norm_bwd_rows_kernel(
    DOUT, GRAD_SQ, HID, PROJ, WU, SEED, SCALE, ACTS, DH, K, PERM, TABLE, DROP_P, KEEP,
    N, D, H, stride_gn, stride_gd, stride_q, dropout_p, keep_scale,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_ROW_SQ_GRAD: tl.constexpr, DOT_F32: tl.constexpr, ROUTED: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
):
    """Pre norm's rows pass over one row block (routed: one block of one adapter's rows; a block of rows
    without an adapter does nothing)."""
    adapter, first, end = _program_rows(TABLE, tl.program_id(0), N, BM, ROUTED)
    if adapter >= 0:
        rows, row_ok = _gather_rows(PERM, first + tl.arange(0, BM), end, ROUTED)
        a64 = adapter.to(tl.int64)
        PROJ += a64 * 2 * H
        WU += a64 * D * H
        hcols = tl.arange(0, BH)
        h_ok = hcols < H
        hid_mask = row_ok[:, None] & h_ok[None, :]
        g_rows = DOUT + rows.to(tl.int64)[:, None] * stride_gn
        dot_dtype = WU.dtype.element_ty

        hid_offs = rows.to(tl.int64)[:, None] * H + hcols[None, :]
        # Only da stays live through the loop (and a, with the row_sq gradient, for y = a Wuᵀ): h and a
        # are loaded again after it, which lets a row block be twice as tall at large H.
        if HAS_ROW_SQ_GRAD:
            a = _act(tl.load(HID + hid_offs, mask=hid_mask, other=0.0), ACT)
        grad_sq = _load_rows(GRAD_SQ, rows, row_ok, HAS_ROW_SQ_GRAD, stride_q)
        scale, dropout_p, keep_scale = _adapter_scalars(SCALE, DROP_P, KEEP, adapter, dropout_p, keep_scale,
                                                        HAS_SCALE, HAS_DROPOUT, ROUTED)
        row_hash = _row_hash(SEED, rows) if HAS_DROPOUT else rows

        da = tl.zeros((BM, BH), tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            d_ok = cols < D
            dout = tl.load(g_rows + cols[None, :] * stride_gd, mask=row_ok[:, None] & d_ok[None, :],
                           other=0.0).to(tl.float32)
            wu = tl.load(WU + cols[:, None] * H + hcols[None, :], mask=d_ok[:, None] & h_ok[None, :], other=0.0)
            y = _dot(a, tl.trans(wu), DOT_F32, dot_dtype) if HAS_ROW_SQ_GRAD else dout
            dy = _dy(dout, y, grad_sq, row_hash, cols, scale, dropout_p, keep_scale,
                     HAS_DROPOUT, HAS_SCALE, HAS_ROW_SQ_GRAD)
            da += _dot(dy, wu, DOT_F32, dot_dtype)
        # a is stored before dh is formed, so that at most three BM×BH tiles are live (da, h, then a or dh).
        h = tl.load(HID + hid_offs, mask=hid_mask, other=0.0)
        tl.store(ACTS + hid_offs, _act(h, ACT), mask=hid_mask)
        dh = da * _act_grad(h, ACT)
        g = tl.load(PROJ + hcols, mask=h_ok, other=0.0)
        b = tl.load(PROJ + H + hcols, mask=h_ok, other=0.0)
        # k1, k2 and dh, what the columns pass reads with a, each stored as soon as formed (forming k1 and
        # k2 before storing either spills at H = 256, compiled).
        tl.store(K + rows, tl.sum(dh * g[None, :], 1) / D, mask=row_ok)
        tl.store(K + N + rows, tl.sum(dh * (h - b[None, :]), 1) / D, mask=row_ok)
        tl.store(DH + hid_offs, dh, mask=hid_mask)


@triton.jit
def _post_norm_dy(a, wu, dout, gamma, beta, shift, mean_c, rstd, grad_sq, row_hash, cols, mask, scale,
                  dropout_p, keep_scale, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_ROW_SQ_GRAD: tl.constexpr, DOT_F32: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """(û, dy) on a BM×BD tile of the post-norm adapter: û = LN's normalised u = a Wuᵀ, dy as above."""
    uhat = _normalize(_dot(a, tl.trans(wu), DOT_F32, DOT_DTYPE), shift, mean_c, rstd, mask)
    dy = _dy(dout, uhat * gamma[None, :] + beta[None, :], grad_sq, row_hash, cols, scale, dropout_p,
             keep_scale, HAS_DROPOUT, HAS_SCALE, HAS_ROW_SQ_GRAD)
    return uhat, dy


@triton.jit
def _dot_operand(a, DOT_F32: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``a`` (float32) rounded as ``_dot`` rounds its operands, as float32."""
    if DOT_F32 == 0:
        return a.to(DOT_DTYPE).to(tl.float32)
    else:
        return a


@triton.jit
def _column_shift(WU, cols, cols_ok, D, H, BD: tl.constexpr):
    """Each column's mean over Wu's first BD rows: the shift s of ``_up_weight_fold_kernel``."""
    rows = tl.arange(0, BD)
    w = tl.load(WU + rows[:, None] * H + cols[None, :], mask=(rows < D)[:, None] & cols_ok[None, :], other=0.0)
    return tl.sum(w.to(tl.float32), 0) / tl.sum((rows < D).to(tl.float32), 0)


@triton.jit
def _up_weight_fold_kernel(WU, WS, P1, P2, D, H, rows_per_split, splits, DOT_F32: tl.constexpr,
                           BR: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
    """Post norm's fold of the up weight, part 1, per adapter of a stack (A×D×H; A = 1 unstacked) and
    split of D's rows: with s each column's mean over the first BD rows, ``Ws = Wu - s`` (WS, like WU,
    in WS' dtype, which the products take too: the rows pass's dots see Ws and Gc so rounded), and the
    partial sums S1 = Σ_d (Wu_d - s) (P1, float32 A·S×H) and S2 = Σ_d (Wu_d - s)ᵀ (Wu_d - s) (P2, float32
    A·S×H×H); program (i, a·S + k) the BR×H rows i of adapter a's S2 over split k, and Ws's BR columns i."""
    ci = tl.program_id(0) * BR + tl.arange(0, BR)
    call = tl.arange(0, BH)
    part = tl.program_id(1)
    split = part % splits
    adapter = (part // splits).to(tl.int64)
    WU += adapter * D * H
    WS += adapter * D * H
    dot_dtype = WS.dtype.element_ty
    i_ok = ci < H
    all_ok = call < H
    si = _column_shift(WU, ci, i_ok, D, H, BD)
    s_all = _column_shift(WU, call, all_ok, D, H, BD)
    s1 = tl.zeros((BR,), tl.float32)
    s2 = tl.zeros((BR, BH), tl.float32)
    first = split * rows_per_split
    for d0 in range(first, tl.minimum(first + rows_per_split, D), BD):
        rows = d0 + tl.arange(0, BD)
        r_ok = (rows < D) & (rows < first + rows_per_split)
        mask_i = r_ok[:, None] & i_ok[None, :]
        wi = tl.where(mask_i, tl.load(WU + rows[:, None] * H + ci[None, :], mask=mask_i, other=0.0).to(tl.float32)
                      - si[None, :], 0.0)
        mask_all = r_ok[:, None] & all_ok[None, :]
        w_all = tl.where(mask_all, tl.load(WU + rows[:, None] * H + call[None, :], mask=mask_all,
                                           other=0.0).to(tl.float32) - s_all[None, :], 0.0)
        s1 += tl.sum(wi, 0)
        s2 += _dot(tl.trans(wi), w_all, DOT_F32, dot_dtype)
        tl.store(WS + rows[:, None] * H + ci[None, :], wi, mask=mask_i)
    part = part.to(tl.int64)
    tl.store(P2 + part * H * H + ci[:, None] * H + call[None, :], s2, mask=i_ok[:, None] & all_ok[None, :])
    tl.store(P1 + part * H + ci, s1, mask=i_ok)


@triton.jit
def _up_weight_gram_kernel(P1, P2, GRAM, DELTA, D, H, splits, BR: tl.constexpr):
    """Part 2, per adapter ``program_id(2)``: its splits' partial sums added in order, then the centred
    Gram matrix ``Gc = Σ_d (Wu_d - w̄)ᵀ (Wu_d - w̄) = S2 - S1ᵀ S1 / D`` (GRAM, A×H×H in the dots' operand
    dtype, which is all the rows pass's dot sees of it; tile (i, j) per program) and ``δ = w̄ - s = S1 / D``
    (DELTA, float32 A×H)."""
    ci = tl.program_id(0) * BR + tl.arange(0, BR)
    cj = tl.program_id(1) * BR + tl.arange(0, BR)
    adapter = tl.program_id(2).to(tl.int64)
    P1 += adapter * splits * H
    P2 += adapter * splits * H * H
    GRAM += adapter * H * H
    DELTA += adapter * H
    i_ok = ci < H
    j_ok = cj < H
    s1i = tl.zeros((BR,), tl.float32)
    s1j = tl.zeros((BR,), tl.float32)
    s2 = tl.zeros((BR, BR), tl.float32)
    for k in range(0, splits):
        s1i += tl.load(P1 + k * H + ci, mask=i_ok, other=0.0)
        s1j += tl.load(P1 + k * H + cj, mask=j_ok, other=0.0)
        s2 += tl.load(P2 + k * H * H + ci[:, None] * H + cj[None, :], mask=i_ok[:, None] & j_ok[None, :], other=0.0)
    tl.store(GRAM + ci[:, None] * H + cj[None, :], s2 - s1i[:, None] * s1j[None, :] / D,
             mask=i_ok[:, None] & j_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(DELTA + ci, s1i / D, mask=i_ok)


@triton.jit
def _post_norm_bwd_rows_kernel(
    DOUT, GRAD_SQ, HID, RSTD, LN_W, LN_B, WS, GRAM, DELTA, SEED, SCALE, ACTS, DH, K, PERM, TABLE, DROP_P, KEEP,
    N, D, H, stride_gn, stride_gd, stride_q, dropout_p, keep_scale,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_ROW_SQ_GRAD: tl.constexpr, DOT_F32: tl.constexpr, ROUTED: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
):
    """Post norm's rows pass on the folded up weight (``_up_weight_fold_kernel``, ``_up_weight_gram_kernel``):
    with a as the dots round it, μ = a·w̄ and û_d = r a·Wc_d, Wc = Wu - w̄ = Ws - δ, so over D only
    dû = γ dy, c1 = Σ_d dû and t = dû Ws remain (and, for the row_sq gradient, û itself); then
    dû Wc = t - c1 δ, c2 = Σ_d dû û = r a·(dû Wc), û Wu = r a Gc, and da = r (dû Wc - c2 (û Wu) / D).
    Ws is centred on a shift close to w̄, so that neither correction by δ cancels. Routed: one block of
    one adapter's rows, as in ``_pre_norm_bwd_rows_kernel``."""
    pid = tl.program_id(0)
    adapter, first, end = _program_rows(TABLE, pid, N, BM, ROUTED)
    if adapter >= 0:
        rows, row_ok = _gather_rows(PERM, first + tl.arange(0, BM), end, ROUTED)
        a64 = adapter.to(tl.int64)
        LN_W += a64 * D
        LN_B += a64 * D
        WS += a64 * D * H
        GRAM += a64 * H * H
        DELTA += a64 * H
        hcols = tl.arange(0, BH)
        h_ok = hcols < H
        hid_mask = row_ok[:, None] & h_ok[None, :]
        g_rows = DOUT + rows.to(tl.int64)[:, None] * stride_gn
        dot_dtype = WS.dtype.element_ty

        hid_offs = rows.to(tl.int64)[:, None] * H + hcols[None, :]
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if HAS_ROW_SQ_GRAD:
            a = _act(tl.load(HID + hid_offs, mask=hid_mask, other=0.0), ACT)
            delta = tl.load(DELTA + hcols, mask=h_ok, other=0.0)
            a_delta = tl.sum(_dot_operand(a, DOT_F32, dot_dtype) * delta[None, :], 1)  # a·δ
        grad_sq = _load_rows(GRAD_SQ, rows, row_ok, HAS_ROW_SQ_GRAD, stride_q)
        scale, dropout_p, keep_scale = _adapter_scalars(SCALE, DROP_P, KEEP, adapter, dropout_p, keep_scale,
                                                        HAS_SCALE, HAS_DROPOUT, ROUTED)
        row_hash = _row_hash(SEED, rows) if HAS_DROPOUT else rows

        c1 = tl.zeros((BM,), tl.float32)
        t = tl.zeros((BM, BH), tl.float32)  # dû Ws
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            d_ok = cols < D
            mask = row_ok[:, None] & d_ok[None, :]
            dout = tl.load(g_rows + cols[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
            gamma = tl.load(LN_W + cols, mask=d_ok, other=0.0).to(tl.float32)
            ws = tl.load(WS + cols[:, None] * H + hcols[None, :], mask=d_ok[:, None] & h_ok[None, :], other=0.0)
            y = dout
            if HAS_ROW_SQ_GRAD:
                beta = tl.load(LN_B + cols, mask=d_ok, other=0.0).to(tl.float32)
                uhat = rstd[:, None] * (_dot(a, tl.trans(ws), DOT_F32, dot_dtype) - a_delta[:, None])
                y = tl.where(mask, uhat * gamma[None, :] + beta[None, :], 0.0)
            duhat = _dy(dout, y, grad_sq, row_hash, cols, scale, dropout_p, keep_scale,
                        HAS_DROPOUT, HAS_SCALE, HAS_ROW_SQ_GRAD) * gamma[None, :]
            c1 += tl.sum(duhat, 1)
            t += _dot(duhat, ws, DOT_F32, dot_dtype)
        # δ is loaded after the loop: a BH vector in the accumulator's layout, loaded before, held some 50
        # registers a thread through it (compiled, sm_90, BM = 64, H = 256).
        t -= c1[:, None] * tl.load(DELTA + hcols, mask=h_ok, other=0.0)[None, :]  # dû Wc
        h = tl.load(HID + hid_offs, mask=hid_mask, other=0.0)
        a = _act(h, ACT)
        tl.store(ACTS + hid_offs, a, mask=hid_mask)
        c2 = rstd * tl.sum(_dot_operand(a, DOT_F32, dot_dtype) * t, 1)

        # da / r = dû Wc - (c2 r / D) a Gc, accumulated into t one BK-row slice of Gc at a time (with the
        # BK columns of a it meets, loaded again): H / BK steps per row block.
        coef = -(c2 * rstd / D)
        for k0 in range(0, H, BK):
            kcols = k0 + tl.arange(0, BK)
            k_ok = kcols < H
            a_k = _act(tl.load(HID + rows.to(tl.int64)[:, None] * H + kcols[None, :],
                               mask=row_ok[:, None] & k_ok[None, :], other=0.0), ACT)
            gram = tl.load(GRAM + kcols[:, None] * H + hcols[None, :], mask=k_ok[:, None] & h_ok[None, :],
                           other=0.0)
            t += _dot(coef[:, None] * a_k, gram, DOT_F32, dot_dtype)
        if ROUTED:
            block_offs = rows.to(tl.int64)[:, None] * H + hcols[None, :]
        else:
            # The block's offsets rebuilt from a scalar base rather than hid_offs: reusing those kept the
            # BM×BH pointers live through the Gc loop, and 64-row blocks spilled at H = 256 (compiled, sm_90).
            block_offs = first.to(tl.int64) * H + (tl.arange(0, BM)[:, None] * H + hcols[None, :])
        dh = rstd[:, None] * t * _act_grad(tl.load(HID + block_offs, mask=hid_mask, other=0.0), ACT)
        tl.store(DH + block_offs, dh, mask=hid_mask)
        tl.store(K + rows, c1 / D, mask=row_ok)
        tl.store(K + N + rows, c2 / D, mask=row_ok)


@triton.jit
def _bwd_cols_kernel(
    X, DOUT, GRAD_SQ, ACTS, DH, MEAN, RSTD, K, LN_W, LN_B, WD, WU, SEED, SCALE,
    DX, DWD, DWU, DLN_W, DLN_B, PERM, CHUNKS, DROP_P, KEEP,
    N, D, H, stride_xn, stride_xd, stride_gn, stride_gd, stride_q, rows_per_split, dropout_p, keep_scale,
    HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_ROW_SQ_GRAD: tl.constexpr, RESIDUAL: tl.constexpr, DOT_F32: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DLN: tl.constexpr, NEED_DWD: tl.constexpr, NEED_DWU: tl.constexpr,
    PRE_NORM: tl.constexpr, ROUTED: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
):
    """Columns pass of the backward, both norm positions: this program's D slice of dx and of every
    weight gradient, over its split of the rows (see the module docstring). Routed, the splits are the
    chunks of a segment table (``CHUNKS``: one adapter's rows each, gathered through ``PERM``), and a
    chunk of rows without an adapter only passes dout to dx (residual) or writes 0."""
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    adapter, row_begin, row_end = _program_rows(CHUNKS, split, N, rows_per_split, ROUTED)
    cols = pid_d * BD + tl.arange(0, BD)
    d_ok = cols < D
    if adapter < 0:
        if NEED_DX and ROUTED:
            _pass_dout(DOUT, DX, PERM, row_begin, row_end, cols, d_ok, D, stride_gn, stride_gd, RESIDUAL, BM, BD)
    else:
        a64 = adapter.to(tl.int64)
        hcols = tl.arange(0, BH)
        h_ok = hcols < H
        dot_dtype = X.dtype.element_ty

        gamma = tl.load(LN_W + a64 * D + cols, mask=d_ok, other=0.0).to(tl.float32)
        beta = tl.load(LN_B + a64 * D + cols, mask=d_ok, other=0.0).to(tl.float32)
        wd = tl.load(WD + a64 * H * D + hcols[:, None] * D + cols[None, :], mask=h_ok[:, None] & d_ok[None, :],
                     other=0.0)
        wu = tl.load(WU + a64 * D * H + cols[:, None] * H + hcols[None, :], mask=d_ok[:, None] & h_ok[None, :],
                     other=0.0)
        scale, dropout_p, keep_scale = _adapter_scalars(SCALE, DROP_P, KEEP, adapter, dropout_p, keep_scale,
                                                        HAS_SCALE, HAS_DROPOUT, ROUTED)

        dwd = tl.zeros((BH, BD), tl.float32)
        dwu = tl.zeros((BD, BH), tl.float32)
        dgamma = tl.zeros((BM, BD), tl.float32)  # reduced over rows once, after the loop
        dbeta = tl.zeros((BM, BD), tl.float32)
        # dout is read one row block ahead: Triton's pipeliner leaves its load (no dot takes it directly)
        # synchronous, and it would stall each iteration on memory. Not with dropout or the row_sq
        # gradient, whose extra registers the held tile would push into spills.
        prefetch: tl.constexpr = not (HAS_DROPOUT or HAS_ROW_SQ_GRAD)
        d_rows = DOUT + cols[None, :] * stride_gd
        if prefetch:
            nxt_rows, nxt_ok = _gather_rows(PERM, row_begin + tl.arange(0, BM), row_end, ROUTED)
            nxt_dout = tl.load(d_rows + nxt_rows.to(tl.int64)[:, None] * stride_gn,
                               mask=nxt_ok[:, None] & d_ok[None, :], other=0.0)
        for r0 in range(row_begin, row_end, BM):
            rows, row_ok = _gather_rows(PERM, r0 + tl.arange(0, BM), row_end, ROUTED)
            mask = row_ok[:, None] & d_ok[None, :]
            hid_offs = rows.to(tl.int64)[:, None] * H + hcols[None, :]
            hid_mask = row_ok[:, None] & h_ok[None, :]
            if prefetch:
                dout = nxt_dout.to(tl.float32)
                nxt_rows, nxt_ok = _gather_rows(PERM, r0 + BM + tl.arange(0, BM), row_end, ROUTED)
                nxt_dout = tl.load(d_rows + nxt_rows.to(tl.int64)[:, None] * stride_gn,
                                   mask=nxt_ok[:, None] & d_ok[None, :], other=0.0)
            else:
                dout = tl.load(d_rows + rows.to(tl.int64)[:, None] * stride_gn, mask=mask, other=0.0).to(tl.float32)
            shift, mean_c, rstd = _load_stats(MEAN, RSTD, rows, row_ok, N)
            if PRE_NORM:
                if NEED_DWU:
                    a = tl.load(ACTS + hid_offs, mask=hid_mask, other=0.0)
                    y = _dot(a, tl.trans(wu), DOT_F32, dot_dtype) if HAS_ROW_SQ_GRAD else dout
                    grad_sq = _load_rows(GRAD_SQ, rows, row_ok, HAS_ROW_SQ_GRAD, stride_q)
                    row_hash = _row_hash(SEED, rows) if HAS_DROPOUT else rows
                    dy = _dy(dout, y, grad_sq, row_hash, cols, scale, dropout_p, keep_scale,
                             HAS_DROPOUT, HAS_SCALE, HAS_ROW_SQ_GRAD)
                    dwu += _dot(tl.trans(dy), a, DOT_F32, dot_dtype)
                if NEED_DX or NEED_DLN or NEED_DWD:
                    dh = tl.load(DH + hid_offs, mask=hid_mask, other=0.0)
                    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xn + cols[None, :] * stride_xd,
                                mask=mask, other=0.0).to(tl.float32)
                    xhat = ((x - shift[:, None]) - mean_c[:, None]) * rstd[:, None]
                    if NEED_DX or NEED_DLN:
                        t = _dot(dh, wd, DOT_F32, dot_dtype)  # dh Wd = dx̂ / γ
                        if NEED_DX:
                            k1 = tl.load(K + rows, mask=row_ok, other=0.0)
                            k2 = tl.load(K + N + rows, mask=row_ok, other=0.0)
                            dx = rstd[:, None] * (t * gamma[None, :] - k1[:, None] - xhat * k2[:, None])
                            if RESIDUAL:
                                dx += dout
                            tl.store(DX + rows.to(tl.int64)[:, None] * D + cols[None, :], dx, mask=mask)
                        if NEED_DLN:
                            dgamma += t * xhat
                            dbeta += t
                    if NEED_DWD:
                        dwd += _dot(tl.trans(dh), xhat * gamma[None, :] + beta[None, :], DOT_F32, dot_dtype)
            else:
                if NEED_DLN or NEED_DWU:
                    a = tl.load(ACTS + hid_offs, mask=hid_mask, other=0.0)
                    grad_sq = _load_rows(GRAD_SQ, rows, row_ok, HAS_ROW_SQ_GRAD, stride_q)
                    row_hash = _row_hash(SEED, rows) if HAS_DROPOUT else rows
                    uhat, dy = _post_norm_dy(a, wu, dout, gamma, beta, shift, mean_c, rstd, grad_sq, row_hash,
                                             cols, mask, scale, dropout_p, keep_scale, HAS_DROPOUT, HAS_SCALE,
                                             HAS_ROW_SQ_GRAD, DOT_F32, dot_dtype)
                    if NEED_DLN:
                        dgamma += dy * uhat
                        dbeta += dy
                    if NEED_DWU:
                        k1 = tl.load(K + rows, mask=row_ok, other=0.0)
                        k2 = tl.load(K + N + rows, mask=row_ok, other=0.0)
                        du = rstd[:, None] * (dy * gamma[None, :] - k1[:, None] - uhat * k2[:, None])
                        dwu += _dot(tl.trans(du), a, DOT_F32, dot_dtype)
                if NEED_DX or NEED_DWD:
                    dh = tl.load(DH + hid_offs, mask=hid_mask, other=0.0)
                    if NEED_DX:
                        dx = _dot(dh, wd, DOT_F32, dot_dtype)
                        if RESIDUAL:
                            dx += dout
                        tl.store(DX + rows.to(tl.int64)[:, None] * D + cols[None, :], dx, mask=mask)
                    if NEED_DWD:
                        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xn + cols[None, :] * stride_xd,
                                    mask=mask, other=0.0)
                        dwd += _dot(tl.trans(dh), x, DOT_F32, dot_dtype)
        _store_weight_partials(DWD, DWU, DLN_W, DLN_B, dwd, dwu, tl.sum(dgamma, 0), tl.sum(dbeta, 0), split, cols,
                               d_ok, hcols, h_ok, D, H, NEED_DLN, NEED_DWD, NEED_DWU)


@triton.jit
def _pass_dout(DOUT, DX, PERM, first, end, cols, d_ok, D, stride_gn, stride_gd, RESIDUAL: tl.constexpr,
               BM: tl.constexpr, BD: tl.constexpr):
    """dx of routed rows without an adapter, positions first .. end - 1: dout (residual) or 0."""
    for p0 in range(first, end, BM):
        rows, row_ok = _gather_rows(PERM, p0 + tl.arange(0, BM), end, True)
        mask = row_ok[:, None] & d_ok[None, :]
        dx = tl.zeros((BM, BD), tl.float32)
        if RESIDUAL:
            dx += tl.load(DOUT + rows.to(tl.int64)[:, None] * stride_gn + cols[None, :] * stride_gd,
                          mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows.to(tl.int64)[:, None] * D + cols[None, :], dx, mask=mask)


@triton.jit
def _store_weight_partials(DWD, DWU, DLN_W, DLN_B, dwd, dwu, dgamma, dbeta, split, cols, d_ok, hcols, h_ok,
                           D, H, NEED_DLN: tl.constexpr, NEED_DWD: tl.constexpr, NEED_DWU: tl.constexpr):
    """Store one row split's float32 partial gradients: DWD (S, H, D), DWU (S, D, H), DLN_* (S, D)."""
    split = split.to(tl.int64)
    if NEED_DWD:
        tl.store(DWD + split * H * D + hcols[:, None] * D + cols[None, :], dwd,
                 mask=h_ok[:, None] & d_ok[None, :])
    if NEED_DWU:
        tl.store(DWU + split * D * H + cols[:, None] * H + hcols[None, :], dwu,
                 mask=d_ok[:, None] & h_ok[None, :])
    if NEED_DLN:
        tl.store(DLN_W + split * D + cols, dgamma, mask=d_ok)
        tl.store(DLN_B + split * D + cols, dbeta, mask=d_ok)


@triton.jit
def _segment_sum_kernel(PARTIAL, OUT, FIRST_CHUNK, SIZE, BLOCK: tl.constexpr):
    """OUT[a, j] = Σ_{c in chunks of adapter a} PARTIAL[c, j], chunks added in order (deterministic)."""
    adapter = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < SIZE
    begin = tl.load(FIRST_CHUNK + adapter)
    stop = tl.load(FIRST_CHUNK + adapter + 1)
    acc = tl.zeros((BLOCK,), tl.float32)
    ptrs = PARTIAL + begin.to(tl.int64) * SIZE + offs
    for _ in range(begin, stop):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += SIZE
    tl.store(OUT + adapter.to(tl.int64) * SIZE + offs, acc, mask=ok)


# ----------------------------------------------------------------------------------------------
# Launch plans and launchers
# ----------------------------------------------------------------------------------------------


class DeviceLimits(NamedTuple):
    """What the launcher sizes its blocks for: the device's SM count, the shared memory one block may
    use (bytes, opt-in maximum), the compute capability and the L2 cache size (bytes)."""

    name: str
    sm_count: int
    shared_memory_per_block: int
    capability: Tuple[int, int]
    l2_size: int


H100 = DeviceLimits("H100", 132, 227 * 1024, (9, 0), 50 << 20)
A100 = DeviceLimits("A100", 108, 163 * 1024, (8, 0), 40 << 20)
# Triton's interpreter: no shared-memory limit; two "SMs" so that the tests cover split reductions;
# sm_90's capability, so that the tests run the block sizes an H100 gets; a 64 KB "L2", so that small
# shapes reach both forward grids (tests/ops/test_linear_adapter.py::test_forward_grid).
INTERPRETER = DeviceLimits("interpreter", 2, 1 << 30, (9, 0), 64 << 10)


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return DeviceLimits(props.name, props.multi_processor_count, shared, (props.major, props.minor),
                        getattr(props, "L2_cache_size", 0))


def device_limits(device: torch.device) -> DeviceLimits:
    """The limits of the CUDA device ``device``, or ``INTERPRETER`` for CPU tensors."""
    if device.type == "cuda":
        return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


class Launch(NamedTuple):
    """One kernel launch, exactly as the launcher makes it, with the launcher's traffic model.

    ``args`` are the positional arguments (tensors, Python ints and floats) and ``meta`` the
    keyword ones (constexprs, ``num_warps``, ``num_stages``). Traffic, in bytes: ``hbm_bytes`` is what
    the launch must move to or from memory at least once (its compulsory traffic); ``reread_bytes``
    is what it reads a second time, from L2 when ``live_bytes_per_program`` times the resident
    programs fits in L2, else from HBM again; ``l2_bytes`` is what its programs re-read of shared
    operands (weights, per-row vectors), which stays in L2. ``elements`` is the number of N×D elements
    its main loops cover, for instructions per element.
    """

    name: str
    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    meta: Dict[str, Any]
    hbm_bytes: int
    reread_bytes: int
    live_bytes_per_program: int
    l2_bytes: int
    elements: int
    work_units: int = 0  # row blocks a grid-stride kernel's programs walk; 0: one program per unit of work
    element_loops: int = 0  # k > 0: only the kernel's first k tile loops walk ``elements`` (0: all do)


class Routing(NamedTuple):
    """A mixed batch for ``plan_backward`` (``ops.routed_adapter``): row n goes through adapter
    ``index[n]`` of a stack of A, or none. ``segments(block)`` groups the rows by adapter into blocks of at
    most ``block`` rows (``routed_adapter.segment_table``: ``perm``, ``table``, ``first_chunk``);
    ``dropout_p`` and ``keep`` are each adapter's dropout probability and 1 / (1 - p) (float32 A)."""

    segments: Callable[[int], Any]
    dropout_p: torch.Tensor
    keep: torch.Tensor
    has_dropout: bool


class _Config(NamedTuple):
    """Block sizes: BH = H padded to a power of two >= 16."""

    BH: int
    BM: int  # rows per program (forward, rows pass) or per loop step (columns pass)
    BD: int  # columns per chunk (forward, rows pass) or per program (columns pass)
    num_warps: int
    num_stages: int


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ (``triton.cdiv`` is a constexpr function: microseconds a call on the host)."""
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _padded_hidden(h: int) -> int:
    return max(16, _next_power_of_2(h))


def _clamp_bd(bd: int, d: int) -> int:
    return min(bd, max(16, _next_power_of_2(d)))


def _register_pressure(dtype: torch.dtype, limits: DeviceLimits) -> int:
    """2 where dot operands cost twice the registers: float32 (tf32x3 splits each operand in two) and
    GPUs before sm_90 (mma.sync takes its operands from registers, wgmma from shared memory)."""
    return 2 if dtype == torch.float32 or limits.capability < (9, 0) else 1


def _row_config(h: int, d: int, dtype: torch.dtype, limits: DeviceLimits, tiles: int = 2,
                budget: int = 128) -> _Config:
    """Forward and backward rows pass. A program keeps about ``tiles`` BM×BH float32 tiles live (as its
    callers count them: ``_forward_config``, ``_rows_pass_config``); BM is the largest power of two from
    16 to 64 that keeps them within ``budget`` registers a thread (halved under register pressure). D
    chunks narrow as H grows, and software pipelining goes where its stages would not fit the block's
    shared memory."""
    bh = _padded_hidden(h)
    pressure = _register_pressure(dtype, limits)
    warps = 4 if bh <= (64 if tiles <= 2 else 32) else 8
    budget //= pressure
    bm = 64
    while bm > 16 and tiles * bm * bh > budget * 32 * warps:
        bm //= 2
    bd = (64 if bh <= 128 else 32) // (2 if dtype == torch.float32 and bh >= 64 else 1)
    if pressure > 1 and bh >= 256:
        bd = 16
    stages = 3 if bh <= 128 else 2 if bh <= 256 else 1
    if limits.shared_memory_per_block < 128 * 1024 and bh >= 256:
        stages = 1
    return _Config(bh, bm, _clamp_bd(bd, d), warps, stages)


def _rows_pass_config(pre: bool, row_sq_grad: bool, h: int, d: int, dtype: torch.dtype,
                      limits: DeviceLimits) -> _Config:
    """The backward rows pass: da (pre norm) or dû Wc (post norm) accumulates through the loop, then h
    and a or dh (a is stored before dh is formed: counted as two tiles within 128 registers, the third
    in the headroom up to 255; post norm's Gc product adds BM×16 slices, and 64-row blocks fit at
    H = 256, compiled). The row_sq gradient keeps a live through the loop as well (pre norm: 96; post
    norm: 48, where the loop also holds û)."""
    cfg = _row_config(h, d, dtype, limits, tiles=2, budget=(96 if pre else 48) if row_sq_grad else 128)
    if pre:
        return cfg
    if row_sq_grad and cfg.BM == 16 and dtype != torch.float32 and limits.capability < (9, 0):
        cfg = cfg._replace(num_warps=4)  # compiled for sm_80 at H = 256: 8 warps spill, 4 do not
    return cfg


# The share of the L2 that the row blocks of x held between the forward's two reads may fill: the rest is
# for the weights, the stores of out on their way to memory and whatever else the device runs.
L2_RESIDENT_SHARE = 0.75


@functools.lru_cache(maxsize=256)  # on every call's host path; a pure function of hashable arguments
def _forward_config(h: int, d: int, dtype: torch.dtype, limits: DeviceLimits,
                    routed: bool = False, grid_stride: bool = True) -> Tuple[_Config, int, str]:
    """The forward's configuration, its programs per SM (k >= 1: a grid of k programs per SM that walk
    the row blocks, ``GRID_STRIDE``; 0: one program per row block) and the L2 policy of x's first reads.

    The forward reads each row block of x twice (pass 1 for h and the statistics, pass 2 for the
    residual); the second read comes from L2 when the row blocks resident between the two fit there.
    Where k >= 1 row blocks per SM fit, x's first reads are marked evict-last, its second read and the
    stores of out evict-first (last uses). Where exactly one fits (fp16/bf16 at D = 4096 on an H100 or
    A100), the grid is one program per SM walking the row blocks (``GRID_STRIDE``), with 8 warps and a
    4-stage pipeline to keep enough of x in flight on its own, and x crosses HBM once. Where two or more
    fit, a grid of one program per row block keeps its 2-5 resident blocks per SM (by registers) mostly
    within them, and goes without the grid-stride loop, which costs registers (spills at D = 1024,
    compiled). Row blocks shrink to 32 rows to fit where H <= 64 (not below 32 rows, nor for wider H: the
    weight tiles' L2 traffic, 2 H D per block against x's BM D, would outgrow what L2 serves faster than
    HBM). float32 keeps one program per row block: its tf32x3 dots need the registers the loop takes.
    Where not even one row block per SM fits (D large), x crosses HBM twice. ``routed``: one program per
    block of the segment table, never the grid-stride loop, nor the 32-row blocks that serve it, and 8
    warps where registers are scarce (compiled for sm_80 at H <= 64, 4 warps spilled). Without
    ``grid_stride`` (the fused chain, which spills in that loop), one program per row block always."""
    if _register_pressure(dtype, limits) == 1 and _padded_hidden(h) <= 64:
        # fp16/bf16 on sm_90, measured (bench/tune_launches.py on an H100, pre norm, D = 4096, H = 64,
        # one program per row block; bench/results/2026-11-25-h100-tune/): 8 % faster than 64/64/4/3.
        cfg = _Config(_padded_hidden(h), 32, _clamp_bd(128, d), 4, 2)
    else:
        cfg = _row_config(h, d, dtype, limits)
    share = int(L2_RESIDENT_SHARE * limits.l2_size)
    per_sm = share // (limits.sm_count * cfg.BM * d * dtype.itemsize)
    if per_sm == 0 and cfg.BM > 32 and cfg.BH <= 64 and not routed:
        per_sm = share // (limits.sm_count * 32 * d * dtype.itemsize)
        if per_sm:
            cfg = cfg._replace(BM=32)
    first_read = "evict_last" if per_sm else ""
    if routed and _register_pressure(dtype, limits) > 1:
        cfg = cfg._replace(num_warps=8)
    if per_sm != 1 or dtype == torch.float32 or routed or not grid_stride:
        return cfg, 0, first_read
    return cfg._replace(num_warps=max(cfg.num_warps, 8), num_stages=max(cfg.num_stages, 4)), 1, first_read


def _col_config(h: int, d: int, dtype: torch.dtype, limits: DeviceLimits, accumulators: int = 2) -> _Config:
    """Backward columns pass: wide D slices (the h-sized tiles are re-read once per slice), narrower as
    H grows so that the float32 weight-gradient accumulators (``accumulators`` of dWd and dWu, BH×BD
    each) stay in registers; 16-row steps under register pressure. Chosen by compiling the grid of the
    static kernel report for spills."""
    bh = _padded_hidden(h)
    pressure = _register_pressure(dtype, limits)
    if pressure == 1 and bh <= 64:
        # fp16/bf16 on sm_90, measured as for the forward: 64-column slices with 4 warps and two
        # stages, 21 % faster than 128 columns with 8 warps (the same registers a thread, twice the
        # resident programs).
        return _Config(bh, 32, _clamp_bd(64, d), 4, 2)
    if pressure == 1 and bh == 256 and accumulators <= 1:
        # The same at H = 256, one accumulator (_column_groups' split launches): 16 × 64 with 4 warps
        # holds 196-252 registers a thread, two programs per SM, no spill (compiled for sm_90; at H = 512
        # the 64×512 accumulator spills with 4 warps). Not measured on a GPU.
        return _Config(bh, 16, _clamp_bd(64, d), 4, 2)
    bm = 16 if pressure > 1 or bh > 128 else 32
    width = bh * max(1, accumulators)
    bd = 128 if width <= 128 else 64 if width <= 256 else 32 if width <= 512 else 16
    if pressure > 1 and bh >= 256:
        bd = 16
    if dtype == torch.float32 and bh >= 64:
        bd = min(bd, 64)
    stages = 2 if bh <= 256 else 1
    if limits.shared_memory_per_block < 128 * 1024 and bh >= 256:
        stages = 1
    return _Config(bh, bm, _clamp_bd(bd, d), 8, stages)


def _column_groups(pre: bool, need: Dict[str, bool], h: int, d: int, dtype: torch.dtype,
                   limits: DeviceLimits) -> List[Dict[str, bool]]:
    """The columns pass as one launch, or, where the two weight-gradient accumulators would narrow the
    D slices below 64 columns (large H), as two launches with one accumulator each (wider slices, and
    no spills where registers are scarce): the one that reads
    ``a`` (dWu, and post norm's dγ, dβ) and the one that reads ``dh`` (dx, dWd, and pre norm's dγ, dβ).
    Wider slices mean fewer re-reads of the N×H tiles from L2, at the price of reading dout twice."""
    if not (need["NEED_DWD"] and need["NEED_DWU"]) or _col_config(h, d, dtype, limits).BD >= 64:
        return [need]
    reads_acts = {"NEED_DX": False, "NEED_DLN": not pre and need["NEED_DLN"], "NEED_DWD": False, "NEED_DWU": True}
    reads_dh = {name: need[name] and not reads_acts[name] for name in need}
    return [reads_dh, reads_acts]


def _dot_f32(dtype: torch.dtype, limits: DeviceLimits, h: int = 1) -> int:
    """``_dot``'s DOT_F32: 0 where fp16/bf16 tiles feed tl.dot directly; float32 operands for float32
    inputs and for bfloat16 under the interpreter (whose bfloat16 tl.dot is wrong), as tf32x3 (1), or
    from H = 512 on as plain float32 (2): tf32x3 splits each operand in two, and the split BM×H and
    H×BD tiles no longer fit one block's shared memory (256 KB at H = 1024 on sm_90, compiled)."""
    if not (dtype == torch.float32 or (dtype == torch.bfloat16 and limits is INTERPRETER)):
        return 0
    return 2 if dtype == torch.float32 and _padded_hidden(h) >= 512 else 1


def _operand_dtype(dtype: torch.dtype, limits: DeviceLimits) -> torch.dtype:
    """The dtype of the intermediates that only feed dots (Wd∘γ, act(h), dh): the dots' operand dtype,
    so that storing them rounds nothing the dot would not (the interpreter's bfloat16 stores truncate)."""
    return torch.float32 if _dot_f32(dtype, limits) else dtype


def _dropout_args(dropout_p: float) -> Tuple[bool, float, float]:
    """(HAS_DROPOUT, p, 1 / (1 - p)) with everything dropped, multiplier 0, when p >= 1."""
    if dropout_p <= 0.0:
        return False, 0.0, 1.0
    return True, dropout_p, (0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p))


def _row_splits(n_rows: int, n_col_programs: int, bm: int, limits: DeviceLimits) -> Tuple[int, int]:
    """(S, rows_per_split) for the columns pass: enough programs to fill the device twice over, whole
    row blocks per split. S depends only on the shape and the device, so the reduction order is fixed."""
    row_blocks = max(1, _cdiv(n_rows, bm))
    splits = max(1, min(row_blocks, (2 * limits.sm_count) // n_col_programs))
    rows_per_split = _cdiv(row_blocks, splits) * bm
    return max(1, _cdiv(n_rows, rows_per_split)), rows_per_split


def _meta(cfg: _Config, **constexprs: Any) -> Dict[str, Any]:
    return dict(constexprs, BM=cfg.BM, BD=cfg.BD, BH=cfg.BH, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _optional(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional tensor; the kernels never read it when it is absent."""
    return t if t is not None else fallback


def _plan_up_weight_fold(up_weight: torch.Tensor, dtype: torch.dtype, dot_f32: int) -> Tuple[torch.Tensor, ...]:
    """Post norm's fold of the up weight (D×H, or a stack A×D×H), once per backward, for
    ``_post_norm_bwd_rows_kernel``: ``(Ws, Gc, δ, launches)``, Ws = Wu - s in ``dtype`` (s: each column's
    mean over its first 16 to 64 rows), Gc the H×H Gram matrix of Wu - w̄ in ``dtype`` (the rows pass's dot
    rounds it so anyway), δ = w̄ - s (float32 H), each per adapter of a stack. D splits into S groups of
    rows (at most 4 MB of float32 partial Gram tiles over the stack), added in order by the second launch."""
    d, h_size = up_weight.shape[-2:]
    stack = up_weight.shape[:-2]
    a_count = up_weight.shape[0] if stack else 1
    f32 = dict(device=up_weight.device, dtype=torch.float32)
    e = up_weight.element_size()
    bh = _padded_hidden(h_size)
    br, bd = (16 if h_size <= 64 else 32), (64 if bh <= 64 else 32 if bh <= 256 else 16)
    splits = max(1, min(_cdiv(d, 4 * bd), (1 << 22) // (4 * h_size * h_size * a_count)))
    rows_per_split = _cdiv(_cdiv(d, splits), bd) * bd
    splits = _cdiv(d, rows_per_split)
    up_shifted = torch.empty_like(up_weight, dtype=dtype)
    p1 = torch.empty((a_count * splits, h_size), **f32)
    p2 = torch.empty((a_count * splits, h_size, h_size), **f32)
    gram = torch.empty(stack + (h_size, h_size), device=up_weight.device, dtype=dtype)
    delta = torch.empty(stack + (h_size,), **f32)
    tiles = _cdiv(h_size, br)
    launches = [
        Launch("fold_up", _up_weight_fold_kernel, (tiles, a_count * splits),
               (up_weight, up_shifted, p1, p2, d, h_size, rows_per_split, splits),
               dict(DOT_F32=dot_f32, BR=br, BD=bd, BH=bh, num_warps=4 if br == 16 else 8, num_stages=2),
               hbm_bytes=a_count * (d * h_size * (e + up_shifted.element_size()) + 4 * splits * h_size * (h_size + 1)),
               reread_bytes=0, live_bytes_per_program=0, l2_bytes=a_count * (tiles - 1) * d * h_size * e,
               elements=a_count * tiles * br * d),  # an iteration: BD rows of D × BR columns i
        Launch("gram_up", _up_weight_gram_kernel, (tiles, tiles, a_count), (p1, p2, gram, delta, d, h_size, splits),
               dict(BR=br, num_warps=4, num_stages=1),
               hbm_bytes=a_count * (4 * splits * h_size * (h_size + 1) + gram.element_size() * h_size * h_size
                                    + 4 * h_size),
               reread_bytes=0, live_bytes_per_program=0, l2_bytes=0, elements=a_count * h_size * h_size),
    ]
    return up_shifted, gram, delta, launches


def plan_fold_ln(down_weight: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, proj: torch.Tensor,
                 dtype: torch.dtype, limits: DeviceLimits) -> Tuple[torch.Tensor, Launch]:
    """Pre norm's fold of the LayerNorm into the down weight (H×D, or a stack A×H×D), once per forward:
    ``(Wg, launch)``, Wg = Wd∘γ in the dots' operand dtype; the launch also writes ``proj`` (float32
    2×H or A×2×H) = (Wd γ, Wd β)."""
    h_size, d = down_weight.shape[-2:]
    a_count = down_weight.shape[0] if down_weight.dim() == 3 else 1
    weight = torch.empty_like(down_weight, dtype=_operand_dtype(dtype, limits))
    br, bd, e = 4, _clamp_bd(256, d), down_weight.element_size()
    return weight, Launch(
        "fold_ln", _fold_ln_kernel, (_cdiv(h_size, br), a_count),
        (down_weight, ln_weight, ln_bias, weight, proj, d, h_size), dict(BR=br, BD=bd, num_warps=4, num_stages=1),
        hbm_bytes=a_count * (h_size * d * (e + weight.element_size()) + 2 * d * e + 8 * h_size),
        reread_bytes=0, live_bytes_per_program=0, l2_bytes=0, elements=a_count * h_size * d,
    )


def plan_forward(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    dropout_seed: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    activation: str,
    norm_position: str,
    eps: float,
    dropout_p: float,
    residual: bool,
    compute_row_sq: bool,
    limits: DeviceLimits,
    routing: Optional[Routing] = None,
) -> Tuple[Tuple[torch.Tensor, ...], List[Launch]]:
    """The forward's outputs (allocated, not computed) and the launches that compute them.

    Outputs ``(out, row_sq, hidden, mean, rstd, proj)``: ``out`` like ``x`` (contiguous), ``row_sq``
    float32 ``x.shape[:-1]`` (or ``(0,)`` without ``compute_row_sq``), and what backward needs:
    ``hidden`` float32 (N, H) (pre-activation h), ``mean`` float32 (2, N) (a shift c and μ - c) and
    ``rstd`` float32 (N,) (of x for pre norm, of u for post norm), ``proj`` float32 (2, H) =
    (Wd γ, Wd β) for pre norm, (0,) for post. Nothing is read, so any device works, ``meta`` included.

    With ``routing`` (weights and scale stacked per adapter, ``dropout_p`` ignored for ``routing``'s),
    one program per block of the segment table; ``proj`` is (A, 2, H), and rows without an adapter get
    out = x (or 0), row_sq = 0, and undefined ``hidden``, ``mean``, ``rstd``.
    """
    d = x.shape[-1]
    h_size = down_weight.shape[-2]
    stack = down_weight.shape[:-2]
    routed = routing is not None
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    ln_weight, ln_bias, down_weight, up_weight = (t.contiguous() for t in (ln_weight, ln_bias, down_weight, up_weight))
    f32 = dict(device=x.device, dtype=torch.float32)
    pre = norm_position == "pre"
    out = x.new_empty(x.shape)
    row_sq = torch.empty(x.shape[:-1] if compute_row_sq else (0,), **f32)
    hidden = torch.empty((n, h_size), **f32)
    mean = torch.empty((2, n), **f32)
    rstd = torch.empty((n,), **f32)
    proj = torch.empty(stack + (2, h_size) if pre else (0,), **f32)
    outputs = (out, row_sq, hidden, mean, rstd, proj)
    if n == 0:
        return outputs, []

    e = x.element_size()
    launches = []
    weight = down_weight
    if pre:
        weight, fold = plan_fold_ln(down_weight, ln_weight, ln_bias, proj, x.dtype, limits)
        launches.append(fold)
    has_dropout, p, keep_scale = _dropout_args(dropout_p)
    cfg, per_sm, first_read = _forward_config(h_size, d, x.dtype, limits, routed)
    blocks = _cdiv(n, cfg.BM)
    programs = min(blocks, per_sm * limits.sm_count) if per_sm else blocks
    perm = table = drop = keep = mean
    if routed:  # one program per block of the segment table; each adapter's p and 1 / (1 - p) in the kernel
        perm, table, _ = routing.segments(cfg.BM)
        blocks = programs = table.shape[0]
        has_dropout, p, keep_scale, drop, keep = routing.has_dropout, 0.0, 1.0, routing.dropout_p, routing.keep
    meta = _meta(cfg, ACT=activation, HAS_DROPOUT=has_dropout, HAS_SCALE=scale is not None, RESIDUAL=residual,
                 STORE_ROW_SQ=compute_row_sq, DOT_F32=_dot_f32(x.dtype, limits, h_size),
                 FIRST_READ=first_read, GRID_STRIDE=programs < blocks, ROUTED=routed)
    common = (_optional(dropout_seed, mean), _optional(scale, mean), perm, table, drop, keep,
              n, d, h_size, x2.stride(0), x2.stride(1), eps, p, keep_scale)
    side_bytes = n * (4 * h_size + 12 + (4 if compute_row_sq else 0))  # hidden, mean, rstd, row_sq
    weight_passes = 2 if pre else 3
    if pre:
        args = (x2, out, row_sq, hidden, mean, rstd, proj, weight, up_weight, *common)
    else:
        args = (x2, out, row_sq, hidden, mean, rstd, ln_weight, ln_bias, down_weight, up_weight, *common)
    launches.append(Launch(
        "pre_norm_fwd" if pre else "post_norm_fwd", _pre_norm_fwd_kernel if pre else _post_norm_fwd_kernel,
        (programs,), args, meta,
        hbm_bytes=2 * n * d * e + side_bytes + 2 * h_size * d * e,
        reread_bytes=n * d * e if residual else 0,
        live_bytes_per_program=cfg.BM * d * e,
        l2_bytes=blocks * weight_passes * h_size * d * e,
        elements=n * d, work_units=blocks if programs < blocks else 0,
    ))
    return outputs, launches


def plan_backward(
    grad_out: torch.Tensor,
    grad_row_sq: Optional[torch.Tensor],
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    dropout_seed: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    hidden: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    proj: torch.Tensor,
    activation: str,
    norm_position: str,
    dropout_p: float,
    residual: bool,
    need_dx: bool,
    need_dln: bool,
    need_dwd: bool,
    need_dwu: bool,
    limits: DeviceLimits,
    routing: Optional[Routing] = None,
) -> Tuple[Tuple[torch.Tensor, ...], List[Launch]]:
    """The backward's buffers (allocated, not computed) and the launches that fill them.

    Buffers ``(dx, dln_weight_partials, dln_bias_partials, dwd_partials, dwu_partials)``: ``dx`` like
    ``x`` (or ``(0,)`` when not needed), the weight gradients as float32 per-split partials ``(S, ...)``
    that ``linear_adapter_backward`` sums in a fixed order. Nothing is read, so any device works.

    With ``routing`` (a mixed batch; the weights, scale and ``proj`` stacked per adapter, ``dropout_p``
    ignored for ``routing``'s), the same kernels run over the rows grouped by adapter: the rows pass
    over blocks of one adapter's rows, the columns pass over chunks of them, and a last launch per
    weight gradient adds each adapter's chunks in order (``_segment_sum_kernel``): the weight gradients
    come back as float32 ``(A, ...)`` totals, zero for adapters no row chose.
    """
    d = x.shape[-1]
    h_size = down_weight.shape[-2]
    x2 = x.reshape(-1, d)
    g2 = grad_out.reshape(-1, d)
    n = x2.shape[0]
    q = grad_row_sq.reshape(-1) if grad_row_sq is not None else None
    ln_weight, ln_bias, down_weight, up_weight = (t.contiguous() for t in (ln_weight, ln_bias, down_weight, up_weight))
    f32 = dict(device=x.device, dtype=torch.float32)
    pre = norm_position == "pre"
    e = x.element_size()

    has_dropout, p, keep_scale = _dropout_args(dropout_p)
    routed = routing is not None
    if routed:  # each adapter's p and 1 / (1 - p) come from routing's tensors, in the kernels
        has_dropout, p, keep_scale = routing.has_dropout, 0.0, 1.0
    flags = dict(HAS_DROPOUT=has_dropout, HAS_SCALE=scale is not None, HAS_ROW_SQ_GRAD=q is not None,
                 DOT_F32=_dot_f32(x.dtype, limits, h_size), ROUTED=routed)
    drop_args = (routing.dropout_p, routing.keep) if routed else (mean, mean)
    seed, scale_arg = _optional(dropout_seed, mean), _optional(scale, mean)
    q_arg, q_stride = (q, q.stride(0)) if q is not None else (mean, 0)
    acts = x.new_empty((n, h_size), dtype=_operand_dtype(x.dtype, limits))  # act(h)
    dh = torch.empty_like(acts)
    k = torch.empty((2, n), **f32)
    launches = []

    need_rows = need_dx or need_dwd or (need_dln if pre else need_dwu)
    need_acts = need_dwu or (not pre and need_dln)
    if (need_rows or need_acts) and n > 0:
        # The row_sq gradient keeps a live through the pre-norm loop as well: a tighter budget.
        cfg = _rows_pass_config(pre, q is not None, h_size, d, x.dtype, limits)
        programs = _cdiv(n, cfg.BM)
        perm = table = mean
        if routed:
            perm, table, _ = routing.segments(cfg.BM)
            programs = table.shape[0]
        tail = (acts, dh, k, perm, table, *drop_args, n, d, h_size, g2.stride(0), g2.stride(1), q_stride, p,
                keep_scale)
        meta = _meta(cfg, ACT=activation, **flags)
        if pre:
            args = (g2, q_arg, hidden, proj, up_weight, seed, scale_arg, *tail)
        else:
            up_shifted, gram, delta, fold = _plan_up_weight_fold(up_weight, acts.dtype, flags["DOT_F32"])
            launches += fold
            args = (g2, q_arg, hidden, rstd, ln_weight, ln_bias, up_shifted, gram, delta, seed, scale_arg, *tail)
            meta["BK"] = 16
        launches.append(Launch(
            "pre_norm_bwd_rows" if pre else "post_norm_bwd_rows",
            _pre_norm_bwd_rows_kernel if pre else _post_norm_bwd_rows_kernel, (programs,), args, meta,
            hbm_bytes=n * d * e + n * h_size * (4 + 2 * acts.element_size()) + 24 * n + h_size * d * e,
            reread_bytes=0, live_bytes_per_program=0,
            l2_bytes=programs * h_size * (d * e + (0 if pre else h_size * acts.element_size())), elements=n * d,
            element_loops=0 if pre else 1,  # post norm's second loop steps through Gc, H / BK times
        ))

    need = dict(NEED_DX=need_dx, NEED_DLN=need_dln, NEED_DWD=need_dwd, NEED_DWU=need_dwu)
    chunk_starts = {}  # routed: each partial's chunk table's per-adapter starts
    groups = _column_groups(pre, need, h_size, d, x.dtype, limits) if any(need.values()) else []
    dx = x.new_empty(x.shape if need_dx else (0,))
    partials = {name: torch.empty((0,), **f32) for name in ("dwd", "dwu", "dlnw", "dlnb")}
    for group in groups:
        cfg = _col_config(h_size, d, x.dtype, limits, accumulators=int(group["NEED_DWD"]) + int(group["NEED_DWU"]))
        if routed:
            # The gathered rows and the adapter's offsets cost registers: with 4 warps the routed columns
            # pass spilled at H = 64 and 256 (bf16, compiled for sm_90); 8 warps do not.
            cfg = cfg._replace(num_warps=8)
        n_col = _cdiv(d, cfg.BD)
        splits, rows_per_split = _row_splits(n, n_col, cfg.BM, limits)
        perm = chunks = mean
        if routed:
            perm, chunks, starts = routing.segments(rows_per_split)
            splits = chunks.shape[0]
        group_partials = dict(dwd=(group["NEED_DWD"], (h_size, d)), dwu=(group["NEED_DWU"], (d, h_size)),
                              dlnw=(group["NEED_DLN"], (d,)), dlnb=(group["NEED_DLN"], (d,)))
        for name, (needed, shape) in group_partials.items():
            if needed:
                partials[name] = torch.empty((splits,) + shape, **f32)
                if routed:
                    chunk_starts[name] = starts
        reads_dh = group["NEED_DX"] or group["NEED_DWD"] or (pre and group["NEED_DLN"])
        reads_x = group["NEED_DWD"] or (pre and (group["NEED_DX"] or group["NEED_DLN"]))
        nd_bytes = n * d * e * (1 + int(reads_x) + int(group["NEED_DX"]))  # dout, x, dx
        reads_acts = group["NEED_DWU"] or (not pre and group["NEED_DLN"])
        hid_bytes = n * h_size * acts.element_size() * (int(reads_dh) + int(reads_acts))
        partial_bytes = 4 * splits * d * (h_size * (int(group["NEED_DWD"]) + int(group["NEED_DWU"]))
                                          + 2 * int(group["NEED_DLN"]))
        launches.append(Launch(
            "bwd_cols", _bwd_cols_kernel, (n_col, splits),
            (x2, g2, q_arg, acts, dh, mean, rstd, k, ln_weight, ln_bias, down_weight, up_weight, seed, scale_arg,
             dx, partials["dwd"], partials["dwu"], partials["dlnw"], partials["dlnb"], perm, chunks, *drop_args,
             n, d, h_size, x2.stride(0), x2.stride(1), g2.stride(0), g2.stride(1), q_stride,
             rows_per_split, p, keep_scale),
            _meta(cfg, **flags, RESIDUAL=residual, **group, PRE_NORM=pre),
            hbm_bytes=nd_bytes + hid_bytes + 12 * n + 2 * h_size * d * e + partial_bytes,
            reread_bytes=0, live_bytes_per_program=0,
            l2_bytes=(n_col - 1) * (hid_bytes + 20 * n), elements=n * d,
        ))
    for name, starts in chunk_starts.items():
        partials[name], total = _plan_segment_sum(partials[name], starts)
        launches.append(total)
    return (dx, partials["dlnw"], partials["dlnb"], partials["dwd"], partials["dwu"]), launches


def _plan_segment_sum(partial: torch.Tensor, starts: torch.Tensor) -> Tuple[torch.Tensor, Launch]:
    """Each adapter's total of a routed columns pass's float32 chunk partials ``(C, ...)``: ``(A, ...)``,
    adapter a's chunks ``starts[a]:starts[a + 1]`` added in order (none: zero)."""
    a_count = starts.shape[0] - 1
    total = torch.empty((a_count,) + partial.shape[1:], device=partial.device, dtype=torch.float32)
    size = partial[0].numel() if partial.shape[0] else total[0].numel()
    block = 1024
    return total, Launch("segment_sum", _segment_sum_kernel, (a_count, _cdiv(size, block)),
                         (partial, total, starts, size), dict(BLOCK=block),
                         hbm_bytes=4 * (partial.numel() + total.numel()), reread_bytes=0, live_bytes_per_program=0,
                         l2_bytes=0, elements=total.numel())


def _run(launches: List[Launch], limits: DeviceLimits) -> None:
    """Launch each kernel; a block that does not fit the device is retried without software
    pipelining, then refused with an error that names it (never a failure inside Triton)."""
    for launch in launches:
        try:
            launch.kernel[launch.grid](*launch.args, **launch.meta)
        except triton.runtime.errors.OutOfResources as error:
            if launch.meta.get("num_stages", 1) > 1:
                launch.kernel[launch.grid](*launch.args, **dict(launch.meta, num_stages=1))
                continue
            raise RuntimeError(
                f"the triton kernel {launch.name} needs more than {limits.name} offers ({error}); "
                "use backend='reference' for this shape"
            ) from error


def linear_adapter_forward(x: torch.Tensor, *args: Any) -> Tuple[torch.Tensor, ...]:
    """Run the forward on inputs validated by ``ops.linear_adapter``: ``plan_forward``'s arguments
    without ``limits`` (taken from ``x``'s device); returns ``plan_forward``'s outputs."""
    limits = device_limits(x.device)
    outputs, launches = plan_forward(x, *args, limits)
    _run(launches, limits)
    return outputs


def linear_adapter_backward(grad_out: torch.Tensor, grad_row_sq: Optional[torch.Tensor], x: torch.Tensor,
                            *args: Any) -> Tuple[torch.Tensor, ...]:
    """Run the backward: ``plan_backward``'s arguments without ``limits``; returns ``(dx, d_ln_weight,
    d_ln_bias, d_down, d_up)``, the weight gradients summed over their row splits in a fixed order.

    Gradients not asked for come back as empty ``(0,)`` tensors (and cost nothing); the others have
    the shape and dtype of their inputs. ``grad_row_sq`` is None when row_sq has no gradient.
    """
    limits = device_limits(x.device)
    (dx, dlnw, dlnb, dwd, dwu), launches = plan_backward(grad_out, grad_row_sq, x, *args, limits)
    _run(launches, limits)
    ln_weight, ln_bias, down_weight, up_weight = args[:4]

    def reduce(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not partial.numel():
            return like.new_empty((0,))
        return (partial[0] if partial.shape[0] == 1 else partial.sum(0)).to(like.dtype)  # one launch fewer at S = 1

    return dx, reduce(dlnw, ln_weight), reduce(dlnb, ln_bias), reduce(dwd, down_weight), reduce(dwu, up_weight)
