"""Command line: ``python -m bench_core {train,bench,runs,worker}``.

Every mistake a user can make ends with exit status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench_core.config import BE_BATCHINGS, BE_INITS, CLASSIC_MODES, DATASETS, MAX_SEED, METHODS, RunConfig
from bench_core.devices import DEVICE_CHOICES
from bench_core.errors import BenchError, ConfigError, check_output_file, is_allocation_failure, write_output_file

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (and exits 2)."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(label: str, minimum: int = 1, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{label} must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{label} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{label} must be at most {maximum}, got {value}")
        return value

    return parse


def _positive_float(label: str, allow_zero: bool = False):
    kind = "a number of at least 0" if allow_zero else "a positive number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{label} must be {kind}, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{label} must be {kind}, got {text!r}")
        return value

    return parse


def _choice(label: str, choices: tuple[str, ...]):
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(f"unknown {label} {text!r}: choose one of {', '.join(choices)}")
        return value

    return parse


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"choose at least one method of {', '.join(METHODS)}")
    for name in names:
        if name not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"each method may be named once, got {text!r}")
    return names


def _device(text: str) -> str:
    value = text.strip().lower()
    if value.split(":", 1)[0] not in DEVICE_CHOICES:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m bench_core", description="The ensemble workbench's command line: train, runs, bench, worker."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    tr = sub.add_parser("train", help="train and compare methods, print a table of figures")
    one_of = ", ".join
    tr.add_argument(
        "--dataset", type=_choice("dataset", DATASETS), default="cifar10", help=f"{one_of(DATASETS)} (default cifar10)"
    )
    tr.add_argument(
        "--methods",
        type=_methods,
        default=("classic", "batchensemble"),
        help=f"comma list of {one_of(METHODS)} (default classic,batchensemble)",
    )
    tr.add_argument("--ensemble-size", type=_positive_int("ensemble size"), default=5, help="members E (default 5)")
    tr.add_argument("--epochs", type=_positive_int("epochs"), default=10, help="(default 10)")
    tr.add_argument("--batch-size", type=_positive_int("batch size"), default=128, help="(default 128)")
    tr.add_argument(
        "--lr", type=_positive_float("learning rate"), default=1e-3, help="Adam's learning rate (default 0.001)"
    )
    tr.add_argument("--hidden", type=_positive_int("hidden width"), default=128, help="hidden width (default 128)")
    tr.add_argument("--depth", type=_positive_int("depth"), default=2, help="hidden layers (default 2)")
    tr.add_argument(
        "--device",
        type=_device,
        default="auto",
        help=f"{one_of(DEVICE_CHOICES)}, or cuda:N (default auto: the first of cuda, mps, cpu here)",
    )
    tr.add_argument(
        "--seed", type=_positive_int("seed", minimum=0, maximum=MAX_SEED), default=0, help="random seed (default 0)"
    )
    tr.add_argument(
        "--classic-mode",
        type=_choice("classic mode", CLASSIC_MODES),
        default="vectorized",
        help="vectorized (all members in one batched pass, the default) or sequential (one after another)",
    )
    tr.add_argument(
        "--be-batching",
        type=_choice("BatchEnsemble batching", BE_BATCHINGS),
        default="repeat",
        help="repeat (every member sees the whole batch, the default) or split (each member 1/E of it)",
    )
    tr.add_argument(
        "--be-init",
        type=_choice("fast-weight init", BE_INITS),
        default="normal",
        help=f"how BatchEnsemble's r and s start: {one_of(BE_INITS)} (default normal: N(1, std²))",
    )
    tr.add_argument(
        "--be-init-std",
        type=_positive_float("fast-weight init std", allow_zero=True),
        default=0.5,
        help="std of the normal init (default 0.5)",
    )
    tr.add_argument("--data-dir", default=None, help="data folder (default $BENCH_DATA_DIR or ./data)")
    tr.add_argument("--no-download", action="store_true", help="never download a missing dataset")
    tr.add_argument(
        "--synthetic-train",
        type=_positive_int("synthetic train size"),
        default=50_000,
        help="training examples of --dataset synthetic (default 50000)",
    )
    tr.add_argument(
        "--synthetic-test",
        type=_positive_int("synthetic test size"),
        default=10_000,
        help="test examples of --dataset synthetic (default 10000)",
    )
    tr.add_argument(
        "--log-every",
        type=_positive_int("log every", minimum=0),
        default=0,
        help="record the loss every N steps too (default 0: per epoch only)",
    )
    tr.add_argument("--json", dest="json_path", default=None, help="write the figures to this JSON file")
    tr.add_argument("--store", default=None, help="run store file (default $BENCH_STORE or <data dir>/runs.sqlite)")
    tr.add_argument("--no-store", action="store_true", help="keep nothing in the run store")
    tr.add_argument("--name", default=None, help="a name for the run in the store")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    wk = sub.add_parser("worker", help="(internal) run a queued run of the store; used by the dashboard")
    wk.add_argument("--store", required=True)
    wk.add_argument("--run-id", type=_positive_int("run id"), required=True)

    rn = sub.add_parser("runs", help="list the runs in the store")
    rn.add_argument("--store", default=None)
    rn.add_argument("--data-dir", default=None)

    bn = sub.add_parser("bench", help="speed benchmark: seconds per epoch, throughput, memory, floor")
    try:
        from bench_core.bench import add_arguments
    except ImportError:  # the benchmark module is optional for the other commands
        add_arguments = None
    if add_arguments is not None:
        add_arguments(bn)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig.from_flat({**vars(args), "download": not args.no_download}).validate()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "worker":
            return cmd_worker(args)
        if args.command == "runs":
            return cmd_runs(args)
        if args.command == "bench":
            from bench_core.bench import cmd_bench

            return cmd_bench(args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (``runs | head``): nothing more to say
        _quiet_stdout()
        return 141
    except OSError as err:  # a file or folder that can't be reached; the commands' own checks name most
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as err:
        if not is_allocation_failure(err):
            raise
        print("error: out of memory on this machine: lower the sizes asked for", file=sys.stderr)
        return EXIT_USAGE
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _store_path(args: argparse.Namespace) -> Path:
    """--store, else $BENCH_STORE, else the store in --data-dir, else the default store."""
    from bench_core.store import default_store_path

    if getattr(args, "store", None):
        return Path(args.store)
    data_dir = getattr(args, "data_dir", None)
    if data_dir and not os.environ.get("BENCH_STORE"):
        return Path(data_dir) / "runs.sqlite"
    return default_store_path()


def _install_stop_handler(stop: threading.Event, what: Callable[[], str] = lambda: "stopping after this batch") -> None:
    """First Ctrl-C (or SIGTERM) asks the loop to stop after the current batch; a second one aborts.

    Counted here, not read off ``stop``: a stop asked from the dashboard sets it too, and the
    user's first Ctrl-C after that still only asks (again) to stop. ``what()`` says what a stop
    does at this moment ("stopping after this batch", ...).
    """
    presses = [0]

    def handler(signum, frame):
        presses[0] += 1
        if presses[0] > 1:
            raise KeyboardInterrupt
        stop.set()
        print(f"\n{what()} (press Ctrl-C again to abort)", file=sys.stderr)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def cmd_train(args: argparse.Namespace) -> int:
    from bench_core.devices import resolve_device
    from bench_core.report import format_table, results_json
    from bench_core.runner import Phase, RunDone, preflight, run_experiment
    from bench_core.store import RunStore

    cfg = preflight(config_from_args(args))  # what the data can't serve is an input error too
    resolve_device(cfg.train.device)  # a missing device is an input error: no run is created for it
    if args.no_store and (args.store or args.name):
        raise ConfigError(f"--no-store keeps no run, so it takes no {'--store' if args.store else '--name'}")
    if args.json_path:
        check_output_file(args.json_path, "--json")  # before training, not after it
    store = None if args.no_store else RunStore(_store_path(args))
    run_id = None
    if store is not None:
        run_id = store.create_run(cfg.to_dict(), source="cli", name=args.name, status="queued")
        print(f"run {run_id} (store: {store.path})", file=sys.stderr)
    stop = threading.Event()
    stage = ["stopping before training starts"]  # what a stop does now, as the events tell
    _install_stop_handler(stop, lambda: stage[0])
    if store is not None:  # the dashboard's Stop (Train or Runs page) reaches a run started here too
        from bench_core.jobs import watch_stop

        said = lambda: print(f"\n{stage[0]}: asked from the dashboard", file=sys.stderr)  # noqa: E731
        watch_stop(store, run_id, stop, on_stop=said)
    bar = ProgressBar(cfg, enabled=not args.quiet)
    done = None
    waits = lambda note: bar.update(Phase(note))  # noqa: E731  (a new holder or place: a new line)
    for event in run_experiment(cfg, store=store, run_id=run_id, stop=stop, progress=bar.download, on_wait=waits):
        bar.update(event)
        if isinstance(event, Phase) and event.method is not None:
            stage[0] = "stopping after this batch"
        if isinstance(event, RunDone):
            done = event
            stage[0] = f"the run has ended, stored as {done.status}" if run_id is not None else "the run has ended"
    try:
        bar.close()
        if done.status == "stopped" and not done.results:
            print("stopped before any method was trained: there are no figures", file=sys.stderr)
        else:
            print(format_table(done.results))
        if done.status == "stopped" and done.results:
            print("stopped early: the figures are for the models as trained so far", file=sys.stderr)
        for note in done.notes:
            print(f"warning: {note}", file=sys.stderr)
        if args.json_path:
            write_output_file(args.json_path, json.dumps(results_json(done.results), indent=2), "--json")
    except KeyboardInterrupt:  # a Ctrl-C after the run was stored: it stays as it ended
        kept = f": run {run_id} is stored as {done.status}" if run_id is not None else ""
        print(f"\ninterrupted{kept}", file=sys.stderr)
        return 130
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a run that the dashboard queued in the store; its stop button reaches us through the store."""
    from bench_core.jobs import watch_stop
    from bench_core.runner import run_experiment
    from bench_core.store import RunStore

    if not Path(args.store).exists():  # a mistyped --store: make no folder or store there
        raise ConfigError(f"there is no run store at {args.store}: a worker runs a run queued in one")
    store = RunStore(args.store)
    run = store.get_run(args.run_id)
    if run["status"] != "queued":  # a run that ended (or another worker's) keeps its records and results
        raise ConfigError(f"run {args.run_id} is {run['status']}, not queued: a worker runs only a queued run")
    try:
        if not run["config_readable"]:
            raise ValueError("the stored settings are not a readable JSON object")
        cfg = RunConfig.from_dict(run["config"]).validate()
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # ConfigError is a ValueError
        store.finish_run(args.run_id, "failed", f"bad settings: {err}")
        raise ConfigError(f"run {args.run_id} has bad settings: {err}") from None
    stop = threading.Event()
    _install_stop_handler(stop)
    watch_stop(store, args.run_id, stop)

    def progress(fraction: float, message: str) -> None:
        store.set_note(args.run_id, message)

    for _ in run_experiment(cfg, store=store, run_id=args.run_id, stop=stop, progress=progress):
        pass
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from bench_core.store import RunStore

    path = _store_path(args)
    if not path.exists():  # a mistyped --store: say so, and make no folder or store there
        print(f"no runs: there is no run store at {path}")
        return 0
    if path.is_file() and path.stat().st_size == 0:  # an empty file: listing it writes no store into it
        print(f"no runs in {path}")
        return 0
    store = RunStore(path)
    rows = store.list_runs()
    if not rows:
        print(f"no runs in {store.path}")
        return 0
    header = f"{'id':>4}  {'status':<11} {'dataset':<13} {'E':>3} {'epochs':>6}  {'created':<16}"
    print(f"{header}  methods (ensemble accuracy)")
    for run in rows:
        print(_run_line(run))
    return 0


