"""Stages x context parallelism: diffusers' own Ulysses attention inside each AsyncDiff stage's group of ranks.

The ranks form a mesh ``(cfg x stage ranks) x sp``: rank ``r`` has context-parallel index ``r % sp``
and AsyncDiff position ``r // sp`` (CFG half first, then stage, as AsyncDiff numbers its ranks).

* **Across stages (and CFG halves):** the ranks that share an sp index run AsyncDiff as usual, on
  their own process group (:attr:`HybridGroups.stage_group`): ``sp`` copies of the same schedule,
  each sending whole boundary states to its counterpart in the next stage.
* **Inside a stage:** its ``sp`` ranks run the stage's blocks on ``1/sp`` of the sequence each, with
  diffusers' context parallelism doing the attention (Ulysses all-to-alls over the stage's ranks).
  Nothing here computes attention: the attention processors of the stage's blocks get diffusers'
  ``ParallelConfig`` (as ``enable_parallelism`` gives every processor of a model), set up on a
  device mesh whose ``ulysses`` axis is the stage's ranks; the sequence is split and gathered by
  diffusers' own ``ContextParallelSplitHook`` / ``ContextParallelGatherHook`` from the model class's
  ``_cp_plan``.

**The plan, per stage.** diffusers' plan splits the sequence where the whole model's forward
takes it (Wan: the first block's ``hidden_states``, the rotary tables' outputs) and gathers it at
the output projection. A stage ``[a, b)`` runs the model's own forward with blocks before ``a``
handing their inputs through and block ``a`` taking the received state
(:mod:`asyncgen.split.transformer.stage_hook`), so the plan is moved, not rewritten: the split of
the first block's inputs goes on block ``a`` (under the stage hook, so it splits the received
state), entries on modules outside the blocks (rotary tables, the model's own inputs) stay, the
output gather stays on the last stage only, and a stage before the last gathers its last block's
output (a gather hook of diffusers with the split's dimension), so the boundary state that
travels to the next stage is whole: AsyncDiff's runtime sees exactly what it sees without ``sp``.
Every piece is active only while this rank's own stage runs (the split's verification runs,
its trace on fake tensors and other stages' ranges leave them inert).

With one stage the plan is diffusers' own, unchanged, so ``stages=1, context_parallel=P``
computes what ``enable_parallelism(ContextParallelConfig(ulysses_degree=P))`` computes. With
stages, a plan that splits the model's inputs rather than its first block's (Flux: the ``""``
entry) is refused: a later stage receives its state at a block, where that plan has no entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from asyncgen._compat import (attention_takes_parallel_config, context_parallel_hooks, context_parallel_plan,
                              context_parallel_refusal_for_hybrid, set_attention_parallel_config)
from asyncgen.comm.context import DistContext

_SPLIT_HOOK = "asyncgen_cp_split"
_GATHER_HOOK = "asyncgen_cp_gather"
_ATTENTION_HOOK = "asyncgen_cp_attention"


def check_context_parallel(degree, stages: int | None = None) -> int:
    """``degree`` as a whole number >= 1; above 1, refused with the installed diffusers' version where it lacks
    what the hybrid needs."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"context_parallel={degree!r}: need a whole number of at least 1 (1: no context parallelism)")
    if degree > 1:
        refusal = context_parallel_refusal_for_hybrid()
        if refusal is not None:
            raise ValueError(f"context_parallel={degree}: {refusal}")
    return degree


def check_has_plan(denoiser: nn.Module, degree: int) -> None:
    """Refuse a denoiser whose class diffusers gives no context-parallel plan (UNets, SD3), naming it."""
    if context_parallel_plan(type(denoiser)) is None:
        raise ValueError(f"context_parallel={degree}: diffusers gives {type(denoiser).__name__} no context-parallel "
                         "plan (_cp_plan), so its attention cannot be sharded by sequence (Wan, Flux, QwenImage, "
                         "LTX-Video and other transformers have one)")


@dataclass
class HybridGroups:
    """The mesh of one hybrid run, as this rank sees it."""

    degree: int  # sp: ranks per stage that share its sequence
    stage_group: dist.ProcessGroup  # the ranks with this rank's sp index: AsyncDiff's group (CFG x stage ranks)
    parallel_config: object  # diffusers' ParallelConfig, set up on the mesh; its ulysses axis is this stage's ranks
    mesh: object  # the DeviceMesh ("asyncdiff", "ring", "ulysses")


