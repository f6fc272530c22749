"""Speed: the benchmark of ``python -m bench_core bench``, run on this machine from the dashboard.

The benchmark runs in its own process (``python -m bench_core bench --json ... --progress-jsonl ...``),
never in this script: the page keeps that process in ``st.session_state``, reads the events
it appends to its progress file about once a second from a fragment, and draws the rows as
they come. Stop sends the process SIGTERM; it then abandons the row it is on and writes the
rows measured so far.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from bench_core import jobs
from bench_core.bench import (
    DATASET_SHAPES,
    REFERENCE_ROWS,
    ROW_LABELS,
    ROW_NAMES,
    ROWS,
    SPLIT_VS_REFERENCE,
    STEP_PARTS,
    TARGET_E,
    TIME_PARTS,
    BenchSettings,
    check_targets,
    compare_rows,
    noise_warnings,
    onednn_lines,
    repeats_text,
    step_parts,
    time_parts,
    training_steps,
    turn_rate_lines,
    turns_text,
    value_text,
)
from bench_core.devices import available_devices
from bench_core.errors import BenchError
from bench_core.store import RunStore
from pages._common import (
    BENCH_PID_FILE,
    MISSING,
    SCROLL_UP,
    benchmark_jobs,
    dataset_label,
    hms,
    latest_benchmark,
    legend_below,
    log_ticks,
    method_color,
    method_label,
    number_box,
    numbers_table,
    process_identity,
    remember_widgets,
    require_router,
    restore_widgets,
    running_benchmark,
    sharing_note,
    show,
    show_problems,
    speed_folder,
    stacked_columns,
    store_path,
    style,
    wrapping,
)

POLL_SECONDS = 2.0  # the live view (each poll re-sends its figures and table: browser CPU the benchmark shares)
JOB_KEY = "speed_job"  # the SpeedJob this session launched last, or the server's running or last one it shows
OWNER_KEY = "speed_owner"  # this session's id, kept by the jobs it starts
BUILT_KEY = "speed_built_views"  # the live view's figures and table and what they were built from
SCROLL_KEY = "speed_scroll_up"  # set by a launch: the next page run scrolls to the progress at the top
ENDED_KEY = "speed_scroll_to_end"  # set when this tab saw its benchmark end: the next page run scrolls to the outcome
# The ended benchmark's view moves under the form: at 1280x720 its "Done in" and figures were below the fold.
SCROLL_TO_OUTCOME = (
    "<script>document.querySelector('.st-key-speed-outcome')?.scrollIntoView({block: 'start'});</script>"
)
SHOWN_KEY = "speed_shown_settings"  # the folder of the benchmark (started elsewhere) whose settings the form took
P = "speed_set_"  # prefix of the settings' widget keys
SIZES = [1, 2, 3, 4, 5, 6, 8, 12, 16]
DEFAULTS = {  # a run that finishes in a couple of minutes on 2 CPU cores
    "shape": "cifar10",
    "sizes": [1, 2, 4, 8],
    "rows": [r for r in ROWS if r not in REFERENCE_ROWS],
    "reference": False,
    "steps": 20,
    "warmup": 5,
    # Every row's, reference rows too. Fewer than the command line's 9 (its targets' medians), for a run of
    # minutes; not 2: a median of two is their mean, one slow repeat moves it half-way.
    "repeats": 3,
    "batch_size": 128,
    "hidden": 128,
    "profile_steps": 20,
    "device": "auto",
}
# The form's values kept past a visit to another page: Streamlit drops the state of the widgets a page run
# does not draw, and the form came back with its defaults.
SAVED_KEY = "speed_saved_settings"
restore_widgets(SAVED_KEY, DEFAULTS, P)
DEVICES = ["auto", *available_devices()]
if st.session_state[P + "device"] not in DEVICES:
    st.session_state[P + "device"] = "auto"

ROW_DASHES = {"sequential": "dash", "split": "dot", "batchensemble": "dash"}
REFERENCE_COLOR = "#777777"
PART_COLORS = dict(zip(TIME_PARTS, ("#1b9e77", "#d95f02", "#bbbbbb"), strict=True))
FLOOR_TICK = "floor (the products at the measured rate)"
# A target met, missed, or its row not measured: Material icons, which Streamlit ships as a font, so
# they draw on machines without an emoji font (a projector's Linux box; this project's headless Chromium).
TARGET_MARKS = {
    True: ":green[:material/check_circle:]",
    False: ":red[:material/cancel:]",
    None: ":gray[:material/remove:]",
}
STEP_COLORS = dict(zip(STEP_PARTS, ("#1b9e77", "#7570b3", "#e7298a", "#e6ab02", "#999999"), strict=True))


@dataclass
class SpeedJob:
    """A benchmark process and the files it writes."""

    proc: subprocess.Popen
    folder: Path
    settings: dict
    owner: str = ""  # the session that started it (OWNER_KEY)
    started: float = field(default_factory=time.time)
    stop_requested: bool = False

    @property
    def progress_path(self) -> Path:
        return self.folder / "progress.jsonl"

    @property
    def log_path(self) -> Path:
        return self.folder / "log.txt"

    def running(self) -> bool:
        return self.proc.poll() is None

    def seconds(self) -> float:
        """How long it has run, or ran: till its last event was written, once it ended.

        ("Done in" counted to the moment of looking: seen again later, a 2-minute benchmark was
        "done in" an hour.)
        """
        end = time.time()
        if not self.running():
            with contextlib.suppress(OSError):
                end = min(end, self.progress_path.stat().st_mtime)
        return max(0.0, end - self.started)

    def events(self) -> list[dict]:
        """The events written so far (a line still being written is skipped)."""
        try:
            text = self.progress_path.read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out

    def error(self) -> str | None:
        """The one-line reason the process failed, or None."""
        if self.running() or self.proc.returncode == 0:
            return None
        try:
            lines = [line.strip() for line in self.log_path.read_text().splitlines() if line.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else f"the benchmark ended with status {self.proc.returncode}"


def has_results(job: SpeedJob) -> bool:
    """Whether a benchmark ended well with at least one row to show."""
    return not job.running() and job.error() is None and any(e.get("kind") == "row" for e in job.events())


def when(started: float) -> str:
    """When a benchmark started: "at 14:02" today, "on 26 Nov at 14:02" before (a server keeps its last folders)."""
    then = time.localtime(started)
    same_day = time.strftime("%Y-%m-%d", then) == time.strftime("%Y-%m-%d")
    return time.strftime("at %H:%M" if same_day else "on %d %b at %H:%M", then)


def form_values(settings: dict) -> dict:
    """The settings' widget values (keys of DEFAULTS) of a benchmark's ``BenchSettings.to_dict()``.

    Values the form cannot show (a size it does not offer, a device this machine lacks) fall back
    to the form's defaults; settings it does not have (depth, threads) are left out.
    """
    rows = [r for r in settings.get("rows") or () if r in ROWS]
    values = {
        "shape": settings.get("dataset_shape"),
        "sizes": [e for e in settings.get("ensemble_sizes") or () if e in SIZES],
        "rows": [r for r in rows if r not in REFERENCE_ROWS],
        "reference": bool(settings.get("reference")) and any(r in REFERENCE_ROWS for r in rows),
        **{name: settings.get(name) for name in NUMBERS},
        "device": settings.get("device"),
    }
    if values["shape"] not in DATASET_SHAPES:
        values["shape"] = DEFAULTS["shape"]
    if values["device"] not in DEVICES:
        values["device"] = "auto"
    for name in NUMBERS:
        if isinstance(values[name], bool) or not isinstance(values[name], int):
            values[name] = DEFAULTS[name]
    return values


def saved_benchmark(data: bytes) -> tuple[dict, list[dict], list[dict] | None]:
    """(header, rows, targets) of a ``bench --json`` file; ValueError where its shape is another."""
    saved = json.loads(data)
    if not isinstance(saved, dict):
        raise ValueError("the file holds no JSON object")
    header, rows, targets = saved["header"], saved["rows"], saved.get("targets")
    if not isinstance(header, dict) or not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("its header is not an object or its rows are not a list of objects")
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, dict) for t in targets)):
        raise ValueError("its targets are not a list of objects")
    return header, rows, targets


# The timing settings' boxes: label, range (pages._common.number_box), extra arguments (an int step on
# each makes it a box of whole numbers: pages._common.whole_box).
NUMBERS = {
    "steps": ("Timed steps", (1, 10_000), {"step": 1}),
    "warmup": ("Warm-up steps", (0, 10_000), {"step": 1}),
    "repeats": ("Repeats (median)", (1, 20), {"step": 1}),
    "batch_size": ("Batch size", (1, 65_536), {"step": 16}),
    "hidden": ("Hidden width", (1, 4096), {"step": 16}),
    "profile_steps": (
        "Profiled steps",
        (0, 10_000),
        {"step": 1, "help": "CPU: steps of each row run under torch.profiler for where a step goes (0: none)."},
    ),
}


def settings_widgets(locked: bool) -> tuple[BenchSettings | None, list[str]]:
    """Draw the settings (disabled while ``locked``).

    Returns the BenchSettings they describe (None where a number is out of its range) and one line
    for each number out of its range.
    """
    top = st.columns([1, 1.6, 0.8])
    top[0].selectbox("Dataset shape", list(DATASET_SHAPES), key=P + "shape", format_func=dataset_label, disabled=locked)
    # Pills, all sizes in view: at 1024 px the multiselect's fourth chip scrolled out of its box.
    top[1].pills("Ensemble sizes E", SIZES, selection_mode="multi", key=P + "sizes", disabled=locked, **wrapping())
    top[2].selectbox("Device", DEVICES, key=P + "device", disabled=locked)
    st.multiselect(
        "Rows",
        [r for r in ROWS if r not in REFERENCE_ROWS],
        key=P + "rows",
        format_func=ROW_NAMES.get,
        disabled=locked,
        help="classic sequential: E MLPs one after another. vectorized: all E in one batched pass. "
        "BatchEnsemble repeat: every member sees every example; split: each member 1/E of each batch.",
    )
    st.checkbox(
        "Also time the seed notebook's pipeline (reference rows: per-image transforms, DataLoader with 2 workers)",
        key=P + "reference",
        disabled=locked,
        help="Slow: it shows how much faster the workbench's training loop is than the seed's.",
    )
    with st.expander("Timing settings"):
        c = st.columns(3)  # six columns at 1024 px wrapped some labels and not others: the boxes out of line
        problems = [
            number_box(c[i % 3], label, bounds, key=P + name, disabled=locked, **extra)
            for i, (name, (label, bounds, extra)) in enumerate(NUMBERS.items())
        ]
    problems = [p for p in problems if p]
    if problems:
        return None, problems
    s = {name: st.session_state[P + name] for name in DEFAULTS}
    rows = [r for r in ROWS if r in s["rows"]] + (list(REFERENCE_ROWS) if s["reference"] else [])
    return BenchSettings(
        dataset_shape=s["shape"],
        ensemble_sizes=tuple(sorted(s["sizes"])),
        rows=tuple(rows),
        batch_size=int(s["batch_size"]),
        hidden=int(s["hidden"]),
        steps=int(s["steps"]),
        warmup=int(s["warmup"]),
        repeats=int(s["repeats"]),
        reference_repeats=int(s["repeats"]),
        profile_steps=int(s["profile_steps"]),
        device=s["device"],
        reference=bool(s["reference"]),
    ), []


def command(settings: BenchSettings, folder: Path) -> list[str]:
    """The ``python -m bench_core bench`` command line of ``settings``."""
    return [
        sys.executable,
        "-m",
        "bench_core",
        "bench",
        *("--dataset-shape", settings.dataset_shape),
        *("--ensemble-sizes", ",".join(str(e) for e in settings.ensemble_sizes)),
        *("--methods", ",".join(settings.rows)),
        *("--batch-size", str(settings.batch_size), "--hidden", str(settings.hidden)),
        *("--steps", str(settings.steps), "--warmup", str(settings.warmup), "--repeats", str(settings.repeats)),
        *("--reference-repeats", str(settings.reference_repeats)),
        *("--device", settings.device, "--profile-steps", str(settings.profile_steps)),
        *([] if settings.reference else ["--no-reference"]),
        *("--json", str(folder / "bench.json"), "--progress-jsonl", str(folder / "progress.jsonl"), "--quiet"),
    ]


def launch(settings: BenchSettings) -> None:
    """Check the settings and start the benchmark process; a bad setting is one st.error line."""
    try:
        settings.validate()
    except BenchError as err:
        # In the form's words where the form can say it (validate's are the command line's).
        if not settings.ensemble_sizes:
            message = "Choose at least one ensemble size under Ensemble sizes E."
        elif not any(r not in REFERENCE_ROWS for r in settings.rows) and not settings.reference:
            message = "Choose at least one row under Rows, or tick the seed notebook's pipeline."
        else:
            message = str(err)[:1].upper() + str(err)[1:]
        st.error(message, icon=":material/error:")
        return

    def start() -> SpeedJob:
        folder = speed_folder()
        with open(folder / "log.txt", "wb") as log:
            proc = subprocess.Popen(
                command(settings, folder),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=jobs.worker_env(),
                start_new_session=True,
            )
        try:  # a later server's sweep leaves the folder while its benchmark runs
            (folder / BENCH_PID_FILE).write_text(process_identity(proc.pid))
        except OSError:
            proc.terminate()  # not registered yet: nothing could see or stop it
            raise
        return SpeedJob(proc, folder, settings.to_dict(), owner=st.session_state[OWNER_KEY])

    try:
        job, busy = benchmark_jobs().start(start)  # one at a time on the server: two clicks at once start one
    except OSError as err:  # the temp folder full or not writable
        st.error(f"The benchmark could not start: {err}", icon=":material/error:")
        return
    st.session_state[JOB_KEY] = job or busy
    st.session_state[SCROLL_KEY] = True
    st.rerun()  # draw the settings locked, and the running benchmark above them


# ----------------------------------------------------------------------------- figures


def _row_style(name: str) -> tuple[str, str]:
    method, mode = ROW_LABELS[name]
    color = REFERENCE_COLOR if method == "reference" else method_color(method)
    return color, ROW_DASHES.get(mode, "solid")


def by_ensemble_size_figure(rows: list[dict], key: str, title: str, y_title: str, log_y: bool = False) -> go.Figure:
    """One line per row kind of ``row[key]`` against the ensemble size E."""
    fig = go.Figure()
    for name in ROWS:
        mine = sorted((r for r in rows if r["name"] == name), key=lambda r: r["ensemble_size"])
        if not mine:
            continue
        color, dash = _row_style(name)
        fig.add_trace(
            go.Scatter(
                x=[r["ensemble_size"] for r in mine],
                y=[r[key] for r in mine],
                mode="lines+markers",
                line={"color": color, "dash": dash, "width": 3},
                marker={"size": 10},
                name=ROW_NAMES[name],
            )
        )
    if key == "epoch_seconds":
        floors = sorted(
            {r["ensemble_size"]: r["floor_seconds"] for r in rows if r["name"] == "classic-vectorized"}.items()
        )
        if floors:
            fig.add_trace(
                go.Scatter(
                    x=[e for e, _ in floors],
                    y=[f for _, f in floors],
                    mode="lines+markers",  # a dash at each E: a run of one size has no line to draw
                    line={"color": "#222222", "dash": "dot", "width": 2},
                    marker={"symbol": "line-ew-open", "size": 16, "line": {"width": 2, "color": "#222222"}},
                    # Short: at its old length ("floor (matmul FLOPs / rate), repeat batching") Plotly
                    # gave every entry of the legend a row of its own, and the caption says what it is.
                    name="floor, repeat batching",
                )
            )
    # The legend under the plot takes a row per entry in a half-width column: the figure grows with it,
    # so that the plot keeps its height (with 8 entries in 420 px it kept about 150).
    style(fig, title, "ensemble size E", y_title, height=380)
    legend_below(fig, len(fig.data))
    fig.update_xaxes(tickvals=sorted({r["ensemble_size"] for r in rows}))
    fig.update_yaxes(type="log" if log_y else "linear", rangemode="tozero")
    if log_y:  # Plotly's own log ticks label 0.5 as "5"; these read as numbers
        values = [y for trace in fig.data for y in trace.y if isinstance(y, (int, float)) and y > 0]
        ticks = log_ticks(values)
        fig.update_yaxes(tickvals=ticks, tickformat="~g")
        if ticks:  # from tick to tick: in Plotly's own range the last tick under the points was 2, the points at 3.9
            fig.update_yaxes(range=[math.log10(ticks[0]), math.log10(ticks[-1])])
            fig.update_traces(cliponaxis=False)  # a point on the top tick: whole
    return fig


def largest_e_parts(rows: list[dict], parts_of) -> tuple[int, list[dict], list[str], list[dict]]:
    """The rows of the largest E measured that ``parts_of(row)`` splits (not None), in ``ROWS`` order.

    Returns (that E, the rows, their bar labels "<row> · <epoch> s", their parts); the two
    where-it-goes figures draw one bar per row from these.
    """
    size = max(r["ensemble_size"] for r in rows)
    split = ((r, parts_of(r)) for r in rows if r["ensemble_size"] == size)
    drawn = sorted(((r, p) for r, p in split if p is not None), key=lambda rp: ROWS.index(rp[0]["name"]))
    mine = [r for r, _ in drawn]
    labels = [f"{ROW_NAMES[r['name']]} · {r['epoch_seconds']:.3g} s" for r in mine]
    return size, mine, labels, [p for _, p in drawn]


def time_parts_figure(rows: list[dict]) -> go.Figure:
    """Where an epoch goes, as shares of it, for every row of the largest ensemble size measured."""
    size, mine, labels, parts = largest_e_parts(rows, time_parts)
    fig = go.Figure()
    for part in TIME_PARTS:
        seconds = [p[part] for p in parts]
        if part == TIME_PARTS[1] and not any(seconds):
            continue  # no reference rows: no workers
        fig.add_trace(
            go.Bar(
                y=labels,
                x=[100 * s / r["epoch_seconds"] for s, r in zip(seconds, mine, strict=True)],
                customdata=seconds,
                orientation="h",
                name=part,
                marker={"color": PART_COLORS[part]},
                hovertemplate="%{y}: %{customdata:.3g} s (%{x:.0f} %)<extra>" + part + "</extra>",
            )
        )
    style(fig, f"Where an epoch goes, E = {size}", "% of the epoch", None, height=120 + 48 * len(mine))
    fig.update_layout(barmode="stack")
    legend_below(fig, len(fig.data))
    fig.update_xaxes(range=[0, 100])
    fig.update_yaxes(autorange="reversed")
    return fig


def step_parts_figure(rows: list[dict]) -> go.Figure | None:
    """Where a step goes by operator kind, in seconds per epoch, for the profiled rows of the largest E.

    One stacked bar per row (``bench.step_parts``), and a tick at each row's floor, so that the
    matrix products' part reads against what they would take at the measured rate. None when no
    row of that size was profiled (GPU runs, files written before profiling, ``--profile-steps 0``).
    """
    size, mine, labels, parts = largest_e_parts(rows, step_parts)
    if not mine:
        return None
    fig = go.Figure()
    for part in STEP_PARTS:
        seconds = [p[part] for p in parts]
        fig.add_trace(
            go.Bar(
                y=labels,
                x=seconds,
                customdata=[100 * s / r["epoch_seconds"] for s, r in zip(seconds, mine, strict=True)],
                orientation="h",
                name=part,
                marker={"color": STEP_COLORS[part]},
                hovertemplate="%{y}: %{x:.3g} s (%{customdata:.0f} %)<extra>" + part + "</extra>",
            )
        )
    for i, r in enumerate(mine):  # the floor: a tick across the row's bar (a shape scales with the bar)
        floor = r["floor_seconds"]
        fig.add_shape(type="line", x0=floor, x1=floor, y0=i - 0.45, y1=i + 0.45, line={"color": "#111111", "width": 4})
    fig.add_trace(  # the ticks' legend entry
        go.Scatter(x=[None], y=[None], mode="lines", line={"color": "#111111", "width": 4}, name=FLOOR_TICK)
    )
    style(fig, f"Where a training step goes, E = {size}", "seconds per epoch", None, height=130 + 56 * len(mine))
    fig.update_layout(barmode="stack")
    legend_below(fig, len(fig.data))
    fig.update_xaxes(rangemode="tozero")
    fig.update_yaxes(autorange="reversed")
    return fig


def table_rows(rows: list[dict]) -> list[dict]:
    """The benchmark's rows as the table shows them; without reference rows, no column for them."""

    def ratio(value):
        return None if value is None else round(value, 2)

    table = [
        {
            "method": method_label(r["method"]),  # the pages' spelling: BatchEnsemble
            "mode": method_label(r["mode"]),  # a reference row's mode names its method
            "E": r["ensemble_size"],
            "s / epoch": float(f"{r['epoch_seconds']:.3g}"),  # 3 digits, as the command line prints it
            "× floor": round(r["x_floor"], 2),
            "× classic vectorized": ratio(r.get("x_classic_vectorized")),
            "× faster than reference": ratio(r.get("speedup_over_reference")),
            "inference examples / s": round(r["inference_examples_per_second"]),
            "parameters": r["params"],
            "peak MiB": None if r.get("peak_mib") is None else round(r["peak_mib"], 1),
        }
        for r in rows
    ]
    if all(t["× faster than reference"] is None for t in table):
        for t in table:
            del t["× faster than reference"]
    return table


