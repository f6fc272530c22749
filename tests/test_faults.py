"""Runs that survive: a killed trainer, concurrent trainings on one store, and every bad input
answered in one line with nothing lost."""

import gzip
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench_core.runner import run_experiment
from bench_core.store import RunStore
from tests.test_runner import tiny_config

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--dataset", "synthetic", "--synthetic-train", "600", "--synthetic-test", "200", "--hidden", "16"]


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "BENCH_STORE"}
    return {**env, "BENCH_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT), **extra}


def cli(tmp_path, *args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "bench_core", *args],
        cwd=tmp_path,
        env=env or _env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for needle in needles:
        assert needle in last, last
    return last


def test_sigkill_mid_run_keeps_finished_epochs_and_shows_interrupted(tmp_path):
    store_path = tmp_path / "data" / "runs.sqlite"
    args = ["train", "--dataset", "synthetic", "--synthetic-train", "4000", "--synthetic-test", "200"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench_core", *args, "--epochs", "500", "--hidden", "32", "--quiet"],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        records = []
        while time.time() < deadline:
            if store_path.exists():
                runs = RunStore(store_path).list_runs()
                if runs:
                    records = RunStore(store_path).records(runs[0]["id"])
                    if len(records) >= 2:
                        break
            time.sleep(0.2)
        assert len(records) >= 2, "the trainer never committed two epochs"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = RunStore(store_path)  # a restart: opening the store reconciles dead runs
    (run,) = store.list_runs()
    assert run["status"] == "interrupted"
    kept = store.get_run(run["id"])["records"]
    assert len(kept) >= 2
    assert [r["epoch"] for r in kept[:2]] == [1, 2]


def test_concurrent_trainings_threads_and_processes_share_one_store(tmp_path, monkeypatch):
    """Trainings at once (BENCH_CPU_LOCK=0: they do not take turns) write one store, nothing lost or mixed."""
    monkeypatch.setenv("BENCH_CPU_LOCK", "0")
    store_path = tmp_path / "data" / "runs.sqlite"
    store_path.parent.mkdir(parents=True)
    errors = []

    def in_thread(seed):
        try:
            cfg = tiny_config(seed=seed)
            list(run_experiment(cfg, store=RunStore(store_path), source="test"))
        except Exception as err:  # collected and asserted below
            errors.append(err)

    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench_core", "train", *TINY, "--epochs", "2", "--seed", str(i), "--quiet"],
            cwd=tmp_path,
            env=_env(tmp_path, BENCH_CPU_LOCK="0"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert not errors, errors
    runs = RunStore(store_path).list_runs()
    assert len(runs) == 5
    assert all(r["status"] == "finished" for r in runs)
    store = RunStore(store_path)
    for run in runs:
        full = store.get_run(run["id"])
        assert len(full["records"]) == 4  # 2 methods x 2 epochs, none lost or mixed up
        assert {r["method"] for r in full["records"]} == {"classic", "batchensemble"}
        assert set(full["results"]) == {"classic", "batchensemble"}


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("damage", ["truncated", "corrupt", "missing"])
def test_damaged_dataset_file_is_one_line(tmp_path, damage):
    copy = tmp_path / "fm"
    shutil.copytree(FASHION, copy)
    target = copy / "train-images-idx3-ubyte.gz"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:50_000])
    elif damage == "corrupt":
        target.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + os.urandom(1000)))
    else:
        target.unlink()
    env = _env(tmp_path, BENCH_FASHION_MNIST_DIR=str(copy))
    result = cli(tmp_path, "train", "--dataset", "fashion-mnist", "--no-download", "--epochs", "1", env=env)
    assert_one_line_error(result, "fashion-mnist")


def test_data_folder_that_cannot_be_written(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    result = cli(tmp_path, "train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "afile" / "data"))
    assert_one_line_error(result)


@pytest.mark.parametrize("kind", ["corrupt", "older"])
def test_store_that_is_corrupt_or_older_is_refused_and_kept(tmp_path, kind):
    import sqlite3

    store_path = tmp_path / "data" / "runs.sqlite"
    store_path.parent.mkdir(parents=True)
    if kind == "corrupt":
        store_path.write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    else:
        with sqlite3.connect(store_path) as conn:
            conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
            conn.execute("PRAGMA user_version = 0")
    before = store_path.read_bytes()
    result = cli(tmp_path, "train", *TINY, "--epochs", "1")
    line = assert_one_line_error(result, "runs.sqlite")
    assert ("corrupt" in line) if kind == "corrupt" else ("schema" in line or "version" in line)
    assert store_path.read_bytes() == before


def test_diverging_run_is_one_line_and_stored_as_failed(tmp_path):
    result = cli(tmp_path, "train", *TINY, "--epochs", "5", "--lr", "1e12")
    assert_one_line_error(result, "diverged", "lower learning rate")
    assert "failed" in cli(tmp_path, "runs").stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--batch-size", "5000"], "larger than the 600 training examples"),
        (["--be-batching", "split", "--batch-size", "4", "--ensemble-size", "8"], "can't be split among 8 members"),
    ],
)
def test_sizes_the_dataset_cannot_serve(tmp_path, args, needle):
    assert_one_line_error(cli(tmp_path, "train", *TINY, *args), needle)


