"""FusedLinearAdapter in models: inside the mixins, under torch.compile, DDP and CUDA graphs.

Parametrized over the backends that can run here: the reference everywhere, Triton on CUDA or on
the CPU under ``TRITON_INTERPRET=1`` (set by conftest.py when there is no CUDA).
"""


import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedadapters import AccessMixin
from fusedadapters import adapter_mixin_strategies as strategies
from fusedadapters.demo import MLP
from fusedadapters.adapter_modules import FusedLinearAdapter, FusedLinearAdapterConfig, LinearAdapter
from fusedadapters.ops.backend import triton_available, triton_interpreter_enabled
from helpers import randomize_

D, H = 24, 6
DDP_TIMEOUT_S = 300  # each run takes seconds; a hung worker fails the test instead of stalling CI
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and not triton_interpreter_enabled()),
    reason="needs triton (on CUDA, or on the CPU with TRITON_INTERPRET=1)",
)
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


def model_with_adapters(backend, seed=0, strategy=None, n_blocks=2):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[MLP(D) for _ in range(n_blocks)]).to(DEVICE)
    for i, block in enumerate(model):
        block.add_adapter("a", cfg=FusedLinearAdapterConfig(in_features=D, dim=H, adapter_strategy=strategy))
        block.add_adapter("b", cfg=FusedLinearAdapterConfig(in_features=D, dim=H, activation="gelu",
                                                             norm_position="post", adapter_strategy=strategy))
        for name in ("a", "b"):
            adapter = block.adapter_layer[name]
            adapter.backend = backend
            randomize_(adapter.parameters(), seed=10 * i + (name == "b"))
    return model


def eager_twin(model):
    """The same model with every FusedLinearAdapter swapped for an eager LinearAdapter."""
    twin = model_with_adapters("reference")
    twin.load_state_dict(model.state_dict())
    for block, source in zip(twin, model):
        for name, adapter in source.adapter_layer.items():
            eager = LinearAdapter(D, H, activation=adapter.activation, norm_position=adapter.norm_position,
                                  adapter_strategy=adapter.adapter_strategy).to(DEVICE)
            eager.load_state_dict(adapter.state_dict())
            block.adapter_layer[name] = eager
    return twin


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_inside_mixins_matches_eager_adapters_forward_and_backward(backend):
    model = model_with_adapters(backend)
    twin = eager_twin(model)
    x = torch.randn(3, 5, D, device=DEVICE)
    out, ref = model(x), twin(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    ref.square().sum().backward()
    g, r = grads(model), grads(twin)
    assert g.keys() == r.keys() and len(g) == 2 * (4 + 2 * 4)  # per block: fc, ln (2 each) + two adapters of 4
    for name in g:
        torch.testing.assert_close(g[name], r[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_result_strategy_and_nemo_style_strategy_call(backend):
    adapter = FusedLinearAdapter(D, H, adapter_strategy=strategies.ReturnResultAdapterStrategyConfig()).to(DEVICE)
    adapter.backend = backend
    randomize_(adapter.parameters(), seed=3)
    eager = LinearAdapter(D, H).to(DEVICE)
    eager.load_state_dict(adapter.state_dict())
    x = torch.randn(4, D, device=DEVICE)
    # NeMo's mixins call adapter_strategy(input, adapter, module=...).
    torch.testing.assert_close(adapter.adapter_strategy(x, adapter, module=None), eager(x), rtol=1e-4, atol=1e-4)
    residual = strategies.ResidualAddAdapterStrategy()
    torch.testing.assert_close(residual(x, adapter, module=MLP(D)), x + eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_loss_comes_out_of_the_fused_path(backend):
    lam = 0.3
    model = model_with_adapters(backend, strategy=strategies.ResidualAddAdapterStrategyConfig(l2_lambda=lam))
    twin = eager_twin(model)
    x = torch.randn(2, 3, D, device=DEVICE)
    model.train()
    twin.train()
    model(x)
    twin(x)
    fused_reg, eager_reg = AccessMixin.get_module_registry(model), AccessMixin.get_module_registry(twin)
    assert fused_reg.keys() == eager_reg.keys() and len(fused_reg) == 4
    for key in fused_reg:
        torch.testing.assert_close(fused_reg[key]["adapter_loss"][0], eager_reg[key]["adapter_loss"][0],
                                   rtol=1e-4, atol=1e-4)
    AccessMixin.reset_registry(model)
    AccessMixin.reset_registry(twin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    model = model_with_adapters(backend)
    model.eval()
    x = torch.randn(4, D, device=DEVICE, requires_grad=True)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(out.sum(), x)
    (ex,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(gx, ex, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    adapter = FusedLinearAdapter(D, H, dropout=0.25).to("cuda")
    adapter.backend = backend
    randomize_(adapter.parameters(), seed=4)
    adapter.train()
    static_x = torch.randn(8, D, device="cuda", requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up (compiles kernels) outside the capture
            out, _ = adapter.fused_residual_forward(static_x)
            out.sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    adapter.zero_grad(set_to_none=True)
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_out, _ = adapter.fused_residual_forward(static_x)
        static_out.sum().backward()
    for _ in range(2):
        new_x = torch.randn(8, D, device="cuda")
        static_x.data.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(static_out).all()
        adapter.eval()
        with torch.no_grad():
            eval_out, _ = adapter.fused_residual_forward(new_x)
        adapter.train()
        dropped = static_out - new_x
        kept = dropped != 0
        torch.testing.assert_close(dropped[kept], (eval_out - new_x)[kept] / 0.75, rtol=1e-3, atol=1e-3)


def _ddp_worker(rank, world, store, backend, x, path):
    # A file store: no TCP port to pick and race for.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = model_with_adapters(backend).cpu()
    for block in model:
        for adapter in block.adapter_layer.values():
            adapter.backend = backend
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    shard = x.chunk(world)[rank]
    ddp(shard).square().mean().backward()
    if rank == 0:
        torch.save(grads(model), path)
    dist.barrier()  # neither rank leaves while the other still talks to it
    # Leave without tearing the group down. The gloo group's destructor joins its worker thread while
    # holding the GIL, and that thread may still be freeing a finished collective that holds a Python
    # object (the context that autograd's backward stashes in thread-local state), which needs the
    # GIL: a teardown that deadlocks now and then (seen with torch 2.13).
    os._exit(0)


@pytest.mark.skipif(DEVICE == "cuda", reason="gloo DDP test runs the CPU path; the CUDA path is covered above")
@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_two_processes_gloo_matches_one_process(backend, tmp_path):
    x = torch.randn(8, D)
    path = tmp_path / "ddp_grads.pt"
    workers = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store"), backend, x, str(path)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + DDP_TIMEOUT_S
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the DDP workers did not finish within {DDP_TIMEOUT_S} s")
    ddp_grads = torch.load(path)
    model = model_with_adapters(backend)
    model(x).square().mean().backward()
    single = grads(model)
    assert ddp_grads.keys() == single.keys() and single
    for name in single:
        torch.testing.assert_close(ddp_grads[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
