"""Models: a single MLP, a classic ensemble of MLPs (two execution modes), BatchEnsemble.

Every model takes ``x`` shaped ``[B, D]`` (one batch shared by all members) or ``[E, B, D]``
(one batch per member) and returns logits shaped ``[E, B, C]``; a single MLP has E = 1.

BatchEnsemble (Wen, Tran & Ba, ICLR 2020): one shared weight ``W``, per member an input-side
fast weight ``r_k [in]``, an output-side fast weight ``s_k [out]`` and a bias ``b_k [out]``. In the
paper's ``[in, out]`` terms member k's weight is ``W ∘ (r_k s_kᵀ)``, so for a row vector x

    y_k = x (W ∘ r_k s_kᵀ) + b_k = s_k ∘ ((r_k ∘ x) W) + b_k

which is the paper's ``φ((W ∘ r_i s_iᵀ)ᵀ x)``: ``r`` multiplies the input, ``s`` the output. (The
seed notebook swaps the two names and shares one bias.)

The first layer's weights are stored as ``nn.Linear`` stores them, ``[out, in]`` (BatchEnsemble's
``W``; the classic ensemble's members stacked ``[E, out, in]``), so that its products on a CPU go
through oneDNN (``bench_core.onednn``, which PyTorch's CPU build carries; on this project's machine
205-220 GFLOP/s at 2048³ against MKL's 155-186) in the layouts it runs fastest: the forward as
``x Wᵀ`` with the weight ``[E·out, in]``, the weight gradient as ``dzᵀ x``, straight into the
parameter's layout, and split batching's input gradient as ``dz W``. The classic ensemble's later
layers are stored ``[E, in, out]`` for ``bmm``. Without oneDNN (CUDA, float64, ``BENCH_ONEDNN=0``)
the products run on ``torch.mm`` in MKL's faster layouts for these weights. ``member(k)`` and
``as_linear(k)`` return plain ``nn.Linear`` layers; state dicts of earlier layouts load converted.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from bench_core import kernels, onednn
from bench_core.config import ModelConfig


def mlp_sizes(in_features: int, hidden: int, depth: int, num_classes: int) -> list[int]:
    """Layer widths of an MLP with ``depth`` hidden layers: [in, hidden, ..., hidden, classes]."""
    return [in_features] + [hidden] * depth + [num_classes]


def build_mlp(sizes: list[int]) -> nn.Sequential:
    """A plain ``nn.Sequential`` MLP (Linear, ReLU, ..., Linear): the reference a member must match."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SingleMLP(nn.Module):
    """One MLP; returns logits ``[1, B, C]`` so it fits the ensemble layout."""

    ensemble_size = 1

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.net = build_mlp(sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            if x.size(0) != 1:
                raise ValueError(f"expected per-member input [1, B, D], got {tuple(x.shape)}")
            x = x[0]
        return self.net(x).unsqueeze(0)  # (1, B, C)

    def member(self, k: int) -> nn.Sequential:
        _check_member(k, 1)
        return self.net


class SequentialEnsemble(nn.Module):
    """A classic ensemble kept as E separate MLPs, run one after another.

    This is the seed notebook's way: the training loop gives each member its own pass over the
    data and its own optimizer.
    """

    def __init__(self, sizes: list[int], ensemble_size: int) -> None:
        super().__init__()
        self.ensemble_size = ensemble_size
        self.members = nn.ModuleList(build_mlp(sizes) for _ in range(ensemble_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            _check_members_dim(x, self.ensemble_size)
            return torch.stack([m(xk) for m, xk in zip(self.members, x, strict=True)])  # (E, B, C)
        return torch.stack([m(x) for m in self.members])  # (E, B, C)

    def member(self, k: int) -> nn.Sequential:
        _check_member(k, self.ensemble_size)
        return self.members[k]


class VectorizedEnsemble(nn.Module):
    """A classic ensemble with every member's weights stacked: one batched pass for all members.

    The first layer holds ``weights[0] [E, out, in]``: every member's ``nn.Linear`` weight, stacked,
    so that a shared input ``[B, D]`` goes through it as one matrix product with an ``[E·out, in]``
    weight (``shared_input_linear``). Layer l > 0 holds ``weights[l] [E, in, out]``, for ``bmm``.
    Member k's slices are exactly the weights of the k-th plain MLP's ``nn.Linear`` layers (those
    of later layers transposed); ``biases[l] [E, out]``.
    """

    _version = 3  # 1: every weight stored [E, out, in]; 2: the first layer's [in, E, out] (both converted on load)

    def __init__(self, sizes: list[int], ensemble_size: int) -> None:
        super().__init__()
        self.ensemble_size = ensemble_size
        self.sizes = list(sizes)
        # Initialise as E independent nn.Linear MLPs would be, then stack.
        members = [build_mlp(sizes) for _ in range(ensemble_size)]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for li in range(len(sizes) - 1):
            linears = [m[2 * li] for m in members]
            self.weights.append(nn.Parameter(_stack_weights([lin.weight.detach() for lin in linears], first=li == 0)))
            self.biases.append(nn.Parameter(torch.stack([lin.bias.detach() for lin in linears])))

    @classmethod
    def from_members(cls, members: list[nn.Sequential]) -> VectorizedEnsemble:
        """Stack the weights of plain MLPs (as built by ``build_mlp``) into one vectorized ensemble."""
        linears = [[m for m in seq if isinstance(m, nn.Linear)] for seq in members]
        sizes = [linears[0][0].in_features] + [lin.out_features for lin in linears[0]]
        model = cls(sizes, len(members))
        with torch.no_grad():
            for li in range(len(sizes) - 1):
                model.weights[li].copy_(_stack_weights([ls[li].weight for ls in linears], first=li == 0))
                model.biases[li].copy_(torch.stack([ls[li].bias for ls in linears]))
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_layers = len(self.weights)
        if x.dim() == 2:
            h = shared_input_linear(x, self.weights[0], self.biases[0])  # (E, B, out)
        else:
            _check_members_dim(x, self.ensemble_size)
            h = ensemble_linear(x, self.weights[0].transpose(1, 2), self.biases[0])  # (E, B, out)
        for li in range(1, n_layers):
            h = ensemble_linear(F.relu(h), self.weights[li], self.biases[li])  # (E, B, out)
        return h.contiguous()  # (E, B, C)

    def member_linear_weight(self, li: int, k: int) -> torch.Tensor:
        """Layer ``li``'s weight of member k in ``nn.Linear``'s layout ``[out, in]`` (a view)."""
        _check_member(k, self.ensemble_size)
        weight = self.weights[li]
        return weight[k] if li == 0 else weight[k].t()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        version = local_metadata.get("version", 1)
        for li in range(len(self.weights)):
            key = f"{prefix}weights.{li}"
            if key not in state_dict:
                continue
            old = state_dict[key]
            if version < 2 and li > 0:  # saved [E, out, in]; the first layer already is
                state_dict[key] = old.transpose(1, 2).contiguous()
            elif version == 2 and li == 0:  # saved [in, E, out]
                state_dict[key] = old.permute(1, 2, 0).contiguous()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)

    def member(self, k: int) -> nn.Sequential:
        """Member k as a plain MLP holding copies of its weights."""
        _check_member(k, self.ensemble_size)
        seq = build_mlp(self.sizes)
        with torch.no_grad():
            for li, lin in enumerate(m for m in seq if isinstance(m, nn.Linear)):
                lin.weight.copy_(self.member_linear_weight(li, k))
                lin.bias.copy_(self.biases[li][k])
        return seq.to(self.weights[0].device)


def _stack_weights(linear_weights: list[torch.Tensor], first: bool) -> torch.Tensor:
    """``nn.Linear`` weights ``[out, in]`` of E members, stacked ``[E, out, in]`` (first) or ``[E, in, out]``."""
    return torch.stack(linear_weights if first else [w.t() for w in linear_weights]).contiguous()


def ensemble_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """E linear maps, one batch per member: member k computes ``x[k] @ weight[k] + bias[k]``.

    Args:
        x: ``[E, B, in]``.
        weight: ``[E, in, out]``.
        bias: ``[E, out]``.

    Returns:
        ``[E, B, out]``.
    """
    _check_members_dim(x, weight.size(0))
    return torch.baddbmm(bias.unsqueeze(1), x, weight)  # (E, B, out)


def shared_input_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """E linear maps of one shared input: member k computes ``x @ weight[k]ᵀ + bias[k]``.

    Args:
        x: ``[B, in]``.
        weight: ``[E, out, in]``, the members' ``nn.Linear`` weights stacked.
        bias: ``[E, out]``.

    Returns:
        ``[E, B, out]`` (a transposed view of a ``[B, E, out]`` or ``[E, out, B]`` result).
    """
    _check_shared_input(x, weight.size(2))
    return _SharedInputLinear.apply(x, weight, bias)


class _SharedInputLinear(torch.autograd.Function):
    """``shared_input_linear`` with its two matrix products laid out as this CPU runs them fastest.

    The weight is ``[E·out, in]`` (``nn.Linear``'s layout for all members at once): on a CPU in
    float32 both products go through oneDNN (``bench_core.onednn``), the forward as ``z = x Wᵀ``
    ``[B, E·out]`` (the layout oneDNN's linear takes its weight in) and the weight gradient as
    ``dzᵀ x`` ``[E·out, in]``, the parameter's own layout. On this project's machine (2 cores, AMD
    EPYC) that pair took 5.35 against 5.65 ms (operands evicted, batch 128, in 3072, E·out 640) for
    the ``[in, E·out]`` layout, which MKL needs for its fastest weight gradient ``xᵀ dz``, and classic
    training steps 0.93-0.94× as long (interleaved A/B; docs/speed-log.md). Without oneDNN
    (CUDA, float64, ``BENCH_ONEDNN=0``) the forward is ``zᵀ = W xᵀ`` ``[E·out, B]``, MKL's fastest
    layout for it, and the gradient ``dzᵀ x``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _members_product(x, weight, bias)  # (E, B, out)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        return shared_input_linear_grads(x, weight, grad_y, *ctx.needs_input_grad)


def shared_input_linear_grads(
    x: torch.Tensor,
    weight: torch.Tensor,
    grad_y: torch.Tensor,
    need_x: bool = True,
    need_w: bool = True,
    need_b: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``shared_input_linear``'s gradients ``(dx [B, in], dW [E, out, in], db [E, out])`` from ``dy [E, B, out]``.

    The weight gradient ``dzᵀ x`` comes out ``[E·out, in]``, the parameter's own layout (see
    ``_SharedInputLinear``); a gradient not needed is None.
    """
    n_members, n_out, n_in = weight.shape
    grad_z = grad_y.transpose(0, 1).reshape(x.size(0), -1)  # (B, E*out)
    grad_x = grad_weight = grad_bias = None
    if need_x:
        grad_x = grad_z @ weight.view(-1, n_in)  # (B, in)
    if need_w:
        grad_weight = _members_weight_grad(x, grad_z).view(n_members, n_out, n_in)  # (E, out, in)
    if need_b:
        grad_bias = grad_y.sum(1)  # (E, out)
    return grad_x, grad_weight, grad_bias


def _members_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Every member's ``x @ weight[k]ᵀ (+ bias[k])`` in one product: ``x [B, in]``, ``weight [E, out, in]``.

    Returns ``[E, B, out]``, a transposed view. Through oneDNN where it is in use, as ``z = x Wᵀ``
    ``[B, E·out]``, which it runs fastest with the weight ``[E·out, in]``; otherwise MKL's fastest
    layout, ``zᵀ = W xᵀ`` ``[E·out, B]`` (``_SharedInputLinear``).
    """
    n_members, n_out, n_in = weight.shape
    w = weight.view(-1, n_in)  # (E*out, in)
    if onednn.usable(x):
        z = onednn.matmul(x, w.t(), None if bias is None else bias.reshape(-1))  # (B, E*out)
        return z.view(x.size(0), n_members, n_out).transpose(0, 1)
    z_t = w @ x.t() if bias is None else torch.addmm(bias.reshape(-1, 1), w, x.t())  # (E*out, B)
    return z_t.view(n_members, n_out, -1).transpose(1, 2)


def _members_weight_grad(x: torch.Tensor, grad_z: torch.Tensor) -> torch.Tensor:
    """``dzᵀ x`` ``[E·out, in]`` for ``x [B, in]``, ``dz [B, E·out]``: through oneDNN where it is in use."""
    return onednn.matmul(grad_z.t(), x) if onednn.usable(x) else grad_z.t() @ x


ONEDNN_MIN_IN = 2048  # narrowest input whose per-member products go through oneDNN (shared_weight_product)


def shared_weight_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weightᵀ`` for ``x [rows, in]``, ``weight [out, in]`` (``nn.Linear``'s layout), with its gradients.

    On a CPU in float32, for inputs at least ``ONEDNN_MIN_IN`` wide, all three products go through
    oneDNN (``bench_core.onednn``): ``z = x Wᵀ``, ``dx = dz W`` and ``dW = dzᵀ x``. Split batching's
    first layer (125 × 3072 by 128 × 3072) took 2.20 against 2.42 ms for the three (operands evicted)
    with the weight ``[out, in]`` than with ``[in, out]``, where MKL made the weight gradient, and
    split training steps 0.86-0.92× as long (interleaved A/B on this project's machine;
    docs/speed-log.md). Narrower layers stay on ``x @ weightᵀ`` through autograd: through the
    function they took as long or longer (784 wide 1.0-1.08×, the hidden 128 × 128 1.2-1.7×: its
    own overhead; measured with the ``[in, out]`` layout).
    """
    if through_onednn(x):
        return _SharedWeightProduct.apply(x, weight)
    return x @ weight.t()


def through_onednn(x: torch.Tensor) -> bool:
    """Whether ``shared_weight_product`` takes ``x``'s products through oneDNN."""
    return x.size(-1) >= ONEDNN_MIN_IN and onednn.usable(x)


def weight_product(x: torch.Tensor, weight: torch.Tensor, via_onednn: bool) -> torch.Tensor:
    """``x @ weightᵀ`` ``[rows, out]`` for ``weight [out, in]``: through oneDNN (``through_onednn``) or ``torch.mm``."""
    return onednn.matmul(x, weight.t()) if via_onednn else x @ weight.t()


def weight_product_grads(
    x: torch.Tensor, weight: torch.Tensor, grad_z: torch.Tensor, via_onednn: bool, need_x: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(dx [rows, in], dW [out, in])`` of ``z = x weightᵀ`` from ``dz [rows, out]``; dx None unless asked.

    Through oneDNN (``through_onednn``), or as autograd computes them for ``x @ weight.t()``:
    ``dz.mm(W)`` and ``dz.t().mm(x)``, so that the hand-written step (``bench_core.manual``) equals
    autograd bit for bit either way.
    """
    if via_onednn:
        grad_x = onednn.matmul(grad_z, weight) if need_x else None  # (rows, in)
        return grad_x, onednn.matmul(grad_z.t(), x)  # (out, in)
    grad_x = grad_z.mm(weight) if need_x else None
    return grad_x, grad_z.t().mm(x)


class _SharedWeightProduct(torch.autograd.Function):
    """``shared_weight_product`` through oneDNN: ``z = x Wᵀ``, ``dx = dz W``, ``dW = dzᵀ x``."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return weight_product(x, weight, True)  # (rows, out)

    @staticmethod
    def backward(ctx, grad_z):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = weight_product_grads(x, weight, grad_z, True, need_x=ctx.needs_input_grad[0])
        return grad_x, grad_weight if ctx.needs_input_grad[1] else None


class BatchEnsembleLinear(nn.Module):
    """A BatchEnsemble linear layer: ``nn.Linear``'s signature plus ``ensemble_size``.

    Member k computes ``y_k = x (W ∘ s_k r_kᵀ)ᵀ + b_k``, where ``W [out, in]`` is shared (stored as
    ``nn.Linear`` stores its weight; the paper writes it ``[in, out]``), ``r [E, in]`` is the
    input-side fast weight, ``s [E, out]`` the output-side fast weight and ``bias [E, out]`` is per
    member.

    Args:
        in_features: size of each input example.
        out_features: size of each output example.
        ensemble_size: number of members E.
        init: fast-weight initialisation, ``"normal"`` (N(1, init_std)) or ``"random_sign"`` (±1).
        init_std: standard deviation of the normal initialisation.

    Shape:
        - Input: ``[B, in]`` (shared by all members) or ``[E, B, in]`` (one batch per member).
        - Output: ``[E, B, out]``.
    """

    _version = 3  # 2: weight stored [in, out] (converted on load); 1: [out, in], as now

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ensemble_size: int,
        init: str = "normal",
        init_std: float = 0.5,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.ensemble_size = ensemble_size
        self.init = init
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.r = nn.Parameter(torch.empty(ensemble_size, in_features))  # input side
        self.s = nn.Parameter(torch.empty(ensemble_size, out_features))  # output side
        self.bias = nn.Parameter(torch.empty(ensemble_size, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # W and each member's bias as nn.Linear initialises them.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
        nn.init.uniform_(self.bias, -bound, bound)
        for fast in (self.r, self.s):
            if self.init == "random_sign":
                with torch.no_grad():
                    fast.copy_(torch.randint(0, 2, fast.shape, dtype=fast.dtype) * 2 - 1)
            elif self.init == "normal":
                nn.init.normal_(fast, mean=1.0, std=self.init_std)
            else:
                raise ValueError(f"unknown fast-weight init {self.init!r}: choose normal or random_sign")

    def member_weight(self, k: int | None = None) -> torch.Tensor:
        """Member k's weight ``(W ∘ r_k s_kᵀ)ᵀ``, ``nn.Linear``'s ``[out, in]``; ``[E, out, in]`` for all."""
        fast = self.s.unsqueeze(2) * self.r.unsqueeze(1)  # (E, out, in)
        full = self.weight.unsqueeze(0) * fast
        return full if k is None else full[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            _check_shared_input(x, self.in_features)
            return _SharedInputBatchEnsemble.apply(x, self.weight, self.r, self.s, self.bias)  # (E, B, out)
        _check_members_dim(x, self.ensemble_size)
        # Per-member input: scale by r, one GEMM with the shared W over all E*B rows, scale by s.
        xr = x * self.r.unsqueeze(1)  # (E, B, in)
        z = shared_weight_product(xr.reshape(-1, self.in_features), self.weight)  # (E*B, out)
        z = z.view(self.ensemble_size, -1, self.out_features)  # (E, B, out)
        return torch.addcmul(self.bias.unsqueeze(1), z, self.s.unsqueeze(1))  # (E, B, out)

    def as_linear(self, k: int) -> nn.Linear:
        """Member k as a plain ``nn.Linear`` (weight ``(W ∘ r_k s_kᵀ)ᵀ``, bias ``b_k``)."""
        lin = nn.Linear(self.in_features, self.out_features, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.member_weight(k))
            lin.bias.copy_(self.bias[k])
        return lin

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        key = f"{prefix}weight"
        if local_metadata.get("version", 1) == 2 and key in state_dict:  # saved [in, out]
            state_dict[key] = state_dict[key].t().contiguous()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"ensemble_size={self.ensemble_size}, init={self.init}"
        )


class _SharedInputBatchEnsemble(torch.autograd.Function):
    """BatchEnsemble on an input shared by all members (the first layer), with a lean backward.

    Forward folds r into per-member weights ``[E, out, in]`` and runs every member in one GEMM that
    reads the input once: ``z = x [W ∘ 1 r_1ᵀ; ...; W ∘ 1 r_Eᵀ]ᵀ``, then ``y = z ∘ s + b``.
    Backward makes one GEMM for ``G = dzᵀ x`` ``[E, out, in]`` (what each member's folded weight
    would receive) and derives both ``dW = Σ_k G_k ∘ 1 r_kᵀ`` and ``dr_k = Σ_o G_k ∘ W`` from it,
    where autograd's generic broadcasting rules would allocate and reduce several [E, out, in]
    temporaries. The products' layouts are ``_SharedInputLinear``'s, for the same reason.
    """

    @staticmethod
    def forward(ctx, x, weight, r, s, bias):
        y, z = shared_input_batchensemble(x, weight, r, s, bias)
        ctx.save_for_backward(x, weight, r, s, z)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, r, s, z = ctx.saved_tensors
        return shared_input_batchensemble_grads(x, weight, r, s, z, grad_y, need_x=ctx.needs_input_grad[0])


def shared_input_batchensemble(
    x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, s: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A BatchEnsemble layer on a shared input ``x [B, in]``: ``(y, z)``, both ``[E, B, out]``, ``y = z ∘ s + b``.

    ``z``, every member's product before ``s``, is what the backward needs (``_SharedInputBatchEnsemble``).
    """
    z = _members_product(x, _fold(weight, r))  # (E, B, out)
    return torch.addcmul(bias.unsqueeze(1), z, s.unsqueeze(1)), z  # (E, B, out)


def shared_input_batchensemble_grads(
    x: torch.Tensor,
    weight: torch.Tensor,
    r: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    grad_y: torch.Tensor,
    need_x: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``shared_input_batchensemble``'s gradients ``(dx, dW, dr, ds, db)`` from ``dy [E, B, out]`` (dx if asked)."""
    n_members, n_in = r.shape
    n_out = weight.size(0)
    grad_bias = grad_y.sum(1)  # (E, out)
    grad_s = (grad_y * z).sum(1)  # (E, out)
    grad_z = grad_y.new_empty(x.size(0), n_members, n_out)  # (B, E, out): written as [E, B, out]
    torch.mul(grad_y, s.unsqueeze(1), out=grad_z.transpose(0, 1))  # one pass, no transposing copy
    grad_z = grad_z.view(x.size(0), -1)  # (B, E*out)
    grad_folded = _members_weight_grad(x, grad_z).view(n_members, n_out, n_in)  # (E, out, in)
    grad_weight, grad_r = _fold_grads(grad_folded, weight, r)  # (out, in), (E, in)
    grad_x = None
    if need_x:
        grad_x = grad_z @ _fold(weight, r).view(-1, n_in)  # (B, in)
    return grad_x, grad_weight, grad_r, grad_s, grad_bias


FOLD_GRAD_COLS = 512  # CPU, eager: input columns per block of _fold_grads; an [E, out, 512] block stays in cache


def _fold_grads(grad_folded: torch.Tensor, weight: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dW = Σ_k G_k ∘ 1 r_kᵀ`` ``[out, in]`` and ``dr_k = Σ_o G_k ∘ W`` ``[E, in]``, from ``G [E, out, in]``.

    On the CPU a kernel compiled once per model size (``kernels.run_fold_grads``) makes each
    reduction one loop over ``G``: 0.14-0.19 ms against 0.68-0.91 ms eager (in 3072, E 5, out 128,
    measured with the ``[in, E, out]`` layout before), and a BatchEnsemble training step 0.94× as
    long (median of 10 pairs of fresh processes, the order alternated; ad-hoc script). Without it
    (``BENCH_COMPILE=0``, or where it can't be compiled) the eager products and sums go block by
    block over the input columns, so that each block of ``G`` is read from cache by the second
    reduction and the temporaries stay block-sized (with the ``[in, E, out]`` layout, over the
    whole ``G`` at once they took 2.0-3.1 ms, in blocks of 512 input rows 1.4-2.0 ms; ``G`` cold,
    ad-hoc timing on this project's machine). A block holds every member and output of its
    columns, so each sum is made whole, in one go. Elsewhere (CUDA) it is one eager block: each
    block costs four kernel launches, and a GPU step of these small models is bound by its
    launches, not its memory traffic.
    """
    on_cpu = grad_folded.device.type == "cpu"
    if on_cpu and (compiled := kernels.run_fold_grads(grad_folded, weight, r)) is not None:
        return compiled
    n_members, n_out, n_in = grad_folded.shape
    cols = FOLD_GRAD_COLS if on_cpu else n_in
    grad_weight = weight.new_empty(n_out, n_in)
    grad_r = weight.new_empty(n_members, n_in)
    for a in range(0, n_in, cols):
        b = min(a + cols, n_in)
        block = grad_folded[:, :, a:b]  # (E, out, cols)
        torch.sum(block * r[:, a:b].unsqueeze(1), 0, out=grad_weight[:, a:b])
        torch.sum(block * weight[:, a:b].unsqueeze(0), 1, out=grad_r[:, a:b])
    return grad_weight, grad_r


def _fold(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``[E, out, in]``: member k's slice is ``W ∘ 1 r_kᵀ``, written contiguous."""
    folded = weight.new_empty(r.size(0), *weight.shape)
    return torch.mul(weight.unsqueeze(0), r.unsqueeze(1), out=folded)


class BatchEnsembleMLP(nn.Module):
    """An MLP made of BatchEnsembleLinear layers with ReLU between them.

    ``forward`` takes ``[B, D]`` (every member sees every example: "repeat" batching) or
    ``[E, b, D]`` (each member its own slice: "split" batching) and returns ``[E, B, C]``.
    """

    def __init__(self, sizes: list[int], ensemble_size: int, init: str = "normal", init_std: float = 0.5) -> None:
        super().__init__()
        self.ensemble_size = ensemble_size
        self.layers = nn.ModuleList(
            BatchEnsembleLinear(n_in, n_out, ensemble_size, init=init, init_std=init_std)
            for n_in, n_out in itertools.pairwise(sizes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)  # (E, B, out)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h.contiguous()  # (E, B, C)

    def warm_up_kernels(self) -> bool:
        """Compile (or load) the CPU kernel of the first layer's backward now, before anything is timed.

        Returns True when the compiled kernel is in use (see ``bench_core.kernels``).
        """
        return kernels.warm_up(*self._kernel_sizes())

    def kernels_warm(self) -> bool:
        """Whether ``warm_up_kernels`` would return at once (done in this process, or compiled code off)."""
        return kernels.is_warm(*self._kernel_sizes())

    def _kernel_sizes(self) -> tuple[int, int, int, torch.dtype]:
        first = self.layers[0]
        return first.in_features, self.ensemble_size, first.out_features, first.weight.dtype

    def member(self, k: int) -> nn.Sequential:
        """Member k as a plain MLP of ``nn.Linear`` layers."""
        _check_member(k, self.ensemble_size)
        layers: list[nn.Module] = []
        for i, layer in enumerate(self.layers):
            layers.append(layer.as_linear(k))
            if i < len(self.layers) - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)


def build_model(method: str, cfg: ModelConfig, in_features: int, num_classes: int) -> nn.Module:
    """The model for ``method`` ("single", "classic" or "batchensemble") under ``cfg``.

    The current torch RNG state seeds the initialisation; seed it first for reproducible runs.
    """
    sizes = mlp_sizes(in_features, cfg.hidden, cfg.depth, num_classes)
    if method == "single":
        return SingleMLP(sizes)
    if method == "classic":
        if cfg.classic_mode == "sequential":
            return SequentialEnsemble(sizes, cfg.ensemble_size)
        return VectorizedEnsemble(sizes, cfg.ensemble_size)
    if method == "batchensemble":
        return BatchEnsembleMLP(sizes, cfg.ensemble_size, init=cfg.be_init, init_std=cfg.be_init_std)
    raise ValueError(f"unknown method {method!r}: choose single, classic or batchensemble")


def _check_member(k: int, ensemble_size: int) -> None:
    if not 0 <= k < ensemble_size:
        raise IndexError(f"member {k} out of range for an ensemble of {ensemble_size}")


def _check_members_dim(x: torch.Tensor, ensemble_size: int) -> None:
    if x.dim() != 3 or x.size(0) != ensemble_size:
        raise ValueError(f"expected input [B, D] or [{ensemble_size}, B, D], got {tuple(x.shape)}")


def _check_shared_input(x: torch.Tensor, n_in: int) -> None:
    if x.dim() != 2 or x.size(1) != n_in:
        raise ValueError(f"expected input [B, {n_in}], got {tuple(x.shape)}")
