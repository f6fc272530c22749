"""The seed notebook's pipeline, kept as the baseline the speed benchmark measures against.

Everything here copies ``/work/shared/seed/000_498addaec2b1bfba.txt`` on purpose, slow parts
included: images are kept as uint8 arrays and turned into tensors one at a time by torchvision
transforms (``ToTensor`` then ``Normalize``) inside a ``DataLoader`` with 2 worker processes
(not persistent: every pass over the data forks them anew); a classic ensemble trains its
members one after another, each with its own pass; the seed's BatchEnsemble loops the loss
over the members in Python. Only the data is different: random images held in memory
(torchvision's CIFAR10 class also holds uint8 arrays and makes a PIL image per item), so that
nothing needs downloading.

Nothing of this module is used for training in the workbench; ``bench_core.bench`` times it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn, optim
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchvision import transforms

SEED_BATCH_SIZE = 128  # the seed's train_loader
SEED_EVAL_BATCH_SIZE = 256  # the seed's val_loader
SEED_NUM_WORKERS = 2  # both of the seed's loaders
SEED_LR = 1e-3


class InMemoryImages(TorchDataset):
    """Random uint8 images served as torchvision's CIFAR10 serves its own: a PIL image per item, then transform.

    Args:
        n: number of images.
        shape: ``(C, H, W)`` of one image.
        num_classes: labels are drawn from ``[0, num_classes)``.
        seed: seed of the pixels and labels.
    """

    def __init__(self, n: int, shape: tuple[int, int, int], num_classes: int = 10, seed: int = 0) -> None:
        channels, height, width = shape
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, size=(n, height, width, channels), dtype=np.uint8)  # HWC, like CIFAR10.data
        if channels == 1:
            self.data = self.data[..., 0]  # (N, H, W), like MNIST
        self.targets = rng.integers(0, num_classes, size=n).tolist()
        self.transform = seed_transform(channels)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.data[index])  # as CIFAR10.__getitem__ / MNIST.__getitem__
        return self.transform(img), self.targets[index]


def seed_transform(channels: int) -> transforms.Compose:
    """The seed's per-image transform (its Normalize has one 0.5 per channel)."""
    half = (0.5,) * channels
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(half, half)])


