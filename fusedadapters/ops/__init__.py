"""Functional fused ops (no ``nn.Module``s), each with backends behind one entry point."""

from .adapter_chain import adapter_chain
from .adapter_params import AdapterParams
from .backend import BACKENDS, resolve_backend
from .linear_adapter import linear_adapter
from .routed_adapter import routed_adapter, stack_adapter_params

__all__ = ["AdapterParams", "adapter_chain", "BACKENDS", "linear_adapter", "resolve_backend", "routed_adapter", "stack_adapter_params"]
