"""Bytes of parameters: per module, per component, per stage of a denoiser.

Measures what the planner plans with; works on meta modules too (sizes from shapes).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from asyncgen._compat import keep_in_fp32_modules
from asyncgen.cost.activation import estimate_unit_activation_bytes
from asyncgen.placement.planner import ComponentSize, DenoiserSize


def parameter_sizes(model: nn.Module, dtype: torch.dtype | None = None) -> dict[int, int]:
    """Bytes of each parameter of ``model`` (by ``id``) once loaded in ``dtype`` (None: as it is).

    Floating parameters take ``dtype``'s size, except that a float16 load keeps the
    modules a model names in ``_keep_in_fp32_modules`` in float32, as ``from_pretrained``
    does (T5's ``wo``). Works on the meta device: only shapes and dtypes are read.
    """
    keep = set(keep_in_fp32_modules(model)) if dtype == torch.float16 else set()
    sizes: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        if dtype is None or not p.is_floating_point():
            size = p.element_size()
        elif keep and keep & set(name.split(".")):
            size = 4
        else:
            size = torch.empty((), dtype=dtype).element_size()
        sizes[id(p)] = p.numel() * size
    return sizes


def modules_bytes(modules: Sequence[nn.Module], sizes: dict[int, int], exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct parameters of ``modules`` (tied parameters once), leaving out ``exclude`` ids."""
    seen: set[int] = set(exclude)
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += sizes[id(p)]
    return total


def component_size(name: str, model: nn.Module, dtype: torch.dtype | None = None) -> ComponentSize:
    """A component's bytes, per block too when :mod:`asyncgen.split.text_encoder` can cut it into layer ranges."""
    from asyncgen.split.text_encoder import encoder_blocks, is_splittable, modules_for_layers

    sizes = parameter_sizes(model, dtype)
    whole = sum(sizes.values())
    if not is_splittable(model):
        return ComponentSize(name, whole)
    blocks = list(encoder_blocks(model))
    count = len(blocks)
    layer_bytes = tuple(modules_bytes([b], sizes) for b in blocks)
    head = modules_bytes(modules_for_layers(model, 0, 1, count), sizes) - layer_bytes[0]
    tail = modules_bytes(modules_for_layers(model, count - 1, count, count), sizes) - layer_bytes[-1]
    if count == 1 or head + sum(layer_bytes) + tail != whole:
        # parameters outside the embeddings, blocks and final norm: the ranges would not cover
        # the component, so it runs whole
        return ComponentSize(name, whole)
    return ComponentSize(name, whole, layer_bytes, head, tail)


def denoiser_size(split, cuts: Sequence[int], dtype: torch.dtype | None = None,
                  activation_inputs: dict | None = None) -> DenoiserSize:
    """Bytes of the shared modules and of each stage between ``cuts``; activations if inputs are given.

    ``activation_inputs`` (the denoiser's forward keywords at the size and batch one rank
    runs, e.g. ``split.example_inputs(batch, h, w)``) turns on the activation estimate of
    :func:`estimate_unit_activation_bytes`; without them activations count as 0.
    """
    sizes = parameter_sizes(split.denoiser, dtype)
    shared_modules = split.shared_modules()
    shared_ids = {id(p) for m in shared_modules for p in m.parameters()}
    shared = modules_bytes(shared_modules, sizes)
    stage_units, stage_bytes = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        units = split.units[a:b]
        stage_units.append(tuple(u.name for u in units))
        stage_bytes.append(modules_bytes([m for u in units for m in u.modules], sizes, shared_ids))
    if activation_inputs is None:
        activations = [0] * (len(cuts) - 1)
    else:
        per_unit = estimate_unit_activation_bytes(split, activation_inputs)
        activations = [max(per_unit[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return DenoiserSize(tuple(stage_units), tuple(stage_bytes), shared, tuple(activations), max(activations))
