"""The NeMo tutorial, ported by changing imports (examples/adapter_tutorial.py), and what each step claims."""

import ast
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from fusedadapters import ModelPT, adapter_modules
from helpers import adapter_parameters, randomize_

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "adapter_tutorial.py"
DIM = 512  # the tutorial's size


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """Run the whole example once as module ``adapter_tutorial`` (it writes its files to the cwd)."""
    workdir = tmp_path_factory.mktemp("tutorial")
    spec = importlib.util.spec_from_file_location("adapter_tutorial", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["adapter_tutorial"] = module
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        spec.loader.exec_module(module)
    finally:
        os.chdir(cwd)
    module.workdir = workdir
    yield module
    sys.modules.pop("adapter_tutorial", None)


def test_example_imports_only_fusedadapters():
    tree = ast.parse(EXAMPLE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots == {"os", "torch", "omegaconf", "dataclasses", "typing", "fusedadapters"}


def test_example_ran_end_to_end_and_wrote_its_files(tutorial):
    full = tutorial.workdir / "full_model.nemo"
    adapters = tutorial.workdir / "adapters.pt"
    assert full.is_file() and adapters.is_file()
    # The adapter-only file is a small fraction of the full model file.
    assert adapters.stat().st_size < 0.05 * full.stat().st_size
    assert tutorial.model_2.get_enabled_adapters() == ["adapter_1"]
    assert tutorial.new_model.decoder.get_enabled_adapters() == ["adapter_1"]
    assert isinstance(tutorial.new_model, tutorial.SimpleModel)


def test_module_steps(tutorial):
    t = tutorial
    mlp = t.MLP(DIM)
    base = mlp.num_weights
    assert base == DIM * DIM + DIM + 2 * DIM

    mlp.add_adapter(name="adapter_1", cfg=adapter_modules.LinearAdapterConfig(in_features=DIM, dim=5))
    adapter_size = 2 * DIM + DIM * 5 + 5 * DIM  # LayerNorm, down, up (no biases)
    assert mlp.num_weights == base + adapter_size

    with pytest.raises(ValueError, match="adapter_1"):
        mlp.add_adapter(name="adapter_1", cfg=adapter_modules.LinearAdapterConfig(in_features=DIM, dim=10))
    assert mlp.num_weights == base + adapter_size

    assert mlp.get_enabled_adapters() == ["adapter_1"]
    mlp.set_enabled_adapters(enabled=False)
    assert mlp.get_enabled_adapters() == []
    mlp.set_enabled_adapters(name="adapter_1", enabled=True)
    assert mlp.get_enabled_adapters() == ["adapter_1"]
    assert mlp.is_adapter_available()

    # A fresh adapter is the identity under residual add; with random weights it is not.
    x = torch.randn(8, DIM)
    assert torch.equal(mlp.forward_enabled_adapters(x), x)
    assert randomize_(adapter_parameters(mlp, "adapter_1"), seed=0, std=0.2) == 4
    adapter = mlp.adapter_layer["adapter_1"]
    expected = x + adapter(x)
    torch.testing.assert_close(mlp.forward_enabled_adapters(x), expected)
    single = mlp.forward_single_enabled_adapter_(
        x, adapter, adapter_name="adapter_1", adapter_strategy=adapter.adapter_strategy
    )
    torch.testing.assert_close(single, expected)

    t.freeze(mlp)
    assert mlp.num_weights == 0
    mlp.unfreeze_enabled_adapters()
    assert mlp.num_weights == adapter_size


def test_multiplication_strategy(tutorial):
    t = tutorial
    simple = t.SimpleModuleAdapter(size=5)
    assert isinstance(simple.adapter_strategy, t.MultiplicationAdapterStrategy)
    x = torch.randn(3, 5)
    torch.testing.assert_close(simple(x), x)  # identity weights at init
    with torch.no_grad():
        simple.model[0].weight.copy_(torch.randn(5, 5))
    strategy = t.MultiplicationAdapterStrategy(scaling_factor=2.5)
    torch.testing.assert_close(strategy(input=x, adapter=simple, module=None), 2.5 * x * simple(x))


def test_model_steps(tutorial, tmp_path):
    t = tutorial
    plain = t.SimpleModel(t.get_model_config(DIM))
    plain_count = plain.num_weights
    # The plain model cannot take an adapter in its decoder.
    with pytest.raises((ValueError, AttributeError)):
        plain.add_adapter("decoder:adapter_1", cfg=adapter_modules.LinearAdapterConfig(in_features=DIM, dim=5))
    assert "adapters" not in plain.cfg and plain.num_weights == plain_count  # nothing half-added

    model = t.SimpleModel(t.get_adapter_model_config())
    assert model.num_weights == plain_count
    model.add_adapter("decoder:adapter_1", cfg=adapter_modules.LinearAdapterConfig(in_features=DIM, dim=5))
    per_layer = 2 * DIM + 2 * 5 * DIM
    assert model.num_weights == plain_count + 2 * per_layer  # two decoder layers
    assert not model.encoder.is_adapter_available()
    assert model.decoder.get_enabled_adapters() == ["adapter_1"]
    assert model.cfg.adapters.global_cfg.adapter_meta_cfg.modules.adapter_1 == "decoder"

    model.set_enabled_adapters(enabled=False)
    assert model.get_enabled_adapters() == []
    model.set_enabled_adapters("adapter_1", enabled=True)
    assert model.get_enabled_adapters() == ["adapter_1"]
    model.freeze()
    model.unfreeze_enabled_adapters()
    summary = model.summarize()
    assert summary.trainable_params == 2 * per_layer
    assert summary.frozen_params == plain_count
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_layer.adapter_1." in n for n in trainable)

    # Training touches only the enabled adapter's parameters.
    assert randomize_(adapter_parameters(model, "adapter_1"), seed=1, std=0.2) == 8
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(torch.randn(4, DIM)).square().mean()
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable

    # Full save/restore and adapter-only save/load give the same outputs.
    model.eval()
    x = torch.randn(8, DIM)
    with torch.no_grad():
        expected = model(x)
    model.save_to(tmp_path / "full_model.nemo")
    restored = ModelPT.restore_from(str(tmp_path / "full_model.nemo"), map_location="cpu")
    assert type(restored) is t.SimpleModel
    assert restored.decoder.get_enabled_adapters() == ["adapter_1"]
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)

    model.save_adapters(str(tmp_path / "adapters.pt"), name=None)
    model_2 = t.SimpleModel(t.get_adapter_model_config())
    model_2.load_state_dict({k: v for k, v in model.state_dict().items() if "adapter_layer" not in k})
    assert model_2.get_enabled_adapters() == []
    model_2.load_adapters(str(tmp_path / "adapters.pt"), name=None, map_location="cpu")
    model_2.freeze()
    model_2.unfreeze_enabled_adapters()
    assert model_2.summarize().trainable_params == 2 * per_layer
    assert model_2.get_enabled_adapters() == ["adapter_1"]
    with torch.no_grad():
        torch.testing.assert_close(model_2(x), expected, rtol=0, atol=0)
    assert (tmp_path / "adapters.pt").stat().st_size < 0.05 * (tmp_path / "full_model.nemo").stat().st_size
