"""``AdapterParams``: one bottleneck adapter's tensors and options, as the multi-adapter ops take them.

An adapter module that can join a fused chain or a routed batch returns one of these from
``fused_adapter_params(dtype)`` (see ``fusedadapters.routing``); the ops only see tensors and options.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["AdapterParams"]


class AdapterParams(NamedTuple):
    """The arguments of ``ops.linear_adapter`` for one adapter, besides ``x`` and the call options.

    Shapes: ``ln_weight, ln_bias (D,)``, ``down_weight (H, D)``, ``up_weight (D, H)``; the math is that
    of ``fusedadapters.ops.reference.linear_adapter``.
    """

    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    down_weight: torch.Tensor
    up_weight: torch.Tensor
    activation: str = "swish"
    norm_position: str = "pre"
    eps: float = 1e-5
    dropout_p: float = 0.0

    @property
    def hidden_size(self) -> int:
        return self.down_weight.shape[0]
