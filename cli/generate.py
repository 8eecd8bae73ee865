"""``asyncgen generate``: prompts in, image files out, on one device or several.

Every rank loads the pipeline and runs the same call; rank 0 shows the progress bar,
writes the images (each whole or not at all) and prints the summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .launcher import check_worker_count, launched_by_torchrun, run_on_devices
from .options import (DTYPES, SEED_LIMIT, add_asyncdiff_arguments, add_model_arguments, add_sampling_arguments,
                      check_frames, check_image_side, check_steps, finite_float, fraction, non_negative_int, positive_int)

# the command's line in ``asyncgen --help``
SUMMARY = "generate images from prompts, on one device or several (AsyncDiff)"


@dataclass
class GenerateJob:
    """Everything a rank needs; plain values so it pickles into spawned workers."""

    model: str
    builtin_model: bool
    allow_pickle: bool
    prompts: list[str]
    outputs: list[str]
    negative_prompt: str | None
    steps: int | None
    guidance: float | None
    height: int | None
    width: int | None
    seed: int
    stages: int
    stride: int
    warmup: int | None
    time_shift: bool
    cfg_parallel: bool
    split: str
    device: str
    dtype: str
    attention: str | None = None
    compile: bool = False
    components: str = "planned"
    highres: bool = False
    structure_fraction: float = 0.7
    structure_guidance: float = 1.0
    asg_mode: str = "async"
    video: bool = False  # a video pipeline: outputs are .mp4/.gif files of its frames
    frames: int | None = None
    fps: int = 8
    cache: str | None = None  # a name of CACHES: a diffusers step cache run under the stages
    sp: int = 1  # devices per stage sharing its sequence (diffusers' context parallelism inside the stage)


#: ``--cache`` names and the diffusers step cache each runs, with its settings (shown in --help)
CACHES = {
    "fbcache": "First Block Cache, threshold 0.05 (diffusers' default): skips the blocks after the first "
               "when its residual changed by less",
    "taylorseer": "TaylorSeer, every 5th step computed after 3 full ones (diffusers' defaults), the others "
                  "predicted by first-order Taylor series (factors in float32)",
}


def cache_config(name: str | None):
    """The diffusers cache config ``--cache name`` runs (None: no cache)."""
    if name is None:
        return None
    import torch
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if name == "fbcache":
        return FirstBlockCacheConfig(threshold=0.05)
    return TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3, max_order=1,
                                 taylor_factors_dtype=torch.float32)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="what to draw (or give --prompts FILE)")
    parser.add_argument("-o", "--output", default=None,
                        help="image file to write (.png, .jpg, .webp, ...), or for a video pipeline a video file "
                        "(.mp4 or .gif); with --prompts, files are numbered: out.png -> out-0000.png, out-0001.png, "
                        "...; '-' is standard output (one PNG image; not a terminal); a name ending in / is a "
                        "directory (DIR/asyncgen.png); an existing device or FIFO is written through "
                        "(default: asyncgen.png, asyncgen.mp4 for a video pipeline)")
    parser.add_argument("--prompts", metavar="FILE", help="a .txt file with one prompt per line (or a .csv with a "
                        "'prompt' column): one image per prompt")
    parser.add_argument("--negative-prompt", default=None, help="what the image should not show (default: none)")
    add_model_arguments(parser, "miniature, the built-in shapes model (a UNet), 32x32")
    parser.add_argument("--devices", type=positive_int, default=None, help="worker processes to start on this "
                        "machine, one CPU core or one GPU each; under torchrun leave it out (default: 1, or "
                        "torchrun's WORLD_SIZE)")
    parser.add_argument("--stages", type=positive_int, default=None, help="AsyncDiff stages the denoiser is split "
                        "into (default: as many as the devices allow: devices - stride + 1, halved first with "
                        "--cfg-parallel)")
    parser.add_argument("--stride", type=positive_int, default=1, help="AsyncDiff stride: steps predicted per "
                        "parallel round; needs stages + stride - 1 devices (default: %(default)s)")
    parser.add_argument("--warmup", type=non_negative_int, default=None, help="exact warm-up steps before the "
                        "asynchronous ones (default: 5%% of the steps, at least 1)")
    parser.add_argument("--cfg-parallel", action="store_true", help="split the classifier-free-guidance batch "
                        "over two groups of devices (needs 2 * (stages + stride - 1) devices; default: off)")
    parser.add_argument("--sp", type=positive_int, default=1, help="the hybrid: devices per stage that share its "
                        "sequence, with diffusers' own context parallelism (Ulysses attention) inside the stage; "
                        "transformer models diffusers gives a context-parallel plan (with --stages > 1: Wan); needs "
                        "(stages + stride - 1) x SP devices, x 2 with --cfg-parallel (default: %(default)s)")
    parser.add_argument("--parallel", choices=["auto"], default=None, help="auto: choose --stages, --stride, "
                        "--cfg-parallel and --sp for the --devices from the predicted step time of every layout "
                        "asyncgen runs "
                        "(as 'asyncgen plan --parallel auto' lists them; the link and compute rate are measured once "
                        "and cached) (default: off)")
    parser.add_argument("--components", choices=("planned", "replicated"), default="planned",
                        help="where the text encoders and the VAE run on several devices: 'planned' on one device "
                        "each (the least loaded), outputs sent to the others, no copy elsewhere; 'replicated' on "
                        "every device (default: %(default)s)")
    add_asyncdiff_arguments(parser)
    add_sampling_arguments(parser, steps_help="25 for the built-in model, the pipeline's own default otherwise",
                           guidance_help="4.0 for the built-in model, the pipeline's own default otherwise",
                           size_help="the model's native size")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="weights and activations: auto = float16 on cuda, float32 on cpu (default: %(default)s)")
    parser.add_argument("--attention", choices=["sdpa", "xformers"], default=None,
                        help="attention kernels: PyTorch SDPA, or xFormers on CUDA (pip install 'asyncgen[xformers]') "
                        "(default: the pipeline's own, SDPA)")
    highres = parser.add_argument_group("high resolution (ASG)", "images several times the model's native size: "
                                        "patches and windows of native size spread over the devices")
    highres.add_argument("--highres", action="store_true", help="generate at --height x --width, integer multiples "
                         "of the native size per side, with asynchronous structure guidance (default: off; with it, "
                         "--height/--width default to twice the native size)")
    highres.add_argument("--structure-fraction", type=fraction, default=0.7, help="fraction of the steps in the "
                         "structure phase, 0 to 1 (default: %(default)s)")
    highres.add_argument("--structure-guidance", type=finite_float, default=1.0, help="peak weight pulling the "
                         "patches towards the key patch; 0 turns structure guidance off (default: %(default)s)")
    highres.add_argument("--asg-mode", choices=["async", "sync"], default="async", help="guide with the key patch's "
                         "previous-step prediction (async) or this step's (sync) (default: %(default)s)")
    video = parser.add_argument_group("video", "for video pipelines (AnimateDiff, Wan, LTX-Video, CogVideoX, "
                                      "HunyuanVideo, ...): -o chooses .mp4 (needs pip install 'asyncgen[video]') or .gif")
    video.add_argument("--frames", type=positive_int, default=None, help="frames to generate; with a VAE that "
                       "compresses time by r, a multiple of r plus 1 (default: the pipeline's own)")
    video.add_argument("--fps", type=positive_int, default=None, help="frames per second of the written video "
                       "(default: 8)")
    parser.add_argument("--cache", choices=sorted(CACHES), default=None, help="run a diffusers step cache under the "
                        "stages (transformer models; on each device for its own blocks): " +
                        "; ".join(f"{name} = {text}" for name, text in sorted(CACHES.items())) +
                        " (default: none)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each rank's part of the denoiser "
                        "(the first image is slower while it compiles; default: off)")


def _output_paths(output: str, count: int, video: bool = False) -> list[str]:
    """The files ``-o`` names for ``count`` prompts: numbered when several; ``DIR/`` holds the default names."""
    from asyncgen.cli.files import is_stdout, names_directory

    if names_directory(output):
        output = os.path.join(output, "asyncgen.mp4" if video else "asyncgen.png")
    if is_stdout(output) and count > 1:
        raise UsageError(f"-o -: standard output takes one image, and --prompts gives {count} prompts; give a file "
                         "name (numbered per prompt) or a directory ending in /")
    if count == 1:
        return [output]
    path = Path(output)
    suffix = path.suffix or ".png"
    return [str(path.with_name(f"{path.stem}-{i:04d}{suffix}")) for i in range(count)]


def load_libraries() -> None:
    """Import diffusers (and with it torch) with the soft file-size limit lifted: their imports may write scratch
    files of their own (:func:`~asyncgen.cli.files.file_size_limit_lifted`), and a limit set for the outputs
    must end the command at the output, in one line, not at an import."""
    from asyncgen.cli.files import file_size_limit_lifted

    with file_size_limit_lifted():
        import diffusers  # noqa: F401


def describe_model(model: str, allow_pickle: bool):
    """The model's facts from its configs (no weights), or a one-line error naming ``--model``."""
    from asyncgen.pipelines.from_configs import describe_pipeline
    from asyncgen.pipelines.loading import looks_like_local_path
    from asyncgen.pipelines.miniature import builtin_model_names

    try:
        return describe_pipeline(model)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        # a name that is not a folder may have been meant as a built-in one
        names = "" if looks_like_local_path(model) else f"; the built-in models are {builtin_model_names()}"
        if offline and not looks_like_local_path(model):
            raise UsageError(f"--model {model}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                             f"downloading it (download it once with network access, or give a local folder){names}"
                             ) from None
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model {model}: {text.removeprefix(f'{model}: ')}{names}") from None


