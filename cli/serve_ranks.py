"""The ranks of ``asyncgen serve``: each loads its share of the pipeline once, then runs requests as they come.

Rank 0 serves HTTP (:mod:`asyncgen.cli.serve_http`) and takes one job at a time from the queue;
it broadcasts each job's settings to the other ranks over a gloo group of their own (the control
group), and every rank makes the same pipeline calls, as ``asyncgen generate`` does. At every step
boundary rank 0 broadcasts one flag, "stop": a cancelled job stops on every rank at the same step
(diffusers' interrupt), so the ranks are ready for the next one together. While idle, rank 0 sends
an idle message every few seconds: the others' wait never reaches the group's timeout, and a rank
that died is noticed then rather than at the next request.
"""

from __future__ import annotations

import io
import os
import signal
import time
from dataclasses import dataclass

from .generate import GenerateJob
from .serve_requests import Limits

# how often an idle rank 0 tells the others it is alive; a fraction of the group's timeout
IDLE_TICK_SECONDS = 5.0


@dataclass
class ServeSettings:
    """What every rank needs; plain values and multiprocessing primitives, so it pickles into spawned workers."""

    job: GenerateJob  # the model and layout, checked by generate's make_job (its prompts and outputs are unused)
    host: str
    port: int
    limits: Limits
    max_queue: int
    max_body_bytes: int
    drain_grace: float
    api_key: str | None
    # shared integers without locks (multiprocessing RawValue): an Event or a locked Value would deadlock the
    # launching process once a rank that waited on it, or held its lock, was killed
    stop: object  # 1: the launching process asks rank 0 to drain and stop (rank 0 polls it)
    ready: object  # 1: rank 0 has loaded and listens (a later failure may restart the group)
    bound_port: object  # the port rank 0 listens on (--port 0 picks a free one)
    devices: int = 1


def serve_worker(rank: int, world: int, settings: ServeSettings) -> dict:
    """One rank of ``asyncgen serve``; returns when the server stops (rank 0: how many jobs it ran)."""
    from asyncgen.cli.files import StandardStreams

    with StandardStreams():
        return _serve(rank, world, settings)


def _load(job: GenerateJob, rank: int, world: int):
    """The pipeline as ``asyncgen generate`` builds it for the same job (its own function: stage-only loading when
    several ranks run it, the stock pipeline on one)."""
    from .errors import UsageError
    from .generate import build_pipeline

    if job.video or job.highres:
        raise UsageError("asyncgen serve makes images with AsyncDiff: video pipelines and --highres are not served")
    return build_pipeline(job, rank, world)


def call_arguments(job: GenerateJob, params: dict) -> dict:
    """The pipeline call's keyword arguments for a request, with the defaults ``asyncgen generate`` uses."""
    from .generate import call_arguments as generate_call

    return generate_call(job, params["negative_prompt"], params["height"], params["width"], params["steps"],
                         params["guidance"])


def png_bytes(image) -> bytes:
    """The image as ``asyncgen generate -o x.png`` writes it (PIL's PNG encoder, no metadata)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Cancelled(Exception):
    pass


def run_request(pipe, job: GenerateJob, params: dict, rank: int, control, should_stop=None, on_step=None):
    """Make a request's images on this rank (every rank calls this with the same ``params``).

    ``should_stop()`` (rank 0) is asked at every step boundary; its answer is broadcast, and on
    "stop" every rank ends the pipeline call at that step. Returns rank 0's PNG bytes (the
    others: None), or raises :class:`Cancelled` on every rank.
    """
    import torch
    import torch.distributed as dist

    from asyncgen._compat import interrupt_pipeline

    call = call_arguments(job, params)
    images: list[bytes] = []
    for index in range(params["n"]):
        stopped = [False]
        last = [time.perf_counter()]

        def step_end(pipeline, step, timestep, tensors, index=index):
            stop = bool(should_stop()) if rank == 0 and should_stop is not None else False
            if control is not None:
                flag = torch.tensor([int(stop)], dtype=torch.int32)
                dist.broadcast(flag, src=0, group=control)
                stop = bool(flag.item())
            now = time.perf_counter()
            if on_step is not None:
                on_step(index, step + 1, len(pipeline.scheduler.timesteps), now - last[0])
            last[0] = now
            if stop:
                stopped[0] = True
                # diffusers' way to end a call early: the loop skips the remaining steps
                interrupt_pipeline(pipeline)
            return {}

        generator = torch.Generator("cpu").manual_seed(params["seed"] + index)
        output = pipe(params["prompt"], generator=generator, callback_on_step_end=step_end, **call)
        if stopped[0]:
            raise Cancelled()
        if rank == 0:
            images.append(png_bytes(output.images[0]))
    return images if rank == 0 else None


def _serve(rank: int, world: int, settings: ServeSettings) -> dict:
    from .generate import load_libraries

    load_libraries()
    import torch.distributed as dist

    job = settings.job
    pipe = _load(job, rank, world)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    control = None
    if world > 1:
        from asyncgen.comm.context import environment_timeout

        if not dist.is_initialized():  # one stage on several ranks is still AsyncDiff: the group exists by now
            raise RuntimeError("asyncgen serve: the process group was not set up by the pipeline")
        control = dist.new_group(backend="gloo", timeout=environment_timeout())
    if rank == 0:
        from .serve_leader import lead

        return lead(pipe, settings, world, control)
    return _follow(pipe, job, rank, control)


def _follow(pipe, job: GenerateJob, rank: int, control) -> dict:
    """A rank other than 0: run what rank 0 broadcasts, until it says stop."""
    import torch.distributed as dist

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 decides when the group stops (it drains first)
    dist.all_gather_object([None] * dist.get_world_size(control), os.getpid(), group=control)
    ran = 0
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=control)
        op, params = message[0]
        if op == "stop":
            return {"rank": rank, "ran": ran}
        if op == "run":
            try:
                run_request(pipe, job, params, rank, control)
            except Cancelled:
                pass
            ran += 1
