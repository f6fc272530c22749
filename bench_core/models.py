"""Models: a single MLP, a classic ensemble of MLPs (two execution modes), BatchEnsemble.

Every model takes ``x`` shaped ``[B, D]`` (one batch shared by all members) or ``[E, B, D]``
(one batch per member) and returns logits shaped ``[E, B, C]``; a single MLP has E = 1.

BatchEnsemble (Wen, Tran & Ba, ICLR 2020) in PyTorch's ``[out, in]`` weight layout: one shared
weight ``W [out, in]``, per member an input-side fast weight ``r_k [in]``, an output-side fast weight
``s_k [out]`` and a bias ``b_k [out]``. Member k's weight is ``W ∘ (s_k r_kᵀ)``, so

    y_k = (W ∘ s_k r_kᵀ) x + b_k = s_k ∘ (W (r_k ∘ x)) + b_k

which is the paper's ``φ((W ∘ r_i s_iᵀ)ᵀ x)`` with its ``W`` stored ``[in, out]``: ``r`` multiplies the
input, ``s`` the output. (The seed notebook swaps the two names and shares one bias.)
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

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

    Layer l holds ``weight_l [E, out, in]`` and ``bias_l [E, out]``; member k's slices are exactly
    the weight and bias of the k-th ``nn.Linear`` of a plain MLP. A shared input ``[B, D]`` goes
    through the first layer as one matrix product with all members' weights side by side.
    """

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
            self.weights.append(nn.Parameter(torch.stack([lin.weight.detach() for lin in linears])))
            self.biases.append(nn.Parameter(torch.stack([lin.bias.detach() for lin in linears])))

    @classmethod
    def from_members(cls, members: list[nn.Sequential]) -> VectorizedEnsemble:
        """Stack the weights of plain MLPs (as built by ``build_mlp``) into one vectorized ensemble."""
        linears = [[m for m in seq if isinstance(m, nn.Linear)] for seq in members]
        sizes = [linears[0][0].in_features] + [lin.out_features for lin in linears[0]]
        model = cls(sizes, len(members))
        with torch.no_grad():
            for li in range(len(sizes) - 1):
                model.weights[li].copy_(torch.stack([ls[li].weight for ls in linears]))
                model.biases[li].copy_(torch.stack([ls[li].bias for ls in linears]))
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_layers = len(self.weights)
        h = x
        for li in range(n_layers):
            h = ensemble_linear(h, self.weights[li], self.biases[li])  # (E, B, out)
            if li < n_layers - 1:
                h = F.relu(h)
        return h  # (E, B, C)

    def member(self, k: int) -> nn.Sequential:
        """Member k as a plain MLP holding copies of its weights."""
        _check_member(k, self.ensemble_size)
        seq = build_mlp(self.sizes)
        with torch.no_grad():
            for li, lin in enumerate(m for m in seq if isinstance(m, nn.Linear)):
                lin.weight.copy_(self.weights[li][k])
                lin.bias.copy_(self.biases[li][k])
        return seq.to(self.weights[0].device)


def ensemble_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """E linear maps at once: member k computes ``x_k @ weight[k].T + bias[k]``.

    Args:
        x: ``[B, in]`` shared by all members, or ``[E, B, in]`` one batch per member.
        weight: ``[E, out, in]``.
        bias: ``[E, out]``.

    Returns:
        ``[E, B, out]``.
    """
    n_members, n_out, n_in = weight.shape
    if x.dim() == 2:
        # One GEMM for all members: (B, in) @ (in, E*out), weights side by side.
        y = torch.addmm(bias.reshape(1, -1), x, weight.reshape(n_members * n_out, n_in).t())  # (B, E*out)
        return y.view(x.size(0), n_members, n_out).transpose(0, 1)  # (E, B, out)
    _check_members_dim(x, n_members)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))  # (E, B, out)


