"""Mixed batches: ``route_adapters(module, names)`` makes sample ``i`` use only adapter ``names[i]``.

Inside the context, every adapter-capable module under ``module`` applies to sample ``i`` (index ``i`` of
the leading dimension of its input) only the adapter ``names[i]``, whatever the enabled flags say, or no
adapter for ``None``; a module that holds no adapter of that name passes the sample through as it would
with no adapter enabled. Nothing in any module's ``forward`` changes. The routes live in a context
variable, so threads and asyncio tasks do not see each other's routes, and contexts nest (for the modules
under the inner ``module``, the inner one wins).

How a module runs its routed samples:

* fused: when every routed adapter of the module is fusable and they share activation, norm position,
  eps and backend, all of them run in one launch of ``ops.routed_adapter`` over the whole batch, with
  their weights stacked once per weight version. Fusable is a protocol: the adapter has
  ``fused_adapter_params(dtype)`` returning ``ops.AdapterParams`` (``FusedLinearAdapterMixin`` gives it
  to this package's and the NeMo ``FusedLinearAdapter``), and its strategy has ``_can_fuse(adapter)``
  true plus the residual steps ``stochastic_depth``, ``stochastic_depth_scale(like)``,
  ``_wants_auxiliary_loss(adapter, host)`` and ``_register_l2_loss(row_sq, batch, adapter)`` (this
  package's ``ResidualAddAdapterStrategy`` and ``fusedadapters.nemo.FusedResidualAddAdapterStrategy``);
* generic: otherwise each adapter runs through its strategy on its own samples, gathered with
  ``index_select`` and scattered back with ``index_copy`` (both differentiable);
* one adapter: when every sample names the same adapter, the module runs it as it would with only
  that adapter enabled (``forward_single_enabled_adapter_``), neither gathering nor routing.

Either way an adapter's gradients come only from its own samples, and a routed adapter's strategy runs
as if the batch held only that adapter's samples: one stochastic-depth draw per adapter, and the
residual strategy's ``l2_lambda`` loss is the mean over that adapter's samples.

Fused chains (``forward_chained``, outside any route): when a module has several enabled adapters, each
stretch of two or more consecutive fusable ones (with the same ``backend`` attribute) runs as one
``ops.adapter_chain`` (one fused launch where the static model puts it ahead, else one fused launch per
adapter); any other adapter or strategy splits the chain. The result equals applying them
one by one, stochastic depth (one draw per adapter) and each adapter's ``l2_lambda`` loss included.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import ops

__all__ = ["ACTIVE_ROUTES", "OPEN_ROUTES", "Route", "forward_chained", "forward_routed", "route_adapters"]


class Route:
    """One ``route_adapters`` context: the adapter name (or None) of every sample, and index caches."""

    def __init__(self, names: Tuple[Optional[str], ...]):
        self.names = names
        self.adapter_names = tuple(dict.fromkeys(n for n in names if n is not None))
        # The adapter every sample names, when they all name the same one.
        self.single = self.adapter_names[0] if len(self.adapter_names) == 1 and None not in names else None
        self._samples: Dict[Tuple[str, torch.device], torch.Tensor] = {}
        self._slots: Dict[tuple, torch.Tensor] = {}

    def samples(self, name: str, device: torch.device) -> torch.Tensor:
        """The int64 indices of the samples routed to ``name``, on ``device``."""
        key = (name, device)
        if key not in self._samples:
            self._samples[key] = torch.tensor([i for i, n in enumerate(self.names) if n == name], device=device)
        return self._samples[key]

    def row_index(self, chosen: Tuple[str, ...], rows_shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Per row of an input whose leading dims are ``rows_shape`` (samples first), the position of its
        sample's adapter in ``chosen``, or -1 (int64, on ``device``). Made once per context and shape, so
        the routed op can reuse its row grouping across layers."""
        key = (chosen, tuple(rows_shape), device)
        if key not in self._slots:
            position = {name: k for k, name in enumerate(chosen)}
            slots = torch.tensor([position.get(n, -1) for n in self.names], dtype=torch.int64, device=device)
            self._slots[key] = slots.view(-1, *([1] * (len(rows_shape) - 1))).expand(rows_shape).contiguous()
        return self._slots[key]


# id(module) -> (module, Route) for every adapter-capable module under an active route_adapters.
ACTIVE_ROUTES: contextvars.ContextVar[Optional[Dict[int, Tuple[nn.Module, Route]]]] = contextvars.ContextVar(
    "fusedadapters_active_routes", default=None
)


class _OpenRoutes:
    """How many route_adapters contexts are open, in all threads: dispatch reads ``count`` (a plain
    attribute, which torch.compile can trace) and looks at ``ACTIVE_ROUTES`` only when it is non-zero."""

    count = 0
    lock = threading.Lock()


