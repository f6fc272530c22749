"""Make the repository root importable when pytest is run as plain ``pytest`` (not ``python -m pytest``),
give the tests a device-lock folder of their own, and the fixture that gives a test the optional fast
paths as a fresh process has them."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Runs and benchmarks take turns on a device through lock files in one folder per machine
# (bench_core.locks). The tests' runs (and the processes they start) take turns among themselves
# in a folder of their own, not with a dashboard or a command that trains on this machine meanwhile.
os.environ["BENCH_LOCK_DIR"] = tempfile.mkdtemp(prefix="bench-test-locks-")
atexit.register(shutil.rmtree, os.environ["BENCH_LOCK_DIR"], ignore_errors=True)  # each session left one in /tmp


@pytest.fixture
def fresh_fast_paths(monkeypatch):
    """oneDNN's products, Adam's direct step and the C++ training steps (with their split kernel): switches
    unset, checked afresh, a failure a test provokes forgotten after it (``bench_core.onednn``,
    ``bench_core.optim``, ``bench_core.native``, ``bench_core.manual.ENV_FIRST_LAYER_KERNEL``,
    ``ENV_FUSED``, ``ENV_CHUNKED`` and ``ENV_ONE_CALL`` with its failure)."""
    from bench_core import manual, native, onednn, optim

    for module in (onednn, optim, native):
        monkeypatch.delenv(module.ENV_SWITCH, raising=False)
        module.reset()
    monkeypatch.delenv(manual.ENV_FIRST_LAYER_KERNEL, raising=False)
    monkeypatch.delenv(manual.ENV_FUSED, raising=False)
    monkeypatch.delenv(manual.ENV_ONE_CALL, raising=False)
    monkeypatch.delenv(manual.ENV_CHUNKED, raising=False)
    manual.reset()
    yield
    for module in (onednn, optim, native, manual):
        module.reset()


@pytest.fixture
def two_threads():
    """torch on two threads, as this project's machines run it, whatever this one has; put back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def profiled_step():
    """``profiled_step(model, data)``: one CPU training step (``training._Step``, shared batches of 16),
    then a second under ``torch.profiler``; returns the second's event names and the step."""
    import torch

    from bench_core import training

    def run(model, data):
        opt = training.make_optimizer(model.parameters(), 1e-2, torch.device("cpu"))
        step = training._Step(model, opt, data, False, training.loss_reduction(model))
        idx = torch.arange(16)
        step(idx)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(idx)
        return {e.key for e in prof.key_averages()}, step

    return run
