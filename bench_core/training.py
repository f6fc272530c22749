"""One training loop for every method, written as a generator of records.

``train`` yields a ``StepRecord`` every ``log_every`` steps (when > 0) and an ``EpochRecord`` as
each epoch ends. It never prints: the CLI and the dashboard consume the same records.

The loop keeps the whole training split on the device and draws each batch by index from a
per-epoch permutation (seeded, the same for every method of a run). Per-member losses are
accumulated on the device, so a CUDA run synchronises only where a record is made.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bench_core import manual, native
from bench_core.config import TrainConfig
from bench_core.devices import synchronize, tune_cpu_allocator
from bench_core.errors import ConfigError, DivergedError
from bench_core.models import BatchEnsembleMLP, SequentialEnsemble
from bench_core.optim import AdamStep, KernelAdam, clear_grads

if TYPE_CHECKING:
    from bench_core.data import Dataset


@dataclass
class EpochRecord:
    method: str
    epoch: int  # 1-based; a stopped epoch counts as begun
    epochs: int  # epochs planned
    member_loss: list[float]  # each member's training loss over the epoch, per example it trained on
    loss: float  # mean of member_loss
    epoch_seconds: float  # wall clock of this epoch (synchronised on CUDA)
    examples_per_second: float  # training examples consumed per second in this epoch
    elapsed_seconds: float  # since this method's training began
    steps: int  # optimizer steps in this epoch (per member for sequential)
    stopped: bool = False  # the epoch was cut short by a stop request
    kind: str = field(default="epoch", init=False)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepRecord:
    method: str
    epoch: int
    step: int  # steps done in this epoch
    steps_per_epoch: int
    member_loss: list[float]  # each member's training loss since the last record, per example
    loss: float
    examples_per_second: float  # since the last record
    elapsed_seconds: float
    kind: str = field(default="step", init=False)

    def to_dict(self) -> dict:
        return asdict(self)


def loss_reduction(model: nn.Module) -> str:
    """How per-member losses combine: BatchEnsemble averages (as the paper), classic sums.

    Summing keeps member k's gradient exactly what it would be if trained alone, so the
    vectorized classic ensemble trains like E independent MLPs (Adam is elementwise).
    """
    return "mean" if isinstance(model, BatchEnsembleMLP) else "sum"


def steps_per_epoch(n_train: int, batch_size: int, ensemble_size: int, batching: str) -> int:
    """Optimizer steps in one epoch for a batching mode (see ``batch_plan``)."""
    return len(batch_plan(n_train, batch_size, ensemble_size, batching))


def effective_batching(batching: str, ensemble_size: int) -> str:
    """The batching a BatchEnsemble of ``ensemble_size`` members trains with.

    One member's slice of a split batch is the whole batch: the same steps as repeat batching,
    through the first layer's shared-input path (two products instead of three: 1.33 against
    1.53 s per CIFAR-10 epoch on this project's 2-core CPU, docs/bench/cpu-sizes-2026-11-26-session4.txt).
    """
    return "repeat" if batching == "split" and ensemble_size == 1 else batching


def compiles_kernels(batchensemble: bool, device: torch.device, batching: str, ensemble_size: int) -> bool:
    """Whether training compiles BatchEnsemble's first-layer CPU kernel (``bench_core.kernels``) before its clock.

    Repeat batching on the CPU, split batching with one member included (it trains as repeat
    batching); split batching with members gives the first layer per-member inputs, no kernel.
    Not where the C++ steps take the first layer through their own kernel (``manual.first_layer_kernel_on``:
    AVX-512 CPUs), which replaces it there. The benchmark asks too, to compile it before its memory probe.
    """
    if not (batchensemble and device.type == "cpu" and effective_batching(batching, ensemble_size) == "repeat"):
        return False
    return not manual.first_layer_kernel_on()


def examples_per_step(batch_size: int, ensemble_size: int, batching: str) -> int:
    """Examples one full step takes: the batch ("repeat"), or E slices of ``batch_size // E`` ("split")."""
    return batch_size // ensemble_size * ensemble_size if batching == "split" else batch_size


