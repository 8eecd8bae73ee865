"""The target network, as a function of a flat weight vector produced by a hypernetwork.

``TargetMLP(64, (100, 100), 2)`` is the 64-100-100-2 multilayer perceptron of the
HyperInterval experiments; it owns no parameters, only the layout of ``theta``
(``W1, b1, W2, b2, ...`` flattened in that order), so the same hypernetwork output can be
evaluated at a point (``forward``) or as an interval (``forward_interval``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import intervals


class TargetMLP:
    """Layout and forward pass of a ReLU MLP whose weights arrive as one flat vector."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (100, 100), out_features: int = 2):
        sizes = (in_features, *hidden, out_features)
        if any(int(s) < 1 for s in sizes):
            raise ValueError(f"TargetMLP sizes {sizes}: every layer needs at least one unit")
        self.sizes = tuple(int(s) for s in sizes)
        self.shapes: list[tuple[int, ...]] = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            self.shapes += [(fan_out, fan_in), (fan_out,)]
        self.numel = sum(math.prod(s) for s in self.shapes)

    @property
    def out_features(self) -> int:
        return self.sizes[-1]

    def unflatten(self, theta: torch.Tensor) -> list[torch.Tensor]:
        if theta.shape != (self.numel,):
            raise ValueError(f"theta has shape {tuple(theta.shape)}; the target MLP {self.sizes} needs ({self.numel},)")
        pieces, start = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            pieces.append(theta[start:start + size].view(shape))
            start += size
        return pieces

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        pieces = self.unflatten(theta)
        layers = len(pieces) // 2
        for k in range(layers):
            x = F.linear(x, pieces[2 * k], pieces[2 * k + 1])
            if k < layers - 1:
                x = F.relu(x)
        return x

    def forward_interval(self, x: torch.Tensor, theta_centre: torch.Tensor,
                         theta_radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit bounds ``(lower, upper)`` over every weight vector in ``theta_centre ± theta_radius``."""
        centres, radii = self.unflatten(theta_centre), self.unflatten(theta_radius)
        layers = len(centres) // 2
        centre, radius = x, torch.zeros_like(x)
        for k in range(layers):
            centre, radius = intervals.interval_weight_linear(centre, radius, centres[2 * k], radii[2 * k],
                                                              centres[2 * k + 1], radii[2 * k + 1])
            if k < layers - 1:
                centre, radius = intervals.relu(centre, radius)
        return centre - radius, centre + radius
