"""Diffusion transformers (images and video): example calls for the generic block split.

Every diffusers transformer splits through :class:`~asyncgen.split.transformer.block_split.BlockSplit`,
which reads the blocks and the boundary state from a traced forward. What it cannot
read from the model is what a valid call looks like: the forward's arguments and their
shapes. :func:`example_inputs` builds one from the forward's signature and the model's
config, argument by argument (``encoder_hidden_states`` is ``(batch, tokens,
<the config's text width>)``, ``img_ids`` a grid of positions, ...), and finds the
latent layout (``(B, C, H, W)``, video ``(B, C, F, H, W)`` or ``(B, F, C, H, W)``,
packed ``(B, tokens, C)``) by trying each under ``FakeTensorMode``. Nothing here is
keyed by class: a new class whose arguments follow these conventions needs no code.
"""

from __future__ import annotations

import inspect
import logging as _stdlib_logging
import weakref
from typing import Any

import torch
from torch import nn

from asyncgen.split.transformer.block_split import BlockSplit
from asyncgen.split.transformer.signature import is_list_of_tensors, timestep_argument
from asyncgen.split.transformer.trace import ExampleUnavailable, NeedsRealWeights

# config attributes giving the width of the text states, most specific first
_TEXT_WIDTH = ("joint_attention_dim", "caption_channels", "text_embed_dim", "text_dim", "cap_feat_dim",
               "text_hidden_dim", "cross_attention_dim", "encoder_hidden_dim")


_TEXT_TOKENS = 8


_TEXT_MASKS = ("encoder_attention_mask", "encoder_hidden_states_mask")


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # (layout, mask dtype) that worked


def _config(model, *names, default=None):
    for name in names:
        value = getattr(model.config, name, None)
        if value is not None:
            return value
    return default


def _patch(model) -> tuple[int, int]:
    """(temporal, spatial) patch size from the config."""
    patch = _config(model, "patch_size", default=1)
    if isinstance(patch, (tuple, list)):
        return int(patch[0]), int(patch[-1])
    return int(_config(model, "patch_size_t", default=1) or 1), int(patch or 1)


