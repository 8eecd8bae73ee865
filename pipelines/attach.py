"""Attaching AsyncDiff to a diffusers pipeline through ``diffusers.hooks``, like diffusers' own caches.

``apply_asyncdiff(pipe, AsyncDiffConfig(stages=2))`` splits the pipeline's denoiser (and
Wan 2.2's second expert) into stages, keeps this rank's stage, registers an
:class:`~asyncgen.runtime.asyncdiff_hook.AsyncDiffHook` on the real denoiser and, in a
process group, places the text encoders and the VAE. The pipeline stays the user's: its
``__call__``, components and outputs are diffusers'. :class:`AsyncDiffPipeline` is the front
door built on this (shared randomness across ranks, errors published to the other ranks,
one call at a time, reports).

What a hook cannot do, and is done here instead: the weights of other ranks' stages are
released by replacing those submodules with parameterless stand-ins
(:class:`~asyncgen.placement.residency.ReleasedModule`), because ``pipe.to(device)`` walks
the denoiser's tree and cannot move a parameter left on ``meta``; and the VAE and text
encoders a rank does not run are proxies set on the pipeline
(:func:`~asyncgen.placement.components.place_components`), because a pipeline calls the
VAE's ``decode``/``encode`` and reads encoder outputs that the hook on ``forward`` does not see.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from diffusers.utils import logging
from torch import nn

from asyncgen.comm.context import DistContext
from asyncgen.comm.group import resolve_context
from asyncgen.cost.cuts import choose_cuts
from asyncgen.models import (DENOISER_COMPONENTS, EXPERT_COMPONENTS, PLACEABLE_COMPONENTS, check_cfg_parallel,
                             denoiser_batch)
from asyncgen.placement.components import place_components
from asyncgen.placement.planner import Placement
from asyncgen.placement.residency import release_modules, released_restored
from asyncgen.runtime.asyncdiff import DistributedRuntime
from asyncgen.runtime.asyncdiff_hook import HOOK_NAME, AsyncDiffHook
from asyncgen.runtime.scoped_hook import register_numbered
from asyncgen.runtime.step_cache import StagedCache, check_cache_config, check_cache_split, take_enabled_cache
from asyncgen.schedules.asyncdiff import Topology
from asyncgen.schedules.simulator import CfgSerialSimulator, SerialSimulator
from asyncgen.split.registry import needs_example_call, split_denoiser
from asyncgen.split.transformer.trace import ExampleUnavailable, NeedsRealWeights, SplitRefused
from asyncgen.split.units import DenoiserSplit, Stage, make_stages

from .acceleration import compile_options, compile_stages
from .wrapping import check_device, check_flag, check_not_wrapped

# a child of diffusers' library logger, so diffusers.utils.logging.set_verbosity_* (and its handler) apply to us
logger = logging.get_logger(f"diffusers.{__name__}")


@dataclass
class AsyncDiffConfig:
    r"""How :func:`apply_asyncdiff` runs a pipeline's denoiser. Checked when made: a bad value is one line.

    Args:
        stages: Number of stages N the denoiser is split into.
        stride: Steps predicted per parallel round S; the last stage runs on S ranks
            (``stages + stride - 1`` ranks in all).
        warmup: Exact (synchronous) steps at the start; ``None``: 5% of the steps, at least 1.
        time_shift: Let stages fed a stale input use the previous step's timestep.
        split: ``"flops"`` (balance estimated compute), ``"time"`` (balance unit times measured
            on rank 0), ``"even"``, a list of cut indices, or a dict giving each denoiser
            (``transformer``, ``transformer_2``) its own.
        cfg_parallel: Split the classifier-free-guidance batch across two groups of ranks.
        components: Where the text encoders and the VAE run in a process group: ``"planned"``
            (the default there), ``"replicated"``, or a list of ``Placement``.
        compile: ``torch.compile`` this rank's stage modules (``True`` or a dict of arguments).
        free_unused_stages: Release (to ``meta``) the weights of other ranks' stages and components.
        scoped: The hooks work only inside :meth:`AsyncDiffAttachment.active` and leave every
            other call to the stock forward: for a denoiser another pipeline shares (``from_pipe``).
        process_group: The group to use; default: the initialised one, else one from
            ``torchrun``'s environment, else none (the serial simulator runs every stage here).
        device: This rank's device; default ``cuda:LOCAL_RANK`` in a group with CUDA.
        timeout: Limit for each collective (seconds or ``timedelta``; default ``ASYNCGEN_TIMEOUT`` or 600 s).
        cache: A step cache to run under the stages: diffusers' ``FirstBlockCacheConfig``,
            ``MagCacheConfig``, ``TaylorSeerCacheConfig``, ``PyramidAttentionBroadcastConfig``
            (transformer denoisers), or asyncgen's ``DeepCacheConfig``
            (:mod:`asyncgen.runtime.deep_cache`; SD/SDXL UNets). A cache already enabled on the
            denoiser (``enable_cache``, ``apply_deep_cache``) is carried over the same way. With
            ``cfg_parallel=True`` First Block Cache and PAB are refused. See
            :mod:`asyncgen.runtime.step_cache` for what each stage decides and sends.
    """

    stages: int = 2
    stride: int = 1
    warmup: int | None = None
    time_shift: bool = False
    split: Any = "flops"
    cfg_parallel: bool = False
    components: Any = None
    compile: bool | dict = False
    free_unused_stages: bool = True
    scoped: bool = False
    process_group: Any = None
    device: str | torch.device | None = None
    timeout: float | datetime.timedelta | None = None
    cache: Any = None

    def __post_init__(self):
        from asyncgen.comm.context import check_timeout

        for name in ("stages", "stride"):
            value = getattr(self, name)
            if isinstance(value, bool):  # an int to Python, never a count here
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        warmup = self.warmup
        if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
            raise ValueError(f"warmup must be None or an integer >= 0, got {warmup!r}")
        for name in ("time_shift", "cfg_parallel", "free_unused_stages", "scoped"):
            check_flag(getattr(self, name), name)
        check_device(self.device)
        check_timeout(self.timeout)
        check_components(self.components)
        compile_options(self.compile)
        check_cache_config(self.cache, cfg_parallel=self.cfg_parallel)
        if self.cache is not None and self.scoped:
            # the cache's hooks go on the denoiser itself, which a scoped wrapper shares with a stock pipeline
            raise ValueError(f"cache={type(self.cache).__name__} cannot be used with scoped=True (from_pipe): the "
                             "denoiser is shared with a pipeline that must stay stock; wrap the pipeline itself")
        self.topology  # stages and stride: Topology's own checks

    @property
    def topology(self) -> Topology:
        return Topology(self.stages, self.stride)

    @property
    def cfg_parts(self) -> int:
        return 2 if self.cfg_parallel else 1


def check_components(components) -> None:
    if isinstance(components, (list, tuple)) and all(isinstance(p, Placement) for p in components):
        return
    if components not in (None, "replicated", "planned"):
        raise ValueError(f"components={components!r} is not one of 'replicated', 'planned' or a list of Placement")


@dataclass
class AsyncDiffAttachment:
    """What :func:`apply_asyncdiff` attached: the hooks, the stages, the group, the components' placements."""

    pipeline: Any
    config: AsyncDiffConfig
    ctx: DistContext
    attribute: str  # the denoiser's attribute: "unet", "transformer", ...
    hooks: dict[str, AsyncDiffHook]  # per denoiser attribute (Wan 2.2: "transformer" and "transformer_2")
    stages: dict[str, list[Stage]]  # every stage of each denoiser (this rank holds one of each)
    components: str = "replicated"  # "planned" when the text encoders and the VAE were placed
    component_placements: dict[str, list[Placement]] = field(default_factory=dict)
    # per denoiser: the call its cuts were costed on (the pipeline path, or why the config's call was used)
    cut_sources: dict[str, str] = field(default_factory=dict)

    @property
    def topology(self) -> Topology:
        return self.config.topology

    @property
    def hook(self) -> AsyncDiffHook:
        return self.hooks[self.attribute]

    def reset(self) -> None:
        """Start afresh: every denoiser's lanes settle their transfers and forget their steps."""
        for hook in self.hooks.values():
            hook.reset_lanes()

    @contextlib.contextmanager
    def active(self):
        """Where ``scoped`` hooks work (unscoped ones work everywhere)."""
        with contextlib.ExitStack() as stack:
            for hook in self.hooks.values():
                stack.enter_context(hook.active())
            yield

    @contextlib.contextmanager
    def whole_models(self):
        """Each denoiser as the whole model, running its own forward: for what measures it (a memory plan)."""
        with contextlib.ExitStack() as stack:
            for name, hook in self.hooks.items():
                stack.enter_context(hook.stock_forward())
                stack.enter_context(released_restored(getattr(self.pipeline, name)))
            yield

    def cuts(self, name: str | None = None) -> list[int]:
        cuts = [0]
        for stage in self.stages[name or self.attribute]:
            cuts.append(cuts[-1] + len(stage.units))
        return cuts

    def expert_cuts(self) -> list[tuple[str, DenoiserSplit, list[int]]]:
        return [(name, hook.split, self.cuts(name)) for name, hook in self.hooks.items() if name != self.attribute]


