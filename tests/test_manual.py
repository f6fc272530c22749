"""The hand-written training step (bench_core.manual): bit for bit autograd's, and the cases it leaves to autograd.

The exceptions, first layers in the C++ steps on AVX-512 CPUs: BatchEnsemble's weight and r
gradients come from one kernel (``bench_core::first_layer_grads``), the same sums in another order,
so they are checked against autograd's to float32's rounding, and bit for bit with
``BENCH_FIRST_LAYER_KERNEL=0``; the classic ensemble's first-layer weight, stepped by Adam inside its
gradient's kernel (``first_layer_adam``), is checked against ``torch._fused_adam_`` on the same
gradient, and training against autograd's to float32's rounding. And BatchEnsemble's float32 C++
steps on any CPU: their element-wise work and loss in loops of their own, to float32's rounding of
autograd's, and bit for bit with ``BENCH_FUSED_LOOPS=0``.
"""

from __future__ import annotations

import functools
import platform
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bench_core import kernels, manual, native, onednn, training
from bench_core.config import ModelConfig, TrainConfig
from bench_core.data import make_synthetic
from bench_core.errors import switched_off
from bench_core.models import build_model

pytestmark = pytest.mark.usefixtures("fresh_fast_paths")


def _model(method: str, in_features: int, depth: int = 2, ensemble_size: int = 3, seed: int = 0, **cfg):
    torch.manual_seed(seed)
    config = ModelConfig(hidden=8, depth=depth, ensemble_size=ensemble_size, **cfg)
    return build_model(method, config, in_features, 5)


def _batch(model, in_features: int, split: bool, dtype=torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    n_members = model.ensemble_size
    x = torch.randn(4 * n_members, in_features, generator=gen, dtype=dtype)
    y = torch.randint(0, 5, (4 * n_members,), generator=gen)
    if split:
        return x.view(n_members, 4, in_features), y.view(n_members, 4)
    return x, y


def _autograd(model, x, y, reduction):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    member_losses = training.per_member_cross_entropy(logits if logits.dim() == 3 else logits.unsqueeze(0), y)
    (member_losses.sum() if reduction == "sum" else member_losses.mean()).backward()
    return member_losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _hand_written(model, x, y, reduction):
    model.zero_grad(set_to_none=True)
    assert manual.applies(model, x)
    member_losses = manual.forward_backward(model, x, y, reduction)
    for name, p in model.named_parameters():  # as autograd lays them out: fused Adam reads them so (optim)
        strides = [(a, b) for a, b, size in zip(p.grad.stride(), p.stride(), p.shape, strict=True) if size > 1]
        assert all(a == b for a, b in strides), name
    return member_losses, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(params=["c++", "python"])
def step_path(request, monkeypatch, fresh_fast_paths):
    """The hand-written step through the C++ operators (``bench_core.native``), or in Python.

    The one asked for must be the one that runs: the other is made to fail. After
    ``fresh_fast_paths``, which unsets the switches. The C++ case is skipped only where this
    machine has no C++ compiler.
    """

    def must_not_run(*args):
        raise AssertionError(f"the other step ran where the {request.param} one should have")

    if request.param == "python":
        monkeypatch.setenv(native.ENV_SWITCH, "0")
        monkeypatch.setattr(manual, "_native_step", must_not_run)
        return request.param
    if native.compiler() is None:
        pytest.skip("no C++ compiler: the C++ steps cannot be built here")
    assert native.warm_up(), native._state["failed"]
    monkeypatch.setattr(manual, "_python_step", must_not_run)
    return request.param


KERNEL_GRADS = ("layers.0.weight", "layers.0.r")  # BatchEnsemble's first layer through bench_core::first_layer_grads


def _kernel_grads(step_path: str, method: str, dtype=torch.float32) -> tuple[str, ...]:
    """The gradients the C++ first-layer kernel computes in this case (float32 BatchEnsemble, C++ steps)."""
    on = step_path == "c++" and method == "batchensemble" and dtype == torch.float32 and native.ops().first_layer_fast()
    return KERNEL_GRADS if on and not switched_off(manual.ENV_FIRST_LAYER_KERNEL) else ()


ALL = ("member losses",)  # close=ALL: the losses and every gradient to float32's rounding


def _close(step_path: str, method: str, dtype=torch.float32) -> tuple[str, ...]:
    """What the C++ step computes to float32's rounding here, not bit for bit: ALL where BatchEnsemble's
    fused loops run (float32, C++ steps, not switched off), else the first-layer kernel's gradients."""
    on = step_path == "c++" and method == "batchensemble" and dtype == torch.float32
    if on and not switched_off(manual.ENV_FUSED):
        return ALL
    return _kernel_grads(step_path, method, dtype)


def _within_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within a few float32 roundings of the largest value: the same sums in another order."""
    return bool((got - want).abs().max() <= 1e-6 * want.abs().max())


def _assert_bit_equal(got, want, close: tuple[str, ...] = ()) -> None:
    """Losses and gradients equal to the last bit; those named in ``close`` (everything: ALL) to float32's rounding."""
    everything = close == ALL
    assert _within_rounding(got[0], want[0]) if everything else torch.equal(got[0], want[0]), "member losses"
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        if everything or name in close:
            assert _within_rounding(got[1][name], grad), name
        else:
            assert torch.equal(got[1][name], grad), name


CASES = [
    # method, batching, input width, depth, members
    ("single", "repeat", 12, 2, 1),
    ("single", "repeat", 12, 0, 1),
    ("classic", "repeat", 12, 2, 3),
    ("classic", "repeat", 12, 0, 3),  # one layer: the logits are the first layer's transposed output
    ("classic", "repeat", 12, 1, 1),
    ("batchensemble", "repeat", 12, 2, 3),
    ("batchensemble", "repeat", 12, 0, 2),
    ("batchensemble", "repeat", 12, 2, 1),
    ("batchensemble", "split", 12, 2, 3),
    ("batchensemble", "split", 12, 0, 2),
    ("batchensemble", "split", 2048, 1, 2),  # wide enough for split's per-member products through oneDNN
]


# Each case, BatchEnsemble's also with its fused loops off (ATen's element-wise operators: bit for bit).
CASES_LOOPS = [(*case, loops) for case in CASES for loops in ("own", "aten")[: 2 if case[0] == "batchensemble" else 1]]


@pytest.mark.parametrize(("method", "batching", "width", "depth", "members", "loops"), CASES_LOOPS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("products", ["as this CPU", "oneDNN"])  # Intel's CPUs take MKL's unless asked
def test_losses_and_gradients_equal_autograds_bit_for_bit(
    method, batching, width, depth, members, loops, reduction, products, step_path, monkeypatch
):
    if products == "oneDNN":
        monkeypatch.setenv(onednn.ENV_SWITCH, "1")
    if loops == "aten":
        monkeypatch.setenv(manual.ENV_FUSED, "0")
    model = _model(method, width, depth=depth, ensemble_size=members)
    x, y = _batch(model, width, batching == "split")
    got, want = _hand_written(model, x, y, reduction), _autograd(model, x, y, reduction)
    _assert_bit_equal(got, want, close=_close(step_path, method))


@pytest.mark.parametrize(
    ("method", "batching", "width", "depth", "members"), [c for c in CASES if c[0] == "batchensemble"]
)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_with_the_first_layer_kernel_off_batchensemble_steps_equal_autograds_bit_for_bit(
    method, batching, width, depth, members, reduction, monkeypatch
):
    _kernel_ops()
    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, "0")
    monkeypatch.setenv(manual.ENV_FUSED, "0")
    model = _model(method, width, depth=depth, ensemble_size=members)
    x, y = _batch(model, width, batching == "split")
    _assert_bit_equal(_hand_written(model, x, y, reduction), _autograd(model, x, y, reduction))


@pytest.mark.parametrize("switch", ["BENCH_ONEDNN", "BENCH_COMPILE"])
@pytest.mark.parametrize("batching", ["repeat", "split"])
def test_equal_with_onednn_or_the_compiled_kernel_switched_off(switch, batching, step_path, monkeypatch):
    monkeypatch.setenv(switch, "0")
    model = _model("batchensemble", 2048, depth=1, ensemble_size=2)
    x, y = _batch(model, 2048, batching == "split")
    got, want = _hand_written(model, x, y, "mean"), _autograd(model, x, y, "mean")
    _assert_bit_equal(got, want, close=_close(step_path, "batchensemble"))
    if switch == "BENCH_ONEDNN":
        assert not onednn.usable(x)
    else:
        assert not kernels.enabled()


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD"])
@pytest.mark.parametrize("method", ["classic", "batchensemble"])
def test_equal_with_the_members_product_through_mkl_in_either_layout(vendor, method, step_path, monkeypatch):
    """oneDNN off: the members' product through torch.mm, in the plain layout on Intel CPUs and the
    transposed one elsewhere (``onednn.mkl_plain_layout``), in the C++ and the Python steps alike."""
    monkeypatch.setitem(onednn._vendor, "id", vendor)
    monkeypatch.setenv(onednn.ENV_SWITCH, "0")
    assert onednn.mkl_plain_layout() == (vendor == "GenuineIntel")
    model = _model(method, 12)
    x, y = _batch(model, 12, False)
    got, want = _hand_written(model, x, y, "mean"), _autograd(model, x, y, "mean")
    _assert_bit_equal(got, want, close=_close(step_path, method))


@pytest.mark.parametrize("method", ["single", "classic", "batchensemble"])
@pytest.mark.parametrize("batching", ["repeat", "split"])
@pytest.mark.usefixtures("step_path")
def test_float64_models_equal_autograd(method, batching):
    if batching == "split" and method != "batchensemble":
        pytest.skip("split batching is BatchEnsemble's")
    model = _model(method, 12).double()
    x, y = _batch(model, 12, batching == "split", dtype=torch.float64)
    _assert_bit_equal(_hand_written(model, x, y, "mean"), _autograd(model, x, y, "mean"))


@pytest.mark.usefixtures("step_path")
def test_a_gradient_already_there_is_replaced_not_added_to():
    model = _model("classic", 12)
    x, y = _batch(model, 12, False)
    want = _autograd(model, x, y, "sum")
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    got = manual.forward_backward(model, x, y, "sum")
    assert torch.equal(got, want[0])
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, want[1][name]), name


