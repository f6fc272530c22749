"""Background worker processes, stop requests and the per-device lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bench_core import jobs
from bench_core.locks import (
    ENV_CPU_LOCK,
    QUEUE_STALE_S,
    LockCancelledError,
    device_lock,
    lock_holder,
    lock_name,
    waiting_count,
)
from bench_core.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"methods": ["classic"], "train": {"epochs": 1}}

needs_flock = pytest.mark.skipif(sys.platform == "win32", reason="no fcntl.flock on Windows")


def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


# ----------------------------------------------------------------------------- jobs


def test_is_active():
    assert jobs.is_active("queued")
    assert jobs.is_active("running")
    for status in ("finished", "stopped", "failed", "interrupted"):
        assert not jobs.is_active(status)


def test_worker_command_and_env(tmp_path):
    store = tmp_path / "runs.sqlite"
    cmd = jobs.worker_command(store, 7, python="/usr/bin/python3")
    assert cmd == ["/usr/bin/python3", "-m", "bench_core", "worker", "--store", str(store.resolve()), "--run-id", "7"]
    env = jobs.worker_env()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert jobs.log_path(store, 7) == tmp_path.resolve() / "logs" / "7.log"


def _stand_in(tmp_path: Path, body: str) -> str:
    """An executable that mimics ``python -m bench_core worker --store S --run-id N``."""
    script = tmp_path / "fake_python"
    script.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            """
            import os, sys, time
            from bench_core.store import RunStore
            argv = sys.argv[1:]
            assert argv[:3] == ["-m", "bench_core", "worker"], argv
            store = RunStore(argv[argv.index("--store") + 1])
            run_id = int(argv[argv.index("--run-id") + 1])
            print("stand-in worker", run_id, flush=True)
            """
        )
        + textwrap.dedent(body)
    )
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(os.name == "nt", reason="POSIX stand-in script")
def test_launch_run_runs_worker_to_finished(tmp_path):
    store_path = tmp_path / "data" / "runs.sqlite"
    python = _stand_in(
        tmp_path,
        """
        store.start_run(run_id, device="cpu", versions={})
        for epoch in (1, 2):
            store.add_record(run_id, {"kind": "epoch", "method": "classic", "epoch": epoch, "cwd": os.getcwd()})
        store.set_result(run_id, "classic", {"ensemble_accuracy": 0.5, "train_seconds": 0.1})
        store.finish_run(run_id, "finished", "ok")
        """,
    )
    run_id, proc = jobs.launch_run(CONFIG, store_path, name="bg", python=python)
    try:
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with RunStore(store_path) as store:
        run = store.get_run(run_id)
    assert run["status"] == "finished"
    assert (run["source"], run["name"], run["config"]) == ("dashboard", "bg", CONFIG)
    assert [r["epoch"] for r in run["records"]] == [1, 2]
    assert run["records"][0]["cwd"] == os.getcwd()
    assert run["summary"] == {"classic": {"ensemble_accuracy": 0.5, "train_seconds": 0.1}}
    assert run["pid"] == proc.pid
    log = store_path.parent / "logs" / f"{run_id}.log"
    assert f"stand-in worker {run_id}" in log.read_text()


@pytest.mark.skipif(os.name == "nt", reason="POSIX stand-in script")
def test_launched_run_stays_queued_until_its_worker_dies(tmp_path):
    store_path = tmp_path / "runs.sqlite"
    python = _stand_in(tmp_path, "time.sleep(1.5)\n")
    run_id, proc = jobs.launch_run(CONFIG, store_path, python=python)
    try:
        with RunStore(store_path) as store:  # reconcile while the worker lives: still queued
            run = store.get_run(run_id)
            assert run["status"] == "queued"
            assert run["pid"] == proc.pid
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with RunStore(store_path) as store:  # the worker exited without starting the run
        assert store.get_run(run_id)["status"] == "interrupted"


def test_launch_run_with_missing_python_fails_cleanly(tmp_path):
    store_path = tmp_path / "runs.sqlite"
    with pytest.raises(jobs.BenchError, match="could not start the worker"):
        jobs.launch_run(CONFIG, store_path, python=str(tmp_path / "no-such-python"))
    with RunStore(store_path) as store:
        (run,) = store.list_runs()
    assert run["status"] == "failed"
    assert "could not start the worker" in run["message"]


def test_request_stop_and_watch_stop(tmp_path):
    store_path = tmp_path / "runs.sqlite"
    store = RunStore(store_path)
    run_id = store.create_run(CONFIG, source="test")
    other = store.create_run(CONFIG, source="test")
    event = threading.Event()
    thread = jobs.watch_stop(store, run_id, event, interval=0.02)
    assert thread.daemon
    time.sleep(0.1)
    assert not event.is_set()
    jobs.request_stop(store_path, run_id)
    assert event.wait(5)
    thread.join(5)
    assert not thread.is_alive()
    assert not store.stop_requested(other)

    # The watcher also ends when someone else sets the event.
    event2 = threading.Event()
    thread2 = jobs.watch_stop(store, other, event2, interval=0.02)
    event2.set()
    thread2.join(5)
    assert not thread2.is_alive()
    assert not store.stop_requested(other)
    store.close()


# ----------------------------------------------------------------------------- locks


def test_lock_names(monkeypatch):
    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    assert lock_name("cpu") == "cpu.lock"
    assert lock_name("mps") == "mps.lock"
    assert lock_name("cuda") == "cuda-0.lock"
    assert lock_name("cuda:1") == "cuda-1.lock"
    assert lock_name("meta") is None
    monkeypatch.setenv(ENV_CPU_LOCK, "0")
    assert lock_name("cpu") is None, "CPU runs may train at once where asked"
    assert lock_name("cuda") == "cuda-0.lock"


def test_lock_names_follow_cuda_visible_devices(monkeypatch):
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert lock_name("cuda:1") == "cuda-3.lock"
    assert lock_name(torch.device("cuda", 0)) == "cuda-2.lock"
    assert lock_name(torch.device("cpu")) == "cpu.lock"


def test_cpu_is_not_locked_where_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CPU_LOCK, "0")
    calls = []
    with (
        device_lock("cpu", tmp_path / "locks", on_wait=lambda: calls.append(1)) as held,
        device_lock("cpu", tmp_path / "locks", on_wait=lambda: calls.append(1)),
    ):
        pass
    assert held is None
    assert calls == []
    assert not (tmp_path / "locks").exists()


@needs_flock
def test_the_cpu_is_taken_in_turns_and_says_by_whom(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    assert lock_holder("cpu", tmp_path) is None, "never taken"
    waits = []
    with device_lock("cpu", tmp_path, holder="run 7") as held:
        assert held == tmp_path / "cpu.lock"
        assert lock_holder("cpu", tmp_path) == "run 7"
        assert lock_holder("cuda", tmp_path) is None, "another device"
        waits_until_cancelled("cpu", tmp_path, waits)
    assert waits == [1]
    assert lock_holder("cpu", tmp_path) is None, "free again"


@needs_flock
def test_lock_holder_reads_nobody_once_released_or_its_holder_killed(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    with device_lock("cpu", tmp_path, holder="a benchmark"):
        assert lock_holder("cpu", tmp_path) == "a benchmark"
    assert (tmp_path / "cpu.lock").read_text() == "", "emptied when let go"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "cpu.lock").write_text(f"{int(dead.stdout)}\nrun 5\n")  # what a run killed by SIGKILL leaves
    assert lock_holder("cpu", tmp_path) is None
    if sys.platform.startswith("linux"):  # a holder dead but not yet reaped by its parent: gone too
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        deadline = time.monotonic() + 30
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not end"
            time.sleep(0.05)
        (tmp_path / "cpu.lock").write_text(f"{zombie.pid}\nrun 6\n")
        assert lock_holder("cpu", tmp_path) is None
        zombie.wait()
    (tmp_path / "cpu.lock").write_text("0\nrun 4\n")  # no process has pid 0 (os.kill(0, 0) signals the group)
    assert lock_holder("cpu", tmp_path) is None
    monkeypatch.setenv("BENCH_LOCK_DIR", str(tmp_path / "elsewhere"))
    with device_lock("cpu", holder="run 8") as held:
        assert held == tmp_path / "elsewhere" / "cpu.lock", "one folder for the machine, $BENCH_LOCK_DIR"
        assert lock_holder("cpu") == "run 8"


@needs_flock
def test_waiters_take_the_device_in_order_of_arrival(tmp_path, monkeypatch):
    """The last to come looks most often; in order of arrival it still goes last."""
    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    order, aheads = [], {}

    def waiter(name: str, poll: float) -> None:
        seen = lambda ahead: aheads.setdefault(name, ahead)  # noqa: E731
        with device_lock("cpu", tmp_path, holder=name, poll=poll, on_poll=seen):
            order.append(name)

    threads = []
    with device_lock("cpu", tmp_path, holder="first"):
        for i, (name, poll) in enumerate((("a", 0.2), ("b", 0.05), ("c", 0.005))):
            threads.append(threading.Thread(target=waiter, args=(name, poll)))
            threads[-1].start()
            deadline = time.time() + 5
            while waiting_count("cpu", tmp_path) < i + 1 and time.time() < deadline:
                time.sleep(0.01)
        assert waiting_count("cpu", tmp_path) == 3
    for t in threads:
        t.join(10)
    assert order == ["a", "b", "c"]
    assert aheads == {"a": 0, "b": 1, "c": 2}
    assert waiting_count("cpu", tmp_path) == 0, "each took its line out of the queue"


@needs_flock
def test_a_newcomer_does_not_pass_a_waiter(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    order, waited = [], []

    def waiter() -> None:
        with device_lock("cpu", tmp_path, holder="a", poll=0.3):
            order.append("a")

    thread = threading.Thread(target=waiter)
    with device_lock("cpu", tmp_path, holder="first"):
        thread.start()
        deadline = time.time() + 5
        while waiting_count("cpu", tmp_path) < 1 and time.time() < deadline:
            time.sleep(0.01)
    with device_lock("cpu", tmp_path, holder="newcomer", poll=0.01, on_wait=lambda: waited.append(1)):
        order.append("newcomer")  # the device was free, but "a" had come first
    thread.join(10)
    assert order == ["a", "newcomer"] and waited == [1]


@needs_flock
def test_waiters_gone_or_stale_and_a_stopped_wait_leave_the_queue(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.monotonic()
    lines = [f"{int(dead.stdout)}-1-0 {now:.3f} run 4", f"{os.getpid()}-1-0 {now - QUEUE_STALE_S - 1:.3f} run 5"]
    lines.append(f"{os.getpid()}-1-1 {now + QUEUE_STALE_S + 3600:.3f} run 6")  # looked "in the future": a reboot
    queue = tmp_path / "cpu.lock.queue"
    queue.write_text("\n".join(lines) + "\n")
    with device_lock("cpu", tmp_path, on_wait=lambda: pytest.fail("killed and stale waiters hold no place")):
        cancel = threading.Event()
        threading.Timer(0.2, cancel.set).start()
        with pytest.raises(LockCancelledError), device_lock("cpu", tmp_path, cancel=cancel, poll=0.02):
            pytest.fail("the device is taken")
        assert waiting_count("cpu", tmp_path) == 0, "a stopped wait gives up its place"


@needs_flock
def test_an_interrupted_wait_leaves_no_line_and_an_unwritable_queue_says_no_place(tmp_path, monkeypatch):
    from bench_core import locks

    monkeypatch.delenv(ENV_CPU_LOCK, raising=False)
    with device_lock("cpu", tmp_path, holder="first"):

        def interrupted(*args) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt), device_lock("cpu", tmp_path, on_wait=interrupted):
            pytest.fail("the device is taken")
        assert waiting_count("cpu", tmp_path) == 0, "the line taken before the interrupt is given up"
        monkeypatch.setattr(locks, "_in_queue", lambda *args: (_ for _ in ()).throw(PermissionError("read-only")))
        places, cancel = [], threading.Event()
        threading.Timer(0.2, cancel.set).start()
        with (
            pytest.raises(LockCancelledError),
            device_lock("cpu", tmp_path, cancel=cancel, poll=0.02, on_poll=places.append),
        ):
            pytest.fail("the device is taken")
    assert places and set(places) == {None}, "no queue to read: the place is unknown, not 'next'"


def test_a_lock_folder_that_cant_be_written_runs_unlocked(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with device_lock("cpu", blocker / "locks") as held:
        assert held is None


@needs_flock
def test_cuda_lock_contention_between_threads(tmp_path):
    events: list[str] = []
    waits: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with device_lock("cuda", tmp_path, on_wait=lambda: waits.append("first")):
            events.append("first in")
            first_in.set()
            time.sleep(0.4)
            events.append("first out")

    def second() -> None:
        first_in.wait(5)
        with device_lock("cuda:0", tmp_path, on_wait=lambda: waits.append("second")):
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert events == ["first in", "first out", "second in"]
    assert waits == ["second"]  # called exactly once, only by the one that waited
    assert (tmp_path / "cuda-0.lock").exists()


@needs_flock
def test_other_cuda_index_does_not_wait(tmp_path):
    waits = []
    with device_lock("cuda:0", tmp_path), device_lock("cuda:1", tmp_path, on_wait=lambda: waits.append(1)) as held:
        assert held == tmp_path / "cuda-1.lock"
    assert waits == []


HOLDER = """
import sys, time
from bench_core.locks import device_lock
with device_lock("cuda", sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@needs_flock
def test_cuda_lock_contention_between_processes(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "0.6"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        waited = []
        start = time.monotonic()
        with device_lock("cuda", tmp_path, on_wait=lambda: waited.append(time.monotonic())):
            assert holder.poll() is not None or time.monotonic() - start > 0.3
        assert len(waited) == 1
        assert holder.wait(10) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.stdout.close()


@needs_flock
def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "120"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.kill()
        holder.wait(10)
    finally:
        holder.stdout.close()
    with device_lock("cuda", tmp_path, on_wait=lambda: pytest.fail("should not wait")):
        pass


def waits_until_cancelled(device: str, lock_dir, waits: list) -> None:
    """Wait for ``device`` (taken) until a stop 0.2 s later: LockCancelledError; ``waits`` gets a 1 for on_wait."""
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with (
        pytest.raises(LockCancelledError),
        device_lock(device, lock_dir, on_wait=lambda: waits.append(1), cancel=cancel, poll=0.02),
    ):
        pytest.fail("the device is taken: no lock")


@needs_flock
def test_waiting_can_be_cancelled(tmp_path):
    waits = []
    with device_lock("cuda", tmp_path):
        waits_until_cancelled("cuda", tmp_path, waits)
    assert waits == [1]
