"""Every model against plain PyTorch reference modules, value by value and gradient by gradient."""

import warnings

import pytest
import torch
from torch import nn

from bench_core.config import ModelConfig, TrainConfig
from bench_core.models import (
    BatchEnsembleLinear,
    BatchEnsembleMLP,
    SequentialEnsemble,
    SingleMLP,
    VectorizedEnsemble,
    build_mlp,
    build_model,
    ensemble_linear,
    shared_input_linear,
)

SIZES = [12, 7, 5, 3]


def test_build_mlp_matches_seed_architecture():
    mlp = build_mlp([3072, 128, 128, 10])
    kinds = [type(m) for m in mlp]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert sum(p.numel() for p in mlp.parameters()) == 3072 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10


@pytest.mark.parametrize("shared", [True, False])
def test_vectorized_member_equals_plain_mlp(shared):
    torch.manual_seed(0)
    model = VectorizedEnsemble(SIZES, ensemble_size=4)
    x = torch.randn(6, SIZES[0]) if shared else torch.randn(4, 6, SIZES[0])
    out = model(x)
    assert out.shape == (4, 6, SIZES[-1])
    for k in range(4):
        ref = model.member(k)
        xk = x if shared else x[k]
        torch.testing.assert_close(out[k], ref(xk), rtol=1e-5, atol=1e-6)


def test_vectorized_gradients_equal_plain_mlp_gradients():
    torch.manual_seed(1)
    members = [build_mlp(SIZES) for _ in range(3)]
    model = VectorizedEnsemble.from_members(members)
    x = torch.randn(8, SIZES[0])
    y = torch.randint(0, SIZES[-1], (8,))
    logits = model(x)
    sum(nn.functional.cross_entropy(logits[k], y) for k in range(3)).backward()
    for k, ref in enumerate(members):
        nn.functional.cross_entropy(ref(x), y).backward()
        linears = [m for m in ref if isinstance(m, nn.Linear)]
        for li, lin in enumerate(linears):
            grad = model.weights[li].grad  # layer 0 [in, E, out], later layers [E, in, out]
            grad_k = (grad[:, k] if li == 0 else grad[k]).t()
            torch.testing.assert_close(grad_k, lin.weight.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model.biases[li].grad[k], lin.bias.grad, rtol=1e-5, atol=1e-6)


def test_vectorized_and_sequential_start_from_same_weights_under_same_seed():
    torch.manual_seed(5)
    seq = SequentialEnsemble(SIZES, 3)
    torch.manual_seed(5)
    vec = VectorizedEnsemble(SIZES, 3)
    x = torch.randn(4, SIZES[0])
    torch.testing.assert_close(seq(x), vec(x), rtol=1e-5, atol=1e-6)


def test_sequential_members_are_independent_mlps():
    torch.manual_seed(0)
    model = SequentialEnsemble(SIZES, 2)
    x = torch.randn(3, SIZES[0])
    out = model(x)
    assert out.shape == (2, 3, SIZES[-1])
    torch.testing.assert_close(out[1], model.member(1)(x))
    assert not torch.allclose(out[0], out[1])


def test_ensemble_linear_rejects_wrong_member_count():
    with pytest.raises(ValueError, match=r"\[3, B, D\]"):
        ensemble_linear(torch.randn(2, 4, 5), torch.randn(3, 6, 5), torch.randn(3, 6))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("init", ["normal", "random_sign"])
def test_batchensemble_linear_member_equals_nn_linear(shared, init):
    """Member k must equal an nn.Linear with weight W ∘ (s_k r_kᵀ) and bias b_k: outputs and gradients."""
    torch.manual_seed(2)
    layer = BatchEnsembleLinear(6, 4, ensemble_size=3, init=init)
    x = torch.randn(5, 6) if shared else torch.randn(3, 5, 6)
    out = layer(x)
    assert out.shape == (3, 5, 4)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    assert layer.weight.shape == (6, 4)  # [in, out], the paper's layout
    grad_w = torch.zeros_like(layer.weight)
    for k in range(3):
        # The reference is built from the raw tensors, by the formula, not from the layer's helpers.
        w = layer.weight.detach().clone().requires_grad_(True)
        r = layer.r.detach()[k].clone().requires_grad_(True)
        s = layer.s.detach()[k].clone().requires_grad_(True)
        b = layer.bias.detach()[k].clone().requires_grad_(True)
        xk = x if shared else x[k]
        ref = xk @ (w * torch.outer(r, s)) + b
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-6)
        (ref * grad_out[k]).sum().backward()
        torch.testing.assert_close(layer.r.grad[k], r.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.s.grad[k], s.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.bias.grad[k], b.grad, rtol=1e-5, atol=1e-5)
        grad_w += w.grad
    torch.testing.assert_close(layer.weight.grad, grad_w, rtol=1e-5, atol=1e-5)


