"""Train: choose a dataset, methods and sizes; launch a background run; watch it live; stop it.

Training runs in a worker process (``bench_core.jobs.launch_run``), never in this script.
This page remembers the run it launched in ``st.session_state`` and polls the run store
every two seconds from one fragment, so the page stays responsive and a user can leave
and come back to a run still going.
"""

from __future__ import annotations

import time

import streamlit as st

from bench_core import jobs
from bench_core.config import BE_BATCHINGS, BE_INITS, CLASSIC_MODES, DATASETS, METHODS, RunConfig
from bench_core.data import dataset_status
from bench_core.devices import available_devices
from bench_core.errors import BenchError, StoreError
from bench_core.runner import preflight
from pages._common import (
    INIT_LABELS,
    LAST_RUN_KEY,
    LIVE_RUN_KEY,
    SCROLL_UP,
    WHOLE_EXACT,
    active_signature,
    dataset_label,
    empty_loss_figure,
    epoch_steps,
    has_full_epoch,
    hms,
    live_chart_due,
    live_figure,
    log_every_for,
    method_label,
    one_line_errors,
    open_store,
    ordered_methods,
    out_of_range,
    progress_of,
    require_router,
    rerun_when_changed,
    run_label,
    run_signature,
    running_benchmark,
    sharing_note,
    show,
    show_problems,
    store_path,
    whole_box,
    whole_number,
    wrapping,
)

require_router("pages/train.py")

POLL_SECONDS = 2.0  # the live view: progress line, Stop button, charts (a click on Stop answers at once)
CHART_SECONDS = 4.0  # between epochs' ends the loss chart takes new points at most this often
FIGURES_KEY = "train_live_figure"  # the live chart and what it was built from (see live_chart_figure)
LAUNCH_ERROR_KEY = "train_launch_error"  # why the last press of Train launched nothing
SCROLL_KEY = "train_scroll_up"  # set by a launch: the next page run scrolls to the live view at the top
MAX_OTHERS = 3  # runs started elsewhere, listed with Watch and Stop
P = "train_set_"  # prefix of the settings' widget keys

DEFAULTS = {
    "dataset": "cifar10",
    "methods": ["classic", "batchensemble"],
    "ensemble_size": 5,
    "epochs": 5,
    "device": "auto",
    "hidden": 128,
    "depth": 2,
    "batch_size": 128,
    "lr": 1e-3,
    "seed": 0,
    "classic_mode": "vectorized",
    "be_batching": "repeat",
    "be_init": "normal",
    "be_init_std": 0.5,
    "synthetic_train": 50_000,
    "synthetic_test": 10_000,
    "points_per_epoch": 2,
}
# The settings' ranges. The sliders cannot go beyond theirs: a run started elsewhere (the command line)
# may hold more, and watched here, a slider shows the nearest value it can beside a caption that says
# what the run really has. The number boxes take any number (pages._common.number_box): a number out
# of its range is named under the form and refuses the launch.
RANGES = {
    "ensemble_size": (1, 16),
    "epochs": (1, 50),
    "hidden": (1, 4096),
    "depth": (1, 8),
    "batch_size": (1, 65_536),
    "lr": (0.0, 1.0),  # above 0 (OPEN_BELOW)
    "seed": (0, 2**31 - 1),
    "be_init_std": (0.0, 5.0),
    "synthetic_train": (10, 1_000_000),
    "synthetic_test": (10, 1_000_000),
    "points_per_epoch": (0, 50),
}
OPEN_BELOW = ("lr",)  # ranges whose lower bound is out: a learning rate of 0 trains nothing
SLIDERS = ("ensemble_size", "epochs")
SYNTHETIC_ONLY = ("synthetic_train", "synthetic_test")  # drawn for synthetic data only
WHOLE = ("hidden", "depth", "batch_size", "seed", "points_per_epoch", *SYNTHETIC_ONLY)  # whole_box's
NUMBER_LABELS = {  # the number boxes, in the form's order
    "hidden": "Hidden width",
    "depth": "Hidden layers",
    "batch_size": "Batch size",
    "lr": "Learning rate (Adam)",
    "seed": "Seed",
    "points_per_epoch": "Loss points per epoch",
    "be_init_std": "Fast-weight init std",
    "synthetic_train": "Synthetic training examples",
    "synthetic_test": "Synthetic test examples",
}
SAVED_KEY = "train_saved_settings"  # a copy of the settings that outlives the widgets (Streamlit drops
# the state of widgets a page run does not draw, so a visit to another page would reset them)
DEVICES = ["auto", *available_devices()]