def seed_loader(dataset: TorchDataset, batch_size: int = SEED_BATCH_SIZE, shuffle: bool = True) -> DataLoader:
    """The seed's DataLoader: 2 workers, not persistent, no pinned memory."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=SEED_NUM_WORKERS)


# ------------------------------------------------------------------------------------------------
# The seed's models, copied from the notebook (section 3 and 4). Not the workbench's models.
# ------------------------------------------------------------------------------------------------


class SeedMLP(nn.Module):
    """The seed's MLP (its section 3), with the hidden widths passed in."""

    def __init__(self, in_dim: int = 3072, hidden: int = 128, out_dim: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        return self.net(x)


class SeedBatchEnsembleLinear(nn.Module):
    """The seed's BatchEnsembleLinear (its section 4): shared bias, ``s`` on the input, ``r`` on the output."""

    def __init__(self, in_features: int, out_features: int, ensemble_size: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.ensemble_size = ensemble_size

        # Shared weight and bias
        self.weight = nn.Parameter(torch.Tensor(out_features, in_features))
        self.bias = nn.Parameter(torch.Tensor(out_features))

        # Rank-one factors
        self.r = nn.Parameter(torch.Tensor(ensemble_size, out_features))
        self.s = nn.Parameter(torch.Tensor(ensemble_size, in_features))

        # Init
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.zeros_(self.bias)
        nn.init.normal_(self.r, 1.0, 0.01)
        nn.init.normal_(self.s, 1.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            # First layer: add ensemble dimension
            x = x.unsqueeze(0).expand(self.ensemble_size, -1, -1)  # [E, B, in_features]
        elif x.dim() == 3 and x.size(0) != self.ensemble_size:
            msg = f"Expected first dim={self.ensemble_size}, got {x.size(0)}"
            raise ValueError(msg)

        x = x * self.s.unsqueeze(1)
        y = torch.matmul(x, self.weight.t())
        y = y * self.r.unsqueeze(1) + self.bias
        return y


class SeedBatchEnsembleMLP(nn.Module):
    """The seed's BatchEnsembleMLP (its section 4): three SeedBatchEnsembleLinear layers."""

    def __init__(self, in_dim: int = 3072, hidden: int = 128, out_dim: int = 10, ensemble_size: int = 4) -> None:
        super().__init__()
        self.ensemble_size = ensemble_size
        self.fc1 = SeedBatchEnsembleLinear(in_dim, hidden, ensemble_size)
        self.fc2 = SeedBatchEnsembleLinear(hidden, hidden, ensemble_size)
        self.fc3 = SeedBatchEnsembleLinear(hidden, out_dim, ensemble_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = self.fc3(x)
        return x


# ------------------------------------------------------------------------------------------------
# The seed's training steps: the bodies of its train_ensemble and train_batchensemble loops.
# ------------------------------------------------------------------------------------------------


@dataclass
class SeedLearner:
    """One model with its Adam and loss as the seed sets them up; ``step`` is one pass of its inner loop."""

    model: nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], float]


def classic_learner(in_dim: int, hidden: int, out_dim: int, device: torch.device, lr: float = SEED_LR) -> SeedLearner:
    """One member of the seed's ``train_ensemble``."""
    m_k = SeedMLP(in_dim, hidden, out_dim).to(device)
    opt = optim.Adam(m_k.parameters(), lr=lr)
    lossfn = nn.CrossEntropyLoss()
    m_k.train()

    def step(xb: torch.Tensor, yb: torch.Tensor) -> float:
        x = xb.to(device).float()
        y = yb.to(device).long()
        opt.zero_grad()
        out = m_k(x)
        loss = lossfn(out, y)
        loss.backward()
        total = loss.item()
        opt.step()
        return total

    return SeedLearner(m_k, step)


def batchensemble_learner(
    in_dim: int, hidden: int, out_dim: int, ensemble_size: int, device: torch.device, lr: float = SEED_LR
) -> SeedLearner:
    """The seed's ``train_batchensemble``, with its loss summed over members in a Python loop."""
    model = SeedBatchEnsembleMLP(in_dim, hidden, out_dim, ensemble_size).to(device)
    optimizer = optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step(xb: torch.Tensor, yb: torch.Tensor) -> float:
        x = xb.to(device).float()
        y = yb.to(device).long()

        optimizer.zero_grad()

        # Forward pass: [E, B, out_dim]
        out = model(x)

        # Compute loss per ensemble member
        loss = 0.0
        for e in range(ensemble_size):
            loss += loss_fn(out[e], y)
        loss = loss / ensemble_size

        loss.backward()
        optimizer.step()
        return loss.item()

    return SeedLearner(model, step)


# ------------------------------------------------------------------------------------------------
# Timing one pass of the seed's loop
# ------------------------------------------------------------------------------------------------


@dataclass
class PassTiming:
    """The wall clock of ``n_steps`` steps of one pass over a seed DataLoader.

    Attributes:
        startup_seconds: from ``iter(loader)`` (which forks the workers) until the first batch arrived.
        steady_seconds: every training step, with the wait for each batch after the first.
        steady_steps: the number of training steps in ``steady_seconds``.
        shutdown_seconds: ending the iterator, which joins the worker processes.
    """

    startup_seconds: float
    steady_seconds: float
    steady_steps: int
    shutdown_seconds: float

    def epoch_seconds(self, steps_per_epoch: int) -> float:
        """An epoch of ``steps_per_epoch`` steps: startup and shutdown once, the steady rate for every step."""
        per_step = self.steady_seconds / max(self.steady_steps, 1)
        return self.startup_seconds + self.shutdown_seconds + per_step * steps_per_epoch


def timed_pass(loader: DataLoader, step: Callable[[torch.Tensor, torch.Tensor], float], n_steps: int) -> PassTiming:
    """Run ``n_steps`` training steps of a fresh pass over ``loader`` and time its parts.

    The seed's loader is not persistent, so each epoch forks its workers again; the startup
    is timed apart so that an epoch extrapolated from a few steps pays it once, as the seed does.
    ``step`` reads the loss with ``.item()`` (as the seed does), which also waits for a GPU.
    """
    t0 = time.perf_counter()
    it = iter(loader)
    xb, yb = next(it)
    t1 = time.perf_counter()
    step(xb, yb)
    done = 1
    for xb, yb in it:
        if done >= n_steps:
            break
        step(xb, yb)
        done += 1
    t2 = time.perf_counter()
    del it  # joins the workers, as the end of the seed's for-loop does
    t3 = time.perf_counter()
    return PassTiming(t1 - t0, t2 - t1, done, t3 - t2)


def seed_inference_seconds(models: list[nn.Module], loader: DataLoader, device: torch.device) -> float:
    """Seconds of one pass of the seed's Evaluator over ``loader`` (worker startup included).

    Each batch goes through every model in turn (the seed's ``evaluate_classical_ensemble``; a
    BatchEnsemble is one model), and the argmax predictions are moved to the CPU as the seed does.
    """
    for m in models:
        m.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for xb, _ in loader:
            x = xb.to(device).float()
            for m in models:
                out = m(x)
                preds = torch.argmax(out, dim=-1)
                preds.cpu()
    return time.perf_counter() - t0