def test_batchensemble_as_linear_is_an_nn_linear_with_folded_weight():
    torch.manual_seed(3)
    layer = BatchEnsembleLinear(6, 4, ensemble_size=2)
    lin = layer.as_linear(1)
    assert isinstance(lin, nn.Linear)
    expected = (layer.weight * torch.outer(layer.r[1], layer.s[1])).t()
    torch.testing.assert_close(lin.weight, expected)
    torch.testing.assert_close(lin.bias, layer.bias[1])


def test_batchensemble_has_one_bias_per_member():
    torch.manual_seed(0)
    layer = BatchEnsembleLinear(6, 4, ensemble_size=3)
    assert layer.bias.shape == (3, 4)
    assert not torch.allclose(layer.bias[0], layer.bias[1])


def test_batchensemble_init_options():
    torch.manual_seed(0)
    signs = BatchEnsembleLinear(50, 40, 4, init="random_sign")
    assert set(signs.r.unique().tolist()) == {-1.0, 1.0}
    assert set(signs.s.unique().tolist()) == {-1.0, 1.0}
    normal = BatchEnsembleLinear(500, 400, 4, init="normal", init_std=0.1)
    assert abs(normal.r.mean().item() - 1.0) < 0.02
    assert abs(normal.r.std().item() - 0.1) < 0.02
    with pytest.raises(ValueError, match="fast-weight init"):
        BatchEnsembleLinear(3, 3, 2, init="zeros")


def test_batchensemble_mlp_member_equals_plain_mlp_both_input_layouts():
    torch.manual_seed(4)
    model = BatchEnsembleMLP(SIZES, ensemble_size=3)
    x = torch.randn(5, SIZES[0])
    out = model(x)
    out_split = model(x.expand(3, 5, SIZES[0]))
    torch.testing.assert_close(out, out_split, rtol=1e-5, atol=1e-6)
    for k in range(3):
        torch.testing.assert_close(out[k], model.member(k)(x), rtol=1e-5, atol=1e-6)


def test_single_mlp_layout_and_member():
    model = SingleMLP(SIZES)
    x = torch.randn(2, SIZES[0])
    assert model(x).shape == (1, 2, SIZES[-1])
    torch.testing.assert_close(model(x)[0], model.member(0)(x))
    with pytest.raises(IndexError):
        model.member(1)


@pytest.mark.parametrize(
    ("method", "mode", "kind"),
    [
        ("single", "vectorized", SingleMLP),
        ("classic", "vectorized", VectorizedEnsemble),
        ("classic", "sequential", SequentialEnsemble),
        ("batchensemble", "vectorized", BatchEnsembleMLP),
    ],
)
def test_build_model(method, mode, kind):
    model = build_model(method, ModelConfig(hidden=8, ensemble_size=3, classic_mode=mode), 12, 4)
    assert isinstance(model, kind)
    e = 1 if method == "single" else 3
    assert model(torch.randn(2, 12)).shape == (e, 2, 4)


def test_build_model_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        build_model("bagging", ModelConfig(), 12, 4)


def test_parameter_counts():
    cfg = ModelConfig(hidden=128, depth=2, ensemble_size=5)
    single = sum(p.numel() for p in build_model("single", cfg, 3072, 10).parameters())
    classic = sum(p.numel() for p in build_model("classic", cfg, 3072, 10).parameters())
    be = sum(p.numel() for p in build_model("batchensemble", cfg, 3072, 10).parameters())
    assert classic == 5 * single
    weights = 3072 * 128 + 128 * 128 + 128 * 10
    fast_and_bias = 5 * ((3072 + 128 + 128) + (128 + 128 + 128) + (128 + 10 + 10))
    assert be == weights + fast_and_bias


