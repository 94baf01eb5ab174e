"""AdapterModelPTMixin and ModelPT through the public API (semantics of NeMo's adapter model mixin).

Reference for the semantics: NeMo's ``tests/core/mixins/adapters/test_adapter_model_mixin.py`` and
``nemo/core/classes/mixins/adapter_mixins.py``. The model used is ``fusedadapters.demo.DemoModel``:
an encoder (4 blocks) and a decoder (2 blocks) with adapter support in every block; bare adapter
names go to the decoder (``default_adapter_module_name``), ``encoder:...`` to the encoder.

Every comparison of outputs uses adapters with random non-zero weights: a fresh ``LinearAdapter``
has a zero up-projection and is the identity under the residual strategy.
"""

import copy
import os
from typing import List

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusedadapters import (
    AdapterModelPTMixin,
    AdapterModuleMixin,
    LinearAdapter,
    LinearAdapterConfig,
    ModelPT,
    ModelSummary,
    NeuralModule,
)
from fusedadapters import adapter_mixins
from fusedadapters.demo import MLP, DemoModel, ResidualMLP, ResidualMLPAdapter, model_config
from fusedadapters.targets import class_path
from helpers import adapter_parameters, randomize_

D = 16  # model width
H = 4  # adapter bottleneck
ENC_LAYERS, DEC_LAYERS = 4, 2  # as model_config builds them


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def adapter_cfg(in_features: int = D, dim: int = H, norm_position: str = "pre") -> dict:
    return {"_target_": class_path(LinearAdapter), "in_features": in_features, "dim": dim, "norm_position": norm_position}


def randomize_adapters(model: nn.Module, name: str, seed: int) -> None:
    """Give every instance of adapter ``name`` random non-zero weights."""
    assert randomize_(adapter_parameters(model, name), seed=seed, std=0.5, mean=0.1) > 0, f"no adapter {name}"


def holders(model: nn.Module, name: str) -> List[str]:
    """Qualified names of the modules holding an adapter called ``name``."""
    out = []
    for qname, module in model.named_modules():
        if isinstance(module, AdapterModuleMixin) and hasattr(module, "adapter_layer") and name in module.adapter_layer:
            out.append(qname)
    return out


def modules_meta(model: ModelPT) -> dict:
    return OmegaConf.to_container(model.cfg.adapters.global_cfg.adapter_meta_cfg.modules)


def adapter_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".adapter_layer." in n)


ENC_BLOCKS = [f"encoder.layers.{i}" for i in range(ENC_LAYERS)]
DEC_BLOCKS = [f"decoder.layers.{i}" for i in range(DEC_LAYERS)]


@pytest.fixture
def base():
    torch.manual_seed(1234)
    model = DemoModel(model_config(D))
    model.eval()
    return model


@pytest.fixture
def x():
    return torch.randn(5, D)


def three_adapter_model(base: DemoModel) -> DemoModel:
    """A copy of ``base`` with ``decoder:adapter_0``, ``encoder:adapter_1`` and global ``adapter_2``,
    all with random weights."""
    model = copy.deepcopy(base)
    model.add_adapter("decoder:adapter_0", adapter_cfg())
    model.add_adapter("encoder:adapter_1", adapter_cfg(dim=H + 1))
    model.add_adapter("adapter_2", adapter_cfg(dim=H + 2, norm_position="post"))
    for i, name in enumerate(("adapter_0", "adapter_1", "adapter_2")):
        randomize_adapters(model, name, seed=100 + i)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# adding adapters and the model config
# ---------------------------------------------------------------------------------------------


