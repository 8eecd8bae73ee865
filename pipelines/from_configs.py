"""A pipeline seen through its configs alone, no weight read: its facts, its models on ``meta``, its memory plan.

What the launching process checks a request against before any worker starts
(:func:`describe_pipeline`), what stage-only loading and the planner build their models
from (:func:`empty_model`, :func:`empty_pipeline_modules`), and the plan ``asyncgen plan``
prints (:func:`plan_from_configs`). Loading real weights is :mod:`.loading`'s job.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asyncgen.models import (DENOISER_COMPONENTS, EXPERT_COMPONENTS, PLACEABLE_COMPONENTS, check_cfg_parallel,
                             denoiser_batch, size_multiple)

from .loading import built_from_config, check_pipeline_location

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PipelineFacts:
    """What a pipeline folder's configs say, read without loading any weights."""

    pipeline_class: str
    denoiser_class: str
    splittable_units: int | None  # None: asyncgen cannot split this denoiser class
    native_height: int
    native_width: int
    size_multiple: int  # heights and widths must be multiples of this

    def nearest_sizes(self, value: int) -> str:
        low = max(self.size_multiple, value - value % self.size_multiple)
        high = low + self.size_multiple if low < value else low
        return f"{low}" if low == high else f"{low} or {high}"


def describe_pipeline(model: str, count_units: bool = True) -> PipelineFacts:
    """Read ``model``'s configs (local folder or cached hub id) and split its denoiser on the meta device.

    The launching process checks the request against these facts before it starts any
    worker, so a bad ``--stages`` or size fails in a second instead of after N loads.
    ``count_units=False`` skips the split (``splittable_units`` is then None): a caller
    that splits the denoiser itself need not pay for it twice (a traced DiT takes seconds).
    """
    import diffusers
    import torch
    from diffusers import DiffusionPipeline

    check_pipeline_location(str(model), weights=False)  # configs only: no weight is read here
    index = DiffusionPipeline.load_config(model)
    component = next((c for c in DENOISER_COMPONENTS if isinstance(index.get(c), list) and index[c][1]), None)
    if component is None:
        raise ValueError(f"{model}: the pipeline has no unet or transformer component; asyncgen splits the denoiser "
                         f"of text-to-image pipelines (components: {', '.join(k for k in index if not k.startswith('_'))})")
    class_name = index[component][1]
    model_class = getattr(diffusers, class_name, None)
    if model_class is None:
        raise ValueError(f"{model}: unknown denoiser class {class_name}; this diffusers ({diffusers.__version__}) "
                         "has no such model class")
    config = model_class.load_config(model, subfolder=component)
    with torch.device("meta"):  # structure only: no memory, no weights read
        denoiser = built_from_config(lambda: model_class.from_config(config), model, component, class_name)
    from asyncgen.split.registry import split_denoiser
    from asyncgen.split.transformer.trace import NeedsRealWeights

    units = None
    if count_units:
        try:
            units = len(split_denoiser(denoiser).units)
        except NeedsRealWeights:
            # no example from the config (HiDream): the pipeline's own first call, recorded on shapes, may give one.
            # Tried second here, not first: where the config's example traces, the blocks (and so the count) are
            # the same on either call, and the pipeline path costs assembling every component on meta
            with contextlib.suppress(TypeError):
                _, modules = empty_pipeline_modules(model)
                units = len(split_from_configs(model, modules, component).units)
        except TypeError:
            pass
    vae_factor, latent_channels = 8, None
    if isinstance(index.get("vae"), list) and index["vae"][1]:
        vae_config = getattr(diffusers, index["vae"][1]).load_config(model, subfolder="vae")
        vae_factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
        latent_channels = vae_config.get("latent_channels")
    patch = config.get("patch_size") or 1
    patch = int(patch[-1] if isinstance(patch, (list, tuple)) else patch)  # video transformers: (t, h, w)
    in_channels = int(config.get("in_channels") or 0)
    if component == "transformer" and latent_channels and in_channels > latent_channels \
            and in_channels % latent_channels == 0:
        patch *= math.isqrt(in_channels // latent_channels)  # latents packed into patches by the pipeline (Flux)
    multiple = size_multiple(vae_factor, patch)
    sample = config.get("sample_size") or 128
    sample_h, sample_w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return PipelineFacts(pipeline_class=index.get("_class_name", "DiffusionPipeline"), denoiser_class=class_name,
                         splittable_units=units, native_height=sample_h * vae_factor,
                         native_width=sample_w * vae_factor, size_multiple=multiple)


@contextlib.contextmanager
def _default_dtype(dtype):
    # what from_pretrained does: the model is created in the dtype it loads in (buffers computed at init too)
    if dtype is None:
        yield
        return
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def empty_model(model: str | os.PathLike, subfolder: str, model_class: type, dtype=None) -> "torch.nn.Module":
    """``model_class`` (a diffusers or transformers model) built from its config in ``model``'s ``subfolder``
    (a local folder or a cached hub id), its parameters on ``meta``: no memory, no weights read.

    One implementation for both weightless builds of a component (:func:`empty_pipeline_modules` for plans,
    :func:`~asyncgen.pipelines.lean_loading.empty_component` for loading only some of its tensors), built as
    ``from_pretrained(..., dtype=dtype)`` would build it: created in ``dtype`` (None: torch's default), buffers
    computed at construction real (CLIP's ``position_ids``, rotary tables: in no checkpoint), a transformers
    model's tied weights tied (T5's ``shared``/``encoder.embed_tokens``: one tensor), a diffusers model's
    ``name_or_path`` recorded, in eval mode.
    """
    from accelerate import init_empty_weights
    from diffusers import ModelMixin

    from asyncgen._compat import record_name_or_path, transformers_model_from_config

    where = str(model)
    with init_empty_weights(include_buffers=False), _default_dtype(dtype):
        if issubclass(model_class, ModelMixin):
            built = model_class.from_config(model_class.load_config(where, subfolder=subfolder))
            # what ModelMixin.from_pretrained records when a pipeline loads the component
            record_name_or_path(built, os.path.join(where, subfolder))
        else:
            config = model_class.config_class.from_pretrained(where, subfolder=subfolder)
            # the saved config names a dtype (float32) that transformers would build in, not the one asked for
            built = transformers_model_from_config(model_class, config, dtype)
    if not issubclass(model_class, ModelMixin):
        # as from_pretrained ties them: one tensor, read once; outside init_empty_weights, whose
        # register_parameter would make the tied parameter a new one again
        built.tie_weights()
    return built.eval()


def empty_pipeline_modules(model: str, skip: frozenset[str] = frozenset()) -> tuple[dict, dict[str, "torch.nn.Module"]]:
    """Every model component of ``model`` built from its config on the meta device (no weights read).

    Returns the pipeline's ``model_index.json`` and ``{attribute: module}`` for each
    component that is a ``torch.nn.Module`` (denoiser, text encoders, VAE, ...), each built by
    :func:`empty_model`; tokenizers, schedulers and components saved as ``null`` are left out.
    Only config files are read, so a hub id needs no weight download. Components named in ``skip`` are left out.
    """
    import importlib

    import torch
    from diffusers import DiffusionPipeline

    check_pipeline_location(str(model), weights=False)  # configs only: no weight is read here
    index = DiffusionPipeline.load_config(model)
    modules: dict[str, torch.nn.Module] = {}
    for name, value in index.items():
        if name.startswith("_") or name in skip or not (isinstance(value, list) and len(value) == 2 and all(value)):
            continue
        library, class_name = value
        try:
            model_class = getattr(importlib.import_module(library), class_name)
        except (ImportError, AttributeError):
            raise ValueError(f"{model}: component {name} is a {library}.{class_name}, which this environment "
                             "does not have") from None
        if not (isinstance(model_class, type) and issubclass(model_class, torch.nn.Module)):
            continue  # tokenizer, scheduler, feature extractor
        modules[name] = built_from_config(lambda: empty_model(model, name, model_class), model, name, class_name)
    return index, modules


def pipeline_from_configs(model: str, modules: dict[str, "torch.nn.Module"] | None = None):
    """The stock pipeline of ``model`` with every model component on ``meta`` (:func:`empty_pipeline_modules`, or
    ``modules`` when given) and its small parts (tokenizers, schedulers, image processors) read from their files:
    what the pipeline's own preparation needs to run on shapes (no weight is read)."""
    from diffusers import DiffusionPipeline

    # the model components ``modules`` lacks are built on meta too: from_pretrained would read their weights
    index, built = empty_pipeline_modules(model, skip=frozenset(modules or ()))
    built.update(modules or {})
    absent = {name: None for name, value in index.items()
              if not name.startswith("_") and isinstance(value, list) and not all(value)}  # saved as null
    return DiffusionPipeline.from_pretrained(str(model), **built, **absent)


def split_from_configs(model: str, modules: dict[str, "torch.nn.Module"], attribute: str,
                       height: int | None = None, width: int | None = None):
    """The split of ``modules[attribute]`` (on ``meta``) with its example call taken from the stock pipeline.

    ``modules``: every model component of ``model`` built on ``meta`` (:func:`empty_pipeline_modules`). The call
    the pipeline makes first at ``height`` x ``width`` pixels (its default size when None) is recorded on shapes
    alone (:func:`~asyncgen.split.transformer.pipeline_example.record_denoiser_call`), so the text length, the
    latent layout and the argument types the trace and the cuts see are the pipeline's own. Where the pipeline
    cannot be assembled, its preparation cannot run on shapes, or the split refuses its call (a model too small
    for its pipeline's default size), the call built from the config is the fallback; a refusal then names the
    paths tried and why each failed, in one line. UNets are split by class and need no example.
    """
    from asyncgen.split.registry import needs_example_call, split_denoiser
    from asyncgen.split.transformer.pipeline_example import (PipelineExampleUnavailable, pipeline_call_arguments,
                                                             record_denoiser_call)
    from asyncgen.split.transformer.trace import SplitRefused

    denoiser = modules[attribute]
    if not needs_example_call(denoiser):
        return split_denoiser(denoiser)
    try:
        pipeline = pipeline_from_configs(model, modules)
        call = record_denoiser_call(pipeline, attribute, pipeline_call_arguments(pipeline, height, width))
        return split_denoiser(denoiser, call=call)
    except PipelineExampleUnavailable as exc:
        pipeline_reason = str(exc)
    except SplitRefused as exc:
        pipeline_reason = f"{type(pipeline).__name__}'s own first call (pipeline path) was refused: {exc}"
    except Exception as exc:  # noqa: BLE001 - a pipeline that cannot be assembled from its folder: the fallback's cue
        pipeline_reason = (f"the stock pipeline could not be assembled from {model}'s configs (pipeline path: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
    try:
        return split_denoiser(denoiser)  # the fallback: the call built from the config
    except SplitRefused as exc:
        raise type(exc)(f"{pipeline_reason}; then {exc}") from exc


def plan_from_configs(model: str, stages: int, stride: int = 1, cfg_parallel: bool = False, dtype=None,
                      height: int | None = None, width: int | None = None, split_encoders: bool = True,
                      estimate_activations: bool = True):
    """The :class:`~asyncgen.placement.planner.MemoryPlan` of ``model`` from its configs alone (meta device).

    The denoiser's cuts are the ones :class:`AsyncDiffPipeline` chooses with
    ``split="flops"``: the FLOP estimate of its units in ``dtype``. ``height``/``width``
    (pixels, default the model's native size) set the activation estimate
    (``estimate_activations=False``: activations count as 0, and the plan is faster).
    """
    import torch

    from asyncgen.placement.pipeline_plan import plan_pipeline
    from asyncgen.schedules.asyncdiff import Topology
    from asyncgen.cost.cuts import choose_cuts

    topology = Topology(stages, stride)
    facts = describe_pipeline(model, count_units=False)  # the split below counts them
    for name, value in (("height", height), ("width", width)):
        if value is not None and value % facts.size_multiple:
            raise ValueError(f"{name}={value}: {facts.denoiser_class} needs a multiple of {facts.size_multiple}, "
                             f"e.g. {facts.nearest_sizes(value)}")
    _, modules = empty_pipeline_modules(model)
    all_modules = dict(modules)  # the stock pipeline, assembled on meta, gives each denoiser's example call
    attribute = next(c for c in DENOISER_COMPONENTS if c in modules)
    denoiser = modules.pop(attribute)
    if cfg_parallel:  # the wrapper refuses this too: the plan must not describe a layout that cannot run
        check_cfg_parallel(denoiser, "its pipeline", remedy="plan without --cfg-parallel")
    if dtype is not None:
        torch.nn.Module.to(denoiser, dtype)  # the cut estimate counts bytes in the dtype the weights will have

    def split_and_cut(name):
        # the call the pipeline makes at the size planned for (its own text length and layout), the config's as
        # the fallback: what stage-only loading splits on too
        split = split_from_configs(model, all_modules, name, height or facts.native_height,
                                   width or facts.native_width)
        # flops on meta weights cost as on the loaded model's: the cuts stage-only loading will choose
        return split, choose_cuts(split, stages, "flops")

    split, cuts = split_and_cut(attribute)
    # Wan 2.2's second expert: staged like the first (cuts of its own), each rank holds its stage of it
    experts = []
    for name in [n for n in EXPERT_COMPONENTS if n in modules]:
        expert = modules.pop(name)
        if dtype is not None:
            torch.nn.Module.to(expert, dtype)
        experts.append((name, *split_and_cut(name)))
    vae_factor = facts.native_height // _native_latent(denoiser)
    latent = ((height or facts.native_height) // vae_factor, (width or facts.native_width) // vae_factor)
    batch = denoiser_batch(denoiser)
    placed = {n: m for n, m in modules.items() if n in PLACEABLE_COMPONENTS}
    replicated = {n: m for n, m in modules.items() if n not in PLACEABLE_COMPONENTS}
    plan = plan_pipeline(split, cuts, placed, topology, 2 if cfg_parallel else 1, dtype, latent, batch,
                         replicated, split_encoders, estimate_activations, experts=experts)
    plan.notes.update(model=str(model), height=latent[0] * vae_factor, width=latent[1] * vae_factor,
                      denoiser=facts.denoiser_class, cuts=list(cuts),
                      **{f"{name}_cuts": list(expert_cuts) for name, _, expert_cuts in experts})
    return plan


def _native_latent(denoiser) -> int:
    sample = denoiser.config.get("sample_size") or 128  # as describe_pipeline reads it
    return sample if isinstance(sample, int) else sample[0]
