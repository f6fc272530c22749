"""Helpers shared by the dashboard's pages: the run store, method colours and labels, Plotly figures.

The figure builders take plain data (records and results as the run store returns them) and
return a ``plotly.graph_objects.Figure``; they never call Streamlit, so tests can check them
directly. Every figure uses one colour per method and fonts big enough for a projector.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import functools
import inspect
import io
import json
import math
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from bench_core.config import METHODS, RunConfig
from bench_core.errors import BenchError, StoreError
from bench_core.jobs import is_waiting, status_text
from bench_core.locks import lock_name
from bench_core.models import batchensemble_params, mlp_params
from bench_core.report import FIGURES, METHOD_LABELS, derived, ratios, results_json
from bench_core.runner import train_size
from bench_core.store import ACTIVE_STATUSES, RunStore, default_store_path, identity_alive, process_identity

# Session-state keys shared by several pages.
STORE_PATH_KEY = "store_path"  # the run store's path, set once per session by app.py
LIVE_RUN_KEY = "live_run_id"  # the run this session launched last (the Train page's live view)
LAST_RUN_KEY = "last_run_id"  # the run the Results page opens by default

# One colour per method on every page (Okabe-Ito: distinguishable with colour-blindness).
METHOD_COLORS = {"classic": "#0072B2", "batchensemble": "#D55E00", "single": "#009E73"}
SINGLE_DASH = "dash"  # the single model's line beside the ensembles' solid ones
METHOD_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")

DATASET_LABELS = {"cifar10": "CIFAR-10", "fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "synthetic": "synthetic"}

# Font sizes for a projector at the back of a classroom.
TITLE_SIZE = 20
AXIS_TITLE_SIZE = 17
TICK_SIZE = 15
LEGEND_SIZE = 15
PLOT_CONFIG = {"displaylogo": False}
# After a launch the browser keeps the scroll position, which at 1280x720 is the locked form at the
# bottom, under the live view at the page's top (Train, Speed): back to the top once.
SCROLL_UP = "<script>document.querySelector('[data-testid=\"stMain\"] h1')?.scrollIntoView({block: 'start'});</script>"


# ----------------------------------------------------------------------------- labels


def method_label(method: str) -> str:
    """The name a reader sees: "classic", "BatchEnsemble", "single"."""
    return METHOD_LABELS.get(method, method)


def method_color(method: str) -> str:
    return METHOD_COLORS.get(method, "#555555")


def method_dash(method: str) -> str:
    """A method's line style on the loss and epoch charts: the single model's dashed, the ensembles' solid."""
    return SINGLE_DASH if method == "single" else "solid"


INIT_LABELS = {"normal": "normal N(1, std²)", "random_sign": "random signs ±1"}  # BatchEnsemble's r, s init


def and_list(items: list[str]) -> str:
    """Items as a sentence names them: "a", "a and b", "a, b and c" ("" for none)."""
    return ", ".join(items[:-1]) + (" and " if len(items) > 1 else "") + (items[-1] if items else "")


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def ordered_methods(methods: Iterable[str]) -> list[str]:
    """Methods in the order the config lists them (single, classic, BatchEnsemble), unknown ones last."""
    methods = list(dict.fromkeys(methods))
    known = [m for m in METHODS if m in methods]
    return known + [m for m in methods if m not in METHODS]


def run_label(run: dict) -> str:
    """One line naming a run: "#12 · synthetic · classic, BatchEnsemble · E=5 · 10 epochs · 27 Nov 14:02".

    The status only where the run did not finish ("#13 stopped · …"): with "finished" in every label
    Results' Run box cut the time off at 1024 px.
    """
    cfg = run.get("config") or {}
    data = cfg.get("data") or {}
    model = cfg.get("model") or {}
    train = cfg.get("train") or {}
    methods = ", ".join(method_label(m) for m in run.get("methods") or [])
    created = time.strftime("%d %b %H:%M", time.localtime(run.get("created") or 0))
    status = run.get("status", "?")
    epochs = train.get("epochs", "?")
    # A run of the single model alone has one member whatever E its settings hold.
    members = "" if run.get("methods") == ["single"] else f"E={model.get('ensemble_size', '?')} · "
    planned = " planned" if status in ("stopped", "interrupted", "failed") else ""  # not all of them ran
    return (
        f"#{run['id']}{'' if status == 'finished' else ' ' + status} · {dataset_label(data.get('name', '?'))} · "
        f"{methods or '—'} · {members}{epochs} epoch{'' if epochs == 1 else 's'}{planned} · {created}"
    )


def hms(seconds: float | None) -> str:
    """Seconds as "1:02:03" or "2:03"."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ----------------------------------------------------------------------------- routing

DEEP_LINK_KEY = "deep_link_page"  # a page asked for before app.py had ever run in this process
_ROUTER = {"seen": False}  # whether app.py (st.navigation) has run in this process


def mark_routed() -> None:
    """Called by app.py on every run, before its st.navigation."""
    _ROUTER["seen"] = True


def require_router(page: str) -> None:
    """Send a run that bypassed app.py through it, then on to ``page``.

    Until some session has called st.navigation, Streamlit treats the ``pages/`` folder as an
    old-style multipage app: the first request of a fresh server for ``/results`` would run
    pages/results.py alone (no wide layout, every file of pages/ in the sidebar).
    """
    if not _ROUTER["seen"] and _old_style_pages():
        st.session_state[DEEP_LINK_KEY] = (page, st.query_params.to_dict())  # ?run=2 goes on with it
        st.switch_page("app.py")


def _old_style_pages() -> bool:
    """Whether Streamlit currently runs pages/ as an old-style multipage app (its internal flag)."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without this flag: nothing to correct
        return False
    return bool(getattr(PagesManager, "uses_pages_directory", False))


# ----------------------------------------------------------------------------- the store


def store_path() -> Path:
    """The run store's path: set once per session (app.py does it), else ``default_store_path()``."""
    if STORE_PATH_KEY not in st.session_state:
        st.session_state[STORE_PATH_KEY] = str(default_store_path())
    return Path(st.session_state[STORE_PATH_KEY])


SPEED_FOLDER_PREFIX = "bench-speed-"  # then the server's pid and a dash: a Speed-page benchmark's folder
SERVER_FILE = "server.pid"  # in that folder: the server's store.process_identity (pid, start token, host)
BENCH_PID_FILE = "bench.pid"  # in that folder: the benchmark process's store.process_identity
STALE_AFTER = 3600.0  # s: a folder of the older form, without the server's pid, is left this long unchanged