class TestAddAdapter:
    def test_global_adapter_records_config_and_metadata(self, base):
        model = copy.deepcopy(base)
        n0 = model.num_weights
        assert "adapters" not in model.cfg
        model.add_adapter("adapter_0", adapter_cfg())

        adapters = model.cfg.adapters
        assert set(adapters.keys()) == {"global_cfg", "adapter_0"}
        assert adapters.adapter_0._target_ == class_path(LinearAdapter)
        assert adapters.adapter_0.in_features == D and adapters.adapter_0.dim == H
        assert adapters.adapter_0.enabled is True
        # a global adapter's module is '' in the metadata
        assert modules_meta(model) == {"adapter_0": ""}
        # it lives in the default module (decoder), once per block
        assert model.default_adapter_module_name == "decoder"
        assert holders(model, "adapter_0") == DEC_BLOCKS
        per_block = 2 * D + 2 * D * H  # LayerNorm + down + up (no biases)
        assert model.num_weights == n0 + DEC_LAYERS * per_block
        assert adapter_params(model) == DEC_LAYERS * per_block
        assert model.get_enabled_adapters() == ["adapter_0"]
        assert model.is_adapter_available() is True

    @pytest.mark.parametrize("module", ["encoder", "decoder"])
    def test_module_adapter(self, base, module):
        model = copy.deepcopy(base)
        model.add_adapter(f"{module}:adapter_0", adapter_cfg())
        assert modules_meta(model) == {"adapter_0": module}
        # the config key is the bare adapter name
        assert "adapter_0" in model.cfg.adapters and f"{module}:adapter_0" not in model.cfg.adapters
        expected = ENC_BLOCKS if module == "encoder" else DEC_BLOCKS
        assert holders(model, "adapter_0") == expected
        other = model.decoder if module == "encoder" else model.encoder
        assert other.is_adapter_available() is False
        assert getattr(model, module).is_adapter_available() is True
        assert model.get_enabled_adapters() == ["adapter_0"]

    def test_dataclass_config(self, base):
        model = copy.deepcopy(base)
        model.add_adapter("encoder:a", LinearAdapterConfig(in_features=D, dim=3, activation="relu"))
        assert model.cfg.adapters.a.activation == "relu"
        assert model.cfg.adapters.a.dim == 3
        adapter = model.encoder.layers[0].get_adapter_module("a")
        assert isinstance(adapter, LinearAdapter) and adapter.dim == 3 and adapter.activation == "relu"

    def test_added_adapter_is_identity_then_changes_output(self, base, x):
        model = copy.deepcopy(base)
        with torch.no_grad():
            y0 = model(x)
            model.add_adapter("adapter_0", adapter_cfg())
            y1 = model(x)
            assert torch.allclose(y0, y1, atol=1e-6)  # zero up-projection: identity
            randomize_adapters(model, "adapter_0", seed=3)
            y2 = model(x)
        assert (y2 - y0).abs().max() > 1e-2

    def test_adapter_names_and_default_module(self, base):
        assert base.adapter_module_names == ["", "encoder", "decoder"]
        assert base.default_adapter_module_name == "decoder"

        class Plain(ModelPT, AdapterModelPTMixin):
            def __init__(self, cfg, trainer=None):
                super().__init__(cfg, trainer=trainer)
                self.setup_adapters()

        plain = Plain({"a": 1})
        assert plain.adapter_module_names == [""]
        assert plain.default_adapter_module_name is None

    def test_resolve_names(self, base):
        model = copy.deepcopy(base)
        assert model.resolve_adapter_module_name_("encoder:x") == ("encoder", "x")
        assert model.resolve_adapter_module_name_("x") == ("", "x")
        model.add_adapter("encoder:adapter_1", adapter_cfg())
        model.add_adapter("adapter_2", adapter_cfg())
        # bare names resolve through the metadata
        assert model.resolve_adapter_module_name_("adapter_1") == ("encoder", "adapter_1")
        assert model.resolve_adapter_module_name_("adapter_2") == ("", "adapter_2")

    @pytest.mark.parametrize("second", ["adapter_0", "encoder:adapter_0", "decoder:adapter_0"])
    @pytest.mark.parametrize("first", ["adapter_0", "encoder:adapter_0", "decoder:adapter_0"])
    def test_duplicate_name_raises(self, base, first, second):
        model = copy.deepcopy(base)
        model.add_adapter(first, adapter_cfg())
        cfg_before = OmegaConf.to_yaml(model.cfg)
        keys_before = list(model.state_dict().keys())
        with pytest.raises(ValueError, match="adapter_0"):
            model.add_adapter(second, adapter_cfg(dim=H + 1))
        assert OmegaConf.to_yaml(model.cfg) == cfg_before
        assert list(model.state_dict().keys()) == keys_before
        # the original adapter is untouched (still dim H)
        first_holder = holders(model, "adapter_0")[0]
        assert model.get_submodule(first_holder).get_adapter_module("adapter_0").dim == H

    @pytest.mark.parametrize("name", ["global_cfg", "decoder:global_cfg", "encoder:global_cfg"])
    def test_reserved_name_raises(self, base, name):
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match="global_cfg"):
            model.add_adapter(name, adapter_cfg())
        assert "adapters" not in model.cfg
        assert not model.encoder.is_adapter_available() and not model.decoder.is_adapter_available()

    def test_unknown_module_raises(self, base):
        model = copy.deepcopy(base)
        model.add_adapter("adapter_0", adapter_cfg())
        cfg_before = OmegaConf.to_yaml(model.cfg)
        with pytest.raises(ValueError, match="projection"):
            model.add_adapter("projection:adapter_1", adapter_cfg())
        assert OmegaConf.to_yaml(model.cfg) == cfg_before
        assert holders(model, "adapter_1") == []

    def test_update_adapter_cfg_shares_config(self, base, x):
        model = copy.deepcopy(base)
        model.add_adapter("adapter_0", adapter_cfg())
        randomize_adapters(model, "adapter_0", seed=8)
        with torch.no_grad():
            assert (model(x) - base(x)).abs().max() > 1e-2
        adapter_modules = [m for m in model.modules() if isinstance(m, AdapterModuleMixin)]
        assert len(adapter_modules) == 1 + 2 + ENC_LAYERS + DEC_LAYERS  # model, 2 stacks, blocks
        for m in adapter_modules:
            assert m.adapter_cfg is model.cfg.adapters

        new_cfg = OmegaConf.create(OmegaConf.to_container(model.cfg.adapters))
        new_cfg.adapter_0.enabled = False
        model.update_adapter_cfg(new_cfg)
        for m in adapter_modules:
            assert m.adapter_cfg is new_cfg
        # the decoder blocks now read the shared config: adapter_0 is disabled there
        assert model.decoder.layers[0].get_enabled_adapters() == []
        assert model.decoder.get_enabled_adapters() == []
        with torch.no_grad():
            assert torch.equal(model(x), base(x))  # the forward sees the new config too


