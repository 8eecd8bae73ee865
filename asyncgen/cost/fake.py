"""Running a model on shapes alone: fake tensors, meta weights seen as fake, and the
exceptions that mean a forward reads tensor values.

Owns the fake-tensor runner every cost estimate, trace and activation estimate uses;
knows nothing of stages, schedules or ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from asyncgen._compat import (  # clear_method_caches, value_read_errors: other modules import them from here too
    clear_method_caches,
    fake_from_meta,
    fake_tensor_mode,
    own_tensors,
    replace_tensor,
    tree_leaves,
    value_read_errors,
)


def fake_device(sample: torch.Tensor) -> torch.device:
    """Where a fake run with ``sample`` pretends to be: its device, the CPU for a meta tensor."""
    return torch.device("cpu") if sample.is_meta else sample.device


def meta_weights_as_fake(model: nn.Module, fake_mode, device: torch.device):
    """``model``'s meta parameters and buffers stand in as fake tensors on ``device`` (restored on exit).

    A model built on the meta device, or partly loaded (one rank's stage), then runs under
    ``fake_mode`` exactly like the loaded model: weights on ``meta`` beside real ones would
    be a device mismatch, and on ``meta`` the kernels decompose differently (attention into
    its maths), which changes the counted bytes by up to 2x and could move the cuts.
    """
    return weights_swapped(model, lambda tensor: fake_from_meta(fake_mode, tensor, device) if tensor.is_meta else None)


@contextlib.contextmanager
def weights_swapped(model: nn.Module, stand_in: Callable[[torch.Tensor], torch.Tensor | None]):
    """Every parameter and buffer ``t`` of ``model`` for which ``stand_in(t)`` gives a tensor is replaced by it
    (a tensor held under two names by one stand-in: tied weights stay tied), and put back on exit."""
    swapped, stand_ins = [], {}
    for module in model.modules():
        for name, tensor, _ in own_tensors(module):
            if id(tensor) not in stand_ins:
                stand_ins[id(tensor)] = stand_in(tensor)
            if stand_ins[id(tensor)] is not None:
                swapped.append((module, name, tensor))
    for module, name, tensor in swapped:
        replace_tensor(module, name, stand_ins[id(tensor)])
    try:
        yield
    finally:
        for module, name, tensor in swapped:
            replace_tensor(module, name, tensor)


def run_on_shapes(model: nn.Module, inputs: dict, sample_argument: str, fn: Callable[[dict], Any]) -> Any:
    """``fn(inputs)`` under ``FakeTensorMode``, every input faked and meta weights as fakes (no arithmetic).

    A forward whose Python reads tensor values (``.tolist()`` of a mask's sums, a ``nonzero``)
    cannot run on fake tensors. When the model and the inputs are all real, ``fn`` then runs
    on the real tensors instead (the example calls are tiny): what the callers record (the
    blocks called and what feeds them, FLOPs, bytes) depends on shapes, not on values, so
    both runs give the same answer. ``fn`` may therefore run twice: it must start afresh.
    """
    device = fake_device(inputs[sample_argument])
    try:
        with torch.no_grad(), fake_tensor_mode(allow_non_fake_inputs=True) as fake_mode, \
                meta_weights_as_fake(model, fake_mode, device):
            return fn({k: fake_nested(fake_mode, v, device) for k, v in inputs.items()})
    except value_read_errors():
        tensors = [*model.parameters(), *model.buffers(), *tree_leaves(inputs)]
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
            raise  # no weights (or inputs) to run for real
    finally:
        clear_method_caches(model)  # what the fake run cached is fake
    with torch.no_grad():
        return fn(dict(inputs))


def fake_nested(mode, value, device: torch.device | None = None):
    """``value`` with every tensor faked; meta tensors pretend to be on ``device`` (see :func:`fake_device`)."""
    if isinstance(value, dict):
        return {k: fake_nested(mode, v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(fake_nested(mode, v, device) for v in value)
    if isinstance(value, torch.Tensor):
        if value.is_meta and device is not None:
            return fake_from_meta(mode, value, device)
        return mode.from_tensor(value)
    return value
