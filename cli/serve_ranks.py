"""The ranks of ``asyncgen serve``: each loads its share of the pipeline once, then runs requests as they come.

Rank 0 serves HTTP (:mod:`asyncgen.cli.serve_http`) and takes one batch of jobs at a time from the
queue (one job, unless ``--max-batch`` lets several share pipeline calls); it broadcasts the batch's
settings to the other ranks (each derives the same plan of calls from them, :func:`plan_calls`) over a gloo group of their own (the control group),
and every rank makes the same pipeline calls, as ``asyncgen generate`` does. Before each call and at
every step boundary rank 0 broadcasts one flag, "stop": a cancelled call stops on every rank at the
same step (diffusers' interrupt), so the ranks are ready for the next one together. While idle, rank 0 sends
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
    max_batch: int = 1  # images that may share one pipeline call (--max-batch)


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


def plan_calls(batch: list[dict], max_batch: int) -> list[list[tuple[int, int]]]:
    """The pipeline calls that make a batch's images: its (job, image) pairs in order, at most ``max_batch`` a call.

    With ``max_batch`` 1 every image is its own call, as ``asyncgen generate`` makes it.
    """
    items = [(j, i) for j, params in enumerate(batch) for i in range(params["n"])]
    return [items[k:k + max_batch] for k in range(0, len(items), max_batch)]


def _agree(control, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (one small broadcast on the control group)."""
    import torch
    import torch.distributed as dist

    if control is None:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.broadcast(value, src=0, group=control)
    return bool(value.item())


def run_batch(pipe, job: GenerateJob, batch: list[dict], max_batch: int, rank: int, control, should_stop=None,
              on_step=None) -> list[list[bytes] | None] | None:
    """Make a batch's images on this rank (every rank calls this with the same ``batch`` and ``max_batch``).

    ``batch`` holds the jobs' settings, which differ only in prompt, seed and count (``serve_jobs.batch_key``);
    its images are made in :func:`plan_calls`' calls of at most ``max_batch``. Before each call and at every
    step boundary rank 0 asks ``should_stop(jobs)`` (the indices of the jobs in that call) and broadcasts the
    answer: on "stop" every rank skips the call, or ends it at that step (diffusers' interrupt). ``on_step(making, step, steps,
    seconds)`` reports progress on rank 0; ``making`` pairs each job index in the call with its first image
    there. Returns rank 0's PNG bytes per job (None for a job whose images were not all made: it was
    cancelled); None on the other ranks.
    """
    import torch

    from asyncgen._compat import interrupt_pipeline

    call = call_arguments(job, batch[0])
    made: list[list[bytes | None]] = [[None] * params["n"] for params in batch]
    for items in plan_calls(batch, max_batch):
        jobs = sorted({j for j, _ in items})
        first = {j: min(i for jj, i in items if jj == j) for j in jobs}

        def asked() -> bool:
            return bool(should_stop(jobs)) if rank == 0 and should_stop is not None else False

        if _agree(control, asked()):  # every job of this call was cancelled before it began
            continue
        stopped, last = [False], [time.perf_counter()]

        def step_end(pipeline, step, timestep, tensors):
            stop = _agree(control, asked())
            now = time.perf_counter()
            if on_step is not None:
                on_step([(j, first[j]) for j in jobs], step + 1, len(pipeline.scheduler.timesteps), now - last[0])
            last[0] = now
            if stop:
                stopped[0] = True
                interrupt_pipeline(pipeline)  # diffusers' way to end a call early: the loop skips the rest
            return {}

        generators = [torch.Generator("cpu").manual_seed(batch[j]["seed"] + i) for j, i in items]
        if len(items) == 1:  # a prompt and a generator, not lists of one: exactly asyncgen generate's call
            output = pipe(batch[items[0][0]]["prompt"], generator=generators[0], callback_on_step_end=step_end,
                          **call)
        else:
            several = dict(call)
            if "negative_prompt" in several:  # pipelines take a list of prompts with a list of negatives
                several["negative_prompt"] = [several["negative_prompt"]] * len(items)
            output = pipe([batch[j]["prompt"] for j, _ in items], generator=generators,
                          callback_on_step_end=step_end, **several)
        if stopped[0] or rank != 0:
            continue
        for (j, i), image in zip(items, output.images):
            made[j][i] = png_bytes(image)
    if rank != 0:
        return None
    return [images if all(image is not None for image in images) else None for images in made]


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
    return _follow(pipe, job, rank, control, settings.max_batch)


def _follow(pipe, job: GenerateJob, rank: int, control, max_batch: int) -> dict:
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
            run_batch(pipe, job, params, max_batch, rank, control)
            ran += len(params)
