"""``NeuralModule`` and ``ModelPT``: NeMo's module and model base classes, without Lightning.

``NeuralModule`` adds ``num_weights``, ``freeze``, ``unfreeze`` and ``as_frozen`` to ``nn.Module``.
``ModelPT`` holds its configuration as an OmegaConf ``cfg`` and saves config and weights to one
file (safetensors weights, YAML config, nothing pickled); ``restore_from`` rebuilds the model class
the file names, which must be a ``ModelPT`` subclass the program has already imported.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from .serialization import CheckpointFileError, read_checkpoint, write_checkpoint
from .targets import check_loadable_targets, class_path, register_loadable_base, resolve_loadable_target
from .utils import logging

__all__ = ["ModelPT", "ModelSummary", "NeuralModule"]


@register_loadable_base
class NeuralModule(nn.Module):
    """An ``nn.Module`` with NeMo's conveniences for freezing and counting trainable weights."""

    @property
    def num_weights(self) -> int:
        """The number of trainable (``requires_grad``) parameter elements."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def freeze(self) -> None:
        """Make every parameter non-trainable and switch to eval mode, remembering each parameter's
        previous ``requires_grad`` so that ``unfreeze(partial=True)`` can restore it."""
        grad_map = {name: p.requires_grad for name, p in self.named_parameters()}
        for p in self.parameters():
            p.requires_grad_(False)
        self.__dict__.setdefault("_frozen_grad_map", {}).update(grad_map)
        self.eval()

    def unfreeze(self, partial: bool = False) -> None:
        """Make parameters trainable and switch to train mode.

        With ``partial``, only the parameters that were trainable before ``freeze()`` become
        trainable again (``ValueError`` if ``freeze()`` was never called).
        """
        grad_map = self.__dict__.get("_frozen_grad_map")
        if partial and grad_map is None:
            raise ValueError("Cannot unfreeze partially without first freezing the module with `freeze()`")
        for name, p in self.named_parameters():
            if not partial:
                p.requires_grad_(True)
            elif name in grad_map:
                p.requires_grad_(grad_map[name])
            else:
                logging.warning(f"Parameter {name} was added after `freeze()`; unfreezing it.")
                p.requires_grad_(True)
        self.__dict__.pop("_frozen_grad_map", None)
        self.train()

    @contextlib.contextmanager
    def as_frozen(self) -> Iterator[None]:
        """Freeze for the duration of the block, then restore ``requires_grad`` and the train/eval mode."""
        training = self.training
        self.freeze()
        try:
            yield
        finally:
            self.unfreeze(partial=True)
            self.train(training)


@dataclass
class ModelSummary:
    """What ``ModelPT.summarize`` reports: one row per submodule (name, type, trainable, frozen)."""

    rows: List[Tuple[str, str, int, int]] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0

    @property
    def total_params(self) -> int:
        return self.trainable_params + self.frozen_params

    def __str__(self) -> str:
        header = ("", "Name", "Type", "Trainable", "Frozen")
        body = [(str(i), name, kind, f"{t:,}", f"{f:,}") for i, (name, kind, t, f) in enumerate(self.rows)]
        widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]

        def line(row: Tuple[str, ...]) -> str:
            cells = [cell.rjust(w) if c >= 3 else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))]
            return "  ".join(cells).rstrip()

        rule = "-" * len(line(header))
        lines = [line(header), rule, *map(line, body), rule]
        lines += [
            f"{self.trainable_params:,} Trainable params",
            f"{self.frozen_params:,} Non-trainable params",
            f"{self.total_params:,} Total params",
        ]
        return "\n".join(lines)


def _count(params: Iterator[nn.Parameter]) -> Tuple[int, int]:
    trainable = frozen = 0
    for p in params:
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def _default_map_location() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ModelPT(NeuralModule):
    """A model built from an OmegaConf config, saved and restored as one file.

    Subclasses take ``(cfg, trainer=None)``, call ``super().__init__(cfg, trainer=trainer)`` first and
    build their modules from ``self.cfg``. The config is deep-copied, stamped with ``target`` (the
    model's class path, which ``restore_from`` uses) and set to struct mode (unknown keys raise).

    Compared with NeMo's ``ModelPT`` this is a plain ``nn.Module``: no Lightning trainer, data or
    optimizer setup; ``trainer`` is accepted and kept as ``self.trainer``.
    """

    def __init__(self, cfg: Union[DictConfig, dict], trainer: Any = None):
        super().__init__()
        if not (isinstance(cfg, (dict, DictConfig))):
            raise TypeError(f"cfg must be a DictConfig or dict, got {type(cfg).__name__}")
        cfg = OmegaConf.create(copy.deepcopy(OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg))
        with open_dict(cfg):
            cfg.target = class_path(type(self))
        OmegaConf.set_struct(cfg, True)
        self._cfg = cfg
        self.trainer = trainer

    @property
    def cfg(self) -> DictConfig:
        """The model's configuration (struct mode: use ``open_dict`` to add keys)."""
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: DictConfig) -> None:
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg)
        self._cfg = cfg

    @classmethod
    def list_available_models(cls) -> List[Any]:
        """Pretrained checkpoints of this class (none: there is no model hub here)."""
        return []

    def setup_training_data(self, train_data_config: Any) -> None:
        """Hook kept for NeMo compatibility; data loading is the training loop's business here."""

    def setup_validation_data(self, val_data_config: Any) -> None:
        """Hook kept for NeMo compatibility; data loading is the training loop's business here."""

    # -- save / restore -------------------------------------------------------------------------

    def save_to(self, save_path: Union[str, os.PathLike]) -> None:
        """Write the config and every weight (``state_dict``) to ``save_path`` as one file.

        The file is safetensors with the YAML config in its metadata; nothing is pickled. A config
        naming a ``_target_`` that ``restore_from`` would refuse is refused here already.
        """
        source = f"the config of {type(self).__name__}"
        check_loadable_targets(self.cfg, source)
        resolve_loadable_target(self.cfg.target, source)
        write_checkpoint(save_path, "model", self.state_dict(), OmegaConf.to_yaml(self.cfg, resolve=True))

    @classmethod
    def restore_from(
        cls,
        restore_path: Union[str, os.PathLike],
        override_config_path: Optional[Union[str, os.PathLike, DictConfig]] = None,
        map_location: Optional[Union[str, torch.device]] = None,
        strict: bool = True,
        return_config: bool = False,
        trainer: Any = None,
    ) -> Union["ModelPT", DictConfig]:
        """Rebuild the model saved by ``save_to`` in ``restore_path`` and load its weights.

        Works on ``ModelPT`` itself (the file's ``target`` picks the class) and on a subclass (the
        file's class must then be that subclass or one of its own). ``override_config_path`` (a YAML
        file or a DictConfig) replaces the saved config. Weights go to ``map_location`` (default:
        CUDA when available, else CPU). Returns the config alone with ``return_config``.

        Raises ``CheckpointFileError`` for a file that is not an intact model checkpoint,
        ``UnsafeTargetError`` for a config naming anything but adapters, strategies and models, and
        ``RuntimeError`` naming the file when the weights do not fit the rebuilt model.
        """
        source = f"'{restore_path}'"
        tensors, config_text = read_checkpoint(restore_path, "model")
        if override_config_path is None:
            try:
                cfg = OmegaConf.create(config_text)
            except Exception as exc:
                raise CheckpointFileError(f"{source} holds an unreadable config: {exc}") from exc
        elif isinstance(override_config_path, DictConfig):
            cfg = copy.deepcopy(override_config_path)
        else:
            cfg = OmegaConf.load(override_config_path)
        if not isinstance(cfg, DictConfig) or "target" not in cfg:
            raise CheckpointFileError(f"{source} holds no model config with a `target` class")
        check_loadable_targets(cfg, source)
        model_cls = resolve_loadable_target(cfg.target, f"{source} (at target)")
        if not issubclass(model_cls, cls):
            raise TypeError(f"{source} holds a {class_path(model_cls)}, which is not a {class_path(cls)}")
        if return_config:
            return cfg

        model = model_cls(cfg=cfg, trainer=trainer)
        try:
            model.load_state_dict(tensors, strict=strict)
        except RuntimeError as exc:
            exc.add_note(f"while loading the weights of {source} into {class_path(model_cls)}")
            raise
        return model.to(map_location if map_location is not None else _default_map_location())

    # -- reporting ------------------------------------------------------------------------------

    def summarize(self, max_depth: int = 1) -> ModelSummary:
        """Print and return a table of submodules (down to ``max_depth`` levels) with their trainable
        and frozen parameter counts, and the model's totals."""
        summary = ModelSummary()
        for name, module in self.named_modules():
            depth = name.count(".") + 1 if name else 0
            if 1 <= depth <= max_depth:
                summary.rows.append((name, type(module).__name__, *_count(module.parameters())))
        summary.trainable_params, summary.frozen_params = _count(self.parameters())
        print(summary)
        return summary