def speed_folder() -> Path:
    """A new folder for a Speed-page benchmark, named after this server's pid and holding its identity."""
    folder = Path(tempfile.mkdtemp(prefix=f"{SPEED_FOLDER_PREFIX}{os.getpid()}-"))
    try:
        (folder / SERVER_FILE).write_text(process_identity(os.getpid()))
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def sweep_speed_folders(root: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the benchmark folders that servers killed before their exit left behind; return them.

    A clean exit removes its folders (``BenchmarkJobs.end_all``); a server killed with SIGKILL, or a
    machine's power cut, could not, and each left a folder in the temp folder. A folder goes when
    it is this user's (never through a symbolic link), the server that made it has ended (its
    ``server.pid``, else the pid in its name) and its benchmark (``bench.pid``) is not running; one
    of the older form, without the server's pid, when nothing in it changed for an hour. Whatever
    can't be read is left.
    """
    root = Path(root or tempfile.gettempdir())
    now = time.time() if now is None else now
    uid = getattr(os, "getuid", None)  # none on Windows, where the temp folder is the user's own
    removed = []
    try:
        folders = [f for f in root.iterdir() if f.name.startswith(SPEED_FOLDER_PREFIX)]
    except OSError:
        return removed
    for folder in folders:
        try:
            info = folder.lstat()
            if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid()):
                continue  # a link, a file, or another user's
            rest = folder.name[len(SPEED_FOLDER_PREFIX) :]
            server = rest.split("-", 1)[0] if "-" in rest else ""
            if server.isascii() and server.isdigit():  # the form with the server's pid
                mine = folder / SERVER_FILE
                if identity_alive(mine.read_text() if mine.exists() else server) is not False:
                    continue  # running, or on another host: not this server's to tell
            elif now - max([info.st_mtime] + [f.lstat().st_mtime for f in folder.iterdir()]) < STALE_AFTER:
                continue
            bench = folder / BENCH_PID_FILE
            if bench.exists() and identity_alive(bench.read_text()) is not False:
                continue
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed


class BenchmarkJobs:
    """The Speed page's benchmark processes, one registry for the whole server (every session and tab).

    A benchmark started in one tab is drawn, and can be stopped, in any other and after a reload.
    One runs at a time: ``start`` checks and registers under a lock, so two clicks at once start
    one. The folders of the last ``KEEP`` finished benchmarks stay (another tab may be showing
    one); older ones go. At the server's exit a running benchmark is ended (its process, started in
    a session of its own, would outlive its only readers) and every folder removed.
    """

    KEEP = 4

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: list = []
        atexit.register(self.end_all)
        sweep_speed_folders()  # those of servers killed before their exit

    def running(self):
        """The benchmark running now on this server, or None."""
        with self.lock:
            return self._running()

    def _running(self):  # under the lock
        return next((job for job in reversed(self.jobs) if job.running()), None)

    def latest(self):
        """The benchmark started last on this server (running or ended), or None; None too once its folder went."""
        with self.lock:
            job = self.jobs[-1] if self.jobs else None  # not an older one: it is not "the last"
        return job if job is not None and job.folder.is_dir() else None

    def start(self, make_job):
        """``make_job()`` (which starts the process) unless a benchmark runs: (job, None) or (None, the running one)."""
        with self.lock:
            busy = self._running()
            if busy is not None:
                return None, busy
            job = make_job()
            self.jobs.append(job)
            finished = [j for j in self.jobs if not j.running()]
            for old in finished[: max(0, len(finished) - self.KEEP)]:
                self.jobs.remove(old)
                shutil.rmtree(old.folder, ignore_errors=True)
            return job, None

    def end_all(self) -> None:
        with self.lock:
            for job in self.jobs:
                if job.running():
                    job.proc.terminate()
                    with contextlib.suppress(Exception):
                        job.proc.wait(timeout=10)
                shutil.rmtree(job.folder, ignore_errors=True)


@st.cache_resource(show_spinner=False)
def benchmark_jobs() -> BenchmarkJobs:
    """The server's one BenchmarkJobs."""
    return BenchmarkJobs()


def running_benchmark():
    """The benchmark running now on this server, or None."""
    return benchmark_jobs().running()


def latest_benchmark():
    """The benchmark started last on this server, running or ended (its folder still there), or None."""
    return benchmark_jobs().latest()


def sharing_note(runs: list[dict], benchmark: bool, starting: str | None = "a run") -> str | None:
    """One sentence on what else is using this machine's cores now and what it means for ``starting``, or None.

    ``runs``: the active runs other than the one in view; ``benchmark``: a Speed benchmark runs;
    ``starting``: what the page would start ("a run", "a benchmark"), None while its own is active.
    """
    parts = []
    waiting = [r for r in runs if is_waiting(r)]
    for group, doing in (([r for r in runs if r not in waiting], "training"), (waiting, "waiting for its turn")):
        if group:
            ids = ", ".join(str(r["id"]) for r in group)
            many = len(group) > 1
            doing = doing.replace("its", "their") if many else doing
            parts.append(f"run{'s' if many else ''} {ids} {'are' if many else 'is'} {doing}")
    if benchmark:
        parts.append("a Speed benchmark is running")
    if not parts:
        return None
    text = " and ".join(parts)
    if lock_name("cpu") is None:  # BENCH_CPU_LOCK=0: they share the cores
        tail = (
            "what runs at the same time shares its cores, so seconds per epoch (and a benchmark's figures) "
            "come out slower than alone."
        )
    elif starting is None:
        tail = "runs and benchmarks take turns on a device, so that each one's timings are its own."
    else:
        them = "them" if len(runs) + benchmark > 1 else "it"
        tail = (
            f"{starting} started on the CPU now waits for {them} (runs and benchmarks take turns on a device, "
            "so that each one's timings are its own)."
        )
    return f"{text[0].upper()}{text[1:]} on this machine: {tail}"


def open_store() -> RunStore:
    """Open the run store; if it can't be, say why in one line and stop the page (or fragment)."""
    try:
        return RunStore(store_path())
    except BenchError as err:
        st.error(str(err), icon=":material/error:")
        st.stop()


def run_signature(runs: list[dict], exclude: int | None = None) -> list[tuple]:
    """The runs of ``runs`` queued or training, as a page that lists them draws them: id, status, stop asked."""
    return sorted(
        (r["id"], status_text(r), bool(r.get("stop_requested")))
        for r in runs
        if r.get("status") in ACTIVE_STATUSES and r["id"] != exclude
    )


def active_signature(exclude: int | None = None) -> list[tuple]:
    """``run_signature`` of the store's active runs now; a new RunStore, as a fragment's later reruns read it."""
    with RunStore(store_path()) as store:
        return run_signature(store.active_runs(), exclude)


