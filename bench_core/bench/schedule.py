"""The whole benchmark: the rows of one ensemble size take turns, each in its own process or thread."""

from __future__ import annotations

import json
import math
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from bench_core import manual, native
from bench_core import onednn as onednn_module
from bench_core.bench.flops import gemm_rate, onednn_gemm_rate
from bench_core.bench.measure import RowStoppedError, measure_row
from bench_core.bench.results import check_targets, compare_rows, derive_row, floor_by_onednn, floor_rate
from bench_core.bench.settings import (
    MATMUL_SIZE,
    ROW_NAMES,
    TURN_RATE_REPEATS,
    BenchEvent,
    BenchSettings,
    RowSpec,
    steps_text,
)
from bench_core.devices import cpuinfo_field, resolve_device
from bench_core.errors import BenchError, ConfigError

# The rows whose floor's rate is measured again beside each timed turn: the row the floor targets check.
# On a shared machine the speed moves for tens of seconds at a time, and the 2048³ rate with it (on
# this project's Intel Xeon 15 % lower in slow stretches, while a classic step took 27 % longer), so
# a rate measured only at the start can fall in another stretch than the row's turns.
PAIRED_FLOOR_ROWS = ("classic-vectorized",)


def turn_rate(header: dict, device: torch.device) -> float:
    """The floor's 2048³ rate measured now, through the library whose rate set the header's floor."""
    n = MATMUL_SIZE
    if floor_by_onednn(header):
        rate = onednn_gemm_rate(n, n, n, warmup=1, repeats=TURN_RATE_REPEATS)
        if rate is not None:
            return rate
    return gemm_rate(n, n, n, device, warmup=1, repeats=TURN_RATE_REPEATS)


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
    onednn = onednn_gemm_rate(MATMUL_SIZE, MATMUL_SIZE, MATMUL_SIZE) if device.type == "cpu" else None
    model_rates = {
        str(e): _first_layer_rates(e, in_dim, settings.hidden, settings.batch_size, device)
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
        # The same product through oneDNN (the first layer's forward on a CPU but an Intel one; None if absent).
        "onednn_matmul_flops_per_second": onednn,
        # The floor's rate: the faster of the two, a bound the hardware reached (training uses one or both).
        "floor_flops_per_second": max(rate, onednn or 0.0),
        # Which library takes the first layers' products in training on this CPU (bench_core.onednn).
        "products": onednn_module.describe() if device.type == "cpu" else None,
        "model_gemm_flops_per_second": model_rates,
        "dataset_shape": list(shape),
        "train_examples": n_train,
        "settings": settings.to_dict(),
        "epochs": _epochs_text(settings),
        # Untimed steps at the start of each timed repeat of a workbench row (measure._measure_workbench).
        "rewarm_steps": settings.rewarm_steps(),
        "floor": "matrix-product FLOPs of an epoch / the faster 2048³ matmul rate (torch.mm's or oneDNN's); "
        "element-wise work not counted",
        "memory": "peak of training above the row's data: "
        + ("cuda max_memory_allocated" if device.type == "cuda" else "RSS"),
        "steps": (
            ("each full-batch step replayed as one CUDA graph" if settings.cuda_graph else "eager (no CUDA graphs)")
            if device.type == "cuda"
            else manual.describe_cpu_steps()
        ),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _epochs_text(settings: BenchSettings) -> str:
    """How an epoch's seconds were timed, in words: "extrapolated from 60 timed steps after 10 warm-up steps; ..."."""
    rewarm = settings.rewarm_steps()
    each = steps_text(rewarm, "untimed")
    if settings.full_epoch:
        return "timed whole epochs" + (f"; each starts with {each}" if rewarm else "")
    text = f"extrapolated from {steps_text(settings.steps, 'timed')}"
    if rewarm:
        text += f" after {steps_text(settings.warmup, 'warm-up')}; each repeat starts with {each} more"
    return text


def _first_layer_rates(e: int, in_dim: int, h: int, bs: int, device: torch.device) -> dict:
    """FLOP/s of the first layer's products at E = ``e``, shaped as the models compute them."""
    from bench_core.training import examples_per_step

    rows = examples_per_step(bs, e, "split")  # a split step's B' = B // E · E examples
    # torch.mm's forward as the models lay it out (bench_core.models._members_product): z = x W
    # [B, E·h] on Intel CPUs (onednn.mkl_plain_layout), zᵀ = Wᵀ xᵀ [E·h, B] elsewhere.
    plain = device.type == "cpu" and onednn_module.mkl_plain_layout()
    return {
        "forward": gemm_rate(bs, in_dim, e * h, device) if plain else gemm_rate(e * h, in_dim, bs, device),
        "forward_shape": "B×in @ in×E·h" if plain else "E·h×in @ in×B",
        "weight_grad": gemm_rate(in_dim, bs, e * h, device),  # xᵀ dz [in, E·h]
        # BatchEnsemble split batching: one member-width product over the step's examples, three
        # of them as autograd computes them (x∘r W, (x∘r)ᵀ dz, and dz Wᵀ for r's gradient; the CPU
        # steps' kernel, bench_core::first_layer_grads, does the last two in one pass).
        "split": {
            "forward": gemm_rate(rows, in_dim, h, device),
            "weight_grad": gemm_rate(in_dim, rows, h, device),
            "input_grad": gemm_rate(rows, h, in_dim, device),
        },
    }


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    model = cpuinfo_field("model name")
    return model if model is not None else platform.processor() or platform.machine()


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
    if resolve_device(settings.device).type == "cpu" and not native.is_ready():
        yield BenchEvent("progress", 0.0, native.BUILDING_NOTE)
        native.warm_up()  # here, once, rather than in the first row's process
    yield BenchEvent("progress", 0.0, "measuring the matrix-multiply rate")
    header = machine_header(settings)
    yield BenchEvent("header", 0.0, "matmul rate measured", header=header)
    weights = {spec: _row_weight(spec) for spec in specs}
    total = sum(weights.values())
    progress = dict.fromkeys(specs, 0.0)  # each row's own fraction done

    def overall() -> float:
        return sum(weights[k] * f for k, f in progress.items()) / total

    rows: list[dict] = []
    device = resolve_device(settings.device)
    turn_rates: dict[RowSpec, list[float]] = {}  # the floor's rate beside each timed turn of a paired row
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
                    # A paired row's timed turn: the faster of the rates just before and just after it.
                    paired = spec.name in PAIRED_FLOOR_ROWS and runner.timed_next()
                    if paired:
                        yield BenchEvent(
                            "progress", overall(), f"{_row_label(spec)}: measuring the matrix-multiply rate"
                        )
                        before = turn_rate(header, device)
                    for fraction, message in runner.advance():
                        progress[spec] = fraction
                        yield BenchEvent("progress", overall(), f"{_row_label(spec)}: {message}")
                    if runner.stopped:
                        stopped = True
                        break
                    if paired and not runner.done:
                        turn_rates.setdefault(spec, []).append(max(before, turn_rate(header, device)))
        finally:
            for runner in runners.values():
                runner.close()
        if stopped:
            break
        for spec, runner in runners.items():
            progress[spec] = 1.0
            raw = runner.result
            if spec in turn_rates:
                raw = {**raw, "floor_rates_by_turn": turn_rates[spec]}
            row = derive_row(raw, settings, floor_rate(header))
            rows.append(row)
            yield BenchEvent("row", overall(), f"{_row_label(spec)}: {row['epoch_seconds']:.3g} s/epoch", row=row)
    rows = compare_rows(rows)
    if not stopped:
        # Measured again to show whether the machine's speed changed during the run (other load).
        yield BenchEvent("progress", 1.0, "measuring the matrix-multiply rate again")
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
    """The row as the table and the warnings name it: "BatchEnsemble split E=2"."""
    return f"{ROW_NAMES[spec.name]} E={spec.ensemble_size}"


def _turn_groups(specs: list[RowSpec]) -> list[list[RowSpec]]:
    """The rows that take turns: those of one ensemble size (the single row with the first size)."""
    groups: dict[int, list[RowSpec]] = {}
    first = next((s.ensemble_size for s in specs if s.name != "single"), 1)
    for spec in specs:
        groups.setdefault(first if spec.name == "single" else spec.ensemble_size, []).append(spec)
    return list(groups.values())


class _Runner:
    """What both row runners share: the gate a row waits at, so that the schedule knows what comes next."""

    phase: str | None = None  # the gate it waits at ("repeat 2", "finish"; None before the first)

    def timed_next(self) -> bool:
        """Whether the next ``advance`` runs a timed repeat (it waits at a "repeat N" gate)."""
        return self.phase is not None and self.phase.startswith("repeat")


class _ThreadRow(_Runner):
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
            raise RowStoppedError

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
                self.phase = item[1]
                return
            elif item[0] == "end":
                # Rows in one process take turns, and each one's start resets the process-wide peak
                # (RSS or CUDA's) that the others are reading: no row's memory figure is its own.
                self.done, self.result = True, {**item[1], "peak_mib": None}
                return
            else:
                self.done = True
                if isinstance(item[1], RowStoppedError):
                    self.stopped = True
                    return
                raise item[1]

    def close(self) -> None:
        if self.thread is not None and not self.done:
            self.closing = True
            self.go.release()
            self.thread.join(timeout=30)


class _ProcessRow(_Runner):
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
        package_parent = str(Path(__file__).resolve().parents[2])
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
                self.phase = msg.get("phase")
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
            raise BenchError(f"the {ROW_NAMES[self.spec.name]} row (E = {self.spec.ensemble_size}) failed: {reason}")

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


def cmd_row(payload: str) -> int:
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
