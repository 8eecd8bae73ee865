"""Where this process sits: its group, rank, device and collective timeout.

A plain record every communicating module takes; it imports nothing of asyncgen.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

#: The collective timeout when neither the caller nor ``ASYNCGEN_TIMEOUT`` gives one.
DEFAULT_TIMEOUT = datetime.timedelta(seconds=600)
TIMEOUT_VARIABLE = "ASYNCGEN_TIMEOUT"
_ACCEPTED_TIMEOUT = "a finite number of seconds > 0"


def check_timeout(timeout, name: str = "timeout") -> datetime.timedelta | None:
    """``timeout`` (seconds or a ``timedelta``) as a ``timedelta``; None stays None.

    Refuses, in one line naming ``name`` and the value, anything but a finite, positive
    duration: torch would turn 0 or a negative timeout into a failed rendezvous that talks
    about network interfaces, and a bool or a string is a mistake, not a duration.
    """
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise ValueError(f"{name}={timeout!r}: not a duration; give {_ACCEPTED_TIMEOUT} or a datetime.timedelta")
    if not (0 < seconds < float("inf")):
        raise ValueError(f"{name}={timeout!r}: the timeout must be {_ACCEPTED_TIMEOUT}")
    try:
        return timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{name}={timeout!r}: too large for a timedelta; give {_ACCEPTED_TIMEOUT}") from None


def environment_timeout(environ=None) -> datetime.timedelta:
    """``ASYNCGEN_TIMEOUT`` (seconds) when set, else :data:`DEFAULT_TIMEOUT`; read when called, never at import.

    Raises ``ValueError`` naming the variable, its value and what is accepted.
    """
    text = (os.environ if environ is None else environ).get(TIMEOUT_VARIABLE)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{TIMEOUT_VARIABLE}={text!r}: not a number; set it to {_ACCEPTED_TIMEOUT}, "
                         "or unset it for the default 600") from None
    if not (0 < seconds < float("inf")) or seconds > datetime.timedelta.max.total_seconds():
        raise ValueError(f"{TIMEOUT_VARIABLE}={text!r}: the timeout must be {_ACCEPTED_TIMEOUT}, "
                         "or unset it for the default 600")
    return datetime.timedelta(seconds=seconds)


@dataclass
class DistContext:
    """Where this process sits: its group (None in serial mode), rank and device."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    device: torch.device | None
    timeout: datetime.timedelta
    owns_group: bool = False
    subgroups: list = field(default_factory=list)  # groups asyncgen made inside ``group``

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.distributed else group_rank