def _run_line(run: dict) -> str:
    """One run of ``runs``; a field the store holds in another shape than this code wrote shows as ``?``."""
    from bench_core.jobs import status_text

    def field(*keys: str) -> object:
        value: object = run.get("config") or {}
        for key in keys:
            value = value.get(key, "?") if isinstance(value, dict) else "?"
        return value if isinstance(value, (str, int, float)) and not isinstance(value, bool) else "?"

    summary = run.get("summary") or {}
    methods = []
    for method in run.get("methods") or []:
        accuracy = (summary.get(method) or {}).get("ensemble_accuracy")
        ok = isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and math.isfinite(accuracy)
        methods.append(f"{method} {accuracy:.3f}" if ok else method)
    try:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(run["created"])))
    except (TypeError, ValueError, OverflowError, OSError):
        created = "?"
    members = 1 if run.get("methods") == ["single"] else field("model", "ensemble_size")  # as the Runs page
    return (  # the methods last: their list has no fixed width (it pushed the date out of its column)
        f"{run['id']:>4}  {status_text(run):<11} {field('data', 'name')!s:<13} {members!s:>3} "
        f"{field('train', 'epochs')!s:>6}  {created:<16}  {', '.join(methods)}"
    )


class ProgressBar:
    """A one-line progress bar on stderr: method, epoch, loss, ETA."""

    def __init__(self, cfg: RunConfig, enabled: bool = True, width: int = 28) -> None:
        self.cfg = cfg
        self.enabled = (enabled and sys.stderr.isatty()) or (enabled and os.environ.get("BENCH_PROGRESS") == "1")
        self.plain = enabled and not self.enabled  # not a terminal: one line per epoch instead
        self.width = width
        self.total = len(cfg.methods) * cfg.train.epochs
        self.t0 = time.perf_counter()
        self.method_seconds: dict[str, float] = {}

    def download(self, fraction: float, message: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r{message[:70]:<70} {fraction:6.1%}")
            sys.stderr.flush()

    def update(self, event) -> None:
        kind = getattr(event, "kind", "")
        if kind == "phase" and (self.enabled or self.plain):
            sys.stderr.write(("\n" if self.enabled else "") + f"{event.message}\n")
        elif kind in ("epoch", "step"):
            idx = self.cfg.methods.index(event.method)
            frac_epoch = event.epoch - 1 + (event.step / event.steps_per_epoch if kind == "step" else 1.0)
            done = idx * self.cfg.train.epochs + frac_epoch
            per_epoch = event.elapsed_seconds / max(frac_epoch, 1e-9)
            eta = per_epoch * (self.total - done)
            line = (
                f"{event.method:<13} epoch {event.epoch:>3}/{self.cfg.train.epochs} "
                f"loss {event.loss:7.4f}  ETA {_hms(eta)}"
            )
            if self.enabled:
                filled = int(self.width * done / self.total)
                bar = "#" * filled + "-" * (self.width - filled)
                sys.stderr.write(f"\r[{bar}] {line}")
                sys.stderr.flush()
            elif self.plain and kind == "epoch":
                sys.stderr.write(f"{line}  ({event.epoch_seconds:.1f} s)\n")

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
