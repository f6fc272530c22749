"""Errors a user can meet, each with a one-line message that says what to do.

Every error raised on purpose by bench_core derives from BenchError; the CLI prints
``str(error)`` and exits with status 2, the dashboard shows it with ``st.error``.
"""


class BenchError(Exception):
    """Base class: ``str(err)`` is a single line fit to show a user."""


class ConfigError(BenchError, ValueError):
    """A setting is out of range or of the wrong kind."""


class DatasetError(BenchError):
    """A dataset is missing, truncated, corrupt or can't be downloaded."""


class DeviceError(BenchError):
    """The requested device does not exist on this machine."""


class DivergedError(BenchError):
    """Training produced a non-finite loss."""


class DeviceOutOfMemoryError(BenchError):
    """The device ran out of memory; the message names the setting to lower."""


class StoreError(BenchError):
    """The run store can't be opened, is corrupt, or is of another schema."""
