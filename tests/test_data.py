"""Tests of bench_core.data: synthetic data, Fashion-MNIST from the Debian folder, downloads via file:// URLs."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import math
import pickle
import shutil
import struct
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench_core import data
from bench_core.config import DataConfig
from bench_core.errors import ConfigError, DatasetError, StopRequestedError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---------------------------------------------------------------------------------------------
# helpers: fake datasets in the real on-disk formats
# ---------------------------------------------------------------------------------------------


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Four gzipped idx files as torchvision's mirrors and Debian ship them, with random 28x28 images."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return arrays


def write_fake_cifar(where: Path, per_batch: int = 4, n_test: int = 6) -> tuple[Path, dict[str, str], np.ndarray]:
    """A tiny cifar-10-python.tar.gz with the real layout; returns (archive, member md5s, raw training rows)."""
    rng = np.random.default_rng(1)
    folder = where / "build" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = []

    def batch(name: str, n: int, label: str) -> None:
        # Rows are CHW-flattened (1024 red, 1024 green, 1024 blue) as in the real batches.
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        pixels[:, :1024] //= 2  # make the channels differ so per-channel normalisation matters
        payload = {"batch_label": label, "data": pixels, "labels": [int(i % 10) for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(payload, f)
        if name.startswith("data_batch"):
            rows.append(pixels)

    for i in range(1, 6):
        batch(f"data_batch_{i}", per_batch, f"training batch {i} of 5")
    batch("test_batch", n_test, "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(data.CIFAR10_CLASSES), "num_vis": 3072}, f)
    members = {p.name: md5_of(p) for p in folder.iterdir()}
    remote = where / "remote"
    remote.mkdir()
    archive = remote / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive, members, np.concatenate(rows)


def cifar_source(urls: tuple[str, ...], md5: str | None, members: dict[str, str]) -> data.Source:
    remote = data.RemoteFile("cifar-10-python.tar.gz", md5, urls)
    return data.Source(files=(remote,), size="~10 KB", members=tuple(members.items()))


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """SOURCES["cifar10"] points at a tiny archive through a file:// URL."""
    archive, members, rows = write_fake_cifar(tmp_path)
    source = cifar_source((archive.as_uri(),), md5_of(archive), members)
    monkeypatch.setitem(data.SOURCES, "cifar10", source)
    return archive, members, rows


@pytest.fixture
def no_fashion_system_dir(tmp_path, monkeypatch):
    empty = tmp_path / "no-debian-copy"
    empty.mkdir()
    monkeypatch.setenv(data.ENV_FASHION_MNIST_DIR, str(empty))
    return empty


def assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def channel_stats(x: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    std, mean = torch.std_mean(x.view(x.shape[0], channels, -1).double(), dim=(0, 2), correction=0)
    return mean, std


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------


def test_synthetic_shapes_and_dtypes():
    ds = data.make_synthetic(200, 50, shape=(3, 8, 8), num_classes=4, seed=1)
    assert ds.name == "synthetic"
    assert ds.x_train.shape == (200, 192)
    assert ds.x_train.dtype == torch.float32
    assert ds.x_test.shape == (50, 192)
    assert ds.x_test.dtype == torch.float32
    assert ds.y_train.shape == (200,)
    assert ds.y_train.dtype == torch.int64
    assert ds.y_test.shape == (50,)
    assert ds.y_test.dtype == torch.int64
    assert (ds.in_features, ds.n_train, ds.n_test, ds.num_classes) == (192, 200, 50, 4)
    assert ds.input_shape == (3, 8, 8)
    assert ds.class_names == ("class 0", "class 1", "class 2", "class 3")
    assert int(ds.y_train.min()) >= 0
    assert int(ds.y_train.max()) < 4
    assert torch.bincount(ds.y_train, minlength=4).tolist() == [50, 50, 50, 50]  # balanced
    assert torch.isfinite(ds.x_train).all()
    assert torch.isfinite(ds.x_test).all()


def test_synthetic_is_deterministic_and_seeds_differ():
    a = data.make_synthetic(300, 100, shape=(2, 5, 5), num_classes=3, seed=7)
    b = data.make_synthetic(300, 100, shape=(2, 5, 5), num_classes=3, seed=7)
    c = data.make_synthetic(300, 100, shape=(2, 5, 5), num_classes=3, seed=8)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.y_train, c.y_train)
    # The raw test split does not depend on how many training examples were asked for (only its normalisation does).
    d = data.make_synthetic(500, 100, shape=(2, 5, 5), num_classes=3, seed=7)
    assert torch.equal(a.y_test, d.y_test)
    assert torch.allclose(raw_values(a.x_test, a), raw_values(d.x_test, d), atol=1e-5)


