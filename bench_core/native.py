"""The hand-written CPU training steps (``bench_core.manual``) as C++ operators, built once per machine.

``manual.forward_backward`` runs a step's forward, loss and backward as a few dozen ATen operators
called from Python (about 95 for BatchEnsemble with split batching); the interpreter between them is
a measurable part of a small step. ``csrc/manual_ops.cpp`` makes the same calls, in the same order
and layouts, from C++ (``torch.ops.bench_core.*``), so losses and gradients are the Python ones bit
for bit (tests), and only the interpreter goes (but for the first layer on CPUs with AVX-512:
BatchEnsemble's W and r gradients, which one written-out kernel computes in place of products,
``first_layer_grads``, within float32's rounding, and the classic ensemble's first-layer weight,
stepped by Adam inside its gradient's kernel, ``first_layer_adam``; ``BENCH_FIRST_LAYER_KERNEL=0``
turns them off; see ``bench_core.manual``). On this
project's machine (2 cores, AMD EPYC), one model switching between the two in one process, steps
took 0.92-0.955× as long for BatchEnsemble with split batching, 0.97× with repeat batching,
0.95-0.96× for the single MLP and 0.98-0.995× for the vectorized classic ensemble, whose step has
the fewest operator calls for its size (docs/speed-log.md, fourteenth session).

The source is compiled with the machine's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``)
against the headers that come with torch's wheel (on Linux with ``-fopenmp``, so that the kernel's
``at::parallel_for`` runs on torch's OpenMP threads, or without it where the compiler refuses):
about 15 s, once per source, torch version and compiler; the library is kept in
``$BENCH_NATIVE_CACHE`` (default ``~/.cache/bench_core/native``) under a name made from those,
written to a temporary file and renamed, so that processes building at once each end with a whole
library and none waits on a lock. Where it cannot be built or loaded (no compiler, another platform,
an error) one warning says why and the Python steps run; ``BENCH_NATIVE=0`` turns it off. Nothing
but CPU steps use it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from bench_core.errors import describe_error, switched_off, warn_off

ENV_SWITCH = "BENCH_NATIVE"  # "0": the Python steps everywhere
ENV_CACHE = "BENCH_NATIVE_CACHE"  # where built libraries are kept
SOURCE = Path(__file__).with_name("csrc") / "manual_ops.cpp"
BUILD_TIMEOUT_S = 600
BUILDING_NOTE = "building the C++ training steps (once on this machine, about 15 s)"  # what a wait for build() says

_state: dict = {"ops": None, "failed": None, "library": None}  # failed: why it is off in this process
_lock = threading.Lock()  # one build or load at a time in a process (the benchmark's --in-process rows are threads)


class NativeBuildError(RuntimeError):
    """The C++ operators could not be built or loaded; the message's first line says why."""


def enabled() -> bool:
    """Whether the C++ steps may be used: not switched off, and not failed in this process."""
    return not switched_off(ENV_SWITCH) and _state["failed"] is None


def ops():
    """``torch.ops.bench_core`` with the operators loaded (built first if need be), or None where they are off."""
    if _state["ops"] is not None:
        return _state["ops"] if enabled() else None
    if not enabled():
        return None
    with _lock:
        if _state["ops"] is None and _state["failed"] is None:
            try:
                _state["library"] = load()
                _state["ops"] = torch.ops.bench_core
            except (NativeBuildError, OSError, RuntimeError) as err:
                disable(err)
    return _state["ops"] if enabled() else None


def loaded():
    """``torch.ops.bench_core`` where the operators are loaded and in use, else None; never builds or loads them."""
    return _state["ops"] if _state["ops"] is not None and enabled() else None


def is_ready() -> bool:
    """Whether ``ops()`` would return at once: loaded, off, or already built on this machine (only a load left)."""
    return not enabled() or _state["ops"] is not None or library_path().exists()


def warm_up() -> bool:
    """Build (or load) the operators now, before anything is timed; True when they are in use."""
    return ops() is not None


def why_off() -> str | None:
    """Why the C++ steps are not in use in this process, in a few words; None when they are (or not asked for yet)."""
    if switched_off(ENV_SWITCH):
        return f"{ENV_SWITCH}=0"
    err = _state["failed"]
    return None if err is None else describe_error(err)


def disable(err: BaseException) -> None:
    """Stop using the C++ steps in this process, with one warning that says why."""
    if _state["failed"] is None:
        warn_off("C++ training steps", err, f"running the Python ones (set {ENV_SWITCH}=0 to skip building them)")
    _state["failed"] = err


def reset() -> None:
    """Forget a failure (tests). A loaded library stays loaded: a process cannot unload it."""
    _state["failed"] = None


