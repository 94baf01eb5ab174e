"""The main job (``python -m fusedadapters``): train an adapter on a frozen model, save it, restore it.

The model is the NeMo tutorial's: an encoder and a decoder of residual MLP blocks and a projection,
with adapter support in every block. The task is synthetic and solvable by an adapter alone: the
targets come from the same frozen model carrying a hidden, randomly initialised "teacher" adapter.
The job trains a fresh adapter on the frozen model to match them, saves the base model and the
adapter, restores both into a new model and checks that its outputs equal the trained model's.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .adapter_mixins import AdapterModelPTMixin, AdapterModuleMixin, get_registered_adapter, register_adapter
from .adapter_modules import FusedLinearAdapterConfig, LinearAdapterConfig
from .model import ModelPT
from .targets import class_path, instantiate

__all__ = ["DemoModel", "MLP", "ResidualMLP", "ResidualMLPAdapter", "main", "model_config", "run"]


class MLP(nn.Module, AdapterModuleMixin):
    """``LayerNorm(Linear(x))`` followed by the enabled adapters."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln(self.fc(x))
        if self.is_adapter_available():
            x = self.forward_enabled_adapters(x)
        return x


class ResidualMLP(nn.Module):
    """``num_layers`` MLP blocks, each with a residual connection."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList([MLP(dim) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


class ResidualMLPAdapter(ResidualMLP, AdapterModuleMixin):
    """``ResidualMLP`` whose adapter calls reach every block."""

    def add_adapter(self, name: str, cfg: DictConfig, **kwargs) -> None:
        for layer in self.layers:
            layer.add_adapter(name, cfg, **kwargs)

    def get_enabled_adapters(self) -> List[str]:
        names: List[str] = []
        for layer in self.layers:
            names += [n for n in layer.get_enabled_adapters() if n not in names]
        return names

    def set_enabled_adapters(self, name: Optional[str] = None, enabled: bool = True) -> None:
        for layer in self.layers:
            layer.set_enabled_adapters(name, enabled)

    def is_adapter_available(self) -> bool:
        return any(layer.is_adapter_available() for layer in self.layers)


if get_registered_adapter(ResidualMLP) is None:
    register_adapter(ResidualMLP, ResidualMLPAdapter)


class DemoModel(ModelPT, AdapterModelPTMixin):
    """Encoder and decoder (``ResidualMLPAdapter``) and a projection; adapters go to the decoder
    unless named ``encoder:...``."""

    def __init__(self, cfg: DictConfig, trainer=None):
        super().__init__(cfg, trainer=trainer)
        self.encoder = instantiate(self.cfg.encoder)
        self.decoder = instantiate(self.cfg.decoder)
        self.projection = nn.Linear(self.decoder.dim, self.cfg.out_features)
        self.setup_adapters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.decoder(self.encoder(x)))

    @property
    def adapter_module_names(self) -> List[str]:
        return ["", "encoder", "decoder"]

    @property
    def default_adapter_module_name(self) -> str:
        return "decoder"

    def _target_modules(self, name: Optional[str]) -> List[AdapterModuleMixin]:
        if name is None:
            return [self.encoder, self.decoder]
        module_name, _ = self.resolve_adapter_module_name_(name)
        if module_name not in self.adapter_module_names:
            raise ValueError(f"module `{module_name}` of adapter `{name}` is not one of {self.adapter_module_names}")
        return [self.encoder] if module_name == "encoder" else [self.decoder]

    def add_adapter(self, name: str, cfg) -> None:
        self._target_modules(name)  # validates the module name before anything changes
        super().add_adapter(name, cfg)
        for module in self._target_modules(name):
            module.add_adapter(name, cfg)

    def set_enabled_adapters(self, name: Optional[str] = None, enabled: bool = True) -> None:
        super().set_enabled_adapters(name, enabled)
        for module in self._target_modules(name):
            if module.is_adapter_available():
                module.set_enabled_adapters(name, enabled)

    def get_enabled_adapters(self) -> List[str]:
        names = super().get_enabled_adapters()
        for module in (self.encoder, self.decoder):
            names += [n for n in module.get_enabled_adapters() if n not in names]
        return names


def model_config(dim: int) -> DictConfig:
    block = class_path(ResidualMLPAdapter)
    return OmegaConf.create(
        {
            "in_features": dim,
            "out_features": 10,
            "encoder": {"_target_": block, "dim": dim, "num_layers": 4},
            "decoder": {"_target_": block, "dim": dim, "num_layers": 2},
        }
    )


def _progress(step: int, total: int, loss: float, start: float, out) -> None:
    width = 30
    done = int(width * step / total)
    rate = step / max(time.perf_counter() - start, 1e-9)
    out.write(f"\rtraining [{'#' * done}{'.' * (width - done)}] {step:4d}/{total}  loss {loss:.5f}  {rate:6.1f} it/s")
    if step == total:
        out.write("\n")
    out.flush()


def _randomize(module: nn.Module, generator: torch.Generator, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def run(
    *,
    steps: int = 300,
    dim: int = 64,
    hidden: int = 16,
    batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    adapter: str = "linear",
    out_dir: Optional[Path] = None,
    stream=None,
) -> dict:
    """Run the job; returns what it measured (losses, sizes, counts, match) and prints a report
    (to ``stream``, default stdout)."""
    stream = sys.stdout if stream is None else stream
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    adapter_cfg_cls = {"linear": LinearAdapterConfig, "fused": FusedLinearAdapterConfig}[adapter]
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="fusedadapters-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    base_path, adapter_path = out_dir / "base_model.nemo", out_dir / "adapter.safetensors"

    base = DemoModel(model_config(dim))
    base.save_to(base_path)

    teacher = copy.deepcopy(base)
    teacher.add_adapter("decoder:teacher", cfg=adapter_cfg_cls(in_features=dim, dim=hidden))
    for layer in teacher.decoder.layers:
        _randomize(layer.get_adapter_module("teacher"), generator, std=0.3)
    teacher.eval()

    model = DemoModel.restore_from(base_path, map_location="cpu")
    model.add_adapter("decoder:adapter_1", cfg=adapter_cfg_cls(in_features=dim, dim=hidden))
    model.freeze()
    model.unfreeze_enabled_adapters()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)

    x_eval = torch.randn(256, dim, generator=generator)
    with torch.no_grad():
        y_eval = teacher(x_eval)
        initial = nn.functional.mse_loss(model(x_eval), y_eval).item()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randn(batch, dim, generator=generator)
        with torch.no_grad():
            y = teacher(x)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps:
            _progress(step, steps, loss.item(), start, stream)
    train_seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x_eval), y_eval).item()
        trained_out = model(x_eval)
    model.save_adapters(str(adapter_path), name="adapter_1")

    restored = DemoModel.restore_from(base_path, map_location="cpu")
    restored.load_adapters(str(adapter_path), name="adapter_1", map_location="cpu")
    restored.eval()
    with torch.no_grad():
        restored_out = restored(x_eval)
    max_diff = (restored_out - trained_out).abs().max().item()

    report = {
        "steps": steps,
        "initial_eval_loss": initial,
        "final_eval_loss": final,
        "train_seconds": train_seconds,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "base_file_bytes": base_path.stat().st_size,
        "adapter_file_bytes": adapter_path.stat().st_size,
        "restored_max_abs_diff": max_diff,
        "restored_matches": max_diff == 0.0,
        "out_dir": str(out_dir),
    }
    print(
        f"model: {report['total_params']:,} parameters, {report['trainable_params']:,} trainable (adapter "
        f"'adapter_1', {adapter_cfg_cls.__name__}, dim={hidden}, in every decoder block)\n"
        f"trained {steps} steps in {train_seconds:.1f} s: eval loss {initial:.5f} -> {final:.5f}\n"
        f"saved base model {base_path} ({report['base_file_bytes']:,} bytes) and adapter {adapter_path} "
        f"({report['adapter_file_bytes']:,} bytes)\n"
        f"restored into a fresh model: outputs {'match exactly' if report['restored_matches'] else 'DIFFER'} "
        f"(max abs diff {max_diff:.3g})",
        file=stream,
    )
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedadapters", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--dim", type=int, default=64, help="model width D (default 64)")
    parser.add_argument("--hidden", type=int, default=16, help="adapter bottleneck H (default 16)")
    parser.add_argument("--adapter", choices=("linear", "fused"), default="linear",
                        help="LinearAdapter (eager) or FusedLinearAdapter (fused op)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="where to write the files (default: a new temp dir)")
    args = parser.parse_args(argv)
    report = run(steps=args.steps, dim=args.dim, hidden=args.hidden, adapter=args.adapter, seed=args.seed,
                 out_dir=args.out)
    if not report["restored_matches"]:
        print("error: the restored model's outputs differ from the trained model's", file=sys.stderr)
        return 1
    if not report["final_eval_loss"] < report["initial_eval_loss"]:
        print("error: the loss did not fall", file=sys.stderr)
        return 1
    return 0
