"""Interval bound propagation (IBP) in centre/radius form.

An interval tensor is a pair ``(centre, radius)`` with ``radius >= 0`` elementwise; the
set it stands for is ``[centre - radius, centre + radius]``. Every function here returns
an interval that contains the image of every point of its input interval (soundness),
which is all the non-forgetting guarantee of HyperInterval needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(centre: torch.Tensor, radius: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer with point weights: ``c' = W c + b``, ``r' = |W| r``."""
    return F.linear(centre, weight, bias), F.linear(radius, weight.abs())


def interval_weight_linear(centre: torch.Tensor, radius: torch.Tensor, weight_centre: torch.Tensor,
                           weight_radius: torch.Tensor, bias_centre: torch.Tensor,
                           bias_radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer whose weights are intervals ``W_c ± W_r`` (``W_r >= 0``), input ``z_c ± z_r``.

    ``y_c = W_c z_c + b_c`` and ``y_r = |W_c| z_r + W_r |z_c| + W_r z_r + b_r``: the product of two
    intervals deviates from ``W_c z_c`` by at most those three terms.
    """
    out_centre = F.linear(centre, weight_centre, bias_centre)
    out_radius = F.linear(radius, weight_centre.abs()) + F.linear(centre.abs() + radius, weight_radius) + bias_radius
    return out_centre, out_radius


def monotone(centre: torch.Tensor, radius: torch.Tensor, function) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-decreasing elementwise function maps the bounds to the bounds."""
    lower, upper = function(centre - radius), function(centre + radius)
    return (lower + upper) / 2, (upper - lower) / 2


def relu(centre: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return monotone(centre, radius, F.relu)


def worst_case_logits(lower: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The upper bound for every wrong class and the lower bound for the true class."""
    true = F.one_hot(labels, lower.shape[-1]).bool()
    return torch.where(true, lower, upper)


def worst_case_margin(lower: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``lower[true] - max_{j != true} upper[j]``; positive means every point of the interval classifies correctly."""
    true = F.one_hot(labels, lower.shape[-1]).bool()
    best_wrong = upper.masked_fill(true, float("-inf")).amax(dim=-1)
    return lower.gather(-1, labels[:, None]).squeeze(-1) - best_wrong
