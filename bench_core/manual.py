"""Training's forward, loss and backward written out, without autograd, for the workbench's own models on a CPU.

A CPU training step of these MLPs is a few large products and a few dozen small operators; through
autograd each operator also records a graph node, saves its inputs and is replayed by the engine
with its own bookkeeping. ``forward_backward`` computes the same gradients directly: the
operators autograd would run for these layers (the same products in the same layouts, oneDNN's
and the compiled BatchEnsemble kernel included), nothing recorded. Losses and gradients equal autograd's bit
for bit (tests for every model, batching and path; the loss's gradient goes through the same
``_log_softmax_backward_data``), so training is unchanged to the last bit. On this project's
machine (2 cores, AMD EPYC), with the two ways interleaved step by step in one process, a step
took about 0.96× as long for the classic ensemble (vectorized) and BatchEnsemble (repeat) and
0.92× for BatchEnsemble with split batching (ad-hoc A/B; docs/speed-log.md gives the figures).

Covered: ``VectorizedEnsemble`` on a shared batch ``[B, D]``, ``BatchEnsembleMLP`` with either
batching, and MLPs of plain ``nn.Linear`` layers as ``models.build_mlp`` makes them (``SingleMLP``,
each member of the sequential classic ensemble), on a CPU, every parameter trainable, no hooks on
the model or its parameters. Anything else (another module, CUDA, where a graph replays the step
and its Python costs nothing, a hook, ``BENCH_MANUAL_BACKWARD=0``) goes through autograd as
before: ``applies`` says which.

Where the C++ operators of ``bench_core.native`` are built (once per machine; ``BENCH_NATIVE=0``
turns them off), each of these steps runs as one C++ call making the same operator calls, bit for
bit the same, but for the first layer, on CPUs with AVX-512 (elsewhere, where these kernels
would be slower, and with ``BENCH_FIRST_LAYER_KERNEL=0``, autograd's products and Adam's own step):

- BatchEnsemble's first-layer W and r gradients, either batching, come from one written-out kernel
  (``bench_core::first_layer_grads``: each member's ``x_mᵀ dz_m`` in tiles reduced at once into
  both, in place of two products (split) or of the product into ``[in, E, out]`` and its reductions
  (repeat, whose first layer's forward stays in Python); the same sums in another order, within
  float32's rounding of autograd's);
- the classic ensemble's first-layer weight gets Adam's step inside its gradient's kernel
  (``bench_core::first_layer_adam``), each block of rows stepped as soon as its gradient is done,
  so the gradient (7.5 MiB at CIFAR-10's E = 5) is never written out and read back:
  ``forward_backward(..., adam=AdamStep.kernel_state(weight))``, which ``training._Step`` passes
  from Adam's second step on; the weight's ``.grad`` stays None and ``AdamStep(stepped=weight)``
  steps the rest. The step is ``torch._fused_adam_``'s arithmetic on AVX-512, bit for bit on the
  same gradient with torch 2.14 (tested; older torches within float32's rounding).
  (BatchEnsemble's first-layer weight, 1.5 MiB, gained nothing from the same: its steps were 1.01×
  and 1.07× as long, so it keeps Adam's own step.)

And BatchEnsemble's per-member layers (split batching's all, repeat batching's after its first),
float32, take their element-wise work and the loss in loops of their own in the C++ step (any CPU;
``BENCH_FUSED_LOOPS=0`` keeps ATen's operators): x ∘ r, the ReLUs, z ∘ s + bias, the bias's, s's and
r's sums and the cross-entropy with its gradient, one pass each where ATen made a dozen operator
calls per layer. Sums over the batch run row after row and softmax takes the C library's exp and
log, so losses and gradients are within a few float32 roundings of autograd's, not bit for bit.

And where torch runs on two threads, the C++ steps make a first layer's forward product over its
wide input, x [B, in] @ W [in, out] (the classic ensemble's and BatchEnsemble's, where MKL takes it
in that layout), as two single-threaded products over the two halves of ``in``, added
(``BENCH_CHUNKED_PRODUCTS=0``: one threaded product): on two cores of an Intel Xeon that took
0.85–0.88× MKL's own two-thread time, with the same bits as MKL's there and within float32's
rounding of one product in general.

Should a C++ call fail, one warning says so and the Python steps run from then on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench_core import models, native, onednn
from bench_core.errors import describe_error, switched_off, warn_off
from bench_core.models import BatchEnsembleLinear, BatchEnsembleMLP, SingleMLP, VectorizedEnsemble
from bench_core.optim import AdamStep, KernelAdam

ENV_SWITCH = "BENCH_MANUAL_BACKWARD"  # "0": every training step through autograd
# "0": every first layer through autograd's products (and Adam's own step): no written-out first-layer kernel
ENV_FIRST_LAYER_KERNEL = "BENCH_FIRST_LAYER_KERNEL"
# "0": BatchEnsemble's C++ step does its element-wise work and loss through ATen's operators (bit for bit
# the Python step's) rather than in its own fused loops
ENV_FUSED = "BENCH_FUSED_LOOPS"
# "0": every training step through training._Step's Python, not as one C++ call (one_call_step)
ENV_ONE_CALL = "BENCH_ONE_CALL_STEP"
# "0": the C++ steps' wide first-layer products as one threaded product, not in two single-threaded
# halves of their input (read by the C++ operators themselves, at each product)
ENV_CHUNKED = "BENCH_CHUNKED_PRODUCTS"

_one_call: dict = {"failed": None}  # why one_call_step is off in this process (None: it is not)


def applies(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``forward_backward`` covers this model and batch (see the module's docstring)."""
    if x.device.type != "cpu" or switched_off(ENV_SWITCH):
        return False
    if isinstance(model, BatchEnsembleMLP):
        pass  # either batching
    elif isinstance(model, VectorizedEnsemble) or _plain_mlp(model) is not None:
        if x.dim() != 2:  # a batch shared by the members (one MLP: its batch)
            return False
    else:
        return False
    if not torch.is_grad_enabled():
        return False
    return not _hooked(model)


