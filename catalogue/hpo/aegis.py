"""AEGiS: asynchronous epsilon-greedy global search (De Ath, Everson, Fieldsend, UAI 2021) as an
optuna sampler.

When a worker frees up, one point is proposed from the GP fitted to the COMPLETE trials:

- exploit, with probability 1 - 2 eps: the argmin of the posterior mean;
- Thompson, with probability eps: the argmin of one posterior sample path;
- Pareto, with probability eps: a point drawn uniformly from the approximate Pareto set of
  (minimise mean, maximise standard deviation).

eps = min(1 / sqrt(max(d, 4)), 0.5) by default ("sqrtd"). The first proposal after start-up
exploits (if eps < 0.5); after that, exploit is not drawn until more than ``n_workers``
proposals were made, because with no new result it would propose the same point again.
RUNNING trials are ignored: the randomness of the choice spreads the workers.

Beyond one machine: optuna's storage is the distribution layer. Every worker process (or
machine) runs ``study.optimize`` (or ask/tell) with its own ``AEGiSSampler(seed=...)`` against
one storage: an RDB URL, ``JournalStorage(JournalFileBackend(path))`` on a shared file system,
or optuna's gRPC storage proxy. The sampler reads the trials from the study each time.
"""

from __future__ import annotations

import math

from ..frame import require_extra

