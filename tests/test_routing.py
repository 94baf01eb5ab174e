"""``fusedadapters.route_adapters``: a routed batch equals running each sample alone with only its adapter.

Two blocks of the tutorial's ``MLP``; block 0 holds adapters a, b and block 1 holds b, c (so a module
without a sample's adapter must pass it through). Every adapter gets random non-zero weights; outputs
and the gradients of the input and of every parameter are compared. The fused path (FusedLinearAdapter)
runs on the reference backend here and on the triton backend (interpreter on CPU, CUDA when present).
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from fusedadapters import (
    AccessMixin,
    FusedLinearAdapterConfig,
    LinearAdapterConfig,
    ResidualAddAdapterStrategyConfig,
    ops,
    route_adapters,
)
from fusedadapters import routing
from fusedadapters import demo
from fusedadapters.demo import MLP
from fusedadapters.ops import backend as backend_mod
from helpers import adapter_parameters, randomize_

D = 12
HOLDINGS = ({"a": 5, "b": 8}, {"b": 3, "c": 7})  # per block: adapter name -> hidden size


def make_model(config_cls=FusedLinearAdapterConfig, seed: int = 0, **adapter_kw) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(MLP(D), MLP(D))
    for block, held in zip(model, HOLDINGS):
        for name, h in held.items():
            block.add_adapter(name, config_cls(in_features=D, dim=h, **adapter_kw))
    randomize_(adapter_parameters(model), seed=seed + 1)
    return model


def enable_only(model: nn.Module, name) -> None:
    for block in model:
        block.set_enabled_adapters(enabled=False)
        if name is not None and name in block.adapter_layer:
            block.set_enabled_adapters(name, True)


def loss_of(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (out.double() * weights).sum()


def grads_of(model: nn.Module, x: torch.Tensor) -> dict:
    named = {"x": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    return {n: (torch.zeros(()) if g is None else g.detach().clone()) for n, g in named.items()}


def run_alone(model, x, names, weights):
    """Sample by sample, only its adapter enabled; gradients accumulate over the samples."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    outs = []
    for i, name in enumerate(names):
        enable_only(model, name)
        out = model(x[i : i + 1])
        loss_of(out, weights[i : i + 1]).backward()
        outs.append(out.detach())
    return torch.cat(outs), grads_of(model, x)


def run_routed(model, x, names, weights):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    with route_adapters(model, names):
        out = model(x)
    loss_of(out, weights).backward()
    return out.detach(), grads_of(model, x)


def assert_same(a, b, tol=1e-5):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=tol, atol=tol, msg=name)


BATCHES = {
    "mixed": ["a", None, "c", "b", "a", "c", "b"],
    "single_sample": ["b"],
    "all_on_one": ["c"] * 4,
    "none_for_all": [None] * 3,
    "empty_segment": ["a", "a", None],  # b and c get no sample
}


@pytest.mark.parametrize("config_cls", [LinearAdapterConfig, FusedLinearAdapterConfig], ids=["generic", "fused"])
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_routed_equals_each_sample_alone(config_cls, batch, norm_position):
    names = BATCHES[batch]
    model = make_model(config_cls, norm_position=norm_position, activation="gelu")
    x = torch.randn(len(names), 3, D)
    weights = torch.randn(len(names), 3, D, dtype=torch.float64)
    routed = run_routed(model, x, names, weights)
    alone = run_alone(model, x, names, weights)
    assert_same(routed, alone)
    for qualified, grad in routed[1].items():  # adapters no sample chose get no gradient
        if ".adapter_layer." in qualified and qualified.split(".")[2] not in names:
            assert float(grad.abs().sum()) == 0.0, qualified


