"""Metrics of an ensemble's predictions: pure functions on logits, probabilities and labels.

Shapes used throughout:

- ``logits`` ``[E, N, C]``: E members, N examples, C classes (a single model has E = 1).
- ``labels`` ``[N]``: integer class indices in ``[0, C)`` (int64 in this project).
- ``probs`` ``[N, C]``: one probability vector per example (e.g. the ensemble's prediction).
- ``member_probs`` ``[E, N, C]``: one probability vector per member and example.
- ``preds`` ``[E, N]``: the integer class each member predicts for each example.

The functions assume no device: tensors stay where they are. Scalar results come back as
Python floats, reduced in float64 (float32 on MPS, which has no float64). Every function
checks its inputs and raises ``ValueError`` with a one-line message on a wrong number of
dimensions, a mismatched N, an empty tensor, a non-finite value, labels out of range, or
"probabilities" that are negative or do not sum to 1 (which catches logits passed by mistake).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NLL_EPS = 1e-12  # probabilities are clamped to at least this before the log in negative_log_likelihood
DEFAULT_BINS = 15  # bins of the calibration metrics

__all__ = [
    "DEFAULT_BINS",
    "NLL_EPS",
    "agreement_matrix",
    "brier_score",
    "ensemble_accuracy",
    "ensemble_nll",
    "ensemble_probs",
    "expected_calibration_error",
    "mean_member_accuracy",
    "mean_pairwise_disagreement",
    "member_accuracy",
    "member_probs",
    "mutual_information",
    "negative_log_likelihood",
    "predictive_entropy",
    "reliability_curve",
]


# --------------------------------------------------------------------------- input checks


def _acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype reductions run in: float64, except on MPS (no float64 there)."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _check_tensor(t: object, name: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(t: object, name: str, ndim: int, dims: str) -> None:
    """Check that ``t`` is a non-empty, finite, floating-point tensor with ``ndim`` dimensions."""
    _check_tensor(t, name)
    if t.ndim != ndim:
        raise ValueError(f"{name} must have shape {dims}, got shape {_shape(t)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {_shape(t)}); every dimension of {dims} must be at least 1")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_logits(logits: object, name: str = "logits") -> None:
    _check_float(logits, name, 3, "[E, N, C]")


def _check_probs(probs: object, name: str, ndim: int) -> None:
    """Check a probability tensor: shape, non-negative entries, rows summing to 1."""
    dims = "[N, C]" if ndim == 2 else "[E, N, C]"
    _check_float(probs, name, ndim, dims)
    if bool((probs < 0).any()):
        raise ValueError(f"{name} has negative entries: expected probabilities (did you pass logits?)")
    sums = probs.sum(dim=-1, dtype=_acc_dtype(probs))
    tol = max(1e-3, probs.shape[-1] * torch.finfo(probs.dtype).eps)
    worst = float((sums - 1).abs().max())
    if worst > tol:
        raise ValueError(
            f"{name} rows must sum to 1 over the last dimension (off by up to {worst:.3g}): "
            "expected probabilities (did you pass logits?)"
        )


def _check_labels(labels: object, n: int, n_classes: int, device: torch.device) -> Tensor:
    """Check labels ``[N]`` against N and C; return them as int64 on ``device``."""
    _check_tensor(labels, "labels")
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape [N], got shape {_shape(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (int64), got dtype {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but the predictions cover N = {n} examples")
    if n == 0:
        raise ValueError("labels is empty: need at least one example")
    labels = labels.to(device=device, dtype=torch.long)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes}) for C = {n_classes} classes, got values in [{low}, {high}]"
        )
    return labels


def _check_preds(preds: object) -> None:
    _check_tensor(preds, "preds")
    if preds.ndim != 2:
        raise ValueError(f"preds must have shape [E, N], got shape {_shape(preds)}")
    if preds.is_floating_point() or preds.is_complex() or preds.dtype == torch.bool:
        raise ValueError(f"preds must be an integer tensor of class indices, got dtype {preds.dtype}")
    if preds.numel() == 0:
        raise ValueError(f"preds is empty (shape {_shape(preds)}); E and N must be at least 1")
    if int(preds.min()) < 0:
        raise ValueError("preds must be class indices >= 0, got a negative value")


def _check_n_bins(n_bins: object) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    return n_bins


# --------------------------------------------------------------------------- probabilities


def member_probs(logits: Tensor) -> Tensor:
    """Softmax of every member's logits over the classes.

    Half-precision logits are upcast to float32 first; other dtypes are kept.

    Args:
        logits: the members' logits.

    Returns:
        The members' class probabilities, same shape and device as ``logits``.

    Shape:
        logits: ``[E, N, C]``. Returns ``[E, N, C]``.

    Raises:
        ValueError: ``logits`` is not a non-empty, finite, floating-point ``[E, N, C]`` tensor.
    """
    _check_logits(logits)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.softmax(logits, dim=-1)


def ensemble_probs(logits: Tensor) -> Tensor:
    """The ensemble's prediction: the mean of the members' softmax probabilities.

    This averages probabilities, not logits: ``mean_k softmax(logits[k])``, which in general
    differs from ``softmax(mean_k logits[k])``.

    Args:
        logits: the members' logits.

    Returns:
        The ensemble's class probabilities; each row sums to 1.

    Shape:
        logits: ``[E, N, C]``. Returns ``[N, C]``.

    Raises:
        ValueError: ``logits`` is not a non-empty, finite, floating-point ``[E, N, C]`` tensor.
    """
    return member_probs(logits).mean(dim=0)


# --------------------------------------------------------------------------- accuracy


def member_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Accuracy of each member on its own (argmax of its logits).

    Args:
        logits: the members' logits.
        labels: the true classes.

    Returns:
        The fraction of examples each member gets right, in float64 (float32 on MPS).

    Shape:
        logits: ``[E, N, C]``; labels: ``[N]``. Returns ``[E]``.

    Raises:
        ValueError: bad shapes, mismatched N, empty input, or labels outside ``[0, C)``.
    """
    _check_logits(logits)
    _, n, c = logits.shape
    labels = _check_labels(labels, n, c, logits.device)
    correct = logits.argmax(dim=-1) == labels.unsqueeze(0)
    return correct.sum(dim=1).to(_acc_dtype(logits)) / n


