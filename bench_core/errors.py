"""Errors a user can meet, each with a one-line message that says what to do.

Every error raised on purpose by bench_core derives from BenchError; the CLI prints
``str(error)`` and exits with status 2, the dashboard shows it with ``st.error``.
"""

import os
import warnings


def switched_off(env_name: str) -> bool:
    """Whether the environment variable ``env_name`` turns an optional fast path off: its value is ``0``."""
    return os.environ.get(env_name, "1").strip() == "0"


def describe_error(err: BaseException) -> str:
    """``{type}: {the message's first line}`` (at most 200 characters of it), or the type alone without one."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200] if text else ''}".rstrip(": ")


def warn_off(what: str, err: BaseException, instead: str) -> None:
    """One ``RuntimeWarning``: ``{what} are off ({type}: {err's first line}); {instead}``, on one line.

    For optional fast paths that fail and fall back (``bench_core.kernels``, ``bench_core.onednn``,
    ``bench_core.optim``).
    """
    text = str(err).strip()
    reason = text.splitlines()[0] if text else type(err).__name__
    warnings.warn(f"{what} are off ({type(err).__name__}: {reason[:200]}); {instead}", RuntimeWarning, stacklevel=4)


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


class StopRequestedError(BenchError):
    """A stop was asked for while a run's data loaded: nothing was trained and nothing failed."""


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Raise ConfigError unless ``path`` can be written as a file: not a folder, its folder there and writable.

    Asked before the work whose figures go there, so that nothing is computed for a file that
    can't be written.
    """
    target = os.path.abspath(os.fspath(path))
    if os.path.isdir(target):
        raise ConfigError(f"can't write {flag} {path}: it is a folder")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        why = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise ConfigError(f"can't write {flag} {path}: its folder {folder} {why}")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise ConfigError(f"can't write {flag} {path}: permission denied")
    if os.path.lexists(target):  # a file, a link, /dev/stdout, a FIFO: written as it is, never opened here
        return
    try:  # what only creating tells: a name too long, a file system that takes no files (/proc)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        raise ConfigError(f"can't write {flag} {path}: {err.strerror or err}") from None
    os.unlink(target)


def write_output_file(path: str | os.PathLike, text: str, flag: str) -> None:
    """Write ``text`` to ``path`` as ``open(path, "w")`` does (a link followed, /dev/stdout written to).

    Raises ConfigError, with the reason, where it can't be written.
    """
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as err:
        raise ConfigError(f"can't write {flag} {path}: {err.strerror or err}") from None


def is_allocation_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed memory allocation: ``MemoryError``, or torch's CPU allocator refusing."""
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
