"""Models: a single MLP, a classic ensemble of MLPs (two execution modes), BatchEnsemble.

Every model takes ``x`` shaped ``[B, D]`` (one batch shared by all members) or ``[E, B, D]``
(one batch per member) and returns logits shaped ``[E, B, C]``; a single MLP has E = 1.

BatchEnsemble (Wen, Tran & Ba, ICLR 2020): one shared weight ``W [in, out]`` (the paper's layout),
per member an input-side fast weight ``r_k [in]``, an output-side fast weight ``s_k [out]`` and a
bias ``b_k [out]``. Member k's weight is ``W ∘ (r_k s_kᵀ)``, so for a row vector x

    y_k = x (W ∘ r_k s_kᵀ) + b_k = s_k ∘ ((r_k ∘ x) W) + b_k

which is the paper's ``φ((W ∘ r_i s_iᵀ)ᵀ x)``: ``r`` multiplies the input, ``s`` the output. (The
seed notebook swaps the two names and shares one bias.)

Weights are stored ``[in, out]``, as in the paper, not ``nn.Linear``'s ``[out, in]``: on the CPU the
first layer's two large matrix products run fastest when their outputs are ``[E·out, B]`` and
``[in, E·out]`` (measured on this project's machine: 186-190 GFLOP/s against 140-143 for the
transposed outputs), and a parameter in that layout takes its gradient without a transposing copy.
On a CPU the first layer's forward product goes through oneDNN where PyTorch has it
(``bench_core.onednn``; on that machine 205-220 GFLOP/s at 2048³ against MKL's 155-186), which
runs it fastest in the plain ``[B, E·out]`` layout, and so do split batching's per-member products
of wide inputs; ``BENCH_ONEDNN=0`` keeps every product on ``torch.mm``. Not on Intel CPUs, where
MKL ran them faster in training steps: there ``torch.mm`` takes them, the forward in the plain
layout too (``onednn.wanted``, ``onednn.mkl_plain_layout``).
``member(k)`` and ``as_linear(k)`` still return plain ``nn.Linear`` layers (``[out, in]``).
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


def mlp_params(sizes: list[int]) -> int:
    """Weights and biases of one MLP with these layer widths."""
    return sum(n_in * n_out + n_out for n_in, n_out in itertools.pairwise(sizes))


def batchensemble_params(sizes: list[int], ensemble_size: int) -> int:
    """Shared W per layer plus, per member and layer, r (in), s (out) and a bias (out)."""
    return sum(n_in * n_out + ensemble_size * (n_in + 2 * n_out) for n_in, n_out in itertools.pairwise(sizes))


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


def _old_ensemble_shape(shape: torch.Size, first: bool) -> tuple[int, ...]:
    """A ``VectorizedEnsemble`` weight's shape in the version-1 layout ``[E, out, in]``."""
    return (shape[1], shape[2], shape[0]) if first else (shape[0], shape[2], shape[1])


def _saved_in_old_layout(local_metadata: dict, stored: dict, new_shapes: dict, old_shapes: dict) -> bool:
    """Whether a module's weights in a state dict are in its version-1 layout (to be converted on load).

    With the version saved (``state_dict()`` writes it in the dict's metadata), the version says.
    Without it (a dict rebuilt without torch's metadata) the shapes say: the old layout where a
    weight fits only the old shape, else the current one, also where every weight is square and
    the shapes cannot tell (such a dict comes from this code, not from files of version 1, which
    carry their version).
    """
    version = local_metadata.get("version")
    if version is not None:
        return version < 2
    for key, tensor in stored.items():
        if tensor is None or not isinstance(tensor, torch.Tensor):
            continue
        if tuple(tensor.shape) == tuple(new_shapes[key]):
            continue
        if tuple(tensor.shape) == tuple(old_shapes[key]):
            return True
    return False


