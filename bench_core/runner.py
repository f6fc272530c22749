"""A whole experiment: load the data, train each method, evaluate it, store everything.

``run_experiment`` is a generator of events (phases, training records, per-method results);
the CLI and the dashboard's worker process consume it. With a store, every record is committed
as it arrives, and the run's final status is always written, whatever ends it.
"""

from __future__ import annotations

import math
import platform
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from bench_core import native
from bench_core.config import RunConfig
from bench_core.data import Dataset, load_dataset
from bench_core.devices import resolve_device
from bench_core.errors import (
    BenchError,
    ConfigError,
    DeviceOutOfMemoryError,
    DivergedError,
    StopRequestedError,
    StoreError,
    is_allocation_failure,
)
from bench_core.evaluation import evaluate
from bench_core.jobs import WAITING
from bench_core.locks import (
    ENV_LOCK_DIR,
    LockCancelledError,
    default_lock_dir,
    device_lock,
    device_word,
    lock_holder,
    lock_name,
    waiting_count,
)
from bench_core.models import batchensemble_params, build_model, mlp_params, mlp_sizes
from bench_core.store import RunStore
from bench_core.training import EpochRecord, StepRecord, compiles_kernels, train

Progress = Callable[[float, str], None]


@dataclass
class Phase:
    """A stage of the run began (loading data, training a method, evaluating it)."""

    message: str
    method: str | None = None
    kind: str = field(default="phase", init=False)


@dataclass
class MethodResult:
    """A method's evaluation report plus its training figures."""

    method: str
    result: dict
    kind: str = field(default="result", init=False)


@dataclass
class RunDone:
    """The run ended: status is "finished" or "stopped"; results are keyed by method."""

    status: str
    results: dict[str, dict]
    run_id: int | None = None
    notes: list[str] = field(default_factory=list)  # what went wrong without failing the run (weights not saved)
    kind: str = field(default="done", init=False)


Event = Phase | EpochRecord | StepRecord | MethodResult | RunDone


def software_versions() -> dict:
    """The versions stored with every run."""
    import torchvision

    from bench_core import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "bench_core": __version__,
        "platform": platform.platform(),
    }


