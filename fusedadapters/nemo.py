"""Fused adapters inside NeMo itself: NeMo's mixins, strategies, losses and checkpoints, this package's kernels.

Needs ``nemo-toolkit`` (``pip install "fusedadapters[nemo]"``); nothing else in ``fusedadapters``
imports NeMo. One line in a NeMo training script, once the model is built or restored, fuses every
``LinearAdapter`` in it::

    from fusedadapters.nemo import fuse_adapters
    fuse_adapters(model)          # returns how many adapters now run on the fused op

What it holds:

* ``FusedLinearAdapter`` / ``FusedLinearAdapterConfig``: subclasses of NeMo's ``LinearAdapter`` /
  ``LinearAdapterConfig`` (``nemo.collections.common.parts.adapter_modules``) with the same
  constructor, fields and ``state_dict`` keys, computed by ``fusedadapters.ops.linear_adapter``. NeMo's
  accepted-type checks and its ``AccessMixin`` registry treat them as NeMo's own ``LinearAdapter``.
* ``FusedResidualAddAdapterStrategy``: NeMo's ``ResidualAddAdapterStrategy`` whose residual add,
  stochastic depth and L2 row sums run inside the fused op. A ``FusedLinearAdapter`` given NeMo's own
  ``ResidualAddAdapterStrategy`` (instance or config) holds this subclass instead, with the same
  settings; any other strategy is kept and receives the adapter output, as in NeMo.
* ``fuse_adapters(model)`` / ``unfuse_adapters(model)``: swap NeMo's ``LinearAdapter`` for
  ``FusedLinearAdapter`` in place and back (same parameter objects), rewriting the adapter
  ``_target_``s of the model's config, so that a model unfused before ``save_to`` restores in stock
  NeMo without this package.

What importing this module changes in NeMo: it appends ``"fusedadapters."`` to
``nemo.core.classes.common.ALLOWED_TARGET_PREFIXES`` and ``ALLOWED_ADAPTER_STRATEGY_PREFIXES`` (the
lists NeMo 3.0's ``safe_instantiate`` checks ``_target_``s against), so that NeMo builds this
package's classes from configs and ``.nemo`` files. Nothing else.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

try:
    from nemo.collections.common.parts import adapter_modules as nemo_adapter_modules
    from nemo.collections.common.parts.utils import activation_registry as nemo_activations
    from nemo.core.classes import common as nemo_common
    from nemo.core.classes.mixins import adapter_mixin_strategies as nemo_strategies
    from nemo.core.classes.mixins.access_mixins import AccessMixin as NemoAccessMixin
except ImportError as exc:
    raise ImportError(
        "fusedadapters.nemo runs fused adapters inside NeMo and needs nemo-toolkit; install it with "
        f'pip install "fusedadapters[nemo]" (importing NeMo failed: {exc})'
    ) from exc

from omegaconf import DictConfig, ListConfig

from . import adapter_mixin_strategies as package_strategies
from .adapter_modules import FusedLinearAdapterMixin
from .ops.reference import check_options
from .targets import class_path

__all__ = [
    "FusedLinearAdapter",
    "FusedLinearAdapterConfig",
    "FusedResidualAddAdapterStrategy",
    "fuse_adapters",
    "unfuse_adapters",
]

PACKAGE_TARGET_PREFIX = "fusedadapters."
# The lists of ``_target_`` prefixes NeMo's safe_instantiate accepts (NeMo 3.0; absent in older NeMo).
_NEMO_ALLOWLISTS = ("ALLOWED_TARGET_PREFIXES", "ALLOWED_ADAPTER_STRATEGY_PREFIXES")
# The steps of NeMo's ResidualAddAdapterStrategy the fused path replaces; a subclass overriding one keeps NeMo's path.
_RESIDUAL_STEPS = ("compute_output", "apply_stochastic_depth", "compute_auxiliary_losses")


def _allow_package_targets() -> None:
    for name in _NEMO_ALLOWLISTS:
        allowlist = getattr(nemo_common, name, None)
        if allowlist is not None and PACKAGE_TARGET_PREFIX not in allowlist:
            allowlist.append(PACKAGE_TARGET_PREFIX)


_allow_package_targets()


class FusedResidualAddAdapterStrategy(nemo_strategies.ResidualAddAdapterStrategy):
    """NeMo's ``ResidualAddAdapterStrategy`` (``input + s · adapter(input)``, stochastic depth, ``l2_lambda``)
    with the residual add, the stochastic-depth scale ``s`` and the L2 row sums computed inside the
    fused op when the adapter is a fused one.

    The results are NeMo's: the same ``s`` drawn from PyTorch's generator, the loss
    ``l2_lambda · mean_b Σ (s · adapter(input))²`` registered as ``adapter_loss`` through NeMo's
    ``AccessMixin`` under NeMo's conditions (training, ``l2_lambda > 0``, trainable adapter, the access
    config's ``compute_adapter_loss``). Other adapters, and subclasses that override
    ``compute_output``, ``apply_stochastic_depth`` or ``compute_auxiliary_losses``, take NeMo's path.
    """

    # This package's fused residual path, shared as plain functions: they use only ``stochastic_depth``,
    # ``l2_lambda``, ``model_guid`` and the adapter's AccessMixin methods, which NeMo's classes have too.
    stochastic_depth_scale = package_strategies.ResidualAddAdapterStrategy.stochastic_depth_scale
    _register_l2_loss = package_strategies.ResidualAddAdapterStrategy._register_l2_loss
    _fused_forward = package_strategies.ResidualAddAdapterStrategy._fused_forward

    def forward(self, input: Any, adapter: nn.Module, *, module: nn.Module) -> Any:
        if self._can_fuse(adapter):
            return self._fused_forward(input, adapter, module=module)
        return super().forward(input, adapter, module=module)

    def _can_fuse(self, adapter: nn.Module) -> bool:
        stock = nemo_strategies.ResidualAddAdapterStrategy
        return isinstance(adapter, FusedLinearAdapterMixin) and all(
            getattr(type(self), step) is getattr(stock, step) for step in _RESIDUAL_STEPS
        )

    def _wants_auxiliary_loss(self, adapter: nn.Module, module: nn.Module) -> bool:
        """NeMo's conditions for registering the L2 loss (``compute_auxiliary_losses``)."""
        if not (module.training and self.l2_lambda > 0.0):
            return False
        if not isinstance(adapter, NemoAccessMixin):
            raise ValueError(f"Module {type(adapter).__name__} does not implement AccessMixin !")
        return next(adapter.parameters()).requires_grad is True and adapter.access_cfg.get(
            "compute_adapter_loss", True
        )


