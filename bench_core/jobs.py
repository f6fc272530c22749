"""Background runs for the dashboard: one worker process per run.

The dashboard never trains in its own script thread. ``launch_run`` queues a run in the
store and starts ``python -m bench_core worker --store ... --run-id ...`` in a new session,
its output going to ``<store dir>/logs/<run_id>.log``. The worker reads its settings from
the store, writes records and results there, and checks the store for stop requests
(``watch_stop``); the dashboard only reads the store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from bench_core.errors import BenchError, StoreError
from bench_core.store import ACTIVE_STATUSES, RunStore

PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the folder that holds bench_core/


def log_path(store_path: Path | str, run_id: int) -> Path:
    """Where the worker of ``run_id`` writes its output."""
    return Path(store_path).expanduser().resolve().parent / "logs" / f"{int(run_id)}.log"


def worker_command(store_path: Path | str, run_id: int, python: str = sys.executable) -> list[str]:
    """The command line of the worker process of ``run_id``."""
    store = str(Path(store_path).expanduser().resolve())
    return [python, "-m", "bench_core", "worker", "--store", store, "--run-id", str(int(run_id))]


def worker_env() -> dict[str, str]:
    """The worker's environment: this one, unbuffered, with this bench_core first on PYTHONPATH.

    The worker keeps the launcher's working directory, so relative paths (./data) agree.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PACKAGE_PARENT) not in paths:
        paths.insert(0, str(PACKAGE_PARENT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def launch_run(
    config: dict, store_path: Path | str, *, name: str | None = None, python: str = sys.executable
) -> tuple[int, subprocess.Popen]:
    """Queue a run and start its worker process; returns (run_id, process).

    The worker's pid is recorded with the queued run at once, so a worker that dies before
    it starts the run is later marked 'interrupted' rather than left queued forever.

    Raises:
        StoreError: the store can't be opened or written.
        BenchError: the worker process can't be started (the run is marked 'failed').
    """
    with RunStore(store_path) as store:
        run_id = store.create_run(config, source="dashboard", name=name, status="queued")
        log = log_path(store.path, run_id)
        cmd = worker_command(store.path, run_id, python=python)
        env = worker_env()
        kwargs: dict = {"start_new_session": True}
        if os.name == "nt":  # pragma: no cover - Windows
            kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=Path.cwd(),
                    env=env,
                    **kwargs,
                )
        except OSError as err:
            message = f"could not start the worker ({' '.join(str(err).split())})"
            store.finish_run(run_id, "failed", message)
            raise BenchError(f"run {run_id}: {message}") from None
        store.set_process(run_id, proc.pid)
    # Wait for the worker in a daemon thread, so it is reaped (no zombie) as soon as it ends,
    # whoever holds the Popen; proc.wait() stays usable by the caller.
    threading.Thread(target=proc.wait, name=f"reap-worker-{run_id}", daemon=True).start()
    return run_id, proc


def request_stop(store_path: Path | str, run_id: int) -> None:
    """Ask the worker of ``run_id`` to stop after its current batch."""
    with RunStore(store_path) as store:
        store.request_stop(run_id)


def watch_stop(
    store: RunStore,
    run_id: int,
    event: threading.Event,
    interval: float = 0.2,
    on_stop: Callable[[], None] | None = None,
) -> threading.Thread:
    """Start a daemon thread that sets ``event`` once a stop of ``run_id`` is requested.

    The thread polls ``store.stop_requested`` every ``interval`` seconds and ends as soon as
    ``event`` is set, by it or by anyone else. A store that is briefly unreadable is retried.
    ``on_stop`` is called when this thread is the one that sets it.
    """

    def watch() -> None:
        try:
            while not event.is_set():
                try:
                    if store.stop_requested(run_id):
                        event.set()
                        if on_stop is not None:
                            on_stop()
                        break
                except StoreError:
                    pass
                event.wait(interval)
        finally:
            store.close()  # this thread's connection

    thread = threading.Thread(target=watch, name=f"watch-stop-{run_id}", daemon=True)
    thread.start()
    return thread


def is_active(status: str) -> bool:
    """Whether a run of this status may still change (queued or running)."""
    return status in ACTIVE_STATUSES


WAITING = "waiting for "  # how the note of a run waiting for its device begins (runner.waiting_note)


def is_waiting(run: dict) -> bool:
    """Whether a stored run (``RunStore.list_runs``'s dict) waits for its turn on its device."""
    return run.get("status") == "running" and str(run.get("note") or "").startswith(WAITING)


def status_text(run: dict) -> str:
    """A stored run's status as the Runs page and ``runs`` show it: "waiting" for a running run that waits its turn."""
    return "waiting" if is_waiting(run) else str(run.get("status"))
