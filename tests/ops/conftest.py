"""Fixtures of the op tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Deterministic mode makes ``torch.empty`` fill with NaN, so an element a kernel fails to write
    shows up as NaN in every op test."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)
