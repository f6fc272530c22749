"""Measuring one row: training epochs, inference throughput and peak memory, in this process."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from bench_core.bench.breakdown import part_seconds, shares
from bench_core.bench.settings import INFERENCE_BATCH, REFERENCE_ROWS, ROW_LABELS, BenchSettings, RowSpec, row_batching
from bench_core.config import ModelConfig, TrainConfig
from bench_core.devices import resolve_device, synchronize

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
        _release_free_heap()
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


def _release_free_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``), where there is one.

    Peak RSS counts pages as they are first touched. Memory the process freed earlier stays
    resident in the heap (``devices`` has glibc keep freed blocks, up to 32 MiB each, rather than
    unmap them every step), and training's first allocations reuse it without adding to RSS. Once
    the synthetic data came in chunks of 1,024 examples (12 MiB temporaries, from the heap where
    one large draw had been mapped and unmapped), the classic ensemble's peak read 2.6, 17.5 and
    36.9 MiB in three runs of the same row on this project's machine; trimmed first, 44.1, 48.7
    and 48.6 MiB, as before the chunks (47.9 MiB in run 70).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
    from bench_core.training import compiles_kernels, examples_per_step, steps_per_epoch, train

    shape, n_full, classes = settings.shape_info()
    method, mode = ROW_LABELS[spec.name]
    n_members = spec.ensemble_size if method != "single" else 1
    batching = row_batching(spec.name)
    bs = settings.batch_size
    step_examples = examples_per_step(bs, n_members, batching)
    n_timed = n_full if settings.full_epoch else settings.steps * step_examples
    n_warm = settings.warmup * step_examples
    n_profiled = settings.profile_steps * step_examples
    n_data = max(n_timed, n_warm, n_profiled, 1)
    # Said first: generating the data took seconds in which the last row's line stood as if current.
    report(0.0, "generating its data")
    data = make_synthetic(n_data, settings.inference_examples, shape, classes, settings.seed)
    data = data.to(device)
    timed = _first_examples(data, n_timed)
    if device.type == "cpu":
        from bench_core import native

        if not native.is_ready():
            report(0.0, native.BUILDING_NOTE)
        native.warm_up()  # loaded before the memory probe, as the kernel below
    if compiles_kernels(method == "batchensemble", device, batching, n_members):
        from bench_core import kernels

        # Compiled before the memory probe starts: importing inductor is ~200 MiB of resident memory
        # that is the process's, not training's.
        if not kernels.is_warm(data.in_features, n_members, settings.hidden):
            report(0.0, "compiling BatchEnsemble's CPU kernel")  # seconds with nothing else to show
        kernels.warm_up(data.in_features, n_members, settings.hidden)
    from bench_core import onednn

    # Likewise oneDNN's first use, its check against torch.mm (the library's set-up: about 9 MiB of
    # resident memory on this project's machine); each product shape's own set-up stays training's.
    onednn.usable(data.x_train)
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
        warm = _first_examples(data, n_warm)
        for _ in train(model, warm, train_cfg, method=method, batching=batching, stop=stop, cuda_graph=graph):
            pass
    untimed = untimed_epochs(device, graph)
    train_cfg.epochs = settings.repeats + untimed
    scale = steps_per_epoch(n_full, bs, n_members, batching) / steps_per_epoch(n_timed, bs, n_members, batching)
    epochs = []
    # Each timed repeat starts after one untimed step (with any warm-up): it follows another row's turn,
    # with the caches and the allocator cold, and the first repeat a new optimizer, whose first step
    # makes its state. A real epoch pays these once, not once every few dozen steps (see REWARM_STEPS).
    rewarm = settings.rewarm_steps()
    gate("repeat 1")
    for rec in train(
        model, timed, train_cfg, method=method, batching=batching, stop=stop, cuda_graph=graph, untimed_steps=rewarm
    ):
        if rec.kind == "epoch":
            if rec.stopped:
                raise RowStoppedError
            if untimed:
                untimed -= 1
                continue
            epochs.append(rec.epoch_seconds * scale)
            report(0.8 * len(epochs) / settings.repeats, f"repeat {len(epochs)}/{settings.repeats}")
            if len(epochs) < settings.repeats:
                gate(f"repeat {len(epochs) + 1}")  # the generator waits here, between two epochs

    peak = probe.peak_mib()  # of training; inference is not counted
    gate("finish")
    profiled = None
    if n_profiled and device.type == "cpu":
        report(0.85, "profiling steps")
        profiled_data = _first_examples(data, n_profiled)
        profiled = profiled_part_seconds(model, profiled_data, train_cfg, method, batching, stop)

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
        # Where a step goes (CPU only; None elsewhere or with profile_steps 0).
        "step_shares": shares(profiled) if profiled else None,
        "profiled_step_seconds": sum(profiled.values()) / (settings.profile_steps * passes) if profiled else None,
    }


def _first_examples(data, n: int):
    """``data`` with its training split cut to the first ``n`` examples (views; the test split as it is)."""
    return replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])


def profiled_part_seconds(
    model: torch.nn.Module,
    data,
    train_cfg: TrainConfig,
    method: str,
    batching: str,
    stop: threading.Event | None,
) -> dict[str, float]:
    """Seconds of each part of ``STEP_PARTS`` in one epoch over ``data``, under ``torch.profiler`` (CPU).

    Two epochs run: the first unrecorded (a new ``train`` call makes a new optimizer, whose state is
    allocated on its first step), the second recorded. On this project's machine the profiler
    lengthened such an epoch by 3-5 % (split 1.049×, classic vectorized 1.033×, single 1.039× the
    same epochs unprofiled; 20 steps, medians of 8 alternations in one process; ad-hoc script).
    """
    from torch.profiler import ProfilerActivity, profile, schedule

    from bench_core.training import train

    cfg = replace(train_cfg, epochs=2)
    plan = schedule(wait=0, warmup=1, active=1, repeat=1)
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], schedule=plan, acc_events=True) as prof:
        for rec in train(model, data, cfg, method=method, batching=batching, stop=stop, cuda_graph=False):
            if rec.kind == "epoch":
                if rec.stopped:
                    raise RowStoppedError
                prof.step()
    return part_seconds(prof.events())


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null meanwhile: the profiler's C++ side logs its start and stop there.

    A CUDA build of torch on a machine without a GPU also logs "gpuGetDeviceCount failed" as an
    ERROR line, which would alarm a user of ``--in-process`` for nothing. Python's own ``sys.stderr``
    is flushed first; what Python writes meanwhile is lost too, so nothing else runs inside.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (an embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
    report(0.0, "generating its data")
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
    repeats = settings.reference_repeats
    for r in range(repeats):
        gate(f"repeat {r + 1}")
        # Members one after another, each with its own pass (and its own worker start-up).
        timings = []
        for k, learner in enumerate(learners):
            timings.append(ref.timed_pass(loader, learner.step, n_steps))
            done = (r * len(learners) + k + 1) / (repeats * len(learners))
            report(0.8 * done, f"repeat {r + 1}/{repeats}, member {k + 1}/{len(learners)}")
        epochs.append(sum(t.epoch_seconds(full_steps) for t in timings))
        startups.append(sum(t.startup_seconds + t.shutdown_seconds for t in timings))
    peak = probe.peak_mib()  # of training; inference is not counted
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    gate("finish")
    if settings.warmup:
        warm_subset = Subset(test_images, range(min(2 * ref.SEED_EVAL_BATCH_SIZE, len(test_images))))
        warm_loader = ref.seed_loader(warm_subset, batch_size=ref.SEED_EVAL_BATCH_SIZE, shuffle=False)
        ref.seed_inference_seconds([lr.model for lr in learners], warm_loader, device)
    infer = [ref.seed_inference_seconds([lr.model for lr in learners], test_loader, device) for _ in range(repeats)]
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


class RowStoppedError(Exception):
    """A stop request ended a row early."""
