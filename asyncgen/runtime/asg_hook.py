"""ASG attached to a pipeline's own UNet, as a ``diffusers.hooks`` hook.

The stock SD/SDXL pipeline runs at the large size: it prepares the large latent, calls
``self.unet(latent_model_input, t, ...)`` once per step, combines the classifier-free
guidance halves and steps its scheduler on the large latent. An :class:`ASGHook`
registered on that UNet turns each call into ASG's work for this rank (its patches in a
structure step, its windows in a detail step, assembled across the ranks by the
executor) and returns the denoiser output for the whole large latent. The pipeline's own
``__call__``, guidance, scheduler, VAE and outputs are untouched.

Per window the hook sets SDXL's size conditioning to what a native-size crop of the large
picture is: ``original_size = target_size =`` the native size, ``crops_coords_top_left``
the window's offset (``(0, 0)`` for a patch, which shows the whole picture).

This module must not load or wrap anything: it runs the executor it is given.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from asyncgen.schedules import asg_maths
from asyncgen.schedules.asg import ASGSimulator, plan_layout

from .scoped_hook import ScopedHook

#: the name the hook is registered under in a UNet's ``HookRegistry`` (another wrapper's hook adds its number)
HOOK_NAME = "asyncgen_asg"
#: UNet arguments that carry large-size tensors ASG would have to cut per patch (ControlNet, T2I-Adapter)
_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual",
              "down_intrablock_additional_residuals")


def word_tokens_fallback(rows: int, length: int) -> torch.Tensor:
    """``(rows, length)``: every token but the start token, for a call whose prompt text is unknown."""
    weights = torch.ones(rows, length)
    weights[:, 0] = 0
    return weights


class ASGHook(ScopedHook):
    """Runs a UNet's calls as ASG's patches and windows (see the module docstring).

    Args:
        executor: the serial simulator, or this rank's :class:`~asyncgen.runtime.asg.ASGRuntime`.
        native_size: the native picture size in pixels (height, width).
        vae_scale_factor: pixels per latent pixel.
        structure_fraction: fraction of a call's steps in the structure phase (rounded half up).
        window_stride: the detail phase's window stride in latent pixels, ``None`` for half a window.
        scheduler: returns the pipeline's scheduler (its timesteps give the call's step count).
        cfg: returns whether the running call uses classifier-free guidance (its batch is
            ``[negative; positive]``).
        rank, world: this rank and the number of ranks sharing the patches and windows.
        scoped: work only inside :meth:`active` (a wrapper that leaves its pipeline stock).

    Per call, :attr:`prompt_tokens` (``(rows, length) -> (rows, length)`` weights of the
    prompt's word tokens, or ``None``: every token but the start token) and
    :attr:`interaction_seed` (seeds the pixel-interaction permutations) may be set by the
    caller who knows the prompt and the generator.
    """

    _is_stateful = True

    def __init__(self, executor: ASGSimulator, native_size: tuple[int, int], vae_scale_factor: int,
                 structure_fraction: float, window_stride: tuple[int, int] | None, scheduler: Callable[[], Any],
                 cfg: Callable[[], bool], rank: int = 0, world: int = 1, scoped: bool = False):
        super().__init__(scoped)
        self.executor, self.native_size, self.vae_scale_factor = executor, native_size, vae_scale_factor
        self.structure_fraction, self.window_stride = structure_fraction, window_stride
        self.scheduler, self.cfg = scheduler, cfg
        self.rank, self.world = rank, world
        self.prompt_tokens: Callable[[int, int], torch.Tensor] | None = None
        self.interaction_seed = 0
        self._signature: inspect.Signature | None = None
        self.reset()

    # ------------------------------------------------------------ the hook's life

    def initialize_hook(self, module):
        # the class's forward: the instance's may already be a user's wrapper taking (*args, **kwargs)
        self._signature = inspect.signature(type(module).forward.__get__(module))
        return module

    def reset(self) -> None:
        """Forget the running call: the next denoiser call starts a new one."""
        self._step = 0
        self._total: int | None = None
        self._time_ids: dict[tuple[int, int], torch.Tensor] = {}

    def reset_state(self, module):
        # diffusers calls this at the end of a pipeline call for models with caches (HookRegistry.reset_stateful_hooks)
        self.reset()
        return module

    @property
    def step(self) -> int:
        """How many denoiser calls of the running pipeline call this hook has made (0 between calls)."""
        return self._step

    # ------------------------------------------------------------------ forward

    def _starts_a_call(self) -> bool:
        if self._total is None or self._step >= self._total:
            return True
        # a scheduler that counts its steps has not stepped yet at a call's first step (set_timesteps resets it):
        # a call that ended in an error is not continued by the next one
        return getattr(self.scheduler(), "step_index", 0) is None and self._step > 0

    def _begin(self, module, arguments: dict) -> None:
        sample = arguments["sample"]
        f = self.vae_scale_factor
        height, width = (int(n) * f for n in sample.shape[-2:])
        layout = plan_layout(height, width, self.native_size, f, self.rank, self.world, self.window_stride)
        timesteps = getattr(self.scheduler(), "timesteps", None)
        total = len(timesteps) if timesteps is not None else 0
        if total < 1:
            raise RuntimeError("ASG needs the pipeline's scheduler to list the call's timesteps (set_timesteps) "
                               "before the first denoiser call; it found none")
        rows = sample.shape[0]
        cfg = bool(self.cfg())
        if cfg and rows % 2:
            raise ValueError(f"a classifier-free-guidance call's batch is [negative; positive], but this one has "
                             f"{rows} rows")
        prompt_rows, length = (rows // 2 if cfg else rows), arguments["encoder_hidden_states"].shape[1]
        tokens = self.prompt_tokens(prompt_rows, length) if self.prompt_tokens is not None else None
        if tokens is None or tuple(tokens.shape) != (prompt_rows, length):
            tokens = word_tokens_fallback(prompt_rows, length)
        shuffle = torch.Generator("cpu").manual_seed(int(self.interaction_seed)) if layout.patches > 1 else None
        self.executor.begin_call(layout, asg_maths.structure_steps(total, self.structure_fraction),
                                 tokens.to(sample.device), cfg, shuffle, module.config.out_channels)
        self._step, self._total, self._time_ids = 0, total, {}

    def _size_conditioning(self, time_ids: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
        """SDXL's time ids of a native-size crop at ``crop`` (pixels): original size, crop offset, target size."""
        if crop not in self._time_ids:
            if time_ids.shape[-1] != 6:
                raise ValueError(f"ASG sets SDXL's size conditioning (6 time ids per row: original size, crop, "
                                 f"target size), but this UNet gets {time_ids.shape[-1]} per row")
            (h, w), (top, left) = self.native_size, crop
            row = time_ids.new_tensor([h, w, top, left, h, w])
            self._time_ids[crop] = row.expand_as(time_ids).contiguous()
        return self._time_ids[crop]

    def new_forward(self, module, *args, **kwargs):
        if not self.in_scope:
            return self.wrapped_forward(*args, **kwargs)
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        for name in _RESIDUALS:
            if arguments.get(name) is not None:
                raise ValueError(f"ASG does not cut {name} (ControlNet / T2I-Adapter residuals of the large latent) "
                                 "into patches and windows; use the pipeline without ControlNet")
        if self._starts_a_call():
            self._begin(module, arguments)
        return_dict = arguments.pop("return_dict", True)
        added = arguments.get("added_cond_kwargs")
        time_ids = added.get("time_ids") if added else None

        def denoise(part: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
            call = {**arguments, "sample": part, "return_dict": False}
            if time_ids is not None:
                call["added_cond_kwargs"] = {**added, "time_ids": self._size_conditioning(time_ids, crop)}
            return self.wrapped_forward(**call)[0]

        output = self.executor.step(arguments["sample"], self._step, denoise)
        self._step += 1
        if not return_dict:
            return (output,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=output)
