"""Adapter strategies: how an adapter's output merges with its input (NeMo's names and semantics).

A strategy is called as ``strategy(input, adapter, module=host)`` where ``host`` is the module with
adapter support that runs the adapter. ``ResidualAddAdapterStrategy`` computes
``input + s · adapter(input)`` with stochastic depth ``s`` (training only) and registers the
``l2_lambda`` auxiliary loss; adapters that can fuse the residual into their own kernel (those with
a ``fused_residual_forward`` method, such as ``FusedLinearAdapter``) compute all of it in one pass.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from .access_mixins import AccessMixin
from .targets import class_path, register_loadable_base

__all__ = [
    "AbstractAdapterStrategy",
    "ResidualAddAdapterStrategy",
    "ResidualAddAdapterStrategyConfig",
    "ReturnResultAdapterStrategy",
    "ReturnResultAdapterStrategyConfig",
]


@register_loadable_base
class AbstractAdapterStrategy(ABC):
    """Base class of strategies: subclasses implement ``forward(input, adapter, *, module)``."""

    def forward(self, input: Any, adapter: torch.nn.Module, *, module: torch.nn.Module) -> Any:
        """Merge ``adapter``'s output with ``input``.

        Args:
            input: the host module's output, or the previous enabled adapter's result.
            adapter: the adapter module to run.
            module: the host module (with ``AdapterModuleMixin``); its ``adapter_layer`` holds every adapter.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward(input, adapter, *, module)")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)


class ReturnResultAdapterStrategy(AbstractAdapterStrategy):
    """Returns the adapter's output alone: ``adapter(input)`` (tuples and dicts are unpacked)."""

    def forward(self, input: Any, adapter: torch.nn.Module, *, module: torch.nn.Module) -> Any:
        return self.compute_output(input, adapter, module=module)

    def compute_output(self, input: Any, adapter: torch.nn.Module, *, module: torch.nn.Module) -> Any:
        if isinstance(input, (list, tuple)):
            return adapter(*input)
        if isinstance(input, dict):
            return adapter(**input)
        return adapter(input)


@dataclass
class ReturnResultAdapterStrategyConfig:
    _target_: str = class_path(ReturnResultAdapterStrategy)


_RESIDUAL_STEPS = ("compute_output", "apply_stochastic_depth", "compute_auxiliary_losses")
_FUSED, _STOCK, _CUSTOM = "fused", "stock", "custom"
_MODES: Dict[Tuple[type, type], str] = {}  # (strategy class, adapter class) -> ResidualAddAdapterStrategy._mode


