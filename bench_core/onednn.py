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

**Not on Intel CPUs, unless asked for.** On an Intel Xeon (2 cores, family 6 model 207, the
twenty-sixth and twenty-seventh sessions' machine) oneDNN ran the 2048³ product no faster than
MKL (277 against 282 GFLOP/s), and in training steps it lost: steps with MKL's products took
0.95–1.01× as long for the classic ensemble (MKL in the plain layout ``z = x W``; in the transposed
one, 1.107×), 0.99–1.01× for BatchEnsemble (repeat) and 0.93–0.94× for split batching (in-process
A/Bs of 12–20 pairs of 30-step blocks; docs/speed-log.md, twenty-seventh session). MKL is Intel's
own library and tuned for its CPUs; on the AMD EPYC above, oneDNN won. So where ``BENCH_ONEDNN`` is unset the
products go through oneDNN except on CPUs whose vendor is ``GenuineIntel`` (``cpu_vendor``), and
there MKL takes the members' product in the plain layout (``mkl_plain_layout``); ``BENCH_ONEDNN=1``
puts them through oneDNN on any CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bench_core.devices import CPUINFO, cpuinfo_field
from bench_core.errors import switched_off, warn_off

ENV_SWITCH = "BENCH_ONEDNN"  # "0": every product through torch.mm; "1": through oneDNN on Intel CPUs too
INTEL = "GenuineIntel"  # the vendor whose CPUs take MKL's products unless BENCH_ONEDNN=1

_state: dict = {"checked": False, "failed": None}  # failed: why oneDNN is off in this process (None: it is not)
_vendor: dict = {}  # "id": this CPU's vendor, read once (cpu_vendor)


def usable(x: torch.Tensor) -> bool:
    """Whether a product with ``x`` goes through oneDNN: a CPU float32 tensor, oneDNN wanted and working."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if not wanted():
        return False
    return available()


def wanted() -> bool:
    """Whether oneDNN's products are wanted here: ``BENCH_ONEDNN`` 0 no, 1 yes; unset, yes but on Intel CPUs.

    Any other value counts as unset. Where /proc/cpuinfo cannot be read (macOS, Windows) the vendor
    is unknown and oneDNN stays wanted.
    """
    if switched_off(ENV_SWITCH):
        return False
    return os.environ.get(ENV_SWITCH, "").strip() == "1" or cpu_vendor() != INTEL


def mkl_plain_layout() -> bool:
    """Whether ``torch.mm`` takes the members' product in the plain layout ``z = x W`` (Intel CPUs).

    Elsewhere in ``zᵀ = Wᵀ xᵀ``, MKL's faster layout on the AMD EPYC; on the Intel Xeon classic steps
    took 0.949× as long as with oneDNN in the plain one and 1.107× in the transposed one (A/Bs against
    oneDNN; see the module's docstring).
    """
    return cpu_vendor() == INTEL


def cpu_vendor(cpuinfo: Path | None = None) -> str | None:
    """The CPU's vendor as /proc/cpuinfo names it (``GenuineIntel``, ``AuthenticAMD``); None where unknown.

    Read once per process, unless ``cpuinfo`` names another file (tests).
    """
    if cpuinfo is None and "id" in _vendor:
        return _vendor["id"]
    vendor = cpuinfo_field("vendor_id", cpuinfo or CPUINFO) or None
    if cpuinfo is None:
        _vendor["id"] = vendor
    return vendor


def describe() -> str:
    """Which library takes the first layers' float32 products on this CPU, in words."""
    if switched_off(ENV_SWITCH):
        return f"torch.mm ({ENV_SWITCH}=0)"
    if not wanted():
        return f"torch.mm (MKL): on Intel CPUs it ran them faster than oneDNN (set {ENV_SWITCH}=1 for oneDNN)"
    if not available():
        err = _state["failed"]
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        return f"torch.mm: no working oneDNN op ({reason})"
    return "oneDNN (torch.ops.mkldnn._linear_pointwise)"


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
        return mm(x, weight, bias)


def mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``matmul``'s product through ``torch.mm`` (MKL on x86 CPUs)."""
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
