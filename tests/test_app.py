"""The dashboard, page by page, through Streamlit's AppTest (no browser).

Every test points BENCH_STORE and BENCH_DATA_DIR into its own tmp_path. The Train test
starts a real worker process and waits for it; the other pages get their runs from
``run_experiment`` called in-process on a tiny synthetic dataset.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from bench_core.bench import STEP_PARTS, BenchSettings
from bench_core.config import RunConfig
from bench_core.errors import ConfigError
from bench_core.models import build_model
from bench_core.runner import preflight, run_experiment
from bench_core.store import RunStore
from pages._common import (
    MISSING,
    agreement_figure,
    agreement_floor,
    and_list,
    batchensemble_params,
    empty_loss_figure,
    export_csv,
    export_json,
    fetch_runs,
    live_chart_due,
    live_figure,
    log_ticks,
    loss_figure,
    loss_series,
    member_accuracy_figure,
    mlp_params,
    numbers_table,
    out_of_range,
    progress_of,
    runs_loss_figure,
    whole_box,
    whole_number,
)

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
PAGES = ["train", "results", "runs", "speed", "learn"]
# A worker's whole run; the first in a fresh cache also builds the C++ steps (about 15 s alone, over 60 s
# on this 2-core machine with another build or a training run beside it).
WORKER_TIMEOUT_S = 180


@pytest.fixture
def store_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "store" / "runs.sqlite"
    monkeypatch.setenv("BENCH_STORE", str(path))
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BENCH_FASHION_MNIST_DIR", str(tmp_path / "no-fashion-mnist"))
    return path


@pytest.fixture(autouse=True)
def no_benchmark_left_behind():
    """After each test: the server-wide registry of Speed benchmarks emptied, their processes and folders gone.

    A new Speed page shows the last benchmark's results; one left by a test that failed half-way
    would show in the next test's page.
    """
    yield
    from pages._common import benchmark_jobs

    registry = benchmark_jobs()
    with registry.lock:
        for job in registry.jobs:
            if job.proc is not None and job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait(timeout=30)
            shutil.rmtree(job.folder, ignore_errors=True)
        registry.jobs.clear()


def open_page(page: str) -> AppTest:
    """The app as a user reaches ``page``: app.py first, then the page."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    if page != "train":
        at.switch_page(f"pages/{page}.py").run()
    return at


def tiny_config(methods=("classic", "batchensemble"), ensemble_size: int = 3) -> RunConfig:
    cfg = RunConfig(methods=tuple(methods))
    cfg.data.name = "synthetic"
    cfg.data.synthetic_train = 256
    cfg.data.synthetic_test = 128
    cfg.data.synthetic_shape = (1, 4, 4)
    cfg.model.hidden = 16
    cfg.model.ensemble_size = ensemble_size
    cfg.train.epochs = 2
    cfg.train.batch_size = 64
    cfg.train.device = "cpu"
    cfg.train.log_every = 2
    return cfg


def make_run(store_file: Path, cfg: RunConfig | None = None) -> int:
    """A finished run in the store, trained in-process in well under a second."""
    with RunStore(store_file) as store:
        done = list(run_experiment(cfg or tiny_config(), store=store, source="test"))[-1]
    return done.run_id


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def charts(at: AppTest) -> list[dict]:
    """The Plotly figures on the page, as dicts (data, layout)."""
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def heatmaps(at: AppTest) -> list[dict]:
    return [f for f in charts(at) if f["data"] and f["data"][0]["type"] == "heatmap"]


# ----------------------------------------------------------------------------- every page


@pytest.mark.parametrize("page", PAGES)
def test_every_page_runs_on_an_empty_store(store_file, page):
    at = open_page(page)
    assert not at.exception, at.exception
    assert not at.error, texts(at.error)
    assert at.title, "each page has a title"


@pytest.mark.parametrize("page", ["train", "results", "runs"])  # the pages that read the store
def test_a_corrupt_store_is_one_error_line(store_file, page):
    store_file.parent.mkdir(parents=True)
    store_file.write_bytes(b"\x00this is not a database" * 50)
    at = open_page(page)
    assert not at.exception, at.exception
    errors = texts(at.error)
    assert len(errors) == 1, errors
    assert "corrupt" in errors[0] and "\n" not in errors[0]


# ----------------------------------------------------------------------------- Train


def test_train_launches_a_worker_that_finishes(store_file):
    at = open_page("train")
    at.selectbox(key="train_set_dataset").set_value("synthetic").run()
    at.number_input(key="train_set_synthetic_train").set_value(2000)
    at.number_input(key="train_set_synthetic_test").set_value(500)
    at.slider(key="train_set_ensemble_size").set_value(3)
    at.slider(key="train_set_epochs").set_value(2)
    at.selectbox(key="train_set_device").set_value("cpu")
    at.run()
    at.button(key="train_start").click().run()
    assert not at.exception, at.exception
    assert not at.error, texts(at.error)
    run_id = at.session_state["live_run_id"]
    assert at.session_state["last_run_id"] == run_id
    assert at.slider(key="train_set_epochs").disabled, "settings are locked while the run is active"
    assert at.get("progress"), "a progress bar while the run is active"

    with RunStore(store_file) as store:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while store.status(run_id) in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.25)
        run = store.get_run(run_id)
    assert run["status"] == "finished", (run["status"], run["message"])
    assert set(run["results"]) == {"classic", "batchensemble"}
    assert len(run["results"]["batchensemble"]["member_accuracy"]) == 3
    assert run["config"]["data"]["synthetic_train"] == 2000

    at.run()
    assert not at.exception, at.exception
    assert any(f"Run {run_id} finished" in s for s in texts(at.success))
    assert not at.slider(key="train_set_epochs").disabled, "settings unlock when the run ends"
    (live,) = charts(at)  # one figure: the loss on top, seconds per epoch and examples per second below
    assert live["layout"]["title"]["text"].startswith("Training loss")
    panels = [a["text"] for a in live["layout"]["annotations"]]
    assert panels == ["Seconds per epoch<br>(lower is faster)", "Examples per second<br>(higher is faster)"]
    (link,) = at.get("page_link")
    assert link.proto.label == f"See the results of run {run_id}"
    assert f"run={run_id}" in link.proto.query_string, "the link names the run"
    note = "the weights of classic were not saved: can't save weights to x"
    assert note not in texts(at.warning)
    with RunStore(store_file) as store:  # what the runner writes where weights could not be saved
        store.finish_run(run_id, "finished", note)
    at.run()
    assert note in texts(at.warning), "a finished run's message is shown"


def test_two_browser_sessions_each_see_only_their_own_live_run(store_file):
    """Two sessions train at once on one store: each shows its own run as its live run, both are stored."""
    sessions = []
    for seed in (1, 2):
        at = open_page("train")
        at.selectbox(key="train_set_dataset").set_value("synthetic").run()
        at.number_input(key="train_set_synthetic_train").set_value(1500)
        at.number_input(key="train_set_synthetic_test").set_value(300)
        at.slider(key="train_set_ensemble_size").set_value(2)
        at.slider(key="train_set_epochs").set_value(2)
        at.number_input(key="train_set_seed").set_value(seed)
        at.selectbox(key="train_set_device").set_value("cpu")
        at.run()
        at.button(key="train_start").click().run()
        assert not at.exception, at.exception
        sessions.append(at)
    ids = [at.session_state["live_run_id"] for at in sessions]
    assert ids[0] != ids[1]
    with RunStore(store_file) as store:
        deadline = time.monotonic() + 2 * WORKER_TIMEOUT_S
        while any(store.status(i) in ("queued", "running") for i in ids) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert [store.status(i) for i in ids] == ["finished", "finished"]
        assert [store.get_run(i)["config"]["train"]["seed"] for i in ids] == [1, 2]
    for at, own, other in zip(sessions, ids, reversed(ids), strict=True):
        at.run()
        assert not at.exception, at.exception
        shown = " ".join(texts(at.success))
        assert f"Run {own} finished" in shown
        assert f"Run {other} " not in shown


def test_a_watched_run_waiting_for_its_turn_says_so(store_file):
    run_id = active_run(store_file)
    note = "waiting for the CPU: run 9 is using it (runs take turns, so each one's timings are its own)"
    with RunStore(store_file) as store:
        store.set_note(run_id, note)
    at = open_page("train")
    at.button(key=f"train_watch_{run_id}").click().run()
    assert not at.exception, at.exception
    assert at.get("progress")[0].proto.text.startswith(f"Run {run_id} waiting for its turn · elapsed")
    assert note in texts(at.info)
    assert f"Settings are locked while run {run_id} waits for its turn; stop it to change them." in texts(at.caption)
    runs = open_page("runs")
    assert list(runs.dataframe[0].value["status"]) == ["waiting"], "the Runs page says so too"


def active_run(store_file: Path, source: str = "cli") -> int:
    """A run that is running in the store, owned by this process (alive to the store's reconcile)."""
    with RunStore(store_file) as store:
        run_id = store.create_run(tiny_config().to_dict(), source=source, status="queued")
        store.start_run(run_id, device="cpu", versions={})
    return run_id


def test_train_follows_or_stops_a_run_started_elsewhere(store_file):
    """A run of another tab, of a session before a reload, or of the command line: Watch and Stop."""
    run_id = active_run(store_file)
    at = open_page("train")
    assert not at.exception, at.exception
    assert any(f"Run {run_id} is running, started from the command line" in i for i in texts(at.info))
    assert any(f"Run {run_id} is training on this machine" in w for w in texts(at.warning)), "shared cores"
    at.button(key=f"train_stop_other_{run_id}").click().run()
    with RunStore(store_file) as store:
        assert store.get_run(run_id)["stop_requested"]
    at.button(key=f"train_watch_{run_id}").click().run()
    assert not at.exception, at.exception
    assert at.session_state["live_run_id"] == run_id
    assert at.get("progress") and at.slider(key="train_set_epochs").disabled, "its live view, settings locked"
    assert "stopping before training starts" in at.get("progress")[0].proto.text, "no batch has run yet"
    assert not any("started from" in i for i in texts(at.info)), "followed here: not listed as elsewhere"
    with RunStore(store_file) as store:
        store.finish_run(run_id, "stopped")
    at.run()
    assert any(f"Run {run_id} was stopped before any method was trained" in w for w in texts(at.warning))


def watch_a_command_line_run(store_file, cfg: RunConfig) -> AppTest:
    """The Train page after Watch on a running run of ``cfg`` started by the command line."""
    with RunStore(store_file) as store:
        run_id = store.create_run(cfg.to_dict(), source="cli", status="queued")
        store.start_run(run_id, device="cpu", versions={})
    at = open_page("train")
    at.button(key=f"train_watch_{run_id}").click().run()
    assert not at.exception, at.exception
    assert at.get("progress"), "its live view"
    return at


def test_watching_a_run_whose_settings_are_beyond_the_form_shows_it_and_says_so(store_file):
    cfg = tiny_config()
    cfg.train.epochs, cfg.model.ensemble_size, cfg.train.seed = 100, 32, 2**40  # the command line takes them
    at = watch_a_command_line_run(store_file, cfg)
    assert at.slider(key="train_set_epochs").value == 50 and at.slider(key="train_set_ensemble_size").value == 16
    (note,) = [c for c in texts(at.caption) if "beyond this form's range" in c]
    assert "ensemble size 32" in note and "epochs 100" in note
    assert at.number_input(key="train_set_seed").value == 2**40, "a number box shows any number as it is"
    assert not at.error, "a watched run's numbers are the run's: no complaint about the form's ranges"


def test_watching_a_run_whose_seed_a_float_box_cannot_hold_says_so(store_file):
    """The whole-number boxes are float ones (whole_box): beyond 2⁵³ the box shows the nearest float."""
    cfg = tiny_config()
    cfg.train.seed = 2**63 - 1  # the command line's largest
    at = watch_a_command_line_run(store_file, cfg)
    (note,) = [c for c in texts(at.caption) if "beyond this form's range" in c]
    assert "seed 9223372036854775807" in note, "the run's seed, exactly"
    assert not at.error


