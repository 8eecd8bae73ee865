"""ASG: images several times the model's native size, on several ranks, without repeated objects.

A structure phase denoises ``K = s_h·s_w`` interleaved native-size patches of the large
latent (each one the whole picture at the native resolution), mixing them by pixel
interaction and pulling them towards the key patch where the prompt's words attend
(structure guidance); then the patches are relocated into the large latent and a detail
phase denoises overlapping native-size windows whose predictions are averaged. Patches
and windows are spread over the ranks. The plan and its serial executor are in
:mod:`asyncgen.schedules.asg`, the maths in :mod:`asyncgen.schedules.asg_maths`, the
all-reduce in :mod:`asyncgen.runtime.asg`; this module is the pipeline around them.

Choices the paper leaves open, and why (the measurements behind them are in
``docs/benchmarks.md``, section ASG):

- **w_t**: ``structure_guidance · (1 + cos(π k / n)) / 2`` over the ``n`` structure steps
  (``guidance_schedule="cosine"``, peak 1.0): strongest while the layout forms, fading so
  that the patches are free to differ in detail by the time they are relocated.
- **M**: the cross-attention probabilities of every cross-attention layer in the
  UNet's up blocks (``attention_layers="up"``), conditional half of the CFG batch,
  averaged over heads and over the prompt's word tokens (the start token, the end
  token and padding left out: they attend everywhere), upsampled bilinearly to the
  latent size, averaged over layers, min-max normalised per image. Under pixel
  interaction every slot carries part of the key patch, so each slot's map is
  inverse-permuted like its prediction and the key patch's map is read from the result.
- **First step of each phase**: the structure phase's first step has no previous key
  prediction, so asynchronous mode uses that step's own (as synchronous mode does); the
  detail phase starts on the relocated latent at the next timestep with no warm-up.
  Phase split: ``round(structure_fraction · steps)``, halves rounded up.
- **structure_fraction** defaults to 0.7, not the design notes' 0.5: it left fewer
  repeated objects and higher CLIP scores at both 2x2 and 3x3.
- **Synchronous vs asynchronous**: pixel interaction moves every patch's values through
  every slot, so each step all slot predictions must reach every rank anyway (one
  all-reduce the size of the large latent plus one map channel). Asynchronous mode
  therefore differs from synchronous mode in what it guides with (the key patch's
  previous-step prediction and map), not in how long a step takes.
- **SDXL conditioning**: ``original_size = target_size =`` the native size for every
  patch and window; ``crops_coords_top_left`` is ``(0, 0)`` for a patch (a patch shows the
  whole picture, uncropped) and the window's offset in pixels for a window (a window is
  a crop of the large picture).
- **Decoding**: diffusers' ``tiled_decode`` with native-size tiles (``tiled_decoding=True``):
  memory does not grow with the square of the size; tiles change pixels slightly, not
  the measures.
- **Work per rank**: one denoiser call (CFG batch of 2) per patch or window, patches and
  windows in contiguous, near-equal blocks per rank; every rank decodes the whole
  picture itself (tiles, no communication).
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from asyncgen._compat import execution_device, sdxl_add_time_ids
from asyncgen.runtime.asg import ASGRuntime
from asyncgen.schedules import asg_maths
from asyncgen.schedules.asg import MODES, ASGLayout, plan_layout
from asyncgen.schedules.asg_attention import AttentionMapStore, cross_attention_layers
from asyncgen.comm.group import resolve_context, shared_randomness
from asyncgen.comm.failure import publish_error

from .wrapping import (PipelineWrapper, check_device, check_flag, check_not_wrapped, check_number,
                       one_call_at_a_time, sibling_pipeline)

# --------------------------------------------------------------------------- call state


@dataclass
class _Conditioning:
    """What every denoiser call of one ``__call__`` shares."""

    prompt_embeds: torch.Tensor  # [negative; positive] rows when CFG is on
    token_weights: torch.Tensor  # (B, T): the prompt's word tokens, for the structure map
    guidance_scale: float
    guidance_rescale: float
    do_cfg: bool
    text_embeds: torch.Tensor | None = None  # SDXL pooled embeddings
    time_ids: Callable[[tuple[int, int]], torch.Tensor] | None = None  # SDXL: crop offset (px) -> time ids
    timestep_cond: torch.Tensor | None = None
    cross_attention_kwargs: dict | None = None


def _check_arguments(structure_fraction, structure_guidance, attention_layers, tiled_decoding, device, timeout) -> None:
    """The constructor's plain arguments, each refused in one line naming the value and what is accepted."""
    from asyncgen.comm.context import check_timeout

    # the type here (True and "0.5" are not fractions); the ranges where the maths checks them
    check_number(structure_fraction, "structure_fraction", "a number from 0 to 1")
    check_number(structure_guidance, "structure_guidance", "a finite number >= 0")
    if not isinstance(attention_layers, str) and not (
            isinstance(attention_layers, (list, tuple)) and all(isinstance(n, str) for n in attention_layers)):
        raise ValueError(f"attention_layers={attention_layers!r}: must be 'up', 'mid', 'down', 'all' or a list of "
                         "module names in the UNet")
    check_flag(tiled_decoding, "tiled_decoding")
    check_device(device)
    check_timeout(timeout)