def _sentence(text: str) -> str:
    """A header or warning line of the benchmark ("the matmul rate changed ...") as a sentence on the page."""
    return text[0].upper() + text[1:] + "."


def results_view(
    header: dict | None,
    rows: list[dict],
    targets: list[dict] | None = None,
    key: str = "live",
    signature: tuple | None = None,
) -> None:
    """Plots, table and targets of (possibly partial) results; ``key`` tells two views on one page apart.

    ``signature``: what identifies ``rows`` (the live view: the job and its number of rows); with
    it the figures and the table are built once and re-sent from the session until it changes.
    """
    if header:
        settings = header.get("settings") or {}
        st.caption(
            f"{header.get('cpu', '?')} · torch {header.get('torch', '?')} · {header.get('threads', '?')} threads · "
            f"device {header.get('device', '?')} · matmul rate (torch.mm) "
            f"{header.get('matmul_flops_per_second', 0) / 1e9:.1f} GFLOP/s · s/epoch {header.get('epochs', '')}"
            + (repeats_text(settings, rows) if isinstance(settings.get("repeats"), int) else "")
        )
        for line in onednn_lines(header):
            st.caption(line)
        for line in turn_rate_lines(rows):
            st.caption(_sentence(line))
        if header.get("products"):
            st.caption(f"First layers' products in training: {header['products']}.")
        if training_steps(header):
            st.caption(f"Training steps: {training_steps(header)}.")
    for warning in noise_warnings(header or {}, rows):
        st.warning(_sentence(warning), icon=":material/warning:")
    if not rows:
        return
    log_y = st.checkbox("Logarithmic time axis", value=True, key=f"speed_log_y_{key}")
    seconds_fig, memory_fig, parts_fig, steps_fig, table, computed_targets = built_views(rows, log_y, signature)
    cols = stacked_columns(f"speed-{key}", 2)
    with cols[0]:
        show(seconds_fig, key=f"speed_seconds_{key}")
    with cols[1]:
        show(memory_fig, key=f"speed_mem_{key}")
    shown = numbers_table(table, counts=("inference examples / s", "parameters"), exact=("method", "mode", "E"))
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        key=f"speed_table_{key}",
        placeholder=MISSING,
        # The row's name stays in view while the table scrolls sideways (at 1024 px it shows up to × floor).
        column_config={name: st.column_config.Column(pinned=True) for name in ("method", "mode", "E")},
    )
    if any(r["mode"] == "split" and r.get("× faster than reference") for r in table):
        st.caption(_sentence(SPLIT_VS_REFERENCE))
    show(parts_fig, key=f"speed_parts_{key}")
    st.caption(
        "The green part is the floor: the time the epoch's matrix products would take at the matrix-multiply "
        "rate measured at the start (a lower bound; what they take beyond it counts as everything else). "
        "Everything else: element-wise work, Adam, Python, the batches' gather and, for the seed's pipeline, "
        "its per-image transforms and the wait for its DataLoader."
    )
    if steps_fig is not None:
        show(steps_fig, key=f"speed_steps_{key}")
        st.caption(
            "Measured with `torch.profiler` over a few more steps of each row (the workbench's rows, on a CPU), "
            "as shares of a step applied to the row's timed epoch: each operator's own time, the matrix "
            "products apart from every other operator (element-wise work, sums, copies, compiled kernels); "
            "Adam with zeroing "
            "the gradients; the batch's gather by index; and the time spent outside any operator, in Python "
            "and the autograd engine. The black tick is the floor: the gap between it and the green part is "
            "what the matrix products lose to their small shapes and cold caches. On CPUs with AVX-512 the "
            "classic ensemble's first-layer weight gets Adam's step inside its gradient's kernel, so that "
            "step counts with the matrix products. Operator by operator: `python scripts/profile_step.py`."
        )
    targets = targets if targets is not None else computed_targets
    if rows and not any(r.get("ensemble_size") == TARGET_E for r in rows):
        st.caption(f"The speed targets are stated for E = {TARGET_E}: add {TARGET_E} to the sizes to check them.")
    elif any(t["value"] is not None for t in targets):
        st.markdown(f"**Targets at E = {targets[0]['ensemble_size']}**")
        for t in targets:
            if t["value"] is None:
                st.markdown(f"- {TARGET_MARKS[None]} {t['target']}: row not measured")
            else:
                value = value_text(t["value"], t.get("limit"))
                st.markdown(f"- {TARGET_MARKS[t['met']]} {t['target']}: {value}×{turns_text(t)}")