def test_a_value_typed_just_before_train_is_the_one_shown_for_the_run(store_file, monkeypatch):
    launched = []

    def launch_run(config, path):  # queues the run as jobs.launch_run does, and starts no worker
        launched.append(config)
        with RunStore(path) as store:
            return store.create_run(config, source="dashboard", status="queued"), None

    monkeypatch.setattr("bench_core.jobs.launch_run", launch_run)
    at = open_page("train")
    at.selectbox(key="train_set_dataset").set_value("synthetic").run()
    at.number_input(key="train_set_synthetic_train").set_value(4096)
    at.number_input(key="train_set_points_per_epoch").set_value(7)  # no rerun before the click
    at.button(key="train_start").click().run()
    assert not at.exception, at.exception
    assert launched and launched[0]["train"]["log_every"] == 32 // 7
    assert at.number_input(key="train_set_points_per_epoch").value == 7, "not the value saved before it"
    at.run()
    assert at.number_input(key="train_set_points_per_epoch").value == 7


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"train_set_be_batching": "split", "train_set_batch_size": 2}, "can't be split among"),
        ({"train_set_lr": 0.0}, "Learning rate (Adam) must be above 0"),
        ({"train_set_methods": []}, "Choose at least one method under Methods (single, classic, BatchEnsemble)."),
        ({"train_set_batch_size": 4000}, "larger than the"),
    ],
)
def test_a_bad_setting_is_one_error_and_launches_nothing(store_file, settings, needle):
    at = open_page("train")
    at.selectbox(key="train_set_dataset").set_value("synthetic").run()
    at.number_input(key="train_set_synthetic_train").set_value(2000)
    at.slider(key="train_set_ensemble_size").set_value(3)
    for key, value in settings.items():
        at.session_state[key] = value
    at.run()
    at.button(key="train_start").click().run()
    assert not at.exception, at.exception
    errors = texts(at.error)
    assert len(errors) == 1 and needle in errors[0], errors
    assert "live_run_id" not in at.session_state
    with RunStore(store_file) as store:
        assert store.list_runs() == []


def test_train_before_a_run_shows_the_empty_loss_chart_over_the_chosen_epochs(store_file):
    at = open_page("train")
    at.slider(key="train_set_epochs").set_value(9).run()
    assert not at.exception, at.exception
    (empty,) = charts(at)
    assert empty["layout"]["title"]["text"].startswith("Training loss") and not empty["data"]
    assert empty["layout"]["xaxis"]["range"] == [0, 9]


def test_a_dataset_that_cannot_be_had_says_why_and_lists_the_others(store_file):
    at = open_page("train")  # CIFAR-10 by default; the data folder is empty and nothing is downloaded here
    warnings = texts(at.warning)
    assert len(warnings) == 1, warnings
    assert "not on disk" in warnings[0] and "Available now: synthetic" in warnings[0]


def test_the_form_speaks_the_words_of_the_learn_page(store_file):
    at = open_page("train")
    assert at.radio(key="train_set_be_init").options == ["normal N(1, std²)", "random signs ±1"], "not 'random_sign'"
    at.radio(key="train_set_be_init").set_value("random_sign").run()
    assert not at.exception, at.exception
    assert at.number_input(key="train_set_be_init_std").disabled, "the std is the normal init's only"


def test_the_form_opens_on_a_real_dataset_that_is_on_disk(store_file, monkeypatch, tmp_path):
    """Not on CIFAR-10 where it is missing and another is there: Train's first press made a failing download."""
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (fashion / f"{name}.gz").write_bytes(b"")  # only looked for, not read, until a run loads it
    monkeypatch.setenv("BENCH_FASHION_MNIST_DIR", str(fashion))
    at = open_page("train")
    assert at.selectbox(key="train_set_dataset").value == "fashion-mnist"
    assert not at.warning, texts(at.warning)
    at.selectbox(key="train_set_dataset").set_value("cifar10").run()
    at.switch_page("pages/learn.py").run()
    at.switch_page("pages/train.py").run()
    assert at.selectbox(key="train_set_dataset").value == "cifar10", "the user's choice is kept"


# ----------------------------------------------------------------------------- Speed


# The smallest benchmark the Speed page runs: the single MLP on MNIST's shape, one step.
SPEED_TINY = {"shape": "mnist", "sizes": [1], "rows": ["single"], "steps": 1, "warmup": 0, "repeats": 1,
              "hidden": 16, "device": "cpu", "profile_steps": 0}  # fmt: skip


def start_tiny_benchmark() -> AppTest:
    """A Speed page that has pressed Run benchmark on SPEED_TINY; its job in ``speed_job``."""
    at = open_page("speed")
    for name, value in SPEED_TINY.items():
        at.session_state[f"speed_set_{name}"] = value
    at.run()
    at.button(key="speed_start").click().run()
    return at


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sizes": []}, "Choose at least one ensemble size under Ensemble sizes E."),
        ({"rows": []}, "Choose at least one row under Rows, or tick the seed notebook's pipeline."),
    ],
)
def test_speed_refuses_a_bad_setting_in_one_line_in_the_forms_words(store_file, settings, message):
    at = open_page("speed")
    for name, value in settings.items():
        at.session_state[f"speed_set_{name}"] = value
    at.run()
    at.button(key="speed_start").click().run()
    assert not at.exception, at.exception
    assert texts(at.error) == [message]


def test_speed_stopped_while_starting_is_a_stop_not_a_failure(store_file):
    from pages._common import process_identity

    at = start_tiny_benchmark()
    job = at.session_state["speed_job"]
    # Its folder names this server, and holds the benchmark's pid, for a later server's sweep.
    assert job.folder.name.startswith(f"bench-speed-{os.getpid()}-")
    assert (job.folder / "bench.pid").read_text() == process_identity(job.proc.pid)
    assert (job.folder / "server.pid").read_text() == process_identity(os.getpid())
    # The form's one Repeats box is every row's: the reference rows' too, not the command line's default.
    args = job.proc.args
    assert args[args.index("--repeats") + 1] == args[args.index("--reference-repeats") + 1] == "1"
    assert job.settings["reference_repeats"] == job.settings["repeats"] == 1
    job.proc.terminate()  # what Stop does, here while the benchmark still imports torch
    job.stop_requested = True
    assert job.proc.wait(timeout=60) != 0 and not job.events()
    at.run()
    assert not at.exception, at.exception
    assert not at.error, texts(at.error)
    assert "The benchmark was stopped before it measured a row." in texts(at.warning)
    shutil.rmtree(job.folder)  # not left for the next test's page to show as the last benchmark


def in_page_order(at: AppTest) -> list:
    """The page's elements as drawn, top to bottom (blocks and what they hold)."""
    found = []

    def walk(node):
        for child in getattr(node, "children", {}).values():
            found.append(child)
            walk(child)

    walk(at.main)
    return found


def test_speed_shows_a_running_benchmarks_progress_and_stop_above_its_settings(store_file):
    """Below the form, at 1280x720 neither the progress nor Stop was on the screen."""
    at = start_tiny_benchmark()
    job = at.session_state["speed_job"]
    try:
        keys = [getattr(e, "key", None) for e in in_page_order(at)]
        assert keys.index("speed_stop") < keys.index("speed_start")
        kinds = [type(e).__name__ for e in in_page_order(at)]
        assert kinds.index("Progress") < keys.index("speed_start")
    finally:
        job.proc.kill()
        job.proc.wait(timeout=60)
    at.run()  # ended: its view (results or why none) under the form again
    found = in_page_order(at)
    keys = [getattr(e, "key", None) for e in found]
    command = next(i for i, e in enumerate(found) if str(getattr(e, "value", "")).startswith("Command:"))
    assert "speed_stop" not in keys and command > keys.index("speed_start")
    shutil.rmtree(job.folder, ignore_errors=True)


def test_speed_shows_the_last_benchmark_after_a_reload_and_how_long_it_took(store_file):
    first = start_tiny_benchmark()
    job = first.session_state["speed_job"]
    try:
        assert job.proc.wait(timeout=WORKER_TIMEOUT_S) == 0, job.log_path.read_text()[-2000:]
        took = job.seconds()
        time.sleep(1.5)
        assert job.seconds() == took, "an ended benchmark's time stops at its last event, not at the looking"
        again = open_page("speed")  # the same tab reloaded: a new session
        assert not again.exception, again.exception
        assert again.session_state["speed_job"] is job
        last = "Below: the last benchmark run on this dashboard, started at"
        assert any(i.startswith(last) for i in texts(again.info))
        assert any(s.startswith("Done in") for s in texts(again.success)), "its results, not an empty page"
        assert not again.button(key="speed_start").disabled
        again.checkbox(key="speed_log_y_live").uncheck().run()  # any click: it is still not this tab's own
        assert any(i.startswith(last) for i in texts(again.info)), "the notice stays after a first click"
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
        shutil.rmtree(job.folder, ignore_errors=True)
    assert open_page("speed").session_state.get("speed_job") is not job, "its folder gone: not shown"


class EndedJob:
    """A stand-in for the Speed page's SpeedJob (the page's module is a script: not imported here) that ended."""

    def __init__(self, folder: Path, status: int):
        self.proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({status})"])
        self.proc.wait(timeout=30)
        self.folder, self.settings, self.owner = folder, {}, "another tab"
        self.started, self.stop_requested = time.time() - 60, False

    def running(self) -> bool:
        return False

    def seconds(self) -> float:
        return 12.0

    def events(self) -> list[dict]:
        return [json.loads(line) for line in (self.folder / "progress.jsonl").read_text().splitlines()]

    def error(self) -> str | None:
        return None if self.proc.returncode == 0 else "RuntimeError: it broke"


