"""The baselines: explicit GCN and GIN (torch-geometric convolutions), and IGNN (Gu et al.,
NeurIPS 2020), an implicit GNN whose states are the fixed point of a contraction.

Each model also offers the node-local view the hogwild runner drives:
``initial_states``, ``node_update`` (every node's next state from the neighbour states
it read, one per edge) and ``output``. Explicit models apply layer ``layer[i]`` at node i;
implicit ones apply their local fixed-point or gradient step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GCNConv, GINConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from .graphs import check_graph
from .solvers import ConvergenceError, attach_fixed_point_gradient


def _reads_with_self_loops(h, data, source_states):
    """The edge list with a self loop per node appended, and what each edge's target read:
    the neighbour state it read, or (on its loop) its own current state."""
    n = data.num_nodes
    loops = torch.arange(n, device=h.device)
    edge_index = torch.cat([data.edge_index, torch.stack([loops, loops])], dim=1)
    return edge_index, torch.cat([source_states, h], dim=0)


def normalized_adjacency(data):
    """Â = D^-1/2 (A + I) D^-1/2 as (edge_index with self loops, weights); its Perron root is 1."""
    edge_index, weight = gcn_norm(data.edge_index, None, data.num_nodes, add_self_loops=True,
                                  dtype=data.x.dtype)
    return edge_index, weight


def _aggregate(conv, data, edge_index, weight, reads, h):
    """Σ_j weight_ij · reads_ij at each target, through the convolution's own message/aggregate."""
    m = edge_index.size(1)
    per_edge = torch.stack([torch.arange(m, device=h.device), edge_index[1]])
    kwargs = {"edge_weight": weight} if weight is not None else {}
    return conv.propagate(per_edge, x=(reads, h), size=(m, data.num_nodes), **kwargs)


class ExplicitGNN(nn.Module):
    """Encoder, ``num_layers`` message-passing layers, readout — GCN or GIN."""

    implicit = False

    def __init__(self, kind: str, feature_dim: int, out_dim: int, hidden: int = 64, num_layers: int = 3):
        super().__init__()
        if kind not in ("gcn", "gin"):
            raise ValueError(f"kind={kind!r}: expected 'gcn' or 'gin'")
        self.kind, self.num_layers = kind, num_layers
        self.encoder = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU())
        if kind == "gcn":
            self.convs = nn.ModuleList(GCNConv(hidden, hidden) for _ in range(num_layers))
        else:
            self.convs = nn.ModuleList(
                GINConv(nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden)), train_eps=True)
                for _ in range(num_layers))
        self.readout = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, data) -> torch.Tensor:
        check_graph(data.edge_index, data.num_nodes)
        h = self.encoder(data.x)
        for conv in self.convs:
            h = torch.relu(conv(h, data.edge_index))
        return self.readout(h)

    def initial_states(self, data) -> torch.Tensor:
        return self.encoder(data.x)

    def apply_layer(self, index: int, h, data, source_states) -> torch.Tensor:
        """Layer ``index`` at every node, from the neighbour states each node read."""
        conv = self.convs[index]
        if self.kind == "gcn":
            edge_index, weight = normalized_adjacency(data)
            loops_index, reads = _reads_with_self_loops(h, data, source_states)
            assert torch.equal(edge_index, loops_index)  # gcn_norm appends the loops in node order
            out = _aggregate(conv, data, edge_index, weight, conv.lin(reads), conv.lin(h)) + conv.bias
        else:
            neighbours = _aggregate(conv, data, data.edge_index, None, source_states, h)
            out = conv.nn((1 + conv.eps) * h + neighbours)
        return torch.relu(out)

    def node_update(self, h, data, source_states, target_states, layer, context=None):
        """Node i applies layer ``layer[i]`` (callers mask the nodes that do not update)."""
        out = h.clone()
        for index in range(self.num_layers):
            mask = layer == index
            if mask.any():
                out[mask] = self.apply_layer(index, h, data, source_states)[mask]
        return out

    def output(self, h, data) -> torch.Tensor:
        return self.readout(h)


