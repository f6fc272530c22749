"""The training loop: equivalence of execution modes, records, stop requests, divergence."""

import math
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from bench_core import manual, training
from bench_core.config import ModelConfig, TrainConfig
from bench_core.data import make_synthetic
from bench_core.errors import ConfigError, DivergedError
from bench_core.models import build_model
from bench_core.training import EpochRecord, StepRecord, batch_plan, per_member_cross_entropy, train


@pytest.fixture(scope="module")
def tiny():
    return make_synthetic(n_train=600, n_test=200, shape=(1, 4, 4), num_classes=3, seed=1)


def _model(method, tiny, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{"hidden": 16, "ensemble_size": 3, **kw})
    return build_model(method, cfg, tiny.in_features, tiny.num_classes)


def _run(model, tiny, method="m", batching="repeat", **kw):
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 64, "lr": 1e-2, **kw})
    return list(train(model, tiny, cfg, method=method, batching=batching))


def test_vectorized_classic_trains_exactly_like_sequential_classic(tiny):
    """Same seed, same batches: stacked members end where E separately trained MLPs end."""
    seq = _model("classic", tiny, classic_mode="sequential")
    vec = _model("classic", tiny, classic_mode="vectorized")
    rec_seq = _run(seq, tiny)
    rec_vec = _run(vec, tiny)
    for k in range(3):
        torch.testing.assert_close(vec.member(k)(tiny.x_test), seq.member(k)(tiny.x_test), rtol=1e-4, atol=1e-4)
    for a, b in zip(rec_seq, rec_vec, strict=True):
        assert a.member_loss == pytest.approx(b.member_loss, rel=1e-4)


@pytest.mark.parametrize(
    ("method", "batching", "mode"),
    [("single", "repeat", None), ("classic", "repeat", "sequential"), ("classic", "repeat", "vectorized"),
     ("batchensemble", "repeat", None), ("batchensemble", "split", None)],
)  # fmt: skip
def test_losses_are_means_over_the_examples_each_member_trained_on(tiny, method, batching, mode):
    """A short last batch weighs what its examples weigh: 600 examples in batches of 64 end with 24
    (split, E = 3: steps of 3 x 21, the last 3 x 11). With lr = 0 the model stays as it is, so each
    member's epoch loss is its mean cross-entropy over the examples the permutation gave it, and the
    second step record's covers steps 6 to 10. Unweighted means of batch means miss both."""
    model = _model(method, tiny, **({"classic_mode": mode} if mode else {}))
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.0, seed=3, log_every=5)
    records = list(train(model, tiny, cfg, method=method, batching=batching))
    n_members = 1 if method == "single" else 3
    perm = torch.randperm(tiny.n_train, generator=torch.Generator().manual_seed(cfg.seed))
    plan = batch_plan(tiny.n_train, 64, n_members, batching)
    assert plan[-1][1] - plan[-1][0] == (33 if batching == "split" else 24)
    with torch.no_grad():
        members = [model] if method == "single" else [model.member(k) for k in range(n_members)]
        logits = [m(tiny.x_train).reshape(tiny.n_train, -1) for m in members]  # the single MLP's is (1, N, C)
        per_example = torch.stack([F.cross_entropy(z, tiny.y_train, reduction="none") for z in logits])

    def expected(steps):
        rows = [[] for _ in range(n_members)]
        for start, end in steps:
            idx = perm[start:end]
            for k in range(n_members):
                part = idx.view(n_members, -1)[k] if batching == "split" else idx
                rows[k].append(per_example[k, part])
        return [torch.cat(r).double().mean().item() for r in rows]

    epoch = records[-1]
    assert isinstance(epoch, EpochRecord)
    assert epoch.member_loss == pytest.approx(expected(plan), rel=1e-5)
    windows = [r for r in records if isinstance(r, StepRecord)]
    if mode == "sequential":  # members one after another: no step records
        assert windows == []
    else:
        assert [r.step for r in windows] == [5, 10]
        assert windows[1].member_loss == pytest.approx(expected(plan[5:]), rel=1e-5)


def test_training_is_reproducible_on_cpu(tiny):
    a = _run(_model("batchensemble", tiny), tiny)
    b = _run(_model("batchensemble", tiny), tiny)
    assert [r.member_loss for r in a] == [r.member_loss for r in b]


