"""Triton kernels and their launchers, one module per fused op (``linear_adapter``).

Importing a submodule imports ``triton``; ``fusedadapters.ops`` does so only when the triton backend
runs, so the package itself works without Triton installed.
"""
