"""Class paths and ``_target_`` configs: building objects from configs, and refusing what may not be built.

``instantiate`` is Hydra's ``instantiate`` for the configs adapters use (``_target_``, ``_args_``,
``_recursive_``, ``_convert_``); it imports and calls whatever it names, as Hydra does. The package
never hands it a config unchecked:

* a config read from a file goes through ``check_loadable_targets``: each ``_target_`` must name a
  class that is already imported (reading a file never imports a module) and that is an adapter
  module, an adapter strategy, a module with adapter support, a ``NeuralModule``/``ModelPT``
  subclass, or a class registered with ``register_adapter``;
* a config the package builds in memory (``add_adapter``, a strategy config) goes through
  ``instantiate_checked``: each ``_target_`` is imported and must be a class of the expected kind
  (an adapter module is any ``torch.nn.Module`` subclass; a strategy is what ``is_adapter_strategy``
  says) before anything is called.

Either check raises ``UnsafeTargetError`` naming the ``_target_`` and where it sits.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from typing import Any, Iterator, List, Set, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "UnsafeTargetError",
    "check_buildable_targets",
    "check_loadable_targets",
    "class_path",
    "import_class_by_path",
    "instantiate",
    "instantiate_checked",
    "is_adapter_strategy",
    "register_loadable_base",
    "register_loadable_class",
    "resolve_loadable_target",
]

_SPECIAL_KEYS = ("_target_", "_args_", "_recursive_", "_convert_")
_LOADABLE_BASES: List[type] = []
_LOADABLE_CLASSES: Set[type] = set()


# Strategies by base class: this package's, and NeMo's (matched by path, so NeMo need not be imported).
_STRATEGY_BASE_PATHS = (
    "fusedadapters.adapter_mixin_strategies.AbstractAdapterStrategy",
    "nemo.core.classes.mixins.adapter_mixin_strategies.AbstractAdapterStrategy",
)


class UnsafeTargetError(ValueError):
    """A ``_target_`` names something the package will not build: from a file, anything but adapters,
    strategies and models; in an in-memory config, anything but the kind of class expected there."""


def class_path(cls: type) -> str:
    """``module.ClassName``, the form ``_target_`` and the adapter registry use."""
    return f"{cls.__module__}.{cls.__name__}"


def import_class_by_path(path: str) -> Any:
    """Import ``module.attr[.attr...]`` and return the object (imports the module if needed)."""
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"expected a dotted path such as 'package.module.Class', got {path!r}")
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                raise
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise ImportError(f"cannot import {path!r}: no importable module holds it")


def _as_config(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return OmegaConf.structured(cfg)
    if isinstance(cfg, dict):
        return OmegaConf.create(cfg)
    return cfg


def _convert(value: Any, convert: str) -> Any:
    if convert in ("partial", "all") and isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _contains_target(node: Any) -> bool:
    if isinstance(node, DictConfig):
        return "_target_" in node or any(_contains_target(v) for v in node.values())
    if isinstance(node, ListConfig):
        return any(_contains_target(v) for v in node)
    return False


def _build(node: Any, recursive: bool, convert: str) -> Any:
    """A keyword value: built if it is a ``_target_`` config; containers holding one become plain."""
    if not recursive or not _contains_target(node):
        return _convert(node, convert)
    if isinstance(node, DictConfig):
        if "_target_" in node:
            return _instantiate_node(node, {}, recursive, convert)
        return {k: _build(v, recursive, convert) for k, v in node.items()}
    return [_build(v, recursive, convert) for v in node]


def _instantiate_node(node: DictConfig, overrides: dict, recursive: bool, convert: str) -> Any:
    recursive = bool(overrides.pop("_recursive_", node.get("_recursive_", recursive)))
    convert = str(overrides.pop("_convert_", node.get("_convert_", convert)))
    target = overrides.pop("_target_", node.get("_target_"))
    if target is None:
        raise ValueError(f"config has no `_target_`: {OmegaConf.to_yaml(node).strip() or '{}'}")
    factory = target if callable(target) and not isinstance(target, str) else import_class_by_path(str(target))
    args = overrides.pop("_args_", node.get("_args_", []))
    kwargs = {k: node[k] for k in node.keys() if k not in _SPECIAL_KEYS}
    kwargs.update(overrides)
    if recursive:
        args = [_build(a, recursive, convert) for a in args]
        kwargs = {k: _build(v, recursive, convert) for k, v in kwargs.items()}
    else:
        args = [_convert(a, convert) for a in args]
        kwargs = {k: _convert(v, convert) for k, v in kwargs.items()}
    return factory(*args, **kwargs)


def instantiate(config: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the object a ``_target_`` config describes (Hydra's ``instantiate`` semantics).

    ``config`` is a DictConfig, dict or dataclass instance holding ``_target_`` (a dotted path or a
    callable); other keys are keyword arguments, ``kwargs`` override them and ``args`` come first.
    Nested configs with ``_target_`` are built first unless ``_recursive_`` is false; ``_convert_``
    ('none', 'partial', 'all') turns nested configs into plain containers.
    """
    if config is None:
        return None
    node = _as_config(config)
    if not isinstance(node, DictConfig):
        raise TypeError(f"instantiate expects a DictConfig, dict or dataclass config, got {type(config).__name__}")
    overrides = dict(kwargs)
    if args:
        overrides["_args_"] = list(args) + list(node.get("_args_", []))
    return _instantiate_node(node, overrides, recursive=True, convert="none")


