"""The CUDA path: the same numbers as on the CPU, and no host-device synchronisation per step.

Skipped where torch sees no CUDA device (CI has none); run on a machine with a GPU with
``python -m pytest tests/test_cuda.py``.
"""

import copy
import warnings

import pytest
import torch

from bench_core import training
from bench_core.config import ModelConfig, TrainConfig
from bench_core.data import make_synthetic
from bench_core.models import build_model
from bench_core.training import per_member_cross_entropy, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# (method, classic mode, batching)
CASES = [
    ("single", "vectorized", "repeat"),
    ("classic", "vectorized", "repeat"),
    ("classic", "sequential", "repeat"),
    ("batchensemble", "vectorized", "repeat"),
    ("batchensemble", "vectorized", "split"),
]
E, D, B, C = 4, 48, 16, 10


def _logits(model, x):
    out = model(x)
    return out.unsqueeze(0) if out.dim() == 2 else out  # (E, B, C)


@pytest.mark.parametrize(("method", "mode", "batching"), CASES)
def test_cuda_forward_and_gradients_match_cpu(method, mode, batching):
    torch.manual_seed(0)
    cpu = build_model(method, ModelConfig(hidden=32, depth=2, ensemble_size=E, classic_mode=mode), D, C)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(B, D)
    y = torch.randint(0, C, (B,))
    if batching == "split":
        x, y = x.view(E, B // E, D), y.view(E, B // E)
    for model, device in [(cpu, "cpu"), (gpu, "cuda")]:
        loss = per_member_cross_entropy(_logits(model, x.to(device)), y.to(device)).sum()
        loss.backward()
    torch.testing.assert_close(_logits(gpu, x.cuda()).cpu(), _logits(cpu, x), rtol=1e-4, atol=1e-5)
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters(), strict=True):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-4, atol=1e-5, msg=name)


