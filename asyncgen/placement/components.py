"""Placing the text encoders and the VAE on ranks and putting their proxies into the pipeline."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from asyncgen._compat import set_pipeline_component
from asyncgen.comm.context import DistContext
from asyncgen.placement.planner import Placement
from asyncgen.models import PLACEABLE_COMPONENTS
from asyncgen.placement.proxies import ComponentProxy, make_proxy
from asyncgen.placement.residency import release_weights


def place_components(pipeline, placements: Sequence[Placement], ctx: DistContext,
                     release: bool = True) -> dict[str, list[Placement]]:
    """Put a proxy in place of each text encoder and the VAE of ``pipeline`` that ``placements`` places.

    ``placements`` come from the memory plan (:mod:`asyncgen.placement.pipeline_plan`), the
    one placement policy, or from the caller; a component they do not name stays
    replicated. Returns where each placed component runs. With ``release`` the weights
    this rank does not run move to the meta device (``False`` when the modules are shared
    with another pipeline, as after ``from_pipe``).
    """
    present = {name: getattr(pipeline, name) for name in PLACEABLE_COMPONENTS
               if isinstance(getattr(pipeline, name, None), nn.Module)
               and not isinstance(getattr(pipeline, name), ComponentProxy)}
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