OPEN_ROUTES = _OpenRoutes


@contextlib.contextmanager
def route_adapters(module: nn.Module, names: Sequence[Optional[str]]) -> Iterator[None]:
    """Route sample ``i`` of every adapter-capable module under ``module`` to adapter ``names[i]``.

    ``names`` holds an adapter name (``adapter`` or ``module:adapter``) or None per sample of the inputs'
    leading dimension. Raises, before anything runs: ``TypeError`` for a name that is not a string or
    None; ``ValueError`` naming every name that no module under ``module`` holds. In the context, an
    input whose leading dimension differs from ``len(names)`` raises ``ValueError``.
    """
    from .adapter_mixins import AdapterModuleMixin

    if not isinstance(module, nn.Module):
        raise TypeError(f"route_adapters takes an nn.Module, got {type(module).__name__}")
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a sequence with one adapter name or None per sample, got {names!r}")
    resolved = []
    for name in names:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"adapter names are strings or None, got {type(name).__name__}: {name!r}")
        resolved.append(None if name is None else name.rsplit(":", 1)[-1])
    hosts = [m for m in module.modules() if isinstance(m, AdapterModuleMixin)]
    held = {key for m in hosts for key in (m._modules.get("adapter_layer") or {})}
    unknown = sorted({n for n, r in zip(names, resolved) if r is not None and r not in held})
    if unknown:
        raise ValueError(
            f"route_adapters: no module under {type(module).__name__} holds an adapter named "
            f"{', '.join(repr(n) for n in unknown)}; adapters held: {sorted(held)}"
        )
    route = Route(tuple(resolved))
    routes = dict(ACTIVE_ROUTES.get() or {})
    routes.update({id(m): (m, route) for m in hosts})
    token = ACTIVE_ROUTES.set(routes)
    with _OpenRoutes.lock:
        _OpenRoutes.count += 1
    try:
        yield
    finally:
        ACTIVE_ROUTES.reset(token)
        with _OpenRoutes.lock:
            _OpenRoutes.count -= 1


def forward_routed(host: nn.Module, input: Any, route: Route) -> Any:
    """``host.forward_enabled_adapters(input)`` under ``route``: sample ``i`` through adapter ``route.names[i]``."""
    if not isinstance(input, torch.Tensor) or input.dim() == 0:
        raise TypeError(
            f"route_adapters needs a tensor input with the samples along dim 0 in {type(host).__name__}, "
            f"got {type(input).__name__}"
        )
    if input.shape[0] != len(route.names):
        raise ValueError(
            f"route_adapters got {len(route.names)} names, but {type(host).__name__} received an input of "
            f"leading dimension {input.shape[0]} (shape {tuple(input.shape)})"
        )
    layer = host._modules.get("adapter_layer") or {}
    chosen = [(name, layer[name]) for name in route.adapter_names if name in layer]
    if not chosen:
        return input
    for name, adapter in chosen:
        _strategy(name, adapter)
    if route.single is not None:  # the whole batch on one adapter
        name, adapter = chosen[0]
        return host.forward_single_enabled_adapter_(input, adapter, adapter_name=name,
                                                    adapter_strategy=adapter.adapter_strategy)
    fused = _fused_plan(host, input, chosen)
    if fused is not None:
        return _forward_fused(host, input, route, chosen, *fused)
    return _forward_generic(host, input, route, chosen)


def _forward_generic(host: nn.Module, input: torch.Tensor, route: Route, chosen: List[Tuple[str, nn.Module]]) -> torch.Tensor:
    indices, outputs = [], []
    for name, adapter in chosen:
        samples = route.samples(name, input.device)
        outputs.append(
            host.forward_single_enabled_adapter_(
                input.index_select(0, samples), adapter, adapter_name=name, adapter_strategy=adapter.adapter_strategy
            )
        )
        indices.append(samples)
    dtype = outputs[0].dtype
    return input.to(dtype).index_copy(0, torch.cat(indices), torch.cat([o.to(dtype) for o in outputs]))


def _compute_dtype(input: torch.Tensor) -> torch.dtype:
    device = input.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else input.dtype


def _strategy(name: str, adapter: nn.Module) -> Any:
    strategy = getattr(adapter, "adapter_strategy", None)
    if strategy is None:
        raise AttributeError(
            f"Adapter module `{name}` does not set the value `adapter_strategy` ! Please set the value of the "
            f"adapter's strategy with the class {type(adapter).__module__}.{type(adapter).__qualname__}."
        )
    return strategy


def _host_runs_stock_single(host: nn.Module) -> bool:
    from .adapter_mixins import AdapterModuleMixin

    return type(host).forward_single_enabled_adapter_ is AdapterModuleMixin.forward_single_enabled_adapter_