@pytest.mark.parametrize(
    ("method", "mode", "batching"),
    [
        ("single", "vectorized", "repeat"),
        ("classic", "sequential", "repeat"),
        ("classic", "vectorized", "repeat"),
        ("batchensemble", "vectorized", "repeat"),
        ("batchensemble", "vectorized", "split"),
    ],
)
def test_training_equals_autograds_training_bit_for_bit(method, mode, batching, monkeypatch):
    """Bit for bit with the first-layer kernels and BatchEnsemble's fused loops off; with them on
    (BatchEnsemble's loops, the kernels on BatchEnsemble's and the classic ensemble's vectorized first
    layers, Adam's step on the latter's, AVX-512 CPUs), within float32's rounding."""
    data = make_synthetic(96, 16, (1, 3, 4), 4, 0)
    cfg = TrainConfig(epochs=2, batch_size=16, seed=0, device="cpu")
    runs = []
    for switch, split_kernel in (("0", "1"), ("1", "0"), ("1", "1")):  # autograd first
        monkeypatch.setenv(manual.ENV_SWITCH, switch)
        monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, split_kernel)
        monkeypatch.setenv(manual.ENV_FUSED, split_kernel)
        torch.manual_seed(0)
        model = build_model(method, ModelConfig(hidden=8, ensemble_size=3, classic_mode=mode), 12, 4)
        records = [r for r in training.train(model, data, cfg, method=method, batching=batching) if r.kind == "epoch"]
        runs.append(([r.member_loss for r in records], [p.detach().clone() for p in model.parameters()]))
    autograd, kernel_off, kernel_on = runs
    assert kernel_off[0] == autograd[0]
    for a, b in zip(kernel_off[1], autograd[1], strict=True):
        assert torch.equal(a, b)
    kernels = method == "batchensemble" or (method, mode) == ("classic", "vectorized")
    fused_loops = method == "batchensemble" and native.warm_up()  # on any CPU
    exact = not (fused_loops or (kernels and native.warm_up() and native.ops().first_layer_fast()))
    for a, b in zip(kernel_on[0], autograd[0], strict=True):
        assert a == b if exact else a == pytest.approx(b, rel=1e-5)
    for a, b in zip(kernel_on[1], autograd[1], strict=True):
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _on_one_and_many_threads(fn):
    """``[fn() on one thread, fn() on max(2, torch's) threads]``; torch's thread count put back after."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(fn())
    finally:
        torch.set_num_threads(threads)
    return results


# --- BatchEnsemble's fused loops (batchensemble_layers with fused) ------------------------------------

FUSED_CASES = [
    # batching, members, rows per member, input width, hidden, classes, depth
    ("split", 3, 4, 12, 8, 5, 2),
    ("split", 2, 40, 12, 20, 7, 1),  # more than 16 rows (ATen sums them in chunks of 16), widths not of 16
    ("split", 1, 5, 9, 3, 2, 0),  # one layer: the loss straight after the first
    ("repeat", 3, 4, 12, 8, 5, 2),  # the first layer's output strided as the members' product leaves it
    ("repeat", 4, 40, 12, 20, 7, 1),
    ("split", 4, 64, 300, 160, 10, 2),  # enough elements for two threads in every loop
    ("repeat", 4, 64, 300, 160, 10, 2),
]


def _fused_case(batching, members, rows, width, hidden, classes, depth, seed=3):
    torch.manual_seed(seed)
    model = build_model("batchensemble", ModelConfig(hidden=hidden, depth=depth, ensemble_size=members), width, classes)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(members * rows, width, generator=gen)
    y = torch.randint(0, classes, (members * rows,), generator=gen)
    if batching == "split":
        x, y = x.view(members, rows, width), y.view(members, rows)
    return model, x, y


def _fused_and_aten(monkeypatch, model, x, y, reduction="mean"):
    """The C++ step's losses and gradients with its fused loops, then with ATen's operators."""
    runs = []
    for switch in ("1", "0"):
        monkeypatch.setenv(manual.ENV_FUSED, switch)
        runs.append(_hand_written(model, x, y, reduction))
    return runs


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["kernel", "no kernel"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_the_fused_loops_equal_atens_operators_to_float32s_rounding(case, reduction, kernel, monkeypatch):
    """With the first layer's kernel and without (then its r gradient and the input's through the loops)."""
    _kernel_ops()
    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, kernel)
    model, x, y = _fused_case(*case)
    fused, aten = _fused_and_aten(monkeypatch, model, x, y, reduction)
    _assert_bit_equal(fused, aten, close=ALL)
    assert not all(torch.equal(fused[1][n], g) for n, g in aten[1].items())  # the loops ran: other roundings


def test_the_fused_loops_give_the_same_bits_on_any_number_of_threads(monkeypatch):
    """Each column's sums on one thread, in one order."""
    _kernel_ops()
    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, "0")  # the first layer's r gradient through the loops too
    for case in (FUSED_CASES[-2], FUSED_CASES[-1]):
        model, x, y = _fused_case(*case)
        one, two = _on_one_and_many_threads(functools.partial(_hand_written, model, x, y, "mean"))
        # the weights' gradients are MKL's products: they may differ
        assert torch.equal(two[0], one[0])
        for name, grad in one[1].items():
            assert name.endswith(".weight") or torch.equal(two[1][name], grad), name