@pytest.mark.parametrize(
    ("method", "batching"), [("single", "repeat"), ("classic", "repeat"), ("batchensemble", "split")]
)
def test_epoch_records_and_learning(tiny, method, batching):
    model = _model(method, tiny)
    records = _run(model, tiny, batching=batching, epochs=3)
    assert [type(r) for r in records] == [EpochRecord] * 3
    assert [r.epoch for r in records] == [1, 2, 3]
    e = 1 if method == "single" else 3
    assert all(len(r.member_loss) == e for r in records)
    assert records[-1].loss < records[0].loss
    assert all(r.epoch_seconds > 0 and r.examples_per_second > 0 for r in records)
    assert records[-1].elapsed_seconds >= records[0].elapsed_seconds
    assert not any(r.stopped for r in records)


def test_step_records_every_k_steps(tiny):
    records = _run(_model("classic", tiny), tiny, epochs=1, log_every=3)
    steps = [r for r in records if isinstance(r, StepRecord)]
    assert [r.step for r in steps] == [3, 6, 9]  # 600 / 64 -> 10 steps
    assert all(r.steps_per_epoch == 10 for r in steps)
    assert isinstance(records[-1], EpochRecord)


def _spy_steps(monkeypatch, before_call=None) -> list:
    """Every ``_Step`` called, in order (the stepper itself); ``before_call(calls)`` runs before each step."""
    calls = []
    call = training._Step.__call__

    def spy(self, idx):
        calls.append(self)
        if before_call is not None:
            before_call(calls)
        return call(self, idx)

    monkeypatch.setattr(training._Step, "__call__", spy)
    return calls


@pytest.mark.parametrize("mode", ["vectorized", "sequential"])
def test_untimed_steps_run_before_each_epochs_clock_and_stay_out_of_its_records(tiny, mode, monkeypatch):
    # The speed benchmark's re-warm-up: k more steps at each epoch's start, the first member's, on the
    # epoch's first batches, outside the records and the clock. Each epoch's first one sleeps a while:
    # it must not show in the epoch's seconds (the 16-wide steps take milliseconds).
    members = 3 if mode == "sequential" else 1
    per_epoch = 10 * members + 2  # 600 / 64: 10 steps a member's pass, and 2 untimed
    nap = 0.3

    def nap_first(calls):
        if len(calls) % per_epoch == 1:  # each epoch's first untimed step
            time.sleep(nap)

    calls = _spy_steps(monkeypatch, nap_first)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-2)
    records = list(train(_model("classic", tiny, classic_mode=mode), tiny, cfg, method="c", untimed_steps=2))
    assert len(calls) == 2 * per_epoch
    assert calls[0] is calls[1] is calls[2]  # the untimed steps are the first member's, then its pass
    assert [r.steps for r in records] == [10, 10]
    assert all(r.epoch_seconds < nap for r in records)
    assert all(math.isfinite(v) for r in records for v in r.member_loss)
    assert records[1].elapsed_seconds >= 2 * nap  # the wall clock since training began counts them


def test_no_untimed_steps_by_default(tiny, monkeypatch):
    calls = _spy_steps(monkeypatch)
    _run(_model("batchensemble", tiny), tiny, epochs=2)
    assert len(calls) == 20


