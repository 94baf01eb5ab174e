"""Fused adapters in a NeMo ModelPT (the tutorial's model): adding them, fuse_adapters/unfuse_adapters,
save_to/restore_from, save_adapters/load_adapters, and a checkpoint restored by stock NeMo alone."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("nemo.core", reason='needs nemo-toolkit: pip install -e ".[test,nemo]"')

import torch  # noqa: E402
from nemo.collections.common.parts.adapter_modules import LinearAdapter, LinearAdapterConfig  # noqa: E402
from nemo.core.classes.mixins import adapter_mixin_strategies as nemo_strategies  # noqa: E402
from nemo.core.classes.mixins.access_mixins import AccessMixin  # noqa: E402

from fusedadapters.nemo import (  # noqa: E402
    FusedLinearAdapter,
    FusedLinearAdapterConfig,
    FusedResidualAddAdapterStrategy,
    fuse_adapters,
    unfuse_adapters,
)
from helpers import adapter_parameters, randomize_  # noqa: E402
import nemo_tutorial_model  # noqa: E402
from nemo_tutorial_model import TutorialModel, blocks, make_model, seeded_input  # noqa: E402

DIM = 29
LINEAR_PATH = "nemo.collections.common.parts.adapter_modules.LinearAdapter"
FUSED_PATH = "fusedadapters.nemo.FusedLinearAdapter"


@pytest.fixture(autouse=True)
def allow_tutorial_model(monkeypatch):
    """NeMo 3.0 restores only models whose class is in its allowlist; add the test model's module."""
    from nemo.core.classes import common

    monkeypatch.setattr(common, "ALLOWED_TARGET_PREFIXES", list(common.ALLOWED_TARGET_PREFIXES))
    nemo_tutorial_model.allow_this_module()


def adapter_modules_of(model):
    return [m for block in blocks(model) for m in getattr(block, "adapter_layer", {}).values()]


def model_full_of_nemo_adapters():
    """Encoder adapters ('' routes there), a post-norm decoder adapter with L2 and stochastic depth, and a
    disabled one; random non-zero weights everywhere."""
    model = make_model(DIM)
    model.add_adapter("enc", cfg=LinearAdapterConfig(in_features=DIM, dim=4))
    model.add_adapter("decoder:dec", cfg=LinearAdapterConfig(
        in_features=DIM, dim=6, activation="gelu", norm_position="post",
        adapter_strategy=nemo_strategies.ResidualAddAdapterStrategyConfig(stochastic_depth=0.2, l2_lambda=0.1)))
    model.add_adapter("decoder:off", cfg=LinearAdapterConfig(in_features=DIM, dim=3, activation="relu"))
    model.set_enabled_adapters("decoder:off", enabled=False)
    randomize_(model.parameters(), seed=3, std=0.3)
    return model