@pytest.mark.parametrize("which", [5, 6, 7, 4], ids=["r", "s", "bias", "weight"])
def test_operands_the_fused_loops_cannot_index_go_to_atens_operators_which_refuse_them(which):
    """Layer 1's parameter one column too wide: the loops, which index by the shapes, would read past it."""
    ops = _kernel_ops()
    model, x, y = _fused_case("split", 2, 4, 12, 8, 5, 2)
    params = [p.detach() for layer in model.layers for p in (layer.weight, layer.r, layer.s, layer.bias)]
    good = ops.batchensemble_layers(x, y, params, [False] * 3, True, False, True, True)
    assert torch.isfinite(good[0]).all()
    bad = list(params)
    bad[which] = torch.ones(bad[which].size(0), bad[which].size(1) + 1)
    with pytest.raises(RuntimeError):
        ops.batchensemble_layers(x, y, bad, [False] * 3, True, False, True, True)


@pytest.mark.parametrize("batching", ["split", "repeat"])
def test_the_fused_loops_carry_a_nan_where_atens_operators_do(batching, monkeypatch):
    """A NaN in one example: NaN in the same losses and gradient elements (ReLU and its mask keep NaN, as ATen's)."""
    _kernel_ops()
    model, x, y = _fused_case(batching, 3, 4, 12, 8, 5, 2)
    x = x.clone()
    x.view(-1, 12)[5, 3] = float("nan")  # member 1's second example in split batching
    fused, aten = _fused_and_aten(monkeypatch, model, x, y)
    assert torch.isnan(aten[0]).any()
    assert batching == "repeat" or not torch.isnan(aten[0]).all()  # split: member 1's loss only
    assert torch.equal(torch.isnan(fused[0]), torch.isnan(aten[0]))
    for name, grad in aten[1].items():
        assert torch.equal(torch.isnan(fused[1][name]), torch.isnan(grad)), name
        assert torch.allclose(fused[1][name], grad, rtol=1e-5, atol=1e-6, equal_nan=True), name


