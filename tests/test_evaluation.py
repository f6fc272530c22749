"""evaluate / predict_logits / count_parameters on tiny fake models with known logits."""

import json
import math

import pytest
import torch
from torch import nn

from bench_core import evaluation
from bench_core.evaluation import EvalReport, count_parameters, evaluate, predict_logits


class TableModel(nn.Module):
    """Returns fixed logits: ``table[:, id]`` where the example id is the input's first feature.

    Trainable parameters: a Linear(2, 3) = 2 * 3 + 3 = 9 (not used for the output), plus one
    frozen parameter of 5 scalars that must not be counted. Records the batch sizes it sees and
    whether it was in training mode at each call.
    """

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)  # [E, M, C]
        self.linear = nn.Linear(2, 3)
        self.frozen = nn.Parameter(torch.zeros(5), requires_grad=False)
        self.dropout = nn.Dropout(0.5)
        self.calls = []

    def forward(self, x):
        self.calls.append((x.shape[0], self.training, self.dropout.training))
        return self.table[:, x[:, 0].long()]


class Transpose(nn.Module):
    def forward(self, x):  # [B, E, C] -> [E, B, C]
        return x.transpose(0, 1)


def ids(m):
    """Inputs [m, 2] whose first feature is the example id."""
    return torch.stack([torch.arange(m, dtype=torch.float32), torch.zeros(m)], dim=1)


def three_members_each_wrong_once():
    """3 members, 3 examples of class 0; member k puts 0.9 on the wrong class only for example k."""
    right, wrong = [0.9, 0.1], [0.1, 0.9]
    members = [[wrong if n == k else right for n in range(3)] for k in range(3)]
    return torch.log(torch.tensor(members)), torch.zeros(3, dtype=torch.int64)


def test_count_parameters_counts_only_trainable():
    model = TableModel(torch.zeros(1, 1, 2))
    assert count_parameters(model) == 9
    model.linear.bias.requires_grad_(False)
    assert count_parameters(model) == 6
    assert count_parameters(nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1))) == 10 + 3


def test_shared_parameters_are_counted_once():
    shared = nn.Linear(3, 3)
    assert count_parameters(nn.Sequential(shared, shared)) == 12


def test_predict_logits_batches_give_identical_result():
    torch.manual_seed(0)
    table = torch.randn(4, 10, 3)
    model = TableModel(table)
    whole = predict_logits(model, ids(10))
    assert whole.shape == (4, 10, 3)
    torch.testing.assert_close(whole, table, rtol=0, atol=0)
    model.calls.clear()
    batched = predict_logits(model, ids(10), batch_size=3)
    assert [b for b, _, _ in model.calls] == [3, 3, 3, 1]
    torch.testing.assert_close(batched, whole, rtol=0, atol=0)


def test_predict_logits_runs_in_eval_mode_and_restores_modes():
    model = TableModel(torch.zeros(2, 4, 3))
    model.train()
    predict_logits(model, ids(4))
    assert model.calls == [(4, False, False)]  # every submodule in eval mode during the pass
    assert model.training
    assert all(m.training for m in model.modules())
    model.eval()
    predict_logits(model, ids(4))
    assert not any(m.training for m in model.modules())
    # a mixed state comes back as it was
    model.train()
    model.dropout.eval()
    predict_logits(model, ids(4))
    assert model.training
    assert model.linear.training
    assert not model.dropout.training


def test_predict_logits_restores_mode_when_the_model_fails():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        predict_logits(model, ids(2))
    assert model.training


def test_predict_logits_has_no_autograd():
    out = predict_logits(nn.Sequential(nn.Linear(2, 6), nn.Unflatten(1, (2, 3)), Transpose()), ids(5))
    assert out.shape == (2, 5, 3)
    assert not out.requires_grad