def raw_values(x: torch.Tensor, ds: data.Dataset) -> torch.Tensor:
    view = x.view(x.shape[0], len(ds.mean), -1)
    return view * torch.tensor(ds.std)[:, None] + torch.tensor(ds.mean)[:, None]


def test_synthetic_is_normalised_per_channel_with_training_stats():
    ds = data.make_synthetic(2000, 1000, shape=(3, 6, 6), num_classes=5, seed=3)
    mean, std = channel_stats(ds.x_train, 3)
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(std, torch.ones(3, dtype=torch.float64), atol=1e-4)
    # Raw channels had different offsets and scales; the stats record them, and the test split follows.
    assert len(ds.mean) == len(ds.std) == 3
    assert len(set(ds.std)) == 3
    test_mean, test_std = channel_stats(ds.x_test, 3)
    assert test_mean.abs().max() < 0.1
    assert (test_std - 1).abs().max() < 0.1


def test_synthetic_is_learnable_but_not_trivial():
    ds = data.make_synthetic(4000, 2000, shape=(3, 8, 8), num_classes=10, seed=0)
    # Nearest class mean, estimated on the training split.
    means = torch.stack([ds.x_train[ds.y_train == k].mean(0) for k in range(10)])
    ncm = (torch.cdist(ds.x_test, means).argmin(1) == ds.y_test).float().mean().item()
    assert 0.5 < ncm < 0.99, ncm
    # A few full-batch steps of logistic regression.
    torch.manual_seed(0)
    model = torch.nn.Linear(ds.in_features, 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(ds.x_train), ds.y_train).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    assert 0.4 < acc < 0.99, acc  # chance is 0.1


def test_synthetic_full_cifar_size_is_fast():
    start = time.perf_counter()
    ds = data.make_synthetic(50_000, 10_000)
    elapsed = time.perf_counter() - start
    assert ds.x_train.shape == (50_000, 3072)
    assert ds.x_test.shape == (10_000, 3072)
    assert elapsed < 10, f"generating CIFAR-sized synthetic data took {elapsed:.1f} s"


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        data.make_synthetic(0, 10)
    with pytest.raises(ConfigError):
        data.make_synthetic(10, 10, num_classes=1)
    with pytest.raises(ConfigError):
        data.make_synthetic(10, 10, shape=(3, 0, 4))


def test_load_dataset_synthetic_with_progress(tmp_path):
    calls = []
    cfg = DataConfig(
        name="synthetic", synthetic_train=120, synthetic_test=40, synthetic_shape=(1, 4, 4), synthetic_classes=3
    )
    ds = data.load_dataset(cfg, "cpu", progress=lambda f, m: calls.append((f, m)))
    assert (ds.n_train, ds.n_test, ds.in_features, ds.num_classes) == (120, 40, 16, 3)
    assert calls[-1][0] == 1.0
    assert "loaded synthetic" in calls[-1][1]
    same = data.make_synthetic(120, 40, shape=(1, 4, 4), num_classes=3, seed=0)
    assert torch.equal(ds.x_train, same.x_train)


def old_make_synthetic(n_train: int, n_test: int, shape: tuple[int, ...], classes: int, seed: int) -> tuple:
    """make_synthetic as it was before its chunks: each split's noise one ``torch.randn`` of the whole."""
    features, channels = math.prod(shape), shape[0]
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(classes, features, generator=gen).mul_(data.SYNTHETIC_SEPARATION / math.sqrt(features))
    offset = torch.rand(channels, 1, generator=gen).mul_(2.0).sub_(1.0)
    scale = torch.rand(channels, 1, generator=gen).add_(0.5)
    seeds = [int(s) for s in torch.randint(2**62, (2,), generator=gen)]
    out = []
    for n, split_seed in zip((n_train, n_test), seeds, strict=True):
        g = torch.Generator().manual_seed(split_seed)
        y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
        x = torch.randn(n, features, generator=g) + prototypes[y]
        x.view(n, channels, -1).mul_(scale).add_(offset)
        out += [x, y]
    data._normalise_(out[0], out[2], channels)
    return tuple(out)


