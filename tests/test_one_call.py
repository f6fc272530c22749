"""A whole CPU training step as one C++ call (``manual.one_call_step``) against ``training._Step``'s Python.

The same operators in the same order: parameters, gradients, Adam's state and the records equal
bit for bit. Where it does not cover a step, ``one_call_step`` says None and the Python runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bench_core import manual, native, training
from bench_core.bench.breakdown import classify
from bench_core.config import ModelConfig, TrainConfig
from bench_core.data import make_synthetic
from bench_core.models import build_model

pytestmark = pytest.mark.usefixtures("fresh_fast_paths")

E, IN, C = 4, 48, 10
# (method, batching): BatchEnsemble, split, and repeat with its first layer's kernel; the classic ensemble with
# its first-layer weight stepped in its kernel; one MLP; the sequential classic ensemble's members
COVERED = [
    ("batchensemble", "split"),
    ("batchensemble", "repeat"),
    ("classic", "repeat"),
    ("single", "repeat"),
    ("classic-sequential", "repeat"),
]


@pytest.fixture(autouse=True)
def _cpp_steps():
    if native.compiler() is None:
        pytest.skip("no C++ compiler: the C++ steps cannot be built here")
    assert native.warm_up(), native.why_off()


def _skip_without_kernel(method: str, batching: str) -> None:
    needs_kernel = method == "classic" or (method, batching) == ("batchensemble", "repeat")
    if needs_kernel and not native.ops().first_layer_fast():
        pytest.skip("this one-call step needs its first-layer kernel (AVX-512)")


# An input wide enough for the first layers' products in two halves (bench_core::chunked_product) on two
# threads: 32 rows by 1024 inputs by 128 outputs (split batching) is 2²² multiply-adds.
WIDE = (1, 32, 32)


def _model(method: str, seed: int = 0, wide: bool = False) -> nn.Module:
    """``method``: a method's name, or "classic-sequential" (else the classic ensemble is vectorized)."""
    torch.manual_seed(seed)
    method, _, mode = method.partition("-")
    size = 1 if method == "single" else E
    cfg = ModelConfig(hidden=128 if wide else 32, depth=2, ensemble_size=size, classic_mode=mode or "vectorized")
    return build_model(method, cfg, 1024 if wide else IN, C)


def _data(wide: bool = False):
    return make_synthetic(7 * 32 + 5, 8, WIDE if wide else (3, 4, 4), C, seed=1)  # 7 full batches of 32, a short one


def _counting(monkeypatch) -> list[int]:
    """Counts the calls of every one-call step made from here on."""
    calls = [0]
    build = manual.one_call_step

    def counted_build(*args):
        step = build(*args)
        if step is None:
            return None

        def counted(idx):
            calls[0] += 1
            return step(idx)

        return counted

    monkeypatch.setattr(manual, "one_call_step", counted_build)
    return calls


def _train(method: str, batching: str, one_call: bool, monkeypatch, epochs: int = 2, wide: bool = False):
    monkeypatch.setenv(manual.ENV_ONE_CALL, "1" if one_call else "0")
    model = _model(method, wide=wide)
    cfg = TrainConfig(epochs=epochs, batch_size=32, device="cpu", log_every=3)
    records = list(training.train(model, _data(wide), cfg, method=method.partition("-")[0], batching=batching))
    return model, records