def settings_of(config: dict) -> dict:
    """The widget values that describe a stored run's settings."""
    cfg = RunConfig.from_dict(config)
    return {
        "dataset": cfg.data.name,
        "methods": list(cfg.methods),
        "ensemble_size": cfg.model.ensemble_size,
        "epochs": cfg.train.epochs,
        "device": cfg.train.device if cfg.train.device in DEVICES else "auto",
        "hidden": cfg.model.hidden,
        "depth": cfg.model.depth,
        "batch_size": cfg.train.batch_size,
        "lr": float(cfg.train.lr),
        "seed": cfg.train.seed,
        "classic_mode": cfg.model.classic_mode,
        "be_batching": cfg.model.be_batching,
        "be_init": cfg.model.be_init,
        "be_init_std": float(cfg.model.be_init_std),
        "synthetic_train": cfg.data.synthetic_train,
        "synthetic_test": cfg.data.synthetic_test,
        # The number typed is not stored, only the log_every it gave: about steps / log_every.
        "points_per_epoch": round(epoch_steps(cfg) / cfg.train.log_every) if cfg.train.log_every else 0,
    }


def default_dataset() -> str:
    """The dataset a fresh form opens on.

    CIFAR-10 (the seed notebook's) if it is on disk, else the first real dataset that is, else
    CIFAR-10 all the same (downloaded where there is a network). Opened on CIFAR-10 on a machine
    without it or a network, the first press of Train made a run that failed on its download.
    """
    real = [d for d in DATASETS if d != "synthetic"]
    return next((d for d in real if dataset_status(d)[0]), DEFAULTS["dataset"])


def restore_settings(live_config: dict | None) -> list[str]:
    """Put values into the settings' widgets before they are drawn.

    While this session's run is active its own settings are shown (locked); otherwise the
    user's last settings come back after a visit to another page. Returns the live run's settings
    that lie beyond the sliders' ranges ("epochs 100"), each shown at the nearest value in range (the
    number boxes show any number as it is).
    """
    saved = {**DEFAULTS, **st.session_state.get(SAVED_KEY, {})}
    if SAVED_KEY not in st.session_state:  # a fresh form: the files looked for once, not on every page run
        saved["dataset"] = default_dataset()
    if live_config is not None:
        typed = saved["points_per_epoch"]
        saved.update(settings_of(live_config))
        if log_every_for(RunConfig.from_flat({**saved, "methods": ("single",)}), typed) == (
            (live_config.get("train") or {}).get("log_every")
        ):
            saved["points_per_epoch"] = typed  # what this session typed for its run, exactly
    if saved["device"] not in DEVICES:  # a device that went away since
        saved["device"] = "auto"
    beyond = []
    for name in SLIDERS:
        low, high = RANGES[name]
        value = saved[name]
        if not low <= value <= high:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            beyond.append(f"{name.replace('_', ' ')} {shown}")
            saved[name] = min(max(value, low), high)
    for name in WHOLE:  # beyond 2⁵³ a float box shows the nearest float (a seed from the command line)
        if isinstance(saved[name], int) and abs(saved[name]) > WHOLE_EXACT:
            beyond.append(f"{name.replace('_', ' ')} {saved[name]}")
    # The dataset this run draws the form for: the box's own value where it has one (a choice just made).
    dataset = saved["dataset"] if live_config is not None else st.session_state.get(P + "dataset", saved["dataset"])
    for name, value in saved.items():
        if name in SYNTHETIC_ONLY and dataset != "synthetic":
            # Not drawn in this run. A value put in a widget's key from code before its widget exists stays
            # there until a widget takes it: it had come back over the number typed since, after a visit to
            # another page or to another dataset (1000 examples typed, 50,000 trained).
            continue
        if live_config is not None or P + name not in st.session_state:
            st.session_state[P + name] = value
    return beyond


def current(name: str):
    """The setting's value: its widget's, or the saved one where its widget is not drawn (SYNTHETIC_ONLY).

    A whole number as an int (its box, a float one, hands over 128.0).
    """
    if P + name in st.session_state:
        value = st.session_state[P + name]
    else:
        value = st.session_state.get(SAVED_KEY, {}).get(name, DEFAULTS[name])
    return whole_number(value) if name in WHOLE else value


