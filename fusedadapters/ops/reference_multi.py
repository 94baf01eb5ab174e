"""Pure-PyTorch references of the many-adapter ops: the specification their kernels are tested against.

Both build on ``fusedadapters.ops.reference.linear_adapter`` (notation and dropout hash there).

Routed batch (``routed_adapter``): row ``n`` of ``x`` (N×D after flattening the leading dims) goes
through adapter ``k = adapter_index[n]`` of a stack of A adapters, or through none when ``k = -1``::

    y[n]      = s_k · drop_k(adapter_k(x[n]))       (0 when k = -1)
    out[n]    = [x[n] +] y[n]
    row_sq[n] = Σ_d y[n, d]²

with ``drop_k`` the dropout of probability ``dropout_p[k]`` whose mask is ``dropout_uniform(seed, N, D)``
at the row's position ``n`` in the whole batch, and ``s_k`` the k-th entry of ``scale`` (or 1).
Weights are stacked: ``ln_weight, ln_bias (A, D)``, ``down_weight (A, H, D)``, ``up_weight (A, D, H)``.
Adapters of smaller hidden size are padded to H with zeros, which is exact: every activation has
``act(0) = 0``, so a zero row of ``down_weight`` and zero column of ``up_weight`` add nothing (and get
zero gradients).

Chain (``adapter_chain``): K adapters under the residual strategy, applied one after another::

    x_0 = x,   x_{k+1} = x_k + s_k · drop_k(adapter_k(x_k)),   out = x_K,
    row_sq_k[n] = Σ_d (x_{k+1} - x_k)[n, d]²
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import reference
from .adapter_params import AdapterParams

__all__ = ["adapter_chain", "routed_adapter"]


def routed_adapter(
    x: torch.Tensor,
    adapter_index: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    *,
    activation: str = "swish",
    norm_position: str = "pre",
    eps: float = 1e-5,
    dropout_p: Sequence[float] = (),
    dropout_seed: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    residual: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, row_sq)`` of a routed batch as defined in the module docstring; autograd differentiates it.

    ``adapter_index`` has shape ``x.shape[:-1]`` (int64, -1 for no adapter); ``dropout_p`` has one entry
    per adapter (empty: no dropout); ``scale`` is None or ``(A,)``. ``out`` has the shape and dtype of
    ``x``; ``row_sq`` has shape ``x.shape[:-1]`` and dtype float32 (float64 for float64 inputs).
    """
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    index = adapter_index.reshape(-1)
    n = x2.shape[0]
    uniform = None
    if any(p > 0.0 for p in dropout_p):
        if dropout_seed is None:
            raise ValueError("dropout_p > 0 needs a dropout_seed (see reference.draw_dropout_seed)")
        uniform = reference.dropout_uniform(dropout_seed, n, d).to(x.device)
    y = torch.zeros_like(x2)
    for k in range(ln_weight.shape[0]):
        rows = (index == k).nonzero().reshape(-1)
        if rows.numel() == 0:
            continue
        y_k, _ = reference.linear_adapter(
            x2.index_select(0, rows), ln_weight[k], ln_bias[k], down_weight[k], up_weight[k],
            activation=activation, norm_position=norm_position, eps=eps, residual=False,
        )
        p = dropout_p[k] if dropout_p else 0.0
        if p > 0.0:
            keep = uniform.index_select(0, rows) >= p
            y_k = y_k * keep.to(y_k.dtype) * (0.0 if p >= 1.0 else 1.0 / (1.0 - p))
        if scale is not None:
            y_k = y_k * scale[k].to(y_k.dtype)
        y = y.index_copy(0, rows, y_k)
    row_sq = y.to(torch.promote_types(y.dtype, torch.float32)).square().sum(dim=-1)
    out = x2 + y if residual else y
    return out.reshape(x.shape), row_sq.reshape(x.shape[:-1])


def adapter_chain(
    x: torch.Tensor,
    adapters: Sequence[AdapterParams],
    *,
    dropout_seeds: Optional[Sequence[Optional[torch.Tensor]]] = None,
    scales: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(out, [row_sq_k])`` of K adapters applied one after another under the residual strategy.

    ``dropout_seeds[k]`` (needed where ``adapters[k].dropout_p > 0``) and ``scales[k]`` (a one-element
    tensor or None for 1) belong to adapter k. Each ``row_sq_k`` has shape ``x.shape[:-1]``.
    """
    row_sqs = []
    for k, params in enumerate(adapters):
        x, row_sq = reference.linear_adapter(
            x, params.ln_weight, params.ln_bias, params.down_weight, params.up_weight,
            activation=params.activation, norm_position=params.norm_position, eps=params.eps,
            dropout_p=params.dropout_p, dropout_seed=dropout_seeds[k] if dropout_seeds else None,
            scale=scales[k] if scales else None, residual=True,
        )
        row_sqs.append(row_sq)
    return x, row_sqs
