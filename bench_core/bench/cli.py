"""``python -m bench_core bench``: its options, and the table it prints."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable, Iterator

import torch

from bench_core.bench.results import format_table
from bench_core.bench.schedule import cmd_row, run_benchmark
from bench_core.bench.settings import DATASET_SHAPES, ROW_GROUPS, ROWS, BenchEvent, BenchSettings, parse_shape
from bench_core.cli import _device, _install_stop_handler, _positive_int
from bench_core.devices import resolve_device
from bench_core.errors import ConfigError, check_output_file, write_output_file
from bench_core.locks import LockCancelledError, device_lock, device_word, lock_holder


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
    parser.add_argument(
        "--repeats", type=_positive_int("repeats"), default=d.repeats, help="timed repeats of each workbench row"
    )
    parser.add_argument(
        "--reference-repeats",
        type=_positive_int("reference repeats"),
        default=d.reference_repeats,
        help="timed repeats of each reference row",
    )
    parser.add_argument("--device", type=_device, default=d.device)
    parser.add_argument("--threads", type=_positive_int("threads"), default=None, help="torch threads (default: all)")
    parser.add_argument("--train-examples", type=_positive_int("training examples"), default=None)
    parser.add_argument("--inference-examples", type=_positive_int("inference examples"), default=d.inference_examples)
    parser.add_argument("--no-reference", action="store_true", help="skip the seed-pipeline reference rows")
    parser.add_argument("--full-epoch", action="store_true", help="time whole epochs instead of extrapolating")
    parser.add_argument("--in-process", action="store_true", help="measure every row in this process")
    parser.add_argument("--no-cuda-graph", action="store_true", help="CUDA: run every training step eagerly")
    parser.add_argument(
        "--profile-steps",
        type=_positive_int("profiled steps", minimum=0),
        default=d.profile_steps,
        help="CPU: steps per row profiled for where a step goes (0: none)",
    )
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
        reference_repeats=args.reference_repeats,
        device=args.device,
        reference=not args.no_reference,
        full_epoch=args.full_epoch,
        train_examples=args.train_examples,
        inference_examples=args.inference_examples,
        isolate=not args.in_process,
        threads=args.threads,
        cuda_graph=not args.no_cuda_graph,
        profile_steps=args.profile_steps,
    ).validate()


def cmd_bench(args: argparse.Namespace) -> int:
    """``python -m bench_core bench``: print the table; Ctrl-C or SIGTERM stops and prints what was measured."""
    if args.row is not None:
        return cmd_row(args.row)
    settings = settings_from_args(args)
    for path, flag in ((args.json_path, "--json"), (args.progress_jsonl, "--progress-jsonl")):
        if path:
            check_output_file(path, flag)  # before the benchmark, not after it
    stop = threading.Event()
    stage = ["stopping the wait: nothing is measured yet"]  # what a stop does now (_in_turn moves it on)
    _install_stop_handler(stop, lambda: stage[0])  # first Ctrl-C / SIGTERM: stop after this row's current work
    progress = open(args.progress_jsonl, "a") if args.progress_jsonl else None  # noqa: SIM115 - closed below
    final = None
    setting_up = True  # until the header: the set-up's steps (a build of the C++ steps takes seconds) are shown

    def handle(event: BenchEvent) -> None:
        nonlocal final, setting_up
        if progress is not None:
            progress.write(json.dumps(event.to_dict()) + "\n")
            progress.flush()
        setting_up = setting_up and event.kind == "progress"
        if not args.quiet and (setting_up or event.kind in ("row", "header", "done")):
            print(f"[{event.fraction:4.0%}] {event.message}", file=sys.stderr)
        if event.kind == "done":
            final = event

    device = resolve_device(settings.device)
    try:
        for event in _in_turn(settings, device, stop, stage, handle):
            handle(event)
    except LockCancelledError:
        print(f"stopped while waiting for {device_word(device)}: nothing was measured", file=sys.stderr)
        return 0
    finally:
        if progress is not None:
            progress.close()
    print(format_table(final.header, final.rows, final.targets))
    if final.stopped:
        print("stopped early: only the rows above were measured", file=sys.stderr)
    if args.json_path:
        out = {"header": final.header, "rows": final.rows, "targets": final.targets, "stopped": final.stopped}
        write_output_file(args.json_path, json.dumps(out, indent=2), "--json")
    return 0


def _in_turn(
    settings: BenchSettings,
    device: torch.device,
    stop: threading.Event,
    stage: list[str],
    say: Callable[[BenchEvent], None],
) -> Iterator[BenchEvent]:
    """``run_benchmark``'s events, measured while holding ``device``'s lock (``bench_core.locks``).

    Runs and benchmarks on one device take turns: what shares the cores slows both, and a
    benchmark's figures would be of the machine's load rather than of the methods. While it waits,
    ``say`` gets a progress event each time the holder or the benchmark's place changes; a stop
    while waiting raises LockCancelledError. ``stage[0]`` says what a stop does at the moment,
    for the Ctrl-C handler.
    """
    from bench_core.runner import follow_wait

    tell = lambda note: say(BenchEvent("progress", 0.0, note))  # noqa: E731
    waits = follow_wait(device, tell, waiter="benchmark", holder=lock_holder(device))
    with device_lock(device, cancel=stop, holder="a benchmark", on_poll=waits):
        stage[0] = "stopping after this row's current work: the rows measured so far are kept"
        yield from run_benchmark(settings, stop)