class BatchEnsembleLinear(nn.Module):
    """A BatchEnsemble linear layer: ``nn.Linear``'s signature plus ``ensemble_size``.

    Member k computes ``y_k = (W ∘ s_k r_kᵀ) x_k + b_k``, where ``W [out, in]`` is shared,
    ``r [E, in]`` is the input-side fast weight, ``s [E, out]`` the output-side fast weight and
    ``bias [E, out]`` is per member.

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
        """``W ∘ (s_k r_kᵀ)``: ``[out, in]`` for member k, or ``[E, out, in]`` for all."""
        fast = self.s.unsqueeze(2) * self.r.unsqueeze(1)  # (E, out, in)
        full = self.weight.unsqueeze(0) * fast
        return full if k is None else full[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return _SharedInputBatchEnsemble.apply(x, self.weight, self.r, self.s, self.bias)  # (E, B, out)
        _check_members_dim(x, self.ensemble_size)
        # Per-member input: scale by r, one GEMM with the shared W over all E*B rows, scale by s.
        xr = x * self.r.unsqueeze(1)  # (E, B, in)
        z = xr.reshape(-1, self.in_features) @ self.weight.t()  # (E*B, out)
        z = z.view(self.ensemble_size, -1, self.out_features)  # (E, B, out)
        return torch.addcmul(self.bias.unsqueeze(1), z, self.s.unsqueeze(1))  # (E, B, out)

    def as_linear(self, k: int) -> nn.Linear:
        """Member k as a plain ``nn.Linear`` (weight ``W ∘ s_k r_kᵀ``, bias ``b_k``)."""
        lin = nn.Linear(self.in_features, self.out_features, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.member_weight(k))
            lin.bias.copy_(self.bias[k])
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"ensemble_size={self.ensemble_size}, init={self.init}"
        )


class _SharedInputBatchEnsemble(torch.autograd.Function):
    """BatchEnsemble on an input shared by all members (the first layer), with a lean backward.

    Forward folds r into per-member weights and runs every member in one GEMM that reads the
    input once: ``z = x @ [W ∘ 1r_1ᵀ; ...; W ∘ 1r_Eᵀ]ᵀ``, then ``y = z ∘ s + b``. Backward makes
    one GEMM for ``G_k = dz_kᵀ x`` (what member k's folded weight would receive) and derives
    both ``dW = Σ_k G_k ∘ 1r_kᵀ`` and ``dr_k = Σ_o G_k ∘ W`` from it, where autograd's generic
    broadcasting rules would allocate and reduce several [E, out, in] temporaries.
    """

    @staticmethod
    def forward(ctx, x, weight, r, s, bias):
        n_members, n_in = r.shape
        n_out = weight.size(0)
        folded = weight.unsqueeze(0) * r.unsqueeze(1)  # (E, out, in)
        z = (x @ folded.view(n_members * n_out, n_in).t()).view(x.size(0), n_members, n_out)  # (B, E, out)
        ctx.save_for_backward(x, weight, r, s, z)
        return torch.addcmul(bias, z, s).transpose(0, 1)  # (E, B, out)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, r, s, z = ctx.saved_tensors
        n_members, n_in = r.shape
        grad_y = grad_y.transpose(0, 1)  # (B, E, out)
        grad_bias = grad_y.sum(0)  # (E, out)
        grad_s = (grad_y * z).sum(0)  # (E, out)
        grad_z = (grad_y * s).reshape(x.size(0), -1)  # (B, E*out)
        grad_folded = (grad_z.t() @ x).view(n_members, -1, n_in)  # (E, out, in)
        grad_weight = (grad_folded * r.unsqueeze(1)).sum(0)  # (out, in)
        grad_r = torch.linalg.vecdot(grad_folded, weight.unsqueeze(0), dim=1)  # (E, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            folded = weight.unsqueeze(0) * r.unsqueeze(1)  # (E, out, in)
            grad_x = grad_z @ folded.view(-1, n_in)  # (B, in)
        return grad_x, grad_weight, grad_r, grad_s, grad_bias


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
        return h  # (E, B, C)

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
