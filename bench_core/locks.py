"""One training (or benchmark) at a time per device on this machine, across processes.

``device_lock`` takes an exclusive ``flock`` on ``<lock folder>/<device>.lock`` (``cuda-0.lock``,
``cpu.lock``, ``mps.lock``) and writes into it who holds it (its pid and "run 7", "a benchmark"),
which ``lock_holder`` reads for a note such as "waiting for the CPU: run 7 is using it". The lock
folder is one per machine (``default_lock_dir``: ``$BENCH_LOCK_DIR``, else
``~/.cache/bench_core/locks``), so the dashboard's runs, its Speed benchmark and the command
line's ``train`` and ``bench`` meet whatever their store, data folder or working folder. The lock
is about the device's name only; it never touches CUDA, so it can be tested without a GPU. The
operating system drops the lock when its process dies, even by SIGKILL. Waiting runs retry every
``poll`` seconds: the next one to get the device is whichever retries first, not the first to come.

Why the CPU too: on this project's 2-core machine two runs at once do not each get half the
cores, they fight for them (each process's torch threads want both). Two runs of 20,000 synthetic
CIFAR-shaped examples, 2 epochs, started together: at once (``BENCH_CPU_LOCK=0``) both were done
after 29.9 s, with epochs of 5.2-6.9 s; taking turns after 17.2 s, with epochs of 1.3-1.4 s, as
alone (docs/speed-log.md, twenty-second session). So runs take turns: both finish sooner, and
each one's timings are its own. ``BENCH_CPU_LOCK=0`` lets CPU runs train at once all the same.
Where ``fcntl`` is missing (Windows) nothing is locked.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench_core.errors import BenchError, switched_off

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


ENV_CPU_LOCK = "BENCH_CPU_LOCK"  # "0": CPU runs and benchmarks do not take turns
ENV_LOCK_DIR = "BENCH_LOCK_DIR"  # the folder of the lock files (default: ~/.cache/bench_core/locks)


def default_lock_dir() -> Path:
    """Where runs and benchmarks on this machine meet: ``$BENCH_LOCK_DIR``, else ``<cache>/bench_core/locks``."""
    if os.environ.get(ENV_LOCK_DIR):
        return Path(os.environ[ENV_LOCK_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bench_core" / "locks"


class LockCancelledError(BenchError):
    """The wait for a device lock was given up because a stop was requested."""


def _device_parts(device: Any) -> tuple[str, int | None]:
    """(type, index) of a torch.device or a device string such as "cuda:1"."""
    if isinstance(device, str):
        kind, _, index = device.strip().lower().partition(":")
        return kind, int(index) if index.strip() else None
    return str(device.type), device.index


def lock_name(device: Any) -> str | None:
    """The lock file's name for ``device`` ("cuda-0.lock", "cpu.lock", "mps.lock"), or None for an unlocked one.

    ``cuda`` without an index means ``cuda:0``. When CUDA_VISIBLE_DEVICES is set the index is
    mapped to the physical device it names, so processes with different masks still agree. The
    CPU is unlocked where ``BENCH_CPU_LOCK=0``, and every device where ``fcntl`` is missing.
    """
    if fcntl is None:
        return None  # nothing is locked without flock (Windows)
    kind, index = _device_parts(device)
    if kind == "cpu":
        return None if switched_off(ENV_CPU_LOCK) else "cpu.lock"
    if kind == "mps":
        return "mps.lock"
    if kind != "cuda":
        return None
    index = 0 if index is None else index
    physical = str(index)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if 0 <= index < len(entries):
            physical = entries[index]
    return f"cuda-{re.sub(r'[^A-Za-z0-9_.-]', '_', physical)}.lock"


def device_word(device: Any) -> str:
    """How a waiting note names the device: "the CPU", or "the GPU" (CUDA or MPS)."""
    return "the CPU" if _device_parts(device)[0] == "cpu" else "the GPU"


def lock_holder(device: Any, lock_dir: Path | str | None = None) -> str | None:
    """Who holds ``device``'s lock now ("run 7", "a benchmark", "another run"), or None if nobody does.

    Read from the lock file without touching the lock (a probe would make a run that starts at
    that moment wait): its holder writes it once it has the lock and empties it before letting go;
    one killed before that left its pid, which is no longer alive. For messages only: the answer
    may be out of date by the time it is shown.
    """
    name = lock_name(device)
    if name is None or fcntl is None:
        return None
    try:
        lines = (Path(lock_dir or default_lock_dir()) / name).read_text(errors="replace").splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None  # never taken here, or free
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # its holder was killed
    except OSError:
        pass  # alive, another user's
    return lines[1].strip() if len(lines) > 1 and lines[1].strip() else "another run"


@contextlib.contextmanager
def device_lock(
    device: Any,
    lock_dir: Path | str | None = None,
    on_wait: Callable[[], None] | None = None,
    *,
    cancel: threading.Event | None = None,
    poll: float = 0.2,
    holder: str = "another run",
    on_poll: Callable[[], None] | None = None,
) -> Iterator[Path | None]:
    """Hold the device for the duration of the block; yields the lock path, or None where it is not locked.

    Args:
        device: a torch.device or device string ("cuda", "cuda:1", "cpu", "mps").
        lock_dir: folder of the lock files (created if missing); None: ``default_lock_dir()``.
        on_wait: called once if the device is taken, before waiting (e.g. to set a note
            "waiting for the GPU").
        cancel: if given, the wait polls every ``poll`` seconds and gives up with
            LockCancelledError once the event is set; without it the wait blocks.
        poll: seconds between attempts when ``cancel`` is given.
        holder: who holds it, for ``lock_holder`` ("run 7", "a benchmark").
        on_poll: called after each failed attempt while polling (e.g. to name a new holder).

    Raises:
        LockCancelledError: ``cancel`` was set while waiting.

    Where the lock file can't be created (a folder that can't be written), the block runs unlocked
    and yields None, as for a device that is not locked: ``lock_name`` tells the two apart.
    """
    name = lock_name(device)
    if name is None or fcntl is None:
        yield None
        return
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    path = lock_dir / name
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a folder that can't be written: the run goes on without taking turns
        fd = None
    if fd is None:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            if cancel is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                while True:
                    if cancel.is_set():
                        raise LockCancelledError(f"gave up waiting for {name.removesuffix('.lock')}") from None
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if on_poll is not None:
                            on_poll()
                        cancel.wait(poll)
        with contextlib.suppress(OSError):  # who holds it, for lock_holder and a person looking
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{' '.join(holder.split())}\n".encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):  # free again: lock_holder reads nobody
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
