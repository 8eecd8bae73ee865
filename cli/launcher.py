"""Start N worker processes on this machine, the way ``torchrun`` would, without it.

The rendezvous store lives in the launching process (as torchrun's agent hosts it), so
a worker that dies does not take the store, and its error report, down with it. Each
worker gets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``, one
thread on CPU (or ``threads``), and a deadline.

Nothing is left behind: SIGTERM, SIGINT or SIGHUP to the launching process stops every
worker before :class:`Interrupted` is raised; a launching process killed outright takes
its workers with it (they watch their parent); after the first failure the others get
``grace`` seconds to finish before they are stopped. A failure is reported as one line
naming the rank that failed first (:class:`WorkerFailed`), tracebacks kept aside.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import re
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

# a peer of a failed rank takes a few seconds to turn the failure into its RemoteRankError report, more
# on a loaded machine: the report is wanted, the wait must stay short
DEFAULT_GRACE = 10.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_POLL = 0.1  # seconds between looks at the workers: the delay before a signal or a death is acted on

#: How workers start. "spawn" (the default) gives each a fresh interpreter that inherits nothing from the
#: launching process. "forkserver" forks them from a server process that imported FORKSERVER_PRELOAD once:
#: a process that launches many times (a test session) then pays torch's and diffusers' imports once
#: instead of once per worker. Set it with ASYNCGEN_START_METHOD or by assigning this attribute.
START_METHOD = os.environ.get("ASYNCGEN_START_METHOD", "spawn")
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "diffusers", "transformers", "asyncgen.pipelines.asyncdiff",
                      "asyncgen.pipelines.asg_pipeline", "diffusers.pipelines.stable_diffusion"]

# errors a rank raises because a peer went away, not because of anything it did itself
_SECONDARY = re.compile(r"RemoteRankError|Connection reset by peer|Connection closed by peer|Broken pipe|"
                        r"communication failed")


class WorkerFailed(RuntimeError):
    """A worker failed. ``str(exc)`` is :attr:`summary`, one line naming the rank that failed first.

    ``exc_type``/``message`` are that worker's exception (``"asyncgen.cli.errors.UsageError"``,
    builtins without a module: ``"ValueError"``), both None when it died without raising
    (a signal, ``os._exit``); ``exitcode`` is its process exit code (negative: a signal);
    ``details`` holds the tracebacks of every failed rank, first failure first.
    """

    def __init__(self, rank: int, summary: str, details: str, exc_type: str | None = None,
                 message: str | None = None, exitcode: int | None = None):
        super().__init__(summary)
        self.rank, self.summary, self.details = rank, summary, details
        self.exc_type, self.message, self.exitcode = exc_type, message, exitcode

    def __str__(self) -> str:
        return self.summary


class Interrupted(KeyboardInterrupt):
    """The launching process got SIGTERM, SIGINT or SIGHUP; every worker was stopped first."""

    def __init__(self, signum: int, stopped: int):
        self.signum, self.signal_name, self.stopped = signum, signal.Signals(signum).name, stopped
        self.exit_code = 128 + signum  # what the shell reports for a process ended by this signal
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"interrupted: stopped {self.stopped} worker{'' if self.stopped == 1 else 's'}"


@dataclass
class WorkerResult:
    rank: int
    ok: bool
    value: Any  # the function's return value, or the formatted traceback (the summary when there is none)
    exitcode: int | None = None
    summary: str = ""  # one line for a failure: "worker 1 raised ValueError: ...", "worker 1 was killed by SIGKILL"
    exc_type: str | None = None
    message: str | None = None
    failed_order: int | None = None  # 0 for the failure seen first, 1 for the next, ...; None when ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def placement(nprocs: int, device_type: str, cpus: list[int], threads: int | None = None
              ) -> tuple[int, list[list[int] | None]]:
    """Threads per worker and each worker's CPU set (None: not pinned).

    CPU workers: one thread each by default, pinned to disjoint cores when there are
    enough, so a worker's communication threads run on its own core instead of
    preempting another worker's compute. CUDA workers are not pinned: their launch
    thread, NCCL proxy, watchdog and gloo threads need more than one core, and an
    arbitrary core may sit on the wrong socket for the GPU; they share the cores.
    """
    if device_type.split(":")[0] == "cuda":
        return (threads or max(1, len(cpus) // nprocs)), [None] * nprocs
    threads = threads or 1
    if nprocs * threads > len(cpus):
        return threads, [None] * nprocs
    return threads, [cpus[r * threads : (r + 1) * threads] for r in range(nprocs)]


def grace_seconds(grace: float | None = None) -> float:
    """``grace``, else ``ASYNCGEN_GRACE_SECONDS``, else :data:`DEFAULT_GRACE`."""
    if grace is None:
        text = os.environ.get("ASYNCGEN_GRACE_SECONDS")
        if text is None:
            return DEFAULT_GRACE
        try:
            grace = float(text)
        except ValueError:
            grace = float("nan")
        if not 0 <= grace < float("inf"):
            raise ValueError(f"ASYNCGEN_GRACE_SECONDS={text!r}: must be a finite number of seconds >= 0 (how long "
                             "the other workers may finish after one failed; unset it for the default "
                             f"{DEFAULT_GRACE:g})")
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace < float("inf"):
        raise ValueError(f"grace period {grace} s: must be a finite number of seconds >= 0")
    return grace


def check_worker_count(devices: int, device_type: str, oversubscribe: bool = False) -> None:
    """Refuse, in one line, a worker count this machine cannot run, before anything is spawned."""
    if devices < 1:
        raise ValueError(f"--devices must be at least 1 (got {devices})")
    if device_type.split(":")[0] == "cuda":
        import torch

        available = torch.cuda.device_count()
        if available == 0:
            raise ValueError("--device cuda but no CUDA device is available")
        if devices > available:
            raise ValueError(f"--devices {devices} needs {devices} GPUs, this machine has {available}")
        return
    cores = len(usable_cpus())
    if devices > cores and not oversubscribe:
        raise ValueError(f"--devices {devices} on CPU: this machine has {cores} usable core{'' if cores == 1 else 's'}; "
                         "pass --oversubscribe to run more workers than cores")


def _watch_parent(parent_pid: int, interval: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(1)


def exit_with_parent(parent_pid: int | None, use_prctl: bool = True, interval: float = 0.5) -> None:
    """Make this process die when ``parent_pid`` (its parent) does, even by SIGKILL.

    Linux delivers SIGKILL on the parent's death (``PR_SET_PDEATHSIG``); elsewhere, or
    when that fails, a daemon thread watches the parent pid. ``None`` means the parent
    this process has now (a fork server, which itself ends with the launching process).
    """
    if parent_pid is None:
        parent_pid = os.getppid()
    if use_prctl and sys.platform.startswith("linux"):
        import ctypes

        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent_pid:  # the parent died before the death signal was armed
                os._exit(1)
            return
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, interval), daemon=True, name="asyncgen-parent-watch").start()


def _type_name(exc: BaseException) -> str:
    module = type(exc).__module__
    return type(exc).__qualname__ if module == "builtins" else f"{module}.{type(exc).__qualname__}"


def _worker(fn, rank: int, world_size: int, port: int, threads: int, cpus: list[int] | None, env: dict, results,
            parent_pid: int, args, kwargs):
    exit_with_parent(parent_pid)
    # the launching process owns the run: it stops the workers on these, so a Ctrl-C sent to the whole
    # terminal's process group must not make them fail on their own (and report a failure of their own)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if cpus:
        os.sched_setaffinity(0, cpus)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), TORCHELASTIC_USE_AGENT_STORE="True",
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
    )
    os.environ.update(env)
    # torch, imported by fn if it needs it, takes its thread count from OMP_NUM_THREADS; a worker
    # that does not use torch does not pay for importing it
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    try:
        value = fn(rank, world_size, *args, **kwargs)
        # plain pickle copies tensors by value: the queue's own pickler would share their storage
        # through this process, which may have exited by the time the launcher reads the queue
        report, code = (rank, True, pickle.dumps(value), None, None), 0
    except BaseException as exc:
        report, code = (rank, False, traceback.format_exc(), _type_name(exc), str(exc)), 1
    _report_and_exit(results, report, code)


def _report_and_exit(results, report: tuple, code: int) -> None:
    """Hand the report to the launcher, wait until it is written, and end this process without tearing down.

    The report is flushed first: the queue writes from a feeder thread, and anything that
    holds the GIL afterwards would keep the report from leaving. The process group is not
    destroyed: on torch 2.6, ``destroy_process_group`` joins a gloo worker thread while
    holding the GIL, and that thread, releasing the last collective's tensors, waits for
    the GIL: a deadlock (a stack dump showed ``~ProcessGroupGloo`` in ``thread::join`` and
    ``runLoop`` in ``gil_scoped_acquire``; 2 exits in 20). Interpreter finalisation has the
    same hazard (an abort instead of a hang). Ending with ``os._exit``, as multiprocessing
    does for its forked children anyway, closes the sockets without either; what the
    worker function opened it has closed, and the standard streams are flushed here.
    """
    try:
        results.put(report)
        results.close()
        results.join_thread()
        # what a normal exit would release through multiprocessing (a tqdm bar's named semaphore), so the
        # launcher's resource tracker has nothing left to warn about
        from asyncgen._compat import run_process_finalizers

        run_process_finalizers()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - a closed stream has nothing left to write
                pass
        os._exit(code)


class _StopSignals:
    """Note SIGTERM/SIGINT/SIGHUP while workers run (handlers restored on exit).

    The handler only notes the signal: raising from it could abort ``Process.start``
    between the fork and the bookkeeping, losing track of a child.
    """

    def __enter__(self) -> "_StopSignals":
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def check_start_method() -> None:
    """Refuse an unknown :data:`START_METHOD` (``ASYNCGEN_START_METHOD``) in one line."""
    if START_METHOD not in ("spawn", "forkserver"):
        raise ValueError(f"ASYNCGEN_START_METHOD={START_METHOD!r}: must be 'spawn' or 'forkserver' "
                         "(unset it for the default, spawn)")


def check_environment() -> None:
    """Check every environment variable a launch and its workers read, before anything starts.

    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (they must describe one
    consistent group: see :func:`asyncgen.comm.group.launcher_environment`), ``ASYNCGEN_TIMEOUT``,
    ``ASYNCGEN_GRACE_SECONDS`` and ``ASYNCGEN_START_METHOD``. Raises ``ValueError`` with one line
    naming the variable, its value and what is accepted.
    """
    from asyncgen.comm.context import environment_timeout
    from asyncgen.comm.group import launcher_environment

    launcher_environment()
    environment_timeout()
    grace_seconds()
    check_start_method()


def _start_context():
    check_start_method()
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def _tracker_running() -> bool:
    from asyncgen._compat import resource_tracker_running

    return resource_tracker_running()


def _stop_tracker() -> None:
    """Stop the resource tracker the launch started (it outlives the workers otherwise, until we exit)."""
    from asyncgen._compat import stop_resource_tracker

    stop_resource_tracker()


def _failure_summary(rank: int, exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"worker {rank} was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"worker {rank} was killed by signal {-exitcode}"
    return f"worker {rank} exited with code {exitcode}"


def _raised_summary(rank: int, exc_type: str, message: str) -> str:
    first_line = message.strip().splitlines()[0] if message.strip() else ""
    return f"worker {rank} raised {exc_type.rsplit('.', 1)[-1]}" + (f": {first_line}" if first_line else "")


def run_workers(
    fn: Callable,
    nprocs: int,
    *args,
    timeout: float | None = None,
    threads: int | None = None,
    env: dict[str, str] | None = None,
    pin_cpus: bool = True,
    grace: float | None = None,
    device_type: str = "cpu",
    **kwargs,
) -> list[WorkerResult]:
    """Call ``fn(rank, nprocs, *args, **kwargs)`` in ``nprocs`` spawned workers; every rank's result.

    ``fn`` must be importable (a module-level function). Once a worker has failed, the
    others get ``grace`` seconds (default: ``ASYNCGEN_GRACE_SECONDS``, else
    :data:`DEFAULT_GRACE`) before they are stopped. Raises ``TimeoutError`` when a worker
    is still running after ``timeout`` seconds with none failed, and :class:`Interrupted`
    on SIGTERM/SIGINT/SIGHUP; in both cases after every worker is stopped.
    """
    import torch.distributed as dist

    grace = grace_seconds(grace)
    check_start_method()
    from asyncgen.comm.context import environment_timeout

    environment_timeout()  # every worker reads it: a bad value fails here once, not in each of them
    threads, cpu_sets = placement(nprocs, device_type, usable_cpus(), threads)
    if not pin_cpus:
        cpu_sets = [None] * nprocs
    port = free_port()
    store_timeout = datetime.timedelta(seconds=timeout or 3600)
    store = dist.TCPStore("127.0.0.1", port, None, True, timeout=store_timeout, wait_for_workers=False)
    ctx = _start_context()
    # a forked worker's parent is the fork server, not this process
    parent_pid = os.getpid() if ctx.get_start_method() == "spawn" else None
    tracker_was_running = _tracker_running()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, nprocs, port, threads, cpu_sets[r], env or {}, results, parent_pid,
                                          args, kwargs))
        for r in range(nprocs)
    ]
    reports: dict[int, tuple] = {}
    order: list[int] = []  # failed ranks, in the order their failure was seen
    stopped: list[int] = []
    deadline = time.monotonic() + timeout if timeout else float("inf")
    with _StopSignals() as signals:
        try:
            for p in procs:
                if signals.received is None:
                    p.start()
            settle_from = None  # when the run was decided: first failure, or every rank reported
            while signals.received is None:
                try:
                    incoming = [results.get(timeout=_POLL)]
                except queue.Empty:
                    incoming = []
                # exits are looked at before the queue is drained: a worker puts its report before it exits,
                # so an exit seen here without a report after the drain really had none
                exited = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode is not None}
                while True:
                    try:
                        incoming.append(results.get_nowait())
                    except queue.Empty:
                        break
                for rank, *report in incoming:
                    reports[rank] = tuple(report)
                # a death without a report seen in the same look as a report ranks first: the report may well
                # be the peer's "connection reset" that the death caused
                order += [r for r, code in exited.items() if r not in reports and r not in order]
                order += [rank for rank, ok, *_ in incoming if not ok and rank not in order]
                if settle_from is None and (order or len(reports) == nprocs):
                    settle_from = time.monotonic()
                if len(exited) == nprocs:
                    break
                now = time.monotonic()
                if (settle_from is not None and now >= settle_from + grace) or now >= deadline:
                    break
        finally:  # also on KeyboardInterrupt from elsewhere: no orphans
            for r, p in enumerate(procs):
                if p.pid is not None and p.is_alive():
                    p.kill()
                    stopped.append(r)
            for p in procs:
                if p.pid is not None:
                    p.join()
            exitcodes = [p.exitcode for p in procs]
            results.close()
            del store, results, procs  # the queue's semaphores are unregistered before the tracker stops
            if not tracker_was_running and _tracker_running():
                _stop_tracker()
    if signals.received is not None:
        raise Interrupted(signals.received, len(stopped))
    silent = [r for r in stopped if r not in reports]
    if silent and not order:
        raise TimeoutError(f"workers {silent} were still running after {timeout}s and were stopped")
    out = []
    for r, code in enumerate(exitcodes):
        if r in reports and reports[r][0]:
            out.append(WorkerResult(r, True, pickle.loads(reports[r][1]), code))
        elif r in reports:
            _, text, exc_type, message = reports[r]
            out.append(WorkerResult(r, False, text, code, _raised_summary(r, exc_type, message), exc_type, message,
                                    order.index(r)))
        elif r in stopped:
            summary = f"worker {r} was stopped {grace:g} s after worker {order[0]} failed"
            out.append(WorkerResult(r, False, summary, code, summary, failed_order=len(order) + stopped.index(r)))
        else:
            summary = _failure_summary(r, code)
            out.append(WorkerResult(r, False, f"{summary} and reported nothing", code, summary,
                                    failed_order=order.index(r)))
    return out


def first_failure(results: list[WorkerResult]) -> WorkerResult | None:
    """The failure that caused the others: seen first, not one that a peer's failure caused (when one is known)."""
    failed = sorted((r for r in results if not r.ok), key=lambda r: r.failed_order)
    if not failed:
        return None
    primary = [r for r in failed if not (isinstance(r.value, str) and _SECONDARY.search(r.value))]
    return (primary or failed)[0]


