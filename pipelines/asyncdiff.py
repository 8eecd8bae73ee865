"""Drop-in AsyncDiff wrapper around a diffusers pipeline."""

from __future__ import annotations

import datetime
from typing import Any, Sequence

import torch
import torch.distributed as dist
from diffusers.utils import logging
from torch import nn

from asyncgen.comm.context import DistContext
from asyncgen.comm.failure import publish_error
from asyncgen.comm.group import resolve_context, shared_randomness
from asyncgen.comm.rank_probe import measure_ranks
from asyncgen.cost.cuts import choose_cuts
from asyncgen.models import EXPERT_COMPONENTS, PLACEABLE_COMPONENTS, denoiser_batch, resolve_dtype
from asyncgen.placement.planner import Placement
from asyncgen.runtime.asyncdiff_hook import AsyncDiffHook
from asyncgen.runtime.context_parallel import (apply_stage_context_parallel, check_context_parallel, check_has_plan,
                                               make_hybrid_groups)
from asyncgen.schedules.asyncdiff import Topology
from asyncgen.split.registry import split_denoiser
from asyncgen.split.transformer.trace import NeedsRealWeights
from asyncgen.split.units import make_stages

from .acceleration import enable_attention
from .layout_costs import auto_layout_from_configs, auto_layout_of_pipeline
from .attach import (AsyncDiffConfig, apply_asyncdiff, components_by_role, denoiser_attribute, plan_placements,
                     split_method)
from .wrapping import PipelineWrapper, check_not_wrapped, one_call_at_a_time, sibling_pipeline

# a child of diffusers' library logger, so diffusers.utils.logging.set_verbosity_* (and its handler) apply to us
logger = logging.get_logger(f"diffusers.{__name__}")


def _load_stage_only(model, topology: Topology, split, ctx: DistContext, dtype, cfg_parts: int, components,
                     allow_pickle: bool = False, context_parallel: int = 1, **load_kwargs):
    """The pipeline with only what this rank runs read from the checkpoint; its cuts, placements and read reports.

    The cuts are chosen on the meta-device denoiser exactly as the constructor chooses them
    on a loaded one (``split="flops"`` costs the same shapes), so every rank agrees. With
    planned components the text encoders and the VAE are placed from their configs too, and
    this rank reads only the ones (or the layer ranges of them) it runs. With ``context_parallel`` P (the hybrid)
    this rank's AsyncDiff position is ``rank // P`` (:mod:`asyncgen.runtime.context_parallel`'s mesh): it reads
    that position's stage and components, as each of the P sequence-sharing copies of the schedule places them.
    """
    from asyncgen.placement.residency import own_buffers, resident_modules

    from .from_configs import split_from_configs
    from .lean_loading import load_pipeline_partially

    chosen: dict[str, list[int]] = {}
    placements: list[Placement] = []
    position = ctx.rank // context_parallel  # this rank in its AsyncDiff group (the rank itself without the hybrid)

    def choose_reads(attribute: str, empty: dict[str, nn.Module]) -> dict[str, list[nn.Module]]:
        reads, splits = {}, {}
        # each denoiser (and Wan 2.2's second expert) with its own cuts; this rank reads its stage of each
        for name in [attribute] + [n for n in EXPERT_COMPONENTS if n in empty]:
            # the denoiser's example call is the stock pipeline's own first call, recorded on shapes (the config's
            # call where that cannot run); a second expert (Wan 2.2's transformer_2, first called only after the
            # switch) keeps the config's call
            splits[name] = (split_from_configs(str(model), empty, name) if name == attribute
                            else split_denoiser(empty[name]))
            chosen[name] = choose_cuts(splits[name], topology.stages, split_method(split, name), ctx=ctx)
            mine = make_stages(splits[name], chosen[name])[topology.stage_of(position % topology.world_size)]
            reads[name] = splits[name].shared_modules() + mine.modules()
        denoiser_split = splits[attribute]
        if components == "replicated":
            return reads
        placed = {n: m for n, m in empty.items() if n in PLACEABLE_COMPONENTS}
        experts = [(name, splits[name], chosen[name]) for name in splits if name != attribute]
        placements.extend(components if isinstance(components, (list, tuple)) else
                          plan_placements(denoiser_split, chosen[attribute], placed, topology, cfg_parts,
                                           experts=experts))
        for name, module in placed.items():
            if not any(p.component == name for p in placements):
                continue  # not placed: replicated, read whole
            # this component's placements only: another's whole or layer-range placement on this rank is not its own
            keep = resident_modules(module, [p for p in placements if p.component == name], position)
            if keep != [module]:  # whole on this rank: diffusers reads it as usual
                reads[name] = keep + own_buffers(module)
        return reads

    pipeline, reports = load_pipeline_partially(model, choose_reads, device=ctx.device, dtype=dtype,
                                                allow_pickle=allow_pickle, **load_kwargs)
    cuts = chosen if len(chosen) > 1 else next(iter(chosen.values()))
    return pipeline, cuts, (placements if components != "replicated" else "replicated"), reports


