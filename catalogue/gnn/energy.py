"""The energy GNN of Solodova, Richardson, Oktay & Adams (ICLR 2025): node states are the
minimiser of a strongly convex energy, so asynchronous (hogwild) inference reaches the
same answer as synchronous inference.

E(H) = Σ_i [ (β/2)|h_i|² + φ(h_i; x_i) ] + Σ_{(j→i)} w_i ψ(h_i, h_j; x_i, x_j, e_ij)

with φ and ψ partially input-convex networks (convex in the states, arbitrary in the
features) and w_i = 1/deg(i). The 1/deg weight (our choice; any positive weight keeps E
convex) keeps the curvature of E from growing with a node's degree, so one fixed step
α converges on every graph. ∂E/∂h_i needs only h_i and its neighbours' states, which is
what makes each node's update local.

At scale: one process per agent (or per block of nodes); each agent owns its h_i, runs
the gradient step on its own clock and sends h_i to its neighbours with
``torch.distributed`` point-to-point messages (gloo on CPU) — see
:mod:`asyncgen.catalogue.gnn.agents`, which the tests run with 4 processes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import degree

from .graphs import check_graph
from .picnn import PICNN
from .solvers import ConvergenceError, attach_energy_gradient


class EnergyConv(MessagePassing):
    """The edge energy ψ as message passing: each message is one edge's weighted energy,
    summed (``aggr="add"``) at the edge's target, so ``out.sum()`` is the edge part of E."""

    def __init__(self, state_dim: int, feature_dim: int, edge_dim: int, width: int = 32, layers: int = 2,
                 feature_hidden: int = 32):
        super().__init__(aggr="add")
        self.features = nn.Sequential(nn.Linear(2 * feature_dim + edge_dim, feature_hidden), nn.Tanh(),
                                      nn.Linear(feature_hidden, feature_hidden))
        self.psi = PICNN(2 * state_dim, feature_hidden, width, layers)

    def edge_terms(self, x_source: torch.Tensor, x_target: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        """ψ's feature terms per edge (x_i, x_j, e_ij): fixed while the states are solved for."""
        return self.psi.feature_terms(self.features(torch.cat([x_target, x_source, edge_attr], dim=-1)))

    def forward(self, h, edge_index, terms, edge_weight, size=None):
        """Per-target sum of weighted edge energies. ``h`` is a node tensor or a (source, target)
        pair for bipartite use; ``terms`` and ``edge_weight`` are per edge, in edge order."""
        return self.propagate(edge_index, h=h, terms=terms, edge_weight=edge_weight, size=size)

    def message(self, h_i, h_j, terms, edge_weight):
        return (edge_weight * self.psi(torch.cat([h_i, h_j], dim=-1), terms=terms)).unsqueeze(-1)


class EnergyGNN(nn.Module):
    """Energy GNN: H* = argmin_H E(H), outputs y_i = MLP(h_i*, x_i).

    Args:
        feature_dim, edge_dim, out_dim: sizes of x_i, e_ij and y_i.
        state_dim (default 16): d, the size of h_i.
        width (default 32), layers (default 2): the PICNNs φ and ψ.
        beta (default 1.0): strong convexity β > 0 (unique minimiser).
        step (default 0.1): gradient-descent step α.
        tol (default 1e-6): stop when |∇E|_∞ < tol.
        max_iter (default 2000): more raises :class:`ConvergenceError`.
    """

    def __init__(self, feature_dim: int, edge_dim: int, out_dim: int, state_dim: int = 16, width: int = 32,
                 layers: int = 2, beta: float = 1.0, step: float = 0.1, tol: float = 1e-6, max_iter: int = 2000,
                 feature_hidden: int = 32):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta={beta!r}: expected beta > 0 (strong convexity makes the minimiser unique)")
        if not step > 0:
            raise ValueError(f"step={step!r}: expected step > 0")
        self.beta, self.step, self.tol, self.max_iter, self.state_dim = float(beta), float(step), tol, max_iter, state_dim
        self.node_features = nn.Sequential(nn.Linear(feature_dim, feature_hidden), nn.Tanh(),
                                           nn.Linear(feature_hidden, feature_hidden))
        self.phi = PICNN(state_dim, feature_hidden, width, layers)
        self.conv = EnergyConv(state_dim, feature_dim, edge_dim, width, layers, feature_hidden)
        self.readout = nn.Sequential(nn.Linear(state_dim + feature_dim, 64), nn.ReLU(), nn.Linear(64, out_dim))

    # ---------------------------------------------------------------- the energy
    @staticmethod
    def edge_weight(data) -> torch.Tensor:
        deg = degree(data.edge_index[1], data.num_nodes, dtype=data.x.dtype)
        return 1.0 / deg.clamp(min=1)[data.edge_index[1]]

    def features(self, data) -> dict:
        """Everything E needs from the graph besides H, computed once per solve."""
        src, dst = data.edge_index
        return {"node": self.phi.feature_terms(self.node_features(data.x)),
                "edge": self.conv.edge_terms(data.x[src], data.x[dst], data.edge_attr),
                "weight": self.edge_weight(data)}

    def node_energy(self, h: torch.Tensor, features: dict) -> torch.Tensor:
        return 0.5 * self.beta * (h * h).sum(-1) + self.phi(h, terms=features["node"])

    def energy(self, h: torch.Tensor, data, features: dict | None = None) -> torch.Tensor:
        """E(H) for the graph (or a batch of graphs: the sum of their energies)."""
        features = self.features(data) if features is None else features
        edge = self.conv(h, data.edge_index, features["edge"], features["weight"])
        return self.node_energy(h, features).sum() + edge.sum()

    def local_gradient(self, h: torch.Tensor, data, source_states: torch.Tensor, target_states: torch.Tensor,
                       features: dict | None = None) -> torch.Tensor:
        """Each node's ∂E/∂h_i from its own state and the neighbour states it read.

        ``source_states[e]`` is what edge e's target read of its source, ``target_states[e]``
        what the source read of its target. With fresh reads (``h[src]``, ``h[dst]``) this is ∇E.
        """
        src, dst = data.edge_index
        n, m = h.size(0), src.size(0)
        edges = torch.arange(m, device=h.device)
        with torch.enable_grad():
            features = self.features(data) if features is None else features
            h = h.detach().requires_grad_(True)
            # ψ(h_i fresh, h_j read): the target's partial
            at_target = self.conv((source_states.detach(), h), torch.stack([edges, dst]), features["edge"],
                                  features["weight"], size=(m, n))
            # ψ(h_i read, h_j fresh): the source's partial
            at_source = self.conv((h, target_states.detach()), torch.stack([src, edges]), features["edge"],
                                  features["weight"], size=(n, m))
            total = self.node_energy(h, features).sum() + at_target.sum() + at_source.sum()
            return torch.autograd.grad(total, h)[0]

    def gradient(self, h: torch.Tensor, data, features: dict | None = None) -> torch.Tensor:
        """∇_H E(H), as every node computes it locally from fresh neighbour states."""
        src, dst = data.edge_index
        return self.local_gradient(h, data, h.detach()[src], h.detach()[dst], features)

    def _full_gradient(self, h: torch.Tensor, data) -> torch.Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(self.energy(h, data), h, create_graph=True)[0]  # graph to θ too

    # ---------------------------------------------------------------- solving
    def initial_states(self, data) -> torch.Tensor:
        return torch.zeros(data.num_nodes, self.state_dim, dtype=data.x.dtype, device=data.x.device)

    def solve(self, data, h: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient descent h ← h − α∇E until |∇E|_∞ < tol; :class:`ConvergenceError` after max_iter."""
        check_graph(data.edge_index, data.num_nodes)
        h = self.initial_states(data) if h is None else h.detach()
        with torch.no_grad():
            features = self.features(data)
        residual = float("inf")
        for _ in range(self.max_iter + 1):
            grad = self.gradient(h, data, features)
            residual = float(grad.abs().max())
            if residual < self.tol:
                return h
            h = h - self.step * grad
        raise ConvergenceError("energy minimisation (gradient descent)", residual, self.tol, self.max_iter)

    def output(self, h: torch.Tensor, data) -> torch.Tensor:
        return self.readout(torch.cat([h, data.x], dim=-1))

    def forward(self, data) -> torch.Tensor:
        h_star = self.solve(data)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            h_star = attach_energy_gradient(h_star, lambda h, create_graph: self._full_gradient(h, data), self.step)
        return self.output(h_star, data)

    # ---------------------------------------------------------------- node-local view (hogwild)
    implicit = True

    @torch.no_grad()
    def node_context(self, data) -> dict:
        """What every node update on ``data`` reuses: the feature terms of E."""
        return self.features(data)

    def node_update(self, h, data, source_states, target_states, layer=None, context=None):
        """Every node's gradient step from the states it read."""
        return h - self.step * self.local_gradient(h, data, source_states, target_states, context)

    def residual(self, h, data, context=None) -> float:
        return float(self.gradient(h, data, context).abs().max())