def built_views(rows: list[dict], log_y: bool, signature: tuple | None) -> tuple:
    """(seconds, memory, epoch-parts, step-parts figures, table, targets) of ``rows``, kept under ``signature``.

    Building them took the server ~55 ms per poll, CPU taken from the benchmark it shows (which
    measures speed on the same cores); while no new row comes they are re-sent as they were.
    """
    cached = st.session_state.get(BUILT_KEY)
    if signature is not None and cached is not None and cached[0] == (signature, log_y):
        return cached[1]
    rows = compare_rows(rows)
    built = (
        by_ensemble_size_figure(rows, "epoch_seconds", "Seconds per training epoch", "seconds", log_y),
        by_ensemble_size_figure(
            rows,
            "peak_mib",
            "Peak training memory"
            + ("" if any(r.get("peak_mib") is not None for r in rows) else ": not measured (rows in one process)"),
            "MiB above the data",
        ),
        time_parts_figure(rows),
        step_parts_figure(rows),
        table_rows(rows),
        check_targets(rows),
    )
    if signature is not None:
        st.session_state[BUILT_KEY] = ((signature, log_y), built)
    return built


def live_view(was_running: bool) -> None:
    """The benchmark's progress and rows so far, redrawn from its progress file on every poll."""
    job: SpeedJob = st.session_state[JOB_KEY]
    running = job.running()
    if was_running and not running:
        st.session_state[ENDED_KEY] = True
        st.rerun()  # the whole page: unlock the settings, stop polling
    events = job.events()
    header = next((e["header"] for e in events if e["kind"] == "header"), None)
    done = next((e for e in events if e["kind"] == "done"), None)
    rows = [e["row"] for e in events if e["kind"] == "row"]
    if running:
        last = events[-1] if events else {"fraction": 0.0, "message": "starting (importing torch)…"}
        head = st.columns([4, 1])
        state = "stopping…" if job.stop_requested else last["message"]
        head[0].progress(min(1.0, float(last["fraction"])), text=f"{state} · elapsed {hms(job.seconds())}")
        if head[1].button("Stop", key="speed_stop", icon=":material/stop:", disabled=job.stop_requested):
            job.proc.terminate()  # SIGTERM: the benchmark stops and writes what it measured
            job.stop_requested = True
            st.rerun(scope="fragment")
    elif (job.stop_requested and done is None) or (done is not None and done.get("stopped") and not rows):
        # stopped while it started (it ends by the signal, writing nothing), or before its first row
        st.warning("The benchmark was stopped before it measured a row.", icon=":material/stop_circle:")
    elif job.error():
        st.error(f"The benchmark failed: {job.error()}", icon=":material/error:")
    elif done is not None and done.get("stopped"):
        st.warning("The benchmark was stopped; these are the rows measured before.", icon=":material/stop_circle:")
    elif done is not None:
        st.success(f"Done in {hms(job.seconds())}.", icon=":material/check_circle:")
    results_view(header, rows, done.get("targets") if done else None, signature=(job.started, len(rows)))


