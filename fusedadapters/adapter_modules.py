"""Adapter modules: ``LinearAdapter`` (the eager reference) and ``FusedLinearAdapter`` (fused kernels).

Both compute the bottleneck adapter of ``fusedadapters.ops.reference``; ``FusedLinearAdapter`` has the
same constructor, config fields and ``state_dict`` keys as ``LinearAdapter``, so a checkpoint or a
config of one loads into the other (change ``_target_``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn

from . import ops
from .access_mixins import AccessMixin
from .adapter_mixin_strategies import ResidualAddAdapterStrategyConfig
from .ops.backend import resolve_backend
from .ops.reference import ACTIVATIONS, check_options
from .targets import class_path, instantiate_checked, is_adapter_strategy, register_loadable_base

__all__ = [
    "AdapterModuleUtil",
    "FusedLinearAdapter",
    "FusedLinearAdapterConfig",
    "FusedLinearAdapterMixin",
    "LinearAdapter",
    "LinearAdapterConfig",
]

_ACTIVATION_MODULES = {
    "identity": nn.Identity,
    "hardtanh": nn.Hardtanh,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}
assert tuple(_ACTIVATION_MODULES) == ACTIVATIONS


def check_adapter_input(adapter: nn.Module, x: torch.Tensor) -> None:
    """``ValueError`` unless ``x`` is ``(..., adapter.in_features)``."""
    if x.shape[-1:] != (adapter.in_features,):
        raise ValueError(
            f"{type(adapter).__name__} has in_features={adapter.in_features} but got an input of shape "
            f"{tuple(x.shape)}: its last dimension must be {adapter.in_features}"
        )


@register_loadable_base
class AdapterModuleUtil(AccessMixin):
    """Base class of adapter modules: a strategy (``adapter_strategy``) and unfreezing."""

    def setup_adapter_strategy(self, adapter_strategy: Any) -> None:
        """Set ``self.adapter_strategy``: None gives ``get_default_strategy_config()``; a config
        (dataclass, dict or DictConfig with ``_target_``) is instantiated; a strategy is kept."""
        if adapter_strategy is None:
            adapter_strategy = self.get_default_strategy_config()
        if dataclasses.is_dataclass(adapter_strategy) and not isinstance(adapter_strategy, type):
            adapter_strategy = OmegaConf.structured(adapter_strategy)
            OmegaConf.set_struct(adapter_strategy, False)
        if isinstance(adapter_strategy, dict) or OmegaConf.is_config(adapter_strategy):
            self.adapter_strategy = instantiate_checked(
                adapter_strategy, "strategy", source=f"adapter_strategy of {type(self).__name__}"
            )
        elif is_adapter_strategy(adapter_strategy):
            self.adapter_strategy = adapter_strategy
        else:
            raise AttributeError(f"`adapter_strategy` provided is invalid : {adapter_strategy}")

    def get_default_strategy_config(self) -> Any:
        """The strategy used when none is given: residual add."""
        return ResidualAddAdapterStrategyConfig()

    def adapter_unfreeze(self) -> None:
        """Make every parameter of the adapter trainable (override to keep some frozen)."""
        for param in self.parameters():
            param.requires_grad_(True)


class LinearAdapter(nn.Module, AdapterModuleUtil):
    """Bottleneck adapter: LayerNorm, ``in_features → dim`` projection, activation, ``dim → in_features``
    projection, optional dropout. Its last layer starts at zero, so a new adapter is the identity
    under the residual strategy.

    ``norm_position='pre'``: ``module = [LayerNorm, Linear(D→H), act, Linear(H→D)]``.
    ``norm_position='post'``: ``module = [Linear(D→H), act, Linear(H→D), LayerNorm]``.
    Input ``(..., in_features)``, output the same shape (the adapter output; the strategy merges it).

    Args:
        in_features: D, the input and output size.
        dim: H, the bottleneck size.
        activation: one of identity, hardtanh, relu, selu, swish, silu, gelu.
        norm_position: 'pre' or 'post'.
        dropout: dropout probability on the adapter output (0 disables it).
        adapter_strategy: a strategy or its config; None gives residual add.
    """

    def __init__(
        self,
        in_features: int,
        dim: int,
        activation: str = "swish",
        norm_position: str = "pre",
        dropout: float = 0.0,
        adapter_strategy: Optional[Any] = None,
    ):
        super().__init__()
        check_options(activation, norm_position)
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.in_features = in_features
        self.dim = dim
        self.activation = activation
        self.norm_position = norm_position

        act = _ACTIVATION_MODULES[activation]()
        if hasattr(act, "inplace"):
            act.inplace = True
        if norm_position == "pre":
            self.module = nn.Sequential(
                nn.LayerNorm(in_features),
                nn.Linear(in_features, dim, bias=False),
                act,
                nn.Linear(dim, in_features, bias=False),
            )
        else:
            self.module = nn.Sequential(
                nn.Linear(in_features, dim, bias=False),
                act,
                nn.Linear(dim, in_features, bias=False),
                nn.LayerNorm(in_features),
            )
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else None
        self.setup_adapter_strategy(adapter_strategy)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the last layer (the up-projection for 'pre'; the LayerNorm's weight and bias for 'post')."""
        with torch.no_grad():
            last = self.module[-1]
            last.weight.zero_()
            if getattr(last, "bias", None) is not None:
                last.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_adapter_input(self, x)
        x = self.module(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return x


@dataclass
class LinearAdapterConfig:
    in_features: int
    dim: int
    activation: str = "swish"
    norm_position: str = "pre"
    dropout: float = 0.0
    adapter_strategy: Optional[Any] = field(default_factory=ResidualAddAdapterStrategyConfig)
    _target_: str = class_path(LinearAdapter)


class FusedLinearAdapterMixin:
    """The fused forward of a ``LinearAdapter``-shaped module, computed by ``fusedadapters.ops.linear_adapter``.

    Shared by this package's ``FusedLinearAdapter`` and ``fusedadapters.nemo.FusedLinearAdapter``. The
    host class provides what a ``LinearAdapter`` has: ``module`` (the ``nn.Sequential`` of LayerNorm and
    the two projections), ``norm_position``, ``dropout`` (an ``nn.Dropout`` or None), ``training``, and
    the attributes ``activation`` (a name in ``fusedadapters.ops.reference.ACTIVATIONS``) and
    ``in_features`` (D). ``forward`` returns the adapter output alone (for any strategy); a residual
    strategy calls ``fused_residual_forward``, which adds the input, stochastic depth and the L2 loss
    terms inside the same kernel.

    The backend is chosen per call (Triton for CUDA tensors when it imports, else the reference);
    set the attribute ``backend`` (or ``$FUSEDADAPTERS_BACKEND``) to force one. Weights are cast to
    the input's dtype (to the autocast dtype under ``torch.autocast``), so fp32 adapter weights run
    on a bf16 model.
    """

    backend: Optional[str] = None

    def _fused_weights(self) -> Tuple[nn.LayerNorm, torch.Tensor, torch.Tensor]:
        if self.norm_position == "pre":
            return self.module[0], self.module[1].weight, self.module[3].weight
        return self.module[3], self.module[0].weight, self.module[2].weight

    def _run_fused(
        self, x: torch.Tensor, *, residual: bool, scale: Optional[torch.Tensor], return_row_sq: bool
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        check_adapter_input(self, x)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        norm, down, up = self._fused_weights()
        dropout_p = self.dropout.p if self.dropout is not None and self.training else 0.0
        backend = self.backend
        if backend is not None:
            backend = resolve_backend(backend, x.device, source=f"the attribute {type(self).__name__}.backend")
        result = ops.linear_adapter(
            x,
            norm.weight.to(x.dtype),
            norm.bias.to(x.dtype),
            down.to(x.dtype),
            up.to(x.dtype),
            activation=self.activation,
            norm_position=self.norm_position,
            eps=norm.eps,
            dropout_p=dropout_p,
            scale=scale,
            residual=residual,
            return_row_sq=return_row_sq,
            backend=backend,
        )
        return result if return_row_sq else (result, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_fused(x, residual=False, scale=None, return_row_sq=False)[0]

    def fused_residual_forward(
        self, x: torch.Tensor, *, scale: Optional[torch.Tensor] = None, return_row_sq: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(x + s · adapter(x), Σ_d (s · adapter(x))² per row or None)`` in one fused pass.

        ``scale`` is the stochastic-depth factor ``s`` (a one-element tensor) or None for 1.
        """
        return self._run_fused(x, residual=True, scale=scale, return_row_sq=return_row_sq)

    def fused_adapter_params(self, dtype: torch.dtype) -> ops.AdapterParams:
        """This adapter's weights (cast to ``dtype``) and options, for the many-adapter ops that
        ``fusedadapters.routing`` runs (mixed batches, fused chains); dropout only in training."""
        norm, down, up = self._fused_weights()
        return ops.AdapterParams(
            norm.weight.to(dtype), norm.bias.to(dtype), down.to(dtype), up.to(dtype),
            activation=self.activation, norm_position=self.norm_position, eps=norm.eps,
            dropout_p=self.dropout.p if self.dropout is not None and self.training else 0.0,
        )


class FusedLinearAdapter(FusedLinearAdapterMixin, LinearAdapter):
    """``LinearAdapter`` computed by the fused op (``fusedadapters.ops.linear_adapter``).

    Same constructor, config fields and ``state_dict`` keys as ``LinearAdapter``; see
    ``FusedLinearAdapterMixin`` for the forward, the backend choice and autocast.
    """


@dataclass
class FusedLinearAdapterConfig(LinearAdapterConfig):
    _target_: str = class_path(FusedLinearAdapter)
