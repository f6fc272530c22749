"""CPU kernels compiled with ``torch.compile`` once per model size in a process, and the switch that turns them off.

One kernel today: BatchEnsemble's first-layer gradient reductions (``fold_grads``), from the folded
weights' gradient ``G [in, E, out]`` to ``dW = Σ_k G_k ∘ r_k 1ᵀ`` ``[in, out]`` and
``dr_k = Σ_o G_k ∘ W`` ``[E, in]``. Eager PyTorch makes each one a product that writes an
``[in, E, out]`` temporary and a sum that reads it back; inductor fuses each into one loop over
``G``, and on this project's machine (2 cores, AMD EPYC) both together took 0.14-0.19 ms against
0.68-0.91 ms for the eager ones in blocks of cached rows (in 3072, E 5, out 128; ad-hoc timing).

The kernel is compiled with dynamic shapes, but dynamo keeps the sizes of parameters (W, r)
static, so once per model size in a process (a training worker or a benchmark row trains one;
3.4-4.1 s with inductor's on-disk cache warm, about half of it importing dynamo and inductor,
more cold, on that machine (``runner`` says so while a run waits for it); importing inductor adds
about 200 MiB of resident memory), at the first ``warm_up`` or the first use. Where it cannot be
compiled (no C++ compiler, a Python that ``torch.compile`` does not support) it warns once and the
eager code runs instead; the environment variable ``BENCH_COMPILE=0`` turns it off. Only CPU
tensors use it: on CUDA the eager reductions are two kernels each and a step is bound by launches,
and CUDA graphs replay them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from bench_core.errors import switched_off, warn_off

ENV_SWITCH = "BENCH_COMPILE"  # "0": never compile, run the eager code

_state: dict = {"kernel": None, "failed": None, "warmed": set()}  # warmed: (in, E, out, dtype) run once


def enabled() -> bool:
    """Whether compiled kernels may be used: not switched off, and none failed in this process."""
    return not switched_off(ENV_SWITCH) and _state["failed"] is None


def fold_grads_eager_fused(
    grad_folded: torch.Tensor, weight: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dW [in, out], dr [E, in])`` from ``G [in, E, out]``, as plain tensor operations (what is compiled)."""
    grad_weight = (grad_folded * r.t().unsqueeze(2)).sum(1)  # (in, out)
    grad_r = (grad_folded * weight.unsqueeze(1)).sum(2)  # (in, E)
    return grad_weight, grad_r.t().contiguous()  # (E, in)


def fold_grads() -> Callable | None:
    """The compiled ``fold_grads_eager_fused``, or None where compiled kernels are off or failed."""
    if not enabled():
        return None
    try:
        _configure_this_thread()
        if _state["kernel"] is None:
            # A CUDA build without a GPU logs "No CUDA runtime is found" when inductor loads its C++ tools.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            _state["kernel"] = torch.compile(fold_grads_eager_fused, dynamic=True, fullgraph=True)
    except Exception as err:  # any failure to set up means: run the eager code
        disable(err)
        return None
    return _state["kernel"]


_thread = threading.local()  # .configured: this thread's compiler settings are made


def _configure_this_thread() -> None:
    """The compiler settings the kernel needs, made in the calling thread.

    torch keeps a setting made in code (``torch._dynamo.config.x = ...``) per thread (a context
    variable), so settings made in one thread do not hold in another: the benchmark's
    ``--in-process`` rows train in threads of their own.
    """
    if getattr(_thread, "configured", False):
        return
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # one small kernel: no pool of compile processes
    # Sizes are dynamic, but the parameters' sizes, a dtype, a size of 1 or a layout make a new
    # variant; a process that trains many models (the tests) may need more than dynamo's default 8.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    _thread.configured = True


def disable(err: BaseException) -> None:
    """Stop using compiled kernels in this process, with one warning that says why."""
    if _state["failed"] is None:
        warn_off("compiled CPU kernels", err, f"running the eager ones (set {ENV_SWITCH}=0 to skip compiling)")
    _state["failed"] = err
    _state["kernel"] = None


def run_fold_grads(
    grad_folded: torch.Tensor, weight: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The compiled kernel's ``(dW, dr)``, or None where it is off or fails (the caller runs its eager code)."""
    kernel = fold_grads()
    if kernel is None:
        return None
    try:
        return kernel(grad_folded, weight, r)
    except Exception as err:  # a compile error surfaces at the first call
        disable(err)
        return None


def is_warm(in_features: int, ensemble_size: int, out_features: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``warm_up`` for these sizes has nothing left to do (or nothing it may do: compiled code off)."""
    return not enabled() or (in_features, ensemble_size, out_features, dtype) in _state["warmed"]


def warm_up(in_features: int, ensemble_size: int, out_features: int, dtype: torch.dtype = torch.float32) -> bool:
    """Compile (or load) the kernel for these sizes now, before anything is timed; True when it is in use.

    It is called as the backward calls it, so that the compiled code's guards match and that call
    compiles nothing more: without gradient recording, W and r as ``nn.Parameter``s. Sizes already
    run in this process are not run again (every ``train`` call on a CPU model asks).
    """
    key = (in_features, ensemble_size, out_features, dtype)
    if key in _state["warmed"] and enabled() and _state["kernel"] is not None:
        return True
    g = torch.zeros(in_features, ensemble_size, out_features, dtype=dtype)
    w = torch.nn.Parameter(torch.zeros(in_features, out_features, dtype=dtype))
    r = torch.nn.Parameter(torch.zeros(ensemble_size, in_features, dtype=dtype))
    with torch.no_grad():
        in_use = run_fold_grads(g, w, r) is not None
    if in_use:
        _state["warmed"].add(key)
    return in_use