# ---------------------------------------------------------------------------------------------
# enabling and disabling
# ---------------------------------------------------------------------------------------------


class TestEnabled:
    def test_disable_all_with_no_name(self, base, x):
        model = three_adapter_model(base)
        assert model.get_enabled_adapters() == ["adapter_1", "adapter_0", "adapter_2"]
        with torch.no_grad():
            assert (model(x) - base(x)).abs().max() > 1e-2
        model.set_enabled_adapters(enabled=False)
        assert model.get_enabled_adapters() == []
        # the model reports adapters only when some are enabled; modules report any adapter
        assert model.is_adapter_available() is False
        assert model.encoder.is_adapter_available() is True
        assert model.decoder.is_adapter_available() is True
        for name in ("adapter_0", "adapter_1", "adapter_2"):
            assert model.cfg.adapters[name].enabled is False
        with torch.no_grad():
            assert torch.equal(model(x), base(x))
        model.set_enabled_adapters(enabled=True)
        assert sorted(model.get_enabled_adapters()) == ["adapter_0", "adapter_1", "adapter_2"]
        assert model.is_adapter_available() is True

    def test_single_global_name(self, base, x):
        model = three_adapter_model(base)
        model.set_enabled_adapters("adapter_2", enabled=False)
        assert model.cfg.adapters.adapter_2.enabled is False
        assert model.cfg.adapters.adapter_0.enabled is True
        assert model.decoder.get_enabled_adapters() == ["adapter_0"]
        assert model.encoder.get_enabled_adapters() == ["adapter_1"]
        assert sorted(model.get_enabled_adapters()) == ["adapter_0", "adapter_1"]

        # output equals a model that never had adapter_2
        ref = copy.deepcopy(base)
        ref.add_adapter("decoder:adapter_0", adapter_cfg())
        ref.add_adapter("encoder:adapter_1", adapter_cfg(dim=H + 1))
        ref.load_state_dict({k: v for k, v in model.state_dict().items() if "adapter_2" not in k})
        with torch.no_grad():
            assert torch.allclose(model(x), ref(x), atol=1e-6)

    @pytest.mark.parametrize("name", ["encoder:adapter_1", "adapter_1"])
    def test_module_name_and_bare_name(self, base, x, name):
        model = three_adapter_model(base)
        model.set_enabled_adapters(name, enabled=False)
        assert model.encoder.get_enabled_adapters() == []
        assert all(layer.get_enabled_adapters() == [] for layer in model.encoder.layers)
        assert model.decoder.get_enabled_adapters() == ["adapter_0", "adapter_2"]
        assert sorted(model.get_enabled_adapters()) == ["adapter_0", "adapter_2"]
        model.set_enabled_adapters("decoder:adapter_0", enabled=False)
        model.set_enabled_adapters("adapter_2", enabled=False)
        with torch.no_grad():
            assert torch.equal(model(x), base(x))
        model.set_enabled_adapters(name, enabled=True)
        assert model.get_enabled_adapters() == ["adapter_1"]
        with torch.no_grad():
            assert (model(x) - base(x)).abs().max() > 1e-2

    def test_enabled_order_is_addition_order(self, base, x):
        model = copy.deepcopy(base)
        model.add_adapter("decoder:b", adapter_cfg())
        model.add_adapter("decoder:a", adapter_cfg())
        assert model.decoder.layers[0].get_enabled_adapters() == ["b", "a"]
        assert model.get_enabled_adapters() == ["b", "a"]

    def test_no_adapters_is_not_available(self, base):
        model = copy.deepcopy(base)
        assert model.is_adapter_available() is False
        assert model.get_enabled_adapters() == []
        with pytest.raises(ValueError):
            model.set_enabled_adapters(enabled=False)

    def test_global_cfg_name_raises(self, base):
        model = three_adapter_model(base)
        with pytest.raises(ValueError, match="global"):
            model.set_enabled_adapters("global_cfg", enabled=False)
        assert sorted(model.get_enabled_adapters()) == ["adapter_0", "adapter_1", "adapter_2"]


# ---------------------------------------------------------------------------------------------
# registry and class replacement
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int = D):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc(x)