def batch_plan(n_train: int, batch_size: int, ensemble_size: int, batching: str) -> list[tuple[int, int]]:
    """(start, stop) offsets into the epoch's permutation, one per step.

    "repeat": batches of ``batch_size``; every member sees every example.
    "split": each step takes E*b examples with b = batch_size // E, and member k gets the k-th
    slice of b; a last partial step gives each member ``rest // E`` examples. At most E - 1
    examples per epoch are left out, and every other example is seen by exactly one member.
    """
    if batching == "split":
        per_member = batch_size // ensemble_size
        if per_member < 1:
            raise ConfigError(
                f"batch size {batch_size} can't be split among {ensemble_size} members: "
                f"use a batch size of at least {ensemble_size} or repeat batching"
            )
        if n_train < ensemble_size:
            raise ConfigError(f"{n_train} training examples can't be split among {ensemble_size} members")
        step = examples_per_step(batch_size, ensemble_size, batching)
        plan = []
        for start in range(0, n_train, step):
            stop = min(start + step, n_train)
            usable = (stop - start) // ensemble_size * ensemble_size
            if usable:
                plan.append((start, start + usable))
        return plan
    return [(start, min(start + batch_size, n_train)) for start in range(0, n_train, batch_size)]


def make_optimizer(params, lr: float, device: torch.device, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam, in its fused single-kernel form where this torch and device support it.

    ``capturable`` keeps Adam's step count on the device so that a CUDA graph can replay ``step``.
    """
    params = list(params)
    extra = {"capturable": True} if capturable else {}
    try:
        return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"), **extra)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, **extra)


class _Step:
    """One optimizer step of one model on the batch ``x_train[idx]``: gather, forward, backward, Adam.

    Returns the detached per-member losses, shape (E,).
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, dataset: Dataset, split: bool, reduction: str):
        self.model, self.opt, self.split, self.reduction = model, opt, split, reduction
        self.opt_step = AdamStep(opt)  # opt.step(), without Adam's Python on a CPU (bench_core.optim)
        self.x, self.y = dataset.x_train, dataset.y_train
        self.grads_kept = False  # after a CUDA graph capture the gradients must stay where they are
        # The classic ensemble's first-layer weight, on AVX-512 CPUs: stepped by Adam inside its gradient's kernel.
        self.kernel_weight = manual.kernel_adam_weight(model) if dataset.x_train.device.type == "cpu" else None
        # The whole step as one C++ call (manual.one_call_step): asked for once, after the first step
        # (which makes Adam's state), on a CPU.
        self.one_call: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.one_call_pending = dataset.x_train.device.type == "cpu"

    def losses(self, idx: torch.Tensor, adam: KernelAdam | None = None) -> torch.Tensor:
        """Forward and backward of the batch ``idx``: the per-member losses (E,), detached.

        ``adam``: Adam's state for ``kernel_weight``, which the written-out step then steps itself
        (``manual.forward_backward``).
        """
        # index_select, not x[idx]: on the CPU 6x faster for a 125x3072 batch (0.036 against 0.21 ms).
        xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)  # (B, D), (B,)
        if self.split:
            n_members = self.model.ensemble_size
            xb = xb.view(n_members, -1, xb.size(1))  # (E, b, D)
            yb = yb.view(n_members, -1)  # (E, b)
        if manual.applies(self.model, xb):  # CPU, the workbench's own models: the same gradients, no autograd graph
            return manual.forward_backward(self.model, xb, yb, self.reduction, adam)
        logits = self.model(xb)  # (E, B, C), or (B, C) for one sequential member
        if logits.dim() == 2:
            logits = logits.unsqueeze(0)
        member_losses = per_member_cross_entropy(logits, yb)  # (E,)
        loss = member_losses.sum() if self.reduction == "sum" else member_losses.mean()
        loss.backward()
        return member_losses.detach()

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.one_call is not None:
            try:
                return self.one_call(idx)
            except RuntimeError as err:  # off from here on; this step through the Python below
                self.one_call = None
                manual.one_call_failed(err)
        member_losses = self._step(idx)
        if self.one_call_pending:
            self.one_call_pending = False
            self.one_call = manual.one_call_step(self.model, self.opt_step, self.x, self.y, self.split, self.reduction)
        return member_losses

    def _step(self, idx: torch.Tensor) -> torch.Tensor:
        if self.grads_kept:  # a CUDA graph's gradients: zeroed where they are
            self.opt.zero_grad(set_to_none=False)
        else:
            clear_grads(self.opt)  # opt.zero_grad(set_to_none=True), without its profiler range
        if self.kernel_weight is None:
            member_losses = self.losses(idx)
            self.opt_step()
            return member_losses
        adam = self.opt_step.kernel_state(self.kernel_weight)  # None on the first step: Adam makes its state
        member_losses = self.losses(idx, adam)
        self.opt_step(stepped=self.kernel_weight)  # the others; the weight too where the kernel did not run
        return member_losses


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One warm-up stream per device: cuBLAS keeps a workspace for every stream it has run on."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


