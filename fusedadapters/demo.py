"""The main job (``python -m fusedadapters``): train an adapter on a frozen model, save it, restore it.

The model is the NeMo tutorial's: an encoder and a decoder of residual MLP blocks and a projection,
with adapter support in every block. The task is synthetic and solvable by an adapter alone: the
targets come from the same frozen model carrying a hidden, randomly initialised "teacher" adapter.
The job trains a fresh adapter on the frozen model to match them, saves the base model and the
adapter, restores both into a new model and checks that its outputs equal the trained model's. Last, it
trains a second adapter on a second task and serves one mixed batch (samples of both tasks and of the
base model) in one forward, each sample with its own adapter (``fusedadapters.route_adapters``).

The two files go to ``--out DIR`` when given (created if needed; ``base_model.nemo`` and
``adapter.safetensors`` there are overwritten); without it they go to a temporary directory that is
deleted when the job ends, failed or not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, TextIO

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from .adapter_mixins import AdapterModelPTMixin, AdapterModuleMixin, get_registered_adapter, register_adapter
from .adapter_modules import FusedLinearAdapterConfig, LinearAdapterConfig
from .model import ModelPT
from .routing import route_adapters
from .targets import class_path, instantiate_checked

__all__ = ["DemoModel", "MLP", "ResidualMLP", "ResidualMLPAdapter", "build_parser", "main", "model_config", "run"]


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
        self.encoder = instantiate_checked(self.cfg.encoder, "module", source="cfg.encoder")
        self.decoder = instantiate_checked(self.cfg.decoder, "module", source="cfg.decoder")
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


class _Progress:
    """Training progress: a tqdm bar on a terminal; on anything else (a pipe, a log file) one plain
    line per tenth of the run, so that a log stays one line per report."""

    def __init__(self, total: int, stream: TextIO):
        self.total, self.stream = total, stream
        self.every = max(1, total // 10)
        interactive = hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=total, desc="training", unit="step", file=stream, leave=True) if interactive else None

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.5f}", refresh=False)
        elif step % self.every == 0 or step == self.total:
            print(f"training step {step}/{self.total}  loss {loss:.5f}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _randomize(module: nn.Module, generator: torch.Generator, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


ADAPTERS = {"linear": LinearAdapterConfig, "fused": FusedLinearAdapterConfig}
MAX_SEED = 2**63 - 2  # the job seeds a second generator with seed + 1


def check_out_dir(path: Path) -> Path:
    """``path`` if it is, or can be created as, a writable directory; else ``ValueError`` saying why."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"'{path}' exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"'{existing}' is not a directory, so '{path}' cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"'{existing}' is not writable")
    return path


