"""Placing the text encoders and the VAE on ranks and putting their proxies into the pipeline.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from asyncgen._compat import set_pipeline_component
from asyncgen.comm.context import DistContext
from asyncgen.placement.planner import Placement
from asyncgen.models import PLACEABLE_COMPONENTS
from asyncgen.placement.proxies import ComponentProxy, make_proxy
from asyncgen.placement.residency import release_weights


def bytes_of(modules: Sequence[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def lightest_rank_placements(components: dict[str, nn.Module], rank_bytes: Sequence[int]) -> list[Placement]:
    """Each component whole on the rank that holds the fewest bytes so far (largest component first).

    ``rank_bytes`` is what each rank already holds (its denoiser stage and the shared
    modules). A simple default for when no memory plan is given: it never splits an
    encoder into layer ranges. Ties go to the lowest rank, so every rank computes the
    same placements.
    """
    load = list(rank_bytes)
    placements = []
    names = list(components)
    for name in sorted(names, key=lambda n: (-bytes_of([components[n]]), names.index(n))):
        rank = min(range(len(load)), key=lambda r: (load[r], r))
        load[rank] += bytes_of([components[name]])
        placements.append(Placement(name, rank, None))
    return placements


def place_components(pipeline, stage_modules: Sequence[Sequence[nn.Module]], shared_modules: Sequence[nn.Module],
                     stage_of_rank: Sequence[int], ctx: DistContext, placements: Sequence[Placement] | None = None,
                     release: bool = True) -> dict[str, list[Placement]]:
    """Put a proxy in place of each text encoder and the VAE of ``pipeline``; returns where each runs.

    ``placements`` (e.g. from a memory plan) says where; without it, each component goes
    whole to the lightest rank (:func:`lightest_rank_placements`, counting each rank's
    stage ``stage_of_rank[r]`` plus the shared modules). With ``release`` the weights this
    rank does not run move to the meta device (``False`` when the modules are shared with
    another pipeline, as after ``from_pipe``).
    """
    present = {name: getattr(pipeline, name) for name in PLACEABLE_COMPONENTS
               if isinstance(getattr(pipeline, name, None), nn.Module)
               and not isinstance(getattr(pipeline, name), ComponentProxy)}
    if placements is None:
        shared = bytes_of(shared_modules)
        rank_bytes = [shared + bytes_of(stage_modules[s]) for s in stage_of_rank]
        placements = lightest_rank_placements(present, rank_bytes)
    by_name: dict[str, list[Placement]] = {}
    for p in placements:
        if p.component in present:
            by_name.setdefault(p.component, []).append(p)
        if not 0 <= p.rank < ctx.world_size:
            raise ValueError(f"placement {p} names a rank outside the group of {ctx.world_size}")
    for name, component in present.items():
        mine = sorted(by_name.get(name, []), key=lambda p: p.layers or (0, 0))
        if not mine:
            continue  # not placed: stays replicated
        proxy = make_proxy(name, component, mine, ctx)
        if release:
            release_weights(component, list(proxy.resident))
        # past DiffusionPipeline.__setattr__: the pipeline's config still names the real class
        set_pipeline_component(pipeline, name, proxy)
        by_name[name] = mine
    return by_name
