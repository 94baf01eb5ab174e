"""The fused bottleneck adapter op: one entry point, backends behind it.

See ``fusedadapters.ops.reference`` for the math (it is the specification).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import reference
from .backend import resolve_backend

__all__ = ["linear_adapter"]


def linear_adapter(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    *,
    activation: str = "swish",
    norm_position: str = "pre",
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    residual: bool = True,
    return_row_sq: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``[x +] s · drop(adapter(x))``; with ``return_row_sq`` also ``Σ_d (s · drop(adapter(x)))²`` per row."""
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = reference.draw_dropout_seed(x.device)
    name = resolve_backend(backend, x.device)
    if name != "reference":
        raise NotImplementedError("TEMPORARY: triton path is being written")
    out, row_sq = reference.linear_adapter(
        x, ln_weight, ln_bias, down_weight, up_weight,
        activation=activation, norm_position=norm_position, eps=eps, dropout_p=dropout_p,
        dropout_seed=dropout_seed, scale=scale, residual=residual,
    )
    return (out, row_sq) if return_row_sq else out
