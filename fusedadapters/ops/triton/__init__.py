"""Triton kernels and their launchers, one module per fused op (``linear_adapter``,
``routed_adapter``, ``adapter_chain``; the last two run the first's kernel code).

Importing a submodule imports ``triton``; ``fusedadapters.ops`` does so only when the triton backend
runs, so the package itself works without Triton installed.
"""

from __future__ import annotations

__all__ = ["fix_interpreter_scalar_index"]


def fix_interpreter_scalar_index() -> None:
    """Let Triton's interpreter run ``range(0, n, BLOCK)`` over a runtime ``n`` under NumPy >= 2.4.

    The interpreter holds scalar kernel arguments as one-element NumPy arrays and converts them with
    ``int(array)``, which NumPy 2.4 refuses for arrays that are not 0-d (triton-lang/triton#9171).
    This re-registers ``__index__`` with ``.item()``; it changes nothing where that already works,
    and nothing on GPUs.
    """
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "fixes_scalar_index", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.fixes_scalar_index = True
    interpreter._patch_lang_tensor = patched
