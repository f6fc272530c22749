"""The test-split report of a trained model: accuracy, calibration, diversity, uncertainty, speed.

Every model in this project maps ``x [B, D]`` to logits ``[E, B, C]`` (a single model has
E = 1). ``evaluate`` runs the model over the test split once, timing that pass honestly, and
summarises the logits with ``bench_core.metrics``. The ensemble's prediction is always the mean
of the members' softmax probabilities.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from bench_core import metrics
from bench_core.devices import synchronize

__all__ = ["EvalReport", "count_parameters", "evaluate", "predict_logits"]


@dataclass
class EvalReport:
    """What ``evaluate`` measured on the test split.

    Attributes:
        ensemble_accuracy: accuracy of the ensemble's prediction (argmax of the mean softmax).
        member_accuracy: accuracy of each member on its own, E entries.
        mean_member_accuracy: mean of ``member_accuracy`` (the figure the seed notebook reported
            as its result; it is not the ensemble's accuracy).
        nll: mean negative log-likelihood of the ensemble's prediction, in nats.
        ece: expected calibration error of the ensemble's prediction, 15 equal-width bins.
        brier: Brier score of the ensemble's prediction (summed over classes, range 0..2).
        agreement: E x E fractions of examples on which two members predict the same class.
        disagreement: mean over member pairs of ``1 - agreement`` (0 for a single model).
        predictive_entropy: mean entropy of the ensemble's prediction, in nats.
        mutual_information: mean entropy of the ensemble's prediction minus the members' mean
            entropy, in nats (0 for a single model).
        params: number of trainable parameters of the model.
        inference_examples_per_second: test examples per second of the timed inference pass.
        reliability: ``metrics.reliability_curve`` of the ensemble's prediction (15 bins).
    """

    ensemble_accuracy: float
    member_accuracy: list[float]
    mean_member_accuracy: float
    nll: float
    ece: float
    brier: float
    agreement: list[list[float]]
    disagreement: float
    predictive_entropy: float
    mutual_information: float
    params: int
    inference_examples_per_second: float
    reliability: dict

    def to_dict(self) -> dict:
        """The report as plain floats, ints, lists and dicts, fit for ``json.dumps``."""
        return {
            "ensemble_accuracy": float(self.ensemble_accuracy),
            "member_accuracy": [float(v) for v in self.member_accuracy],
            "mean_member_accuracy": float(self.mean_member_accuracy),
            "nll": float(self.nll),
            "ece": float(self.ece),
            "brier": float(self.brier),
            "agreement": [[float(v) for v in row] for row in self.agreement],
            "disagreement": float(self.disagreement),
            "predictive_entropy": float(self.predictive_entropy),
            "mutual_information": float(self.mutual_information),
            "params": int(self.params),
            "inference_examples_per_second": float(self.inference_examples_per_second),
            "reliability": {key: list(values) for key, values in self.reliability.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> EvalReport:
        """Rebuild a report from ``to_dict()``'s output (e.g. read back from the run store).

        Raises:
            ValueError: a field is missing.
        """
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"evaluation report is missing field(s): {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``), each shared tensor counted once.

    Args:
        model: any module.

    Returns:
        The total number of trainable scalars.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; afterwards restore each one's own train/eval flag."""
    saved = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def _check_inputs(x: object) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must have shape [M, D], got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x is empty: need at least one example")


def _forward(model: nn.Module, x_batch: Tensor) -> Tensor:
    """One forward pass, checking that the model returned logits ``[E, B, C]``."""
    out = model(x_batch)
    if not isinstance(out, Tensor) or out.ndim != 3 or out.shape[1] != x_batch.shape[0]:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits of shape [E, {x_batch.shape[0]}, C], got {got}")
    return out


def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Forward ``x`` in batches and concatenate along the example dimension (no mode switching)."""
    outs = [_forward(model, x[start : start + batch_size]) for start in range(0, x.shape[0], batch_size)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Every member's logits on ``x``, computed in eval mode and in batches.

    Runs under ``torch.inference_mode()`` (the result is an inference tensor: no autograd) with
    every submodule in eval mode, and restores each submodule's train/eval flag afterwards.

    Args:
        model: maps ``x [B, D]`` to logits ``[E, B, C]``.
        x: the inputs, on the model's device.
        batch_size: examples per forward pass; the result depends on it only through float rounding (the
            products may sum in another order at another size).

    Returns:
        The logits of all members on all of ``x``.

    Shape:
        x: ``[M, D]``. Returns ``[E, M, C]``.

    Raises:
        ValueError: ``x`` is not a non-empty ``[M, D]`` tensor, ``batch_size`` is not an integer
            >= 1, or the model returned something other than ``[E, B, C]``.
    """
    _check_inputs(x)
    batch_size = _check_batch_size(batch_size)
    with _eval_mode(model), torch.inference_mode():
        return _predict(model, x, batch_size)


def evaluate(model: nn.Module, x_test: Tensor, y_test: Tensor, batch_size: int = 1024) -> EvalReport:
    """Run the model over the test split and report accuracy, calibration, diversity and speed.

    Timing: one untimed warm-up batch first, then the whole pass over ``x_test`` is timed with
    ``time.perf_counter``, calling ``bench_core.devices.synchronize`` on ``x_test.device``
    right before starting and right before stopping the clock, so queued GPU work is counted.
    The model's train/eval flags are restored afterwards.

    Args:
        model: maps ``x [B, D]`` to logits ``[E, B, C]`` (E = 1 for a single model).
        x_test: the test inputs, on the model's device.
        y_test: the test labels.
        batch_size: examples per forward pass.

    Returns:
        The report; the ensemble's prediction is the mean of the members' softmax.

    Shape:
        x_test: ``[N, D]``; y_test: ``[N]`` (int64).

    Raises:
        ValueError: bad shapes, mismatched N, empty input, labels outside ``[0, C)``, a bad
            ``batch_size``, the model returned a wrong shape, or non-finite logits.
    """
    _check_inputs(x_test)
    batch_size = _check_batch_size(batch_size)
    if not isinstance(y_test, Tensor) or y_test.ndim != 1 or y_test.shape[0] != x_test.shape[0]:
        got = list(y_test.shape) if isinstance(y_test, Tensor) else type(y_test).__name__
        raise ValueError(f"y_test must have shape [{x_test.shape[0]}] to match x_test, got {got}")
    device = x_test.device
    n = x_test.shape[0]

    with _eval_mode(model), torch.inference_mode():
        _forward(model, x_test[:batch_size])  # warm-up: not timed
        synchronize(device)
        start = time.perf_counter()
        logits = _predict(model, x_test, batch_size)
        synchronize(device)
        elapsed = time.perf_counter() - start

    probs_members = metrics.member_probs(logits)  # [E, N, C]
    probs = probs_members.mean(dim=0)  # [N, C], == metrics.ensemble_probs(logits)
    preds = logits.argmax(dim=-1)  # [E, N]
    member_acc = metrics.member_accuracy(logits, y_test)
    return EvalReport(
        ensemble_accuracy=metrics.ensemble_accuracy(logits, y_test),
        member_accuracy=[float(v) for v in member_acc.tolist()],
        mean_member_accuracy=float(member_acc.mean()),
        nll=metrics.ensemble_nll(logits, y_test),  # in log space: exact where a probability underflows
        ece=metrics.expected_calibration_error(probs, y_test, n_bins=metrics.DEFAULT_BINS),
        brier=metrics.brier_score(probs, y_test),
        agreement=metrics.agreement_matrix(preds).tolist(),
        disagreement=metrics.mean_pairwise_disagreement(preds),
        predictive_entropy=metrics.predictive_entropy(probs),
        mutual_information=metrics.mutual_information(probs_members),
        params=count_parameters(model),
        # perf_counter can't read 0 for real work, but guard so the figure stays finite
        inference_examples_per_second=n / max(elapsed, 1e-9),
        reliability=metrics.reliability_curve(probs, y_test, n_bins=metrics.DEFAULT_BINS),
    )
