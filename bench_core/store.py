"""The run store: one SQLite file (WAL mode) with every run, its records and results.

Weights live beside the file, in ``<store dir>/weights/<run_id>/<method>.pt``.

One ``RunStore`` may be used from several threads (each thread gets its own connection)
and several processes may use one file at once: every write commits at once, and a busy
database is waited for (``busy_timeout``) rather than failing with "database is locked".

Every run remembers the process that runs it (host, pid and the process's start time), so
that ``reconcile()`` can tell a run whose process was killed from one still going, even when
the operating system has since given the pid to another process.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from bench_core.errors import StoreError

SCHEMA_VERSION = 1
DEFAULT_STORE_NAME = "runs.sqlite"  # its weights go in weights/ beside it (others: <stem>-weights/)
_CONFIG_SECTIONS = ("data", "model", "train")  # the parts of a run's config that are objects
STATUSES = ("queued", "running", "finished", "stopped", "failed", "interrupted")
ACTIVE_STATUSES = ("queued", "running")
FINAL_STATUSES = ("finished", "stopped", "failed", "interrupted")
SOURCES = ("cli", "dashboard", "test")
BUSY_TIMEOUT_S = 30.0

_SQLITE_HEADER = b"SQLite format 3\x00"
_CHECKED_FILES: set[tuple[int, int]] = set()  # (device, inode) of store files this process has opened
_CHECK_LOCK = threading.Lock()  # one header check at a time, so no thread reads it beside a live connection
_TABLES = ("runs", "records", "results")
_METHOD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_LEAVE = "it was left untouched: move it away or set BENCH_STORE to another path"

_SCHEMA = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    name TEXT,
    source TEXT NOT NULL DEFAULT 'cli',
    status TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL DEFAULT '{}',
    device TEXT,
    versions TEXT,
    pid INTEGER,
    pid_start TEXT,
    host TEXT,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    note TEXT,
    progress REAL
);
CREATE TABLE records (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    method TEXT,
    kind TEXT,
    epoch INTEGER,
    step INTEGER,
    data TEXT NOT NULL
);
CREATE INDEX records_run ON records(run_id, id);
CREATE TABLE results (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    method TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, method)
);
CREATE INDEX runs_status ON runs(status);
"""