def _latent_layouts(model, batch: int, frames: int, height: int, width: int) -> list[tuple[str, tuple]]:
    channels = _config(model, "in_channels", "num_channels_latents", default=4)
    _, p = _patch(model)
    image = ("image", (batch, channels, height, width))
    video = ("video", (batch, channels, frames, height, width))
    video_fc = ("video_fc", (batch, frames, channels, height, width))
    packed = ("packed", (batch, (height // 2) * (width // 2) if p == 1 else height * width, channels))
    packed_video = ("packed_video", (batch, frames * height * width, channels))
    if "3D" in type(model).__name__:
        return [video, video_fc, packed_video]
    return [image, packed, video]


def _grid_ids(rows: int, cols: int, axes: int, frames: int = 1) -> torch.Tensor:
    """Positions (frame, row, col) of each token, padded to ``axes`` columns (Flux's ``img_ids``)."""
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    ids = torch.zeros(frames * rows * cols, axes)
    ids[:, max(0, axes - 3):] = torch.stack([f, r, c], -1).reshape(-1, 3)[:, -min(3, axes):].float()
    return ids


def _argument(name: str, model, layout: str, shape: tuple, batch: int, frames: int, h: int, w: int,
              device, dtype, mask_dtype) -> Any:
    """An example value for forward argument ``name``; ``inspect.Parameter.empty`` when unknown."""
    text = _config(model, *_TEXT_WIDTH)
    tokens = shape[1] if layout.startswith("packed") else None
    axes = len(_config(model, "axes_dims_rope", "axes_dims", default=(1, 1, 1)))
    full = lambda *s, v=0.0: torch.full(s, v, device=device, dtype=dtype)  # noqa: E731
    if name == timestep_argument(model.forward):
        return full(batch, v=0.5)
    if not isinstance(text, int):  # a list of widths (HiDream's per-encoder caption_channels): no single text width
        text = None
    if name in ("encoder_hidden_states", "cap_feats", "encoder_hidden_states_t5") and text is not None:
        return full(batch, _TEXT_TOKENS, text)
    if name == "pooled_projections" and _config(model, "pooled_projection_dim") is not None:
        return full(batch, model.config.pooled_projection_dim)
    if name == "guidance":
        return full(batch, v=3.5) if _config(model, "guidance_embeds") else None
    if name == "img_ids" and tokens is not None:
        side = int(round(tokens ** 0.5))
        return _grid_ids(side, tokens // side, axes).to(device=device, dtype=dtype)
    if name == "txt_ids":
        return torch.zeros(_TEXT_TOKENS, axes, device=device, dtype=dtype)
    if name == "added_cond_kwargs":
        if getattr(model, "use_additional_conditions", False):
            return {"resolution": full(batch, 2, v=float(8 * h)), "aspect_ratio": full(batch, 1, v=1.0)}
        return {"resolution": None, "aspect_ratio": None}
    if name in _TEXT_MASKS:
        return torch.ones(batch, _TEXT_TOKENS, device=device, dtype=mask_dtype)
    if name == "img_shapes" and tokens is not None:
        side = int(round(tokens ** 0.5))
        return [[(1, side, tokens // side)]] * batch
    if name == "num_frames":
        return frames
    if name in ("height", "width") and layout.startswith("packed"):
        return h if name == "height" else w
    if name in ("original_size", "target_size"):
        return full(batch, 2, v=float(8 * h))
    if name == "crop_coords":
        return full(batch, 2)
    if name == "class_labels" and _config(model, "num_embeds_ada_norm") is not None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if _config(model, f"{name}_embed_dim") is not None:  # an optional scalar the config gives an embedding (CogVideoX's ofs)
        return full(batch, v=2.0)
    return inspect.Parameter.empty


def example_inputs(model: nn.Module, batch: int = 2, height: int | None = None, width: int | None = None,
                   frames: int | None = None) -> dict:
    """Keyword arguments of a valid call of ``model``'s forward (zeros; positions where they matter).

    ``height``/``width`` are latent sizes; the default is small (4 patches a side), which
    is all tracing and verification need and still ranks the blocks' costs correctly.
    """
    from asyncgen._compat import FAKE_TENSOR_LOGGER, clear_method_caches, fake_tensor_mode, value_read_errors
    from asyncgen.cost.fake import (
        fake_nested,
        fake_device,
        meta_weights_as_fake,
    )

    param = next(model.parameters())
    device = param.device
    dtype = param.dtype if param.is_floating_point() else torch.float32
    t, p = _patch(model)
    h, w = height or 4 * p, width or 4 * p
    frames = frames or (2 * t if t > 1 else 3)
    parameters = list(inspect.signature(model.forward).parameters.values())
    sample_name = parameters[0].name
    errors, reads_values = [], False
    layouts = _latent_layouts(model, batch, frames, h, w)
    # a text mask in the model's dtype first (as the classes that add it to attention scores take it), then
    # as a tokenizer gives it, int64 (Lumina2 sums it into sequence lengths)
    mask_dtypes = [dtype, torch.int64] if any(p.name in _TEXT_MASKS for p in parameters) else [dtype]
    attempts = [(layout, shape, mask_dtype) for layout, shape in layouts for mask_dtype in mask_dtypes]
    known = _LAYOUTS.get(model)
    if known is not None:
        attempts = [a for a in attempts if (a[0], a[2]) == known]
    for layout, shape, mask_dtype in attempts:
        inputs = {sample_name: _as_annotated(parameters[0], torch.zeros(shape, device=device, dtype=dtype))}
        for param_ in parameters[1:]:
            if param_.name == "return_dict" or param_.kind in (inspect.Parameter.VAR_KEYWORD,
                                                                inspect.Parameter.VAR_POSITIONAL):
                continue
            value = _argument(param_.name, model, layout, shape, batch, frames, h, w, device, dtype, mask_dtype)
            if value is inspect.Parameter.empty:
                if param_.default is inspect.Parameter.empty:
                    break  # a required argument we cannot make: not this class's convention
                continue
            if value is not None or param_.default is inspect.Parameter.empty:
                inputs[param_.name] = _as_annotated(param_, value)
        else:
            if known is not None:
                return inputs
            fake_log = _stdlib_logging.getLogger(FAKE_TENSOR_LOGGER)
            level = fake_log.level
            fake_log.setLevel(_stdlib_logging.CRITICAL)  # a wrong layout's shape error is expected here
            # with weights at hand a real call at this tiny size is far quicker than a fake one
            try:
                if any(p.is_meta for p in model.parameters()):  # built on meta, or one rank's stage loaded
                    device_ = fake_device(_first_tensor(inputs[sample_name]))
                    with torch.no_grad(), fake_tensor_mode(allow_non_fake_inputs=True) as mode, \
                            meta_weights_as_fake(model, mode, device_):
                        model(**fake_nested(mode, inputs, device_), return_dict=False)
                else:
                    with torch.no_grad():
                        model(**inputs, return_dict=False)
            except Exception as exc:  # noqa: BLE001 - any failure means: not this layout
                first = (str(exc).splitlines() or [""])[0]  # an exception may carry no message (an assert)
                if isinstance(exc, value_read_errors()) and not reads_values:
                    reads_values = f"{type(exc).__name__}: {first[:120]}"
                mask = f" ({str(mask_dtype).removeprefix('torch.')} mask)" if len(mask_dtypes) > 1 else ""
                errors.append(f"{sample_name} {layout} {tuple(shape)}{mask}: {type(exc).__name__}: {first[:200]}")
                continue
            finally:
                fake_log.setLevel(level)
                clear_method_caches(model)  # a fake call leaves fake rotary tables in the model's caches
            _LAYOUTS[model] = (layout, mask_dtype)
            return inputs
        errors.append(f"{layout}: no example for the required argument {param_.name!r}")
    if reads_values:  # on meta weights a forward that reads values fails every layout alike; with weights it may split
        raise NeedsRealWeights(f"{type(model).__name__}: its forward cannot be traced on fake tensors (it reads tensor "
                               f"values: {reads_values}); it splits only with its weights loaded")
    raise ExampleUnavailable(
        f"cannot build an example call of {type(model).__name__}.forward from its signature and config (config path; "
        f"tried {'; '.join(errors)}); a loaded pipeline takes the example from its first denoiser call instead"
    )


def _first_tensor(value):
    """The first tensor of a per-sample list (ZImage's latents), or ``value`` itself."""
    return value[0] if isinstance(value, (list, tuple)) else value


def _as_annotated(parameter: inspect.Parameter, value):
    """``value`` as the forward's annotation asks: a per-sample list of a batch tensor where it says ``list[Tensor]``."""
    if isinstance(value, torch.Tensor) and is_list_of_tensors(parameter):
        return list(value.unbind(0))
    return value


def transformer_split(denoiser: nn.Module, verify: bool = True, call: dict | None = None) -> BlockSplit:
    """The generic block split of a transformer denoiser, verified against its forward unless ``verify=False``."""
    return BlockSplit(denoiser, example_inputs, verify=verify, call=call)
