"""Bytes and time of the collectives a process runs, counted from the profiler's backend events.

Both kinds of peer communicate differently: diffusers' context parallelism calls torch's
functional collectives (``all_to_all_single``, ``all_gather_tensor``) from inside its attention
and output hooks; asyncgen sends and receives through ``torch.distributed``. Rather than
wrap either library's functions (the functional collectives live in a private torch module),
:class:`CollectiveTraffic` runs ``torch.profiler`` over a call and reads the events the process
group backend records for each operation it executes (``gloo:all_to_all``, ``gloo:send``, ...;
``nccl:...`` on GPUs), with their tensors' shapes and dtypes. Every library's collectives pass
through that one layer, so both are measured by the same rule.

Per operation: the payload (bytes of the tensor handed to it on this rank), the bytes that
leave this rank by the operation's definition in a group of ``W`` ranks (all-to-all: the
``(W-1)/W`` of its input addressed to others; all-gather: its shard to each of ``W-1``
others; send: all of it; receive: none; broadcast: ``(W-1)/W`` of it, the mean over ranks
since the event does not say which rank was the source; all-reduce: ``2(W-1)/W``, a ring),
and, with gloo, the time the backend spent in it (its start to its end in gloo's thread,
waiting for the peer included). NCCL's host-side events do not time the transfer, so no time
is reported there. The profiler slows the counted call: its time is never the latency.
"""

from __future__ import annotations

from collections import defaultdict

# the element sizes of the dtype names the profiler writes (c10's type names)
ELEMENT_BYTES = {
    "float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "long": 8, "int": 4,
    "short int": 2, "short": 2, "signed char": 1, "unsigned char": 1, "bool": 1, "c10::complex<float>": 8,
    "c10::complex<double>": 16, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1,
}
BACKENDS = ("gloo:", "nccl:")


def sent_fraction(kind: str, world: int) -> float:
    """The bytes one rank sends per byte of payload, for operation ``kind`` in a group of ``world`` ranks."""
    if kind in ("all_to_all", "alltoall", "alltoall_base", "reduce_scatter", "broadcast"):
        return (world - 1) / world
    if kind in ("all_gather", "allgather", "allgather_into_tensor_coalesced", "all_gather_into_tensor"):
        return world - 1
    if kind in ("all_reduce", "allreduce"):
        return 2 * (world - 1) / world
    if kind in ("recv", "irecv", "recv_anysource"):
        return 0.0
    return 1.0  # send, and anything else: its payload leaves the rank once


def payload_bytes(shapes, dtypes) -> int | None:
    """Bytes of an event's tensors (None when a dtype is not one the table knows)."""
    total = 0
    for shape, dtype in zip(shapes, dtypes):
        if not isinstance(shape, (list, tuple)) or any(not isinstance(d, int) for d in shape):
            continue  # a tensor list or a scalar argument: the backend events carry single tensors
        if dtype not in ELEMENT_BYTES:
            return None
        count = 1
        for d in shape:
            count *= d
        total += count * ELEMENT_BYTES[dtype]
    return total


class CollectiveTraffic:
    """``with CollectiveTraffic() as traffic: pipe(...)``; then :meth:`summary`.

    ``events`` holds one ``(kind, payload_bytes, seconds or None)`` per backend operation
    this process ran while active, in every thread (gloo runs asynchronous operations in
    threads of its own).
    """

    def __init__(self):
        self.events: list[tuple[str, int | None, float | None]] = []
        self._profile = None

    def __enter__(self) -> "CollectiveTraffic":
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        for event in self._profile.profiler.kineto_results.events():
            name = event.name()
            backend = next((b for b in BACKENDS if name.startswith(b)), None)
            if backend is None:
                continue
            timed = backend == "gloo:"  # NCCL's host-side event ends when the kernel is queued
            self.events.append((name[len(backend):], payload_bytes(event.shapes(), event.dtypes()),
                                event.duration_ns() / 1e9 if timed else None))
        self._profile = None

    def summary(self, world: int, steps: int) -> dict:
        """Per operation kind, per step: calls, payload bytes per call, bytes sent, milliseconds in the backend.

        ``world`` is the size of the group the operations ran in; ``steps`` the denoising
        steps of the counted call (every figure is divided by it).
        """
        kinds: dict[str, dict] = defaultdict(lambda: dict(calls=0, payload=0, sent=0.0, seconds=0.0, timed=True,
                                                          unknown_dtype=0))
        for kind, payload, seconds in self.events:
            entry = kinds[kind]
            entry["calls"] += 1
            if payload is None:
                entry["unknown_dtype"] += 1
            else:
                entry["payload"] += payload
                entry["sent"] += payload * sent_fraction(kind, world)
            if seconds is None:
                entry["timed"] = False
            else:
                entry["seconds"] += seconds
        out = {}
        for kind, entry in sorted(kinds.items()):
            out[kind] = dict(calls_per_step=entry["calls"] / steps,
                             payload_bytes_per_call=entry["payload"] / max(entry["calls"] - entry["unknown_dtype"], 1),
                             sent_bytes_per_step=entry["sent"] / steps,
                             ms_per_step=1e3 * entry["seconds"] / steps if entry["timed"] else None,
                             ms_per_call=1e3 * entry["seconds"] / entry["calls"] if entry["timed"] else None,
                             calls_of_unknown_dtype=entry["unknown_dtype"])
        return out


def combine(per_rank: list[dict]) -> dict:
    """The summaries of each rank of one run: per kind, the mean over the ranks; ``sent_bytes_per_step_all_ranks``
    the sum (the traffic of the whole group per step)."""
    kinds = sorted({k for summary in per_rank for k in summary})
    out = {}
    for kind in kinds:
        entries = [summary.get(kind) for summary in per_rank]
        present = [e for e in entries if e is not None]
        mean = {}
        for field in ("calls_per_step", "payload_bytes_per_call", "sent_bytes_per_step", "ms_per_step", "ms_per_call"):
            values = [e[field] for e in present if e[field] is not None]
            # a rank that never ran this kind contributes zero calls and zero bytes to the mean
            mean[field] = (sum(values) / len(entries) if field in ("calls_per_step", "sent_bytes_per_step",
                                                                    "ms_per_step") else sum(values) / len(values)) \
                if values else None
        mean["sent_bytes_per_step_all_ranks"] = sum(e["sent_bytes_per_step"] for e in present)
        out[kind] = mean
    return out
