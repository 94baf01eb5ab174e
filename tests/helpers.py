"""Helpers shared by the tests.

A fresh adapter is the identity under residual add (its last layer starts at zero), so every test
that compares outputs first gives the adapters random non-zero weights with ``randomize_``.
"""

from typing import Iterable, Iterator, Optional

import torch
from torch import nn


def randomize_(parameters: Iterable[torch.Tensor], *, seed: int = 0, std: float = 0.3, mean: float = 0.0) -> int:
    """Fill each parameter in place with N(mean, std²) from a generator seeded with ``seed`` (drawn on
    the CPU, so the values do not depend on the device); returns how many parameters were filled."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=generator) * std + mean)
            count += 1
    return count


def adapter_parameters(model: nn.Module, name: Optional[str] = None) -> Iterator[nn.Parameter]:
    """The parameters of every adapter called ``name`` under ``model`` (of every adapter when None)."""
    for qualified, p in model.named_parameters():
        parts = qualified.split(".")
        if "adapter_layer" in parts:
            adapter = parts[parts.index("adapter_layer") + 1]
            if name is None or adapter == name:
                yield p