def rerun_when_changed(drawn: object, look: Callable[[], object], every: float = 2.0) -> None:
    """Rerun the whole page once ``look()`` answers otherwise than ``drawn``, what the page drew from.

    Polled every ``every`` seconds from a fragment that draws nothing, so only the answer changing
    costs a redraw. For what a page drew from the store about runs it does not follow live (another
    tab's, the command line's): a run there that ended, waited or was stopped stayed as drawn, with
    its buttons, until the user clicked. ``drawn`` comes from the rows the page drew (a second read
    could already see a change the page did not show); a store that can't be read counts as no
    change.
    """

    def check() -> None:
        try:
            now = look()
        except BenchError:
            return
        if now != drawn:
            st.rerun()

    st.fragment(run_every=every)(check)()


def restore_widgets(saved_key: str, defaults: dict, prefix: str = "") -> None:
    """Give each widget ``prefix + name`` its kept value, or its default, before the widgets are drawn.

    Streamlit drops the state of the widgets a page run does not draw, so a visit to another page
    brought a form back with its defaults. The widgets then take their values from the session
    (none passes a value of its own). ``remember_widgets`` keeps them at the end of each run.
    """
    for name, value in {**defaults, **st.session_state.get(saved_key, {})}.items():
        st.session_state.setdefault(prefix + name, value)


def remember_widgets(saved_key: str, defaults: dict, prefix: str = "") -> None:
    """Keep the widgets' values past this page run (a widget not drawn in it keeps its last one)."""
    saved = {**defaults, **st.session_state.get(saved_key, {})}
    st.session_state[saved_key] = {name: st.session_state.get(prefix + name, saved[name]) for name in defaults}


def whole_box(step: int = 1, **kwargs) -> dict:
    """number_input's arguments for a box of whole numbers: a float box that shows them as whole.

    Streamlit's int box reads what is typed the way JavaScript's ``parseInt`` does: ``1e3`` arrived
    as 1 and ``2.5`` as 2, with no message (streamlit/streamlit#3043), and a run trained with a
    number the user had not typed. Its float box hands over the number as typed (``parseFloat``), so
    ``out_of_range(..., whole=True)`` can name one that is not whole. ``%g`` shows 128.0 as 128 and
    every whole number up to 2⁵³ (``WHOLE_EXACT``; every range here is below it) exactly.
    """
    return {"step": float(step), "format": "%g", **kwargs}


WHOLE_EXACT = 2**53  # a float box holds every whole number up to this exactly


def whole_number(value):
    """A whole number typed in a ``whole_box`` (128.0) as the int it is (128); anything else as it is.

    Beyond ``WHOLE_EXACT`` a float stays one: 1e300 is named as 1e+300, not in 301 digits.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) <= WHOLE_EXACT:
        return int(value)
    return value


def number_box(container, label: str, bounds: tuple, *, key: str, step=None, **kwargs) -> str | None:
    """A number box that takes any number, checked against ``bounds`` here: the one-line complaint, or None.

    Given min_value and max_value, Streamlit's box keeps a number typed beyond them, in red, while the
    script goes on with the last number in range: a run trained with a width the user had not asked
    for, and nothing on the page could say so. Unbounded, the number typed reaches the script, which
    names it under the form (``out_of_range``) and refuses to start with it. An int ``step`` makes it
    a box of whole numbers (``whole_box``): read its number with ``whole_number``.
    """
    is_whole = isinstance(step, int)
    args = whole_box(step, **kwargs) if is_whole else {"step": step, **kwargs}
    container.number_input(label, key=key, **args)
    return out_of_range(label, st.session_state.get(key), *bounds, whole=is_whole)


def out_of_range(label: str, value, low, high, above: bool = False, whole: bool = False) -> str | None:
    """'Hidden width must be from 1 to 4,096, not 5,000.', 'Seed: type a number.', or None where it fits.

    ``above``: ``low`` itself is out of range ("must be above 0 and at most 1"). ``whole``: a number
    with a fraction is out too ("Hidden width must be a whole number, not 2.5.").
    """
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return f"{label}: type a number."
    if isinstance(value, float) and math.isnan(value):
        return f"{label}: type a number."
    if whole:
        if isinstance(value, float) and math.isfinite(value) and not value.is_integer():
            return f"{label} must be a whole number, not {value:g}."
        value = whole_number(value)
    if (low < value if above else low <= value) and value <= high:
        return None

    def text(v) -> str:
        return f"{v:,}" if isinstance(v, int) else f"{v:g}"

    span = f"above {text(low)} and at most {text(high)}" if above else f"from {text(low)} to {text(high)}"
    return f"{label} must be {span}, not {text(value)}."


def show_problems(problems: list[str]) -> None:
    """The form's numbers out of range, one line each, in one red box.

    (Five boxes, one each, had pushed the button off a 720-px screen.)
    """
    if problems:
        st.error("  \n".join(problems), icon=":material/error:")


def one_line_errors(func: Callable) -> Callable:
    """Run ``func``; a BenchError becomes one ``st.error`` line instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except BenchError as err:
            st.error(str(err), icon=":material/error:")
            return None

    return wrapper


def epoch_steps(cfg: RunConfig) -> int:
    """Optimizer steps per epoch of ``cfg``, as the loss points per epoch are counted (50,000 examples if unknown)."""
    return math.ceil((train_size(cfg) or 50_000) / max(1, cfg.train.batch_size))


def log_every_for(cfg: RunConfig, points_per_epoch: int) -> int:
    """The ``log_every`` that gives about ``points_per_epoch`` loss points per epoch (0: epoch records only)."""
    if points_per_epoch <= 0:
        return 0
    return max(1, epoch_steps(cfg) // points_per_epoch)


def show(fig: go.Figure, key: str | None = None) -> None:
    """Draw a figure across the column's width, with our own (projector-sized) styling."""
    st.plotly_chart(fig, width="stretch", theme=None, config=PLOT_CONFIG, key=key)


# ----------------------------------------------------------------------------- figure styling


def style(
    fig: go.Figure, title: str, x_title: str | None = None, y_title: str | None = None, height: int = 420
) -> go.Figure:
    """Projector-readable fonts, a white template and room for the title."""
    fig.update_layout(
        template="plotly_white",
        title={"text": title, "font": {"size": TITLE_SIZE}, "x": 0.0, "xanchor": "left"},
        font={"size": TICK_SIZE},
        height=height,
        margin={"l": 70, "r": 20, "t": 70, "b": 60},
        legend={"font": {"size": LEGEND_SIZE}},
        hoverlabel={"font": {"size": TICK_SIZE}},
    )
    fig.update_xaxes(tickfont={"size": TICK_SIZE}, title_font={"size": AXIS_TITLE_SIZE})
    fig.update_yaxes(tickfont={"size": TICK_SIZE}, title_font={"size": AXIS_TITLE_SIZE})
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig


LEGEND_ROW = 24  # px: a row of a legend at LEGEND_SIZE
AXIS_BLOCK = 64  # px under a plot: the x axis's tick labels and title


def legend_below(fig: go.Figure, entries: int | None = None) -> go.Figure:
    """The legend under the x axis's title, with room for one entry a row; the figure grows by that room.

    Plotly puts a horizontal legend's entries on one row where they fit and one a row where they do
    not. Placed at a fraction of the plot's height (y = -0.25), a legend that the browser window's
    resize put on fewer rows sat on the axis title (1280 to 1920 px): the margins Plotly had pushed
    for it stayed. Here the bottom margin holds the legend at its tallest, so nothing is pushed and
    the plot's height is known, and the legend's top is the axis block's height under the plot.
    """
    if entries is None:  # the traces the legend lists
        entries = sum(1 for trace in fig.data if trace.showlegend is not False and trace.name)
    if entries < 2 and fig.layout.showlegend is not True:
        return fig  # Plotly draws no legend for one entry: no room for it
    margin = fig.layout.margin  # Plotly's own margins where style() set none
    top, bottom = margin.t if margin.t is not None else 100, margin.b if margin.b is not None else 80
    room = AXIS_BLOCK + entries * LEGEND_ROW + 12
    height = (fig.layout.height or 450) + max(0, room - bottom)
    plot = max(1, height - top - room)
    fig.update_layout(
        height=height,
        margin={"b": room},
        # Plotly 5 takes y down to -2 only: a plot too short for the offset gets its legend at -2.
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": max(-2.0, -AXIS_BLOCK / plot),
                "yanchor": "top", "traceorder": "normal"},
    )  # fmt: skip
    return fig