def ensemble_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Accuracy of the ensemble: argmax of the mean of the members' softmax.

    Args:
        logits: the members' logits.
        labels: the true classes.

    Returns:
        The fraction of examples the ensemble's prediction gets right.

    Shape:
        logits: ``[E, N, C]``; labels: ``[N]``.

    Raises:
        ValueError: bad shapes, mismatched N, empty input, or labels outside ``[0, C)``.
    """
    probs = ensemble_probs(logits)
    _, n, c = logits.shape
    labels = _check_labels(labels, n, c, logits.device)
    return float((probs.argmax(dim=-1) == labels).sum()) / n


def mean_member_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Mean of the members' individual accuracies (the figure the seed notebook reported).

    This is not the ensemble's accuracy; see ``ensemble_accuracy``.

    Args:
        logits: the members' logits.
        labels: the true classes.

    Returns:
        The average over members of each member's accuracy.

    Shape:
        logits: ``[E, N, C]``; labels: ``[N]``.

    Raises:
        ValueError: bad shapes, mismatched N, empty input, or labels outside ``[0, C)``.
    """
    return float(member_accuracy(logits, labels).mean())


# --------------------------------------------------------------------------- proper scoring rules


def negative_log_likelihood(probs: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the true class, in nats.

    ``mean_n -log(max(p[n, y_n], NLL_EPS))`` with ``NLL_EPS = 1e-12``: a probability of exactly
    0 on the true class costs ``-log(1e-12) ≈ 27.63`` nats instead of infinity, and so does any
    probability below it. From logits, ``ensemble_nll`` has no such cap (the workbench's reports use it).

    Args:
        probs: predicted class probabilities (e.g. ``ensemble_probs(logits)``).
        labels: the true classes.

    Returns:
        The mean NLL (0 for one-hot correct predictions, ``log C`` for uniform ones).

    Shape:
        probs: ``[N, C]``; labels: ``[N]``.

    Raises:
        ValueError: bad shapes, mismatched N, empty input, labels outside ``[0, C)``, or
            ``probs`` not probabilities.
    """
    _check_probs(probs, "probs", 2)
    n, c = probs.shape
    labels = _check_labels(labels, n, c, probs.device)
    p_true = probs.to(_acc_dtype(probs)).gather(1, labels.unsqueeze(1)).squeeze(1)
    return float(-torch.log(p_true.clamp_min(NLL_EPS)).mean())


def ensemble_nll(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the ensemble's prediction (the mean of the members' softmax), from logits.

    ``mean_n -log(mean_k softmax(logits[k, n])[y_n])``, computed in log space,
    ``log(mean_k p_k) = logsumexp_k(log_softmax(logits[k, n])[y_n]) - log E``, so it stays exact
    where a probability underflows: where ``negative_log_likelihood`` on the probabilities would
    clamp at ``-log(NLL_EPS) ≈ 27.63`` nats, this gives the true figure (logits ``[0, 100]`` with
    label 0: 100 nats). Otherwise equal to ``negative_log_likelihood(ensemble_probs(logits), labels)``
    within float rounding.

    Args:
        logits: the members' logits.
        labels: the true classes.

    Returns:
        The mean NLL in nats (``log C`` when every member predicts uniformly).

    Shape:
        logits: ``[E, N, C]``; labels: ``[N]``.

    Raises:
        ValueError: ``logits`` is not a non-empty, finite, floating-point ``[E, N, C]`` tensor,
            mismatched N, or labels outside ``[0, C)``.
    """
    _check_logits(logits)
    n_members, n, c = logits.shape
    labels = _check_labels(labels, n, c, logits.device)
    log_p = torch.log_softmax(logits.to(_acc_dtype(logits)), dim=-1)  # [E, N, C]
    log_p_true = log_p.gather(2, labels.view(1, n, 1).expand(n_members, n, 1)).squeeze(2)  # [E, N]
    log_mean = torch.logsumexp(log_p_true, dim=0) - math.log(n_members)  # [N]
    return float(-log_mean.mean())


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score: mean over examples of the summed squared error to the one-hot label.

    Convention: ``mean_n sum_c (p[n, c] - onehot(y_n)[c])**2``, summed (not averaged) over
    classes, so it ranges from 0 (one-hot and correct) to 2 (one-hot and wrong); a uniform
    prediction over C classes scores ``1 - 1/C``.

    Args:
        probs: predicted class probabilities.
        labels: the true classes.

    Returns:
        The Brier score in ``[0, 2]``.

    Shape:
        probs: ``[N, C]``; labels: ``[N]``.

    Raises:
        ValueError: bad shapes, mismatched N, empty input, labels outside ``[0, C)``, or
            ``probs`` not probabilities.
    """
    _check_probs(probs, "probs", 2)
    n, c = probs.shape
    labels = _check_labels(labels, n, c, probs.device)
    p = probs.to(_acc_dtype(probs))
    onehot = torch.nn.functional.one_hot(labels, num_classes=c).to(p.dtype)
    return float(((p - onehot) ** 2).sum(dim=1).mean())


# --------------------------------------------------------------------------- calibration


def _bin_sums(probs: Tensor, labels: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin example counts, summed confidences and summed correctness (see ``expected_calibration_error``)."""
    _check_probs(probs, "probs", 2)
    n_bins = _check_n_bins(n_bins)
    n, c = probs.shape
    labels = _check_labels(labels, n, c, probs.device)
    dtype = _acc_dtype(probs)
    conf, pred = probs.to(dtype).max(dim=1)
    correct = (pred == labels).to(dtype)
    # Inner edges 1/n .. (n-1)/n; bucketize(right=False) puts x in bin i when edge[i-1] < x <= edge[i],
    # i.e. bin i holds (i/n, (i+1)/n], with 0 in the first bin and 1 in the last.
    inner = torch.arange(1, n_bins, dtype=dtype, device=probs.device) / n_bins
    index = torch.bucketize(conf, inner, right=False)
    count = torch.bincount(index, minlength=n_bins).to(dtype)
    sum_conf = torch.zeros(n_bins, dtype=dtype, device=probs.device).index_add_(0, index, conf)
    sum_correct = torch.zeros(n_bins, dtype=dtype, device=probs.device).index_add_(0, index, correct)
    return count, sum_conf, sum_correct


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error with equal-width confidence bins.

    Confidence is the top probability of each example. Bin ``i`` of ``n_bins`` holds the
    confidences in ``(i/n_bins, (i+1)/n_bins]`` (a confidence of exactly 0 goes into the first
    bin). ``ECE = sum_b (|B_b| / N) * |acc(B_b) - conf(B_b)|``, where ``acc`` is the fraction of
    the bin's examples whose top class is the label and ``conf`` their mean confidence; empty
    bins contribute nothing. A confidence that lands on an edge in exact arithmetic may fall
    either side of it after floating-point rounding.

    Args:
        probs: predicted class probabilities.
        labels: the true classes.
        n_bins: number of equal-width bins over ``[0, 1]``.

    Returns:
        The ECE in ``[0, 1]``.

    Shape:
        probs: ``[N, C]``; labels: ``[N]``.

    Raises:
        ValueError: bad shapes, mismatched N, empty input, labels outside ``[0, C)``,
            ``probs`` not probabilities, or ``n_bins`` not an integer >= 1.
    """
    count, sum_conf, sum_correct = _bin_sums(probs, labels, n_bins)
    # (|B|/N) * |sum_correct/|B| - sum_conf/|B|| == |sum_correct - sum_conf| / N
    return float((sum_correct - sum_conf).abs().sum() / count.sum())


def reliability_curve(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> dict:
    """Per-bin mean confidence and accuracy, for a reliability diagram.

    Uses the same bins as ``expected_calibration_error``.

    Args:
        probs: predicted class probabilities.
        labels: the true classes.
        n_bins: number of equal-width bins over ``[0, 1]``.

    Returns:
        A JSON-serialisable dict of lists, one entry per bin: ``bin_lower`` and ``bin_upper``
        (the bin's edges), ``confidence`` (mean confidence of its examples), ``accuracy``
        (fraction of them predicted right) and ``count`` (number of examples, an int).
        ``confidence`` and ``accuracy`` are None for an empty bin.

    Shape:
        probs: ``[N, C]``; labels: ``[N]``.

    Raises:
        ValueError: bad shapes, mismatched N, empty input, labels outside ``[0, C)``,
            ``probs`` not probabilities, or ``n_bins`` not an integer >= 1.
    """
    count, sum_conf, sum_correct = _bin_sums(probs, labels, n_bins)
    counts = [round(v) for v in count.tolist()]
    confs = sum_conf.tolist()
    accs = sum_correct.tolist()
    return {
        "bin_lower": [i / n_bins for i in range(n_bins)],
        "bin_upper": [(i + 1) / n_bins for i in range(n_bins)],
        "confidence": [s / k if k else None for s, k in zip(confs, counts, strict=True)],
        "accuracy": [s / k if k else None for s, k in zip(accs, counts, strict=True)],
        "count": counts,
    }


# --------------------------------------------------------------------------- diversity


def agreement_matrix(preds: Tensor) -> Tensor:
    """Pairwise agreement of the members' predicted classes.

    Entry ``(i, j)`` is the fraction of examples on which members ``i`` and ``j`` predict the
    same class; the matrix is symmetric with ones on the diagonal. Computed with one vectorised
    comparison per member (memory ``O(E * N)``), counts exact.

    Args:
        preds: each member's predicted class, e.g. ``logits.argmax(-1)``.

    Returns:
        The agreement matrix, float64 (float32 on MPS), on ``preds``' device.

    Shape:
        preds: ``[E, N]``. Returns ``[E, E]``.

    Raises:
        ValueError: ``preds`` is not a non-empty integer ``[E, N]`` tensor of indices >= 0.
    """
    _check_preds(preds)
    e, n = preds.shape
    same = torch.stack([(preds == preds[i]).sum(dim=1) for i in range(e)])  # [E, E] integer counts
    return same.to(_acc_dtype(preds)) / n


def mean_pairwise_disagreement(preds: Tensor) -> float:
    """Mean over ordered pairs ``i != j`` of the fraction of examples where members disagree.

    Args:
        preds: each member's predicted class.

    Returns:
        ``mean_{i != j} (1 - agreement[i, j])``; 0.0 when there is a single member.

    Shape:
        preds: ``[E, N]``.

    Raises:
        ValueError: ``preds`` is not a non-empty integer ``[E, N]`` tensor of indices >= 0.
    """
    agree = agreement_matrix(preds)
    e = agree.shape[0]
    if e == 1:
        return 0.0
    off_diagonal = agree.sum() - agree.diagonal().sum()
    return float(1 - off_diagonal / (e * (e - 1)))


# --------------------------------------------------------------------------- uncertainty


def _entropy(p: Tensor) -> Tensor:
    """Entropy in nats over the last dimension, with 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(dim=-1)


def predictive_entropy(probs: Tensor) -> float:
    """Mean entropy of the predicted distribution, in nats (natural log).

    ``mean_n -sum_c p[n, c] log p[n, c]`` with ``0 log 0 = 0``: 0 for one-hot predictions,
    ``log C`` for uniform ones.

    Args:
        probs: predicted class probabilities (e.g. the ensemble's).

    Returns:
        The mean entropy in nats.

    Shape:
        probs: ``[N, C]``.

    Raises:
        ValueError: ``probs`` is not a non-empty ``[N, C]`` tensor of probabilities.
    """
    _check_probs(probs, "probs", 2)
    return float(_entropy(probs.to(_acc_dtype(probs))).mean())


def mutual_information(member_probs: Tensor) -> float:
    """Mutual information between the prediction and the member (the ensemble's epistemic part).

    ``mean_n [ H(mean_k p_k[n]) - mean_k H(p_k[n]) ]`` in nats: the entropy of the ensemble's
    prediction minus the members' mean entropy. It is 0 when all members agree exactly and
    ``log 2`` when two confident members pick different classes. Mathematically >= 0; the
    result is clamped at 0 to hide rounding below zero.

    Args:
        member_probs: each member's class probabilities, e.g. ``member_probs(logits)``.

    Returns:
        The mean mutual information in nats.

    Shape:
        member_probs: ``[E, N, C]``.

    Raises:
        ValueError: the input is not a non-empty ``[E, N, C]`` tensor of probabilities.
    """
    _check_probs(member_probs, "member_probs", 3)
    p = member_probs.to(_acc_dtype(member_probs))
    total = _entropy(p.mean(dim=0))  # [N]
    aleatoric = _entropy(p).mean(dim=0)  # [N]
    return max(0.0, float((total - aleatoric).mean()))