class VectorizedEnsemble(nn.Module):
    """A classic ensemble with every member's weights stacked: one batched pass for all members.

    The first layer holds ``weights[0] [in, E, out]``: every member's weight side by side, so that a
    shared input ``[B, D]`` goes through it as one matrix product (``shared_input_linear``). Layer
    l > 0 holds ``weights[l] [E, in, out]``. Member k's slices, transposed, are exactly the weights
    of the k-th plain MLP's ``nn.Linear`` layers; ``biases[l] [E, out]``.
    """

    _version = 2  # 1: every weight stored [E, out, in] (converted on load)

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
            h = ensemble_linear(x, self.weights[0].transpose(0, 1), self.biases[0])  # (E, B, out)
        for li in range(1, n_layers):
            h = ensemble_linear(F.relu(h), self.weights[li], self.biases[li])  # (E, B, out)
        return h.contiguous()  # (E, B, C)

    def member_linear_weight(self, li: int, k: int) -> torch.Tensor:
        """Layer ``li``'s weight of member k in ``nn.Linear``'s layout ``[out, in]`` (a view)."""
        _check_member(k, self.ensemble_size)
        weight = self.weights[li]
        return (weight[:, k] if li == 0 else weight[k]).t()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        stored = {li: state_dict.get(f"{prefix}weights.{li}") for li in range(len(self.weights))}
        old_shapes = {li: _old_ensemble_shape(w.shape, li == 0) for li, w in enumerate(self.weights)}
        if _saved_in_old_layout(local_metadata, stored, {li: w.shape for li, w in enumerate(self.weights)}, old_shapes):
            for li in range(len(self.weights)):
                key = f"{prefix}weights.{li}"
                if key in state_dict:
                    old = state_dict[key]
                    state_dict[key] = old.permute(2, 0, 1).contiguous() if li == 0 else old.transpose(1, 2).contiguous()
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
    """``nn.Linear`` weights ``[out, in]`` of E members, stacked ``[in, E, out]`` (first) or ``[E, in, out]``."""
    stacked = torch.stack([w.t() for w in linear_weights], dim=1 if first else 0)
    return stacked.contiguous()


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
    """E linear maps of one shared input: member k computes ``x @ weight[:, k] + bias[k]``.

    Args:
        x: ``[B, in]``.
        weight: ``[in, E, out]``, the members side by side.
        bias: ``[E, out]``.

    Returns:
        ``[E, B, out]`` (a transposed view of an ``[E, out, B]`` result).
    """
    _check_shared_input(x, weight.size(0))
    return _SharedInputLinear.apply(x, weight, bias)


class _SharedInputLinear(torch.autograd.Function):
    """``shared_input_linear`` with its two matrix products laid out as this CPU runs them fastest.

    Forward computes ``zᵀ = Wᵀ xᵀ`` as ``[E·out, B]``; backward computes the weight gradient
    ``xᵀ dz`` as ``[in, E·out]``, which is the parameter's own layout. With ``z = x W`` as
    ``[B, E·out]`` and the gradient ``dzᵀ x`` as ``[E·out, in]``, MKL ran the same products at
    140-143 instead of 186-190 GFLOP/s (batch 128, in 3072, E·out 640, on this project's machine),
    and a classic training step took 12.8 instead of 9.3 ms. Where oneDNN is in use (CPU float32,
    ``bench_core.onednn``) the forward is ``z = x W`` through it instead: 196-205 GFLOP/s on that
    machine, and classic training steps about 0.9× as long (paired fresh processes); on Intel CPUs
    it is ``z = x W`` through ``torch.mm`` (``_members_product``).
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
    """``shared_input_linear``'s gradients ``(dx [B, in], dW [in, E, out], db [E, out])`` from ``dy [E, B, out]``.

    The weight gradient ``xᵀ dz`` comes out ``[in, E·out]``, the parameter's own layout (see
    ``_SharedInputLinear``); a gradient not needed is None.
    """
    n_in, n_members, n_out = weight.shape
    grad_z = grad_y.transpose(0, 1).reshape(x.size(0), -1)  # (B, E*out)
    grad_x = grad_weight = grad_bias = None
    if need_x:
        grad_x = grad_z @ weight.view(n_in, -1).t()  # (B, in)
    if need_w:
        grad_weight = (x.t() @ grad_z).view(n_in, n_members, n_out)  # (in, E, out)
    if need_b:
        grad_bias = grad_y.sum(1)  # (E, out)
    return grad_x, grad_weight, grad_bias


def _members_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Every member's ``x @ weight[:, k] (+ bias[k])`` in one product: ``x [B, in]``, ``weight [in, E, out]``.

    Returns ``[E, B, out]``, a transposed view. Through oneDNN where it is in use, in the plain
    layout ``z = x W`` ``[B, E·out]``, which it runs fastest; otherwise through ``torch.mm`` (MKL)
    in the layout it runs fastest on this CPU (``onednn.mkl_plain_layout``): the plain one on Intel
    CPUs, else ``zᵀ = Wᵀ xᵀ`` ``[E·out, B]`` (``_SharedInputLinear``), as on every other device.
    """
    n_in, n_members, n_out = weight.shape
    w = weight.view(n_in, -1)  # (in, E*out)
    via_onednn = onednn.usable(x)
    if via_onednn or (x.device.type == "cpu" and onednn.mkl_plain_layout()):
        product = onednn.matmul if via_onednn else onednn.mm
        z = product(x, w, None if bias is None else bias.reshape(-1))  # (B, E*out)
        return z.view(x.size(0), n_members, n_out).transpose(0, 1)
    z_t = w.t() @ x.t() if bias is None else torch.addmm(bias.reshape(-1, 1), w.t(), x.t())  # (E*out, B)
    return z_t.view(n_members, n_out, -1).transpose(1, 2)


