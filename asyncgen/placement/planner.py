"""Which rank holds what: placing a pipeline's components so the largest rank holds little.

The denoiser's cuts are chosen for compute (:func:`asyncgen.cost.cuts.balanced_cuts`) and
the plan never moves them: stage ``k`` runs where :class:`~asyncgen.schedules.asyncdiff.Topology`
puts it, and every rank keeps the denoiser's shared modules. What the plan places are
the other *components*: text encoders and the VAE, each used once per prompt. Each runs
on one rank (or, for a text encoder too big for any rank's share, as sequential layer
ranges on several ranks, see :mod:`asyncgen.split.text_encoder`) and its output reaches the
others. Compute-balanced stages are rarely byte-balanced (a UNet's low-resolution
blocks hold most of its weights, a DiT's first stage also holds the embedders), so the
components go to the lighter ranks: the plan minimises the largest per-rank total of
parameter bytes plus the estimated activation bytes of its stage.

Like :mod:`asyncgen.schedules.asyncdiff`, this module only *describes*: the planner is a pure
function of sizes (deterministic, no weights, no I/O), and :func:`measure_pipeline`
reads those sizes from modules that may live on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from asyncgen.schedules.asyncdiff import Topology

__all__ = [
    "Placement",
    "RankPlan",
    "MemoryPlan",
    "PlanDoesNotFit",
]


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


@dataclass(frozen=True)
class ComponentSize:
    """Parameter bytes of one component; of each block too when it splits into layer ranges.

    For a splittable text encoder ``head_bytes`` is what the first range holds besides its
    blocks (the embeddings) and ``tail_bytes`` what the last one holds (the final norm,
    CLIP's projection), so that ``head + sum(layers) + tail == parameter_bytes``.
    """

    name: str
    parameter_bytes: int
    layer_bytes: tuple[int, ...] = ()  # () = runs whole only
    head_bytes: int = 0
    tail_bytes: int = 0

    def __post_init__(self):
        if self.layer_bytes and self.head_bytes + sum(self.layer_bytes) + self.tail_bytes != self.parameter_bytes:
            raise ValueError(f"{self.name}: head {self.head_bytes} + layers {sum(self.layer_bytes)} + tail "
                             f"{self.tail_bytes} bytes != the component's {self.parameter_bytes}")

    @property
    def splittable(self) -> bool:
        return len(self.layer_bytes) > 1

    def range_bytes(self, start: int, stop: int) -> int:
        if not self.layer_bytes:
            return self.parameter_bytes
        count = len(self.layer_bytes)
        return ((self.head_bytes if start == 0 else 0) + sum(self.layer_bytes[start:stop])
                + (self.tail_bytes if stop == count else 0))


@dataclass(frozen=True)
class DenoiserSize:
    """The denoiser as the compute-balanced cuts leave it: bytes and activations per stage."""

    stage_units: tuple[tuple[str, ...], ...]
    stage_bytes: tuple[int, ...]
    shared_bytes: int  # modules every rank keeps (time/text embeddings)
    stage_activation_bytes: tuple[int, ...]
    full_activation_bytes: int = 0  # the whole denoiser on one device, same size and batch

    @property
    def parameter_bytes(self) -> int:
        return self.shared_bytes + sum(self.stage_bytes)


def plan_memory(denoiser: DenoiserSize, components: Sequence[ComponentSize], topology: Topology,
                cfg_parts: int = 1, split_encoders: bool = True, notes: dict | None = None,
                placements: Sequence[Placement] | None = None) -> MemoryPlan:
    """Place ``components`` on the ranks of ``topology`` (times ``cfg_parts``) so the largest rank is smallest.

    Rank ``r`` runs stage ``topology.stage_of(r % topology.world_size)``: its base is the
    shared modules, that stage and the stage's activation estimate. Components are then
    placed by a bound search: the smallest cap ``C`` (bytes, found by bisection) for
    which a deterministic greedy fits everything: components that must run whole
    (largest first) each on the currently lightest rank, then splittable encoders
    (largest first) whole on the lightest rank if they fit there, else as consecutive
    layer ranges filling the lightest ranks in turn (each rank takes as many blocks as
    fit under ``C``); failing that, the same with the encoders first. The same greedy
    under ``1.01 C`` wins if it needs fewer pieces.
    ``split_encoders=False`` places every component whole. Ties go to the lowest rank,
    so the plan is deterministic.

    ``placements`` given: no search, the plan reports those placements (e.g. the ones a
    running wrapper uses, or every component on every rank for replicated components).
    """
    if len(denoiser.stage_bytes) != topology.stages:
        raise ValueError(f"{len(denoiser.stage_bytes)} stage sizes for a topology of {topology.stages} stages")
    if cfg_parts not in (1, 2):
        raise ValueError(f"cfg_parts must be 1 or 2, got {cfg_parts!r}")
    names = [c.name for c in components]
    if len(set(names)) != len(names):
        raise ValueError(f"component names repeat: {names}")
    world = cfg_parts * topology.world_size
    stage_of = [topology.stage_of(r % topology.world_size) for r in range(world)]
    base = [denoiser.shared_bytes + denoiser.stage_bytes[s] + denoiser.stage_activation_bytes[s] for s in stage_of]
    whole = sorted((c for c in components if not (split_encoders and c.splittable)),
                   key=lambda c: (-c.parameter_bytes, names.index(c.name)))
    split = sorted((c for c in components if split_encoders and c.splittable),
                   key=lambda c: (-c.parameter_bytes, names.index(c.name)))
    order = whole + split

    if placements is not None:
        best = _checked_placements(placements, components, world)
    else:
        best = _search(base, order, split_encoders)

    sizes = {c.name: c for c in components}
    ranks = []
    for r in range(world):
        mine = sorted((p for p in best if p.rank == r), key=lambda p: (names.index(p.component), p.layers or (0, 0)))
        parameter_bytes = {"denoiser": denoiser.shared_bytes + denoiser.stage_bytes[stage_of[r]]}
        for p in mine:
            size = sizes[p.component]
            part = size.parameter_bytes if p.layers is None else size.range_bytes(*p.layers)
            parameter_bytes[p.component] = parameter_bytes.get(p.component, 0) + part
        ranks.append(RankPlan(r, stage_of[r], list(denoiser.stage_units[stage_of[r]]), mine, parameter_bytes,
                              denoiser.stage_activation_bytes[stage_of[r]]))
    full = denoiser.parameter_bytes + sum(c.parameter_bytes for c in components)
    return MemoryPlan(ranks, full, denoiser.full_activation_bytes, dict(notes or {}))


def _checked_placements(placements: Sequence[Placement], components: Sequence[ComponentSize],
                        world: int) -> list[Placement]:
    sizes = {c.name: c for c in components}
    for p in placements:
        if p.component not in sizes:
            raise ValueError(f"placement {p} names no component of the plan ({', '.join(sizes) or 'none'})")
        if not 0 <= p.rank < world:
            raise ValueError(f"placement {p}: rank outside 0..{world - 1}")
    for name, size in sizes.items():
        mine = [p for p in placements if p.component == name]
        if not mine:
            raise ValueError(f"no placement for component {name}")
        ranges = sorted(p.layers for p in mine if p.layers is not None)
        if ranges and (ranges[0][0] != 0 or ranges[-1][1] != len(size.layer_bytes)
                       or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:]))):
            raise ValueError(f"the layer ranges of {name} {ranges} do not cover its {len(size.layer_bytes)} "
                             "blocks once, in order")
    return list(placements)


def _search(base: list[int], order: Sequence[ComponentSize], split_encoders: bool) -> list[Placement]:
    low, high = max(base), max(base) + sum(c.parameter_bytes for c in order)
    best = _fill(base, order, split_encoders, high)
    assert best is not None  # everything on the lightest rank stays under `high`
    while low < high:  # smallest cap the greedy fills; keep the placements of the best one found
        cap = (low + high) // 2
        found = _fill(base, order, split_encoders, cap)
        if found is None:
            low = cap + 1
        else:
            high, best = cap, found
    # a cap 1 % above the best lets ranks take longer ranges: keep that plan when it has fewer pieces
    # (fewer hand-offs per prompt, small encoders whole) for at most 1 % more on the largest rank
    roomier = _fill(base, order, split_encoders, high + high // 100)
    return roomier if roomier is not None and len(roomier) < len(best) else best


def _fill(base: list[int], order: Sequence[ComponentSize], split_encoders: bool, cap: int) -> list[Placement] | None:
    """The greedy placement under ``cap`` bytes per rank, or None when it does not fit.

    Tries the whole-only components first (they need one rank with room), then, if that
    fails, the splittable encoders first (their ranges fill ranks exactly, and a small
    whole component may fit into what they leave).
    """
    splittable = [c for c in order if split_encoders and c.splittable]
    whole = [c for c in order if not (split_encoders and c.splittable)]
    found = _fill_in_order(base, whole + splittable, split_encoders, cap)
    if found is None and splittable and whole:
        found = _fill_in_order(base, splittable + whole, split_encoders, cap)
    return found


def _fill_in_order(base: list[int], order: Sequence[ComponentSize], split_encoders: bool,
                   cap: int) -> list[Placement] | None:
    load = list(base)
    placements: list[Placement] = []

    def lightest() -> list[int]:
        return sorted(range(len(load)), key=lambda r: (load[r], r))

    for comp in order:
        r = lightest()[0]
        if load[r] + comp.parameter_bytes <= cap:
            load[r] += comp.parameter_bytes
            placements.append(Placement(comp.name, r, None))
            continue
        if not (split_encoders and comp.splittable):
            return None
        count, start = len(comp.layer_bytes), 0
        for r in lightest():
            stop = start
            while stop < count and load[r] + comp.range_bytes(start, stop + 1) <= cap:
                stop += 1
            if stop == start:
                continue
            load[r] += comp.range_bytes(start, stop)
            placements.append(Placement(comp.name, r, (start, stop)))
            start = stop
            if start == count:
                break
        if start < count:
            return None
    return placements


def check_fits(plan: MemoryPlan, max_memory: int) -> None:
    """Refuse a plan whose largest rank needs more than ``max_memory`` bytes, saying by how much."""
    largest = plan.largest
    if largest.total_bytes > max_memory:
        over = largest.total_bytes - max_memory
        raise PlanDoesNotFit(
            f"the plan does not fit max_memory={format_bytes(max_memory)}: rank {largest.rank} needs "
            f"{format_bytes(largest.total_bytes)} ({format_bytes(largest.total_parameter_bytes)} parameters + "
            f"{format_bytes(largest.activation_bytes)} estimated activations), {format_bytes(over)} ({over} bytes) "
            f"more than allowed; use more devices, a smaller dtype or a smaller size")


def format_bytes(count: int) -> str:
    """Decimal units, as GPU makers and the hub state sizes: 23.8 GB is 23.8e9 bytes."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"