LOG_TICKS_MAX = 9  # more 1-2-5 ticks than this crowd a chart's axis: powers of ten instead


MISSING = "—"  # a table's cell with no value (a ratio that does not apply to its row)


def numbers_table(
    table: list[dict], counts: Iterable[str] = (), exact: Iterable[str] = ()
) -> pd.io.formats.style.Styler:
    """A table of numbers as ``st.dataframe`` should show it, with counts as the command line prints them.

    ``counts``: columns shown with thousands separators and no decimals (2,055,730 parameters);
    ``exact``: shown as they are (names, whole numbers); every other column as its numbers were
    rounded (``{:g}``). The values underneath stay numbers, so the columns still sort by value. A
    missing value reads "—" where the Styler is rendered as HTML; in ``st.dataframe``'s grid pass it
    ``placeholder=MISSING`` for the same (the grid wrote a greyed "None", which reads like a value).
    """
    frame = pd.DataFrame(table)
    counts, exact = set(counts), set(exact)
    formats = {c: "{:,.0f}" if c in counts else "{:g}" for c in frame.columns if c not in exact}
    return frame.style.format(formats, na_rep=MISSING)


STACK_BELOW_PX = 1100  # browser windows narrower than this stack the columns of ``stacked_columns``
STACK_CSS = (
    f"@media (max-width: {STACK_BELOW_PX}px) {{"
    " [class*='st-key-stack-'] [data-testid='stHorizontalBlock'] { flex-wrap: wrap !important; }"
    " [class*='st-key-stack-'] [data-testid='stColumn'] { flex: 1 1 100% !important; width: 100% !important;"
    " min-width: 100% !important; } }"
)


def stacked_columns(name: str, spec) -> list:
    """``st.columns(spec)`` side by side in a wide window, one under the other below STACK_BELOW_PX.

    Streamlit stacks columns only on a phone's width; at 1024 px beside the sidebar two agreement
    matrices got 70 px each and their values ran together, and a table beside a chart was cut. The
    columns go in a container keyed ``stack-<name>``, which app.py's STACK_CSS (a media query) finds.
    """
    return st.container(key=f"stack-{name}").columns(spec)


@functools.cache
def wrapping() -> dict:
    """``st.pills``' keyword that wraps its options onto more rows, where this Streamlit takes it.

    Streamlit 1.67 keeps a column's pills on one row, scrolled sideways (at 1024 px "BatchEnsemble"
    and the larger ensemble sizes were cut). ``wrap`` came in 1.64; before it the pills are laid out
    as that Streamlit does.
    """
    return {"wrap": True} if "wrap" in inspect.signature(st.pills).parameters else {}


def log_ticks(values: list[float]) -> list[float]:
    """Ticks from just below the smallest value to just above the largest.

    1, 2, 5 times a power of ten, or the powers of ten alone where that would make more than
    ``LOG_TICKS_MAX`` ticks (a GPU run's 9 ms floor beside the seed's 19 s).
    """
    if not values:
        return []
    low, high = min(values), max(values)
    for multiples in ((1, 2, 5), (1,)):
        ticks = []
        for power in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1):
            ticks += [m * 10.0**power for m in multiples]
        below = max((t for t in ticks if t <= low), default=ticks[0])
        above = min((t for t in ticks if t >= high), default=ticks[-1])
        chosen = [float(f"{t:.3g}") for t in ticks if below <= t <= above]
        if len(chosen) <= LOG_TICKS_MAX:
            break
    return chosen


# ----------------------------------------------------------------------------- training curves


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _array(values: list) -> np.ndarray:
    """Numbers as a float array (None: NaN, a gap in the line); Plotly validates arrays far faster than lists."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _member_loss(record: dict, k: int) -> float | None:
    losses = record.get("member_loss") or []
    return _finite(losses[k]) if k < len(losses) else None


def epoch_xs(rows: list[dict]) -> list[float]:
    """Where a method's epoch records go on an epoch axis: at their epoch, a stopped one at the part it ran.

    A stop 24 of 32 steps into epoch 6 is at 5.75, not at 6 as if the epoch were whole; the part is
    its steps over a whole epoch's of the same method (where none is whole, at its epoch).
    """
    whole = max((r.get("steps") for r in rows if not r.get("stopped") and isinstance(r.get("steps"), int)), default=0)
    xs = []
    for r in rows:
        epoch, steps = r.get("epoch"), r.get("steps")
        if not isinstance(epoch, (int, float)):  # a store edited by hand: left as it is, as Plotly takes it
            xs.append(epoch)
            continue
        cut = r.get("stopped") and whole > 0 and isinstance(steps, int) and steps < whole
        xs.append(epoch - 1 + steps / whole if cut else float(epoch))
    return xs


def loss_series(records: list[dict]) -> dict[str, dict]:
    """Per method: x (fractional epoch), the members' losses and their mean, ready to plot.

    A method's step records are used when it has any (x = epoch - 1 + step / steps per epoch);
    otherwise its epoch records (x = epoch; a sequential classic ensemble logs only those).

    Returns:
        ``{method: {"x": [...], "members": [[loss of member k at each x], ...], "mean": [...]}}``.
    """
    out: dict[str, dict] = {}
    methods = ordered_methods(r.get("method") for r in records if r.get("kind") in ("epoch", "step"))
    for method in methods:
        steps = [r for r in records if r.get("kind") == "step" and r.get("method") == method]
        if steps:
            xs = [r["epoch"] - 1 + r["step"] / max(1, r.get("steps_per_epoch") or 1) for r in steps]
            chosen = steps
        else:
            chosen = [r for r in records if r.get("kind") == "epoch" and r.get("method") == method]
            xs = epoch_xs(chosen)
        n_members = max((len(r.get("member_loss") or []) for r in chosen), default=0)
        members = [[_member_loss(r, k) for r in chosen] for k in range(n_members)]
        out[method] = {"x": xs, "members": members, "mean": [_finite(r.get("loss")) for r in chosen]}
    return out


def single_last(methods: list[str]) -> list[str]:
    """``methods`` with the single model last: its dashed line drawn over the ensembles' (which hid it)."""
    return sorted(methods, key=lambda method: method == "single")


