"""Which devices exist here, and how to time work on them honestly."""

from __future__ import annotations

from pathlib import Path

import torch

from bench_core.errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The first value of ``name`` in /proc/cpuinfo ("vendor_id", "model name"), stripped.

    None where the file cannot be read (not Linux) or has no such field (``vendor_id`` on Arm CPUs).
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def available_devices() -> list[str]:
    """Devices usable on this machine, best first ("cpu" is always last)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


def resolve_device(name: str) -> torch.device:
    """Turn a device name ("auto", "cpu", "cuda", "cuda:1", "mps") into a torch.device.

    Raises:
        DeviceError: the name is unknown or the device is not on this machine.
    """
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    kind = name.split(":", 1)[0]
    if kind not in DEVICE_CHOICES:
        msg = f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}"
        raise DeviceError(msg)
    if kind not in available_devices():
        msg = f"device {name!r} is not available on this machine (available: {', '.join(available_devices())})"
        raise DeviceError(msg)
    try:
        device = torch.device(name)
    except RuntimeError as err:
        msg = f"invalid device {name!r}: {err}"
        raise DeviceError(msg) from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        msg = f"device {name!r} is not available: this machine has {torch.cuda.device_count()} CUDA device(s)"
        raise DeviceError(msg)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that a wall-clock reading covers them (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep glibc from returning large freed blocks to the OS after every training step.

    A training step allocates and frees tensors of several MiB; by default glibc serves such
    blocks with mmap and unmaps them on free, so every step pays page faults to get fresh zeroed
    pages (measured here: about 15 % of a BatchEnsemble step on CPU). Raising the mmap and trim
    thresholds keeps them in the heap for reuse. Returns True when the thresholds were set
    (glibc only; elsewhere a no-op).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # glibc caps the mmap threshold at 32 MiB on 64-bit: blocks below it come from the heap,
    # and the heap keeps up to 1 GiB of free space instead of trimming it after each step.
    mmap_set = mallopt(m_mmap_threshold, 32 << 20)
    trim_set = mallopt(m_trim_threshold, 1 << 30)
    _ALLOCATOR_TUNED = bool(mmap_set) and bool(trim_set)
    return _ALLOCATOR_TUNED