class _GraphedStep(_Step):
    """The same step on CUDA, replayed as one CUDA graph for full batches.

    A step of these small MLPs is dozens of short kernels, and launching them from Python costs more
    than running them (measured on an H200: 1.5-2.6 ms per step, 150-230 operator calls). The
    first ``WARMUP`` full batches run eagerly on a side stream (as torch's CUDA-graph notes
    require), the next one is captured (gather from the device-resident data, forward, backward,
    fused Adam) and every later full batch copies its indices into the graph's input and replays
    it. A batch of another size (the epoch's last) runs eagerly on the same gradient tensors.
    """

    WARMUP = 3

    def __init__(self, *args, batch_len: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_len = batch_len
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = 0
        self.static_idx = torch.zeros(batch_len, dtype=torch.long, device=self.x.device)
        self.static_losses: torch.Tensor | None = None
        self.failed = False  # capture failed: every step eager

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.numel() != self.batch_len:
            return super().__call__(idx)
        if self.graph is None and self.warm < self.WARMUP:
            self.warm += 1
            side = _side_stream(self.x.device)
            side.wait_stream(torch.cuda.current_stream(self.x.device))
            with torch.cuda.stream(side):
                member_losses = super().__call__(idx)
            torch.cuda.current_stream(self.x.device).wait_stream(side)
            member_losses.record_stream(torch.cuda.current_stream(self.x.device))
            return member_losses
        if self.failed:
            return super().__call__(idx)
        self.static_idx.copy_(idx)
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as err:  # capture records kernels without running them: redo eagerly
                self.failed, self.grads_kept = True, False
                warnings.warn(f"CUDA graph capture failed, training eagerly: {err}", RuntimeWarning, stacklevel=2)
                return super().__call__(idx)
        self.graph.replay()
        return self.static_losses.clone()  # the graph overwrites its output on the next replay

    def _capture(self) -> None:
        self.opt.zero_grad(set_to_none=True)  # the graph allocates (and then owns) the gradients
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # the dashboard's worker has threads
            self.static_losses = self.losses(self.static_idx)
            self.opt.step()
        self.graph, self.grads_kept = graph, True


def train(
    model: nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    *,
    method: str,
    batching: str = "repeat",
    stop: threading.Event | None = None,
    cuda_graph: bool = True,
    untimed_steps: int = 0,
) -> Iterator[EpochRecord | StepRecord]:
    """Train ``model`` on ``dataset`` and yield records as it goes.

    Args:
        model: any model of ``bench_core.models`` (already on the dataset's device).
        dataset: tensors on the training device.
        cfg: epochs, batch size, learning rate, seed, log_every.
        method: name written into the records.
        batching: "repeat" (all members see the whole batch) or "split" (BatchEnsemble only:
            each member gets its own 1/E of the batch).
        stop: when set, the loop ends between two batches and yields a last EpochRecord with
            ``stopped=True``; the model keeps what was trained.
        cuda_graph: on CUDA, replay each full-batch step as a CUDA graph (``_GraphedStep``);
            False runs every step eagerly. Ignored on other devices.
        untimed_steps: extra steps at the start of every epoch, on its first batches, before its
            clock starts: no record counts their losses, steps or seconds (only ``elapsed_seconds``,
            the wall time since training began, includes them). The speed benchmark's re-warm-up
            after another row's turn: caches and the allocator cold, and in a new ``train`` call a
            new optimizer whose first step makes its state.

    Raises:
        DivergedError: a training loss became NaN or infinite.
        ConfigError: the batch can't be split among the members.
        ValueError: ``untimed_steps`` is negative.
    """
    if untimed_steps < 0:
        raise ValueError(f"untimed_steps must be 0 or more, got {untimed_steps}")
    device = dataset.x_train.device
    if device.type == "cpu":
        tune_cpu_allocator()
    n_members = getattr(model, "ensemble_size", 1)
    if batching == "split" and not isinstance(model, BatchEnsembleMLP):
        batching = "repeat"  # split batching is a BatchEnsemble option
    batching = effective_batching(batching, n_members)
    plan = batch_plan(dataset.n_train, cfg.batch_size, n_members, batching)
    if device.type == "cpu":
        native.warm_up()  # the C++ training steps: built (once per machine) or loaded here, not in the first step
    if compiles_kernels(isinstance(model, BatchEnsembleMLP), device, batching, n_members):
        model.warm_up_kernels()  # its first layer's compiled backward: compiled here, not in the first epoch
    members = list(model.members) if isinstance(model, SequentialEnsemble) else [model]
    graphed = cuda_graph and device.type == "cuda" and bool(plan)
    reduction = loss_reduction(model)
    steppers: list[_Step] = []
    for member in members:
        opt = make_optimizer(member.parameters(), cfg.lr, device, capturable=graphed)
        args = (member, opt, dataset, batching == "split", reduction)
        step_fn = _GraphedStep(*args, batch_len=plan[0][1] - plan[0][0]) if graphed else _Step(*args)
        steppers.append(step_fn)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    check_each_step = device.type == "cpu"  # reading a CPU scalar costs nothing; on CUDA it would sync
    model.train()
    synchronize(device)
    t_start = time.perf_counter()

    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(dataset.n_train, generator=order_gen).to(device, non_blocking=True)
        loss_sum = torch.zeros(n_members, device=device)
        window_sum = torch.zeros(n_members, device=device)
        window_examples = 0
        window_seen = 0  # examples each member saw since the last record (one pass: the same for every member)
        member_steps = [0] * n_members
        member_seen = [0] * n_members  # examples each member trained on this epoch: its losses' weights
        examples_done = 0
        if untimed_steps:
            for start, end in plan[:untimed_steps]:
                if stop is not None and stop.is_set():
                    break
                steppers[0](perm[start:end])  # the first member's pass: where an epoch starts
            synchronize(device)  # their work done before the clock starts
        t_epoch = t_window = time.perf_counter()
        stopped = False
        for mi, step_fn in enumerate(steppers):
            # Sequential classic: member mi makes its own pass; otherwise one pass for all.
            rows = slice(mi, mi + 1) if len(members) > 1 else slice(None)
            for step, (start, end) in enumerate(plan, start=1):
                if stop is not None and stop.is_set():
                    stopped = True
                    break
                detached = step_fn(perm[start:end])  # (E,): each member's mean loss over its examples
                if check_each_step and not math.isfinite(float(detached.sum())):
                    raise _diverged(method, epoch)
                # Weighted by the examples behind each mean, so that a short last batch counts as what it is.
                seen = (end - start) // n_members if batching == "split" else end - start
                loss_sum[rows].add_(detached, alpha=seen)
                window_sum[rows].add_(detached, alpha=seen)
                if len(members) > 1:
                    member_steps[mi] += 1
                    member_seen[mi] += seen
                else:
                    member_steps = [s + 1 for s in member_steps]
                    member_seen = [s + seen for s in member_seen]
                    window_seen += seen
                window_examples += end - start
                examples_done += end - start
                if cfg.log_every and len(members) == 1 and step % cfg.log_every == 0:
                    synchronize(device)
                    now = time.perf_counter()
                    member_loss = (window_sum / window_seen).tolist()
                    _check_finite(member_loss, method, epoch)
                    yield StepRecord(
                        method=method,
                        epoch=epoch,
                        step=step,
                        steps_per_epoch=len(plan),
                        member_loss=member_loss,
                        loss=sum(member_loss) / len(member_loss),
                        examples_per_second=window_examples / max(now - t_window, 1e-9),
                        elapsed_seconds=now - t_start,
                    )
                    window_sum.zero_()
                    window_examples, window_seen, t_window = 0, 0, now
            if stopped:
                break
        synchronize(device)
        now = time.perf_counter()
        seconds = now - t_epoch
        seen_t = torch.tensor(member_seen, dtype=loss_sum.dtype)
        # Each member's mean loss per example it trained on; NaN marks a member that made no step
        # this epoch (a stop before its turn).
        member_loss = (loss_sum.cpu() / seen_t).tolist()
        reached = [v for v, n in zip(member_loss, member_steps, strict=True) if n]
        _check_finite(reached, method, epoch)
        finite = [v for v in member_loss if math.isfinite(v)]
        yield EpochRecord(
            method=method,
            epoch=epoch,
            epochs=cfg.epochs,
            member_loss=member_loss,
            loss=sum(finite) / len(finite) if finite else float("nan"),
            epoch_seconds=seconds,
            examples_per_second=examples_done / len(members) / max(seconds, 1e-9),
            elapsed_seconds=now - t_start,
            steps=max(member_steps),
            stopped=stopped,
        )
        if stopped:
            return


def per_member_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each member.

    Args:
        logits: ``[E, B, C]``.
        labels: ``[B]`` (shared by all members) or ``[E, B]`` (one batch per member).

    Returns:
        ``[E]``.
    """
    n_members, batch, n_classes = logits.shape
    if labels.dim() == 1:
        labels = labels.expand(n_members, batch)
    losses = F.cross_entropy(logits.reshape(-1, n_classes), labels.reshape(-1), reduction="none")  # (E*B,)
    return losses.view(n_members, batch).mean(dim=1)  # (E,)


def _check_finite(values: list[float], method: str, epoch: int) -> None:
    if not all(math.isfinite(v) for v in values):
        raise _diverged(method, epoch)


def _diverged(method: str, epoch: int) -> DivergedError:
    return DivergedError(
        f"{method} diverged in epoch {epoch}: the training loss became NaN or infinite; try a lower learning rate"
    )