def _fusable(adapter: nn.Module) -> bool:
    """A fused adapter under a residual strategy that fuses it (the protocol in the module docstring)."""
    can_fuse = getattr(getattr(adapter, "adapter_strategy", None), "_can_fuse", None)
    return hasattr(adapter, "fused_adapter_params") and can_fuse is not None and can_fuse(adapter)


def _fused_plan(host: nn.Module, input: torch.Tensor, chosen: List[Tuple[str, nn.Module]]) -> Optional[Tuple[list, torch.dtype]]:
    """``(params, dtype)`` when every chosen adapter can run in one ``ops.routed_adapter`` launch, else None."""
    if input.dim() < 2 or not _host_runs_stock_single(host) or not all(_fusable(a) for _, a in chosen):
        return None
    dtype = _compute_dtype(input)
    params = [adapter.fused_adapter_params(dtype) for _, adapter in chosen]
    first = params[0]
    backends = {getattr(adapter, "backend", None) for _, adapter in chosen}
    same = all((p.activation, p.norm_position, p.eps) == (first.activation, first.norm_position, first.eps) for p in params)
    if not same or len(backends) != 1 or input.shape[-1] != first.down_weight.shape[1]:
        return None
    return params, dtype


def _forward_fused(
    host: nn.Module, input: torch.Tensor, route: Route, chosen: List[Tuple[str, nn.Module]],
    params: list, dtype: torch.dtype,
) -> torch.Tensor:
    x = input.to(dtype)
    index = route.row_index(tuple(name for name, _ in chosen), x.shape[:-1], x.device)
    strategies = [adapter.adapter_strategy for _, adapter in chosen]
    scales = None
    if host.training and any(s.stochastic_depth != 0.0 for s in strategies):
        one = torch.ones(1, dtype=torch.float32, device=x.device)
        scales = torch.cat([s.stochastic_depth_scale(one) if s.stochastic_depth != 0.0 else one for s in strategies])
    wants_loss = [s._wants_auxiliary_loss(adapter, host) for s, (_, adapter) in zip(strategies, chosen)]
    result = ops.routed_adapter(
        x, index, *ops.stack_adapter_params(params, dtype, cache=host.__dict__.setdefault("_routed_weight_stack", {})),
        activation=params[0].activation, norm_position=params[0].norm_position, eps=params[0].eps,
        dropout_p=[p.dropout_p for p in params], scale=scales, residual=True, return_row_sq=any(wants_loss),
        backend=getattr(chosen[0][1], "backend", None),
    )
    if not any(wants_loss):
        return result
    out, row_sq = result
    for strategy, wants, (name, adapter) in zip(strategies, wants_loss, chosen):
        if wants:
            samples = route.samples(name, x.device)
            strategy._register_l2_loss(row_sq.index_select(0, samples), samples.numel(), adapter)
    return out


def forward_chained(host: nn.Module, input: Any, names: Sequence[str]) -> Any:
    """``host.forward_enabled_adapters(input)`` for several enabled adapters: stretches of two or more
    consecutive fusable adapters run as one ``ops.adapter_chain``, the others one by one as usual."""
    layer = host._modules["adapter_layer"]
    adapters = [(name, layer[name]) for name in names]
    fusable = [
        isinstance(input, torch.Tensor) and _host_runs_stock_single(host) and _fusable(adapter) for _, adapter in adapters
    ]
    i = 0
    while i < len(adapters):
        j = i + 1
        backend = getattr(adapters[i][1], "backend", None)
        while fusable[i] and j < len(adapters) and fusable[j] and getattr(adapters[j][1], "backend", None) == backend:
            j += 1
        if j - i >= 2:
            input = _forward_chain(host, input, [adapter for _, adapter in adapters[i:j]], backend)
        else:
            name, adapter = adapters[i]
            input = host.forward_single_enabled_adapter_(input, adapter, adapter_name=name, adapter_strategy=_strategy(name, adapter))
        i = j
    return input


def _forward_chain(host: nn.Module, input: torch.Tensor, chain: List[nn.Module], backend: Optional[str]) -> torch.Tensor:
    dtype = _compute_dtype(input)
    x = input.to(dtype)
    strategies = [adapter.adapter_strategy for adapter in chain]
    scales = [
        s.stochastic_depth_scale(x) if host.training and s.stochastic_depth != 0.0 else None for s in strategies
    ]
    wants_loss = [s._wants_auxiliary_loss(adapter, host) for s, adapter in zip(strategies, chain)]
    result = ops.adapter_chain(
        x, [adapter.fused_adapter_params(dtype) for adapter in chain], scales=scales,
        return_row_sq=any(wants_loss), backend=backend,
    )
    if not any(wants_loss):
        return result
    out, row_sqs = result
    for strategy, wants, adapter, row_sq in zip(strategies, wants_loss, chain, row_sqs):
        if wants:
            strategy._register_l2_loss(row_sq, x.size(0), adapter)
    return out
