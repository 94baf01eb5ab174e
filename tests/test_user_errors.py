"""Wrong values a user can pass to the modules and ops: each is refused with an error that names it."""

import pytest
import torch

from fusedadapters import ops
from fusedadapters.adapter_modules import FusedLinearAdapter

D, H = 10, 3


@pytest.mark.parametrize("backend", ["cuda", "tritonn", ""])
def test_bad_backend_attribute_is_named(backend):
    adapter = FusedLinearAdapter(D, H)
    adapter.backend = backend
    with pytest.raises(ValueError, match=r"FusedLinearAdapter\.backend"):
        adapter(torch.randn(2, D))


def test_bad_backend_argument_is_named():
    x = torch.randn(2, D)
    with pytest.raises(ValueError, match="the backend argument"):
        ops.linear_adapter(x, torch.ones(D), torch.zeros(D), torch.randn(H, D), torch.randn(D, H), backend="cuda")