def describe_cpu_steps() -> str:
    """How CPU training steps of the workbench's models run in this process, in words (builds the C++ steps first)."""
    if switched_off(ENV_SWITCH):
        return f"through autograd ({ENV_SWITCH}=0)"
    if native.warm_up():
        cpp = "forward and backward written out without autograd, as C++ operators (bench_core.native)"
        return f"{cpp}; {_first_layer_kernels()}; {_fused_loops()}; {_one_call_steps()}; {_chunked_products()}"
    return f"forward and backward written out without autograd, in Python ({native.why_off()})"


FIRST_LAYER_KERNELS = (
    "first layers through their kernels (BatchEnsemble's W and r gradients in one pass; Adam's step on the"
    " classic ensemble's first-layer weight inside its gradient's kernel)"
)


def _first_layer_kernels() -> str:
    """Whether the C++ steps take first layers through their kernels, in words."""
    why_not = None
    if switched_off(ENV_FIRST_LAYER_KERNEL):
        why_not = f"{ENV_FIRST_LAYER_KERNEL}=0"
    elif not native.ops().first_layer_fast():
        why_not = "no AVX-512 on this CPU for their kernels"
    if why_not:
        return f"first layers through autograd's products and Adam's own step ({why_not})"
    return FIRST_LAYER_KERNELS


FUSED_LOOPS = "BatchEnsemble's element-wise work and loss in loops of their own"


def _fused_loops() -> str:
    """Whether BatchEnsemble's C++ steps do their element-wise work in their own loops, in words."""
    if switched_off(ENV_FUSED):
        return f"BatchEnsemble's element-wise work and loss through ATen's operators ({ENV_FUSED}=0)"
    return FUSED_LOOPS


ONE_CALL_STEPS = "each step with its batch's gathers and Adam's step as one C++ call, where it covers the model"


CHUNKED_PRODUCTS = "wide first-layer products as two single-threaded products over halves of their input"


def _chunked_products() -> str:
    """Whether the C++ steps take wide first-layer products in two single-threaded halves, in words."""
    one = "first-layer products each as one threaded product"
    if switched_off(ENV_CHUNKED):
        return f"{one} ({ENV_CHUNKED}=0)"
    threads = torch.get_num_threads()
    if threads != 2:
        return f"{one} (torch runs on {threads} thread{'' if threads == 1 else 's'}: halves only on two)"
    if onednn.wanted() and onednn.available():
        return "first-layer products through oneDNN, each as one product"
    return CHUNKED_PRODUCTS


