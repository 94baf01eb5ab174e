"""Functional fused ops (no ``nn.Module``s), each with backends behind one entry point."""

from .backend import BACKENDS, resolve_backend
from .linear_adapter import linear_adapter

__all__ = ["BACKENDS", "linear_adapter", "resolve_backend"]