@pytest.mark.parametrize("method", ["single", "classic", "sequential", "batchensemble"])
def test_a_cpu_training_step_builds_no_autograd_graph(method, profiled_step):
    data = make_synthetic(64, 16, (1, 3, 4), 4, 0)
    torch.manual_seed(0)
    if method == "sequential":  # training steps each member, an nn.Sequential, on its own
        model = build_model("classic", ModelConfig(hidden=8, ensemble_size=3, classic_mode="sequential"), 12, 4)
        model = model.members[0]
    else:
        model = build_model(method, ModelConfig(hidden=8, ensemble_size=3), 12, 4)
    names, _ = profiled_step(model, data)
    assert not any(n.startswith("autograd::engine") for n in names), sorted(names)
    stepped = manual.kernel_adam_weight(model)  # the classic ensemble's first layer on AVX-512: stepped, no gradient
    assert (stepped is not None) == (method == "classic" and native.ops().first_layer_fast())
    assert ("bench_core::first_layer_adam" in names) == (stepped is not None)
    assert all((p.grad is None) == (p is stepped) for p in model.parameters())


def _hook_cases():
    def forward_hook(model):
        model.layers[0].register_forward_hook(lambda *a: None)

    def pre_hook(model):
        model.register_forward_pre_hook(lambda *a: None)

    def tensor_hook(model):
        model.layers[1].weight.register_hook(lambda g: g)

    def accumulate_hook(model):
        model.layers[1].r.register_post_accumulate_grad_hook(lambda p: None)

    def frozen(model):
        model.layers[0].weight.requires_grad_(False)

    return {f.__name__: f for f in (forward_hook, pre_hook, tensor_hook, accumulate_hook, frozen)}


@pytest.mark.parametrize("case", sorted(_hook_cases()))
def test_hooks_and_frozen_parameters_go_through_autograd(case):
    model = _model("batchensemble", 12)
    x, _ = _batch(model, 12, False)
    assert manual.applies(model, x)
    _hook_cases()[case](model)
    assert not manual.applies(model, x)


def test_a_global_module_hook_goes_through_autograd():
    model = _model("classic", 12)
    x, _ = _batch(model, 12, False)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not manual.applies(model, x)
    finally:
        handle.remove()
    assert manual.applies(model, x)


@pytest.mark.usefixtures("step_path")
def test_sequential_members_equal_autograd_bit_for_bit():
    """The sequential classic ensemble trains each member, a plain MLP, with its own step."""
    model = _model("classic", 12, classic_mode="sequential")
    x, y = _batch(model, 12, False)
    for member in model.members:
        _assert_bit_equal(_hand_written(member, x, y, "sum"), _autograd(member, x, y, "sum"))


def test_what_it_does_not_cover(monkeypatch):
    x = torch.randn(6, 12)
    assert not manual.applies(_model("classic", 12, classic_mode="sequential"), x), "the members are trained, not it"
    assert not manual.applies(torch.nn.Sequential(torch.nn.Linear(12, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5)), x)
    assert not manual.applies(torch.nn.Sequential(torch.nn.Linear(12, 4), torch.nn.ReLU()), x)
    assert not manual.applies(_model("single", 12), x.view(1, 6, 12))
    classic = _model("classic", 12)
    assert not manual.applies(classic, x.view(3, 2, 12)), "per-member batches of the classic ensemble"
    assert not manual.applies(classic, x.to("meta")), "another device than the CPU"
    with torch.no_grad():
        assert not manual.applies(classic, x)
    monkeypatch.setenv(manual.ENV_SWITCH, "0")
    assert not manual.applies(classic, x)


def test_a_training_step_with_a_hook_runs_it():
    data = make_synthetic(64, 16, (1, 3, 4), 4, 0)
    model = _model("batchensemble", 12)
    calls = []
    model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    opt = training.make_optimizer(model.parameters(), 1e-2, torch.device("cpu"))
    training._Step(model, opt, data, True, "mean")(torch.arange(15))
    assert calls == [1]


def test_split_batches_of_the_wrong_member_count_are_refused():
    model = _model("batchensemble", 12, ensemble_size=3)
    x = torch.randn(2, 4, 12)
    with pytest.raises(ValueError, match=r"expected input \[B, D\] or \[3, B, D\]"):
        manual.forward_backward(model, x, torch.zeros(2, 4, dtype=torch.long), "mean")


@pytest.mark.parametrize("method", ["classic", "batchensemble"])
def test_a_batch_of_the_wrong_width_is_refused_as_the_models_forward_refuses_it(method):
    model = _model(method, 12)
    x = torch.randn(6, 11)
    with pytest.raises(ValueError, match=r"expected input \[B, 12\]"):
        model(x)
    with pytest.raises(ValueError, match=r"expected input \[B, 12\]"):
        manual.forward_backward(model, x, torch.zeros(6, dtype=torch.long), "sum")


@pytest.mark.usefixtures("step_path")
def test_a_split_batch_of_the_wrong_width_is_refused_and_the_cpp_steps_stay_on():
    model = _model("batchensemble", 12, ensemble_size=3)
    x = torch.randn(3, 4, 11)
    with pytest.raises(ValueError, match=r"expected input \[B, 12\] or \[3, B, 12\], got \(3, 4, 11\)"):
        model(x)
    with pytest.raises(ValueError, match=r"expected input \[B, 12\] or \[3, B, 12\], got \(3, 4, 11\)"):
        manual.forward_backward(model, x, torch.zeros(3, 4, dtype=torch.long), "mean")
    assert native._state["failed"] is None


@pytest.mark.parametrize(
    ("method", "split"), [("classic", False), ("batchensemble", False), ("batchensemble", True)]
)  # BatchEnsemble's through its own loss loop, which checks them as nll_loss does
def test_labels_out_of_range_raise_the_python_steps_error_and_leave_the_cpp_steps_on(method, split):
    if not native.warm_up():
        pytest.skip("no C++ steps on this machine")
    model = _model(method, 12)
    x, y = _batch(model, 12, split)
    with pytest.raises(IndexError, match="out of bounds"):
        manual.forward_backward(model, x, y + 5, "sum")
    assert native.enabled()