def _recast(obj: Any, cls: type) -> Any:
    """A new ``cls`` instance holding ``obj``'s attributes (the very same parameters, submodules, hooks)."""
    new = cls.__new__(cls)
    new.__dict__.update(vars(obj))
    return new


def _with_fused_residual(strategy: Any) -> Any:
    """NeMo's own ``ResidualAddAdapterStrategy`` as ``FusedResidualAddAdapterStrategy``; any other kept."""
    if type(strategy) is nemo_strategies.ResidualAddAdapterStrategy:
        return _recast(strategy, FusedResidualAddAdapterStrategy)
    return strategy


def _without_fused_residual(strategy: Any) -> Any:
    if type(strategy) is FusedResidualAddAdapterStrategy:
        return _recast(strategy, nemo_strategies.ResidualAddAdapterStrategy)
    return strategy


class FusedLinearAdapter(FusedLinearAdapterMixin, nemo_adapter_modules.LinearAdapter):
    """NeMo's ``LinearAdapter`` computed by ``fusedadapters.ops.linear_adapter`` (every backend).

    Same constructor, config fields and ``state_dict`` keys as NeMo's ``LinearAdapter``, of which it is
    a subclass. Input ``(..., in_features)``; ``forward`` returns the adapter output (what any strategy
    receives); under NeMo's ``ResidualAddAdapterStrategy`` the residual add, stochastic depth and L2
    loss run in the same fused op (see ``FusedResidualAddAdapterStrategy``). Backend choice, autocast
    and dropout as in ``fusedadapters.adapter_modules.FusedLinearAdapterMixin``.

    Args:
        in_features: D, the input and output size.
        dim: H, the bottleneck size.
        activation: one of identity, hardtanh, relu, selu, swish, silu, gelu (NeMo's activation names).
        norm_position: 'pre' or 'post'.
        dropout: dropout probability on the adapter output (0 disables it).
        adapter_strategy: a NeMo strategy or its config; None gives NeMo's residual add.
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
        check_options(activation, norm_position)
        super().__init__(
            in_features, dim, activation=activation, norm_position=norm_position, dropout=dropout,
            adapter_strategy=adapter_strategy,
        )
        self.in_features = in_features
        self.activation = activation

    def setup_adapter_strategy(self, adapter_strategy: Any) -> None:
        """NeMo's ``setup_adapter_strategy``; NeMo's own residual add becomes its fused subclass."""
        super().setup_adapter_strategy(adapter_strategy)
        self.adapter_strategy = _with_fused_residual(self.adapter_strategy)


@dataclass
class FusedLinearAdapterConfig(nemo_adapter_modules.LinearAdapterConfig):
    """NeMo's ``LinearAdapterConfig`` with ``_target_`` naming ``FusedLinearAdapter``; nothing else differs."""

    _target_: str = class_path(FusedLinearAdapter)


# --------------------------------------------------------------------------------------------------
# fuse_adapters / unfuse_adapters
# --------------------------------------------------------------------------------------------------


def _activation_name(activation: nn.Module) -> Optional[str]:
    """The name NeMo builds ``activation`` from, if the fused op computes exactly that function."""
    if isinstance(activation, nn.GELU) and activation.approximate != "none":
        return None
    if isinstance(activation, nn.Hardtanh) and (activation.min_val, activation.max_val) != (-1.0, 1.0):
        return None
    names = {cls: name for name, cls in nemo_activations.items()}
    return names.get(type(activation))