def cache_dir() -> Path:
    """Where built libraries are kept: ``$BENCH_NATIVE_CACHE``, else ``bench_core/native`` in the user's cache."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bench_core" / "native"


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` on the PATH."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _openmp_choices() -> tuple[bool, ...]:
    """With OpenMP first where torch's own threads are OpenMP's (Linux wheels), then without it."""
    return (True, False) if sys.platform.startswith("linux") else (False,)


def build_command(cxx: str, source: Path, output: Path, openmp: bool = False) -> list[str]:
    """The compiler's command line: a shared library against torch's headers and its two core libraries.

    ``-ffp-contract=fast`` lets the split kernel's multiply-adds be fused; ``openmp`` makes
    ``at::parallel_for`` in it run on torch's OpenMP threads (without it, on one thread).
    """
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, "-O3", "-std=c++20", "-ffp-contract=fast", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    if openmp:
        cmd.append("-fopenmp")
    cmd += ["-isystem", str(torch_dir / "include"), str(source), "-o", str(output)]
    cmd += ["-L", str(torch_dir / "lib"), "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    if sys.platform == "darwin":
        cmd.insert(1, "-undefined")
        cmd.insert(2, "dynamic_lookup")
    return cmd


def library_path(source: Path = SOURCE, cxx: str | None = None, openmp: bool | None = None) -> Path:
    """The built library's path: named by a hash of the source, torch's version, the compiler and its command.

    ``openmp=None``: the first of the two builds (with OpenMP, then without) that exists, else the first.
    """
    cxx = cxx or compiler() or "c++"
    if openmp is None:
        paths = [library_path(source, cxx, choice) for choice in _openmp_choices()]
        return next((path for path in paths if path.exists()), paths[0])
    key = hashlib.sha256()
    key.update(source.read_bytes())
    key.update(torch.__version__.encode())
    key.update(" ".join(build_command(cxx, Path("SOURCE"), Path("OUT"), openmp)).encode())
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def build(source: Path = SOURCE, cxx: str | None = None) -> Path:
    """Compile ``source`` unless its library is already built; returns the library's path.

    On Linux it is built with OpenMP, or, where that fails (a compiler without OpenMP), without it.
    Raises NativeBuildError on an unsupported platform, without a compiler, or when compiling fails
    (with the compiler's first error line).
    """
    if not sys.platform.startswith("linux") and sys.platform != "darwin":
        raise NativeBuildError(f"not built on {sys.platform}")
    cxx = cxx or compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (set CXX)")
    path = library_path(source, cxx)
    if path.exists():
        return path
    for openmp in _openmp_choices():
        try:
            return _build_one(source, cxx, openmp)
        except NativeBuildError as err:
            failed = err
    raise failed


def _build_one(source: Path, cxx: str, openmp: bool) -> Path:
    path = library_path(source, cxx, openmp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise NativeBuildError(f"cannot write to {path.parent} ({err.strerror or err}; set {ENV_CACHE})") from None
    os.close(fd)
    try:
        try:
            done = subprocess.run(
                build_command(cxx, source, Path(tmp), openmp), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise NativeBuildError(f"{cxx} could not run: {err}") from None
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise NativeBuildError(f"{cxx} failed: {errors[0] if errors else f'exit status {done.returncode}'}")
        os.replace(tmp, path)  # whole, or not there: another process may be building the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(source: Path = SOURCE) -> Path:
    """Build if need be, then load the library into this process (its operators register themselves)."""
    path = build(source)
    torch.ops.load_library(str(path))
    if not hasattr(torch.ops.bench_core, "batchensemble_layers"):
        raise NativeBuildError(f"{path.name} did not register its operators")
    _first_calls(torch.ops.bench_core)
    return path


def _first_calls(ops) -> None:
    """Call each operator once on tiny tensors, so that what a first call sets up is not a training step's.

    The first call from Python set up about 9.5 MiB of resident memory on this project's machine:
    the process's, not training's, and the benchmark's memory probe starts after ``warm_up``.
    """
    x, labels = torch.ones(2, 1, 3), torch.zeros(2, 1, dtype=torch.long)
    be = [torch.ones(3, 2), torch.ones(2, 3), torch.ones(2, 2), torch.zeros(2, 2)]  # W, r, s, bias of one layer
    with torch.no_grad():
        for fused in (True, False):  # its own loops and ATen's element-wise operators
            ops.batchensemble_layers(x, labels, be, [False], True, False, True, fused)
        ops.first_layer_grads(x, torch.ones(2, 1, 2), be[0], be[1])
        if ops.first_layer_fast():  # the kernel that makes Adam's step on what it is given (copies here)
            adam = [torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(()), 1e-3, 0.9, 0.999, 1e-8, 0.0]
            ops.first_layer_adam(x[0], torch.ones(1, 2), be[0].clone(), *adam)
        ops.vectorized(x[0], labels[0], [torch.ones(3, 2, 2)], [torch.zeros(2, 2)], False, False, True)
        ops.plain(x[0], labels[0], [torch.ones(2, 3)], [torch.zeros(2)], True)
        params = [t.clone() for t in be]  # a whole step in one call (manual.one_call_step), Adam's step included
        state = [[torch.zeros_like(t) for t in params] for _ in range(2)] + [[torch.zeros(()) for _ in params]]
        adam = (1e-3, 0.9, 0.999, 0.0, 1e-8)
        ops.batchensemble_split_step(x[:, 0], labels[:, 0], torch.arange(2), params, [False], True, True, True,
                                     *state, *adam)  # fmt: skip
