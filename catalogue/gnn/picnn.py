"""Partially input-convex networks (Amos, Xu & Kolter, 2017), the building block of the energy.

A PICNN f(h; u) is convex in h for every u: each layer is
z_{k+1} = softplus(W_k^z⁺ z_k + W_k^h h + U_k u + b_k), with W^z⁺ = softplus(raw) ≥ 0,
softplus convex and non-decreasing, so convexity in h passes from layer to layer; the
scalar output is a non-negative combination of the last layer plus an affine term in h.
The features u enter only through the (arbitrary) biases U_k u.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PICNN(nn.Module):
    """f(h; u): convex in ``h`` (dimension ``state_dim``), arbitrary in ``u`` (dimension ``feature_dim``).

    Args:
        state_dim: size of the convex argument.
        feature_dim: size of the feature argument.
        width (default 32): width of each layer.
        layers (default 2): number of softplus layers.
    """

    def __init__(self, state_dim: int, feature_dim: int, width: int = 32, layers: int = 2):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers={layers}: expected at least 1")
        self.state_paths = nn.ModuleList(nn.Linear(state_dim, width, bias=False) for _ in range(layers))
        self.feature_paths = nn.ModuleList(nn.Linear(feature_dim, width) for _ in range(layers))
        # raw weights of the z -> z paths; softplus(-4) ~ 0.018 keeps the initial curvature small
        self.raw_z = nn.ParameterList(nn.Parameter(torch.full((width, width), -4.0) + 0.1 * torch.randn(width, width))
                                      for _ in range(layers - 1))
        self.raw_out = nn.Parameter(torch.full((width,), -3.0))
        self.out_state = nn.Linear(state_dim, 1, bias=False)
        self.out_feature = nn.Linear(feature_dim, 1)

    def feature_terms(self, u: torch.Tensor) -> torch.Tensor:
        """The feature path's biases U_k u + b_k of every layer and of the output, concatenated.

        They do not depend on h, so a solver computes them once and reuses them every iteration.
        """
        return torch.cat([path(u) for path in self.feature_paths] + [self.out_feature(u)], dim=-1)

    def forward(self, h: torch.Tensor, u: torch.Tensor | None = None, terms: torch.Tensor | None = None) -> torch.Tensor:
        """f(h; u); pass ``terms = feature_terms(u)`` instead of ``u`` to reuse them."""
        terms = self.feature_terms(u) if terms is None else terms
        width = self.raw_out.numel()
        biases = [terms[..., k * width:(k + 1) * width] for k in range(len(self.feature_paths))]
        z = F.softplus(self.state_paths[0](h) + biases[0])
        for raw, state_path, bias in zip(self.raw_z, self.state_paths[1:], biases[1:]):
            z = F.softplus(z @ F.softplus(raw).t() + state_path(h) + bias)
        return z @ F.softplus(self.raw_out) + self.out_state(h).squeeze(-1) + terms[..., -1]