def _assert_same_models(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
            assert p.grad.stride() == p.stride(), name  # laid out as its parameter: fused Adam reads it so


@pytest.mark.parametrize(("method", "batching"), COVERED)
def test_one_call_training_equals_the_steps_python_bit_for_bit(method, batching, monkeypatch):
    _skip_without_kernel(method, batching)
    calls = _counting(monkeypatch)
    one, one_records = _train(method, batching, True, monkeypatch)
    steps = sum(r.steps for r in one_records if r.kind == "epoch")
    optimizers = E if method == "classic-sequential" else 1  # each member its own optimizer; steps are a member's
    assert calls[0] == optimizers * (steps - 1)  # every step but each optimizer's first, which made its state
    python, python_records = _train(method, batching, False, monkeypatch)
    assert calls[0] == optimizers * (steps - 1)  # switched off: none
    _assert_same_models(one, python)
    assert [r.kind for r in one_records] == [r.kind for r in python_records]
    for a, b in zip(one_records, python_records, strict=True):
        assert a.member_loss == b.member_loss
    if method == "classic":
        assert one.weights[0].grad is None  # stepped inside its gradient's kernel, as the Python step leaves it


@pytest.mark.parametrize(("method", "batching"), COVERED[:3])
def test_with_first_layer_products_in_halves_one_call_training_equals_the_steps_python_bit_for_bit(
    method, batching, two_threads, monkeypatch
):
    """1024 inputs on two threads: BatchEnsemble's and the classic ensemble's first-layer products in two
    halves (bench_core::chunked_product), in the one-call step and in the Python's alike."""
    _skip_without_kernel(method, batching)
    outputs = 128 if batching == "split" else E * 128
    assert native.ops().chunked_product(torch.randn(32, 1024), torch.randn(1024, outputs), None)[1] == 2
    one, one_records = _train(method, batching, True, monkeypatch, epochs=1, wide=True)
    python, python_records = _train(method, batching, False, monkeypatch, epochs=1, wide=True)
    _assert_same_models(one, python)
    for a, b in zip(one_records, python_records, strict=True):
        assert a.member_loss == b.member_loss


def test_the_step_makes_adams_step_once_and_reads_the_learning_rate_at_each_step(monkeypatch):
    data = _data()
    trained = []
    for one_call in (True, False):
        monkeypatch.setenv(manual.ENV_ONE_CALL, "1" if one_call else "0")
        model = _model("batchensemble")
        opt = training.make_optimizer(model.parameters(), 1e-3, torch.device("cpu"))
        step = training._Step(model, opt, data, True, training.loss_reduction(model))
        for i in range(6):
            if i == 3:
                opt.param_groups[0]["lr"] = 3e-2
            step(torch.arange(i * 32, (i + 1) * 32))
        assert (step.one_call is not None) == one_call
        trained.append((model, opt))
    (a, opt_a), (b, opt_b) = trained
    _assert_same_models(a, b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert float(opt_a.state[p]["step"]) == 6
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), key


@pytest.mark.parametrize(
    ("switch", "batching"),
    [(manual.ENV_FUSED, "split"), (manual.ENV_FUSED, "repeat"), (manual.ENV_FIRST_LAYER_KERNEL, "split")],
)
def test_the_steps_switches_hold_in_the_one_call_step(switch, batching, monkeypatch):
    """BatchEnsemble's fused loops and first-layer kernel off: the one-call step goes without them, as the Python."""
    _skip_without_kernel("batchensemble", batching)
    monkeypatch.setenv(switch, "0")
    calls = _counting(monkeypatch)
    one, _ = _train("batchensemble", batching, True, monkeypatch)
    assert calls[0] > 0
    python, _ = _train("batchensemble", batching, False, monkeypatch)
    _assert_same_models(one, python)


def _two_groups(model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    return torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=1e-3, fused=True)


KERNEL_OFF = {manual.ENV_FIRST_LAYER_KERNEL: "0"}
NOT_COVERED = {
    "switched off": ("batchensemble", True, {manual.ENV_ONE_CALL: "0"}, None),
    "the C++ steps off": ("batchensemble", True, {native.ENV_SWITCH: "0"}, None),
    "the step through autograd": ("batchensemble", True, {manual.ENV_SWITCH: "0"}, None),
    "Adam's direct step off": ("batchensemble", True, {"BENCH_FAST_ADAM": "0"}, None),
    "BatchEnsemble, repeat, without its first kernel": ("batchensemble", False, KERNEL_OFF, None),
    "the classic ensemble without its first-layer kernel": ("classic", False, KERNEL_OFF, None),
    "a forward hook": ("batchensemble", True, {}, lambda m: m.register_forward_hook(lambda *a: None)),
    "a frozen parameter": ("batchensemble", True, {}, lambda m: next(m.parameters()).requires_grad_(False)),
    "two parameter groups": ("batchensemble", True, {}, "two groups"),
}


@pytest.mark.parametrize("case", list(NOT_COVERED))
def test_where_it_does_not_cover_the_step_the_python_runs(case, monkeypatch):
    method, split, env, change = NOT_COVERED[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    model = _model(method)
    data = _data()
    opt = (
        _two_groups(model)
        if change == "two groups"
        else training.make_optimizer(model.parameters(), 1e-3, torch.device("cpu"))
    )
    if callable(change):
        change(model)
    step = training._Step(model, opt, data, split, training.loss_reduction(model))
    step(torch.arange(32))
    assert step.one_call is None
    step(torch.arange(32, 64))  # and the steps go on through the Python
    assert step.one_call is None


@pytest.mark.parametrize(("method", "batching"), COVERED)
def test_before_adams_first_step_there_is_no_one_call_step(method, batching):
    _skip_without_kernel(method, batching)
    model, data = _model(method), _data()
    if method == "classic-sequential":
        model = model.members[0]  # training steps each member on its own
    opt = training.make_optimizer(model.parameters(), 1e-3, torch.device("cpu"))
    step = training._Step(model, opt, data, batching == "split", training.loss_reduction(model))
    assert manual.one_call_step(model, step.opt_step, data.x_train, data.y_train, step.split, step.reduction) is None
    step(torch.arange(32))  # Adam's first step makes its state
    assert step.one_call is not None


class _Failing:
    """The C++ operators, with the one-call steps failing before they do anything."""

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def batchensemble_split_step(self, *args):
        raise RuntimeError("a broken one-call step\nsecond line")


def test_a_failing_one_call_step_warns_once_and_training_goes_on_through_the_python(monkeypatch):
    failing = _Failing(native.ops())
    monkeypatch.setattr(native, "ops", lambda: failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        broken, records = _train("batchensemble", "split", True, monkeypatch)
        _train("batchensemble", "split", True, monkeypatch)  # off for the process: not asked again
    messages = [str(w.message) for w in caught if "one C++ call" in str(w.message)]
    assert messages == [
        "Training steps as one C++ call are off (RuntimeError: a broken one-call step); using the step's Python"
        f" (set {manual.ENV_ONE_CALL}=0 to skip them)"
    ]
    assert manual._one_call["failed"] is not None
    monkeypatch.undo()
    manual.reset()
    python, python_records = _train("batchensemble", "split", False, monkeypatch)
    _assert_same_models(broken, python)  # the failed step was made by the Python, once
    assert [r.member_loss for r in records] == [r.member_loss for r in python_records]


def test_the_operators_check_their_lists():
    ops = native.ops()
    model = _model("batchensemble")
    params = [p.detach() for p in model.parameters()]
    x, y, idx = torch.randn(8, IN), torch.zeros(8, dtype=torch.long), torch.arange(8)
    moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    settings = (1e-3, 0.9, 0.999, 0.0, 1e-8)
    with pytest.raises(RuntimeError, match="batchensemble_split_step: 4 parameters per layer"):
        ops.batchensemble_split_step(x, y, idx, params[:3], [False], True, True, True, *moments, steps, *settings)
    with pytest.raises(RuntimeError, match="batchensemble_repeat_step: 4 parameters per layer"):
        ops.batchensemble_repeat_step(x, y, idx, params[:6], False, False, [], True, True, *moments, steps, *settings)
    with pytest.raises(RuntimeError, match="4 parameters and one oneDNN flag per layer"):
        ops.batchensemble_split_step(x, y, idx, params, [False], True, True, True, *moments, steps, *settings)
    flags = [False] * (len(params) // 4)
    with pytest.raises(RuntimeError, match="one step count per parameter"):
        ops.batchensemble_split_step(x, y, idx, params, flags, True, True, True, *moments, steps[:1], *settings)
    with pytest.raises(RuntimeError, match="vectorized_step: no weights"):
        ops.vectorized_step(x, y, idx, [], [], False, False, True, *steps[:3], [], [], [], *settings)


def test_a_profiled_one_call_step_shows_its_parts_by_name(profiled_step):
    """``bench.breakdown`` classifies by name: the gathers, the step's operators and Adam's stay apart."""
    data = make_synthetic(64, 16, (3, 4, 4), C, 0)
    model = _model("batchensemble")
    opt = training.make_optimizer(model.parameters(), 1e-2, torch.device("cpu"))
    step = training._Step(model, opt, data, True, training.loss_reduction(model))
    step(torch.arange(32))
    assert step.one_call is not None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(torch.arange(32, 64))
    parts = {e.name: classify(e) for e in prof.events()}
    assert parts["bench_core::batchensemble_split_step"] == "element-wise and other operators"
    assert parts["bench_core::batchensemble_layers"] == "element-wise and other operators"
    assert parts["aten::index_select"] == "batch draw"
    assert parts["bench_core::adam_step"] == parts["aten::_fused_adam_"] == "Adam"
