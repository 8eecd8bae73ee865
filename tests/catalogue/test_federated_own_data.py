"""Bring your own data to the federated family (issue 24, §5): FederatedData.from_arrays with an IID, Dirichlet or
explicit partition, FederatedData.from_dataset for a torchvision data set, and LocalSGD with any nn.Module and any
loss, run through a strategy on the simulator."""

import numpy as np
import pytest
import torch

from asyncgen.catalogue.federated.baselines import FedAvg
from asyncgen.catalogue.federated.data import MIN_SAMPLES, FederatedData
from asyncgen.catalogue.federated.engine import Simulation
from asyncgen.catalogue.federated.fedbuff import FedBuff
from asyncgen.catalogue.federated.local import LocalSGD, flatten
from asyncgen.catalogue.federated.profiles import SpeedProfile
from asyncgen.catalogue.frame import CatalogueError

torch.set_num_threads(1)


def _covers(data: FederatedData, n: int) -> bool:
    joined = np.sort(np.concatenate(data.clients))
    return np.array_equal(joined, np.arange(n))  # every training sample on exactly one client


def test_iid_and_dirichlet_partitions_hold_out_a_test_set_and_cover_the_rest():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 3, 4)), rng.integers(0, 4, size=100)
    iid = FederatedData.from_arrays(x, y, "iid", num_clients=7, seed=1)
    assert len(iid.x_test) == 20 and len(iid.x_train) == 80 and _covers(iid, 80)
    assert iid.x_train.dtype == np.float32 and iid.x_train.shape[1:] == (3, 4) and iid.y_train.dtype == np.int64
    assert sorted(iid.sizes) == [11] * 4 + [12] * 3  # near-equal parts: 80 = 4 x 11 + 3 x 12
    # the held-out samples are not in training: the inputs of train and test are disjoint rows of x
    rows = {tuple(r.ravel()) for r in x.astype(np.float32)}
    assert {tuple(r.ravel()) for r in iid.x_train} | {tuple(r.ravel()) for r in iid.x_test} == rows
    again = FederatedData.from_arrays(x, y, "iid", num_clients=7, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(iid.clients, again.clients))
    skewed = FederatedData.from_arrays(x, y, "dirichlet", num_clients=5, alpha=0.1, seed=1,
                                       x_test=x[:10], y_test=y[:10])
    assert len(skewed.x_train) == 100 and _covers(skewed, 100) and min(skewed.sizes) >= MIN_SAMPLES


def test_explicit_partitions_by_index_lists_and_by_client_ids_agree():
    x, y = np.arange(24.0).reshape(12, 2), np.linspace(0.0, 1.0, 12)  # real targets: kept as float32
    ids = np.array([0, 1, 2] * 4)
    by_ids = FederatedData.from_arrays(x, y, ids, x_test=x[:2], y_test=y[:2])
    by_lists = FederatedData.from_arrays(x, y, [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]], x_test=x[:2],
                                         y_test=y[:2])
    assert by_ids.y_train.dtype == np.float32
    assert [c.tolist() for c in by_ids.clients] == [c.tolist() for c in by_lists.clients] == \
        [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert by_ids.weights.tolist() == [1 / 3] * 3


@pytest.mark.parametrize("call, message", [
    (lambda x, y: FederatedData.from_arrays(x, y[:5], "iid", num_clients=2), "x has 10 samples but y has 5"),
    (lambda x, y: FederatedData.from_arrays(x, y, "round-robin", num_clients=2), "partition='round-robin': expected"),
    (lambda x, y: FederatedData.from_arrays(x, y, "iid"), "num_clients=None: partition='iid' needs"),
    (lambda x, y: FederatedData.from_arrays(x, y, "iid", num_clients=5), "num_clients=5: 8 training samples"),
    (lambda x, y: FederatedData.from_arrays(x, y, [[0, 1], [2]], x_test=x, y_test=y), r"client\(s\) \[1\] hold"),
    (lambda x, y: FederatedData.from_arrays(x, y, [[0, 1], [1, 2]], x_test=x, y_test=y), "more than one client"),
    (lambda x, y: FederatedData.from_arrays(x, y, [[0, 10]], x_test=x, y_test=y), "index 10 is outside 0 .. 9"),
    (lambda x, y: FederatedData.from_arrays(x, y, [0, 1] * 5), "explicit partition indexes all of x"),
    (lambda x, y: FederatedData.from_arrays(x, y * 0.5, "dirichlet", num_clients=2), "must be integer labels"),
    (lambda x, y: FederatedData.from_arrays(x, y, "iid", num_clients=2, x_test=x), "give both x_test and y_test"),
    (lambda x, y: FederatedData.from_arrays(x, y, "iid", num_clients=2, test_fraction=1.5), "test_fraction=1.5"),
    (lambda x, y: FederatedData.from_arrays(["a"] * 10, y, "iid", num_clients=2), "x: expected a non-empty numeric"),
])
def test_bad_input_is_named(call, message):
    x, y = np.zeros((10, 2)), np.arange(10) % 2
    with pytest.raises(CatalogueError, match=message):
        call(x, y)


class _Images(torch.utils.data.Dataset):
    """A map-style data set of (tensor image, int label), as torchvision's yield with transform=ToTensor()."""

    def __init__(self, n, seed):
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 2, (n,), generator=generator)
        self.images = torch.rand(n, 1, 8, 8, generator=generator)
        self.images[labels == 1, :, :4, :4] += 1.0  # class 1 has a bright top-left quarter: learnable
        self.labels = labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 2))