class ResidualAddAdapterStrategy(AbstractAdapterStrategy):
    """``input + s · adapter(input)``, with stochastic depth and an optional L2 auxiliary loss.

    Args:
        stochastic_depth: probability ``p`` of dropping the whole adapter output in training; a kept
            output is scaled by ``1 / (1 - p)`` so that evaluation needs no rescaling.
        l2_lambda: weight of the auxiliary loss ``l2_lambda · mean_b Σ (s · adapter(input))²`` (the
            sum over all but the first dim), registered as ``adapter_loss`` on the adapter in training
            when the adapter's parameters require grad. 0 disables it.
    """

    def __init__(self, stochastic_depth: float = 0.0, l2_lambda: float = 0.0):
        super().__init__()
        self.stochastic_depth = stochastic_depth
        self.l2_lambda = l2_lambda

    def forward(self, input: torch.Tensor, adapter: torch.nn.Module, *, module: torch.nn.Module) -> torch.Tensor:
        mode = _MODES.get((type(self), type(adapter))) or self._mode(adapter)
        if mode is _FUSED:
            return self._fused_forward(input, adapter, module=module)
        if mode is _STOCK:  # the stock steps below, without the calls that would do nothing
            out = adapter(input)
            if module.training and self.stochastic_depth != 0.0:
                out = self.apply_stochastic_depth(out, input, adapter, module=module)
            result = input + out
            if module.training and self.l2_lambda > 0.0:
                self.compute_auxiliary_losses(result, input, adapter, module=module)
            return result
        out = self.compute_output(input, adapter, module=module)
        if module.training and self.stochastic_depth != 0.0:
            out = self.apply_stochastic_depth(out, input, adapter, module=module)
        result = input + out
        self.compute_auxiliary_losses(result, input, adapter, module=module)
        return result

    def compute_output(self, input: torch.Tensor, adapter: torch.nn.Module, *, module: torch.nn.Module) -> torch.Tensor:
        return adapter(input)

    def stochastic_depth_scale(self, like: torch.Tensor) -> torch.Tensor:
        """A one-element tensor: 0 with probability ``stochastic_depth``, else ``1 / (1 - stochastic_depth)``."""
        p = self.stochastic_depth
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"stochastic_depth must be in [0, 1], got {p}")
        keep = 1.0 - p
        noise = torch.empty(1, dtype=like.dtype, device=like.device).bernoulli_(keep)
        return noise.div_(keep) if keep > 0.0 else noise

    def apply_stochastic_depth(
        self, output: torch.Tensor, input: torch.Tensor, adapter: torch.nn.Module, *, module: torch.nn.Module
    ) -> torch.Tensor:
        """Scale the whole adapter output by one draw of ``stochastic_depth_scale``."""
        return output * self.stochastic_depth_scale(output).reshape([1] * output.ndim)

    def _wants_auxiliary_loss(self, adapter: torch.nn.Module, module: torch.nn.Module) -> bool:
        if not (module.training and self.l2_lambda > 0.0):
            return False
        if not isinstance(adapter, AccessMixin):
            raise ValueError(f"adapter {type(adapter).__name__} does not implement AccessMixin, needed for l2_lambda")
        first = next(adapter.parameters(), None)
        return first is not None and first.requires_grad and adapter.access_cfg.get("compute_adapter_loss", True)

    def _register_l2_loss(self, row_sq: torch.Tensor, batch: int, adapter: AccessMixin) -> None:
        adapter.set_access_enabled(True, guid=getattr(self, "model_guid", None))
        loss = self.l2_lambda * row_sq.reshape(batch, -1).sum(dim=-1).mean()
        adapter.register_accessible_tensor(name="adapter_loss", tensor=loss)

    def compute_auxiliary_losses(
        self, output: torch.Tensor, input: torch.Tensor, adapter: torch.nn.Module, *, module: torch.nn.Module
    ) -> None:
        """Register ``l2_lambda · mean_b Σ (output − input)²`` as the adapter's ``adapter_loss``."""
        if self._wants_auxiliary_loss(adapter, module):
            row_sq = (output - input).square().reshape(input.size(0), -1).sum(dim=-1)
            self._register_l2_loss(row_sq, input.size(0), adapter)

    def _mode(self, adapter: torch.nn.Module) -> str:
        """How ``forward`` runs ``adapter``: fused (the adapter has ``fused_residual_forward`` and this
        strategy's class keeps the stock steps: a subclass that overrides a step keeps its override),
        stock (the stock steps, inlined) or custom (the steps, overridden). Decided once per pair of
        classes: both are class attributes."""
        cls = type(self)
        stock = all(getattr(cls, step) is getattr(ResidualAddAdapterStrategy, step) for step in _RESIDUAL_STEPS)
        fused = stock and hasattr(type(adapter), "fused_residual_forward")
        mode = _MODES[(cls, type(adapter))] = _FUSED if fused else _STOCK if stock else _CUSTOM
        return mode

    def _can_fuse(self, adapter: torch.nn.Module) -> bool:
        """Whether ``forward`` computes ``adapter`` and the residual in one fused pass."""
        return (_MODES.get((type(self), type(adapter))) or self._mode(adapter)) is _FUSED

    def _fused_forward(self, input: torch.Tensor, adapter: torch.nn.Module, *, module: torch.nn.Module) -> torch.Tensor:
        scale: Optional[torch.Tensor] = None
        if module.training and self.stochastic_depth != 0.0:
            scale = self.stochastic_depth_scale(input)
        wants_loss = self._wants_auxiliary_loss(adapter, module)
        result, row_sq = adapter.fused_residual_forward(input, scale=scale, return_row_sq=wants_loss)
        if wants_loss:
            self._register_l2_loss(row_sq, input.size(0), adapter)
        return result


@dataclass
class ResidualAddAdapterStrategyConfig:
    stochastic_depth: float = 0.0
    l2_lambda: float = 0.0
    _target_: str = class_path(ResidualAddAdapterStrategy)
