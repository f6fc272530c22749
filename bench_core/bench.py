"""Speed benchmark: seconds per training epoch, inference throughput, parameters and peak memory.

``run_benchmark(settings)`` is a generator of ``BenchEvent``s (progress, the header, each row,
done); ``python -m bench_core bench`` prints them as a table and the Speed page draws them.

Rows (``ROWS``): ``single`` (one MLP, E = 1), ``classic-sequential`` (E MLPs one after another),
``classic-vectorized`` (E MLPs in one batched pass), ``batchensemble-repeat`` (every member
sees every example), ``batchensemble-split`` (each member 1/E of each batch), and the seed
notebook's pipeline (``bench_core.reference``): ``reference-classic`` and ``reference-batchensemble``.

How each figure is measured:

- **seconds per epoch**: the real training loop (``bench_core.training.train``) runs ``warmup``
  steps untimed, then ``repeats`` epochs of ``steps`` steps on a synthetic dataset of the
  chosen shape; each is scaled to the full training split by the ratio of optimizer steps
  (``batch_plan``; split batching has its own count) and the median is reported. With
  ``full_epoch`` whole epochs are timed instead. Reference rows time ``steps`` batches of
  each member's own pass, the worker start-up (the seed's loader forks its workers every
  epoch) and shutdown apart, and count those once per epoch (``reference.PassTiming``).
- **floor**: ``epoch_flops`` divided by the float32 matrix-product rate measured at the start
  on the same device (the fastest of 9 timed 2048×2048 products); ``× floor`` is epoch / floor.
- **inference examples/s**: eval mode, ``torch.inference_mode``, batches of 1024 over
  ``inference_examples`` examples, synchronised on GPUs; the median of ``repeats`` passes.
  Reference rows run the seed's Evaluator loop over its DataLoader (batch 256, 2 workers).
- **peak memory** of training (model, optimizer, activations; inference not counted): on CUDA
  ``torch.cuda.max_memory_allocated`` (reset once the row's data is on the device) minus what
  was allocated then. Elsewhere the peak resident set size of the
  row's process after its data was built (Linux: ``VmHWM`` reset through
  ``/proc/self/clear_refs``; otherwise ``ru_maxrss``, which may under-count) minus the resident
  size at that moment. Each row runs in its own process (``isolate``), so rows share no
  allocator state; the reference's DataLoader workers are separate processes and not included.

The rows of one ensemble size take turns: every row sets up and warms up, then each runs its
first timed repeat while the others wait, then each its second, and so on, and last each its
inference pass (``measure_row``'s ``gate``). On a shared machine whose speed drifts by tens of
per cent within a minute, the ratios between rows (× classic vectorized, × faster than the
reference) then compare repeats taken a few seconds apart, not minutes apart.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import queue
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from bench_core.cli import _device, _install_stop_handler, _positive_int
from bench_core.config import ModelConfig, TrainConfig
from bench_core.devices import resolve_device, synchronize
from bench_core.errors import BenchError, ConfigError

ROWS = (
    "single",
    "classic-sequential",
    "classic-vectorized",
    "batchensemble-repeat",
    "batchensemble-split",
    "reference-classic",
    "reference-batchensemble",
)
REFERENCE_ROWS = ("reference-classic", "reference-batchensemble")
ROW_GROUPS = {  # shorthands accepted by --methods
    "classic": ("classic-sequential", "classic-vectorized"),
    "batchensemble": ("batchensemble-repeat", "batchensemble-split"),
    "reference": REFERENCE_ROWS,
}
# (method, mode) of each row, as the table shows them.
ROW_LABELS = {
    "single": ("single", ""),
    "classic-sequential": ("classic", "sequential"),
    "classic-vectorized": ("classic", "vectorized"),
    "batchensemble-repeat": ("batchensemble", "repeat"),
    "batchensemble-split": ("batchensemble", "split"),
    "reference-classic": ("reference", "classic"),
    "reference-batchensemble": ("reference", "batchensemble"),
}
# Shape of one example, training examples per epoch, classes.
DATASET_SHAPES = {
    "cifar10": ((3, 32, 32), 50_000, 10),
    "fashion-mnist": ((1, 28, 28), 60_000, 10),
    "mnist": ((1, 28, 28), 60_000, 10),
}
MATMUL_SIZE = 2048  # the square product whose rate sets the floor
INFERENCE_BATCH = 1024
TARGET_E = 5  # the ensemble size the targets are stated for


@dataclass
class BenchSettings:
    dataset_shape: str = "cifar10"  # a name of DATASET_SHAPES or "CxHxW", e.g. "1x8x8"
    ensemble_sizes: tuple[int, ...] = (1, 2, 4, 8)  # E of each ensemble row
    rows: tuple[str, ...] = ROWS  # which rows of ROWS to measure
    batch_size: int = 128  # examples per step (the seed: 128)
    hidden: int = 128  # hidden width (the seed: 128)
    depth: int = 2  # hidden layers (the seed: 2)
    steps: int = 60  # timed steps per repeat (per member for sequential rows)
    warmup: int = 10  # untimed steps before timing
    repeats: int = 3  # timed repeats; the median is reported
    device: str = "auto"  # "auto", "cpu", "cuda" or "mps"
    reference: bool = True  # measure the reference rows (when in rows)
    full_epoch: bool = False  # time whole epochs instead of extrapolating from `steps`
    train_examples: int | None = None  # examples per epoch; None: the dataset's (50,000 for CIFAR-10)
    inference_examples: int = 10_000  # examples of the timed inference pass
    isolate: bool = True  # each row in its own process (clean memory figures)
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    cuda_graph: bool = True  # on CUDA, replay each full-batch training step as a CUDA graph
    seed: int = 0

    def validate(self) -> BenchSettings:
        """Check every setting (ConfigError with one line); returns self."""
        _, n_train, _ = self.shape_info()
        if not self.ensemble_sizes:
            raise ConfigError("choose at least one ensemble size")
        for e in self.ensemble_sizes:
            _check_int("ensemble size", e, 1, 256)
        for label, value, low in [
            ("batch size", self.batch_size, 1),
            ("hidden width", self.hidden, 1),
            ("depth", self.depth, 1),
            ("steps", self.steps, 1),
            ("warm-up steps", self.warmup, 0),
            ("repeats", self.repeats, 1),
            ("inference examples", self.inference_examples, 1),
            ("training examples", n_train, 1),
            ("threads", self.threads or 1, 1),
        ]:
            _check_int(label, value, low)
        for name in self.rows:
            if name not in ROWS:
                raise ConfigError(f"unknown row {name!r}: choose from {', '.join(ROWS)}")
        if not self.active_rows():
            raise ConfigError("no rows to measure: choose rows other than the reference, or drop --no-reference")
        if self.depth != 2 and any(r in REFERENCE_ROWS for r in self.active_rows()):
            raise ConfigError(
                f"the reference rows run the seed's models, which have 2 hidden layers, not {self.depth}: "
                "use --depth 2 or --no-reference"
            )
        if "batchensemble-split" in self.rows and self.batch_size < max(self.ensemble_sizes):
            raise ConfigError(
                f"split batching needs a batch size of at least E = {max(self.ensemble_sizes)}, got {self.batch_size}"
            )
        resolve_device(self.device)
        return self

    def shape_info(self) -> tuple[tuple[int, ...], int, int]:
        """(shape of one example, training examples per epoch, classes)."""
        if self.dataset_shape in DATASET_SHAPES:
            shape, n_train, classes = DATASET_SHAPES[self.dataset_shape]
        else:
            shape, n_train, classes = parse_shape(self.dataset_shape), 50_000, 10
        return shape, self.train_examples or n_train, classes

    def active_rows(self) -> tuple[str, ...]:
        return tuple(r for r in ROWS if r in self.rows and (self.reference or r not in REFERENCE_ROWS))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> BenchSettings:
        names = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in raw.items() if k in names})
        out.ensemble_sizes, out.rows = tuple(out.ensemble_sizes), tuple(out.rows)
        return out


@dataclass(frozen=True)
class RowSpec:
    name: str  # one of ROWS
    ensemble_size: int


@dataclass
class BenchEvent:
    kind: str  # "progress", "header", "row" or "done"
    fraction: float = 0.0  # of the whole benchmark, 0..1
    message: str = ""
    header: dict | None = None  # kind "header" and "done"
    row: dict | None = None  # kind "row"
    rows: list[dict] = field(default_factory=list)  # kind "done": every row, compared (compare_rows)
    targets: list[dict] = field(default_factory=list)  # kind "done"
    stopped: bool = False  # kind "done": a stop request cut the benchmark short

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# FLOPs and the floor
# ------------------------------------------------------------------------------------------------


def epoch_flops(
    sizes: list[int],
    n_examples: float,
    ensemble_size: int = 1,
    batching: str = "repeat",
    first_input_grad: bool = False,
) -> float:
    """Matrix-product FLOPs of one training epoch of an E-member MLP with layer widths ``sizes``.

    Each linear layer (in → out) of each member processing n examples costs
    ``2·n·in·out`` forward, ``2·n·in·out`` for the weight gradient and ``2·n·in·out`` for the
    input gradient, except the first layer, whose input needs no gradient. "repeat" batching:
    n = ``n_examples`` per member; "split": n = ``n_examples / E`` per member; a single MLP
    has E = 1. Split batching (BatchEnsemble) computes the first layer's input-side product as
    well: each member's input is scaled by its r before the shared W, and r's gradient needs
    ``dz Wᵀ`` (repeat batching folds r into the weights instead and derives r's gradient from the
    weight gradient; with one member, split batching trains as repeat batching). Element-wise
    work (biases, ReLU, BatchEnsemble's r/s scaling, the loss, Adam) is not counted: the floor is
    what the matrix products alone would take.

    ``first_input_grad=True`` gives the usual training count, 3× the forward FLOPs: it adds the
    first layer's input gradient, which repeat-batched training never computes. It is the count
    behind the speed issue's "about 4 s" for a CIFAR-10-shaped epoch of 5 members, reported beside
    the strict count: the targets check the floor by both counts (``check_targets``).
    """
    from bench_core.training import effective_batching

    batching = effective_batching(batching, ensemble_size)
    n = n_examples / ensemble_size if batching == "split" else float(n_examples)
    per_member = 0.0
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        first_two = i == 0 and not first_input_grad and batching != "split"
        passes = 2 if first_two else 3  # forward + weight grad (+ input grad)
        per_member += passes * 2.0 * n * n_in * n_out
    return ensemble_size * per_member


def floor_seconds(flops: float, rate: float) -> float:
    """Seconds the matrix products would take at ``rate`` FLOP/s."""
    return flops / rate


def gemm_rate(m: int, k: int, n: int, device: torch.device, warmup: int = 2, repeats: int = 9) -> float:
    """Float32 FLOP/s of ``[m, k] @ [k, n]`` on ``device``: 2·m·k·n over the fastest of ``repeats`` timings.

    The fastest, not the median: the floor is meant as a bound the hardware can reach, and on a
    shared machine other processes only ever make a product slower.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device)
    b = torch.randn(k, n, generator=gen).to(device)
    # Enough products per timing that each is well above the clock's resolution.
    inner = max(1, int(2e8 // (2 * m * k * n)))
    for _ in range(warmup):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        synchronize(device)
        times.append((time.perf_counter() - t0) / inner)
    return 2.0 * m * k * n / min(times)


def row_batching(name: str) -> str:
    return "split" if name == "batchensemble-split" else "repeat"


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


class MemoryProbe:
    """Peak memory of what runs between ``start()`` and ``peak_mib()`` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _proc_status_kib("VmRSS") * 1024
            self.method = "peak RSS (VmHWM)"
        except (OSError, KeyError, ValueError):
            self.base = _ru_maxrss_bytes()
            self.method = "peak RSS (ru_maxrss, may under-count)"

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("peak RSS (VmHWM"):
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = _ru_maxrss_bytes()
        return max(peak - self.base, 0) / 2**20


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ------------------------------------------------------------------------------------------------
# One row
# ------------------------------------------------------------------------------------------------

Report = Callable[[float, str], None]
Gate = Callable[[str], None]


def measure_row(
    spec: RowSpec,
    settings: BenchSettings,
    report: Report | None = None,
    stop: threading.Event | None = None,
    gate: Gate | None = None,
) -> dict:
    """Measure one row in this process; returns its raw figures (``derive_row`` adds the floor).

    ``gate(phase)`` is called before each timed repeat ("repeat 1", ...) and before the inference
    pass ("finish"); it returns when the row may go on. ``run_benchmark`` uses it to take turns
    between the rows of one ensemble size, so that a drift of the machine's speed (other load)
    falls on every row alike.
    """
    device = resolve_device(settings.device)
    report = report or (lambda fraction, message: None)
    gate = gate or (lambda phase: None)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    if spec.name in REFERENCE_ROWS:
        return _measure_reference(spec, settings, device, report, gate)
    return _measure_workbench(spec, settings, device, report, stop, gate)


def _measure_workbench(
    spec: RowSpec,
    settings: BenchSettings,
    device: torch.device,
    report: Report,
    stop: threading.Event | None,
    gate: Gate,
) -> dict:
    from bench_core.data import make_synthetic
    from bench_core.evaluation import count_parameters, predict_logits
    from bench_core.models import build_model
    from bench_core.training import steps_per_epoch, train

    shape, n_full, classes = settings.shape_info()
    method, mode = ROW_LABELS[spec.name]
    n_members = spec.ensemble_size if method != "single" else 1
    batching = row_batching(spec.name)
    bs = settings.batch_size
    step_examples = bs if batching == "repeat" else bs // n_members * n_members
    n_timed = n_full if settings.full_epoch else settings.steps * step_examples
    n_warm = settings.warmup * step_examples
    data = make_synthetic(max(n_timed, n_warm, 1), settings.inference_examples, shape, classes, settings.seed)
    data = data.to(device)
    timed = replace(data, x_train=data.x_train[:n_timed], y_train=data.y_train[:n_timed])
    probe = MemoryProbe(device)
    probe.start()

    cfg = ModelConfig(hidden=settings.hidden, depth=settings.depth, ensemble_size=n_members)
    if mode in ("sequential", "vectorized"):
        cfg.classic_mode = mode
    model = build_model(method, cfg, data.in_features, classes).to(device)
    passes = n_members if mode == "sequential" else 1  # sequential: each member its own pass
    graph = settings.cuda_graph
    train_cfg = TrainConfig(epochs=1, batch_size=bs, seed=settings.seed, device=str(device))
    if n_warm:
        report(0.0, "warm-up")
        warm = replace(data, x_train=data.x_train[:n_warm], y_train=data.y_train[:n_warm])
        for _ in train(model, warm, train_cfg, method=method, batching=batching, stop=stop, cuda_graph=graph):
            pass
    untimed = untimed_epochs(device, graph)
    train_cfg.epochs = settings.repeats + untimed
    scale = steps_per_epoch(n_full, bs, n_members, batching) / steps_per_epoch(n_timed, bs, n_members, batching)
    epochs = []
    gate("repeat 1")
    for rec in train(model, timed, train_cfg, method=method, batching=batching, stop=stop, cuda_graph=graph):
        if rec.kind == "epoch":
            if rec.stopped:
                raise _StoppedError
            if untimed:
                untimed -= 1
                continue
            epochs.append(rec.epoch_seconds * scale)
            report(0.8 * len(epochs) / settings.repeats, f"repeat {len(epochs)}/{settings.repeats}")
            if len(epochs) < settings.repeats:
                gate(f"repeat {len(epochs) + 1}")  # the generator waits here, between two epochs

    peak = probe.peak_mib()  # of training; inference is not counted
    gate("finish")

    x = data.x_test  # (M, D)
    predict_logits(model, x[:INFERENCE_BATCH], INFERENCE_BATCH)  # warm-up
    infer = []
    for _ in range(settings.repeats):
        synchronize(device)
        t0 = time.perf_counter()
        predict_logits(model, x, INFERENCE_BATCH)
        synchronize(device)
        infer.append(time.perf_counter() - t0)
    report(1.0, "done")
    return {
        "name": spec.name,
        "method": method,
        "mode": mode,
        "ensemble_size": n_members,
        "epoch_seconds": statistics.median(epochs),
        "epoch_seconds_repeats": epochs,
        "timed_steps": steps_per_epoch(n_timed, bs, n_members, batching) * passes,
        "steps_per_epoch": steps_per_epoch(n_full, bs, n_members, batching) * passes,
        "inference_examples_per_second": settings.inference_examples / statistics.median(infer),
        "params": count_parameters(model),
        "peak_mib": peak,
        "memory_method": probe.method,
    }


def untimed_epochs(device: torch.device, cuda_graph: bool) -> int:
    """Untimed epochs the timed ``train`` call runs first: 1 where that epoch captures CUDA graphs.

    A new ``train`` call makes new steps, which warm up and capture their graph again (that epoch
    took 0.16 against 0.067 s for classic vectorized on an H200); elsewhere 0.
    """
    return 1 if cuda_graph and device.type == "cuda" else 0


def _measure_reference(
    spec: RowSpec, settings: BenchSettings, device: torch.device, report: Report, gate: Gate
) -> dict:
    from torch.utils.data import DataLoader, Subset

    from bench_core import reference as ref
    from bench_core.evaluation import count_parameters

    shape, n_full, classes = settings.shape_info()
    n_members = spec.ensemble_size
    in_dim, bs = math.prod(shape), settings.batch_size
    images = ref.InMemoryImages(n_full, shape, classes, seed=settings.seed)
    test_images = ref.InMemoryImages(settings.inference_examples, shape, classes, seed=settings.seed + 1)
    loader = ref.seed_loader(images, batch_size=bs)
    test_loader = ref.seed_loader(test_images, batch_size=ref.SEED_EVAL_BATCH_SIZE, shuffle=False)
    full_steps = len(loader)
    n_steps = full_steps if settings.full_epoch else min(settings.steps, full_steps)
    probe = MemoryProbe(device)
    probe.start()

    args = (in_dim, settings.hidden, classes)
    if spec.name == "reference-classic":
        learners = [ref.classic_learner(*args, device) for _ in range(n_members)]
    else:
        learners = [ref.batchensemble_learner(*args, n_members, device)]
    if settings.warmup:
        report(0.0, "warm-up")
        ref.timed_pass(loader, learners[0].step, settings.warmup)  # the loader, and the first member
        xb, yb = next(iter(DataLoader(images, batch_size=bs)))  # the other members: one step each
        for learner in learners[1:]:
            learner.step(xb, yb)
    epochs, startups = [], []
    for r in range(settings.repeats):
        gate(f"repeat {r + 1}")
        # Members one after another, each with its own pass (and its own worker start-up).
        timings = []
        for k, learner in enumerate(learners):
            timings.append(ref.timed_pass(loader, learner.step, n_steps))
            done = (r * len(learners) + k + 1) / (settings.repeats * len(learners))
            report(0.8 * done, f"repeat {r + 1}/{settings.repeats}, member {k + 1}/{len(learners)}")
        epochs.append(sum(t.epoch_seconds(full_steps) for t in timings))
        startups.append(sum(t.startup_seconds + t.shutdown_seconds for t in timings))
    peak = probe.peak_mib()  # of training; inference is not counted
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    gate("finish")
    if settings.warmup:
        warm_subset = Subset(test_images, range(min(2 * ref.SEED_EVAL_BATCH_SIZE, len(test_images))))
        warm_loader = ref.seed_loader(warm_subset, batch_size=ref.SEED_EVAL_BATCH_SIZE, shuffle=False)
        ref.seed_inference_seconds([lr.model for lr in learners], warm_loader, device)
    infer = [
        ref.seed_inference_seconds([lr.model for lr in learners], test_loader, device) for _ in range(settings.repeats)
    ]
    report(1.0, "done")
    return {
        "name": spec.name,
        "method": "reference",
        "mode": ROW_LABELS[spec.name][1],
        "ensemble_size": n_members,
        "epoch_seconds": statistics.median(epochs),
        "epoch_seconds_repeats": epochs,
        "timed_steps": n_steps * len(learners),
        "steps_per_epoch": full_steps * len(learners),
        "worker_startup_seconds": statistics.median(startups),
        "inference_examples_per_second": settings.inference_examples / statistics.median(infer),
        "params": sum(count_parameters(lr.model) for lr in learners),
        "peak_mib": peak,
        "memory_method": probe.method + ", main process only",
        "worker_peak_rss_mib": workers_kib / 1024,  # the largest DataLoader worker, shared pages included
    }


class _StoppedError(Exception):
    """A stop request ended a row early."""


def derive_row(raw: dict, settings: BenchSettings, rate: float) -> dict:
    """A raw row plus its FLOPs per epoch, floor seconds and ``× floor``."""
    from bench_core.models import mlp_sizes

    shape, n_train, classes = settings.shape_info()
    sizes = mlp_sizes(math.prod(shape), settings.hidden, settings.depth, classes)
    count = (sizes, n_train, raw["ensemble_size"], row_batching(raw["name"]))
    flops = epoch_flops(*count)
    floor = floor_seconds(flops, rate)
    usual = floor_seconds(epoch_flops(*count, first_input_grad=True), rate)
    return {
        **raw,
        "flops_per_epoch": flops,
        "floor_seconds": floor,
        "x_floor": raw["epoch_seconds"] / floor,
        "floor_seconds_3x_forward": usual,
        "x_floor_3x_forward": raw["epoch_seconds"] / usual,
    }


def compare_rows(rows: list[dict]) -> list[dict]:
    """Each row with its comparisons to the other rows of the same E (None where that row is absent).

    ``x_classic_vectorized``: its epoch / classic vectorized's epoch. ``speedup_over_reference``:
    the epoch of the reference row of its kind (BatchEnsemble rows: reference batchensemble;
    the others: reference classic) / its epoch.
    """
    by_key = {(r["name"], r["ensemble_size"]): r for r in rows}
    out = []
    for r in rows:
        e = r["ensemble_size"]
        cv = by_key.get(("classic-vectorized", e))
        kind = "reference-batchensemble" if r["method"] == "batchensemble" else "reference-classic"
        ref = None if r["method"] == "reference" else by_key.get((kind, e))
        out.append(
            {
                **r,
                "x_classic_vectorized": r["epoch_seconds"] / cv["epoch_seconds"] if cv else None,
                "speedup_over_reference": ref["epoch_seconds"] / r["epoch_seconds"] if ref else None,
            }
        )
    return out


def check_targets(rows: list[dict], ensemble_size: int = TARGET_E) -> list[dict]:
    """The speed targets at ``ensemble_size``: text, value, limit, met (None: a row is missing).

    The floor target is checked twice: against the strict count of the products training computes
    (``x_floor``) and against the issue's own count, 3× the forward FLOPs (``x_floor_3x_forward``,
    the count behind its "about 4 s" for this epoch). Both verdicts are printed; neither hides the other.

    The verdict uses the medians (``value``). ``per_turn`` adds the same figure turn by turn: the
    rows of one E take turns, one timed repeat each, so repeat i of two rows ran minutes apart at
    most, and their ratio shows how far the machine's drift moves the verdict (None where a row or
    its repeats are missing).
    """
    by_name = {r["name"]: r for r in rows if r["ensemble_size"] == ensemble_size}
    cv, be = "classic-vectorized", "batchensemble-repeat"

    def epoch(name: str) -> float | None:
        return by_name[name]["epoch_seconds"] if name in by_name else None

    def repeats(name: str) -> list[float] | None:
        return by_name.get(name, {}).get("epoch_seconds_repeats") or None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None else None

    def paired(a: str, b: str) -> list[float] | None:
        ra, rb = repeats(a), repeats(b)
        if ra is None or rb is None or len(ra) != len(rb):
            return None
        return [x / y for x, y in zip(ra, rb, strict=True)]

    def versus(a: str, b: str) -> tuple[float | None, list[float] | None]:
        """Row a's epoch over row b's: the medians' ratio, and turn by turn."""
        return ratio(epoch(a), epoch(b)), paired(a, b)

    def over_floor(count: str) -> tuple[float | None, list[float] | None]:
        """Classic vectorized over its floor by one count ("" strict, "_3x_forward"), and turn by turn."""
        row, reps = by_name.get(cv, {}), repeats(cv)
        floor = row.get(f"floor_seconds{count}")
        return row.get(f"x_floor{count}"), [rep / floor for rep in reps] if floor and reps else None

    checks = [
        ("classic vectorized ≤ 1.25× its floor (strict count)", "<=", 1.25, *over_floor("")),
        ("classic vectorized ≤ 1.25× its floor (3× forward count)", "<=", 1.25, *over_floor("_3x_forward")),
        ("BatchEnsemble repeat ≤ 1.1× classic vectorized", "<=", 1.1, *versus(be, cv)),
        ("BatchEnsemble split ≤ 0.35× classic vectorized", "<=", 0.35, *versus("batchensemble-split", cv)),
        ("classic vectorized ≥ 6× faster than reference classic", ">=", 6.0, *versus("reference-classic", cv)),
        (
            "BatchEnsemble repeat ≥ 2.2× faster than reference batchensemble",
            ">=",
            2.2,
            *versus("reference-batchensemble", be),
        ),
    ]
    out = []
    for text, op, limit, value, per_turn in checks:
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append(
            {
                "target": text,
                "ensemble_size": ensemble_size,
                "value": value,
                "limit": limit,
                "met": met,
                "per_turn": per_turn if value is not None else None,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------
# The whole benchmark
# ------------------------------------------------------------------------------------------------


def plan_rows(settings: BenchSettings) -> list[RowSpec]:
    """The rows to measure, grouped by E: ``single`` once (E = 1) first, then each E in ROWS order."""
    active = settings.active_rows()
    specs = [RowSpec("single", 1)] if "single" in active else []
    for e in settings.ensemble_sizes:
        specs += [RowSpec(name, e) for name in active if name != "single"]
    return specs


def machine_header(settings: BenchSettings) -> dict:
    """The machine, the settings and the matmul rates measured now on the benchmark's device."""
    load = _load_average()  # before our own work adds to it
    device = resolve_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    shape, n_train, _ = settings.shape_info()
    in_dim = math.prod(shape)
    rate = gemm_rate(MATMUL_SIZE, MATMUL_SIZE, MATMUL_SIZE, device)
    h, bs = settings.hidden, settings.batch_size
    model_rates = {
        str(e): {
            # The first layer's two products as the models lay them out (bench_core.models,
            # _SharedInputLinear): forward zᵀ = Wᵀ xᵀ [E·h, B], weight gradient xᵀ dz [in, E·h].
            "forward": gemm_rate(e * h, in_dim, bs, device),
            "weight_grad": gemm_rate(in_dim, bs, e * h, device),
            # BatchEnsemble split batching: one member-width product over the B' = B // E · E
            # examples of a step, three of them (x∘r W, (x∘r)ᵀ dz, and dz Wᵀ for r's gradient).
            "split": {
                "forward": gemm_rate(bs // e * e, in_dim, h, device),
                "weight_grad": gemm_rate(in_dim, bs // e * e, h, device),
                "input_grad": gemm_rate(bs // e * e, h, in_dim, device),
            },
        }
        for e in settings.ensemble_sizes
    }
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "load_average": load,  # 1-minute load when the benchmark started (None: unknown)
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "matmul_flops_per_second": rate,
        "matmul_shape": f"{MATMUL_SIZE}x{MATMUL_SIZE} @ {MATMUL_SIZE}x{MATMUL_SIZE} float32",
        "model_gemm_flops_per_second": model_rates,
        "dataset_shape": list(shape),
        "train_examples": n_train,
        "settings": settings.to_dict(),
        "epochs": "timed whole epochs" if settings.full_epoch else f"extrapolated from {settings.steps} timed steps",
        "floor": "matrix-product FLOPs of an epoch / the 2048³ matmul rate; element-wise work not counted",
        "memory": "peak of training above the row's data: "
        + ("cuda max_memory_allocated" if device.type == "cuda" else "RSS"),
        "steps": (
            ("each full-batch step replayed as one CUDA graph" if settings.cuda_graph else "eager (no CUDA graphs)")
            if device.type == "cuda"
            else "eager"
        ),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _row_weight(spec: RowSpec) -> float:
    """Rough relative cost of a row, for the progress fraction only."""
    if spec.name == "reference-classic":
        return 3.0 * spec.ensemble_size
    if spec.name == "reference-batchensemble":
        return 3.0 + spec.ensemble_size
    if spec.name == "classic-sequential":
        return 1.0 + spec.ensemble_size
    return 1.0 + spec.ensemble_size / 4


def run_benchmark(settings: BenchSettings, stop: threading.Event | None = None) -> Iterator[BenchEvent]:
    """Run the benchmark, yielding progress, the header, each row as it is measured, and "done".

    Args:
        settings: what to measure; validated first.
        stop: when set, the row being measured is abandoned and "done" comes with ``stopped=True``.

    Raises:
        ConfigError: a setting is invalid.
        BenchError: a row failed (its one-line reason).
    """
    settings.validate()
    specs = plan_rows(settings)
    yield BenchEvent("progress", 0.0, "measuring the matrix-multiply rate")
    header = machine_header(settings)
    yield BenchEvent("header", 0.0, "matmul rate measured", header=header)
    weights = {spec: _row_weight(spec) for spec in specs}
    total = sum(weights.values())
    progress = dict.fromkeys(specs, 0.0)  # each row's own fraction done

    def overall() -> float:
        return sum(weights[k] * f for k, f in progress.items()) / total

    rows: list[dict] = []
    stopped = False
    for group in _turn_groups(specs):
        runners = {spec: (_ProcessRow if settings.isolate else _ThreadRow)(spec, settings, stop) for spec in group}
        try:
            # Round-robin: each row in turn runs up to its next gate (set-up and warm-up, one
            # timed repeat, or the inference pass), the others wait; then the next row.
            while not stopped and any(not r.done for r in runners.values()):
                for spec, runner in runners.items():
                    if runner.done:
                        continue
                    if stop is not None and stop.is_set():
                        stopped = True
                        break
                    for fraction, message in runner.advance():
                        progress[spec] = fraction
                        yield BenchEvent("progress", overall(), f"{_row_label(spec)}: {message}")
                    if runner.stopped:
                        stopped = True
                        break
        finally:
            for runner in runners.values():
                runner.close()
        if stopped:
            break
        for spec, runner in runners.items():
            progress[spec] = 1.0
            row = derive_row(runner.result, settings, header["matmul_flops_per_second"])
            rows.append(row)
            yield BenchEvent("row", overall(), f"{_row_label(spec)}: {row['epoch_seconds']:.3g} s/epoch", row=row)
    rows = compare_rows(rows)
    if not stopped:
        # Measured again to show whether the machine's speed changed during the run (other load).
        yield BenchEvent("progress", 1.0, "measuring the matrix-multiply rate again")
        device = resolve_device(settings.device)
        header["matmul_flops_per_second_end"] = gemm_rate(MATMUL_SIZE, MATMUL_SIZE, MATMUL_SIZE, device)
    yield BenchEvent(
        "done",
        1.0 if not stopped else overall(),
        "stopped" if stopped else "done",
        header=header,
        rows=rows,
        targets=check_targets(rows),
        stopped=stopped,
    )


def _row_label(spec: RowSpec) -> str:
    return f"{spec.name} E={spec.ensemble_size}"


def _turn_groups(specs: list[RowSpec]) -> list[list[RowSpec]]:
    """The rows that take turns: those of one ensemble size (the single row with the first size)."""
    groups: dict[int, list[RowSpec]] = {}
    first = next((s.ensemble_size for s in specs if s.name != "single"), 1)
    for spec in specs:
        groups.setdefault(first if spec.name == "single" else spec.ensemble_size, []).append(spec)
    return list(groups.values())


class _ThreadRow:
    """A row measured in a thread of this process, one phase per ``advance``."""

    def __init__(self, spec: RowSpec, settings: BenchSettings, stop: threading.Event | None) -> None:
        self.spec, self.settings, self.stop = spec, settings, stop
        self.updates: queue.Queue = queue.Queue()
        self.go = threading.Semaphore(0)
        self.thread: threading.Thread | None = None
        self.done = self.stopped = self.closing = False
        self.result: dict | None = None

    def _gate(self, phase: str) -> None:
        self.updates.put(("gate", phase))
        self.go.acquire()
        if self.closing:
            raise _StoppedError

    def _work(self) -> None:
        try:
            report = lambda f, m: self.updates.put(("progress", f, m))  # noqa: E731
            self.updates.put(("end", measure_row(self.spec, self.settings, report, self.stop, self._gate)))
        except BaseException as err:  # handed to the caller's thread in advance()
            self.updates.put(("error", err))

    def advance(self) -> Iterator[tuple[float, str]]:
        """Run the row up to its next gate (or its end), yielding (fraction, message) progress."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, daemon=True)
            self.thread.start()
        else:
            self.go.release()
        while True:
            item = self.updates.get()
            if item[0] == "progress":
                yield item[1], item[2]
            elif item[0] == "gate":
                return
            elif item[0] == "end":
                self.done, self.result = True, item[1]
                return
            else:
                self.done = True
                if isinstance(item[1], _StoppedError):
                    self.stopped = True
                    return
                raise item[1]

    def close(self) -> None:
        if self.thread is not None and not self.done:
            self.closing = True
            self.go.release()
            self.thread.join(timeout=30)


class _ProcessRow:
    """A row measured in a fresh ``python -m bench_core bench --row`` process, one phase per ``advance``.

    The child prints JSON lines (progress, "gate", the row) and waits at each gate for a line on
    its standard input.
    """

    def __init__(self, spec: RowSpec, settings: BenchSettings, stop: threading.Event | None) -> None:
        self.spec, self.settings, self.stop = spec, settings, stop
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close()
        self.done = self.stopped = False
        self.result: dict | None = None

    def _start(self) -> None:
        payload = json.dumps({"settings": self.settings.to_dict(), "row": asdict(self.spec)})
        cmd = [sys.executable, "-m", "bench_core", "bench", "--row", payload]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        package_parent = str(Path(__file__).resolve().parent.parent)
        paths = [package_parent, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        # Its own session: a Ctrl-C reaches only us (we stop it), and stopping it also ends its DataLoader workers.
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env=env,
            start_new_session=os.name == "posix",
        )

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def advance(self) -> Iterator[tuple[float, str]]:
        """Run the row up to its next gate (or its end), yielding (fraction, message) progress."""
        if self.proc is None:
            self._start()
        else:
            try:
                self.proc.stdin.write("go\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # it ended: the reason is read below
        while True:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.stop is not None and self.stop.is_set():
                    self.done = self.stopped = True
                    return
                continue
            if line is None:
                break
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue  # not ours (a library printed something)
            if msg.get("event") == "progress":
                yield msg["fraction"], msg["message"]
            elif msg.get("event") == "gate":
                return
            elif msg.get("event") == "row":
                self.result = msg["row"]
        self.proc.wait()
        self.done = True
        if self.stop is not None and self.stop.is_set():
            self.stopped = True
            return
        if self.proc.returncode != 0 or self.result is None:
            self.err.seek(0)
            tail = [line.strip() for line in self.err.read().splitlines() if line.strip()]
            reason = tail[-1] if tail else f"exit status {self.proc.returncode}"
            raise BenchError(f"the {self.spec.name} row (E = {self.spec.ensemble_size}) failed: {reason}")

    def close(self) -> None:
        if self.proc is not None:
            _end_row_process(self.proc)
        self.err.close()


def _end_row_process(proc: subprocess.Popen) -> None:
    """Terminate a row's process and its process group (its DataLoader workers), if still running."""
    if proc.poll() is None:
        try:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGTERM)
            else:  # pragma: no cover - Windows
                proc.terminate()
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def format_table(header: dict, rows: list[dict], targets: list[dict] | None = None) -> str:
    """The printed report: machine and method lines, one line per row, then the targets."""
    s = header["settings"]
    shape = "×".join(str(d) for d in header["dataset_shape"])
    rates = header["model_gemm_flops_per_second"]
    model_rates = ", ".join(
        f"E={e}: {r['forward'] / 1e9:.0f}/{r['weight_grad'] / 1e9:.0f}"
        + (f" (split {'/'.join(f'{v / 1e9:.0f}' for v in r['split'].values())})" if "split" in r else "")
        for e, r in sorted(rates.items(), key=_e_key)
    )
    lines = [
        f"speed benchmark: {s['dataset_shape']} shape ({shape}), {header['train_examples']:,} training examples "
        f"per epoch, batch {s['batch_size']}, hidden {s['hidden']}×{s['depth']}",
        f"machine: {header['platform']} | CPU: {header['cpu']}"
        + (f" | GPU: {header['gpu']}" if header.get("gpu") else "")
        + f" | torch {header['torch']} | {header['threads']} threads | device {header['device']}",
        f"matmul rate: {header['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s at the start"
        + (f", {end / 1e9:.1f} at the end" if (end := header.get("matmul_flops_per_second_end")) else "")
        + f" ({header['matmul_shape']}, fastest of 9)",
        "first-layer GEMM rates, GFLOP/s, forward E·h×in @ in×B / weight-grad in×B @ B×E·h"
        f" (split batching: forward B×in @ in×h / weight-grad in×B @ B×h / input-grad B×h @ h×in): {model_rates}",
        f"s/epoch: {header['epochs']}"
        + ("" if s["full_epoch"] else f" (after {s['warmup']} warm-up steps)")
        + f", median of {s['repeats']} repeats; reference rows: the seed's DataLoader pipeline, "
        "worker start-up counted once per member per epoch",
        f"floor: {header['floor']}",
        *([f"workbench training steps: {header['steps']}"] if header.get("steps", "eager") != "eager" else []),
        f"peak MiB: {header['memory']}, each row {'in its own process' if s['isolate'] else 'in this process'}",
    ]
    load, cores = header.get("load_average"), header.get("cores") or 1
    if load is not None and load >= 0.5 * cores:
        lines.append(
            f"warning: the machine was busy when the benchmark started (load average {load:.1f} on {cores} cores): "
            "other processes share the cores, so the timings are noisy"
        )
    end = header.get("matmul_flops_per_second_end")
    if end and abs(end / header["matmul_flops_per_second"] - 1) > 0.2:
        lines.append("warning: the matmul rate changed by more than 20 % during the run: the machine's load changed")
    lines.append("")
    cols = [
        ("method", "<", 13),
        ("mode", "<", 13),
        ("E", ">", 3),
        ("s/epoch", ">", 9),
        ("× floor", ">", 8),
        ("× classic vec", ">", 13),
        ("× faster than ref", ">", 17),
        ("infer ex/s", ">", 11),
        ("params", ">", 11),
        ("peak MiB", ">", 9),
    ]
    lines.append("  ".join(f"{name:{align}{width}}" for name, align, width in cols))
    lines.append("  ".join("-" * width for _, _, width in cols))
    for r in rows:
        values = [
            r["method"],
            r["mode"],
            str(r["ensemble_size"]),
            f"{r['epoch_seconds']:.3g}",
            f"{r['x_floor']:.2f}",
            _fmt_ratio(r.get("x_classic_vectorized")),
            _fmt_ratio(r.get("speedup_over_reference")),
            f"{r['inference_examples_per_second']:,.0f}",
            f"{r['params']:,d}",
            f"{r['peak_mib']:.1f}",
        ]
        lines.append("  ".join(f"{v:{align}{width}}" for v, (_, align, width) in zip(values, cols, strict=True)))
    if targets and any(t["value"] is not None for t in targets):
        lines += ["", f"targets (E = {targets[0]['ensemble_size']}, medians of this run):"]
        lines += [f"  {target_line(t)}" for t in targets]
        cv = next(
            (
                r
                for r in rows
                if r["name"] == "classic-vectorized" and r["ensemble_size"] == targets[0]["ensemble_size"]
            ),
            None,
        )
        if cv is not None and "x_floor_3x_forward" in cv:
            lines.append(
                f"  (classic vectorized's floor: strict, the products its training computes, "
                f"{cv['floor_seconds']:.2f} s at this rate; "
                f'3× forward, the usual count and the issue\'s "about 4 s", '
                f"{cv['floor_seconds_3x_forward']:.2f} s: it adds the first layer's input gradient, "
                "which the classic ensemble never computes)"
            )
    return "\n".join(lines)


def target_line(t: dict) -> str:
    """One target as printed: verdict, text, the medians' figure and, with several turns, each turn's."""
    verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
    value = "row missing" if t["value"] is None else f"{t['value']:.2f}×{turns_text(t)}"
    return f"[{verdict:^7}] {t['target']}: {value}"


def turns_text(t: dict) -> str:
    """`` (turn by turn: a, b, c)`` for a target measured over several turns; "" otherwise."""
    turns = t.get("per_turn") or []
    return f" (turn by turn: {', '.join(f'{v:.2f}' for v in turns)})" if len(turns) > 1 else ""


def _e_key(item: tuple[str, dict]) -> int:
    return int(item[0])


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """A shape written "CxHxW" (or with ×); ConfigError when it is not three positive whole numbers."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        names = ", ".join(DATASET_SHAPES)
        raise ConfigError(f"unknown dataset shape {text!r}: choose one of {names} or give CxHxW, e.g. 3x32x32")
    return shape


def _shape_arg(text: str) -> str:
    value = text.strip().lower()
    if value not in DATASET_SHAPES:
        try:
            parse_shape(value)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _sizes_arg(text: str) -> tuple[int, ...]:
    parse = _positive_int("ensemble size")
    sizes = tuple(parse(p.strip()) for p in text.split(",") if p.strip())
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one ensemble size, e.g. 1,2,4,8")
    if max(sizes) > 256:
        raise argparse.ArgumentTypeError(f"ensemble size must be at most 256, got {max(sizes)}")
    return tuple(dict.fromkeys(sizes))


def _rows_arg(text: str) -> tuple[str, ...]:
    names: list[str] = []
    for part in (p.strip().lower().replace("_", "-") for p in text.split(",")):
        if not part:
            continue
        if part in ROW_GROUPS:
            names += ROW_GROUPS[part]
        elif part in ROWS:
            names.append(part)
        else:
            choices = ", ".join((*ROWS, *ROW_GROUPS))
            raise argparse.ArgumentTypeError(f"unknown method {part!r}: choose from {choices}")
    if not names:
        raise argparse.ArgumentTypeError(f"choose at least one of {', '.join(ROWS)}")
    return tuple(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m bench_core bench``."""
    d = BenchSettings()
    parser.add_argument(
        "--dataset-shape", type=_shape_arg, default=d.dataset_shape, help="cifar10, mnist, ... or CxHxW"
    )
    parser.add_argument("--ensemble-sizes", type=_sizes_arg, default=d.ensemble_sizes, help="comma list, e.g. 1,2,4,8")
    parser.add_argument("--methods", type=_rows_arg, default=d.rows, help=f"comma list of rows: {', '.join(ROWS)}")
    parser.add_argument("--batch-size", type=_positive_int("batch size"), default=d.batch_size)
    parser.add_argument("--hidden", type=_positive_int("hidden width"), default=d.hidden)
    parser.add_argument("--depth", type=_positive_int("depth"), default=d.depth)
    parser.add_argument("--steps", type=_positive_int("steps"), default=d.steps, help="timed steps per repeat")
    parser.add_argument("--warmup", type=_positive_int("warm-up steps", minimum=0), default=d.warmup)
    parser.add_argument("--repeats", type=_positive_int("repeats"), default=d.repeats)
    parser.add_argument("--device", type=_device, default=d.device)
    parser.add_argument("--threads", type=_positive_int("threads"), default=None, help="torch threads (default: all)")
    parser.add_argument("--train-examples", type=_positive_int("training examples"), default=None)
    parser.add_argument("--inference-examples", type=_positive_int("inference examples"), default=d.inference_examples)
    parser.add_argument("--no-reference", action="store_true", help="skip the seed-pipeline reference rows")
    parser.add_argument("--full-epoch", action="store_true", help="time whole epochs instead of extrapolating")
    parser.add_argument("--in-process", action="store_true", help="measure every row in this process")
    parser.add_argument("--no-cuda-graph", action="store_true", help="CUDA: run every training step eagerly")
    parser.add_argument("--json", dest="json_path", default=None, help="write the header and rows to this file")
    parser.add_argument("--progress-jsonl", default=None, help="append every event to this file as a JSON line")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one row, in a child process


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        dataset_shape=args.dataset_shape,
        ensemble_sizes=tuple(args.ensemble_sizes),
        rows=tuple(args.methods),
        batch_size=args.batch_size,
        hidden=args.hidden,
        depth=args.depth,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        device=args.device,
        reference=not args.no_reference,
        full_epoch=args.full_epoch,
        train_examples=args.train_examples,
        inference_examples=args.inference_examples,
        isolate=not args.in_process,
        threads=args.threads,
        cuda_graph=not args.no_cuda_graph,
    ).validate()


def cmd_bench(args: argparse.Namespace) -> int:
    """``python -m bench_core bench``: print the table; Ctrl-C or SIGTERM stops and prints what was measured."""
    if args.row is not None:
        return _cmd_row(args.row)
    settings = settings_from_args(args)
    for path in (args.json_path, args.progress_jsonl):
        if path and not os.access(Path(path).resolve().parent, os.W_OK):
            raise ConfigError(f"can't write {path}: its folder does not exist or is not writable")
    stop = threading.Event()
    _install_stop_handler(stop)  # first Ctrl-C / SIGTERM: stop after this row's current work
    progress = open(args.progress_jsonl, "a") if args.progress_jsonl else None  # noqa: SIM115 - closed below
    final = None
    try:
        for event in run_benchmark(settings, stop):
            if progress is not None:
                progress.write(json.dumps(event.to_dict()) + "\n")
                progress.flush()
            if not args.quiet and event.kind in ("row", "header", "done"):
                print(f"[{event.fraction:4.0%}] {event.message}", file=sys.stderr)
            if event.kind == "done":
                final = event
    finally:
        if progress is not None:
            progress.close()
    print(format_table(final.header, final.rows, final.targets))
    if final.stopped:
        print("stopped early: only the rows above were measured", file=sys.stderr)
    if args.json_path:
        out = {"header": final.header, "rows": final.rows, "targets": final.targets, "stopped": final.stopped}
        Path(args.json_path).write_text(json.dumps(out, indent=2))
    return 0


def _cmd_row(payload: str) -> int:
    """Child-process side of ``isolate``: measure one row, one JSON line per progress update and the row."""
    try:
        msg = json.loads(payload)
        settings = BenchSettings.from_dict(msg["settings"])
        spec = RowSpec(**msg["row"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"bad --row payload: {err}") from None

    def report(fraction: float, message: str) -> None:
        print(json.dumps({"event": "progress", "fraction": fraction, "message": message}), flush=True)

    def gate(phase: str) -> None:
        print(json.dumps({"event": "gate", "phase": phase}), flush=True)
        if not sys.stdin.readline():  # the benchmark ended: nothing more to measure
            raise SystemExit(0)

    raw = measure_row(spec, settings, report, gate=gate)
    print(json.dumps({"event": "row", "row": raw}), flush=True)
    return 0


def _check_int(label: str, value, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label} must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{label} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{label} must be at most {maximum}, got {value}")
