"""Shared by the NeMo integration tests (which skip where nemo-toolkit is not installed)."""

import pytest


@pytest.fixture(autouse=True)
def reference_backend_unless_chosen(monkeypatch):
    """Adapters that do not name a backend run the reference, which must match NeMo bit for bit (the
    automatic choice would take the native C++ kernels on a CPU wherever they happen to be built)."""
    monkeypatch.setenv("FUSEDADAPTERS_BACKEND", "reference")


@pytest.fixture(autouse=True)
def clean_nemo_access_state():
    """NeMo keeps its AccessMixin settings and enabled flags in module globals: restore them after each test."""
    try:
        from nemo.core.classes.mixins import access_mixins
    except ImportError:  # no NeMo: the tests that need it skip
        yield
        return
    cfg, enabled = access_mixins._ACCESS_CFG.copy(), dict(access_mixins._ACCESS_ENABLED)
    yield
    access_mixins._ACCESS_CFG = cfg
    access_mixins._ACCESS_ENABLED.clear()
    access_mixins._ACCESS_ENABLED.update(enabled)