def check_options(steps: int, dim: int, hidden: int, batch: int, lr: float, seed: int, adapter: str) -> None:
    """``ValueError`` naming the first option that the job cannot run with."""
    for name, value in (("steps", steps), ("dim", dim), ("hidden", hidden), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {sorted(ADAPTERS)}, got {adapter!r}")


@contextlib.contextmanager
def _output_dir(out_dir: Optional[Path]) -> Iterator[Path]:
    """``out_dir`` (created), or a temporary directory deleted on exit."""
    if out_dir is not None:
        out_dir = check_out_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        yield out_dir
    else:
        with tempfile.TemporaryDirectory(prefix="fusedadapters-") as tmp:
            yield Path(tmp)


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
    (to ``stream``, default stdout). The files go to ``out_dir``, or to a temporary directory that
    is deleted before returning when ``out_dir`` is None. ``ValueError`` for an option it cannot run with."""
    check_options(steps, dim, hidden, batch, lr, seed, adapter)
    with _output_dir(out_dir) as directory:
        return _run_in(directory, out_dir is not None, steps=steps, dim=dim, hidden=hidden, batch=batch, lr=lr,
                       seed=seed, adapter=adapter, stream=sys.stdout if stream is None else stream)


def _distill_step(model: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, batch: int, dim: int,
                  generator: torch.Generator) -> torch.Tensor:
    """One optimizer step fitting ``model`` to ``teacher`` on a fresh random batch; returns the loss."""
    x = torch.randn(batch, dim, generator=generator)
    with torch.no_grad():
        y = teacher(x)
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()

def _run_in(
    out_dir: Path, keep: bool, *, steps: int, dim: int, hidden: int, batch: int, lr: float, seed: int,
    adapter: str, stream: TextIO,
) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    adapter_cfg_cls = ADAPTERS[adapter]
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
    progress = _Progress(steps, stream)
    try:
        for step in range(1, steps + 1):
            progress.update(step, _distill_step(model, teacher, optimizer, batch, dim, generator).item())
    finally:
        progress.close()
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
        "out_dir": str(out_dir) if keep else None,
    }
    where = "" if keep else " (in a temporary directory, deleted now; pass --out DIR to keep them)"
    print(
        f"model: {report['total_params']:,} parameters, {report['trainable_params']:,} trainable (adapter "
        f"'adapter_1', {adapter_cfg_cls.__name__}, dim={hidden}, in every decoder block)\n"
        f"trained {steps} steps in {train_seconds:.1f} s: eval loss {initial:.5f} -> {final:.5f}\n"
        f"saved base model {base_path} ({report['base_file_bytes']:,} bytes) and adapter {adapter_path} "
        f"({report['adapter_file_bytes']:,} bytes){where}\n"
        f"restored into a fresh model: outputs {'match exactly' if report['restored_matches'] else 'DIFFER'} "
        f"(max abs diff {max_diff:.3g})",
        file=stream,
    )
    report["mixed_batch"] = serve_mixed_batch(
        model, {"adapter_1": teacher}, base, adapter_cfg_cls(in_features=dim, dim=hidden), steps=steps, batch=batch,
        lr=lr, generator=generator, stream=stream,
    )
    return report


def serve_mixed_batch(
    model: DemoModel, teachers: dict, base: DemoModel, adapter_cfg, *, steps: int, batch: int, lr: float,
    generator: torch.Generator, stream: TextIO,
) -> dict:
    """Train one more decoder adapter ("adapter_2") on a second task, then serve one batch in which every
    sample uses its own task's adapter, or none, in a single forward (``fusedadapters.route_adapters``).

    ``teachers`` maps the adapters already trained on ``model`` to the teacher of their task. Returns the
    per-task eval losses of the routed batch and its largest difference from running each sample alone
    with only its adapter enabled.
    """
    teacher = copy.deepcopy(base)
    teacher.add_adapter("decoder:teacher", cfg=adapter_cfg)
    for layer in teacher.decoder.layers:
        _randomize(layer.get_adapter_module("teacher"), generator, std=0.3)
    teacher.eval()
    teachers = {**teachers, "adapter_2": teacher, None: base}
    model.add_adapter("decoder:adapter_2", cfg=adapter_cfg)
    model.set_enabled_adapters(enabled=False)
    model.set_enabled_adapters("adapter_2", enabled=True)
    model.train()
    model.unfreeze_enabled_adapters()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        _distill_step(model, teacher, optimizer, batch, model.decoder.dim, generator)
    model.eval()

    names = [list(teachers)[i % len(teachers)] for i in range(3 * len(teachers))]
    x = torch.randn(len(names), model.decoder.dim, generator=generator)
    with torch.no_grad(), route_adapters(model, names):
        routed = model(x)
    with torch.no_grad():
        alone = []
        for i, name in enumerate(names):
            model.set_enabled_adapters(enabled=False)
            if name is not None:
                model.set_enabled_adapters(name, enabled=True)
            alone.append(model(x[i : i + 1]))
        targets = torch.cat([teachers[name](x[i : i + 1]) for i, name in enumerate(names)])
    max_diff = (routed - torch.cat(alone)).abs().max().item()
    losses = {
        name or "none": nn.functional.mse_loss(routed[[i for i, n in enumerate(names) if n == name]],
                                          targets[[i for i, n in enumerate(names) if n == name]]).item()
        for name in teachers
    }
    print(
        f"trained adapter_2 on a second task ({steps} steps); served one mixed batch of {len(names)} samples "
        f"(adapter_1, adapter_2 or none per sample) in one routed forward: per-task eval loss "
        + ", ".join(f"{k} {v:.5f}" for k, v in losses.items())
        + f"; max abs diff to each sample alone {max_diff:.3g}",
        file=stream,
    )
    return {"names": names, "task_losses": losses, "max_abs_diff_to_alone": max_diff}


def _int_at_least(low: int, high: Optional[int] = None):
    """An argparse ``type``: an integer in ``[low, high]``; argparse reports a refusal as one line, exit 2."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


def _out_dir_option(text: str) -> Path:
    try:
        return check_out_dir(Path(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors are one line (naming the option) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line of the main job (``python -m fusedadapters``, or ``fusedadapters-demo``)."""
    parser = _OneLineErrors(prog="python -m fusedadapters", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=_int_at_least(1), default=300, help="training steps (default 300)")
    parser.add_argument("--dim", type=_int_at_least(1), default=64, help="model width D (default 64)")
    parser.add_argument("--hidden", type=_int_at_least(1), default=16, help="adapter bottleneck H (default 16)")
    parser.add_argument("--adapter", choices=tuple(ADAPTERS), default="linear",
                        help="LinearAdapter (eager) or FusedLinearAdapter (fused op); default linear")
    parser.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0,
                        help="seed of the weights, the teacher adapter and the data (default 0)")
    parser.add_argument("--out", type=_out_dir_option, default=None, metavar="DIR",
                        help="directory to keep base_model.nemo and adapter.safetensors in (created if needed, "
                             "those two files overwritten); default: a temporary directory, deleted at the end")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the job from the command line; returns the exit status (2 for a wrong option, before any work)."""
    args = build_parser().parse_args(argv)
    report = run(steps=args.steps, dim=args.dim, hidden=args.hidden, adapter=args.adapter, seed=args.seed,
                 out_dir=args.out)
    if not report["restored_matches"]:
        print("error: the restored model's outputs differ from the trained model's", file=sys.stderr)
        return 1
    if not report["final_eval_loss"] < report["initial_eval_loss"]:
        print("error: the loss did not fall", file=sys.stderr)
        return 1
    return 0