@pytest.mark.skipif(not backend_mod.triton_available(), reason="needs triton")
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_routed_triton_backend_equals_each_sample_alone(monkeypatch, norm_position):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not backend_mod.triton_interpreter_enabled():
        pytest.skip("triton on the CPU needs TRITON_INTERPRET=1")
    monkeypatch.setattr(ops.routed_adapter.__globals__["reference_multi"], "routed_adapter", _must_not_run)
    names = BATCHES["mixed"]
    model = make_model(norm_position=norm_position).to(device)
    for block in model:
        for adapter in block.adapter_layer.values():
            adapter.backend = "triton"
    x = torch.randn(len(names), 2, D, device=device)
    weights = torch.randn(len(names), 2, D, dtype=torch.float64, device=device)
    assert_same(run_routed(model, x, names, weights), run_alone(model, x, names, weights), tol=1e-4)


def _must_not_run(*args, **kwargs):
    raise AssertionError("the reference ran where the triton backend should")


def test_fused_path_is_one_routed_launch_per_module(monkeypatch):
    calls = []
    real = routing.ops.routed_adapter
    monkeypatch.setattr(routing.ops, "routed_adapter", lambda *a, **k: calls.append(a[2].shape) or real(*a, **k))
    model = make_model()
    with route_adapters(model, BATCHES["mixed"]):
        model(torch.randn(7, D))
    assert len(calls) == 2  # one per block, whatever the number of adapters


@pytest.mark.parametrize("config_cls", [LinearAdapterConfig, FusedLinearAdapterConfig], ids=["generic", "fused"])
def test_a_batch_on_one_adapter_runs_it_as_the_only_enabled_one(monkeypatch, config_cls):
    """Every sample on adapter c: each module runs c as if it were the only one enabled (the same
    result, bit for bit), without the routed op or the gather and scatter."""
    model = make_model(config_cls)
    x = torch.randn(4, 3, D)
    enable_only(model, "c")
    want = model(x)
    for block in model:
        block.set_enabled_adapters(enabled=True)
    monkeypatch.setattr(routing.ops, "routed_adapter", _must_not_run)
    monkeypatch.setattr(torch.Tensor, "index_copy", _must_not_run)
    with route_adapters(model, ["c"] * 4):
        got = model(x)
    assert torch.equal(got, want)


def test_routing_ignores_enabled_flags_and_restores_them():
    model = make_model()
    for block in model:
        block.set_enabled_adapters(enabled=False)
    x = torch.randn(4, D)
    with torch.no_grad():
        plain = model(x)
        with route_adapters(model, ["a", "a", "b", "c"]):
            routed = model(x)
        after = model(x)
    assert not torch.allclose(routed, plain)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)
    assert routing.ACTIVE_ROUTES.get() is None
    assert [b.get_enabled_adapters() for b in model] == [[], []]


def test_unknown_names_and_size_mismatch_raise_before_compute_and_change_nothing(monkeypatch):
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    monkeypatch.setattr(MLP, "forward", lambda self, x: calls.append(1))
    with pytest.raises(ValueError, match="'nope'.*'zzz'"):
        with route_adapters(model, ["a", "nope", None, "zzz"]):
            model(torch.randn(4, D))
    assert calls == [] and routing.ACTIVE_ROUTES.get() is None
    with pytest.raises(TypeError, match="strings or None"):
        with route_adapters(model, ["a", 3]):
            pass
    monkeypatch.undo()
    x = torch.randn(5, D, requires_grad=True)
    with pytest.raises(ValueError, match=r"3 names.*leading dimension 5"):
        with route_adapters(model, ["a", "b", "c"]):
            model(x)
    assert routing.ACTIVE_ROUTES.get() is None
    assert x.grad is None and all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_nested_routes_inner_wins_and_outer_comes_back():
    model = make_model()
    x = torch.randn(3, D)
    with torch.no_grad():
        with route_adapters(model, ["a", "a", "a"]):
            with route_adapters(model[1], ["c", None, "b"]):
                nested = model(x)
            outer_again = model(x)
        with route_adapters(model, ["a", "a", "a"]):
            outer = model(x)
        enable_only(model, "a")
        h = model[0](x)
        enable_only(model, None)
        expected_tail = []
        for i, name in enumerate(["c", None, "b"]):
            enable_only(model[1:], name)
            expected_tail.append(model[1](h[i : i + 1]))
    torch.testing.assert_close(outer_again, outer, rtol=0, atol=0)
    torch.testing.assert_close(nested, torch.cat(expected_tail), rtol=1e-5, atol=1e-5)