require_router("pages/speed.py")
st.title("Speed")
st.caption(
    "Seconds per training epoch and peak memory of each method against the ensemble size (inference "
    "throughput in the table), measured now on this machine — the same benchmark as `python -m bench_core bench`. "
    "Epochs are extrapolated from a few timed steps; the floor is the matrix products' FLOPs at the "
    "fastest matrix-multiply rate measured at the start. On a CPU the dashboard and its browser share the cores "
    "the benchmark measures: for figures to quote, run the command line with nothing else running."
)

st.session_state.setdefault(OWNER_KEY, uuid.uuid4().hex)
job = st.session_state.get(JOB_KEY)
if job is not None and not job.running() and not job.folder.exists():  # cleared: newer benchmarks ran since
    st.session_state.pop(JOB_KEY, None)
    job = None
elsewhere = running_benchmark()  # one started in another tab, or in this one before a reload
if elsewhere is None and job is None:
    # The last one's results, ended in another tab or before a reload (a reload lost them: a class
    # shown a benchmark saw it vanish with F5); not a failure or a stop before any row, someone else's.
    last = latest_benchmark()
    elsewhere = last if last is not None and has_results(last) else None
if elsewhere is not None:
    st.session_state[JOB_KEY] = job = elsewhere
    # Its settings in the form, once per benchmark taken up (the user's edits after it stay): the form
    # had shown this tab's defaults, locked beside a running benchmark of other sizes, or under results
    # measured with other settings.
    if st.session_state.get(SHOWN_KEY) != str(job.folder):
        st.session_state[SHOWN_KEY] = str(job.folder)
        for _name, _value in form_values(job.settings).items():
            st.session_state[P + _name] = _value
