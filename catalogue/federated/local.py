"""Local training: Q steps of minibatch SGD (batch B drawn with replacement from the client's
samples, cross-entropy, learning rate η_l) from a flat float32 base vector.

Two trainers with one interface, ``train(jobs) -> deltas``:

* :class:`LocalSGD` runs any ``torch.nn.Module`` with autograd and ``torch.optim.SGD``, one job
  after another — the reference, and the path for one's own model.
* :class:`BatchedMLPSGD` runs the same maths for a ReLU MLP (the miniature experiments' models)
  with hand-written gradients, all jobs of one call side by side with ``torch.bmm``. Jobs are
  independent (each starts from its own base), so batching changes no result beyond float
  rounding; it makes the simulated fleets of 16–300 clients affordable on 2 CPU cores.

Both draw client i's minibatch indices from client i's own generator, in the order of its
tasks, so which jobs share a call does not change what any client samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .data import FederatedData


@dataclass
class Job:
    """Train ``steps`` SGD steps for ``client`` from ``base`` (a flat float32 vector)."""

    client: int
    base: torch.Tensor
    steps: int


def mlp(sizes: Sequence[int], seed: int) -> torch.nn.Sequential:
    """ReLU MLP with the given layer sizes (``[64, 10]`` is logistic regression), initialised from ``seed``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    torch.random.set_rng_state(generator_state)
    return model


