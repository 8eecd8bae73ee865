"""What the layout chooser needs to know about a pipeline: its denoiser's costs per pass, and its passes per step.

:mod:`asyncgen.cost.layout` predicts layouts from a :class:`~asyncgen.cost.layout.DenoiserCosts`;
this module builds one for a pipeline, from its configs alone (:func:`costs_from_configs`: the
denoiser on ``meta``, counted on shapes, compute from a measured device rate, or timed on random
weights built from the config) or from a loaded pipeline and a call it really made
(:func:`costs_from_call`: timed on its own weights, at its own text length).
"""

from __future__ import annotations

import inspect

import torch

from asyncgen.models import DENOISER_COMPONENTS, EXPERT_COMPONENTS, is_guidance_distilled


def cfg_passes(pipeline_class: type, denoiser) -> tuple[int, int]:
    """``(passes per step, batch per pass)`` of a pipeline's denoiser calls with classifier-free guidance on.

    A guidance-distilled denoiser: one pass of one sample. A pipeline whose ``__call__`` names
    an unconditional pass with ``cache_context("uncond"...)`` (Wan, QwenImage): two passes of
    one sample each. Otherwise one pass of the doubled ``[uncond, cond]`` batch (SD, SDXL, SD3,
    PixArt). Read from the pipeline's source, not from a table of class names.
    """
    if is_guidance_distilled(denoiser):
        return 1, 1
    try:
        source = inspect.getsource(pipeline_class.__call__)
    except (OSError, TypeError):
        source = ""
    if 'cache_context("uncond"' in source or "cache_context('uncond'" in source:
        return 2, 1
    return 1, 2