def loss_figure(records: list[dict], title: str = "Training loss: members (thin) and their mean (thick)") -> go.Figure:
    """Training loss per member (thin lines) and per method mean (thick line), all methods on one figure."""
    fig = go.Figure()
    series_of = loss_series(records)
    # The single model drawn last, dashed: with the seed it shares with the ensembles' members its
    # curve can match classic's mean, which, drawn over it, hid it. The legend keeps the methods' order.
    for method in single_last(list(series_of)):
        series = series_of[method]
        color = method_color(method)
        label = method_label(method)
        rank = 1000 + list(series_of).index(method)
        # All members in one trace, a gap (NaN) between two members: fewer traces for the browser
        # to lay out on every live redraw (12 became 4 for two methods of 5; no change in the
        # browser's CPU above the noise was measured, see the README's dashboard section).
        n_points = len(series["x"])
        fig.add_trace(
            go.Scatter(
                x=_array([*series["x"], None] * len(series["members"])),
                y=_array([v for losses in series["members"] for v in [*losses, None]]),
                customdata=np.repeat(np.arange(1, len(series["members"]) + 1), n_points + 1),
                mode="lines",
                line={"color": color, "width": 1},
                opacity=0.35,
                name=f"{label} members",
                legendgroup=method,
                showlegend=False,
                hovertemplate=f"{label} member %{{customdata}}<br>epoch %{{x:.2f}}<br>loss %{{y:.4f}}<extra></extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=_array(series["x"]),
                y=_array(series["mean"]),
                mode="lines+markers" if len(series["x"]) < 30 else "lines",
                line={"color": color, "width": 4, "dash": method_dash(method)},
                name=label if method == "single" else f"{label} (mean of members)",  # one member: no mean
                legendgroup=method,
                legendrank=rank,
                hovertemplate=f"{label}{'' if method == 'single' else ' mean'}<br>epoch %{{x:.2f}}<br>loss %{{y:.4f}}"
                "<extra></extra>",
            )
        )
    style(fig, title, "epoch", "training loss (cross-entropy)")
    legend_below(fig)
    # Both axes from zero: a cross-entropy's scale has a natural zero, and over a run's first points
    # Plotly's own range magnified the few hundredths between them, then jumped as more came.
    fig.update_xaxes(rangemode="tozero")
    fig.update_yaxes(rangemode="tozero")
    return fig


def empty_loss_figure(epochs: int) -> go.Figure:
    """The loss chart before a run: its title and axes (x up to ``epochs``) and what will appear in it."""
    fig = loss_figure([])
    fig.update_xaxes(range=[0, max(1, epochs)])
    fig.update_yaxes(range=[0, 1], showticklabels=False)
    fig.add_annotation(
        text="Press Train: every member's training loss appears here, live",
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
        showarrow=False,
        font={"size": AXIS_TITLE_SIZE, "color": "#666666"},
    )
    fig.update_layout(height=320)
    return fig


def _epoch_records(records: list[dict], method: str) -> list[dict]:
    """A method's full epochs (an epoch cut short by a stop would skew the timings)."""
    return [r for r in records if r.get("kind") == "epoch" and r.get("method") == method and not r.get("stopped")]


# An epoch record's timing figures: (key, title, y-axis title).
SECONDS_METRIC = ("epoch_seconds", "Seconds per epoch (lower is faster)", "seconds")
THROUGHPUT_METRIC = ("examples_per_second", "Examples per second (higher is faster)", "examples / s")


def epoch_metric_figure(records: list[dict], key: str, title: str, y_title: str) -> go.Figure:
    """One line per method of an epoch record's number (``epoch_seconds``, ``examples_per_second``)."""
    fig = go.Figure()
    methods = _epoch_methods(records)
    for method in single_last(methods):  # dashed and on top, as on the loss chart; the legend in order
        fig.add_trace(_epoch_metric_trace(records, method, key, legendrank=1000 + methods.index(method)))
    style(fig, title, "epoch", y_title, height=360)
    return _epoch_axes(fig, records, methods)


def _epoch_methods(records: list[dict]) -> list[str]:
    """The methods with at least one full epoch: the ones the speed charts have a point of."""
    return ordered_methods(r.get("method") for r in records if r.get("kind") == "epoch" and not r.get("stopped"))


def has_full_epoch(records: list[dict]) -> bool:
    """Whether some method ran an epoch to its end (a stop in the first epoch leaves none to time)."""
    return bool(_epoch_methods(records))


def _epoch_metric_trace(records: list[dict], method: str, key: str, **extra) -> go.Scatter:
    """A method's line of an epoch record's number against the epoch."""
    rows = _epoch_records(records, method)
    return go.Scatter(
        x=_array([r["epoch"] for r in rows]),
        y=_array([_finite(r.get(key)) for r in rows]),
        mode="lines+markers",
        line={"color": method_color(method), "width": 3, "dash": method_dash(method)},
        marker={"size": 9},
        name=method_label(method),
        **extra,
    )


def _epoch_dtick(records: list[dict], methods: list[str]) -> int | None:
    """A tick at every epoch while there are at most 20 full ones; None: Plotly's own ticks."""
    n_epochs = max((len(_epoch_records(records, m)) for m in methods), default=0)
    return 1 if n_epochs <= 20 else None


def _epoch_axes(fig: go.Figure, records: list[dict], methods: list[str]) -> go.Figure:
    """Whole epochs on x (while they are few), y from zero, the legend below."""
    fig.update_xaxes(dtick=_epoch_dtick(records, methods))
    fig.update_yaxes(rangemode="tozero")
    legend_below(fig)
    return fig


def seconds_figure(records: list[dict]) -> go.Figure:
    return epoch_metric_figure(records, *SECONDS_METRIC)


def throughput_figure(records: list[dict]) -> go.Figure:
    return epoch_metric_figure(records, *THROUGHPUT_METRIC)