def _is_video_pipeline(pipeline_class: str) -> bool:
    """A pipeline whose ``__call__`` takes ``num_frames`` makes videos (AnimateDiff, SVD, Wan, LTX, CogVideoX, ...)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    return cls is not None and "num_frames" in inspect.signature(cls.__call__).parameters


def temporal_compression(model: str) -> int:
    """Frames per latent frame of the pipeline's VAE (1: no temporal compression), from its config on meta."""
    import diffusers
    import torch
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(model)
    if not (isinstance(index.get("vae"), list) and index["vae"][1]):
        return 1
    cls = getattr(diffusers, index["vae"][1])
    config = cls.load_config(model, subfolder="vae")
    with torch.device("meta"):  # structure only: some VAEs derive the ratio in __init__ (LTX)
        vae = cls.from_config(config)
    ratio = (getattr(vae, "temporal_compression_ratio", None) or config.get("scale_factor_temporal")
             or config.get("temporal_compression_ratio") or 1)
    return int(ratio)


def _check_frames(frames: int | None, model: str) -> None:
    ratio = temporal_compression(model)
    if frames is not None and ratio > 1 and frames % ratio != 1 % ratio:
        low = frames - (frames - 1) % ratio
        valid = f"{low} or {low + ratio}" if low >= 1 else f"{low + ratio}"
        raise UsageError(f"--frames {frames}: this model's VAE compresses time by {ratio}, so frames must be "
                         f"{ratio}k + 1 (1, {ratio + 1}, {2 * ratio + 1}, ...); nearest valid: {valid}")


