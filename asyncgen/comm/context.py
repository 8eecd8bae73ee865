"""Where this process sits: its group, rank, device and collective timeout.

A plain record every communicating module takes; it imports nothing of asyncgen.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("ASYNCGEN_TIMEOUT", "600")))


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
