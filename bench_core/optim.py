"""Adam's step for training: ``torch.optim.Adam(fused=True)``'s, without its Python on the CPU.

``Adam.step`` with ``fused=True`` spends about 0.25 ms of Python per call around its one kernel
(hooks, checks, grouping the tensors by device and dtype, building lists): about 3 % of a classic
ensemble's CPU training step at E = 5 (ad-hoc A/B on this project's machine, steps interleaved in
one process). ``AdamStep(opt)()`` makes the same step: where it applies it calls the two ops
Adam's fused path calls, ``torch._foreach_add_`` on the step counts and ``torch._fused_adam_``,
with lists read from the optimizer's own state at each call (so a loaded ``state_dict`` or a new
``lr`` is honoured); the result is Adam's bit for bit (tested). Where the C++ training steps are
loaded (``bench_core.native``) one C++ operator makes both calls' work, ``bench_core::adam_step``:
on the CPU ``_foreach_add_`` adds to each one-element count on its own, the 1 made a tensor and
copied each time (about 0.05 ms of a 2 ms split step on an Intel Xeon); the operator adds to the
counts in place and calls the same ``_fused_adam_`` (split steps 0.975× as long, in-process A/B).
The optimizer stays a plain ``torch.optim.Adam``, and ``opt.step()`` runs instead wherever the
direct call does not apply: not fused, AdamW, CUDA (a CUDA graph replays the step there, so its
Python costs nothing), step hooks, amsgrad, maximize, capturable, several parameter groups, a
parameter without a gradient or state yet (the first step), parameters of mixed dtypes.
``_fused_adam_`` is private: should it fail, the step counts are put back, one warning says so and
``opt.step()`` runs from then on in the process. ``BENCH_FAST_ADAM=0`` turns the direct call off.

One parameter can have its step made elsewhere: ``kernel_state(p)`` hands over its state and
settings (``KernelAdam``) where the direct call applies, a kernel steps it as ``_fused_adam_`` would
(``bench_core.manual``: the classic ensemble's first-layer weight, stepped as its gradient is
computed), leaving its gradient None, and ``AdamStep(opt)(stepped=p)`` then steps the others. Should
the kernel not run, ``p`` has its gradient and is stepped with the rest. The profiler's breakdown of a step
(``bench_core.bench.breakdown``) counts the ops as Adam's by their names: a ``record_function``
around them, as ``opt.step()`` has, took about a quarter of what the direct call saves.

Before either, ``laid_out_as_params`` copies any CPU gradient whose strides are not its
parameter's: fused Adam's CPU kernel (``opt.step()``'s too) would read it in the wrong order.

``clear_grads(opt)`` is ``opt.zero_grad(set_to_none=True)`` without its ``record_function``:
inside training steps on that machine entering and leaving that profiler range took 0.09-0.12 ms
per call (6 µs in a fresh process), ``zero_grad`` 0.10-0.14 ms against 0.015-0.02 ms for setting
the gradients to None directly (ad-hoc timing, calls interleaved between split-batching steps).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bench_core import native
from bench_core.errors import switched_off, warn_off

try:  # where torch keeps the hooks registered for every optimizer (private; see _hooks)
    from torch.optim import optimizer as _torch_optimizer
except ImportError:  # a torch laid out otherwise: opt.step() always (see _hooks)
    _torch_optimizer = None

ENV_SWITCH = "BENCH_FAST_ADAM"  # "0": every step through torch.optim.Adam.step

_state: dict = {"failed": None}  # why the direct call is off in this process (None: it is not)


class KernelAdam(NamedTuple):
    """One parameter's Adam state and settings, for a kernel that makes its step (``AdamStep.kernel_state``).

    The kernel counts the step (``step`` += 1) and steps the parameter, ``exp_avg`` and
    ``exp_avg_sq`` in place as ``torch._fused_adam_`` does, with these settings.
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


