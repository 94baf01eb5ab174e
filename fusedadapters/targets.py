"""Class paths and ``_target_`` configs: building objects from configs, and refusing unsafe ones from files.

``instantiate`` is Hydra's ``instantiate`` for the configs adapters use (``_target_``, ``_args_``,
``_recursive_``, ``_convert_``); it imports what it names, as Hydra does, so it is for configs the
program itself wrote. A config read from a file goes through ``check_loadable_targets`` first: each
``_target_`` there must name a class that is already imported (reading a file never imports a
module) and that is an adapter module, an adapter strategy, a module with adapter support, a
``NeuralModule``/``ModelPT`` subclass, or a class registered with ``register_adapter``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from typing import Any, Iterator, List, Set, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "UnsafeTargetError",
    "check_loadable_targets",
    "class_path",
    "import_class_by_path",
    "instantiate",
    "register_loadable_base",
    "register_loadable_class",
    "resolve_loadable_target",
]

_SPECIAL_KEYS = ("_target_", "_args_", "_recursive_", "_convert_")
_LOADABLE_BASES: List[type] = []
_LOADABLE_CLASSES: Set[type] = set()


class UnsafeTargetError(ValueError):
    """A ``_target_`` read from a file names something that may not be built from a file."""


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