def launch(fn: Callable, nprocs: int, *args, **kwargs) -> list[Any]:
    """Like :func:`run_workers`, but return the values, or raise :class:`WorkerFailed` for the first failure."""
    results = run_workers(fn, nprocs, *args, **kwargs)
    first = first_failure(results)
    if first is None:
        return [r.value for r in results]
    others = sorted((r for r in results if not r.ok and r is not first), key=lambda r: r.failed_order)
    details = "\n".join(f"--- {r.summary}\n{r.value}" if r.value != r.summary else f"--- {r.summary}"
                        for r in [first, *others])
    raise WorkerFailed(first.rank, first.summary, details, first.exc_type, first.message, first.exitcode)


def launched_by_torchrun() -> bool:
    """True inside a process that ``torchrun`` (or another launcher) started as one rank of a group.

    The launcher's variables are checked first: a partial or inconsistent set (``RANK`` without
    ``WORLD_SIZE``, ``RANK`` outside ``[0, WORLD_SIZE)``, no ``MASTER_ADDR``/``MASTER_PORT`` for more
    than one rank, a non-integer) raises a one-line ``UsageError`` instead of being ignored or
    ending in a rendezvous that fails or never completes.
    """
    from asyncgen.comm.group import LauncherEnvironmentError, launcher_environment

    from .errors import UsageError

    try:
        return launcher_environment() is not None
    except LauncherEnvironmentError as exc:
        raise UsageError(str(exc)) from None