# one mesh per shape in a process: a second wrapper reuses it (torch 2.6 refuses to slice a second device mesh in a
# process that built one, and the groups need not be made twice)
_MESHES: dict[tuple, HybridGroups] = {}


def make_hybrid_groups(ctx: DistContext, degree: int) -> HybridGroups:
    """The mesh over every rank of ``ctx`` (the default group; all ranks call this together), built once."""
    from diffusers import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    if not ctx.distributed:
        raise ValueError(f"context_parallel={degree}: needs a process group of several ranks (torchrun, or "
                         "asyncgen generate --devices N); one process runs no context parallelism")
    if ctx.group is not dist.group.WORLD and ctx.world_size != dist.get_world_size():
        raise ValueError(f"context_parallel={degree}: the hybrid's device mesh spans the default process group; "
                         f"a process_group of {ctx.world_size} of its {dist.get_world_size()} ranks is not supported")
    if ctx.world_size % degree:
        raise ValueError(f"context_parallel={degree}: the {ctx.world_size} ranks do not divide into groups of "
                         f"{degree}; need (stages + stride - 1) x {degree} ranks (x 2 with cfg_parallel)")
    device = ctx.device if ctx.device is not None else torch.device("cpu")
    key = (ctx.world_size, degree, str(device), id(dist.group.WORLD))
    if key in _MESHES:
        return _MESHES[key]
    mesh = init_device_mesh(device.type, (ctx.world_size // degree, 1, degree),
                            mesh_dim_names=("asyncdiff", "ring", "ulysses"))
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=degree))
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
    _MESHES[key] = HybridGroups(degree=degree, stage_group=mesh.get_group("asyncdiff"), parallel_config=config,
                                mesh=mesh)
    return _MESHES[key]


class _WhileStageRuns(ModelHook):
    """One of diffusers' context-parallel hooks, acting only while ``running()`` says this rank's stage runs."""

    def __init__(self, inner: ModelHook, running: Callable[[], bool]):
        super().__init__()
        self.inner, self.running = inner, running

    def initialize_hook(self, module):
        return self.inner.initialize_hook(module)

    def pre_forward(self, module, *args, **kwargs):
        return self.inner.pre_forward(module, *args, **kwargs) if self.running() else (args, kwargs)

    def post_forward(self, module, output):
        return self.inner.post_forward(module, output) if self.running() else output


class _ParallelAttention(ModelHook):
    """Gives the attention processors inside one block diffusers' parallel config while this rank's stage runs it
    (and takes it back after), so the block's attention is diffusers' Ulysses over the stage's ranks."""

    def __init__(self, processors: list, config, running: Callable[[], bool]):
        super().__init__()
        self.processors, self.config, self.running = processors, config, running

    def pre_forward(self, module, *args, **kwargs):
        on = self.config if self.running() else None
        for processor in self.processors:
            set_attention_parallel_config(processor, on)
        return args, kwargs

    def post_forward(self, module, output):
        for processor in self.processors:
            set_attention_parallel_config(processor, None)
        return output


def _attention_processors(block: nn.Module) -> list:
    return [m.processor for m in block.modules()
            if attention_takes_parallel_config(getattr(m, "processor", None))]


def _module_at(model: nn.Module, name: str) -> nn.Module:
    if "*" in name:
        raise ValueError(f"{type(model).__name__}'s context-parallel plan names '{name}' (a wildcard): the hybrid "
                         "moves plan entries by module and takes none over a list of them")
    return model.get_submodule(name) if name else model


