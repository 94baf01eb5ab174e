"""fusedadapters.nemo.FusedLinearAdapter against NeMo's own LinearAdapter, inside NeMo's own mixins.

Every comparison gives both adapters the same random non-zero weights (a fresh adapter is the
identity under residual add, so a zero-weight comparison proves nothing). The reference backend must
match NeMo bit for bit; the Triton kernels (under TRITON_INTERPRET=1 on a CPU) within float32 rounding.
"""

import pytest

pytest.importorskip("nemo.core", reason='needs nemo-toolkit: pip install -e ".[test,nemo]"')

import torch  # noqa: E402
from nemo.collections.common.parts.adapter_modules import LinearAdapter, LinearAdapterConfig  # noqa: E402
from nemo.core.classes.mixins import adapter_mixin_strategies as nemo_strategies  # noqa: E402
from nemo.core.classes.mixins.access_mixins import AccessMixin  # noqa: E402

import fusedadapters.ops  # noqa: E402
from fusedadapters import adapter_modules as package_modules  # noqa: E402
from fusedadapters.demo import MLP as PackageBlock  # noqa: E402
from fusedadapters.nemo import FusedLinearAdapter, FusedLinearAdapterConfig, FusedResidualAddAdapterStrategy  # noqa: E402
from fusedadapters.ops.backend import triton_available, triton_interpreter_enabled  # noqa: E402
from helpers import randomize_  # noqa: E402
from nemo_tutorial_model import MLP as NemoBlock  # noqa: E402

D, H = 37, 5
needs_triton = pytest.mark.skipif(
    not triton_available() or (not torch.cuda.is_available() and not triton_interpreter_enabled()),
    reason="needs triton (on CUDA, or on the CPU with TRITON_INTERPRET=1)",
)
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]
VARIANTS = [("pre", "swish"), ("post", "gelu"), ("pre", "hardtanh"), ("post", "relu")]


def tolerance(backend):
    return dict(rtol=0.0, atol=0.0) if backend == "reference" else dict(rtol=2e-5, atol=2e-5)


def twin_blocks(backend, *, seed=0, **adapter_kwargs):
    """A NeMo block holding NeMo's LinearAdapter and an identical one holding the fused adapter."""
    torch.manual_seed(seed)
    nemo_block, fused_block = NemoBlock(D), NemoBlock(D)
    fused_block.load_state_dict(nemo_block.state_dict())
    nemo_block.add_adapter("a", cfg=LinearAdapterConfig(in_features=D, dim=H, **adapter_kwargs))
    fused_block.add_adapter("a", cfg=FusedLinearAdapterConfig(in_features=D, dim=H, **adapter_kwargs))
    randomize_(nemo_block.adapter_layer["a"].parameters(), seed=seed + 1, std=0.4)
    fused_block.adapter_layer["a"].load_state_dict(nemo_block.adapter_layer["a"].state_dict())
    fused_block.adapter_layer["a"].backend = backend
    return nemo_block, fused_block


