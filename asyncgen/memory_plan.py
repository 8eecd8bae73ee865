"""Which rank holds what: placing a pipeline's components so the largest rank holds little.

The denoiser's cuts are chosen for compute (:func:`asyncgen.split.balanced_cuts`) and
the plan never moves them: stage ``k`` runs where :class:`~asyncgen.schedule.Topology`
puts it, and every rank keeps the denoiser's shared modules. What the plan places are
the other *components*: text encoders and the VAE, each used once per prompt. Each runs
on one rank (or, for a text encoder too big for any rank's share, as sequential layer
ranges on several ranks, see :mod:`asyncgen.encoder_split`) and its output reaches the
others. Compute-balanced stages are rarely byte-balanced (a UNet's low-resolution
blocks hold most of its weights, a DiT's first stage also holds the embedders), so the
components go to the lighter ranks: the plan minimises the largest per-rank total of
parameter bytes plus the estimated activation bytes of its stage.

Like :mod:`asyncgen.schedule`, this module only *describes*: the planner is a pure
function of sizes (deterministic, no weights, no I/O), and :func:`measure_pipeline`
reads those sizes from modules that may live on the meta device.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .schedule import Topology

__all__ = [
    "Placement",
    "RankPlan",
    "MemoryPlan",
    "PlanDoesNotFit",
]


# ------------------------------------------------------------------ the plan itself


@dataclass(frozen=True)
class Placement:
    """A component (or a layer range of a text encoder) on one rank."""

    component: str  # pipeline attribute: "text_encoder", "text_encoder_2", "text_encoder_3", "vae"
    rank: int  # rank in the wrapper's process group that runs it
    layers: tuple[int, int] | None = None  # [start, stop) of the encoder's block list; None = whole


@dataclass
class RankPlan:
    """What one rank holds: its denoiser stage, the components it runs, their bytes."""

    rank: int
    stage: int  # denoiser stage this rank runs (topology.stage_of)
    stage_units: list[str]
    placements: list[Placement]  # components (or layer ranges of them) this rank runs
    parameter_bytes: dict[str, int]  # "denoiser" (its stage + shared modules) and one entry per placed component
    activation_bytes: int  # estimated at the plan's height/width/batch

    @property
    def total_parameter_bytes(self) -> int:
        return sum(self.parameter_bytes.values())

    @property
    def total_bytes(self) -> int:
        return self.total_parameter_bytes + self.activation_bytes


@dataclass
class MemoryPlan:
    """Every rank's share, and what one full copy of the pipeline would take."""

    ranks: list[RankPlan]
    full_pipeline_bytes: int  # one full copy of every component (what AsyncDiff/xDiT hold per rank)
    full_activation_bytes: int = 0  # activation estimate of the whole denoiser at the same size and batch
    notes: dict = field(default_factory=dict)  # how it was made (dtype, size, batch, stages, stride, cfg_parts)

    def placements_of(self, component: str) -> list[Placement]:
        """Where ``component`` runs, ordered by layer range (one entry when it runs whole)."""
        found = [p for r in self.ranks for p in r.placements if p.component == component]
        return sorted(found, key=lambda p: (p.layers or (0, 0), p.rank))

    def on_rank(self, rank: int) -> RankPlan:
        for plan in self.ranks:
            if plan.rank == rank:
                return plan
        raise ValueError(f"rank {rank} is not in this plan (ranks 0..{len(self.ranks) - 1})")

    @property
    def components(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.ranks:
            for p in r.placements:
                seen.setdefault(p.component)
        return list(seen)

    @property
    def largest(self) -> RankPlan:
        """The rank with the largest total (the lowest such rank on ties)."""
        return max(self.ranks, key=lambda r: (r.total_bytes, -r.rank))

    @property
    def largest_parameter_fraction(self) -> float:
        """The largest rank's parameter bytes over one full copy's (1.0 = a full copy per rank)."""
        return max(r.total_parameter_bytes for r in self.ranks) / self.full_pipeline_bytes

    @property
    def full_copy_total_bytes(self) -> int:
        """A full copy plus the whole denoiser's activations: what a replicating rank holds."""
        return self.full_pipeline_bytes + self.full_activation_bytes

    def to_dict(self) -> dict:
        return {
            "ranks": [
                {"rank": r.rank, "stage": r.stage, "stage_units": list(r.stage_units),
                 "placements": [{"component": p.component, "rank": p.rank,
                                 "layers": list(p.layers) if p.layers is not None else None} for p in r.placements],
                 "parameter_bytes": dict(r.parameter_bytes), "activation_bytes": r.activation_bytes,
                 "total_bytes": r.total_bytes}
                for r in self.ranks
            ],
            "full_pipeline_bytes": self.full_pipeline_bytes,
            "full_activation_bytes": self.full_activation_bytes,
            "largest_rank": self.largest.rank,
            "largest_total_bytes": self.largest.total_bytes,
            "largest_parameter_fraction": self.largest_parameter_fraction,
            "notes": dict(self.notes),
        }


class PlanDoesNotFit(ValueError):
    """The largest rank of the best plan needs more than the memory the user allows."""
