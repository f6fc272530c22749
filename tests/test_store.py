"""The SQLite run store: round trips, concurrency, crash recovery, bad files."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from bench_core import store as store_mod
from bench_core.errors import BenchError, StoreError
from bench_core.store import SCHEMA_VERSION, RunStore, default_store_path, process_start_token

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"methods": ["classic", "batchensemble"], "train": {"epochs": 2, "lr": 1e-3}}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=_env(), **kwargs)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "runs.sqlite"


@pytest.fixture
def store(store_path: Path):
    with RunStore(store_path) as s:
        yield s


def epoch(method: str, n: int, **extra) -> dict:
    return {"kind": "epoch", "method": method, "epoch": n, "train_loss": 1.0 / n, **extra}


# ----------------------------------------------------------------------------- paths


def test_default_store_path(monkeypatch, tmp_path):
    monkeypatch.delenv("BENCH_STORE", raising=False)
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    assert default_store_path() == Path("data") / "runs.sqlite"
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "d"))
    assert default_store_path() == tmp_path / "d" / "runs.sqlite"
    monkeypatch.setenv("BENCH_STORE", str(tmp_path / "elsewhere.sqlite"))
    assert default_store_path() == tmp_path / "elsewhere.sqlite"
    with RunStore() as s:
        assert s.path == tmp_path / "elsewhere.sqlite"
    assert (tmp_path / "elsewhere.sqlite").is_file()


def test_new_store_schema_and_wal(store, store_path):
    assert store_path.is_file()
    conn = sqlite3.connect(store_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"runs", "records", "results"} <= tables
    finally:
        conn.close()
    # Reopening an existing store works and keeps what is there.
    run_id = store.create_run(CONFIG, source="test")
    with RunStore(store_path) as again:
        assert [r["id"] for r in again.list_runs()] == [run_id]


# ----------------------------------------------------------------------------- round trips


def test_create_list_get_delete_round_trip(store):
    first = store.create_run(CONFIG, source="test", name="first")
    second = store.create_run({"methods": ["single"]}, source="dashboard")
    assert second > first

    runs = store.list_runs()
    assert [r["id"] for r in runs] == [second, first]  # newest first
    run = runs[1]
    assert run["name"] == "first"
    assert run["source"] == "test"
    assert run["status"] == "queued"
    assert run["config"] == CONFIG
    assert run["methods"] == ["classic", "batchensemble"]
    assert run["summary"] == {}
    assert run["message"] == ""
    assert run["created"] <= run["updated"]

    store.start_run(first, device="cpu", versions={"python": "3.11", "torch": "x"})
    store.set_note(first, "waiting for the GPU")
    store.set_progress(first, 0.25)
    got = store.get_run(first)
    assert got["status"] == "running"
    assert got["device"] == "cpu"
    assert got["versions"] == {"python": "3.11", "torch": "x"}
    assert got["note"] == "waiting for the GPU"
    assert got["progress"] == 0.25
    assert got["pid"] == os.getpid()
    assert got["pid_start"] == process_start_token(os.getpid())
    assert got["records"] == []
    assert got["results"] == {}

    store.set_progress(first, 7.0)
    assert store.get_run(first)["progress"] == 1.0
    store.finish_run(first, "finished", "done")
    got = store.get_run(first)
    assert (got["status"], got["message"], got["note"]) == ("finished", "done", None)

    store.delete_run(first)
    assert [r["id"] for r in store.list_runs()] == [second]
    with pytest.raises(StoreError, match=f"no run {first} in "):
        store.get_run(first)
    with pytest.raises(StoreError):
        store.delete_run(first)


def test_start_run_default_versions(store):
    run_id = store.create_run(CONFIG, source="test")
    store.start_run(run_id, device="cpu")
    versions = store.get_run(run_id)["versions"]
    assert set(versions) == {"python", "torch", "torchvision", "bench_core", "platform"}


def test_get_unknown_run_is_one_line(store, store_path):
    with pytest.raises(StoreError) as info:
        store.get_run(17)
    assert str(info.value) == f"no run 17 in {store_path}"
    assert isinstance(info.value, BenchError)


def test_records_in_order_and_incremental(store):
    run_id = store.create_run(CONFIG, source="test")
    other = store.create_run(CONFIG, source="test")
    for n in range(1, 4):
        store.add_record(run_id, epoch("classic", n))
        store.add_record(other, epoch("batchensemble", n))
    store.add_record(run_id, {"kind": "step", "method": "classic", "epoch": 3, "step": 99, "loss": 0.5})

    got = store.get_run(run_id)["records"]
    assert [r["epoch"] for r in got] == [1, 2, 3, 3]
    assert got[-1] == {"kind": "step", "method": "classic", "epoch": 3, "step": 99, "loss": 0.5}

    polled = store.records(run_id)
    assert [r for _, r in polled] == got
    ids = [i for i, _ in polled]
    assert ids == sorted(ids)
    assert store.records(run_id, after_id=ids[1]) == polled[2:]
    assert store.records(run_id, after_id=ids[-1]) == []
    store.add_record(run_id, epoch("batchensemble", 1))
    newer = store.records(run_id, after_id=ids[-1])
    assert len(newer) == 1
    assert newer[0][1]["method"] == "batchensemble"
    assert all(r["method"] == "batchensemble" for _, r in store.records(other))


def test_results_and_summary(store):
    run_id = store.create_run(CONFIG, source="test")
    report = {"ensemble_accuracy": 0.81, "train_seconds": 12.5, "member_accuracy": [0.7, 0.72], "nll": 0.6}
    store.set_result(run_id, "classic", report)
    store.set_result(run_id, "batchensemble", {"ensemble_accuracy": 0.8})
    assert store.get_run(run_id)["results"]["classic"] == report
    store.set_result(run_id, "classic", {**report, "ensemble_accuracy": 0.82})  # replaces
    summary = store.list_runs()[0]["summary"]
    assert summary == {
        "classic": {"ensemble_accuracy": 0.82, "train_seconds": 12.5},
        "batchensemble": {"ensemble_accuracy": 0.8, "train_seconds": None},
    }


def test_nan_is_stored_as_null(store, store_path):
    run_id = store.create_run(CONFIG, source="test")
    store.add_record(run_id, epoch("classic", 1, train_loss=float("nan"), grads=[1.0, float("inf"), -math.inf]))
    store.set_result(run_id, "classic", {"ensemble_accuracy": float("nan"), "nested": {"x": (1, float("nan"))}})
    record = store.get_run(run_id)["records"][0]
    assert record["train_loss"] is None
    assert record["grads"] == [1.0, None, None]
    assert store.get_run(run_id)["results"]["classic"] == {"ensemble_accuracy": None, "nested": {"x": [1, None]}}
    # The file holds strict JSON (no NaN tokens) that any reader can parse.
    conn = sqlite3.connect(store_path)
    try:
        for (text,) in conn.execute("SELECT data FROM records UNION ALL SELECT data FROM results"):
            json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON {token}"))
    finally:
        conn.close()


def test_records_accept_tensors_and_dataclasses(store):
    import dataclasses

    import torch

    @dataclasses.dataclass
    class Rec:
        kind: str = "epoch"
        method: str = "single"
        epoch: int = 1
        loss: float = float("nan")

    run_id = store.create_run(CONFIG, source="test")
    store.add_record(run_id, Rec())
    store.add_record(run_id, {"kind": "epoch", "method": "single", "epoch": 2, "loss": torch.tensor(0.5)})
    records = store.get_run(run_id)["records"]
    assert records == [
        {"kind": "epoch", "method": "single", "epoch": 1, "loss": None},
        {"kind": "epoch", "method": "single", "epoch": 2, "loss": 0.5},
    ]


def test_writes_to_unknown_run_raise(store):
    with pytest.raises(StoreError, match="no run 5"):
        store.add_record(5, epoch("classic", 1))
    with pytest.raises(StoreError, match="no run 5"):
        store.finish_run(5, "finished")
    with pytest.raises(StoreError, match="no run 5"):
        store.set_result(5, "classic", {})
    with pytest.raises(ValueError, match="finishes as"):
        store.finish_run(store.create_run(CONFIG, source="test"), "running")
    with pytest.raises(ValueError, match="source"):
        store.create_run(CONFIG, source="elsewhere")


def test_weights_round_trip_and_delete(store):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    run_id = store.create_run(CONFIG, source="test")
    path = store.save_weights(run_id, "classic", model.state_dict())
    assert path == store.path.parent / "weights" / str(run_id) / "classic.pt"
    assert path.is_file()
    loaded = store.load_weights(run_id, "classic")
    assert set(loaded) == {"weight", "bias"}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value)
    fresh = torch.nn.Linear(4, 3)
    fresh.load_state_dict(loaded)
    with pytest.raises(StoreError, match="no weights of batchensemble"):
        store.load_weights(run_id, "batchensemble")
    with pytest.raises(ValueError, match="can't name a weights file"):
        store.save_weights(run_id, "../evil", model.state_dict())
    store.delete_run(run_id)
    assert not path.parent.exists()


def test_two_stores_in_one_folder_keep_their_own_weights(tmp_path):
    import torch

    a, b = RunStore(tmp_path / "runs.sqlite"), RunStore(tmp_path / "other.sqlite")
    run_a, run_b = a.create_run(CONFIG, source="test"), b.create_run(CONFIG, source="test")
    assert run_a == run_b == 1  # each store counts from 1
    a.save_weights(run_a, "classic", {"w": torch.zeros(2)})
    b.save_weights(run_b, "classic", {"w": torch.ones(2)})
    assert torch.equal(a.load_weights(run_a, "classic")["w"], torch.zeros(2)), "not overwritten by the other store"
    assert b.weights_path(run_b, "classic") == tmp_path / "other-weights" / "1" / "classic.pt"
    b.delete_run(run_b)
    assert a.weights_path(run_a, "classic").is_file()


# ----------------------------------------------------------------------------- stop requests


def test_request_stop(store):
    run_id = store.create_run(CONFIG, source="test")
    assert store.stop_requested(run_id) is False
    store.request_stop(run_id)
    assert store.stop_requested(run_id) is True
    assert store.list_runs()[0]["stop_requested"] is True
    assert store.stop_requested(9999) is True  # a deleted run counts as asked to stop


# ----------------------------------------------------------------------------- concurrency

WRITER = """
import sys
from bench_core.store import RunStore
store = RunStore(sys.argv[1])
run_id = store.create_run({"methods": ["classic"], "writer": sys.argv[2]}, source="test")
store.start_run(run_id, device="cpu", versions={})
for n in range(50):
    store.add_record(run_id, {"kind": "step", "method": "classic", "epoch": 1, "step": n, "writer": sys.argv[2]})