@pytest.mark.parametrize(
    ("n", "shape"),
    [
        *[(1, (1, 1, 1)), (3, (1, 1, 5)), (1024, (1, 1, 1)), (1025, (1, 1, 1)), (1025, (3, 1, 5))],
        *[(1025, (1, 4, 4)), (1040, (1, 1, 1)), (2049, (3, 1, 1)), (3000, (1, 28, 28))],
    ],
)
def test_synthetic_in_chunks_is_what_one_draw_of_the_whole_gave(n, shape):
    """Drawn in chunks (for progress and a prompt stop), the data is bit for bit what one draw gave, short tails too."""
    features = math.prod(shape)
    chunks = data._row_chunks(n, features)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    assert all((end - start) * features >= 16 for start, end in chunks[1:]), "no short tail on its own"
    ds = data.make_synthetic(n, 7, shape, num_classes=3, seed=11)
    x_train, y_train, x_test, y_test = old_make_synthetic(n, 7, shape, 3, 11)
    assert torch.equal(ds.x_train, x_train) and torch.equal(ds.y_train, y_train)
    assert torch.equal(ds.x_test, x_test) and torch.equal(ds.y_test, y_test)


def test_make_synthetic_reports_progress_and_keeps_its_tensors():
    calls = []
    ds = data.make_synthetic(2500, 700, shape=(1, 3, 5), num_classes=4, seed=3, progress=lambda f, m: calls.append(f))
    assert calls == sorted(calls) and calls[-1] == 1.0 and len(calls) == 4, calls  # 1024 + 1024 + 452 | 700
    again = data.make_synthetic(2500, 700, shape=(1, 3, 5), num_classes=4, seed=3)
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.x_test, again.x_test)


def test_a_stop_ends_synthetic_generation_at_the_next_chunk():
    stop = threading.Event()
    calls = []

    def progress(fraction: float, message: str) -> None:
        calls.append(fraction)
        if fraction > 0:
            stop.set()  # asked while the first chunk's report is shown

    cfg = DataConfig(name="synthetic", synthetic_train=20_000, synthetic_test=100, synthetic_shape=(1, 4, 4))
    with pytest.raises(StopRequestedError) as err:
        data.load_dataset(cfg, "cpu", progress=progress, stop=stop)
    assert_one_line(err, "stopped while the data was loading")
    assert len(calls) == 2, "one chunk after the first report, not the whole set"


def test_a_stop_during_a_download_leaves_no_partial_file(tmp_path, monkeypatch, fake_cifar):
    blob = tmp_path / "big.tar.gz"  # 3.5 MB: four chunks
    blob.write_bytes(np.random.default_rng(1).integers(0, 256, 3_500_000, dtype=np.uint8).tobytes())
    monkeypatch.setitem(data.SOURCES, "cifar10", cifar_source((blob.as_uri(),), None, fake_cifar[1]))
    root = tmp_path / "data"
    stop = threading.Event()
    seen = []

    def progress(fraction: float, message: str) -> None:
        seen.append(message)
        if "MB" in message:
            stop.set()  # after the first MiB

    cfg = DataConfig(name="cifar10", data_dir=str(root), download=True)
    with pytest.raises(StopRequestedError):
        data.load_dataset(cfg, "cpu", progress=progress, stop=stop)
    assert sum("MB" in m for m in seen) == 1, seen
    assert list(root.iterdir()) == [], "the partial download is deleted, no archive is left"


def test_load_dataset_rejects_unknown_name():
    with pytest.raises(ConfigError):
        data.load_dataset(DataConfig(name="imagenet"))


def test_dataset_to_returns_a_moved_copy():
    ds = data.make_synthetic(20, 10, shape=(1, 2, 2), num_classes=2)
    moved = ds.to("meta")  # the meta device exists everywhere: a real move without a GPU
    assert moved is not ds
    assert all(t.device.type == "meta" for t in (moved.x_train, moved.y_train, moved.x_test, moved.y_test))
    assert ds.x_train.device.type == "cpu"
    assert (moved.n_train, moved.n_test, moved.in_features, moved.class_names) == (20, 10, 4, ds.class_names)
    back = ds.to(torch.device("cpu"))
    assert torch.equal(back.x_train, ds.x_train)
    if torch.cuda.is_available():
        on_gpu = ds.to("cuda")
        assert on_gpu.device.type == "cuda"
        assert torch.equal(on_gpu.y_test.cpu(), ds.y_test)