class BlockAdapter(Block, AdapterModuleMixin):
    def forward(self, x):
        x = super().forward(x)
        if self.is_adapter_available():
            x = self.forward_enabled_adapters(x)
        return x


if adapter_mixins.get_registered_adapter(Block) is None:
    adapter_mixins.register_adapter(Block, BlockAdapter)


class TestRegistry:
    def test_get_registered_adapter_by_path_base_and_adapter_class(self):
        for key in (class_path(ResidualMLP), ResidualMLP, ResidualMLPAdapter, class_path(ResidualMLPAdapter)):
            info = adapter_mixins.get_registered_adapter(key)
            assert isinstance(info, adapter_mixins.AdapterRegistryInfo), key
            assert info.base_class is ResidualMLP
            assert info.adapter_class is ResidualMLPAdapter
            assert info.base_class_path == "fusedadapters.demo.ResidualMLP"
            assert info.adapter_class_path == "fusedadapters.demo.ResidualMLPAdapter"
        info = adapter_mixins.get_registered_adapter(Block)
        assert info.adapter_class is BlockAdapter and info.base_class_path == class_path(Block)
        assert adapter_mixins.get_registered_adapter(BlockAdapter) is info

    def test_unregistered_is_none(self):
        assert adapter_mixins.get_registered_adapter(nn.Linear) is None
        assert adapter_mixins.get_registered_adapter("torch.nn.Linear") is None

    def test_register_twice_raises(self):
        info = adapter_mixins.get_registered_adapter(ResidualMLP)
        with pytest.raises(ValueError, match="already"):
            adapter_mixins.register_adapter(ResidualMLP, ResidualMLPAdapter)
        assert adapter_mixins.get_registered_adapter(ResidualMLP) is info

    def test_register_not_subclass_raises(self):
        class Base(nn.Module):
            pass

        class NotASubclass(nn.Module, AdapterModuleMixin):
            pass

        with pytest.raises(ValueError, match="sub-class"):
            adapter_mixins.register_adapter(Base, NotASubclass)
        assert adapter_mixins.get_registered_adapter(Base) is None

    def test_update_module_class_with_adapter_class(self):
        module = Block()
        weight = module.fc.weight.detach().clone()
        cfg = OmegaConf.create({"blk": {"_target_": class_path(Block)}, "other": {"_target_": "torch.nn.Linear"}})
        adapter_mixins.update_module_class_with_adapter_class(module, cfg=cfg, update_config=True, verbose=False)
        assert type(module) is BlockAdapter
        assert torch.equal(module.fc.weight, weight)  # same parameters, new class
        assert cfg.blk._target_ == class_path(BlockAdapter)
        assert cfg.other._target_ == "torch.nn.Linear"
        module.add_adapter("a", adapter_cfg())
        assert module.is_adapter_available()

        module2 = Block()
        cfg2 = OmegaConf.create({"blk": {"_target_": class_path(Block)}})
        adapter_mixins.update_module_class_with_adapter_class(module2, cfg=cfg2, update_config=False, verbose=False)
        assert type(module2) is BlockAdapter
        assert cfg2.blk._target_ == class_path(Block)

        linear = nn.Linear(3, 3)
        adapter_mixins.update_module_class_with_adapter_class(linear, cfg=cfg2, verbose=False)
        assert type(linear) is nn.Linear

    def test_replace_adapter_compatible_modules(self, x):
        cfg = model_config(D)
        cfg.encoder._target_ = class_path(ResidualMLP)
        cfg.decoder._target_ = class_path(ResidualMLP)
        model = DemoModel(cfg)
        assert not isinstance(model.encoder, AdapterModuleMixin)
        with pytest.raises(AttributeError):
            model.add_adapter("encoder:adapter_0", adapter_cfg())
        assert "adapters" not in model.cfg  # the failed add left no trace

        model.replace_adapter_compatible_modules(verbose=False)
        assert type(model.encoder) is ResidualMLPAdapter and type(model.decoder) is ResidualMLPAdapter
        assert model.cfg.encoder._target_ == class_path(ResidualMLPAdapter)
        assert model.cfg.decoder._target_ == class_path(ResidualMLPAdapter)
        assert model.encoder.is_adapter_available() is False
        model.add_adapter("encoder:adapter_0", adapter_cfg())
        assert model.encoder.is_adapter_available() is True
        assert holders(model, "adapter_0") == ENC_BLOCKS

    def test_replace_without_config_update(self):
        cfg = model_config(D)
        cfg.encoder._target_ = class_path(ResidualMLP)
        model = DemoModel(cfg)
        model.replace_adapter_compatible_modules(update_config=False, verbose=False)
        assert type(model.encoder) is ResidualMLPAdapter
        assert model.cfg.encoder._target_ == class_path(ResidualMLP)


# ---------------------------------------------------------------------------------------------
# save_adapters / load_adapters
# ---------------------------------------------------------------------------------------------


