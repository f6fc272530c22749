"""Adam's direct CPU step (bench_core.optim) against torch.optim.Adam, and every case that falls back."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from bench_core import manual, native, optim, training
from bench_core.config import ModelConfig, TrainConfig
from bench_core.data import make_synthetic
from bench_core.models import build_model
from bench_core.optim import AdamStep

pytestmark = pytest.mark.usefixtures("fresh_fast_paths")  # each test checks afresh; what it breaks is forgotten


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("classic", ModelConfig(hidden=8, ensemble_size=3), 12, 4)


def _pair(**adam):
    """Two equal models, each with a fused Adam: one stepped by AdamStep, one by opt.step()."""
    a, b = _model(), _model()
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2, fused=True, **adam)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2, fused=True, **adam)
    return a, opt_a, b, opt_b


def _set_grads(models: list[torch.nn.Module], step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
    for m in models:
        for p, g in zip(m.parameters(), grads, strict=True):
            p.grad = g.clone()


def _count_opt_steps(opt: torch.optim.Optimizer) -> list[int]:
    calls = [0]
    original = opt.step

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    opt.step = counted
    return calls


def _assert_same(a, opt_a, b, opt_b) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


class _Counted:
    """The C++ operators with their ``adam_step`` calls counted, or made to fail with ``error``."""

    def __init__(self, ops, error: str | None = None):
        self.ops, self.error, self.calls = ops, error, 0

    def adam_step(self, *args):
        self.calls += 1
        if self.error:
            raise RuntimeError(self.error)
        return self.ops.adam_step(*args)


@pytest.fixture(params=["c++", "python"])
def adam_path(request, monkeypatch):
    """The direct step through ``bench_core::adam_step`` (the C++ operators loaded), or its two Python calls.

    Returns the counted operators (None for Python). The C++ case is skipped only where this machine
    has no C++ compiler.
    """
    if request.param == "python":
        monkeypatch.setattr(native, "loaded", lambda: None)
        return None
    if native.compiler() is None:
        pytest.skip("no C++ compiler: the C++ operators cannot be built here")
    assert native.warm_up(), native.why_off()
    counted = _Counted(native.ops())
    monkeypatch.setattr(native, "loaded", lambda: counted)
    return counted


def test_direct_steps_equal_adams_bit_for_bit_and_skip_its_python(adam_path):
    a, opt_a, b, opt_b = _pair()
    step = AdamStep(opt_a)
    calls = _count_opt_steps(opt_a)
    for i in range(6):
        _set_grads([a, b], i)
        step()
        opt_b.step()
    _assert_same(a, opt_a, b, opt_b)
    assert calls[0] == 1  # the first step makes Adam's state; the other five are direct
    assert float(opt_a.state[next(a.parameters())]["step"]) == 6
    if adam_path is not None:
        assert adam_path.calls == 5


def test_the_cpp_step_counts_in_place_and_puts_the_counts_back_when_adam_fails():
    if native.compiler() is None:
        pytest.skip("no C++ compiler: the C++ operators cannot be built here")
    assert native.warm_up(), native.why_off()
    ops = native.ops()
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(5, generator=gen), torch.randn(3, 2, generator=gen).double()]
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.tensor(4.0), torch.tensor(4.0, dtype=torch.float64)]  # as Adam keeps them
    want = [p.clone() for p in params], [m.clone() for m in moments[0]], [v.clone() for v in moments[1]]
    want_steps = [s.clone() for s in steps]
    versions = [s._version for s in steps]
    ops.adam_step(params, grads, *moments, steps, 1e-2, 0.9, 0.999, 0.0, 1e-8)
    torch._foreach_add_(want_steps, 1)
    for i in range(2):  # the reference stepped tensor by tensor
        torch._fused_adam_(
            [want[0][i]], [grads[i]], [want[1][i]], [want[2][i]], [], [want_steps[i]], amsgrad=False, lr=1e-2,
            beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False, grad_scale=None, found_inf=None,
        )  # fmt: skip
    for got, expected in zip([params, *moments, steps], [*want, want_steps], strict=True):
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert [s._version for s in steps] == [v + 1 for v in versions], "an in-place change, as add_ makes it"
    before = [[t.clone() for t in ts] for ts in (params, *moments, steps)]
    with pytest.raises(RuntimeError):
        ops.adam_step(params, grads[:1], *moments, steps, 1e-2, 0.9, 0.999, 0.0, 1e-8)  # one gradient short
    for got, was in zip([params, *moments, steps], before, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, was, strict=True))
    with pytest.raises(RuntimeError, match="one step count per parameter"):
        ops.adam_step(params[:1], grads[:1], moments[0][:1], moments[1][:1], [], 1e-2, 0.9, 0.999, 0.0, 1e-8)
    refused = torch.tensor(4.0, requires_grad=True)  # its add_ throws: the count before it is put back
    with pytest.raises(RuntimeError, match="in-place"):
        ops.adam_step(params, grads, *moments, [steps[0], refused], 1e-2, 0.9, 0.999, 0.0, 1e-8)
    assert float(steps[0]) == float(before[3][0]) and float(refused.detach()) == 4.0


def test_direct_steps_are_adam_within_rounding_of_the_plain_loop():
    a, b = _model(), _model()
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2, fused=True)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2, foreach=False)
    step = AdamStep(opt_a)
    for i in range(6):
        _set_grads([a, b], i)
        step()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_new_lr_and_a_loaded_state_are_honoured():
    a, opt_a, b, opt_b = _pair()
    step = AdamStep(opt_a)
    for i in range(3):
        _set_grads([a, b], i)
        step()
        opt_b.step()
    for opt in (opt_a, opt_b):
        opt.param_groups[0]["lr"] = 3e-3
    _set_grads([a, b], 3)
    step()
    opt_b.step()
    _assert_same(a, opt_a, b, opt_b)
    # A state loaded into both (new exp_avg tensors): the direct step reads the new ones.
    state = opt_b.state_dict()
    opt_a.load_state_dict(copy.deepcopy(state))  # a state_dict holds the optimizer's own tensors
    opt_b.load_state_dict(copy.deepcopy(state))
    for i in range(4, 6):
        _set_grads([a, b], i)
        step()
        opt_b.step()
    _assert_same(a, opt_a, b, opt_b)


@pytest.mark.parametrize(
    "case",
    [
        "switch off",
        "a parameter without a gradient",
        "a step hook",
        "a global step hook",
        "hooks kept elsewhere",
        "amsgrad",
        "AdamW",
        "not fused",
        "two groups",
    ],
)
def test_every_case_it_does_not_cover_runs_adams_own_step(case, monkeypatch):
    adam = {"amsgrad": True} if case == "amsgrad" else {}
    a, opt_a, b, opt_b = _pair(**adam)
    if case == "not fused":
        opt_a = torch.optim.Adam(a.parameters(), lr=1e-2, foreach=False)
        opt_b = torch.optim.Adam(b.parameters(), lr=1e-2, foreach=False)
    if case == "AdamW":  # a subclass of Adam whose decoupled weight decay is another kernel
        opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    if case == "two groups":
        first, *rest = list(a.parameters())
        opt_a = torch.optim.Adam([{"params": [first]}, {"params": rest}], lr=1e-2, fused=True)
        first, *rest = list(b.parameters())
        opt_b = torch.optim.Adam([{"params": [first]}, {"params": rest}], lr=1e-2, fused=True)
    if case == "switch off":
        monkeypatch.setenv(optim.ENV_SWITCH, "0")
    seen = []
    if case == "a step hook":
        opt_a.register_step_post_hook(lambda *args: seen.append(1))
    if case == "a global step hook":  # runs for opt_b's steps too
        handle = register_optimizer_step_post_hook(lambda opt, *args: seen.append(opt is opt_a))
    if case == "hooks kept elsewhere":  # a torch that no longer keeps global hooks where this module looks
        monkeypatch.setattr(optim, "_torch_optimizer", None)
    step = AdamStep(opt_a)
    calls = _count_opt_steps(opt_a)
    for i in range(4):
        _set_grads([a, b], i)
        if case == "a parameter without a gradient":
            next(a.parameters()).grad = None
            next(b.parameters()).grad = None
        step()
        opt_b.step()
    if case == "a global step hook":
        handle.remove()
    assert calls[0] == 4
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    if case == "a step hook":
        assert len(seen) == 4
    if case == "a global step hook":
        assert seen.count(True) == 4 and seen.count(False) == 4


def test_a_failing_op_warns_once_puts_the_counts_back_and_adam_steps(adam_path, monkeypatch):
    """In Python the counts are put back here; the C++ operator puts them back itself (the test above)."""
    a, opt_a, b, opt_b = _pair()
    step = AdamStep(opt_a)
    real = torch._fused_adam_
    failures = [0]

    def failing(*args, **kwargs):
        if failures[0] == 0:  # the first call after the patch: AdamStep's
            failures[0] += 1
            raise RuntimeError("no such kernel\nsecond line")
        return real(*args, **kwargs)

    _set_grads([a, b], 0)
    step()
    opt_b.step()
    if adam_path is None:
        monkeypatch.setattr(torch, "_fused_adam_", failing)
    else:
        adam_path.error = "no such kernel\nsecond line"
    _set_grads([a, b], 1)
    with pytest.warns(RuntimeWarning, match=r"^Adam's direct steps are off \(RuntimeError: no such kernel\); using"):
        step()
    opt_b.step()
    assert failures[0] == 1 or adam_path.calls == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(2, 4):
            _set_grads([a, b], i)
            step()
            opt_b.step()
    _assert_same(a, opt_a, b, opt_b)  # the failed call's step count was put back, Adam counted it once


@pytest.mark.parametrize("fast", ["1", "0"])
def test_a_gradient_laid_out_otherwise_than_its_parameter_steps_as_its_contiguous_copy(fast, monkeypatch):
    """Fused Adam's CPU kernel reads a gradient's memory in its parameter's order (torch 2.14: silently wrong)."""
    monkeypatch.setenv(optim.ENV_SWITCH, fast)  # the direct call, and Adam's own step ("0")
    a, opt_a, b, opt_b = _pair()
    step_a, step_b = AdamStep(opt_a), AdamStep(opt_b)
    for i in range(3):  # the first step is Adam's own in both cases (it makes the state)
        _set_grads([a, b], i)
        for p in a.parameters():
            if p.dim() >= 2:  # the same values, transposed in memory
                p.grad = p.grad.transpose(-1, -2).contiguous().transpose(-1, -2)
                assert not p.grad.is_contiguous()
        step_a()
        step_b()
        assert all(p.grad.stride() == p.stride() for p in a.parameters())
    _assert_same(a, opt_a, b, opt_b)