def _to_fused(adapter: nn.Module, where: str) -> FusedLinearAdapter:
    activation = adapter.module[2 if adapter.norm_position == "pre" else 1]
    name = _activation_name(activation)
    if name is None:
        raise ValueError(
            f"fuse_adapters: the LinearAdapter at {where!r} uses {activation!r}, which the fused op does not "
            "compute; nothing was changed"
        )
    fused = _recast(adapter, FusedLinearAdapter)
    fused.activation = name
    fused.in_features = fused._fused_weights()[1].shape[1]
    fused.adapter_strategy = _with_fused_residual(adapter.adapter_strategy)
    return fused


def _to_nemo(adapter: FusedLinearAdapter, _where: str) -> nn.Module:
    plain = _recast(adapter, nemo_adapter_modules.LinearAdapter)
    for attribute in ("activation", "in_features", "backend"):
        plain.__dict__.pop(attribute, None)
    plain.adapter_strategy = _without_fused_residual(adapter.adapter_strategy)
    return plain


def _imported_class(path: str) -> Any:
    """The object ``path`` names in an already imported module, or None (never imports)."""
    module_name, _, name = path.rpartition(".")
    return getattr(sys.modules.get(module_name), name, None)


def _rewrite_targets(node: Any, renames: Dict[type, type]) -> None:
    """Point every ``_target_`` in ``node`` that names a class in ``renames`` at its replacement."""
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if isinstance(target, str) and _imported_class(target) in renames:
            node["_target_"] = class_path(renames[_imported_class(target)])
        for _, value in node.items_ex(resolve=False):
            _rewrite_targets(value, renames)
    elif isinstance(node, ListConfig):
        for value in node:
            _rewrite_targets(value, renames)


def _swap(
    model: nn.Module, source: type, convert: Callable[[nn.Module, str], nn.Module], renames: Dict[type, type]
) -> int:
    """Replace every submodule of exactly type ``source`` by ``convert(submodule, its qualified name)``, after
    converting them all (a refusal changes nothing); point the configs' ``_target_``s at the new classes."""
    if type(model) is source:
        raise TypeError(f"pass the module that holds the {source.__name__}, not the adapter itself")
    planned: List[Tuple[nn.Module, str, nn.Module]] = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is source:
                where = f"{parent_name}.{child_name}" if parent_name else child_name
                planned.append((parent, child_name, convert(child, where)))
    model_cfg = getattr(model, "cfg", None)
    configs = [model_cfg.get("adapters")] if isinstance(model_cfg, DictConfig) else []
    configs += [getattr(m, "adapter_cfg", None) for m in model.modules()]
    for cfg in configs:
        _rewrite_targets(cfg, renames)
    for parent, child_name, replacement in planned:
        setattr(parent, child_name, replacement)
    return len(planned)


def fuse_adapters(model: nn.Module) -> int:
    """Replace every NeMo ``LinearAdapter`` in ``model`` by ``FusedLinearAdapter``, in place; return how many.

    ``model`` is any ``nn.Module`` (a NeMo ``ModelPT`` or a plain module). Each replacement holds the same
    parameter objects (no copy; an optimizer built before keeps working), name, enabled state, training
    mode, device and dtype, and the same strategy (NeMo's own ``ResidualAddAdapterStrategy`` as its
    fused subclass, with the same settings). Adapter ``_target_``s naming ``LinearAdapter`` in
    ``model.cfg.adapters`` (where the model has a config) and in each module's ``adapter_cfg`` are
    rewritten to ``FusedLinearAdapter``, so that ``save_to``/``restore_from`` and ``add_adapter`` from
    those configs build fused adapters. Subclasses of ``LinearAdapter`` are left alone. Raises
    ``ValueError``, changing nothing, if an adapter's activation is not one the fused op computes.
    """
    return _swap(model, nemo_adapter_modules.LinearAdapter, _to_fused,
                 {nemo_adapter_modules.LinearAdapter: FusedLinearAdapter})


def unfuse_adapters(model: nn.Module) -> int:
    """Undo ``fuse_adapters``: every ``FusedLinearAdapter`` in ``model`` becomes NeMo's ``LinearAdapter``,
    in place, with the same parameters, names, state and NeMo's own strategy; return how many.

    The ``_target_``s of ``FusedLinearAdapter`` and ``FusedResidualAddAdapterStrategy`` in the model's
    adapter configs are rewritten to NeMo's classes, so that a checkpoint saved afterwards
    (``save_to``, ``save_adapters``) restores in stock NeMo without this package installed.
    """
    renames = {
        FusedLinearAdapter: nemo_adapter_modules.LinearAdapter,
        FusedResidualAddAdapterStrategy: nemo_strategies.ResidualAddAdapterStrategy,
    }
    return _swap(model, FusedLinearAdapter, _to_nemo, renames)