def assert_same_adapter_weights(a: nn.Module, b: nn.Module, name: str) -> None:
    ha, hb = holders(a, name), holders(b, name)
    assert ha == hb and ha
    for q in ha:
        sa = a.get_submodule(q).get_adapter_module(name).state_dict()
        sb = b.get_submodule(q).get_adapter_module(name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (q, k)


class TestSaveLoadAdapters:
    def test_all_adapters(self, base, x, tmp_path):
        model = three_adapter_model(base)
        path = tmp_path / "all.safetensors"
        model.save_adapters(str(path), name=None)

        new = copy.deepcopy(base)
        new.load_adapters(str(path), name=None, map_location="cpu")
        new.eval()
        with torch.no_grad():
            y, y_new = model(x), new(x)
        assert (y - base(x)).abs().max() > 1e-2  # the adapters matter
        assert torch.equal(y, y_new)
        for name in ("adapter_0", "adapter_1", "adapter_2"):
            assert_same_adapter_weights(model, new, name)
        assert OmegaConf.to_container(new.cfg.adapters) == OmegaConf.to_container(model.cfg.adapters)
        assert modules_meta(new) == {"adapter_0": "decoder", "adapter_1": "encoder", "adapter_2": ""}
        assert new.num_weights == model.num_weights

    def test_global_name(self, base, x, tmp_path):
        model = three_adapter_model(base)
        path = tmp_path / "a2.safetensors"
        model.save_adapters(str(path), name="adapter_2")

        new = copy.deepcopy(base)
        new.load_adapters(str(path))  # name=None: everything in the file, i.e. adapter_2 only
        assert set(new.cfg.adapters.keys()) == {"global_cfg", "adapter_2"}
        assert modules_meta(new) == {"adapter_2": ""}
        assert holders(new, "adapter_2") == DEC_BLOCKS
        assert new.encoder.is_adapter_available() is False
        assert_same_adapter_weights(model, new, "adapter_2")

        new2 = copy.deepcopy(base)
        new2.load_adapters(str(path), name="adapter_2")
        ref = copy.deepcopy(model)
        ref.set_enabled_adapters("adapter_0", enabled=False)
        ref.set_enabled_adapters("adapter_1", enabled=False)
        with torch.no_grad():
            assert (ref(x) - base(x)).abs().max() > 1e-2
            assert torch.equal(new2(x), ref(x))
            assert torch.equal(new(x), ref(x))

    def test_module_name_from_file_of_all(self, base, x, tmp_path):
        model = three_adapter_model(base)
        path = tmp_path / "all.safetensors"
        model.save_adapters(str(path))

        new = copy.deepcopy(base)
        new.load_adapters(str(path), name="decoder:adapter_0")
        assert set(new.cfg.adapters.keys()) == {"global_cfg", "adapter_0"}
        assert modules_meta(new) == {"adapter_0": "decoder"}
        assert holders(new, "adapter_0") == DEC_BLOCKS
        assert new.encoder.is_adapter_available() is False
        assert new.num_weights < model.num_weights
        assert_same_adapter_weights(model, new, "adapter_0")

        ref = copy.deepcopy(model)
        ref.set_enabled_adapters("adapter_1", enabled=False)
        ref.set_enabled_adapters("adapter_2", enabled=False)
        with torch.no_grad():
            assert torch.equal(new(x), ref(x))
            assert (new(x) - base(x)).abs().max() > 1e-2

    @pytest.mark.parametrize("save_name", ["adapter_1", "encoder:adapter_1"])
    @pytest.mark.parametrize("load_name", ["adapter_1", "encoder:adapter_1"])
    def test_partial_name_resolved_via_metadata(self, base, x, tmp_path, save_name, load_name):
        model = three_adapter_model(base)
        path = tmp_path / "a1.safetensors"
        model.save_adapters(str(path), name=save_name)

        new = copy.deepcopy(base)
        new.load_adapters(str(path), name=load_name)
        # the bare name went to the encoder (from the file's metadata), not to the default decoder
        assert holders(new, "adapter_1") == ENC_BLOCKS
        assert new.decoder.is_adapter_available() is False
        assert modules_meta(new) == {"adapter_1": "encoder"}
        assert_same_adapter_weights(model, new, "adapter_1")
        ref = copy.deepcopy(model)
        ref.set_enabled_adapters("adapter_0", enabled=False)
        ref.set_enabled_adapters("adapter_2", enabled=False)
        with torch.no_grad():
            assert torch.equal(new(x), ref(x))

    def test_list_of_names(self, base, x, tmp_path):
        model = three_adapter_model(base)
        path = tmp_path / "two.safetensors"
        model.save_adapters(str(path), name=["decoder:adapter_0", "adapter_1"])

        new = copy.deepcopy(base)
        new.load_adapters(str(path))
        assert set(new.cfg.adapters.keys()) == {"global_cfg", "adapter_0", "adapter_1"}
        assert modules_meta(new) == {"adapter_0": "decoder", "adapter_1": "encoder"}

        new2 = copy.deepcopy(base)
        new2.load_adapters(str(path), name=["encoder:adapter_1", "adapter_0"])
        for m in (new, new2):
            assert holders(m, "adapter_0") == DEC_BLOCKS
            assert holders(m, "adapter_1") == ENC_BLOCKS
            assert holders(m, "adapter_2") == []
            assert_same_adapter_weights(model, m, "adapter_0")
            assert_same_adapter_weights(model, m, "adapter_1")
        ref = copy.deepcopy(model)
        ref.set_enabled_adapters("adapter_2", enabled=False)
        with torch.no_grad():
            assert torch.equal(new(x), ref(x))
            assert torch.equal(new2(x), ref(x))

    def test_separate_files_loaded_one_after_another(self, base, x, tmp_path):
        model = three_adapter_model(base)
        paths = {}
        for name in ("adapter_0", "adapter_1", "adapter_2"):
            paths[name] = tmp_path / f"{name}.safetensors"
            model.save_adapters(str(paths[name]), name=name)
        new = copy.deepcopy(base)
        for name in ("adapter_0", "adapter_1", "adapter_2"):
            new.load_adapters(str(paths[name]), name=name)
        assert new.num_weights == model.num_weights
        assert sorted(new.get_enabled_adapters()) == ["adapter_0", "adapter_1", "adapter_2"]
        with torch.no_grad():
            assert torch.equal(new(x), model(x))

    @pytest.mark.parametrize("name", [None, "adapter_0", "decoder:adapter_0"])
    def test_load_existing_name_raises(self, base, tmp_path, name):
        model = three_adapter_model(base)
        path = tmp_path / "all.safetensors"
        model.save_adapters(str(path))
        target = copy.deepcopy(base)
        target.add_adapter("decoder:adapter_0", adapter_cfg(dim=H + 3))
        cfg_before = OmegaConf.to_yaml(target.cfg)
        state_before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError, match="adapter_0"):
            target.load_adapters(str(path), name=name)
        assert OmegaConf.to_yaml(target.cfg) == cfg_before
        state_after = target.state_dict()
        assert state_after.keys() == state_before.keys()
        assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
        assert holders(target, "adapter_1") == [] and holders(target, "adapter_2") == []

    def test_enabled_state_kept(self, base, x, tmp_path):
        model = three_adapter_model(base)
        model.set_enabled_adapters("adapter_1", enabled=False)
        path = tmp_path / "all.safetensors"
        model.save_adapters(str(path))

        new = copy.deepcopy(base)
        new.load_adapters(str(path))
        assert new.cfg.adapters.adapter_1.enabled is False
        assert new.cfg.adapters.adapter_0.enabled is True
        assert sorted(new.get_enabled_adapters()) == ["adapter_0", "adapter_2"]
        assert new.encoder.get_enabled_adapters() == []
        assert new.encoder.is_adapter_available() is True
        with torch.no_grad():
            assert torch.equal(new(x), model(x))
        new.set_enabled_adapters("adapter_1", enabled=True)
        model.set_enabled_adapters("adapter_1", enabled=True)
        with torch.no_grad():
            assert torch.equal(new(x), model(x))

    def test_save_without_adapters_raises(self, base, tmp_path):
        path = tmp_path / "none.safetensors"
        with pytest.raises(AttributeError):
            base.save_adapters(str(path))
        assert not path.exists()

    def test_adapter_file_is_a_small_fraction(self, tmp_path):
        torch.manual_seed(0)
        model = DemoModel(model_config(32))
        model.add_adapter("decoder:adapter_0", adapter_cfg(in_features=32, dim=4))
        randomize_adapters(model, "adapter_0", seed=0)
        adapter_path, model_path = tmp_path / "a.safetensors", tmp_path / "m.nemo"
        model.save_adapters(str(adapter_path), name="adapter_0")
        model.save_to(str(model_path))
        adapter_size, model_size = os.path.getsize(adapter_path), os.path.getsize(model_path)
        adapter_bytes = 4 * adapter_params(model)
        model_bytes = 4 * sum(p.numel() for p in model.parameters())
        assert model_size >= model_bytes
        assert adapter_bytes <= adapter_size < adapter_bytes + 8192  # weights plus a small header
        assert adapter_size < 0.25 * model_size


