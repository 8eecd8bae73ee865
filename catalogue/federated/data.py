"""The miniature federated data set: scikit-learn's ``load_digits`` (ships with the package,
no download), a stratified 80/20 train/test split per seed, and a Dirichlet(α) label split
of the training set over N clients with at least two samples each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..frame import CatalogueError

#: fewest samples a client may hold (one SGD batch drawn with replacement needs one; two keeps a client meaningful)
MIN_SAMPLES = 2


@dataclass
class FederatedData:
    """Train/test arrays and, per client, the indices of its training samples."""

    x_train: np.ndarray  # (n, 64) float32 in [0, 1]
    y_train: np.ndarray  # (n,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    clients: list[np.ndarray]  # client i -> indices into x_train

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(c) for c in self.clients], dtype=np.float64)

    @property
    def weights(self) -> np.ndarray:
        """p_i = n_i / Σ n."""
        return self.sizes / self.sizes.sum()

    def relabel(self, labels_train: np.ndarray, labels_test: np.ndarray) -> "FederatedData":
        """The same clients and inputs with other targets (e.g. label parity for a second task)."""
        return FederatedData(self.x_train, labels_train, self.x_test, labels_test, self.clients)


def load_digits_split(seed: int, test_fraction: float = 0.2):
    """``load_digits`` scaled to [0, 1], split stratified by label with ``random_state=seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)


def dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
                    skew: np.ndarray | None = None) -> list[np.ndarray]:
    """Split sample indices over clients: each class's samples go to clients in Dirichlet(α) proportions.

    ``skew`` (shape (num_clients, num_classes), optional) multiplies each client's share of each
    class before normalising, e.g. to make slow clients hold mostly classes 5–9. Clients left with
    fewer than two samples take random samples from the currently largest client, so every client
    trains; a split with fewer than 2·N samples raises.
    """
    if num_clients <= 0:
        raise CatalogueError(f"N={num_clients}: need at least one client")
    if not alpha > 0:
        raise CatalogueError(f"alpha={alpha}: the Dirichlet concentration must be > 0")
    if len(labels) < MIN_SAMPLES * num_clients:
        raise CatalogueError(f"N={num_clients}: {len(labels)} training samples cannot give every client "
                             f"{MIN_SAMPLES} samples (need N <= {len(labels) // MIN_SAMPLES})")
    classes = np.unique(labels)
    owner = np.empty(len(labels), dtype=np.int64)
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        share = rng.dirichlet(np.full(num_clients, alpha))
        if skew is not None:
            share = share * skew[:, c]
            share = share / share.sum()
        cuts = (np.cumsum(share)[:-1] * len(members)).round().astype(int)
        for client, part in enumerate(np.split(members, cuts)):
            owner[part] = client
    clients = [list(np.flatnonzero(owner == i)) for i in range(num_clients)]
    for i in range(num_clients):  # top up starved clients from the largest one
        while len(clients[i]) < MIN_SAMPLES:
            donor = max(range(num_clients), key=lambda j: (len(clients[j]), -j))
            clients[i].append(clients[donor].pop(int(rng.integers(len(clients[donor])))))
    return [np.array(sorted(c), dtype=np.int64) for c in clients]


def federated_digits(seed: int, num_clients: int, alpha: float, skew: np.ndarray | None = None) -> FederatedData:
    """Digits split for one evaluation seed: the train/test split and the client split both follow ``seed``."""
    x_train, x_test, y_train, y_test = load_digits_split(seed)
    rng = np.random.default_rng([seed, 11])
    clients = dirichlet_split(y_train, num_clients, alpha, rng, skew)
    return FederatedData(x_train, y_train, x_test, y_test, clients)


def class_skew(slow: np.ndarray, classes=range(5, 10), fraction: float = 0.8, num_classes: int = 10) -> np.ndarray:
    """Per-client class multipliers that give ``slow`` clients ``fraction`` of their labels from ``classes``
    (in expectation, with half the clients slow) and the other clients the complement."""
    inside = np.zeros(num_classes, dtype=bool)
    inside[list(classes)] = True
    skew = np.empty((len(slow), num_classes))
    skew[:, inside] = np.where(slow, fraction, 1 - fraction)[:, None]
    skew[:, ~inside] = np.where(slow, 1 - fraction, fraction)[:, None]
    return skew