@pytest.mark.parametrize(("block_rows", "compiled"), [(512, False), (2, False), (512, True)])
def test_shared_input_batchensemble_gradcheck_including_input(block_rows, compiled, monkeypatch):
    """The hand-written backward of the first layer against finite differences (float64).

    With blocks of 2 input rows, its eager gradient reductions go over three blocks, the last one
    short; compiled, they are one kernel.
    """
    from bench_core import kernels, models
    from bench_core.models import _SharedInputBatchEnsemble

    monkeypatch.setattr(models, "FOLD_GRAD_ROWS", block_rows)
    if compiled:
        _require_compiled_kernels()
    else:
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")

    torch.manual_seed(7)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SharedInputBatchEnsemble.apply, (x, w, r, s, b))


def test_shared_input_linear_gradcheck_including_input():
    """The classic first layer's hand-written backward against finite differences (float64)."""
    from bench_core.models import _SharedInputLinear

    torch.manual_seed(8)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SharedInputLinear.apply, (x, w, b))


def test_shared_input_linear_matches_each_member_and_rejects_a_wrong_input():
    torch.manual_seed(9)
    x, w, b = torch.randn(6, 5), torch.randn(5, 3, 4), torch.randn(3, 4)
    out = shared_input_linear(x, w, b)
    assert out.shape == (3, 6, 4)
    for k in range(3):
        torch.testing.assert_close(out[k], x @ w[:, k] + b[k])
    with pytest.raises(ValueError, match=r"expected input \[B, 5\]"):
        shared_input_linear(torch.randn(6, 4), w, b)


@pytest.mark.parametrize("kind", ["classic", "batchensemble"])
def test_weights_saved_in_the_old_out_in_layout_load_converted(kind, tmp_path):
    """State dicts of version 1 stored every weight nn.Linear-style [out, in]; they load converted."""
    torch.manual_seed(10)
    model = build_model(kind, ModelConfig(hidden=7, ensemble_size=3), 12, 4)
    x = torch.randn(5, 12)
    expected = model(x)
    old = model.state_dict()
    for key in list(old):
        if key.endswith("weight") and kind == "batchensemble":
            old[key] = old[key].t().contiguous()
        elif key == "weights.0":
            old[key] = old[key].permute(1, 2, 0).contiguous()  # [in, E, out] -> [E, out, in]
        elif key.startswith("weights."):
            old[key] = old[key].transpose(1, 2).contiguous()  # [E, in, out] -> [E, out, in]
    for meta in old._metadata.values():
        meta["version"] = 1
    torch.save(old, tmp_path / "old.pt")
    fresh = build_model(kind, ModelConfig(hidden=7, ensemble_size=3), 12, 4)
    fresh.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    torch.testing.assert_close(fresh(x), expected)
    fresh.load_state_dict(model.state_dict())  # the current layout loads as it is
    torch.testing.assert_close(fresh(x), expected)
    # Dicts rebuilt without torch's metadata (no versions): the shapes tell the layouts apart, the
    # square 7 x 7 hidden layers included, in either layout.
    for plain in (dict(model.state_dict()), {key: value for key, value in old.items()}):
        assert not hasattr(plain, "_metadata")
        fresh = build_model(kind, ModelConfig(hidden=7, ensemble_size=3), 12, 4)
        fresh.load_state_dict(plain)
        torch.testing.assert_close(fresh(x), expected)


# --- the compiled CPU kernel of the first layer's backward ---------------------------------------


def _require_compiled_kernels():
    import shutil

    from bench_core import kernels

    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler: torch.compile can't build CPU kernels here")
    assert kernels.enabled(), "compiled kernels were turned off or failed earlier in this process"


def _fold_grads_by_definition(g, w, r):
    """dW = Σ_k G_k ∘ r_k 1ᵀ and dr_k = Σ_o G_k ∘ W, one member and one output at a time (float64)."""
    g, w, r = g.double(), w.double(), r.double()
    n_in, n_members, n_out = g.shape
    dw = torch.zeros(n_in, n_out, dtype=torch.float64)
    dr = torch.zeros(n_members, n_in, dtype=torch.float64)
    for k in range(n_members):
        dw += g[:, k, :] * r[k].unsqueeze(1)
        for o in range(n_out):
            dr[k] += g[:, k, o] * w[:, o]
    return dw, dr