def remember_settings() -> None:
    st.session_state[SAVED_KEY] = {name: current(name) for name in DEFAULTS}


def settings(locked: bool) -> RunConfig:
    """Draw the settings (disabled while ``locked``) and return the RunConfig they describe."""
    # Methods as pills: at 1024 px the multiselect's chips scrolled out of its box (BatchEnsemble cut).
    top = st.columns([1.3, 1.7, 0.8])  # at [1, 1.8, 0.8] and 1024 px the box showed "Fashion-MNIS"
    name = top[0].selectbox("Dataset", DATASETS, key=P + "dataset", format_func=dataset_label, disabled=locked)
    top[1].pills(
        "Methods",
        METHODS,
        selection_mode="multi",
        key=P + "methods",
        **wrapping(),
        format_func=method_label,
        disabled=locked,
        help="classic: E independent MLPs. BatchEnsemble: one shared weight per layer plus cheap per-member "
        "vectors. single: one MLP, the baseline. Click one to add or remove it.",
    )
    top[2].selectbox(
        "Device",
        DEVICES,
        key=P + "device",
        disabled=locked,
        help="auto: the first of cuda, mps and cpu that this machine has (nothing is timed to choose)",
    )

    usable, reason = dataset_status(name)
    if usable:
        st.caption(f"{dataset_label(name)}: {reason}.")
    else:
        available = [dataset_label(d) for d in DATASETS if dataset_status(d)[0]]
        st.warning(
            f"{dataset_label(name)}: {reason}. Available now: {', '.join(available)}.", icon=":material/cloud_off:"
        )

    sliders = st.columns(2)
    sliders[0].slider("Ensemble size E (members)", *RANGES["ensemble_size"], key=P + "ensemble_size", disabled=locked)
    sliders[1].slider("Epochs", *RANGES["epochs"], key=P + "epochs", disabled=locked)

    with st.expander("Advanced settings"):
        # Three columns of numbers, then the choices as rows of two: in four columns at 1024 px
        # "BatchEnsemble batching" broke inside the word.
        a = st.columns(3)
        # No min_value or max_value: range_problems checks them (see NUMBER_LABELS). The whole numbers in
        # float boxes shown as whole (whole_box): Streamlit's int box read 2.5 as 2 and 1e3 as 1.
        a[0].number_input(NUMBER_LABELS["hidden"], **whole_box(16), key=P + "hidden", disabled=locked)
        a[1].number_input(NUMBER_LABELS["depth"], **whole_box(1), key=P + "depth", disabled=locked)
        a[2].number_input(NUMBER_LABELS["batch_size"], **whole_box(16), key=P + "batch_size", disabled=locked)
        # %g: 0.00005 reads as 5e-05, the value trained with (%.4f showed 0.0001)
        a[0].number_input(NUMBER_LABELS["lr"], step=1e-4, format="%g", key=P + "lr", disabled=locked)
        a[1].number_input(NUMBER_LABELS["seed"], **whole_box(1), key=P + "seed", disabled=locked)
        a[2].number_input(
            NUMBER_LABELS["points_per_epoch"],
            **whole_box(1),
            key=P + "points_per_epoch",
            disabled=locked,
            help="How often the live loss curve gets a point; 0: once per epoch (the cleanest timings).",
        )
        b = st.columns(2)
        b[0].radio(
            "Classic mode",
            CLASSIC_MODES,
            key=P + "classic_mode",
            disabled=locked,
            horizontal=True,
            help="vectorized: all members in one batched pass. sequential: one member after another.",
        )
        b[1].radio(
            "BatchEnsemble batching",
            BE_BATCHINGS,
            key=P + "be_batching",
            disabled=locked,
            horizontal=True,
            help="repeat: every member sees every example. split: each member gets 1/E of each batch.",
        )
        b[0].radio(
            "Fast-weight init",
            BE_INITS,
            key=P + "be_init",
            format_func=INIT_LABELS.get,
            disabled=locked,
            horizontal=True,
        )
        b[1].number_input(
            NUMBER_LABELS["be_init_std"],
            step=0.05,
            key=P + "be_init_std",
            disabled=locked or st.session_state[P + "be_init"] != "normal",
            help="normal init: r and s start as N(1, std²)",
        )
        if name == "synthetic":
            c = st.columns(2)
            c[0].number_input(
                NUMBER_LABELS["synthetic_train"],
                **whole_box(1000),
                key=P + "synthetic_train",
                disabled=locked,
            )
            c[1].number_input(
                NUMBER_LABELS["synthetic_test"],
                **whole_box(500),
                key=P + "synthetic_test",
                disabled=locked,
            )

    return config_from_state()


