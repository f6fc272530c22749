"""Datasets as whole tensors on the training device.

A split is decoded once: uint8 pixels become float32, are normalised per channel with the
training split's mean and std, flattened to ``[N, D]`` and moved to the device. There are no
per-image transforms and no DataLoader; training indexes the tensors directly.

Where the data comes from:

- ``synthetic``: generated from a seed (class prototypes plus noise); nothing on disk.
- ``cifar10``: ``<data_dir>/cifar-10-batches-py`` (torchvision's layout), else the archive
  ``<data_dir>/cifar-10-python.tar.gz``, else downloaded (when allowed) and extracted there.
- ``mnist`` / ``fashion-mnist``: ``<data_dir>/MNIST/raw`` / ``<data_dir>/FashionMNIST/raw``
  (torchvision's layout, decompressed or ``.gz``), else for Fashion-MNIST the Debian package
  ``dataset-fashion-mnist``'s folder (``$BENCH_FASHION_MNIST_DIR`` overrides it), else downloaded.

Downloads stream from the mirrors listed in ``SOURCES`` (torchvision's own), check the md5,
and write through a temporary file that is renamed into place. Every failure a user can meet
raises DatasetError with a one-line message naming the dataset, the place and the fix.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST
from torchvision.datasets.utils import check_integrity, extract_archive

from bench_core.config import DATASETS, DataConfig
from bench_core.devices import resolve_device
from bench_core.errors import ConfigError, DatasetError, DeviceOutOfMemoryError, StopRequestedError

Progress = Callable[[float, str], None]

ENV_DATA_DIR = "BENCH_DATA_DIR"
ENV_FASHION_MNIST_DIR = "BENCH_FASHION_MNIST_DIR"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = tuple(FashionMNIST.classes)
MNIST_CLASSES = tuple(str(digit) for digit in range(10))

SYNTHETIC_SEPARATION = 3.0  # expected distance between two class prototypes / sqrt(2), in noise stds
DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20
# Exceptions that reading a truncated or corrupt file raises (gzip, pickle, numpy, torch, our idx parser).
_CORRUPT = (
    EOFError,
    pickle.UnpicklingError,
    gzip.BadGzipFile,
    zlib.error,
    tarfile.TarError,
    ValueError,
    RuntimeError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    AssertionError,
    OSError,
)


@dataclass(frozen=True)
class RemoteFile:
    """One file to download: its name on disk, its md5 (None: not checked) and the URLs to try in order."""

    filename: str
    md5: str | None
    urls: tuple[str, ...]


@dataclass(frozen=True)
class Source:
    """Where a dataset is downloaded from.

    Attributes:
        files: what to download, each from the first URL that works.
        size: the download's size for messages, e.g. "~170 MB".
        members: cifar10 only: the extracted files with the md5 torchvision checks when loading.
    """

    files: tuple[RemoteFile, ...]
    size: str
    members: tuple[tuple[str, str | None], ...] = ()


def _idx_source(kind: type[MNIST], size: str) -> Source:
    files = tuple(
        RemoteFile(name, md5, tuple(mirror + name for mirror in kind.mirrors)) for name, md5 in kind.resources
    )
    return Source(files=files, size=size)


# The download table; tests replace entries to point at file:// URLs.
SOURCES: dict[str, Source] = {
    "cifar10": Source(
        files=(RemoteFile(CIFAR10.filename, CIFAR10.tgz_md5, (CIFAR10.url,)),),
        size="~170 MB",
        members=tuple(
            (name, md5)
            for name, md5 in [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
        ),
    ),
    "mnist": _idx_source(MNIST, "~12 MB"),
    "fashion-mnist": _idx_source(FashionMNIST, "~31 MB"),
}

_IDX_CLASSES: dict[str, type[MNIST]] = {"mnist": MNIST, "fashion-mnist": FashionMNIST}
_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass
class Dataset:
    """Both splits of a dataset as tensors on one device.

    Attributes:
        name: the dataset's name, one of config.DATASETS.
        x_train: ``[N, D]`` float32, flattened, normalised with the training split's per-channel mean/std.
        y_train: ``[N]`` int64 labels in ``[0, num_classes)``.
        x_test: ``[M, D]`` float32, normalised with the same statistics.
        y_test: ``[M]`` int64.
        num_classes: number of classes C.
        input_shape: ``(C, H, W)`` of one example before flattening (the first entry is the channel).
        class_names: one name per class.
        mean: per-channel mean that was subtracted (pixels scaled to [0, 1] for image datasets).
        std: per-channel std that was divided by.
    """

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def in_features(self) -> int:
        """D, the length of one flattened example."""
        return int(self.x_train.shape[1])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: torch.device | str) -> Dataset:
        """Return a copy whose four tensors live on ``device`` (self is left as it is)."""
        device = torch.device(device)
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """The data folder: ``$BENCH_DATA_DIR`` if set, else ``./data`` relative to the working directory.

    The folder is not created here.
    """
    env = os.environ.get(ENV_DATA_DIR, "").strip()
    return Path(env).expanduser() if env else Path("data")


def fashion_mnist_system_dir() -> Path:
    """Where Debian's dataset-fashion-mnist package puts the files (``$BENCH_FASHION_MNIST_DIR`` overrides it)."""
    env = os.environ.get(ENV_FASHION_MNIST_DIR, "").strip()
    return Path(env).expanduser() if env else DEBIAN_FASHION_MNIST_DIR


