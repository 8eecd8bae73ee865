"""A delayed-gradient simulator: the model of asynchronous and pipelined training used by
Adaptive Braking (Venigalla et al., 2020) and weight prediction (Kosson et al., 2020).

The gradient applied at step t is computed on the weights of step t - D; the first D
steps use the initial weights. :class:`DelayedGradientTrainer` keeps a ring of the last
D + 1 weight snapshots, evaluates the loss on the oldest one, and hands the gradient to
an ordinary torch optimizer stepping the current weights. With ``weight_prediction=True``
each snapshot is replaced by the linear weight prediction of Kosson et al.:
ŵ = w − lr · D · v, the weights extrapolated D steps along the optimizer's velocity
(the SGD ``momentum_buffer``), so the delayed gradient is taken nearer to where the
weights will be when it is applied.

Only parameters are snapshotted; buffers (e.g. batch-norm statistics) stay live.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch


class DelayedGradientTrainer:
    """Train ``model`` with ``optimizer`` on gradients that are ``delay`` steps stale.

    Args:
        model (torch.nn.Module): the model whose parameters ``optimizer`` updates.
        optimizer (torch.optim.Optimizer): any optimizer over (some of) the model's parameters.
        delay (int, default 0): D >= 0; 0 is ordinary training.
        weight_prediction (bool, default False): snapshot ŵ = w − lr·D·v instead of w
            (v = the optimizer state's ``momentum_buffer``, zero before the first step;
            lr = the parameter group's learning rate at snapshot time).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, delay: int = 0,
                 weight_prediction: bool = False):
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"delay={delay!r}: expected an integer >= 0")
        self.model, self.optimizer, self.delay = model, optimizer, delay
        self.weight_prediction = bool(weight_prediction)
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._lrs = [group for group in optimizer.param_groups for _ in group["params"]]
        self._ring: deque[list[torch.Tensor]] = deque(maxlen=delay + 1)
        self.steps = 0

    def _snapshot(self) -> list[torch.Tensor]:
        if not self.weight_prediction or self.delay == 0:
            return [p.detach().clone() for p in self._params]
        snapshot = []
        for p, group in zip(self._params, self._lrs):
            velocity = self.optimizer.state.get(p, {}).get("momentum_buffer")
            w = p.detach().clone()
            if velocity is not None:
                w.add_(velocity, alpha=-group["lr"] * self.delay)
            snapshot.append(w)
        return snapshot

    def step(self, compute_loss: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor:
        """One training step: ``compute_loss(model)`` is evaluated on the stale weights,
        its gradient is applied to the current weights. Returns that (stale) loss, detached."""
        self._ring.append(self._snapshot())
        stale = self._ring[0]  # weights of step t - D (w_0 during the first D steps)
        current = [p.detach().clone() for p in self._params]
        with torch.no_grad():
            for p, w in zip(self._params, stale):
                p.copy_(w)
        self.optimizer.zero_grad(set_to_none=True)
        loss = compute_loss(self.model)
        loss.backward()
        with torch.no_grad():
            for p, w in zip(self._params, current):
                p.copy_(w)
        self.optimizer.step()
        self.steps += 1
        return loss.detach()
