"""How fast the ranks of a process group reach each other: latency and bandwidth of one message, measured.

The layout chooser (:mod:`asyncgen.cost.layout`) charges every transfer ``latency + bytes /
bandwidth``. :func:`probe_link` measures the two numbers on the group the work will run on, with
the tensors and the backend the work will use: rank 0 and every other rank in turn play
ping-pong (rank 0 sends, the peer sends the same bytes back) at a few message sizes; a
round trip of ``b`` bytes costs ``2 (latency + b / bandwidth)``, so a least-squares line
through (bytes, half round trip) gives both. Each pair's numbers are fitted separately and the
slowest pair's kept (a layout's transfers wait on its slowest link). Every rank returns the
same :class:`LinkMeasurement` (rank 0 broadcasts it).

It also times ``all_to_all_single`` over the whole group at the same sizes, through the
functional collectives as diffusers' context parallelism calls it four times per attention layer
(its fixed cost is the backend's and the functional path's, not two messages'), and what running together costs each rank's compute (``parallel_slowdown``): a
fixed matmul workload timed on each rank alone (the others waiting) and then on all ranks at
once. Ranks that share cores or memory bandwidth (CPU processes on one host, other tenants on
the machine) compute slower together than alone; a layout that keeps every rank busy pays
that factor, which a one-rank timing of the units cannot see. A few seconds on CPU; the
caller keeps the result (the CLI caches it on disk), the engine only measures.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

# message sizes of the ping-pong: small enough to be latency-bound, large enough to be bandwidth-bound
# (the largest boundary states of the bench models are a few MiB, attention all-to-alls a few hundred KiB)
DEFAULT_SIZES = (4, 64 * 2**10, 1 * 2**20, 4 * 2**20)


@dataclass(frozen=True)
class LinkMeasurement:
    """One message between two ranks costs ``latency_s + bytes / bandwidth_bytes_per_s``."""

    latency_s: float
    bandwidth_bytes_per_s: float
    world_size: int
    parallel_slowdown: float  # compute time with every rank busy over compute time alone (>= about 1)
    # one all-to-all over the whole group costs all_to_all_latency_s + payload bytes per rank / all_to_all_bytes_per_s
    all_to_all_latency_s: float
    all_to_all_bytes_per_s: float
    backend: str
    device: str
    sizes: tuple[int, ...]
    repeats: int

    def to_dict(self) -> dict:
        return dict(asdict(self), sizes=list(self.sizes))

    @classmethod
    def from_dict(cls, data: dict) -> "LinkMeasurement":
        return cls(latency_s=float(data["latency_s"]), bandwidth_bytes_per_s=float(data["bandwidth_bytes_per_s"]),
                   world_size=int(data["world_size"]), parallel_slowdown=float(data["parallel_slowdown"]),
                   all_to_all_latency_s=float(data["all_to_all_latency_s"]),
                   all_to_all_bytes_per_s=float(data["all_to_all_bytes_per_s"]),
                   backend=str(data["backend"]), device=str(data["device"]),
                   sizes=tuple(int(s) for s in data["sizes"]), repeats=int(data["repeats"]))


def fit_line(sizes: list[float], seconds: list[float]) -> tuple[float, float]:
    """``(latency, bandwidth)`` of the least-squares line ``seconds = latency + size / bandwidth``.

    Clamped to what a line through measurements can mean: a latency below zero (noise on a
    fast link) becomes zero, a slope at or below zero (noise on a link so fast that the sizes
    make no difference) an infinite bandwidth is not returned: the largest size over its time.
    """
    if len(sizes) != len(seconds) or len(set(sizes)) < 2:
        raise ValueError(f"need at least two different message sizes to fit a line, got sizes {sizes}")
    mean_x, mean_y = statistics.fmean(sizes), statistics.fmean(seconds)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, seconds))
             / sum((x - mean_x) ** 2 for x in sizes))
    largest = max(range(len(sizes)), key=lambda i: sizes[i])
    if slope <= 0:
        return max(min(seconds), 0.0), sizes[largest] / max(seconds[largest], 1e-12)
    return max(mean_y - slope * mean_x, 0.0), 1.0 / slope


def probe_link(group=None, device: torch.device | str | None = None, sizes=DEFAULT_SIZES,
               repeats: int = 5) -> LinkMeasurement:
    """Measure latency and bandwidth between rank 0 and each other rank of ``group`` (every rank calls this).

    ``device`` is where the work's tensors live (None: the CPU); the transfers use the
    group's backend for it, as the runtime's do. The median of ``repeats`` round trips per
    size (after one untimed trip) is taken, which keeps a stray slow trip on a shared
    machine out of the fit.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least 1")
    sizes = tuple(int(s) for s in sizes)
    if len(set(sizes)) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes={list(sizes)}: need at least two different positive sizes in bytes")
    from asyncgen.comm.p2p import control_device, p2p_device

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world < 2:
        raise ValueError("probe_link needs a group of at least 2 ranks: one process has no link to measure")
    backend = dist.get_backend(group)
    where = p2p_device(backend, torch.device(device) if device is not None else None)
    sync = (lambda: torch.cuda.synchronize(where)) if where.type == "cuda" else (lambda: None)

    def peer_of(r: int) -> int:
        return dist.get_global_rank(group, r) if group is not None else r

    buffers = {size: torch.zeros(size, dtype=torch.uint8, device=where) for size in sizes}
    fits: list[tuple[float, float]] = []
    for other in range(1, world):
        half_trips: dict[int, list[float]] = {size: [] for size in sizes}
        for size in sizes:
            buffer = buffers[size]
            for trip in range(repeats + 1):
                if rank == 0:
                    sync()
                    start = time.perf_counter()
                    dist.send(buffer, peer_of(other), group=group)
                    dist.recv(buffer, peer_of(other), group=group)
                    sync()
                    if trip > 0:  # the first trip connects the pair and warms buffers
                        half_trips[size].append((time.perf_counter() - start) / 2)
                elif rank == other:
                    dist.recv(buffer, peer_of(0), group=group)
                    dist.send(buffer, peer_of(0), group=group)
        if rank == 0:
            fits.append(fit_line([float(s) for s in sizes], [statistics.median(half_trips[s]) for s in sizes]))
    all_to_all = _all_to_all_fit(group, where, world, sizes, repeats, sync)
    slowdown = _parallel_slowdown(group, where, world, rank, repeats, sync)
    answer = torch.zeros(5, dtype=torch.float64, device=control_device(backend, where))
    if rank == 0:
        # the slowest pair: a layout's transfers are only as fast as its slowest link
        answer[0] = max(latency for latency, _ in fits)
        answer[1] = min(bandwidth for _, bandwidth in fits)
        answer[2] = slowdown
        answer[3], answer[4] = all_to_all
    dist.broadcast(answer, peer_of(0), group=group)
    return LinkMeasurement(latency_s=float(answer[0]), bandwidth_bytes_per_s=float(answer[1]), world_size=world,
                           parallel_slowdown=float(answer[2]), all_to_all_latency_s=float(answer[3]),
                           all_to_all_bytes_per_s=float(answer[4]), backend=str(backend), device=where.type,
                           sizes=sizes, repeats=repeats)