if job is not None and job.owner != st.session_state[OWNER_KEY]:  # on every page run, not the first alone
    if job.running():
        st.info(
            "A benchmark started in another tab (or before this page was reloaded) is running: its progress is "
            "below, and its Stop works here too. One runs at a time: two would time each other.",
            icon=":material/sync:",
        )
    else:
        st.info(
            f"Below: the last benchmark run on this dashboard, started {when(job.started)} in another tab or "
            "before this page was reloaded.",
            icon=":material/history:",
        )
job_running = job is not None and job.running()
training = []
if store_path().exists():  # a store is made by training, not by a look at this page
    try:
        with RunStore(store_path()) as run_store:  # not open_store: a store that can't be read stops nothing here
            training = run_store.active_runs()
    except BenchError:
        pass
sharing = sharing_note(training, False, None if job_running else "a benchmark")
if sharing:
    st.warning(sharing, icon=":material/speed:")
# While a benchmark runs its progress and Stop come first, above the locked settings: below them, at
# 1280x720 neither was on the screen. Its results, once it ends, come under the form again.
live_slot = st.container()
if st.session_state.pop(SCROLL_KEY, False):
    st.html(SCROLL_UP, unsafe_allow_javascript=True)
bench_settings, problems = settings_widgets(locked=job_running)
remember_widgets(SAVED_KEY, DEFAULTS, P)
if job_running:
    st.caption("Settings are locked while the benchmark runs; stop it to change them.")