def test_a_failing_cpp_step_warns_once_and_the_python_step_computes_it(monkeypatch):
    if not native.warm_up():
        pytest.skip("no C++ steps on this machine")
    model = _model("batchensemble", 12)
    x, y = _batch(model, 12, True)
    want = _autograd(model, x, y, "mean")

    def broken(*args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(manual, "_native_step", broken)
    with pytest.warns(RuntimeWarning, match=r"^C\+\+ training steps are off \(RuntimeError: boom\); running the"):
        _assert_bit_equal(_hand_written(model, x, y, "mean"), want)
    assert not native.enabled() and native.ops() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        _assert_bit_equal(_hand_written(model, x, y, "mean"), want)


def _on_one_thread(f):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return f()
    finally:
        torch.set_num_threads(before)


def _chunked(a, b, bias=None):
    """``bench_core::chunked_product``: (a @ b + bias, the number of chunks it took)."""
    if native.compiler() is None:
        pytest.skip("no C++ compiler: the C++ steps cannot be built here")
    assert native.warm_up(), native.why_off()
    return native.ops().chunked_product(a, b, bias)


def _operands(m: int, k: int, n: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=gen, dtype=dtype), torch.randn(k, n, generator=gen, dtype=dtype)
    return a, b, torch.randn(n, generator=gen, dtype=dtype)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(125, 3072, 128), (128, 3072, 640), (64, 1031, 96)],  # split's and classic's first layers (CIFAR-10, E = 5); odd
)
def test_wide_products_on_two_threads_are_two_single_threaded_halves_added(m, k, n, with_bias, two_threads):
    a, b, bias = _operands(m, k, n)
    bias = bias if with_bias else None
    got, chunks = _chunked(a, b, bias)
    assert chunks == 2
    h = k // 2
    halves = _on_one_thread(
        lambda: (torch.addmm(bias, a[:, :h], b[:h]) if with_bias else a[:, :h] @ b[:h]) + a[:, h:] @ b[h:]
    )
    assert torch.equal(got, halves)  # (bias + a₀ b₀) + a₁ b₁, bit for bit
    want = torch.addmm(bias, a, b) if with_bias else a @ b
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # and the product, to float32's rounding


WHOLE_PRODUCT_CASES = [
    "switched off", "switched off, blanks", "one thread", "three threads", "transposed weight", "narrow", "small",
    "float64",
]  # fmt: skip


@pytest.mark.parametrize("case", WHOLE_PRODUCT_CASES)
def test_products_stay_one_product_where_halves_do_not_apply(case, two_threads, monkeypatch):
    m, k, n, dtype = 125, 3072, 128, torch.float32
    if case == "narrow":
        k = 511  # two chunks of at least 256
    elif case == "small":
        m, k, n = 8, 1024, 64  # under 2²² multiply-adds
    elif case == "float64":
        dtype = torch.float64
    a, b, bias = _operands(m, k, n, dtype)
    if case == "transposed weight":
        b = b.t().contiguous().t()  # nn.Linear's layout: halves took longer there
    if case.startswith("switched off"):
        monkeypatch.setenv(manual.ENV_CHUNKED, " 0 " if "blanks" in case else "0")
    threads = {"one thread": 1, "three threads": 3}.get(case, 2)
    torch.set_num_threads(threads)
    got, chunks = _chunked(a, b, bias)
    assert chunks == 0
    assert torch.equal(got, torch.addmm(bias, a, b))


def test_another_value_of_the_switch_keeps_the_halves(two_threads, monkeypatch):
    monkeypatch.setenv(manual.ENV_CHUNKED, "1")
    assert _chunked(*_operands(125, 3072, 128))[1] == 2


@pytest.mark.parametrize(("method", "batching"), [("classic", "repeat"), ("batchensemble", "split")])
def test_wide_first_layers_in_halves_train_as_autograd_to_float32s_rounding(method, batching, two_threads, monkeypatch):
    """A first layer wide enough for halves (1024 inputs, 64 rows, 96 outputs a member): the C++ step within
    rounding of autograd's, and the classic one bit for bit with the halves switched off."""
    if native.compiler() is None:
        pytest.skip("no C++ compiler: the C++ steps cannot be built here")
    assert native.warm_up(), native.why_off()
    torch.manual_seed(0)
    members, width = 4, 1024
    model = build_model(method, ModelConfig(hidden=96, depth=1, ensemble_size=members), width, 5)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, width, generator=gen), torch.randint(0, 5, (64,), generator=gen)
    if batching == "split":
        x, y = x.view(members, 16, width), y.view(members, 16)
    outputs = 96 if batching == "split" else 96 * members  # split: one weight; classic: the members' side by side
    assert native.ops().chunked_product(torch.randn(64, width), torch.randn(width, outputs), None)[1] == 2
    want = _autograd(model, x, y, "mean")
    got = _hand_written(model, x, y, "mean")
    _assert_bit_equal(got, want, close=ALL)
    if method == "classic":
        monkeypatch.setenv(manual.ENV_CHUNKED, "0")
        _assert_bit_equal(_hand_written(model, x, y, "mean"), want)


