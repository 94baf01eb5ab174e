"""Adapter strategies (return-result, residual add with stochastic depth and L2 loss) and AccessMixin."""

import pytest
import torch
from omegaconf import OmegaConf

from fusedadapters import AccessMixin
from fusedadapters import adapter_mixin_strategies as strategies
from fusedadapters.adapter_mixins import AdapterModuleMixin
from fusedadapters.adapter_modules import FusedLinearAdapter, LinearAdapter
from helpers import randomize_

D, H = 10, 3


class Host(torch.nn.Module, AdapterModuleMixin):
    def forward(self, x):
        return self.forward_enabled_adapters(x) if self.is_adapter_available() else x


def random_adapter(cls=LinearAdapter, seed=0, **kwargs):
    adapter = cls(D, H, **kwargs)
    randomize_(adapter.parameters(), seed=seed, std=0.4)
    return adapter


def test_return_result_unpacks_inputs():
    adapter = random_adapter()
    strategy = strategies.ReturnResultAdapterStrategy()
    x = torch.randn(4, D)
    torch.testing.assert_close(strategy(x, adapter, module=Host()), adapter(x))

    class TwoInputs(torch.nn.Module):
        def forward(self, a, b):
            return a - b

    a, b = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(strategy((a, b), TwoInputs(), module=None), a - b)
    torch.testing.assert_close(strategy({"a": a, "b": b}, TwoInputs(), module=None), a - b)


@pytest.mark.parametrize("cls", [LinearAdapter, FusedLinearAdapter])
def test_residual_add(cls):
    adapter = random_adapter(cls)
    x = torch.randn(2, 5, D)
    out = strategies.ResidualAddAdapterStrategy()(x, adapter, module=Host())
    torch.testing.assert_close(out, x + adapter(x))
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("cls", [LinearAdapter, FusedLinearAdapter])
def test_stochastic_depth_drops_whole_output_and_rescales(cls):
    adapter = random_adapter(cls)
    strategy = strategies.ResidualAddAdapterStrategy(stochastic_depth=0.5)
    host = Host().train()
    x = torch.randn(4, D)
    delta = adapter(x)
    seen = set()
    for _ in range(40):
        out = strategy(x, adapter, module=host)
        if torch.allclose(out, x):
            seen.add("dropped")
        else:
            torch.testing.assert_close(out, x + 2.0 * delta)
            seen.add("kept")
    assert seen == {"dropped", "kept"}
    host.eval()
    torch.testing.assert_close(strategy(x, adapter, module=host), x + delta)  # no rescale in eval


def test_stochastic_depth_same_draws_on_fused_and_eager_paths():
    eager, fused = random_adapter(LinearAdapter), random_adapter(FusedLinearAdapter)
    strategy = strategies.ResidualAddAdapterStrategy(stochastic_depth=0.3)
    host = Host().train()
    x = torch.randn(6, D)
    torch.manual_seed(5)
    a = [strategy(x, eager, module=host) for _ in range(8)]
    torch.manual_seed(5)
    b = [strategy(x, fused, module=host) for _ in range(8)]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("cls", [LinearAdapter, FusedLinearAdapter])
def test_l2_loss_is_registered_in_training(cls):
    lam = 0.7
    host = Host()
    adapter = random_adapter(cls, adapter_strategy=strategies.ResidualAddAdapterStrategyConfig(l2_lambda=lam))
    host.adapter_layer = torch.nn.ModuleDict({"a": adapter})
    host.adapter_cfg = OmegaConf.create({"a": {"enabled": True}})
    x = torch.randn(3, 4, D)
    host.train()
    host(x)
    registry = AccessMixin.get_module_registry(host)
    (losses,) = registry["adapter_layer.a"]["adapter_loss"]
    expected = lam * adapter(x).square().reshape(3, -1).sum(-1).mean()
    torch.testing.assert_close(losses, expected)
    losses.backward()  # the loss trains the adapter
    assert adapter.module[-1].weight.grad is not None and adapter.module[-1].weight.grad.abs().sum() > 0

    AccessMixin.reset_registry(host)
    assert AccessMixin.get_module_registry(host) == {}
    host.eval()
    host(x)
    assert AccessMixin.get_module_registry(host) == {}  # not in eval
    host.train()
    adapter.requires_grad_(False)
    host(x)
    assert AccessMixin.get_module_registry(host) == {}  # not for a frozen adapter
    AccessMixin.reset_registry(host)


def test_access_cfg_detach_and_registry_keys():
    class Probe(torch.nn.Module, AccessMixin):
        pass

    root = torch.nn.Sequential(Probe(), Probe())
    t = torch.randn(2, requires_grad=True)
    AccessMixin.update_access_cfg({"detach": True})
    try:
        root[1].register_accessible_tensor("feat", t * 2)
        reg = AccessMixin.get_module_registry(root)
        assert list(reg) == ["1"] and not reg["1"]["feat"][0].requires_grad
        torch.testing.assert_close(reg["1"]["feat"][0], (t * 2).detach())
        AccessMixin.set_access_enabled(True)
        assert AccessMixin.is_access_enabled()
        AccessMixin.reset_registry(root)
        assert AccessMixin.get_module_registry(root) == {} and not AccessMixin.is_access_enabled()
    finally:
        AccessMixin.update_access_cfg({"detach": False})


def test_user_strategy_works_with_fused_adapter_nemo_style_call():
    class Multiply(strategies.AbstractAdapterStrategy):
        def __init__(self, scale=1.0):
            super().__init__()
            self.scale = scale

        def forward(self, input, adapter, *, module):
            return self.scale * input * adapter(input)

    fused, eager = random_adapter(FusedLinearAdapter), random_adapter(LinearAdapter)
    x = torch.randn(3, D)
    strategy = Multiply(1.5)
    torch.testing.assert_close(strategy(x, fused, module=None), strategy(x, eager, module=None))
    torch.testing.assert_close(strategy(x, fused, module=None), 1.5 * x * eager(x))


def test_overridden_step_is_not_fused_away():
    class Doubled(strategies.ResidualAddAdapterStrategy):
        def compute_output(self, input, adapter, *, module):
            return 2 * adapter(input)

    fused = random_adapter(FusedLinearAdapter)
    x = torch.randn(3, D)
    torch.testing.assert_close(Doubled()(x, fused, module=Host()), x + 2 * fused(x))


def test_abstract_strategy_needs_forward():
    class Empty(strategies.AbstractAdapterStrategy):
        pass

    with pytest.raises(NotImplementedError, match="Empty"):
        Empty()(torch.zeros(1), torch.nn.Identity(), module=None)
