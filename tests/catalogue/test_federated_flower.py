"""The Flower adapter on an in-memory fake Grid (no Ray, no network) equals the simpy engine."""

import pytest
import torch

from asyncgen.catalogue.frame import CatalogueError
from asyncgen.catalogue.federated.data import federated_digits
from asyncgen.catalogue.federated.engine import Simulation
from asyncgen.catalogue.federated.favano import FAVANO
from asyncgen.catalogue.federated.fedbuff import FedBuff
from asyncgen.catalogue.federated.flower import run_async_server, train_reply
from asyncgen.catalogue.federated.local import BatchedMLPSGD, Job, flatten, mlp
from asyncgen.catalogue.federated.profiles import SpeedProfile

SIZES = [64, 32, 10]


class FakeGrid:
    """Grid.push_messages / pull_messages in memory: every node answers at once (zero delay), in push order."""

    def __init__(self, node_ids, trainer):
        self.node_ids, self.trainer = node_ids, trainer
        self.replies = {}
        self.pushed = 0

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.pushed += 1
            message_id = f"m{self.pushed}"
            message.metadata.__dict__["_message_id"] = message_id  # the SuperLink assigns ids
            client = self.node_ids.index(message.metadata.dst_node_id)
            self.replies[message_id] = train_reply(message, self.trainer, client)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        ready = [self.replies.pop(m) for m in message_ids if m in self.replies]
        return ready


@pytest.fixture
def flower_identity(monkeypatch):
    """What a running ServerApp provides: the run and task identity messages are stamped with."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_flower_loop_equals_simpy_engine_for_fedbuff(flower_identity):
    torch.set_num_threads(1)
    data = federated_digits(0, 8, 1.0)
    w0 = flatten(mlp(SIZES, 0))
    updates = 24

    simulated = FedBuff(w0, 8, buffer_size=3, concurrency=4, steps=2, seed=5)
    trainer = BatchedMLPSGD(SIZES, data, seed=0)
    # equal task durations: arrivals come back in dispatch order, like the zero-delay fake grid
    Simulation(simulated, [trainer], SpeedProfile([1.0] * 8, jitter=0.0),
               lambda m, w: 0.0).run(until=updates / 4 * 2 + 1)
    assert simulated.uploads >= updates

    flower = FedBuff(w0, 8, buffer_size=3, concurrency=4, steps=2, seed=5)
    grid = FakeGrid([101, 205, 307, 409, 511, 613, 717, 819], BatchedMLPSGD(SIZES, data, seed=0))
    run_async_server(grid, flower, max_updates=simulated.uploads, clock=lambda: 0.0)

    assert flower.version == simulated.version and flower.uploads == simulated.uploads
    torch.testing.assert_close(flower.weights, simulated.weights, rtol=0, atol=1e-6)  # batching rounding only


def test_flower_refuses_interruptible_strategies_and_endless_loops(flower_identity):
    grid = FakeGrid([1, 2], None)
    with pytest.raises(CatalogueError, match="interruptible"):
        run_async_server(grid, FAVANO(torch.zeros(3), 2, sample_size=1), duration_s=1)
    with pytest.raises(CatalogueError, match="give duration_s or max_updates"):
        run_async_server(grid, FedBuff(torch.zeros(3), 2, buffer_size=1, concurrency=1))



def test_train_reply_picks_the_trainer_of_the_task_model(flower_identity):
    """FedAST's tasks carry their model index; a node holding one trainer per model trains the right one."""
    import numpy as np

    from asyncgen.catalogue.federated.flower import task_message
    from asyncgen.catalogue.federated.strategy import Task

    data = federated_digits(0, 8, 1.0)
    sizes = [SIZES, [64, 10]]
    base = flatten(mlp(sizes[1], 0))
    reply = train_reply(task_message(Task(3, 0, 2, base, model=1), 7),
                        [BatchedMLPSGD(s, data, seed=0) for s in sizes], 3)
    delta = torch.from_numpy(np.array(reply.content["arrays"].to_numpy_ndarrays()[0]))
    (expected,) = BatchedMLPSGD(sizes[1], data, seed=0).train([Job(3, base, 2)])
    assert torch.equal(delta, expected) and float(expected.abs().max()) > 0
