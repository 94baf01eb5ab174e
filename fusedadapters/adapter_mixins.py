"""NeMo's adapter mixin API: give any ``torch.nn.Module`` adapter support, and a model save/load of adapters.

Same names, arguments and semantics as ``nemo.core.classes.mixins.adapter_mixins``, so that NeMo code
ports by changing its imports. Three differences a user can notice, all on the safe side:

* Dispatch is cached. NeMo walks the OmegaConf adapter config on every forward; here the names of a
  module's enabled adapters are computed once and reused until adapters are added, loaded, enabled,
  disabled or their config is replaced through this API (edit ``adapter_cfg`` by hand and call
  ``update_adapter_cfg`` or ``set_enabled_adapters`` afterwards).
* Failed calls change nothing. ``add_adapter``, ``set_enabled_adapters`` and ``load_adapters`` (also
  when a subclass overrides them) restore every module's adapters and the model config when they
  raise, and name errors are found before anything is touched.
* Files are safe: adapters are saved as safetensors with a YAML config; loading never unpickles and
  never builds a ``_target_`` that is not an adapter, strategy or adapter-capable module.
* Configs are checked before anything is built: ``add_adapter`` refuses a ``_target_`` that is not an
  adapter module class (an ``adapter_strategy`` that is not a strategy), and an adapter whose
  ``in_features`` differs from the width its host hands it, when the host knows that width
  (``adapter_input_features``).
* A model that does not forward ``add_adapter`` to its modules is told so (``AdapterModelPTMixin``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import threading
from abc import ABC
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf, open_dict

from .adapter_mixin_strategies import AbstractAdapterStrategy
from .routing import ACTIVE_ROUTES, OPEN_ROUTES, forward_chained, forward_routed
from .serialization import CheckpointFileError, read_checkpoint, write_checkpoint
from .targets import (
    check_buildable_targets,
    check_loadable_targets,
    class_path,
    import_class_by_path,
    instantiate_checked,
    register_loadable_base,
    register_loadable_class,
)
from .utils import logging

__all__ = [
    "ADAPTER_REGISTRY",
    "AdapterConfig",
    "AdapterModelPTMixin",
    "AdapterModuleMixin",
    "AdapterNotFoundError",
    "AdapterRegistryInfo",
    "get_registered_adapter",
    "register_adapter",
    "update_module_class_with_adapter_class",
]

ADAPTER_REGISTRY: Dict[str, "AdapterRegistryInfo"] = {}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class AdapterNotFoundError(KeyError):
    """An adapter name that the module, model or file does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class AdapterRegistryInfo:
    """A registered pair: a module class and its subclass with adapter support."""

    base_class: type
    adapter_class: type
    base_class_path: str = ""
    adapter_class_path: str = ""

    def __post_init__(self) -> None:
        self.base_class_path = class_path(self.base_class)
        self.adapter_class_path = class_path(self.adapter_class)


class AdapterConfig:
    """Marker base class for adapter config dataclasses."""


def register_adapter(base_class: type, adapter_class: type) -> None:
    """Register ``adapter_class`` (a subclass of ``base_class`` with ``AdapterModuleMixin``) as the
    adapter-capable version of ``base_class``."""
    base_path, adapter_path = class_path(base_class), class_path(adapter_class)
    if base_path in ADAPTER_REGISTRY:
        raise ValueError(f"`{base_path}` has already been added to the adapter registry !")
    if not issubclass(adapter_class, base_class):
        raise ValueError(f"`{adapter_path}` is not a sub-class of {base_path} !")
    ADAPTER_REGISTRY[base_path] = AdapterRegistryInfo(base_class=base_class, adapter_class=adapter_class)
    base_class._meta_adapter_class = adapter_class
    adapter_class._meta_base_class = base_class
    register_loadable_class(base_class)
    register_loadable_class(adapter_class)


def get_registered_adapter(cls: Union[str, type]) -> Optional[AdapterRegistryInfo]:
    """The registry entry for a class path, a registered base class or its adapter class; else None."""
    if isinstance(cls, str):
        cls = import_class_by_path(cls)
    cls = getattr(cls, "_meta_base_class", cls)
    return ADAPTER_REGISTRY.get(class_path(cls))


def _prepare_default_adapter_config(*, global_key: str, meta_key: str, cfg: Optional[DictConfig] = None) -> DictConfig:
    """``cfg`` (or a new config) holding ``{global_key: {meta_key: {modules: {}}}}``."""
    if cfg is None:
        cfg = OmegaConf.create({})
    with open_dict(cfg):
        cfg.setdefault(global_key, {})
        cfg[global_key].setdefault(meta_key, {})
        cfg[global_key][meta_key].setdefault("modules", {})
    return cfg


def _replace_class_paths(node: Any, old: str, new: str, verbose: bool) -> None:
    for key, value in node.items():
        if isinstance(value, (dict, DictConfig)):
            _replace_class_paths(value, old, new, verbose)
        elif key in ("target", "_target_") and value == old:
            if verbose:
                logging.info(f"Updating config from {old} (base class) to {new} (adapter compatible class)")
            node[key] = new


