"""oneDNN's products against torch.mm, the models with and without them, and a missing or broken op."""

import warnings

import pytest
import torch

from bench_core import models, onednn
from bench_core.models import BatchEnsembleMLP, VectorizedEnsemble, shared_weight_product

pytestmark = pytest.mark.usefixtures("fresh_fast_paths")  # each test checks afresh; what it breaks is forgotten


@pytest.fixture(autouse=True)
def asked_for(fresh_fast_paths, monkeypatch):
    """oneDNN asked for (``BENCH_ONEDNN=1``): these tests are about its products, which Intel CPUs
    otherwise leave to MKL. A test that sets the switch itself overrides it."""
    monkeypatch.setenv(onednn.ENV_SWITCH, "1")


def _require_op():
    if not onednn.usable(torch.zeros(1)):
        pytest.skip(f"this torch has no working oneDNN linear op: {onednn._state['failed']}")


def _layouts(t):
    return [t, t.t().contiguous().t()]  # row-major, and the same values column-major (a transposed view)


def test_products_equal_torch_mm_in_every_layout():
    _require_op()
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 29), torch.randn(29, 11), torch.randn(11)
    for xl in _layouts(x):
        for wl in _layouts(w):
            torch.testing.assert_close(onednn.matmul(xl, wl), x @ w, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(onednn.matmul(xl, wl, b), torch.addmm(b, x, w), rtol=1e-5, atol=1e-5)


def test_only_cpu_float32_and_the_switch_turns_it_off(monkeypatch):
    _require_op()
    assert onednn.usable(torch.zeros(2, 3))
    assert not onednn.usable(torch.zeros(2, 3, dtype=torch.float64))
    assert not onednn.usable(torch.zeros(2, 3, device="meta"))
    monkeypatch.setenv(onednn.ENV_SWITCH, "0")
    assert not onednn.usable(torch.zeros(2, 3))


def _outputs_and_grads(model, x):
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("kind", "split", "in_features"),
    [("classic", False, 20), ("batchensemble", False, 20), ("batchensemble", True, models.ONEDNN_MIN_IN)],
)
def test_models_with_and_without_onednn_agree(kind, split, in_features, monkeypatch):
    """Forward and every gradient, oneDNN on (and used) against off (torch.mm)."""
    _require_op()
    calls = []
    real = onednn.matmul
    monkeypatch.setattr(onednn, "matmul", lambda *a: calls.append(1) or real(*a))
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv(onednn.ENV_SWITCH, switch)
        torch.manual_seed(3)
        sizes = [in_features, 9, 4]
        model = VectorizedEnsemble(sizes, 3) if kind == "classic" else BatchEnsembleMLP(sizes, 3)
        x = torch.randn(3, 5, in_features) if split else torch.randn(5, in_features)
        results.append(_outputs_and_grads(model, x))
        used = len(calls)
        calls.clear()
        assert (used > 0) == (switch == "1"), f"oneDNN {'on' if switch == '1' else 'off'}: {used} products"
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_shared_weight_product_gradients_equal_autograds():
    _require_op()
    torch.manual_seed(4)
    x = torch.randn(6, models.ONEDNN_MIN_IN, requires_grad=True)
    w = torch.randn(models.ONEDNN_MIN_IN, 5, requires_grad=True)
    grad_z = torch.randn(6, 5)
    z = shared_weight_product(x, w)
    assert z.grad_fn is not None and "SharedWeightProduct" in type(z.grad_fn).__name__
    got = torch.autograd.grad(z, (x, w), grad_z)
    want = torch.autograd.grad(x @ w, (x, w), grad_z)
    torch.testing.assert_close(z, x @ w, rtol=1e-5, atol=1e-4)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    data = x.detach()  # an input without a gradient (the data): only W's
    (grad_w,) = torch.autograd.grad(shared_weight_product(data, w), (w,), grad_z)
    torch.testing.assert_close(grad_w, want[1], rtol=1e-5, atol=1e-4)
    narrow = shared_weight_product(torch.randn(6, 8, requires_grad=True), torch.randn(8, 5))
    assert "MmBackward" in type(narrow.grad_fn).__name__, "narrow inputs: torch.mm through autograd"