def test_evaluate_report_on_hand_case():
    logits, labels = three_members_each_wrong_once()
    model = TableModel(logits)
    model.train()
    report = evaluate(model, ids(3), labels)
    assert isinstance(report, EvalReport)
    assert model.training  # restored
    assert report.ensemble_accuracy == 1.0
    assert report.member_accuracy == pytest.approx([2 / 3] * 3)
    assert report.mean_member_accuracy == pytest.approx(2 / 3)
    # every example: ensemble p(class 0) = 1.9 / 3, confidence 0.6333, all right
    p = 1.9 / 3
    assert report.nll == pytest.approx(-math.log(p), rel=1e-5)
    assert report.ece == pytest.approx(1 - p, rel=1e-5)
    assert report.brier == pytest.approx(2 * (1 - p) ** 2, rel=1e-5)
    # each pair of members disagrees on 2 of the 3 examples
    expected = [[1.0, 1 / 3, 1 / 3], [1 / 3, 1.0, 1 / 3], [1 / 3, 1 / 3, 1.0]]
    torch.testing.assert_close(torch.tensor(report.agreement), torch.tensor(expected))
    assert report.disagreement == pytest.approx(2 / 3)
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    h_member = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert report.predictive_entropy == pytest.approx(h, rel=1e-5)
    assert report.mutual_information == pytest.approx(h - h_member, rel=1e-4)
    assert report.params == 9
    assert report.inference_examples_per_second > 0
    assert math.isfinite(report.inference_examples_per_second)
    assert sum(report.reliability["count"]) == 3
    assert len(report.reliability["count"]) == 15


def test_report_is_json_serialisable_and_round_trips():
    torch.manual_seed(1)
    model = TableModel(torch.randn(3, 20, 4))
    report = evaluate(model, ids(20), torch.randint(0, 4, (20,)), batch_size=7)
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)
    back = json.loads(text)
    assert back == data
    assert set(back) == {f for f in EvalReport.__dataclass_fields__}
    assert isinstance(back["params"], int)
    assert isinstance(back["member_accuracy"], list)
    assert len(back["agreement"]) == 3
    assert all(len(row) == 3 for row in back["agreement"])
    assert EvalReport.from_dict(back) == report
    with pytest.raises(ValueError, match="nll"):
        EvalReport.from_dict({k: v for k, v in back.items() if k != "nll"})


def test_single_model_report():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]]])  # E = 1
    report = evaluate(TableModel(logits), ids(4), torch.tensor([0, 1, 1, 1]))
    assert report.agreement == [[1.0]]
    assert report.disagreement == 0.0
    assert report.mutual_information == pytest.approx(0.0, abs=1e-12)
    assert report.ensemble_accuracy == 0.75
    assert report.member_accuracy == [0.75]
    assert report.mean_member_accuracy == 0.75


def test_evaluate_warms_up_then_times_the_whole_pass(monkeypatch):
    synced = []
    monkeypatch.setattr(evaluation, "synchronize", lambda device: synced.append(device))
    model = TableModel(torch.zeros(2, 10, 3))
    x = ids(10)
    evaluate(model, x, torch.zeros(10, dtype=torch.int64), batch_size=4)
    # one untimed warm-up batch, then the full pass in batches of 4
    assert [b for b, _, _ in model.calls] == [4, 4, 4, 2]
    assert all(not training for _, training, _ in model.calls)
    assert synced == [x.device, x.device]  # before start and before stop


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: evaluate(m, torch.zeros(4), torch.zeros(4, dtype=torch.int64)), r"\[M, D\]"),
        (lambda m: evaluate(m, ids(4), torch.zeros(3, dtype=torch.int64)), "y_test"),
        (lambda m: evaluate(m, ids(4), torch.zeros(4, 1, dtype=torch.int64)), "y_test"),
        (lambda m: evaluate(m, ids(4), torch.zeros(4)), "integer"),
        (lambda m: evaluate(m, ids(4), torch.full((4,), 7)), r"\[0, 3\)"),
        (lambda m: evaluate(m, ids(0), torch.zeros(0, dtype=torch.int64)), "empty"),
        (lambda m: evaluate(m, ids(4), torch.zeros(4, dtype=torch.int64), batch_size=0), "batch_size"),
        (lambda m: predict_logits(m, ids(4), batch_size=-1), "batch_size"),
        (lambda m: predict_logits(m, ids(4), batch_size=2.0), "batch_size"),
        (lambda m: predict_logits(m, torch.zeros(2, 4, 2)), r"\[M, D\]"),
        (lambda m: predict_logits(m, [[0.0, 0.0]]), "torch.Tensor"),
        (lambda m: predict_logits(nn.Linear(2, 3), ids(4)), r"\[E, 4, C\]"),
        (lambda m: predict_logits(Transpose(), ids(4)), r"\[E, 4, C\]"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    model = TableModel(torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match=match):
        call(model)


def test_diverged_model_raises_value_error():
    model = TableModel(torch.full((2, 4, 3), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        evaluate(model, ids(4), torch.zeros(4, dtype=torch.int64))
