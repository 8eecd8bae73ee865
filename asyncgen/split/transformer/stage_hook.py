"""Running one stage of a traced transformer inside the model's own forward.

A :class:`diffusers.hooks.ModelHook` on each block is inert unless a stage is running:
blocks before the stage pass their inputs through, the first block takes the received
state, and the inputs of the block after the stage end the forward with
:class:`StageExit`. The blocks stay the model's own eager modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import logging
from torch import nn

from asyncgen._compat import hook_original_forward
from asyncgen.split.boundary import BoundaryState
from asyncgen.split.transformer.trace import bind_call, build_passthrough, named_values, replace_named

logger = logging.get_logger(f"diffusers.{__name__}")


_HOOK_NAME = "asyncgen_block_stage"


class StageExit(Exception):
    """Ends the model's forward at the first block after a stage, carrying that block's inputs."""

    def __init__(self, state: BoundaryState):
        super().__init__("stage done")
        self.state = state


@dataclass
class StageRun:
    """One stage's pass through the model's forward: blocks ``[start, stop)`` compute."""

    split: Any  # the BlockSplit running this stage (it imports this module, so not named here)
    start: int
    stop: int
    state: BoundaryState | None  # replaces block ``start``'s inputs (None: the forward's own)
    record: Callable[[int, BoundaryState], None] | None = None  # sees every block's incoming state

    replaced: bool = False
    probe: Callable | None = None  # estimate_unit_costs / measure_unit_costs: wraps each block's compute

    def block(self, index: int, module: nn.Module, forward, args: tuple, kwargs: dict):
        # A forward may leave blocks out (SD3's ``skip_layers``): the state enters at the first
        # block called at or after ``start`` and leaves at the first one at or after ``stop``.
        split = self.split
        bound = bind_call(split._signatures[index], args, kwargs)
        if self.record is not None and index > 0:
            self.record(index, split._state_of(index, named_values(bound)))
        if index < self.start:
            return build_passthrough(split.trace.passthrough[index], named_values(bound))
        if index >= self.stop:
            if self.state is not None and not self.replaced:
                # the forward left out every block of this stage: the state passes unchanged
                raise StageExit(self.state)
            raise StageExit(split._state_of(index, named_values(bound)))
        if not self.replaced and self.state is not None:
            self.replaced = True
            # a copy: blocks may update their inputs in place, and a stale state is read again
            # (stride > 1 replicas, the next round)
            received = {k: v.clone() for k, v in split._named_state(index, self.state).items()}
            args, kwargs = replace_named(bound, received)
        if self.probe is None:
            return forward(*args, **kwargs)
        result = []
        self.probe(index, lambda: result.append(forward(*args, **kwargs)))
        return result[0]


class _BlockStageHook(ModelHook):
    """Inert unless a stage is running: then the stage decides what this block does."""

    def __init__(self):
        super().__init__()
        self.active: tuple[StageRun, int] | None = None

    def new_forward(self, module, *args, **kwargs):
        forward = hook_original_forward(self)
        if self.active is None:
            return forward(*args, **kwargs)
        run, index = self.active
        return run.block(index, module, forward, args, kwargs)


def stage_hook_of(block: nn.Module) -> _BlockStageHook:
    registry = HookRegistry.check_if_exists_or_initialize(block)
    hook = registry.get_hook(_HOOK_NAME)
    if hook is None:
        hook = _BlockStageHook()
        registry.register_hook(hook, _HOOK_NAME)
    return hook


@dataclass
class BlockCall:
    """A step's call of the denoiser, kept whole: every stage reruns the model's forward on it."""

    sample: torch.Tensor
    timestep: Any
    kwargs: dict = field(default_factory=dict)