def test_the_cpu_steps_path_is_described_as_it_runs(two_threads, monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C++ compiler: the C++ steps cannot be built here")
    cpp = "forward and backward written out without autograd, as C++ operators (bench_core.native); "
    products = "first layers through autograd's products and Adam's own step"
    on_onednn = onednn.usable(torch.ones(1))
    halves = "first-layer products through oneDNN, each as one product" if on_onednn else manual.CHUNKED_PRODUCTS
    loops = "; " + manual.FUSED_LOOPS + "; " + manual.ONE_CALL_STEPS + "; " + halves
    if native.ops().first_layer_fast():
        assert manual.describe_cpu_steps() == cpp + manual.FIRST_LAYER_KERNELS + loops
        assert "Adam's step on the classic ensemble's first-layer weight" in manual.FIRST_LAYER_KERNELS
    else:
        assert manual.describe_cpu_steps() == cpp + products + " (no AVX-512 on this CPU for their kernels)" + loops
    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, "0")
    assert manual.describe_cpu_steps() == cpp + products + " (BENCH_FIRST_LAYER_KERNEL=0)" + loops
    monkeypatch.setenv(manual.ENV_FUSED, "0")
    assert manual.describe_cpu_steps().endswith(
        "; BatchEnsemble's element-wise work and loss through ATen's operators (BENCH_FUSED_LOOPS=0); "
        + manual.ONE_CALL_STEPS
        + "; "
        + halves
    )
    monkeypatch.setenv(manual.ENV_ONE_CALL, "0")
    assert manual.describe_cpu_steps().endswith(
        "; each step's gathers and Adam's step called from Python (BENCH_ONE_CALL_STEP=0); " + halves
    )
    monkeypatch.setenv(manual.ENV_CHUNKED, "0")
    assert manual.describe_cpu_steps().endswith(
        "; first-layer products each as one threaded product (BENCH_CHUNKED_PRODUCTS=0)"
    )
    monkeypatch.delenv(manual.ENV_CHUNKED)
    torch.set_num_threads(1)
    assert manual.describe_cpu_steps().endswith(
        "; first-layer products each as one threaded product (torch runs on 1 thread: halves only on two)"
    )
    torch.set_num_threads(2)
    monkeypatch.delenv(manual.ENV_ONE_CALL)
    with pytest.warns(RuntimeWarning, match="Training steps as one C\\+\\+ call are off"):
        manual.one_call_failed(RuntimeError("broken\nmore"))
    assert manual.describe_cpu_steps().endswith(
        "; each step's gathers and Adam's step called from Python (RuntimeError: broken); " + halves
    )
    manual.reset()
    monkeypatch.delenv(manual.ENV_FIRST_LAYER_KERNEL)
    monkeypatch.delenv(manual.ENV_FUSED)
    assert native.why_off() is None
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert manual.describe_cpu_steps().endswith("in Python (BENCH_NATIVE=0)")
    monkeypatch.delenv(native.ENV_SWITCH)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ training steps are off"):
        native.disable(RuntimeError("boom\nmore"))
    assert native.why_off() == "RuntimeError: boom"
    assert manual.describe_cpu_steps().endswith("without autograd, in Python (RuntimeError: boom)")
    monkeypatch.setenv(manual.ENV_SWITCH, "0")
    assert manual.describe_cpu_steps() == "through autograd (BENCH_MANUAL_BACKWARD=0)"


# --- BatchEnsemble's first-layer kernel (bench_core::first_layer_grads) ----------------------------


def _kernel_ops():
    if native.compiler() is None:
        pytest.skip("no C++ compiler: the C++ steps cannot be built here")
    assert native.warm_up(), native._state["failed"]
    return native.ops()


def _first_layer_case(n_members: int, rows: int, n_in: int, n_out: int, seed: int = 0, shared: bool = False):
    """(x, grad_z, weight, r): x [E, rows, in] (split batching), or [rows, in] with ``shared`` (repeat)."""
    gen = torch.Generator().manual_seed(seed)
    x_shape = (rows, n_in) if shared else (n_members, rows, n_in)
    return [
        torch.randn(*shape, generator=gen)
        for shape in (x_shape, (n_members, rows, n_out), (n_in, n_out), (n_members, n_in))
    ]


def _first_layer_autograd(x, grad_z, weight, r, dtype=torch.float64):
    """W's and r's gradients of Σ z ∘ grad_z, z_m = (x_m ∘ r_m) W (x_m = x if x is 2-D), by autograd (float64)."""
    weight = weight.to(dtype).requires_grad_()
    r = r.to(dtype).requires_grad_()
    z = torch.matmul(x.to(dtype) * r.unsqueeze(1), weight)  # (E, b, out); a 2-D x broadcasts over the members
    (z * grad_z.to(dtype)).sum().backward()
    return weight.grad, r.grad


@pytest.mark.parametrize(
    ("n_members", "rows", "n_in", "n_out"),
    [
        (5, 25, 3072, 128),  # the seed's first layer, a CIFAR-10 batch of 125 split among 5
        (3, 7, 25, 65),  # a last panel of 1 row; 64 columns and 1 more
        (4, 3, 50, 17),  # fewer columns than a tile
        (2, 4, 48, 64),  # whole panels and tiles only
        (8, 16, 784, 100),  # MNIST-shaped, 8 members
        (1, 128, 12, 200),  # one member
        (2, 1, 1, 1),
        (3, 0, 30, 20),  # no rows: zero gradients
        (2, 3, 0, 5),
        (2, 3, 5, 0),
    ],
)
@pytest.mark.parametrize("shared", [False, True], ids=["split", "repeat"])
def test_the_first_layer_kernel_computes_the_first_layers_gradients(n_members, rows, n_in, n_out, shared):
    ops = _kernel_ops()
    x, grad_z, weight, r = _first_layer_case(n_members, rows, n_in, n_out, shared=shared)
    grad_w, grad_r = ops.first_layer_grads(x, grad_z, weight, r)
    want_w, want_r = _first_layer_autograd(x, grad_z, weight, r)
    assert grad_w.shape == weight.shape and grad_r.shape == r.shape
    assert grad_w.dtype == torch.float32 and grad_r.dtype == torch.float32
    for got, want in ((grad_w, want_w), (grad_r, want_r)):
        if want.numel():
            assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
    # as close to the exact sums as autograd's own float32 products are (here within 2x of their error)
    if rows and n_in and n_out:
        f32_w, f32_r = _first_layer_autograd(x, grad_z, weight, r, torch.float32)
        assert (grad_w.double() - want_w).abs().max() <= 2 * (f32_w.double() - want_w).abs().max() + 1e-12
        assert (grad_r.double() - want_r).abs().max() <= 2 * (f32_r.double() - want_r).abs().max() + 1e-12


@pytest.mark.parametrize("shared", [False, True], ids=["split", "repeat"])
def test_the_first_layer_kernel_gives_the_same_bits_on_any_number_of_threads(shared):
    ops = _kernel_ops()
    case = _first_layer_case(5, 25, 3072, 128, seed=3, shared=shared)
    one, many = _on_one_and_many_threads(lambda: ops.first_layer_grads(*case))
    assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True))


