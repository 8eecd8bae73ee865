"""Beyond one machine: the same strategy objects on a Flower fleet.

Flower (flwr ≥ 1.42) supplies the message API and the deployment (SuperLink, SuperNodes,
TLS, ``flwr run``); all its built-in strategies are round-based. :func:`run_async_server` is a
``ServerApp`` main loop over ``Grid.push_messages`` / ``Grid.pull_messages`` (non-blocking):
it sends each started task to its node, feeds every reply to ``strategy.on_update`` the moment
it is pulled, sends the freed work to idle nodes, and calls ``on_timer`` on the wall clock.
Client i is the i-th node id in sorted order. :func:`client_app` builds the matching
``ClientApp``: it trains with one of our local trainers and replies with the delta.

Strategies that collect partial work (FAVANO) need clients that can be interrupted mid-fit,
which Flower's message model does not offer; the loop refuses them.

    from flwr.serverapp import ServerApp
    app = ServerApp()

    @app.main()
    def main(grid, context):
        strategy = FedBuff(initial, num_clients=len(list(grid.get_node_ids())), buffer_size=10, concurrency=100)
        run_async_server(grid, strategy, duration_s=3600)
"""

from __future__ import annotations

import time
from typing import Callable

from ..frame import CatalogueError, require_extra

require_extra("federated", "flwr")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict  # noqa: E402

from .local import Job  # noqa: E402
from .strategy import Actions, Strategy, Task  # noqa: E402

MESSAGE_TYPE = "train"


def task_message(task: Task, node_id: int) -> Message:
    """The instruction for one task: the base weights and (steps, base_version, model)."""
    content = RecordDict({
        "arrays": ArrayRecord(numpy_ndarrays=[task.weights.numpy()]),
        "config": ConfigRecord({"steps": task.steps, "base_version": task.base_version, "model": task.model,
                                "client": task.client}),
    })
    return Message(content=content, dst_node_id=node_id, message_type=MESSAGE_TYPE)


def train_reply(message: Message, trainer, client: int | None = None) -> Message:
    """Run the task in ``message`` with ``trainer`` and build the reply carrying the delta.

    ``trainer`` may be a list with one trainer per model (FedAST): the task's ``model`` picks one.
    """
    config = message.content["config"]
    if isinstance(trainer, (list, tuple)):
        trainer = trainer[int(config["model"])]
    base = torch.from_numpy(message.content["arrays"].to_numpy_ndarrays()[0].copy())
    client = int(config["client"]) if client is None else client
    (delta,) = trainer.train([Job(client, base, int(config["steps"]))])
    content = RecordDict({"arrays": ArrayRecord(numpy_ndarrays=[delta.numpy()]),
                          "config": ConfigRecord({"steps": int(config["steps"])})})
    return Message(content=content, reply_to=message)


def client_app(make_trainer: Callable[[object], object]):
    """A Flower ``ClientApp`` whose train handler runs ``make_trainer(context)`` on the received task.

    The client's index comes from ``context.node_config["partition-id"]`` when present.
    """
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        partition = context.node_config.get("partition-id")
        return train_reply(message, make_trainer(context), None if partition is None else int(partition))

    return app


def run_async_server(grid, strategy: Strategy, *, duration_s: float | None = None, max_updates: int | None = None,
                     clock: Callable[[], float] = time.monotonic, poll_s: float = 0.01) -> Strategy:
    """Drive ``strategy`` over ``grid`` until ``duration_s`` wall seconds or ``max_updates`` replies.

    Times given to the strategy are seconds since the start on ``clock``.
    """
    if strategy.interruptible:
        raise CatalogueError(f"strategy {strategy.name}: collecting partial work needs interruptible clients, "
                             "which Flower's messages do not provide")
    if duration_s is None and max_updates is None:
        raise CatalogueError("run_async_server: give duration_s or max_updates, or it never stops")
    nodes = sorted(int(n) for n in grid.get_node_ids())
    if len(nodes) < strategy.num_clients:
        raise CatalogueError(f"the grid has {len(nodes)} nodes for a strategy of N={strategy.num_clients} clients")
    start = clock()
    in_flight: dict[str, tuple[int, Task]] = {}
    current: dict[int, str] = {}  # client -> message id of its live task

    def now() -> float:
        return clock() - start

    def apply(actions: Actions) -> None:
        if actions.collect:
            raise CatalogueError(f"strategy {strategy.name} asked to collect partial work; Flower cannot")
        for c in actions.abort:
            message_id = current.pop(c, None)
            if message_id is not None:
                in_flight.pop(message_id, None)  # its reply, if any, is dropped
        for c in actions.start:
            task = strategy.dispatch(c, now())
            (message_id,) = list(grid.push_messages([task_message(task, nodes[c])]))
            in_flight[message_id] = (c, task)
            current[c] = message_id

    apply(strategy.begin(now()))
    updates = 0
    while in_flight or strategy.next_timer() is not None:
        if duration_s is not None and now() >= duration_s:
            break
        timer = strategy.next_timer()
        if timer is not None and now() >= timer:
            apply(strategy.on_timer(now()))
            continue
        replies = list(grid.pull_messages(list(in_flight)))
        if not replies:
            time.sleep(poll_s)
            continue
        for reply in replies:
            entry = in_flight.pop(reply.metadata.reply_to_message_id, None)
            if entry is None:
                continue  # aborted task
            client, task = entry
            current.pop(client, None)
            if reply.has_error():
                raise CatalogueError(f"client {client} (node {nodes[client]}) failed: {reply.error.reason}")
            delta = torch.from_numpy(np.array(reply.content["arrays"].to_numpy_ndarrays()[0], dtype=np.float32))
            if not torch.isfinite(delta).all():
                raise CatalogueError(f"client {client} sent a non-finite delta (NaN/inf) at {now():.4g} s")
            apply(strategy.on_update(client, delta, task.base_version, int(reply.content["config"]["steps"]),
                                     now()))
            updates += 1
            if max_updates is not None and updates >= max_updates:
                return strategy
    return strategy


def server_app(make_strategy: Callable[[object, object], Strategy], **loop_options):
    """A Flower ``ServerApp`` running :func:`run_async_server` with ``make_strategy(grid, context)``."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        run_async_server(grid, make_strategy(grid, context), **loop_options)

    return app