store.finish_run(run_id, "finished")
"""


def test_concurrent_writers_threads_and_processes(store_path):
    RunStore(store_path).close()
    procs = [_python(WRITER, str(store_path), f"p{i}", stderr=subprocess.PIPE) for i in range(3)]
    shared = RunStore(store_path)  # one store object shared by the threads
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            run_id = shared.create_run({"methods": ["classic"], "writer": name}, source="test")
            shared.start_run(run_id, device="cpu", versions={})
            for n in range(50):
                shared.add_record(run_id, {"kind": "step", "method": "classic", "epoch": 1, "step": n, "writer": name})
            shared.finish_run(run_id, "finished")
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=write, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        assert b"locked" not in err
    assert not errors, errors

    with RunStore(store_path) as check:
        runs = check.list_runs()
        assert sorted(r["config"]["writer"] for r in runs) == ["p0", "p1", "p2", "t0", "t1", "t2", "t3"]
        for run in runs:
            assert run["status"] == "finished"
            records = check.get_run(run["id"])["records"]
            assert [r["step"] for r in records] == list(range(50))
            assert {r["writer"] for r in records} == {run["config"]["writer"]}


# ----------------------------------------------------------------------------- crashes and liveness

CRASHER = """
import sys, time
from bench_core.store import RunStore
store = RunStore(sys.argv[1])
run_id = store.create_run({"methods": ["classic"]}, source="test")
store.start_run(run_id, device="cpu", versions={})
store.add_record(run_id, {"kind": "epoch", "method": "classic", "epoch": 1})
store.add_record(run_id, {"kind": "epoch", "method": "classic", "epoch": 2})
print(run_id, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkilled_run_is_interrupted_with_its_records(store_path):
    proc = _python(CRASHER, str(store_path), stdout=subprocess.PIPE)
    try:
        run_id = int(proc.stdout.readline())
        with RunStore(store_path) as live:  # the process still runs: left alone
            assert live.get_run(run_id)["status"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    with RunStore(store_path) as reopened:
        run = reopened.get_run(run_id)
        assert run["status"] == "interrupted"
        assert f"pid {proc.pid}" in run["message"]
        assert [r["epoch"] for r in run["records"]] == [1, 2]


def test_reconcile_keeps_live_runs_and_catches_reused_pids(store, store_path):
    live = store.create_run(CONFIG, source="test")
    store.start_run(live, device="cpu", versions={})
    queued = store.create_run(CONFIG, source="test")  # queued by this (live) process
    reused = store.create_run(CONFIG, source="test")
    store.start_run(reused, device="cpu", versions={})
    elsewhere = store.create_run(CONFIG, source="test")
    store.start_run(elsewhere, device="cpu", versions={})
    conn = sqlite3.connect(store_path)
    try:
        with conn:
            # Same live pid, but another process start: the pid was reused.
            conn.execute("UPDATE runs SET pid_start = 'not-the-start' WHERE id = ?", (reused,))
            # A run of another host is never judged from here.
            conn.execute("UPDATE runs SET host = 'another-host', pid = 999999999 WHERE id = ?", (elsewhere,))
    finally:
        conn.close()

    if process_start_token(os.getpid()) is not None:
        assert store.reconcile() == [reused]
        assert store.get_run(reused)["status"] == "interrupted"
    assert store.reconcile() == []
    with RunStore(store_path) as reopened:
        statuses = {r["id"]: r["status"] for r in reopened.list_runs()}
    assert statuses[live] == "running"
    assert statuses[queued] == "queued"
    assert statuses[elsewhere] == "running"


def test_reconcile_marks_dead_pid(store, store_path):
    proc = _python("pass")
    proc.wait(30)
    run_id = store.create_run(CONFIG, source="test")
    store.start_run(run_id, device="cpu", versions={}, pid=proc.pid)
    finished = store.create_run(CONFIG, source="test")
    store.start_run(finished, device="cpu", versions={}, pid=proc.pid)
    store.finish_run(finished, "finished")
    assert store.reconcile() == [run_id]
    assert store.get_run(run_id)["status"] == "interrupted"
    assert store.get_run(finished)["status"] == "finished"


def test_process_start_token_parses_odd_names():
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux /proc only")
    token = process_start_token(os.getpid())
    assert token is not None
    assert token.isdigit()
    assert process_start_token(2**22 + 12345) is None


# ----------------------------------------------------------------------------- bad files


def _assert_one_line_store_error(path: Path, *needles: str) -> str:
    with pytest.raises(StoreError) as info:
        RunStore(path)
    text = str(info.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text
    return text


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"\x00garbage" + os.urandom(4000), id="random-bytes"),
        pytest.param(b"SQLite form", id="truncated-header"),
        pytest.param(b"SQLite format 3\x00" + b"\xff" * 200, id="header-then-garbage"),
    ],
)
def test_corrupt_file_is_left_untouched(tmp_path, content):
    path = tmp_path / "runs.sqlite"
    path.write_bytes(content)
    text = _assert_one_line_store_error(path, str(path), "corrupt", "left untouched", "BENCH_STORE")
    if not content.startswith(b"SQLite format 3"):
        assert text == (
            f"run store {path} is corrupt (file is not a database); it was left untouched: "
            "move it away or set BENCH_STORE to another path"
        )
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.sqlite"]


