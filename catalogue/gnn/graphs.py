"""The two generated tasks of the hogwild experiment and the checks every graph passes.

- ``sums``: random geometric graphs (n in [10, 30] nodes uniform in the unit square, an
  edge between nodes closer than 0.35, kept only when connected); node features
  ``[s_i, 1]`` with s_i ~ U(0, 1); every node must output Σ_j s_j (regression, MSE).
- ``chains``: paths of 10–20 nodes; the node at one end carries a one-hot class (2
  classes) in its features, every node must output that class (accuracy).

Graphs are ``torch_geometric.data.Data`` with ``x``, ``edge_index`` (both directions of
every edge), ``edge_attr`` (distance, or 1 on chains) and ``y``; float64 throughout,
because the implicit models are solved to 1e-6 and compared to 1e-5.
"""

from __future__ import annotations

import math

import torch
from torch_geometric.data import Data

TASKS = ("sums", "chains")


def check_graph(edge_index: torch.Tensor, num_nodes: int) -> None:
    """A graph the models accept: at least one edge, and every index in [0, num_nodes)."""
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index of shape {tuple(edge_index.shape)}: expected shape (2, num_edges)")
    if edge_index.size(1) == 0:
        raise ValueError("edge_index has no edges: the models need a graph with at least one edge")
    low, high = int(edge_index.min()), int(edge_index.max())
    if low < 0 or high >= num_nodes:
        raise ValueError(f"edge_index holds node {low if low < 0 else high}, out of range for {num_nodes} nodes "
                         f"(expected 0..{num_nodes - 1})")


def _connected(n: int, edge_index: torch.Tensor) -> bool:
    seen, frontier = {0}, [0]
    neighbours = [[] for _ in range(n)]
    for a, b in edge_index.t().tolist():
        neighbours[a].append(b)
    while frontier:
        node = frontier.pop()
        for other in neighbours[node]:
            if other not in seen:
                seen.add(other)
                frontier.append(other)
    return len(seen) == n


def geometric_graph(generator: torch.Generator, min_nodes: int = 10, max_nodes: int = 30,
                    radius: float = 0.35) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and edge_index of a connected random geometric graph (redrawn until connected)."""
    while True:
        n = int(torch.randint(min_nodes, max_nodes + 1, (1,), generator=generator))
        pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        dist = torch.cdist(pos, pos)
        close = (dist < radius) & ~torch.eye(n, dtype=torch.bool)
        edge_index = close.nonzero().t().contiguous()
        if edge_index.size(1) and _connected(n, edge_index):
            return pos, edge_index


def sums_graph(generator: torch.Generator) -> Data:
    pos, edge_index = geometric_graph(generator)
    s = torch.rand(pos.size(0), 1, generator=generator, dtype=torch.float64)
    x = torch.cat([s, torch.ones_like(s)], dim=1)
    edge_attr = (pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=1, keepdim=True)
    y = s.sum().expand(pos.size(0), 1).clone()
    return Data(x=x, edge_index=edge_index, edge_attr=edge_attr, y=y)


def chains_graph(generator: torch.Generator, min_length: int = 10, max_length: int = 20) -> Data:
    n = int(torch.randint(min_length, max_length + 1, (1,), generator=generator))
    label = int(torch.randint(0, 2, (1,), generator=generator))
    forward = torch.stack([torch.arange(n - 1), torch.arange(1, n)])
    edge_index = torch.cat([forward, forward.flip(0)], dim=1)
    x = torch.zeros(n, 3, dtype=torch.float64)
    x[0, label] = 1.0  # the class, at one end only
    x[:, 2] = 1.0  # a constant channel
    return Data(x=x, edge_index=edge_index, edge_attr=torch.ones(edge_index.size(1), 1, dtype=torch.float64),
                y=torch.full((n,), label, dtype=torch.long))


def make_dataset(task: str, count: int, seed: int) -> list[Data]:
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    generator = torch.Generator().manual_seed(seed)
    make = sums_graph if task == "sums" else chains_graph
    return [make(generator) for _ in range(count)]


def spectral_radius(edge_index: torch.Tensor, weight: torch.Tensor, num_nodes: int, iters: int = 200) -> float:
    """Perron–Frobenius eigenvalue of the non-negative matrix A[dst, src] = weight (power iteration)."""
    v = torch.ones(num_nodes, dtype=torch.float64)
    value = 0.0
    for _ in range(iters):
        w = torch.zeros_like(v).index_add_(0, edge_index[1], weight.to(torch.float64) * v[edge_index[0]])
        value = float(w.norm() / v.norm())
        if value == 0.0 or not math.isfinite(value):
            return value
        v = w / w.norm()
    return value