def _one_call_steps() -> str:
    """Whether the C++ steps are made as one call each, with their gathers and Adam's step, in words."""
    if switched_off(ENV_ONE_CALL):
        return f"each step's gathers and Adam's step called from Python ({ENV_ONE_CALL}=0)"
    failed = _one_call["failed"]
    if failed is not None:
        return f"each step's gathers and Adam's step called from Python ({describe_error(failed)})"
    return ONE_CALL_STEPS


def _hooked(model: nn.Module) -> bool:
    """A module or parameter hook, a global module hook or a frozen parameter: autograd's business.

    Walks ``_modules`` and ``_parameters`` directly: ``modules()`` and ``parameters()`` took about
    0.08 ms per step here, a quarter of what the hand-written step saves.
    """
    glob = nn.modules.module
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        if getattr(glob, name, None):
            return True
    stack = [model]
    while stack:
        module = stack.pop()
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
            return True
        for p in module._parameters.values():
            if p is not None and (
                not p.requires_grad or p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)
            ):
                return True
        stack.extend(m for m in module._modules.values() if m is not None)
    return False


def first_layer_kernel_on() -> bool:
    """Whether the C++ steps take first layers through their kernels here (built, AVX-512, not switched off)."""
    if switched_off(ENV_SWITCH) or switched_off(ENV_FIRST_LAYER_KERNEL):
        return False
    ops = native.ops()
    return ops is not None and ops.first_layer_fast()


def kernel_adam_weight(model: nn.Module) -> torch.Tensor | None:
    """The parameter whose Adam step ``forward_backward`` can make as it computes its gradient; None if none.

    The classic ensemble's first-layer weight (``VectorizedEnsemble``), float32, where the C++
    steps are built and this CPU has AVX-512 for their kernel (``bench_core::first_layer_adam``),
    unless ``BENCH_FIRST_LAYER_KERNEL=0``.
    """
    if not isinstance(model, VectorizedEnsemble):
        return None
    weight = model.weights[0]
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    return weight if first_layer_kernel_on() else None


def forward_backward(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, reduction: str, adam: KernelAdam | None = None
) -> torch.Tensor:
    """Each member's mean cross-entropy ``[E]`` (detached), with every parameter's ``.grad`` set to its gradient.

    The gradients are those of the members' losses summed (``reduction="sum"``) or averaged
    (``"mean"``), as ``training._Step`` takes them; any gradient already there is replaced, not
    added to. ``x``: ``[B, D]`` shared, or ``[E, b, D]`` one slice per member (BatchEnsemble);
    ``labels``: ``[B]`` or ``[E, b]``. Call ``applies`` first.

    ``adam``: Adam's state for ``kernel_adam_weight(model)`` (``bench_core.optim.AdamStep.kernel_state``).
    Where the C++ step runs, that weight is then stepped in place as its gradient is computed, its
    ``.grad`` left None; elsewhere ``adam`` is ignored and the weight gets its gradient.
    """
    with torch.no_grad():
        ops = native.ops() if x.device.type == "cpu" else None
        if ops is None:
            return _python_step(model, x, labels, reduction)
        try:
            return _native_step(ops, model, x, labels, reduction, adam)
        except RuntimeError as err:
            failed = err
        # The Python step raises what a bad batch raises (the C++ step stays on); where it computes
        # the step, the C++ one failed on its own: off from here on, with a warning.
        member_losses = _python_step(model, x, labels, reduction)
        native.disable(failed)
        return member_losses


