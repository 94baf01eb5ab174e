"""The README's examples run as written, and say what the code does."""

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fusedadapters.adapter_modules import FusedLinearAdapter, LinearAdapter, LinearAdapterConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _block(containing: str) -> str:
    (block,) = [b for b in BLOCKS if containing in b]
    return block


@pytest.fixture
def first_example():
    namespace = {}
    exec(compile(_block("class Block("), "README.md", "exec"), namespace)
    return namespace


def test_first_example_freezes_the_base_and_trains_only_the_adapter(first_example):
    block = first_example["block"]
    trainable = {name for name, p in block.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("adapter_layer.adapter_1.") for name in trainable)
    assert not block.fc.weight.requires_grad and not block.fc.bias.requires_grad
    optimized = {id(p) for group in first_example["optimizer"].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in block.parameters() if p.requires_grad}


def test_model_example_holds_its_adapters_in_its_module(first_example, tmp_path, caplog):
    namespace = dict(first_example)
    exec(compile(_block("class MyModel("), "README.md", "exec"), namespace)
    caplog.set_level("WARNING", logger="fusedadapters")
    model = namespace["MyModel"](OmegaConf.create({"dim": 32}))
    model.add_adapter("adapter_1", cfg=LinearAdapterConfig(in_features=32, dim=4))
    assert model.get_enabled_adapters() == ["adapter_1"] and model.is_adapter_available()
    assert model.encoder.get_adapter_module("adapter_1") is not None and "no module" not in caplog.text
    with torch.no_grad():
        for p in model.encoder.get_adapter_module("adapter_1").parameters():
            p.normal_()
    path = tmp_path / "adapters.safetensors"
    model.save_adapters(str(path))
    fresh = namespace["MyModel"](OmegaConf.create({"dim": 32}))
    fresh.encoder.load_state_dict(model.encoder.state_dict(), strict=False)
    fresh.load_adapters(str(path))
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    model.set_enabled_adapters("adapter_1", enabled=False)
    assert model.get_enabled_adapters() == []


def test_dtype_behaviour_is_as_the_readme_says():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        LinearAdapter(8, 2)(x)  # eager: the parameters' dtype
    assert LinearAdapter(8, 2).to(torch.bfloat16)(x).dtype == torch.bfloat16
    assert FusedLinearAdapter(8, 2)(x).dtype == torch.bfloat16  # fused: weights cast to the input's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LinearAdapter(8, 2)(x.float()).dtype == torch.bfloat16
        assert FusedLinearAdapter(8, 2)(x.float()).dtype == torch.bfloat16
    assert "casts its weights to the input's dtype" in README and "computes in its parameters'\ndtype" in README


def test_readme_names_the_console_script_and_the_design_document():
    assert "`fusedadapters-demo`" in README and "docs/design.md" in README