def test_routes_do_not_leak_into_other_threads():
    model = make_model()
    x = torch.randn(2, D)
    with torch.no_grad():
        enable_only(model, None)
        plain = model(x)
        seen = {}
        with route_adapters(model, ["a", "b"]):
            worker = threading.Thread(target=lambda: seen.setdefault("out", model(x)))
            worker.start()
            worker.join()
    torch.testing.assert_close(seen["out"], plain, rtol=0, atol=0)


def registry_snapshot(model: nn.Module) -> dict:
    """A copy of the tensors registered under ``model`` (the live registry is cleared here)."""
    snapshot = {k: {name: list(ts) for name, ts in v.items()} for k, v in AccessMixin.get_module_registry(model).items()}
    AccessMixin.reset_registry(model)
    return snapshot


@pytest.mark.parametrize("config_cls", [LinearAdapterConfig, FusedLinearAdapterConfig], ids=["generic", "fused"])
def test_training_l2_loss_and_stochastic_depth_per_adapter(config_cls):
    """In training, each adapter's L2 loss is the one of its own samples run as a batch with only that
    adapter enabled; stochastic depth 1 (always dropped) on c drops only c's output."""
    names = ["a", "b", "a", None, "c", "b"]
    strategies = {n: ResidualAddAdapterStrategyConfig(l2_lambda=0.5, stochastic_depth=1.0 if n == "c" else 0.0) for n in "abc"}
    model = make_model(config_cls)
    for block in model:
        for name, adapter in block.adapter_layer.items():
            adapter.setup_adapter_strategy(strategies[name])
    model.train()
    x = torch.randn(len(names), 2, D)
    with route_adapters(model, names):
        out = model(x)
    routed = registry_snapshot(model)
    for name in "abc":
        chosen = [k for k, n in enumerate(names) if n == name]
        enable_only(model, name)
        model(x[chosen])
        alone = registry_snapshot(model)
        for key, tensors in alone.items():
            (expected,) = tensors["adapter_loss"]
            (got,) = routed.pop(key)["adapter_loss"]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=key)
            assert (float(got.detach()) == 0.0) == (name == "c"), key
    assert routed == {}  # no other adapter registered a loss
    alone_out, _ = run_alone(model, x, names, torch.ones(len(names), 2, D, dtype=torch.float64))
    torch.testing.assert_close(out.detach(), alone_out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Fused chains: consecutive fused adapters of one module run as one ops.adapter_chain
# ---------------------------------------------------------------------------------------------

CHAIN = (  # name, fused?, options: H differs everywhere; a b share a launch, c (post) its own;
    ("a", True, dict(dim=5)),  # d (not fused) splits the chain; e f share a launch
    ("b", True, dict(dim=8)),
    ("c", True, dict(dim=4, norm_position="post", activation="gelu")),
    ("d", False, dict(dim=6)),
    ("e", True, dict(dim=3, norm_position="post", activation="relu")),
    ("f", True, dict(dim=7, norm_position="post", activation="relu")),
)


def make_chain_pair(strategy=None, backend=None, device="cpu"):
    """The same block twice: its adapters fused where CHAIN says so, and all eager (one by one)."""
    models = []
    for fused_where_said in (True, False):
        torch.manual_seed(0)
        block = MLP(D)
        for name, fused, options in CHAIN:
            config_cls = FusedLinearAdapterConfig if fused and fused_where_said else LinearAdapterConfig
            block.add_adapter(name, config_cls(in_features=D, **options))
        if strategy is not None:
            for name, adapter in block.adapter_layer.items():
                adapter.setup_adapter_strategy(strategy(name))
        models.append(block.to(device))
    randomize_(adapter_parameters(models[0]), seed=5)
    models[1].load_state_dict(models[0].state_dict())
    if backend is not None:
        for adapter in models[0].adapter_layer.values():
            if hasattr(adapter, "backend"):
                adapter.backend = backend
    return models


def run_block(block, x, weights):
    block.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = block(x)
    loss_of(out, weights).backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in block.named_parameters() if p.requires_grad}}
    return out.detach(), {n: g.detach().clone() for n, g in grads.items()}