def test_a_parameter_laid_out_otherwise_keeps_a_gradient_with_its_strides():
    w = torch.nn.Parameter(torch.randn(3, 4).t())  # (4, 3), not contiguous
    opt = torch.optim.Adam([w], lr=1e-2, fused=True)
    g = torch.randn(3, 4).t()
    w.grad = g
    optim.laid_out_as_params(opt)
    assert w.grad is g  # already the parameter's strides: left alone
    w.grad = g.contiguous()
    optim.laid_out_as_params(opt)
    assert w.grad.stride() == w.stride() and torch.equal(w.grad, g)


def test_training_on_a_cpu_takes_the_direct_step(monkeypatch):
    calls = [0]
    real = optim._fused_step

    def counted(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(optim, "_fused_step", counted)
    monkeypatch.setenv(manual.ENV_ONE_CALL, "0")  # the step's Python (the one-call step: tests/test_one_call.py)
    data = make_synthetic(96, 16, (1, 3, 4), 4, 0)
    model = _model()
    cfg = TrainConfig(epochs=2, batch_size=16, seed=0, device="cpu")
    records = [r for r in training.train(model, data, cfg, method="classic") if r.kind == "epoch"]
    assert sum(r.steps for r in records) == 12
    assert calls[0] == 11  # every step but the first, which made Adam's state


def test_clear_grads_sets_every_gradient_to_none_in_every_group():
    model = _model()
    params = list(model.parameters())
    opt = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 1e-4}], fused=True)
    _set_grads([model], 0)
    optim.clear_grads(opt)
    assert all(p.grad is None for p in params)
    optim.clear_grads(opt)  # gradients already None: nothing to do, nothing raised
    assert all(p.grad is None for p in params)


def test_training_steps_clear_gradients_without_zero_grads_profiler_range(profiled_step):
    """``opt.zero_grad`` opens a profiler range that cost ~0.1 ms per step here; training's CPU steps skip it."""
    model = _model()
    names, step = profiled_step(model, make_synthetic(64, 16, (1, 3, 4), 4, 0))
    assert not any(n.startswith("Optimizer.zero_grad") for n in names), names
    grads = [p.grad for p in model.parameters()]
    step(torch.arange(16))  # the step before's gradients were dropped, not accumulated into
    pairs = [(p, g) for p, g in zip(model.parameters(), grads, strict=True) if p is not step.kernel_weight]
    assert all(p.grad is not None and p.grad is not g for p, g in pairs)  # the kernel's weight: stepped, no gradient