def shown_numbers() -> dict[str, str]:
    """The number boxes the form asks for now (name: label).

    Not the synthetic sizes for real data, nor the std for random signs.
    """
    shown = dict(NUMBER_LABELS)
    if st.session_state[P + "dataset"] != "synthetic":
        for name in SYNTHETIC_ONLY:
            del shown[name]
    if st.session_state[P + "be_init"] != "normal":  # disabled: the normal init's only
        del shown["be_init_std"]
    return shown


def number_problem(name: str, label: str = "") -> str | None:
    return out_of_range(label, current(name), *RANGES[name], above=name in OPEN_BELOW, whole=name in WHOLE)


def range_problems() -> list[str]:
    """One line for each number box of the form whose number is out of its range (or none was typed)."""
    problems = (number_problem(name, label) for name, label in shown_numbers().items())
    return [p for p in problems if p]


def config_from_state() -> RunConfig:
    """The RunConfig that the settings' widgets describe now.

    A number out of its range (or none) counts as the default's here: the form names it and
    refuses to launch where its box is asked for (range_problems), and where it is not (a synthetic
    size typed before real data was chosen) the default is what the run needs. It had reached the
    launch and refused it in bench_core's words, about a box not on the screen.
    """
    s = {name: current(name) for name in DEFAULTS}
    for name in NUMBER_LABELS:
        if number_problem(name):
            s[name] = DEFAULTS[name]
    cfg = RunConfig.from_flat({**s, "methods": tuple(m for m in METHODS if m in s["methods"])})
    cfg.train.log_every = log_every_for(cfg, int(s["points_per_epoch"]))
    return cfg


def launch() -> None:
    """The Train button's callback: check the settings and start a worker.

    As a callback it runs before the page's script, which then draws the new run (settings locked,
    live view) in one pass; launching from the script took a second full rerun, which the browser
    redraws while the run's first seconds train. A bad setting launches nothing and is kept for
    the page to show as one line.
    """
    if range_problems():  # named under the form already (this click's rerun draws them again): nothing starts
        return
    cfg = config_from_state()
    if not cfg.methods:  # in the words of the form (validate names the command line's: batchensemble)
        names = ", ".join(method_label(m) for m in METHODS)
        st.session_state[LAUNCH_ERROR_KEY] = f"Choose at least one method under Methods ({names})."
        return
    try:
        cfg = preflight(cfg)
        run_id, _ = jobs.launch_run(cfg.to_dict(), store_path())  # the worker is reaped by jobs
    except BenchError as err:
        st.session_state[LAUNCH_ERROR_KEY] = str(err)
        return
    remember_settings()  # as launched: a value typed just before the click included
    st.session_state[LIVE_RUN_KEY] = run_id
    st.session_state[LAST_RUN_KEY] = run_id
    st.session_state[SCROLL_KEY] = True


def watch(run_id: int) -> None:
    """Follow a run started elsewhere (another tab, before a reload, the command line) in this page."""
    st.session_state[LIVE_RUN_KEY] = run_id
    st.session_state[LAST_RUN_KEY] = run_id
    st.session_state.pop(FIGURES_KEY, None)


def stop_run(run_id: int) -> None:
    try:
        jobs.request_stop(store_path(), run_id)
    except BenchError as err:
        st.session_state[LAUNCH_ERROR_KEY] = str(err)
        return
    st.toast(f"Run {run_id} stops after its current batch.")


def other_runs_block(others: list[dict]) -> None:
    """Runs training that this session did not launch, each with Watch it here and Stop it.

    Started in another tab, before a reload or a server restart, or from the command line: without
    these buttons nothing on the page could follow or stop them.
    """
    for run in others[:MAX_OTHERS]:
        where = {"cli": "from the command line", "dashboard": "from the dashboard"}.get(run.get("source"), "")
        state = "stopping" if run.get("stop_requested") else run["status"]
        row = st.container(horizontal=True, vertical_alignment="center")
        what = run_label(run).split(" · ", 1)[-1]  # the label without its "#id status"
        text = f"Run {run['id']} is {state}, started {where or 'elsewhere'}: {what}"
        row.info(text, icon=":material/sync:")
        row.button("Watch it here", key=f"train_watch_{run['id']}", on_click=watch, args=(run["id"],))
        row.button(
            "Stop it",
            key=f"train_stop_other_{run['id']}",
            icon=":material/stop:",
            on_click=stop_run,
            args=(run["id"],),
            disabled=bool(run.get("stop_requested")),
        )
    if len(others) > MAX_OTHERS:
        st.caption(f"And {len(others) - MAX_OTHERS} more: the Runs page lists them all and can stop them.")