# --- permissions, the worker, weights that can't be saved, a second Ctrl-C ----------------------


def _without_root_override() -> list[str]:
    """An argv prefix under which file permissions apply to root too (none is needed for a user)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions can't be made to apply")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def cli_as_user(tmp_path, *args, env=None):
    return subprocess.run(
        [*_without_root_override(), sys.executable, "-m", "bench_core", *args],
        cwd=tmp_path, env=env or _env(tmp_path), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_unreadable_dataset_file_is_a_permission_error_not_corruption(tmp_path):
    copy = tmp_path / "fm"
    shutil.copytree(FASHION, copy)
    (copy / "train-labels-idx1-ubyte.gz").chmod(0)
    env = _env(tmp_path, BENCH_FASHION_MNIST_DIR=str(copy))
    result = cli_as_user(tmp_path, "train", "--dataset", "fashion-mnist", "--no-download", "--no-store", env=env)
    last = assert_one_line_error(result, "permission denied", "train-labels-idx1-ubyte.gz")
    assert "corrupt" not in last and "delete" not in last  # deleting a good file would not help


def test_store_in_a_folder_that_cannot_be_searched_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o600)  # readable, not searchable
    try:
        for args in (["runs"], ["train", *TINY, "--epochs", "1"]):
            result = cli_as_user(tmp_path, *args, "--store", str(locked / "runs.sqlite"))
            assert_one_line_error(result, "Permission denied", str(locked / "runs.sqlite"))
    finally:
        locked.chmod(0o700)


def test_runs_of_a_store_that_does_not_exist_creates_nothing(tmp_path):
    result = cli(tmp_path, "runs", "--store", str(tmp_path / "typo" / "runs.sqlite"))
    assert result.returncode == 0
    assert result.stdout.strip() == f"no runs: there is no run store at {tmp_path / 'typo' / 'runs.sqlite'}"
    assert not (tmp_path / "typo").exists()


def test_a_store_edited_into_other_shapes_still_lists(tmp_path):
    """Settings and dates of shapes this code never writes: `runs` shows '?', a worker refuses them."""
    import sqlite3

    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    ids = [store.create_run(tiny_config().to_dict(), source="test") for _ in range(3)]
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE runs SET config = ? WHERE id = ?", ('{"methods": ["classic"], "data": "cifar10"}', ids[0]))
        conn.execute("UPDATE runs SET config = ?, created = 'yesterday' WHERE id = ?", ('{"methods": [', ids[1]))
    by_id = {run["id"]: run for run in RunStore(path).list_runs()}
    assert [by_id[i]["config_readable"] for i in ids] == [False, False, True]
    assert by_id[ids[1]]["created"] == 0.0
    listing = cli(tmp_path, "runs", "--store", str(path))
    assert listing.returncode == 0 and "Traceback" not in listing.stderr
    assert len(listing.stdout.strip().splitlines()) == 4  # the header and the three runs
    for run_id in ids[:2]:
        result = cli(tmp_path, "worker", "--store", str(path), "--run-id", str(run_id))
        assert_one_line_error(result, f"run {run_id} has bad settings")
        assert RunStore(path).status(run_id) == "failed"  # not run with default settings, not left queued


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("data_dir", 5, "data folder must be a path, got 5"), ("download", "false", "download must be true or false")],
)
def test_a_queued_run_whose_data_settings_have_other_types_fails_in_one_line(tmp_path, field, value, expected):
    """A store edited by hand: a folder that is a number, or "false" (which would read as true and download)."""
    path = tmp_path / "runs.sqlite"
    config = tiny_config().to_dict()
    config["data"][field] = value
    run_id = RunStore(path).create_run(config, source="test", status="queued")
    result = cli(tmp_path, "worker", "--store", str(path), "--run-id", str(run_id))
    assert_one_line_error(result, f"run {run_id} has bad settings: {expected}")
    assert RunStore(path).status(run_id) == "failed"
    assert not (tmp_path / "data").exists(), "no data folder made, nothing downloaded"


def test_a_worker_of_a_store_that_does_not_exist_creates_nothing(tmp_path):
    result = cli(tmp_path, "worker", "--store", str(tmp_path / "typo" / "runs.sqlite"), "--run-id", "1")
    assert_one_line_error(result, f"there is no run store at {tmp_path / 'typo' / 'runs.sqlite'}")
    assert not (tmp_path / "typo").exists()


def test_runs_of_an_empty_file_leaves_it_empty(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    result = cli(tmp_path, "runs", "--store", str(empty))
    assert (result.returncode, result.stdout.strip()) == (0, f"no runs in {empty}")
    assert empty.stat().st_size == 0, "a listing writes no store into it"


def test_the_worker_runs_only_a_queued_run(tmp_path):
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    events = list(run_experiment(tiny_config(epochs=1), store=store, source="test"))
    run_id = events[-1].run_id
    before = store.get_run(run_id)
    result = cli(tmp_path, "worker", "--store", str(path), "--run-id", str(run_id))
    assert_one_line_error(result, f"run {run_id} is finished, not queued")
    after = RunStore(path).get_run(run_id)
    assert (after["status"], after["records"], after["results"]) == ("finished", before["records"], before["results"])


def test_weights_that_cannot_be_saved_fail_nothing_else(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    (tmp_path / "weights").write_text("a file where the weights folder would go")
    done = list(run_experiment(tiny_config(epochs=1), store=store, source="test"))[-1]
    assert done.status == "finished" and set(done.results) == {"classic", "batchensemble"}
    assert [note.split(":")[0] for note in done.notes] == [
        "the weights of classic were not saved",
        "the weights of batchensemble were not saved",
    ]
    run = store.get_run(done.run_id)
    assert run["status"] == "finished" and set(run["results"]) == {"classic", "batchensemble"}
    assert run["message"].startswith("the weights of classic were not saved: can't save weights to")


def test_a_second_ctrl_c_marks_the_run_interrupted_and_keeps_its_epochs(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    events = run_experiment(tiny_config(epochs=3), store=store, source="test")
    for event in events:
        if getattr(event, "kind", "") == "epoch":
            break
    with pytest.raises(KeyboardInterrupt):
        events.throw(KeyboardInterrupt)  # what the second Ctrl-C's handler raises in the loop
    (run,) = store.list_runs()
    assert (run["status"], run["message"]) == ("interrupted", "aborted by a second Ctrl-C or SIGTERM")
    assert len(store.records(run["id"])) == 1
    assert not list((tmp_path / "weights").rglob("*.tmp"))


def test_a_run_stored_as_it_ended_stays_so_when_its_consumer_goes_away(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    events = run_experiment(tiny_config(epochs=1), store=store, source="test")
    done = next(event for event in events if type(event).__name__ == "RunDone")
    events.close()  # GeneratorExit at the last yield: the run was already stored as finished
    run = store.get_run(done.run_id)
    assert (run["status"], done.status) == ("finished", "finished")


def test_a_ctrl_c_after_the_run_was_stored_says_so_and_keeps_it(tmp_path, monkeypatch, capsys):
    from bench_core import cli, report

    def interrupted(results):
        raise KeyboardInterrupt  # the second Ctrl-C, as the table is printed

    monkeypatch.setattr(report, "format_table", interrupted)
    store_path, out = tmp_path / "runs.sqlite", tmp_path / "out.json"
    args = ["train", "--dataset", "synthetic", "--synthetic-train", "300", "--synthetic-test", "100", "--hidden", "8"]
    code = cli.main([*args, "--epochs", "1", "--quiet", "--store", str(store_path), "--json", str(out)])
    assert code == 130
    assert capsys.readouterr().err.strip().endswith("interrupted: run 1 is stored as finished")
    assert RunStore(store_path).get_run(1)["status"] == "finished"
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_an_output_file_that_only_opening_refuses_is_refused_before_any_work(tmp_path):
    from bench_core.errors import ConfigError, check_output_file, write_output_file

    for path in (tmp_path / ("a" * 300 + ".json"), Path("/proc/nope.json")):
        with pytest.raises(ConfigError, match="can't write --json"):
            check_output_file(path, "--json")
    fine = tmp_path / "out.json"
    check_output_file(fine, "--json")
    assert not fine.exists(), "the check leaves no file behind"
    fine.write_text("old")
    check_output_file(fine, "--json")
    assert fine.read_text() == "old", "nor empties one that was there"
    write_output_file(fine, "new", "--json")
    assert fine.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    os.mkfifo(tmp_path / "fifo")
    check_output_file(tmp_path / "fifo", "--json")  # returns: a FIFO is not opened (that would block)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere.json")
    check_output_file(tmp_path / "dangling", "--json")
    assert (tmp_path / "dangling").is_symlink() and not (tmp_path / "nowhere.json").exists(), "the link left alone"
    (tmp_path / "link").symlink_to(fine)
    fine.chmod(0o664)
    write_output_file(tmp_path / "link", "through the link", "--json")
    assert (tmp_path / "link").is_symlink() and fine.read_text() == "through the link"
    assert fine.stat().st_mode & 0o777 == 0o664, "written in place: its mode kept"
