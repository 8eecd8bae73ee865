"""Hogwild (asynchronous, bounded-delay) inference for any node-local GNN, and its
synchronous special case.

Discrete ticks. Each tick every node updates with probability ``p``, reading each
neighbour's state from a per-edge buffer that is uniformly 0..``max_delay`` ticks old
(drawn afresh per edge, per direction, per tick). An explicit GNN node keeps a layer
counter and applies its next layer to whatever neighbour states it reads, stopping after
its last layer; an implicit GNN node applies its local update until the global residual
is below ``tol`` (or ``max_ticks`` pass, which raises :class:`ConvergenceError`).
``synchronous_inference`` is the same loop with p = 1 and max_delay = 0.
"""

from __future__ import annotations

import torch

from .graphs import check_graph
from .solvers import ConvergenceError


def _check(p, max_delay):
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise ValueError(f"p={p!r}: expected a probability in (0, 1]")
    if isinstance(max_delay, bool) or not isinstance(max_delay, int) or max_delay < 0:
        raise ValueError(f"max_delay={max_delay!r}: expected an integer >= 0")


@torch.no_grad()
def hogwild_inference(model, data, p: float = 0.3, max_delay: int = 5, seed: int = 0, tol: float = 1e-6,
                      max_ticks: int = 20000, check_every: int = 5) -> tuple[torch.Tensor, int]:
    """Run ``model`` on ``data`` asynchronously; returns (outputs, ticks used).

    ``model`` offers ``initial_states``, ``node_update``, ``output``, ``implicit`` and, for
    implicit models, ``residual`` (``num_layers`` for explicit ones). The implicit stopping
    test (global residual < tol) is evaluated every ``check_every`` ticks.
    """
    _check(p, max_delay)
    check_graph(data.edge_index, data.num_nodes)
    generator = torch.Generator().manual_seed(seed)
    src, dst = data.edge_index
    n, m = data.num_nodes, src.size(0)
    h = model.initial_states(data).detach()
    history = torch.stack([h] * (max_delay + 1))  # history[k] = states k ticks before the current tick
    layer = torch.zeros(n, dtype=torch.long)
    context = model.node_context(data) if hasattr(model, "node_context") else None
    residual = float("inf")
    for tick in range(1, max_ticks + 1):
        active = torch.rand(n, generator=generator) < p
        if max_delay:
            source_states = history[torch.randint(0, max_delay + 1, (m,), generator=generator), src]
            target_states = history[torch.randint(0, max_delay + 1, (m,), generator=generator), dst]
        else:
            source_states, target_states = h[src], h[dst]
        if not model.implicit:
            active &= layer < model.num_layers
        if active.any():
            new = model.node_update(h, data, source_states, target_states, layer, context).detach()
            h = torch.where(active.unsqueeze(-1), new, h)
            layer = layer + active.long()
        if max_delay:
            history = torch.cat([h.unsqueeze(0), history[:-1]])
        if not model.implicit:
            if bool((layer >= model.num_layers).all()):
                return model.output(h, data), tick
        elif tick % check_every == 0 or tick == max_ticks:
            residual = model.residual(h, data, context)
            if residual < tol:
                return model.output(h, data), tick
    raise ConvergenceError(f"hogwild inference (p={p}, max_delay={max_delay})", residual, tol, max_ticks)


def synchronous_inference(model, data, tol: float = 1e-6, max_ticks: int = 20000) -> tuple[torch.Tensor, int]:
    """Every node updates every tick from fresh states (p = 1, max_delay = 0)."""
    return hogwild_inference(model, data, p=1.0, max_delay=0, seed=0, tol=tol, max_ticks=max_ticks, check_every=1)