# The button and a bad setting's error line in one container: drawn as siblings, the line came and went
# between runs and moved the expander below, which Streamlit then drew anew, closed (an upload's views
# vanished into it).
with st.container():
    if not job_running:  # a running benchmark's settings are its own
        show_problems(problems)
    clicked = st.button(
        "Run benchmark", type="primary", icon=":material/play_arrow:", disabled=job_running, key="speed_start"
    )
    if clicked and bench_settings is not None:  # else nothing starts: the lines above say why
        launch(bench_settings)

with st.expander("Show results saved by the command line (`--json`)"):
    upload = st.file_uploader("bench JSON", type=["json"], key="speed_upload", label_visibility="collapsed")
    if upload is not None:
        drawn = st.empty()  # what a file drew before it failed goes: one error line, not half a view
        try:
            header, rows, targets = saved_benchmark(upload.getvalue())
            with drawn.container():
                results_view(header, rows, targets, key="upload")
        except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError, RecursionError) as err:
            drawn.empty()
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            not_bench = f"That is not a file written by `python -m bench_core bench --json`: {reason}"
            st.error(not_bench, icon=":material/error:")

ended = st.session_state.pop(ENDED_KEY, False)
if job is not None:
    with live_slot if job_running else st.container(key="speed-outcome"):
        st.divider()
        st.fragment(run_every=POLL_SECONDS if job_running else None)(live_view)(job_running)
        # Under the view: above it, its four lines put the progress and Stop low on a 720-px screen.
        args = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(job.proc.args))
        st.caption(f"Command: `{args}`")
    if ended and not job_running:
        st.html(SCROLL_TO_OUTCOME, unsafe_allow_javascript=True)
