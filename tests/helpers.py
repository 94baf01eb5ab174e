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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / ‖b‖ in float64 (over 1e-6 where ‖b‖ vanishes, e.g. dγ of a LayerNorm over one column)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def load_script(path, name: str):
    """Import a script (``bench/*.py``) as module ``name``, once per session."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]
