"""Which devices exist here, and how to time work on them honestly."""

from __future__ import annotations

import torch

from bench_core.errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


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
