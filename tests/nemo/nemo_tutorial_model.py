"""NeMo's adapter tutorial model, written with NeMo's own classes (no fusedadapters import).

``MLP`` blocks with NeMo's ``AdapterModuleMixin``, a ``ResidualMLP`` encoder and decoder registered
with NeMo's adapter registry, and ``TutorialModel`` (a NeMo ``ModelPT`` with ``AdapterModelPTMixin``)
that routes ``''``/``encoder:``/``decoder:`` adapter names as the tutorial's final model does.
``make_model(dim, accepted_types=...)`` sets NeMo's accepted adapter types on every block.

NeMo 3.0 restores only models whose class path is in its ``_target_`` allowlist; a model defined
outside NeMo (this one) must be added to it, as ``allow_this_module`` does.
"""

from typing import Iterable, List, Optional

import torch
from nemo.core import ModelPT
from nemo.core.classes import common as nemo_common
from nemo.core.classes.mixins import adapter_mixins
from omegaconf import DictConfig, OmegaConf
from torch import nn

THIS_MODULE_PREFIX = f"{__name__}."


def allow_this_module() -> None:
    """Add this module to NeMo's ``_target_`` allowlist (what NeMo 3.0 asks of user-defined models)."""
    if THIS_MODULE_PREFIX not in nemo_common.ALLOWED_TARGET_PREFIXES:
        nemo_common.ALLOWED_TARGET_PREFIXES.append(THIS_MODULE_PREFIX)


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


class MLP(nn.Module, adapter_mixins.AdapterModuleMixin):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.ln(self.fc(x))
        if self.is_adapter_available():
            x = self.forward_enabled_adapters(x)
        return x


class ResidualMLP(nn.Module):
    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList([MLP(dim) for _ in range(num_layers)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class ResidualMLPAdapter(ResidualMLP, adapter_mixins.AdapterModuleMixin):
    def add_adapter(self, name: str, cfg: DictConfig, **kwargs):
        for layer in self.layers:
            layer.add_adapter(name, cfg, **kwargs)

    def get_enabled_adapters(self) -> List[str]:
        names = set()
        for layer in self.layers:
            names.update(layer.get_enabled_adapters())
        return sorted(names)

    def set_enabled_adapters(self, name: Optional[str] = None, enabled: bool = True):
        for layer in self.layers:
            layer.set_enabled_adapters(name, enabled)

    def is_adapter_available(self) -> bool:
        return any(layer.is_adapter_available() for layer in self.layers)


if adapter_mixins.get_registered_adapter(ResidualMLP) is None:
    adapter_mixins.register_adapter(ResidualMLP, ResidualMLPAdapter)


class TutorialModel(ModelPT, adapter_mixins.AdapterModelPTMixin):
    """The tutorial's final ``SimpleModel``: encoder and decoder with adapters, and a projection."""

    def __init__(self, cfg, trainer=None):
        super().__init__(cfg, trainer=trainer)
        from hydra.utils import instantiate

        self.encoder = instantiate(cfg.encoder)
        self.decoder = instantiate(cfg.decoder)
        self.projection = nn.Linear(self.decoder.dim, cfg.out_features)
        self.setup_adapters()

    def forward(self, x):
        return self.projection(self.decoder(self.encoder(x)))

    @classmethod
    def list_available_models(cls):
        return []

    def setup_training_data(self, train_data_config):
        pass

    def setup_validation_data(self, val_data_config):
        pass

    # The tutorial's adapter routing: '' goes to the encoder (and the decoder if the global config says so).
    @property
    def adapter_module_names(self) -> List[str]:
        return ["", "encoder", "decoder"]

    def _global_cfg(self) -> DictConfig:
        if "adapters" in self.cfg and self.adapter_global_cfg_key in self.cfg.adapters:
            return self.adapter_cfg[self.adapter_global_cfg_key]
        return DictConfig({})

    def _targets(self, module_name: Optional[str]) -> List[nn.Module]:
        global_cfg = self._global_cfg()
        targets = []
        if module_name is None or module_name == "encoder" or (module_name == "" and global_cfg.get("encoder_adapter", True)):
            targets.append(self.encoder)
        if module_name is None or module_name == "decoder" or (module_name == "" and global_cfg.get("decoder_adapter", False)):
            targets.append(self.decoder)
        return targets

    def add_adapter(self, name: str, cfg: DictConfig):
        super().add_adapter(name, cfg)
        module_name, _ = self.resolve_adapter_module_name_(name)
        for module in self._targets(module_name):
            module.add_adapter(name, cfg)

    def resolve_adapter_module_name_(self, name: str):
        module_name, adapter_name = super().resolve_adapter_module_name_(name)
        if module_name not in self.adapter_module_names:
            raise ValueError(f"unknown adapter module {module_name!r}; expected one of {self.adapter_module_names}")
        return module_name, adapter_name

    def get_enabled_adapters(self) -> List[str]:
        names = super().get_enabled_adapters()
        for module in (self.encoder, self.decoder):
            names.extend(n for n in module.get_enabled_adapters() if n not in names)
        return names

    def set_enabled_adapters(self, name: Optional[str] = None, enabled: bool = True):
        super().set_enabled_adapters(name, enabled)
        module_name = None if name is None else self.resolve_adapter_module_name_(name)[0]
        for module in self._targets(module_name):
            if module.is_adapter_available():
                module.set_enabled_adapters(name, enabled)


def model_config(dim: int, encoder_layers: int = 3, decoder_layers: int = 2) -> DictConfig:
    """The tutorial's config, with the registered adapter-capable encoder and decoder (its
    ``get_adapter_model_config``)."""
    return OmegaConf.create(
        {
            "in_features": dim,
            "out_features": 7,
            "encoder": {"_target_": class_path(ResidualMLPAdapter), "dim": dim, "num_layers": encoder_layers},
            "decoder": {"_target_": class_path(ResidualMLPAdapter), "dim": dim, "num_layers": decoder_layers},
        }
    )


def make_model(dim: int, accepted_types: Iterable[type] = ()) -> TutorialModel:
    """A tutorial model whose encoder/decoder support adapters; ``accepted_types`` set on every block."""
    model = TutorialModel(model_config(dim))
    if accepted_types:
        for block in blocks(model):
            block.set_accepted_adapter_types(list(accepted_types))
    return model


def blocks(model: TutorialModel) -> List[MLP]:
    return [*model.encoder.layers, *model.decoder.layers]


def seeded_input(dim: int, rows: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 5, dim, generator=torch.Generator().manual_seed(seed))
