"""Rank 0 of ``asyncgen serve``: the HTTP server in a thread, the job loop in the main thread.

The loop takes one job at a time (or, with ``--max-batch``, the jobs that can share pipeline calls),
broadcasts it to the other ranks and runs it with them. It ends on SIGINT/SIGTERM (or the launching
process's stop event): waiting jobs get 503 at once, the running ones may finish within
``--drain-grace`` seconds and are cancelled at a step boundary after that, then every rank is told to
stop. When a rank fails during a job, the job fails with
the reason, waiting ones get 503, and rank 0 ends too: the launching process restarts the group
or exits.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from .errors import UsageError
from .serve_jobs import JobBoard
from .serve_metrics import Metrics
from .serve_ranks import IDLE_TICK_SECONDS, ServeSettings, run_batch


class RankFailure(RuntimeError):
    """A rank failed during a job; the group cannot run another."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening, or a one-line UsageError naming them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def lead(pipe, settings: ServeSettings, world: int, control) -> dict:
    import torch.distributed as dist
    import uvicorn

    from .files import say
    from .generate import describe_model
    from .serve_http import make_app
    from .serve_requests import ModelRules

    job = settings.job
    pids = [os.getpid()]
    if control is not None:
        pids = [None] * world
        dist.all_gather_object(pids, os.getpid(), group=control)
    metrics = Metrics()
    board = JobBoard(settings.max_queue, metrics, settings.max_batch)
    rules = ModelRules(model=job.model, builtin=job.builtin_model, facts=describe_model(job.model, job.allow_pickle),
                       stages=job.stages, stride=job.stride, cfg_parallel=job.cfg_parallel, dtype=job.dtype,
                       device=job.device, devices=world)
    app = make_app(board, metrics, rules, settings.limits, settings.max_body_bytes, settings.api_key,
                   info={"model": job.model, "ranks": world, "pids": pids, "device": job.device, "dtype": job.dtype,
                         "stages": job.stages, "stride": job.stride, "cfg_parallel": job.cfg_parallel,
                         "max_batch": settings.max_batch})
    sock = listening_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5,
                            access_log=False)
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="asyncgen-http", daemon=True)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.02)
    if not http.is_alive():
        raise UsageError(f"--host {settings.host} --port {port}: the HTTP server did not start")

    def drain(*_):
        threading.Thread(target=board.begin_drain, daemon=True).start()  # not in a signal handler: it takes a lock

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, drain)
    threading.Thread(target=_watch_stop, args=(settings.stop, board), daemon=True, name="asyncgen-stop-watch").start()
    settings.bound_port.value = port
    settings.ready.value = 1
    say(f"asyncgen serve: ready on http://{settings.host}:{port} ({world} {job.device} rank{'s' if world > 1 else ''}, "
        f"{job.model}; pids {' '.join(map(str, pids))})")
    ran = 0
    try:
        ran = _loop(pipe, settings, board, control)
    finally:
        board.close("the server is shutting down")
        server.should_exit = True
        http.join(timeout=10)
    return {"rank": 0, "ran": ran}


def _watch_stop(stop, board: JobBoard) -> None:
    while not stop.value:
        time.sleep(0.1)
    board.begin_drain()


def _broadcast(control, message) -> None:
    import torch.distributed as dist

    if control is not None:
        dist.broadcast_object_list([message], src=0, group=control)


def _loop(pipe, settings: ServeSettings, board: JobBoard, control) -> int:
    ran = 0
    while True:
        jobs = board.next(timeout=IDLE_TICK_SECONDS)
        if not jobs:
            if board.closed:
                try:
                    _broadcast(control, ("stop", None))
                except Exception:  # noqa: BLE001 - a rank already gone has nothing left to stop
                    pass
                return ran
            try:
                _broadcast(control, ("idle", None))
            except Exception as exc:
                board.close("a rank failed; the server is restarting its ranks")
                raise RankFailure(f"a rank failed while idle: {_first_line(exc)}") from exc
            continue
        ran += len(jobs)
        _run(pipe, settings, board, control, jobs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _run(pipe, settings: ServeSettings, board: JobBoard, control, jobs: list) -> None:
    def should_stop(indices: list[int]) -> bool:
        """Stop a pipeline call once every job in it is cancelled (the shutdown's grace over cancels them all)."""
        if board.draining_since is not None and time.monotonic() > board.draining_since + settings.drain_grace:
            for job in jobs:
                if job.cancel_requested is None:
                    job.cancel_requested = (f"cancelled: the server is shutting down (after {settings.drain_grace:g} "
                                            "s' grace)")
        return all(jobs[j].cancel_requested is not None for j in indices)

    batch = [job.params for job in jobs]
    try:
        _broadcast(control, ("run", batch))
        images = run_batch(pipe, settings.job, batch, settings.max_batch, 0, control, should_stop,
                           lambda making, step, steps, seconds: board.progress([(jobs[j], image) for j, image in making],
                                                                               step, steps, seconds))
    except Exception as exc:
        reason = _first_line(exc)
        for job in jobs:
            board.complete(job, None, error=f"the ranks failed during this request ({reason}); the server is "
                           "restarting its ranks", http_status=503)
        board.close("a rank failed; the server is restarting its ranks")
        raise RankFailure(f"a rank failed during request {', '.join(job.id for job in jobs)}: {reason}") from exc
    for job, made in zip(jobs, images):
        # None only for a job that was cancelled (a call stops only once all of its jobs are): complete says so
        board.complete(job, made)