def flatten(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


class _ClientSampler:
    """Minibatch indices per client from a per-client generator (seeded by ``(seed, client)``)."""

    def __init__(self, data: FederatedData, batch: int, seed: int):
        self.data, self.batch, self.seed = data, batch, seed
        self._rngs: dict[int, np.random.Generator] = {}

    def draw(self, client: int, steps: int) -> np.ndarray:
        """(steps, B) indices into the training set."""
        rng = self._rngs.get(client)
        if rng is None:
            rng = self._rngs[client] = np.random.default_rng([self.seed, 1009, client])
        own = self.data.clients[client]
        return own[rng.integers(0, len(own), size=(steps, self.batch))]


class LocalSGD:
    """Reference local trainer for any module: ``torch.optim.SGD`` on ``loss(model(x), y)``.

    ``model_fn()`` builds the module whose flattened parameters are the vectors the server holds;
    ``loss`` is any callable of (output, target) returning a scalar tensor, cross-entropy by default.
    """

    def __init__(self, model_fn: Callable[[], torch.nn.Module], data: FederatedData, lr: float = 0.05,
                 batch: int = 8, seed: int = 0,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.cross_entropy):
        _check_lr_batch(lr, batch)
        if not callable(loss):
            raise ValueError(f"loss={loss!r}: expected a callable (output, target) -> scalar tensor")
        self.model = model_fn()
        self.lr, self.data, self.loss = lr, data, loss
        self.sampler = _ClientSampler(data, batch, seed)
        self.x = torch.from_numpy(data.x_train)
        self.y = torch.from_numpy(data.y_train)

    def train(self, jobs: Sequence[Job]) -> list[torch.Tensor]:
        deltas = []
        for job in jobs:
            indices = torch.from_numpy(self.sampler.draw(job.client, job.steps))
            torch.nn.utils.vector_to_parameters(job.base.clone(), self.model.parameters())
            optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr)
            for step in range(job.steps):
                optimizer.zero_grad()
                batch = indices[step]
                self.loss(self.model(self.x[batch]), self.y[batch]).backward()
                optimizer.step()
            deltas.append(flatten(self.model) - job.base)
        return deltas

    @torch.no_grad()
    def accuracy(self, weights: torch.Tensor, x: np.ndarray, y: np.ndarray) -> float:
        """Fraction of ``x`` whose arg-max output is its label (class labels only)."""
        torch.nn.utils.vector_to_parameters(weights.clone(), self.model.parameters())
        return float((self.model(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).float().mean())

    @torch.no_grad()
    def evaluate_loss(self, weights: torch.Tensor, x: np.ndarray, y: np.ndarray) -> float:
        """The training loss on (x, y) at ``weights``: the score for targets that are not class labels."""
        torch.nn.utils.vector_to_parameters(weights.clone(), self.model.parameters())
        return float(self.loss(self.model(torch.from_numpy(x)), torch.from_numpy(y)))


class BatchedMLPSGD:
    """The same SGD for a ReLU MLP of layer ``sizes``, many jobs per call (``torch.bmm`` over jobs).

    The flat layout is ``nn.Sequential``'s (per layer: weight (out, in), then bias), so vectors
    are interchangeable with :class:`LocalSGD` on :func:`mlp`.
    """

    def __init__(self, sizes: Sequence[int], data: FederatedData, lr: float = 0.05, batch: int = 8, seed: int = 0):
        _check_lr_batch(lr, batch)
        self.sizes, self.lr, self.batch, self.data = list(sizes), lr, batch, data
        self.sampler = _ClientSampler(data, batch, seed)
        self.x = torch.from_numpy(data.x_train)
        self.y = torch.from_numpy(data.y_train)
        self._slices = []  # (weight slice, bias slice, d_in, d_out) per layer
        offset = 0
        for d_in, d_out in zip(self.sizes[:-1], self.sizes[1:]):
            self._slices.append((slice(offset, offset + d_in * d_out), slice(offset + d_in * d_out,
                                                                                offset + d_in * d_out + d_out),
                                 d_in, d_out))
            offset += d_in * d_out + d_out
        self.num_parameters = offset

    def _layers(self, flat: torch.Tensor):
        """Views (n, out, in) and (n, out) of a (n, P) stack of flat vectors."""
        n = flat.shape[0]
        return [(flat[:, w].view(n, d_out, d_in), flat[:, b]) for w, b, d_in, d_out in self._slices]

    def train(self, jobs: Sequence[Job]) -> list[torch.Tensor]:
        if not jobs:
            return []
        # longest jobs first: at step k the active jobs are a prefix, so slicing replaces masking
        order = sorted(range(len(jobs)), key=lambda j: -jobs[j].steps)
        steps = [jobs[j].steps for j in order]
        indices = [self.sampler.draw(jobs[j].client, jobs[j].steps) for j in range(len(jobs))]
        weights = torch.stack([jobs[j].base for j in order]).clone()
        grads = torch.empty_like(weights)
        max_steps = steps[0]
        stacked = np.zeros((len(jobs), max_steps, self.batch), dtype=np.int64)
        for row, j in enumerate(order):
            stacked[row, : jobs[j].steps] = indices[j]
        # step-major gathers, so each step's (active, B, ·) slice is contiguous; layer views made once
        stacked = torch.from_numpy(np.ascontiguousarray(stacked.transpose(1, 0, 2)))
        xs, ys = self.x[stacked], self.y[stacked]
        layers, grad_layers = self._layers(weights), self._layers(grads)
        active = len(jobs)
        for step in range(max_steps):
            while active and steps[active - 1] <= step:
                active -= 1
            self._gradient([(w[:active], b[:active]) for w, b in layers],
                           [(w[:active], b[:active]) for w, b in grad_layers], xs[step, :active], ys[step, :active])
            weights[:active].add_(grads[:active], alpha=-self.lr)
        deltas = [None] * len(jobs)
        for row, j in enumerate(order):
            deltas[j] = weights[row] - jobs[j].base
        return deltas

    def _gradient(self, layers, grad_layers, x: torch.Tensor, y: torch.Tensor) -> None:
        """Mean cross-entropy gradient of each job's minibatch (``layers``: (weight, bias) views per
        layer), written into the matching ``grad_layers`` views."""
        activations = [x]
        for i, (weight, bias) in enumerate(layers):
            z = torch.baddbmm(bias.unsqueeze(1), activations[-1], weight.transpose(1, 2))
            activations.append(torch.relu(z) if i < len(layers) - 1 else z)
        g = torch.softmax(activations[-1], dim=2)
        g.scatter_add_(2, y.unsqueeze(2), torch.full(y.shape + (1,), -1.0))
        g.div_(x.shape[1])
        for i in range(len(layers) - 1, -1, -1):
            grad_weight, grad_bias = grad_layers[i]
            grad_weight.copy_(torch.bmm(g.transpose(1, 2), activations[i]))
            grad_bias.copy_(g.sum(1))
            if i:
                g = torch.bmm(g, layers[i][0]) * (activations[i] > 0)

    @torch.no_grad()
    def predict(self, weights: torch.Tensor, x: np.ndarray) -> np.ndarray:
        h = torch.from_numpy(x)
        layers = self._layers(weights.unsqueeze(0))
        for i, (weight, bias) in enumerate(layers):
            h = h @ weight[0].T + bias[0]
            if i < len(layers) - 1:
                h = torch.relu(h)
        return h.argmax(1).numpy()

    def accuracy(self, weights: torch.Tensor, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(weights, x) == y).mean())


def _check_lr_batch(lr: float, batch: int) -> None:
    if not lr > 0:
        raise ValueError(f"lr={lr}: the local learning rate η_l must be > 0")
    if batch <= 0:
        raise ValueError(f"batch={batch}: the batch size B must be >= 1")
