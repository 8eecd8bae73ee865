"""Decentralised inference: one process per agent, point-to-point messages over
``torch.distributed`` (gloo on CPU), each agent updating the nodes it owns on its own clock.

Agent ``r`` owns nodes ``i`` with ``i % world_size == r``. Every round it applies the
model's local update (a gradient step of E for the energy GNN, a fixed-point row for
IGNN) to its nodes from its current view of the others, then sends its nodes' states to
every other agent with ``isend`` and posts ``irecv`` for theirs. It never waits for the
current round's messages: it applies whatever has arrived, and blocks only for messages
more than ``max_delay`` rounds old — the bounded delay under which implicit GNNs provably
converge. After ``rounds`` rounds the agents gather their states and check the residual
(:class:`ConvergenceError` if it is above ``tol``).

Under ``torchrun`` (one process per agent, one machine or several) call
:func:`agent_inference` in each process after ``init_process_group("gloo")``;
:func:`run_agents_locally` spawns the processes on this machine.
"""

from __future__ import annotations

import datetime
import random
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .graphs import check_graph
from .solvers import ConvergenceError


@torch.no_grad()
def agent_inference(model, data, rounds: int = 800, max_delay: int = 2, tol: float = 1e-6,
                    jitter: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Run this process's agent; returns every node's final state (the same on every rank)."""
    if not dist.is_initialized():
        raise RuntimeError("agent_inference needs an initialised process group (gloo)")
    if isinstance(max_delay, bool) or not isinstance(max_delay, int) or max_delay < 0:
        raise ValueError(f"max_delay={max_delay!r}: expected an integer >= 0")
    check_graph(data.edge_index, data.num_nodes)
    rank, world = dist.get_rank(), dist.get_world_size()
    owner = torch.arange(data.num_nodes) % world
    mine = owner == rank
    src, dst = data.edge_index
    context = model.node_context(data) if hasattr(model, "node_context") else None
    view = model.initial_states(data).detach().clone()
    others = [r for r in range(world) if r != rank]
    inbox = {r: [] for r in others}  # per sender: (round, buffer, work) in round order
    outbox = []
    clock = random.Random(1000 * seed + rank)
    for k in range(rounds):
        new = model.node_update(view, data, view[src], view[dst], None, context)
        view[mine] = new[mine]
        payload = view[mine].contiguous()
        for r in others:
            outbox.append(dist.isend(payload, dst=r, tag=k))
            buffer = torch.empty(int((owner == r).sum()), view.size(1), dtype=view.dtype)
            inbox[r].append((k, buffer, dist.irecv(buffer, src=r, tag=k)))
        for r in others:
            pending = inbox[r]
            while pending and (pending[0][0] <= k - max_delay or pending[0][2].is_completed()):
                _, buffer, work = pending.pop(0)
                work.wait()  # a message more than max_delay rounds old: wait for it
                view[owner == r] = buffer
        if jitter:
            time.sleep(clock.uniform(0, jitter))  # agents on their own clocks
    for r in others:
        for _, buffer, work in inbox[r]:
            work.wait()
            view[owner == r] = buffer
    for work in outbox:
        work.wait()
    # all_gather needs equal sizes: every agent sends its states padded to the largest block
    largest = int(torch.bincount(owner, minlength=world).max())
    padded = torch.zeros(largest, view.size(1), dtype=view.dtype)
    padded[:int(mine.sum())] = view[mine]
    states = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(states, padded)
    for r in range(world):
        view[owner == r] = states[r][:int((owner == r).sum())]
    residual = model.residual(view, data, context)
    if residual >= tol:
        raise ConvergenceError(f"agent inference ({world} agents, {rounds} rounds)", residual, tol, rounds)
    return view


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_process(rank, world_size, port, model, data, kwargs, results, timeout):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        states = agent_inference(model, data, **kwargs)
        if rank == 0:
            results.put(states.numpy())  # by value: the process exits before the parent reads
    finally:
        dist.destroy_process_group()


def run_agents_locally(model, data, world_size: int = 4, timeout: float = 60.0, **kwargs) -> torch.Tensor:
    """Spawn ``world_size`` agent processes on this machine (gloo on 127.0.0.1); the final states."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size!r}: expected at least 1")
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_agent_process, args=(world_size, free_port(), model, data, kwargs, results, timeout),
                       nprocs=world_size, join=True, start_method="spawn")
    return torch.from_numpy(results.get())