def final_status(run: dict) -> None:
    """One line on how the run ended, and the way to its results."""
    status, run_id = run["status"], run["id"]
    results = run.get("results") or {}
    accs = " · ".join(
        f"{method_label(m)} {results[m]['ensemble_accuracy']:.3f}"
        for m in ordered_methods(results)
        if isinstance(results[m].get("ensemble_accuracy"), (int, float))
    )
    if status == "finished":
        st.success(f"Run {run_id} finished. Ensemble accuracy: {accs}." if accs else f"Run {run_id} finished.")
        if run.get("message"):  # what went wrong without failing it (weights not saved)
            st.warning(run["message"], icon=":material/warning:")
    elif status == "stopped" and not results:
        st.warning(f"Run {run_id} was stopped before any method was trained.", icon=":material/stop_circle:")
    elif status == "stopped":
        kept = f" Ensemble accuracy so far: {accs}." if accs else ""
        st.warning(f"Run {run_id} was stopped; what was trained is kept.{kept}", icon=":material/stop_circle:")
    elif status == "failed":
        st.error(f"Run {run_id} failed: {run.get('message') or 'no message'}", icon=":material/error:")
    else:
        st.error(
            f"Run {run_id} was interrupted: {run.get('message') or 'its process ended'}", icon=":material/warning:"
        )
    if results:
        st.page_link(
            "pages/results.py",
            label=f"See the results of run {run_id}",
            icon=":material/bar_chart:",
            query_params={"run": run_id},
        )


@one_line_errors
def live_view(run_id: int, was_active: bool) -> None:
    """The run's progress line, note, Stop button and charts, redrawn from the store on every poll.

    One fragment draws them all: every fragment rerun costs the browser ~25 ms of CPU even when it
    only changes a line of text (scripts/probe_chart_cost.py: headless Chromium, 1280x720), CPU
    that the training worker shares on a small machine, so the page polls once, not once per part.
    """
    store = open_store()
    try:
        run = store.get_run(run_id)
    except StoreError:
        st.info(f"Run {run_id} is no longer in the run store (deleted?).")
        st.session_state.pop(LIVE_RUN_KEY, None)
        return
    active = jobs.is_active(run["status"])
    if was_active and not active:
        st.rerun()  # the whole page: unlock the settings, stop polling

    records = run.get("records") or []
    if not active:
        final_status(run)
    else:
        progress_line(run, records)
    live_charts(run_id, records, active)


def progress_line(run: dict, records: list[dict]) -> None:
    """The progress bar with where the run is, elapsed time and ETA; the Stop button; the worker's note."""
    run_id = run["id"]
    cfg = run.get("config") or {}
    methods = ordered_methods(run.get("methods") or [])
    epochs = int((cfg.get("train") or {}).get("epochs") or 1)
    head = st.columns([3, 1])
    fraction, eta, where = progress_of(records, methods, epochs)
    fraction = max(fraction, min(1.0, run.get("progress") or 0.0))  # the worker's own (per epoch) figure
    elapsed = time.time() - (run.get("created") or time.time())
    # Before the first record (data loading, building kernels) there is no batch to finish yet.
    stopping = "stopping after this batch…" if records else "stopping before training starts…"
    state = stopping if run.get("stop_requested") else "waiting for its turn" if jobs.is_waiting(run) else run["status"]
    text = f"Run {run_id} {state}"
    text += f" · {where}" if where else ""
    text += f" · elapsed {hms(elapsed)} · ETA {hms(eta)}" if eta is not None else f" · elapsed {hms(elapsed)}"
    head[0].progress(fraction, text=text)
    if head[1].button("Stop", key="train_stop", icon=":material/stop:", disabled=bool(run.get("stop_requested"))):
        jobs.request_stop(store_path(), run_id)
        st.rerun(scope="fragment")
    if run.get("note"):
        st.info(run["note"], icon=":material/hourglass_top:")