# ---------------------------------------------------------------------------------------------
# data folder and status
# ---------------------------------------------------------------------------------------------


def test_default_data_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "elsewhere"))
    assert data.default_data_dir() == tmp_path / "elsewhere"
    assert not (tmp_path / "elsewhere").exists()  # not created
    monkeypatch.delenv("BENCH_DATA_DIR")
    assert data.default_data_dir() == Path("data")


def test_load_uses_bench_data_dir_when_config_has_none(tmp_path, monkeypatch, fake_cifar):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "env-data"))
    ds = data.load_dataset(DataConfig(name="cifar10", data_dir=None, download=True))
    assert ds.n_train == 20
    assert (tmp_path / "env-data" / "cifar-10-batches-py" / "data_batch_1").is_file()


def test_dataset_status_for_each_dataset(tmp_path, no_fashion_system_dir):
    empty = tmp_path / "data"
    assert data.dataset_status("synthetic", empty)[0] is True
    for name, folder, size in (
        ("cifar10", empty / "cifar-10-batches-py", "170 MB"),
        ("mnist", empty / "MNIST" / "raw", "12 MB"),
        ("fashion-mnist", empty / "FashionMNIST" / "raw", "31 MB"),
    ):
        ok, reason = data.dataset_status(name, empty)
        assert ok is False
        assert "not on disk" in reason
        assert str(folder) in reason
        assert size in reason
        assert "\n" not in reason
    assert str(no_fashion_system_dir) in data.dataset_status("fashion-mnist", empty)[1]
    with pytest.raises(ConfigError):
        data.dataset_status("imagenet", empty)


def test_dataset_status_finds_files_on_disk(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_idx_set(root / "MNIST" / "raw")
    ok, reason = data.dataset_status("mnist", root)
    assert ok
    assert str(root / "MNIST" / "raw") in reason
    system = tmp_path / "debian"
    write_idx_set(system)
    monkeypatch.setenv(data.ENV_FASHION_MNIST_DIR, str(system))
    ok, reason = data.dataset_status("fashion-mnist", root)
    assert ok
    assert str(system) in reason
    (root / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    ok, reason = data.dataset_status("cifar10", root)
    assert not ok
    assert "incomplete" in reason
    assert "data_batch_2" in reason


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST from the Debian package's folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason=f"{DEBIAN_DIR} absent: install the package dataset-fashion-mnist")
def test_real_fashion_mnist_loads_offline_from_debian_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_FASHION_MNIST_DIR, raising=False)
    ok, reason = data.dataset_status("fashion-mnist", tmp_path / "data")
    assert ok
    assert str(DEBIAN_DIR) in reason
    calls = []
    cfg = DataConfig(name="fashion-mnist", data_dir=str(tmp_path / "data"), download=False)
    ds = data.load_dataset(cfg, "cpu", progress=lambda f, m: calls.append((f, m)))
    assert (ds.n_train, ds.n_test, ds.in_features, ds.num_classes) == (60_000, 10_000, 784, 10)
    assert ds.input_shape == (1, 28, 28)
    assert ds.class_names[0] == "T-shirt/top"
    assert ds.class_names[-1] == "Ankle boot"
    assert ds.y_train.dtype == torch.int64
    assert int(ds.y_train.min()) == 0
    assert int(ds.y_train.max()) == 9
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    mean, std = channel_stats(ds.x_train, 1)
    assert abs(mean.item()) < 1e-4
    assert abs(std.item() - 1) < 1e-4
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-3)
    assert ds.std[0] == pytest.approx(0.3530, abs=1e-3)
    assert not (tmp_path / "data").exists()  # read in place: nothing written
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions)
    assert calls[-1] == (1.0, calls[-1][1])
    assert "fashion-mnist" in calls[-1][1]