def denoiser_attribute(pipeline) -> str:
    for name in DENOISER_COMPONENTS:
        if isinstance(getattr(pipeline, name, None), nn.Module):
            return name
    raise TypeError(
        f"{type(pipeline).__name__} has no denoiser to split (looked for a module in "
        f"{', '.join('pipe.' + n for n in DENOISER_COMPONENTS)})"
    )


def expert_attributes(pipeline) -> list[str]:
    """The pipeline's second denoisers it switches to during a call (Wan 2.2's ``transformer_2``), if any."""
    return [name for name in EXPERT_COMPONENTS if isinstance(getattr(pipeline, name, None), nn.Module)]


def split_method(split, attribute: str):
    """The ``split`` argument for one denoiser: a dict gives each denoiser (``transformer``, ``transformer_2``) its own."""
    if not isinstance(split, dict):
        return split
    if attribute not in split:
        raise ValueError(f"split={split!r} names no cuts for pipe.{attribute}; give one entry per denoiser")
    return split[attribute]


def plan_placements(split: DenoiserSplit, cuts: Sequence[int], placed: dict[str, nn.Module], topology: Topology,
                    cfg_parts: int, replicated: dict[str, nn.Module] | None = None,
                    experts: Sequence[tuple[str, DenoiserSplit, Sequence[int]]] = ()) -> list[Placement]:
    """Where ``components="planned"`` runs each text encoder and the VAE: the planner's placements.

    A deterministic function of the configs and the cuts, so every rank computes the same;
    ``experts`` (Wan 2.2's second denoiser: name, split, cuts) count with their stages.
    """
    from asyncgen.placement.pipeline_plan import plan_pipeline

    plan = plan_pipeline(split, cuts, placed, topology, cfg_parts, None, None, denoiser_batch(split.denoiser),
                         replicated, experts=experts)
    return [p for rank in plan.ranks for p in rank.placements]


