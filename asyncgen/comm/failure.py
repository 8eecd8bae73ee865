"""A failing rank takes the others down with its error instead of leaving them hanging.

The failing rank writes its traceback to the group's store under :data:`ERROR_KEY` and
aborts its groups; a peer whose communication fails reads the key and raises
:class:`RemoteRankError` with that message; :class:`ErrorWatch` polls the key for ranks
blocked on a CUDA stream, where no error arrives.
"""

from __future__ import annotations

import datetime
import threading
import time
import traceback
from typing import TYPE_CHECKING

import torch.distributed as dist

from asyncgen._compat import abort_process_group, default_store

if TYPE_CHECKING:  # the context imports this module
    from asyncgen.comm.context import DistContext


ERROR_KEY = "asyncgen/error"


ERROR_POLL_SECONDS = 1.0


# what to check when ranks cannot reach each other, named in every communication failure
NETWORK_HINT = (
    "if the ranks run on several hosts, check that each reaches the others: set GLOO_SOCKET_IFNAME "
    "(control messages, every group) and NCCL_SOCKET_IFNAME (CUDA tensors) to the network interface "
    "that connects them (e.g. GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0), especially where the "
    "host name resolves to 127.0.1.1"
)


class RemoteRankError(RuntimeError):
    """Another rank failed; the message carries its error."""


def _store():
    return default_store()  # None where there is none: failure reporting must not mask the real error


def _abort(group) -> None:
    """End ``group`` now, pending work dropped (``None``: every group of this process).

    torch's abort helper, which (unlike ``destroy_process_group``) does not wait for
    pending NCCL operations; on gloo it closes the connections, which peers see at once.
    """
    abort_process_group(group)


def publish_error(ctx: DistContext, exc: BaseException) -> None:
    """Tell the peers why this rank is failing, then abort the groups so they stop waiting.

    A rank failing because a peer failed passes the news on by aborting its groups too
    (a third rank may be waiting on *it*), but leaves the original message in place.
    """
    if not ctx.distributed:
        return
    store = _store() if not isinstance(exc, RemoteRankError) else None
    if store is not None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            if not store.check([ERROR_KEY]):
                store.set(ERROR_KEY, f"rank {dist.get_rank()} failed:\n{text}")
        except Exception:
            pass
    for group in [*ctx.subgroups, None if ctx.owns_group else ctx.group]:
        _abort(group)
    ctx.group, ctx.subgroups = None, []


def remote_error(ctx: DistContext, cause: BaseException) -> BaseException:
    """The error to raise after a failed collective: the failing peer's, when it left one."""
    store = _store()
    message = None
    if store is not None:
        try:
            store.wait([ERROR_KEY], datetime.timedelta(seconds=5))
            message = store.get(ERROR_KEY).decode()
        except Exception:
            message = None
    if message is None:
        # nobody else failed first: the failure is this rank's own, and it is published as such
        return RuntimeError(f"rank {ctx.rank}: communication failed ({cause}); {NETWORK_HINT}")
    return RemoteRankError(message)


class ErrorWatch:
    """Polls the store's error key from a daemon thread and aborts this rank's groups when a peer failed.

    A rank whose transfers are ordered on CUDA streams waits for a dead peer on the GPU
    (an NCCL receive that never completes), where no error reaches the host; aborting
    the communicators ends that wait, and the rank's next communication fails and finds
    the peer's message (:func:`remote_error`). Only ``ProcessGroup.abort()`` is called
    here: the group bookkeeping belongs to the main thread (:func:`publish_error`).
    """

    def __init__(self, ctx: DistContext, interval: float = ERROR_POLL_SECONDS):
        self.ctx, self.interval = ctx, interval
        self.fired = threading.Event()
        self._store = _store()
        self._groups = [*ctx.subgroups, ctx.group]
        if self._store is not None:
            threading.Thread(target=self._run, name="asyncgen-error-watch", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                failed = self._store.check([ERROR_KEY])
            except Exception:  # store gone: the group was shut down, nothing left to watch
                return
            if failed:
                for group in self._groups:
                    try:
                        group.abort()
                    except Exception:
                        pass
                self.fired.set()
                return