def test_fused_adapters_added_by_dict_by_config_and_through_accepted_types():
    reference = make_model(DIM, accepted_types=[LinearAdapter])
    reference.add_adapter("decoder:a", cfg=LinearAdapterConfig(in_features=DIM, dim=4, norm_position="post"))
    randomize_(reference.parameters(), seed=1)
    x = seeded_input(DIM)
    expected = reference.eval()(x)

    as_dict = {"_target_": FUSED_PATH, "in_features": DIM, "dim": 4, "norm_position": "post"}
    as_config = FusedLinearAdapterConfig(in_features=DIM, dim=4, norm_position="post")
    for accepted in ([], [LinearAdapter]):  # the second: blocks that accept only NeMo's LinearAdapter
        for cfg in (as_dict, as_config):
            model = make_model(DIM, accepted_types=accepted)
            model.add_adapter("decoder:a", cfg=cfg)
            model.load_state_dict(reference.state_dict())
            assert all(type(b.adapter_layer["a"]) is FusedLinearAdapter for b in model.decoder.layers)
            assert model.get_enabled_adapters() == ["a"]
            assert model.cfg.adapters.a._target_ == FUSED_PATH
            torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)

    # Accepted types set after the adapter was added: NeMo still finds it enabled.
    for block in model.decoder.layers:
        block.set_accepted_adapter_types([LinearAdapter])
        assert block.get_enabled_adapters() == ["a"]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_fuse_adapters_in_place_and_unfuse_back():
    model = model_full_of_nemo_adapters()
    model.train()
    model.decoder.layers[0].adapter_layer["dec"].eval()  # a mixed training state must survive
    x = seeded_input(DIM)

    def run_and_collect_losses():
        """The output, and what NeMo's training loop would collect: the access flags and the loss registry."""
        AccessMixin.reset_registry(model)
        torch.manual_seed(7)
        out = model(x)
        flags = (AccessMixin.is_access_enabled(), AccessMixin.is_access_enabled(model.model_guid))
        registry = {name: {key: [t.detach() for t in ts] for key, ts in entry.items()}
                    for name, entry in AccessMixin.get_module_registry(model).items()}
        AccessMixin.reset_registry(model)
        return out, flags, registry

    expected, expected_flags, expected_losses = run_and_collect_losses()
    assert sorted(expected_losses) == ["decoder.layers.0.adapter_layer.dec", "decoder.layers.1.adapter_layer.dec"]
    named_params = [(name, id(p), p.dtype, p.device) for name, p in model.named_parameters()]
    before = {name: (m.training, m.adapter_strategy.__dict__.copy()) for name, m in model.named_modules()
              if isinstance(m, LinearAdapter)}

    assert fuse_adapters(model) == 3 + 2 * 2  # 'enc' in 3 encoder blocks; 'dec' and 'off' in 2 decoder blocks

    fused = {name: m for name, m in model.named_modules() if isinstance(m, LinearAdapter)}
    assert fused.keys() == before.keys() and all(type(m) is FusedLinearAdapter for m in fused.values())
    for name, module in fused.items():
        training, strategy_state = before[name]
        assert module.training == training and module.adapter_strategy.__dict__ == strategy_state
        assert type(module.adapter_strategy) is FusedResidualAddAdapterStrategy
    assert [(n, id(p), p.dtype, p.device) for n, p in model.named_parameters()] == named_params
    assert model.get_enabled_adapters() == ["enc", "dec"]
    assert {name: cfg._target_ for name, cfg in model.cfg.adapters.items() if name != "global_cfg"} == {
        "enc": FUSED_PATH, "dec": FUSED_PATH, "off": FUSED_PATH}
    assert model.cfg.adapters.dec.adapter_strategy._target_.startswith("nemo.")  # strategies stay NeMo's
    out, flags, losses = run_and_collect_losses()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert flags == expected_flags and losses.keys() == expected_losses.keys()
    for name in losses:
        torch.testing.assert_close(losses[name], expected_losses[name], rtol=1e-5, atol=1e-7, msg=name)
    assert fuse_adapters(model) == 0  # nothing left to fuse

    assert unfuse_adapters(model) == 7
    unfused = {name: m for name, m in model.named_modules() if isinstance(m, LinearAdapter)}
    assert all(type(m) is LinearAdapter and "activation" not in vars(m) for m in unfused.values())
    assert all(type(m.adapter_strategy) is nemo_strategies.ResidualAddAdapterStrategy for m in unfused.values())
    assert model.cfg.adapters.enc._target_ == LINEAR_PATH
    assert [(n, id(p), p.dtype, p.device) for n, p in model.named_parameters()] == named_params
    torch.testing.assert_close(run_and_collect_losses()[0], expected, rtol=0, atol=0)


def test_fuse_adapters_in_a_plain_module():
    from nemo_tutorial_model import MLP

    stack = torch.nn.Sequential(MLP(DIM), MLP(DIM))
    for block in stack:
        block.add_adapter("a", cfg=LinearAdapterConfig(in_features=DIM, dim=5, activation="selu"))
    randomize_(stack.parameters(), seed=2)
    x = seeded_input(DIM)
    expected = stack(x)
    assert fuse_adapters(stack) == 2
    assert all(block.adapter_cfg.a._target_ == FUSED_PATH for block in stack)
    torch.testing.assert_close(stack(x), expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="not the adapter itself"):
        fuse_adapters(LinearAdapter(DIM, 3))


def test_fuse_adapters_refuses_an_activation_the_op_does_not_compute_and_changes_nothing():
    model = model_full_of_nemo_adapters()
    model.decoder.layers[1].adapter_layer["dec"].module[1] = torch.nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="decoder.layers.1.adapter_layer.dec"):
        fuse_adapters(model)
    assert all(type(m) is LinearAdapter for m in adapter_modules_of(model))
    assert model.cfg.adapters.enc._target_ == LINEAR_PATH