def live_figure(records: list[dict]) -> go.Figure:
    """The Train page's live chart: the training loss on top, seconds per epoch and examples per second below.

    One figure for the three, because every time a live chart's figure changes Streamlit mounts a
    new Plotly chart in the browser, CPU that the training worker shares on a small machine:
    ``scripts/probe_chart_cost.py`` (headless Chromium, 1280x720) measured 140-159 ms of browser
    CPU to redraw this figure against 160-215 ms for the loss and speed figures apart.
    Before a first epoch ends it is the loss figure alone.
    """
    loss = loss_figure(records)
    methods = _epoch_methods(records)
    if not methods:
        return loss
    metrics = (SECONDS_METRIC, THROUGHPUT_METRIC)
    fig = make_subplots(
        rows=2,
        cols=2,
        specs=[[{"colspan": 2}, None], [{}, {}]],
        row_heights=[0.56, 0.44],
        vertical_spacing=0.16,
        horizontal_spacing=0.12,
        # Their note on a line of its own: side by side at 1024 px the two titles ran into each other.
        subplot_titles=["", *(title.replace(" (", "<br>(") for _, title, _ in metrics)],
    )
    for trace in loss.data:
        if trace.showlegend is not False:  # a method's mean: its legend entry stands for all its lines
            trace.name = method_label(trace.legendgroup)
        fig.add_trace(trace, row=1, col=1)
    for col, (key, _, y_title) in enumerate(metrics, start=1):
        for method in single_last(methods):
            fig.add_trace(
                _epoch_metric_trace(records, method, key, legendgroup=method, showlegend=False), row=2, col=col
            )
        fig.update_yaxes(title_text=y_title, rangemode="tozero", row=2, col=col)
    style(fig, loss.layout.title.text, "epoch", height=820)
    fig.update_yaxes(title_text=loss.layout.yaxis.title.text, row=1, col=1)
    fig.update_xaxes(rangemode="tozero", row=1, col=1)
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    fig.update_xaxes(dtick=_epoch_dtick(records, methods), row=2)
    fig.update_annotations(font={"size": AXIS_TITLE_SIZE})  # the speed panels' titles
    legend_below(fig)
    return fig


def live_chart_due(
    cached: dict | None, run_id: int, n_records: int, n_epochs: int, active: bool, now: float, min_seconds: float
) -> bool:
    """Whether the Train page rebuilds its live figure, given what the last one was built from.

    ``cached``: ``{"run", "records", "epochs", "at"}`` of the last figure (None: there is none).
    Yes for another run or a first figure; no without new records; for a run that ended, yes; while
    it trains, yes when an epoch ended since, or when ``min_seconds`` passed since the last one.
    """
    if cached is None or cached["run"] != run_id:
        return True
    if cached["records"] == n_records:
        return False
    if not active:
        return True
    return cached["epochs"] != n_epochs or now - cached["at"] >= min_seconds


def progress_of(records: list[dict], methods: list[str], epochs: int) -> tuple[float, float | None, str]:
    """How far a run's training has come: (fraction, ETA in seconds or None, "classic · epoch 2/5").

    The fraction counts finished epochs plus the part of the current one that step records show;
    the ETA extrapolates the training seconds spent so far (loading and evaluation not included):
    a method's epochs still to come at its own pace where it has begun, the methods still to begin
    at the pace of those so far (BatchEnsemble three times slower than classic had a run's ETA a
    third of what was left).
    """
    total = max(1, len(methods) * epochs)
    done = 0.0
    spent = 0.0
    where = ""
    left: list[tuple[float, float | None]] = []  # per method: epochs left, its own seconds per epoch
    for method in methods:
        mine = [r for r in records if r.get("method") == method and r.get("kind") in ("epoch", "step")]
        if not mine:
            left.append((float(epochs), None))
            continue
        full = [r for r in mine if r.get("kind") == "epoch" and not r.get("stopped")]
        last = mine[-1]
        fraction = float(len(full))
        if last.get("kind") == "step" and last.get("epoch", 0) > len(full):
            fraction += last["step"] / max(1, last.get("steps_per_epoch") or 1)
        fraction = min(fraction, epochs)
        elapsed = float(last.get("elapsed_seconds") or 0.0)
        done += fraction
        spent += elapsed
        left.append((epochs - fraction, elapsed / fraction if fraction > 0 else None))
        current = min(epochs, len(full) + (1 if len(full) < epochs else 0))
        where = f"{method_label(method)} · epoch {current}/{epochs}"
    eta = None
    if done > 0:
        pace = spent / done
        eta = sum(n * (own if own is not None else pace) for n, own in left)
    return min(1.0, done / total), eta, where


# ----------------------------------------------------------------------------- results


def _accuracy_title(method: str, result: dict, stacked: bool = False) -> str:
    """The method, then its ensemble's and mean member's accuracy: on one line, or on two (``stacked``)."""
    ens, mean = _finite(result.get("ensemble_accuracy")), _finite(result.get("mean_member_accuracy"))
    parts = [f"ensemble {ens:.3f}"] if ens is not None else []
    if mean is not None and len(result.get("member_accuracy") or []) > 1:
        parts.append(f"mean member {mean:.3f}")
    return f"<b>{method_label(method)}</b><br>{('<br>' if stacked else ' · ').join(parts)}"