# ---------------------------------------------------------------------------------------------
# save_to / restore_from
# ---------------------------------------------------------------------------------------------


class OtherModel(ModelPT):
    def __init__(self, cfg, trainer=None):
        super().__init__(cfg, trainer=trainer)
        self.fc = nn.Linear(2, 2)


class TestSaveRestore:
    @pytest.mark.parametrize("via", ["ModelPT", "DemoModel"])
    def test_round_trip(self, base, x, tmp_path, via):
        model = three_adapter_model(base)
        model.set_enabled_adapters("adapter_2", enabled=False)
        with torch.no_grad():
            y = model(x)
        path = tmp_path / "model.nemo"
        model.save_to(str(path))

        cls = ModelPT if via == "ModelPT" else DemoModel
        new = cls.restore_from(str(path), map_location="cpu")
        assert type(new) is DemoModel
        new.eval()
        with torch.no_grad():
            assert torch.equal(new(x), y)
        assert OmegaConf.to_container(new.cfg) == OmegaConf.to_container(model.cfg)
        assert new.cfg.target == class_path(DemoModel)
        for name in ("adapter_0", "adapter_1", "adapter_2"):
            assert_same_adapter_weights(model, new, name)
        assert sorted(new.get_enabled_adapters()) == ["adapter_0", "adapter_1"]
        assert new.cfg.adapters.adapter_2.enabled is False
        assert modules_meta(new) == {"adapter_0": "decoder", "adapter_1": "encoder", "adapter_2": ""}
        sd, sd_new = model.state_dict(), new.state_dict()
        assert sd.keys() == sd_new.keys()
        assert all(torch.equal(sd[k], sd_new[k]) for k in sd)
        assert all(p.device.type == "cpu" for p in new.parameters())
        assert isinstance(new, AdapterModelPTMixin)

    def test_round_trip_without_adapters(self, base, x, tmp_path):
        path = tmp_path / "base.nemo"
        base.save_to(str(path))
        new = DemoModel.restore_from(str(path), map_location=torch.device("cpu"))
        new.eval()
        assert "adapters" not in new.cfg
        assert new.is_adapter_available() is False
        with torch.no_grad():
            assert torch.equal(new(x), base(x))

    def test_return_config(self, base, tmp_path):
        model = three_adapter_model(base)
        path = tmp_path / "model.nemo"
        model.save_to(str(path))
        cfg = ModelPT.restore_from(str(path), return_config=True)
        assert isinstance(cfg, DictConfig)
        assert cfg.target == class_path(DemoModel)
        assert cfg.encoder.num_layers == ENC_LAYERS
        assert OmegaConf.to_container(cfg) == OmegaConf.to_container(model.cfg)

    def test_wrong_subclass_raises(self, base, tmp_path):
        path = tmp_path / "model.nemo"
        base.save_to(str(path))
        with pytest.raises(TypeError, match="DemoModel"):
            OtherModel.restore_from(str(path))

    def test_save_restore_restores_adapters_after_training_edit(self, base, x, tmp_path):
        # adapters added after a restore save and restore again (setup_adapters re-creates them)
        p1, p2 = tmp_path / "1.nemo", tmp_path / "2.nemo"
        base.save_to(str(p1))
        m = DemoModel.restore_from(str(p1), map_location="cpu")
        m.add_adapter("encoder:e", adapter_cfg())
        randomize_adapters(m, "e", seed=11)
        m.save_to(str(p2))
        m2 = DemoModel.restore_from(str(p2), map_location="cpu")
        m.eval(), m2.eval()
        with torch.no_grad():
            assert torch.equal(m2(x), m(x))
            assert (m2(x) - base(x)).abs().max() > 1e-2
        assert holders(m2, "e") == ENC_BLOCKS


