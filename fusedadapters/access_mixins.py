"""A module-keyed registry of tensors that a training loop collects (NeMo's ``AccessMixin``).

Adapters register auxiliary losses here (the residual strategy's ``l2_lambda`` loss is registered
as ``adapter_loss``); the loop reads them with ``AccessMixin.get_module_registry(model)`` and clears
them with ``AccessMixin.reset_registry(model)``. Settings and the enabled flag are kept per model
``guid`` (``"default"`` unless a module sets ``model_guid``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

__all__ = ["AccessMixin", "set_access_cfg"]

_DEFAULT_GUID = "default"
_ACCESS_CFG: Dict[str, Dict[str, Any]] = {_DEFAULT_GUID: {"detach": False, "convert_to_cpu": False}}
_ACCESS_ENABLED: Dict[str, bool] = {_DEFAULT_GUID: False}


def set_access_cfg(cfg: Dict[str, Any], guid: Optional[str] = None) -> None:
    """Replace the access settings (``detach``, ``convert_to_cpu``, ``compute_adapter_loss``) of ``guid``."""
    if not hasattr(cfg, "get"):
        raise TypeError(f"cfg must be a mapping, got {type(cfg).__name__}")
    _ACCESS_CFG[guid or _DEFAULT_GUID] = dict(cfg)


class AccessMixin:
    """Lets a module register tensors (``register_accessible_tensor``) for the training loop to collect."""

    def register_accessible_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` to this module's registry under ``name``."""
        cfg = self.access_cfg
        if cfg.get("convert_to_cpu", False):
            tensor = tensor.cpu()
        if cfg.get("detach", False):
            tensor = tensor.detach()
        registry: Dict[str, List[torch.Tensor]] = self.__dict__.setdefault("_registry", {})
        registry.setdefault(name, []).append(tensor)

    @classmethod
    def get_module_registry(cls, module: torch.nn.Module) -> Dict[str, Dict[str, List[torch.Tensor]]]:
        """``{qualified submodule name: {tensor name: [tensors]}}`` for every non-empty registry under ``module``."""
        return {
            name: m.__dict__["_registry"]
            for name, m in module.named_modules()
            if m.__dict__.get("_registry")
        }

    def reset_registry(self: torch.nn.Module, registry_key: Optional[str] = None) -> None:
        """Clear the registries of this module and all its submodules (only ``registry_key`` if given),
        and disable access for this module's guid."""
        for _, module in self.named_modules():
            registry = module.__dict__.get("_registry")
            if registry is None:
                continue
            if registry_key is None:
                registry.clear()
            else:
                registry.pop(registry_key, None)
        AccessMixin.set_access_enabled(False, guid=getattr(self, "model_guid", None))

    @property
    def access_cfg(self) -> Dict[str, Any]:
        """The access settings shared by every module of this module's guid."""
        return _ACCESS_CFG.setdefault(getattr(self, "model_guid", None) or _DEFAULT_GUID, {})

    @classmethod
    def update_access_cfg(cls, cfg: Dict[str, Any], guid: Optional[str] = None) -> None:
        """Merge ``cfg`` into the access settings of ``guid``."""
        _ACCESS_CFG.setdefault(guid or _DEFAULT_GUID, {}).update(cfg)

    @classmethod
    def is_access_enabled(cls, guid: Optional[str] = None) -> bool:
        return _ACCESS_ENABLED.get(guid or _DEFAULT_GUID, False)

    @classmethod
    def set_access_enabled(cls, access_enabled: bool, guid: Optional[str] = None) -> None:
        _ACCESS_ENABLED[guid or _DEFAULT_GUID] = access_enabled
