"""Make the repository root importable when pytest is run as plain ``pytest`` (not ``python -m pytest``),
and the fixture that gives a test the optional fast paths as a fresh process has them."""

import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def fresh_fast_paths(monkeypatch):
    """oneDNN's products and Adam's direct step: switches unset, checked afresh, a failure a test
    provokes forgotten after it (``bench_core.onednn``, ``bench_core.optim``)."""
    from bench_core import onednn, optim

    for module in (onednn, optim):
        monkeypatch.delenv(module.ENV_SWITCH, raising=False)
        module.reset()
    yield
    for module in (onednn, optim):
        module.reset()