# ---------------------------------------------------------------------------------------------
# NeuralModule: freeze / unfreeze / num_weights, ModelPT.summarize
# ---------------------------------------------------------------------------------------------


class TestNeuralModule:
    def test_num_weights(self, base):
        total = sum(p.numel() for p in base.parameters())
        expected = ENC_LAYERS * (D * D + D + 2 * D) + DEC_LAYERS * (D * D + D + 2 * D) + D * 10 + 10
        assert total == expected
        assert base.num_weights == expected
        base.projection.weight.requires_grad_(False)
        assert base.num_weights == expected - D * 10

    def test_freeze_unfreeze(self, base):
        model = copy.deepcopy(base)
        model.train()
        model.freeze()
        assert model.num_weights == 0
        assert all(not p.requires_grad for p in model.parameters())
        assert model.training is False
        model.unfreeze()
        assert all(p.requires_grad for p in model.parameters())
        assert model.training is True

    def test_unfreeze_partial(self, base):
        model = copy.deepcopy(base)
        model.projection.weight.requires_grad_(False)
        model.encoder.layers[0].fc.bias.requires_grad_(False)
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        n_before = model.num_weights
        model.freeze()
        assert model.num_weights == 0
        model.unfreeze(partial=True)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before
        assert model.num_weights == n_before
        assert model.projection.weight.requires_grad is False

    def test_unfreeze_partial_without_freeze_raises(self, base):
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match="freez"):
            model.unfreeze(partial=True)

    @pytest.mark.parametrize("training", [True, False])
    def test_as_frozen(self, base, x, training):
        model = copy.deepcopy(base)
        model.train(training)
        model.projection.bias.requires_grad_(False)
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        with model.as_frozen():
            assert model.num_weights == 0
            assert model.training is False
            out = model(x)
            assert not out.requires_grad
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before
        assert model.training is training

    def test_freeze_then_unfreeze_enabled_adapters(self, base):
        model = three_adapter_model(base)
        model.set_enabled_adapters("adapter_2", enabled=False)
        model.freeze()
        model.unfreeze_enabled_adapters()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {
            n for n, _ in model.named_parameters() if ".adapter_layer.adapter_0." in n or ".adapter_layer.adapter_1." in n
        }
        assert trainable == expected and expected
        per = lambda h: 2 * D + 2 * D * h  # noqa: E731
        assert model.num_weights == DEC_LAYERS * per(H) + ENC_LAYERS * per(H + 1)

    def test_is_neural_module(self, base):
        assert isinstance(base, NeuralModule) and isinstance(base, ModelPT)