# The real datasets as known without loading them: training and test sizes, one example's shape, classes.
TRAIN_SIZES = {"cifar10": 50_000, "fashion-mnist": 60_000, "mnist": 60_000}
TEST_SIZES = {"cifar10": 10_000, "fashion-mnist": 10_000, "mnist": 10_000}
DATASET_SHAPES = {"cifar10": (3, 32, 32), "fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28)}
DATASET_CLASSES = {"cifar10": 10, "fashion-mnist": 10, "mnist": 10}


def train_size(cfg: RunConfig) -> int | None:
    """Training examples per epoch of ``cfg``'s dataset, known without loading it (None: a name not known here)."""
    return cfg.data.synthetic_train if cfg.data.name == "synthetic" else TRAIN_SIZES.get(cfg.data.name)


def preflight(cfg: RunConfig) -> RunConfig:
    """``cfg.validate()`` plus the checks the run would otherwise make only once its data is loaded.

    The command line and the dashboard call it before a run is created, so that a setting the
    data can't serve costs no loading (or download) and leaves no failed run behind, and a run
    far larger than the machine's free memory is refused in one line rather than killed by the
    system with none (``check_memory``).

    Raises:
        ConfigError: one line naming the setting to change.
    """
    cfg.validate()
    check_fits(cfg, train_size(cfg), cfg.data.name)
    check_memory(cfg)
    return cfg


def memory_needed(cfg: RunConfig) -> int:
    """Bytes a run of ``cfg`` needs at least on its device, counted from its settings (nothing allocated).

    The data in float32, and the largest of its methods' models (they train one after another)
    four times over: weights, gradients and Adam's two moments; plus one step's activations. An
    underestimate (no allocator slack, no temporaries): it is used to refuse only what can't fit.
    """
    if cfg.data.name == "synthetic":
        shape, classes = tuple(cfg.data.synthetic_shape), cfg.data.synthetic_classes
        examples = cfg.data.synthetic_train + cfg.data.synthetic_test
    else:
        shape, classes = DATASET_SHAPES[cfg.data.name], DATASET_CLASSES[cfg.data.name]
        examples = TRAIN_SIZES[cfg.data.name] + TEST_SIZES[cfg.data.name]
    in_features = math.prod(shape)
    sizes = mlp_sizes(in_features, cfg.model.hidden, cfg.model.depth, classes)
    e = cfg.model.ensemble_size
    one = mlp_params(sizes)
    params = {"single": one, "classic": e * one, "batchensemble": batchensemble_params(sizes, e)}
    members = {"single": 1, "classic": e, "batchensemble": e}
    steps = [4 * params[m] + 2 * cfg.train.batch_size * members[m] * sum(sizes[1:]) for m in cfg.methods]
    return 4 * (examples * in_features + max(steps))


def check_memory(cfg: RunConfig, available: int | None = None) -> None:
    """Raise ConfigError where a CPU run needs more than the machine's free memory (``memory_needed``).

    ``available``: free bytes; None reads ``MemAvailable`` from ``/proc/meminfo`` (where there is
    none, or the run is not on the CPU, nothing is checked: a GPU's own allocator answers there).
    """
    try:
        if resolve_device(cfg.train.device).type != "cpu":
            return
    except BenchError:
        return  # the caller's own resolve_device says what is wrong with the device
    available = _memory_available() if available is None else available
    needed = memory_needed(cfg)
    if available is None or needed <= available:
        return
    raise ConfigError(
        f"these settings need at least {needed / 2**30:.1f} GiB of memory, more than the {available / 2**30:.1f} GiB "
        f"free on this machine: lower the ensemble size ({cfg.model.ensemble_size}), hidden width "
        f"({cfg.model.hidden}), depth ({cfg.model.depth}) or the number of examples"
    )


def _memory_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(cfg: RunConfig, n_train: int | None, dataset_name: str) -> None:
    """Raise ConfigError when a dataset of ``n_train`` examples can't serve the batch or ensemble size.

    ``n_train`` None (not known before loading) checks only what does not depend on it; the
    dashboard calls this before launching a run, the runner again once the data is loaded.
    """
    if n_train is not None and cfg.train.batch_size > n_train:
        raise ConfigError(
            f"batch size {cfg.train.batch_size} is larger than the {n_train} training examples of "
            f"{dataset_name}: lower the batch size"
        )
    e = cfg.model.ensemble_size
    if "batchensemble" in cfg.methods and cfg.model.be_batching == "split":
        if cfg.train.batch_size < e:
            raise ConfigError(
                f"batch size {cfg.train.batch_size} can't be split among {e} members: "
                f"raise the batch size to at least {e}, lower the ensemble size, or use repeat batching"
            )
        if n_train is not None and n_train < e:
            raise ConfigError(f"{n_train} training examples can't be split among {e} members")


def waiting_note(device: torch.device, holder: str | None, ahead: int | None = None, waiter: str = "run") -> str:
    """The note of a run waiting for its device: "waiting for the CPU: run 7 is using it; this run is next (...)".

    ``ahead``: how many others wait ahead of it (None: not known yet); ``waiter``: "run" or "benchmark".
    """
    who = holder or "another run"
    place = ""
    if ahead == 0:
        place = f"; this {waiter} is next"
    elif ahead is not None:
        place = f"; {ahead} more {'wait' if ahead > 1 else 'waits'} ahead of this {waiter}"
    return (
        f"{WAITING}{device_word(device)}: {who} is using it{place} "
        "(runs take turns in order, so each one's timings are its own)"
    )


def follow_wait(
    device: torch.device, tell: Callable[[str], None], waiter: str = "run", holder: str | None = None
) -> Callable[[int | None], None]:
    """An ``on_poll`` for ``device_lock`` that calls ``tell(note)`` each time the waiting note changes.

    The note names the holder and the place of the moment (``waiting_note``): they change as runs
    go. In a hand-over the lock file is empty for a moment (the new holder has the lock and has
    not yet written its name, or the old one has let go and the next waiter not yet taken it):
    the last name read (at first ``holder``) stands until the next one can be read, rather than
    "another run".
    """
    seen: list[str | None] = [holder]
    told: list[str | None] = [None]

    def look(ahead: int | None) -> None:
        seen[0] = lock_holder(device) or seen[0]
        note = waiting_note(device, seen[0], ahead, waiter)
        if note != told[0]:
            told[0] = note
            tell(note)

    return look


def run_experiment(
    cfg: RunConfig,
    *,
    store: RunStore | None = None,
    run_id: int | None = None,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    source: str = "cli",
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[Event]:
    """Run every method of ``cfg`` and yield events as they happen.

    Args:
        cfg: the run's settings (validated here).
        store: where records, results and weights go; None keeps nothing.
        run_id: a run already created in ``store`` (the dashboard's worker); None creates one.
        stop: when set, the method in training stops between two batches, is evaluated as
            trained so far, and the methods after it are skipped; set while the data loads, the
            load gives up at its next progress report and the run ends stopped with no results.
        progress: called with (fraction, message) while the dataset loads or downloads.
        source: recorded with a new run ("cli", "dashboard", "test").
        on_wait: while the run waits for its device, called with the waiting note each time its
            holder or place changes after the Phase that said the wait began (the store's note
            follows them too).

    Raises:
        BenchError: with a one-line message (bad settings, missing data, divergence, out of memory).
    """
    cfg.validate()
    stop = stop or threading.Event()
    if store is not None and run_id is None:
        run_id = store.create_run(cfg.to_dict(), source=source, status="queued")
    try:
        device = resolve_device(cfg.train.device)
        if store is not None:
            store.start_run(run_id, device=str(device), versions=software_versions())
        results: dict[str, dict] = {}
        notes: list[str] = []
        holder = lock_holder(device)  # for the message only: the lock below decides
        said: list[str | None] = [None]
        if holder is not None:  # a newcomer joins the queue behind those who wait now
            said[0] = waiting_note(device, holder, waiting_count(device))
            yield Phase(said[0])

        def tell(note: str) -> None:
            if store is not None:
                store.set_note(run_id, note)
            if on_wait is not None and note != said[0]:
                said[0] = note
                on_wait(note)

        say_who_waits = follow_wait(device, tell, holder=holder)
        run_name = f"run {run_id}" if run_id is not None else "a run"
        # Held from before the data loads: generating or decoding it would slow the run that trains.
        with device_lock(device, on_poll=say_who_waits, cancel=stop, holder=run_name) as held:
            if store is not None:
                store.set_note(run_id, None)
            if held is None and lock_name(device) is not None:
                notes.append(
                    f"this run did not take turns on {device_word(device)} with other runs: the lock folder "
                    f"{default_lock_dir()} can't be written (set {ENV_LOCK_DIR} to a folder that can)"
                )
            yield Phase(f"loading {cfg.data.name}")
            try:
                dataset = load_dataset(cfg.data, device, progress=progress, stop=stop)
            except (MemoryError, RuntimeError) as err:
                if not is_allocation_failure(err):
                    raise
                raise DeviceOutOfMemoryError(
                    f"{cfg.data.name} does not fit in this machine's memory: use fewer examples"
                    + (" (the synthetic training and test sizes)" if cfg.data.name == "synthetic" else "")
                ) from None
            check_fits(cfg, dataset.n_train, dataset.name)
            if store is not None:
                store.set_note(run_id, None)  # the load's last progress line
            for method in cfg.methods:
                if stop.is_set():
                    break
                result = yield from _run_method(method, cfg, dataset, device, stop, store, run_id, notes)
                results[method] = result
                yield MethodResult(method, result)
        status = "stopped" if stop.is_set() else "finished"
        if store is not None:
            store.finish_run(run_id, status, "; ".join(notes))
        done = RunDone(status, results, run_id, notes)
    except (LockCancelledError, StopRequestedError) as err:
        # Stopped while waiting for the device or while the data loaded: nothing was trained, nothing failed.
        if store is not None:
            note = (
                str(err) if isinstance(err, StopRequestedError) else f"stopped while waiting for {device_word(device)}"
            )
            store.finish_run(run_id, "stopped", note)
        done = RunDone("stopped", {}, run_id)
    except BenchError as err:
        if store is not None:
            store.finish_run(run_id, "failed", str(err))
        raise
    except GeneratorExit:
        if store is not None:
            store.finish_run(run_id, "stopped", "the consumer went away")
        raise
    except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM) aborts: the epochs stored so far are kept
        if store is not None:
            store.finish_run(run_id, "interrupted", "aborted by a second Ctrl-C or SIGTERM")
        raise
    except BaseException as err:
        if store is not None:
            store.finish_run(run_id, "failed", f"{type(err).__name__}: {err}".splitlines()[0])
        raise
    # Outside the try: the run is stored as it ended, and what happens to the consumer after this
    # (a second Ctrl-C, a closed generator) must not store it again as interrupted or stopped.
    yield done


def _run_method(
    method: str,
    cfg: RunConfig,
    dataset: Dataset,
    device: torch.device,
    stop: threading.Event,
    store: RunStore | None,
    run_id: int | None,
    notes: list[str],
) -> Iterator[Event]:
    """Train and evaluate one method; its records, result and weights go to ``store``.

    Weights that can't be saved fail nothing: the figures are stored, and a line on ``notes`` says so.
    """
    torch.manual_seed(cfg.train.seed)  # every method starts from the same seed
    mode = cfg.model.classic_mode if method == "classic" else ""
    batching = cfg.model.be_batching if method == "batchensemble" else "repeat"
    label = {"classic": f"classic ({mode})", "batchensemble": f"BatchEnsemble ({batching})"}.get(method, method)
    yield Phase(f"training {label}", method)
    epochs: list[EpochRecord] = []
    try:
        model = build_model(method, cfg.model, dataset.in_features, dataset.num_classes).to(device)
        yield from _warm_up_kernels(model, method, batching, cfg, device, store, run_id)
        for record in train(model, dataset, cfg.train, method=method, batching=batching, stop=stop):
            if store is not None:
                store.add_record(run_id, record.to_dict())
                if isinstance(record, EpochRecord):
                    store.set_progress(run_id, _fraction(cfg, method, record.epoch))
            if isinstance(record, EpochRecord):
                epochs.append(record)
            yield record
        yield Phase(f"evaluating {label}", method)
        try:
            report = evaluate(model, dataset.x_test, dataset.y_test, batch_size=cfg.train.eval_batch_size)
        except ValueError as err:  # non-finite outputs on the test split
            raise DivergedError(f"{method} can't be evaluated: {err}; try a lower learning rate") from None
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not (isinstance(err, torch.OutOfMemoryError) or is_allocation_failure(err)):
            raise
        raise DeviceOutOfMemoryError(
            f"out of memory on {device} while running {method}: lower the ensemble size "
            f"({cfg.model.ensemble_size}), hidden width ({cfg.model.hidden}) or batch size ({cfg.train.batch_size})"
        ) from None
    result = report.to_dict()
    result.update(
        method=method,
        ensemble_size=getattr(model, "ensemble_size", 1),
        train_seconds=epochs[-1].elapsed_seconds if epochs else 0.0,
        epoch_seconds=[r.epoch_seconds for r in epochs],
        epochs_done=sum(1 for r in epochs if not r.stopped),
        stopped=any(r.stopped for r in epochs),
        final_loss=epochs[-1].loss if epochs else None,
    )
    if store is not None:
        store.set_result(run_id, method, result)
        try:
            store.save_weights(run_id, method, model.state_dict())
        except StoreError as err:
            notes.append(f"the weights of {method} were not saved: {err}")
            yield Phase(notes[-1], method)
    return result


COMPILING_NOTE = (
    "compiling BatchEnsemble's CPU kernel for its first layer's gradients (torch.compile; a few seconds once per run)"
)
BUILDING_NOTE = native.BUILDING_NOTE


def _warm_up_kernels(
    model: torch.nn.Module,
    method: str,
    batching: str,
    cfg: RunConfig,
    device: torch.device,
    store: RunStore | None,
    run_id: int | None,
) -> Iterator[Event]:
    """Build the C++ training steps (once per machine) and compile BatchEnsemble's CPU kernel before training, noted.

    ``train`` would do both too, before its clock, but silently: the dashboard would show the
    method in training with no epoch coming. Each note goes once its wait is over. The kernel
    takes 3-4 s here with inductor's cache warm, the C++ steps about 15 s the first time.
    """
    if device.type == "cpu" and not native.is_ready():
        yield from _noted(BUILDING_NOTE, method, store, run_id, native.warm_up)
    if not compiles_kernels(method == "batchensemble", device, batching, cfg.model.ensemble_size):
        return
    if model.kernels_warm():
        return
    yield from _noted(COMPILING_NOTE, method, store, run_id, model.warm_up_kernels)


def _noted(note: str, method: str, store: RunStore | None, run_id: int | None, wait: Callable[[], object]):
    """Call ``wait()`` with ``note`` as the phase and the run's note, the note cleared after."""
    yield Phase(note, method)
    if store is not None:
        store.set_note(run_id, note)
    try:
        wait()
    finally:
        if store is not None:
            store.set_note(run_id, None)


def _fraction(cfg: RunConfig, method: str, epoch: int) -> float:
    done = cfg.methods.index(method) * cfg.train.epochs + epoch
    return done / (len(cfg.methods) * cfg.train.epochs)
