"""Hand-checkable cases for bench_core.metrics.

Probabilities are built in float64 so that hand-computed values match to ~1e-12.
"""

import math

import pytest
import torch

from bench_core import metrics as M


def probs_of(rows):
    return torch.tensor(rows, dtype=torch.float64)


def labels_of(values):
    return torch.tensor(values, dtype=torch.int64)


def logits_from_probs(members):
    """Logits whose softmax is the given probabilities: log p (up to a per-row constant)."""
    return torch.log(torch.tensor(members, dtype=torch.float64))


# --------------------------------------------------------------------------- probabilities


def test_member_probs_is_softmax_over_classes_and_stable():
    logits = torch.tensor([[[0.0, 0.0], [1000.0, 0.0]], [[-1000.0, 1000.0], [2.0, 2.0]]])
    p = M.member_probs(logits)
    assert p.shape == (2, 2, 2)
    assert torch.isfinite(p).all()
    expected = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.0, 1.0], [0.5, 0.5]]])
    torch.testing.assert_close(p, expected)


def test_member_probs_upcasts_half_precision():
    p = M.member_probs(torch.zeros(1, 2, 4, dtype=torch.float16))
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.full((1, 2, 4), 0.25))


def test_ensemble_probs_is_mean_of_softmax_not_softmax_of_mean_logits():
    # Member A is very sure of class 0, members B and C mildly prefer class 1.
    # A: logits [6, 0]   -> p0 = sigmoid(6)    = 0.99753
    # B, C: [0, 2.5]     -> p0 = sigmoid(-2.5) = 0.07586
    # mean of softmax: p0 = (0.99753 + 2 * 0.07586) / 3 = 0.38308 -> class 1
    # softmax of mean logits [2, 1.6667]: p0 = sigmoid(1/3) = 0.58257 -> class 0
    logits = torch.tensor([[[6.0, 0.0]], [[0.0, 2.5]], [[0.0, 2.5]]], dtype=torch.float64)
    ens = M.ensemble_probs(logits)
    assert ens.shape == (1, 2)
    p0 = (torch.sigmoid(torch.tensor(6.0)) + 2 * torch.sigmoid(torch.tensor(-2.5))) / 3
    assert ens[0, 0].item() == pytest.approx(p0.item(), abs=1e-6)
    assert ens[0, 0].item() == pytest.approx(0.38308, abs=1e-5)
    softmax_of_mean = torch.softmax(logits.mean(dim=0), dim=-1)
    assert softmax_of_mean[0, 0].item() == pytest.approx(0.58257, abs=1e-5)
    assert ens.argmax(dim=-1).item() == 1
    assert softmax_of_mean.argmax(dim=-1).item() == 0
    assert M.ensemble_accuracy(logits, labels_of([1])) == 1.0


# --------------------------------------------------------------------------- accuracy


def three_members_each_wrong_once():
    """3 members, 3 examples of class 0; member k puts 0.9 on the wrong class only for example k."""
    right, wrong = [0.9, 0.1], [0.1, 0.9]
    members = [[wrong if n == k else right for n in range(3)] for k in range(3)]
    return logits_from_probs(members), labels_of([0, 0, 0])


def test_ensemble_vote_fixes_member_errors():
    logits, labels = three_members_each_wrong_once()
    # each member: 2 of 3 right
    torch.testing.assert_close(M.member_accuracy(logits, labels), torch.full((3,), 2 / 3, dtype=torch.float64))
    assert M.mean_member_accuracy(logits, labels) == pytest.approx(2 / 3)
    # ensemble p(class 0) on every example = (0.9 + 0.9 + 0.1) / 3 = 0.6333 -> all right
    torch.testing.assert_close(M.ensemble_probs(logits)[:, 0], torch.full((3,), 1.9 / 3, dtype=torch.float64))
    assert M.ensemble_accuracy(logits, labels) == 1.0


def test_member_accuracy_per_member():
    # member 0 right on 1 of 4, member 1 right on all 4
    logits = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
            [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]],
        ]
    )
    labels = labels_of([1, 1, 0, 1])
    acc = M.member_accuracy(logits, labels)
    assert acc.shape == (2,)
    assert acc.tolist() == [0.25, 1.0]
    assert M.mean_member_accuracy(logits, labels) == 0.625


