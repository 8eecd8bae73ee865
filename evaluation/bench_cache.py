"""Side by side: stock, a step cache alone, AsyncDiff alone and both composed, alternated in one launch.

    asyncgen bench --cache deepcache [--family unet|miniature] [--configs n2s1] ...
    asyncgen bench --cache fbcache|taylorseer|magcache --family sd3|wan | --model miniature-dit ...
    asyncgen bench --cache deepcache:interval=5,branch=1     # a cache's settings after a colon

``--cache NAME[:KEY=VALUE,...]`` names the cache: ``deepcache`` is asyncgen's DeepCache for
SD/SDXL UNets (:mod:`asyncgen.runtime.deep_cache`; default interval 3, branch 0);
``fbcache``, ``taylorseer`` and ``magcache`` are diffusers' ``FirstBlockCacheConfig``,
``TaylorSeerCacheConfig`` and ``MagCacheConfig`` (transformer denoisers) at diffusers'
defaults, except that TaylorSeer hooks every block's attention and feed-forward modules
(:data:`TAYLORSEER_MODULES`; diffusers' default patterns miss Wan's attentions entirely). MagCache needs magnitude ratios per model: rank 0 calibrates them on the stock
pipeline with the benchmark's own call (diffusers' ``calibrate=True``), untimed, and every
rank uses them. Settings after the colon are the config's own fields (``threshold=0.1``).

Four arms on the same model, prompts, seeds and step count, timed alternately in one launch
(:mod:`asyncgen.evaluation.peer_harness`; each worker one CPU thread, or one GPU): the stock
pipeline (rank 0), the cache alone (rank 0: one process), AsyncDiff alone (``--configs``,
one configuration, N = 2 by default) and both composed
(``AsyncDiffPipeline(pipe, stages=N, cache=config)``, DeepCache included). An arm that cannot
run is a row with the reason instead of numbers. Reported per arm: latency, speedup over stock, PSNR (median over prompts) and
SSIM (mean) against the stock output of the same prompt and seed, CLIP score, and on the
built-in miniature models the pixel checker's attribute accuracy (colour, background,
shape). For DeepCache also the deep path's share of the UNet's calls and the compute-bound
speedup the cost model predicts for the composed schedule from the unit times measured on
rank 0 (:func:`asyncgen.cost.cuts.composed_cuts`, a prediction, labelled as such). The
machine's load average is recorded: other tenants slow every arm, not every arm equally.
Written as ``results.json`` and ``results.md`` in ``--out``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import statistics
import time
from pathlib import Path

from diffusers.hooks import HookRegistry, ModelHook

from asyncgen._compat import hook_original_forward
from asyncgen.cli.launcher import WorkerFailed, launch
from asyncgen.runtime.deep_cache import timestep_value

from . import peer_harness
from .bench_asyncdiff import _ssim, available_cores, config_name, load_on_rank, world_size_of
from .reporting import json_text, markdown_table

CACHES = ("deepcache", "fbcache", "taylorseer", "magcache")
# TaylorSeer's modules: every block's attention and feed-forward modules. diffusers' default patterns
# ("^blocks.*attn", matched whole) hook no module of Wan (its attentions are attn1/attn2) and only the first
# attention of SD3's blocks: on Wan the default cache computes everything (measured: the stock video bit for bit)
TAYLORSEER_MODULES = (r"^(transformer_blocks|single_transformer_blocks|blocks)\.\d+\.(attn\d*|ff|ffn|ff_context)$",)
UNET_CACHES = ("deepcache",)


def _config_class(name: str):
    if name == "deepcache":
        from asyncgen.runtime.deep_cache import DeepCacheConfig

        return DeepCacheConfig
    import diffusers.hooks

    return getattr(diffusers.hooks, {"fbcache": "FirstBlockCacheConfig", "taylorseer": "TaylorSeerCacheConfig",
                                     "magcache": "MagCacheConfig"}[name])


def parse_cache(text: str) -> tuple[str, dict]:
    """``NAME[:KEY=VALUE,...]`` -> the cache's name and its settings (numbers parsed); one-line errors."""
    from asyncgen.cli.errors import UsageError

    name, _, rest = text.partition(":")
    if name not in CACHES:
        raise UsageError(f"--cache {text}: unknown cache {name!r}; accepted: {', '.join(CACHES)} "
                         "(optionally NAME:KEY=VALUE,...)")
    fields = {f.name for f in dataclasses.fields(_config_class(name))} - {"num_inference_steps", "mag_ratios",
                                                                          "calibrate"}
    settings = {}
    for item in (i.strip() for i in rest.split(",") if i.strip()):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise UsageError(f"--cache {text}: {item!r} is not KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        for kind in (int, float):
            try:
                settings[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            raise UsageError(f"--cache {text}: {key}={value}: give a number")
    return name, settings


def make_config(name: str, settings: dict, steps: int, mag_ratios=None):
    """The cache's config object (MagCache with its step count and ratios, or in calibration mode without ratios)."""
    from asyncgen.cli.errors import UsageError

    settings = dict(settings)
    if name == "taylorseer":
        settings.setdefault("cache_identifiers", list(TAYLORSEER_MODULES))
    if name == "magcache":
        settings.update(num_inference_steps=steps)
        settings.update(mag_ratios=list(mag_ratios)) if mag_ratios is not None else settings.update(calibrate=True)
    try:
        return _config_class(name)(**settings)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--cache {name}: {exc}") from exc


def check_request(args, configs: list[dict], denoiser_class: str) -> tuple[str, dict]:
    """The cache's name and settings once the request can run on this model (before any worker is spawned)."""
    from asyncgen.cli.errors import UsageError

    name, settings = parse_cache(args.cache)
    if len(configs) != 1:
        raise UsageError(f"--configs {args.configs} --warmups {args.warmups}: with --cache give one configuration and "
                         "one warm-up (the AsyncDiff arm)")
    unet = "UNet" in denoiser_class
    if unet != (name in UNET_CACHES):
        accepted = UNET_CACHES if unet else tuple(c for c in CACHES if c not in UNET_CACHES)
        raise UsageError(f"--cache {name}: not for a {denoiser_class}; for this model: {', '.join(accepted)}")
    if name == "fbcache" and denoiser_class == "SD3Transformer2DModel":
        raise UsageError(f"--cache fbcache: diffusers' First Block Cache fails on {denoiser_class} (its last joint "
                         "block returns no text stream, which the cache's residual subtracts from: 'unsupported "
                         "operand type(s) for -: NoneType and Tensor' in diffusers 0.42); for this model: taylorseer, "
                         "magcache")
    make_config(name, settings, args.steps, mag_ratios=[1.0] if name == "magcache" else None)  # bad settings now
    world = world_size_of(configs[0])
    if args.device == "cpu" and world > available_cores() and not args.oversubscribe:
        raise UsageError(f"--cache {args.cache}: {config_name(configs[0])} needs {world} processes, more than the "
                         f"{available_cores()} cores here; pass --oversubscribe to run anyway (quality is valid, "
                         "latency not)")
    return name, settings


def composed_refusal(wrap: dict, config) -> str | None:
    """Why ``AsyncDiffPipeline(..., cache=config)`` cannot run this cache (checked in the launcher), or None."""
    import inspect

    from asyncgen.pipelines import AsyncDiffPipeline

    if "cache" not in inspect.signature(AsyncDiffPipeline.__init__).parameters:
        return "this asyncgen's AsyncDiffPipeline takes no cache="
    from asyncgen.pipelines.attach import AsyncDiffConfig

    options = {k: v for k, v in wrap.items() if k in {f.name for f in dataclasses.fields(AsyncDiffConfig)}}
    try:
        AsyncDiffConfig(**options, cache=config)
    except (TypeError, ValueError) as exc:
        return str(exc).splitlines()[0]
    return None


def denoiser_of(pipe):
    from .bench_peer_diffusers_cp import denoiser

    return denoiser(pipe)


def apply_cache(pipe, config) -> None:
    """The cache on the pipeline's own denoiser, as a user enables it."""
    from asyncgen.runtime.deep_cache import DeepCacheConfig, apply_deep_cache

    if isinstance(config, DeepCacheConfig):
        apply_deep_cache(pipe.unet, config)
        return
    from asyncgen.runtime.step_cache import enable_step_cache

    denoiser = denoiser_of(pipe)
    enable_step_cache(denoiser, config)
    if hasattr(denoiser, "enable_cache"):
        return
    # a transformer without diffusers' CacheMixin (SD3Transformer2DModel in 0.42): what the mixin's pipelines would
    # do around the cache's hooks (a cache context per call, a reset per image)
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.register_hook(_CacheContext(), CONTEXT_HOOK)
    # diffusers 0.42 caches each registry's child registries: refreshed, the cache context reaches the block hooks
    # registered just now; 0.40 keeps no such cache (and has no such method) and finds them on every call
    refresh = getattr(registry, "invalidate_child_registries_cache", None)
    if refresh is not None:
        refresh()


CONTEXT_HOOK = "asyncgen_bench_cache_context"


class _CacheContext(ModelHook):
    """Benchmark-local, for a denoiser without diffusers' ``CacheMixin`` (SD3's transformer in diffusers 0.42).

    diffusers' step caches keep their state per cache context, which a ``CacheMixin`` model's
    pipeline sets around each denoiser call (``with transformer.cache_context("cond")``) and
    resets at the end of each call (``maybe_free_model_hooks``). SD3's pipeline does neither,
    so its cache hooks raise "No cache context is set". This outermost hook does both: every
    call runs in the context ``"cond"`` (SD3 batches its CFG halves into one call), and a
    timestep above the previous one (timesteps fall within an image) resets the cache's
    state first. It uses the mixin's own ``cache_context`` on the model.
    """

    def __init__(self):
        super().__init__()
        self.last = None

    def new_forward(self, module, *args, **kwargs):
        from diffusers.models.cache_utils import CacheMixin

        t = timestep_value(kwargs.get("timestep", args[1] if len(args) > 1 else None))
        if t is not None and self.last is not None and t > self.last:
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
        self.last = t
        with CacheMixin.cache_context(module, "cond"):
            return hook_original_forward(self)(*args, **kwargs)


class _Ratios(logging.Handler):
    """Catches the ratios diffusers' MagCache logs at the end of a calibration call (one list per pass)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.found: list[list[float]] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("MagCache Calibration Results:"):
            import ast

            self.found.append([float(x) for x in ast.literal_eval(message.split(":", 1)[1].strip())])


def calibrate_mag_ratios(pipe, prompt: str, call: dict, seed: int, settings: dict) -> list[float]:
    """MagCache's magnitude ratios for this pipeline and call: one calibration call (nothing skipped), its log read.

    With CFG in two passes (Wan) each pass logs its ratios; their mean is used. The cache
    stays on ``pipe``: pass a copy that serves nothing else.
    """
    import torch

    config = make_config("magcache", settings, call["num_inference_steps"])
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level = _Ratios(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    apply_cache(pipe, config)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # diffusers also prints them
            pipe(prompt, **call, generator=torch.Generator().manual_seed(seed))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if not handler.found:
        raise RuntimeError("MagCache calibration logged no ratios (diffusers' MagCache log format changed?)")
    return [statistics.fmean(values) for values in zip(*handler.found)]


def _deep_cache_projection(pipe, config, wrap: dict, call: dict, prompt: str, seed: int) -> dict:
    """The composed schedule's compute-bound speedup over stock that the cost model predicts (rank 0, untimed arms).

    The UNet's units are timed here on the benchmark's own first UNet call; the cuts are
    chosen by :func:`~asyncgen.cost.cuts.composed_cuts` for DeepCache's per-step unit flags
    and compared with the bottleneck cuts; exact warm-up steps count as whole UNet passes.
    Text encoding and decoding are left out (they stay serial in every arm).
    """
    import torch

    from asyncgen.cost.cuts import balanced_cuts, composed_cuts, composed_schedule_time
    from asyncgen.cost.estimate import measure_unit_costs
    from asyncgen.runtime.asyncdiff_hook import default_warmup
    from asyncgen.runtime.deep_cache import deep_cache_runs, deep_unit_mask
    from asyncgen.split.registry import split_denoiser

    unet = pipe.unet
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(prompt, **dict(call, num_inference_steps=1), generator=torch.Generator().manual_seed(seed))
    finally:
        handle.remove()
    args, kwargs = seen["call"]
    inputs = dict(kwargs)
    inputs.update(zip(("sample", "timestep", "encoder_hidden_states"), args))
    inputs.pop("return_dict", None)
    split = split_denoiser(unet, verify_split=False)
    costs = measure_unit_costs(split, inputs)
    steps, stages = call["num_inference_steps"], wrap["stages"]
    warmup = wrap.get("warmup")
    warmup = default_warmup(steps) if warmup is None else warmup
    warmup = min(warmup, steps) if stages > 1 else 0
    mask = deep_unit_mask([u.name for u in split.units], len(unet.down_blocks), config.branch)
    runs_all = deep_cache_runs(mask, steps, config.interval)
    exact, runs = runs_all[:warmup], runs_all[warmup:]
    serial = sum(sum(c for c, r in zip(costs, row) if r) for row in exact)
    cuts = composed_cuts(costs, runs, stages) if runs else [0, len(costs)]
    bottleneck = balanced_cuts(costs, stages)
    stock = steps * sum(costs)
    return dict(unit_seconds=costs, deep_units=mask, deep_share=sum(c for c, d in zip(costs, mask) if d) / sum(costs),
                composed_cuts=cuts, bottleneck_cuts=bottleneck,
                predicted_speedup=stock / (serial + composed_schedule_time(costs, runs, cuts)) if runs else None,
                predicted_speedup_bottleneck_cuts=stock / (serial + composed_schedule_time(costs, runs, bottleneck))
                if runs else None,
                cache_alone_predicted=stock / sum(sum(c for c, r in zip(costs, row) if r) for row in runs_all))


def _worker(rank: int, world_size: int, model: str, name: str, settings: dict, wrap: dict, call: dict,
            prompts: list[str], repeats: int, device: str, dtype: str, allow_pickle: bool, composed: bool):
    import torch.distributed as dist

    from asyncgen.comm.group import default_backend
    from asyncgen.pipelines import AsyncDiffPipeline
    from asyncgen.runtime.deep_cache import deep_cache_hook

    if not dist.is_initialized():
        dist.init_process_group(backend=default_backend())
    call = dict(call)
    seed = call.pop("seed")
    load = dict(device=device, dtype=dtype, allow_pickle=allow_pickle)
    stock = load_on_rank(model, rank, **load) if rank == 0 else None
    ratios = [None]
    if name == "magcache":
        if rank == 0:
            # on a copy of its own: the calibration's hooks stay on it
            ratios[0] = calibrate_mag_ratios(load_on_rank(model, rank, **load), prompts[0], call, seed, settings)
        dist.broadcast_object_list(ratios, src=0)
    config = make_config(name, settings, call["num_inference_steps"], mag_ratios=ratios[0])
    cached = None
    projection = None
    if rank == 0:
        cached = load_on_rank(model, rank, **load)
        if name == "deepcache" and wrap.get("stride", 1) == 1 and not wrap.get("cfg_parallel"):
            # the cost model's composed schedule is stride 1's (every stage serves every step), one batch
            projection = _deep_cache_projection(cached, config, wrap, call, prompts[0], seed)
        apply_cache(cached, config)
    ours_world = world_size_of(wrap)
    group = None if ours_world == world_size else dist.new_group(list(range(ours_world)))
    arms = {"cache": cached, "asyncdiff": None}
    if rank < ours_world:
        arms["asyncdiff"] = AsyncDiffPipeline(load_on_rank(model, rank, **load), **wrap, process_group=group)
    if composed:
        arms["composed"] = None
        if rank < ours_world:
            arms["composed"] = AsyncDiffPipeline(load_on_rank(model, rank, **load), **wrap, cache=config,
                                                 process_group=group)
    for arm in arms.values():
        if arm is not None:
            getattr(arm, "pipeline", arm).set_progress_bar_config(disable=True)
    seconds, images = peer_harness.alternate(arms, stock, prompts, call, seed, repeats)
    deep_calls = None
    if cached is not None and name == "deepcache":
        # the counts of the last call (the hook resets when the next call starts): the deep path's share of it
        state = deep_cache_hook(cached.unet).state
        deep_calls = dict(full=state.full_calls, cached=state.cached_calls)
        staged = getattr(getattr(getattr(arms.get("composed"), "hook", None), "executor", None), "cache", None)
        if staged is not None:
            # this rank's (stage 0's) tasks of the last call: one per step without stride, each its own decision
            deep_calls.update(composed_full=staged.state.full_calls, composed_cached=staged.state.cached_calls)
    return dict(seconds=seconds, images=images if rank == 0 else None, projection=projection, deep_calls=deep_calls,
                mag_ratios=ratios[0] if rank == 0 else None,
                resident_bytes={"stock": peer_harness.parameter_bytes(denoiser_of(stock)) if stock else None,
                                "cache": peer_harness.parameter_bytes(denoiser_of(cached)) if cached else None,
                                **{arm: peer_harness.parameter_bytes(arms[arm].denoiser) if arms[arm] else None
                                   for arm in ("asyncdiff", "composed") if arm in arms}})


def run_comparison(model: str, name: str, settings: dict, wrap: dict, call: dict, prompts: list[str], repeats: int,
                   device: str = "cpu", dtype: str = "float32", allow_pickle: bool = False, pin_cpus: bool = True,
                   timeout: float = 3600, miniature: bool = False, clip: str = "none") -> dict:
    """Rows for stock, the cache alone, AsyncDiff alone and both composed; with DeepCache its projection."""
    from asyncgen.cli.errors import UsageError

    steps = call["num_inference_steps"]
    config = make_config(name, settings, steps, mag_ratios=[1.0] if name == "magcache" else None)
    refusal = composed_refusal(wrap, config)
    world = max(2, world_size_of(wrap))
    try:
        per_rank = launch(_worker, world, model, name, settings, wrap, call, prompts, repeats, device, dtype,
                          allow_pickle, refusal is None, timeout=timeout, pin_cpus=pin_cpus)
    except WorkerFailed as failure:
        if (failure.exc_type or "").endswith("UsageError"):
            raise UsageError(failure.message) from None
        raise
    label = f"{name}" + (f" ({', '.join(f'{k}={v}' for k, v in settings.items())})" if settings else "")
    arms = {"cache": dict(config=f"{label} alone", ranks=1),
            "asyncdiff": dict(config=config_name(wrap), ranks=world_size_of(wrap))}
    if refusal is None:
        arms["composed"] = dict(config=f"{config_name(wrap)} + {label}", ranks=world_size_of(wrap))
    rows = peer_harness.rows(per_rank, arms, repeats)
    images = per_rank[0]["images"]
    names = ["stock", *arms]
    for row, arm in zip(rows, names):
        row["ssim"] = statistics.fmean(_ssim(a, b) for a, b in zip(images[arm], images["stock"]))
    if refusal is not None:
        rows.append(dict(config=f"{config_name(wrap)} + {label}", ranks=world_size_of(wrap),
                         not_run=refusal))
    if miniature:
        from . import pixel_checker

        for row, arm in zip(rows, names):
            row["accuracy"] = pixel_checker.accuracy(list(images[arm]), prompts)
    if clip != "none":
        from .evaluate_folder import clip_scorer

        scorer = clip_scorer(clip, device)
        for row, arm in zip(rows, names):
            row["clip_score"] = scorer.score(images[arm], prompts)
    return dict(rows=rows, projection=per_rank[0]["projection"], deep_calls=per_rank[0]["deep_calls"],
                mag_ratios=per_rank[0]["mag_ratios"], config=repr(config) if name != "magcache" else
                repr(make_config(name, settings, steps, mag_ratios=per_rank[0]["mag_ratios"])))


TABLE_COLUMNS = ["config", "ranks", "latency_s", "speedup", "psnr_db", "ssim", "clip_score", "colour", "background",
                 "shape", "note"]
TABLE_FORMATS = {"latency_s": ".3f", "speedup": ".2f", "psnr_db": ".2f", "ssim": ".4f", "clip_score": ".2f",
                 "colour": ".3f", "background": ".3f", "shape": ".3f"}
TABLE_NOTES = """latency_s: seconds per image (or video), median over repeats (a repeat of a multi-rank run ends when its
slowest rank returns); speedup: median over repeats of stock latency / latency, the arms timed alternately in one
launch, one CPU thread (or one GPU) per rank; psnr_db (median over prompts; inf: identical) and ssim (mean): against
the stock output of the same prompt and seed; clip_score: mean over the prompts (unless --clip none); colour,
background, shape: the pixel checker's attribute accuracy (built-in miniature models only); note: why an arm did
not run."""


def table(rows: list[dict]) -> str:
    flat = []
    for row in rows:
        accuracy = row.get("accuracy") or {}
        flat.append(dict(row, colour=accuracy.get("colour", "-"), background=accuracy.get("background", "-"),
                         shape=accuracy.get("shape", "-"), note=row.get("not_run", ""),
                         **{k: row.get(k, "-") for k in ("latency_s", "speedup", "psnr_db", "ssim", "clip_score")
                            if k not in row}))
    return markdown_table(flat, TABLE_COLUMNS, TABLE_FORMATS)


def projection_lines(result: dict) -> str:
    projection, calls = result["projection"], result["deep_calls"]
    if projection is None:
        return ""
    lines = []
    if calls is not None:
        total = calls["full"] + calls["cached"]
        lines.append(f"DeepCache alone: the deep path ran on {calls['full']} of {total} UNet calls of the last image"
                     + (f"; composed with stages, on {calls['composed_full']} of "
                        f"{calls['composed_full'] + calls['composed_cached']} steps (each stage its own deep units)"
                        if "composed_full" in calls else "") + ".")
    lines.append(
        f"DeepCache composed with stages, predicted by the cost model from unit times measured on rank 0 (a "
        f"prediction, not a measurement; communication and the call's serial work left out): deep units "
        f"{100 * projection['deep_share']:.1f}% of a UNet pass; cuts for the composed schedule "
        f"{projection['composed_cuts']} -> {projection['predicted_speedup']:.2f}x the stock denoising "
        f"(bottleneck cuts {projection['bottleneck_cuts']} -> {projection['predicted_speedup_bottleneck_cuts']:.2f}x; "
        f"DeepCache alone {projection['cache_alone_predicted']:.2f}x)."
        if projection["predicted_speedup"] is not None else "no asynchronous steps to predict")
    return "\n".join(lines)


def run_cache(args, model: str, wrap: dict, prompts: list[str], call: dict, name_of_model: str, cache: tuple,
              miniature: bool) -> int:
    """``asyncgen bench --cache ...`` once ``bench_asyncdiff.run`` has settled the model, configuration and call."""
    from asyncgen.cli.files import write_all

    out = Path(args.out)
    outputs = [out / "results.json", out / "results.md"]
    name, settings = cache
    load_before = peer_harness.load_average()
    start = time.perf_counter()
    result = run_comparison(model, name, settings, wrap, call, prompts, args.repeats, args.device, args.dtype,
                            args.allow_pickle, pin_cpus=args.pin, miniature=miniature, clip=args.clip)
    main = table(result["rows"])
    record = dict(benchmark="cache", cache=name, cache_settings=settings, cache_config=result["config"],
                  model=name_of_model, call=call, prompts=prompts, wrap=wrap, device=args.device, dtype=args.dtype,
                  repeats=args.repeats, cores=available_cores(),
                  load_average={"start": load_before, "end": peer_harness.load_average()},
                  rows=result["rows"], deep_cache_calls=result["deep_calls"], projection=result["projection"],
                  mag_ratios=result["mag_ratios"], wall_seconds=time.perf_counter() - start)
    load = "unknown" if record["load_average"]["end"] is None else \
        ", ".join(f"{x:.1f}" for x in record["load_average"]["end"])
    footer = (f"{call['num_inference_steps']} steps, {len(prompts)} prompt(s), {args.repeats} repeats, {args.device}; "
              f"{record['cores']} cores, load average {load} (1/5/15 min) at the end.")
    extra = projection_lines(result)
    text = (f"# {name_of_model}: stock, {name}, AsyncDiff and both, side by side\n\n{main}\n\n{TABLE_NOTES}\n\n"
            + (f"{extra}\n\n" if extra else "") + f"{footer}\n")
    write_all({outputs[0]: json_text(record), outputs[1]: text})  # both whole, or neither
    print(main)
    print(TABLE_NOTES)
    if extra:
        print(extra)
    print(f"{footer}\nresults written to {outputs[0]} and {outputs[1]}")
    return 0
