"""The figures of a run, side by side: one table for the CLI, rows for the dashboard, JSON."""

from __future__ import annotations

import math
import statistics

# (key, label, format) in the order a reader wants them.
FIGURES: list[tuple[str, str, str]] = [
    ("ensemble_accuracy", "ensemble accuracy (mean softmax)", "{:.4f}"),
    ("mean_member_accuracy", "mean member accuracy (the seed notebook's figure)", "{:.4f}"),
    ("best_member_accuracy", "best member accuracy", "{:.4f}"),
    ("worst_member_accuracy", "worst member accuracy", "{:.4f}"),
    ("nll", "NLL (nats)", "{:.4f}"),
    ("ece", "ECE (15 bins)", "{:.4f}"),
    ("brier", "Brier score", "{:.4f}"),
    ("disagreement", "mean pairwise disagreement", "{:.4f}"),
    ("predictive_entropy", "predictive entropy (nats)", "{:.4f}"),
    ("mutual_information", "mutual information (nats)", "{:.4f}"),
    ("params", "parameters", "{:,d}"),
    ("train_seconds", "training seconds", "{:.2f}"),
    ("mean_epoch_seconds", "seconds per epoch (mean)", "{:.2f}"),
    ("inference_examples_per_second", "inference examples / s", "{:,.0f}"),
]

# What each figure means, for a reader who has not met it (the Results page and the Learn page).
FIGURE_HELP: dict[str, str] = {
    "ensemble_accuracy": "test accuracy of the ensemble's prediction, the class with the highest mean of "
    "the members' softmax probabilities; higher is better",
    "mean_member_accuracy": "the members' test accuracies averaged: what the seed notebook reported",
    "best_member_accuracy": "the most accurate member's test accuracy",
    "worst_member_accuracy": "the least accurate member's test accuracy",
    "nll": "negative log-likelihood: the mean of −ln(probability the ensemble gave the true class); "
    "0 is perfect, ln C (2.30 for 10 classes) is a uniform guess; lower is better",
    "ece": "expected calibration error: test examples binned by the ensemble's confidence (15 equal bins), "
    "the gap |accuracy − mean confidence| of each bin averaged, weighted by its examples; 0 is perfectly "
    "calibrated; lower is better",
    "brier": "the squared distance between the ensemble's probabilities and the one-hot true class, summed "
    "over classes and averaged over examples: 0 is perfect, 2 the worst; lower is better",
    "disagreement": "the fraction of test examples on which two members predict different classes, averaged "
    "over every pair of members (1 − the agreement matrix off its diagonal); none for a single model",
    "predictive_entropy": "the entropy of the ensemble's mean prediction, averaged over test examples: "
    "0 when it is certain, ln C when uniform; how unsure the ensemble is",
    "mutual_information": "the entropy of the ensemble's mean prediction minus the members' mean entropy: "
    "the part of the uncertainty that comes from the members disagreeing; 0 when every member predicts "
    "the same probabilities; none for a single model",
    "params": "trainable numbers in the model (every member's together)",
    "train_seconds": "wall-clock seconds of training, evaluation left out; one run's timing, which a busy "
    "machine can stretch",
    "mean_epoch_seconds": "the mean of the whole epochs' seconds (a stopped epoch's fragment left out)",
    "inference_examples_per_second": "test examples predicted per second, every member included",
}

# Figures about pairs of members: none for a single model, which has no pair.
PAIRWISE = ("disagreement", "mutual_information")

METHOD_LABELS = {"single": "single", "classic": "classic", "batchensemble": "BatchEnsemble"}


def derived(result: dict) -> dict:
    """A result with the figures that are computed from others (best/worst member, mean epoch)."""
    out = dict(result)
    members = result.get("member_accuracy") or []
    if result.get("ensemble_size") == 1 or len(members) == 1:
        out.update(dict.fromkeys(PAIRWISE))
    if members:
        out["best_member_accuracy"] = max(members)
        out["worst_member_accuracy"] = min(members)
    epochs = whole_epochs(result)
    if epochs:
        out["mean_epoch_seconds"] = statistics.fmean(epochs)
    return out