@pytest.mark.parametrize(
    "change",
    [
        "float64 x",
        "transposed weight",
        "non-contiguous x",
        "r of another width",
        "grad_z of other rows",
        "2-D x of other rows",
        "1-D x",
    ],
)
def test_the_first_layer_kernel_refuses_what_it_cannot_compute(change):
    ops = _kernel_ops()
    x, grad_z, weight, r = _first_layer_case(2, 3, 6, 4)
    if change == "float64 x":
        x = x.double()
    elif change == "transposed weight":
        weight = weight.t().contiguous().t()
    elif change == "non-contiguous x":
        x = torch.randn(2, 6, 3).transpose(1, 2)
    elif change == "r of another width":
        r = torch.randn(2, 5)
    elif change == "grad_z of other rows":
        grad_z = torch.randn(2, 4, 4)
    elif change == "2-D x of other rows":
        x = x[0, :2]
    else:
        x = x[0, 0]
    with pytest.raises(RuntimeError, match=r"first_layer_grads: x \[E, b, in\] or \[b, in\], grad_z \[E, b, out\]"):
        ops.first_layer_grads(x, grad_z, weight, r)


def _ran_kernel(model, x, y, name: str = "bench_core::first_layer_grads") -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        manual.forward_backward(model, x, y, "mean")
    return any(e.name == name for e in prof.events())


def _avx512_cpu() -> bool:
    """Whether /proc/cpuinfo lists the AVX-512 subsets the kernel's fast build needs (x86-64-v4's)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"))


def test_the_first_layer_kernel_is_used_where_the_cpu_has_avx512():
    """This project's machine has AVX-512: there the kernel must be in use, not quietly off."""
    ops = _kernel_ops()
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        assert not ops.first_layer_fast()
    else:
        assert ops.first_layer_fast() == _avx512_cpu()


def test_the_first_layer_kernel_runs_in_float32_batchensemble_steps_only(monkeypatch):
    ops = _kernel_ops()
    model = _model("batchensemble", 12)
    x, y = _batch(model, 12, True)
    assert _ran_kernel(model, x, y) == ops.first_layer_fast()
    repeat_x, repeat_y = _batch(model, 12, False)
    assert _ran_kernel(model, repeat_x, repeat_y) == ops.first_layer_fast()
    classic = _model("classic", 12)
    assert not _ran_kernel(classic, *_batch(classic, 12, False)), "the classic ensemble's has its own kernel"
    model64 = _model("batchensemble", 12).double()
    x64, y64 = _batch(model64, 12, True, dtype=torch.float64)
    assert not _ran_kernel(model64, x64, y64)
    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, "0")
    assert not _ran_kernel(model, x, y)
    assert not _ran_kernel(model, repeat_x, repeat_y)


def test_a_split_batch_the_kernel_cannot_read_goes_through_the_products_bit_for_bit():
    _kernel_ops()
    model = _model("batchensemble", 12)
    x, y = _batch(model, 12, True)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, laid out [E, in, b]
    assert not x.is_contiguous()
    assert not _ran_kernel(model, x, y)
    _assert_bit_equal(_hand_written(model, x, y, "sum"), _autograd(model, x, y, "sum"))


# --- Adam's step made by the classic ensemble's first-layer kernel (first_layer_adam) --------------

ADAM = (1e-2, 0.9, 0.999, 1e-8)  # lr, beta1, beta2, eps


def _moments(shape, seed: int = 5):
    """(exp_avg, exp_avg_sq, step) of a weight some steps into training."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) * 1e-2, torch.rand(*shape, generator=gen) * 1e-4, torch.tensor(3.0)]


def _fused_adam(weight, grad, exp_avg, exp_avg_sq, step, weight_decay=0.0, settings=ADAM):
    """torch.optim.Adam(fused=True)'s step, as bench_core.optim makes it: the count, then _fused_adam_."""
    torch._foreach_add_([step], 1)
    lr, beta1, beta2, eps = settings
    torch._fused_adam_(
        [weight], [grad], [exp_avg], [exp_avg_sq], [], [step], amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
        weight_decay=weight_decay, eps=eps, maximize=False, grad_scale=None, found_inf=None,
    )  # fmt: skip


# The torch whose fused CPU Adam the kernel's arithmetic was matched against, operation by operation
# (older ones, which the requirements admit, formed exp_avg without lerp: there within rounding).
ADAM_BITS_FROM = (2, 14)