# parallel="auto"'s steps when the caller names none (asyncgen plan's default too)
AUTO_STEPS = 50


def check_auto_arguments(parallel, stages, stride, cfg_parallel, steps, size, probe, context_parallel=1) -> None:
    """Refuse ``parallel`` values, and layout settings given alongside ``parallel="auto"``, naming what is wrong."""
    if parallel is None:
        given = [n for n, v in (("steps", steps), ("size", size), ("probe", probe)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with parallel='auto' (they tell the layout chooser the run)")
        return
    if parallel != "auto":
        raise ValueError(f"parallel={parallel!r}: need 'auto' (choose the layout) or None (the layout given)")
    given = [f"{n}={v!r}" for n, v, default in (("stages", stages, None), ("stride", stride, 1),
                                                  ("cfg_parallel", cfg_parallel, False),
                                                  ("context_parallel", context_parallel, 1)) if v != default]
    if given:
        raise ValueError(f"{', '.join(given)} with parallel='auto': it chooses the layout itself; give either those "
                         "or parallel='auto'")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps={steps!r}: need a whole number of at least 1")
    if size is not None and not (isinstance(size, (tuple, list)) and len(size) == 2
                                 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"size={size!r}: need (height, width), two positive whole numbers of pixels")
    if probe is not None and not (isinstance(probe, dict) and "link" in probe and isinstance(probe.get("rate"), dict)):
        raise ValueError(f"probe={probe!r}: need {{'link': LinkMeasurement.to_dict() or None, "
                         "'rate': DeviceRate.to_dict()}} (what asyncgen.comm.rank_probe.measure_ranks returns)")


def chosen_settings(choice, warmup: int | None) -> tuple[int, int, int | None, bool, int]:
    """``(stages, stride, warmup, cfg_parallel, context_parallel)`` of a chosen layout; the warm-up is the layout's
    with stages (the caller's, or the default for the steps), the caller's otherwise."""
    settings = choice.chosen.layout.settings  # the layout's AsyncDiffPipeline arguments (warm-up None without stages)
    logger.info("parallel='auto': %s", choice.reason)
    return (settings["stages"], settings["stride"], settings["warmup"] if settings["stages"] > 1 else warmup,
            settings["cfg_parallel"], settings["context_parallel"])


def auto_may_use_context_parallel(ctx: DistContext, cache) -> bool:
    """Whether ``parallel="auto"`` may choose context parallelism here: not with a step cache (the hybrid takes none)
    nor in a process group other than the default one (its device mesh spans the default group)."""
    return cache is None and ctx.distributed and (ctx.group is dist.group.WORLD
                                                   or ctx.world_size == dist.get_world_size())


class AsyncDiffPipeline(PipelineWrapper):
    r"""Run a diffusers pipeline with AsyncDiff: its denoiser split into stages on several ranks.

    The wrapped pipeline's ``__call__`` runs unchanged on every rank; an AsyncDiff hook on its
    denoiser (``pipe.unet``, see :func:`~asyncgen.pipelines.apply_asyncdiff`) turns each call
    into this rank's work. Stage ``k`` lives
    only on rank ``k`` (the last stage on ``stride`` ranks); after ``warmup`` exact steps
    each stage works on its predecessor's output from the previous step, so all stages
    compute at the same time. Every rank returns the same output.

    Args:
        pipeline (`DiffusionPipeline`):
            A loaded pipeline whose denoiser asyncgen can split (``StableDiffusionPipeline``,
            ``StableDiffusionXLPipeline``, their img2img and ControlNet variants, ...).
            It is modified in place: its denoiser gets a hook and, on each rank, the
            weights of other ranks' stages are released.
        stages (`int`, defaults to 2):
            Number of stages N the denoiser is split into (chosen, with ``parallel="auto"``).
        stride (`int`, defaults to 1):
            Steps predicted per parallel round S; the last stage runs on S ranks.
            Needs ``stages + stride - 1`` ranks.
        warmup (`int`, *optional*):
            Exact (synchronous) steps at the start. Defaults to 5% of the steps, at least 1;
            ``warmup >= num_inference_steps`` reproduces the stock pipeline.
        time_shift (`bool`, defaults to `False`):
            Let stages fed a stale input use the previous step's timestep.
        split (`str` or list of `int`, defaults to `"flops"`):
            How to place the cuts: ``"flops"`` balances estimated compute, ``"time"``
            balances unit times measured on rank 0, a list gives the cut indices. A pipeline with
            two denoisers (Wan 2.2: ``transformer`` for the high-noise steps, ``transformer_2`` for
            the low-noise ones) has each split into ``stages`` stages with its own cuts (a dict
            ``{"transformer": ..., "transformer_2": ...}`` gives each its own method or cuts); every
            rank holds its stage of both, and the switch from one to the other starts the new
            one's schedule afresh, with its own ``warmup`` exact steps.
        process_group (`ProcessGroup`, *optional*):
            Group of ``stages + stride - 1`` ranks to use. Defaults to the initialised
            default group, else one created from ``torchrun``'s environment, else none
            (everything runs in this process through the serial simulator).
        device (`str` or `torch.device`, *optional*):
            Device of this rank. Defaults to ``cuda:LOCAL_RANK`` when CUDA is available
            and a group is in use, otherwise the pipeline's current device.
        timeout (`float` seconds or `timedelta`, *optional*):
            Limit for each collective (default 600 s, or ``ASYNCGEN_TIMEOUT``).
        cfg_parallel (`bool`, defaults to `False`):
            Split the classifier-free-guidance batch ``[uncond, cond]`` across two groups of
            ranks (world size ``2 * (stages + stride - 1)``; ranks ``0..M-1`` take the first
            half). With ``stages=1`` this is plain CFG parallelism. The call's denoiser batch
            must be even (CFG doubles it); guidance-distilled models (Flux-dev) are refused.
        dtype (`str` or `torch.dtype`, *optional*):
            Convert the pipeline to this dtype first (``"float16"``, ``"bfloat16"``, ``"float32"``).
            Boundary states travel in the denoiser's dtype. Defaults to the pipeline's own.
        attention (`str`, *optional*):
            Attention kernels of every model in the pipeline: ``"sdpa"`` (PyTorch
            ``scaled_dot_product_attention``) or ``"xformers"`` (CUDA only, needs
            ``pip install 'asyncgen[xformers]'``). Defaults to leaving the pipeline's choice.
        compile (`bool` or `dict`, defaults to `False`):
            ``torch.compile`` this rank's stage modules (not the hook, not the shared
            embeddings): ``True`` for the defaults, or a dict of ``torch.compile`` arguments,
            e.g. ``{"mode": "max-autotune"}``. The schedule and the units do not change, so
            results equal the uncompiled wrapper's up to the compiled kernels' rounding
            (exactly, with ``{"backend": "eager"}``). Compilation happens during the first call.
        components (`str`, *optional*):
            Where the text encoders and the VAE run. ``"planned"`` (the default when a process
            group is in use): each on one rank, the lightest ones first (a text encoder may
            also run as layer ranges on several ranks), its output broadcast to the others
            inside the stock ``__call__``; ranks that do not run a component keep none of its
            weights (they stay on the meta device). ``"replicated"``: every rank keeps and runs
            them all. Outputs are the same either way. In one process (no group) this has no
            effect: the serial simulator runs everything there. A list of
            ``asyncgen.placement.planner.Placement`` places them as it says (a component it does
            not name stays replicated).
        cache (cache config, *optional*):
            A step cache to run under the stages: ``FirstBlockCacheConfig``, ``MagCacheConfig``,
            ``TaylorSeerCacheConfig`` or ``PyramidAttentionBroadcastConfig`` from ``diffusers.hooks``
            (transformer denoisers), or ``DeepCacheConfig`` from ``asyncgen.runtime.deep_cache``
            (SD/SDXL UNets). A cache enabled on the denoiser before wrapping
            (``pipe.transformer.enable_cache(...)``, ``apply_deep_cache(pipe.unet, ...)``) is carried
            over the same way. Each rank runs the cache on its own blocks (units); with ``stages=1``
            the images equal the stock pipeline's with the same cache. First Block Cache and MagCache
            decide on the first stage and send the decision with its boundary state; PAB needs
            ``stride=1``; with ``cfg_parallel=True`` First Block Cache and PAB are refused.
        context_parallel (`int`, defaults to 1):
            The hybrid: each stage runs on this many ranks that share its sequence, with diffusers' own context
            parallelism (Ulysses attention over the stage's ranks, the model class's ``_cp_plan`` moved onto the
            stage's blocks; see :mod:`asyncgen.runtime.context_parallel`). Needs ``(stages + stride - 1) x
            context_parallel`` ranks (x 2 with ``cfg_parallel``) in the default process group; the ranks that
            share a sequence shard index run AsyncDiff together. Transformer denoisers whose class diffusers
            gives a plan, the degree dividing the attention heads and the sequence; with ``stages > 1`` a plan
            that splits its first block's inputs (Wan). ``stages=1`` computes what diffusers'
            ``enable_parallelism(ContextParallelConfig(ulysses_degree=...))`` computes.
        parallel (`str`, *optional*):
            ``"auto"``: choose ``stages``, ``stride``, ``warmup``, ``cfg_parallel`` and ``context_parallel`` for
            this process group's ranks (all of them) from the layout chooser's predicted step times, the choice
            ``asyncgen generate --parallel auto`` makes (:mod:`asyncgen.cost.layout`; the costs are counted on the
            denoiser's shapes, Ulysses degrees at their sharded shapes). Context parallelism is a candidate where
            ``context_parallel`` could run it (above), without ``cache`` and in the default process group. The
            link between the ranks and one rank's compute rate are measured here, on the group (a few seconds,
            every rank takes part), unless ``probe`` gives them. Leave ``stages``, ``stride``, ``cfg_parallel`` and
            ``context_parallel`` out; a ``warmup`` given is kept. In one process (no group) the only layout is one device. The choice
            and why are in ``layout_choice`` (an :class:`asyncgen.cost.layout.Choice`) and logged at info level.
        steps (`int`, *optional*):
            With ``parallel="auto"``: the ``num_inference_steps`` the calls will run (default 50), which sets how
            much the exact warm-up steps weigh.
        size (`tuple[int, int]`, *optional*):
            With ``parallel="auto"``: the ``(height, width)`` in pixels the calls will make (default: the
            denoiser's native size).
        probe (`dict`, *optional*):
            With ``parallel="auto"``: the measured link and compute rate to choose from instead of measuring
            them: ``{"link": LinkMeasurement.to_dict() or None, "rate": DeviceRate.to_dict()}`` (what
            :func:`asyncgen.comm.rank_probe.measure_ranks` returns, and ``asyncgen plan`` caches per host).
    """

    _bound_by = "its denoiser is split into stages for this process's rank and process group"

    def __init__(
        self,
        pipeline,
        stages: int | None = None,
        stride: int = 1,
        warmup: int | None = None,
        time_shift: bool = False,
        split: str | Sequence[int] = "flops",
        process_group: dist.ProcessGroup | None = None,
        device: str | torch.device | None = None,
        timeout: float | datetime.timedelta | None = None,
        cfg_parallel: bool = False,
        dtype: str | torch.dtype | None = None,
        attention: str | None = None,
        compile: bool | dict = False,
        free_unused_stages: bool = True,
        components: str | None = None,
        cache=None,
        parallel: str | None = None,
        steps: int | None = None,
        size: tuple[int, int] | None = None,
        probe: dict | None = None,
        context_parallel: int = 1,
        *,
        _scoped: bool = False,
    ):
        check_not_wrapped(pipeline, type(self).__name__, every_call=not _scoped)
        check_context_parallel(context_parallel)
        check_auto_arguments(parallel, stages, stride, cfg_parallel, steps, size, probe, context_parallel)
        if context_parallel > 1 and cache is not None:
            raise ValueError(f"context_parallel={context_parallel} with cache={type(cache).__name__}: a step cache "
                             "under the hybrid is not supported; leave one of them out")
        if context_parallel > 1:  # before anything is changed: a class diffusers cannot shard by sequence
            check_has_plan(getattr(pipeline, denoiser_attribute(pipeline)), context_parallel)
        self.layout_choice, self.layout_probe, ctx = None, None, None
        if parallel is not None:
            denoiser_attribute(pipeline)
            if dtype is not None:  # the costs are counted, and the rate measured, in the dtype the work runs in
                pipeline.to(dtype=resolve_dtype(dtype))
                dtype = None
            ctx = resolve_context(process_group, device, timeout)
            process_group, timeout = ctx.group, ctx.timeout
            denoiser = getattr(pipeline, denoiser_attribute(pipeline))
            measurement = probe if probe is not None else measure_ranks(ctx, next(denoiser.parameters()).dtype)
            self.layout_choice = auto_layout_of_pipeline(pipeline, measurement, ctx.world_size, steps or AUTO_STEPS,
                                                         *(size or (None, None)), warmup,
                                                         auto_may_use_context_parallel(ctx, cache))
            self.layout_probe = measurement
            stages, stride, warmup, cfg_parallel, context_parallel = chosen_settings(self.layout_choice, warmup)
        stages = 2 if stages is None else stages
        self.hybrid = None
        if context_parallel > 1:  # AsyncDiff runs on the ranks that share this rank's sequence shard
            ctx = ctx or resolve_context(process_group, device, timeout)
            self.hybrid = make_hybrid_groups(ctx, context_parallel)
            self._world_ctx, process_group, timeout = ctx, self.hybrid.stage_group, ctx.timeout
        config = AsyncDiffConfig(stages=stages, stride=stride, warmup=warmup, time_shift=time_shift, split=split,
                                 cfg_parallel=cfg_parallel, components=components, compile=compile,
                                 free_unused_stages=free_unused_stages, scoped=_scoped, process_group=process_group,
                                 device=device, timeout=timeout, cache=cache)
        denoiser_attribute(pipeline)  # a pipeline without a denoiser is refused before it is converted
        if dtype is not None:
            pipeline.to(dtype=resolve_dtype(dtype))
        if attention is not None:
            enable_attention(pipeline, attention)
        self.attachment = apply_asyncdiff(pipeline, config)
        self.pipeline, self.ctx, self.topology = pipeline, self.attachment.ctx, config.topology
        if ctx is not None and self.hybrid is None:  # resolved here first: made from the launcher's environment?
            self.ctx.owns_group = self.ctx.owns_group or ctx.owns_group
        self.attribute, self.cfg_parts = self.attachment.attribute, config.cfg_parts
        if self.hybrid is not None:
            self._apply_context_parallel()

    def _apply_context_parallel(self) -> None:
        """diffusers' context parallelism on this rank's stage of the (only) denoiser."""
        degree = self.hybrid.degree
        split = self.hook.split
        if len(self.hooks) > 1:
            raise ValueError(f"context_parallel={degree}: a pipeline with two denoisers ({', '.join(self.hooks)}) is "
                             "not supported by the hybrid")
        if split is None or not hasattr(split, "trace"):
            raise ValueError(f"context_parallel={degree}: {type(self.denoiser).__name__} is not split as a chain of "
                             "transformer blocks here (context parallelism shards a transformer's sequence)")
        stage = self.stages[self.topology.stage_of(self.ctx.rank % self.topology.world_size)]
        first = split.units.index(stage.units[0])
        apply_stage_context_parallel(split, first, first + len(stage.units), stage is self.stages[-1], self.hybrid)

    # ----------------------------------------------------------- construction

    @classmethod
    def from_pipe(cls, pipeline, **kwargs) -> "AsyncDiffPipeline":
        """Wrap a new pipeline over ``pipeline``'s components, as diffusers' ``from_pipe`` does.

        ``pipeline`` stays untouched and usable (its denoiser is not replaced), so the
        other stages' weights are kept: they are still ``pipeline``'s. Moving or
        converting (``device=``, ``dtype=``) acts on the shared components, as in diffusers.
        The constructor instead wraps in place and frees the other stages' weights.
        """
        check_not_wrapped(pipeline, cls.__name__)
        # the sibling shares ``pipeline``'s denoiser: its hook works only inside this wrapper's calls
        return cls(sibling_pipeline(pipeline), free_unused_stages=False, _scoped=True, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, stages: int | None = None, stride: int = 1,
                        warmup: int | None = None, time_shift: bool = False, split="flops",
                        process_group=None, device=None, timeout=None, cfg_parallel: bool = False,
                        dtype: str | torch.dtype | None = None, attention: str | None = None,
                        compile: bool | dict = False, components: str | None = None, cache=None,
                        parallel: str | None = None, steps: int | None = None, size: tuple[int, int] | None = None,
                        probe: dict | None = None, context_parallel: int = 1,
                        **load_kwargs) -> "AsyncDiffPipeline":
        """Load a pipeline and wrap it; with a process group, each rank reads only the weights it runs.

        In one process this is ``DiffusionPipeline.from_pretrained`` and the constructor.
        When a process group is in use (given, initialised, or from ``torchrun``'s
        environment), the denoiser is built on the meta device, the cuts are decided from
        its config, and only the shared modules and this rank's stage are read from the
        safetensors files, straight to this rank's device in ``dtype``; other ranks'
        parameters stay on ``meta``. ``split="time"`` needs the real weights to time them:
        it loads everything (with a warning). A pickle-only checkpoint is refused unless
        ``allow_pickle=True``. ``dtype`` is handed to the loader (weights load in it), not
        converted after loading. ``components`` is the constructor's. ``load_kwargs`` go to
        ``DiffusionPipeline.from_pretrained`` (``variant``, ``revision``, ``local_files_only``, ...).
        ``parallel="auto"`` chooses the layout before anything is loaded, from the configs' costs (as
        ``asyncgen generate --parallel auto`` does) and the link measured on the group (or ``probe``).
        """
        from .loading import load_pipeline

        if dtype is not None:
            dtype = resolve_dtype(dtype)
            given = load_kwargs.pop("torch_dtype", None)
            if given is not None and given != dtype:
                raise ValueError(f"dtype={dtype} and torch_dtype={given} disagree; pass one of them")
        elif load_kwargs.get("torch_dtype") is not None:
            dtype = resolve_dtype(load_kwargs.pop("torch_dtype"))
        check_context_parallel(context_parallel)
        check_auto_arguments(parallel, stages, stride, cfg_parallel, steps, size, probe, context_parallel)
        choice, ctx = None, None
        if parallel is not None:  # chosen before loading: the layout decides what each rank reads
            ctx = resolve_context(process_group, device, timeout)
            process_group, timeout = ctx.group, ctx.timeout
            measurement = probe if probe is not None else measure_ranks(ctx, dtype or torch.float32)
            choice = auto_layout_from_configs(str(pretrained_model_name_or_path), measurement, ctx.world_size,
                                              steps or AUTO_STEPS, *(size or (None, None)), warmup, dtype,
                                              auto_may_use_context_parallel(ctx, cache))
            stages, stride, warmup, cfg_parallel, context_parallel = chosen_settings(choice, warmup)
        stages = 2 if stages is None else stages
        # bad values fail before minutes of loading
        topology = AsyncDiffConfig(stages=stages, stride=stride, warmup=warmup, time_shift=time_shift, split=split,
                                   cfg_parallel=cfg_parallel, components=components, compile=compile, device=device,
                                   timeout=timeout, cache=cache).topology
        ctx = ctx or resolve_context(process_group, device, timeout)
        lean = ctx.distributed and not (isinstance(split, str) and split == "time")
        if ctx.distributed and not lean:
            logger.warning("split='time' times the units on real weights: every rank loads the whole pipeline "
                           "(use split='flops' or a list of cuts for stage-only loading)")
        reports = {}
        if lean:
            if ctx.world_size % context_parallel:  # as the wrapper would refuse it, before any weight is read
                raise ValueError(f"context_parallel={context_parallel}: the {ctx.world_size} ranks do not divide into "
                                 f"groups of {context_parallel}; need (stages + stride - 1) x {context_parallel} ranks "
                                 "(x 2 with cfg_parallel)")
            topology.check_world_size(ctx.world_size // context_parallel, 2 if cfg_parallel else 1)
            try:
                pipeline, split, components, reports = _load_stage_only(
                    pretrained_model_name_or_path, topology, split, ctx, dtype, 2 if cfg_parallel else 1, components,
                    context_parallel=context_parallel, **load_kwargs)
            except NeedsRealWeights as exc:  # before any weight was read: the split was tried on the config alone
                # the reason is the refusal's own (a forward that reads tensor values, or no example call to be
                # built from the config)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                logger.warning("%s; so the denoiser cannot be split from its config alone: every rank loads the "
                               "whole pipeline to split it, then keeps its stage", reason)
                lean = False
        if not lean:
            pipeline = load_pipeline(pretrained_model_name_or_path, dtype=dtype, **load_kwargs)
        wrapped = cls(pipeline, stages=stages, stride=stride, warmup=warmup, time_shift=time_shift, split=split,
                      process_group=ctx.group, device=device, timeout=ctx.timeout, cfg_parallel=cfg_parallel,
                      attention=attention, compile=compile, components=components, cache=cache,
                      context_parallel=context_parallel)
        # the group was made here, from the launcher's environment (the hybrid's AsyncDiff group is the mesh's)
        (wrapped.ctx if wrapped.hybrid is None else wrapped._world_ctx).owns_group = ctx.owns_group
        wrapped.layout_choice = choice
        if choice is not None:
            wrapped.layout_probe = measurement
        # lean_loading.ReadReport of each component read in part (the denoiser's: None when loaded whole)
        wrapped.load_reports = reports
        wrapped.load_report = reports.get(wrapped.attribute)
        return wrapped

    # ------------------------------------------------------------------- call

    @one_call_at_a_time
    def __call__(self, *args, **kwargs):
        """Exactly the wrapped pipeline's ``__call__``; returns its output on every rank.

        One call at a time: calls from several threads wait for each other (a lock is held for
        the whole call), each returning what it would return alone. In a process group every
        rank must make the same calls in the same order, so call from one thread per rank there.
        """
        try:
            steps = kwargs.get("num_inference_steps")
            if steps is not None and (not isinstance(steps, int) or steps < 1):
                raise ValueError(f"num_inference_steps={steps!r}: need a whole number of at least 1")
            if self.hybrid is not None:  # every rank of the mesh draws the same noise, not only one AsyncDiff group
                kwargs = shared_randomness(self._world_ctx, kwargs)
            kwargs = shared_randomness(self.ctx, kwargs)
            with self.attachment.active():
                self.attachment.reset()
                output = self.pipeline(*args, **kwargs)
                schedule = self.hook.schedule
                if schedule is not None:
                    logger.info("%d exact warm-up step(s) before the asynchronous ones", schedule.warmup)
                self.attachment.reset()  # settle this call's transfers now, not at the next call
            return output
        except BaseException as exc:
            publish_error(self.ctx, exc)
            raise

    # ------------------------------------------------------------- what it holds

    @property
    def denoiser(self) -> nn.Module:
        """The pipeline's denoiser (``pipe.unet``, ``pipe.transformer``): its own module, holding this rank's stage."""
        return getattr(self.pipeline, self.attribute)

    @property
    def hooks(self) -> dict[str, AsyncDiffHook]:
        """The AsyncDiff hook on each denoiser (Wan 2.2: ``transformer`` and ``transformer_2``)."""
        return self.attachment.hooks

    @property
    def hook(self) -> AsyncDiffHook:
        """The AsyncDiff hook on the (first) denoiser: its split, executor and the schedule of the running call."""
        return self.attachment.hook

    @property
    def stages(self) -> list:
        """Every stage of the (first) denoiser; this rank holds one of them."""
        return self.attachment.stages[self.attribute]

    @property
    def expert_stages(self) -> dict[str, list]:
        """Every stage of each further denoiser (Wan 2.2's ``transformer_2``)."""
        return {name: s for name, s in self.attachment.stages.items() if name != self.attribute}

    @property
    def components(self) -> str:
        """``"planned"`` when the text encoders and the VAE were placed on ranks, else ``"replicated"``."""
        return self.attachment.components

    @property
    def component_placements(self) -> dict[str, list[Placement]]:
        return self.attachment.component_placements

    # ------------------------------------------------------------- reporting

    def memory_plan(self, height: int | None = None, width: int | None = None, split_encoders: bool = True):
        """What each rank holds: its stage, the components it runs, parameter and activation bytes.

        Returns an :class:`asyncgen.placement.planner.MemoryPlan` for this wrapper's cuts and
        topology. In a process group with planned components it reports the placements
        in use; with replicated components every rank holds every component; in one
        process it is the plan :mod:`asyncgen.placement.planner` makes for ``stages + stride - 1``
        ranks (times 2 with ``cfg_parallel``). Activations are estimated (not measured) at
        ``height`` x ``width`` pixels (default: the denoiser's native size). Components other
        than the text encoders and the VAE (a ControlNet, an image encoder) count on every rank.
        """
        from asyncgen.placement.pipeline_plan import plan_pipeline

        placed, replicated = components_by_role(self.pipeline, list(self.hooks))
        world = self.cfg_parts * self.topology.world_size
        placements = None
        if self.ctx.distributed and self.components == "planned":
            placements = [p for name in placed for p in self.component_placements.get(name, ())]
            placed_now = {p.component for p in placements}
            placements += [Placement(n, r) for n in placed if n not in placed_now for r in range(world)]
        elif self.ctx.distributed:
            placements = [Placement(n, r) for n in placed for r in range(world)]
        scale = getattr(self.pipeline, "vae_scale_factor", 8)
        latent = (height // scale if height else None, width // scale if width else None)
        with self.attachment.whole_models():
            return plan_pipeline(self.hook.split, self.attachment.cuts(), placed, self.topology, self.cfg_parts, None,
                                 latent, denoiser_batch(self.denoiser), replicated, split_encoders,
                                 placements=placements, experts=self.attachment.expert_cuts())

    def stage_info(self) -> dict[str, Any]:
        """What this rank holds and has computed: stage, units, parameter bytes, compute time.

        ``resident_parameter_bytes`` counts every denoiser this rank holds a stage of
        (Wan 2.2: both experts); ``expert_stage_units`` gives a second expert's own cuts.
        Compute time and calls are the first denoiser's first pass (lane).
        """
        executor = self.hook.executor
        local = self.ctx.rank % self.topology.world_size
        mine = self.topology.stage_of(local) if self.ctx.distributed else None
        held = {id(p): p for hook in self.hooks.values() for p in hook.resident_parameters()}  # shared once
        return {
            "rank": self.ctx.rank,
            "world_size": self.ctx.world_size,
            "stage": mine,
            "cfg_part": getattr(executor, "part", None),
            "stage_units": [s.names for s in self.stages],
            "expert_stage_units": {name: [s.names for s in stages] for name, stages in self.expert_stages.items()},
            "resident_parameter_bytes": sum(p.numel() * p.element_size() for p in held.values()),
            "compute_seconds": getattr(executor, "compute_seconds", None),
            "compute_calls": getattr(executor, "compute_calls", None),
        }