class TestSummarize:
    def test_counts_and_table(self, base, capsys):
        model = three_adapter_model(base)
        model.freeze()
        model.unfreeze_enabled_adapters()
        summary = model.summarize()
        printed = capsys.readouterr().out

        assert isinstance(summary, ModelSummary)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        assert trainable == adapter_params(model) > 0
        assert summary.trainable_params == trainable
        assert summary.frozen_params == frozen
        assert summary.total_params == trainable + frozen

        rows = {name: (kind, t, f) for name, kind, t, f in summary.rows}
        assert set(rows) == {"encoder", "decoder", "projection"}
        assert rows["projection"] == ("Linear", 0, D * 10 + 10)
        for name in ("encoder", "decoder"):
            sub = getattr(model, name)
            assert rows[name][0] == "ResidualMLPAdapter"
            assert rows[name][1] == sum(p.numel() for p in sub.parameters() if p.requires_grad)
            assert rows[name][2] == sum(p.numel() for p in sub.parameters() if not p.requires_grad)

        assert printed.strip() == str(summary).strip()
        for word in ("Name", "Type", "Trainable", "encoder", "decoder", "projection", "ResidualMLPAdapter"):
            assert word in printed
        assert f"{trainable:,} Trainable params" in printed
        assert f"{frozen:,} Non-trainable params" in printed
        assert f"{trainable + frozen:,} Total params" in printed

    def test_max_depth(self, base, capsys):
        summary = base.summarize(max_depth=2)
        capsys.readouterr()
        names = [r[0] for r in summary.rows]
        assert "encoder.layers" in names and "decoder.layers" in names
        assert "encoder.layers.0" not in names
        assert summary.frozen_params == 0
        assert summary.trainable_params == base.num_weights


# ---------------------------------------------------------------------------------------------
# A model that does not forward adapter calls to its modules
# ---------------------------------------------------------------------------------------------


class NotForwarding(ModelPT, AdapterModelPTMixin):
    """Mixes AdapterModelPTMixin in but overrides none of its methods: no module ever gets an adapter."""

    def __init__(self, cfg, trainer=None):
        super().__init__(cfg, trainer=trainer)
        self.block = MLP(D)


class ForwardingToNothing(NotForwarding):
    """Overrides add_adapter but forwards it nowhere (a bug, or a configuration that disables every module)."""

    def add_adapter(self, name, cfg):
        super().add_adapter(name, cfg)


class TestModelThatDoesNotForward:
    def test_add_adapter_without_override_is_an_error_naming_the_methods(self):
        model = NotForwarding(OmegaConf.create({}))
        before = OmegaConf.to_yaml(model.cfg)
        with pytest.raises(NotImplementedError) as exc:
            model.add_adapter("adapter_0", adapter_cfg())
        for method in ("add_adapter", "set_enabled_adapters", "get_enabled_adapters", "is_adapter_available"):
            assert method in str(exc.value)
        assert "adapter_0" in str(exc.value) and "NotForwarding" in str(exc.value)
        assert OmegaConf.to_yaml(model.cfg) == before and "adapters" not in model.cfg

    def test_override_that_places_it_nowhere_warns(self, caplog):
        model = ForwardingToNothing(OmegaConf.create({}))
        caplog.set_level("WARNING", logger="fusedadapters")
        model.add_adapter("adapter_0", adapter_cfg())
        assert "no module of ForwardingToNothing holds adapter `adapter_0`" in caplog.text
        assert "set_enabled_adapters" in caplog.text

    def test_save_with_nothing_to_save_is_an_error(self, tmp_path):
        model = ForwardingToNothing(OmegaConf.create({}))
        model.add_adapter("adapter_0", adapter_cfg())
        path = tmp_path / "a.safetensors"
        with pytest.raises(ValueError, match="nothing to save for adapter `adapter_0`.*Override add_adapter"):
            model.save_adapters(str(path))
        assert not path.exists()

    def test_forwarding_model_does_not_warn(self, base, caplog):
        caplog.set_level("WARNING", logger="fusedadapters")
        base.add_adapter("decoder:adapter_0", adapter_cfg())
        base.add_adapter("encoder:adapter_1", adapter_cfg())
        assert "no module" not in caplog.text