@pytest.mark.parametrize("shape", [(3072, 5, 128), (70, 1, 3), (1030, 8, 16)])
def test_fold_grads_compiled_and_eager_match_the_definition(shape, monkeypatch):
    from bench_core import kernels, models

    _require_compiled_kernels()
    torch.manual_seed(11)
    g, w, r = torch.randn(*shape), torch.randn(shape[0], shape[2]), torch.randn(shape[1], shape[0])
    want = _fold_grads_by_definition(g, w, r)
    compiled = kernels.run_fold_grads(g, w, r)
    assert compiled is not None, "the kernel compiled and ran"
    assert kernels.warm_up(*shape) and kernels.warm_up(*shape), "warmed, then remembered"
    assert (*shape, torch.float32) in kernels._state["warmed"] and kernels.is_warm(*shape)
    assert not kernels.is_warm(17, 3, 5), "a size never run here would compile"
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.run_fold_grads(g, w, r) is None, "switched off: the caller runs its eager code"
    assert kernels.is_warm(17, 3, 5), "switched off: nothing to compile"
    eager = models._fold_grads(g, w, r)
    for got in (compiled, eager):
        assert [t.shape for t in got] == [(shape[0], shape[2]), (shape[1], shape[0])]
        assert got[1].is_contiguous()
        for t, ref in zip(got, want, strict=True):
            torch.testing.assert_close(t.double(), ref, rtol=1e-4, atol=1e-4)


def test_the_kernels_compiler_settings_hold_in_every_thread():
    """torch keeps settings made in code per thread: a thread that runs the kernel makes them too."""
    import threading

    from bench_core import kernels

    _require_compiled_kernels()
    kernels.warm_up(40, 3, 6)  # made in this thread
    seen = {}

    def work():
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        with torch.no_grad():
            grads = kernels.run_fold_grads(torch.zeros(40, 3, 6), torch.zeros(40, 6), torch.zeros(3, 40))
        seen.update(ran=grads is not None, limit=dynamo_config.recompile_limit)
        seen.update(compile_threads=inductor_config.compile_threads)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen.get("ran"), "the kernel ran in the thread (an assertion failing inside it would not fail the test)"
    assert seen["limit"] >= 64 and seen["compile_threads"] == 1


def test_a_kernel_that_fails_warns_once_and_the_eager_code_runs(monkeypatch):
    from bench_core import kernels, models

    def broken(*args):
        raise RuntimeError("C++ compile failed: no compiler\nmore detail")

    monkeypatch.setitem(kernels._state, "kernel", broken)
    monkeypatch.setitem(kernels._state, "failed", None)
    monkeypatch.setitem(kernels._state, "warmed", {(40, 3, 6, torch.float32)})
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    torch.manual_seed(12)
    g, w, r = torch.randn(40, 3, 6), torch.randn(40, 6), torch.randn(3, 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = models._fold_grads(g, w, r)
        models._fold_grads(g, w, r)  # no second warning: the kernel is off for this process
    (warning,) = caught
    assert warning.category is RuntimeWarning
    message = str(warning.message)
    assert message.startswith("compiled CPU kernels are off (RuntimeError: C++ compile failed: no compiler)")
    assert "\n" not in message
    assert not kernels.enabled() and kernels.fold_grads() is None
    assert not kernels.warm_up(40, 3, 6), "off: warming up says so, even for sizes warmed before"
    for t, ref in zip(got, _fold_grads_by_definition(g, w, r), strict=True):
        torch.testing.assert_close(t.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("first_layer_kernel", ["0", "1"])
def test_training_compiles_the_kernel_before_its_first_epoch(monkeypatch, first_layer_kernel):
    """Where the C++ steps' first-layer kernel runs (AVX-512 CPUs) it replaces this one: nothing to compile."""
    from bench_core import kernels, manual
    from bench_core.data import make_synthetic
    from bench_core.training import train

    monkeypatch.setenv(manual.ENV_FIRST_LAYER_KERNEL, first_layer_kernel)
    replaced = manual.first_layer_kernel_on()
    calls = []
    monkeypatch.setattr(kernels, "warm_up", lambda *args: calls.append(args) or False)
    data = make_synthetic(64, 8, (1, 4, 4), 3, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=32)
    # split batching's first layer has a per-member input: no kernel; with one member it trains as repeat
    cases = [("repeat", 2, [(16, 2, 8, torch.float32)]), ("split", 2, []), ("split", 1, [(16, 1, 8, torch.float32)])]
    for batching, n_members, expected in cases:
        calls.clear()
        model = build_model("batchensemble", ModelConfig(hidden=8, ensemble_size=n_members), 16, 3)
        list(train(model, data, cfg, method="batchensemble", batching=batching))
        assert calls == ([] if replaced else expected), (batching, n_members)
