"""Settings of a run: three small dataclasses with commented defaults.

The CLI and the dashboard build a RunConfig from their flat settings (``RunConfig.from_flat``);
``asdict(config)`` is stored with every run, and ``RunConfig.from_dict`` rebuilds it.
``validate()`` raises ConfigError with a one-line message for every value a user can get wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from bench_core.errors import ConfigError

DATASETS = ("cifar10", "fashion-mnist", "mnist", "synthetic")
METHODS = ("single", "classic", "batchensemble")
CLASSIC_MODES = ("vectorized", "sequential")
BE_BATCHINGS = ("repeat", "split")
BE_INITS = ("normal", "random_sign")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes less than 2**64; int64 everywhere else


@dataclass
class DataConfig:
    name: str = "cifar10"  # one of DATASETS; cifar10 as in the seed notebook
    data_dir: str | None = None  # None: $BENCH_DATA_DIR, else ./data
    download: bool = True  # let torchvision download a missing dataset (needs a network)
    synthetic_train: int = 50_000  # synthetic: training examples (CIFAR-10's count)
    synthetic_test: int = 10_000  # synthetic: test examples
    synthetic_shape: tuple[int, ...] = (3, 32, 32)  # synthetic: shape of one example (CIFAR-10's)
    synthetic_classes: int = 10  # synthetic: number of classes
    synthetic_seed: int = 0  # synthetic: the data's own seed, apart from the training seed

    def validate(self) -> None:
        if self.name not in DATASETS:
            raise ConfigError(f"unknown dataset {self.name!r}: choose one of {', '.join(DATASETS)}")
        for name in ("synthetic_train", "synthetic_test"):
            _check_int(name.replace("_", " "), getattr(self, name), minimum=1)
        _check_int("synthetic classes", self.synthetic_classes, minimum=2)
        _check_int("synthetic seed", self.synthetic_seed, minimum=0, maximum=MAX_SEED)
        if not self.synthetic_shape or any(not isinstance(d, int) or d < 1 for d in self.synthetic_shape):
            raise ConfigError(f"synthetic shape must be positive integers, got {self.synthetic_shape!r}")
        if self.data_dir is not None and not isinstance(self.data_dir, str):  # a stored run edited by hand
            raise ConfigError(f"data folder must be a path, got {self.data_dir!r}")
        if not isinstance(self.download, bool):  # "false" would read as true
            raise ConfigError(f"download must be true or false, got {self.download!r}")


@dataclass
class ModelConfig:
    hidden: int = 128  # width of every hidden layer (the seed: 128)
    depth: int = 2  # number of hidden layers (the seed: 2)
    ensemble_size: int = 5  # E, members per ensemble (the seed: 5)
    classic_mode: str = (
        "vectorized"  # classic: "vectorized" (one batched pass) or "sequential" (one member after another)
    )
    be_batching: str = (
        "repeat"  # BatchEnsemble: "repeat" (every member sees every example) or "split" (1/E of the batch each)
    )
    be_init: str = "normal"  # BatchEnsemble fast weights: "normal" N(1, be_init_std) or "random_sign" (+1/-1)
    be_init_std: float = 0.5  # std of the normal fast-weight init (the paper's reference code uses 0.5)

    def validate(self) -> None:
        _check_int("hidden width", self.hidden, minimum=1, maximum=65_536)
        _check_int("depth", self.depth, minimum=1, maximum=16)
        _check_int("ensemble size", self.ensemble_size, minimum=1, maximum=256)
        _check_choice("classic mode", self.classic_mode, CLASSIC_MODES)
        _check_choice("BatchEnsemble batching", self.be_batching, BE_BATCHINGS)
        _check_choice("fast-weight init", self.be_init, BE_INITS)
        _check_float("fast-weight init std", self.be_init_std, allow_zero=True)


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training split
    batch_size: int = 128  # examples per step (the seed: 128)
    lr: float = 1e-3  # Adam learning rate (the seed: 1e-3)
    seed: int = 0  # seeds initialisation and batch order; CPU runs are reproducible
    device: str = "auto"  # "auto", "cpu", "cuda" or "mps"
    log_every: int = 0  # also yield a StepRecord every k steps (0: epoch records only)
    eval_batch_size: int = 1024  # examples per forward pass in evaluation

    def validate(self) -> None:
        _check_int("epochs", self.epochs, minimum=1, maximum=10_000)
        _check_int("batch size", self.batch_size, minimum=1)
        _check_float("learning rate", self.lr)
        _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        _check_int("log every", self.log_every, minimum=0)
        _check_int("eval batch size", self.eval_batch_size, minimum=1)


@dataclass
class RunConfig:
    methods: tuple[str, ...] = ("classic", "batchensemble")  # which methods to train, in order
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        """Check every setting; returns self so calls can chain."""
        if not self.methods:
            raise ConfigError(f"choose at least one method of {', '.join(METHODS)}")
        for method in self.methods:
            _check_choice("method", method, METHODS)
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"each method may be named once, got {', '.join(self.methods)}")
        self.data.validate()
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_flat(cls, values: Mapping) -> RunConfig:
        """A config from one flat mapping of settings, as the CLI and the Train page give them.

        Keys: ``methods``, ``dataset`` (the data's name) and any field of the three sections by its
        own name; other keys are ignored. Not validated: call ``validate()``.
        """
        cfg = cls(methods=tuple(values.get("methods", cls.methods)))
        if "dataset" in values:
            cfg.data.name = values["dataset"]
        for section in (cfg.data, cfg.model, cfg.train):
            for f in fields(section):
                if f.name != "name" and f.name in values:
                    setattr(section, f.name, values[f.name])
        return cfg

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        """Rebuild a config from ``to_dict()`` output; unknown keys are ignored."""
        data = _build(DataConfig, raw.get("data", {}))
        if isinstance(data.synthetic_shape, list):
            data.synthetic_shape = tuple(data.synthetic_shape)
        return cls(
            methods=tuple(raw.get("methods", cls.methods)),
            data=data,
            model=_build(ModelConfig, raw.get("model", {})),
            train=_build(TrainConfig, raw.get("train", {})),
        )


def _build(kind, raw: dict):
    names = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in raw.items() if k in names})


def _check_int(label: str, value, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{label} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{label} must be at most {maximum}, got {value}")


def _check_float(label: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{label} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{label} must be a positive number, got {value!r}")


def _check_choice(label: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {label} {value!r}: choose one of {', '.join(choices)}")
