"""The memory plan of a whole pipeline: sizes measured, the planner run, notes added.

The one entry point the wrapper, stage-only loading and ``asyncgen plan`` call.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from asyncgen.placement.planner import DenoiserSize, MemoryPlan, Placement, plan_memory
from asyncgen.placement.sizes import component_size, denoiser_size, parameter_sizes
from asyncgen.schedules.asyncdiff import Topology


def plan_pipeline(split, cuts: Sequence[int], components: dict[str, nn.Module], topology: Topology,
                  cfg_parts: int = 1, dtype: torch.dtype | None = None, latent_size: tuple[int, int] | None = None,
                  batch: int = 2, replicated: dict[str, nn.Module] | None = None, split_encoders: bool = True,
                  estimate_activations: bool = True, placements: Sequence[Placement] | None = None,
                  experts: Sequence[tuple[str, Any, Sequence[int]]] = ()) -> MemoryPlan:
    """The memory plan of a pipeline whose modules may live on the meta device.

    ``split``/``cuts`` are the denoiser's split and its compute-balanced cut points (as the
    wrapper chose them); ``components`` the modules to place (text encoders, the VAE);
    ``replicated`` modules every rank keeps whole anyway (counted on every rank).
    ``dtype`` is the dtype the weights will have (None: as the modules are). Activations
    are estimated at ``latent_size`` (the denoiser's input height and width, None: its
    native size) for the denoiser batch ``batch`` (2 with classifier-free guidance, 1
    without), halved on each rank when ``cfg_parts == 2``. ``placements`` (optional) are
    reported instead of searched for. ``experts`` are ``(name, split, cuts)`` of further
    denoisers the pipeline switches to during a call (Wan 2.2's ``transformer_2``), staged
    in as many stages: each rank holds its stage of each, so the components are placed
    around those bytes too (reported under the expert's name); the experts take turns, so
    the first denoiser's activation estimate stands for all.
    """
    if estimate_activations:
        from asyncgen.cost.fake import value_read_errors

        height, width = latent_size if latent_size is not None else (None, None)
        inputs = split.example_inputs(max(1, batch // cfg_parts), height, width)
        try:
            size = denoiser_size(split, cuts, dtype, inputs)
        except value_read_errors():
            # a forward that reads tensor values (Lumina2, Mochi) runs only for real, and weights on meta (a
            # config-only plan, a rank holding its stage only) cannot: the plan goes without activations
            estimate_activations = False
    if not estimate_activations:
        size = denoiser_size(split, cuts, dtype)
    # by name, so the plan does not depend on the order the caller found the components in
    sizes = [component_size(name, components[name], dtype) for name in sorted(components)]
    copies = {name: sum(parameter_sizes(module, dtype).values()) for name, module in sorted((replicated or {}).items())}
    if copies:  # kept whole by every rank: part of the denoiser side of every rank's base
        size = DenoiserSize(size.stage_units, size.stage_bytes, size.shared_bytes + sum(copies.values()),
                            size.stage_activation_bytes, size.full_activation_bytes)
    expert_sizes = {name: denoiser_size(expert_split, expert_cuts, dtype) for name, expert_split, expert_cuts in experts}
    for name, expert in expert_sizes.items():
        if len(expert.stage_bytes) != len(size.stage_bytes):
            raise ValueError(f"{name}: {len(expert.stage_bytes)} stages for a denoiser of {len(size.stage_bytes)}")
        size = DenoiserSize(size.stage_units, tuple(b + e for b, e in zip(size.stage_bytes, expert.stage_bytes)),
                            size.shared_bytes + expert.shared_bytes, size.stage_activation_bytes,
                            size.full_activation_bytes)
    notes = {"dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
             "latent_size": list(latent_size) if latent_size is not None else None,
             "batch_per_rank": max(1, batch // cfg_parts), "stages": topology.stages, "stride": topology.stride,
             "cfg_parts": cfg_parts, "activations_estimated": estimate_activations,
             "replicated": {name: copies[name] for name in copies}}
    plan = plan_memory(size, sizes, topology, cfg_parts, split_encoders, notes, placements)
    if copies:
        # report the replicated modules under their own names, not inside "denoiser"
        for rank in plan.ranks:
            rank.parameter_bytes["denoiser"] -= sum(copies.values())
            rank.parameter_bytes.update(copies)
    for name, expert in expert_sizes.items():  # and each expert's stage under the expert's name
        for rank in plan.ranks:
            held = expert.shared_bytes + expert.stage_bytes[rank.stage]
            rank.parameter_bytes["denoiser"] -= held
            rank.parameter_bytes[name] = held
    return plan
