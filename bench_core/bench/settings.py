"""What a benchmark measures: its rows, dataset shapes, settings, and the events it yields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from bench_core.devices import resolve_device
from bench_core.errors import ConfigError
from bench_core.report import METHOD_LABELS

ROWS = (
    "single",
    "classic-sequential",
    "classic-vectorized",
    "batchensemble-repeat",
    "batchensemble-split",
    "reference-classic",
    "reference-batchensemble",
)
REFERENCE_ROWS = ("reference-classic", "reference-batchensemble")
ROW_GROUPS = {  # shorthands accepted by --methods
    "classic": ("classic-sequential", "classic-vectorized"),
    "batchensemble": ("batchensemble-repeat", "batchensemble-split"),
    "reference": REFERENCE_ROWS,
}
# (method, mode) of each row, as the table shows them.
ROW_LABELS = {
    "single": ("single", ""),
    "classic-sequential": ("classic", "sequential"),
    "classic-vectorized": ("classic", "vectorized"),
    "batchensemble-repeat": ("batchensemble", "repeat"),
    "batchensemble-split": ("batchensemble", "split"),
    "reference-classic": ("reference", "classic"),
    "reference-batchensemble": ("reference", "batchensemble"),
}
ROW_NAMES = {  # as people read them: "BatchEnsemble split", "reference BatchEnsemble"
    name: f"{METHOD_LABELS.get(method, method)} {METHOD_LABELS.get(mode, mode)}".strip()
    for name, (method, mode) in ROW_LABELS.items()
}
# Shape of one example, training examples per epoch, classes.
DATASET_SHAPES = {
    "cifar10": ((3, 32, 32), 50_000, 10),
    "fashion-mnist": ((1, 28, 28), 60_000, 10),
    "mnist": ((1, 28, 28), 60_000, 10),
}
MATMUL_SIZE = 2048  # the square product whose rate sets the floor
TURN_RATE_REPEATS = 5  # timings of the floor's product just before a paired turn, and as many just after
# Untimed steps at the start of every timed repeat of a workbench row (where warm-up steps are asked
# for): the rows take turns, so each repeat starts cold. On an Intel Xeon the first step of a turn took
# 10-22 ms against a median of 5.4-6.5 for classic vectorized and 4-15 against 1.7-2.2 for split:
# 1 % of classic's 60-step turn and 4 % of split's (docs/speed-log.md, twenty-ninth session).
REWARM_STEPS = 1
INFERENCE_BATCH = 1024
TARGET_E = 5  # the ensemble size the targets are stated for


def steps_text(n: int, kind: str) -> str:
    """'1 timed step', '60 timed steps': ``n`` steps of a ``kind``, in words."""
    return f"{n} {kind} {'step' if n == 1 else 'steps'}"


@dataclass
class BenchSettings:
    dataset_shape: str = "cifar10"  # a name of DATASET_SHAPES or "CxHxW", e.g. "1x8x8"
    ensemble_sizes: tuple[int, ...] = (1, 2, 4, 8)  # E of each ensemble row
    rows: tuple[str, ...] = ROWS  # which rows of ROWS to measure
    batch_size: int = 128  # examples per step (the seed: 128)
    hidden: int = 128  # hidden width (the seed: 128)
    depth: int = 2  # hidden layers (the seed: 2)
    steps: int = 60  # timed steps per repeat (per member for sequential rows)
    warmup: int = 10  # untimed steps before timing
    # Timed repeats of each workbench row; the median is reported. In the noisy stretches of this
    # project's shared 2-core machine a row's turns moved by up to 30 % from one to the next: medians
    # of 3 missed a target held by ~10 % (repeat, split, the floor beside the turns) in 3 of 6 runs,
    # medians of 9 in none of 11 (docs/speed-log.md, thirty-fifth session).
    repeats: int = 9
    # Timed repeats of the reference rows (the seed's pipeline): each of their turns takes seconds
    # (DataLoader workers start for each member), and their speed-ups are far from their targets.
    reference_repeats: int = 3
    device: str = "auto"  # "auto", "cpu", "cuda" or "mps"
    reference: bool = True  # measure the reference rows (when in rows)
    full_epoch: bool = False  # time whole epochs instead of extrapolating from `steps`
    train_examples: int | None = None  # examples per epoch; None: the dataset's (50,000 for CIFAR-10)
    inference_examples: int = 10_000  # examples of the timed inference pass
    isolate: bool = True  # each row in its own process (clean memory figures)
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    cuda_graph: bool = True  # on CUDA, replay each full-batch training step as a CUDA graph
    profile_steps: int = 20  # CPU: steps profiled for where a step goes (per member for sequential); 0: none
    seed: int = 0

    def validate(self) -> BenchSettings:
        """Check every setting (ConfigError with one line); returns self."""
        _, n_train, _ = self.shape_info()
        if not self.ensemble_sizes:
            raise ConfigError("choose at least one ensemble size")
        for e in self.ensemble_sizes:
            _check_int("ensemble size", e, 1, 256)
        for label, value, low in [
            ("batch size", self.batch_size, 1),
            ("hidden width", self.hidden, 1),
            ("depth", self.depth, 1),
            ("steps", self.steps, 1),
            ("warm-up steps", self.warmup, 0),
            ("repeats", self.repeats, 1),
            ("reference repeats", self.reference_repeats, 1),
            ("inference examples", self.inference_examples, 1),
            ("training examples", n_train, 1),
            ("threads", self.threads or 1, 1),
            ("profiled steps", self.profile_steps, 0),
        ]:
            _check_int(label, value, low)
        for name in self.rows:
            if name not in ROWS:
                raise ConfigError(f"unknown row {name!r}: choose from {', '.join(ROWS)}")
        if not self.active_rows():
            raise ConfigError("no rows to measure: choose a row besides the reference ones, or measure the reference")
        if self.depth != 2 and any(r in REFERENCE_ROWS for r in self.active_rows()):
            raise ConfigError(
                f"the reference rows run the seed's models, which have 2 hidden layers, not {self.depth}: "
                "use --depth 2 or --no-reference"
            )
        channels = self.shape_info()[0][0]
        if channels > 4 and any(r in REFERENCE_ROWS for r in self.active_rows()):
            raise ConfigError(
                f"the reference rows make a PIL image of each example, which takes 1 to 4 channels, not {channels}: "
                "use --no-reference or another --dataset-shape"
            )
        if self.batch_size > n_train:
            raise ConfigError(f"batch size {self.batch_size} is larger than the {n_train} training examples")
        if "batchensemble-split" in self.rows and self.batch_size < max(self.ensemble_sizes):
            raise ConfigError(
                f"split batching needs a batch size of at least E = {max(self.ensemble_sizes)}, got {self.batch_size}"
            )
        resolve_device(self.device)
        return self

    def shape_info(self) -> tuple[tuple[int, ...], int, int]:
        """(shape of one example, training examples per epoch, classes)."""
        if self.dataset_shape in DATASET_SHAPES:
            shape, n_train, classes = DATASET_SHAPES[self.dataset_shape]
        else:
            shape, n_train, classes = parse_shape(self.dataset_shape), 50_000, 10
        return shape, self.train_examples or n_train, classes

    def rewarm_steps(self) -> int:
        """Untimed steps at the start of each timed repeat of a workbench row: REWARM_STEPS, none without warm-up."""
        return REWARM_STEPS if self.warmup else 0

    def active_rows(self) -> tuple[str, ...]:
        return tuple(r for r in ROWS if r in self.rows and (self.reference or r not in REFERENCE_ROWS))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> BenchSettings:
        names = {f.name for f in fields(cls)}
        if "repeats" in raw and "reference_repeats" not in raw:
            raw = {**raw, "reference_repeats": raw["repeats"]}  # saved before it: every row took `repeats`
        out = cls(**{k: v for k, v in raw.items() if k in names})
        out.ensemble_sizes, out.rows = tuple(out.ensemble_sizes), tuple(out.rows)
        return out


@dataclass(frozen=True)
class RowSpec:
    name: str  # one of ROWS
    ensemble_size: int


@dataclass
class BenchEvent:
    kind: str  # "progress", "header", "row" or "done"
    fraction: float = 0.0  # of the whole benchmark, 0..1
    message: str = ""
    header: dict | None = None  # kind "header" and "done"
    row: dict | None = None  # kind "row"
    rows: list[dict] = field(default_factory=list)  # kind "done": every row, compared (compare_rows)
    targets: list[dict] = field(default_factory=list)  # kind "done"
    stopped: bool = False  # kind "done": a stop request cut the benchmark short

    def to_dict(self) -> dict:
        return asdict(self)


def row_batching(name: str) -> str:
    return "split" if name == "batchensemble-split" else "repeat"


def parse_shape(text: str) -> tuple[int, ...]:
    """A shape written "CxHxW" (or with ×); ConfigError when it is not three positive whole numbers."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        names = ", ".join(DATASET_SHAPES)
        raise ConfigError(f"unknown dataset shape {text!r}: choose one of {names} or give CxHxW, e.g. 3x32x32")
    return shape


def _check_int(label: str, value, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label} must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{label} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{label} must be at most {maximum}, got {value}")