require_extra("hpo", "optuna", "botorch", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from botorch.acquisition import PosteriorMean  # noqa: E402
from botorch.generation.gen import gen_candidates_scipy  # noqa: E402
from botorch.optim import optimize_acqf  # noqa: E402
from botorch.sampling.pathwise import draw_matheron_paths  # noqa: E402
from botorch.utils.multi_objective.pareto import is_non_dominated  # noqa: E402
from torch.quasirandom import SobolEngine  # noqa: E402

from .gp import DTYPE, FittedGP  # noqa: E402
from .gp_sampler_base import GPSamplerBase  # noqa: E402

STRATEGIES = ("exploit", "thompson", "pareto")


def resolve_epsilon(epsilon, d: int) -> float:
    """eps from a float in [0, 0.5], ``"sqrtd"`` (min(1/sqrt(max(d,4)), 0.5)) or ``"d"`` (min(1/d, 0.5))."""
    if epsilon == "sqrtd":
        return min(1.0 / math.sqrt(max(d, 4)), 0.5)
    if epsilon == "d":
        return min(1.0 / max(d, 1), 0.5)
    if isinstance(epsilon, str) or not isinstance(epsilon, (int, float)) or not 0.0 <= float(epsilon) <= 0.5:
        raise ValueError(f"epsilon={epsilon!r}: expected a number in [0, 0.5], 'sqrtd' or 'd'")
    return float(epsilon)


def strategy_probabilities(epsilon: float) -> tuple[float, float, float]:
    """(P(exploit), P(Thompson), P(Pareto)) = (1 - 2 eps, eps, eps)."""
    return 1.0 - 2.0 * epsilon, epsilon, epsilon


def choose_strategy(proposal_index: int, probabilities, n_workers: int, rng: np.random.Generator) -> str:
    """Which move the ``proposal_index``-th proposal after start-up makes (0-based).

    Proposal 0 exploits (when exploiting is possible at all); proposals 1..n_workers choose between
    Thompson and Pareto only (the GP has at most the same data as for proposal 0); later ones draw
    from ``probabilities``.
    """
    p_exploit, p_thompson, p_pareto = probabilities
    if proposal_index == 0 and p_exploit > 0:
        return "exploit"
    if proposal_index <= n_workers and p_thompson + p_pareto > 0:
        return "thompson" if rng.random() < p_thompson / (p_thompson + p_pareto) else "pareto"
    return _draw(probabilities, rng)


def _draw(probabilities, rng) -> str:
    return STRATEGIES[int(rng.choice(3, p=np.asarray(probabilities) / np.sum(probabilities)))]


def sobol(n: int, d: int, seed: int) -> torch.Tensor:
    return SobolEngine(d, scramble=True, seed=seed).draw(n).to(DTYPE)


def exploit(fitted: FittedGP, d: int, num_restarts: int = 10, raw_samples: int = 1024) -> torch.Tensor:
    """argmin of the posterior mean (argmax on the model's negated scale)."""
    bounds = torch.stack([torch.zeros(d, dtype=DTYPE), torch.ones(d, dtype=DTYPE)])
    point, _ = optimize_acqf(PosteriorMean(fitted.model), bounds=bounds, q=1, num_restarts=num_restarts,
                             raw_samples=raw_samples)
    return point.detach().reshape(d)


class _PathValue(torch.nn.Module):
    """A sample path as an acquisition function: (b x 1 x d) -> (b)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def forward(self, x):
        return self.path(x.squeeze(-2)).reshape(x.shape[0])


def thompson(fitted: FittedGP, d: int, seed: int, candidates: int = 2048, starts: int = 10) -> torch.Tensor:
    """argmin of one posterior sample path (Matheron's rule, random Fourier features), via L-BFGS-B from the best
    ``starts`` of ``candidates`` Sobol points."""
    path = draw_matheron_paths(fitted.model, sample_shape=torch.Size([1]))
    value = _PathValue(path)
    grid = sobol(candidates, d, seed)
    with torch.no_grad():
        scores = value(grid[:, None, :])
    best = grid[torch.topk(scores, starts).indices][:, None, :]
    points, values = gen_candidates_scipy(best, value, lower_bounds=0.0, upper_bounds=1.0)
    return points[int(torch.argmax(values))].detach().reshape(d)


def pareto(fitted: FittedGP, d: int, seed: int, rng: np.random.Generator, candidates: int = 4096) -> torch.Tensor:
    """A point drawn uniformly from the approximate Pareto set of (min mean loss, max sd) over Sobol points."""
    grid = sobol(candidates, d, seed)
    with torch.no_grad():
        posterior = fitted.model.posterior(grid[:, None, :])  # 4096 single points, not one joint 4096-point batch
        # the model predicts negated losses: maximising (mean, sd) = (minimise loss mean, maximise sd)
        objectives = torch.stack([posterior.mean.reshape(-1), posterior.variance.clamp_min(0).sqrt().reshape(-1)], -1)
    front = torch.nonzero(is_non_dominated(objectives)).reshape(-1)
    return grid[int(front[int(rng.integers(front.numel()))])]


class AEGiSSampler(GPSamplerBase):
    """Asynchronous epsilon-greedy BO as an ``optuna.samplers.BaseSampler``.

    Args:
        epsilon: float in [0, 0.5], ``"sqrtd"`` (default) or ``"d"``.
        n_workers: how many workers evaluate at once (default 1); exploit waits for more than this many proposals.
        n_startup_trials: Latin-hypercube start-up trials (default 2 d).
        seed: seeds every random choice (same seed, same trials -> same proposals).
        refit_every: refit GP hyperparameters after this many new results (default 1; warm start in between).
        independent_sampler: for categorical parameters (default ``RandomSampler(seed)``).
        probabilities: override (P(exploit), P(Thompson), P(Pareto)) (e.g. (0, 1, 0): asynchronous Thompson sampling).
        num_restarts, raw_samples: the exploit step's ``optimize_acqf`` budget (default 10 and 1024).
    """

    def __init__(self, epsilon="sqrtd", n_workers: int = 1, n_startup_trials: int | None = None,
                 seed: int | None = None, refit_every: int = 1, independent_sampler=None,
                 probabilities: tuple[float, float, float] | None = None, num_restarts: int = 10,
                 raw_samples: int = 1024):
        super().__init__(n_startup_trials=n_startup_trials, seed=seed, refit_every=refit_every,
                         independent_sampler=independent_sampler)
        resolve_epsilon(epsilon, 4)  # validate now
        if n_workers < 1:
            raise ValueError(f"n_workers={n_workers!r}: need >= 1")
        if probabilities is not None and (len(probabilities) != 3 or min(probabilities) < 0 or sum(probabilities) <= 0):
            raise ValueError(f"probabilities={probabilities!r}: expected three non-negative numbers, not all zero")
        self.epsilon, self.n_workers, self.probabilities = epsilon, int(n_workers), probabilities
        self.num_restarts, self.raw_samples = int(num_restarts), int(raw_samples)
        self.last_strategy: str | None = None  # for inspection only; proposals never read it

    def propose(self, fitted, x, losses, running, rng, proposal_index):
        d = x.shape[1]
        probabilities = self.probabilities or strategy_probabilities(resolve_epsilon(self.epsilon, d))
        strategy = choose_strategy(proposal_index, probabilities, self.n_workers, rng)
        self.last_strategy = strategy
        seed = int(rng.integers(2**31))
        if strategy == "exploit":
            return exploit(fitted, d, self.num_restarts, self.raw_samples).numpy()
        if strategy == "thompson":
            return thompson(fitted, d, seed).numpy()
        return pareto(fitted, d, seed, rng).numpy()