def test_a_torchvision_dataset_trains_a_cnn_with_fedbuff():
    torchvision = pytest.importorskip("torchvision")
    fake = torchvision.datasets.FakeData(size=12, image_size=(1, 8, 8), num_classes=3,
                                         transform=torchvision.transforms.ToTensor())  # generated, no download
    read = FederatedData.from_dataset(fake, "iid", num_clients=3, test_fraction=0.25)
    assert read.x_train.shape == (9, 1, 8, 8) and read.y_train.dtype == np.int64 and _covers(read, 9)
    with pytest.raises(CatalogueError, match=r"train\[0\]: the input is a Image; give the data set a transform"):
        FederatedData.from_dataset(torchvision.datasets.FakeData(size=2, image_size=(1, 8, 8)), "iid", num_clients=1)

    data = FederatedData.from_dataset(_Images(160, 0), "iid", num_clients=8, test=_Images(64, 1), seed=0)
    trainer = LocalSGD(_cnn, data, lr=0.5, batch=8)
    strategy = FedBuff(flatten(_cnn()), 8, buffer_size=2, concurrency=4, steps=5)
    history = Simulation(strategy, [trainer], SpeedProfile([1.0 + i / 8 for i in range(8)], jitter=0.0),
                         lambda m, w: trainer.accuracy(w, data.x_test, data.y_test)).run(until=60.0)
    assert strategy.versions[0] > 0
    # the task is learnable (class 1's top-left quarter is brighter), so asynchronous training must beat the
    # initial model's accuracy on the held-out images
    assert history.accuracy[0][-1] > history.accuracy[0][0]


def test_any_loss_a_regression_with_mean_squared_error():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    w_true = np.array([1.0, -2.0, 0.5, 0.0, 3.0], dtype=np.float32)
    y = (x @ w_true)[:, None]  # real targets of shape (n, 1)
    data = FederatedData.from_arrays(x, y, "iid", num_clients=6, seed=0)

    def linear():
        torch.manual_seed(0)
        return torch.nn.Linear(5, 1)

    mse = torch.nn.functional.mse_loss
    trainer = LocalSGD(linear, data, lr=0.05, batch=8, loss=mse)
    initial = flatten(linear())
    strategy = FedAvg(initial, 6, cohort=6, steps=5, client_weights=data.weights, max_rounds=20)
    scores = Simulation(strategy, [trainer], SpeedProfile([1.0] * 6, jitter=0.0),
                        lambda m, w: -trainer.evaluate_loss(w, data.x_test, data.y_test)).run(until=1e6)
    first, last = -scores.accuracy[0][0], -scores.accuracy[0][-1]
    # the test loss of the initial model, computed by hand, is what the trainer reports
    with torch.no_grad():
        model = linear()
        expected = float(mse(model(torch.from_numpy(data.x_test)), torch.from_numpy(data.y_test)))
    assert first == expected
    assert last < 0.01 * first  # 20 rounds of FedAvg on a noiseless linear problem
    with pytest.raises(ValueError, match="loss='mse': expected a callable"):
        LocalSGD(linear, data, loss="mse")
