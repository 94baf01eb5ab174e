"""The routed adapter (a mixed batch: row n goes through adapter k = index[n], or none) on the Triton backend.

Math as in ``fusedadapters.ops.reference_multi.routed_adapter``. The kernels and their plans are the
single adapter's (``fusedadapters.ops.triton.linear_adapter``, ``plan_forward`` and ``plan_backward``
with a ``Routing``); this module groups the rows and launches them. Weights are stacked:
``γ, β (A, D)``, ``Wd (A, H, D)``, ``Wu (A, D, H)``.

Segments, as in Punica's SGMV, built on the device without a host synchronisation::

    perm      = stable argsort of index         rows grouped by adapter; segment 0 holds the rows
    count[s]  = rows of segment s                with index -1, segment s >= 1 adapter s - 1
    table[p]  = (adapter, first, end)            program p's rows: perm[first:end], inside one segment

The table has one entry per block of rows of each segment; its length is bounded by
``cdiv(N, block) + A + 1``, the grid launched, and programs past the last block find ``first = end``.
A program reads its adapter's weights like the single-adapter kernel, and writes its rows in place
(gathered through ``perm``; nothing is permuted in memory). The dropout mask of a row is hashed from
its position in the whole batch, so a row's output does not depend on the others.

Forward: the single adapter's forward, one program per block of the table (pre norm folds every
adapter's LayerNorm into its down-projection first); rows without an adapter copy x or write 0.
Backward: the rows pass over blocks of the table (a, dh, k1, k2 per row; post norm on each adapter's
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

from .linear_adapter import DeviceLimits, Routing, _cdiv, _run, device_limits, plan_backward, plan_forward

__all__ = ["KernelLaunch", "record_launches", "routed_adapter_backward", "routed_adapter_forward", "segment_table"]


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
    programs = _cdiv(n, block) + n_adapters + 1
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


def device_floats(values: Tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a float32 tensor on ``device``, made once (no host-to-device copy per call)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _dropout_tensors(dropout_p: List[float], device: torch.device) -> Tuple[bool, torch.Tensor, torch.Tensor]:
    """(HAS_DROPOUT, p per adapter, 1 / (1 - p) per adapter, 0 where p >= 1)."""
    probs = device_floats(tuple(dropout_p), device)
    keep = device_floats(tuple(0.0 if p >= 1.0 else 1.0 / (1.0 - p) for p in dropout_p), device)
    return any(p > 0.0 for p in dropout_p), probs, keep


def _routing(adapter_index: torch.Tensor, a_count: int, dropout_p: List[float], device: torch.device) -> Routing:
    has_dropout, probs, keep = _dropout_tensors(dropout_p, device)
    return Routing(functools.partial(segment_table, adapter_index, a_count), probs, keep, has_dropout)


def _run_or_record(launches: List[Any], limits: DeviceLimits) -> None:
    """Run the planned launches, or inside ``record_launches`` append them to its list instead."""
    recording = _RECORDING.get()
    if recording is None:
        _run(launches, limits)
    else:
        recording.extend(KernelLaunch(l.kernel.fn.__name__, l.kernel, l.grid, l.args, l.meta) for l in launches)


def routed_adapter_forward(
    x, adapter_index, ln_weight, ln_bias, down_weight, up_weight, dropout_seed: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], dropout_p: List[float], activation: str, norm_position: str, eps: float,
    residual: bool, compute_row_sq: bool, limits: Optional[DeviceLimits] = None,
):
    """Launch the forward on inputs validated by ``ops.routed_adapter``: the single adapter's kernels and
    plan (``linear_adapter.plan_forward``) over the rows grouped by adapter.

    Returns ``(out, row_sq, hidden, mean, rstd, proj)``: ``out`` like ``x``, ``row_sq`` float32
    ``x.shape[:-1]`` (or ``(0,)``), and for backward ``hidden`` float32 (N, H), ``mean`` (2, N), ``rstd``
    (N,) (rows without an adapter hold garbage there), ``proj`` (A, 2, H) for pre norm, else (0,).
    """
    limits = limits or device_limits(x.device)
    outputs, launches = plan_forward(
        x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, activation, norm_position, eps, 0.0,
        residual, compute_row_sq, limits, _routing(adapter_index, down_weight.shape[0], dropout_p, x.device),
    )
    _run_or_record(launches, limits)
    return outputs


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
    (dx, *grads), launches = plan_backward(
        grad_out, grad_row_sq, x, ln_weight, ln_bias, down_weight, up_weight, dropout_seed, scale, hidden, mean,
        rstd, proj, activation, norm_position, 0.0, residual, need_dx, need_dln, need_dwd, need_dwu, limits,
        _routing(adapter_index, down_weight.shape[0], dropout_p, x.device),
    )
    _run_or_record(launches, limits)
    likes = (ln_weight, ln_bias, down_weight, up_weight)
    return (dx, *(g.to(like.dtype) if g.numel() else like.new_empty((0,)) for g, like in zip(grads, likes)))
