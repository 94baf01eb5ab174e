"""The adapter chain op: K adapters under the residual strategy, applied one after another.

The math is ``fusedadapters.ops.reference_multi.adapter_chain`` (the specification)::

    x_0 = x,   x_{k+1} = x_k + s_k · drop_k(adapter_k(x_k)),   out = x_K,   row_sq_k = Σ_d (x_{k+1} - x_k)²

Adapters may differ in H, eps, dropout, scale, activation and norm position. The triton backend runs
adapter k as one call of the single-adapter fused op (``ops.linear_adapter(..., residual=True,
backend='triton')``) with its own dropout seed, scale, eps and row_sq; autograd chains the calls, and
each call computes only the gradients its tensors need, so a frozen adapter (no tensor requiring a
gradient) costs only its dx. Other backends run the reference chain.

Why a loop and not one fused kernel: an earlier fused chain kernel (a block of rows passed through
every adapter before it was written back, with the routed op's row math) was about 2× slower than
this loop on an H100 (bench/results/2026-11-25-nvidia-h100-80gb-hbm3/summary.md, 'Many adapters',
bf16 N = 16384 D = 4096 H = 64): forward K = 2 1.165 against 0.5503 ms, K = 8 4.577 against 2.21 ms;
forward and backward K = 2 9.785 against 3.03 ms, K = 8 31.77 against 7.999 ms. Adapter k's row
statistics and down-projection need the whole row of x_k before any element of x_{k+1} exists, and
a block of rows big enough to keep the memory system busy does not fit on chip at such D, so a fused
chain still streams every x_k through memory, as the loop does; what it can save is launches, and at most the merging of adapter k's output
pass with adapter k+1's statistics pass. That pays mainly at small N, where launches dominate the
time; a fused chain for that case is future work.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

from torch import Tensor

from . import reference, reference_multi
from .adapter_params import AdapterParams
from .backend import resolve_backend
from .linear_adapter import linear_adapter

__all__ = ["adapter_chain"]


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
    for p, seed, scale in zip(adapters, seeds, scale_list):
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