def stage_plan(split, first: int, stop: int, last: bool, degree: int) -> list[tuple[nn.Module, str, object]]:
    """Where diffusers' plan goes for a stage of blocks ``[first, stop)`` of ``split`` (``last``: it ends the
    forward): ``(module, "split" or "gather", plan entry)`` in the order the hooks are placed. Raises ValueError,
    naming why, where the class's plan cannot be moved onto such a stage (see the module docstring)."""
    model = split.denoiser
    name = type(model).__name__
    check_has_plan(model, degree)
    plan = context_parallel_plan(type(model))
    blocks = getattr(getattr(split, "trace", None), "modules", None)
    if not blocks:
        raise ValueError(f"context_parallel={degree}: {name}'s split is not a block chain")
    cp_input, cp_output = context_parallel_hooks()[2:]
    whole = first == 0 and stop == len(blocks)
    # by name: a rank's released blocks are stand-ins in the model, not the trace's module objects
    index_of = {block_name: i for i, block_name in enumerate(split.trace.names)}
    first_block_entry = None
    placed: list[tuple[nn.Module, str, object]] = []
    for key, entry in plan.items():
        block = index_of.get(key)
        if block is None and "*" not in key:
            module = _module_at(model, key)
            block = next((i for i, m in enumerate(blocks) if m is module), None)
        if block is not None:
            if block != 0 or not isinstance(entry, dict):
                raise ValueError(f"context_parallel={degree}: {name}'s plan has an entry on block '{key}' "
                                 "other than the first block's inputs; the hybrid moves only that one to a stage")
            first_block_entry = entry
            continue
        module = _module_at(model, key)
        if isinstance(entry, dict):
            if not whole and key == "" and any(n in entry for n in split.trace.boundary[0]):
                raise ValueError(
                    f"context_parallel={degree} with stages: diffusers' plan for {name} splits the sequence "
                    f"at the model's inputs ({', '.join(sorted(entry))}), and a stage after the first receives its "
                    "state at a block, where that plan has no entry; run it with stages=1 (diffusers' plan as it "
                    "is), or a class whose plan splits its first block's inputs (Wan)")
            placed.append((module, "split", entry))
        elif last:  # the output gather: where the forward ends, on the stage that ends it
            placed.append((module, "gather", entry if isinstance(entry, (list, tuple)) else [entry]))
    if first_block_entry is not None:
        placed.append((blocks[first], "split", first_block_entry))
    elif not whole:
        raise ValueError(f"context_parallel={degree} with stages: diffusers' plan for {name} does not split "
                         "its first block's inputs, so a stage's received state cannot be split by it")
    if not last:
        # the stage's output travels whole: gathered along the dimension the first block's input was split on
        split_inputs = [e for e in first_block_entry.values() if isinstance(e, cp_input) and not e.split_output]
        leaving = split.trace.boundary[stop]
        if len(split_inputs) != 1 or len(leaving) != 1:
            raise ValueError(f"context_parallel={degree} with stages: {name}'s blocks hand on "
                             f"{len(leaving)} stream(s) and its plan splits {len(split_inputs)} block input(s); "
                             "the hybrid gathers one stream between stages")
        placed.append((blocks[stop - 1], "gather", [cp_output(gather_dim=split_inputs[0].split_dim,
                                                              expected_dims=split_inputs[0].expected_dims)]))
    return placed


def stages_refusal(split, degree: int = 2) -> str | None:
    """None where ``split``'s denoiser can run context-parallel inside stages (its plan moves onto a first and a
    later stage); else why not, in words (what :func:`apply_stage_context_parallel` would refuse)."""
    units = len(getattr(split, "units", ()))
    if units < 2:
        return f"{type(split.denoiser).__name__} splits into one unit: no stages to put context parallelism in"
    try:
        stage_plan(split, 0, 1, False, degree)
        stage_plan(split, 1, units, True, degree)
    except ValueError as exc:
        return str(exc)
    return None


def apply_stage_context_parallel(split, first: int, stop: int, last: bool, groups: HybridGroups) -> None:
    """Put diffusers' context parallelism on this rank's stage: blocks ``[first, stop)`` of ``split``
    (a traced :class:`~asyncgen.split.transformer.block_split.BlockSplit`); ``last``: it ends the forward."""
    from asyncgen.runtime.scoped_hook import register_outermost
    from asyncgen.split.transformer.stage_hook import stage_hook_of

    placed = stage_plan(split, first, stop, last, groups.degree)
    blocks = split.trace.modules
    split_hook, gather_hook = context_parallel_hooks()[:2]
    config = groups.parallel_config
    cp_config = config.context_parallel_config
    stage_hook = stage_hook_of(blocks[first])

    def running() -> bool:
        # this rank's own stage, run for its work: not the split's verification (which records every block's state
        # to compare with the unsharded forward) nor a unit timing (rank 0 alone: no peer to exchange with)
        active = stage_hook.active
        if active is None:
            return False
        run = active[0]
        return run.start == first and run.stop == stop and run.record is None and run.probe is None

    for module, kind, entry in placed:
        hook, hook_name = ((split_hook(entry, cp_config), _SPLIT_HOOK) if kind == "split"
                           else (gather_hook(entry, cp_config), _GATHER_HOOK))
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_WhileStageRuns(hook, running), hook_name)
    for block in blocks[first:stop]:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            _ParallelAttention(_attention_processors(block), config, running), _ATTENTION_HOOK)
    # the stage hook outermost on the first block: it puts the received state in, then the split hook shards it
    register_outermost(blocks[first], stage_hook)
