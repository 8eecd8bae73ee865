"""Adaptive Braking (Venigalla, Kosson, Chiley & Köster, 2020): SGD with momentum that
tolerates stale gradients.

With delayed gradients, momentum keeps pushing along a high-curvature direction after
the minimum along it has been crossed, and the run oscillates or diverges. Adaptive
Braking scales each gradient by its alignment with the velocity before it enters the
momentum buffer::

    c  = <g, v> / (|g| |v| + eps)        (c = 0 while there is no velocity yet)
    g~ = (1 - rho * c) * g
    v <- momentum * v + (1 - dampening) * g~
    w <- w - lr * v                      (Nesterov: w <- w - lr * (g~ + momentum * v))

A gradient that agrees with the velocity is shrunk (``rho = 2`` reverses a fully aligned
one: active braking); one that opposes it is amplified. ``rho = 0`` is exactly
``torch.optim.SGD``: the same arithmetic in the same order and the same state
(``momentum_buffer``), so checkpoints move between the two.

At scale: :class:`AdaptiveBraking` is a drop-in optimizer for ``DistributedDataParallel``
(every rank sees the same all-reduced gradient, so every rank brakes identically) and
for pipeline-parallel training with asynchronous schedules such as
``torch.distributed.pipelining`` (where the delayed gradients are real). With
``granularity="tensor"`` the cosine is local to each tensor, so it needs no
communication beyond what DDP already does.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

GRANULARITIES = ("tensor", "global")


def _check_hyperparameters(lr, momentum, rho, weight_decay, dampening, nesterov, granularity, eps) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr={lr!r}: expected a finite number >= 0")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"momentum={momentum!r}: expected a number in [0, 1)")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho={rho!r}: expected a finite number >= 0")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay={weight_decay!r}: expected a finite number >= 0")
    if not (isinstance(dampening, (int, float)) and 0 <= dampening <= 1):
        raise ValueError(f"dampening={dampening!r}: expected a number in [0, 1]")
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError(f"nesterov=True with momentum={momentum!r}, dampening={dampening!r}: "
                         "Nesterov needs momentum > 0 and dampening 0")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps={eps!r}: expected a number > 0")


def braking_cosine(grads: list[torch.Tensor], velocities: list[torch.Tensor], eps: float) -> torch.Tensor:
    """c = <g, v> / (|g| |v| + eps) over the tensors given together, as a 0-d tensor (float64 for
    float64 tensors, float32 otherwise).

    It is 0 when v = 0 (no velocity yet). Kept on the tensors' device, so the optimizer
    never waits for the host.
    """
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    dot = sum(torch.sum(g.to(dtype) * v.to(dtype)) for g, v in zip(grads, velocities))
    g_sq = sum(torch.sum(g.to(dtype) ** 2) for g in grads)
    v_sq = sum(torch.sum(v.to(dtype) ** 2) for v in velocities)
    return dot / (torch.sqrt(g_sq) * torch.sqrt(v_sq) + eps)


class AdaptiveBraking(torch.optim.Optimizer):
    """SGD with momentum and Adaptive Braking.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr (float): learning rate (>= 0).
        momentum (float, default 0.9): momentum coefficient in [0, 1). With 0 the
            "velocity" braked against is the previous step's scaled gradient.
        rho (float, default 2.0): braking strength (>= 0); 0 gives plain SGD.
        weight_decay (float, default 0): L2 penalty added to the gradient before braking.
        dampening (float, default 0): dampening of the gradient entering the buffer;
            as in ``torch.optim.SGD`` the first step stores the gradient undamped.
        nesterov (bool, default False): Nesterov momentum (needs momentum > 0, dampening 0).
        granularity ("tensor" | "global", default "tensor"): one cosine per parameter
            tensor, or one over all tensors of a parameter group.
        eps (float, default 1e-12): added to the norm product in the cosine.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, rho: float = 2.0,
                 weight_decay: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 granularity: str = "tensor", eps: float = 1e-12):
        _check_hyperparameters(lr, momentum, rho, weight_decay, dampening, nesterov, granularity, eps)
        defaults = dict(lr=lr, momentum=momentum, rho=rho, weight_decay=weight_decay, dampening=dampening,
                        nesterov=nesterov, granularity=granularity, eps=eps)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group["lr"], group["momentum"], group["rho"], group["weight_decay"],
                               group["dampening"], group["nesterov"], group["granularity"], group["eps"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = []
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("AdaptiveBraking does not support sparse gradients")
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])  # same op as torch.optim.SGD
                grads.append(g)
            velocities = [self.state[p].get("momentum_buffer") for p in params]
            scales = self._braking_scales(group, grads, velocities)
            for p, g, v, scale in zip(params, grads, velocities, scales):
                self._update(group, p, g if scale is None else g * scale.to(g.dtype), v)
        return loss

    def _braking_scales(self, group: dict, grads: list, velocities: list) -> list:
        """1 - rho * c for each tensor (or one shared value for ``granularity="global"``); None = no scaling."""
        rho, eps = group["rho"], group["eps"]
        if rho == 0:
            return [None] * len(grads)  # plain SGD, bit for bit
        pairs = [(g, v) for g, v in zip(grads, velocities) if v is not None]
        if group["granularity"] == "global":
            if not pairs:
                return [None] * len(grads)
            scale = 1.0 - rho * braking_cosine([g for g, _ in pairs], [v for _, v in pairs], eps)
            return [scale] * len(grads)
        return [1.0 - rho * braking_cosine([g], [v], eps) if v is not None else None
                for g, v in zip(grads, velocities)]

    def _update(self, group: dict, p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None) -> None:
        momentum, lr = group["momentum"], group["lr"]
        if momentum == 0:
            # No momentum: keep the last step direction as the velocity to brake against.
            self.state[p]["momentum_buffer"] = g.detach().clone()
            p.add_(g, alpha=-lr)
            return
        if buf is None:
            buf = g.detach().clone()  # like torch.optim.SGD: the first step is not damped
            self.state[p]["momentum_buffer"] = buf
        else:
            buf.mul_(momentum).add_(g, alpha=1 - group["dampening"])
        direction = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(direction, alpha=-lr)