def test_chain_of_fused_adapters_is_one_op_and_equals_one_by_one(monkeypatch):
    calls = []
    real = routing.ops.adapter_chain
    monkeypatch.setattr(routing.ops, "adapter_chain", lambda x, params, **k: calls.append(len(params)) or real(x, params, **k))
    fused, eager = make_chain_pair()
    x = torch.randn(3, 5, D)
    weights = torch.randn(3, 5, D, dtype=torch.float64)
    assert_same(run_block(fused, x, weights), run_block(eager, x, weights))
    assert calls == [3, 2]  # a b c | d alone | e f


def test_chain_in_training_with_l2_loss_stochastic_depth_and_a_frozen_adapter():
    def strategy(name):
        return ResidualAddAdapterStrategyConfig(l2_lambda=0.3, stochastic_depth=1.0 if name == "b" else 0.0)

    fused, eager = make_chain_pair(strategy)
    for block in (fused, eager):
        block.train()
        block.adapter_layer["e"].requires_grad_(False)
    x = torch.randn(4, D)
    weights = torch.randn(4, D, dtype=torch.float64)
    got, want = run_block(fused, x, weights), run_block(eager, x, weights)
    assert_same(got, want)
    assert not any(".e." in n for n in got[1])
    losses = registry_snapshot(fused), registry_snapshot(eager)
    assert losses[0].keys() == losses[1].keys() == {f"adapter_layer.{n}" for n in "abcdf"}
    for key in losses[0]:
        torch.testing.assert_close(losses[0][key]["adapter_loss"][0], losses[1][key]["adapter_loss"][0], msg=key)


@pytest.mark.skipif(not backend_mod.triton_available(), reason="needs triton")
def test_chain_on_the_triton_backend_equals_one_by_one():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not backend_mod.triton_interpreter_enabled():
        pytest.skip("triton on the CPU needs TRITON_INTERPRET=1")
    fused, eager = make_chain_pair(backend="triton", device=device)
    x = torch.randn(2, 3, D, device=device)
    weights = torch.randn(2, 3, D, dtype=torch.float64, device=device)
    assert_same(run_block(fused, x, weights), run_block(eager, x, weights), tol=1e-4)


@pytest.mark.parametrize("adapter", ["linear", "fused"])
def test_main_job_serves_a_mixed_batch(adapter, capsys):
    report = demo.run(steps=40, dim=16, hidden=4, adapter=adapter)
    mixed = report["mixed_batch"]
    assert set(mixed["names"]) == {"adapter_1", "adapter_2", None}
    assert mixed["max_abs_diff_to_alone"] < 1e-5
    losses = mixed["task_losses"]
    assert losses["none"] < 1e-9  # base-model samples get the base model's outputs
    assert 0.0 < losses["adapter_1"] < report["initial_eval_loss"] and 0.0 < losses["adapter_2"] < report["initial_eval_loss"]
    assert "served one mixed batch" in capsys.readouterr().out


def test_readme_example_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "route_adapters(model" in b]
    model = nn.Sequential(MLP(D), MLP(D))
    for name in ("tenant_a", "tenant_b"):
        model[1].add_adapter(name, FusedLinearAdapterConfig(in_features=D, dim=4))
    randomize_(adapter_parameters(model), seed=3)
    namespace = {"model": model, "x": torch.randn(4, 2, D)}
    exec(compile(block, "README.md", "exec"), namespace)
    model[1].set_enabled_adapters(enabled=False)
    model[1].set_enabled_adapters("tenant_b", enabled=True)
    with torch.no_grad():
        torch.testing.assert_close(namespace["out"][2:3], model(namespace["x"][2:3]))