# --------------------------------------------------------------------------- NLL and Brier


@pytest.mark.parametrize("c", [2, 3, 10])
def test_nll_of_uniform_is_log_c(c):
    probs = torch.full((5, c), 1.0 / c, dtype=torch.float64)
    assert M.negative_log_likelihood(probs, labels_of([0, 1, 0, 1, 1])) == pytest.approx(math.log(c))


def test_nll_hand_case_and_clamp():
    # -(log 0.5 + log 0.25) / 2
    probs = probs_of([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    assert M.negative_log_likelihood(probs, labels_of([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    # one-hot correct -> 0; probability 0 on the truth -> clamped at 1e-12, finite
    assert M.negative_log_likelihood(probs_of([[1.0, 0.0]]), labels_of([0])) == 0.0
    assert M.negative_log_likelihood(probs_of([[1.0, 0.0]]), labels_of([1])) == pytest.approx(-math.log(M.NLL_EPS))


def test_ensemble_nll_from_logits_matches_the_probabilities_and_has_no_cap():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 50, 6), torch.randint(0, 6, (50,))
    from_probs = M.negative_log_likelihood(M.ensemble_probs(logits.double()), labels)
    assert M.ensemble_nll(logits, labels) == pytest.approx(from_probs, rel=1e-6)
    # hand cases: one member with logits [0, 100] and label 0 costs 100 + log(1 + e^-100) nats, not the
    # 27.63 that clamping the probability at NLL_EPS gives
    assert M.ensemble_nll(torch.tensor([[[0.0, 100.0]]]), labels_of([0])) == pytest.approx(100.0)
    assert M.negative_log_likelihood(M.ensemble_probs(torch.tensor([[[0.0, 100.0]]])), labels_of([0])) == (
        pytest.approx(-math.log(M.NLL_EPS))
    )
    # two confident members that disagree: the mean probability of the truth is about 1/2
    two = torch.tensor([[[0.0, 100.0]], [[100.0, 0.0]]])
    assert M.ensemble_nll(two, labels_of([0])) == pytest.approx(math.log(2))
    # uniform members: log C
    assert M.ensemble_nll(torch.zeros(3, 5, 4), labels_of([0, 1, 2, 3, 0])) == pytest.approx(math.log(4))


def test_brier_score_conventions():
    onehot = probs_of([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert M.brier_score(onehot, labels_of([1, 0])) == 0.0  # one-hot and right
    assert M.brier_score(onehot, labels_of([0, 2])) == 2.0  # one-hot and wrong: 1 + 1
    for c in (2, 4, 10):
        uniform = torch.full((3, c), 1.0 / c, dtype=torch.float64)
        # (1 - 1/c)^2 + (c - 1) / c^2 = 1 - 1/c
        assert M.brier_score(uniform, labels_of([0, 1, 1])) == pytest.approx(1 - 1 / c)
    # [0.7, 0.3] with label 0: 0.3^2 + 0.3^2 = 0.18
    assert M.brier_score(probs_of([[0.7, 0.3]]), labels_of([0])) == pytest.approx(0.18)


# --------------------------------------------------------------------------- calibration


def test_ece_hand_case():
    # confidences 0.9, 0.9, 0.6, 0.6 (15 bins: 0.9 in (13/15, 14/15], the two 0.6s share a bin)
    # the 0.9s are both right: |1.0 - 0.9| = 0.1, weight 2/4 -> 0.05
    # the 0.6s are both wrong: |0.0 - 0.6| = 0.6, weight 2/4 -> 0.30
    # ECE = 0.05 + 0.30 = 0.35
    probs = probs_of([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = labels_of([0, 1, 1, 0])
    assert M.expected_calibration_error(probs, labels) == pytest.approx(0.35)
    # one bin for everything: mean conf 0.75, accuracy 0.5 -> 0.25
    assert M.expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.25)


def test_ece_perfectly_calibrated_is_zero():
    # confidence 0.75 on class 0 for 4 examples, 3 of them are class 0
    probs = probs_of([[0.75, 0.25]] * 4)
    assert M.expected_calibration_error(probs, labels_of([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    # two bins, each calibrated: 0.5 (1 of 2 right) and 1.0 (2 of 2 right)
    probs = probs_of([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    assert M.expected_calibration_error(probs, labels_of([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("confidence", [0.95, 1.0, 0.7])
def test_ece_confident_and_wrong_equals_confidence(confidence):
    probs = probs_of([[confidence, 1 - confidence]] * 6)
    assert M.expected_calibration_error(probs, labels_of([1] * 6)) == pytest.approx(confidence)


def test_ece_works_in_float32():
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    assert M.expected_calibration_error(probs, labels_of([0, 1, 1, 0])) == pytest.approx(0.35, abs=1e-6)


def test_reliability_curve_hand_case():
    probs = probs_of([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    curve = M.reliability_curve(probs, labels_of([0, 1, 1, 0]))
    assert set(curve) == {"bin_lower", "bin_upper", "confidence", "accuracy", "count"}
    assert all(len(v) == 15 for v in curve.values())
    assert curve["bin_lower"][0] == 0.0
    assert curve["bin_upper"][-1] == 1.0
    assert curve["bin_lower"][13] == pytest.approx(13 / 15)
    assert sum(curve["count"]) == 4
    assert curve["count"][13] == 2  # the two 0.9s
    assert curve["confidence"][13] == pytest.approx(0.9)
    assert curve["accuracy"][13] == 1.0
    filled = [i for i, k in enumerate(curve["count"]) if k]
    assert len(filled) == 2  # the 0.6s share one bin
    (six,) = (i for i in filled if i != 13)
    assert curve["confidence"][six] == pytest.approx(0.6)
    assert curve["accuracy"][six] == 0.0
    for i, k in enumerate(curve["count"]):
        if k == 0:
            assert curve["confidence"][i] is None
            assert curve["accuracy"][i] is None
    assert all(isinstance(k, int) for k in curve["count"])


def test_reliability_bin_edges_are_right_closed():
    # 2 bins (0, 0.5] and (0.5, 1]: confidence exactly 0.5 goes low, exactly 1.0 goes into the last bin
    probs = probs_of([[0.5, 0.5], [1.0, 0.0], [0.75, 0.25]])
    curve = M.reliability_curve(probs, labels_of([0, 0, 0]), n_bins=2)
    assert curve["bin_lower"] == [0.0, 0.5]
    assert curve["bin_upper"] == [0.5, 1.0]
    assert curve["count"] == [1, 2]
    assert curve["confidence"] == [0.5, 0.875]
    assert curve["accuracy"] == [1.0, 1.0]


# --------------------------------------------------------------------------- diversity


def test_identical_members_agree_fully():
    preds = torch.tensor([[0, 1, 2, 1, 0]] * 4)
    torch.testing.assert_close(M.agreement_matrix(preds), torch.ones(4, 4, dtype=torch.float64))
    assert M.mean_pairwise_disagreement(preds) == 0.0
    logits = torch.randn(1, 5, 3).expand(4, 5, 3)
    assert M.mutual_information(M.member_probs(logits)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [0, 1, 3, 10])
def test_two_members_disagreeing_on_k_examples(k):
    n = 10
    first = torch.arange(n) % 3
    second = first.clone()
    second[:k] = (second[:k] + 1) % 3
    agree = M.agreement_matrix(torch.stack([first, second]))
    expected = torch.tensor([[1.0, (n - k) / n], [(n - k) / n, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(agree, expected)
    assert M.mean_pairwise_disagreement(torch.stack([first, second])) == pytest.approx(k / n)


def test_three_member_agreement_hand_case():
    preds = torch.tensor(
        [
            [0, 1, 2, 3],
            [0, 1, 2, 0],
            [1, 1, 0, 0],
        ]
    )
    # (0,1): same on examples 0, 1, 2 -> 3/4
    # (0,2): same on example 1 only   -> 1/4
    # (1,2): same on examples 1, 3    -> 2/4
    expected = torch.tensor(
        [
            [1.00, 0.75, 0.25],
            [0.75, 1.00, 0.50],
            [0.25, 0.50, 1.00],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(M.agreement_matrix(preds), expected)
    # mean over i != j of 1 - agreement: (0.25 + 0.75 + 0.5) / 3 = 0.5
    assert M.mean_pairwise_disagreement(preds) == pytest.approx(0.5)


def test_single_member_diversity():
    preds = torch.tensor([[2, 0, 1]])
    assert M.agreement_matrix(preds).tolist() == [[1.0]]
    assert M.mean_pairwise_disagreement(preds) == 0.0


# --------------------------------------------------------------------------- uncertainty


@pytest.mark.parametrize("c", [2, 5, 10])
def test_entropy_of_uniform_is_log_c(c):
    assert M.predictive_entropy(torch.full((3, c), 1.0 / c)) == pytest.approx(math.log(c), rel=1e-6)


def test_entropy_of_one_hot_is_zero_and_hand_case():
    assert M.predictive_entropy(probs_of([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])) == 0.0
    # mean of H([0.5, 0.5]) = log 2 and H([1, 0]) = 0
    assert M.predictive_entropy(probs_of([[0.5, 0.5], [1.0, 0.0]])) == pytest.approx(math.log(2) / 2)


def test_mutual_information_of_confident_disagreeing_members_is_log_2():
    # member 0 says class 0, member 1 says class 1, both certain: H(mean) = log 2, mean H = 0
    member = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    assert M.mutual_information(member) == pytest.approx(math.log(2))


def test_mutual_information_hand_case():
    # one example; members [0.5, 0.5] and [1, 0]: mean [0.75, 0.25]
    # MI = H([0.75, 0.25]) - (log 2 + 0) / 2
    member = torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]], dtype=torch.float64)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert M.mutual_information(member) == pytest.approx(h - math.log(2) / 2)
    assert M.mutual_information(member) >= 0


def test_mutual_information_is_non_negative_on_random_members():
    torch.manual_seed(0)
    member = M.member_probs(torch.randn(5, 50, 4) * 3)
    assert M.mutual_information(member) > 0
    assert M.mutual_information(member[:1]) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- bad input

LOGITS = torch.zeros(2, 3, 4)
LABELS = labels_of([0, 1, 2])
PROBS = torch.full((3, 4), 0.25)
PREDS = torch.tensor([[0, 1, 2], [0, 1, 1]])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        # logits
        (lambda: M.member_probs(torch.zeros(3, 4)), r"\[E, N, C\]"),
        (lambda: M.member_probs(torch.zeros(1, 2, 3, 4)), r"\[E, N, C\]"),
        (lambda: M.member_probs(torch.zeros(2, 0, 4)), "empty"),
        (lambda: M.member_probs(torch.zeros(0, 3, 4)), "empty"),
        (lambda: M.member_probs(torch.zeros(2, 3, 0)), "empty"),
        (lambda: M.member_probs(torch.zeros(2, 3, 4, dtype=torch.int64)), "floating"),
        (lambda: M.member_probs(torch.tensor([[[0.0, float("nan")]]])), "NaN"),
        (lambda: M.member_probs([[[0.0, 1.0]]]), "torch.Tensor"),
        (lambda: M.ensemble_probs(torch.zeros(3, 4)), r"\[E, N, C\]"),
        # labels
        (lambda: M.member_accuracy(LOGITS, labels_of([0, 1])), "N = 3"),
        (lambda: M.ensemble_accuracy(LOGITS, labels_of([0, 1, 2, 3])), "N = 3"),
        (lambda: M.mean_member_accuracy(LOGITS, LABELS.unsqueeze(0)), r"\[N\]"),
        (lambda: M.ensemble_accuracy(LOGITS, LABELS.float()), "integer"),
        (lambda: M.ensemble_accuracy(LOGITS, labels_of([0, 1, 4])), r"\[0, 4\)"),
        (lambda: M.ensemble_accuracy(LOGITS, labels_of([0, -1, 2])), r"\[0, 4\)"),
        (lambda: M.ensemble_accuracy(LOGITS, [0, 1, 2]), "torch.Tensor"),
        # probabilities
        (lambda: M.negative_log_likelihood(torch.full((2, 3, 4), 0.25), LABELS), r"\[N, C\]"),
        (lambda: M.negative_log_likelihood(PROBS, labels_of([0, 1])), "N = 3"),
        (lambda: M.negative_log_likelihood(torch.zeros(0, 4), labels_of([])), "empty"),
        (lambda: M.negative_log_likelihood(torch.randn(3, 4), LABELS), "probabilities"),
        (lambda: M.ensemble_nll(PROBS, LABELS), r"\[E, N, C\]"),
        (lambda: M.ensemble_nll(LOGITS, labels_of([0, 1])), "N = 3"),
        (lambda: M.ensemble_nll(LOGITS, labels_of([0, 1, 7])), r"\[0, 4\)"),
        (lambda: M.ensemble_nll(torch.full((2, 3, 4), float("inf")), LABELS), "finite|inf"),
        (lambda: M.brier_score(PROBS * 2, LABELS), "sum to 1"),
        (lambda: M.brier_score(torch.tensor([[1.5, -0.5]] * 3), labels_of([0, 1, 0])), "negative"),
        (lambda: M.brier_score(PROBS, labels_of([0, 1])), "N = 3"),
        (lambda: M.brier_score(torch.full((4,), 0.25), LABELS), r"\[N, C\]"),
        (lambda: M.expected_calibration_error(PROBS, labels_of([0, 1])), "N = 3"),
        (lambda: M.expected_calibration_error(PROBS.unsqueeze(0), LABELS), r"\[N, C\]"),
        (lambda: M.expected_calibration_error(PROBS, LABELS, n_bins=0), "n_bins"),
        (lambda: M.expected_calibration_error(PROBS, LABELS, n_bins=2.5), "n_bins"),
        (lambda: M.expected_calibration_error(PROBS, LABELS, n_bins=True), "n_bins"),
        (lambda: M.reliability_curve(PROBS, LABELS, n_bins=-3), "n_bins"),
        (lambda: M.reliability_curve(PROBS, labels_of([0, 1, 9])), r"\[0, 4\)"),
        (lambda: M.predictive_entropy(torch.full((2, 3, 4), 0.25)), r"\[N, C\]"),
        (lambda: M.predictive_entropy(torch.zeros(0, 4)), "empty"),
        (lambda: M.predictive_entropy(torch.tensor([[0.5, float("nan")]])), "NaN"),
        (lambda: M.mutual_information(PROBS), r"\[E, N, C\]"),
        (lambda: M.mutual_information(torch.randn(2, 3, 4)), "probabilities"),
        (lambda: M.mutual_information(torch.zeros(2, 0, 4)), "empty"),
        # predictions
        (lambda: M.agreement_matrix(torch.tensor([0, 1, 2])), r"\[E, N\]"),
        (lambda: M.agreement_matrix(torch.zeros(2, 3)), "integer"),
        (lambda: M.agreement_matrix(torch.zeros(2, 0, dtype=torch.int64)), "empty"),
        (lambda: M.agreement_matrix(torch.tensor([[0, -1]])), "negative"),
        (lambda: M.mean_pairwise_disagreement(torch.zeros(2, 3, 4, dtype=torch.int64)), r"\[E, N\]"),
        (lambda: M.mean_pairwise_disagreement(PREDS.bool()), "integer"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_good_inputs_of_the_bad_input_table_pass():
    # the fixtures above are valid on their own, so each failure comes from the one thing changed
    M.member_probs(LOGITS)
    M.ensemble_accuracy(LOGITS, LABELS)
    M.negative_log_likelihood(PROBS, LABELS)
    M.expected_calibration_error(PROBS, LABELS, n_bins=3)
    M.mutual_information(M.member_probs(LOGITS))
    M.agreement_matrix(PREDS)
    # labels of any integer dtype are accepted
    assert M.ensemble_accuracy(LOGITS, LABELS.to(torch.int32)) == M.ensemble_accuracy(LOGITS, LABELS)
