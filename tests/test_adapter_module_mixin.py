"""AdapterModuleMixin through its public API: adding, enabling, names, types, unfreezing, dispatch."""

import dataclasses

import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from fusedadapters import adapter_mixin_strategies as strategies
from fusedadapters import adapter_mixins, adapter_modules
from fusedadapters.adapter_mixins import AdapterModuleMixin
from helpers import randomize_

D = 12


class Block(torch.nn.Module, AdapterModuleMixin):
    def __init__(self, dim=D):
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)
        self.bn = torch.nn.BatchNorm1d(dim)

    def forward(self, x):
        x = self.fc(x)
        if self.is_adapter_available():
            x = self.forward_enabled_adapters(x)
        return x


def linear_cfg(dim=4, **kwargs):
    return adapter_modules.LinearAdapterConfig(in_features=D, dim=dim, **kwargs)


@pytest.mark.parametrize(
    "make_cfg",
    [
        lambda: linear_cfg(),
        lambda: OmegaConf.structured(linear_cfg()),
        lambda: OmegaConf.to_container(OmegaConf.structured(linear_cfg())),
    ],
    ids=["dataclass", "DictConfig", "dict"],
)
def test_add_adapter_accepts_dataclass_dict_and_dictconfig(make_cfg):
    block = Block()
    block.add_adapter("a", cfg=make_cfg())
    assert isinstance(block.adapter_layer, torch.nn.ModuleDict)
    assert isinstance(block.adapter_layer["a"], adapter_modules.LinearAdapter)
    assert isinstance(block.adapter_cfg, DictConfig)
    assert block.adapter_cfg.a.enabled is True
    assert block.get_adapter_cfg("a").dim == 4
    assert block.get_adapter_module("a") is block.adapter_layer["a"]
    assert block.get_adapter_module("missing") is None


def test_enabled_key_and_kwargs():
    block = Block()
    cfg = OmegaConf.structured(linear_cfg())
    with open_dict(cfg):
        cfg.enabled = False
    block.add_adapter("off", cfg=cfg)
    block.add_adapter("on", cfg=linear_cfg(), activation="relu")
    assert block.get_enabled_adapters() == ["on"]
    assert block.adapter_layer["on"].activation == "relu"
    assert block.is_adapter_available()


def test_enabled_adapters_keep_order_of_addition():
    block = Block()
    for name in ["zeta", "alpha", "mid"]:
        block.add_adapter(name, cfg=linear_cfg())
    assert block.get_enabled_adapters() == ["zeta", "alpha", "mid"]
    block.set_enabled_adapters("alpha", enabled=False)
    assert block.get_enabled_adapters() == ["zeta", "mid"]
    block.set_enabled_adapters(enabled=False)
    assert block.get_enabled_adapters() == [] and block.is_adapter_available()
    block.set_enabled_adapters(enabled=True)
    assert block.get_enabled_adapters() == ["zeta", "alpha", "mid"]


def test_name_errors():
    block = Block()
    assert not block.is_adapter_available()
    with pytest.raises(ValueError, match="No adapter"):
        block.set_enabled_adapters(enabled=False)
    block.add_adapter("a", cfg=linear_cfg())
    with pytest.raises(ValueError, match="already exists"):
        block.add_adapter("a", cfg=linear_cfg(dim=8))
    assert block.adapter_layer["a"].dim == 4
    with pytest.raises(ValueError, match="reserved"):
        block.add_adapter("global_cfg", cfg=linear_cfg())
    with pytest.raises(KeyError, match="nope"):
        block.set_enabled_adapters("nope", enabled=True)
    with pytest.raises(ValueError, match="global_cfg"):
        block.set_enabled_adapters("global_cfg", enabled=True)
    with pytest.raises(ValueError, match="_target_"):
        block.add_adapter("b", cfg={"in_features": D, "dim": 4})
    assert list(block.adapter_layer.keys()) == ["a"]