def load_dataset(
    cfg: DataConfig,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> Dataset:
    """Load (or generate) the dataset ``cfg`` names, decoded once into tensors on ``device``.

    Args:
        cfg: which dataset, where it lives, and whether it may be downloaded.
        device: where the tensors go; a string goes through ``resolve_device`` ("auto" works).
        progress: called with (fraction in [0, 1], message) while downloading, generating and decoding.
        stop: when set, the load gives up at its next progress report (every MiB downloaded, every
            ``SYNTHETIC_CHUNK_ROWS`` examples generated, each file read) with StopRequestedError; a
            partial download is deleted.

    Returns:
        The dataset, flattened and normalised.

    Raises:
        ConfigError: a setting of ``cfg`` is invalid.
        DeviceError: the device does not exist here.
        DatasetError: the data is missing, corrupt, or can't be downloaded (one-line message).
        DeviceOutOfMemoryError: the dataset does not fit on the device.
        StopRequestedError: ``stop`` was set before the load was done.
    """
    cfg.validate()
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    report = _stoppable(progress or _quiet, stop)
    if cfg.name == "synthetic":
        report(0.0, f"generating {cfg.synthetic_train} + {cfg.synthetic_test} synthetic examples")
        dataset = make_synthetic(
            cfg.synthetic_train,
            cfg.synthetic_test,
            shape=tuple(cfg.synthetic_shape),
            num_classes=cfg.synthetic_classes,
            seed=cfg.synthetic_seed,
            progress=_scaled(report, 0.0, 0.95),
        )
        dataset = _move(dataset, dev)
        report(1.0, f"loaded synthetic ({dataset.n_train} train / {dataset.n_test} test) on {dev}")
        return dataset

    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else default_data_dir()
    try:
        if cfg.name == "cifar10":
            raw = _read_cifar10(root, cfg.download, report)
        else:
            raw = _read_idx_dataset(cfg.name, root, cfg.download, report)
    except PermissionError as err:  # not corrupt: deleting it would not help
        raise _permission_error(cfg.name, err) from None
    return _assemble(cfg.name, raw, dev, report)


def _permission_error(name: str, err: PermissionError) -> DatasetError:
    where = err.filename or "a file or folder of it"
    return DatasetError(
        f"{name}: can't read {where} (permission denied): give your user read access to it and its folders, "
        f"or set {ENV_DATA_DIR}"
    )


def dataset_status(name: str, data_dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether a dataset can be used without a network, and a one-line reason.

    Only looks for files (no checksums), so it is cheap enough to call on every page draw.

    Args:
        name: one of config.DATASETS.
        data_dir: the data folder; None: ``default_data_dir()``.

    Returns:
        (usable offline, reason), e.g. ``(True, "on disk at data/cifar-10-batches-py")``.

    Raises:
        ConfigError: the name is not a known dataset.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if name == "synthetic":
        return True, "generated from a seed; nothing to download"
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    try:
        return _status_on_disk(name, root)
    except PermissionError as err:
        return False, f"can't read {err.filename or root} (permission denied)"


def _status_on_disk(name: str, root: Path) -> tuple[bool, str]:
    size = SOURCES[name].size
    later = f"it will be downloaded ({size}) when a network is available"
    if name == "cifar10":
        folder, archive = _cifar_paths(root)
        missing = _cifar_missing(folder)
        if not missing:
            return True, f"on disk at {folder}"
        if archive.is_file():
            return True, f"archive on disk at {archive}; it will be extracted on first use"
        if len(missing) < len(SOURCES[name].members):
            return False, f"incomplete at {folder} (missing {', '.join(missing)}); {later}"
        return False, f"not on disk (looked in {folder}); {later}"
    raw = _idx_raw_folder(name, root)
    layout = _idx_layout(raw)
    if layout is not None:
        return True, f"on disk at {raw}" + (" (compressed)" if layout == "gz" else "")
    looked = str(raw)
    if name == "fashion-mnist":
        system = fashion_mnist_system_dir()
        if _idx_layout(system) is not None:
            return True, f"on disk at {system} (Debian package dataset-fashion-mnist)"
        looked += f" and {system}"
    return False, f"not on disk (looked in {looked}); {later}"


def make_synthetic(
    n_train: int,
    n_test: int,
    shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
    progress: Progress | None = None,
) -> Dataset:
    """A learnable synthetic dataset on the CPU: one random prototype per class plus Gaussian noise.

    Prototypes are scaled so that two of them lie about ``SYNTHETIC_SEPARATION * sqrt(2)`` noise
    standard deviations apart whatever the shape: a nearest-mean classifier gets about 90 % on ten
    classes, a small MLP 80-85 % after an epoch or two, and it can overfit. Each channel gets its own
    raw offset and scale, which the per-channel normalisation removes. Classes are balanced.
    The same arguments give identical tensors; the raw test examples do not depend on ``n_train``
    (their normalisation, from the training split, does).

    Args:
        n_train: training examples (>= 1).
        n_test: test examples (>= 1).
        shape: shape of one example, channel first, e.g. (3, 32, 32).
        num_classes: number of classes (>= 2).
        seed: the data's seed.
        progress: called with (fraction, message) after every ``SYNTHETIC_CHUNK_ROWS`` examples
            (the same tensors whatever the chunks: see ``_row_chunks``).

    Returns:
        The dataset, normalised with its training split's per-channel statistics.

    Raises:
        ConfigError: an argument is out of range.
    """
    shape = tuple(shape)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (n_train, n_test, *shape)) or not shape:
        raise ConfigError(f"synthetic sizes and shape must be positive integers, got {n_train}, {n_test}, {shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"synthetic classes must be a whole number of at least 2, got {num_classes!r}")
    features = math.prod(shape)
    channels = shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    prototypes = torch.randn(num_classes, features, generator=gen).mul_(SYNTHETIC_SEPARATION / math.sqrt(features))
    offset = torch.rand(channels, 1, generator=gen).mul_(2.0).sub_(1.0)
    scale = torch.rand(channels, 1, generator=gen).add_(0.5)
    train_seed, test_seed = (int(s) for s in torch.randint(2**62, (2,), generator=gen))
    report = progress or _quiet
    total = n_train + n_test

    def split(n: int, split_seed: int, done: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(split_seed)
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        x = torch.empty(n, features)
        for start, end in _row_chunks(n, features):
            x[start:end].normal_(generator=g)
            x[start:end] += prototypes[y[start:end]]
            report((done + end) / total, f"generated {done + end} of {total} synthetic examples")
        x.view(n, channels, -1).mul_(scale).add_(offset)
        return x, y

    x_train, y_train = split(n_train, train_seed, 0)
    x_test, y_test = split(n_test, test_seed, n_train)
    mean, std = _normalise_(x_train, x_test, channels)
    return Dataset(
        name="synthetic",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        input_shape=shape,
        class_names=tuple(f"class {k}" for k in range(num_classes)),
        mean=mean,
        std=std,
    )


SYNTHETIC_CHUNK_ROWS = 1024  # examples generated between two progress reports (a stop waits for at most one chunk)


def _row_chunks(n: int, features: int) -> list[tuple[int, int]]:
    """[start, end) rows of ``n`` in chunks of ``SYNTHETIC_CHUNK_ROWS``, the last one holding at least 16 values.

    Torch's CPU ``normal_`` draws 16 values at a time from the generator and treats a tensor of fewer
    than 16 values, and a last partial group, apart: filling chunks whose sizes are multiples of 16 in
    turn draws exactly what one fill of the whole tensor draws, so the tensors do not depend on the
    chunks (``tests/test_data.py`` checks it against ``torch.randn`` of the whole).
    """
    rows = SYNTHETIC_CHUNK_ROWS
    bounds = [(start, min(start + rows, n)) for start in range(0, n, rows)]
    if len(bounds) > 1 and (bounds[-1][1] - bounds[-1][0]) * features < 16:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _stoppable(report: Progress, stop: threading.Event | None) -> Progress:
    """``report``, raising StopRequestedError instead once ``stop`` is set."""
    if stop is None:
        return report

    def checked(fraction: float, message: str) -> None:
        if stop.is_set():
            raise StopRequestedError("stopped while the data was loading")
        report(fraction, message)

    return checked


def download_file(url: str, dest: Path, md5: str | None = None, progress: Progress | None = None) -> Path:
    """Stream ``url`` to ``dest`` through a temporary file in the same folder, checking the md5.

    Args:
        url: http(s):// or file:// URL.
        dest: the file to write; its folder must exist. Replaced only once the download is complete and checked.
        md5: expected hex digest, or None to skip the check.
        progress: called with (fraction of the file, message) after each chunk.

    Returns:
        ``dest``.

    Raises:
        DatasetError: the folder is not writable, the download failed, or the md5 does not match.
    """
    dest = Path(dest)
    report = progress or _quiet
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as err:
        raise _DownloadError(f"cannot write to {dest.parent} ({_reason(err)})", network=False) from None
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        done = 0
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "bench-core"})
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                total = int(response.headers.get("Content-Length") or 0)
                host = urllib.parse.urlsplit(url).hostname or "local file"
                report(0.0, f"downloading {dest.name} from {host}")
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    fraction = min(done / total, 1.0) if total else 0.0
                    of_total = f" of {total / 1e6:.1f}" if total else ""
                    report(fraction, f"downloading {dest.name}: {done / 1e6:.1f}{of_total} MB")
        if total and done < total:
            raise _DownloadError(f"{dest.name} from {url} stopped after {done} of {total} bytes", network=True)
        if md5 is not None and digest.hexdigest() != md5:
            raise _DownloadError(
                f"{dest.name} from {url} failed its md5 check (got {digest.hexdigest()}, expected {md5})",
                network=False,
            )
        os.replace(tmp, dest)
        report(1.0, f"downloaded {dest.name} ({done / 1e6:.1f} MB)")
    except (OSError, http.client.HTTPException, ValueError) as err:  # URLError is an OSError
        raise _DownloadError(f"{dest.name} from {url}: {_reason(err)}", network=True) from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


def _cifar_paths(root: Path) -> tuple[Path, Path]:
    return root / CIFAR10.base_folder, root / SOURCES["cifar10"].files[0].filename


def _cifar_missing(folder: Path) -> list[str]:
    return [name for name, _ in SOURCES["cifar10"].members if not (folder / name).is_file()]


def _read_cifar10(root: Path, download: bool, report: Progress) -> _Raw:
    source = SOURCES["cifar10"]
    remote = source.files[0]
    folder, archive = _cifar_paths(root)
    hint = f"put {remote.filename} or the extracted {folder.name} in {root} or set {ENV_DATA_DIR}"
    missing = _cifar_missing(folder)
    if missing:
        where = f"{folder} (missing {', '.join(missing)})" if len(missing) < len(source.members) else str(folder)
        if archive.is_file():
            report(0.0, f"checking {archive}")
            if not check_integrity(archive, remote.md5):
                if not download:
                    raise DatasetError(
                        f"cifar10 archive {archive} is truncated or corrupt (md5 mismatch): delete it and turn "
                        f"download on, or {hint}"
                    )
                _ensure_writable("cifar10", root)
                _download_any("cifar10", remote, archive, hint, _scaled(report, 0.0, 0.8))
        elif download:
            _ensure_writable("cifar10", root)
            _download_any("cifar10", remote, archive, hint, _scaled(report, 0.0, 0.8))
        else:
            raise DatasetError(f"cifar10 is not on disk (looked in {where}) and download is off: turn it on, or {hint}")
        _extract_cifar(archive, root, folder, report)

    report(0.85, f"reading cifar10 from {folder}")
    members = dict(source.members)
    kind = _cifar_class(members)
    try:
        train = kind(root, train=True, download=False)
        test = kind(root, train=False, download=False)
    except PermissionError:
        raise  # load_dataset says so: not corrupt
    except _CORRUPT as err:
        bad = [name for name, md5 in source.members if not check_integrity(folder / name, md5)]
        what = f"{', '.join(bad)} {'fails its' if len(bad) == 1 else 'fail their'} md5 check" if bad else _reason(err)
        raise DatasetError(
            f"cifar10 at {folder} is truncated or corrupt ({what}): delete {folder} (and {archive.name}) "
            f"to download it again, or {hint}"
        ) from None
    try:
        return _Raw(
            x_train=_hwc_to_chw(train.data),
            y_train=torch.as_tensor(train.targets, dtype=torch.int64),
            x_test=_hwc_to_chw(test.data),
            y_test=torch.as_tensor(test.targets, dtype=torch.int64),
            class_names=CIFAR10_CLASSES,
            where=str(folder),
            fix=f"delete {folder} to download it again",
        )
    except PermissionError:
        raise  # load_dataset says so: not corrupt
    except _CORRUPT as err:
        raise DatasetError(f"cifar10 at {folder} is corrupt ({_reason(err)}): delete it to download it again") from None


def _cifar_class(members: dict[str, str | None]) -> type[CIFAR10]:
    """CIFAR10 itself, or a subclass checking the md5s of ``members`` (which tests replace)."""
    train_list = [[name, members.get(name)] for name, _ in CIFAR10.train_list]
    test_list = [[name, members.get(name)] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": members.get(CIFAR10.meta["filename"])}
    if train_list == CIFAR10.train_list and test_list == CIFAR10.test_list and meta == CIFAR10.meta:
        return CIFAR10
    return type("CIFAR10", (CIFAR10,), {"train_list": train_list, "test_list": test_list, "meta": meta})


def _extract_cifar(archive: Path, root: Path, folder: Path, report: Progress) -> None:
    """Unpack the archive into a scratch folder beside ``folder``, then move it into place."""
    report(0.8, f"extracting {archive.name}")
    _ensure_writable("cifar10", root)
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        try:
            if archive.name.endswith((".tar.gz", ".tgz", ".tar")):
                # The "data" filter (Python >= 3.10.12 / 3.11.4) refuses absolute paths and links leaving the folder.
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                with tarfile.open(archive) as tar:
                    tar.extractall(scratch, **safe)
            else:
                extract_archive(archive, scratch)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as err:
            raise DatasetError(
                f"cifar10 archive {archive} is truncated or corrupt ({_reason(err)}): delete it to download it again"
            ) from None
        except OSError as err:
            raise DatasetError(f"could not extract cifar10 archive {archive} into {root} ({_reason(err)})") from None
        unpacked = scratch / folder.name
        if not unpacked.is_dir():
            raise DatasetError(f"cifar10 archive {archive} holds no {folder.name} folder: delete it to download again")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(unpacked, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _hwc_to_chw(images) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (idx files)
# ---------------------------------------------------------------------------------------------


def _idx_raw_folder(name: str, root: Path) -> Path:
    return root / _IDX_CLASSES[name].__name__ / "raw"  # torchvision's MNIST.raw_folder


def _idx_layout(folder: Path) -> str | None:
    """Which copy of the four idx files ``folder`` holds: "raw" (decompressed), "gz", or None."""
    if all((folder / name).is_file() for name in _IDX_NAMES):
        return "raw"
    if all((folder / f"{name}.gz").is_file() for name in _IDX_NAMES):
        return "gz"
    return None


def _read_idx_dataset(name: str, root: Path, download: bool, report: Progress) -> _Raw:
    kind = _IDX_CLASSES[name]
    classes = MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
    raw = _idx_raw_folder(name, root)
    hint = f"put the four .gz files in {raw} or set {ENV_DATA_DIR}"
    layout = _idx_layout(raw)
    if layout == "gz":
        return _read_idx_folder(name, raw, ".gz", classes, f"delete {raw} to download it again", report)
    if layout is None and name == "fashion-mnist":
        system = fashion_mnist_system_dir()
        system_layout = _idx_layout(system)
        if system_layout is not None:
            fix = f"reinstall the Debian package dataset-fashion-mnist or point {ENV_FASHION_MNIST_DIR} at a good copy"
            suffix = ".gz" if system_layout == "gz" else ""
            return _read_idx_folder(name, system, suffix, classes, fix, report)
        hint += f" (or install the Debian package dataset-fashion-mnist into {system})"
    if layout is None:
        if not download:
            looked = f"{raw} and {fashion_mnist_system_dir()}" if name == "fashion-mnist" else str(raw)
            raise DatasetError(f"{name} is not on disk (looked in {looked}) and download is off: turn it on, or {hint}")
        _ensure_writable(name, raw)
        files = SOURCES[name].files
        for i, remote in enumerate(files):
            dest = raw / remote.filename
            plain = raw / remote.filename.removesuffix(".gz")
            if plain.is_file():
                continue
            if not check_integrity(dest, remote.md5):
                _download_any(
                    name, remote, dest, hint, _scaled(report, 0.8 * i / len(files), 0.8 * (i + 1) / len(files))
                )
            try:
                extract_archive(dest, raw)
            except (EOFError, zlib.error, gzip.BadGzipFile, ValueError, RuntimeError) as err:
                raise DatasetError(f"{name} file {dest} is truncated or corrupt ({_reason(err)}): delete it") from None
            except OSError as err:
                raise DatasetError(f"could not decompress {name} file {dest} ({_reason(err)})") from None

    report(0.85, f"reading {name} from {raw}")
    try:
        train = kind(str(root), train=True, download=False)
        test = kind(str(root), train=False, download=False)
        result = _Raw(
            x_train=train.data.unsqueeze(1),
            y_train=train.targets.to(torch.int64),
            x_test=test.data.unsqueeze(1),
            y_test=test.targets.to(torch.int64),
            class_names=classes,
            where=str(raw),
            fix=f"delete {raw} to download it again",
        )
    except PermissionError:
        raise  # load_dataset says so: not corrupt
    except _CORRUPT as err:
        raise DatasetError(
            f"{name} at {raw} is truncated or corrupt ({_reason(err)}): delete {raw} to download it again"
        ) from None
    return result


def _read_idx_folder(
    name: str, folder: Path, suffix: str, classes: tuple[str, ...], fix: str, report: Progress
) -> _Raw:
    """Read the four idx files of ``folder`` ourselves (gzip or plain); needs no write access."""
    report(0.1, f"reading {name} from {folder}")
    tensors = []
    for i, stem in enumerate(_IDX_NAMES):
        path = folder / f"{stem}{suffix}"
        try:
            tensors.append(_read_idx(path))
        except PermissionError:
            raise  # load_dataset says so: not corrupt
        except _CORRUPT as err:
            raise DatasetError(f"{name} file {path} is truncated or corrupt ({_reason(err)}): {fix}") from None
        report(0.1 + 0.7 * (i + 1) / len(_IDX_NAMES), f"read {path.name}")
    x_train, y_train, x_test, y_test = tensors
    return _Raw(
        x_train=x_train.unsqueeze(1),
        y_train=y_train.to(torch.int64),
        x_test=x_test.unsqueeze(1),
        y_test=y_test.to(torch.int64),
        class_names=classes,
        where=str(folder),
        fix=fix,
    )


def _read_idx(path: Path) -> torch.Tensor:
    """Parse one idx file of unsigned bytes (``.gz`` or plain) into a uint8 tensor; ValueError if malformed."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] not in (1, 3):
        raise ValueError(f"not an idx file of unsigned bytes (header {data[:4].hex() or 'empty'})")
    ndim = data[3]
    start = 4 + 4 * ndim
    if len(data) < start:
        raise ValueError("the idx header is cut short")
    dims = struct.unpack(f">{ndim}I", data[4:start])
    expected = math.prod(dims)
    if len(data) - start != expected:
        raise ValueError(f"holds {len(data) - start} bytes for shape {tuple(dims)}, which needs {expected}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=start).view(*dims)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    """Undecoded splits: uint8 images ``[N, C, H, W]`` on the CPU and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]
    where: str
    fix: str


class _DownloadError(DatasetError):
    """A download from one URL failed; ``network`` tells a connection problem from a bad file."""

    def __init__(self, message: str, network: bool) -> None:
        super().__init__(message)
        self.network = network


def _check_raw(name: str, raw: _Raw) -> None:
    """Shapes and labels must agree; anything else means a corrupt or mismatched file."""
    problem = None
    for split, x, y in (("training", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            problem = f"the {split} split has {tuple(x.shape)} images but {tuple(y.shape)} labels"
        elif x.shape[0] == 0:
            problem = f"the {split} split is empty"
        elif int(y.min()) < 0 or int(y.max()) >= len(raw.class_names):
            problem = f"the {split} labels run {int(y.min())}..{int(y.max())}, outside 0..{len(raw.class_names) - 1}"
        if problem:
            break
    if problem is None and raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        problem = f"training images are {tuple(raw.x_train.shape[1:])} but test images {tuple(raw.x_test.shape[1:])}"
    if problem:
        raise DatasetError(f"{name} at {raw.where} is corrupt ({problem}): {raw.fix}")


def _assemble(name: str, raw: _Raw, device: torch.device, report: Progress) -> Dataset:
    """uint8 [N, C, H, W] -> float32 [N, D] on ``device``, normalised with the training split's statistics."""
    report(0.9, f"decoding {name} ({raw.x_train.shape[0]} train / {raw.x_test.shape[0]} test) on {device}")
    _check_raw(name, raw)
    shape = tuple(int(d) for d in raw.x_train.shape[1:])
    try:
        x_train = _to_unit_float(raw.x_train, device)
        x_test = _to_unit_float(raw.x_test, device)
        mean, std = _normalise_(x_train, x_test, shape[0])
        y_train = raw.y_train.to(device)
        y_test = raw.y_test.to(device)
    except torch.OutOfMemoryError:
        raise DeviceOutOfMemoryError(f"{name} does not fit in the memory of {device}: use the cpu device") from None
    report(1.0, f"loaded {name} ({x_train.shape[0]} train / {x_test.shape[0]} test) on {device}")
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=len(raw.class_names),
        input_shape=shape,
        class_names=raw.class_names,
        mean=mean,
        std=std,
    )


def _to_unit_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move uint8 images (4x smaller than float) to the device, then scale to [0, 1] and flatten there."""
    x = images.to(device).reshape(images.shape[0], -1).float()
    return x.div_(255.0)


def _normalise_(x_train: torch.Tensor, x_test: torch.Tensor, channels: int) -> tuple[tuple[float, ...], ...]:
    """Normalise both splits in place with the training split's per-channel mean and (population) std."""
    view = x_train.view(x_train.shape[0], channels, -1)
    std, mean = torch.std_mean(view, dim=(0, 2), correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    for x in (x_train, x_test):
        x.view(x.shape[0], channels, -1).sub_(mean[:, None]).div_(std[:, None])
    return tuple(mean.tolist()), tuple(std.tolist())


def _move(dataset: Dataset, device: torch.device) -> Dataset:
    if dataset.device == device:
        return dataset
    try:
        return dataset.to(device)
    except torch.OutOfMemoryError:
        msg = f"{dataset.name} does not fit in the memory of {device}: use fewer examples or the cpu device"
        raise DeviceOutOfMemoryError(msg) from None


def _download_any(name: str, remote: RemoteFile, dest: Path, hint: str, report: Progress) -> Path:
    """Try each URL of ``remote`` in turn; one-line DatasetError naming the dataset if all fail."""
    errors: list[_DownloadError] = []
    for url in remote.urls:
        try:
            return download_file(url, dest, remote.md5, report)
        except _DownloadError as err:
            errors.append(err)
            if not err.network and str(err).startswith("cannot write"):
                break
    last = errors[-1] if errors else None
    if last is None:
        raise DatasetError(f"could not download {name}: no URL is known for {remote.filename}; {hint}")
    if all(err.network for err in errors):
        raise DatasetError(f"could not download {name} (no network? {last}): {hint}")
    bad = next(err for err in errors if not err.network)
    raise DatasetError(f"could not download {name}: {bad}; try again, or {hint}")


def _ensure_writable(name: str, folder: Path) -> None:
    """Create ``folder`` and prove we can write there, or explain that the download can't happen."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise DatasetError(
            f"{name} must be downloaded or unpacked into {folder}, but that folder is not writable ({_reason(err)}): "
            f"set {ENV_DATA_DIR} (or the data folder setting) to a writable folder, or put the files there yourself"
        ) from None


def _scaled(report: Progress, lo: float, hi: float) -> Progress:
    return lambda fraction, message: report(lo + (hi - lo) * fraction, message)


def _reason(err: BaseException) -> str:
    """A short single-line description of an exception."""
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    text = " ".join(str(err).split()) or "no details"
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(err).__name__}: {text}"


def _quiet(fraction: float, message: str) -> None:
    """The progress callback used when none is given."""
