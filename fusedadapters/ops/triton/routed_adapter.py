"""Triton kernels of the routed adapter (a mixed batch: row n goes through adapter k = index[n], or none).

Math as in ``fusedadapters.ops.reference_multi.routed_adapter``; the per-adapter math and the device
helpers are those of ``fusedadapters.ops.triton.linear_adapter`` (imported, not repeated). Weights are
stacked: ``γ, β (A, D)``, ``Wd (A, H, D)``, ``Wu (A, D, H)``.

Segments, as in Punica's SGMV, built on the device without a host synchronisation::

    perm      = stable argsort of index         rows grouped by adapter; segment 0 holds the rows
    count[s]  = rows of segment s                with index -1, segment s >= 1 adapter s - 1
    table[p]  = (adapter, first, end)            program p's rows: perm[first:end], inside one segment

The table has one entry per block of BM rows of each segment; its length is bounded by
``cdiv(N, BM) + A + 1``, the grid launched, and programs past the last block find ``first = end``.
A program reads its adapter's weights once per chunk of D like the single-adapter kernel, and writes
its rows in place (gathered through ``perm``; nothing is permuted in memory). The dropout mask of a
row is hashed from its position in the whole batch, so a row's output does not depend on the others.

Forward: one launch (``_routed_fwd_kernel``, both norm positions, rows of segment 0 copy x or write 0).
Backward: the single adapter's kernels and plan (``linear_adapter.plan_backward`` with a ``Routing``):
the rows pass over blocks of the segment table (a, dh, k1, k2 per row; post norm on each adapter's
folded up weight), the columns pass over a coarser table of row chunks (each program: one D slice of
one chunk of one segment) that writes dx and float32 partial weight gradients per chunk, and
``_segment_sum_kernel`` adds each adapter's chunks in a fixed order. No atomics: deterministic.
Adapters no row chose get zero gradients.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreter_enabled
from . import fix_interpreter_scalar_index
from .linear_adapter import (
    DeviceLimits,
    Routing,
    _act,
    _dot,
    _drop_scale,
    _fold_ln_kernel,
    _load_scale,
    _normalize,
    _row_hash,
    _run,
    _store_stats,
    _up_projection_stats,
    device_limits,
    plan_backward,
)

__all__ = ["KernelLaunch", "record_launches", "routed_adapter_backward", "routed_adapter_forward", "segment_table"]

if triton_interpreter_enabled():
    fix_interpreter_scalar_index()


@triton.jit
def _segment(TABLE, pid):
    """(adapter, first, end) of program ``pid``: positions first..end-1 of the permutation."""
    return tl.load(TABLE + pid * 3), tl.load(TABLE + pid * 3 + 1), tl.load(TABLE + pid * 3 + 2)


@triton.jit
def _adapter_scalars(SCALE, DROP_P, KEEP, adapter, HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """This adapter's stochastic-depth scale, dropout probability and 1 / (1 - p)."""
    scale = _load_scale(SCALE + adapter, HAS_SCALE)
    if HAS_DROPOUT:
        return scale, tl.load(DROP_P + adapter), tl.load(KEEP + adapter)
    else:
        return scale, 0.0, 1.0


