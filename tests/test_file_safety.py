"""Loading files never runs code; bad files and bad calls give clear errors and leave no partial state.

Model files (``save_to``/``restore_from``) and adapter files (``save_adapters``/``load_adapters``) are
safetensors with a YAML config. Malicious files are crafted by rewriting a saved file's config with
``fusedadapters.serialization.write_checkpoint`` (so the checksum is valid and only the target check
stands between the file and the code it names). After every failure the model must be exactly as
before: ``assert_unchanged`` compares config, adapter names per module, adapter configs, every tensor,
the enabled lists and the output on a fixed input.
"""

import copy
import os
import struct
import subprocess  # noqa: F401  (imported on purpose: subprocess.Popen must be refused although importable)
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from safetensors.torch import save_file
from torch import nn

from fusedadapters import (
    AdapterModuleMixin,
    AdapterNotFoundError,
    CheckpointFileError,
    FusedLinearAdapter,
    LinearAdapter,
    ModelPT,
    UnsafeTargetError,
    instantiate,
)
from fusedadapters.demo import DemoModel, model_config
from fusedadapters.serialization import read_checkpoint, write_checkpoint
from fusedadapters.targets import class_path
from helpers import adapter_parameters, randomize_

D = 16
H = 4


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def adapter_cfg(in_features: int = D, dim: int = H) -> dict:
    return {"_target_": class_path(LinearAdapter), "in_features": in_features, "dim": dim}


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random non-zero values in every adapter parameter (a fresh adapter is the identity)."""
    assert randomize_(adapter_parameters(model), seed=seed, std=0.5, mean=0.1) > 0


PROBE = torch.randn(3, D, generator=torch.Generator().manual_seed(7))


def snapshot(model: nn.Module) -> Dict[str, Any]:
    """Everything a failed call must leave as it was."""
    # the queries first: a model without adapters creates its (empty) adapter_cfg lazily on first query
    enabled, available = model.get_enabled_adapters(), model.is_adapter_available()
    adapters, adapter_cfgs, module_enabled = {}, {}, {}
    for qname, module in model.named_modules():
        if not isinstance(module, AdapterModuleMixin):
            continue
        adapters[qname] = list(module.adapter_layer.keys()) if hasattr(module, "adapter_layer") else None
        cfg = module.__dict__.get("adapter_cfg")
        adapter_cfgs[qname] = None if cfg is None else OmegaConf.to_yaml(cfg)
        module_enabled[qname] = module.get_enabled_adapters()
    with torch.no_grad():
        was_training = model.training
        model.eval()
        out = model(PROBE)
        model.train(was_training)
    return {
        "cfg": OmegaConf.to_yaml(model.cfg),
        "adapters": adapters,
        "adapter_cfgs": adapter_cfgs,
        "module_enabled": module_enabled,
        "enabled": enabled,
        "available": available,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "out": out,
    }


def assert_unchanged(model: nn.Module, before: Dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["cfg"] == before["cfg"]
    assert after["adapters"] == before["adapters"]
    assert after["adapter_cfgs"] == before["adapter_cfgs"]
    assert after["module_enabled"] == before["module_enabled"]
    assert after["enabled"] == before["enabled"]
    assert after["available"] == before["available"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["requires_grad"] == before["requires_grad"]
    assert torch.equal(after["out"], before["out"])


def rewrite(src: Path, dst: Path, kind: str, edit: Callable[[dict], None]) -> None:
    """Copy checkpoint ``src`` to ``dst`` with its config edited by ``edit`` (a valid, re-checksummed file)."""
    tensors, text = read_checkpoint(src, kind)
    cfg = OmegaConf.to_container(OmegaConf.create(text))
    edit(cfg)
    write_checkpoint(dst, kind, tensors, OmegaConf.to_yaml(OmegaConf.create(cfg)))


def data_offset(path: Path) -> int:
    """Offset of the tensor bytes in a safetensors file (8-byte length, JSON header, data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


@pytest.fixture
def base():
    torch.manual_seed(99)
    model = DemoModel(model_config(D))
    model.eval()
    return model


@pytest.fixture
def model(base):
    """A model with a decoder and an encoder adapter (random weights), adapter_1 disabled."""
    m = copy.deepcopy(base)
    m.add_adapter("decoder:adapter_0", adapter_cfg())
    m.add_adapter("encoder:adapter_1", adapter_cfg(dim=H + 1))
    randomize(m)
    m.set_enabled_adapters("adapter_1", enabled=False)
    return m


@pytest.fixture
def files(model, tmp_path):
    """A saved model file and a saved adapter file (both adapters)."""
    model_path, adapter_path = tmp_path / "model.nemo", tmp_path / "adapters.safetensors"
    model.save_to(str(model_path))
    model.save_adapters(str(adapter_path))
    return model_path, adapter_path


@pytest.fixture
def target(base):
    """The model that receives adapter files: one unrelated adapter already present, random weights."""
    t = copy.deepcopy(base)
    t.add_adapter("decoder:other", adapter_cfg(dim=2))
    randomize(t, seed=5)
    return t


# ---------------------------------------------------------------------------------------------
# unsafe _target_ values: refused, nothing runs
# ---------------------------------------------------------------------------------------------


def _attack(kind: str, marker: Path, tmp_path: Path, monkeypatch) -> dict:
    """A `_target_` config that would create ``marker`` if it were built; and the reason it must be refused."""
    if kind == "os.system":
        return {"cfg": {"_target_": "os.system", "_args_": [f"touch '{marker}'"]}, "why": "not a class"}
    if kind == "builtins.eval":
        return {"cfg": {"_target_": "builtins.eval", "_args_": [f"open({str(marker)!r}, 'w').close()"]}, "why": "not a class"}
    if kind == "subprocess.Popen":
        return {"cfg": {"_target_": "subprocess.Popen", "_args_": [["touch", str(marker)]]}, "why": "may only name"}
    if kind == "unimported":
        mod = f"evil_{uuid.uuid4().hex}"
        (tmp_path / f"{mod}.py").write_text(
            f"open({str(marker)!r}, 'w').close()\n"
            "import torch\n"
            "class Evil(torch.nn.Module):\n"
            "    def __init__(self, *a, **k):\n"
            "        super().__init__()\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        return {"cfg": {"_target_": f"{mod}.Evil", "in_features": D}, "why": "already imported", "module": mod}
    raise AssertionError(kind)


ATTACKS = ["os.system", "builtins.eval", "subprocess.Popen", "unimported"]


def test_crafted_target_would_run_if_built(tmp_path):
    """Control: the attack configs are real (building one directly does create the marker)."""
    marker = tmp_path / "control"
    instantiate({"_target_": "builtins.eval", "_args_": [f"open({str(marker)!r}, 'w').close()"]})
    assert marker.exists()


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("where", ["encoder", "adapter", "strategy"])
def test_model_file_with_unsafe_target_is_refused(files, tmp_path, monkeypatch, attack, where):
    model_path, _ = files
    marker = tmp_path / "marker"
    a = _attack(attack, marker, tmp_path, monkeypatch)
    evil = tmp_path / "evil.nemo"

    def edit(cfg):
        if where == "encoder":
            cfg["encoder"] = a["cfg"]
        elif where == "adapter":
            cfg["adapters"]["adapter_0"].update(a["cfg"])
        else:
            cfg["adapters"]["adapter_0"]["adapter_strategy"] = a["cfg"]

    rewrite(model_path, evil, "model", edit)
    for cls in (ModelPT, DemoModel):
        with pytest.raises(UnsafeTargetError) as exc:
            cls.restore_from(str(evil), map_location="cpu")
        msg = str(exc.value)
        assert a["cfg"]["_target_"] in msg
        assert a["why"] in msg
        assert str(evil) in msg
    with pytest.raises(UnsafeTargetError):
        ModelPT.restore_from(str(evil), return_config=True)
    assert not marker.exists()
    if "module" in a:
        assert a["module"] not in sys.modules


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_model_file_with_unsafe_model_class_is_refused(files, tmp_path, attack):
    model_path, _ = files
    evil = tmp_path / "evil.nemo"
    rewrite(model_path, evil, "model", lambda cfg: cfg.__setitem__("target", attack))
    with pytest.raises(UnsafeTargetError) as exc:
        ModelPT.restore_from(str(evil))
    assert attack in str(exc.value) and str(evil) in str(exc.value)


def test_model_file_naming_a_plain_torch_module_is_refused(files, tmp_path):
    model_path, _ = files
    evil = tmp_path / "evil.nemo"
    rewrite(model_path, evil, "model", lambda cfg: cfg["adapters"]["adapter_0"].__setitem__("_target_", "torch.nn.Linear"))
    with pytest.raises(UnsafeTargetError, match="torch.nn.Linear"):
        ModelPT.restore_from(str(evil))


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("where", ["adapter", "strategy", "global_cfg"])
def test_adapter_file_with_unsafe_target_is_refused(files, target, tmp_path, monkeypatch, attack, where):
    _, adapter_path = files
    marker = tmp_path / "marker"
    a = _attack(attack, marker, tmp_path, monkeypatch)
    evil = tmp_path / "evil.safetensors"

    def edit(cfg):
        if where == "adapter":
            cfg["adapter_1"].update(a["cfg"])
        elif where == "strategy":
            cfg["adapter_1"]["adapter_strategy"] = a["cfg"]
        else:
            cfg["global_cfg"]["hook"] = a["cfg"]

    rewrite(adapter_path, evil, "adapters", edit)
    before = snapshot(target)
    for name in (None, "adapter_0", "encoder:adapter_1"):
        with pytest.raises(UnsafeTargetError) as exc:
            target.load_adapters(str(evil), name=name)
        msg = str(exc.value)
        assert a["cfg"]["_target_"] in msg and a["why"] in msg and str(evil) in msg
        assert_unchanged(target, before)
    assert not marker.exists()
    if "module" in a:
        assert a["module"] not in sys.modules


def test_adapter_file_naming_a_plain_torch_module_is_refused(files, target, tmp_path):
    _, adapter_path = files
    evil = tmp_path / "evil.safetensors"
    rewrite(adapter_path, evil, "adapters", lambda cfg: cfg["adapter_0"].__setitem__("_target_", "torch.nn.Linear"))
    before = snapshot(target)
    with pytest.raises(UnsafeTargetError, match="torch.nn.Linear"):
        target.load_adapters(str(evil))
    assert_unchanged(target, before)


def test_save_to_refuses_an_unsafe_config(model, tmp_path):
    with open_dict(model.cfg):
        model.cfg.hook = {"_target_": "os.system", "_args_": ["true"]}
    path = tmp_path / "m.nemo"
    with pytest.raises(UnsafeTargetError, match="os.system"):
        model.save_to(str(path))
    assert not path.exists()


def test_safe_rewrite_still_loads(files, target, tmp_path, model):
    """Control for the crafting helper: a rewrite that changes nothing unsafe loads fine."""
    model_path, adapter_path = files
    m2, a2 = tmp_path / "m2.nemo", tmp_path / "a2.safetensors"
    rewrite(model_path, m2, "model", lambda cfg: cfg.__setitem__("note", "hello"))
    rewrite(adapter_path, a2, "adapters", lambda cfg: cfg["adapter_0"].__setitem__("_target_", class_path(FusedLinearAdapter)))
    restored = ModelPT.restore_from(str(m2), map_location="cpu")
    assert restored.cfg.note == "hello"
    target.load_adapters(str(a2), name="adapter_0")
    assert isinstance(target.decoder.layers[0].get_adapter_module("adapter_0"), FusedLinearAdapter)


# ---------------------------------------------------------------------------------------------
# corrupted, foreign and mismatched files
# ---------------------------------------------------------------------------------------------


class Trap:
    """Unpickling this creates a directory at ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _corrupt(kind: str, src: Path, dst: Path, tmp_path: Path) -> Path:
    """Write a broken version of ``src`` to ``dst``; returns the marker a pickle would create."""
    marker = tmp_path / f"pickle_marker_{kind}"
    data = src.read_bytes()
    if kind == "truncated":
        dst.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "truncated_header":
        dst.write_bytes(data[:20])
    elif kind == "flipped_data":
        start = data_offset(src)
        i = start + (len(data) - start) // 2
        b = bytearray(data)
        b[i] ^= 0x10
        dst.write_bytes(bytes(b))
    elif kind == "edited_config":
        # a hand edit of the header's YAML without recomputing the checksum
        b = data.replace(b"num_layers: 2", b"num_layers: 3", 1).replace(b"dim: 4", b"dim: 5", 1)
        assert b != data and len(b) == len(data)
        dst.write_bytes(b)
    elif kind == "foreign_safetensors":
        save_file({"w": torch.randn(4, 4)}, str(dst))
    elif kind == "pickle":
        torch.save({"state_dict": {"w": torch.randn(2)}, "trap": Trap(str(marker))}, str(dst))
    elif kind == "empty":
        dst.write_bytes(b"")
    elif kind == "text":
        dst.write_text("adapters:\n  x: 1\n")
    else:
        raise AssertionError(kind)
    return marker


CORRUPTIONS = ["truncated", "truncated_header", "flipped_data", "edited_config", "foreign_safetensors", "pickle", "empty", "text"]


def test_pickle_trap_is_armed(tmp_path):
    """Control: unpickling the trap file the usual way would create the marker."""
    path, marker = tmp_path / "trap.pt", tmp_path / "armed"
    torch.save({"trap": Trap(str(marker))}, str(path))
    torch.load(str(path), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_broken_model_file(files, tmp_path, kind):
    model_path, _ = files
    bad = tmp_path / f"bad_{kind}.nemo"
    marker = _corrupt(kind, model_path, bad, tmp_path)
    for cls in (ModelPT, DemoModel):
        with pytest.raises(CheckpointFileError) as exc:
            cls.restore_from(str(bad))
        assert str(bad) in str(exc.value)
    with pytest.raises(CheckpointFileError):
        ModelPT.restore_from(str(bad), return_config=True)
    assert not marker.exists()


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_broken_adapter_file(files, target, tmp_path, kind):
    _, adapter_path = files
    bad = tmp_path / f"bad_{kind}.safetensors"
    marker = _corrupt(kind, adapter_path, bad, tmp_path)
    before = snapshot(target)
    for name in (None, "adapter_0"):
        with pytest.raises(CheckpointFileError) as exc:
            target.load_adapters(str(bad), name=name)
        assert str(bad) in str(exc.value)
        assert_unchanged(target, before)
    assert not marker.exists()


def test_checksum_error_says_corrupted(files, tmp_path):
    model_path, _ = files
    bad = tmp_path / "bad.nemo"
    _corrupt("flipped_data", model_path, bad, tmp_path)
    with pytest.raises(CheckpointFileError, match="checksum"):
        ModelPT.restore_from(str(bad))


def test_model_file_passed_to_load_adapters(files, target):
    model_path, _ = files
    before = snapshot(target)
    with pytest.raises(CheckpointFileError) as exc:
        target.load_adapters(str(model_path))
    assert str(model_path) in str(exc.value)
    assert "model" in str(exc.value)
    assert_unchanged(target, before)


def test_adapter_file_passed_to_restore_from(files):
    _, adapter_path = files
    with pytest.raises(CheckpointFileError) as exc:
        ModelPT.restore_from(str(adapter_path))
    assert str(adapter_path) in str(exc.value)
    assert "adapters" in str(exc.value)


def test_missing_file(target, tmp_path):
    before = snapshot(target)
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope"):
        target.load_adapters(str(path))
    with pytest.raises(FileNotFoundError, match="nope"):
        ModelPT.restore_from(str(path))
    assert_unchanged(target, before)


# ---------------------------------------------------------------------------------------------
# missing names, bad configs, bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing", "decoder:missing", ["adapter_0", "missing"]])
def test_load_missing_adapter_name(files, target, name):
    _, adapter_path = files
    before = snapshot(target)
    with pytest.raises(AdapterNotFoundError) as exc:
        target.load_adapters(str(adapter_path), name=name)
    assert isinstance(exc.value, KeyError)
    assert "missing" in str(exc.value)
    assert_unchanged(target, before)
    assert target.decoder.layers[0].get_adapter_module("adapter_0") is None


@pytest.mark.parametrize("name", ["missing", "encoder:missing", ["adapter_0", "missing"]])
def test_save_missing_adapter_name(model, tmp_path, name):
    before = snapshot(model)
    path = tmp_path / "out.safetensors"
    with pytest.raises(AdapterNotFoundError) as exc:
        model.save_adapters(str(path), name=name)
    assert isinstance(exc.value, KeyError)
    assert "missing" in str(exc.value)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["missing", "decoder:missing", "encoder:missing"])
@pytest.mark.parametrize("enabled", [True, False])
def test_set_enabled_missing_adapter_name(model, name, enabled):
    before = snapshot(model)
    with pytest.raises(AdapterNotFoundError) as exc:
        model.set_enabled_adapters(name, enabled=enabled)
    assert isinstance(exc.value, KeyError)
    assert "missing" in str(exc.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["adapter_x", "decoder:adapter_x", "encoder:adapter_x"])
def test_add_adapter_without_target(model, name):
    before = snapshot(model)
    cfg = {"in_features": D, "dim": H}
    with pytest.raises(ValueError, match="adapter_x") as exc:
        model.add_adapter(name, cfg)
    assert "_target_" in str(exc.value)
    assert_unchanged(model, before)
    # module level too
    layer = model.decoder.layers[0]
    with pytest.raises(ValueError, match="adapter_y"):
        layer.add_adapter("adapter_y", cfg)
    assert_unchanged(model, before)


def test_input_dim_mismatch_refused_where_the_width_is_known(model):
    """The blocks' Linear and LayerNorm say their adapters see width D: a wider adapter is refused when added."""
    before = snapshot_without_forward(model)
    with pytest.raises(ValueError, match=rf"adapter `decoder:wide` has in_features={D + 3}.* width {D}\b"):
        model.add_adapter("decoder:wide", adapter_cfg(in_features=D + 3))
    assert snapshot_without_forward(model) == before


def test_loading_an_adapter_of_another_width_is_refused_at_load(tmp_path):
    torch.manual_seed(0)
    wide = DemoModel(model_config(D + 3))
    wide.add_adapter("decoder:adapter_0", adapter_cfg(in_features=D + 3))
    randomize(wide, seed=3)
    path = tmp_path / "wide.safetensors"
    wide.save_adapters(str(path), name="adapter_0")

    target = DemoModel(model_config(D))
    before = snapshot_without_forward(target)
    with pytest.raises(ValueError, match=rf"in_features={D + 3}.* width {D}\b"):
        target.load_adapters(str(path), name="adapter_0")
    assert snapshot_without_forward(target) == before


def test_input_dim_mismatch_fails_at_forward_where_the_width_is_unknown(model, monkeypatch):
    """A host whose width its layers do not tell takes the adapter; the forward names both widths."""
    from fusedadapters.demo import MLP

    monkeypatch.setattr(MLP, "adapter_input_features", lambda self: None)
    model.add_adapter("decoder:wide", adapter_cfg(in_features=D + 3))
    randomize(model, seed=2)
    before = snapshot_without_forward(model)
    x = torch.randn(5, D)
    with pytest.raises(ValueError) as exc:
        model(x)
    msg = str(exc.value)
    assert "(5, 16)" in msg and "19" in msg
    assert snapshot_without_forward(model) == before
    # the adapter alone
    adapter = model.decoder.layers[0].get_adapter_module("wide")
    with pytest.raises(ValueError, match=r"\(2, 7, 16\)"):
        adapter(torch.randn(2, 7, D))
    # disabling the mismatched adapter makes the model usable again, with the other adapters in place
    model.set_enabled_adapters("wide", enabled=False)
    assert model(x).shape == (5, 10)


def snapshot_without_forward(model):
    return (
        OmegaConf.to_yaml(model.cfg),
        {q: list(m.adapter_layer.keys()) for q, m in model.named_modules() if hasattr(m, "adapter_layer")},
        model.get_enabled_adapters(),
        {k: v.clone().tolist() for k, v in model.state_dict().items()},
    )


# ---------------------------------------------------------------------------------------------
# mismatched weights and structure on load
# ---------------------------------------------------------------------------------------------


def test_weight_shape_mismatch_on_load(files, target, tmp_path):
    _, adapter_path = files
    bad = tmp_path / "bad.safetensors"
    rewrite(adapter_path, bad, "adapters", lambda cfg: cfg["adapter_1"].__setitem__("dim", H + 3))
    before = snapshot(target)
    with pytest.raises(RuntimeError) as exc:
        target.load_adapters(str(bad), name="adapter_1")
    assert "size mismatch" in str(exc.value)
    notes = " ".join(getattr(exc.value, "__notes__", []))
    assert str(bad) in str(exc.value) + notes
    assert_unchanged(target, before)
    # the whole file: adapter_0 is fine, adapter_1 fails: adapter_0 must not stay behind
    with pytest.raises(RuntimeError):
        target.load_adapters(str(bad))
    assert_unchanged(target, before)
    assert target.decoder.layers[0].get_adapter_module("adapter_0") is None


def test_instance_count_mismatch_on_load(files, tmp_path):
    """The file has 4 encoder instances of adapter_1; a model with a 3-block encoder has 3."""
    _, adapter_path = files
    cfg = model_config(D)
    cfg.encoder.num_layers = 3
    small = DemoModel(cfg)
    small.eval()
    before = snapshot(small)
    with pytest.raises(ValueError, match="adapter_1"):
        small.load_adapters(str(adapter_path))
    assert_unchanged(small, before)


def test_restore_weight_mismatch(files, tmp_path):
    model_path, _ = files
    bad = tmp_path / "bad.nemo"
    rewrite(model_path, bad, "model", lambda cfg: cfg["decoder"].__setitem__("num_layers", 3))
    with pytest.raises(RuntimeError) as exc:
        ModelPT.restore_from(str(bad), map_location="cpu")
    notes = " ".join(getattr(exc.value, "__notes__", []))
    assert str(bad) in str(exc.value) + notes


def test_load_list_second_name_already_present(files, base):
    _, adapter_path = files
    m = copy.deepcopy(base)
    m.add_adapter("encoder:adapter_1", adapter_cfg(dim=2))
    before = snapshot(m)
    with pytest.raises(ValueError, match="adapter_1"):
        m.load_adapters(str(adapter_path), name=["adapter_0", "adapter_1"])
    assert_unchanged(m, before)
    assert m.decoder.layers[0].get_adapter_module("adapter_0") is None


# ---------------------------------------------------------------------------------------------
# transaction rollback of a model-level add
# ---------------------------------------------------------------------------------------------


class BothModel(DemoModel):
    """Global adapters go to the encoder and then the decoder."""

    def _target_modules(self, name):
        module_name, _ = self.resolve_adapter_module_name_(name) if name is not None else ("", None)
        if module_name == "":
            return [self.encoder, self.decoder]
        return super()._target_modules(name)


@pytest.mark.parametrize("refusing_layers", [[0, 1], [1]])
def test_failing_add_in_second_module_rolls_back_first(refusing_layers):
    torch.manual_seed(3)
    m = BothModel(model_config(D))
    m.eval()
    m.add_adapter("encoder:keep", adapter_cfg())
    randomize(m, seed=4)
    for i in refusing_layers:
        m.decoder.layers[i].set_accepted_adapter_types([FusedLinearAdapter])
    before = snapshot(m)

    with pytest.raises(ValueError, match="accepted"):
        m.add_adapter("shared", adapter_cfg())  # LinearAdapter: the decoder refuses it after the encoder took it

    assert_unchanged(m, before)
    for layer in m.encoder.layers:
        assert layer.get_adapter_module("shared") is None
        assert list(layer.adapter_layer.keys()) == ["keep"]
    for layer in m.decoder.layers:
        assert not hasattr(layer, "adapter_layer") or "shared" not in layer.adapter_layer
    assert "shared" not in m.cfg.adapters
    assert "shared" not in m.cfg.adapters.global_cfg.adapter_meta_cfg.modules

    # nothing left behind: the same name can be added once the decoder accepts it
    m.add_adapter("shared", {**adapter_cfg(), "_target_": class_path(FusedLinearAdapter)})
    assert all(layer.get_adapter_module("shared") is not None for layer in m.encoder.layers)
    assert all(layer.get_adapter_module("shared") is not None for layer in m.decoder.layers)
    assert m.get_enabled_adapters() == ["keep", "shared"]


def test_load_name_under_the_wrong_module(files, target):
    """The file holds ``encoder:adapter_1``; asking for ``decoder:adapter_1`` names an adapter the file
    does not hold. NeMo raises KeyError there (adapter_mixins.py, load_adapters: ``state_dict[module_adapter_name]``)."""
    _, adapter_path = files
    before = snapshot(target)
    with pytest.raises(AdapterNotFoundError) as exc:
        target.load_adapters(str(adapter_path), name="decoder:adapter_1")
    assert isinstance(exc.value, KeyError)
    assert "decoder:adapter_1" in str(exc.value)
    assert_unchanged(target, before)
