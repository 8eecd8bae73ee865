"""ASG: images several times the model's native size, on several ranks, without repeated objects.

A structure phase denoises ``K = s_h·s_w`` interleaved native-size patches of the large
latent (each one the whole picture at the native resolution), mixing them by pixel
interaction and pulling them towards the key patch where the prompt's words attend
(structure guidance); then the patches are relocated into the large latent and a detail
phase denoises overlapping native-size windows whose predictions are averaged. Patches
and windows are spread over the ranks. The plan and its serial executor are in
:mod:`asyncgen.schedules.asg`, the maths in :mod:`asyncgen.schedules.asg_maths`, the
all-reduce in :mod:`asyncgen.runtime.asg`, the hook that runs them on the pipeline's own UNet
in :mod:`asyncgen.runtime.asg_hook`, attached by :func:`~asyncgen.pipelines.apply_asg`; this
module is the front door: the wrapped pipeline's own ``__call__`` at the large size.

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
- **Where guidance acts**: on the UNet's raw output (both halves of a CFG batch, the same
  ``M`` for each) and before the pipeline's own classifier-free guidance, which then runs
  unchanged on the large latent (both are linear per position, so the maths is the same);
  ``guidance_rescale``, which is not linear, rescales by the whole large picture's
  statistics, as the stock pipeline computes them.
- **Pixel interaction's seed**: drawn from the call's generator before the stock pipeline
  draws its noise (every rank has the same generator); without a generator (only
  ``latents``) ``ASGConfig.interaction_seed``.
- **SDXL conditioning**: ``original_size = target_size =`` the native size for every
  patch and window; ``crops_coords_top_left`` is ``(0, 0)`` for a patch (a patch shows the
  whole picture, uncropped) and the window's offset in pixels for a window (a window is
  a crop of the large picture).
- **Decoding**: the VAE's own tiling (``vae.enable_tiling()``, on for the wrapper's calls
  only, with ``tiled_decoding=True``): memory does not grow with the square of the size;
  tiles change pixels slightly, not the measures.
- **Work per rank**: one denoiser call (CFG batch of 2) per patch or window, patches and
  windows in contiguous, near-equal blocks per rank; every rank decodes the whole
  picture itself (tiles, no communication).
"""

from __future__ import annotations

import datetime
import inspect
from typing import Sequence

import torch
import torch.distributed as dist

from asyncgen.comm.failure import publish_error
from asyncgen.comm.group import shared_randomness
from asyncgen.schedules.asg import ASGLayout

from .asg_attach import ASGAttachment, ASGConfig, apply_asg
from .wrapping import PipelineWrapper, check_not_wrapped, one_call_at_a_time, sibling_pipeline


class ASGPipeline(PipelineWrapper):
    r"""High-resolution generation with asynchronous structure guidance (ASG) around a diffusers pipeline.

    Wraps a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` through
    :func:`~asyncgen.pipelines.apply_asg` (a hook on its UNet, scoped to this wrapper's calls:
    the pipeline itself stays stock). ``pipe(prompt, height=2 * native, width=3 * native)`` is
    the wrapped pipeline's own ``__call__`` at the large size and returns its output, the same
    on every rank.

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
            Decode the large latent in native-size tiles with blended overlaps (the VAE's own
            tiling), so decoder memory does not grow with the picture. Tiles see no context
            beyond themselves (the VAE's group norms and mid-block attention become per tile),
            which shifts colours near seams; ``False`` decodes in one piece.
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
        config = ASGConfig(structure_fraction, structure_guidance, guidance_schedule, mode, attention_layers,
                           window_stride, tiled_decoding, native_size, scoped=True, process_group=process_group,
                           device=device, timeout=timeout)
        self.pipeline = pipeline
        self.attachment: ASGAttachment = apply_asg(pipeline, config)
        self._call_signature = inspect.signature(pipeline.__call__)  # to read height, width, steps, generator

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

        options = dict(structure_fraction=structure_fraction, structure_guidance=structure_guidance,
                       guidance_schedule=guidance_schedule, mode=mode, attention_layers=attention_layers,
                       window_stride=window_stride, tiled_decoding=tiled_decoding, native_size=native_size,
                       process_group=process_group, device=device, timeout=timeout)
        ASGConfig(**options)  # checked before minutes of loading
        return cls(load_pipeline(pretrained_model_name_or_path, **load_kwargs), **options)

    # ------------------------------------------------------------- what it holds

    @property
    def config(self) -> ASGConfig:
        return self.attachment.config

    @property
    def ctx(self):
        """The process group, rank and device the patches and windows are shared in."""
        return self.attachment.ctx

    @property
    def native_size(self) -> tuple[int, int]:
        return self.attachment.native_size

    @property
    def map_layers(self) -> dict:
        """The cross-attention layers whose maps form ``M``, by module name."""
        return self.attachment.map_layers

    @property
    def hook(self):
        """The ASG hook on the pipeline's UNet."""
        return self.attachment.hook

    def layout(self, height: int, width: int) -> ASGLayout:
        """Scale factors, windows, and this rank's share of patches and windows (refuses sizes ASG cannot draw)."""
        return self.attachment.layout(height, width)

    # ------------------------------------------------------------------- call

    @one_call_at_a_time
    def __call__(self, *args, **kwargs):
        r"""The wrapped pipeline's ``__call__`` at a size ``height × width`` that is a whole multiple of the native one.

        ``height`` and ``width`` default to the native size (one patch: the stock picture).
        Returns the wrapped pipeline's output (``StableDiffusionPipelineOutput`` or
        ``StableDiffusionXLPipelineOutput``, or a tuple with ``return_dict=False``), the same on every rank.

        One call at a time: calls from several threads wait for each other (a lock is held for the
        whole call), each returning what it would return alone.
        """
        # check what ASG adds before any communication: a bad argument fails every rank alike and leaves the
        # process group usable (errors from here on are published to the peers)
        arguments = self._call_signature.bind_partial(*args, **kwargs).arguments
        steps = arguments.get("num_inference_steps", 50)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps={steps!r} must be an integer >= 1")
        height = self.native_size[0] if arguments.get("height") is None else arguments["height"]
        width = self.native_size[1] if arguments.get("width") is None else arguments["width"]
        layout = self.layout(height, width)
        kwargs = {**arguments, "height": height, "width": width}
        try:
            kwargs = shared_randomness(self.ctx, kwargs)
            seed = self._interaction_seed(kwargs.get("generator"), layout)
            with self.attachment.active(), self.attachment.call_inputs(
                    kwargs.get("prompt"), kwargs.get("num_images_per_prompt") or 1, seed):
                self.attachment.reset()
                try:
                    return self.pipeline(**kwargs)
                finally:
                    self.attachment.reset()
        except BaseException as exc:
            publish_error(self.ctx, exc)
            raise

    @staticmethod
    def _interaction_seed(generator, layout: ASGLayout) -> int | None:
        """The pixel interaction's seed, drawn from the call's generator (so every rank draws the same
        permutations); none with a single patch, so that a 1x1 call draws exactly the stock pipeline's
        random numbers, or without a generator (the config's seed then)."""
        if layout.patches == 1 or generator is None:
            return None
        source = generator[0] if isinstance(generator, list) else generator
        return int(torch.randint(0, 2**62, (1,), generator=source, device=source.device).item())