class AdamStep:
    """``step()`` of a ``torch.optim.Adam``: the direct fused call where it applies, else ``opt.step()``."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt

    def __call__(self, stepped: torch.Tensor | None = None) -> None:
        """Adam's step; ``stepped``: a parameter a kernel stepped (``kernel_state``), left out if it has no gradient."""
        laid_out_as_params(self.opt)
        lists = self._direct_lists(stepped)
        if lists is None or not _fused_step(self.opt.param_groups[0], *lists):
            self.opt.step()  # skips a parameter whose gradient is None, as ``stepped`` is

    def kernel_state(self, p: torch.Tensor) -> KernelAdam | None:
        """``p``'s state for a kernel to make its step, where the direct call applies to this optimizer; else None.

        Asked before the gradients exist: what it checks is what ``__call__``'s direct call needs but
        the gradients, and that ``p`` and its moments are contiguous float32 CPU tensors of one shape.
        """
        group = self._direct_group()
        if group is None or not any(q is p for q in group["params"]):
            return None
        if group["params"][0].dtype != torch.float32:
            return None
        state = self.opt.state.get(p)
        if not state or "exp_avg" not in state:
            return None
        exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        if not all(t.is_contiguous() and t.shape == p.shape and t.dtype == p.dtype for t in (p, exp_avg, exp_avg_sq)):
            return None
        if step.device.type != "cpu" or step.numel() != 1 or isinstance(group["lr"], torch.Tensor):
            return None
        beta1, beta2 = group["betas"]
        return KernelAdam(exp_avg, exp_avg_sq, step, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])

    def direct_state(self, params: list[torch.Tensor]) -> tuple[dict, list, list, list] | None:
        """``(group, exp_avgs, exp_avg_sqs, steps)`` of ``params``, in their order, for a step made elsewhere.

        Where the direct call applies to this optimizer (gradients aside), ``params`` are exactly its
        parameters and each has its state (after Adam's first step): what a whole training step made
        in one C++ call (``bench_core.manual.one_call_step``) needs to step them as ``__call__``
        would. Else None. The group is returned so that its ``lr`` is read at each step.
        """
        group = self._direct_group()
        if group is None or isinstance(group["lr"], torch.Tensor):
            return None
        in_group = group["params"]
        if len(params) != len(in_group) or {id(p) for p in params} != {id(p) for p in in_group}:
            return None
        states = [self.opt.state.get(p) for p in params]
        if any(not s or "exp_avg" not in s for s in states):
            return None
        return group, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states]

    def _direct_group(self) -> dict | None:
        """The optimizer's one parameter group where the direct call applies to it, gradients aside; else None."""
        opt = self.opt
        if not isinstance(opt, torch.optim.Adam) or _state["failed"] is not None:
            return None
        if switched_off(ENV_SWITCH):
            return None
        if _hooks(opt) or len(opt.param_groups) != 1:
            return None
        group = opt.param_groups[0]
        if not group.get("fused") or any(group[k] for k in ("amsgrad", "maximize", "capturable", "differentiable")):
            return None
        if group.get("decoupled_weight_decay"):  # AdamW (a subclass of Adam): its kernel is _fused_adamw_
            return None
        params = group["params"]
        if not params or any(p.device.type != "cpu" or p.dtype != params[0].dtype for p in params):
            return None
        return group

    def _direct_lists(self, stepped: torch.Tensor | None = None) -> tuple[list, list, list, list, list] | None:
        """(params, grads, exp_avgs, exp_avg_sqs, steps) when the direct call applies; else None."""
        group = self._direct_group()
        if group is None:
            return None
        params = [p for p in group["params"] if not (p is stepped and p.grad is None)]
        if not params or any(p.grad is None for p in params):
            return None
        opt = self.opt
        states = [opt.state.get(p) for p in params]
        if any(not s or "exp_avg" not in s for s in states):
            return None  # no state yet: Adam's own first step makes it
        return (
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
        )


def laid_out_as_params(opt: torch.optim.Optimizer) -> None:
    """Give every CPU gradient its parameter's strides (a copy) where it has others.

    Fused Adam's CPU kernel walks a gradient's memory in the parameter's order whatever its
    strides: in torch 2.14 a transposed gradient of a ``[4, 3]`` parameter, equal to the
    contiguous one element for element, moved the parameter differently, with no error, through
    ``torch.optim.Adam(fused=True).step()`` as through the direct call (tests). Autograd hands
    gradients laid out as their parameters; this guards any other code that sets ``.grad``. CUDA's
    gradients are left where they are: a CUDA graph's steps read them in place.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None or (g.is_contiguous() and p.is_contiguous()) or g.device.type != "cpu":
                continue
            if g.stride() != p.stride():
                p.grad = torch.empty_like(p).copy_(g)


def clear_grads(opt: torch.optim.Optimizer) -> None:
    """``opt.zero_grad(set_to_none=True)``: every parameter's gradient set to None, with no profiler range.

    ``Optimizer.zero_grad`` runs no hooks; what it adds is a ``record_function`` (see the module's
    docstring for its cost here) and, with ``set_to_none=False``, zeroing in place, which this does
    not do (call ``opt.zero_grad(set_to_none=False)`` for that).
    """
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = None


def _hooks(opt: torch.optim.Optimizer) -> bool:
    """Whether a step hook is registered, on ``opt`` or for every optimizer.

    True too where torch keeps them elsewhere than these private dicts: ``opt.step()``, which runs
    them, is then the only safe call.
    """
    places = [
        getattr(opt, "_optimizer_step_pre_hooks", None),
        getattr(opt, "_optimizer_step_post_hooks", None),
        getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None),
        getattr(_torch_optimizer, "_global_optimizer_post_hooks", None),
    ]
    return any(hooks is None or len(hooks) > 0 for hooks in places)


def _fused_step(group: dict, params, grads, exp_avgs, exp_avg_sqs, steps) -> bool:
    """Adam's fused CPU step on these lists; False (steps unchanged, one warning) if the op failed.

    Where the C++ operators are loaded (``bench_core.native``) one call makes it,
    ``bench_core::adam_step``: the counts added to in place, then the same ``_fused_adam_``.
    """
    beta1, beta2 = group["betas"]
    ops = native.loaded()
    if ops is not None:
        try:  # the counts are put back should it fail
            ops.adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, group["lr"], beta1, beta2,
                          group["weight_decay"], group["eps"])  # fmt: skip
        except (AttributeError, RuntimeError, TypeError) as err:
            _fail(err)
            return False
        return True
    torch._foreach_add_(steps, 1)
    try:
        torch._fused_adam_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )
    except (AttributeError, RuntimeError, TypeError) as err:
        torch._foreach_sub_(steps, 1)  # opt.step() counts this step
        _fail(err)
        return False
    return True


def _fail(err: BaseException) -> None:
    """The direct call off in this process, with one warning (``opt.step()`` from here on)."""
    _state["failed"] = err
    warn_off("Adam's direct steps", err, f"using torch.optim.Adam.step (set {ENV_SWITCH}=0 to skip it)")


def reset() -> None:
    """Forget a failure of the direct call (tests)."""
    _state["failed"] = None
