"""FLOPs of a training epoch, the floor they set, and the measured matrix-product rate."""

from __future__ import annotations

import itertools
import time

import torch

from bench_core.devices import synchronize


def epoch_flops(
    sizes: list[int],
    n_examples: float,
    ensemble_size: int = 1,
    batching: str = "repeat",
    first_input_grad: bool = False,
) -> float:
    """Matrix-product FLOPs of one training epoch of an E-member MLP with layer widths ``sizes``.

    Each linear layer (in → out) of each member processing n examples costs
    ``2·n·in·out`` forward, ``2·n·in·out`` for the weight gradient and ``2·n·in·out`` for the
    input gradient, except the first layer, whose input needs no gradient. "repeat" batching:
    n = ``n_examples`` per member; "split": n = ``n_examples / E`` per member; a single MLP
    has E = 1. BatchEnsemble's r gradient in the first layer needs no third product either:
    repeat batching derives it from the gradient of the weights r is folded into, and split
    batching from each member's weight gradient ``x_mᵀ dz_m`` (the CPU steps' kernel,
    ``bench_core::first_layer_grads``; autograd, and so training on CUDA, computes it through
    the input-side product ``dz Wᵀ`` instead, a product this count leaves out). Element-wise
    work (biases, ReLU, BatchEnsemble's r/s scaling, the loss, Adam) is not counted: the floor is
    what the matrix products alone would take.

    ``first_input_grad=True`` gives the usual training count, 3× the forward FLOPs: it adds the
    first layer's input gradient, which repeat-batched training never computes. It is the count
    behind the speed issue's "about 4 s" for a CIFAR-10-shaped epoch of 5 members, reported beside
    the strict count: the targets check the floor by both counts (``check_targets``).
    """
    from bench_core.training import effective_batching

    batching = effective_batching(batching, ensemble_size)
    n = n_examples / ensemble_size if batching == "split" else float(n_examples)
    per_member = 0.0
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        first_two = i == 0 and not first_input_grad
        passes = 2 if first_two else 3  # forward + weight grad (+ input grad)
        per_member += passes * 2.0 * n * n_in * n_out
    return ensemble_size * per_member


def floor_seconds(flops: float, rate: float) -> float:
    """Seconds the matrix products would take at ``rate`` FLOP/s."""
    return flops / rate


def gemm_rate(m: int, k: int, n: int, device: torch.device, warmup: int = 2, repeats: int = 9) -> float:
    """Float32 FLOP/s of ``[m, k] @ [k, n]`` on ``device``: 2·m·k·n over the fastest of ``repeats`` timings.

    The fastest, not the median: the floor is meant as a bound the hardware can reach, and on a
    shared machine other processes only ever make a product slower. ``torch.mm``, the routine most
    of training's products go through (MKL on an x86 CPU, cuBLAS on CUDA).
    """
    a, b = _operands(m, k, n, device)
    return _fastest_rate(lambda: torch.mm(a, b), 2.0 * m * k * n, device, warmup, repeats)


def onednn_gemm_rate(m: int, k: int, n: int, warmup: int = 2, repeats: int = 9) -> float | None:
    """:func:`gemm_rate` of the same CPU product through oneDNN; None where this torch has no such op.

    ``torch.ops.mkldnn._linear_pointwise`` is a private op (inductor's CPU linear), which the first
    layers' forward products use on a CPU but an Intel one (``bench_core.onednn``). On some CPUs oneDNN's float32
    product is faster than MKL's, which ``torch.mm`` runs: on this project's AMD EPYC, 2048³ ran
    at 205-220 against 155-194 GFLOP/s. The floor takes the faster of the two rates.
    """
    from bench_core import onednn

    if not onednn.available():  # no such op, or it failed its check against torch.mm
        return None
    a, b = _operands(m, k, n, torch.device("cpu"))
    b = b.t().contiguous().t()  # its weight [n, k] contiguous, nn.Linear's layout
    rate = _fastest_rate(lambda: onednn.matmul(a, b), 2.0 * m * k * n, torch.device("cpu"), warmup, repeats)
    return rate if onednn.available() else None  # a call that failed ran torch.mm instead


def _operands(m: int, k: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(m, k, generator=gen).to(device), torch.randn(k, n, generator=gen).to(device)


def _fastest_rate(product, flops: float, device: torch.device, warmup: int, repeats: int) -> float:
    """``flops`` over the fastest of ``repeats`` timings of ``product()``."""
    # Enough products per timing that each is well above the clock's resolution.
    inner = max(1, int(2e8 // flops))
    for _ in range(warmup):
        product()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            product()
        synchronize(device)
        times.append((time.perf_counter() - t0) / inner)
    return flops / min(times)