def test_resolve_module_names_and_global_cfg_metadata():
    block = Block()
    assert block.resolve_adapter_module_name_("enc:ad") == ("enc", "ad")
    assert block.resolve_adapter_module_name_("ad") == ("", "ad")
    block.add_adapter("enc:ad", cfg=linear_cfg())
    assert list(block.adapter_layer.keys()) == ["ad"]
    block.adapter_cfg["global_cfg"] = {"adapter_meta_cfg": {"modules": {"ad": "enc"}}}
    assert block.resolve_adapter_module_name_("ad") == ("enc", "ad")
    assert block.get_enabled_adapters() == ["ad"]  # global_cfg is never an adapter


def test_forward_chains_enabled_adapters_through_strategies():
    block = Block()
    block.add_adapter("a", cfg=linear_cfg())
    block.add_adapter("b", cfg=linear_cfg(activation="gelu"))
    block.add_adapter("c", cfg=linear_cfg())
    for i, name in enumerate("abc"):
        randomize_(block.adapter_layer[name].parameters(), seed=i)
    block.set_enabled_adapters("b", enabled=False)
    block.eval()
    x = torch.randn(5, D)
    a, c = block.adapter_layer["a"], block.adapter_layer["c"]
    h = block.fc(x)
    expected = (h + a(h)) + c(h + a(h))
    torch.testing.assert_close(block(x), expected)
    # Disabling refreshes the cached dispatch plan.
    block.set_enabled_adapters("c", enabled=False)
    torch.testing.assert_close(block(x), h + a(h))
    block.set_enabled_adapters(enabled=False)
    torch.testing.assert_close(block(x), h)


def test_forward_single_enabled_adapter_is_the_override_point():
    calls = []

    class Logged(Block):
        def forward_single_enabled_adapter_(self, input, adapter_module, *, adapter_name, adapter_strategy):
            calls.append(adapter_name)
            return super().forward_single_enabled_adapter_(
                input, adapter_module, adapter_name=adapter_name, adapter_strategy=adapter_strategy
            )

    block = Logged()
    block.add_adapter("a", cfg=linear_cfg())
    block.add_adapter("b", cfg=linear_cfg())
    block(torch.randn(2, D))
    assert calls == ["a", "b"]


# The dispatch skips hops a class keeps as they are; everything a user can override or hook still runs.


def _random_adapter_block(*names, **cfg_kwargs):
    block = Block()
    for i, name in enumerate(names):
        block.add_adapter(name, cfg=linear_cfg(**cfg_kwargs))
        randomize_(block.get_adapter_module(name).parameters(), seed=10 + i)
    return block


def test_dispatch_runs_an_overridden_strategy_call():
    calls = []

    class CountingCall(strategies.ResidualAddAdapterStrategy):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    block = _random_adapter_block("a")
    adapter = block.get_adapter_module("a")
    adapter.adapter_strategy = CountingCall()  # replaced by hand, after the dispatch cache was built
    x = torch.randn(3, D)
    with torch.no_grad():
        h = block.fc(x)
        torch.testing.assert_close(block(x), h + adapter(h))
    assert calls == [1]


def test_dispatch_sees_an_adapter_replaced_in_the_layer():
    block = _random_adapter_block("a")
    x = torch.randn(3, D)
    replacement = adapter_modules.LinearAdapter(D, 3)
    randomize_(replacement.parameters(), seed=99)
    block.adapter_layer["a"] = replacement
    with torch.no_grad():
        h = block.fc(x)
        torch.testing.assert_close(block(x), h + replacement(h))


def test_dispatch_runs_adapter_hooks():
    block = _random_adapter_block("a", "b")
    seen = []
    for name in ("a", "b"):
        block.get_adapter_module(name).register_forward_hook(lambda mod, args, out, name=name: seen.append(name))
    block(torch.randn(3, D))
    assert seen == ["a", "b"]