class ASGPipeline(PipelineWrapper):
    r"""High-resolution generation with asynchronous structure guidance (ASG) around a diffusers pipeline.

    Wraps a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (its components
    are used as they are; nothing is replaced). ``pipe(prompt, height=2 * native,
    width=3 * native)`` returns the large picture, on every rank, in the wrapped
    pipeline's output type.

    Args:
        pipeline (`DiffusionPipeline`):
            A loaded SD-style or SDXL-style pipeline (a ``UNet2DConditionModel``, a VAE, a scheduler).
        structure_fraction (`float`, defaults to 0.7):
            Fraction ``p`` of the steps spent in the structure phase (rounded half up); 0 gives
            plain overlapping windows (MultiDiffusion), 1 gives no detail phase.
        structure_guidance (`float`, defaults to 1.0):
            Peak guidance weight ``w`` pulling patches towards the key patch where ``M`` is high;
            0 switches structure guidance off (pixel interaction stays).
        guidance_schedule (`str`, defaults to `"cosine"`):
            How ``w_t`` moves over the structure steps: ``"cosine"`` (from ``w`` down towards 0),
            ``"linear"`` (from ``w`` down to ``w/n``) or ``"constant"``.
        mode (`str`, defaults to `"async"`):
            ``"async"``: guide with the key patch's prediction and map from the previous step;
            ``"sync"``: with this step's.
        attention_layers (`str` or list of `str`, defaults to `"up"`):
            Cross-attention layers whose maps form ``M``: ``"up"``, ``"mid"``, ``"down"``, ``"all"``
            (those blocks' ``attn2`` layers) or a list of module names in the UNet.
        window_stride (`int` or `(int, int)`, *optional*):
            Detail-phase window stride in latent pixels (rows, columns). Defaults to half a window.
        tiled_decoding (`bool`, defaults to `True`):
            Decode the large latent in native-size tiles with blended overlaps (diffusers'
            ``tiled_decode``), so decoder memory does not grow with the picture. Tiles see no
            context beyond themselves (the VAE's group norms and mid-block attention become
            per tile), which shifts colours near seams; ``False`` decodes in one piece.
        native_size (`int` or `(int, int)`, *optional*):
            Native image size in pixels (height, width). Defaults to the UNet's ``sample_size``
            times the VAE's scale factor (512 for SD 1.5, 1024 for SDXL).
        process_group (`ProcessGroup`, *optional*):
            Ranks to spread patches and windows over (1 to K of them). Defaults to the
            initialised default group, else one made from ``torchrun``'s environment, else none
            (everything in this process: the serial run of the same schedule).
        device (`str` or `torch.device`, *optional*):
            This rank's device; defaults to ``cuda:LOCAL_RANK`` when CUDA is available and a group is used.
        timeout (`float` seconds or `timedelta`, *optional*):
            Limit for each collective (default 600 s, or ``ASYNCGEN_TIMEOUT``).
    """

    _bound_by = "it shares patches and windows among this process's rank and process group"

    def __init__(
        self,
        pipeline,
        structure_fraction: float = 0.7,
        structure_guidance: float = 1.0,
        guidance_schedule: str = "cosine",
        mode: str = "async",
        attention_layers: str | Sequence[str] = "up",
        window_stride: int | tuple[int, int] | None = None,
        tiled_decoding: bool = True,
        native_size: int | tuple[int, int] | None = None,
        process_group: dist.ProcessGroup | None = None,
        device: str | torch.device | None = None,
        timeout: float | datetime.timedelta | None = None,
    ):
        check_not_wrapped(pipeline, type(self).__name__)
        _check_arguments(structure_fraction, structure_guidance, attention_layers, tiled_decoding, device, timeout)
        unet = getattr(pipeline, "unet", None)
        if unet is None or not hasattr(pipeline, "vae") or not hasattr(pipeline, "encode_prompt"):
            raise TypeError(f"{type(pipeline).__name__} is not an SD-style pipeline: ASG needs pipe.unet, pipe.vae "
                            "and pipe.encode_prompt (StableDiffusionPipeline, StableDiffusionXLPipeline)")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(repr(m) for m in MODES)}")
        asg_maths.structure_steps(1, structure_fraction)  # validates the fraction
        asg_maths.guidance_weights(structure_guidance, 1, guidance_schedule)  # validates weight and schedule
        self.pipeline = pipeline
        self.structure_fraction, self.structure_guidance = float(structure_fraction), float(structure_guidance)
        self.guidance_schedule, self.mode = guidance_schedule, mode
        self.is_sdxl = unet.config.get("addition_embed_type") == "text_time"
        self.vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        self.native_size = self._native_size(native_size, unet)
        self.window_stride = self._pair(window_stride, "window_stride") if window_stride is not None else None
        self.tiled_decoding = bool(tiled_decoding)
        self.map_layers = self._map_layers(unet, attention_layers)
        self.ctx = resolve_context(process_group, device, timeout)
        # the plan's executor: the serial simulator's phases, assembled across the ranks (identity on one)
        self.executor = ASGRuntime(self.structure_guidance, guidance_schedule, mode, self.map_layers,
                                   self.vae_scale_factor, self.ctx)
        if self.ctx.device is not None:
            pipeline.to(self.ctx.device)
        if self.ctx.rank != 0 and hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)

    # ----------------------------------------------------------- construction

    @classmethod
    def from_pipe(cls, pipeline, **kwargs) -> "ASGPipeline":
        """Wrap a new pipeline over ``pipeline``'s components (as diffusers' ``from_pipe``); ``pipeline`` stays usable."""
        check_not_wrapped(pipeline, cls.__name__)
        return cls(sibling_pipeline(pipeline), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, structure_fraction: float = 0.7,
                        structure_guidance: float = 1.0, guidance_schedule: str = "cosine", mode: str = "async",
                        attention_layers="up", window_stride=None, tiled_decoding: bool = True, native_size=None,
                        process_group=None, device=None, timeout=None, **load_kwargs) -> "ASGPipeline":
        """Load a pipeline with ``DiffusionPipeline.from_pretrained`` and wrap it."""
        from .loading import load_pipeline

        # before minutes of loading
        _check_arguments(structure_fraction, structure_guidance, attention_layers, tiled_decoding, device, timeout)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(repr(m) for m in MODES)}")
        asg_maths.structure_steps(1, structure_fraction)
        asg_maths.guidance_weights(structure_guidance, 1, guidance_schedule)
        pipeline = load_pipeline(pretrained_model_name_or_path, **load_kwargs)
        return cls(pipeline, structure_fraction=structure_fraction, structure_guidance=structure_guidance,
                   guidance_schedule=guidance_schedule, mode=mode, attention_layers=attention_layers,
                   window_stride=window_stride, tiled_decoding=tiled_decoding, native_size=native_size,
                   process_group=process_group, device=device, timeout=timeout)

    @staticmethod
    def _pair(value, name: str) -> tuple[int, int]:
        pair = (value, value) if isinstance(value, int) else tuple(value)
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
            raise ValueError(f"{name}={value!r} must be a positive integer or a pair of positive integers")
        return pair

    def _native_size(self, native_size, unet) -> tuple[int, int]:
        if native_size is None:
            sample = unet.config.sample_size
            sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
            native = (sample[0] * self.vae_scale_factor, sample[1] * self.vae_scale_factor)
        else:
            native = self._pair(native_size, "native_size")
        if any(n % self.vae_scale_factor for n in native):
            raise ValueError(f"native_size={native} must be a multiple of the VAE's scale factor {self.vae_scale_factor}")
        return native

    @staticmethod
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

    # ------------------------------------------------------------------- call

    @one_call_at_a_time
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        guidance_rescale: float = 0.0,
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        r"""Generate a picture ``height × width``, an integer multiple of the native size per side.

        Args:
            prompt (`str` or `list[str]`, *optional*): What to draw; or pass ``prompt_embeds``.
            height (`int`, *optional*): Image height in pixels, ``s_h × native height``; defaults to the native height.
            width (`int`, *optional*): Image width in pixels, ``s_w × native width``; defaults to the native width.
            num_inference_steps (`int`, defaults to 50): Denoising steps, over both phases.
            guidance_scale (`float`, defaults to 7.5): Classifier-free guidance scale (> 1 turns CFG on).
            negative_prompt (`str` or `list[str]`, *optional*): What not to draw.
            num_images_per_prompt (`int`, defaults to 1): Pictures per prompt.
            eta (`float`, defaults to 0.0): DDIM's eta (other schedulers ignore it).
            generator (`torch.Generator` or list, *optional*): Seeds the noise. Without one (and without
                ``latents``) rank 0 picks a seed and every rank uses it.
            latents (`torch.Tensor`, *optional*): Initial noise of the large latent, ``(B, C, H/f, W/f)``.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): Precomputed text embeddings.
            pooled_prompt_embeds, negative_pooled_prompt_embeds (`torch.Tensor`, *optional*): SDXL only.
            prompt_2, negative_prompt_2 (`str` or `list[str]`, *optional*): SDXL's second text encoder's prompts.
            guidance_rescale (`float`, defaults to 0.0): Rescales the CFG prediction (Lin et al. 2023), as diffusers does.
            cross_attention_kwargs (`dict`, *optional*): Passed to the attention processors (e.g. LoRA ``scale``).
            clip_skip (`int`, *optional*): CLIP layers to skip for the prompt embeddings.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`, defaults to `True`): Return the wrapped pipeline's output class, else a tuple.

        Returns:
            The wrapped pipeline's output (``StableDiffusionPipelineOutput`` or
            ``StableDiffusionXLPipelineOutput``), or a tuple when ``return_dict=False``; the same on every rank.

        One call at a time: calls from several threads wait for each other (a lock is held for the
        whole call), each returning what it would return alone.
        """
        # 1. check inputs and lay out patches and windows. Every rank checks the same arguments
        # before any communication, so a bad argument fails every rank alike and leaves the
        # process group usable (errors from here on are published to the peers)
        height = self.native_size[0] if height is None else height
        width = self.native_size[1] if width is None else width
        self.check_inputs(prompt, prompt_2, height, width, num_inference_steps, negative_prompt, negative_prompt_2,
                          prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        layout = self.layout(height, width)
        try:
            generator = shared_randomness(self.ctx, {"generator": generator, "latents": latents})["generator"]

            # 2. encode the prompt
            device = execution_device(self.pipeline)
            cond = self.encode_prompt(prompt, prompt_2, device, num_images_per_prompt, guidance_scale,
                                      guidance_rescale, negative_prompt, negative_prompt_2, prompt_embeds,
                                      negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                                      cross_attention_kwargs, clip_skip)

            # 3. prepare timesteps, the large latent and the pixel-interaction generator
            timesteps = self.prepare_timesteps(num_inference_steps, device)
            batch = cond.token_weights.shape[0]
            latents = self.pipeline.prepare_latents(batch, self.pipeline.unet.config.in_channels, height, width,
                                                    cond.prompt_embeds.dtype, device, generator, latents)
            extra_step_kwargs = self.pipeline.prepare_extra_step_kwargs(generator, eta)
            shuffle = self.interaction_generator(generator, layout)
            num_structure = asg_maths.structure_steps(len(timesteps), self.structure_fraction)

            with self.pipeline.progress_bar(total=len(timesteps)) as progress:
                # 4. structure phase on the K interleaved patches
                patches = asg_maths.derelocate(latents, layout.s_h, layout.s_w)
                patches = self.structure_phase(patches, timesteps[:num_structure], layout, cond, shuffle,
                                               extra_step_kwargs, progress)
                # 5. relocation: HR[..., i::s_h, j::s_w] = patch(i, j)
                latents = asg_maths.relocate(patches, layout.s_h, layout.s_w)
                # 6. detail phase on overlapping native-size windows
                latents = self.detail_phase(latents, timesteps[num_structure:], layout, cond, extra_step_kwargs,
                                            progress)

            # 7. decode (tiled) and return what the wrapped pipeline would
            return self.decode(latents, cond, output_type, return_dict, device)
        except BaseException as exc:
            publish_error(self.ctx, exc)
            raise

    # ------------------------------------------------------------ the steps of __call__

    def check_inputs(self, prompt, prompt_2, height, width, num_inference_steps, negative_prompt, negative_prompt_2,
                     prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds):
        """The wrapped pipeline's own checks, then ASG's: sizes, steps, ranks."""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
        asg_maths.scale_factors(height, width, *self.native_size)
        common = dict(prompt=prompt, height=height, width=width, callback_steps=None, negative_prompt=negative_prompt,
                      prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        if self.is_sdxl:
            common.update(prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        self.pipeline.check_inputs(**common)

    def layout(self, height: int, width: int) -> ASGLayout:
        """Scale factors, windows, and this rank's share of patches and windows (:func:`plan_layout`)."""
        return plan_layout(height, width, self.native_size, self.vae_scale_factor, self.ctx.rank, self.ctx.world_size,
                           self.window_stride)

    def encode_prompt(self, prompt, prompt_2, device, num_images_per_prompt, guidance_scale, guidance_rescale,
                      negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                      negative_pooled_prompt_embeds, cross_attention_kwargs, clip_skip) -> _Conditioning:
        """Text embeddings ([negative; positive] with CFG), SDXL's extra conditioning, and the word tokens for M."""
        pipe, unet = self.pipeline, self.pipeline.unet
        do_cfg = guidance_scale > 1 and unet.config.time_cond_proj_dim is None
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        text_embeds = time_ids = None
        if self.is_sdxl:
            prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, lora_scale=lora_scale,
                clip_skip=clip_skip)
            text_embeds = torch.cat([negative_pooled, pooled]) if do_cfg else pooled
            time_ids = self._sdxl_time_ids(pooled, prompt_embeds.dtype, device, do_cfg, prompt_embeds.shape[0])
        else:
            prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
                prompt, device, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip)
        batch = prompt_embeds.shape[0]
        timestep_cond = None
        if unet.config.time_cond_proj_dim is not None:  # guidance-distilled UNets (LCM) embed the scale instead
            scale = torch.tensor(guidance_scale - 1).repeat(batch)
            timestep_cond = pipe.get_guidance_scale_embedding(
                scale, embedding_dim=unet.config.time_cond_proj_dim).to(device=device, dtype=prompt_embeds.dtype)
        weights = self._token_weights(prompt, batch, num_images_per_prompt, prompt_embeds.shape[1])
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        return _Conditioning(embeds, weights.to(device), guidance_scale, guidance_rescale, do_cfg, text_embeds,
                             time_ids, timestep_cond, cross_attention_kwargs)

    def _sdxl_time_ids(self, pooled, dtype, device, do_cfg, batch):
        pipe = self.pipeline
        projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                          else pipe.text_encoder_2.config.projection_dim)
        cache: dict[tuple[int, int], torch.Tensor] = {}

        def time_ids(crop: tuple[int, int]) -> torch.Tensor:
            if crop not in cache:
                ids = sdxl_add_time_ids(pipe, self.native_size, crop, self.native_size, dtype, projection_dim)
                ids = torch.cat([ids, ids]) if do_cfg else ids  # negative size conditioning = positive, as in diffusers
                cache[crop] = ids.to(device).repeat(batch, 1)
            return cache[crop]

        return time_ids

    def _token_weights(self, prompt, batch: int, per_prompt: int, length: int) -> torch.Tensor:
        """``(B, T)``: 1 for the prompt's word tokens, 0 for the start token, the end token and padding.

        With only embeddings given (no text) every token but the start token counts.
        """
        fallback = torch.ones(batch, length)
        fallback[:, 0] = 0
        tokenizer = getattr(self.pipeline, "tokenizer", None) or getattr(self.pipeline, "tokenizer_2", None)
        if prompt is None or tokenizer is None:
            return fallback
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        mask = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").attention_mask.float()
        last = mask.sum(dim=1).long() - 1
        mask[:, 0] = 0
        mask[torch.arange(len(prompts)), last.clamp_min(0)] = 0
        mask = mask.repeat_interleave(per_prompt, dim=0)
        empty = mask.sum(dim=1) == 0  # an empty prompt: no words to follow
        return torch.where(empty[:, None], fallback, mask)

    def prepare_timesteps(self, num_inference_steps: int, device) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        timesteps, _ = retrieve_timesteps(self.pipeline.scheduler, num_inference_steps, device)
        if hasattr(self.pipeline.scheduler, "set_begin_index"):
            self.pipeline.scheduler.set_begin_index(0)
        return timesteps

    def interaction_generator(self, generator, layout: ASGLayout) -> torch.Generator | None:
        """The generator of the pixel-interaction permutations, seeded from the call's generator
        (so every rank draws the same permutations); none with a single patch, so that a 1x1
        call draws exactly the stock pipeline's random numbers."""
        if layout.patches == 1:
            return None
        source = generator[0] if isinstance(generator, list) else generator
        seed = torch.randint(0, 2**62, (1,), generator=source,
                             device=source.device if source is not None else "cpu")
        return torch.Generator("cpu").manual_seed(int(seed.item()))

    # ------------------------------------------------------------------ phases

    def structure_phase(self, patches: torch.Tensor, timesteps: torch.Tensor, layout: ASGLayout, cond: _Conditioning,
                        shuffle: torch.Generator | None, extra_step_kwargs: dict, progress) -> torch.Tensor:
        """Denoise the K patches with pixel interaction and structure guidance; returns them ``(K, B, C, h, w)``."""
        return self.executor.structure_phase(patches, timesteps, layout, self._predictor(cond),
                                             self._stepper(extra_step_kwargs), cond.token_weights, shuffle, progress)

    def detail_phase(self, latents: torch.Tensor, timesteps: torch.Tensor, layout: ASGLayout, cond: _Conditioning,
                     extra_step_kwargs: dict, progress) -> torch.Tensor:
        """Denoise overlapping native-size windows of the large latent, averaging where they overlap."""
        return self.executor.detail_phase(latents, timesteps, layout, self._predictor(cond),
                                          self._stepper(extra_step_kwargs), progress)

    def _predictor(self, cond: _Conditioning):
        return lambda latent, t, crop, store: self._predict(latent, t, cond, crop, store)

    def _stepper(self, extra_step_kwargs: dict):
        scheduler = self.pipeline.scheduler
        return lambda prediction, t, latent: scheduler.step(prediction, t, latent, **extra_step_kwargs,
                                                            return_dict=False)[0]

    def _predict(self, latent: torch.Tensor, t, cond: _Conditioning, crop: tuple[int, int],
                 store: AttentionMapStore | None) -> torch.Tensor:
        """One native-size denoiser call with CFG, as the stock pipeline makes it; records maps into ``store``."""
        pipe = self.pipeline
        model_input = torch.cat([latent] * 2) if cond.do_cfg else latent
        model_input = pipe.scheduler.scale_model_input(model_input, t)
        added = {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids(crop)} if self.is_sdxl else None
        batch = latent.shape[0]
        rows = slice(batch, 2 * batch) if cond.do_cfg else slice(None)  # the maps of the conditional half
        with store.recording(rows) if store is not None else contextlib.nullcontext():
            noise = pipe.unet(model_input, t, encoder_hidden_states=cond.prompt_embeds, timestep_cond=cond.timestep_cond,
                              cross_attention_kwargs=cond.cross_attention_kwargs, added_cond_kwargs=added,
                              return_dict=False)[0]
        if cond.do_cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + cond.guidance_scale * (text - uncond)
            if cond.guidance_rescale > 0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                noise = rescale_noise_cfg(noise, text, guidance_rescale=cond.guidance_rescale)
        return noise

    # ------------------------------------------------------------------ decode

    def decode(self, latents: torch.Tensor, cond: _Conditioning, output_type: str, return_dict: bool, device):
        """Tiled VAE decoding (diffusers' ``tiled_decode``: native-size tiles with blended overlaps, so decoder
        memory does not grow with the picture), then the wrapped pipeline's post-processing and output class."""
        pipe, vae = self.pipeline, self.pipeline.vae
        has_nsfw = None
        if output_type == "latent":
            image = latents
        else:
            upcast = vae.dtype == torch.float16 and vae.config.force_upcast
            if upcast:
                pipe.upcast_vae()
            z = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype if upcast else vae.dtype)
            mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
            if mean is not None and std is not None:
                shape = (1, len(mean), 1, 1)
                z = (z * torch.tensor(std).view(shape).to(z) / vae.config.scaling_factor
                     + torch.tensor(mean).view(shape).to(z))
            else:
                z = z / vae.config.scaling_factor
            tiled = self.tiled_decoding and (z.shape[-1] > vae.tile_latent_min_size
                                             or z.shape[-2] > vae.tile_latent_min_size)
            image = (vae.tiled_decode if tiled else vae.decode)(z, return_dict=False)[0]
            if upcast:
                vae.to(dtype=torch.float16)
            if hasattr(pipe, "run_safety_checker"):
                image, has_nsfw = pipe.run_safety_checker(image, device, cond.prompt_embeds.dtype)
            if getattr(pipe, "watermark", None) is not None:
                image = pipe.watermark.apply_watermark(image)
        if output_type != "latent":
            denormalize = [True] * image.shape[0] if has_nsfw is None else [not n for n in has_nsfw]
            image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        pipe.maybe_free_model_hooks()
        if self.is_sdxl:
            from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

            return StableDiffusionXLPipelineOutput(images=image) if return_dict else (image,)
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        if not return_dict:
            return (image, has_nsfw)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw)