def member_accuracy_figure(results: dict[str, dict]) -> go.Figure:
    """Each method's members' test accuracy as bars, side by side, with the ensemble's accuracy marked."""
    methods = ordered_methods(results)
    # Two or three panels: the two figures on lines of their own (side by side they overlapped, with
    # three panels at 1280 px and with two at 1024).
    stacked = len(methods) > 1
    fig = make_subplots(
        rows=1,
        cols=max(1, len(methods)),
        shared_yaxes=True,
        subplot_titles=[_accuracy_title(m, results[m], stacked) for m in methods],
        horizontal_spacing=0.06,
    )
    values: list[float] = []
    for col, method in enumerate(methods, start=1):
        result = results[method]
        accs = [_finite(a) for a in result.get("member_accuracy") or []]
        ens = _finite(result.get("ensemble_accuracy"))
        mean = _finite(result.get("mean_member_accuracy"))
        values += [a for a in accs if a is not None] + [v for v in (ens, mean) if v is not None]
        members = [f"{k + 1}" for k in range(len(accs))]
        fig.add_trace(
            go.Bar(
                x=members,
                y=accs,
                marker={"color": method_color(method)},
                name=method_label(method),
                text=[f"{a:.3f}" if a is not None else "" for a in accs],
                textposition="inside" if len(accs) <= 8 else "none",
                # Level, or not at all (uniformtext below): turned on their side to fit the narrow bars
                # of 8 members at 1024 px they were a few pixels tall.
                textangle=0,
                textfont={"size": TICK_SIZE, "color": "white"},
                hovertemplate=f"{method_label(method)} member %{{x}}<br>accuracy %{{y:.4f}}<extra></extra>",
                showlegend=False,
            ),
            row=1,
            col=col,
        )
        # The two lines behind the bars: drawn over them, they crossed the figures of members near
        # the mean; behind they show in the gaps. ("between", the grid and the bars, hid them in
        # Streamlit's Plotly.js, in subplots.) No label on the line: the panel's title gives its
        # figure, the figure's title says which line is which, and a label at the line's end sat
        # on the top of any member's bar taller than the ensemble.
        if ens is not None:
            fig.add_hline(y=ens, line={"color": "#222222", "width": 3, "dash": "dash"}, layer="below", row=1, col=col)
        if mean is not None and len(accs) > 1:
            fig.add_hline(y=mean, line={"color": "#666666", "width": 2, "dash": "dot"}, layer="below", row=1, col=col)
        # Every member's tick: by its own choice Plotly labelled only 1, 3, 5, 7 of eight.
        fig.update_xaxes(title_text="member", row=1, col=col, type="category", tickmode="array", tickvals=members)
    key = f"<br><span style='font-size:{AXIS_TITLE_SIZE}px'>dashed: the ensemble · dotted: the mean member</span>"
    style(fig, f"Test accuracy of each member{key}", height=520)  # the key on its own line: cut off at 1024 px
    fig.update_layout(uniformtext={"minsize": TICK_SIZE - 2, "mode": "hide"})  # a figure too small to read: none
    # The title's two lines at the top, the panels' titles (three lines where stacked) below them.
    fig.update_layout(margin={"t": 190 if stacked else 150}, title={"y": 0.96, "yanchor": "top", "yref": "container"})
    titles = {_accuracy_title(m, results[m], stacked) for m in methods}
    # Three panels' titles at the tick labels' size: at the axis titles' they ran into each other at
    # 1024 px ("mean member 0.810mean member 0.763").
    for ann in fig.layout.annotations:
        if ann.text in titles:
            ann.font = {"size": TICK_SIZE if len(methods) > 2 else AXIS_TITLE_SIZE}
    fig.update_yaxes(title_text="test accuracy", row=1, col=1)
    if values:
        lo, hi = min(values), max(values)
        pad = max(0.02, (hi - lo) * 0.3)
        # Zoomed in: members differ by a few points of accuracy, which a 0..1 axis would hide.
        fig.update_yaxes(range=[max(0.0, lo - pad), min(1.0, hi + pad)], row=1, col=1)
        fig.update_yaxes(title_text="test accuracy (axis zoomed)", row=1, col=1)
    return fig


MAX_CELL_TEXT = 6  # members up to which the agreement matrix writes its values in the cells


def agreement_floor(results: dict[str, dict]) -> float:
    """The low end of the agreement matrices' shared colour scale.

    The lowest agreement of two members in any of ``results``' methods, down to a multiple of
    0.05, at most 0.95 (0 where no method has two members). On a 0..1 scale, members that agree
    on 93-97 % of the examples were one yellow, and beyond ``MAX_CELL_TEXT`` members, with no
    values in the cells, the matrix showed nothing.
    """
    lows = []
    for result in results.values():
        matrix = result.get("agreement") or []
        off = [_finite(v) for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j]
        lows += [v for v in off if v is not None]
    if not lows:
        return 0.0
    return max(0.0, min(0.95, math.floor(min(lows) * 20 + 1e-9) / 20))


def agreement_figure(result: dict, method: str, zmin: float = 0.0) -> go.Figure:
    """The E x E agreement matrix of a method as an annotated heatmap, its colours from ``zmin`` to 1.

    Give the matrices shown side by side one ``zmin`` (``agreement_floor``), so that a colour means
    one agreement in all of them.
    """
    matrix = result.get("agreement") or [[1.0]]
    n = len(matrix)
    labels = [str(k + 1) for k in range(n)]
    fig = px.imshow(
        matrix,
        x=labels,
        y=labels,
        zmin=zmin,
        zmax=1,
        # Values in the cells up to E = MAX_CELL_TEXT; beyond, at 1280 px they ran into each other:
        # the colour and the hover say it.
        text_auto=".2f" if n <= MAX_CELL_TEXT else False,
        color_continuous_scale="Viridis",
        labels={"x": "member", "y": "member", "color": "agreement"},
        aspect="equal",
    )
    disagreement = _finite(result.get("disagreement"))
    # The figure of its second line on a line of its own: side by side at 1280 px it was cut off.
    sub = (
        f"<br><span style='font-size:{AXIS_TITLE_SIZE}px'>mean disagreement {disagreement:.3f}</span>"
        if disagreement is not None and n > 1
        else ""
    )
    style(fig, f"{method_label(method)}{sub}", "member", "member", height=460)
    fig.update_traces(textfont={"size": 16 if n <= 4 else 13})
    fig.update_xaxes(type="category", side="bottom")
    fig.update_yaxes(type="category")
    fig.update_layout(title={"font": {"size": TITLE_SIZE - 2}})
    return fig


def _bins_xy(points: list[tuple]) -> dict:
    """A reliability trace's x (confidence), y (accuracy) and customdata (examples) from its bins' triples."""
    return {"x": [p[0] for p in points], "y": [p[1] for p in points], "customdata": [p[2] for p in points]}


SPARSE_BIN = 0.01  # a reliability bin with less than this share of the test examples: a hollow dot, not joined


def reliability_figure(results: dict[str, dict]) -> go.Figure:
    """Each method's reliability diagram (bin confidence against bin accuracy) and the diagonal.

    Bins holding less than ``SPARSE_BIN`` of the examples are hollow dots off the line: joined, a
    bin of a few examples at confidence 0.19 and accuracy 1.0 drew the figure's longest stroke.
    """
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            line={"color": "#888888", "dash": "dash", "width": 2},
            name="perfect calibration",
        )
    )
    for method in ordered_methods(results):
        curve = results[method].get("reliability") or {}
        conf, acc, count = curve.get("confidence") or [], curve.get("accuracy") or [], curve.get("count") or []
        points = [
            (c, a, n)
            for c, a, n in zip(conf, acc, count or [0] * len(conf), strict=False)
            if c is not None and a is not None
        ]
        if not points:
            continue
        total = sum(n for _, _, n in points) or 1
        ece = _finite(results[method].get("ece"))
        name = method_label(method) + (f" (ECE {ece:.3f})" if ece is not None else "")
        hover = "confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata} examples<extra></extra>"
        # Without counts (a store from before them) every bin counts as full.
        full = [p for p in points if not count or p[2] >= SPARSE_BIN * total]
        sparse = [p for p in points if count and p[2] < SPARSE_BIN * total]
        fig.add_trace(
            go.Scatter(
                **_bins_xy(full),
                mode="lines+markers",
                line={"color": method_color(method), "width": 3},
                marker={"size": [8 + 22 * math.sqrt(p[2] / total) for p in full], "color": method_color(method)},
                name=name,
                legendgroup=method,
                hovertemplate=hover,
            )
        )
        if sparse:
            fig.add_trace(
                go.Scatter(
                    **_bins_xy(sparse),
                    mode="markers",
                    marker={"size": 8, "color": "white", "line": {"color": method_color(method), "width": 2}},
                    name=f"{method_label(method)}: bins under {SPARSE_BIN:.0%} of the examples",
                    legendgroup=method,
                    showlegend=False,
                    hovertemplate=hover,
                )
            )
    style(fig, "Reliability diagram", "confidence (bin mean)", "accuracy", height=460)
    # Square, its axes 0 to 1 at any width (a resize stretched the x axis to -1 .. 2 instead); a little
    # room below 0 keeps the two axes' "0" apart, and the dots are not cut at the plot's edge.
    fig.update_xaxes(range=[-0.04, 1.04], constrain="domain")
    fig.update_yaxes(range=[-0.04, 1.04], scaleanchor="x", scaleratio=1, constrain="domain")
    fig.update_traces(cliponaxis=False)
    legend_below(fig)
    return fig