def update_module_class_with_adapter_class(
    module: nn.Module, cfg: Union[dict, DictConfig], update_config: bool = True, verbose: bool = True
) -> None:
    """Swap ``module``'s class for its registered adapter class (in place), and the class path in ``cfg``."""
    if isinstance(module, AdapterModuleMixin):
        return
    info = get_registered_adapter(type(module))
    if info is None:
        return
    if verbose:
        logging.info(f"Swapping class {info.base_class_path} with adapter compatible class: {info.adapter_class_path}")
    module.__class__ = info.adapter_class
    if update_config:
        with open_dict(cfg) if isinstance(cfg, DictConfig) else contextlib.nullcontext():
            _replace_class_paths(cfg, info.base_class_path, info.adapter_class_path, verbose)


# ---------------------------------------------------------------------------------------------
# Dispatch cache and transactions
# ---------------------------------------------------------------------------------------------


class _AdapterStateVersion:
    """Bumped on every change this API makes to adapters or their configs; caches compare against it."""

    value = 0


def _adapters_changed() -> None:
    _AdapterStateVersion.value += 1


def _to_adapter_config(cfg: Any, name: str) -> DictConfig:
    """A private, untyped copy of an adapter config given as a DictConfig, dict or dataclass."""
    if isinstance(cfg, DictConfig):
        cfg = copy.deepcopy(cfg)
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False))
    elif isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    else:
        raise TypeError(f"config of adapter `{name}` must be a DictConfig, dict or dataclass, got {type(cfg).__name__}")
    OmegaConf.set_struct(cfg, False)
    if "_target_" not in cfg:
        raise ValueError(
            f"config of adapter `{name}` has no `_target_` naming the adapter class: "
            f"{OmegaConf.to_yaml(cfg).strip() or '{}'}"
        )
    check_buildable_targets(cfg, "adapter", f"config of adapter `{name}`")
    return cfg