def components_by_role(pipeline, denoisers: Sequence[str]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """The pipeline's modules besides its denoisers: those a plan places (text encoders, the VAE) and the rest
    (every rank keeps them whole); a component proxy stands for the module it wraps."""
    placed, replicated = {}, {}
    for name, module in getattr(pipeline, "components", {}).items():
        module = getattr(pipeline, name, module)
        if name in denoisers or not isinstance(module, nn.Module):
            continue  # the denoisers are staged, not components
        real = getattr(module, "component", module)
        (placed if name in PLACEABLE_COMPONENTS else replicated)[name] = real
    return placed, replicated


class PipelineCall:
    """The stock pipeline's first denoiser call at its default size, recorded on shapes once (the pipeline path).

    What ``asyncgen plan`` and stage-only loading split and cost on
    (:func:`~asyncgen.split.transformer.pipeline_example.record_denoiser_call`: every weight,
    loaded or on ``meta``, stands in as a fake tensor, no model computes, the noise drawn is
    undone), so a wrapper around the loaded pipeline chooses the same cuts. ``get()`` is the
    call (tensors on ``meta``), or ``None`` with :attr:`reason` saying why it could not be recorded.
    """

    def __init__(self, pipeline, attribute: str):
        self.pipeline, self.attribute = pipeline, attribute
        self.reason = ""
        self._call: dict | None = None
        self._recorded = False

    def get(self) -> dict | None:
        if not self._recorded:
            from asyncgen.split.transformer.pipeline_example import (PipelineExampleUnavailable,
                                                                     pipeline_call_arguments, record_denoiser_call)

            self._recorded = True
            try:
                arguments = pipeline_call_arguments(self.pipeline, None, None)
                self._call = record_denoiser_call(self.pipeline, self.attribute, arguments)
            except PipelineExampleUnavailable as exc:
                self.reason = str(exc)
        return self._call

    def for_denoiser(self, denoiser: nn.Module) -> dict | None:
        """The recorded call, for ``denoiser``: the pipeline's first denoiser or one taking the same arguments
        (Wan 2.2's second expert, first called only after the switch, is called like the first)."""
        first = getattr(self.pipeline, self.attribute)
        if denoiser is not first and type(denoiser).forward is not type(first).forward:
            return None
        return self.get()


def _on_device_of(call: dict, denoiser: nn.Module) -> dict:
    """The recorded call (``meta`` tensors) as the split holds it, where the denoiser's weights are.

    On the CPU (where a pipeline is loaded) it stays on ``meta``: cost estimates run on
    shapes and take meta inputs as the CPU's. A denoiser already on an accelerator gets
    zeros there instead (a fake run needs its inputs and weights on one device).
    """
    device = next((p.device for p in denoiser.parameters() if not p.is_meta), torch.device("cpu"))
    if device.type == "cpu":
        return dict(call)

    def place(value):
        if isinstance(value, torch.Tensor):
            return torch.zeros(value.shape, dtype=value.dtype, device=device)
        if isinstance(value, dict):
            return {k: place(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(place(v) for v in value)
        return value

    return place(call)


def _split_on_pipeline_call(denoiser: nn.Module, recorded: PipelineCall) -> tuple[DenoiserSplit | None, str]:
    """A denoiser with weights on ``meta`` (stage-only loading) whose config gives no example: split on the
    pipeline's recorded call; ``(None, why)`` where that cannot be had."""
    call = recorded.for_denoiser(denoiser)
    if call is None:
        return None, recorded.reason or f"{type(denoiser).__name__} is not called like the pipeline's first denoiser"
    try:
        return split_denoiser(denoiser, call=call), ""
    except SplitRefused as exc:
        return None, f"{type(recorded.pipeline).__name__}'s own first call (pipeline path) was refused: {exc}"


def _attach_denoiser(pipeline, name: str, config: AsyncDiffConfig, ctx: DistContext, recorded: PipelineCall,
                     cut_sources: dict[str, str]) -> tuple[list[Stage], AsyncDiffHook]:
    """Split ``pipe.<name>`` into stages, keep this rank's, register the hook; returns (stages, hook).

    In a process group this rank keeps only its stage (with ``free_unused_stages`` the
    others' weights are released); in one process the serial simulator runs every stage.

    The split's example call is the pipeline's own: the blocks are found here on an example
    built from the config (checked against the full forward on the real weights), the cuts
    are costed (``split="flops"``) on the stock pipeline's first call recorded on shapes
    (``recorded``, the pipeline path: the cuts ``asyncgen plan`` chooses), and the hook's
    first call (before its first step) traces the boundary again on the arguments the
    pipeline really passes, and checks it where the weights are at hand. A class whose
    example cannot be built from its config (HiDream's stacked Llama states) is split
    there, on that first call, instead; one whose weights are on ``meta`` on the recorded
    call. ``cut_sources[name]`` says which call the cuts were costed on.
    """
    denoiser = getattr(pipeline, name)
    topology, cfg_parts = config.topology, config.cfg_parts
    method = split_method(config.split, name)
    # a cache enabled on the denoiser comes off before the split traces it, and back under the stages at the first
    # call, after the trace on the pipeline's own arguments
    cache = take_enabled_cache(denoiser, config.cache)
    try:
        denoiser_split = split_denoiser(denoiser)
        cut_sources[name] = "the config's example call"
    except ExampleUnavailable as exc:
        if any(p.is_meta for p in denoiser.parameters()):
            denoiser_split, pipeline_reason = _split_on_pipeline_call(denoiser, recorded)
            if denoiser_split is None:
                raise type(exc)(f"{pipeline_reason}; then {exc}") from exc
            cut_sources[name] = "the stock pipeline's first call, recorded on shapes (pipeline path)"
        else:
            logger.info("%s; splitting it on the pipeline's first call", exc)
            denoiser_split = None
            cut_sources[name] = "the pipeline's first denoiser call (split there)"
    # the calls the cuts are costed on: the pipeline's own (its text length and latent layout), where it records
    cut_inputs = None
    if method == "flops" and topology.stages > 1 and denoiser_split is not None and needs_example_call(denoiser) \
            and denoiser_split.example_source == "the config":  # (one stage has no cuts to cost)
        call = recorded.for_denoiser(denoiser)
        if call is not None:
            cut_inputs = _on_device_of(call, denoiser)
            cut_inputs[denoiser_split.sample_argument] = denoiser_split.sample_tensor(
                cut_inputs[denoiser_split.sample_argument])
        else:
            cut_sources[name] = f"the config's example call ({recorded.reason or 'no pipeline call recorded'})"

    def cuts_of(split: DenoiserSplit) -> list[int]:
        if cut_inputs is not None and split is denoiser_split:
            try:
                cuts = choose_cuts(split, topology.stages, method, inputs=cut_inputs, ctx=ctx)
                cut_sources[name] = "the stock pipeline's first call, recorded on shapes (pipeline path)"
                return cuts
            except Exception as exc:  # noqa: BLE001 - a chain that does not run on that call: the fallback's cue
                cut_sources[name] = (f"the config's example call (the pipeline path's call did not run the split's "
                                     f"chain: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
                logger.warning("pipe.%s: cuts costed on %s", name, cut_sources[name])
        return choose_cuts(split, topology.stages, method, ctx=ctx)

    check_cache_split(cache, denoiser_split, name)

    def staged(split: DenoiserSplit):
        all_stages = make_stages(split, cuts_of(split))
        compile_kwargs = compile_options(config.compile)
        if compile_kwargs is not None:
            # one function per stage (not the hook, not the shared embeddings: those take a
            # new timestep every step and are cheap, and the hook's bookkeeping is Python)
            all_stages = compile_stages(all_stages, compile_kwargs)
        logger.info("split %s into %d stage(s) of %s units: %s", type(denoiser).__name__, len(all_stages),
                    "/".join(str(len(s.units)) for s in all_stages),
                    "; ".join(f"stage {k}: {s.names[0]} .. {s.names[-1]}" for k, s in enumerate(all_stages)))
        step_cache = StagedCache(cache, all_stages, topology.stride) if cache is not None else None
        if ctx.distributed:
            mine = all_stages[topology.stage_of(ctx.rank % topology.world_size)]
            resident = split.shared_modules() + mine.modules()
            if config.free_unused_stages:
                others = [m for stage in all_stages if stage is not mine for m in stage.modules()]
                release_modules(denoiser, others, keep=resident)

            def new_executor():
                return DistributedRuntime(split, mine, topology, ctx, cfg_parts, cache=step_cache)
        else:
            def new_executor():
                simulators = [SerialSimulator(split, all_stages, topology, cache=step_cache) for _ in range(cfg_parts)]
                return simulators[0] if cfg_parts == 1 else CfgSerialSimulator(simulators)

            resident = [denoiser]
        return all_stages, new_executor, resident, step_cache

    if denoiser_split is not None:
        all_stages, new_executor, resident, step_cache = staged(denoiser_split)

        def first_call(hook: AsyncDiffHook, arguments: dict) -> None:
            if not hasattr(hook.split, "adopt_call"):
                return  # a UNet's split: nothing traced
            try:  # a traced split: its boundary from the pipeline's real call
                with released_restored(denoiser):  # a rank's released blocks, back for the trace (on fake tensors)
                    hook.split.adopt_call(arguments)
            except NeedsRealWeights as exc:
                # a forward that reads tensor values (Lumina2) traces on real tensors only, and this rank released the
                # other stages' weights: it keeps the trace made at attach time, on its whole model
                logger.info("kept the attach-time trace of %s: %s", type(denoiser).__name__, exc)
            if step_cache is not None:
                step_cache.apply(hook.split)
    else:
        all_stages, new_executor, resident = [], None, None

        def first_call(hook: AsyncDiffHook, arguments: dict) -> None:
            split = split_denoiser(denoiser, call=arguments)
            made, executor, keep, step_cache = staged(split)
            all_stages.extend(made)  # the attachment's list: its stages from now on
            hook.take_split(split, executor, keep)
            if step_cache is not None:
                step_cache.apply(split)

    hook = AsyncDiffHook(denoiser_split, new_executor, topology, config.warmup, config.time_shift,
                         lambda: pipeline.scheduler, cfg_parts, scoped=config.scoped,
                         resident=resident, first_call=first_call, denoiser=denoiser)
    register_numbered(denoiser, hook, HOOK_NAME)  # numbered when a from_pipe sibling's scoped hook is there
    return all_stages, hook


def apply_asyncdiff(pipeline, config: AsyncDiffConfig | None = None) -> AsyncDiffAttachment:
    r"""Run ``pipeline``'s denoiser with AsyncDiff, in place, through a ``diffusers.hooks`` hook.

    After this, ``pipeline(...)`` is the stock call with the denoiser split into
    ``config.stages`` stages: in a process group each rank computes its stage, and every rank
    must make the same calls with the same arguments (give each the same seeded
    ``generator``; :class:`~asyncgen.pipelines.AsyncDiffPipeline` does this for you); in one
    process the serial simulator computes every stage (the same images, without the speedup).
    ``pipe.unet`` (``pipe.transformer``) stays the pipeline's own module, now holding only
    this rank's stage of weights. Returns what was attached (hooks, stages, group, placements).
    """
    config = config or AsyncDiffConfig()
    if not isinstance(config, AsyncDiffConfig):
        raise TypeError(f"config must be an AsyncDiffConfig, got {type(config).__name__}")
    check_not_wrapped(pipeline, "apply_asyncdiff", every_call=not config.scoped)
    attribute = denoiser_attribute(pipeline)
    names = [attribute] + expert_attributes(pipeline)
    if config.cfg_parallel:
        for name in names:
            check_cfg_parallel(getattr(pipeline, name), type(pipeline).__name__)
    ctx = resolve_context(config.process_group, config.device, config.timeout)
    topology = config.topology
    if ctx.distributed:
        topology.check_world_size(ctx.world_size, config.cfg_parts)
    stages, hooks, cut_sources = {}, {}, {}
    recorded = PipelineCall(pipeline, attribute)  # recorded once, on the first denoiser that needs it
    # Wan 2.2's second expert: split into as many stages (cuts of its own), this rank holds its stage of both
    for name in names:
        stages[name], hooks[name] = _attach_denoiser(pipeline, name, config, ctx, recorded, cut_sources)
    for hook in hooks.values():
        hook.share_calls_with(list(hooks.values()))
    attachment = AsyncDiffAttachment(pipeline, config, ctx, attribute, hooks, stages, cut_sources=cut_sources)
    world = config.cfg_parts * topology.world_size
    if ctx.distributed:
        logger.info("rank %d of %d runs stage %d", ctx.rank, ctx.world_size,
                    topology.stage_of(ctx.rank % topology.world_size))
    elif topology.stages > 1 or topology.stride > 1 or config.cfg_parallel:
        logger.warning("stages=%d stride=%d%s in one process: running the serial simulator (the images of %d "
                       "processes, without their speedup); launch %d processes (torchrun, asyncgen generate "
                       "--devices) for the speedup", topology.stages, topology.stride,
                       " cfg_parallel" if config.cfg_parallel else "", world, world)
    deferred = [name for name, hook in hooks.items() if hook.split is None]
    if ctx.distributed and config.components != "replicated" and deferred and \
            not isinstance(config.components, (list, tuple)):
        # a plan needs the cuts, which a denoiser split on its first call does not have yet; the components must be
        # placed before pipeline.to(device), so every rank keeps them whole
        logger.warning("pipe.%s is split on the pipeline's first call: the text encoders and the VAE are not "
                       "planned (every rank keeps them whole); pass components=[Placement, ...] to place them",
                       deferred[0])
    elif ctx.distributed and config.components != "replicated":
        # before pipeline.to(device): the components this rank does not run stay on meta
        placements = config.components
        if not isinstance(placements, (list, tuple)):
            placed, replicated = components_by_role(pipeline, names)
            with attachment.whole_models():  # the denoisers' stages are counted whole, released or not
                placements = plan_placements(hooks[attribute].split, attachment.cuts(), placed, topology,
                                             config.cfg_parts, replicated, attachment.expert_cuts())
        attachment.components = "planned"
        attachment.component_placements = place_components(pipeline, placements, ctx,
                                                            release=config.free_unused_stages)
    if ctx.device is not None:
        pipeline.to(ctx.device)
    if ctx.rank != 0 and hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    return attachment