def test_fashion_mnist_from_overridden_system_dir(tmp_path, monkeypatch):
    system = tmp_path / "copy"
    arrays = write_idx_set(system, n_train=30, n_test=10)
    monkeypatch.setenv(data.ENV_FASHION_MNIST_DIR, str(system))
    ds = data.load_dataset(DataConfig(name="fashion-mnist", data_dir=str(tmp_path / "empty"), download=False))
    assert (ds.n_train, ds.n_test, ds.in_features) == (30, 10, 784)
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    raw = torch.from_numpy(arrays["train-images-idx3-ubyte"]).reshape(30, -1).double() / 255
    expected = (raw - raw.mean()) / raw.std(correction=0)
    assert torch.allclose(ds.x_train.double(), expected, atol=1e-5)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_middle(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 16):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def _not_gzip(path: Path) -> None:
    path.write_bytes(b"this is not a gzip file")


def _bad_header(path: Path) -> None:
    path.write_bytes(gzip.compress(b"\x12\x34\x56\x78 garbage"))


def _short_payload(path: Path) -> None:
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))


CORRUPTIONS = {
    "truncated": ("train-images-idx3-ubyte", _truncate),
    "bytes flipped": ("train-images-idx3-ubyte", _flip_middle),
    "not gzip": ("t10k-labels-idx1-ubyte", _not_gzip),
    "bad idx header": ("train-labels-idx1-ubyte", _bad_header),
    "short payload": ("t10k-images-idx3-ubyte", _short_payload),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_fashion_mnist_copy_raises_one_line(tmp_path, monkeypatch, kind):
    system = tmp_path / "copy"
    write_idx_set(system)
    name, damage = CORRUPTIONS[kind]
    damage(system / f"{name}.gz")
    monkeypatch.setenv(data.ENV_FASHION_MNIST_DIR, str(system))
    cfg = DataConfig(name="fashion-mnist", data_dir=str(tmp_path / "empty"), download=False)
    with pytest.raises(DatasetError) as err:
        data.load_dataset(cfg)
    assert_one_line(err, "fashion-mnist", str(system / f"{name}.gz"), data.ENV_FASHION_MNIST_DIR)


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [(np.arange(30) % 13, "labels run 0..12"), (np.arange(29) % 10, "images but")],
)
def test_fashion_mnist_with_inconsistent_labels_raises(tmp_path, monkeypatch, labels, fragment):
    system = tmp_path / "copy"
    write_idx_set(system, n_train=30)
    (system / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels.astype(np.uint8))))
    monkeypatch.setenv(data.ENV_FASHION_MNIST_DIR, str(system))
    with pytest.raises(DatasetError) as err:
        data.load_dataset(DataConfig(name="fashion-mnist", data_dir=str(tmp_path / "empty"), download=False))
    assert_one_line(err, "fashion-mnist", fragment, str(system))


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason=f"{DEBIAN_DIR} absent: install the package dataset-fashion-mnist")
def test_truncated_real_fashion_mnist_copy_raises(tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in IDX_NAMES:
        (copy / f"{name}.gz").symlink_to(DEBIAN_DIR / f"{name}.gz")
    target = copy / "train-images-idx3-ubyte.gz"
    target.unlink()
    with open(DEBIAN_DIR / target.name, "rb") as f:
        target.write_bytes(f.read(1_000_000))
    monkeypatch.setenv(data.ENV_FASHION_MNIST_DIR, str(copy))
    with pytest.raises(DatasetError) as err:
        data.load_dataset(DataConfig(name="fashion-mnist", data_dir=str(tmp_path / "empty"), download=False))
    assert_one_line(err, "fashion-mnist", "truncated or corrupt", str(target))


# ---------------------------------------------------------------------------------------------
# missing data, download disabled, unwritable folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "looked"),
    [
        ("cifar10", "cifar-10-batches-py"),
        ("mnist", "MNIST/raw"),
        ("fashion-mnist", "FashionMNIST/raw"),
    ],
)
def test_missing_dataset_with_download_off_names_the_place(tmp_path, no_fashion_system_dir, name, looked):
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as err:
        data.load_dataset(DataConfig(name=name, data_dir=str(root), download=False))
    message = assert_one_line(err, name, str(root / looked), "download is off")
    if name == "fashion-mnist":
        assert str(no_fashion_system_dir) in message
    assert not root.exists()