# diffusers schedulers that refuse more inference steps than the model's training timesteps (set_timesteps)
STEP_LIMITED_SCHEDULERS = ("DDIMScheduler", "DDIMParallelScheduler", "DDIMInverseScheduler", "DDPMScheduler",
                           "DDPMParallelScheduler", "LCMScheduler", "TCDScheduler", "CogVideoXDDIMScheduler",
                           "CogVideoXDPMScheduler", "CMStochasticIterativeScheduler", "SCMScheduler")


def check_scheduler_steps(model: str, steps: int | None) -> None:
    """``--steps`` against the pipeline's scheduler, from its config alone (before any worker starts)."""
    if steps is None:
        return
    try:
        from diffusers import DiffusionPipeline

        entry = DiffusionPipeline.load_config(model).get("scheduler")
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in STEP_LIMITED_SCHEDULERS):
            return
        import diffusers

        config = getattr(diffusers, entry[1]).load_config(model, subfolder="scheduler")
    except (OSError, ValueError, AttributeError):  # the load reports a broken folder better
        return
    limit = config.get("num_train_timesteps")
    if isinstance(limit, int) and steps > limit:
        raise UsageError(f"--steps {steps}: this model's {entry[1]} takes at most {limit} steps (its "
                         "num_train_timesteps)")


def check_size(name: str, value: int | None, facts) -> None:
    if value is not None and value % facts.size_multiple:
        raise UsageError(f"--{name} {value} is not a multiple of {facts.size_multiple}, the size step of this model "
                         f"(VAE factor x patch size); nearest valid: {facts.nearest_sizes(value)}")