def test_negative_untimed_steps_are_refused(tiny):
    model = _model("classic", tiny)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="untimed_steps must be 0 or more, got -1"):
        list(train(model, tiny, TrainConfig(epochs=1), method="c", untimed_steps=-1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # nothing trained


def test_stop_request_ends_between_batches_and_keeps_training(tiny):
    model = _model("batchensemble", tiny)
    before = [p.detach().clone() for p in model.parameters()]
    stop = threading.Event()
    cfg = TrainConfig(epochs=5, batch_size=32, lr=1e-2, log_every=2)
    records = []
    for record in train(model, tiny, cfg, method="be", stop=stop):
        records.append(record)
        stop.set()  # ask to stop as soon as the first record arrives
    assert isinstance(records[-1], EpochRecord)
    assert records[-1].stopped and records[-1].epoch == 1
    assert records[-1].steps == 2  # asked at step 2 (the first record): no batch ran after it
    after = list(model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.isfinite(p).all() for p in after)


def test_stop_before_training_gives_a_stopped_record(tiny):
    stop = threading.Event()
    stop.set()
    records = list(train(_model("classic", tiny), tiny, TrainConfig(epochs=3), method="c", stop=stop))
    assert len(records) == 1
    assert records[0].stopped and records[0].steps == 0
    assert all(math.isnan(v) for v in records[0].member_loss)


def test_sequential_stop_marks_unreached_members(tiny, monkeypatch):
    stop = threading.Event()
    model = _model("classic", tiny, classic_mode="sequential")
    _spy_steps(monkeypatch, lambda calls: len(calls) == 4 and stop.set())  # member 0's fourth step asks to stop
    records = list(train(model, tiny, TrainConfig(epochs=2, batch_size=64), method="c", stop=stop))
    last = records[-1]
    assert last.stopped
    assert math.isfinite(last.member_loss[0])
    assert math.isnan(last.member_loss[1]) and math.isnan(last.member_loss[2])


def test_non_finite_loss_names_the_epoch(tiny):
    bad = make_synthetic(n_train=200, n_test=50, shape=(1, 4, 4), num_classes=3, seed=2)
    bad.x_train[150:] = float("nan")
    with pytest.raises(DivergedError, match=r"epoch 1.*lower learning rate"):
        list(train(_model("classic", tiny), bad, TrainConfig(epochs=2, batch_size=50), method="classic"))


def test_huge_learning_rate_diverges_with_a_clear_error(tiny):
    with pytest.raises(DivergedError, match="diverged in epoch"):
        _run(_model("single", tiny), tiny, lr=1e12, epochs=5)


def test_batch_plan_repeat_and_split():
    assert batch_plan(10, 4, 3, "repeat") == [(0, 4), (4, 8), (8, 10)]
    # split: b = 4 // 3 = 1 example per member, 3 per step; the 10th example is left out.
    assert batch_plan(10, 4, 3, "split") == [(0, 3), (3, 6), (6, 9)]
    # a last partial step gives each member rest // E.
    assert batch_plan(14, 6, 3, "split") == [(0, 6), (6, 12)]
    assert batch_plan(16, 6, 3, "split") == [(0, 6), (6, 12), (12, 15)]


def test_batch_plan_split_rejects_a_batch_smaller_than_the_ensemble():
    with pytest.raises(ConfigError, match="can't be split among 5 members"):
        batch_plan(100, 4, 5, "split")


def _spy_first_input(model, monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of the batches the first layer gets: through its forward (autograd) or the hand-written step."""
    seen = []
    original = model.layers[0].forward
    model.layers[0].forward = lambda x: seen.append(tuple(x.shape)) or original(x)
    real = manual.forward_backward
    monkeypatch.setattr(manual, "forward_backward", lambda m, x, *a: seen.append(tuple(x.shape)) or real(m, x, *a))
    return seen


@pytest.mark.parametrize("autograd", [False, True], ids=["hand-written", "autograd"])
def test_split_batching_gives_each_member_its_own_slice(tiny, autograd, monkeypatch):
    if autograd:
        monkeypatch.setenv(manual.ENV_SWITCH, "0")
    model = _model("batchensemble", tiny)
    seen = _spy_first_input(model, monkeypatch)
    _run(model, tiny, batching="split", epochs=1, batch_size=60)
    assert seen[0] == (3, 20, tiny.in_features)


@pytest.mark.parametrize("autograd", [False, True], ids=["hand-written", "autograd"])
def test_split_batching_with_one_member_is_repeat_batching(tiny, autograd, monkeypatch):
    """E = 1: the member's slice is the whole batch; it trains as with repeat batching, input shared."""
    if autograd:
        monkeypatch.setenv(manual.ENV_SWITCH, "0")
    split, repeat = _model("batchensemble", tiny, ensemble_size=1), _model("batchensemble", tiny, ensemble_size=1)
    seen = _spy_first_input(split, monkeypatch)
    rec_split = _run(split, tiny, batching="split", batch_size=60)
    rec_repeat = _run(repeat, tiny, batching="repeat", batch_size=60)
    assert seen[0] == (60, tiny.in_features)
    assert [r.member_loss for r in rec_split] == [r.member_loss for r in rec_repeat]
    for a, b in zip(split.parameters(), repeat.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_per_member_cross_entropy_matches_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4)
    labels = torch.randint(0, 4, (5,))
    expected = torch.stack([F.cross_entropy(logits[k], labels) for k in range(3)])
    torch.testing.assert_close(per_member_cross_entropy(logits, labels), expected)
    per_member_labels = torch.randint(0, 4, (3, 5))
    expected = torch.stack([F.cross_entropy(logits[k], per_member_labels[k]) for k in range(3)])
    torch.testing.assert_close(per_member_cross_entropy(logits, per_member_labels), expected)