def test_a_missing_op_is_off_without_a_warning(monkeypatch):
    def missing():
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_linear_pointwise'")

    monkeypatch.setattr(onednn, "_linear_op", missing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not onednn.usable(torch.zeros(2, 3))
        torch.manual_seed(5)
        model = VectorizedEnsemble([6, 4, 2], 2)
        x = torch.randn(3, 6)
        torch.testing.assert_close(model(x)[1], model.member(1)(x))


def _run_twice_one_warning(model, x):
    """The model's output on x, and the one warning two forward passes gave (the second: none)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(x)
        model(x)
    (warning,) = caught
    assert warning.category is RuntimeWarning
    return out, str(warning.message)


def test_an_op_that_gives_wrong_products_warns_once_and_torch_mm_runs(monkeypatch):
    monkeypatch.setattr(onednn, "_linear_op", lambda: lambda x, w, *a: torch.zeros(x.size(0), w.size(0)))
    torch.manual_seed(6)
    model = BatchEnsembleMLP([6, 4, 2], 2)
    x = torch.randn(3, 6)
    out, message = _run_twice_one_warning(model, x)
    assert message.startswith("oneDNN matrix products are off (RuntimeError: its product differs from torch.mm's)")
    torch.testing.assert_close(out[0], model.member(0)(x))


def test_an_op_that_fails_at_a_call_warns_once_and_the_product_is_torch_mms(monkeypatch):
    _require_op()  # the check passes with the real op; then it fails

    def broken():
        def op(*args):
            raise RuntimeError("could not create a primitive\nmore detail")

        return op

    monkeypatch.setattr(onednn, "_linear_op", broken)
    torch.manual_seed(7)
    model = VectorizedEnsemble([6, 4, 2], 2)
    x = torch.randn(3, 6)
    out, message = _run_twice_one_warning(model, x)
    assert message.startswith("oneDNN matrix products are off (RuntimeError: could not create a primitive)")
    assert "\n" not in message
    assert not onednn.usable(x)
    torch.testing.assert_close(out[1], model.member(1)(x))


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
cpu family\t: 6
model name\t: A CPU

processor\t: 1
vendor_id\t: {vendor}
"""


@pytest.mark.parametrize(
    ("text", "vendor"),
    [
        (CPUINFO.format(vendor="GenuineIntel"), "GenuineIntel"),
        (CPUINFO.format(vendor="AuthenticAMD"), "AuthenticAMD"),
        ("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n", None),  # an Arm CPU names no vendor_id
        ("", None),
    ],
)
def test_the_cpu_vendor_is_read_from_cpuinfo(text, vendor, tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert onednn.cpu_vendor(path) == vendor
    assert onednn.cpu_vendor(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("vendor", "switch", "wanted", "plain"),
    [
        ("GenuineIntel", None, False, True),  # MKL, in the plain layout
        ("GenuineIntel", "1", True, True),
        ("GenuineIntel", "0", False, True),
        ("AuthenticAMD", None, True, False),  # oneDNN; MKL (switched off) in the transposed layout
        ("AuthenticAMD", "0", False, False),
        (None, None, True, False),
    ],
)
def test_intel_cpus_take_mkls_products_unless_onednn_is_asked_for(vendor, switch, wanted, plain, monkeypatch):
    _require_op()
    monkeypatch.setitem(onednn._vendor, "id", vendor)
    if switch is None:
        monkeypatch.delenv(onednn.ENV_SWITCH)
    else:
        monkeypatch.setenv(onednn.ENV_SWITCH, switch)
    x = torch.zeros(2, 3)
    assert onednn.wanted() == wanted and onednn.usable(x) == wanted
    assert onednn.mkl_plain_layout() == plain
    words = onednn.describe()
    assert words.startswith("oneDNN") if wanted else words.startswith("torch.mm")
    if vendor == "GenuineIntel" and switch is None:
        assert "BENCH_ONEDNN=1" in words and "(MKL)" in words
    if switch == "0":
        assert words == "torch.mm (BENCH_ONEDNN=0)"


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD"])
@pytest.mark.parametrize("switch", ["0", "1"])
def test_the_classic_ensemble_gives_the_same_outputs_and_gradients_in_either_library_and_layout(
    vendor, switch, monkeypatch
):
    """The members' product in each place it can go (oneDNN; MKL plain on Intel, transposed elsewhere):
    the forward and every gradient as each member's own MLP gives them."""
    _require_op()
    monkeypatch.setitem(onednn._vendor, "id", vendor)
    monkeypatch.setenv(onednn.ENV_SWITCH, switch)
    torch.manual_seed(8)
    model = VectorizedEnsemble([20, 9, 4], 3)
    x = torch.randn(5, 20)
    got = _outputs_and_grads(model, x)
    for k in range(3):
        torch.testing.assert_close(got[0][k], model.member(k)(x), rtol=1e-5, atol=1e-5)
    model.zero_grad()
    want = _outputs_and_grads(model, x)  # the same call again: the same bits
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: any device but the CPU, CUDA's layout
def test_only_cpu_products_take_mkls_plain_layout_on_intel(device, monkeypatch):
    """The host's vendor decides the CPU's layout only: elsewhere the members' product keeps ``zᵀ = Wᵀ xᵀ``."""
    monkeypatch.setitem(onednn._vendor, "id", "GenuineIntel")
    monkeypatch.setenv(onednn.ENV_SWITCH, "0")
    n_in, n_members, n_out, batch = 6, 3, 4, 5
    z = models._members_product(
        torch.zeros(batch, n_in, device=device), torch.zeros(n_in, n_members, n_out, device=device)
    )
    assert z.shape == (n_members, batch, n_out)
    plain, transposed = (n_out, n_members * n_out, 1), (n_out * batch, 1, batch)
    assert z.stride() == (plain if device == "cpu" else transposed)


def test_a_missing_op_is_described_in_one_line(monkeypatch):
    monkeypatch.setattr(onednn, "_linear_op", lambda: (_ for _ in ()).throw(AttributeError("")))  # no words
    assert not onednn.usable(torch.zeros(2, 3))
    assert onednn.describe() == "torch.mm: no working oneDNN op (AttributeError)"
