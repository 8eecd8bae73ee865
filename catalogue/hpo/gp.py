"""The Gaussian-process pieces the hpo samplers share: fitting a botorch ``SingleTaskGP`` (Matérn-5/2
ARD on inputs in [0, 1]^d) to standardised, negated losses, with optional warm-started
hyperparameters, and a Latin hypercube for start-up trials.

Losses are negated (botorch maximises) and standardised here rather than by an outcome
transform, so believer points added later live on the same scale and the fitted
hyperparameters stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..frame import require_extra

require_extra("hpo", "botorch", "gpytorch", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from botorch.fit import fit_gpytorch_mll  # noqa: E402
from botorch.models import SingleTaskGP  # noqa: E402
from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior  # noqa: E402
from gpytorch.mlls import ExactMarginalLogLikelihood  # noqa: E402

DTYPE = torch.float64


@dataclass
class FittedGP:
    """A GP on standardised negated losses; ``scale(y)`` maps losses to the model's targets."""

    model: SingleTaskGP
    y_mean: float
    y_std: float

    def scale(self, losses) -> torch.Tensor:
        return -(torch.as_tensor(losses, dtype=DTYPE) - self.y_mean) / self.y_std

    def with_points(self, x: torch.Tensor, targets: torch.Tensor) -> "FittedGP":
        """The same hyperparameters on the data plus (x, targets) (targets already on the model's scale)."""
        model = _gp(torch.cat([self.model.train_inputs[0], x]), torch.cat([self.model.train_targets, targets])[:, None])
        model.load_state_dict(self.model.state_dict(), strict=False)
        model.eval()
        return FittedGP(model, self.y_mean, self.y_std)


def _gp(x: torch.Tensor, y: torch.Tensor) -> SingleTaskGP:
    # Matérn-5/2 with one lengthscale per input and botorch's dimension-scaled log-normal lengthscale prior (the
    # prior keeps fits on 10-60 points from running to extreme lengthscales); targets are standardised, so no
    # outputscale
    kernel = get_covar_module_with_dim_scaled_prior(ard_num_dims=x.shape[-1], use_rbf_kernel=False)
    return SingleTaskGP(x, y, covar_module=kernel, outcome_transform=None)


def fit_gp(x, losses, hyperparameters: dict | None = None, refit: bool = True) -> FittedGP:
    """A GP on ``losses`` at ``x`` (n x d in [0, 1]).

    ``hyperparameters`` (from ``hyperparameters_of``) warm-start the fit; with ``refit=False`` they
    are used as they are (no marginal-likelihood optimisation).
    """
    x = torch.as_tensor(np.asarray(x), dtype=DTYPE)
    losses = np.asarray(losses, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x: a GP fit needs at least 2 completed points, got {x.shape[0] if x.ndim == 2 else x.shape}")
    mean, std = float(losses.mean()), float(losses.std())
    std = std if std > 0 else 1.0
    targets = -(torch.as_tensor(losses, dtype=DTYPE) - mean) / std
    model = _gp(x, targets[:, None])
    if hyperparameters is not None:
        model.load_state_dict({k: v for k, v in hyperparameters.items() if "train" not in k}, strict=False)
    if refit or hyperparameters is None:
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        try:
            fit_gpytorch_mll(mll)
        except Exception:  # noqa: BLE001 - botorch raises several types when all restarts fail; keep the priors
            pass
    model.eval()
    return FittedGP(model, mean, std)


def hyperparameters_of(fitted: FittedGP) -> dict:
    """The kernel and likelihood parameters (not the data) to warm-start a later fit."""
    return {k: v.clone() for k, v in fitted.model.state_dict().items() if "train" not in k}


def latin_hypercube(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n points in [0, 1]^d, one per row and per column stratum."""
    strata = np.stack([rng.permutation(n) for _ in range(d)], axis=1)
    return (strata + rng.random((n, d))) / n