def whole_epochs(result: dict) -> list[float]:
    """The seconds of the epochs that ran to their end: a stop's cut-short epoch is not an epoch's time."""
    epochs = [s for s in result.get("epoch_seconds") or [] if isinstance(s, (int, float))]
    done = result.get("epochs_done")
    if result.get("stopped") and isinstance(done, int):
        return epochs[: max(done, 0)]
    return epochs


def uneven_epochs(result: dict, factor: float = 2.0) -> tuple[float, float] | None:
    """(median, slowest) of a method's whole epochs where the slowest took over ``factor`` × the median.

    None with fewer than 3 whole epochs or where they are even. One slow epoch (a busy machine, a
    first epoch's warm-up) can make the training-time ratio of two methods say more about the
    machine than about them.
    """
    epochs = whole_epochs(result)
    if len(epochs) < 3:
        return None
    median, slowest = median_epoch_seconds(result), max(epochs)
    return (median, slowest) if median > 0 and slowest > factor * median else None


def median_epoch_seconds(result: dict) -> float | None:
    """The median of a method's whole epochs (``whole_epochs``), or None where none ran to its end."""
    epochs = whole_epochs(result)
    return statistics.median(epochs) if epochs else None


def figure_rows(results: dict[str, dict]) -> list[dict]:
    """One row per figure: {"figure": label, <method>: value, ...} (values raw, not formatted)."""
    full = {m: derived(r) for m, r in results.items()}
    rows = []
    for key, label, _ in FIGURES:
        row = {"figure": label, "key": key}
        for method, result in full.items():
            row[method] = result.get(key)
        rows.append(row)
    return rows


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Classic / BatchEnsemble ratios of training time and parameters, where both are present.

    Training time: of the whole training where both ran every epoch; where a stop cut either
    short, of their mean whole epochs (none: no ratio), so that a partial run is not set against a
    full one.
    """
    out: dict[str, float] = {}
    classic, be = results.get("classic"), results.get("batchensemble")
    if not classic or not be:
        return out
    pairs = {"train_seconds": (classic.get("train_seconds"), be.get("train_seconds"))}
    if classic.get("stopped") or be.get("stopped"):
        pairs["train_seconds"] = (derived(classic).get("mean_epoch_seconds"), derived(be).get("mean_epoch_seconds"))
    pairs["params"] = (classic.get("params"), be.get("params"))
    for key, (a, b) in pairs.items():
        if a and b:
            out[key] = a / b
    return out


def format_value(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table of every figure, methods side by side."""
    if not results:
        return "no method finished"
    methods = list(results)
    full = {m: derived(r) for m, r in results.items()}
    label_w = max(len(label) for _, label, _ in FIGURES)
    col_w = max(14, *(len(METHOD_LABELS.get(m, m)) for m in methods))
    lines = [f"{'':<{label_w}}  " + "  ".join(f"{METHOD_LABELS.get(m, m):>{col_w}}" for m in methods)]
    lines.append("-" * len(lines[0]))
    for key, label, fmt in FIGURES:
        cells = [format_value(full[m].get(key), fmt) for m in methods]
        lines.append(f"{label:<{label_w}}  " + "  ".join(f"{c:>{col_w}}" for c in cells))
    for key, value in ratios(results).items():
        name = "training time" if key == "train_seconds" else "parameters"
        lines.append(f"classic / BatchEnsemble {name}: {value:.2f}x")
    return "\n".join(lines)


def results_json(results: dict[str, dict]) -> dict:
    """The --json object: one entry per method name, JSON-safe (NaN becomes null)."""
    return {m: _json_safe(derived(r)) for m, r in results.items()}


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