def _foreign_db(path: Path, statements: list[str]) -> bytes:
    conn = sqlite3.connect(path)
    try:
        for sql in statements:
            conn.execute(sql)
        conn.commit()
    finally:
        conn.close()
    return path.read_bytes()


def test_other_table_at_version_zero_is_left_untouched(tmp_path):
    path = tmp_path / "runs.sqlite"
    before = _foreign_db(path, ["CREATE TABLE people (name TEXT)", "INSERT INTO people VALUES ('ada')"])
    _assert_one_line_store_error(path, "older schema version 0", "left untouched")
    assert path.read_bytes() == before


def test_older_schema_version_is_left_untouched(tmp_path):
    path = tmp_path / "runs.sqlite"
    before = _foreign_db(
        path,
        [
            "CREATE TABLE runs (id INTEGER PRIMARY KEY, status TEXT)",
            "INSERT INTO runs (status) VALUES ('running')",
            f"PRAGMA user_version = {SCHEMA_VERSION - 1}",
        ],
    )
    _assert_one_line_store_error(path, f"older schema version {SCHEMA_VERSION - 1}", "left untouched")
    assert path.read_bytes() == before


def test_newer_schema_version_is_left_untouched(tmp_path):
    path = tmp_path / "runs.sqlite"
    before = _foreign_db(path, ["CREATE TABLE runs (id INTEGER)", f"PRAGMA user_version = {SCHEMA_VERSION + 1}"])
    _assert_one_line_store_error(path, f"schema version {SCHEMA_VERSION + 1}", "newer", "left untouched")
    assert path.read_bytes() == before


