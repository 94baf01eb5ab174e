"""In-memory ``_target_`` configs: a target of the wrong kind is refused, by name, before anything is called.

Each bad config carries a trap: a target whose call would create a file. The tests check the error
names the target and where it sits, that the file was never created, and that nothing changed.
"""

import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

from fusedadapters import UnsafeTargetError
from fusedadapters.adapter_mixin_strategies import ResidualAddAdapterStrategy, ReturnResultAdapterStrategy
from fusedadapters.adapter_modules import LinearAdapter, LinearAdapterConfig
from fusedadapters.demo import MLP, DemoModel, model_config
from fusedadapters.targets import check_buildable_targets, class_path, instantiate_checked, is_adapter_strategy
from helpers import randomize_

D, H = 12, 3
LINEAR = class_path(LinearAdapter)


class DuckStrategy:
    """A strategy by behaviour only: ``forward(input, adapter, *, module)``, no base class."""

    def forward(self, input, adapter, *, module):
        return input + 2 * adapter(input)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


def bad_configs(trap):
    """(config, the target the error must name, where it sits) for every kind of wrong target."""
    touch = {"_target_": "os.system", "command": f"touch '{trap}'"}
    popen = {"_target_": "subprocess.Popen", "args": ["touch", str(trap)]}
    return [
        (touch, "os.system", "at _target_"),
        (popen, "subprocess.Popen", "at _target_"),
        ({"_target_": LINEAR, "in_features": D, "dim": H, "adapter_strategy": touch}, "os.system", "adapter_strategy"),
        ({"_target_": LINEAR, "in_features": D, "dim": H, "adapter_strategy": popen}, "subprocess.Popen", "adapter_strategy"),
        # a module class is no strategy
        ({"_target_": LINEAR, "in_features": D, "dim": H, "adapter_strategy": {"_target_": "torch.nn.Linear",
          "in_features": 1, "out_features": 1}}, "torch.nn.Linear", "adapter_strategy"),
        # any other nested target must be a module or a strategy
        ({"_target_": LINEAR, "in_features": D, "dim": H, "extra": {"nested": touch}}, "os.system", "extra.nested"),
        # a strategy is no adapter module
        ({"_target_": class_path(ResidualAddAdapterStrategy)}, "ResidualAddAdapterStrategy", "at _target_"),
    ]


def case_ids():
    return [f"{i}" for i in range(len(bad_configs("x")))]


@pytest.mark.parametrize("index", range(len(bad_configs("x"))), ids=case_ids())
@pytest.mark.parametrize("as_omegaconf", [False, True])
def test_module_add_adapter_refuses_before_calling(tmp_path, index, as_omegaconf):
    trap = tmp_path / "ran"
    cfg, target, where = bad_configs(trap)[index]
    block = MLP(D)
    with pytest.raises(UnsafeTargetError) as exc:
        block.add_adapter("adapter_0", OmegaConf.create(cfg) if as_omegaconf else cfg)
    assert target in str(exc.value) and where in str(exc.value) and "adapter_0" in str(exc.value)
    assert not trap.exists()
    assert not block.is_adapter_available() and "adapter_layer" not in block._modules


@pytest.mark.parametrize("index", range(len(bad_configs("x"))), ids=case_ids())
def test_model_add_adapter_refuses_before_calling(tmp_path, index):
    trap = tmp_path / "ran"
    cfg, target, _ = bad_configs(trap)[index]
    model = DemoModel(model_config(D))
    before = OmegaConf.to_yaml(model.cfg)
    with pytest.raises(UnsafeTargetError, match=target.replace(".", r"\.")):
        model.add_adapter("decoder:adapter_0", cfg)
    assert not trap.exists()
    assert OmegaConf.to_yaml(model.cfg) == before and model.get_enabled_adapters() == []


def test_target_given_as_keyword_argument_is_checked(tmp_path):
    trap = tmp_path / "ran"
    block = MLP(D)
    with pytest.raises(UnsafeTargetError, match="os.system"):
        block.add_adapter("adapter_0", LinearAdapterConfig(in_features=D, dim=H), _target_="os.system",
                          command=f"touch '{trap}'")
    assert not trap.exists()


def test_strategy_config_given_to_the_module_is_checked(tmp_path):
    trap = tmp_path / "ran"
    with pytest.raises(UnsafeTargetError, match="adapter_strategy of LinearAdapter.*os.system"):
        LinearAdapter(D, H, adapter_strategy={"_target_": "os.system", "command": f"touch '{trap}'"})
    assert not trap.exists()


def test_instantiate_checked_refuses_a_module_where_a_strategy_is_expected():
    with pytest.raises(UnsafeTargetError, match="not an adapter strategy"):
        instantiate_checked({"_target_": LINEAR, "in_features": D, "dim": H}, "strategy", source="test")
    with pytest.raises(UnsafeTargetError, match="no `_target_`"):
        check_buildable_targets({"in_features": D}, "adapter", "test")


def test_good_configs_still_build():
    block = MLP(D)
    block.add_adapter("residual", {"_target_": LINEAR, "in_features": D, "dim": H})
    block.add_adapter("ret", {"_target_": LINEAR, "in_features": D, "dim": H,
                              "adapter_strategy": {"_target_": class_path(ReturnResultAdapterStrategy)}})
    block.add_adapter("duck", {"_target_": LINEAR, "in_features": D, "dim": H,
                               "adapter_strategy": {"_target_": class_path(DuckStrategy)}})
    assert isinstance(block.adapter_layer["ret"].adapter_strategy, ReturnResultAdapterStrategy)
    assert isinstance(block.adapter_layer["duck"].adapter_strategy, DuckStrategy)


def test_duck_typed_strategy_runs_in_the_dispatch():
    block = MLP(D)
    block.add_adapter("duck", {"_target_": LINEAR, "in_features": D, "dim": H,
                               "adapter_strategy": {"_target_": class_path(DuckStrategy)}})
    adapter = block.get_adapter_module("duck")
    randomize_(adapter.parameters(), seed=3)
    x = torch.randn(3, D)
    with torch.no_grad():
        host = block.ln(block.fc(x))
        torch.testing.assert_close(block(x), host + 2 * adapter(host))


def _nemo_like_strategy_class():
    """A class whose base is named and placed like NeMo's AbstractAdapterStrategy (no NeMo needed)."""
    module = types.ModuleType("nemo_like_for_test")
    base = type("AbstractAdapterStrategy", (), {"__module__": "nemo.core.classes.mixins.adapter_mixin_strategies"})
    derived = type("NemoResidual", (base,), {"__module__": module.__name__})
    return derived


@pytest.mark.parametrize(
    "obj, expected",
    [
        (ResidualAddAdapterStrategy, True),
        (ResidualAddAdapterStrategy(), True),
        (ReturnResultAdapterStrategy(), True),
        (DuckStrategy, True),
        (DuckStrategy(), True),
        (_nemo_like_strategy_class(), True),
        (torch.nn.Linear, False),
        (LinearAdapter, False),
        (type(sys), False),
        (print, False),
        ("fusedadapters.adapter_mixin_strategies.ResidualAddAdapterStrategy", False),  # a path, not a class
    ],
)
def test_is_adapter_strategy(obj, expected):
    assert is_adapter_strategy(obj) is expected