def _all_to_all_fit(group, where: torch.device, world: int, sizes, repeats: int, sync) -> tuple[float, float]:
    """``(latency, payload bytes per second)`` of one all-to-all over the whole group, as context parallelism
    calls it (``all_to_all_single`` on equal shards, through the functional collectives diffusers uses:
    :func:`asyncgen._compat.all_to_all_as_context_parallel`); each size's time is the slowest rank's median."""
    from asyncgen._compat import all_to_all_as_context_parallel

    medians = []
    payloads = []
    for size in sizes:
        count = max(world, (size // 4) // world * world)  # float32 elements, equal shards
        send = torch.zeros(count, dtype=torch.float32, device=where)
        times = []
        for trip in range(repeats + 1):
            dist.barrier(group=group)
            sync()
            start = time.perf_counter()
            all_to_all_as_context_parallel(send, group)
            sync()
            if trip > 0:
                times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
        payloads.append(float(count * 4))
    mine = torch.tensor(medians, dtype=torch.float64, device=where)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    slowest = [max(float(t[i]) for t in gathered) for i in range(len(sizes))]
    return fit_line(payloads, slowest)


def _parallel_slowdown(group, where: torch.device, world: int, rank: int, repeats: int, sync) -> float:
    """Rank 0's view: the slowest rank's median time for a matmul workload with all ranks at it, over the
    slowest rank's median alone (each rank timed alone in turn while the others wait at a barrier)."""
    # tens of milliseconds per run on one CPU thread: longer than a scheduler's time slice, so sharing a
    # core with other processes shows in the time, as it does in a denoising step
    a = torch.randn(512, 512, device=where)

    def workload() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(8):
            torch.mm(a, a)
        sync()
        return time.perf_counter() - start

    workload()  # warm the kernels
    alone, together = [], []
    for trip in range(repeats):
        for turn in range(world):
            dist.barrier(group=group)
            if rank == turn:
                alone.append(workload())
        dist.barrier(group=group)
        together.append(workload())
    # on `where`: the backend carries tensors there (p2p_device chose it)
    times = torch.tensor([statistics.median(alone), statistics.median(together)], dtype=torch.float64, device=where)
    gathered = [torch.zeros_like(times) for _ in range(world)]
    dist.all_gather(gathered, times, group=group)
    gathered = [t.cpu() for t in gathered]
    return max(float(t[1]) for t in gathered) / max(max(float(t[0]) for t in gathered), 1e-12)
