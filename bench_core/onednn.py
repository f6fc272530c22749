"""Float32 matrix products through oneDNN on the CPU, and the switch that turns them off.

``torch.mm`` runs a CPU float32 product through MKL. On this project's machine (2 cores, AMD
EPYC) MKL ran 2048³ at 155-186 GFLOP/s and oneDNN (the library PyTorch's CPU build carries for
its ``mkldnn`` ops) at 205-220, and the first layer's forward, ``[128, 3072] @ [3072, 640]``
(batch 128, 5 members of 128 units), at 196-205 against 178 GFLOP/s in MKL's best layout
(ad-hoc micro-benchmark). Training steps of the classic ensemble and of BatchEnsemble (repeat)
took about 0.9× as long with their first layer's forward through oneDNN (4 pairs of fresh
processes each, the order alternated).

The op is ``torch.ops.mkldnn._linear_pointwise``, the CPU linear that inductor emits: private,
so it is checked once per process against ``torch.mm`` on a small product before it is used. A
torch without it (a build without oneDNN, another architecture) uses ``torch.mm`` quietly; one
whose op fails that check or fails at a call warns once and uses ``torch.mm`` from then on. The
environment variable ``BENCH_ONEDNN=0`` turns it off. Only CPU float32 tensors use it.
"""

from __future__ import annotations

import torch

from bench_core.errors import switched_off, warn_off

ENV_SWITCH = "BENCH_ONEDNN"  # "0": every product through torch.mm

_state: dict = {"checked": False, "failed": None}  # failed: why oneDNN is off in this process (None: it is not)


def usable(x: torch.Tensor) -> bool:
    """Whether a product with ``x`` goes through oneDNN: a CPU float32 tensor, oneDNN on and working."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if switched_off(ENV_SWITCH):
        return False
    return available()


def available() -> bool:
    """Whether this process has a working oneDNN product (checked once), whatever ``BENCH_ONEDNN`` says."""
    if not _state["checked"]:
        _self_check()
    return _state["failed"] is None


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight (+ bias)`` for ``x [M, K]``, ``weight [K, N]`` (either may be a transposed view), ``bias [N]``.

    Through oneDNN (call ``usable`` first); should the op fail, it warns once, turns oneDNN off for
    the process and returns ``torch.mm``'s product.
    """
    try:
        return _linear_op()(x, weight.t(), bias, "none", [], "")
    except (AttributeError, RuntimeError) as err:
        disable(err)
        return x @ weight if bias is None else torch.addmm(bias, x, weight)


def disable(err: BaseException) -> None:
    """Stop using oneDNN's products in this process, with one warning that says why."""
    if _state["failed"] is None:
        warn_off("oneDNN matrix products", err, f"using torch.mm (set {ENV_SWITCH}=0 to skip oneDNN)")
    _state["failed"] = err


def _linear_op():
    return torch.ops.mkldnn._linear_pointwise


def _self_check() -> None:
    """Compare the op with ``torch.mm`` on a small product once; a missing op is off without a warning."""
    _state["checked"] = True
    if not torch.backends.mkldnn.is_available():
        _state["failed"] = RuntimeError("this torch was built without oneDNN")
        return
    try:
        op = _linear_op()
    except AttributeError as err:  # an older or newer torch without this op
        _state["failed"] = err
        return
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(7, 5, generator=gen), torch.randn(5, 3, generator=gen), torch.randn(3, generator=gen)
    try:
        out = op(x, weight.t(), bias, "none", [], "")
        wrong = out.shape != (7, 3) or not torch.allclose(out, torch.addmm(bias, x, weight), rtol=1e-4, atol=1e-5)
    except RuntimeError as err:
        disable(err)
        return
    if wrong:
        disable(RuntimeError("its product differs from torch.mm's"))


def reset() -> None:
    """Forget the check and any failure (tests)."""
    _state.update(checked=False, failed=None)
