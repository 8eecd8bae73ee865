"""A hypernetwork ``H: R^M -> R^|theta|``: an MLP from a task embedding to target weights."""

from __future__ import annotations

import torch
from torch import nn

from . import intervals


class HyperNetwork(nn.Module):
    """``H_eta(e)``: ReLU MLP ``M -> hidden... -> numel`` (M = 24, hidden 100-100 in the paper's setting).

    ``forward`` maps a point embedding to a flat weight vector; ``forward_interval`` maps a box
    ``centre ± radius`` to a box of weight vectors containing ``H(z)`` for every ``z`` in it.

    Every layer keeps PyTorch's default ``nn.Linear`` initialisation (the HNET and HyperInterval
    papers' hypernetworks start from their framework's default too). An earlier version shrank the
    first layer to 0.01x, which made ``H`` almost constant in the embedding: every task then trained
    one shared target network and the learner forgot like fine-tuning (issue 25).
    """

    def __init__(self, embedding_dim: int, numel: int, hidden: tuple[int, ...] = (100, 100)):
        super().__init__()
        sizes = (int(embedding_dim), *(int(h) for h in hidden), int(numel))
        if any(s < 1 for s in sizes):
            raise ValueError(f"HyperNetwork sizes {sizes}: every layer needs at least one unit")
        self.embedding_dim = sizes[0]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        x = embedding
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def forward_interval(self, centre: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for k, layer in enumerate(self.layers):
            centre, radius = intervals.linear(centre, radius, layer.weight, layer.bias)
            if k < len(self.layers) - 1:
                centre, radius = intervals.relu(centre, radius)
        return centre, radius
