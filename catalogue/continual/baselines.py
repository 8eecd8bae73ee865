"""The reference points of a continual-learning comparison: fine-tuning (lower bound) and joint
training (upper bound), on the same target MLP the hypernetwork methods generate.

The network is one ``nn.Module`` shared by every task, with the task's head width as its output
(64-100-100-2 on split digits: every task's local labels 0/1 land on the same two outputs, exactly
as the single network ``f(x; H(u))`` of HyperInterval's universal embedding has to serve them).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .hnet import batches, check_task_data


def mlp(in_features: int = 64, hidden: tuple[int, ...] = (100, 100), out_features: int = 2) -> nn.Sequential:
    """The target MLP as an ordinary module."""
    sizes = (in_features, *hidden, out_features)
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FineTune:
    """Train one network on the tasks in sequence with nothing against forgetting.

    Args:
        model: the network (its output width is the head size).
        lr: Adam learning rate (default 1e-3; a fresh Adam per task, as for the hypernetwork methods).
        seed: seeds the batch order.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, seed: int = 0):
        if not lr > 0:
            raise ValueError(f"lr={lr}: must be > 0")
        self.model = model
        self.lr = float(lr)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.tasks_seen = 0

    @property
    def classes(self) -> int:
        return [m for m in self.model.modules() if isinstance(m, nn.Linear)][-1].out_features

    def penalty(self) -> torch.Tensor:
        """What the loss adds against forgetting (nothing for fine-tuning)."""
        return torch.zeros(())

    def end_task(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Hook called with a task's data once it is learned."""

    def learn_task(self, x: torch.Tensor, y: torch.Tensor, epochs: int = 30, batch_size: int = 64,
                   on_epoch: Callable[[int], None] | None = None) -> int:
        check_task_data(x, y, self.classes)
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs={epochs}, batch_size={batch_size}: both must be >= 1")
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr, fused=True)  # as for the hypernetworks
        for epoch in range(epochs):
            for index in batches(x.shape[0], batch_size, self.generator):
                loss = F.cross_entropy(self.model(x[index]), y[index]) + self.penalty()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if on_epoch is not None:
                on_epoch(epoch)
        self.end_task(x, y)
        self.tasks_seen += 1
        return self.tasks_seen - 1

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, task: int | None = None) -> float:
        return float((self.model(x).argmax(-1) == y).float().mean())


class Joint(FineTune):
    """The upper bound: every task's data at once, for the same number of passes over each sample."""

    def learn_all(self, tasks: list[tuple[torch.Tensor, torch.Tensor]], epochs: int = 30, batch_size: int = 64,
                  on_epoch: Callable[[int], None] | None = None) -> None:
        if not tasks:
            raise ValueError("Joint.learn_all: no tasks given")
        for x, y in tasks:
            check_task_data(x, y, self.classes)
        x = torch.cat([t[0] for t in tasks])
        y = torch.cat([t[1] for t in tasks])
        self.learn_task(x, y, epochs, batch_size, on_epoch)
        self.tasks_seen = len(tasks)