@pytest.mark.parametrize("fused", [False, True])
def test_residual_strategy_in_training_keeps_stochastic_depth_and_l2(fused):
    torch.manual_seed(0)
    block = Block()
    cfg = linear_cfg(adapter_strategy=strategies.ResidualAddAdapterStrategyConfig(stochastic_depth=0.5, l2_lambda=0.1))
    if fused:
        cfg = adapter_modules.FusedLinearAdapterConfig(**dataclasses.asdict(cfg))
    block.add_adapter("a", cfg=cfg)
    adapter = block.get_adapter_module("a")
    randomize_(adapter.parameters(), seed=4)
    block.train()
    x = torch.randn(16, D)
    h = block.fc(x).detach()
    with torch.no_grad():
        kept_delta = 2 * adapter(h)  # a kept adapter output is scaled by 1 / (1 - p)
    kept_loss = 0.1 * kept_delta.square().sum(dim=-1).mean()
    dropped = kept = 0
    for _ in range(40):
        delta = (block(x) - h).detach()
        (loss,) = adapter.get_module_registry(block)["adapter_layer.a"]["adapter_loss"]
        if torch.count_nonzero(delta) == 0:
            dropped += 1
            assert loss.item() == 0.0
        else:
            kept += 1
            torch.testing.assert_close(delta, kept_delta, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(loss.detach(), kept_loss, rtol=1e-4, atol=1e-6)
        adapter.reset_registry()
    assert dropped > 0 and kept > 0


def test_adapter_without_strategy_is_an_error():
    block = Block()
    block.add_adapter("a", cfg=linear_cfg())
    del block.adapter_layer["a"].adapter_strategy
    with pytest.raises(AttributeError, match="adapter_strategy"):
        block(torch.randn(2, D))


def test_accepted_adapter_types():
    block = Block()
    assert block.get_accepted_adapter_types() == set()
    block.set_accepted_adapter_types([adapter_modules.LinearAdapter])
    assert block.get_accepted_adapter_types() == {adapter_modules.LinearAdapter}
    block.add_adapter("ok", cfg=linear_cfg())  # subclasses such as FusedLinearAdapter are accepted too
    block.add_adapter("fused", cfg=adapter_modules.FusedLinearAdapterConfig(in_features=D, dim=4))
    with pytest.raises(ValueError, match="accepted adapter types"):
        block.check_supported_adapter_type_(OmegaConf.create({"_target_": "torch.nn.Linear"}))
    block.set_accepted_adapter_types(["torch.nn.Linear"])
    with pytest.raises(ValueError, match="accepted"):
        block.add_adapter("bad", cfg=linear_cfg())
    with pytest.raises(ValueError, match="not a subclass of torch.nn.Module"):
        block.set_accepted_adapter_types(["collections.OrderedDict"])
    assert block.get_enabled_adapters() == []  # existing adapters of other types are not run


def test_unfreeze_enabled_adapters_freezes_batchnorm():
    block = Block()
    block.add_adapter("a", cfg=linear_cfg())
    block.add_adapter("b", cfg=linear_cfg())
    block.set_enabled_adapters("b", enabled=False)
    for p in block.parameters():
        p.requires_grad_(False)
    block.unfreeze_enabled_adapters()
    trainable = {n for n, p in block.named_parameters() if p.requires_grad}
    assert trainable == {f"adapter_layer.a.{k}" for k, _ in block.adapter_layer["a"].named_parameters()}
    assert not block.bn.training and not block.bn.track_running_stats
    assert block.adapter_layer["a"].training

    block2 = Block()
    block2.add_adapter("a", cfg=linear_cfg())
    block2.unfreeze_enabled_adapters(freeze_batchnorm=False)
    assert block2.bn.weight.requires_grad and block2.bn.track_running_stats


def test_adapter_module_util_strategy_setup():
    adapter = adapter_modules.LinearAdapter(D, 4)
    assert isinstance(adapter.adapter_strategy, strategies.ResidualAddAdapterStrategy)
    adapter.setup_adapter_strategy(strategies.ReturnResultAdapterStrategyConfig())
    assert isinstance(adapter.adapter_strategy, strategies.ReturnResultAdapterStrategy)
    adapter.setup_adapter_strategy({"_target_": "fusedadapters.adapter_mixin_strategies.ResidualAddAdapterStrategy",
                                    "stochastic_depth": 0.25})
    assert adapter.adapter_strategy.stochastic_depth == 0.25
    kept = strategies.ResidualAddAdapterStrategy(l2_lambda=0.5)
    adapter.setup_adapter_strategy(kept)
    assert adapter.adapter_strategy is kept
    with pytest.raises(AttributeError, match="invalid"):
        adapter.setup_adapter_strategy(42)
    assert dataclasses.is_dataclass(adapter.get_default_strategy_config())
    for p in adapter.parameters():
        p.requires_grad_(False)
    adapter.adapter_unfreeze()
    assert all(p.requires_grad for p in adapter.parameters())


def test_registry():
    class Base(torch.nn.Module):
        pass

    class WithAdapters(Base, AdapterModuleMixin):
        pass

    class Unrelated(torch.nn.Module, AdapterModuleMixin):
        pass

    adapter_mixins.register_adapter(Base, WithAdapters)
    try:
        for key in (Base, WithAdapters):
            info = adapter_mixins.get_registered_adapter(key)
            assert isinstance(info, adapter_mixins.AdapterRegistryInfo)
            assert info.base_class is Base and info.adapter_class is WithAdapters
        assert adapter_mixins.get_registered_adapter(torch.nn.Linear) is None
        with pytest.raises(ValueError, match="already been added"):
            adapter_mixins.register_adapter(Base, WithAdapters)

        module = Base()
        cfg = OmegaConf.create({"net": {"_target_": f"{Base.__module__}.Base"}})
        adapter_mixins.update_module_class_with_adapter_class(module, cfg, verbose=False)
        assert type(module) is WithAdapters
        assert cfg.net._target_ == f"{WithAdapters.__module__}.WithAdapters"
    finally:
        adapter_mixins.ADAPTER_REGISTRY.pop(f"{Base.__module__}.{Base.__name__}", None)

    class Other(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="not a sub-class"):
        adapter_mixins.register_adapter(Other, Unrelated)


# The width a host hands its adapters, when its own layers tell it: a wrong adapter is refused when added.


class Wide(torch.nn.Module, AdapterModuleMixin):
    """Its two Linears disagree on the output width: the width its adapters see is unknown."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(D, 4 * D)
        self.down = torch.nn.Linear(4 * D, D)


class AdaptedLinear(torch.nn.Linear, AdapterModuleMixin):
    pass


@pytest.mark.parametrize(
    "make, width",
    [(Block, D), (Wide, None), (lambda: AdaptedLinear(7, 5), 5)],
    ids=["linear-and-batchnorm", "disagreeing-linears", "a-linear-itself"],
)
def test_adapter_input_features(make, width):
    assert make().adapter_input_features() == width


def test_adapter_of_another_width_is_refused_when_the_width_is_known():
    block = Block()
    with pytest.raises(ValueError, match=rf"adapter `a` has in_features={D + 1}.*width {D}\b.*adapter_input_features"):
        block.add_adapter("a", cfg=adapter_modules.LinearAdapterConfig(in_features=D + 1, dim=2))
    assert not block.is_adapter_available() and "adapter_cfg" not in block.__dict__
    linear = AdaptedLinear(7, 5)
    with pytest.raises(ValueError, match="width 5"):
        linear.add_adapter("a", cfg=adapter_modules.LinearAdapterConfig(in_features=7, dim=2))
    linear.add_adapter("a", cfg=adapter_modules.LinearAdapterConfig(in_features=5, dim=2))


def test_unknown_width_or_an_override_skips_the_check():
    Wide().add_adapter("a", cfg=adapter_modules.LinearAdapterConfig(in_features=3 * D, dim=2))

    class Declared(Block):
        def adapter_input_features(self):
            return None

    Declared().add_adapter("a", cfg=adapter_modules.LinearAdapterConfig(in_features=D + 1, dim=2))