def register_loadable_base(cls: type) -> type:
    """Allow every subclass of ``cls`` to be built from a ``_target_`` read from a file."""
    if cls not in _LOADABLE_BASES:
        _LOADABLE_BASES.append(cls)
    return cls


def register_loadable_class(cls: type) -> type:
    """Allow exactly ``cls`` to be built from a ``_target_`` read from a file."""
    _LOADABLE_CLASSES.add(cls)
    return cls


def _find_imported(path: str) -> Any:
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:split]))
        if module is None:
            continue
        obj: Any = module
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def resolve_loadable_target(path: Any, source: str) -> type:
    """The class a file's ``_target_`` names, or an ``UnsafeTargetError`` that says why not.

    Never imports anything: the class must live in a module the program has already imported.
    """
    if not isinstance(path, str) or "." not in path:
        raise UnsafeTargetError(f"{source}: `_target_` must be a dotted class path, got {path!r}")
    obj = _find_imported(path)
    if obj is None:
        raise UnsafeTargetError(
            f"{source}: `_target_` {path!r} is not a class of an already imported module; files never "
            "import code, so import the module that defines it before loading"
        )
    if not inspect.isclass(obj):
        raise UnsafeTargetError(
            f"{source}: refusing `_target_` {path!r}: it is a {type(obj).__name__}, not a class; a file may "
            "only name adapter modules, adapter strategies, modules with adapter support and ModelPT subclasses"
        )
    if obj not in _LOADABLE_CLASSES and not any(issubclass(obj, base) for base in _LOADABLE_BASES):
        raise UnsafeTargetError(
            f"{source}: refusing `_target_` {path!r}: a file may only name adapter modules, adapter strategies, "
            "modules with adapter support, NeuralModule/ModelPT subclasses and classes registered with "
            "register_adapter"
        )
    return obj


