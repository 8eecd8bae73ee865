"""Attaching ASG to an SD/SDXL pipeline through ``diffusers.hooks``, like diffusers' own caches.

``apply_asg(pipe, ASGConfig(...))`` registers an :class:`~asyncgen.runtime.asg_hook.ASGHook`
on ``pipe.unet`` and turns on the VAE's tiled decoding; then ``pipe(prompt, height=2 * 512,
width=3 * 512)`` is the stock call drawing a picture several times the native size with
ASG (in a process group the ranks share the patches and windows; every rank must make the
same calls with the same seeded ``generator``). :class:`~asyncgen.pipelines.ASGPipeline` is
the front door built on this: shared randomness across ranks, the prompt's word tokens for
the structure map, a pixel-interaction seed drawn from the call's generator, errors
published to the other ranks, and a pipeline left stock outside its calls.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from diffusers.hooks import HookRegistry

from asyncgen.comm.context import DistContext
from asyncgen.comm.group import resolve_context
from asyncgen.runtime.asg import ASGRuntime
from asyncgen.runtime.asg_hook import HOOK_NAME, ASGHook, word_tokens_fallback
from asyncgen.runtime.scoped_hook import register_numbered
from asyncgen.schedules import asg_maths
from asyncgen.schedules.asg import MODES, ASGLayout, plan_layout
from asyncgen.schedules.asg_attention import cross_attention_layers

from .wrapping import check_device, check_flag, check_number


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"{name}={value!r} must be a positive integer or a pair of positive integers")
    return pair


@dataclass
class ASGConfig:
    r"""How :func:`apply_asg` draws large pictures. Checked when made: a bad value is one line.

    Args:
        structure_fraction: Fraction ``p`` of the steps spent in the structure phase (rounded half
            up); 0 gives plain overlapping windows (MultiDiffusion), 1 gives no detail phase.
        structure_guidance: Peak guidance weight ``w`` pulling patches towards the key patch where
            ``M`` is high; 0 switches structure guidance off (pixel interaction stays).
        guidance_schedule: How ``w_t`` moves over the structure steps: ``"cosine"`` (from ``w`` down
            towards 0), ``"linear"`` (from ``w`` down to ``w/n``) or ``"constant"``.
        mode: ``"async"``: guide with the key patch's prediction and map from the previous step;
            ``"sync"``: with this step's.
        attention_layers: Cross-attention layers whose maps form ``M``: ``"up"``, ``"mid"``,
            ``"down"``, ``"all"`` (those blocks' ``attn2`` layers) or a list of module names in the UNet.
        window_stride: Detail-phase window stride in latent pixels (rows, columns); ``None``: half a window.
        tiled_decoding: Decode the large latent in native-size tiles with blended overlaps
            (``vae.enable_tiling()``), so decoder memory does not grow with the picture.
        native_size: Native image size in pixels (height, width); ``None``: the UNet's
            ``sample_size`` times the VAE's scale factor (512 for SD 1.5, 1024 for SDXL).
        interaction_seed: Seeds the pixel-interaction permutations of a call (the same on every
            rank); :class:`ASGPipeline` draws one per call from the call's generator instead.
        scoped: The hook works only inside :meth:`ASGAttachment.active` (and tiling is on only there);
            every other call of the pipeline stays stock.
        process_group: Ranks to spread patches and windows over (1 to K of them); default: the
            initialised group, else one from ``torchrun``'s environment, else none (the serial run).
        device: This rank's device; default ``cuda:LOCAL_RANK`` when CUDA is available and a group is used.
        timeout: Limit for each collective (seconds or ``timedelta``; default ``ASYNCGEN_TIMEOUT`` or 600 s).
    """

    structure_fraction: float = 0.7
    structure_guidance: float = 1.0
    guidance_schedule: str = "cosine"
    mode: str = "async"
    attention_layers: str | Sequence[str] = "up"
    window_stride: int | tuple[int, int] | None = None
    tiled_decoding: bool = True
    native_size: int | tuple[int, int] | None = None
    interaction_seed: int = 0
    scoped: bool = False
    process_group: Any = None
    device: str | torch.device | None = None
    timeout: float | datetime.timedelta | None = None

    def __post_init__(self):
        from asyncgen.comm.context import check_timeout

        # the type here (True and "0.5" are not fractions); the ranges where the maths checks them
        check_number(self.structure_fraction, "structure_fraction", "a number from 0 to 1")
        check_number(self.structure_guidance, "structure_guidance", "a finite number >= 0")
        asg_maths.structure_steps(1, self.structure_fraction)  # the range
        asg_maths.guidance_weights(self.structure_guidance, 1, self.guidance_schedule)  # weight and schedule
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {', '.join(repr(m) for m in MODES)}")
        layers = self.attention_layers
        if not isinstance(layers, str) and not (isinstance(layers, (list, tuple)) and
                                                all(isinstance(n, str) for n in layers)):
            raise ValueError(f"attention_layers={layers!r}: must be 'up', 'mid', 'down', 'all' or a list of "
                             "module names in the UNet")
        if self.window_stride is not None:
            self.window_stride = _pair(self.window_stride, "window_stride")
        if self.native_size is not None:
            self.native_size = _pair(self.native_size, "native_size")
        if isinstance(self.interaction_seed, bool) or not isinstance(self.interaction_seed, int) \
                or not 0 <= self.interaction_seed < 2**63:
            raise ValueError(f"interaction_seed={self.interaction_seed!r}: must be an integer from 0 to 2**63 - 1")
        check_flag(self.tiled_decoding, "tiled_decoding")
        check_flag(self.scoped, "scoped")
        check_device(self.device)
        check_timeout(self.timeout)


@dataclass
class ASGAttachment:
    """What :func:`apply_asg` attached: the hook on the UNet, the group, the native size and the map layers."""

    pipeline: Any
    config: ASGConfig
    ctx: DistContext
    hook: ASGHook
    native_size: tuple[int, int]
    vae_scale_factor: int
    map_layers: dict

    def layout(self, height: int, width: int) -> ASGLayout:
        """Scale factors, windows, and this rank's share of patches and windows for a ``height × width`` picture;
        refuses sizes that are not whole multiples of the native size, and more ranks than patches."""
        return plan_layout(height, width, self.native_size, self.vae_scale_factor, self.ctx.rank,
                           self.ctx.world_size, self.config.window_stride)

    def reset(self) -> None:
        """Forget a call that did not finish: the next denoiser call starts a new one."""
        self.hook.reset()

    @contextlib.contextmanager
    def active(self):
        """Where a ``scoped`` attachment works: its hook, and the VAE's tiled decoding when configured."""
        vae = self.pipeline.vae
        tiling = self.config.tiled_decoding and self.config.scoped and not getattr(vae, "use_tiling", False)
        with self.hook.active():
            if tiling:
                vae.enable_tiling()
            try:
                yield
            finally:
                if tiling:
                    vae.disable_tiling()

    @contextlib.contextmanager
    def call_inputs(self, prompt=None, num_images_per_prompt: int = 1, interaction_seed: int | None = None):
        """What the UNet does not see, for the calls made inside: the prompt (its word tokens form the
        structure map) and the seed of the pixel interaction."""
        hook = self.hook
        saved = hook.prompt_tokens, hook.interaction_seed
        tokenizer = getattr(self.pipeline, "tokenizer", None) or getattr(self.pipeline, "tokenizer_2", None)
        if prompt is not None and tokenizer is not None:
            hook.prompt_tokens = lambda rows, length: prompt_word_tokens(tokenizer, prompt, num_images_per_prompt,
                                                                         rows, length)
        if interaction_seed is not None:
            hook.interaction_seed = interaction_seed
        try:
            yield
        finally:
            hook.prompt_tokens, hook.interaction_seed = saved

    def remove(self) -> None:
        """Unregister the hook and turn tiling back off (unscoped): the pipeline is stock again."""
        registry = HookRegistry.check_if_exists_or_initialize(self.pipeline.unet)
        for name in list(registry.hooks):
            if registry.get_hook(name) is self.hook:
                registry.remove_hook(name, recurse=False)
        if self.config.tiled_decoding and not self.config.scoped:
            self.pipeline.vae.disable_tiling()


def prompt_word_tokens(tokenizer, prompt, per_prompt: int, rows: int, length: int) -> torch.Tensor | None:
    """``(rows, length)``: 1 for the prompt's word tokens, 0 for the start token, the end token and padding.

    ``None`` when the prompt does not give ``rows`` rows (the caller falls back to every token
    but the start token); an empty prompt has no words to follow and gets the fallback too.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(prompts) * per_prompt != rows:
        return None
    mask = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").attention_mask.float()
    last = mask.sum(dim=1).long() - 1
    mask[:, 0] = 0
    mask[torch.arange(len(prompts)), last.clamp_min(0)] = 0
    mask = mask.repeat_interleave(per_prompt, dim=0)
    empty = mask.sum(dim=1) == 0
    return torch.where(empty[:, None], word_tokens_fallback(rows, length), mask)


def _native_size(config: ASGConfig, unet, vae_scale_factor: int) -> tuple[int, int]:
    if config.native_size is None:
        sample = unet.config.sample_size
        sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
        native = (sample[0] * vae_scale_factor, sample[1] * vae_scale_factor)
    else:
        native = config.native_size
    if any(n % vae_scale_factor for n in native):
        raise ValueError(f"native_size={native} must be a multiple of the VAE's scale factor {vae_scale_factor}")
    return native


def _map_layers(unet, attention_layers) -> dict:
    if isinstance(attention_layers, str):
        layers = cross_attention_layers(unet, attention_layers)
    else:
        modules = dict(unet.named_modules())
        unknown = [n for n in attention_layers if not hasattr(modules.get(n), "set_processor")]
        if unknown:
            known = list(cross_attention_layers(unet, "all"))
            raise ValueError(f"attention_layers {unknown} are not attention modules of the UNet; "
                             f"its cross-attention layers are {known}")
        layers = {n: modules[n] for n in attention_layers}
    if not layers:
        raise ValueError(f"attention_layers={attention_layers!r} selects no cross-attention layer in this UNet; "
                         f"it has {list(cross_attention_layers(unet, 'all'))}")
    return layers


def check_asg_pipeline(pipeline) -> None:
    """Refuse, in one line, a pipeline that is not SD-style (ASG calls its UNet at native size with SD conditioning)."""
    if getattr(pipeline, "unet", None) is None or not hasattr(pipeline, "vae") or not hasattr(pipeline,
                                                                                             "encode_prompt"):
        raise TypeError(f"{type(pipeline).__name__} is not an SD-style pipeline: ASG needs pipe.unet, pipe.vae "
                        "and pipe.encode_prompt (StableDiffusionPipeline, StableDiffusionXLPipeline)")


def apply_asg(pipeline, config: ASGConfig | None = None) -> ASGAttachment:
    r"""Draw pictures larger than the native size with ASG, in place, through a ``diffusers.hooks`` hook.

    After this, ``pipeline(prompt, height=s_h * native, width=s_w * native)`` is the stock call:
    the UNet's calls run as ASG's patches (structure phase) and windows (detail phase), spread
    over the ranks of the group, and the VAE decodes in tiles. In a process group every rank
    must make the same calls with the same arguments (the same seeded ``generator``);
    :class:`~asyncgen.pipelines.ASGPipeline` does this for you. Returns what was attached.
    """
    from .wrapping import check_not_wrapped

    config = config or ASGConfig()
    if not isinstance(config, ASGConfig):
        raise TypeError(f"config must be an ASGConfig, got {type(config).__name__}")
    check_asg_pipeline(pipeline)
    check_not_wrapped(pipeline, "apply_asg", every_call=not config.scoped)
    unet = pipeline.unet
    vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    native = _native_size(config, unet, vae_scale_factor)
    layers = _map_layers(unet, config.attention_layers)
    ctx = resolve_context(config.process_group, config.device, config.timeout)
    # the plan's executor: the serial simulator's steps, assembled across the ranks (identity on one)
    executor = ASGRuntime(config.structure_guidance, config.guidance_schedule, config.mode, layers,
                          vae_scale_factor, ctx)
    hook = ASGHook(executor, native, vae_scale_factor, config.structure_fraction, config.window_stride,
                   scheduler=lambda: pipeline.scheduler,
                   cfg=lambda: bool(getattr(pipeline, "do_classifier_free_guidance", False)),
                   rank=ctx.rank, world=ctx.world_size, scoped=config.scoped)
    register_numbered(unet, hook, HOOK_NAME)
    if config.tiled_decoding and not config.scoped:
        pipeline.vae.enable_tiling()
    if ctx.device is not None:
        pipeline.to(ctx.device)
    if ctx.rank != 0 and hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    return ASGAttachment(pipeline, config, ctx, hook, native, vae_scale_factor, layers)
