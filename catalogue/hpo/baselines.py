"""AEGiS's asynchronous baselines as optuna samplers on the same GP machinery:

- ``KrigingBelieverSampler``: LogEI on a GP where every RUNNING point is added with its
  posterior mean as if observed (hyperparameters fixed); with no running points this is
  sequential LogEI;
- ``LocalPenalisationSampler`` (González et al. 2016): EI x prod_j Phi((L ||x - x_j|| - mu(x_j) + M) / sigma(x_j))
  over RUNNING points x_j on the loss scale (minimise), L = max ||grad mu|| over Sobol points, M = min y,
  maximised in log space (the sign is derived in ``_PenalisedLogEI``);
- asynchronous Thompson sampling is ``AEGiSSampler(probabilities=(0, 1, 0))``;
- optuna's own ``GPSampler`` (qLogEI over RUNNING trials) is used as it is.

All work on the model's standardised, negated scale (maximise), which is an affine map of the
losses, so every argmax is the loss's argmin.
"""

from __future__ import annotations

from ..frame import require_extra

require_extra("hpo", "optuna", "botorch", "torch")

import torch  # noqa: E402
from botorch.acquisition import AcquisitionFunction, LogExpectedImprovement  # noqa: E402
from botorch.optim import optimize_acqf  # noqa: E402
from torch.special import log_ndtr  # noqa: E402

from .aegis import sobol  # noqa: E402
from .gp import DTYPE  # noqa: E402
from .gp_sampler_base import GPSamplerBase, as_tensor  # noqa: E402


def _bounds(d: int) -> torch.Tensor:
    return torch.stack([torch.zeros(d, dtype=DTYPE), torch.ones(d, dtype=DTYPE)])


class KrigingBelieverSampler(GPSamplerBase):
    """LogEI with RUNNING trials believed at their posterior mean (same arguments as ``GPSamplerBase``)."""

    def __init__(self, *args, num_restarts: int = 10, raw_samples: int = 1024, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_restarts, self.raw_samples = num_restarts, raw_samples

    def propose(self, fitted, x, losses, running, rng, proposal_index):
        d = x.shape[1]
        best = float(fitted.model.train_targets.max())
        if len(running):
            believed = as_tensor(running)
            with torch.no_grad():
                mean = fitted.model.posterior(believed).mean.reshape(-1)
            fitted = fitted.with_points(believed, mean)
        acquisition = LogExpectedImprovement(fitted.model, best_f=best)
        point, _ = optimize_acqf(acquisition, bounds=_bounds(d), q=1, num_restarts=self.num_restarts,
                                 raw_samples=self.raw_samples)
        return point.detach().reshape(d).numpy()


class _PenalisedLogEI(AcquisitionFunction):
    """log EI(x) + sum_j log Phi((L ||x - x_j|| - mu(x_j) + M) / sigma(x_j)), on the loss scale (minimise).

    The sign, derived for this code's convention: ``busy_mean`` and ``loss_min`` are on the loss
    scale, which is minimised (M = min y <= mu). With f L-Lipschitz and M = min f, every x with
    ||x - x_j|| < (f(x_j) - M)/L has f(x) >= f(x_j) - L ||x - x_j|| > M, so the ball of radius
    r_j = (f(x_j) - M)/L around a busy point x_j cannot hold a better point. The penaliser is the probability that x lies outside
    that ball, with f(x_j) ~ N(mu(x_j), sigma(x_j)^2):
        P(||x - x_j|| >= (f(x_j) - M)/L) = P(f(x_j) <= M + L d) = Phi((L d - (mu(x_j) - M)) / sigma(x_j)).
    A busy point predicted far above the best loss therefore excludes a large ball (strong
    penalty at and near it); one predicted at the best loss excludes almost nothing. The
    opposite sign, Phi((L d + (mu - M))/sigma), penalises busy points least exactly where they
    are worst and gives Phi > 1/2 at x_j whenever mu(x_j) > M (the test checks this case).
    On the model's own scale (negated losses m = -f, maximised, M' = max m = -M) the radius reads
    (M' - m(x_j))/L, González et al.'s maximisation form: the same ball, the same sign.
    """

    def __init__(self, model, best_f: float, busy: torch.Tensor, lipschitz: float, loss_min: float):
        super().__init__(model)
        self.log_ei = LogExpectedImprovement(model, best_f=best_f)
        self.busy, self.lipschitz, self.loss_min = busy, lipschitz, loss_min
        with torch.no_grad():
            posterior = model.posterior(busy)
        # the model predicts negated losses: the loss mean is -mean
        self.busy_mean = -posterior.mean.reshape(-1)
        self.busy_sd = posterior.variance.reshape(-1).clamp_min(1e-12).sqrt()

    def log_penalty(self, X) -> torch.Tensor:
        """sum_j log Phi((L ||x - x_j|| - (mu(x_j) - M)) / sigma(x_j)) for X of shape b x 1 x d: shape b."""
        distance = torch.cdist(X.squeeze(-2), self.busy)  # b x m
        z = (self.lipschitz * distance - (self.busy_mean - self.loss_min)) / self.busy_sd
        return log_ndtr(z).sum(-1)

    def forward(self, X):
        return self.log_ei(X) + self.log_penalty(X)


class LocalPenalisationSampler(KrigingBelieverSampler):
    """Local penalisation around RUNNING points (same arguments as ``KrigingBelieverSampler``)."""

    def propose(self, fitted, x, losses, running, rng, proposal_index):
        d = x.shape[1]
        model = fitted.model
        best = float(model.train_targets.max())
        if not len(running):
            acquisition = LogExpectedImprovement(model, best_f=best)
        else:
            grid = sobol(1024, d, int(rng.integers(2**31))).requires_grad_(True)
            mean = model.posterior(grid).mean.sum()
            (gradient,) = torch.autograd.grad(mean, grid)
            lipschitz = float(gradient.norm(dim=-1).max().clamp_min(1e-7))
            acquisition = _PenalisedLogEI(model, best, as_tensor(running), lipschitz, -best)
        point, _ = optimize_acqf(acquisition, bounds=_bounds(d), q=1, num_restarts=self.num_restarts,
                                 raw_samples=self.raw_samples)
        return point.detach().reshape(d).numpy()
