"""Where a training step goes: ``torch.profiler`` over a few of a row's steps, its time in five parts.

The parts, by what each operator is and what it runs under (``classify``):

- matrix products: ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``addbmm``, oneDNN's linear (``bench_core.onednn``),
  the C++ kernels that compute a first layer's weight gradient as one product (BatchEnsemble's with
  its sums, ``bench_core::first_layer_grads``; the classic ensemble's with Adam's step on that weight
  made as each block of its rows is done, ``bench_core::first_layer_adam``: that weight's Adam step
  is counted here, not under Adam), and what they call;
- element-wise and other operators: every other ATen operator of the forward, the backward and the
  loss (activations, the fast weights' scaling and folding, sums, views, copies), and the kernels
  compiled with ``torch.compile`` (``bench_core.kernels``) with their dispatch: the profiler records
  those as regions, not operators; and the C++ training steps' own time between the operators they
  call (``bench_core.native``: ``bench_core::`` operators);
- Adam: everything under the optimizer's ``step`` and ``zero_grad``, its Python included, and the
  ops of its direct CPU step (``bench_core.optim``: the step counts' ``_foreach_add_``, which
  nothing else in training calls, and ``_fused_adam_``, or ``bench_core::adam_step``, which makes
  both where the C++ operators are loaded); CPU training drops the gradients with
  ``bench_core.optim.clear_grads`` (no operator: Python), not ``zero_grad``;
- batch draw: the batch gathered by index (``index_select``) and the epoch's order (``randperm``);
- Python and autograd: the rest, the time inside no operator: the training loop's and the model's
  Python and the autograd engine's own bookkeeping.

Times are self times on the CPU (an operator's time less its children's), so the five parts add up
to the profiled window. Only CPU rows are profiled: on a GPU a step's time is its kernels and their
launches (with CUDA graphs one launch per step), which the CPU-side operator times do not show.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

STEP_PARTS = (
    "matrix products",
    "element-wise and other operators",
    "Adam",
    "batch draw",
    "Python and autograd",
)
GEMM_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::addbmm",
        "mkldnn::_linear_pointwise",
        "bench_core::first_layer_grads",
        "bench_core::first_layer_adam",
    }
)
DRAW_OPS = frozenset({"aten::index_select", "aten::randperm"})
# bench_core.optim's direct step: its two ops, or the C++ operator that makes both (bench_core.native)
ADAM_OPS = frozenset({"aten::_fused_adam_", "aten::_foreach_add_", "bench_core::adam_step"})
OPTIMIZER_PREFIX = "Optimizer."  # torch.optim's record_function names: "Optimizer.step#Adam.step", ...
# A compiled function's call: dynamo's guard check, then its region (the generated kernels inside).
NATIVE_PREFIX = "bench_core::"  # a C++ training step (bench_core.native): the operators it calls are recorded inside
COMPILED_PREFIXES = ("TorchDynamo Cache Lookup", "Torch-Compiled Region", "## Call CompiledFxGraph")


class ProfiledEvent(Protocol):
    """What ``classify`` reads of a ``torch.autograd.profiler_util.FunctionEvent``."""

    name: str
    self_cpu_time_total: float  # microseconds
    cpu_parent: ProfiledEvent | None


def classify(event: ProfiledEvent) -> str:
    """The part of ``STEP_PARTS`` an event's self time belongs to, by its name and its ancestors'.

    The optimizer outranks the rest (Adam's own copies and sums are Adam's); then an event inside a
    matrix product or a batch draw belongs to it (the output it allocates, a conjugation check).
    """
    names = []
    node: ProfiledEvent | None = event
    while node is not None:
        names.append(node.name)
        node = node.cpu_parent
    if any(n.startswith(OPTIMIZER_PREFIX) or n in ADAM_OPS for n in names):
        return "Adam"
    if any(n in GEMM_OPS for n in names):
        return "matrix products"
    if any(n in DRAW_OPS for n in names):
        return "batch draw"
    if event.name.startswith(("aten::", NATIVE_PREFIX)) or any(n.startswith(COMPILED_PREFIXES) for n in names):
        return "element-wise and other operators"
    return "Python and autograd"


def part_seconds(events: Iterable[ProfiledEvent]) -> dict[str, float]:
    """Seconds of each part of ``STEP_PARTS`` in a profiled window (the self times, summed)."""
    parts = dict.fromkeys(STEP_PARTS, 0.0)
    for event in events:
        parts[classify(event)] += event.self_cpu_time_total / 1e6
    return parts


def shares(parts: dict[str, float]) -> dict[str, float]:
    """Each part as a fraction of their sum (they add up to 1); ValueError when nothing was timed."""
    total = sum(parts.values())
    if total <= 0:
        raise ValueError("the profiled window holds no time")
    return {name: seconds / total for name, seconds in parts.items()}
