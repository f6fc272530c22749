"""One training (or benchmark) at a time per device on this machine, across processes.

``device_lock`` takes an exclusive ``flock`` on ``<lock folder>/<device>.lock`` (``cuda-0.lock``,
``cpu.lock``, ``mps.lock``) and writes into it who holds it (its pid and "run 7", "a benchmark"),
which ``lock_holder`` reads for a note such as "waiting for the CPU: run 7 is using it". The lock
folder is one per user of a machine (``default_lock_dir``: ``$BENCH_LOCK_DIR``, else
``~/.cache/bench_core/locks``), so the dashboard's runs, its Speed benchmark and the command
line's ``train`` and ``bench`` meet whatever their store, data folder or working folder (the runs
of two users of one machine do not take turns). The lock
is about the device's name only; it never touches CUDA, so it can be tested without a GPU. The
operating system drops the lock when its process dies, even by SIGKILL. Waiters queue in order of
arrival in ``<device>.lock.queue`` beside it: only the first may take the device, and a newcomer
does not pass them. Each waiter looks every ``poll`` seconds and marks its line when it does; a
line whose process is gone, or that has not been marked for ``QUEUE_STALE_S`` (a waiter killed or
suspended), is dropped.

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
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench_core.errors import BenchError, switched_off
from bench_core.store import pid_exists

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


ENV_CPU_LOCK = "BENCH_CPU_LOCK"  # "0": CPU runs and benchmarks do not take turns
ENV_LOCK_DIR = "BENCH_LOCK_DIR"  # the folder of the lock files (default: ~/.cache/bench_core/locks)
# A waiter that has not looked for this long (suspended, or a reused pid's) loses its place: well above
# the store's busy timeout (30 s), which a waiter's note can wait on between two looks.
QUEUE_STALE_S = 120.0
_TICKETS = itertools.count()  # with the pid and the thread: each wait's own line in the queue


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
    if name is None:
        return None
    try:
        lines = (Path(lock_dir or default_lock_dir()) / name).read_text(errors="replace").splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None  # never taken here, or free
    if not pid_exists(pid):
        return None  # its holder was killed
    return lines[1].strip() if len(lines) > 1 and lines[1].strip() else "another run"


def _in_queue(path: Path, change: Callable[[list[list]], Any]) -> Any:
    """``change(waiters)`` under the queue file's exclusive flock; the list it leaves is written back.

    ``waiters``: ``[ticket, last look, who]`` in order of arrival, those gone or stale already
    dropped. Looks are ``time.monotonic()`` (one clock for the machine, which a change of the
    wall clock does not move); a look further than ``QUEUE_STALE_S`` from now either way (a
    reboot between) is stale. Returns what ``change`` returns.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        now = time.monotonic()
        waiters, tickets = [], set()
        for line in os.pread(fd, 1 << 20, 0).decode(errors="replace").splitlines():
            parts = line.split(" ", 2)
            try:
                ticket, seen, who = parts[0], float(parts[1]), parts[2] if len(parts) > 2 else ""
                pid = int(ticket.split("-")[0])
            except (IndexError, ValueError):
                continue
            if ticket not in tickets and abs(now - seen) < QUEUE_STALE_S and pid_exists(pid):
                waiters.append([ticket, seen, who])
                tickets.add(ticket)
        result = change(waiters)
        data = "".join(f"{ticket} {seen:.3f} {who}\n" for ticket, seen, who in waiters).encode()
        os.pwrite(fd, data, 0)  # then cut what is left of a longer list: an interruption loses no line
        os.ftruncate(fd, len(data))
        return result
    finally:
        os.close(fd)  # and with it the flock


def waiting_count(device: Any, lock_dir: Path | str | None = None) -> int:
    """How many runs and benchmarks wait for ``device`` now (for messages only)."""
    name = lock_name(device)
    path = Path(lock_dir or default_lock_dir()) / f"{name}.queue" if name else None
    if path is None or not path.exists():
        return 0
    try:
        return _in_queue(path, len)
    except OSError:
        return 0


@contextlib.contextmanager
def device_lock(
    device: Any,
    lock_dir: Path | str | None = None,
    on_wait: Callable[[], None] | None = None,
    *,
    cancel: threading.Event | None = None,
    poll: float = 0.2,
    holder: str = "another run",
    on_poll: Callable[[int | None], None] | None = None,
) -> Iterator[Path | None]:
    """Hold the device for the duration of the block; yields the lock path, or None where it is not locked.

    Args:
        device: a torch.device or device string ("cuda", "cuda:1", "cpu", "mps").
        lock_dir: folder of the lock files (created if missing); None: ``default_lock_dir()``.
        on_wait: called once if the device is taken or others wait for it, before waiting (e.g. to
            set a note "waiting for the GPU").
        cancel: if given, the wait gives up with LockCancelledError once the event is set (looked
            at every ``poll`` seconds); without it the wait lasts as long as it must.
        poll: seconds between two looks while waiting.
        holder: who holds it, for ``lock_holder`` ("run 7", "a benchmark").
        on_poll: called at each look while waiting with the number of waiters ahead of this one
            (None where the queue file can't be written), e.g. to name a new holder.

    Raises:
        LockCancelledError: ``cancel`` was set while waiting.

    Where the lock file can't be created (a folder that can't be written), the block runs unlocked
    and yields None, as for a device that is not locked: ``lock_name`` tells the two apart.
    """
    name = lock_name(device)
    if name is None:  # not locked (or no flock here)
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
    queue = lock_dir / f"{name}.queue"
    ticket = f"{os.getpid()}-{threading.get_ident()}-{next(_TICKETS)}"
    who = " ".join(holder.split()) or "another run"

    def turn(waiters: list[list]) -> int | None:
        """Take the device if no one waits ahead (None), else join or stay in the queue: how many wait ahead."""
        mine = next((w for w in waiters if w[0] == ticket), None)
        ahead = waiters.index(mine) if mine is not None else len(waiters)
        if ahead == 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                if mine is not None:
                    waiters.remove(mine)
                return None
        if mine is not None:
            mine[1] = time.monotonic()
        else:
            waiters.append([ticket, time.monotonic(), who])
        return ahead

    def leave(waiters: list[list]) -> None:
        waiters[:] = [w for w in waiters if w[0] != ticket]

    def look() -> int | None:
        """``turn`` through the queue; where its file can't be written, the device when free (-1: place unknown)."""
        try:
            return _in_queue(queue, turn)
        except OSError:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return -1
            return None

    try:
        try:
            ahead = look()
            if ahead is not None and on_wait is not None:
                on_wait()
            while ahead is not None:
                if cancel is not None and cancel.is_set():
                    raise LockCancelledError(f"gave up waiting for {name.removesuffix('.lock')}")
                if on_poll is not None:
                    on_poll(ahead if ahead >= 0 else None)
                if cancel is not None:
                    cancel.wait(poll)
                else:
                    time.sleep(poll)
                ahead = look()
        except BaseException:  # a stop, an interrupt: give up the place (if one was taken)
            with contextlib.suppress(OSError):
                _in_queue(queue, leave)
            raise
        with contextlib.suppress(OSError):  # who holds it, for lock_holder and a person looking
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{who}\n".encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):  # free again: lock_holder reads nobody
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
