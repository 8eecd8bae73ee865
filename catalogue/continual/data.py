"""Split-digits and permuted-digits: the continual benchmarks, built from scikit-learn's 8x8 digits
(shipped with the package, no download)."""

from __future__ import annotations

from asyncgen.catalogue.frame import require_extra

require_extra("continual", "sklearn")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x_train, y_train, x_test, y_test


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Task:
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def split_digits(tasks: int = 5, test_fraction: float = 0.25, seed: int = 0) -> list[Task]:
    """Task k holds digits {2k, 2k+1} with local labels 0/1 (task-incremental)."""
    if not 1 <= tasks <= 5:
        raise ValueError(f"split digits: tasks={tasks}; accepted 1..5")
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    out = []
    for k in range(tasks):
        mask = (y == 2 * k) | (y == 2 * k + 1)
        out.append(_split(x[mask], y[mask] - 2 * k, test_fraction, seed))
    return out


def permuted_digits(tasks: int = 5, test_fraction: float = 0.25, seed: int = 0) -> list[Task]:
    """Task 0 is the plain 10-class digits, task k > 0 the same images under a fixed pixel permutation."""
    if tasks < 1:
        raise ValueError(f"permuted digits: tasks={tasks}; accepted >= 1")
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    rng = np.random.default_rng(seed)
    out = []
    for k in range(tasks):
        permutation = np.arange(x.shape[1]) if k == 0 else rng.permutation(x.shape[1])
        out.append(_split(x[:, permutation], y, test_fraction, seed))
    return out
