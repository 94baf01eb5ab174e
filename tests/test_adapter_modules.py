"""LinearAdapter (eager) and FusedLinearAdapter against the reference op, NeMo's keys and configs."""

import dataclasses
import inspect

import pytest
import torch

from fusedadapters import ops
from fusedadapters.adapter_modules import (
    FusedLinearAdapter,
    FusedLinearAdapterConfig,
    LinearAdapter,
    LinearAdapterConfig,
)
from fusedadapters.ops.reference import ACTIVATIONS
from fusedadapters.utils import instantiate
from helpers import randomize_

D, H = 19, 5


def randomize(module, seed=0):
    randomize_(module.parameters(), seed=seed, std=0.5, mean=0.25)
    return module


def weights(adapter):
    if adapter.norm_position == "pre":
        norm, down, up = adapter.module[0], adapter.module[1], adapter.module[3]
    else:
        norm, down, up = adapter.module[3], adapter.module[0], adapter.module[2]
    return norm.weight, norm.bias, down.weight, up.weight


def test_state_dict_keys_match_nemo():
    assert list(LinearAdapter(D, H).state_dict()) == ["module.0.weight", "module.0.bias", "module.1.weight", "module.3.weight"]
    assert list(LinearAdapter(D, H, norm_position="post").state_dict()) == [
        "module.0.weight", "module.2.weight", "module.3.weight", "module.3.bias"
    ]
    for norm_position in ("pre", "post"):
        assert list(FusedLinearAdapter(D, H, norm_position=norm_position).state_dict()) == list(
            LinearAdapter(D, H, norm_position=norm_position).state_dict()
        )


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_last_layer_starts_at_zero_so_the_adapter_starts_as_identity(norm_position):
    adapter = LinearAdapter(D, H, norm_position=norm_position)
    last = adapter.module[-1]
    assert torch.count_nonzero(last.weight) == 0
    x = torch.randn(3, D)
    assert torch.count_nonzero(adapter(x)) == 0


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_adapter_matches_reference_in_float64(activation, norm_position):
    adapter = randomize(LinearAdapter(D, H, activation=activation, norm_position=norm_position)).double()
    x = torch.randn(2, 7, D, dtype=torch.float64) * 2
    expected, _ = ops.reference.linear_adapter(
        x, *weights(adapter), activation=activation, norm_position=norm_position, residual=False
    )
    torch.testing.assert_close(adapter(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_fused_adapter_loads_linear_adapter_checkpoint_and_matches(norm_position):
    eager = randomize(LinearAdapter(D, H, activation="gelu", norm_position=norm_position, dropout=0.3))
    fused = FusedLinearAdapter(D, H, activation="gelu", norm_position=norm_position, dropout=0.3)
    fused.load_state_dict(eager.state_dict())
    eager.eval()
    fused.eval()
    x = torch.randn(4, 3, D)
    torch.testing.assert_close(fused(x), eager(x))
    out, row_sq = fused.fused_residual_forward(x, return_row_sq=True)
    torch.testing.assert_close(out, x + eager(x))
    torch.testing.assert_close(row_sq, eager(x).square().sum(-1))


def test_fused_adapter_from_linear_adapter_config_with_target_changed():
    cfg = dataclasses.asdict(LinearAdapterConfig(in_features=D, dim=H, activation="relu"))
    cfg["_target_"] = FusedLinearAdapterConfig._target_
    adapter = instantiate(cfg)
    assert type(adapter) is FusedLinearAdapter and adapter.activation == "relu"


def test_fused_adapter_dropout_in_training_is_reproducible_and_drops():
    fused = randomize(FusedLinearAdapter(D, H, dropout=0.5)).train()
    x = torch.randn(64, D)
    torch.manual_seed(3)
    a = fused(x)
    torch.manual_seed(3)
    b = fused(x)
    torch.testing.assert_close(a, b)
    fused.eval()
    full = fused(x)
    kept = a != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(a[kept], 2.0 * full[kept])


def test_fused_adapter_autocast_runs_in_the_autocast_dtype():
    fused = randomize(FusedLinearAdapter(D, H))
    x = torch.randn(3, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fused(x), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("cls", [LinearAdapter, FusedLinearAdapter])
def test_input_shape_mismatch_names_the_shapes(cls):
    adapter = cls(D, H)
    with pytest.raises(ValueError, match=rf"in_features={D}.*\(2, 7\)"):
        adapter(torch.randn(2, 7))


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        LinearAdapter(D, H, activation="tanh")
    with pytest.raises(ValueError, match="norm_position"):
        LinearAdapter(D, H, norm_position="middle")
    with pytest.raises(ValueError, match="dropout"):
        LinearAdapter(D, H, dropout=1.5)


@pytest.mark.parametrize("config, cls", [(LinearAdapterConfig, LinearAdapter), (FusedLinearAdapterConfig, FusedLinearAdapter)])
def test_config_fields_match_the_constructor(config, cls):
    fields = {f.name: f for f in dataclasses.fields(config)}
    params = inspect.signature(cls.__init__).parameters
    assert set(fields) - {"_target_"} == set(params) - {"self"}
    for name, param in params.items():
        if name == "self" or param.default is inspect.Parameter.empty:
            continue
        if name != "adapter_strategy":
            assert fields[name].default == param.default
    assert instantiate(config(in_features=D, dim=H)).__class__ is cls