def _targets(node: Any, where: str) -> Iterator[Tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                yield here, value
            else:
                yield from _targets(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}[{i}]")


def check_loadable_targets(cfg: Any, source: str) -> None:
    """Raise ``UnsafeTargetError`` unless every ``_target_`` anywhere in ``cfg`` is loadable."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    except Exception as exc:  # omegaconf raises several unrelated types for bad interpolations
        raise UnsafeTargetError(f"{source}: the config cannot be resolved: {exc}") from exc
    for where, target in _targets(container, ""):
        resolve_loadable_target(target, f"{source} (at {where})")


# ---------------------------------------------------------------------------------------------
# In-memory configs: the right kind of class, checked before anything is called
# ---------------------------------------------------------------------------------------------


def is_adapter_strategy(obj: Any) -> bool:
    """Whether ``obj`` (a class or an instance) is an adapter strategy.

    A strategy subclasses this package's or NeMo's ``AbstractAdapterStrategy``, or behaves as one: its
    ``forward`` takes ``(input, adapter, *, module)``. This is the one definition the package uses, so
    that NeMo's strategies work with this package's adapters and the other way round.
    """
    cls = obj if inspect.isclass(obj) else type(obj)
    if any(class_path(base) in _STRATEGY_BASE_PATHS for base in cls.__mro__):
        return True
    forward = getattr(cls, "forward", None)
    if not callable(forward):
        return False
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword_only = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    return len(positional) == 3 and "module" in keyword_only  # (self, input, adapter, *, module)


def _is_module_class(cls: type) -> bool:
    return issubclass(cls, torch.nn.Module)


_KINDS = {
    "adapter": (_is_module_class, "an adapter module class (a torch.nn.Module subclass)"),
    "strategy": (is_adapter_strategy, "an adapter strategy class (see fusedadapters.targets.is_adapter_strategy)"),
    "module": (_is_module_class, "a torch.nn.Module subclass"),
    "part": (
        lambda cls: _is_module_class(cls) or is_adapter_strategy(cls),
        "a torch.nn.Module subclass or an adapter strategy class",
    ),
}


def _resolve_buildable(target: Any, kind: str, where: str) -> type:
    accept, expected = _KINDS[kind]
    obj = import_class_by_path(target) if isinstance(target, str) else target
    if not (inspect.isclass(obj) and accept(obj)):
        what = f"a {type(obj).__name__}" if not inspect.isclass(obj) else f"the class {class_path(obj)}"
        raise UnsafeTargetError(
            f"{where}: refusing `_target_` {target!r}: it is {what}, not {expected}; nothing was built"
        )
    return obj


def _keyed_targets(node: Any, where: str, key: Any) -> Iterator[Tuple[str, Any, Any]]:
    """``(where, target, key holding the config)`` for every ``_target_`` in a plain container."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield (f"{where}._target_" if where else "_target_"), node["_target_"], key
        for k, value in node.items():
            if k != "_target_":
                yield from _keyed_targets(value, f"{where}.{k}" if where else str(k), k)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _keyed_targets(value, f"{where}[{i}]", key)


def check_buildable_targets(config: Any, kind: str, source: str) -> type:
    """Check every ``_target_`` of an in-memory ``config`` before anything is built; return the top class.

    The top ``_target_`` must be of ``kind`` ('adapter', 'strategy' or 'module'); a nested one under the
    key ``adapter_strategy`` must be a strategy, any other nested one a module or a strategy. Targets
    are imported (as ``instantiate`` would) but nothing is called. Raises ``UnsafeTargetError``.
    """
    node = _as_config(config)
    try:
        container = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception as exc:  # omegaconf raises several unrelated types for bad interpolations
        raise UnsafeTargetError(f"{source}: the config cannot be resolved: {exc}") from exc
    if not isinstance(container, dict) or "_target_" not in container:
        raise UnsafeTargetError(f"{source}: no `_target_` naming the class to build")
    top = None
    for where, target, key in _keyed_targets(container, "", None):
        nested_kind = kind if where == "_target_" else "strategy" if key == "adapter_strategy" else "part"
        cls = _resolve_buildable(target, nested_kind, f"{source} (at {where})")
        top = cls if where == "_target_" else top
    return top


def instantiate_checked(config: Any, kind: str, *, source: str, **kwargs: Any) -> Any:
    """``instantiate(config, **kwargs)`` after ``check_buildable_targets(config, kind, source)``.

    For configs that may come from YAML files or command lines: a ``_target_`` of the wrong kind
    (``os.system``, say) is refused before it is called.
    """
    if "_target_" in kwargs:
        _resolve_buildable(kwargs["_target_"], kind, f"{source} (the _target_ argument)")
    check_buildable_targets(config, kind, source)
    return instantiate(config, **kwargs)
