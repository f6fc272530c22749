"""One training per CUDA device at a time, across processes.

``device_lock`` takes an exclusive ``flock`` on ``<lock_dir>/cuda-<index>.lock``. The lock is
about the device's name only; it never touches CUDA, so it can be tested without a GPU.
The operating system drops the lock when its process dies, even by SIGKILL.

CPU and MPS devices are not locked, and neither is anything where ``fcntl`` is missing
(Windows): there the context manager does nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench_core.errors import BenchError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class LockCancelledError(BenchError):
    """The wait for a device lock was given up because a stop was requested."""


def _device_parts(device: Any) -> tuple[str, int | None]:
    """(type, index) of a torch.device or a device string such as "cuda:1"."""
    if isinstance(device, str):
        kind, _, index = device.strip().lower().partition(":")
        return kind, int(index) if index.strip() else None
    return str(device.type), device.index


def lock_name(device: Any) -> str | None:
    """The lock file's name for ``device`` ("cuda-0.lock"), or None for an unlocked device.

    ``cuda`` without an index means ``cuda:0``. When CUDA_VISIBLE_DEVICES is set the index is
    mapped to the physical device it names, so processes with different masks still agree.
    """
    kind, index = _device_parts(device)
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


@contextlib.contextmanager
def device_lock(
    device: Any,
    lock_dir: Path | str,
    on_wait: Callable[[], None] | None = None,
    *,
    cancel: threading.Event | None = None,
    poll: float = 0.2,
) -> Iterator[Path | None]:
    """Hold the device for the duration of the block (CUDA only); yields the lock path or None.

    Args:
        device: a torch.device or device string ("cuda", "cuda:1", "cpu", "mps").
        lock_dir: folder of the lock files (created if missing).
        on_wait: called once if the device is taken, before waiting (e.g. to set a note
            "waiting for the GPU").
        cancel: if given, the wait polls every ``poll`` seconds and gives up with
            LockCancelledError once the event is set; without it the wait blocks.
        poll: seconds between attempts when ``cancel`` is given.

    Raises:
        LockCancelledError: ``cancel`` was set while waiting.
    """
    name = lock_name(device)
    if name is None or fcntl is None:
        yield None
        return
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
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
                        cancel.wait(poll)
        with contextlib.suppress(OSError):  # who holds it, for a person looking
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