def live_charts(run_id: int, records: list[dict], active: bool) -> None:
    """The run's live chart: loss, seconds per epoch and examples per second (see live_chart_figure)."""
    if not records:
        if active:
            st.caption("The charts appear with the first training records.")
        return
    show(live_chart_figure(run_id, records, active))
    if not has_full_epoch(records):
        st.caption(
            "The speed charts appear when a first epoch is complete."
            if active
            else "No epoch ran to its end (the run was stopped in its first): no speed to chart."
        )


def live_chart_figure(run_id: int, records: list[dict], active: bool):
    """The live chart's figure: rebuilt when an epoch ends, and otherwise at most every CHART_SECONDS.

    A figure re-sent unchanged costs the browser little (+16 ms), a changed one a new Plotly chart
    (140-159 ms for this figure; Streamlit remounts a chart whose figure changed;
    scripts/probe_chart_cost.py).
    So between epochs' ends the loss takes new points at most every CHART_SECONDS. A run that
    ended shows every record.
    """
    n_epochs = sum(1 for r in records if r.get("kind") == "epoch")
    now = time.monotonic()
    cached = st.session_state.get(FIGURES_KEY)
    if not live_chart_due(cached, run_id, len(records), n_epochs, active, now, CHART_SECONDS):
        return cached["figure"]
    figure = live_figure(records)
    st.session_state[FIGURES_KEY] = {
        "run": run_id,
        "records": len(records),
        "epochs": n_epochs,
        "at": now,
        "figure": figure,
    }
    return figure


st.title("Train")
st.caption("Compare a classic ensemble of MLPs with BatchEnsemble: accuracy, agreement between members, speed.")

store = open_store()
live_id = st.session_state.get(LIVE_RUN_KEY)
live_active = False
live_config = None
if live_id is not None:
    try:
        live_run = store.get_run(live_id)
    except StoreError:
        st.session_state.pop(LIVE_RUN_KEY, None)
        live_id = None
    else:
        live_active = jobs.is_active(live_run["status"])
        live_config = live_run["config"] if live_active else None

try:
    others = [r for r in store.active_runs() if r["id"] != live_id]
except StoreError:
    others = []
benchmarking = running_benchmark() is not None
sharing = sharing_note(others, benchmarking, None if live_active else "a run")
if not live_active and others:
    other_runs_block(others)
if not live_active:  # the list above and the note below follow the runs of other tabs and the command line
    rerun_when_changed(
        (run_signature(others), benchmarking),
        lambda: (active_signature(exclude=live_id), running_benchmark() is not None),
    )

# While this session's run is active, its live view comes first, above the locked settings,
# so that on a projector's first screen the class sees the charts, not the form.
live_slot = st.container()
if st.session_state.pop(SCROLL_KEY, False):
    st.html(SCROLL_UP, unsafe_allow_javascript=True)
beyond = restore_settings(live_config)
config = settings(locked=live_active)
remember_settings()
if live_active:
    doing = "waits for its turn" if jobs.is_waiting(live_run) else "trains"
    st.caption(f"Settings are locked while run {live_id} {doing}; stop it to change them.")
    if beyond:
        st.caption(
            f"Run {live_id} has {', '.join(beyond)}: beyond this form's range, so the form shows the nearest value."
        )
problems = [] if live_active else range_problems()  # a watched run's numbers are the run's, whatever the form's ranges
show_problems(problems)
st.button(
    "Train", type="primary", icon=":material/play_arrow:", disabled=live_active, key="train_start", on_click=launch
)
if LAUNCH_ERROR_KEY in st.session_state:
    st.error(st.session_state.pop(LAUNCH_ERROR_KEY), icon=":material/error:")
if sharing and not live_active:
    st.warning(sharing, icon=":material/speed:")

if live_id is None:
    # The loss chart's empty frame, where this session's first run will draw. It also has the browser
    # load its Plotly code now rather than in the run's first seconds, where it took ~1.2 CPU-s from
    # the training on a 2-core machine (headless Chromium; only ~0.25 CPU-s for the first chart once
    # loaded).
    st.divider()
    show(empty_loss_figure(config.train.epochs))
else:
    with live_slot if live_active else st.container():
        st.divider()
        if sharing and live_active:
            st.warning(sharing, icon=":material/speed:")
        st.fragment(run_every=POLL_SECONDS if live_active else None)(live_view)(live_id, live_active)