def braking(base_optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """EXPERIMENTAL: a subclass of ``base_optimizer_cls`` that brakes each gradient first.

    The returned class takes the base optimizer's arguments plus ``rho`` (default 2.0)
    and ``braking_eps`` (default 1e-12). Because a general optimizer's velocity is not
    visible, the velocity is taken as minus the parameter's displacement in the previous
    step (stored per parameter as ``braking_displacement``): for SGD with momentum that
    is exactly ``lr * momentum_buffer``, so ``braking(torch.optim.SGD)`` brakes like
    :class:`AdaptiveBraking` when there is no weight decay. The braking uses the raw
    gradient (the base optimizer adds its own weight decay afterwards). For Adam-like
    optimizers the scaling passes through the second-moment normalisation, so its effect
    is not the paper's; use with care.
    """
    if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
        raise ValueError(f"braking({base_optimizer_cls!r}): expected a torch.optim.Optimizer subclass")

    class Braked(base_optimizer_cls):
        def __init__(self, params, *args, rho: float = 2.0, braking_eps: float = 1e-12, **kwargs):
            if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
                raise ValueError(f"rho={rho!r}: expected a finite number >= 0")
            if not (isinstance(braking_eps, (int, float)) and braking_eps > 0):
                raise ValueError(f"braking_eps={braking_eps!r}: expected a number > 0")
            self._rho, self._braking_eps = float(rho), float(braking_eps)
            super().__init__(params, *args, **kwargs)

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            before = {}
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    displacement = self.state[p].get("braking_displacement") if p in self.state else None
                    if displacement is not None and self._rho != 0:
                        # velocity = -displacement, hence the minus sign
                        c = -braking_cosine([p.grad], [displacement], self._braking_eps)
                        p.grad.mul_((1.0 - self._rho * c).to(p.grad.dtype))
                    before[p] = p.detach().clone()
            super().step()
            # Stored after the base step: optimizers such as Adam initialise a parameter's
            # state only when it is empty.
            for p, old in before.items():
                self.state[p]["braking_displacement"] = p.detach() - old
            return loss

    Braked.__name__ = Braked.__qualname__ = f"Braked{base_optimizer_cls.__name__}"
    Braked.__doc__ = f"{base_optimizer_cls.__name__} with Adaptive Braking applied to each gradient (experimental)."
    return Braked