def run_on_devices(fn: Callable, devices: int | None, *args, device_type: str = "cpu", oversubscribe: bool = False,
                   **kwargs) -> Any:
    """Run ``fn(rank, world_size, *args)`` as this machine's share of a job; return rank 0's value here.

    Under ``torchrun`` this process *is* one rank: ``fn`` runs here with the launcher's
    rank and world size (the value returned is this rank's), and ``devices``, when given,
    must equal that world size. Otherwise one device runs ``fn`` in this process, and
    ``devices > 1`` spawns that many workers (see :func:`check_worker_count` for the
    limits; ``oversubscribe`` allows more CPU workers than cores): one thread each on CPU
    (pinned to its own core when there are enough), one GPU each on CUDA
    (``cuda:LOCAL_RANK``). ``kwargs`` go to :func:`launch` (``timeout``, ``grace``, ...).

    A rank whose peers never arrive at the rendezvous of a hand-set environment (no torchrun agent) ends
    after ``ASYNCGEN_TIMEOUT`` with a one-line ``UsageError`` naming them
    (:class:`asyncgen.comm.group.RendezvousError`).
    """
    from .errors import UsageError

    try:
        check_environment()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if launched_by_torchrun():
        from asyncgen.comm.group import RendezvousError

        world = int(os.environ["WORLD_SIZE"])
        if devices is not None and devices != world:
            raise ValueError(f"--devices {devices} does not match the launcher's WORLD_SIZE={world}; "
                             "under torchrun leave --devices out (or give the same number)")
        try:
            return fn(int(os.environ["RANK"]), world, *args)
        except RendezvousError as exc:  # the launcher's environment named ranks that never came: one line
            raise UsageError(str(exc)) from None
    devices = 1 if devices is None else devices
    check_worker_count(devices, device_type, oversubscribe)
    if devices == 1:
        return fn(0, 1, *args)
    return launch(fn, devices, *args, device_type=device_type, **kwargs)[0]