@pytest.mark.parametrize("name", ["cifar10", "mnist", "fashion-mnist"])
def test_unwritable_data_dir_when_download_needed(tmp_path, monkeypatch, no_fashion_system_dir, name):
    # Tests run as root, so chmod would not stop a write: a regular file in the path does.
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    for key in ("cifar10", "mnist", "fashion-mnist"):  # never reach out to the real network
        source = data.SOURCES[key]
        files = tuple(data.RemoteFile(f.filename, None, ("file:///nonexistent/" + f.filename,)) for f in source.files)
        monkeypatch.setitem(data.SOURCES, key, data.Source(files=files, size=source.size, members=source.members))
    root = blocker / "data"
    with pytest.raises(DatasetError) as err:
        data.load_dataset(DataConfig(name=name, data_dir=str(root), download=True))
    assert_one_line(err, name, "not writable", str(root))


# ---------------------------------------------------------------------------------------------
# downloads through file:// URLs
# ---------------------------------------------------------------------------------------------


def test_download_file_streams_with_progress_and_checks_md5(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(np.random.default_rng(0).integers(0, 256, 3_500_000, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    out.mkdir()
    calls = []
    got = data.download_file(src.as_uri(), out / "blob.bin", md5_of(src), lambda f, m: calls.append((f, m)))
    assert got == out / "blob.bin"
    assert got.read_bytes() == src.read_bytes()
    fractions = [f for f, _ in calls]
    assert len(calls) >= 4
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert [p.name for p in out.iterdir()] == ["blob.bin"]  # no temporary file left behind
    data.download_file(src.as_uri(), out / "again.bin", None)  # md5 None: no check
    assert (out / "again.bin").stat().st_size == src.stat().st_size


def test_download_file_with_wrong_md5_leaves_nothing(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"some bytes")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError) as err:
        data.download_file(src.as_uri(), out / "blob.bin", "0" * 32)
    assert_one_line(err, "md5", "0" * 32)
    assert list(out.iterdir()) == []


def test_cifar10_download_extract_load_end_to_end(tmp_path, monkeypatch, fake_cifar):
    archive, _, rows = fake_cifar
    root = tmp_path / "data"
    calls = []
    ds = data.load_dataset(
        DataConfig(name="cifar10", data_dir=str(root), download=True), "cpu", lambda f, m: calls.append((f, m))
    )
    assert ds.x_train.shape == (20, 3072)
    assert ds.x_test.shape == (6, 3072)
    assert ds.x_train.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64
    assert (ds.num_classes, ds.input_shape, ds.class_names) == (10, (3, 32, 32), data.CIFAR10_CLASSES)
    assert ds.y_train.tolist() == [i % 10 for i in range(4)] * 5
    # Same pixel order as the batches (CHW), normalised per channel with the training split's statistics.
    raw = torch.from_numpy(rows).double().view(20, 3, 1024) / 255
    std, mean = torch.std_mean(raw, dim=(0, 2), correction=0)
    expected = ((raw - mean[:, None]) / std[:, None]).view(20, 3072)
    assert torch.allclose(ds.x_train.double(), expected, atol=1e-5)
    assert ds.mean[0] < ds.mean[1]  # the red channel was halved
    # Downloaded, checked, extracted into torchvision's layout, no scratch left behind.
    assert (root / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    messages = " | ".join(m for _, m in calls)
    assert "downloading cifar-10-python.tar.gz" in messages
    assert "extracting" in messages
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert data.dataset_status("cifar10", root) == (True, f"on disk at {root / 'cifar-10-batches-py'}")
    # Once on disk it loads with download off and no reachable URL.
    offline = dataclass_replace_urls(data.SOURCES["cifar10"], ("file:///nonexistent/x.tar.gz",))
    monkeypatch.setitem(data.SOURCES, "cifar10", offline)
    again = data.load_dataset(DataConfig(name="cifar10", data_dir=str(root), download=False))
    assert torch.equal(again.x_train, ds.x_train)
    assert torch.equal(again.y_test, ds.y_test)


def dataclass_replace_urls(source: data.Source, urls: tuple[str, ...]) -> data.Source:
    remote = source.files[0]
    return data.Source(
        files=(data.RemoteFile(remote.filename, remote.md5, urls),), size=source.size, members=source.members
    )


def test_cifar10_tries_the_next_mirror(tmp_path, monkeypatch, fake_cifar):
    archive, members, _ = fake_cifar
    urls = ("file:///nonexistent/cifar-10-python.tar.gz", archive.as_uri())
    monkeypatch.setitem(data.SOURCES, "cifar10", cifar_source(urls, md5_of(archive), members))
    ds = data.load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path / "data"), download=True))
    assert ds.n_train == 20


