"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) with a diagonal Fisher.

After task ``k`` the learner stores ``theta*_k`` and the diagonal of the empirical Fisher
``F_k = E[(d log p(y|x) / d theta)^2]`` over the task's training samples (per-sample gradients
with ``torch.func``); later tasks add ``lambda / 2 * sum_k sum_j F_k,j (theta_j - theta*_k,j)^2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .baselines import FineTune


class EWC(FineTune):
    """Fine-tuning plus the EWC penalty. ``ewc_lambda`` (default 1000) must be >= 0."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, seed: int = 0, ewc_lambda: float = 1000.0):
        if not ewc_lambda >= 0:
            raise ValueError(f"ewc_lambda={ewc_lambda}: must be >= 0")
        super().__init__(model, lr, seed)
        self.ewc_lambda = float(ewc_lambda)
        self.anchors: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (theta*, Fisher) per task

    def fisher_diagonal(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        params = {name: p.detach() for name, p in self.model.named_parameters()}

        def log_likelihood(p, xi, yi):
            logits = torch.func.functional_call(self.model, p, (xi[None],))
            return -F.cross_entropy(logits, yi[None])

        grads = torch.func.vmap(torch.func.grad(log_likelihood), in_dims=(None, 0, 0))(params, x, y)
        return {name: g.pow(2).mean(0) for name, g in grads.items()}

    def end_task(self, x: torch.Tensor, y: torch.Tensor) -> None:
        theta = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.anchors.append((theta, self.fisher_diagonal(x, y)))

    def penalty(self) -> torch.Tensor:
        total = torch.zeros(())
        if not self.anchors or self.ewc_lambda == 0:
            return total
        for theta, fisher in self.anchors:
            for name, p in self.model.named_parameters():
                total = total + (fisher[name] * (p - theta[name]).pow(2)).sum()
        return self.ewc_lambda / 2 * total