def ended_job(tmp_path, name: str, events: list[dict], status: int) -> EndedJob:
    """A Speed benchmark that ended with ``status``, having written ``events``, last in the server's registry."""
    from pages._common import benchmark_jobs

    folder = tmp_path / name
    folder.mkdir()
    (folder / "progress.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    job = EndedJob(folder, status)
    benchmark_jobs().jobs.append(job)
    return job


def test_speed_shows_no_failed_or_empty_benchmark_to_a_new_tab(store_file, tmp_path):
    header = {"kind": "header", "fraction": 0.05, "message": "", "header": {"device": "cpu"}}
    failed = ended_job(tmp_path, "failed", [header], status=1)
    assert open_page("speed").session_state.get("speed_job") is None, "a new tab opens on its form, not a failure"
    done = {"kind": "done", "fraction": 1.0, "message": "", "header": header["header"], "stopped": True}
    stopped = ended_job(tmp_path, "stopped", [header, done], status=0)
    at = open_page("speed")
    assert at.session_state.get("speed_job") is None, "stopped before its first row: nothing to show"
    at.session_state["speed_job"] = stopped  # this tab's own: what it says
    at.run()
    assert not at.exception, at.exception
    assert "The benchmark was stopped before it measured a row." in texts(at.warning)
    assert not any("rows measured before" in w for w in texts(at.warning))
    assert failed.folder.is_dir(), "left for the tab that started it"


def test_speed_shows_and_stops_a_benchmark_started_in_another_tab(store_file):
    first = start_tiny_benchmark()
    job = first.session_state["speed_job"]
    try:
        second = open_page("speed")  # another tab, or the same one reloaded: a new session
        assert not second.exception, second.exception
        assert second.session_state["speed_job"] is job
        assert any("started in another tab" in i for i in texts(second.info))
        assert second.button(key="speed_start").disabled, "one benchmark at a time"
        second.button(key="speed_stop").click().run()
        assert job.proc.wait(timeout=60) is not None and job.stop_requested
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
        shutil.rmtree(job.folder, ignore_errors=True)


def test_two_benchmarks_started_at_once_start_one(tmp_path):
    from pages._common import BenchmarkJobs

    class Job:
        def __init__(self):
            self.folder, self.proc = tmp_path, None
            self.alive = True

        def running(self):
            return self.alive

    registry, made, barrier = BenchmarkJobs(), [], threading.Barrier(2)

    def make():
        time.sleep(0.2)  # a process starting: the other click arrives meanwhile
        made.append(Job())
        return made[-1]

    def click(out):
        barrier.wait()
        out.append(registry.start(make))

    answers: list = []
    threads = [threading.Thread(target=click, args=(answers,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1, "one process"
    assert sorted(a[0] is None for a in answers) == [False, True] and all((a[0] or a[1]) is made[0] for a in answers)
    made[0].alive = False


def test_benchmark_folders_of_killed_servers_are_swept_and_live_ones_kept(tmp_path):
    from pages._common import (
        BENCH_PID_FILE,
        SERVER_FILE,
        SPEED_FOLDER_PREFIX,
        STALE_AFTER,
        process_identity,
        sweep_speed_folders,
    )

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # a pid that has ended: a killed server's, or a benchmark's that finished
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:

        def folder(name, bench=None, server=None, age=0.0):
            f = tmp_path / f"{SPEED_FOLDER_PREFIX}{name}"
            f.mkdir()
            (f / "log.txt").write_text("a benchmark's log")
            if bench is not None:
                (f / BENCH_PID_FILE).write_bytes(bench if isinstance(bench, bytes) else str(bench).encode())
            if server is not None:
                (f / SERVER_FILE).write_text(server)
            for path in (f / "log.txt", f):
                os.utime(path, (time.time() - age, time.time() - age))
            return f

        dead_server = folder(f"{ended.pid}-abc", bench=ended.pid)
        dead_server_no_bench = folder(f"{ended.pid}-def")
        live_server = folder(f"{os.getpid()}-ghi", bench=ended.pid, server=process_identity(os.getpid()))
        dead_server_bench_running = folder(f"{ended.pid}-jkl", bench=process_identity(running.pid))
        # This pid runs, but another process has it now (a restarted container's server got the same pid).
        reused_pid = folder(f"{os.getpid()}-mno", server=f"{os.getpid()} 1")
        old_form_old = folder("pqr123", age=STALE_AFTER + 60)
        old_form_new = folder("stu456")
        old_form_digits = folder("12345678")  # mkdtemp's suffix all digits: no dash, so the older form
        odd_name = folder("\u00b2-x")  # a digit to str.isdigit, not to int(): the older form, new, kept
        odd_pid_file = folder(f"{ended.pid}-vwx", bench=b"\xff\xfe")
        other = tmp_path / "bench-spee"
        other.mkdir()
        link = tmp_path / f"{SPEED_FOLDER_PREFIX}{ended.pid}-link"
        link.symlink_to(live_server)
        removed = sweep_speed_folders(tmp_path)
    finally:
        running.kill()
        running.wait()
    assert sorted(removed) == sorted([dead_server, dead_server_no_bench, reused_pid, old_form_old])
    assert not any(f.exists() for f in removed)
    kept = (live_server, dead_server_bench_running, old_form_new, old_form_digits, odd_name, odd_pid_file, other, link)
    assert all(f.exists() for f in kept)
    assert sweep_speed_folders(tmp_path / "missing") == []


def test_pages_say_what_else_shares_the_cores(monkeypatch):
    from bench_core.locks import ENV_CPU_LOCK
    from pages._common import sharing_note

    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    assert sharing_note([], False) is None
    note = sharing_note([{"id": 4}], False)
    assert note.startswith("Run 4 is training on this machine: a run started on the CPU now waits for it (")
    note = sharing_note([{"id": 4}, {"id": 6}], True, "a benchmark")
    assert note.startswith("Runs 4, 6 are training and a Speed benchmark is running on this machine: a benchmark")
    assert "waits for them" in note
    waiting = {"id": 6, "status": "running", "note": "waiting for the CPU: run 4 is using it"}
    note = sharing_note([{"id": 4, "status": "running"}, waiting, {"id": 7, "status": "running"}], False)
    assert note.startswith("Runs 4, 7 are training and run 6 is waiting for its turn on this machine: a run")
    monkeypatch.setenv(ENV_CPU_LOCK, "0")  # runs at once: they share the cores
    assert "shares its cores" in sharing_note([{"id": 4}], False)


def test_speed_runs_a_benchmark_and_plots_its_rows(store_file):
    at = open_page("speed")
    for name, value in {"shape": "mnist", "sizes": [2], "rows": ["classic-vectorized", "batchensemble-repeat"],
                        "steps": 2, "warmup": 1, "repeats": 1, "hidden": 16, "device": "cpu"}.items():  # fmt: skip
        at.session_state[f"speed_set_{name}"] = value
    at.run()
    at.button(key="speed_start").click().run()
    assert not at.exception, at.exception
    assert not at.error, texts(at.error)
    job = at.session_state["speed_job"]
    assert job.proc.wait(timeout=WORKER_TIMEOUT_S) == 0, job.log_path.read_text()[-2000:]
    at.run()
    assert not at.exception, at.exception
    assert any("Done in" in t for t in texts(at.success))
    seconds, memory, parts, steps = charts(at)
    assert seconds["layout"]["title"]["text"].startswith("Seconds per training epoch")
    assert memory["layout"]["title"]["text"].startswith("Peak training memory")
    assert {tr["name"] for tr in seconds["data"]} >= {"classic vectorized", "BatchEnsemble repeat"}
    ticks = seconds["layout"]["yaxis"]["tickvals"]  # the log axis from its first tick to its last, both shown
    assert seconds["layout"]["yaxis"]["range"] == pytest.approx([np.log10(ticks[0]), np.log10(ticks[-1])])
    assert parts["layout"]["title"]["text"] == "Where an epoch goes, E = 2"
    names = [tr["name"] for tr in parts["data"]]
    assert names == ["matrix products at the floor rate", "everything else"], "no workers without reference rows"
    assert [y.split(" · ")[0] for y in parts["data"][0]["y"]] == ["classic vectorized", "BatchEnsemble repeat"]
    shares = np.array([tr["x"] for tr in parts["data"]], dtype=float)
    assert shares.sum(0) == pytest.approx([100, 100]), "each row's parts add up to its epoch"
    assert steps["layout"]["title"]["text"] == "Where a training step goes, E = 2"
    assert [tr["name"] for tr in steps["data"]][:-1] == list(STEP_PARTS)
    assert steps["data"][-1]["name"].startswith("floor"), "a tick at each row's floor"
    epochs = np.array([float(y.split(" · ")[1].rstrip(" s")) for y in steps["data"][0]["y"]])
    per_epoch = np.array([tr["x"] for tr in steps["data"][:-1]], dtype=float).sum(0)
    assert per_epoch == pytest.approx(epochs, rel=0.01), "each bar is its row's epoch (labels print 3 digits)"
    (table,) = at.dataframe
    assert len(table.value) == 2
    assert list(table.value["method"]) == ["classic", "BatchEnsemble"], "spelled as the other pages spell it"
    assert "× classic vectorized" in table.value.columns
    assert "× faster than reference" not in table.value.columns, "no reference rows were run"
    signature, _ = at.session_state["speed_built_views"]
    assert signature == ((job.started, 2), True), "the live view's figures are kept until a row comes"
    assert any("stated for E = 5" in c for c in texts(at.caption)), "no E = 5 row: the targets say so"
    at.button(key="speed_start").click().run()  # a second run: the first one's files stay (another tab may show it)
    second = at.session_state["speed_job"]
    assert second.folder != job.folder and job.folder.exists() and second.folder.exists()
    assert second.proc.wait(timeout=WORKER_TIMEOUT_S) == 0, second.log_path.read_text()[-2000:]
    shutil.rmtree(second.folder)
    shutil.rmtree(job.folder)


def test_speed_takes_the_median_of_three_repeats_by_default(store_file):
    at = open_page("speed")
    repeats = at.number_input(key="speed_set_repeats").value
    assert repeats == 3, "a median of two repeats is their mean; more than 3 make the page's default run longer"
    assert BenchSettings().repeats == 9, "the command line's: steadier medians for the targets"


@pytest.mark.parametrize(
    ("name", "step_rows", "warned"),
    [
        # with where a step goes: the workbench's rows of E = 5; started on a busy machine
        ("cpu-e5-2026-11-26-session6.json", 4, "The machine was busy when the benchmark started (load average 1.0"),
        # written before the profiled steps: no such figure; six rows' repeats spread
        ("cpu-e5-2026-11-26-session5.json", 0, "within some rows: timed repeats more than 25 % apart (single E=1:"),
    ],
)
def test_speed_shows_a_saved_benchmark(store_file, name, step_rows, warned):
    at = open_page("speed")
    content = (ROOT / "docs" / "bench" / name).read_bytes()
    at.get("file_uploader")[0].upload(name, content, "application/json")
    at.run()
    assert not at.exception, at.exception
    assert not at.error, texts(at.error)
    (warning,) = texts(at.warning)
    assert warned in warning and warning.endswith("."), warning
    titles = [f["layout"]["title"]["text"] for f in charts(at)]
    assert titles[:3] == ["Seconds per training epoch", "Peak training memory", "Where an epoch goes, E = 5"]
    steps = [f for f in charts(at) if f["layout"]["title"]["text"] == "Where a training step goes, E = 5"]
    assert len(steps) == (1 if step_rows else 0)
    if steps:
        assert len(steps[0]["data"][0]["y"]) == step_rows
        assert len(steps[0]["layout"]["shapes"]) == step_rows, "one floor tick per row"
    assert any("Targets at E = 5" in t for t in texts(at.markdown))
    marks = [t for t in texts(at.markdown) if "≤" in t or "≥" in t]
    assert len(marks) == 6 and all(":material/" in t for t in marks), marks  # icons drawn without an emoji font
    # an empty cell (a ratio that does not apply to the row) reads "—", not the grid's "None"
    (table,) = at.dataframe
    assert table.value.isna().any(axis=None)
    pinned = {name for name, config in json.loads(table.proto.columns).items() if config.get("pinned")}
    assert pinned == {"method", "mode", "E"}, "the row's name in view while the table scrolls sideways"
    names = set(table.value["method"]) | set(table.value["mode"])
    assert "BatchEnsemble" in names and "batchensemble" not in names, names  # a reference row's mode too
    assert table.proto.placeholder == MISSING


def test_speed_shows_the_floors_rate_beside_the_turns_and_its_targets_where_the_file_has_them(store_file):
    name = "cpu-e5-2026-11-28-session32-run2.json"  # the first runs with the rate measured beside each turn
    saved = json.loads((ROOT / "docs" / "bench" / name).read_text())
    rates = next(r for r in saved["rows"] if r["name"] == "classic-vectorized")["floor_rates_by_turn"]
    at = open_page("speed")
    at.get("file_uploader")[0].upload(name, json.dumps(saved).encode(), "application/json")
    at.run()
    assert not at.exception, at.exception
    (caption,) = [c for c in texts(at.caption) if c.startswith("The floor's rate beside")]
    assert caption.endswith(f"3 turns): {min(rates) / 1e9:.1f}–{max(rates) / 1e9:.1f} GFLOP/s.")
    marks = [t for t in texts(at.markdown) if "≤" in t or "≥" in t]
    assert len(marks) == 8 and sum("rate measured beside each turn" in t for t in marks) == 2, marks
    del saved["targets"]  # recomputed from the rows, as the live view does: the same eight
    at.get("file_uploader")[0].upload(name, json.dumps(saved).encode(), "application/json")
    at.run()
    assert [t for t in texts(at.markdown) if "≤" in t or "≥" in t] == marks


def test_speed_says_how_many_repeats_each_figure_is_the_median_of(store_file):
    name = "cpu-e5-2026-11-28-session35-new-run6.json"  # nine turns a workbench row, three a reference row
    saved = json.loads((ROOT / "docs" / "bench" / name).read_text())
    at = open_page("speed")
    at.get("file_uploader")[0].upload(name, json.dumps(saved).encode(), "application/json")
    at.run()
    assert not at.exception, at.exception
    (caption,) = [c for c in texts(at.caption) if " · s/epoch " in c]
    assert caption.endswith(", median of 9 repeats (reference rows: 3)"), caption
    del saved["header"]["settings"]["reference_repeats"]  # saved before it: every row took `repeats`
    saved["header"]["settings"]["repeats"] = 3
    at.get("file_uploader")[0].upload(name, json.dumps(saved).encode(), "application/json")
    at.run()
    (caption,) = [c for c in texts(at.caption) if " · s/epoch " in c]
    assert caption.endswith("each repeat starts with 1 untimed step more, median of 3 repeats"), caption


def test_speed_says_how_the_training_steps_ran_where_the_file_says(store_file):
    """A CPU run's header names the step's path (C++ operators, Python, autograd); files from before say "eager"."""
    name = "cpu-e5-2026-11-26-session14-run2.json"
    saved = json.loads((ROOT / "docs" / "bench" / name).read_text())
    assert saved["header"]["steps"] == "eager", "written before the header named the CPU's path"
    cpp = (
        "forward and backward written out without autograd, as C++ operators (bench_core.native); "
        "split batching's first-layer gradients from one kernel"
    )
    mkl = "torch.mm (MKL): on Intel CPUs it ran them faster than oneDNN (set BENCH_ONEDNN=1 for oneDNN)"
    for steps, shown, products in (("eager", None, None), (cpp, f"Training steps: {cpp}.", mkl)):
        at = open_page("speed")
        saved["header"]["steps"] = steps
        saved["header"]["products"] = products  # named since the twenty-seventh session
        at.get("file_uploader")[0].upload(name, json.dumps(saved).encode(), "application/json")
        at.run()
        assert not at.exception, at.exception
        captions = [c for c in texts(at.caption) if c.startswith("Training steps")]
        assert captions == ([shown] if shown else [])
        named = [c for c in texts(at.caption) if c.startswith("First layers' products")]
        assert named == ([f"First layers' products in training: {products}."] if products else [])


def _saved_bench(change) -> bytes:
    saved = json.loads((ROOT / "docs" / "bench" / "cpu-e5-2026-11-27-session18-run4.json").read_text())
    change(saved)
    return json.dumps(saved).encode()


@pytest.mark.parametrize(
    "content",
    [
        b'{"rows": 3}',
        b"[1, 2]",
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON decoder goes
        pytest.param(lambda d: d.__setitem__("header", "x"), id="header-text"),
        pytest.param(lambda d: d.__setitem__("targets", {"x": 1}), id="targets-object"),
        pytest.param(lambda d: [r.__setitem__("epoch_seconds", 0) for r in d["rows"]], id="zero-seconds"),
        pytest.param(lambda d: [r.__setitem__("step_shares", [1, 2]) for r in d["rows"]], id="shares-list"),
    ],
)
def test_speed_says_in_one_line_when_a_file_is_not_a_benchmark(store_file, content):
    """One error line, and nothing of the file drawn above it (a view half drawn was left before)."""
    at = open_page("speed")
    data = _saved_bench(content) if callable(content) else content
    at.get("file_uploader")[0].upload("notes.json", data, "application/json")
    at.run()
    assert not at.exception, at.exception
    (error,) = texts(at.error)
    assert "not a file written by `python -m bench_core bench --json`" in error and "\n" not in error
    assert not charts(at)


# ----------------------------------------------------------------------------- Results


def test_results_keeps_the_chosen_run_and_calls_no_deleted_run_training(store_file):
    older, newer = make_run(store_file), make_run(store_file)
    at = open_page("results")
    assert at.selectbox[0].value == newer
    at.selectbox[0].set_value(older).run()
    at.switch_page("pages/learn.py").run()
    at.switch_page("pages/results.py").run()
    assert at.selectbox[0].value == older, "the run chosen before, not the newest again"
    with RunStore(store_file) as store:
        store.delete_run(newer)
    at.session_state["live_run_id"] = newer  # this session's last live run, deleted on the Runs page
    at.run()
    assert not at.exception, at.exception
    assert not any("still training" in i for i in texts(at.info))


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE results SET data = json_set(data, '$.agreement', json('[[1, 0], [0]]')) WHERE method = 'classic'",
        "UPDATE records SET data = json_set(data, '$.epoch', 'one')",
        "UPDATE results SET data = '[1, 2]' WHERE method = 'classic'",
        "UPDATE records SET data = 'null'",
    ],
    ids=["ragged-agreement", "epoch-as-text", "result-a-list", "record-null"],
)
def test_results_of_a_store_edited_by_hand_is_one_line_at_most(store_file, sql):
    make_run(store_file)
    with sqlite3.connect(store_file) as conn:
        conn.execute(sql)
    at = open_page("results")
    assert not at.exception, at.exception
    assert len(at.error) <= 1 and all("changed by hand" in e for e in texts(at.error))
    assert at.get("expander"), "the run's settings still show"


def test_results_gives_no_gain_to_two_decimals_as_level_not_red(store_file):
    """-0.00004 of a point read "-0.00 points" in red, under a down arrow."""
    run_id = make_run(store_file)
    with RunStore(store_file) as store:
        result = store.get_run(run_id)["results"]["classic"]
        store.set_result(run_id, "classic", {**result, "ensemble_accuracy": result["mean_member_accuracy"] - 4e-7})
    at = open_page("results")
    (classic,) = [m for m in at.metric if m.label == "classic"]
    assert classic.delta == "0.00 points"
    from streamlit.proto.Metric_pb2 import Metric

    assert classic.proto.color == Metric.MetricColor.GRAY and classic.proto.direction == Metric.MetricDirection.NONE


def test_results_shows_the_latest_finished_run(store_file):
    make_run(store_file)
    run_id = make_run(store_file)
    at = open_page("results")
    assert not at.exception, at.exception
    assert at.selectbox[0].value == run_id
    found = heatmaps(at)
    assert len(found) == 2, "one agreement matrix per method"
    run = RunStore(store_file).get_run(run_id)
    zmin = agreement_floor(run["results"])
    assert 0 <= zmin <= 0.95
    for figure in found:  # one scale for both: a colour means one agreement in either
        assert (figure["layout"]["coloraxis"]["cmin"], figure["layout"]["coloraxis"]["cmax"]) == (zmin, 1)
        z = figure["data"][0]["z"]  # E x E: Plotly 6 encodes it as a typed array, Plotly 5 as lists
        assert (z["shape"] if isinstance(z, dict) else f"{len(z)}, {len(z[0])}") == "3, 3"
    assert any(f"from {zmin:.2f} (at or under the lowest agreement) to 1" in c for c in texts(at.caption))
    assert [f["layout"]["title"]["text"].split("<br>")[0] for f in found] == ["classic", "BatchEnsemble"]
    gains = [m.delta for m in at.metric if m.label in ("classic", "BatchEnsemble")]
    assert len(gains) == 2 and all(re.fullmatch(r"([+-]\d+\.\d\d|0\.00) points", g) for g in gains), gains  # 1024 px
    ratios = {m.label: m.value for m in at.metric if m.value.endswith("×")}
    assert list(ratios) == ["Training time", "Parameters"], "short labels: at 1024 px the long ones were cut"
    assert "The classic ensemble's cost ÷ BatchEnsemble's" in texts(at.caption), "what the ratios are, above them"
    assert float(ratios["Parameters"].rstrip("×")) > 1, "classic has more parameters"
    table = at.table[0].value
    assert list(table.columns) == ["classic", "BatchEnsemble"]
    assert "ensemble accuracy (mean softmax)" in table.index


def test_results_with_the_single_model_beside_both_ensembles_draw_only_their_agreement(store_file):
    make_run(store_file, tiny_config(methods=("single", "classic", "batchensemble")))
    at = open_page("results")
    assert not at.exception, at.exception
    found = heatmaps(at)
    assert [f["layout"]["title"]["text"].split("<br>")[0] for f in found] == ["classic", "BatchEnsemble"]
    assert "single: one member, so no agreement between members to show." in texts(at.caption)
    with sqlite3.connect(store_file) as conn:  # an older or edited result without its matrix
        conn.execute("UPDATE results SET data = json_remove(data, '$.agreement') WHERE method = 'classic'")
    at.run()
    assert not at.exception, at.exception
    assert [f["layout"]["title"]["text"].split("<br>")[0] for f in heatmaps(at)] == ["BatchEnsemble"]
    assert not any("classic" in c and "one member" in c for c in texts(at.caption)), "classic has 3 members"


def test_results_say_when_one_slow_epoch_drives_the_time_ratio(store_file):
    run_id = make_run(store_file, tiny_config(methods=("classic", "batchensemble")))
    at = open_page("results")
    with sqlite3.connect(store_file) as conn:
        for method, seconds in (("classic", [1.1, 25.8, 1.13]), ("batchensemble", [1.0, 1.0, 1.0])):
            conn.execute(
                "UPDATE results SET data = json_set(data, '$.epoch_seconds', json(?), '$.train_seconds', ?) "
                "WHERE run_id = ? AND method = ?",
                (json.dumps(seconds), sum(seconds), run_id, method),
            )
    at.run()
    assert not at.exception, at.exception
    (note,) = [c for c in texts(at.caption) if "Uneven epochs" in c]
    assert "classic's slowest epoch took 25.80 s against a median of 1.13 s" in note
    assert note.endswith("the ratio of their median epochs is 1.13×."), note
    ratio = next(m.value for m in at.metric if m.label.startswith("Training time"))
    assert ratio == "9.34×", "the card keeps the whole training's ratio"


def test_results_of_a_single_model_with_one_member(store_file):
    make_run(store_file, tiny_config(methods=("single",), ensemble_size=1))
    at = open_page("results")
    assert not at.exception, at.exception
    assert not at.error
    assert not heatmaps(at), "a 1 x 1 matrix says nothing"
    assert "single: one member, so no agreement between members to show." in texts(at.caption)
    assert [m.label for m in at.metric] == ["single"], "no ratios without both ensembles"
    table = at.table[0].value
    assert table.loc["mean pairwise disagreement", "single"] == "—", "one member has no pair"
    assert table.loc["mutual information (nats)", "single"] == "—"
    glossary = [m.value for m in at.expander[0].markdown] if at.expander else []
    assert glossary and "**ECE (15 bins)**: expected calibration error" in glossary[0]


def test_results_of_a_failed_run_say_so(store_file):
    with RunStore(store_file) as store:
        run_id = store.create_run(tiny_config().to_dict(), source="test", status="queued")
        store.finish_run(run_id, "failed", "synthetic went wrong on purpose")
    at = open_page("results")
    assert not at.exception, at.exception
    assert any("failed: synthetic went wrong on purpose" in e for e in texts(at.error))
    assert any("no results" in i for i in texts(at.info))


# ----------------------------------------------------------------------------- Runs


def test_runs_lists_compares_and_deletes(store_file):
    first = make_run(store_file)
    second = make_run(store_file)
    with RunStore(store_file) as store:
        gone = store.create_run(tiny_config().to_dict(), source="test", status="queued")
        store.finish_run(gone, "interrupted", "its process ended")
    at = open_page("runs")
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table["id"]) == [gone, second, first]
    assert "interrupted" in table.loc[table["id"] == gone, "status"].iloc[0]
    assert len(at.get("download_button")) == 2
    found = [type(e).__name__ + ":" + str(getattr(e, "value", ""))[:12] for e in in_page_order(at)]
    tick = next(i for i, e in enumerate(found) if e.startswith("Caption:Tick runs at"))
    assert tick > next(i for i, e in enumerate(found) if e.startswith("Dataframe")), "under the table's toolbar"

    at.session_state["runs_table"] = {"selection": {"rows": [1, 2], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, at.exception
    assert len(charts(at)) == 1, "the selected runs' loss curves"
    compared = at.dataframe[1].value  # [0]: the runs table
    assert f"#{first} classic" in compared.columns and f"#{second} BatchEnsemble" in compared.columns

    at.button(key="runs_delete").click().run()
    assert any(f"runs {second}, {first}? Their records" in w and "can't be undone" in w for w in texts(at.warning))
    at.button(key="runs_delete_yes").click().run()
    assert not at.exception, at.exception
    with RunStore(store_file) as store:
        assert [r["id"] for r in store.list_runs()] == [gone]
    at.session_state["runs_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    at.button(key="runs_delete").click().run()
    assert any(f"Delete run {gone}? Its records" in w for w in texts(at.warning)), texts(at.warning)
    at.button(key="runs_delete_no").click().run()
    assert "Download the figures of the selected run." in texts(at.caption)
    at.session_state["runs_table"] = {"selection": {"rows": [], "columns": [], "cells": []}}
    at.run()
    assert "Download the figures of the run." in texts(at.caption), "one run: not 'all 1 run'"
    assert list(at.dataframe[0].value["id"]) == [gone]


def test_ticked_runs_stay_ticked_when_other_sessions_add_or_delete_runs(store_file):
    """The table's selection is positions; a run made or deleted elsewhere must not move the ticks
    onto other runs (which Delete would then take)."""
    with RunStore(store_file) as store:
        ids = [store.create_run(tiny_config().to_dict(), source="test", status="queued") for _ in range(4)]
        for run_id in ids:
            store.finish_run(run_id, "stopped")
    at = open_page("runs")
    assert list(at.dataframe[0].value["id"]) == ids[::-1]
    at.session_state["runs_table"] = {"selection": {"rows": [1], "columns": [], "cells": []}}  # ids[2]
    at.run()
    with RunStore(store_file) as store:  # another session makes a run: every row moves down one
        made = store.create_run(tiny_config().to_dict(), source="test", status="queued")
        store.finish_run(made, "stopped")
    at.run()
    assert not at.exception, at.exception
    assert list(at.dataframe[0].value["id"]) == [made, *ids[::-1]]
    assert list(at.session_state["runs_table"]["selection"]["rows"]) == [2], "still on the same run"
    with RunStore(store_file) as store:  # and deletes two, one above it and one below
        store.delete_run(ids[3])
        store.delete_run(ids[1])
    at.run()
    assert list(at.dataframe[0].value["id"]) == [made, ids[2], ids[0]]
    assert list(at.session_state["runs_table"]["selection"]["rows"]) == [1], "still on the same run"
    assert at.button(key="runs_delete").label == "Delete 1 selected run"
    assert any(f"Open run {ids[2]}" in link.label for link in at.get("page_link"))


def test_deleting_runs_one_of_which_went_meanwhile_deletes_the_others(store_file):
    with RunStore(store_file) as store:
        ids = [store.create_run(tiny_config().to_dict(), source="test", status="queued") for _ in range(3)]
        for run_id in ids:
            store.finish_run(run_id, "failed", "x")
    at = open_page("runs")
    at.session_state["runs_table"] = {"selection": {"rows": [0, 1], "columns": [], "cells": []}}
    at.run()
    at.button(key="runs_delete").click().run()
    with RunStore(store_file) as store:
        store.delete_run(ids[2])  # the newest, deleted in another session before Yes
    at.button(key="runs_delete_yes").click().run()
    assert not at.exception, at.exception
    assert not at.error, texts(at.error)
    with RunStore(store_file) as store:
        assert [r["id"] for r in store.list_runs()] == [ids[0]]


def test_runs_stops_a_ticked_run_that_trains(store_file):
    run_id = active_run(store_file, source="dashboard")
    at = open_page("runs")
    at.session_state["runs_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, at.exception
    assert not at.get("page_link"), "no link to Results, which shows ended runs"
    at.button(key="runs_stop").click().run()
    assert not at.exception, at.exception
    with RunStore(store_file) as store:
        assert store.get_run(run_id)["stop_requested"]
    assert at.button(key="runs_stop").disabled, "asked once"


def test_results_linked_to_a_run_that_trains_says_so(store_file):
    finished = make_run(store_file)
    running = active_run(store_file)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = str(running)
    at.run()
    at.switch_page("pages/results.py").run()
    assert not at.exception, at.exception
    assert any(f"Run {running} is still training" in i for i in texts(at.info))
    assert at.selectbox[0].value == finished
    with RunStore(store_file) as store:
        store.set_note(running, "waiting for the CPU: run 9 is using it; this run is next")
    at.run()
    assert not at.exception, at.exception
    assert any(f"Run {running} is waiting for its turn: its results appear" in i for i in texts(at.info))
    assert not any("still training" in i for i in texts(at.info))


def test_results_during_the_first_run_say_one_thing(store_file):
    at = open_page("results")
    assert texts(at.info) == ["No run has ended yet: train one on the Train page."]
    running = active_run(store_file, source="dashboard")
    at.run()
    assert texts(at.info) == [
        f"No run has ended yet: run {running} is under way; its results appear here when it ends."
    ]
    at.session_state["live_run_id"] = running  # this session's run: its own line, and not "train one"
    at.run()
    assert not at.exception, at.exception
    assert texts(at.info) == [f"Run {running} is still training: its results appear here when it ends."]
    second = active_run(store_file)
    del at.session_state["live_run_id"]
    at.run()
    assert texts(at.info) == [
        f"No run has ended yet: runs {running} and {second} are under way; their results appear here as they end."
    ]


def test_results_keeps_the_users_pick_over_a_link_when_another_run_ends(store_file):
    first, second = make_run(store_file), make_run(store_file)
    running = active_run(store_file)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = str(second)  # Train's "See the results of run N"
    at.run()
    at.switch_page("pages/results.py").run()
    assert at.selectbox[0].value == second
    at.selectbox[0].set_value(first).run()
    with RunStore(store_file) as store:
        store.finish_run(running, "stopped")  # the list changes: the select box is drawn anew
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox[0].value == first, "the user's pick, not the link's run again"


def test_results_seen_while_this_sessions_run_trains_open_that_run_once_it_ends(store_file):
    """A look at Results during training (an older run shown) must not make it open the older run afterwards."""
    finished = make_run(store_file)
    running = active_run(store_file, source="dashboard")
    at = open_page("results")
    at.session_state["live_run_id"] = at.session_state["last_run_id"] = running  # as Train's launch sets them
    at.run()
    assert at.selectbox[0].value == finished and any(f"Run {running} is still training" in i for i in texts(at.info))
    at.switch_page("pages/learn.py").run()
    with RunStore(store_file) as store:
        store.finish_run(running, "stopped")
    at.switch_page("pages/results.py").run()
    assert not at.exception, at.exception
    assert at.selectbox[0].value == running, "the run this session launched, now ended"


def test_many_ticked_runs_compare_the_first_twelve(store_file):
    with RunStore(store_file) as store:
        ids = [store.create_run(tiny_config().to_dict(), source="test", status="queued") for _ in range(15)]
        for run_id in ids:
            store.finish_run(run_id, "failed", "x")
        store.delete_run(ids[0])
    assert [r["id"] for r in fetch_runs(ids[:3], str(store_file))] == ids[1:3]  # a deleted run: left out
    at = open_page("runs")
    at.session_state["runs_table"] = {"selection": {"rows": list(range(14)), "columns": [], "cells": []}}
    at.run()
    assert not at.exception, at.exception
    assert any("the first 12 in the table" in i for i in texts(at.info))
    assert any("Download the figures of the 14 selected runs" in c for c in texts(at.caption))


def test_exports_hold_every_figure_of_every_method(store_file):
    run_id = make_run(store_file)
    with RunStore(store_file) as store:
        runs = [store.get_run(run_id)]
    rows = list(csv.DictReader(io.StringIO(export_csv(runs))))
    assert [r["method"] for r in rows] == ["classic", "batchensemble"]
    assert float(rows[0]["ensemble_accuracy"]) == pytest.approx(runs[0]["results"]["classic"]["ensemble_accuracy"])
    assert rows[1]["params"] == str(runs[0]["results"]["batchensemble"]["params"])
    data = json.loads(export_json(runs))
    assert data[0]["id"] == run_id and set(data[0]["results"]) == {"classic", "batchensemble"}
    assert data[0]["ratios"]["params"] > 1


# ----------------------------------------------------------------------------- Learn


def test_learn_with_sliders_moved(store_file):
    at = open_page("learn")
    assert len(charts(at)) == 4, "W, s r^T, W_k and the parameter count"
    at.slider(key="learn_members").set_value(8).run()
    at.slider(key="learn_member_of_8").set_value(6).run()
    assert any("**Member 6**" in m.value for m in at.markdown), "the picked member's r and s beside W_k"
    at.radio(key="learn_init").set_value("random_sign").run()
    at.slider(key="learn_members").set_value(1).run()
    at.slider(key="learn_mark").set_value(1).run()
    (be,) = [m for m in at.metric if m.label.startswith("BatchEnsemble")]  # E = 1: r, s and a bias on one MLP
    assert be.delta.endswith("as many as classic"), "not '0.99x fewer'"
    at.slider(key="learn_mark").set_value(5).run()
    (be,) = [m for m in at.metric if m.label.startswith("BatchEnsemble")]
    assert be.delta.startswith("classic has") and be.proto.direction == be.proto.NONE, 'no arrow beside "as many"'
    at.selectbox(key="learn_dataset").set_value("mnist").run()
    assert not at.exception, at.exception
    assert at.latex, "the formulas"
    devices = [m.value for m in at.markdown if "Not on every device" in m.value]
    assert devices and "CUDA graph" in devices[0], "where BatchEnsemble is not faster: on a GPU"
    calibration = [m.value for m in at.markdown if "probabilities should mean what they say" in m.value]
    assert calibration and all(name in calibration[0] for name in ("**NLL**", "**ECE**", "**Brier score**"))


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("ensemble_size", [1, 4])
def test_parameter_formulas_match_the_models(ensemble_size):
    cfg = tiny_config().model
    cfg.ensemble_size = ensemble_size
    sizes = [16, cfg.hidden, cfg.hidden, 10]

    def count(method):
        return sum(p.numel() for p in build_model(method, cfg, 16, 10).parameters())

    assert count("single") == mlp_params(sizes)
    assert count("classic") == ensemble_size * mlp_params(sizes)
    assert count("batchensemble") == batchensemble_params(sizes, ensemble_size)


def test_loss_series_prefers_step_records_and_falls_back_to_epochs():
    records = [
        {"kind": "step", "method": "batchensemble", "epoch": 1, "step": 2, "steps_per_epoch": 4,
         "member_loss": [1.0, 2.0], "loss": 1.5},
        {"kind": "epoch", "method": "batchensemble", "epoch": 1, "member_loss": [0.9, 1.9], "loss": 1.4},
        {"kind": "epoch", "method": "classic", "epoch": 1, "member_loss": [0.5, None], "loss": 0.5},
    ]  # fmt: skip
    series = loss_series(records)
    assert list(series) == ["classic", "batchensemble"]
    assert series["batchensemble"] == {"x": [0.5], "members": [[1.0], [2.0]], "mean": [1.5]}
    assert series["classic"] == {"x": [1.0], "members": [[0.5], [None]], "mean": [0.5]}


def test_a_stopped_epoch_is_drawn_at_the_part_of_it_that_ran():
    """Stopped 24 of 32 steps into epoch 3: at 2.75, on Train's epoch-records curve and on Runs' per-epoch one."""
    records = [
        {"kind": "epoch", "method": "classic", "epoch": e, "steps": steps, "stopped": stopped, "loss": 1.0 / e,
         "member_loss": [1.0 / e]}
        for e, steps, stopped in ((1, 32, False), (2, 32, False), (3, 24, True))
    ]  # fmt: skip
    assert loss_series(records)["classic"]["x"] == [1.0, 2.0, 2.75]
    fig = runs_loss_figure([{"id": 4, "records": records}])
    (trace,) = fig.data
    assert list(trace.x) == [1.0, 2.0, 2.75]
    assert fig.layout.yaxis.rangemode == "tozero", "from 0, as the other loss charts"
    first = [{**records[0], "steps": 3, "stopped": True}]
    assert loss_series(first)["classic"]["x"] == [1.0], "stopped in its first epoch: no whole one to measure by"
    edited = [{**records[0], "epoch": "one"}, {**records[1], "steps": "x"}]  # a store edited by hand
    assert list(runs_loss_figure([{"id": 4, "records": edited}]).data[0].x) == ["one", 2.0], "drawn as stored"


def test_loss_figure_one_members_trace_and_one_mean_per_method():
    records = [
        {"kind": "step", "method": "classic", "epoch": 1, "step": s, "steps_per_epoch": 2,
         "member_loss": [1.0 * s, 2.0 * s, 3.0 * s], "loss": 2.0 * s}
        for s in (1, 2)
    ]  # fmt: skip
    members, mean = loss_figure(records).data
    assert members.name == "classic members" and mean.name == "classic (mean of members)"
    # The members one after another, a gap (NaN) after each; customdata says which member.
    assert np.allclose(members.y, [1, 2, np.nan, 2, 4, np.nan, 3, 6, np.nan], equal_nan=True)
    assert np.allclose(members.x, [0.5, 1.0, np.nan] * 3, equal_nan=True)
    assert list(members.customdata) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert list(mean.y) == [2.0, 4.0]
    fig = loss_figure(records)
    assert fig.layout.yaxis.rangemode == "tozero", "a run's first points on a magnified axis jumped as more came"
    assert live_figure(records).layout.yaxis.rangemode == "tozero"  # before an epoch ends: the loss figure alone
    epochs = [{**r, "kind": "epoch", "epoch_seconds": 1.0, "examples_per_second": 10.0} for r in records[1:]]
    assert live_figure(epochs).layout.yaxis.rangemode == "tozero", "the live chart's loss panel too"


def test_single_models_lines_are_dashed_and_drawn_over_the_ensembles():
    from pages._common import seconds_figure

    records = [
        {"kind": "epoch", "method": m, "epoch": e, "epoch_seconds": 1.0, "examples_per_second": 10.0,
         "loss": 1.0 / e, "member_loss": [1.0 / e] * (1 if m == "single" else 2)}
        for m in ("single", "classic")
        for e in (1, 2)
    ]  # fmt: skip
    means = [t for t in loss_figure(records).data if t.showlegend is not False]
    assert [t.name for t in means] == ["classic (mean of members)", "single"], "single on top; its one member no mean"
    assert [t.line.dash for t in means] == ["solid", "dash"]
    assert means[1].legendrank < means[0].legendrank, "the legend keeps single first"
    seconds = seconds_figure(records).data
    assert [(t.name, t.line.dash) for t in seconds] == [("classic", "solid"), ("single", "dash")]
    assert seconds[1].legendrank < seconds[0].legendrank
    panels = [t for t in live_figure(records).data if t.xaxis in ("x2", "x3")]
    assert [t.name for t in panels] == ["classic", "single", "classic", "single"]


def test_live_figure_loss_on_top_speed_panels_below_one_legend_entry_per_method():
    records = [
        {"kind": "epoch", "method": m, "epoch": e, "epoch_seconds": 2.0 * e, "examples_per_second": 100.0 / e,
         "loss": 1.0 / e, "member_loss": [1.0 / e, 1.1 / e]}
        for m in ("batchensemble", "classic")
        for e in (1, 2)
    ]  # fmt: skip
    fig = live_figure(records)
    assert [(t.name, t.xaxis, t.showlegend) for t in fig.data] == [
        ("classic members", "x", False),
        ("classic", "x", None),
        ("BatchEnsemble members", "x", False),
        ("BatchEnsemble", "x", None),
        ("classic", "x2", False),
        ("BatchEnsemble", "x2", False),
        ("classic", "x3", False),
        ("BatchEnsemble", "x3", False),
    ]
    assert list(fig.data[1].y) == [1.0, 0.5]
    assert list(fig.data[4].y) == [2.0, 4.0] and list(fig.data[6].y) == [100.0, 50.0]
    assert fig.layout.title.text.startswith("Training loss")
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["Seconds per epoch<br>(lower is faster)", "Examples per second<br>(higher is faster)"]
    assert fig.layout.yaxis2.title.text == "seconds" and fig.layout.yaxis3.title.text == "examples / s"
    # Before a first epoch ends: the loss alone.
    steps = [{"kind": "step", "method": "classic", "epoch": 1, "step": 1, "steps_per_epoch": 4, "loss": 2.0,
              "member_loss": [2.0, 2.1]}]  # fmt: skip
    alone = live_figure(steps)
    assert [t.name for t in alone.data] == ["classic members", "classic (mean of members)"]
    assert not alone.layout.annotations
    # A stop in the first epoch: its cut-short record times nothing, so still the loss alone (not two
    # empty speed panels).
    stopped = {"kind": "epoch", "method": "classic", "epoch": 1, "stopped": True, "epoch_seconds": 0.1,
               "examples_per_second": 10.0, "loss": 2.0, "member_loss": [2.0, 2.1]}  # fmt: skip
    assert not live_figure([*steps, stopped]).layout.annotations


def test_legends_sit_under_the_axis_title_with_room_for_one_entry_a_row():
    import plotly.graph_objects as go

    from pages._common import AXIS_BLOCK, LEGEND_ROW, legend_below, params_figure, reliability_figure, style

    def placed(fig, entries):
        layout = fig.layout
        plot = layout.height - layout.margin.t - layout.margin.b
        assert layout.legend.orientation == "h" and layout.legend.yanchor == "top"
        assert layout.margin.b >= AXIS_BLOCK + entries * LEGEND_ROW, "room for the legend at one entry a row"
        assert round(layout.legend.y * plot) == -AXIS_BLOCK, "its top the axis block's height under the plot"
        return plot

    fig = style(go.Figure([go.Scatter(x=[0], y=[0], name=n) for n in "abc"]), "t", "x", "y", height=400)
    assert placed(legend_below(fig), 3) == 400 - 70 - 60, "the plot keeps its height: the figure grows"
    one = style(go.Figure([go.Scatter(x=[0], y=[0], name="a")]), "t", "x", "y", height=400)
    assert legend_below(one).layout.height == 400 and one.layout.margin.b == 60, "no legend for one entry"
    records = [
        {"kind": "epoch", "method": m, "epoch": e, "epoch_seconds": 2.0, "examples_per_second": 100.0,
         "loss": 1.0 / e, "member_loss": [1.0 / e, 1.1 / e]}
        for m in ("single", "classic", "batchensemble")
        for e in (1, 2)
    ]  # fmt: skip
    curve = {"confidence": [0.3, 0.9], "accuracy": [0.4, 0.8], "count": [10, 30]}
    results = {m: {"reliability": curve, "ece": 0.05} for m in ("classic", "batchensemble")}
    for fig, entries in (
        (live_figure(records), 3),
        (loss_figure(records), 3),
        (reliability_figure(results), 3),
        (params_figure([16, 8, 8, 10], marked=4), 3),
    ):
        placed(fig, entries)


def test_agreement_values_in_the_cells_only_while_they_fit():
    six = agreement_figure({"agreement": [[1.0] * 6] * 6, "disagreement": 0.0}, "classic")
    eight = agreement_figure({"agreement": [[1.0] * 8] * 8, "disagreement": 0.0}, "classic")
    assert six.data[0].texttemplate and not eight.data[0].texttemplate  # 8 x 8 at 1280 px: the colours say it
    assert eight.layout.title.text.startswith("classic<br>") and "mean disagreement 0.000" in eight.layout.title.text


def test_accuracy_panels_titles_on_lines_of_their_own_smaller_for_three_panels():
    from pages._common import AXIS_TITLE_SIZE, TICK_SIZE, member_accuracy_figure

    result = {"member_accuracy": [0.5, 0.6], "ensemble_accuracy": 0.6, "mean_member_accuracy": 0.55}
    fig = member_accuracy_figure({m: result for m in ("single", "classic", "batchensemble")})
    titles = [a for a in fig.layout.annotations if a.text.startswith("<b>")]
    assert [a.text.count("<br>") for a in titles] == [2, 2, 2]
    assert all(a.font.size == TICK_SIZE for a in titles), "three side by side ran into each other at 1024 px"
    fig = member_accuracy_figure({m: result for m in ("classic", "batchensemble")})
    assert all(a.font.size == AXIS_TITLE_SIZE for a in fig.layout.annotations if a.text.startswith("<b>"))


def test_accuracy_lines_are_drawn_behind_the_bars_and_their_figures():
    from pages._common import member_accuracy_figure

    # A member at the mean: its figure sits where the dotted line runs.
    result = {"member_accuracy": [0.47, 0.45, 0.46], "ensemble_accuracy": 0.5, "mean_member_accuracy": 0.46}
    fig = member_accuracy_figure({"batchensemble": result})
    lines = {round(shape.y0, 4): shape for shape in fig.layout.shapes}
    assert set(lines) == {0.5, 0.46}
    assert all(shape.layer == "below" for shape in lines.values())
    assert fig.data[0].textposition == "inside"
    # A member above the ensemble: no label on the line to sit on its bar; the panel's title gives it.
    result = {"member_accuracy": [0.52, 0.45, 0.46], "ensemble_accuracy": 0.5, "mean_member_accuracy": 0.477}
    fig = member_accuracy_figure({"batchensemble": result})
    assert [a.text for a in fig.layout.annotations] == ["<b>BatchEnsemble</b><br>ensemble 0.500 · mean member 0.477"]


def test_accuracy_bars_of_eight_members_label_every_member_and_write_figures_level_or_not_at_all():
    from pages._common import TICK_SIZE, member_accuracy_figure

    result = {
        "member_accuracy": [0.8 + k / 100 for k in range(8)],
        "ensemble_accuracy": 0.9,
        "mean_member_accuracy": 0.835,
    }
    fig = member_accuracy_figure({"classic": result, "batchensemble": result})
    assert [tuple(fig.layout[f"xaxis{k}"].tickvals) for k in ("", "2")] == [tuple("12345678")] * 2
    assert all(bar.textangle == 0 for bar in fig.data), "turned on their side they were a few pixels tall"
    assert (fig.layout.uniformtext.mode, fig.layout.uniformtext.minsize) == ("hide", TICK_SIZE - 2)


def test_run_label_names_members_and_epochs_as_they_are():
    from pages._common import run_label

    cfg = tiny_config().to_dict()
    cfg["train"]["epochs"], cfg["model"]["ensemble_size"] = 1, 16
    run = {"id": 4, "status": "finished", "config": cfg, "methods": ["single"], "created": 0.0}
    label = run_label(run)
    assert " · 1 epoch · " in label and "E=" not in label  # one model: no E=16, and not "1 epochs"
    assert "E=16 · 1 epoch" in run_label({**run, "methods": ["single", "classic"]})
    assert " · 1 epoch planned · " in run_label({**run, "status": "stopped"}), "a stopped run ran fewer"
    assert label.startswith("#4 · ") and run_label({**run, "status": "stopped"}).startswith("#4 stopped · ")


def test_empty_loss_figure_shows_the_coming_epochs_and_no_data():
    fig = empty_loss_figure(7)
    assert not fig.data and tuple(fig.layout.xaxis.range) == (0, 7)
    assert fig.layout.title.text.startswith("Training loss") and "Press Train" in fig.layout.annotations[0].text


def test_live_chart_is_redrawn_at_epoch_ends_and_at_most_every_few_seconds_between():
    last = {"run": 3, "records": 10, "epochs": 2, "at": 100.0}
    assert live_chart_due(None, 3, 10, 2, True, 100.0, 4.0), "a first figure"
    assert live_chart_due(last, 4, 10, 2, True, 100.0, 4.0), "another run"
    assert not live_chart_due(last, 3, 10, 2, True, 200.0, 4.0), "nothing new"
    assert not live_chart_due(last, 3, 11, 2, True, 103.9, 4.0), "a new loss point, too soon"
    assert live_chart_due(last, 3, 11, 2, True, 104.0, 4.0), "a new loss point, 4 s later"
    assert live_chart_due(last, 3, 11, 3, True, 100.5, 4.0), "an epoch ended"
    assert live_chart_due(last, 3, 11, 2, False, 100.5, 4.0), "the run ended: every record"


def test_log_ticks_are_one_two_five_around_the_values():
    assert log_ticks([0.43, 12.0]) == [0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]
    assert log_ticks([1.0, 5.0]) == [1.0, 2.0, 5.0]
    assert log_ticks([3.0]) == [2.0, 5.0]
    assert log_ticks([]) == []
    # A GPU run's floor (9 ms) beside the seed's pipeline (19 s): 1-2-5 would be 12 ticks, so powers of ten.
    assert log_ticks([0.0087, 19.1]) == [0.001, 0.01, 0.1, 1.0, 10.0, 100.0]
    assert len(log_ticks([0.0765, 19.1])) == 9  # the most 1-2-5 ticks kept


def test_progress_counts_epochs_and_the_current_one():
    records = [
        {"kind": "epoch", "method": "classic", "epoch": 1, "elapsed_seconds": 2.0},
        {"kind": "epoch", "method": "classic", "epoch": 2, "elapsed_seconds": 4.0},
        {"kind": "step", "method": "batchensemble", "epoch": 1, "step": 1, "steps_per_epoch": 2,
         "elapsed_seconds": 1.0},
    ]  # fmt: skip
    fraction, eta, where = progress_of(records, ["classic", "batchensemble"], epochs=2)
    assert fraction == pytest.approx(2.5 / 4)
    assert eta == pytest.approx(5.0 / 2.5 * 1.5)
    assert where == "BatchEnsemble · epoch 1/2"
    assert progress_of([], ["classic"], epochs=3) == (0.0, None, "")
    slower = [*records[:2], {**records[2], "elapsed_seconds": 3.0}]  # BatchEnsemble at 6 s an epoch, classic 2 s
    assert progress_of(slower, ["classic", "batchensemble"], epochs=2)[1] == pytest.approx(1.5 * 6.0)
    first = records[:1]  # BatchEnsemble not begun: at classic's pace
    assert progress_of(first, ["classic", "batchensemble"], epochs=2)[1] == pytest.approx(1 * 2.0 + 2 * 2.0)


def test_agreement_colours_start_at_the_lowest_agreement_rounded_down_to_a_twentieth():
    def matrix(off):
        return {"agreement": [[1.0, off, off], [off, 1.0, 0.99], [off, 0.99, 1.0]]}

    assert agreement_floor({"classic": matrix(0.93), "batchensemble": matrix(0.97)}) == 0.9, "the lower of the two"
    assert agreement_floor({"classic": matrix(0.85)}) == 0.85, "a multiple of 0.05 stays"
    assert agreement_floor({"classic": matrix(1.0)}) == 0.95, "all alike: still a span of colours"
    assert agreement_floor({"classic": matrix(0.312)}) == 0.3
    assert agreement_floor({"classic": matrix(float("nan"))}) == 0.95, "NaN left out: the 0.99 pair sets it"
    assert agreement_floor({"single": {"agreement": [[1.0]]}}) == 0.0, "no pair of members"
    assert agreement_floor({}) == 0.0
    fig = agreement_figure(matrix(0.93), "classic", zmin=0.9)
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0.9, 1)


def test_reliability_bins_of_few_examples_are_hollow_dots_off_the_line():
    from pages._common import reliability_figure

    curve = {"confidence": [0.19, 0.5, 0.7, 0.95], "accuracy": [1.0, 0.45, 0.72, 0.96], "count": [3, 200, 300, 497]}
    fig = reliability_figure({"batchensemble": {"reliability": curve, "ece": 0.02}})
    _, line, hollow = fig.data
    assert list(line.x) == [0.5, 0.7, 0.95] and line.mode == "lines+markers"
    assert list(hollow.x) == [0.19] and hollow.mode == "markers" and hollow.showlegend is False
    assert list(hollow.customdata) == [3], "its count in the hover"
    old = {"confidence": [0.19, 0.5], "accuracy": [1.0, 0.45]}  # a store from before the counts: all joined
    assert [list(t.x) for t in reliability_figure({"classic": {"reliability": old}}).data[1:]] == [[0.19, 0.5]]


def test_results_of_one_ensemble_say_its_colour_scale(store_file):
    make_run(store_file, tiny_config(methods=("classic",)))
    at = open_page("results")
    assert not at.exception, at.exception
    assert len(heatmaps(at)) == 1
    assert any("more diverse members; its colours run, from" in c for c in texts(at.caption)), texts(at.caption)
    assert any("gain in points over the mean member" in c for c in texts(at.caption))


def test_and_list_and_the_captions_of_methods_of_one_member(store_file):
    assert [and_list(x) for x in ([], ["a"], ["a", "b"], ["a", "b", "c"])] == ["", "a", "a and b", "a, b and c"]
    make_run(store_file, tiny_config(methods=("single", "classic", "batchensemble"), ensemble_size=1))
    at = open_page("results")
    assert not at.exception, at.exception
    line = "single, classic and BatchEnsemble: one member each, so no agreement between members to show."
    assert line in texts(at.caption), texts(at.caption)  # it read "single and classic and BatchEnsemble: one member"
    assert not any("Cell (i, j)" in c or "gain in points" in c for c in texts(at.caption)), "no matrix, no gain"


def test_figures_handle_one_member_and_missing_values():
    result = {"member_accuracy": [0.5], "ensemble_accuracy": 0.5, "mean_member_accuracy": 0.5, "agreement": [[1.0]]}
    assert member_accuracy_figure({"single": result}).data
    heatmap = agreement_figure(result, "single")
    assert (heatmap.layout.coloraxis.cmin, heatmap.layout.coloraxis.cmax) == (0, 1)


def test_preflight_checks_what_validate_cannot():
    cfg = tiny_config()
    cfg.model.be_batching = "split"
    cfg.train.batch_size = 2
    with pytest.raises(ConfigError, match="can't be split among 3 members"):
        preflight(cfg)


def test_a_numbers_table_shows_counts_with_separators_and_keeps_numbers_underneath():
    rows = [
        {"method": "single", "E": 1, "× classic vectorized": None, "s / epoch": 0.967, "parameters": 411146},
        {"method": "classic", "E": 5, "× classic vectorized": 1.0, "s / epoch": 3.309, "parameters": 2055730},
    ]
    styled = numbers_table(rows, counts=("parameters",), exact=("method", "E"))
    html = styled.to_html()
    assert "None" not in html and "nan" not in html
    cells = html.split("<td")[1:]
    shown = [c[c.index(">") + 1 : c.index("</td>")] for c in cells]
    assert shown == ["single", "1", "—", "0.967", "411,146", "classic", "5", "1", "3.309", "2,055,730"]
    assert styled.data["parameters"].tolist() == [411146, 2055730], "numbers underneath: the column sorts by value"
    assert styled.data["× classic vectorized"].isna().tolist() == [True, False]


# ----------------------------------------------------------------------------- numbers out of range


@pytest.fixture
def launched(monkeypatch) -> list[dict]:
    """The configs that Train's button launches, queued nowhere and trained by no worker."""
    configs = []
    monkeypatch.setattr("bench_core.jobs.launch_run", lambda config, path: configs.append(config) or (1, None))
    return configs


def test_out_of_range_names_the_box_its_range_and_the_number():
    assert out_of_range("Hidden width", 128, 1, 4096) is None
    assert out_of_range("Hidden width", 4096, 1, 4096) is None, "the bounds are in range"
    assert out_of_range("Hidden width", 5000, 1, 4096) == "Hidden width must be from 1 to 4,096, not 5,000."
    assert out_of_range("Hidden layers", 0, 1, 8) == "Hidden layers must be from 1 to 8, not 0."
    assert out_of_range("Learning rate (Adam)", 2.5, 0.0, 1.0) == "Learning rate (Adam) must be from 0 to 1, not 2.5."
    assert out_of_range("Learning rate (Adam)", 1e-4, 0.0, 1.0) is None
    assert out_of_range("Seed", None, 0, 10) == "Seed: type a number."
    assert out_of_range("Seed", float("nan"), 0, 10) == "Seed: type a number."
    assert out_of_range("Seed", float("inf"), 0, 10) == "Seed must be from 0 to 10, not inf."
    rate = "Learning rate (Adam) must be above 0 and at most 1, not 0."
    assert out_of_range("Learning rate (Adam)", 0.0, 0.0, 1.0, above=True) == rate
    assert out_of_range("Learning rate (Adam)", 1.0, 0.0, 1.0, above=True) is None


def test_out_of_range_of_a_whole_number_names_a_fraction_and_takes_a_whole_float():
    assert out_of_range("Hidden width", 2.5, 1, 4096, whole=True) == "Hidden width must be a whole number, not 2.5."
    assert out_of_range("Hidden width", 2.5, 1, 4096) is None, "a fraction is fine where the box is not whole"
    assert out_of_range("Hidden width", 1000.0, 1, 4096, whole=True) is None, "1e3 typed: the float box's 1000.0"
    assert (
        out_of_range("Hidden width", 5000.0, 1, 4096, whole=True) == "Hidden width must be from 1 to 4,096, not 5,000."
    )
    assert out_of_range("Seed", -0.5, 0, 10, whole=True) == "Seed must be a whole number, not -0.5."
    assert out_of_range("Seed", float("inf"), 0, 10, whole=True) == "Seed must be from 0 to 10, not inf."
    assert out_of_range("Seed", float("nan"), 0, 10, whole=True) == "Seed: type a number."
    assert out_of_range("Seed", None, 0, 10, whole=True) == "Seed: type a number."
    assert out_of_range("Seed", 7, 0, 10, whole=True) is None
    huge = "Hidden width must be from 1 to 4,096, not 1e+300."
    assert out_of_range("Hidden width", 1e300, 1, 4096, whole=True) == huge, "not in 301 digits"


def test_whole_number_turns_a_whole_float_into_its_int_and_leaves_the_rest():
    assert whole_number(128.0) == 128 and isinstance(whole_number(128.0), int)
    assert whole_number(2.5) == 2.5
    assert whole_number(7) == 7
    assert whole_number(None) is None
    assert math.isinf(whole_number(float("inf")))
    assert whole_number(2.0**53) == 2**53 and whole_number(2.0**60) == 2.0**60, "beyond 2⁵³ it stays a float"
    assert whole_box(16) == {"step": 16.0, "format": "%g"}, "a float box: Streamlit's int box parses as parseInt"


@pytest.mark.parametrize(
    ("key", "typed", "problem"),
    [
        ("train_set_hidden", 2.5, "Hidden width must be a whole number, not 2.5."),
        ("train_set_batch_size", 64.25, "Batch size must be a whole number, not 64.25."),
        ("train_set_seed", 1.5, "Seed must be a whole number, not 1.5."),
        ("train_set_points_per_epoch", 0.5, "Loss points per epoch must be a whole number, not 0.5."),
        ("train_set_depth", 1e3, "Hidden layers must be from 1 to 8, not 1,000."),
    ],
)
def test_train_names_a_fraction_in_a_whole_number_box_and_trains_nothing(store_file, launched, key, typed, problem):
    """Streamlit's int box had read 2.5 as 2 and 1e3 as 1 (streamlit#3043): a run with a number not typed."""
    at = open_page("train")
    at.number_input(key=key).set_value(typed).run()
    assert not at.exception, at.exception
    assert texts(at.error) == [problem]
    at.button(key="train_start").click().run()
    assert not launched, "nothing trains with a number the user did not type"
    assert at.number_input(key=key).value == typed, "the number typed is kept"


def test_train_trains_with_a_whole_number_typed_as_a_float(store_file, launched):
    at = open_page("train")
    at.selectbox(key="train_set_dataset").set_value("synthetic").run()
    at.number_input(key="train_set_hidden").set_value(1e3).run()  # 1e3 typed: the float box hands over 1000.0
    at.number_input(key="train_set_synthetic_train").set_value(2000.0).run()
    at.number_input(key="train_set_seed").set_value(3.0).run()
    assert not at.error
    at.button(key="train_start").click().run()
    assert not at.exception, at.exception
    (config,) = launched
    assert config["model"]["hidden"] == 1000 and type(config["model"]["hidden"]) is int
    assert config["data"]["synthetic_train"] == 2000 and type(config["data"]["synthetic_train"]) is int
    assert config["train"]["seed"] == 3 and type(config["train"]["seed"]) is int


def test_speed_and_learn_name_a_fraction_in_a_whole_number_box(store_file):
    at = open_page("speed")
    at.number_input(key="speed_set_steps").set_value(10.5).run()
    assert not at.exception, at.exception
    assert texts(at.error) == ["Timed steps must be a whole number, not 10.5."]
    at = open_page("learn")
    at.number_input(key="learn_hidden").set_value(2.5).run()
    assert not at.exception, at.exception
    assert texts(at.error) == ["Hidden width must be a whole number, not 2.5."]
    at.number_input(key="learn_hidden").set_value(64.0).run()
    at.number_input(key="learn_seed").set_value(0.25).run()
    assert texts(at.error) == ["Seed must be a whole number, not 0.25."]


def test_train_names_every_number_out_of_range_in_one_box_the_learning_rate_of_0_too(store_file):
    at = open_page("train")
    at.number_input(key="train_set_lr").set_value(0.0).run()
    at.number_input(key="train_set_depth").set_value(0).run()
    assert texts(at.error) == [
        "Hidden layers must be from 1 to 8, not 0.  \nLearning rate (Adam) must be above 0 and at most 1, not 0."
    ], "one red box, a line each, in the form's order; 0 named as the range says (bench_core said 'positive')"


def test_train_names_a_number_typed_beyond_its_box_and_trains_nothing_with_another(store_file, launched):
    """Streamlit's bounded box kept 5000 in red while the run took the last number in range, 128."""
    at = open_page("train")
    at.number_input(key="train_set_hidden").set_value(5000).run()
    assert not at.exception, at.exception
    problem = "Hidden width must be from 1 to 4,096, not 5,000."
    assert texts(at.error) == [problem], "named under the form at once, in one line"
    at.button(key="train_start").click().run()
    assert not launched, "nothing trains with a number the user did not ask for"
    assert texts(at.error) == [problem], "the click's answer: the same line, once"
    assert at.number_input(key="train_set_hidden").value == 5000, "the number typed is kept"
    at.number_input(key="train_set_hidden").set_value(256).run()
    assert not at.error
    at.button(key="train_start").click().run()
    assert len(launched) == 1 and launched[0]["model"]["hidden"] == 256


def test_train_checks_the_boxes_it_draws_only(store_file):
    at = open_page("train")
    at.number_input(key="train_set_be_init_std").set_value(9.0).run()
    assert texts(at.error) == ["Fast-weight init std must be from 0 to 5, not 9."]
    at.radio(key="train_set_be_init").set_value("random_sign").run()
    assert not at.error, "the std box is the normal init's: disabled with random signs, not checked"
    at.radio(key="train_set_be_init").set_value("normal").run()
    assert texts(at.error) == ["Fast-weight init std must be from 0 to 5, not 9."]


def test_speed_names_a_number_typed_beyond_its_box_and_starts_nothing(store_file):
    at = open_page("speed")
    at.number_input(key="speed_set_repeats").set_value(50).run()
    assert not at.exception, at.exception
    assert texts(at.error) == ["Repeats (median) must be from 1 to 20, not 50."]
    at.button(key="speed_start").click().run()
    assert at.session_state.get("speed_job") is None, "no benchmark started"
    assert at.number_input(key="speed_set_repeats").value == 50


def test_learn_names_a_number_typed_beyond_its_box(store_file):
    at = open_page("learn")
    charts_before = len(charts(at))
    at.number_input(key="learn_hidden").set_value(5000).run()
    assert not at.exception, at.exception
    assert texts(at.error) == ["Hidden width must be from 1 to 4,096, not 5,000."]
    assert len(charts(at)) == charts_before - 1, "the parameter chart waits for a number in range"
    at.number_input(key="learn_hidden").set_value(256).run()
    assert not at.error and len(charts(at)) == charts_before


def test_learns_controls_keep_their_values_past_a_visit_to_another_page(store_file):
    """They came back with their defaults (Streamlit drops the state of widgets a page run does not draw)."""
    at = open_page("learn")
    at.slider(key="learn_members").set_value(8).run()
    at.slider(key="learn_member_of_8").set_value(6).run()
    at.radio(key="learn_init").set_value("random_sign").run()
    at.number_input(key="learn_seed").set_value(7).run()
    at.selectbox(key="learn_dataset").set_value("mnist").run()
    at.number_input(key="learn_depth").set_value(3).run()
    at.slider(key="learn_mark").set_value(3).run()
    at.number_input(key="learn_hidden").set_value(5000).run()  # out of range: kept, and named again
    chosen = {key: at.session_state[key] for key in ("learn_members", "learn_member", "learn_init", "learn_seed")}
    chosen |= {key: at.session_state[key] for key in ("learn_dataset", "learn_depth", "learn_mark", "learn_hidden")}
    at.switch_page("pages/train.py").run()
    at.switch_page("pages/learn.py").run()
    assert not at.exception, at.exception
    assert {key: at.session_state[key] for key in chosen} == chosen
    assert at.slider(key="learn_member_of_8").value == 6 and at.radio(key="learn_init").value == "random_sign"
    assert at.number_input(key="learn_hidden").value == 5000
    assert texts(at.error) == ["Hidden width must be from 1 to 4,096, not 5,000."]
    assert not at.warning, "no widget with a value of its own beside the session's"
    at.slider(key="learn_members").set_value(1).run()  # the member slider goes, and comes back as it was
    at.switch_page("pages/runs.py").run()
    at.switch_page("pages/learn.py").run()
    at.slider(key="learn_members").set_value(8).run()
    assert at.slider(key="learn_member_of_8").value == 6
    assert any("**Member 6**" in m.value for m in at.markdown), "the slider and the pictures: one member"
    at.slider(key="learn_members").set_value(1).run()  # then E = 2, under the member kept: no error, member 2
    at.slider(key="learn_members").set_value(2).run()
    assert not at.exception, at.exception
    assert at.slider(key="learn_member_of_2").value == 2 and any("**Member 2**" in m.value for m in at.markdown)
    at.slider(key="learn_members").set_value(5).run()  # E cut the member to 2; the pick, 6, is kept
    assert at.slider(key="learn_member_of_5").value == 5
    at.slider(key="learn_member_of_5").set_value(3).run()
    at.slider(key="learn_members").set_value(8).run()
    assert at.slider(key="learn_member_of_8").value == 3 and any("**Member 3**" in m.value for m in at.markdown)


def test_speed_form_shows_the_settings_of_a_benchmark_shown_from_elsewhere(store_file, tmp_path):
    """A new tab showed the last benchmark's results under its own defaults: E = 1, 2, 4, 8 above rows of E = 2, 3."""
    settings = BenchSettings(
        ensemble_sizes=(2, 3),
        rows=("classic-vectorized", "reference-classic"),
        steps=7,
        warmup=1,
        repeats=1,
        hidden=64,
        batch_size=32,
        profile_steps=0,
        device="cpu",
        reference=True,
    )
    header = {"kind": "header", "fraction": 0.05, "message": "", "header": {"device": "cpu"}}
    row = {"kind": "row", "fraction": 0.5, "message": "", "row": {"name": "classic-vectorized"}}
    done = {"kind": "done", "fraction": 1.0, "message": "", "header": header["header"]}
    job = ended_job(tmp_path, "elsewhere", [header, row, done], status=0)
    job.settings = settings.to_dict()
    at = open_page("speed")
    assert at.session_state.get("speed_job") is job
    assert at.session_state["speed_set_sizes"] == [2, 3]
    assert at.session_state["speed_set_rows"] == ["classic-vectorized"]
    assert at.checkbox(key="speed_set_reference").value
    assert at.number_input(key="speed_set_steps").value == 7 and at.number_input(key="speed_set_hidden").value == 64
    assert at.number_input(key="speed_set_batch_size").value == 32
    assert at.selectbox(key="speed_set_device").value == "cpu"
    at.number_input(key="speed_set_steps").set_value(9).run()
    assert at.number_input(key="speed_set_steps").value == 9, "the user's change stays: taken once per benchmark"


def test_train_keeps_the_synthetic_sizes_typed_past_other_pages_and_datasets(store_file, launched):
    """1000 examples typed, a visit to Results, and the box read 50,000 again: the run trained on 50,000."""
    at = open_page("train")
    at.selectbox(key="train_set_dataset").set_value("synthetic").run()
    at.number_input(key="train_set_synthetic_train").set_value(1000).run()
    at.number_input(key="train_set_synthetic_test").set_value(500).run()
    at.switch_page("pages/results.py").run()
    at.switch_page("pages/train.py").run()
    assert at.number_input(key="train_set_synthetic_train").value == 1000
    assert at.number_input(key="train_set_synthetic_test").value == 500
    at.selectbox(key="train_set_dataset").set_value("mnist").run()
    assert not at.exception, at.exception
    at.selectbox(key="train_set_dataset").set_value("synthetic").run()
    assert at.number_input(key="train_set_synthetic_train").value == 1000, "kept while another dataset was chosen"
    at.slider(key="train_set_epochs").set_value(1).run()
    at.button(key="train_start").click().run()
    assert launched and launched[0]["data"]["synthetic_train"] == 1000 and launched[0]["data"]["synthetic_test"] == 500


def test_speed_keeps_its_settings_past_a_visit_to_another_page(store_file):
    at = open_page("speed")
    at.number_input(key="speed_set_steps").set_value(9).run()
    at.session_state["speed_set_sizes"] = [1, 16]
    at.run()
    at.switch_page("pages/learn.py").run()
    at.switch_page("pages/speed.py").run()
    assert not at.exception, at.exception
    assert at.number_input(key="speed_set_steps").value == 9, "it came back as 20, the default"
    assert at.session_state["speed_set_sizes"] == [1, 16]


def test_train_launches_with_the_default_for_a_number_whose_box_is_not_asked_for(store_file, launched):
    """0 typed as synthetic examples, then MNIST chosen: Train was refused about a box no longer on the screen."""
    at = open_page("train")
    at.selectbox(key="train_set_dataset").set_value("synthetic").run()
    at.number_input(key="train_set_synthetic_train").set_value(0).run()
    assert texts(at.error) == ["Synthetic training examples must be from 10 to 1,000,000, not 0."]
    at.number_input(key="train_set_be_init_std").set_value(-1.0).run()
    at.selectbox(key="train_set_dataset").set_value("mnist").run()
    at.radio(key="train_set_be_init").set_value("random_sign").run()  # the std's box disabled: not asked for
    at.button(key="train_start").click().run()
    assert not at.exception, at.exception
    assert not at.error, texts(at.error)
    assert launched and launched[0]["data"]["name"] == "mnist" and launched[0]["data"]["synthetic_train"] == 50_000