def one_call_step(
    model: nn.Module, opt_step: AdamStep, x_all: torch.Tensor, y_all: torch.Tensor, split: bool, reduction: str
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A whole training step as one C++ call, ``step(idx) -> member losses [E]``, where it applies; else None.

    What ``training._Step`` does for the batch ``x_all[idx]``, made from one call
    (``bench_core::batchensemble_split_step``, ``batchensemble_repeat_step``,
    ``vectorized_step``, ``plain_step``): the gathers, the C++ step of ``forward_backward``, each gradient set on
    its parameter and Adam's direct step (``AdamStep``), the same operators in the same order, so
    the same bits. What goes is about 300 Python function calls a step (split steps 0.89× as long
    in an ad-hoc A/B on an Intel Xeon).

    Covered: BatchEnsemble with split batching; with repeat batching where its first layer's
    gradients come from their kernel (``first_layer_kernel_on``, float32); and the classic ensemble
    (vectorized) where its first-layer weight is stepped inside its gradient's kernel
    (``kernel_adam_weight``); one MLP of ``nn.Linear`` layers (a single MLP, a member of the
    sequential classic ensemble). The C++ steps loaded, Adam's direct
    step applying and its state made (after the first step). Asked once per training's step
    (``training._Step``): the model's hooks and the switches (``BENCH_ONE_CALL_STEP=0`` turns this
    off, and each switch of the step's parts) are read then, the learning rate at every step.
    Should a call fail, ``one_call_failed`` turns it off.
    """
    if switched_off(ENV_ONE_CALL) or _one_call["failed"] is not None:
        return None
    if x_all.device.type != "cpu" or x_all.dim() != 2 or not applies(model, x_all[:1]):
        return None
    ops = native.ops()
    if ops is None or not hasattr(ops, "vectorized_step"):
        return None
    mean = reduction == "mean"
    if isinstance(model, BatchEnsembleMLP):
        layers: list[BatchEnsembleLinear] = list(model.layers)
        if x_all.size(1) != layers[0].in_features:
            return None
        if not split and not (first_layer_kernel_on() and x_all.dtype == torch.float32):
            return None  # repeat batching's first layer through its kernel only
        params = [p for layer in layers for p in (layer.weight, layer.r, layer.s, layer.bias)]
        state = opt_step.direct_state(params)
        if state is None:
            return None
        group, exp_avgs, exp_avg_sqs, steps = state
        fused = not switched_off(ENV_FUSED)
        adam_lists = (exp_avgs, exp_avg_sqs, steps)
        if split:
            via_onednn = [models.through_onednn(x_all, layer.in_features) for layer in layers]
            first_kernel = not switched_off(ENV_FIRST_LAYER_KERNEL)
            args = (params, via_onednn, mean, first_kernel, fused)
            return _bound_step(ops.batchensemble_split_step, x_all, y_all, args, adam_lists, group)
        first_layouts = (onednn.usable(x_all), onednn.mkl_plain_layout())  # as models._members_product
        later = [models.through_onednn(x_all, layer.in_features) for layer in layers[1:]]
        args = (params, *first_layouts, later, mean, fused)
        return _bound_step(ops.batchensemble_repeat_step, x_all, y_all, args, adam_lists, group)
    if isinstance(model, VectorizedEnsemble) and not split:
        weights, biases = list(model.weights), list(model.biases)
        first = kernel_adam_weight(model)
        if first is None or x_all.size(1) != first.size(0):
            return None
        adam = opt_step.kernel_state(first)
        state = opt_step.direct_state([first, *weights[1:], *biases])
        if adam is None or state is None:
            return None
        group, exp_avgs, exp_avg_sqs, steps = state
        layouts = (onednn.usable(x_all), onednn.mkl_plain_layout())
        args = (weights, biases, *layouts, mean, adam.exp_avg, adam.exp_avg_sq, adam.step)
        adam_lists = (exp_avgs[1:], exp_avg_sqs[1:], steps[1:])  # the rest: the first weight's is in args
        return _bound_step(ops.vectorized_step, x_all, y_all, args, adam_lists, group)
    linears = _plain_mlp(model)
    if linears is not None and not split:
        weights, biases = [lin.weight for lin in linears], [lin.bias for lin in linears]
        if x_all.size(1) != weights[0].size(1) or any(b is None for b in biases):
            return None
        state = opt_step.direct_state([*weights, *biases])
        if state is None:
            return None
        group, exp_avgs, exp_avg_sqs, steps = state
        return _bound_step(ops.plain_step, x_all, y_all, (weights, biases, mean), (exp_avgs, exp_avg_sqs, steps), group)
    return None


def _bound_step(op, x_all: torch.Tensor, y_all: torch.Tensor, args: tuple, adam_lists: tuple, group: dict):
    """``step(idx)``: ``op(x_all, y_all, idx, *args, *adam_lists, lr, beta1, beta2, weight_decay, eps)``.

    The four one-call operators share that order; Adam's settings are read from ``group`` at each
    step, so a learning rate changed between steps is honoured.
    """

    def step(idx: torch.Tensor) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        with torch.no_grad():
            return op(x_all, y_all, idx, *args, *adam_lists, group["lr"], beta1, beta2, group["weight_decay"],
                      group["eps"])  # fmt: skip

    return step


def reset() -> None:
    """Forget a failure of ``one_call_step`` (tests)."""
    _one_call["failed"] = None


def one_call_failed(err: BaseException) -> None:
    """``one_call_step`` off in this process, with one warning (``training._Step``'s Python from here on)."""
    _one_call["failed"] = err
    warn_off("Training steps as one C++ call", err, f"using the step's Python (set {ENV_ONE_CALL}=0 to skip them)")


def _python_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    if isinstance(model, VectorizedEnsemble):
        return _vectorized(model, x, labels, reduction)
    if isinstance(model, BatchEnsembleMLP):
        return _batchensemble(model, x, labels, reduction)
    return _plain(_plain_mlp(model), x, labels, reduction)


def _native_step(
    ops, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, reduction: str, adam: KernelAdam | None = None
) -> torch.Tensor:
    """``forward_backward`` through the C++ operators (``csrc/manual_ops.cpp``): the same operator calls."""
    mean = reduction == "mean"
    if isinstance(model, VectorizedEnsemble):
        weights, biases = list(model.weights), list(model.biases)
        models._check_shared_input(x, weights[0].size(0))
        if adam is not None and kernel_adam_weight(model) is weights[0]:
            member_losses, grad_w, grad_b = ops.vectorized_adam(
                x, labels, weights, biases, onednn.usable(x), onednn.mkl_plain_layout(), mean, *adam
            )  # weights[0] stepped in place: its gradient is not returned
            weights = weights[1:]
        else:
            member_losses, grad_w, grad_b = ops.vectorized(
                x, labels, weights, biases, onednn.usable(x), onednn.mkl_plain_layout(), mean
            )
        _set_grads(weights, grad_w)
        _set_grads(biases, grad_b)
        return member_losses
    if isinstance(model, BatchEnsembleMLP):
        return _native_batchensemble(ops, model, x, labels, mean)
    linears = _plain_mlp(model)
    weights, biases = [lin.weight for lin in linears], [lin.bias for lin in linears]
    member_losses, grad_w, grad_b = ops.plain(x, labels, weights, biases, mean)
    _set_grads(weights, grad_w)
    _set_grads(biases, grad_b)
    return member_losses


def _native_batchensemble(ops, model: BatchEnsembleMLP, x: torch.Tensor, labels: torch.Tensor, mean: bool):
    layers: list[BatchEnsembleLinear] = list(model.layers)
    first = layers[0]
    shared = x.dim() == 2  # repeat batching: the first layer's forward on the shared batch, in Python
    if shared:
        models._check_shared_input(x, first.in_features)
        h, z = _shared_first_layer(ops, x, first)
        layers = layers[1:]
    else:
        models._check_members_dim(x, model.ensemble_size, first.in_features)
        h = x
    params = [p for layer in layers for p in (layer.weight, layer.r, layer.s, layer.bias)]
    via_onednn = [models.through_onednn(x, layer.in_features) for layer in layers]
    first_kernel = not switched_off(ENV_FIRST_LAYER_KERNEL)  # the C++ step uses it in split batching's first layer only
    fused = not switched_off(ENV_FUSED)
    member_losses, grads, grad_h = ops.batchensemble_layers(
        h, labels, params, via_onednn, mean, shared, first_kernel, fused
    )
    _set_grads(params, grads)
    if shared and first_kernel and ops.first_layer_fast() and x.dtype == torch.float32:
        # Repeat batching: W's and r's gradients from the first-layer kernel on the shared batch (each
        # member's xᵀ dz_m reduced in registers), in place of the product into [in, E, out] and its reductions.
        grad_z = torch.empty_like(grad_h, memory_format=torch.contiguous_format)  # (E, B, out)
        torch.mul(grad_h, first.s.unsqueeze(1), out=grad_z)
        first.weight.grad, first.r.grad = ops.first_layer_grads(x.contiguous(), grad_z, first.weight, first.r)
        first.s.grad, first.bias.grad = (grad_h * z).sum(1), grad_h.sum(1)
    elif shared:  # the product into [in, E, out], reduced by the compiled kernel of bench_core.kernels
        _, first.weight.grad, first.r.grad, first.s.grad, first.bias.grad = models.shared_input_batchensemble_grads(
            x, first.weight, first.r, first.s, z, grad_h, need_x=False
        )
    return member_losses


def _shared_first_layer(ops, x: torch.Tensor, layer: BatchEnsembleLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``models.shared_input_batchensemble`` as ``batchensemble_repeat_step`` makes it.

    Where MKL takes the members' product in the plain layout, through ``bench_core::chunked_product``
    (in halves where they apply), so the one-call step and this one stay bit for bit the same.
    """
    if x.dtype != torch.float32 or onednn.usable(x) or not onednn.mkl_plain_layout():
        return models.shared_input_batchensemble(x, layer.weight, layer.r, layer.s, layer.bias)
    folded = models._fold(layer.weight, layer.r)  # (in, E, out)
    n_in, n_members, n_out = folded.shape
    z = ops.chunked_product(x, folded.view(n_in, -1), None)[0].view(x.size(0), n_members, n_out).transpose(0, 1)
    return torch.addcmul(layer.bias.unsqueeze(1), z, layer.s.unsqueeze(1)), z


def _set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(member losses [E], d loss / d logits [E, B, C])`` of the members' mean cross-entropies, summed or averaged."""
    n_members, batch, n_classes = logits.shape
    if labels.dim() == 1:
        labels = labels.expand(n_members, batch)
    log_p = torch.log_softmax(logits, dim=2)  # (E, B, C)
    # cross_entropy is log_softmax then nll_loss: the same losses to the last bit as training's autograd path.
    nll = F.nll_loss(log_p.view(-1, n_classes), labels.reshape(-1), reduction="none")  # (E*B,)
    member_losses = nll.view(n_members, batch).mean(dim=1)  # (E,)
    # nll_loss's gradient: minus each example's weight at its label, the weight rounded as autograd's
    # backward of the two means rounds it; then log_softmax's own backward, as autograd runs it.
    weight = torch.tensor(1.0 / n_members if reduction == "mean" else 1.0, dtype=logits.dtype).div_(batch)
    grad_log_p = torch.zeros_like(log_p).scatter_(2, labels.unsqueeze(2), (-weight).expand(n_members, batch, 1))
    grad = torch._log_softmax_backward_data(grad_log_p, log_p, 2, logits.dtype)  # (E, B, C)
    return member_losses, grad


def _vectorized(model: VectorizedEnsemble, x: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    weights, biases = list(model.weights), list(model.biases)
    models._check_shared_input(x, weights[0].size(0))
    h = models._members_product(x, weights[0], biases[0])  # (E, B, out), as shared_input_linear
    inputs = []  # each later layer's input: the ReLU of the layer before
    for li in range(1, len(weights)):
        inputs.append(torch.relu(h))
        h = torch.baddbmm(biases[li].unsqueeze(1), inputs[-1], weights[li])  # (E, B, out)
    member_losses, grad = _loss_and_grad(h.contiguous(), labels, reduction)
    for li in range(len(weights) - 1, 0, -1):
        a = inputs[li - 1]  # (E, B, in)
        biases[li].grad = grad.sum(1)
        weights[li].grad = torch.bmm(a.transpose(1, 2), grad)  # (E, in, out)
        grad = torch.ops.aten.threshold_backward(torch.bmm(grad, weights[li].transpose(1, 2)), a, 0)  # through the ReLU
    _, weights[0].grad, biases[0].grad = models.shared_input_linear_grads(x, weights[0], grad, need_x=False)
    return member_losses


def _plain_mlp(model: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of an MLP as ``models.build_mlp`` makes it (Linear, ReLU, ..., Linear), else None."""
    seq = model.net if isinstance(model, SingleMLP) else model
    if not isinstance(seq, nn.Sequential) or len(seq) % 2 == 0:
        return None
    layers = list(seq)
    if any(type(m) is not nn.Linear for m in layers[::2]) or any(type(m) is not nn.ReLU for m in layers[1::2]):
        return None
    return layers[::2]


def _plain(linears: list[nn.Linear], x: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """One MLP of ``nn.Linear`` layers (``[out, in]`` weights): a single MLP, or one sequential classic member."""
    inputs = [x]  # each layer's input
    h = x
    for li, lin in enumerate(linears):
        if li > 0:
            h = torch.relu(h)
            inputs.append(h)
        h = torch.addmm(lin.bias, h, lin.weight.t())  # (B, out), as nn.Linear runs it
    member_losses, grad = _loss_and_grad(h.unsqueeze(0), labels, reduction)
    grad = grad[0]  # (B, C)
    for li in range(len(linears) - 1, -1, -1):
        lin, a = linears[li], inputs[li]
        lin.bias.grad = grad.sum(0)
        lin.weight.grad = grad.t().mm(a)  # (out, in): the parameter's layout, as autograd makes it
        if li > 0:
            grad = torch.ops.aten.threshold_backward(grad.mm(lin.weight), a, 0)  # through the ReLU
    return member_losses


def _batchensemble(model: BatchEnsembleMLP, x: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    layers: list[BatchEnsembleLinear] = list(model.layers)
    saved = []  # per layer: what its backward needs
    h = x
    for li, layer in enumerate(layers):
        if li > 0:
            h = torch.relu(h)
        if h.dim() == 2:  # the first layer on a shared batch (repeat batching): h is x
            models._check_shared_input(h, layer.in_features)
            h, z = models.shared_input_batchensemble(h, layer.weight, layer.r, layer.s, layer.bias)
            saved.append(("shared", x, z))
        else:
            models._check_members_dim(h, model.ensemble_size, layer.in_features)
            inp = h
            h, xr, z, via_onednn = _per_member_forward(layer, inp)
            saved.append(("per member", inp, xr, z, via_onednn))
    member_losses, grad = _loss_and_grad(h.contiguous(), labels, reduction)
    for li in range(len(layers) - 1, -1, -1):
        layer = layers[li]
        kind, inp, *rest = saved[li]
        if kind == "shared":
            _, layer.weight.grad, layer.r.grad, layer.s.grad, layer.bias.grad = models.shared_input_batchensemble_grads(
                inp, layer.weight, layer.r, layer.s, *rest, grad, need_x=False
            )
        else:
            grad = _per_member_backward(layer, grad, inp, *rest, need_input=li > 0)
        if li > 0:  # through the ReLU before this layer: its output is this layer's input
            grad = torch.ops.aten.threshold_backward(grad, inp, 0)
    return member_losses


def _per_member_forward(
    layer: BatchEnsembleLinear, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``BatchEnsembleLinear.forward`` on ``h [E, b, in]``: ``(y [E, b, out], x∘r [E·b, in], z [E, b, out], oneDNN)``.

    The last: whether the products go through oneDNN, as ``shared_weight_product`` decides (``models.through_onednn``).
    """
    xr = (h * layer.r.unsqueeze(1)).reshape(-1, layer.in_features)  # (E*b, in)
    via_onednn = models.through_onednn(xr)
    z = _product(xr, layer.weight, via_onednn).view(layer.ensemble_size, -1, layer.out_features)  # (E, b, out)
    return torch.addcmul(layer.bias.unsqueeze(1), z, layer.s.unsqueeze(1)), xr, z, via_onednn


def _per_member_backward(
    layer: BatchEnsembleLinear,
    grad_y: torch.Tensor,
    h: torch.Tensor,
    xr: torch.Tensor,
    z: torch.Tensor,
    via_onednn: bool,
    need_input: bool,
) -> torch.Tensor | None:
    """Sets the layer's four gradients from ``dy [E, b, out]``; returns ``dh [E, b, in]`` when asked."""
    layer.bias.grad = grad_y.sum(1)  # (E, out)
    layer.s.grad = (grad_y * z).sum(1)  # (E, out)
    grad_z = (grad_y * layer.s.unsqueeze(1)).view(-1, layer.out_features)  # (E*b, out)
    layer.weight.grad = xr.t() @ grad_z  # (in, out), as shared_weight_product's backward
    grad_xr = _product(grad_z, layer.weight.t(), via_onednn).view_as(h)  # (E, b, in): r's gradient needs it
    if not need_input:  # the first layer: dxr is only r's, so its product with h goes where it is, still in cache
        layer.r.grad = grad_xr.mul_(h).sum(1)  # (E, in); split steps about 0.98x as long as with a new tensor
        return None
    layer.r.grad = (grad_xr * h).sum(1)  # (E, in)
    return grad_xr.mul_(layer.r.unsqueeze(1))


def _product(a: torch.Tensor, b: torch.Tensor, via_onednn: bool) -> torch.Tensor:
    """``a @ b``, through oneDNN where ``shared_weight_product`` would take it there."""
    return onednn.matmul(a, b) if via_onednn else a @ b