def stages_for(devices: int, stages: int | None, stride: int, cfg_parallel: bool) -> int:
    """The stage count implied by the options; a clear error when the devices cannot hold them."""
    parts = 2 if cfg_parallel else 1
    if stride < 1:
        raise UsageError(f"--stride {stride}: need at least 1")
    if stages is not None and stages < 1:
        raise UsageError(f"--stages {stages}: need at least 1")
    if devices == 1 and not cfg_parallel:
        return stages or 1  # one process: stages > 1 runs through the serial simulator (same images)
    if devices % parts:
        raise UsageError(f"--cfg-parallel needs an even number of devices, got --devices {devices}")
    per_part = devices // parts
    if stages is None:
        stages = per_part - stride + 1
        if stages < 1:
            raise UsageError(f"--stride {stride} needs at least {stride} devices per CFG half, got {per_part}")
    elif stages + stride - 1 != per_part:
        need = parts * (stages + stride - 1)
        raise UsageError(f"--devices {devices} does not match --stages {stages} --stride {stride}"
                         f"{' --cfg-parallel' if cfg_parallel else ''}: that needs "
                         f"{'2 * ' if cfg_parallel else ''}(stages + stride - 1) = {need} devices")
    return stages


def make_job(args: argparse.Namespace, devices: int) -> GenerateJob:
    """Check every option against the model's configs and this machine, before any worker starts."""
    from asyncgen.cli.files import check_output_paths, load_prompts

    if args.prompt is None and args.prompts is None:
        raise UsageError("give a prompt, or --prompts FILE")
    if args.prompt is not None and args.prompts is not None:
        raise UsageError("give either a prompt or --prompts FILE, not both")
    check_image_side("--height", args.height)
    check_image_side("--width", args.width)
    check_steps(args.steps)
    check_frames(args.frames)
    try:
        prompts = [args.prompt] if args.prompts is None else load_prompts(args.prompts)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--prompts {args.prompts}: {exc}") from None
    if args.seed + len(prompts) - 1 >= SEED_LIMIT:
        raise UsageError(f"--seed {args.seed} with {len(prompts)} prompts: image i uses seed + i, so the seed can be "
                         f"at most 2**64 - {len(prompts)} = {SEED_LIMIT - len(prompts)}")
    device = args.device or default_device()
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if not launched_by_torchrun():
        try:
            check_worker_count(devices, device, args.oversubscribe)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    load_libraries()
    from asyncgen.pipelines.miniature import resolve_model

    model, builtin = resolve_model(args.model)
    facts = describe_model(model, args.allow_pickle)
    video = _is_video_pipeline(facts.pipeline_class)
    if not video and (args.frames is not None or args.fps is not None):
        given = " ".join(f"--{n}" for n in ("frames", "fps") if getattr(args, n) is not None)
        raise UsageError(f"{given}: {facts.pipeline_class} makes images, not videos; leave out {given}")
    outputs = _output_paths(args.output or ("asyncgen.mp4" if video else "asyncgen.png"), len(prompts), video)
    try:  # every file, not only the first: a numbered name can be too long, or already a directory
        check_output_paths(outputs, video=video)
    except ValueError as exc:
        raise UsageError(f"-o {exc}") from None
    if video:
        if args.highres:
            raise UsageError(f"--highres: {facts.pipeline_class} is a video pipeline; high resolution (ASG) is for "
                             "image pipelines")
        _check_frames(args.frames, model)
    dtype = args.dtype if args.dtype != "auto" else ("float16" if device == "cuda" else "float32")
    height, width = args.height, args.width
    if args.highres:
        given = [f"--{n.replace('_', '-')}" for n in ("stages", "warmup", "cfg_parallel", "time_shift")
                 if getattr(args, n) not in (None, False)] + (["--stride"] if args.stride != 1 else [])
        if given:
            raise UsageError(f"--highres spreads patches over the devices and does not split the denoiser: "
                             f"leave out {' '.join(given)}")
        if args.cache is not None:
            raise UsageError("--cache runs under AsyncDiff stages; --highres (ASG) takes none: leave out --cache")
        if getattr(args, "sp", 1) > 1:
            raise UsageError(f"--sp {args.sp} shares a stage's sequence over devices; --highres (ASG) splits no "
                             "denoiser: leave out --sp")
        stages = 1
        height = height or 2 * facts.native_height
        width = width or 2 * facts.native_width
        for name, value, native in (("height", height, facts.native_height), ("width", width, facts.native_width)):
            if value % native:
                raise UsageError(f"--{name} {value}: --highres needs a multiple of the native {native} "
                                 f"(e.g. {max(native, value - value % native)} or {value - value % native + native})")
    else:
        sp = getattr(args, "sp", 1)
        if sp > 1:
            _check_sp(args, devices)
        if getattr(args, "parallel", None) == "auto":
            _choose_layout(args, model, devices, device, dtype, height, width)
            sp = args.sp
        stages = stages_for(devices // sp, args.stages, args.stride, args.cfg_parallel)
        if stages > 1 and facts.splittable_units is None:
            from asyncgen.split.registry import supported_denoisers

            raise UsageError(f"--stages {stages}: asyncgen cannot split a {facts.denoiser_class}; it splits "
                             f"{', '.join(supported_denoisers())} (use --stages 1, or --cfg-parallel alone)")
        if facts.splittable_units is not None and stages > facts.splittable_units:
            raise UsageError(f"--stages {stages}: this {facts.denoiser_class} splits into at most "
                             f"{facts.splittable_units} stages")
        if (height is None) != (width is None):  # one side given: the other keeps the model's native size
            height, width = height or facts.native_height, width or facts.native_width
    if args.cache is not None and "UNet" in (facts.denoiser_class or ""):
        raise UsageError(f"--cache {args.cache}: the step caches run on transformer denoisers; this model's is a "
                         f"{facts.denoiser_class} (use --model miniature-dit or another transformer pipeline)")
    check_size("height", height, facts)
    check_size("width", width, facts)
    check_scheduler_steps(model, args.steps)
    if not args.highres and not video:  # ASG runs the denoiser on native-size windows
        check_memory(model, height or facts.native_height, width or facts.native_width, facts, stages, args.stride,
                      args.cfg_parallel, dtype, device, devices, getattr(args, "sp", 1))
    _say_if_large(height or facts.native_height, width or facts.native_width, facts, len(prompts))
    return GenerateJob(
        model=model, builtin_model=builtin, allow_pickle=args.allow_pickle, prompts=prompts, outputs=outputs,
        negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance, height=height,
        width=width, seed=args.seed, stages=stages, stride=args.stride, warmup=args.warmup,
        time_shift=args.time_shift, cfg_parallel=args.cfg_parallel, split=args.split, device=device, dtype=dtype,
        attention=args.attention, compile=args.compile, components=args.components, highres=args.highres,
        structure_fraction=args.structure_fraction, structure_guidance=args.structure_guidance, asg_mode=args.asg_mode,
        video=video, frames=args.frames, fps=args.fps or 8, cache=args.cache, sp=getattr(args, "sp", 1),
    )


def _check_sp(args: argparse.Namespace, devices: int) -> None:
    """--sp N: the devices divide into stage groups of N, and the options that do not run with the hybrid are out."""
    from asyncgen._compat import context_parallel_refusal_for_hybrid

    if getattr(args, "parallel", None) == "auto":
        raise UsageError(f"--sp {args.sp} with --parallel auto: it chooses --sp itself; give --stages and --sp "
                         "yourself, or --parallel auto alone")
    if args.cache is not None:
        raise UsageError(f"--sp {args.sp} with --cache {args.cache}: a step cache under the hybrid is not supported")
    if devices == 1:
        raise UsageError(f"--sp {args.sp}: context parallelism needs several devices; give --devices "
                         f"{args.sp} x (stages + stride - 1)")
    if devices % args.sp:
        raise UsageError(f"--sp {args.sp} does not divide --devices {devices}: need (stages + stride - 1) x "
                         f"{args.sp} devices{' x 2 with --cfg-parallel' if args.cfg_parallel else ''}")
    refusal = context_parallel_refusal_for_hybrid()
    if refusal is not None:
        raise UsageError(f"--sp {args.sp}: {refusal}")


def _choose_layout(args: argparse.Namespace, model: str, devices: int, device: str, dtype: str, height, width) -> None:
    """--parallel auto: set --stages, --stride, --warmup, --cfg-parallel and --sp to the fastest predicted layout
    (--sp only without --cache: the hybrid takes no step cache)."""
    given = [f"--{n.replace('_', '-')}" for n in ("stages", "cfg_parallel") if getattr(args, n) not in (None, False)]
    if given or args.stride != 1:
        raise UsageError(f"{' '.join(given + (['--stride'] if args.stride != 1 else []))}: --parallel auto chooses "
                         "the layout itself; give either these or --parallel auto")
    from asyncgen.cli.files import say

    from .plan import DEFAULT_STEPS, auto_layout

    from asyncgen.pipelines.asyncdiff import chosen_settings

    choice = auto_layout(model, devices, device, dtype, args.steps or DEFAULT_STEPS, height, width, args.warmup,
                         context_parallel=args.cache is None)
    args.stages, args.stride, args.warmup, args.cfg_parallel, args.sp = chosen_settings(choice, args.warmup)
    say(f"--parallel auto: {choice.reason}")


# more pixels than this many times the model's native image: the run is said to be long before it starts
LARGE_FACTOR = 16


def available_memory(device: str, devices: int) -> int | None:
    """Bytes the run can use: on CPU the host's available memory (all workers share it), on CUDA the least
    free memory of the GPUs it will use (per device); None when unknown."""
    if device == "cuda":
        import torch

        try:
            return min(torch.cuda.mem_get_info(k)[0] for k in range(min(devices, torch.cuda.device_count())))
        except (RuntimeError, ValueError):
            return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(model: str, height: int, width: int, facts, stages: int, stride: int, cfg_parallel: bool,
                  dtype: str, device: str, devices: int, sp: int = 1) -> None:
    """Refuse, before any worker starts, an image size whose estimated memory (the planner's, on fake tensors:
    nothing of that size is allocated) exceeds what the devices have. Only for sizes far above the native one."""
    if height * width <= LARGE_FACTOR * facts.native_height * facts.native_width or launched_by_torchrun():
        return
    available = available_memory(device, devices)
    if available is None:
        return
    try:
        import torch

        from asyncgen.pipelines.from_configs import plan_from_configs
        from asyncgen.placement.planner import format_bytes

        plan = plan_from_configs(model, stages, stride, cfg_parallel, getattr(torch, dtype), height, width)
    except Exception:  # an estimate that cannot be made refuses nothing: the run reports what goes wrong
        return
    shared = device == "cpu"  # CPU workers share the host's memory; each GPU has its own
    # with --sp each stage's rank is sp ranks holding the same (whole-sequence estimate: an upper bound) plan
    need = sp * sum(r.total_bytes for r in plan.ranks) if shared else plan.largest.total_bytes
    if need > available:
        where = "on this host" if shared else "on the emptiest GPU"
        raise UsageError(f"--height {height} --width {width}: the estimated peak memory at that size is "
                         f"{format_bytes(need)}{'' if shared else ' per GPU'} (parameters and the denoiser's "
                         f"activations; asyncgen plan shows it), more than the {format_bytes(available)} available "
                         f"{where}; choose a smaller size" + ("" if shared else " or more devices"))


def _say_if_large(height: int, width: int, facts, images: int) -> None:
    """One line before a run that will take long: an image far above the model's native size (the attention
    cost grows with the square of the pixels); the progress bar then shows each step."""
    from asyncgen.cli.files import say

    factor = height * width / (facts.native_height * facts.native_width)
    if factor > LARGE_FACTOR:
        say(f"asyncgen generate: note: {width}x{height} is {factor:.0f} times the pixels of this model's native "
            f"{facts.native_width}x{facts.native_height}; each step takes far longer than at the native size "
            f"and needs far more memory ({images} image{'s' if images > 1 else ''}; progress below)")


class _TidyDiffusersLog(logging.Filter):
    """Drops two diffusers log lines the command says better itself: the weight-file lookups it reports before
    our one-line error (a pickle-only folder), and the long-prompt warning that repeats the whole cut-off text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("An error occurred while trying to fetch")
                    or "truncated because CLIP can only handle sequences up to" in message)


def _say_if_truncated(pipe, prompts: list[str]) -> None:
    """One short line, once, when a prompt is longer than the text encoder reads."""
    tokenizer = getattr(pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not limit or limit > 1_000_000:  # tokenizers without a limit say 1e30
        return
    if any(len(tokenizer(prompt).input_ids) > limit for prompt in prompts):
        print(f"asyncgen generate: prompt truncated to {limit} tokens", file=sys.stderr)


def _quiet_loading(rank: int) -> None:
    """No loading bars (every rank would draw its own); warnings from rank 0 only, long ones shortened."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
        if rank != 0:
            library.utils.logging.set_verbosity_error()
    for handler in diffusers.utils.logging.get_logger("diffusers").handlers:
        handler.addFilter(_TidyDiffusersLog())
    if rank != 0:
        import warnings

        warnings.filterwarnings("ignore")


def _load(job: GenerateJob, rank: int, loader=None):
    """The pipeline, loaded whole by ``load_pipeline`` or by ``loader(model, dtype=, allow_pickle=)``."""
    import torch
    from asyncgen.pipelines.loading import load_pipeline

    _quiet_loading(rank)
    try:
        pipe = (loader or load_pipeline)(job.model, dtype=getattr(torch, job.dtype), allow_pickle=job.allow_pickle)
    except (OSError, KeyError) as exc:  # hub id unknown or not cached offline, missing or corrupt files, pickle refused
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model {job.model}: could not load a diffusers pipeline: {first}") from None
    if job.device == "cuda" and loader is None:
        from asyncgen.comm.group import local_cuda_device

        pipe.to(local_cuda_device())  # this rank's GPU: LOCAL_RANK, not the global rank
    return pipe


def _strategy(job: GenerateJob, world: int) -> str:
    if job.highres:
        return (f"ASG high resolution ({job.asg_mode}, structure fraction {job.structure_fraction}, "
                f"guidance {job.structure_guidance})")
    if job.stages == 1 and job.stride == 1 and not job.cfg_parallel and not job.cache and job.sp == 1:
        return "stock pipeline"
    text = f"AsyncDiff stages={job.stages} stride={job.stride} warmup={'default' if job.warmup is None else job.warmup}"
    text += " time-shift" if job.time_shift else ""
    text += " + CFG parallel" if job.cfg_parallel else ""
    text += f" x Ulysses {job.sp} per stage (diffusers' context parallelism)" if job.sp > 1 else ""
    text += f" + {job.cache} cache" if job.cache else ""
    return text + (" (serial simulator, one process)" if world == 1 else "")


def generate_worker(rank: int, world: int, job: GenerateJob) -> dict:
    """One rank's share of ``asyncgen generate``; rank 0 writes the files and returns the summary.

    Standard output and error are guarded here too (a spawned worker has its own): a progress bar or a
    message that cannot be written (``2>/dev/full``, a closed pipe) never stops the work or loses an image."""
    from asyncgen.cli.files import StandardStreams

    with StandardStreams():
        return _generate(rank, world, job)


def uses_asyncdiff(job: GenerateJob, world: int) -> bool:
    """Whether the job runs through ``AsyncDiffPipeline`` (else the stock pipeline, or ASG for ``--highres``)."""
    # a cache runs through the wrapper even on one stage: it gives the cache's hooks their state per pass and step
    return not job.highres and (job.stages > 1 or job.stride > 1 or job.cfg_parallel or world > 1 or
                                job.cache is not None or job.sp > 1)


def build_pipeline(job: GenerateJob, rank: int, world: int):
    """This rank's pipeline for ``job``, as ``asyncgen generate`` runs it (``asyncgen serve`` loads it this way too):
    AsyncDiff with stage-only loading in a group, the wrapper or the stock pipeline in one process, ASG for
    ``--highres``; the settings the model or machine refuses raise :class:`UsageError`."""
    from asyncgen.pipelines.acceleration import compile_modules, compile_options, enable_attention

    asyncdiff = uses_asyncdiff(job, world)
    try:
        if asyncdiff:
            from asyncgen.pipelines import AsyncDiffPipeline

            options = dict(stages=job.stages, stride=job.stride, warmup=job.warmup, time_shift=job.time_shift,
                           split=job.split, cfg_parallel=job.cfg_parallel, attention=job.attention,
                           compile=job.compile, components=job.components, cache=cache_config(job.cache),
                           context_parallel=job.sp,
                           device="cpu" if job.device == "cpu" else None)  # None: this rank's GPU
            if world > 1:  # each rank reads from the checkpoint only what it runs
                return _load(job, rank, lambda model, **load: AsyncDiffPipeline.from_pretrained(model, **options,
                                                                                                  **load))
            return AsyncDiffPipeline(_load(job, rank), **options)
        pipe = _load(job, rank)
        if job.attention:  # the stock pipeline (or ASG's), with the same speed settings the wrapper would apply
            enable_attention(pipe, job.attention)
        if job.compile:
            compile_modules([getattr(pipe, "unet", None) or pipe.transformer], compile_options(True))
        if job.highres:
            from asyncgen.pipelines import ASGPipeline

            pipe = ASGPipeline(pipe, structure_fraction=job.structure_fraction,
                               structure_guidance=job.structure_guidance, mode=job.asg_mode)
            pipe.layout(job.height, job.width)  # refuses sizes that are not multiples of the native one
        return pipe
    except (ValueError, TypeError, ImportError) as exc:  # settings checked against this model and machine
        raise UsageError(str(exc)) from exc


def call_arguments(job: GenerateJob, negative_prompt, height, width, steps, guidance, frames=None) -> dict:
    """The pipeline call's keyword arguments besides the prompt and generator: what is given, and on a built-in
    model its own steps and guidance (a model loaded by name keeps its pipeline's defaults)."""
    call = {"negative_prompt": negative_prompt, "height": height, "width": width}
    if steps is not None or job.builtin_model:
        from asyncgen.pipelines.miniature import DEFAULT_STEPS

        call["num_inference_steps"] = steps or DEFAULT_STEPS
    if guidance is not None or job.builtin_model:
        from asyncgen.pipelines.miniature import DEFAULT_GUIDANCE

        call["guidance_scale"] = guidance if guidance is not None else DEFAULT_GUIDANCE
    if job.video and frames is not None:
        call["num_frames"] = frames
    return {k: v for k, v in call.items() if v is not None}


def _generate(rank: int, world: int, job: GenerateJob) -> dict:
    load_libraries()  # a spawned worker imports them afresh
    import torch

    from asyncgen.cli.files import write_image, write_video

    pipe = build_pipeline(job, rank, world)
    call = call_arguments(job, job.negative_prompt, job.height, job.width, job.steps, job.guidance, job.frames)
    if rank == 0:
        _say_if_truncated(pipe, job.prompts)
    several = len(job.prompts) > 1
    if several and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(leave=False, disable=rank != 0)
    steps_done, start = 0, time.perf_counter()
    prompts = enumerate(zip(job.prompts, job.outputs))
    if several and rank == 0:
        from tqdm.auto import tqdm

        prompts = tqdm(prompts, total=len(job.prompts), desc="images")
    for i, (prompt, path) in prompts:
        generator = torch.Generator("cpu").manual_seed(job.seed + i)
        if job.video:
            frames = pipe(prompt, generator=generator, **call).frames[0]
            first = frames[0]
            image = first if hasattr(first, "size") and not hasattr(first, "shape") else None
            size = [first.shape[1], first.shape[0]] if image is None else list(first.size)
        else:
            image = pipe(prompt, generator=generator, **call).images[0]
            size = list(image.size)
        steps_done += len(pipe.scheduler.timesteps)
        if rank == 0:
            write_video(path, frames, job.fps) if job.video else write_image(path, image)
    seconds = time.perf_counter() - start
    return {"images": len(job.prompts), "seconds": seconds, "steps": steps_done, "outputs": job.outputs,
            "strategy": _strategy(job, world), "world": world, "device": job.device, "dtype": job.dtype,
            "size": size, "frames": len(frames) if job.video else None}


def summary_line(result: dict) -> str:
    where = result["outputs"][0] if result["images"] == 1 else f"{result['outputs'][0]} .. {result['outputs'][-1]}"
    where = "standard output" if where == "-" else where
    w, h = result["size"]
    what = "video" if result.get("frames") else "image"
    shape = f"{result['frames']} frames of {w}x{h}" if result.get("frames") else f"{w}x{h}"
    return (f"asyncgen: {result['images']} {what}{'s' if result['images'] > 1 else ''} ({shape}) in "
            f"{result['seconds']:.2f} s, {result['steps'] / result['seconds']:.3g} steps/s, "
            f"{result['world']} {result['device']} device{'s' if result['world'] > 1 else ''} ({result['dtype']}), "
            f"{result['strategy']} -> {where}")


def run(args: argparse.Namespace) -> int:
    world = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else (args.devices or 1)
    job = make_job(args, world)
    try:
        result = run_on_devices(generate_worker, args.devices, job, device_type=job.device,
                                oversubscribe=args.oversubscribe)
    except ValueError as exc:  # a launcher refusal (e.g. --devices against torchrun's WORLD_SIZE)
        raise UsageError(str(exc)) from None
    if not launched_by_torchrun() or int(os.environ["RANK"]) == 0:
        # with -o - (or /dev/stdout) the image is standard output: the summary goes to standard error
        from asyncgen.cli.files import is_standard_output

        into_stdout = any(is_standard_output(path) for path in job.outputs)
        print(summary_line(result), file=sys.stderr if into_stdout else sys.stdout)
    return 0