def forward_backward(block, x):
    x = x.clone().requires_grad_(True)
    out = block(x)
    out.mul(torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {name: p.grad for name, p in block.named_parameters()}
    return out.detach(), x.grad, grads


def assert_same_results(nemo_block, fused_block, x, backend):
    out_n, dx_n, grads_n = forward_backward(nemo_block, x)
    out_f, dx_f, grads_f = forward_backward(fused_block, x)
    torch.testing.assert_close(out_f, out_n, **tolerance(backend))
    torch.testing.assert_close(dx_f, dx_n, **tolerance(backend))
    assert grads_f.keys() == grads_n.keys() and len(grads_n) == 4 + 4  # fc, ln and the adapter's four
    for name in grads_n:
        assert grads_n[name] is not None and grads_n[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_f[name], grads_n[name], **tolerance(backend), msg=name)


@pytest.fixture
def fused_op_calls(monkeypatch):
    """The keyword arguments of every call to fusedadapters.ops.linear_adapter during the test."""
    calls = []
    op = fusedadapters.ops.linear_adapter

    def recording_op(*args, **kwargs):
        calls.append(kwargs)
        return op(*args, **kwargs)

    monkeypatch.setattr(fusedadapters.ops, "linear_adapter", recording_op)
    return calls


def test_is_nemo_linear_adapter_with_same_constructor_fields_and_state_dict():
    fused = FusedLinearAdapter(D, H, activation="gelu", norm_position="post", dropout=0.25)
    nemo = LinearAdapter(D, H, activation="gelu", norm_position="post", dropout=0.25)
    assert isinstance(fused, LinearAdapter) and isinstance(fused, AccessMixin)
    assert fused.state_dict().keys() == nemo.state_dict().keys()
    assert fused.state_dict()["module.3.weight"].abs().sum() == 0  # the last layer starts at zero, as NeMo's
    assert issubclass(FusedLinearAdapterConfig, LinearAdapterConfig)
    assert FusedLinearAdapterConfig.__dataclass_fields__.keys() == LinearAdapterConfig.__dataclass_fields__.keys()
    assert FusedLinearAdapterConfig(D, H)._target_ == "fusedadapters.nemo.FusedLinearAdapter"
    assert isinstance(FusedLinearAdapter(D, H).adapter_strategy, nemo_strategies.ResidualAddAdapterStrategy)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        FusedLinearAdapter(D, H, activation="tanh")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_position,activation", VARIANTS)
def test_residual_add_equals_nemo_forward_and_every_gradient(backend, norm_position, activation, fused_op_calls):
    nemo_block, fused_block = twin_blocks(backend, activation=activation, norm_position=norm_position)
    assert type(fused_block.adapter_layer["a"].adapter_strategy) is FusedResidualAddAdapterStrategy
    assert_same_results(nemo_block, fused_block, torch.randn(3, 4, D), backend)
    assert [call["residual"] for call in fused_op_calls] == [True]  # the residual add ran inside the op


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_strategies_receive_the_adapter_output(backend, fused_op_calls):
    strategy = nemo_strategies.ReturnResultAdapterStrategyConfig()
    nemo_block, fused_block = twin_blocks(backend, norm_position="post", adapter_strategy=strategy)
    assert type(fused_block.adapter_layer["a"].adapter_strategy) is nemo_strategies.ReturnResultAdapterStrategy
    assert_same_results(nemo_block, fused_block, torch.randn(2, 3, D), backend)
    assert [call["residual"] for call in fused_op_calls] == [False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_loss_is_found_through_nemo_registry_and_equal(backend, fused_op_calls):
    strategy = nemo_strategies.ResidualAddAdapterStrategyConfig(l2_lambda=0.3)
    nemo_block, fused_block = twin_blocks(backend, adapter_strategy=strategy)
    x = torch.randn(4, 3, D)
    losses = {}
    for name, block in (("nemo", nemo_block), ("fused", fused_block)):
        AccessMixin.set_access_enabled(False)
        block.train()
        out = block(x)
        assert AccessMixin.is_access_enabled()  # what NeMo's training loop checks before collecting
        registry = AccessMixin.get_module_registry(block)
        assert list(registry) == ["adapter_layer.a"] and list(registry["adapter_layer.a"]) == ["adapter_loss"]
        (loss,) = registry["adapter_layer.a"]["adapter_loss"]
        (out.sum() + loss).backward()
        losses[name] = (loss.detach(), {n: p.grad for n, p in block.adapter_layer.named_parameters()})
        AccessMixin.reset_registry(block)
    assert losses["nemo"][0] > 0
    torch.testing.assert_close(losses["fused"][0], losses["nemo"][0], rtol=1e-5, atol=1e-6)
    for name, grad in losses["nemo"][1].items():
        torch.testing.assert_close(losses["fused"][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert [call["return_row_sq"] for call in fused_op_calls] == [True]  # row sums came from the op


def test_l2_loss_follows_nemo_conditions():
    strategy = nemo_strategies.ResidualAddAdapterStrategyConfig(l2_lambda=0.3)
    _, block = twin_blocks("reference", adapter_strategy=strategy)
    x = torch.randn(2, 3, D)
    block.eval()
    block(x)
    assert AccessMixin.get_module_registry(block) == {}  # not in eval
    block.train()
    AccessMixin.update_access_cfg({"compute_adapter_loss": False})
    block(x)
    assert AccessMixin.get_module_registry(block) == {}  # NeMo's switch is honoured
    AccessMixin.update_access_cfg({"compute_adapter_loss": True})
    block.adapter_layer["a"].requires_grad_(False)
    block(x)
    assert AccessMixin.get_module_registry(block) == {}  # not for a frozen adapter


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_depth_equal_under_one_seed(backend, fused_op_calls):
    strategy = nemo_strategies.ResidualAddAdapterStrategyConfig(stochastic_depth=0.5)
    nemo_block, fused_block = twin_blocks(backend, adapter_strategy=strategy)
    nemo_block.train(), fused_block.train()
    x = torch.randn(3, 2, D)
    without_adapter = nemo_block.ln(nemo_block.fc(x))
    outcomes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        expected = nemo_block(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(fused_block(x), expected, **tolerance(backend))
        outcomes.add("dropped" if torch.equal(expected, without_adapter) else "kept")
    assert outcomes == {"dropped", "kept"}
    assert all(call["scale"] is not None for call in fused_op_calls)  # the scale went into the op


def test_dropout_is_off_in_eval_and_drawn_by_the_kernel_in_training():
    nemo_block, fused_block = twin_blocks("reference", dropout=0.4)
    x = torch.randn(3, 2, D)
    nemo_block.eval(), fused_block.eval()
    torch.testing.assert_close(fused_block(x), nemo_block(x), rtol=0, atol=0)
    fused_block.train()
    torch.manual_seed(0)
    first = fused_block(x)
    torch.manual_seed(0)
    torch.testing.assert_close(fused_block(x), first, rtol=0, atol=0)  # reproducible under one seed
    assert not torch.allclose(first, fused_block.eval()(x))  # and it does drop


def test_package_adapter_accepts_nemo_strategies_and_nemo_configs():
    """The standalone fusedadapters.adapter_modules.FusedLinearAdapter takes NeMo strategy instances and
    configs, and a NeMo adapter config with only its _target_ changed builds it in either world."""
    nemo_block, _ = twin_blocks("reference")
    x = torch.randn(2, 3, D)
    expected = nemo_block(x)
    weights = nemo_block.state_dict()

    for strategy in (nemo_strategies.ResidualAddAdapterStrategy(), nemo_strategies.ResidualAddAdapterStrategyConfig()):
        adapter = package_modules.FusedLinearAdapter(D, H, adapter_strategy=strategy)
        assert type(adapter.adapter_strategy) is nemo_strategies.ResidualAddAdapterStrategy

    config = LinearAdapterConfig(in_features=D, dim=H)
    config._target_ = "fusedadapters.adapter_modules.FusedLinearAdapter"  # the README's recipe
    for block in (PackageBlock(D), NemoBlock(D)):  # this package's mixins, then NeMo's
        block.add_adapter("a", cfg=config)
        block.load_state_dict(weights)
        assert type(block.adapter_layer["a"]) is package_modules.FusedLinearAdapter
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