def test_cifar10_archive_on_disk_is_extracted_without_network(tmp_path, monkeypatch, fake_cifar):
    archive, members, _ = fake_cifar
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(archive, root / archive.name)
    monkeypatch.setitem(data.SOURCES, "cifar10", cifar_source(("file:///nonexistent/x",), md5_of(archive), members))
    ok, reason = data.dataset_status("cifar10", root)
    assert ok
    assert "archive on disk" in reason
    ds = data.load_dataset(DataConfig(name="cifar10", data_dir=str(root), download=False))
    assert ds.n_test == 6


def test_cifar10_wrong_md5_raises(tmp_path, monkeypatch, fake_cifar):
    archive, members, _ = fake_cifar
    monkeypatch.setitem(data.SOURCES, "cifar10", cifar_source((archive.as_uri(),), "f" * 32, members))
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as err:
        data.load_dataset(DataConfig(name="cifar10", data_dir=str(root), download=True))
    assert_one_line(err, "could not download cifar10", "md5", "f" * 32)
    assert list(root.iterdir()) == []  # the bad file was not kept


def test_cifar10_without_network_says_so(tmp_path, monkeypatch, fake_cifar):
    _, members, _ = fake_cifar
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    urls = ("http://127.0.0.1:9/cifar-10-python.tar.gz", "file:///nonexistent/cifar-10-python.tar.gz")
    monkeypatch.setitem(data.SOURCES, "cifar10", cifar_source(urls, None, members))
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as err:
        data.load_dataset(DataConfig(name="cifar10", data_dir=str(root), download=True))
    assert_one_line(
        err, "could not download cifar10 (no network?", "cifar-10-python.tar.gz", str(root), "BENCH_DATA_DIR"
    )


def test_cifar10_corrupt_batch_on_disk_raises(tmp_path, fake_cifar):
    root = tmp_path / "data"
    data.load_dataset(DataConfig(name="cifar10", data_dir=str(root), download=True))
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError) as err:
        data.load_dataset(DataConfig(name="cifar10", data_dir=str(root), download=False))
    assert_one_line(err, "cifar10", "data_batch_3", "corrupt", str(root / "cifar-10-batches-py"))


def test_cifar10_corrupt_batch_without_md5_list_raises(tmp_path, monkeypatch, fake_cifar):
    archive, members, _ = fake_cifar
    unchecked = {name: None for name in members}
    monkeypatch.setitem(data.SOURCES, "cifar10", cifar_source((archive.as_uri(),), md5_of(archive), unchecked))
    root = tmp_path / "data"
    data.load_dataset(DataConfig(name="cifar10", data_dir=str(root), download=True))
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:100])  # truncated pickle: only the unpickler notices
    with pytest.raises(DatasetError) as err:
        data.load_dataset(DataConfig(name="cifar10", data_dir=str(root), download=False))
    assert_one_line(err, "cifar10", "truncated or corrupt", str(root / "cifar-10-batches-py"))


def test_mnist_download_decompress_and_load_through_torchvision(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    arrays = write_idx_set(remote, n_train=40, n_test=12)
    files = tuple(
        data.RemoteFile(
            f"{name}.gz",
            md5_of(remote / f"{name}.gz"),
            (f"file:///nonexistent/{name}.gz", (remote / f"{name}.gz").as_uri()),
        )
        for name in IDX_NAMES
    )
    monkeypatch.setitem(data.SOURCES, "mnist", data.Source(files=files, size="~30 KB"))
    root = tmp_path / "data"
    calls = []
    ds = data.load_dataset(
        DataConfig(name="mnist", data_dir=str(root), download=True), "cpu", lambda f, m: calls.append((f, m))
    )
    assert (ds.n_train, ds.n_test, ds.in_features, ds.input_shape) == (40, 12, 784, (1, 28, 28))
    assert ds.class_names == tuple("0123456789")
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    raw_folder = root / "MNIST" / "raw"
    assert all((raw_folder / name).is_file() for name in IDX_NAMES)  # torchvision's decompressed layout
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert data.dataset_status("mnist", root)[0] is True
    # A decompressed file cut short is reported, not loaded.
    _truncate(raw_folder / "t10k-images-idx3-ubyte")
    with pytest.raises(DatasetError) as err:
        data.load_dataset(DataConfig(name="mnist", data_dir=str(root), download=False))
    assert_one_line(err, "mnist", "truncated or corrupt", str(raw_folder))
