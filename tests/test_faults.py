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


def test_concurrent_trainings_threads_and_processes_share_one_store(tmp_path):
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
            env=_env(tmp_path),
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