def _synchronising_calls(
    method: str, mode: str, batching: str, steps: int, cuda_graph: bool = True, untimed_steps: int = 0
) -> int:
    """Synchronising CUDA calls torch reports during one epoch of ``steps`` steps."""
    ensemble = 1 if method == "single" else E
    data = make_synthetic(steps * B, 8, (3, 4, 4), C, seed=0).to("cuda")
    torch.manual_seed(0)
    model = build_model(method, ModelConfig(hidden=32, depth=2, ensemble_size=ensemble, classic_mode=mode), 48, C)
    model = model.cuda()
    cfg = TrainConfig(epochs=1, batch_size=B, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kwargs = {"batching": batching, "cuda_graph": cuda_graph, "untimed_steps": untimed_steps}
            for _ in train(model, data, cfg, method=method, **kwargs):
                pass
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@pytest.mark.parametrize("cuda_graph", [True, False])
@pytest.mark.parametrize(("method", "mode", "batching"), CASES)
def test_no_synchronisation_per_training_step(method, mode, batching, cuda_graph):
    _synchronising_calls(method, mode, batching, 8, cuda_graph)  # lazy initialisation, once per process
    few = _synchronising_calls(method, mode, batching, 8, cuda_graph)  # 3 warm-up steps, capture, 4 replays
    many = _synchronising_calls(method, mode, batching, 40, cuda_graph)
    assert few >= 1  # the epoch's record reads the losses back: the detector sees it
    assert many == few  # and nothing more per step


@pytest.mark.parametrize("cuda_graph", [True, False])
@pytest.mark.parametrize(("method", "mode", "batching"), [CASES[1], CASES[4]])
def test_untimed_steps_add_no_synchronisation_per_step(method, mode, batching, cuda_graph):
    """The speed benchmark's untimed step at each epoch's start: one synchronisation before the
    clock, none per step."""
    _synchronising_calls(method, mode, batching, 8, cuda_graph, untimed_steps=1)
    few = _synchronising_calls(method, mode, batching, 8, cuda_graph, untimed_steps=1)
    many = _synchronising_calls(method, mode, batching, 40, cuda_graph, untimed_steps=1)
    assert many == few


@pytest.mark.parametrize(("method", "mode", "batching"), [CASES[1], CASES[2], CASES[4]])
def test_untimed_steps_train_the_same_with_and_without_cuda_graphs(method, mode, batching):
    """Untimed steps count among a graphed step's eager warm-up steps; the result is eager's."""
    data = make_synthetic(7 * B + 5, 8, (3, 4, 4), C, seed=1).to("cuda")
    cfg = TrainConfig(epochs=2, batch_size=B, device="cuda")
    trained, records = [], []
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        model = build_model(method, ModelConfig(hidden=32, depth=2, ensemble_size=E, classic_mode=mode), 48, C)
        model = model.cuda()
        run = train(model, data, cfg, method=method, batching=batching, cuda_graph=cuda_graph, untimed_steps=2)
        records.append(list(run))
        trained.append(model)
    eager, graphed = trained
    for (name, p_eager), (_, p_graph) in zip(eager.named_parameters(), graphed.named_parameters(), strict=True):
        torch.testing.assert_close(p_graph, p_eager, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(*records, strict=True):
        assert a.member_loss == pytest.approx(b.member_loss, rel=1e-4)
        assert a.examples_per_second > 0


@pytest.mark.parametrize(("method", "mode", "batching"), CASES)
def test_cuda_graph_training_equals_eager_training(method, mode, batching, monkeypatch):
    captures = []
    capture = training._GraphedStep._capture
    monkeypatch.setattr(training._GraphedStep, "_capture", lambda self: captures.append(1) or capture(self))
    ensemble = 1 if method == "single" else E
    data = make_synthetic(7 * B + 5, 8, (3, 4, 4), C, seed=1).to("cuda")  # 7 full batches and a short one
    cfg = TrainConfig(epochs=3, batch_size=B, device="cuda", log_every=2)
    trained, records = [], []
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        model = build_model(method, ModelConfig(hidden=32, depth=2, ensemble_size=ensemble, classic_mode=mode), 48, C)
        model = model.cuda()
        records.append(list(train(model, data, cfg, method=method, batching=batching, cuda_graph=cuda_graph)))
        trained.append(model)
    n_graphs = ensemble if mode == "sequential" and method == "classic" else 1
    assert len(captures) == n_graphs  # the graph was used, not a silent eager fallback
    eager, graphed = trained
    for (name, p_eager), (_, p_graph) in zip(eager.named_parameters(), graphed.named_parameters(), strict=True):
        torch.testing.assert_close(p_graph, p_eager, rtol=1e-4, atol=1e-5, msg=name)
    assert [r.kind for r in records[0]] == [r.kind for r in records[1]]
    for a, b in zip(*records, strict=True):
        assert a.member_loss == pytest.approx(b.member_loss, rel=1e-4)


def test_a_failed_capture_falls_back_to_eager_training(monkeypatch):
    def broken(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(training._GraphedStep, "_capture", broken)
    data = make_synthetic(6 * B, 8, (3, 4, 4), C, seed=1).to("cuda")
    cfg = TrainConfig(epochs=2, batch_size=B, device="cuda")
    trained = []
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        model = build_model("batchensemble", ModelConfig(hidden=32, ensemble_size=E), 48, C).cuda()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            list(train(model, data, cfg, method="batchensemble", cuda_graph=cuda_graph))
        trained.append(model)
    assert any("training eagerly" in str(w.message) for w in caught)
    for p_eager, p_graph in zip(trained[0].parameters(), trained[1].parameters(), strict=True):
        torch.testing.assert_close(p_graph, p_eager, rtol=1e-4, atol=1e-5)


def test_batchensemble_first_layer_reductions_are_one_block_on_cuda():
    """On the CPU the first layer's two gradient reductions go in blocks of input rows (three here,
    the last short); on CUDA in one block, two reduction kernels. Same gradients either way."""
    from torch.profiler import ProfilerActivity, profile

    from bench_core.models import FOLD_GRAD_ROWS, BatchEnsembleLinear

    n_in = 2 * FOLD_GRAD_ROWS + 76
    torch.manual_seed(0)
    cpu = BatchEnsembleLinear(n_in, 24, E)
    gpu = copy.deepcopy(cpu).cuda()
    x, g = torch.randn(B, n_in), torch.randn(E, B, 24)
    cpu(x).backward(g)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        gpu(x.cuda()).backward(g.cuda())
        torch.cuda.synchronize()
    # the reductions' input is a block of G [rows, E, out]; the other sums' inputs are [E, B, out]
    sums = [e.input_shapes[0] for e in prof.events() if e.name == "aten::sum" and e.input_shapes]
    assert [shape for shape in sums if shape[1:] == [E, 24]] == [[n_in, E, 24], [n_in, E, 24]]
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters(), strict=True):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-4, atol=1e-5, msg=name)
