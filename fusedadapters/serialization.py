"""Checkpoint files: safetensors weights plus a YAML config, with nothing pickled.

One file format serves ``ModelPT.save_to`` (kind ``model``) and ``save_adapters`` (kind
``adapters``). The safetensors header holds the metadata: the format marker and kind, a format
version, the YAML config, aliases of tied tensors, and a SHA-256 over the config and every tensor's
name, dtype, shape and bytes, so a truncated, corrupted or foreign file is refused with an error
that names it instead of loading wrong weights. Files are written to a temporary name and renamed,
so a crash never leaves half a file behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["CheckpointFileError", "read_checkpoint", "write_checkpoint"]

FORMAT_KEY = "fusedadapters.format"
VERSION = "1"
PathLike = Union[str, os.PathLike]


class CheckpointFileError(ValueError):
    """A file that is not a readable, intact fusedadapters checkpoint of the expected kind."""


def _digest(config_text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(config_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            digest.update((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr()))
    return digest.hexdigest()


def _deduplicate(tensors: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors safetensors can store (contiguous, no shared memory) and the aliases of tied ones."""
    unique: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    views: Dict[tuple, str] = {}
    storages = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        view = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if storage is not None and view in views:
            aliases[name] = views[view]
            continue
        if storage is not None and storage in storages:
            tensor = tensor.clone()
        else:
            views[view] = name
            storages.add(storage)
        unique[name] = tensor.contiguous()
    return unique, aliases


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_checkpoint(path: PathLike, kind: str, tensors: Mapping[str, torch.Tensor], config_text: str) -> None:
    """Write ``tensors`` and ``config_text`` (YAML) to ``path`` as a checkpoint of ``kind``."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    unique, aliases = _deduplicate(tensors)
    aliases_text = json.dumps(aliases, sort_keys=True)
    metadata = {
        FORMAT_KEY: kind,
        "version": VERSION,
        "config": config_text,
        "aliases": aliases_text,
        "sha256": _digest(config_text + "\0" + aliases_text, unique),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(unique, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_checkpoint(path: PathLike, kind: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """``(tensors on the CPU, config YAML)`` of a checkpoint of ``kind``; ``CheckpointFileError`` if it
    is not one, is of another kind, or fails its checksum."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: '{path}'")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type and OSError/ValueError variants
        raise CheckpointFileError(
            f"'{path}' is not a readable fusedadapters {kind} file (a safetensors file with its metadata); "
            f"it may be truncated, corrupted or of another format (pickled .pt/.nemo files are never "
            f"loaded): {exc}"
        ) from exc
    found = metadata.get(FORMAT_KEY)
    if found is None:
        raise CheckpointFileError(f"'{path}' is a safetensors file but not a fusedadapters checkpoint")
    if found != kind:
        raise CheckpointFileError(f"'{path}' is a fusedadapters {found} file, not a {kind} file")
    if metadata.get("version") != VERSION:
        raise CheckpointFileError(
            f"'{path}' has format version {metadata.get('version')!r}; this fusedadapters reads version {VERSION}"
        )
    config_text = metadata.get("config", "")
    aliases_text = metadata.get("aliases", "{}")
    if _digest(config_text + "\0" + aliases_text, tensors) != metadata.get("sha256"):
        raise CheckpointFileError(f"'{path}' fails its checksum: the file is corrupted")
    try:
        aliases = json.loads(aliases_text)
    except json.JSONDecodeError as exc:
        raise CheckpointFileError(f"'{path}' has a corrupted alias table: {exc}") from exc
    for alias, name in aliases.items():
        if name not in tensors:
            raise CheckpointFileError(f"'{path}': tied tensor {alias!r} points at missing {name!r}")
        tensors[alias] = tensors[name]
    return tensors, config_text