@triton.jit
def _adapter_rows_fwd(
    x_rows, stride_xd, out_rows, rows, row_ok, HID, MEAN, RSTD, ROW_SQ, ln_w, ln_b, wd_ptr, wu_ptr, proj_ptr,
    N, D, H, eps, scale, dropout_p, keep_scale, row_hash,
    ACT: tl.constexpr, PRE_NORM: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
    RESIDUAL: tl.constexpr, STORE_ROW_SQ: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
):
    """One adapter over a block of BM rows (the math of linear_adapter's forward kernels).

    ``x_rows``/``out_rows`` point at the rows' first elements (BM×1), ``rows`` index the row outputs:
    HID (N, H), MEAN (2, N), RSTD (N,), ROW_SQ (N,). ``ln_w``…``proj_ptr`` point at this adapter's
    weights; for pre norm ``wd_ptr`` is the folded ``Wd∘γ`` and ``proj_ptr`` its (g, b) = (Wd γ, Wd β)
    (``_fold_ln_kernel``, once per call)."""
    hcols = tl.arange(0, BH)
    h_ok = hcols < H
    dot_dtype = x_rows.dtype.element_ty
    if PRE_NORM:
        # Pass 1: A = (x - c)(Wd∘γ)ᵀ and shifted moments (c: mean of the first chunk).
        cols = tl.arange(0, BD)
        first_mask = row_ok[:, None] & (cols < D)[None, :]
        shift = tl.sum(tl.load(x_rows + cols[None, :] * stride_xd, mask=first_mask, other=0.0).to(tl.float32), 1)
        shift = shift / tl.sum((cols < D).to(tl.float32), 0)
        acc = tl.zeros((BM, BH), tl.float32)
        s1 = tl.zeros((BM,), tl.float32)
        s2 = tl.zeros((BM,), tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            d_ok = cols < D
            mask = row_ok[:, None] & d_ok[None, :]
            x = tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - shift[:, None], 0.0)
            s1 += tl.sum(xc, 1)
            s2 += tl.sum(xc * xc, 1)
            wg_t = tl.load(wd_ptr + hcols[None, :] * D + cols[:, None], mask=d_ok[:, None] & h_ok[None, :], other=0.0)
            acc += _dot(xc, wg_t, DOT_F32, dot_dtype)
        g = tl.load(proj_ptr + hcols, mask=h_ok, other=0.0)
        b = tl.load(proj_ptr + H + hcols, mask=h_ok, other=0.0)
        mean_c = s1 / D
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 / D - mean_c * mean_c, 0.0) + eps)
        h = rstd[:, None] * (acc - mean_c[:, None] * g[None, :]) + b[None, :]
    else:
        h = tl.zeros((BM, BH), tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            d_ok = cols < D
            x = tl.load(x_rows + cols[None, :] * stride_xd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wd_t = tl.load(wd_ptr + hcols[None, :] * D + cols[:, None], mask=d_ok[:, None] & h_ok[None, :], other=0.0)
            h += _dot(x, wd_t, DOT_F32, dot_dtype)
    tl.store(HID + rows[:, None] * H + hcols[None, :], h, mask=row_ok[:, None] & h_ok[None, :])
    a = _act(h, ACT)
    if not PRE_NORM:
        shift, mean_c, rstd = _up_projection_stats(a, wu_ptr, hcols, h_ok, D, H, eps, DOT_F32, dot_dtype, BM, BD)
    _store_stats(MEAN, RSTD, rows, row_ok, N, shift, mean_c, rstd)

    # Last pass: out = [x +] s m y with y = a Wuᵀ (pre) or LN(a Wuᵀ) (post).
    sq = tl.zeros((BM,), tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        d_ok = cols < D
        mask = row_ok[:, None] & d_ok[None, :]
        wu_t = tl.load(wu_ptr + cols[None, :] * H + hcols[:, None], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        y = _dot(a, wu_t, DOT_F32, dot_dtype)
        if not PRE_NORM:
            gamma = tl.load(ln_w + cols, mask=d_ok, other=0.0).to(tl.float32)
            beta = tl.load(ln_b + cols, mask=d_ok, other=0.0).to(tl.float32)
            y = _normalize(y, shift, mean_c, rstd, mask) * gamma[None, :] + beta[None, :]
        z = _drop_scale(y, row_hash, cols, scale, dropout_p, keep_scale, HAS_DROPOUT, HAS_SCALE)
        z = tl.where(mask, z, 0.0)
        if STORE_ROW_SQ:
            sq += tl.sum(z * z, 1)
        if RESIDUAL:
            z += tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_rows + cols[None, :], z, mask=mask)
    if STORE_ROW_SQ:
        tl.store(ROW_SQ + rows, sq, mask=row_ok)


@triton.jit
def _routed_fwd_kernel(
    X, OUT, ROW_SQ, HID, MEAN, RSTD, LN_W, LN_B, WD, WU, PROJ, PERM, TABLE, SEED, SCALE, DROP_P, KEEP,
    N, D, H, stride_xn, stride_xd, eps,
    ACT: tl.constexpr, PRE_NORM: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SCALE: tl.constexpr,
    RESIDUAL: tl.constexpr, STORE_ROW_SQ: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
):
    pid = tl.program_id(0)
    adapter, first, end = _segment(TABLE, pid)
    pos = first + tl.arange(0, BM)
    row_ok = pos < end
    rows = tl.load(PERM + pos, mask=row_ok, other=0).to(tl.int64)
    x_rows = X + rows[:, None] * stride_xn
    out_rows = OUT + rows[:, None] * D
    if adapter < 0:  # rows without an adapter: out = x (residual) or 0, row_sq = 0
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            mask = row_ok[:, None] & (cols < D)[None, :]
            z = tl.zeros((BM, BD), tl.float32)
            if RESIDUAL:
                z += tl.load(x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_rows + cols[None, :], z, mask=mask)
        if STORE_ROW_SQ:
            tl.store(ROW_SQ + rows, tl.zeros((BM,), tl.float32), mask=row_ok)
    else:
        a64 = adapter.to(tl.int64)
        scale, dropout_p, keep_scale = _adapter_scalars(SCALE, DROP_P, KEEP, adapter, HAS_SCALE, HAS_DROPOUT)
        row_hash = _row_hash(SEED, rows) if HAS_DROPOUT else rows
        _adapter_rows_fwd(
            x_rows, stride_xd, out_rows, rows, row_ok, HID, MEAN, RSTD, ROW_SQ,
            LN_W + a64 * D, LN_B + a64 * D, WD + a64 * H * D, WU + a64 * D * H, PROJ + a64 * 2 * H,
            N, D, H, eps, scale, dropout_p, keep_scale, row_hash,
            ACT, PRE_NORM, HAS_DROPOUT, HAS_SCALE, RESIDUAL, STORE_ROW_SQ, DOT_F32, BM, BD, BH,
        )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


class KernelLaunch(NamedTuple):
    """One kernel launch as a launcher makes it: ``kernel[grid](*args, **meta)``."""

    name: str
    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    meta: Dict[str, Any]


_RECORDING: "contextvars.ContextVar[Optional[List[KernelLaunch]]]" = contextvars.ContextVar(
    "fusedadapters_record_launches", default=None
)


@contextlib.contextmanager
def record_launches() -> Iterator[List[KernelLaunch]]:
    """Inside, the launchers of the routed kernels append their launches to the yielded list
    instead of running them (their outputs stay uninitialised): the static kernel report compiles them."""
    launches: List[KernelLaunch] = []
    token = _RECORDING.set(launches)
    try:
        yield launches
    finally:
        _RECORDING.reset(token)


def _launch(kernel: Any, grid: Tuple[int, ...], *args: Any, **meta: Any) -> None:
    launches = _RECORDING.get()
    if launches is None:
        kernel[grid](*args, **meta)
    else:
        launches.append(KernelLaunch(kernel.fn.__name__, kernel, tuple(grid), args, meta))


class Segments(NamedTuple):
    """Rows grouped by adapter: ``perm`` (N,) int32, ``table`` (G, 3) int32 rows of (adapter, first,
    end) for G = ``cdiv(N, block) + A + 1`` programs (the spare ones at the end have no rows), and
    ``first_chunk`` (A + 1,) int32: adapter a owns table entries ``first_chunk[a]:first_chunk[a + 1]``."""

    perm: torch.Tensor
    table: torch.Tensor
    first_chunk: torch.Tensor


_SEGMENT_CACHE_SIZE = 8
_SEGMENTS: "OrderedDict[tuple, tuple]" = OrderedDict()


def segment_table(index: torch.Tensor, n_adapters: int, block: int) -> Segments:
    """Group the rows of ``index`` (int64 in [-1, A), any shape, rows in flattened order) into
    per-adapter segments cut into blocks of ``block`` rows; everything is computed on the device,
    without reading it back on the host.

    The tables of the last few index tensors are kept (keyed by identity and ``_version``), so the
    layers of a routed model, and a backward after its forward, build them once."""
    key = (id(index), index._version, n_adapters, block)
    entry = _SEGMENTS.get(key)
    if entry is not None and entry[0]() is index:
        _SEGMENTS.move_to_end(key)
        return entry[1]
    segments = _build_segments(index, n_adapters, block)
    _SEGMENTS[key] = (weakref.ref(index), segments)
    while len(_SEGMENTS) > _SEGMENT_CACHE_SIZE:
        _SEGMENTS.popitem(last=False)
    return segments


def _build_segments(index: torch.Tensor, n_adapters: int, block: int) -> Segments:
    index = index.reshape(-1)
    n = index.numel()
    device = index.device
    perm = torch.argsort(index, stable=True).to(torch.int32)
    counts = torch.bincount(index + 1, minlength=n_adapters + 1)[: n_adapters + 1]
    seg_first = torch.cumsum(counts, 0) - counts
    blocks = (counts + block - 1) // block
    block_end = torch.cumsum(blocks, 0)
    programs = triton.cdiv(n, block) + n_adapters + 1
    pid = torch.arange(programs, device=device)
    seg = torch.searchsorted(block_end, pid, right=True).clamp_max(n_adapters)
    block_in_seg = pid - (block_end[seg] - blocks[seg])
    first = seg_first[seg] + block_in_seg * block
    end = seg_first[seg] + counts[seg]
    past = pid >= block_end[-1]  # spare programs: no rows, and the cheap no-adapter branch
    adapter = torch.where(past, -1, seg - 1)
    first = torch.where(past, 0, first)
    end = torch.where(past, 0, torch.minimum(end, first + block))
    table = torch.stack([adapter, first, end], dim=1).to(torch.int32).contiguous()
    return Segments(perm, table, block_end.to(torch.int32))


class _Blocks(NamedTuple):
    BH: int
    BM: int
    BD: int
    num_warps: int


def _blocks(h: int, d: int) -> _Blocks:
    """Block sizes of the forward. Under the interpreter row blocks are small, so that tests cover
    several blocks per segment."""
    bh = max(16, triton.next_power_of_2(h))
    bm, bd = (64 if bh <= 32 else 32 if bh <= 128 else 16), (64 if bh <= 128 else 32 if bh <= 256 else 16)
    if triton_interpreter_enabled():
        bm = 16
    return _Blocks(bh, bm, min(bd, max(16, triton.next_power_of_2(d))), 4 if bh < 64 else 8)


def _dot_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpreter_enabled())


@functools.lru_cache(maxsize=64)
def device_floats(values: Tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a float32 tensor on ``device``, made once (no host-to-device copy per call)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _dropout_tensors(dropout_p: List[float], device: torch.device) -> Tuple[bool, torch.Tensor, torch.Tensor]:
    """(HAS_DROPOUT, p per adapter, 1 / (1 - p) per adapter, 0 where p >= 1)."""
    probs = device_floats(tuple(dropout_p), device)
    keep = device_floats(tuple(0.0 if p >= 1.0 else 1.0 / (1.0 - p) for p in dropout_p), device)
    return any(p > 0.0 for p in dropout_p), probs, keep


def routed_adapter_forward(
    x, adapter_index, ln_weight, ln_bias, down_weight, up_weight, dropout_seed: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], dropout_p: List[float], activation: str, norm_position: str, eps: float,
    residual: bool, compute_row_sq: bool,
):
    """Launch the forward on inputs validated by ``ops.routed_adapter``.

    Returns ``(out, row_sq, hidden, mean, rstd, proj)``: ``out`` like ``x``, ``row_sq`` float32
    ``x.shape[:-1]`` (or ``(0,)``), and for backward ``hidden`` float32 (N, H), ``mean`` (2, N), ``rstd``
    (N,) (rows without an adapter hold garbage there), ``proj`` (A, 2, H) for pre norm, else (0,).
    """
    d = x.shape[-1]
    a_count, h_size = down_weight.shape[:2]
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    ln_weight, ln_bias, down_weight, up_weight = (t.contiguous() for t in (ln_weight, ln_bias, down_weight, up_weight))
    f32 = dict(device=x.device, dtype=torch.float32)
    out = x.new_empty(x.shape)
    row_sq = torch.empty(x.shape[:-1] if compute_row_sq else (0,), **f32)
    hidden = torch.empty((n, h_size), **f32)
    mean = torch.empty((2, n), **f32)
    rstd = torch.empty((n,), **f32)
    pre = norm_position == "pre"
    proj = torch.empty((a_count, 2, h_size) if pre else (0,), **f32)
    weight = down_weight
    if pre:  # Wd∘γ, Wd γ and Wd β of every adapter, once per call (the backward's c1 and c2 need the last two)
        weight = torch.empty_like(down_weight, dtype=torch.float32 if _dot_f32(x.dtype) else x.dtype)
        _launch(_fold_ln_kernel, (triton.cdiv(h_size, 4), a_count), down_weight, ln_weight, ln_bias, weight, proj,
                d, h_size, BR=4, BD=min(256, max(16, triton.next_power_of_2(d))), num_warps=4, num_stages=1)
    if n == 0:
        return out, row_sq, hidden, mean, rstd, proj
    cfg = _blocks(h_size, d)
    seg = segment_table(adapter_index, a_count, cfg.BM)
    has_dropout, probs, keep = _dropout_tensors(dropout_p, x.device)
    _launch(
        _routed_fwd_kernel, (seg.table.shape[0],),
        x2, out, row_sq, hidden, mean, rstd, ln_weight, ln_bias, weight, up_weight, proj if pre else mean, seg.perm,
        seg.table,
        dropout_seed if dropout_seed is not None else seg.perm, scale if scale is not None else probs, probs, keep,
        n, d, h_size, x2.stride(0), x2.stride(1), eps,
        ACT=activation, PRE_NORM=pre, HAS_DROPOUT=has_dropout, HAS_SCALE=scale is not None, RESIDUAL=residual,
        STORE_ROW_SQ=compute_row_sq, DOT_F32=_dot_f32(x.dtype), BM=cfg.BM, BD=cfg.BD, BH=cfg.BH,
        num_warps=cfg.num_warps,
    )
    return out, row_sq, hidden, mean, rstd, proj


def routed_adapter_backward(
    grad_out, grad_row_sq, x, adapter_index, ln_weight, ln_bias, down_weight, up_weight,
    dropout_seed: Optional[torch.Tensor], scale: Optional[torch.Tensor], hidden, mean, rstd, proj,
    dropout_p: List[float], activation: str, norm_position: str, residual: bool,
    need_dx: bool, need_dln: bool, need_dwd: bool, need_dwu: bool, limits: Optional[DeviceLimits] = None,
):
    """Launch the backward; returns ``(dx, d_ln_weight, d_ln_bias, d_down, d_up)`` (empty when not needed).

    The single adapter's kernels and plan (``linear_adapter.plan_backward``) over the rows grouped by
    adapter; ``limits`` (default: ``x``'s device) sizes the blocks."""
    limits = limits or device_limits(x.device)
    a_count = down_weight.shape[0]
    has_dropout, probs, keep = _dropout_tensors(dropout_p, x.device)
    routing = Routing(functools.partial(segment_table, adapter_index, a_count), probs, keep, has_dropout)
    (dx, *grads), launches = plan_backward(
        grad_out, grad_row_sq, x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, hidden, mean,
        rstd, proj, activation, norm_position, 0.0, residual, need_dx, need_dln, need_dwd, need_dwu, limits, routing,
    )
    recording = _RECORDING.get()
    if recording is None:
        _run(launches, limits)
    else:
        recording.extend(KernelLaunch(l.kernel.fn.__name__, l.kernel, l.grid, l.args, l.meta) for l in launches)
    likes = (ln_weight, ln_bias, down_weight, up_weight)
    return (dx, *(g.to(like.dtype) if g.numel() else like.new_empty((0,)) for g, like in zip(grads, likes)))