class _Snapshot:
    """What ``add_adapter``/``load_adapters``/``set_enabled_adapters`` may change under ``root``, to undo it."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        model_cfg = getattr(root, "cfg", None) if isinstance(root, AdapterModelPTMixin) else None
        self.model_cfg = model_cfg if isinstance(model_cfg, DictConfig) else None
        self.model_adapters = None
        self.model_adapters_id = None
        if self.model_cfg is not None and "adapters" in self.model_cfg:
            self.model_adapters_id = id(self.model_cfg.adapters)
            self.model_adapters = copy.deepcopy(self.model_cfg.adapters)
        self.configs: Dict[int, Any] = {}
        self.modules = []
        for module in root.modules():
            if not isinstance(module, AdapterModuleMixin):
                continue
            layer = module._modules.get("adapter_layer")
            adapter_cfg = module.__dict__.get("adapter_cfg")
            if adapter_cfg is not None and id(adapter_cfg) not in self.configs:
                self.configs[id(adapter_cfg)] = copy.deepcopy(adapter_cfg)
            self.modules.append(
                (
                    module,
                    None if layer is None else list(layer.keys()),
                    "adapter_layer" in module._modules,
                    adapter_cfg,
                    module.__dict__.get("adapter_name"),
                )
            )

    def restore(self) -> None:
        restored: Dict[int, Any] = {}
        if self.model_cfg is not None:
            with open_dict(self.model_cfg):
                if self.model_adapters is None:
                    self.model_cfg.pop("adapters", None)
                else:
                    self.model_cfg.adapters = self.model_adapters
                    restored[self.model_adapters_id] = self.model_cfg.adapters
        for module, keys, had_layer, adapter_cfg, adapter_name in self.modules:
            if not had_layer:
                module._modules.pop("adapter_layer", None)
            elif keys is not None:
                layer = module._modules["adapter_layer"]
                for key in [k for k in layer.keys() if k not in keys]:
                    del layer[key]
            if adapter_cfg is None:
                module.__dict__.pop("adapter_cfg", None)
            else:
                key = id(adapter_cfg)
                if key not in restored:
                    restored[key] = copy.deepcopy(self.configs[key])
                module.__dict__["adapter_cfg"] = restored[key]
            if adapter_name is None:
                module.__dict__.pop("adapter_name", None)
            else:
                module.__dict__["adapter_name"] = adapter_name
        _adapters_changed()


_TRANSACTION = threading.local()


@contextlib.contextmanager
def _adapter_transaction(root: nn.Module) -> Iterator[None]:
    """Undo every adapter change under ``root`` if the block raises (only the outermost block acts)."""
    depth = getattr(_TRANSACTION, "depth", 0)
    snapshot = _Snapshot(root) if depth == 0 else None
    _TRANSACTION.depth = depth + 1
    try:
        yield
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise
    finally:
        _TRANSACTION.depth = depth


def _transactional(method: Callable) -> Callable:
    if getattr(method, "_adapter_transactional", False):
        return method

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _adapter_transaction(self):
            return method(self, *args, **kwargs)

    wrapper._adapter_transactional = True
    return wrapper


_TRANSACTIONAL_METHODS = ("add_adapter", "set_enabled_adapters", "load_adapters")


# ---------------------------------------------------------------------------------------------
# Module mixin
# ---------------------------------------------------------------------------------------------


@register_loadable_base
class AdapterModuleMixin(ABC):
    """Adapter support for any ``torch.nn.Module``.

    Adds ``adapter_layer`` (an ``nn.ModuleDict`` of adapters by name) and ``adapter_cfg`` (an
    OmegaConf config: one entry per adapter with its ``enabled`` flag, plus the reserved
    ``global_cfg`` entry). A module calls ``forward_enabled_adapters(x)`` at the end of its forward
    (when ``is_adapter_available()``); each enabled adapter then runs in order of addition through
    its strategy, each taking the previous one's result.

    This mixin does not keep model-level configs up to date; ``AdapterModelPTMixin`` does that and
    shares its ``cfg.adapters`` with every module through ``update_adapter_cfg``.
    """

    adapter_global_cfg_key = "global_cfg"
    adapter_metadata_cfg_key = "adapter_meta_cfg"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _TRANSACTIONAL_METHODS:
            if name in cls.__dict__:
                setattr(cls, name, _transactional(cls.__dict__[name]))

    # -- adding, enabling, listing ------------------------------------------------------------

    def add_adapter(self, name: str, cfg: Union[DictConfig, dict, AdapterConfig], **kwargs: Any) -> None:
        """Build the adapter ``cfg`` describes (``_target_`` plus constructor arguments, optional
        ``enabled``) and add it under ``name`` (``adapter`` or ``module:adapter``).

        ``kwargs`` are passed to the adapter's constructor. The adapter is moved to the device of this
        module's parameters. Raises ``ValueError`` for a name already present or the reserved
        ``global_cfg``, and for a config without ``_target_`` or of a type this module does not accept.
        """
        cfg = _to_adapter_config(cfg, name)
        self.check_supported_adapter_type_(cfg, self.get_accepted_adapter_types())
        _, adapter_name = self.resolve_adapter_module_name_(name)
        layer = self._modules.get("adapter_layer")
        if layer is not None and adapter_name in layer:
            raise ValueError(f"Adapter with name `{name}` already exists ! Adapter names = {list(layer.keys())}")
        if adapter_name == self.adapter_global_cfg_key:
            raise ValueError(f"Adapters cannot have the reserved name : `{self.adapter_global_cfg_key}`")

        enabled = bool(cfg.pop("enabled", True))
        try:
            adapter = instantiate_checked(cfg, "adapter", source=f"config of adapter `{name}`", **kwargs)
        except Exception as exc:
            exc.add_note(f"while building adapter `{name}` from {OmegaConf.to_yaml(cfg).strip()}")
            raise
        self._check_adapter_width(name, adapter)
        device = next(self.parameters(), None)
        if device is not None:
            adapter.to(device.device)

        if layer is None:
            self.adapter_layer = nn.ModuleDict()
        if "adapter_cfg" not in self.__dict__:
            self.adapter_cfg = OmegaConf.create({})
        self.adapter_name = adapter_name
        cfg["enabled"] = enabled
        with open_dict(self.adapter_cfg):
            self.adapter_cfg[adapter_name] = cfg
        self.adapter_layer[adapter_name] = adapter
        _adapters_changed()

    def adapter_input_features(self) -> Optional[int]:
        """The width of the tensors this module hands its adapters, when its own layers tell it, else None.

        Known when the module is an ``nn.Linear``, or when every ``nn.Linear`` (its ``out_features``) and
        ``nn.LayerNorm`` (its last normalized dimension) among its direct children agree on one width.
        ``add_adapter`` (and so ``load_adapters``) refuses an adapter whose ``in_features`` differs.
        Override it to return the true width, or None to skip the check.
        """
        widths = {self.out_features} if isinstance(self, nn.Linear) else set()
        for child in self.children():
            if isinstance(child, nn.Linear):
                widths.add(child.out_features)
            elif isinstance(child, nn.LayerNorm) and child.normalized_shape:
                widths.add(child.normalized_shape[-1])
        return widths.pop() if len(widths) == 1 else None

    def _check_adapter_width(self, name: str, adapter: nn.Module) -> None:
        expected = getattr(adapter, "in_features", None)
        width = self.adapter_input_features() if isinstance(expected, int) else None
        if width is not None and expected != width:
            raise ValueError(
                f"adapter `{name}` has in_features={expected}, but {type(self).__name__} hands its adapters "
                f"tensors of width {width} (see {type(self).__name__}.adapter_input_features)"
            )

    def is_adapter_available(self) -> bool:
        """Whether this module holds any adapter, enabled or not."""
        layer = self._modules.get("adapter_layer")
        return layer is not None and len(layer._modules) > 0

    def set_enabled_adapters(self, name: Optional[str] = None, enabled: bool = True) -> None:
        """Enable or disable the adapter ``name``, or every adapter when ``name`` is None."""
        if not self.is_adapter_available():
            raise ValueError("No adapter is available to enable/disable")
        if name is None:
            for key in self.adapter_cfg.keys():
                if key != self.adapter_global_cfg_key:
                    self.adapter_cfg[key]["enabled"] = bool(enabled)
        else:
            _, adapter_name = self.resolve_adapter_module_name_(name)
            if adapter_name == self.adapter_global_cfg_key:
                raise ValueError(
                    f"Cannot set the state of the global config of adapters, given name = `{self.adapter_global_cfg_key}`"
                )
            if adapter_name not in self.adapter_cfg:
                raise AdapterNotFoundError(f"No adapter named `{name}`; available: {self._adapter_names()}")
            self.adapter_cfg[adapter_name]["enabled"] = bool(enabled)
        _adapters_changed()

    def get_enabled_adapters(self) -> List[str]:
        """Names of this module's enabled adapters (of an accepted type), in order of addition."""
        if not self.is_adapter_available():
            return []
        layer = self.adapter_layer
        accepted = tuple(self.get_accepted_adapter_types())
        enabled = []
        for name, cfg in self.adapter_cfg.items():
            if name == self.adapter_global_cfg_key or name not in layer or not cfg.get("enabled", True):
                continue
            if accepted and not isinstance(layer[name], accepted):
                continue
            enabled.append(name)
        return enabled

    def _adapter_names(self) -> List[str]:
        cfg = self.__dict__.get("adapter_cfg") or {}
        return [k for k in cfg.keys() if k != self.adapter_global_cfg_key]

    def get_adapter_module(self, name: str) -> Optional[nn.Module]:
        """The adapter module called ``name`` (``adapter`` or ``module:adapter``), or None."""
        _, name = self.resolve_adapter_module_name_(name)
        layer = self._modules.get("adapter_layer")
        return layer[name] if layer is not None and name in layer else None

    def get_adapter_cfg(self, name: str) -> Optional[DictConfig]:
        """The config of the adapter called ``name``, or None."""
        _, name = self.resolve_adapter_module_name_(name)
        cfg = self.__dict__.get("adapter_cfg")
        return cfg[name] if cfg is not None and name in cfg else None

    def set_accepted_adapter_types(self, adapter_types: List[Union[type, str]]) -> None:
        """Accept only adapters of these classes (or class paths); an empty list accepts any."""
        types = []
        for entry in adapter_types:
            cls = entry if inspect.isclass(entry) else import_class_by_path(entry)
            if not inspect.isclass(cls) or not issubclass(cls, nn.Module):
                raise ValueError(f"Attempted to add class ({entry}) but is not a subclass of torch.nn.Module")
            types.append(cls)
        self._accepted_adapter_types = set(types)
        _adapters_changed()

    def get_accepted_adapter_types(self) -> Set[type]:
        """The accepted adapter classes; empty means any."""
        return self.__dict__.get("_accepted_adapter_types", set())

    def check_supported_adapter_type_(
        self, adapter_cfg: DictConfig, supported_adapter_types: Optional[Iterable[type]] = None
    ) -> None:
        """Raise ``ValueError`` if ``adapter_cfg`` builds a class outside the accepted types."""
        if supported_adapter_types is None:
            supported_adapter_types = self.get_accepted_adapter_types()
        supported = tuple(supported_adapter_types)
        if not supported:
            return
        target = import_class_by_path(adapter_cfg["_target_"])
        if not (inspect.isclass(target) and issubclass(target, supported)):
            raise ValueError(
                f"Config: \n{OmegaConf.to_yaml(adapter_cfg)}\nIt creates adapter class {target} \n"
                f"that is not in the list of accepted adapter types.\nAccepted adapters: {list(supported)}"
            )

    # -- training helpers -----------------------------------------------------------------------

    def unfreeze_enabled_adapters(self, freeze_batchnorm: bool = True) -> None:
        """Make the enabled adapters trainable (``requires_grad`` and train mode) everywhere under
        this module; with ``freeze_batchnorm``, first freeze every BatchNorm's affine parameters and
        running statistics so that disabling the adapters gives back the base model exactly."""
        if freeze_batchnorm:
            for mname, module in self.named_modules():
                if isinstance(module, _BATCHNORMS):
                    if module.weight is not None:
                        module.weight.requires_grad_(False)
                    if module.bias is not None:
                        module.bias.requires_grad_(False)
                    module.eval()
                    module.track_running_stats = False
                    logging.info(f"Froze module {mname}: {module}")

        own_cfg = self.__dict__.get("adapter_cfg")
        unfrozen = set()
        for module in self.modules():
            layer = module._modules.get("adapter_layer") if isinstance(module, AdapterModuleMixin) else None
            if not layer:
                continue
            cfg = own_cfg if own_cfg is not None else module.__dict__.get("adapter_cfg", {})
            for name, adapter in layer.items():
                if name not in cfg or not cfg[name].get("enabled", True):
                    continue
                adapter.train()
                if hasattr(adapter, "adapter_unfreeze"):
                    adapter.adapter_unfreeze()
                else:
                    adapter.requires_grad_(True)
                for mname, sub in adapter.named_modules():
                    if isinstance(sub, _BATCHNORMS):
                        sub.track_running_stats = True
                        logging.info(f"Unfroze adapter module {mname}: {sub}")
                unfrozen.add(name)
        for name in sorted(unfrozen):
            logging.info(f"Unfrozen adapter : {name}")

    # -- forward ------------------------------------------------------------------------------

    def _enabled_adapter_names(self) -> Tuple[str, ...]:
        state = self.__dict__
        if state.get("_adapter_plan_version") == _AdapterStateVersion.value:
            return state["_adapter_plan"]
        names = tuple(self.get_enabled_adapters())
        if type(self).get_enabled_adapters is AdapterModuleMixin.get_enabled_adapters:
            state["_adapter_plan"] = names
            state["_adapter_plan_version"] = _AdapterStateVersion.value
        return names

    def forward_enabled_adapters(self, input: Any) -> Any:
        """Run every enabled adapter in order, each through its strategy, chaining the results
        (inside ``fusedadapters.route_adapters``: each sample's own adapter instead)."""
        if OPEN_ROUTES.count:  # a route_adapters context is open somewhere: is this module routed here?
            routes = ACTIVE_ROUTES.get()
            if routes is not None and id(self) in routes:
                return forward_routed(self, input, routes[id(self)][1])
        state = self.__dict__
        if state.get("_adapter_plan_version") == _AdapterStateVersion.value:
            names = state["_adapter_plan"]
        else:
            names = self._enabled_adapter_names()
        if not names:
            return input
        if len(names) > 1:  # consecutive fused adapters run through ops.adapter_chain
            return forward_chained(self, input, names)
        adapters = self._modules["adapter_layer"]._modules
        single_overridden = type(self).forward_single_enabled_adapter_ is not _STOCK_FORWARD_SINGLE
        for adapter_name in names:
            adapter = adapters[adapter_name]
            strategy = getattr(adapter, "adapter_strategy", None)
            if strategy is None:
                raise AttributeError(
                    f"Adapter module `{adapter_name}` does not set the value `adapter_strategy` ! Please set the "
                    f"value of the adapter's strategy with the class {class_path(type(adapter))}."
                )
            if single_overridden:
                input = self.forward_single_enabled_adapter_(
                    input, adapter, adapter_name=adapter_name, adapter_strategy=strategy
                )
            elif type(strategy).__call__ is _STOCK_STRATEGY_CALL:  # what __call__ would do, one call less
                input = strategy.forward(input, adapter, module=self)
            else:
                input = strategy(input, adapter, module=self)
        return input

    def forward_single_enabled_adapter_(
        self, input: Any, adapter_module: nn.Module, *, adapter_name: str, adapter_strategy: Any
    ) -> Any:
        """Run one adapter through its strategy; override to customise a single adapter's forward."""
        return adapter_strategy(input, adapter_module, module=self)

    # -- names ----------------------------------------------------------------------------------

    def resolve_adapter_module_name_(self, name: str) -> Tuple[str, str]:
        """Split ``module:adapter`` into ``(module, adapter)``. A bare ``adapter`` resolves to the
        module recorded in the config's metadata, else to ``''`` (the default/global module)."""
        if not isinstance(name, str):
            raise TypeError(f"adapter names are strings, got {type(name).__name__}: {name!r}")
        if ":" in name:
            module_name, adapter_name = name.split(":", 1)
            return module_name, adapter_name
        cfg = self.__dict__.get("adapter_cfg")
        module_name = ""
        if cfg is not None:
            meta = cfg.get(self.adapter_global_cfg_key, {}).get(self.adapter_metadata_cfg_key, {})
            module_name = meta.get("modules", {}).get(name, "")
        return module_name, name