def test_unwritable_folder(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    _assert_one_line_store_error(blocker / "runs.sqlite", "afile", "BENCH_STORE")
    assert blocker.read_text() == "not a folder"


def test_path_is_a_folder(tmp_path):
    (tmp_path / "runs.sqlite").mkdir()
    _assert_one_line_store_error(tmp_path / "runs.sqlite", "folder")


def test_empty_file_becomes_a_store(tmp_path):
    path = tmp_path / "runs.sqlite"
    path.touch()
    with RunStore(path) as s:
        assert s.list_runs() == []


def test_store_is_usable_after_fork_safe_reopen(store, monkeypatch):
    # A connection made under another pid (as after fork) is replaced, not reused.
    run_id = store.create_run(CONFIG, source="test")
    old = store._conn()
    monkeypatch.setattr(store_mod.os, "getpid", lambda: -1)
    assert store._conn() is not old
    assert store.get_run(run_id)["id"] == run_id


def test_a_second_store_object_does_not_break_the_first_ones_view_of_another_process(tmp_path):
    """Regression: opening a second RunStore on the same file in this process must not drop
    SQLite's locks, or a writer in another process may delete the WAL under our connections."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "runs.sqlite"
    first = RunStore(path)
    run_id = first.create_run({"methods": ["classic"]}, source="test")
    assert first.status(run_id) == "queued"
    second = RunStore(path)  # the header check must not close a descriptor of the live database
    assert second.status(run_id) == "queued"
    root = Path(__file__).resolve().parent.parent
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from bench_core.store import RunStore; "
        "s = RunStore(sys.argv[2]); s.finish_run(int(sys.argv[3]), 'finished'); s.close()"
    )
    subprocess.run([sys.executable, "-c", code, str(root), str(path), str(run_id)], check=True, timeout=60)
    assert first.status(run_id) == "finished"
    assert second.status(run_id) == "finished"
    assert first.get_run(run_id)["status"] == "finished"


def test_active_runs_are_the_queued_and_running_ones_newest_first(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    done, queued, running = (store.create_run({"methods": ["single"]}, status="queued") for _ in range(3))
    store.finish_run(done, "finished")
    store.start_run(running, device="cpu", versions={})  # this process: alive
    assert [r["id"] for r in store.active_runs()] == [running, queued]
    assert {r["status"] for r in store.active_runs()} == {"queued", "running"}
