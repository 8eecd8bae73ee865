"""Federated data: train/test arrays and each client's share of the training set.

The miniature experiments use scikit-learn's ``load_digits`` (ships with the package, no
download), a stratified 80/20 train/test split per seed, and a Dirichlet(α) label split of the
training set over N clients with at least two samples each. Your own data comes in through
:meth:`FederatedData.from_arrays` (numpy arrays, any shapes, class labels or real targets) or
:meth:`FederatedData.from_dataset` (any map-style ``torch.utils.data.Dataset`` such as a
torchvision data set), with an IID, Dirichlet or explicit partition over the clients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..frame import CatalogueError

#: fewest samples a client may hold (one SGD batch drawn with replacement needs one; two keeps a client meaningful)
MIN_SAMPLES = 2


@dataclass
class FederatedData:
    """Train/test arrays and, per client, the indices of its training samples."""

    x_train: np.ndarray  # (n, ...) float32 (digits: (n, 64) in [0, 1])
    y_train: np.ndarray  # (n, ...) int64 class labels, or float32 targets
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

    @classmethod
    def from_arrays(cls, x, y, partition="iid", *, num_clients: int | None = None, alpha: float = 1.0,
                    x_test=None, y_test=None, test_fraction: float = 0.2, seed: int = 0) -> "FederatedData":
        """Your own data as a federated data set.

        ``x`` (n, ...) are the inputs (stored as float32), ``y`` (n, ...) the targets: integer class labels (int64,
        for cross-entropy and ``accuracy``) or real values (float32, for a loss of your choice). ``partition``:

        - ``"iid"``: a random split into ``num_clients`` near-equal parts;
        - ``"dirichlet"``: each class's samples spread over ``num_clients`` in Dirichlet(``alpha``) proportions
          (integer labels only);
        - a sequence of index arrays, one per client, into ``x``;
        - an integer array of length n giving each sample's client (0 .. N-1).

        The test set is ``x_test``/``y_test`` if given; otherwise, for ``"iid"`` and ``"dirichlet"``, a random
        ``test_fraction`` of the samples held out before partitioning (an explicit partition indexes all of ``x``,
        so it needs the test set given). Every client holds at least MIN_SAMPLES samples. ``seed`` drives every
        random choice.
        """
        x, y = _as_inputs(x, "x"), _as_targets(y, "y")
        if len(x) != len(y):
            raise CatalogueError(f"x has {len(x)} samples but y has {len(y)}: one target per input")
        if (x_test is None) != (y_test is None):
            raise CatalogueError("give both x_test and y_test, or neither (then a test_fraction is held out)")
        rng = np.random.default_rng([seed, 23])
        named = isinstance(partition, str)
        if named and partition not in ("iid", "dirichlet"):
            raise CatalogueError(f"partition={partition!r}: expected 'iid', 'dirichlet', a list of index arrays "
                                 f"(one per client) or an array of client ids (one per sample)")
        if x_test is None:
            if not named:
                raise CatalogueError("an explicit partition indexes all of x: give x_test and y_test too")
            if not 0 < test_fraction < 1:
                raise CatalogueError(f"test_fraction={test_fraction}: expected a fraction in (0, 1)")
            order = rng.permutation(len(x))
            held = max(1, int(round(test_fraction * len(x))))
            test, train = order[:held], np.sort(order[held:])
            x, y, x_test, y_test = x[train], y[train], x[test], y[test]
        else:
            x_test, y_test = _as_inputs(x_test, "x_test"), _as_targets(y_test, "y_test")
            if len(x_test) != len(y_test):
                raise CatalogueError(f"x_test has {len(x_test)} samples but y_test has {len(y_test)}")
            if x_test.shape[1:] != x.shape[1:]:
                raise CatalogueError(f"x_test samples have shape {x_test.shape[1:]}, x samples {x.shape[1:]}")
        if named:
            if num_clients is None or num_clients <= 0:
                raise CatalogueError(f"num_clients={num_clients}: partition={partition!r} needs a number of "
                                     f"clients >= 1")
            if partition == "dirichlet":
                if y.dtype != np.int64 or y.ndim != 1:
                    raise CatalogueError("partition='dirichlet' splits by class: y must be integer labels of shape (n,)")
                clients = dirichlet_split(y, num_clients, alpha, rng)
            else:
                if len(x) < MIN_SAMPLES * num_clients:
                    raise CatalogueError(f"num_clients={num_clients}: {len(x)} training samples cannot give every "
                                         f"client {MIN_SAMPLES} (need num_clients <= {len(x) // MIN_SAMPLES})")
                clients = [np.sort(part) for part in np.array_split(rng.permutation(len(x)), num_clients)]
        else:
            clients = _explicit_partition(partition, len(x))
        return cls(x, y, x_test, y_test, [np.asarray(c, dtype=np.int64) for c in clients])

    @classmethod
    def from_dataset(cls, train, partition="iid", *, test=None, **kwargs) -> "FederatedData":
        """A map-style ``torch.utils.data.Dataset`` (e.g. ``torchvision.datasets.MNIST(root, transform=ToTensor())``)
        as a federated data set: every ``(input, target)`` item is read once into arrays, then as
        :meth:`from_arrays` (``partition``, ``num_clients``, ``alpha``, ``test_fraction``, ``seed``); ``test``, a
        second data set, is the test set. Inputs must come out as tensors or arrays: give the data set a
        ``transform`` (such as ``ToTensor()``) if it yields images."""
        x, y = _read_dataset(train, "train")
        if test is not None:
            kwargs["x_test"], kwargs["y_test"] = _read_dataset(test, "test")
        return cls.from_arrays(x, y, partition, **kwargs)

    def relabel(self, labels_train: np.ndarray, labels_test: np.ndarray) -> "FederatedData":
        """The same clients and inputs with other targets (e.g. label parity for a second task)."""
        return FederatedData(self.x_train, labels_train, self.x_test, labels_test, self.clients)


def _as_inputs(x, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim < 1 or len(array) == 0 or not np.issubdtype(array.dtype, np.number):
        raise CatalogueError(f"{name}: expected a non-empty numeric array of samples (n, ...), got "
                             f"{array.dtype} of shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _as_targets(y, name: str) -> np.ndarray:
    array = np.asarray(y)
    if array.ndim < 1 or len(array) == 0:
        raise CatalogueError(f"{name}: expected one target per sample, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return np.ascontiguousarray(array, dtype=np.int64)
    if np.issubdtype(array.dtype, np.floating):
        return np.ascontiguousarray(array, dtype=np.float32)
    raise CatalogueError(f"{name}: expected integer class labels or real targets, got {array.dtype}")


def _explicit_partition(partition, n: int) -> list[np.ndarray]:
    """Client index arrays from a list of index arrays or from one client id per sample; checked."""
    ids = np.asarray(partition) if not isinstance(partition, (list, tuple)) else None
    if ids is not None and ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer):
        if len(ids) != n:
            raise CatalogueError(f"partition: {len(ids)} client ids for {n} samples (one id per sample)")
        if ids.min() < 0:
            raise CatalogueError(f"partition: client id {int(ids.min())} < 0 (ids are 0 .. N-1)")
        clients = [np.flatnonzero(ids == i) for i in range(int(ids.max()) + 1)]
    else:
        clients = [np.asarray(c, dtype=np.int64).reshape(-1) for c in partition]
        seen = np.concatenate(clients) if clients else np.empty(0, dtype=np.int64)
        if len(seen) and (seen.min() < 0 or seen.max() >= n):
            raise CatalogueError(f"partition: index {int(seen.min() if seen.min() < 0 else seen.max())} is outside "
                                 f"0 .. {n - 1}")
        if len(np.unique(seen)) != len(seen):
            raise CatalogueError("partition: a sample is given to more than one client")
    if not clients:
        raise CatalogueError("partition: no clients")
    small = [i for i, c in enumerate(clients) if len(c) < MIN_SAMPLES]
    if small:
        raise CatalogueError(f"partition: client(s) {small[:10]} hold fewer than {MIN_SAMPLES} samples")
    return [np.sort(c) for c in clients]


def _read_dataset(dataset, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Every (input, target) of a map-style data set, stacked."""
    try:
        count = len(dataset)
    except TypeError:
        raise CatalogueError(f"{name}: expected a map-style data set (with len() and indexing), got "
                             f"{type(dataset).__name__}") from None
    inputs, targets = [], []
    for i in range(count):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise CatalogueError(f"{name}[{i}]: expected an (input, target) pair, got {type(item).__name__}")
        x, target = item[0], item[1]
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        elif not isinstance(x, (np.ndarray, int, float, list)):
            raise CatalogueError(f"{name}[{i}]: the input is a {type(x).__name__}; give the data set a transform "
                                 f"that makes a tensor (e.g. torchvision.transforms.ToTensor())")
        inputs.append(np.asarray(x))
        targets.append(target.detach().cpu().numpy() if hasattr(target, "detach") else np.asarray(target))
    if not inputs:
        raise CatalogueError(f"{name}: the data set is empty")
    return np.stack(inputs), np.stack(targets)


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