# Dispatch skips these hops when a class keeps them as they are (see forward_enabled_adapters).
_STOCK_FORWARD_SINGLE = AdapterModuleMixin.forward_single_enabled_adapter_
_STOCK_STRATEGY_CALL = AbstractAdapterStrategy.__call__


# ---------------------------------------------------------------------------------------------
# Model mixin
# ---------------------------------------------------------------------------------------------


def _adapter_tensor_name(key: str, index: int, param: str) -> str:
    return f"{key}/{index}/{param}"


def _split_adapter_tensor_name(name: str) -> Tuple[str, int, str]:
    key, index, param = name.rsplit("/", 2)
    return key, int(index), param


_FORWARDING_HINT = (
    "no module of {model} holds adapter `{name}`: AdapterModelPTMixin.add_adapter only records adapters in "
    "cfg.adapters. Override add_adapter (call super().add_adapter first, then add_adapter on the modules "
    "that should hold it), and likewise set_enabled_adapters, get_enabled_adapters and is_adapter_available; "
    "see the README, 'Adapters in a model'"
)


def _warn_when_no_module_holds(add_adapter: Callable) -> Callable:
    """Wrap a model's ``add_adapter``: when the outermost call returns and no module holds the adapter, warn."""

    @functools.wraps(add_adapter)
    def wrapper(self, name, *args, **kwargs):
        state = self.__dict__
        depth = state.get("_add_adapter_depth", 0)
        state["_add_adapter_depth"] = depth + 1
        try:
            result = add_adapter(self, name, *args, **kwargs)
        finally:
            state["_add_adapter_depth"] = depth
        if depth == 0 and isinstance(name, str):
            _, adapter_name = self.resolve_adapter_module_name_(name)
            if not self._adapter_instances(adapter_name):
                logging.warning(_FORWARDING_HINT.format(model=type(self).__name__, name=name))
        return result

    return wrapper