ONEDNN_MIN_IN = 2048  # narrowest input whose per-member products go through oneDNN (shared_weight_product)


def shared_weight_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight`` for ``x [rows, in]``, ``weight [in, out]``, with its gradients.

    On a CPU in float32, for inputs at least ``ONEDNN_MIN_IN`` wide, the forward and the input
    gradient go through oneDNN (``bench_core.onednn``) and the weight gradient through
    ``torch.mm``, which ran it as fast. Split batching's first layer (125 × 3072 by 3072 × 128)
    took 0.87× as long forward and backward; narrower layers took as long or longer (784 wide
    1.0-1.08×, the hidden 128 × 128 1.2-1.7×: the function's own overhead; ad-hoc micro-benchmark
    on this project's machine). Elsewhere: ``x @ weight`` through autograd.
    """
    if through_onednn(x):
        return _SharedWeightProduct.apply(x, weight)
    return x @ weight


def through_onednn(x: torch.Tensor, in_features: int | None = None) -> bool:
    """Whether ``shared_weight_product`` takes ``x``'s forward and input gradient through oneDNN.

    ``in_features``: the product's input width, where ``x`` is not yet the product's input (the
    C++ steps decide for every layer from the batch); ``x``'s last size otherwise.
    """
    width = x.size(-1) if in_features is None else in_features
    return width >= ONEDNN_MIN_IN and onednn.usable(x)


class _SharedWeightProduct(torch.autograd.Function):
    """``shared_weight_product`` through oneDNN: ``z = x W``, ``dx = dz Wᵀ``, ``dW = xᵀ dz``."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return onednn.matmul(x, weight)  # (rows, out)

    @staticmethod
    def backward(ctx, grad_z):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn.matmul(grad_z, weight.t())  # (rows, in)
        if ctx.needs_input_grad[1]:
            grad_weight = x.t() @ grad_z  # (in, out)
        return grad_x, grad_weight


class BatchEnsembleLinear(nn.Module):
    """A BatchEnsemble linear layer: ``nn.Linear``'s signature plus ``ensemble_size``.

    Member k computes ``y_k = x (W ∘ r_k s_kᵀ) + b_k``, where ``W [in, out]`` is shared (the
    paper's layout; ``nn.Linear`` stores ``[out, in]``), ``r [E, in]`` is the input-side fast
    weight, ``s [E, out]`` the output-side fast weight and ``bias [E, out]`` is per member.

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

    _version = 2  # 1: weight stored [out, in] (converted on load)

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
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.r = nn.Parameter(torch.empty(ensemble_size, in_features))  # input side
        self.s = nn.Parameter(torch.empty(ensemble_size, out_features))  # output side
        self.bias = nn.Parameter(torch.empty(ensemble_size, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # W and each member's bias as nn.Linear initialises them (drawn [out, in], stored transposed).
        linear_weight = torch.empty(
            self.out_features, self.in_features, dtype=self.weight.dtype, device=self.weight.device
        )
        nn.init.kaiming_uniform_(linear_weight, a=math.sqrt(5))
        with torch.no_grad():
            self.weight.copy_(linear_weight.t())
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
        full = self.weight.t().unsqueeze(0) * fast
        return full if k is None else full[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            _check_shared_input(x, self.in_features)
            return _SharedInputBatchEnsemble.apply(x, self.weight, self.r, self.s, self.bias)  # (E, B, out)
        _check_members_dim(x, self.ensemble_size, self.in_features)
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
        shape = self.weight.shape
        stored = {0: state_dict.get(key)}
        if key in state_dict and _saved_in_old_layout(local_metadata, stored, {0: shape}, {0: shape[::-1]}):
            state_dict[key] = state_dict[key].t().contiguous()  # saved [out, in]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"ensemble_size={self.ensemble_size}, init={self.init}"
        )


class _SharedInputBatchEnsemble(torch.autograd.Function):
    """BatchEnsemble on an input shared by all members (the first layer), with a lean backward.

    Forward folds r into per-member weights ``[in, E, out]`` and runs every member in one GEMM that
    reads the input once: ``zᵀ = [W ∘ r_1 1ᵀ, ..., W ∘ r_E 1ᵀ]ᵀ xᵀ``, then ``y = z ∘ s + b``.
    Backward makes one GEMM for ``G = xᵀ dz`` ``[in, E, out]`` (what each member's folded weight
    would receive) and derives both ``dW = Σ_k G_k ∘ r_k 1ᵀ`` and ``dr_k = Σ_o G_k ∘ W`` from it,
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
    n_out = weight.size(1)
    grad_bias = grad_y.sum(1)  # (E, out)
    grad_s = (grad_y * z).sum(1)  # (E, out)
    grad_z = grad_y.new_empty(x.size(0), n_members, n_out)  # (B, E, out): written as [E, B, out]
    torch.mul(grad_y, s.unsqueeze(1), out=grad_z.transpose(0, 1))  # one pass, no transposing copy
    grad_z = grad_z.view(x.size(0), -1)  # (B, E*out)
    grad_folded = (x.t() @ grad_z).view(n_in, n_members, n_out)  # (in, E, out)
    grad_weight, grad_r = _fold_grads(grad_folded, weight, r)  # (in, out), (E, in)
    grad_x = None
    if need_x:
        grad_x = grad_z @ _fold(weight, r).view(n_in, -1).t()  # (B, in)
    return grad_x, grad_weight, grad_r, grad_s, grad_bias


FOLD_GRAD_ROWS = 512  # CPU, eager: input rows per block of _fold_grads; an [512, E, out] block stays in cache


def _fold_grads(grad_folded: torch.Tensor, weight: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dW = Σ_k G_k ∘ r_k 1ᵀ`` ``[in, out]`` and ``dr_k = Σ_o G_k ∘ W`` ``[E, in]``, from ``G [in, E, out]``.

    On the CPU a kernel compiled once per model size (``kernels.run_fold_grads``) makes each
    reduction one loop over ``G``: 0.14-0.19 ms against 0.68-0.91 ms eager (in 3072, E 5, out 128),
    and a BatchEnsemble training step 0.94× as long (median of 10 pairs of fresh processes, the
    order alternated; ad-hoc script). Without it
    (``BENCH_COMPILE=0``, or where it can't be compiled) the eager products and sums go block by
    block over the input rows, so that each block of ``G`` is read from cache by the second
    reduction and the temporaries stay block-sized: over the whole ``[in, E, out]`` at once they
    took 2.0-3.1 ms, in blocks of 512 rows 1.4-2.0 ms (``G`` cold; ad-hoc timing on this project's
    machine). The loop is over input blocks, never over members. Elsewhere (CUDA) it is one eager
    block: each block costs four kernel launches, and a GPU step of these small models is bound
    by its launches, not its memory traffic.
    """
    on_cpu = grad_folded.device.type == "cpu"
    if on_cpu and (compiled := kernels.run_fold_grads(grad_folded, weight, r)) is not None:
        return compiled
    n_in, n_members, n_out = grad_folded.shape
    rows = FOLD_GRAD_ROWS if on_cpu else n_in
    r_t = r.t()  # (in, E)
    grad_weight = weight.new_empty(n_in, n_out)
    grad_r_t = weight.new_empty(n_in, n_members)
    for a in range(0, n_in, rows):
        b = min(a + rows, n_in)
        block = grad_folded[a:b]  # (rows, E, out)
        torch.sum(block * r_t[a:b].unsqueeze(2), 1, out=grad_weight[a:b])
        torch.sum(block * weight[a:b].unsqueeze(1), 2, out=grad_r_t[a:b])
    return grad_weight, grad_r_t.t().contiguous()


def _fold(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``[in, E, out]``: member k's slice is ``W ∘ r_k 1ᵀ``, written contiguous."""
    folded = weight.new_empty(weight.size(0), r.size(0), weight.size(1))
    return torch.mul(weight.unsqueeze(1), r.t().unsqueeze(2), out=folded)


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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        # A dict without torch's metadata (no versions anywhere) in the old [out, in] layout: where one
        # layer's shape shows it, every layer is converted here, square ones too, which alone could
        # not tell (each layer then finds its weight in the current layout).
        if local_metadata.get("version") is None:
            keys = {i: f"{prefix}layers.{i}.weight" for i in range(len(self.layers))}
            stored = {i: state_dict.get(key) for i, key in keys.items()}
            shapes = {i: layer.weight.shape for i, layer in enumerate(self.layers)}
            if _saved_in_old_layout({}, stored, shapes, {i: shape[::-1] for i, shape in shapes.items()}):
                for i, key in keys.items():
                    if isinstance(stored[i], torch.Tensor) and stored[i].dim() == 2:
                        state_dict[key] = stored[i].t().contiguous()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)

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


def _check_members_dim(x: torch.Tensor, ensemble_size: int, n_in: int | None = None) -> None:
    if x.dim() != 3 or x.size(0) != ensemble_size:
        raise ValueError(f"expected input [B, D] or [{ensemble_size}, B, D], got {tuple(x.shape)}")
    if n_in is not None and x.size(2) != n_in:
        raise ValueError(f"expected input [B, {n_in}] or [{ensemble_size}, B, {n_in}], got {tuple(x.shape)}")


def _check_shared_input(x: torch.Tensor, n_in: int) -> None:
    if x.dim() != 2 or x.size(1) != n_in:
        raise ValueError(f"expected input [B, {n_in}], got {tuple(x.shape)}")