def runs_loss_figure(runs: list[dict]) -> go.Figure:
    """Mean training loss per epoch of several runs, one line per run and method (colour: method, dash: run)."""
    fig = go.Figure()
    for i, run in enumerate(runs):
        dash = METHOD_DASHES[i % len(METHOD_DASHES)]
        records = run.get("records") or []
        for method in ordered_methods(r.get("method") for r in records if r.get("kind") == "epoch"):
            rows = [r for r in records if r.get("kind") == "epoch" and r.get("method") == method]
            fig.add_trace(
                go.Scatter(
                    x=epoch_xs(rows),
                    y=[_finite(r.get("loss")) for r in rows],
                    mode="lines+markers",
                    line={"color": method_color(method), "width": 3, "dash": dash},
                    marker={"size": 8},
                    name=f"#{run['id']} {method_label(method)}",
                )
            )
    style(fig, "Training loss per epoch (colour: method, line style: run)", "epoch", "training loss (mean of members)")
    # From 0, as the other loss charts: Plotly's own range magnified two runs' last hundredths into a gulf.
    fig.update_yaxes(rangemode="tozero")
    return fig


# ----------------------------------------------------------------------------- parameter counts


def params_figure(sizes: list[int], max_members: int = 16, marked: int | None = None) -> go.Figure:
    """Parameters against ensemble size: classic (E full MLPs), BatchEnsemble, and the single MLP."""
    es = list(range(1, max_members + 1))
    single = mlp_params(sizes)
    fig = go.Figure()
    series = [
        ("classic", [e * single for e in es]),
        ("batchensemble", [batchensemble_params(sizes, e) for e in es]),
        ("single", [single for _ in es]),
    ]
    for method, ys in series:
        fig.add_trace(
            go.Scatter(
                x=es,
                y=ys,
                mode="lines+markers",
                line={"color": method_color(method), "width": 3, "dash": "dot" if method == "single" else "solid"},
                marker={"size": 8},
                name=method_label(method),
                hovertemplate="E=%{x}<br>%{y:,} parameters<extra></extra>",
            )
        )
    if marked is not None and 1 <= marked <= max_members:
        fig.add_vline(x=marked, line={"color": "#444444", "dash": "dash"}, annotation_text=f"E={marked}")
    style(fig, "Parameters against ensemble size", "ensemble size E", "parameters", height=460)
    fig.update_xaxes(tickvals=[1, 2, 4, 6, 8, 10, 12, 14, 16][: max_members + 1], range=[0.5, max_members + 0.5])
    fig.update_yaxes(rangemode="tozero", exponentformat="B")  # 2B, not SI's 2G, for two billion parameters
    legend_below(fig)  # under the plot: at its top right the marked E's label ran into it
    return fig


def matrix_figure(matrix: list[list[float]], title: str, zmax: float | None = None) -> go.Figure:
    """A small weight matrix as an annotated heatmap, red negative and blue positive, centred on 0."""
    n_out, n_in = len(matrix), len(matrix[0]) if matrix else 0
    bound = zmax or max((abs(v) for row in matrix for v in row), default=1.0) or 1.0
    fig = px.imshow(
        matrix,
        x=[str(i + 1) for i in range(n_in)],
        y=[str(o + 1) for o in range(n_out)],
        zmin=-bound,
        zmax=bound,
        color_continuous_scale="RdBu",
        text_auto=".1f",
        labels={"x": "input", "y": "output", "color": "value"},
        aspect="auto",
    )
    style(fig, title, "input i", "output o", height=380)
    fig.update_traces(textfont={"size": 14})
    # No colour bar: every cell is labelled with its value (red negative, blue positive), and the
    # three pictures need all the width they can get.
    fig.update_layout(
        margin={"l": 50, "r": 5, "t": 60, "b": 50},
        title={"font": {"size": TITLE_SIZE - 2}},
        coloraxis_showscale=False,
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


# ----------------------------------------------------------------------------- exports


def existing_runs(store: RunStore, run_ids: list[int]) -> list[dict]:
    """The runs' full records, in order; a run deleted since the page was drawn (in another session) is left out."""
    runs = []
    for run_id in run_ids:
        try:
            runs.append(store.get_run(run_id))
        except StoreError:
            continue
    return runs


def fetch_runs(run_ids: list[int], path: str) -> list[dict]:
    """``existing_runs`` for a download, read when the user clicks.

    That is in Streamlit's download thread, so on a store opened there.
    """
    with RunStore(path) as store:
        return existing_runs(store, run_ids)


def export_csv(runs: list[dict]) -> str:
    """One row per run and method; the columns: the run's settings, then every figure of report.FIGURES."""
    keys = [key for key, _, _ in FIGURES]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run_id", "status", "dataset", "ensemble_size", "epochs", "device", "method", *keys])
    for run in runs:
        cfg = run.get("config") or {}
        settings = [
            run["id"],
            run["status"],
            (cfg.get("data") or {}).get("name"),
            (cfg.get("model") or {}).get("ensemble_size"),
            (cfg.get("train") or {}).get("epochs"),
            run.get("device"),
        ]
        results = run.get("results") or {}
        for method in ordered_methods(results):
            full = derived(results[method])
            writer.writerow([*settings, method, *(full.get(key) for key in keys)])
    return buffer.getvalue()


def export_json(runs: list[dict]) -> str:
    """Every run with its settings, status, software versions, results and classic / BatchEnsemble ratios."""
    out = [
        {
            "id": run["id"],
            "created": run.get("created"),
            "status": run["status"],
            "message": run.get("message") or "",
            "device": run.get("device"),
            "config": run.get("config"),
            "versions": run.get("versions"),
            "results": results_json(run.get("results") or {}),
            "ratios": ratios(run.get("results") or {}),
        }
        for run in runs
    ]
    return json.dumps(out, indent=2)