def costs_from_configs(model: str, height: int | None = None, width: int | None = None, dtype=None,
                       compute: str = "flops", rate=None, repeats: int = 3, device: str = "cpu",
                       devices: int = 1):
    """:class:`~asyncgen.cost.layout.DenoiserCosts` of ``model``'s denoiser from its configs alone.

    ``compute="flops"``: each unit's counted FLOPs and bytes through ``rate`` (a measured
    :class:`~asyncgen.cost.device_rate.DeviceRate`). ``compute="time"``: the denoiser built from
    its config with random weights on ``device`` and each unit timed (the least of ``repeats``; on the
    CPU with one thread, as a CPU rank runs): as accurate as the clock, and only for models that
    fit in the device's memory. Either way the
    call is the one built from the config at ``height`` x ``width`` pixels (default: native), with
    the example's short text (8 tokens): a pipeline that attends jointly over a long prompt
    (SD3's 333 tokens) costs more than this counts. ``devices``: each Ulysses degree up to it is priced at its
    sharded shape too (:func:`with_sharded_units`), the same way (counted or timed).
    """
    import diffusers

    from .from_configs import _native_latent, describe_pipeline, empty_pipeline_modules

    if compute not in ("flops", "time"):
        raise ValueError(f"compute={compute!r}: need 'flops' or 'time'")
    if compute == "flops" and rate is None:
        raise ValueError("compute='flops' needs rate, a measured DeviceRate")
    facts = describe_pipeline(model, count_units=False)
    for name, value in (("height", height), ("width", width)):
        if value is not None and value % facts.size_multiple:
            raise ValueError(f"{name}={value}: {facts.denoiser_class} needs a multiple of {facts.size_multiple}, "
                             f"e.g. {facts.nearest_sizes(value)}")
    index, modules = empty_pipeline_modules(model)
    attribute = next(c for c in DENOISER_COMPONENTS if c in modules)
    denoiser = modules[attribute]
    if compute == "time":
        config = type(denoiser).load_config(model, subfolder=attribute)
        # random weights (times do not depend on values), where the work will run
        denoiser = type(denoiser).from_config(config).eval().to(device)
    if dtype is not None:
        torch.nn.Module.to(denoiser, dtype)
    vae_factor = facts.native_height // _native_latent(denoiser)
    latent = ((height or facts.native_height) // vae_factor, (width or facts.native_width) // vae_factor)
    pipeline_class = getattr(diffusers, index.get("_class_name", ""), None) or type(None)
    experts = [name for name in EXPERT_COMPONENTS if modules.get(name) is not None]
    return _costs_at(denoiser, pipeline_class, latent, compute, rate, repeats, device, devices, experts)


def _costs_at(denoiser, pipeline_class: type, latent: tuple[int, int], compute: str, rate, repeats: int = 3,
              device: str = "cpu", devices: int = 1, experts=()):
    """The costs of one pass of ``denoiser`` on the split's example call at ``latent`` (height, width) latent
    pixels with the pipeline class's CFG batch: counted (``compute="flops"``) or timed (``"time"``), with every
    Ulysses degree up to ``devices``; ``experts``: the pipeline's second denoisers (the hybrid takes none)."""
    from asyncgen.cost.layout import denoiser_costs
    from asyncgen.split.registry import split_denoiser

    passes, batch = cfg_passes(pipeline_class, denoiser)
    split = split_denoiser(denoiser)
    inputs = split.example_inputs(batch, *latent)
    unit_seconds = shared = half = None
    threads = torch.get_num_threads()
    if compute == "time" and torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        if compute == "time":
            unit_seconds = timed_units(split, inputs, repeats)
            half = half_batch_times(split, inputs, repeats)
        costs = denoiser_costs(split, inputs, passes, unit_seconds=unit_seconds, shared_seconds=shared, rate=rate,
                               context_parallel=context_parallel_refusal(denoiser, split, experts),
                               half_batch_unit_seconds=half)
        return with_sharded_units(costs, split, inputs, devices, compute, rate, repeats)
    finally:
        torch.set_num_threads(threads)


def second_denoisers(pipeline) -> list[str]:
    """The names of a loaded pipeline's second denoisers (Wan 2.2's ``transformer_2``, ...), which the hybrid takes
    none of."""
    return [name for name in EXPERT_COMPONENTS if getattr(pipeline, name, None) is not None]


def context_parallel_refusal(denoiser, split, experts=()) -> str | None:
    """None where asyncgen can run ``denoiser`` context-parallel (``context_parallel=``); else why not, in words:
    diffusers gives its class no plan (:func:`asyncgen.cost.layout.context_parallel_refusal`), the installed
    diffusers lacks what the hybrid reuses, the pipeline has a second denoiser, or the split is not a block chain."""
    from asyncgen._compat import context_parallel_refusal_for_hybrid
    from asyncgen.cost.layout import context_parallel_refusal as plan_refusal

    refusal = plan_refusal(denoiser) or context_parallel_refusal_for_hybrid()
    if refusal is None and experts:
        refusal = f"the pipeline has a second denoiser ({', '.join(experts)}); the hybrid runs one"
    if refusal is None and not hasattr(split, "trace"):
        refusal = f"{type(denoiser).__name__} is not split as a chain of transformer blocks here"
    return refusal


def with_sharded_units(costs, split, inputs: dict, devices: int, compute: str, rate=None, repeats: int = 3):
    """``costs`` with each unit priced at every Ulysses degree ``2..devices`` that divides the heads and the
    tokens: as one rank of that degree runs it (:mod:`asyncgen.cost.sharded`), counted through ``rate``
    (``compute="flops"``) or timed (``"time"``) as the whole units were; on half the batch too where a pass
    carries the [uncond, cond] batch (CFG parallel x Ulysses). Also says whether Ulysses can run inside stages."""
    import dataclasses

    from asyncgen.cost.layout import count_units
    from asyncgen.cost.sharded import sharded_unit_times
    from asyncgen.runtime.context_parallel import stages_refusal
    from asyncgen.schedules.cfg_parallel import batch_part

    if costs.context_parallel is not None or devices < 2:
        return costs

    def priced(call: dict, degree: int) -> tuple[float, ...]:
        if compute == "time":
            return tuple(sharded_unit_times(split, call, degree, repeats))
        counted = count_units(split, call, degree)
        return tuple(rate.seconds(fl, by) for fl, by in zip(counted["unit_flops"], counted["unit_bytes"]))

    half_call = batch_part(inputs, 1, 2, costs.pass_batch) if costs.pass_batch == 2 else None
    sharded, half, refusals = {}, {}, {}
    for degree in range(2, devices + 1):
        if not costs.attention_heads or costs.attention_heads % degree:
            refusals[degree] = f"the degree does not divide the attention heads ({costs.attention_heads})"
            continue
        try:
            sharded[degree] = priced(inputs, degree)
            if half_call is not None:
                half[degree] = priced(half_call, degree)
        except ValueError as exc:  # the tokens do not shard at this degree, or a call it does not price
            sharded.pop(degree, None)
            refusals[degree] = str(exc)
        except RuntimeError as exc:  # the forward itself fails on the plan's shares (a table the plan leaves whole)
            sharded.pop(degree, None)
            refusals[degree] = f"the forward fails on one rank's share of the plan's splits ({str(exc).splitlines()[0]})"
    return dataclasses.replace(costs, sharded_unit_seconds=sharded, half_batch_sharded_unit_seconds=half,
                               ulysses_refusals=refusals, stages_context_parallel=stages_refusal(split))


def costs_from_pipeline(pipeline, rate, height: int | None = None, width: int | None = None, devices: int = 1):
    """:class:`~asyncgen.cost.layout.DenoiserCosts` of a loaded pipeline's denoiser, counted on shapes exactly as
    :func:`costs_from_configs` counts them from the same pipeline's configs (``compute="flops"`` through ``rate``).

    The same example call at the same latent size (``height`` x ``width`` pixels, default the denoiser's native
    size) and the same CFG batch: so a loaded pipeline and its folder give the same costs, and the chooser the
    same layout, whether ``AsyncDiffPipeline(pipe, parallel="auto")`` or ``asyncgen generate --parallel auto``
    asks. The weights' values do not matter (shapes only); the denoiser's dtype is the loaded one. ``devices``: as
    :func:`costs_from_configs`' (each Ulysses degree up to it priced at its sharded shape).
    """
    denoiser = next((getattr(pipeline, c) for c in DENOISER_COMPONENTS if getattr(pipeline, c, None) is not None),
                    None)
    if denoiser is None:
        raise ValueError(f"{type(pipeline).__name__} has no denoiser ({', '.join(DENOISER_COMPONENTS)})")
    config = getattr(denoiser, "config", {})
    sample = config.get("sample_size") or 128
    sample_h, sample_w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    vae = getattr(pipeline, "vae", None)
    # as describe_pipeline reads the VAE's config: 2 ** (levels - 1), 8 where it names no levels
    levels = (getattr(vae, "config", {}) or {}).get("block_out_channels", [0] * 4) if vae is not None else [0] * 4
    vae_factor = 2 ** (len(levels) - 1)
    latent = ((height or sample_h * vae_factor) // vae_factor, (width or sample_w * vae_factor) // vae_factor)
    # counted on a copy built from the same config on ``meta``, as the configs' path counts: shapes need no weights,
    # and a loaded model's real buffers do not all survive the shape-only pass (Wan's rotary tables)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # as from_configs.empty_model builds it: buffers real
        empty = type(denoiser).from_config(denoiser.config)
    torch.nn.Module.to(empty, next(denoiser.parameters()).dtype)
    experts = second_denoisers(pipeline)
    return _costs_at(empty.eval(), type(pipeline), latent, "flops", rate, devices=devices, experts=experts)


def choose_run_layout(costs, measurement: dict, devices: int, steps: int, warmup: int | None = None,
                      context_parallel: bool = True):
    """The :class:`~asyncgen.cost.layout.Choice` of ``parallel="auto"``: the fastest predicted layout on exactly
    ``devices`` ranks, from ``measurement`` (``{"link": ..., "rate": ...}``: the CLI's probe cache entry, or
    :func:`asyncgen.comm.rank_probe.measure_ranks` in a group); Ulysses (alone or inside stages) only with
    ``context_parallel`` (not with a step cache, nor in a process sub-group). One function for the CLI and the
    wrapper, so both make the same choice from the same numbers."""
    from asyncgen.cost.layout import Link, choose

    return choose(costs, Link.from_measurement(measurement["link"]), devices, steps, warmup, use_all=True,
                  context_parallel=context_parallel)


def auto_layout_from_configs(model: str, measurement: dict, devices: int, steps: int, height: int | None = None,
                             width: int | None = None, warmup: int | None = None, dtype=None,
                             context_parallel: bool = True):
    """:func:`choose_run_layout` on ``model``'s costs counted from its configs alone (before anything is loaded)."""
    from asyncgen.cost.device_rate import DeviceRate

    costs = costs_from_configs(model, height, width, dtype, "flops", DeviceRate.from_dict(measurement["rate"]),
                               devices=devices if context_parallel else 1)
    return choose_run_layout(costs, measurement, devices, steps, warmup, context_parallel)


def auto_layout_of_pipeline(pipeline, measurement: dict, devices: int, steps: int, height: int | None = None,
                            width: int | None = None, warmup: int | None = None, context_parallel: bool = True):
    """:func:`choose_run_layout` on a loaded pipeline's costs (:func:`costs_from_pipeline`)."""
    from asyncgen.cost.device_rate import DeviceRate

    costs = costs_from_pipeline(pipeline, DeviceRate.from_dict(measurement["rate"]), height, width,
                                devices if context_parallel else 1)
    return choose_run_layout(costs, measurement, devices, steps, warmup, context_parallel)


def half_batch_times(split, inputs: dict, repeats: int = 3) -> list[float] | None:
    """Each unit timed on the second half of a doubled ``[uncond, cond]`` batch (what a CFG-parallel rank runs);
    None when the pass carries one sample."""
    from asyncgen.schedules.cfg_parallel import batch_part

    batch = int(split.sample_tensor(inputs[split.sample_argument]).shape[0])
    if batch != 2:
        return None
    return timed_units(split, batch_part(inputs, 1, 2, batch), repeats)


def timed_units(split, inputs: dict, repeats: int = 3) -> list[float]:
    """Seconds of each unit: the least of ``repeats`` timed passes (:func:`asyncgen.cost.estimate.least_unit_costs`).

    What ranks cost each other when they run together is the link probe's ``parallel_slowdown``,
    not a unit's. (The forward outside the units is scaled from these by counted work:
    :func:`asyncgen.cost.layout.denoiser_costs`.)
    """
    from asyncgen.cost.estimate import least_unit_costs

    return least_unit_costs(split, inputs, repeats)


def capture_denoiser_calls(pipe, call: dict) -> tuple[dict, int]:
    """Run ``pipe(**call)`` once; the first denoiser call's keyword arguments and the calls per step.

    The denoiser's arguments are what the layout's costs must be counted and timed on: the
    pipeline's own batch, sizes and text length. ``call`` needs ``num_inference_steps``.
    """
    denoiser = next(getattr(pipe, c) for c in DENOISER_COMPONENTS if getattr(pipe, c, None) is not None)
    calls: list[dict] = []

    def record(module, args, kwargs):
        if args:
            names = list(inspect.signature(module.forward).parameters)
            kwargs = {**dict(zip(names, args)), **kwargs}
        calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**call)
    finally:
        handle.remove()
    steps = int(call["num_inference_steps"])
    if not calls or len(calls) % steps:
        raise RuntimeError(f"{type(pipe).__name__} made {len(calls)} denoiser calls in {steps} steps; expected a "
                           "whole number per step")
    first = {k: v for k, v in calls[0].items() if k != "return_dict"}
    return first, len(calls) // steps


def costs_from_call(pipe, denoiser_call: dict, passes_per_step: int, repeats: int = 3, devices: int = 1):
    """:class:`~asyncgen.cost.layout.DenoiserCosts` of a loaded pipeline's denoiser, timed on a call it made (and
    at each Ulysses degree up to ``devices``, timed at its sharded shape on the same call)."""
    from asyncgen.cost.estimate import estimate_unit_costs
    from asyncgen.cost.layout import denoiser_costs
    from asyncgen.split.registry import split_denoiser

    denoiser = next(getattr(pipe, c) for c in DENOISER_COMPONENTS if getattr(pipe, c, None) is not None)
    split = split_denoiser(denoiser)
    cut_costs = estimate_unit_costs(split)  # the wrapper's cuts: chosen at attach time on the config's example
    if hasattr(split, "adopt_call"):
        split.adopt_call(denoiser_call, verify=False)
    inputs = split.example_inputs() if hasattr(split, "adopt_call") else dict(denoiser_call)
    unit_seconds = timed_units(split, inputs, repeats)
    experts = second_denoisers(pipe)
    costs = denoiser_costs(split, inputs, passes_per_step, unit_seconds=unit_seconds,
                           half_batch_unit_seconds=half_batch_times(split, inputs, repeats),
                           cut_costs=cut_costs, context_parallel=context_parallel_refusal(denoiser, split, experts))
    return with_sharded_units(costs, split, inputs, devices, "time", repeats=repeats)