def _assert_adams_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to the last bit but for the last numel % 16 elements, which fused Adam steps in its scalar
    loop (rounded its own way: there within float32's rounding)."""
    vector = got.numel() - got.numel() % 16
    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < ADAM_BITS_FROM:
        vector = 0
    assert torch.equal(got.reshape(-1)[:vector], want.reshape(-1)[:vector])
    assert torch.allclose(got.reshape(-1)[vector:], want.reshape(-1)[vector:], rtol=1e-6, atol=1e-12)


def _adam_kernel_ops():
    ops = _kernel_ops()
    if not ops.first_layer_fast():
        pytest.skip("the kernels that make Adam's step run on AVX-512 CPUs only")
    return ops


def _clones(*tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize(
    ("weight_decay", "settings"),
    [(0.0, ADAM), (0.1, ADAM), (0.0, (1e-3, 0.3, 0.9, 1e-6))],  # beta1 0.3: Adam's lerp takes its other form
    ids=["adam", "weight-decay", "small-beta1"],
)
@pytest.mark.parametrize(
    ("rows", "n_in", "n_out"),
    [(128, 3072, 640), (1, 50, 70), (7, 25, 16), (33, 49, 65), (16, 1, 1), (4, 0, 3), (4, 3, 0)],
)
def test_the_classic_first_layer_kernel_makes_adams_step_with_the_products_gradient(
    rows, n_in, n_out, weight_decay, settings
):
    """W, its moments and its step count as the product xᵀ dz then fused Adam leave them (3 steps).

    With one row the gradient is one product per element, the same bits in any order: there the
    step must be Adam's to the last bit (but for the elements fused Adam leaves to its scalar loop);
    with more rows the sums' order may differ from the product's.
    """
    ops = _adam_kernel_ops()
    gen = torch.Generator().manual_seed(rows + n_in)
    weight = torch.randn(n_in, n_out, generator=gen) * 0.05
    got, want = [weight.clone(), *_moments(weight.shape)], [weight.clone(), *_moments(weight.shape)]
    for _ in range(3):
        x, grad_z = torch.randn(rows, n_in, generator=gen), torch.randn(rows, n_out, generator=gen) * 1e-2
        ops.first_layer_adam(x, grad_z, *got, *settings, weight_decay)
        _fused_adam(*want[:1], x.t() @ grad_z, *want[1:], weight_decay=weight_decay, settings=settings)
    assert float(got[3]) == float(want[3]) == 6.0
    for a, b in zip(got[:3], want[:3], strict=True):
        if a.numel():
            assert (a - b).abs().max() <= 1e-6 * b.abs().max()
        if rows == 1:
            _assert_adams_bits(a, b)
    if n_in and n_out:
        assert not torch.equal(got[0], weight)


def test_the_adam_kernel_gives_the_same_bits_on_any_number_of_threads():
    ops = _adam_kernel_ops()
    gen = torch.Generator().manual_seed(4)
    x, grad_z = torch.randn(128, 3072, generator=gen), torch.randn(128, 640, generator=gen)
    weight = torch.randn(3072, 640, generator=gen)

    def step():
        classic = [weight.clone(), *_moments(weight.shape)]
        ops.first_layer_adam(x, grad_z, *classic, *ADAM, 0.0)
        return classic

    runs = _on_one_and_many_threads(step)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize(
    "change",
    ["float64 exp_avg", "exp_avg of another shape", "non-contiguous exp_avg_sq", "two step counts", "x of other width"],
)
def test_the_adam_kernel_refuses_what_it_cannot_step_and_changes_nothing(change):
    ops = _adam_kernel_ops()
    gen = torch.Generator().manual_seed(6)
    x, grad_z, weight = torch.randn(3, 6, generator=gen), torch.randn(3, 4, generator=gen), torch.randn(6, 4)
    exp_avg, exp_avg_sq, step = _moments(weight.shape)
    if change == "float64 exp_avg":
        exp_avg = exp_avg.double()
    elif change == "exp_avg of another shape":
        exp_avg = exp_avg[:5]
    elif change == "non-contiguous exp_avg_sq":
        exp_avg_sq = exp_avg_sq.t().contiguous().t()
    elif change == "two step counts":
        step = torch.tensor([3.0, 3.0])
    else:
        x = x[:, :5].contiguous()
    before = _clones(weight, exp_avg, exp_avg_sq, step)
    with pytest.raises(RuntimeError, match=r"^first_layer_adam: x \[B, in\], grad_z \[B, out\].*one-element step"):
        ops.first_layer_adam(x, grad_z, weight, exp_avg, exp_avg_sq, step, *ADAM, 0.0)
    for a, b in zip((weight, exp_avg, exp_avg_sq, step), before, strict=True):
        assert torch.equal(a, b)


def _train_steps(method: str, split: bool, n_steps: int = 3, **adam):
    """A model after ``n_steps`` CPU training steps (``training._Step``), with its step."""
    data = make_synthetic(64, 16, (1, 3, 4), 4, 0)
    torch.manual_seed(0)
    model = build_model(method, ModelConfig(hidden=8, ensemble_size=4), 12, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True, **adam)
    step = training._Step(model, opt, data, split, training.loss_reduction(model))
    for i in range(n_steps):
        step(torch.arange(16) + 16 * i)
    return model, step


def test_training_steps_leave_the_kernels_weight_stepped_without_a_gradient(monkeypatch):
    """From the second step (Adam's state is made by its own first), the classic ensemble's first-layer
    weight is stepped by the kernel: no gradient, its step count with the others', training as with
    the kernels off. BatchEnsemble's weights all get their gradients, and Adam's own step."""
    _adam_kernel_ops()
    for method, split in (("batchensemble", False), ("batchensemble", True)):
        model, step = _train_steps(method, split)
        assert step.kernel_weight is None and all(p.grad is not None for p in model.parameters())
    method, split = "classic", False
    model, step = _train_steps(method, split)
    weight = step.kernel_weight
    assert weight is manual.kernel_adam_weight(model) and weight is not None
    assert weight.grad is None and all(p.grad is not None for p in model.parameters() if p is not weight)
    assert all(float(s["step"]) == 3.0 for s in step.opt.state.values())
    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, "0")
    off, off_step = _train_steps(method, split)
    assert off_step.kernel_weight is None
    for a, b in zip(model.parameters(), off.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
def test_with_onednn_off_the_classic_steps_stay_in_cpp_and_the_kernel_steps_the_weight(vendor, monkeypatch):
    """Without oneDNN the first layer's product is torch's; in the transposed layout (CPUs other than
    Intel's) the gradient it hands the kernel came out of the backward transposed: the kernel gets it
    laid out as it reads it (it refused it before, which turned the C++ steps off for the process)."""
    _adam_kernel_ops()
    monkeypatch.setitem(onednn._vendor, "id", vendor)
    monkeypatch.setenv(onednn.ENV_SWITCH, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, step = _train_steps("classic", False)
    assert native.why_off() is None
    assert step.kernel_weight is not None and step.kernel_weight.grad is None
    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, "0")
    off, _ = _train_steps("classic", False)
    for a, b in zip(model.parameters(), off.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adam", [{"amsgrad": True}, {"maximize": True}, {"weight_decay": 0.1}])
def test_adam_settings_the_kernels_do_not_make_go_through_adams_own_step(adam, monkeypatch):
    """amsgrad and maximize: Adam's own step (with the weight's gradient); weight decay: the kernel makes it."""
    _adam_kernel_ops()
    model, step = _train_steps("classic", False, **adam)
    in_kernel = "weight_decay" in adam
    assert (step.kernel_weight.grad is None) == in_kernel
    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, "0")
    off, _ = _train_steps("classic", False, **adam)
    for a, b in zip(model.parameters(), off.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_with_adams_direct_call_off_the_weight_gets_its_gradient(monkeypatch):
    _adam_kernel_ops()
    monkeypatch.setenv("BENCH_FAST_ADAM", "0")
    _, step = _train_steps("classic", False)
    assert step.kernel_weight is not None and step.kernel_weight.grad is not None
