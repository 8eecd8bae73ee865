"""Classifier-free-guidance parallelism: the [uncond, cond] batch split across two rank groups.

Diffusers pipelines that use CFG call the denoiser once per step on a doubled batch,
``[uncond..., cond...]``. With CFG parallelism the ranks form two equal groups: group 0
(ranks ``0..M-1``) runs the whole AsyncDiff schedule on the first half of the batch,
group 1 (ranks ``M..2M-1``) on the second half, ``M = stages + stride - 1``. Each group's
last stage sends its half of the prediction to every rank, so every rank reassembles
the full prediction and the pipeline's own guidance combination runs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


def batch_part(value: Any, part: int, parts: int, batch: int) -> Any:
    """The ``part``-th of ``parts`` equal slices of every tensor in ``value`` whose first dim is ``batch``.

    Works through dicts, lists and tuples (added_cond_kwargs, ControlNet residuals).
    Tensors without that leading dimension (a scalar timestep, rotary ids) pass unchanged.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == batch:
            size = batch // parts
            return value[part * size : (part + 1) * size]
        return value
    if isinstance(value, dict):
        return {k: batch_part(v, part, parts, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(batch_part(v, part, parts, batch) for v in value)
    return value