_LIST_COLUMNS = (
    "id, created, updated, name, source, status, message, device, config, note, progress, stop_requested, pid, host"
)


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def default_store_path() -> Path:
    """Where the run store lives: $BENCH_STORE, else ``<data dir>/runs.sqlite``.

    The data dir is $BENCH_DATA_DIR, else ``./data``.
    """
    explicit = os.environ.get("BENCH_STORE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("BENCH_DATA_DIR") or "data").expanduser() / DEFAULT_STORE_NAME


# ----------------------------------------------------------------------------- processes


def _host() -> str:
    return socket.gethostname()


def process_start_token(pid: int) -> str | None:
    """A token that changes when a pid is reused: the process's start time, or None.

    On Linux this is field 22 (starttime, in clock ticks since boot) of ``/proc/<pid>/stat``;
    elsewhere None (liveness then falls back to "the pid exists"). Zombies count as gone.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or parentheses.
    rest = raw[raw.rfind(")") + 2 :].split()
    if len(rest) < 20 or rest[0] in ("Z", "X", "x"):
        return None
    return rest[19]  # fields start at 3 (state): field 22 is rest[22 - 3]


def pid_exists(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's counts)."""
    if pid <= 0:
        return False
    if sys.platform.startswith("linux"):
        return process_start_token(pid) is not None
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _windows_pid_alive(pid: int) -> bool:  # pragma: no cover - Windows only
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.GetLastError() == 5  # access denied: it exists
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def process_alive(host: str | None, pid: int | None, token: str | None) -> bool | None:
    """Whether the process recorded as (host, pid, start token) still runs.

    Returns None when that can't be told from here (another host, or no pid recorded).
    """
    if host != _host() or pid is None:
        return None
    if not pid_exists(pid):
        return False
    if token is not None:
        current = process_start_token(pid)
        if current is not None and current != token:
            return False  # the pid was reused by another process
    return True


def process_identity(pid: int) -> str:
    """``"<pid> <start token or -> <host>"``, written to a file for ``identity_alive`` to read back."""
    return f"{pid} {process_start_token(pid) or '-'} {_host()}"


def identity_alive(text: str) -> bool | None:
    """``process_alive`` of a ``process_identity``; False for text that names no pid.

    A line without a token is checked by its pid alone, one without a host as of this host.
    """
    parts = text.split()
    if not parts or not (parts[0].isascii() and parts[0].isdigit()):
        return False
    token = parts[1] if len(parts) > 1 and parts[1] != "-" else None
    return process_alive(parts[2] if len(parts) > 2 else _host(), int(parts[0]), token)


def collect_versions() -> dict[str, str]:
    """Versions worth keeping with a run: python, torch, torchvision, bench_core, platform."""

    def version(dist: str, module: str) -> str:
        mod = sys.modules.get(module)
        if mod is not None and getattr(mod, "__version__", None):
            return str(mod.__version__)
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    bench = sys.modules.get("bench_core")
    bench_version = getattr(bench, "__version__", None)
    if not bench_version:
        try:
            bench_version = importlib.metadata.version("bench-core")
        except importlib.metadata.PackageNotFoundError:
            bench_version = "unknown"
    return {
        "python": platform.python_version(),
        "torch": version("torch", "torch"),
        "torchvision": version("torchvision", "torchvision"),
        "bench_core": str(bench_version),
        "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------- JSON


def to_jsonable(value: Any) -> Any:
    """A copy of ``value`` that strict JSON can hold; non-finite floats become None.

    Tuples become lists, dataclasses dicts, numpy/torch scalars and arrays Python numbers
    and lists; anything else unknown becomes its ``str``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value))
    if isinstance(value, Path):
        return str(value)
    for attr in ("tolist", "item"):  # numpy / torch scalars and arrays
        fn = getattr(value, attr, None)
        if callable(fn):
            try:
                return to_jsonable(fn())
            except (TypeError, ValueError, RuntimeError):
                pass
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(to_jsonable(value), allow_nan=False, separators=(",", ":"))


def _loads(text: str | None, default: Any = None) -> Any:
    if text is None:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ----------------------------------------------------------------------------- the store


class RunStore:
    """Runs, their records, results and weights, kept in one SQLite file.

    Args:
        path: the SQLite file; None means ``default_store_path()``.

    Raises:
        StoreError: the folder can't be written, the file is not a SQLite database or is
            corrupt, or it holds another schema version. The file is never modified then.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_store_path()
        self._local = threading.local()
        self._open()
        self.reconcile()

    # -- connections ------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self.path.parent

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as err:
            msg = f"can't open run store {self.path} ({_one_line(err)}): check the path or set BENCH_STORE"
            raise StoreError(msg) from None
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return conn

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        key = os.getpid()
        conn = getattr(local, "conn", None)
        if conn is None or getattr(local, "key", None) != key:
            # A connection inherited over fork() is dropped, never closed or reused.
            conn = self._connect()
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            local.conn, local.key = conn, key
        return conn

    def close(self) -> None:
        """Close this thread's connection (other threads' close when those threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "key", None) == os.getpid():
            conn.close()
        self._local.conn = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the write lock up front (no deadlock on upgrade)."""
        conn = self._conn()
        with self._errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError:
            raise  # the caller knows what a broken constraint means
        except sqlite3.DatabaseError as err:
            text = _one_line(err)
            if "locked" in text or "busy" in text:
                msg = f"run store {self.path} stayed busy for {BUSY_TIMEOUT_S:.0f} s ({text}): try again"
            elif "malformed" in text or "not a database" in text:
                msg = f"run store {self.path} is corrupt ({text}); move it away or set BENCH_STORE to another path"
            else:
                msg = f"run store {self.path}: {text}"
            raise StoreError(msg) from None

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._errors():
            return self._conn().execute(sql, args).fetchall()

    # -- opening ----------------------------------------------------------------------------

    def _open(self) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            msg = f"can't create the folder of run store {path} ({_one_line(err)}): set BENCH_STORE to a writable path"
            raise StoreError(msg) from None
        try:
            is_dir = path.is_dir()
        except OSError as err:  # a folder on the way that can't be searched
            msg = f"can't reach run store {path} ({_one_line(err)}): check its folders' permissions or set BENCH_STORE"
            raise StoreError(msg) from None
        if is_dir:
            msg = f"run store {path} is a folder, not a file: set BENCH_STORE to a file path"
            raise StoreError(msg)
        if not os.access(path.parent, os.W_OK):
            msg = f"can't write in the folder of run store {path}: set BENCH_STORE to a writable path"
            raise StoreError(msg)
        with _CHECK_LOCK:
            if path.exists() and path.stat().st_size > 0 and _file_key(path) not in _CHECKED_FILES:
                # Read the header only while this process holds no connection to the file: closing
                # any descriptor of it drops all of this process's POSIX locks on it, after which
                # another process may checkpoint and delete the WAL under our open connections
                # (they then read stale pages, or report "database disk image is malformed").
                try:
                    with open(path, "rb") as f:
                        head = f.read(len(_SQLITE_HEADER))
                except OSError as err:
                    msg = f"can't read run store {path} ({_one_line(err)}): check its permissions or set BENCH_STORE"
                    raise StoreError(msg) from None
                if head != _SQLITE_HEADER:
                    raise StoreError(f"run store {path} is corrupt (file is not a database); {_LEAVE}")

            conn = self._connect()
            try:
                self._check_or_create(conn)
            finally:
                conn.close()
            _CHECKED_FILES.add(_file_key(path))

    def _check_or_create(self, conn: sqlite3.Connection) -> None:
        path = self.path
        try:
            # Only reads until the file is known to be ours: a foreign file stays byte-identical.
            tables = self._tables(conn)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise StoreError(f"run store {path} is corrupt ({_one_line(err)}); {_LEAVE}") from None

        if version == SCHEMA_VERSION and set(_TABLES) <= tables:
            self._set_wal(conn)
            return
        if version > SCHEMA_VERSION:
            msg = (
                f"run store {path} has schema version {version}, newer than this bench_core's {SCHEMA_VERSION}; "
                f"{_LEAVE}, or upgrade bench_core"
            )
            raise StoreError(msg)
        if version == 0 and not tables:
            self._create(conn)
            return
        if version == SCHEMA_VERSION:
            msg = f"run store {path} lacks the tables {', '.join(sorted(set(_TABLES) - tables))}; {_LEAVE}"
            raise StoreError(msg)
        msg = (
            f"run store {path} has an older schema version {version} (this bench_core reads {SCHEMA_VERSION}); {_LEAVE}"
        )
        raise StoreError(msg)

    @staticmethod
    def _tables(conn: sqlite3.Connection) -> set[str]:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {r[0] for r in rows if not r[0].startswith("sqlite_")}

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise StoreError(f"can't switch run store {self.path} to WAL mode ({_one_line(err)})") from None
        if str(mode).lower() != "wal":
            raise StoreError(f"run store {self.path} can't use WAL mode (got {mode}): put it on a local disk")

    def _create(self, conn: sqlite3.Connection) -> None:
        self._set_wal(conn)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have created the schema while this one waited for the lock.
                if not self._tables(conn):
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as err:
            msg = f"can't create run store {self.path} ({_one_line(err)}): set BENCH_STORE to a writable path"
            raise StoreError(msg) from None
        self._check_or_create(conn)

    # -- runs -------------------------------------------------------------------------------

    def _no_run(self, run_id: int) -> StoreError:
        return StoreError(f"no run {run_id} in {self.path}")

    def _update(self, run_id: int, sql: str, args: tuple) -> None:
        with self._tx() as conn:
            cur = conn.execute(f"UPDATE runs SET updated = ?, {sql} WHERE id = ?", (time.time(), *args, run_id))
            if cur.rowcount == 0:
                raise self._no_run(run_id)

    def create_run(self, config: dict, *, source: str = "cli", name: str | None = None, status: str = "queued") -> int:
        """Add a run and return its id. It is owned by this process until ``start_run``."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        now = time.time()
        pid = os.getpid()
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO runs (created, updated, name, source, status, message, config, pid, pid_start, host)"
                " VALUES (?, ?, ?, ?, ?, '', ?, ?, ?, ?)",
                (now, now, name, source, status, _dumps(config), pid, process_start_token(pid), _host()),
            )
            return int(cur.lastrowid)

    def set_process(self, run_id: int, pid: int) -> None:
        """Record ``pid`` (on this host) as the process of a queued run, e.g. a just launched worker.

        A run already started keeps the process ``start_run`` recorded.
        """
        with self._tx() as conn:
            conn.execute(
                "UPDATE runs SET pid = ?, pid_start = ?, host = ?, updated = ? WHERE id = ? AND status = 'queued'",
                (pid, process_start_token(pid), _host(), time.time(), run_id),
            )

    def start_run(self, run_id: int, *, device: str, versions: dict | None = None, pid: int | None = None) -> None:
        """Mark a run as running on ``device`` in this process (or ``pid``)."""
        pid = os.getpid() if pid is None else int(pid)
        versions = collect_versions() if versions is None else versions
        self._update(
            run_id,
            "status = 'running', device = ?, versions = ?, pid = ?, pid_start = ?, host = ?",
            (str(device), _dumps(versions), pid, process_start_token(pid), _host()),
        )

    def add_record(self, run_id: int, record: dict) -> None:
        """Append one training record (keys 'kind', 'method', 'epoch', optional 'step')."""
        data = to_jsonable(record)
        if not isinstance(data, dict):
            raise TypeError(f"a record must be a dict, got {type(record).__name__}")
        text = json.dumps(data, allow_nan=False, separators=(",", ":"))
        try:
            with self._tx() as conn:
                conn.execute(
                    "INSERT INTO records (run_id, method, kind, epoch, step, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, data.get("method"), data.get("kind"), data.get("epoch"), data.get("step"), text),
                )
                conn.execute("UPDATE runs SET updated = ? WHERE id = ?", (time.time(), run_id))
        except sqlite3.IntegrityError:
            raise self._no_run(run_id) from None

    def set_result(self, run_id: int, method: str, result: dict) -> None:
        """Store (or replace) the evaluation report of one method."""
        try:
            with self._tx() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO results (run_id, method, data) VALUES (?, ?, ?)",
                    (run_id, method, _dumps(result)),
                )
                conn.execute("UPDATE runs SET updated = ? WHERE id = ?", (time.time(), run_id))
        except sqlite3.IntegrityError:
            raise self._no_run(run_id) from None

    def finish_run(self, run_id: int, status: str, message: str = "") -> None:
        """Close a run: 'finished', 'stopped', 'failed' or 'interrupted'; clears its note."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"a run finishes as one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        self._update(run_id, "status = ?, message = ?, note = NULL", (status, str(message or "")))

    def set_note(self, run_id: int, note: str | None) -> None:
        """Set (or clear, with None) a live note such as "waiting for the GPU"."""
        self._update(run_id, "note = ?", (note,))

    def set_progress(self, run_id: int, fraction: float) -> None:
        """Set the run's progress, a fraction in [0, 1] (clamped; non-finite clears it)."""
        value = float(fraction)
        value = min(1.0, max(0.0, value)) if math.isfinite(value) else None
        self._update(run_id, "progress = ?", (value,))

    def request_stop(self, run_id: int) -> None:
        """Ask the process running ``run_id`` to stop after its current batch."""
        self._update(run_id, "stop_requested = 1", ())

    def stop_requested(self, run_id: int) -> bool:
        """Whether a stop was asked for; a run deleted meanwhile counts as asked to stop."""
        rows = self._read("SELECT stop_requested FROM runs WHERE id = ?", (run_id,))
        return not rows or bool(rows[0][0])

    def delete_run(self, run_id: int) -> None:
        """Delete a run with its records, results and weights folder."""
        with self._tx() as conn:
            conn.execute("DELETE FROM records WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM results WHERE run_id = ?", (run_id,))
            if conn.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount == 0:
                raise self._no_run(run_id)
        shutil.rmtree(self.weights_dir(run_id), ignore_errors=True)

    # -- reading ----------------------------------------------------------------------------

    def _summaries(self, run_ids: list[int] | None = None) -> dict[int, dict[str, dict]]:
        sql = "SELECT run_id, method, data FROM results"
        args: tuple = ()
        if run_ids is not None:
            sql += f" WHERE run_id IN ({','.join('?' * len(run_ids))})"
            args = tuple(run_ids)
        out: dict[int, dict[str, dict]] = {}
        for run_id, method, text in self._read(sql, args):
            data = _loads(text, {})
            data = data if isinstance(data, dict) else {}
            out.setdefault(run_id, {})[method] = {
                "ensemble_accuracy": data.get("ensemble_accuracy"),
                "train_seconds": data.get("train_seconds"),
            }
        return out

    @staticmethod
    def _run_dict(row: tuple, summaries: dict[int, dict[str, dict]]) -> dict:
        keys = [k.strip() for k in _LIST_COLUMNS.split(",")]
        run = dict(zip(keys, row, strict=True))
        config = _loads(run["config"], None)
        # A config or section of another shape (a store edited by hand): {} stands in, so that pages
        # and listings show what they can; a worker refuses it rather than run defaults.
        readable = isinstance(config, dict) and all(isinstance(config.get(k, {}), dict) for k in _CONFIG_SECTIONS)
        run["config_readable"] = readable
        run["config"] = config if readable else {}
        for key in ("created", "updated"):
            try:
                run[key] = float(run[key])
            except (TypeError, ValueError):
                run[key] = math.nan
            if not math.isfinite(run[key]):
                run[key] = 0.0  # the epoch: shown as a date long past rather than failing the listing
        run["stop_requested"] = bool(run["stop_requested"])
        run["message"] = run["message"] or ""
        methods = run["config"].get("methods") or []
        run["methods"] = [str(m) for m in methods] if isinstance(methods, list) else []
        run["summary"] = summaries.get(run["id"], {})
        return run

    def list_runs(self) -> list[dict]:
        """Every run, newest first, without records (see ``get_run``).

        Each dict holds id, created, updated, name, source, status, message, device, config
        (``{}`` where the stored one is not a readable JSON object: ``config_readable`` False),
        note, progress, stop_requested, pid, host, methods, and ``summary``:
        ``{method: {"ensemble_accuracy": ..., "train_seconds": ...}}`` for each stored result.
        """
        rows = self._read(f"SELECT {_LIST_COLUMNS} FROM runs ORDER BY id DESC")
        summaries = self._summaries()
        return [self._run_dict(row, summaries) for row in rows]

    def active_runs(self) -> list[dict]:
        """The runs still queued or running, newest first, as ``list_runs`` gives them."""
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        sql = f"SELECT {_LIST_COLUMNS} FROM runs WHERE status IN ({marks}) ORDER BY id DESC"
        rows = self._read(sql, ACTIVE_STATUSES)
        summaries = self._summaries([row[0] for row in rows]) if rows else {}
        return [self._run_dict(row, summaries) for row in rows]

    def get_run(self, run_id: int) -> dict:
        """One run with everything: the ``list_runs`` fields, versions, records and results."""
        rows = self._read(f"SELECT {_LIST_COLUMNS}, versions, pid_start FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise self._no_run(run_id)
        row = rows[0]
        n = len(_LIST_COLUMNS.split(","))
        run = self._run_dict(row[:n], self._summaries([run_id]))
        run["versions"] = _loads(row[n], {}) or {}
        run["pid_start"] = row[n + 1]
        run["records"] = [data for _, data in self.records(run_id)]
        results = {}
        for method, text in self._read("SELECT method, data FROM results WHERE run_id = ? ORDER BY rowid", (run_id,)):
            result = _loads(text, {})
            results[method] = result if isinstance(result, dict) else {}  # another shape: an empty result
        run["results"] = results
        return run

    def status(self, run_id: int) -> str:
        """The status of one run."""
        rows = self._read("SELECT status FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise self._no_run(run_id)
        return rows[0][0]

    def records(self, run_id: int, after_id: int = 0) -> list[tuple[int, dict]]:
        """Records of a run with id > ``after_id``, in order, as (id, record) pairs (for polling)."""
        rows = self._read(
            "SELECT id, data FROM records WHERE run_id = ? AND id > ? ORDER BY id", (run_id, int(after_id))
        )
        out = [(rid, _loads(text, {})) for rid, text in rows]
        return [(rid, data) for rid, data in out if isinstance(data, dict)]  # a record of another shape is skipped

    # -- weights ----------------------------------------------------------------------------

    def weights_dir(self, run_id: int) -> Path:
        return self.directory / self.weights_folder_name() / str(int(run_id))

    def weights_folder_name(self) -> str:
        """``weights`` beside ``runs.sqlite``; ``<stem>-weights`` beside a store of another name.

        Two stores in one folder would otherwise share ``weights/<run id>/``, and run 1 of one
        would overwrite run 1's weights of the other.
        """
        return "weights" if self.path.name == DEFAULT_STORE_NAME else f"{self.path.stem}-weights"

    def weights_path(self, run_id: int, method: str) -> Path:
        if not isinstance(method, str) or not _METHOD_NAME.match(method):
            raise ValueError(f"method name {method!r} can't name a weights file")
        return self.weights_dir(run_id) / f"{method}.pt"

    def save_weights(self, run_id: int, method: str, state_dict: dict) -> Path:
        """Save a state dict (``torch.save``) as ``<store dir>/weights/<run_id>/<method>.pt``."""
        import torch

        path = self.weights_path(run_id, method)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state_dict, tmp)
            os.replace(tmp, path)
        except OSError as err:
            raise StoreError(f"can't save weights to {path} ({_one_line(err)})") from None
        finally:  # a half-written file goes whatever stopped it (an error, a second Ctrl-C)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return path

    def load_weights(self, run_id: int, method: str, map_location: Any = "cpu") -> dict:
        """Load a state dict saved by ``save_weights`` (``weights_only=True``)."""
        import torch

        path = self.weights_path(run_id, method)
        if not path.is_file():
            raise StoreError(f"no weights of {method} for run {run_id} (looked for {path})")
        try:
            return torch.load(path, weights_only=True, map_location=map_location)
        except Exception as err:
            raise StoreError(f"can't load weights {path} ({_one_line(err)})") from None

    # -- liveness ---------------------------------------------------------------------------

    def reconcile(self) -> list[int]:
        """Mark 'queued'/'running' runs whose process is gone as 'interrupted'; return their ids.

        Only runs of this host are judged. A run counts as alive when its pid exists and its
        process start token still matches (so a reused pid does not keep a dead run alive).
        """
        rows = self._read(
            "SELECT id, pid, pid_start, host FROM runs WHERE status IN ('queued', 'running') AND host = ?",
            (_host(),),
        )
        marked = []
        for run_id, pid, token, host in rows:
            if process_alive(host, pid, token) is not False:
                continue
            with self._tx() as conn:
                # Only if nothing changed meanwhile (a worker may have just started it).
                cur = conn.execute(
                    "UPDATE runs SET status = 'interrupted', note = NULL, updated = ?,"
                    " message = CASE WHEN message = '' THEN ? ELSE message END"
                    " WHERE id = ? AND status IN ('queued', 'running') AND pid IS ? AND pid_start IS ? AND host IS ?",
                    (time.time(), f"its process (pid {pid}) ended without finishing it", run_id, pid, token, host),
                )
                if cur.rowcount:
                    marked.append(run_id)
        return marked