@pytest.mark.parametrize("fused_by", ["config", "fuse_adapters"])
def test_save_to_and_restore_from_with_fused_adapters(tmp_path, fused_by):
    if fused_by == "config":
        model = make_model(DIM)
        model.add_adapter("decoder:a", cfg=FusedLinearAdapterConfig(in_features=DIM, dim=4, activation="silu"))
        model.add_adapter("enc", cfg=FusedLinearAdapterConfig(in_features=DIM, dim=3, norm_position="post"))
        randomize_(model.parameters(), seed=4)
    else:
        model = model_full_of_nemo_adapters()
        fuse_adapters(model)
    x = seeded_input(DIM)
    expected = model.eval()(x)
    model.save_to(str(tmp_path / "model.nemo"))

    restored = TutorialModel.restore_from(str(tmp_path / "model.nemo"), map_location="cpu")
    assert [type(m) for m in adapter_modules_of(restored)] == [FusedLinearAdapter] * len(adapter_modules_of(model))
    assert restored.get_enabled_adapters() == model.get_enabled_adapters()
    torch.testing.assert_close(restored.eval()(x), expected, rtol=0, atol=0)


def test_save_adapters_and_load_adapters(tmp_path, monkeypatch):
    # NeMo 3.0 pickles adapter files and reads them with torch.load, which refuses pickles by default
    # since torch 2.6; NeMo's documented way round it is this variable (trusted files only).
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    model = make_model(DIM)
    model.add_adapter("decoder:a", cfg=FusedLinearAdapterConfig(in_features=DIM, dim=4, activation="gelu"))
    randomize_(adapter_parameters(model), seed=5)
    x = seeded_input(DIM)
    expected = model.eval()(x)
    model.save_adapters(str(tmp_path / "adapters.pt"))

    other = make_model(DIM)
    other.load_state_dict({k: v for k, v in model.state_dict().items() if "adapter_layer" not in k})
    other.load_adapters(str(tmp_path / "adapters.pt"), map_location="cpu")
    assert [type(m) for m in adapter_modules_of(other)] == [FusedLinearAdapter] * 2
    torch.testing.assert_close(other.eval()(x), expected, rtol=0, atol=0)


STOCK_NEMO_RESTORE = textwrap.dedent(
    """
    import json, sys
    sys.modules["fusedadapters"] = None  # any import of this package now fails: stock NeMo only
    sys.path.insert(0, sys.argv[1])
    import torch
    import nemo_tutorial_model
    from nemo.collections.common.parts.adapter_modules import LinearAdapter
    from nemo_tutorial_model import TutorialModel, blocks

    nemo_tutorial_model.allow_this_module()
    restored = TutorialModel.restore_from(sys.argv[2], map_location="cpu").eval()
    x, expected = torch.load(sys.argv[3])
    out = restored(x)
    print(json.dumps({
        "adapter_types": sorted({type(m).__name__ for b in blocks(restored) for m in b.adapter_layer.values()}),
        "enabled": restored.get_enabled_adapters(),
        "max_abs_diff": (out - expected).abs().max().item(),
        "fusedadapters_loaded": any(name.startswith("fusedadapters") and mod is not None
                                    for name, mod in sys.modules.items()),
    }))
    """
)


def test_unfuse_save_then_restore_in_stock_nemo_without_fusedadapters(tmp_path):
    model = model_full_of_nemo_adapters()
    assert fuse_adapters(model) == 7
    model.eval()
    x = seeded_input(DIM)
    expected = model(x)
    assert unfuse_adapters(model) == 7
    model.save_to(str(tmp_path / "model.nemo"))
    torch.save((x, expected.detach()), tmp_path / "io.pt")

    result = subprocess.run(
        [sys.executable, "-c", STOCK_NEMO_RESTORE, str(Path(__file__).parent), str(tmp_path / "model.nemo"),
         str(tmp_path / "io.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"adapter_types": ["LinearAdapter"], "enabled": ["enc", "dec"], "max_abs_diff": 0.0,
                      "fusedadapters_loaded": False}