class IGNN(nn.Module):
    """IGNN: H = relu(Â H Wᵀ + Ω(X)), with |W|_∞ ≤ kappa / λ_pf(Â) (λ_pf = 1 for the
    symmetric-normalised Â with self loops), solved by fixed-point iteration.

    Call :meth:`project_` after every optimizer step (or :meth:`attach_projection` once) to
    keep W in the well-posed set; the backward pass is implicit (a fixed-point iteration).
    """

    implicit = True

    def __init__(self, feature_dim: int, out_dim: int, state_dim: int = 16, kappa: float = 0.95, tol: float = 1e-6,
                 max_iter: int = 2000, hidden: int = 64):
        super().__init__()
        if not 0 < kappa < 1:
            raise ValueError(f"kappa={kappa!r}: expected 0 < kappa < 1")
        self.kappa, self.tol, self.max_iter, self.state_dim = kappa, tol, max_iter, state_dim
        self.weight = nn.Parameter(torch.randn(state_dim, state_dim) / state_dim)
        self.omega = nn.Sequential(nn.Linear(feature_dim, hidden), nn.Tanh(), nn.Linear(hidden, state_dim))
        self.readout = nn.Sequential(nn.Linear(state_dim + feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.project_()

    @torch.no_grad()
    def project_(self) -> None:
        """Project each row of W onto the L1 ball of radius kappa (so |W|_∞ ≤ kappa)."""
        radius = self.kappa  # kappa / λ_pf(Â), λ_pf = 1
        w = self.weight
        for row in range(w.size(0)):
            a = w[row].abs()
            if a.sum() <= radius:
                continue
            # Euclidean projection of |row| onto the simplex of size radius (Duchi et al., 2008)
            mu, _ = torch.sort(a, descending=True)
            cumulative = torch.cumsum(mu, 0) - radius
            index = torch.arange(1, a.numel() + 1, dtype=a.dtype)
            k = int((mu - cumulative / index > 0).nonzero().max())
            theta = cumulative[k] / (k + 1)
            w[row] = torch.sign(w[row]) * (a - theta).clamp(min=0)
            total = w[row].abs().sum()
            if total > radius:  # guard: after a very large step the threshold can land a hair short
                w[row] *= radius / total

    def attach_projection(self, optimizer: torch.optim.Optimizer):
        """Re-project after every ``optimizer.step()``; returns the hook handle."""
        return optimizer.register_step_post_hook(lambda *args: self.project_())

    def initial_states(self, data) -> torch.Tensor:
        return torch.zeros(data.num_nodes, self.state_dim, dtype=data.x.dtype, device=data.x.device)

    def _update(self, h, data, source_states, bias):
        edge_index, weight = normalized_adjacency(data)
        _, reads = _reads_with_self_loops(h, data, source_states)
        mixed = torch.zeros_like(h).index_add_(0, edge_index[1], weight.unsqueeze(-1) * reads)
        return torch.relu(mixed @ self.weight.t() + bias)

    def fixed_point_map(self, h, data, bias=None):
        bias = self.omega(data.x) if bias is None else bias
        return self._update(h, data, h[data.edge_index[0]], bias)

    def solve(self, data) -> torch.Tensor:
        check_graph(data.edge_index, data.num_nodes)
        with torch.no_grad():
            bias = self.omega(data.x)
            h = self.initial_states(data)
            residual = float("inf")
            for _ in range(self.max_iter):
                new = self.fixed_point_map(h, data, bias)
                residual = float((new - h).abs().max())
                h = new
                if residual < self.tol:
                    return h
        raise ConvergenceError("IGNN fixed-point iteration", residual, self.tol, self.max_iter)

    def output(self, h, data) -> torch.Tensor:
        return self.readout(torch.cat([h, data.x], dim=-1))

    def forward(self, data) -> torch.Tensor:
        h_star = self.solve(data)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            h_star = attach_fixed_point_gradient(h_star, lambda h: self.fixed_point_map(h, data))
        return self.output(h_star, data)

    # node-local view
    @torch.no_grad()
    def node_context(self, data):
        return self.omega(data.x)

    def node_update(self, h, data, source_states, target_states, layer=None, context=None):
        with torch.no_grad():
            return self._update(h, data, source_states, self.omega(data.x) if context is None else context)

    def residual(self, h, data, context=None) -> float:
        with torch.no_grad():
            return float((self.fixed_point_map(h, data, context) - h).abs().max())