class AdapterModelPTMixin(AdapterModuleMixin):
    """Adapter support for a ``ModelPT``: keeps ``cfg.adapters`` and saves/loads adapters.

    ``cfg.adapters`` holds one entry per adapter name plus ``global_cfg`` (with
    ``adapter_meta_cfg.modules`` mapping each adapter name to its module name, so that a bare name
    resolves later). Subclasses override ``add_adapter``, ``set_enabled_adapters``,
    ``get_enabled_adapters`` and ``is_adapter_available`` to forward the calls to their modules,
    calling ``super()`` first, and call ``setup_adapters()`` at the end of ``__init__``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "add_adapter" in cls.__dict__:
            cls.add_adapter = _warn_when_no_module_holds(cls.__dict__["add_adapter"])

    def setup_adapters(self) -> None:
        """Re-create the adapters recorded in ``cfg.adapters`` (call once, at the end of ``__init__``)."""
        if "adapters" not in self.cfg:
            return
        self.update_adapter_cfg(self.cfg.adapters)
        for adapter_name, adapter_cfg in list(self.cfg.adapters.items()):
            if adapter_name == self.adapter_global_cfg_key:
                continue
            self._restoring_adapters = True
            try:
                self.add_adapter(name=adapter_name, cfg=adapter_cfg)
            finally:
                del self._restoring_adapters
            module_name, adapter_name = self.resolve_adapter_module_name_(adapter_name)
            full_name = f"{module_name}:{adapter_name}" if module_name else adapter_name
            logging.info(f"Finished setup of adapter : '{full_name}'. Enabled: {adapter_cfg.get('enabled', True)}.")

    def add_adapter(self, name: str, cfg: Union[DictConfig, dict, AdapterConfig]) -> None:
        """Record adapter ``name`` (``adapter`` or ``module:adapter``) in ``cfg.adapters``.

        Subclasses call this first, then forward ``add_adapter`` to the modules that should hold it.
        Raises ``ValueError`` for a name already in the model (or the reserved ``global_cfg``) and
        for a config without ``_target_``, and ``NotImplementedError`` when the model's class does not
        override ``add_adapter`` (no module would hold the adapter); nothing is changed then. An
        override after which no module holds the adapter logs a warning.
        """
        if type(self).add_adapter is AdapterModelPTMixin.add_adapter:
            raise NotImplementedError(_FORWARDING_HINT.format(model=type(self).__name__, name=name))
        cfg = _to_adapter_config(cfg, name)
        module_name, adapter_name = self.resolve_adapter_module_name_(name)
        if adapter_name == self.adapter_global_cfg_key:
            raise ValueError(f"Adapters cannot have the reserved name : `{self.adapter_global_cfg_key}`")
        restoring = getattr(self, "_restoring_adapters", False)
        if not restoring and "adapters" in self.cfg and adapter_name in self.cfg.adapters:
            raise ValueError(f"Attempting to add multiple adapters with the same name ({adapter_name}) !")

        with open_dict(self.cfg):
            if "adapters" not in self.cfg:
                self.cfg.adapters = OmegaConf.create({})
            adapters = _prepare_default_adapter_config(
                global_key=self.adapter_global_cfg_key, meta_key=self.adapter_metadata_cfg_key, cfg=self.cfg.adapters
            )
            with open_dict(adapters):
                adapters[self.adapter_global_cfg_key][self.adapter_metadata_cfg_key]["modules"][adapter_name] = module_name
                cfg.setdefault("enabled", True)
                adapters[adapter_name] = cfg
        self.update_adapter_cfg(self.cfg.adapters)
        _adapters_changed()
        self.check_valid_model_with_adapter_support_()

    def _sync_adapter_cfg(self) -> None:
        if "adapters" in self.cfg:
            self.update_adapter_cfg(self.cfg.adapters)
        elif "adapter_cfg" not in self.__dict__:
            self.adapter_cfg = OmegaConf.create({})

    def is_adapter_available(self) -> bool:
        """Whether any adapter is enabled (subclasses also ask their modules)."""
        self._sync_adapter_cfg()
        self.check_valid_model_with_adapter_support_()
        return "adapters" in self.cfg and len(self.get_enabled_adapters()) > 0

    def set_enabled_adapters(self, name: Optional[str] = None, enabled: bool = True) -> None:
        """Set ``enabled`` for adapter ``name`` (every adapter when None) in ``cfg.adapters``;
        subclasses call this first, then forward the call to their modules."""
        self._sync_adapter_cfg()
        self.check_valid_model_with_adapter_support_()
        if "adapters" not in self.cfg:
            raise ValueError("No adapter is available to enable/disable")
        adapters = self.cfg.adapters
        if name is None:
            names = [key for key in adapters.keys() if key != self.adapter_global_cfg_key]
        else:
            _, adapter_name = self.resolve_adapter_module_name_(name)
            if adapter_name == self.adapter_global_cfg_key:
                raise ValueError(
                    f"Cannot set the state of the global config of adapters, given name = `{self.adapter_global_cfg_key}`"
                )
            if adapter_name not in adapters:
                raise AdapterNotFoundError(f"No adapter named `{name}` in this model; available: {self._adapter_names()}")
            names = [adapter_name]
        with open_dict(adapters):
            for key in names:
                adapters[key]["enabled"] = bool(enabled)
                logging.info(f"Setting adapter '{key}' status : Enabled = {enabled}")
        self.update_adapter_cfg(adapters)
        _adapters_changed()

    def get_enabled_adapters(self) -> List[str]:
        """The model's own contribution (none); subclasses extend it with their modules' lists."""
        self._sync_adapter_cfg()
        self.check_valid_model_with_adapter_support_()
        return []

    def check_valid_model_with_adapter_support_(self) -> None:
        """Called before adapter operations; override to warn or raise about invalid setups."""

    def update_adapter_cfg(self, cfg: DictConfig) -> None:
        """Share ``cfg`` (normally ``self.cfg.adapters``) as ``adapter_cfg`` with every module."""
        changed = False
        for module in self.modules():
            if isinstance(module, AdapterModuleMixin) and module.__dict__.get("adapter_cfg") is not cfg:
                module.adapter_cfg = cfg
                changed = True
        if changed:
            _adapters_changed()

    def replace_adapter_compatible_modules(self, update_config: bool = True, verbose: bool = True) -> None:
        """Swap every submodule whose class is registered for its adapter class (and its config paths)."""
        for _, module in self.named_modules():
            update_module_class_with_adapter_class(module, cfg=self.cfg, update_config=update_config, verbose=verbose)
        _adapters_changed()

    @property
    def adapter_module_names(self) -> List[str]:
        """Module names adapters may name (``module:adapter``); ``''`` is the default module."""
        return [""]

    @property
    def default_adapter_module_name(self) -> Optional[str]:
        """The module a bare adapter name goes to; None if the model has no default."""
        return None

    # -- adapter files --------------------------------------------------------------------------

    def _adapter_instances(self, adapter_name: str) -> List[nn.Module]:
        instances = []
        for module in self.modules():
            if isinstance(module, AdapterModuleMixin):
                adapter = module.get_adapter_module(adapter_name)
                if adapter is not None:
                    instances.append(adapter)
        return instances

    def save_adapters(self, filepath: str, name: Optional[Union[str, List[str]]] = None) -> None:
        """Save the adapters called ``name`` (all when None) to ``filepath``: their weights (safetensors,
        one set per module instance holding them) and their configs, a fraction of the model's size.

        Names may be global (``adapter``), module (``module:adapter``) or partial (a bare name of a
        module adapter, resolved through the model's metadata)."""
        if "adapters" not in self.cfg:
            raise AttributeError("No adapters have been added to this model, so no adapters can be saved.")
        adapters = self.cfg.adapters
        names = self._adapter_names() if name is None else [name] if isinstance(name, str) else list(name)
        meta = adapters[self.adapter_global_cfg_key][self.adapter_metadata_cfg_key]["modules"]
        saved = OmegaConf.create({})
        saved[self.adapter_global_cfg_key] = copy.deepcopy(adapters[self.adapter_global_cfg_key])
        saved[self.adapter_global_cfg_key][self.adapter_metadata_cfg_key]["modules"] = {}
        tensors: Dict[str, torch.Tensor] = {}
        for requested in names:
            module_name, adapter_name = self.resolve_adapter_module_name_(requested)
            if adapter_name not in adapters or adapter_name == self.adapter_global_cfg_key:
                raise AdapterNotFoundError(f"No adapter named `{requested}` in this model; available: {self._adapter_names()}")
            module_name = meta.get(adapter_name, module_name)
            key = f"{module_name}:{adapter_name}" if module_name else adapter_name
            saved[adapter_name] = copy.deepcopy(adapters[adapter_name])
            saved[self.adapter_global_cfg_key][self.adapter_metadata_cfg_key]["modules"][adapter_name] = module_name
            instances = self._adapter_instances(adapter_name)
            if not instances:
                hint = _FORWARDING_HINT.format(model=type(self).__name__, name=requested)
                raise ValueError(f"nothing to save for adapter `{requested}`: {hint}")
            for index, adapter in enumerate(instances):
                for param, tensor in adapter.state_dict().items():
                    tensors[_adapter_tensor_name(key, index, param)] = tensor
        write_checkpoint(filepath, "adapters", tensors, OmegaConf.to_yaml(saved))

    def _read_adapter_file(self, filepath: str) -> Tuple[DictConfig, Dict[str, Dict[int, Dict[str, torch.Tensor]]]]:
        tensors, config_text = read_checkpoint(filepath, "adapters")
        source = f"'{filepath}'"
        try:
            file_cfg = OmegaConf.create(config_text)
        except Exception as exc:
            raise CheckpointFileError(f"{source} holds an unreadable adapter config: {exc}") from exc
        if not isinstance(file_cfg, DictConfig) or self.adapter_global_cfg_key not in file_cfg:
            raise CheckpointFileError(f"{source} holds no adapter config with `{self.adapter_global_cfg_key}`")
        check_loadable_targets(file_cfg, source)
        states: Dict[str, Dict[int, Dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
        for tensor_name, tensor in tensors.items():
            try:
                key, index, param = _split_adapter_tensor_name(tensor_name)
            except ValueError:
                raise CheckpointFileError(f"{source} holds a tensor {tensor_name!r} that names no adapter") from None
            states[key][index][param] = tensor
        return file_cfg, states

    def _resolve_with_config(self, name: str, cfg: DictConfig) -> Tuple[str, str]:
        own = self.__dict__.get("adapter_cfg")
        self.__dict__["adapter_cfg"] = cfg
        try:
            return self.resolve_adapter_module_name_(name)
        finally:
            if own is None:
                del self.__dict__["adapter_cfg"]
            else:
                self.__dict__["adapter_cfg"] = own

    def load_adapters(
        self,
        filepath: str,
        name: Optional[Union[str, List[str]]] = None,
        map_location: Optional[Union[str, torch.device]] = None,
        strict: bool = True,
    ) -> None:
        """Add the adapters saved in ``filepath`` (all when ``name`` is None) and load their weights.

        ``name`` is global, ``module:adapter`` or a bare name resolved through the file's metadata.
        The model must not already hold an adapter of that name. Weights are copied into the new
        adapters, which sit on the device of the modules holding them; ``map_location`` is accepted
        for NeMo compatibility and only moves the weights read from the file. Any error (missing
        name, foreign or corrupted file, unsafe ``_target_``, mismatched modules or weights) leaves
        the model as it was.
        """
        file_cfg, states = self._read_adapter_file(filepath)
        source = f"'{filepath}'"
        available = [k for k in file_cfg.keys() if k != self.adapter_global_cfg_key]
        names = available if name is None else [name] if isinstance(name, str) else list(name)
        existing = self.cfg.get("adapters") or {}

        plan = []
        for requested in names:
            module_name, adapter_name = self._resolve_with_config(requested, file_cfg)
            if adapter_name == self.adapter_global_cfg_key:
                continue
            if adapter_name not in file_cfg:
                raise AdapterNotFoundError(f"{source} has no adapter named `{requested}`; it holds: {available}")
            if adapter_name in existing:
                raise ValueError(f"cannot load adapter `{requested}` from {source}: the model already has an adapter of that name")
            key = f"{module_name}:{adapter_name}" if module_name else adapter_name
            saved_as = [k for k in states if k.rsplit(":", 1)[-1] == adapter_name]
            if key not in states and saved_as:
                raise AdapterNotFoundError(
                    f"{source} has no adapter `{requested}`: it holds `{adapter_name}` as {saved_as}"
                )
            plan.append((key, adapter_name, file_cfg[adapter_name]))

        for key, adapter_name, adapter_cfg in plan:
            self.add_adapter(name=key, cfg=adapter_cfg)
            instances = self._adapter_instances(adapter_name)
            saved = states.get(key, {})
            if len(saved) != len(instances):
                raise ValueError(
                    f"{source} holds {len(saved)} instance(s) of adapter `{key}` but this model has "
                    f"{len(instances)} module(s) holding it"
                )
            for index, adapter in enumerate(instances):
                state = saved[index]
                if map_location is not None:
                    state = {k: v.to(map_location) for k, v in state.items()}
                try:
                    adapter.load_state_dict(state, strict=strict)
                except RuntimeError as exc:
                    exc.add_note(f"while loading adapter `{key}` (instance {index}) from {source}")
                    raise
