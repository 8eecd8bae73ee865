"""Splitting a denoiser into sequential stages.

A denoiser is described (by a model-family module such as :mod:`asyncgen.split.unet`) as a
chain of *units*: small pieces of the forward pass (a resnet/attention pair, a sampler,
a transformer block) that each map a :class:`~asyncgen.split.boundary.BoundaryState` to the
next. Composing all units reproduces the denoiser's forward exactly. A *stage* is a
contiguous run of units; the cut points are chosen from a per-unit cost so that stages
are balanced. Nothing here is keyed by checkpoint or repo id: units come from the module
structure and costs from counting (or timing) what each unit computes.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from asyncgen.split.boundary import BoundaryState

UnitFn = Callable[[BoundaryState, Any], BoundaryState]


@dataclass(eq=False)
class Unit:
    """One indivisible piece of a denoiser's forward pass."""

    name: str
    modules: tuple[nn.Module, ...]
    fn: UnitFn

    def __call__(self, state: BoundaryState, cond: Any) -> BoundaryState:
        return self.fn(state, cond)

    def parameters(self):
        for module in self.modules:
            yield from module.parameters()


class DenoiserSplit(abc.ABC):
    """A denoiser described as a chain of units, plus the pieces every rank shares.

    Subclasses implement one model family. ``conditioning`` computes what every unit of a
    step needs besides the boundary state (embeddings, processed text states, ControlNet
    residuals); it only uses the *shared* modules, which every rank keeps.
    """

    #: denoiser classes this split handles (checked with ``isinstance``)
    handles: tuple[type, ...] = ()
    #: names of the forward's latent argument, its timestep argument and the kwargs dict that carries a LoRA ``scale``
    sample_argument = "sample"
    timestep_argument = "timestep"
    lora_kwargs_name = "cross_attention_kwargs"
    #: extra streams a boundary state may carry besides ``hidden`` (in this order on the wire)
    stream_names: tuple[str, ...] = ()

    def __init__(self, denoiser: nn.Module):
        self.denoiser = denoiser
        self.units: list[Unit] = self.build_units()

    @abc.abstractmethod
    def build_units(self) -> list[Unit]:
        """The chain of units, in forward order."""

    @abc.abstractmethod
    def shared_modules(self) -> list[nn.Module]:
        """Small modules every rank keeps (time/text/class embeddings)."""

    @abc.abstractmethod
    def conditioning(self, sample: torch.Tensor, timestep: Any, **kwargs) -> Any:
        """Per-step inputs of the units other than the boundary state."""

    @abc.abstractmethod
    def initial_state(self, sample: torch.Tensor, cond: Any) -> BoundaryState:
        """B_0: the boundary state entering the first unit."""

    @abc.abstractmethod
    def output(self, state: BoundaryState) -> torch.Tensor:
        """The denoiser's prediction from B_N."""

    @abc.abstractmethod
    def output_like(self, sample: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor with the shape, dtype and device of the prediction."""

    @abc.abstractmethod
    def wrap_output(self, prediction: torch.Tensor, return_dict: bool):
        """The denoiser's return value (its output class, or a tuple) around ``prediction``."""

    @abc.abstractmethod
    def example_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None) -> dict:
        """Keyword inputs of the denoiser's forward, used to estimate unit costs."""

    def sample_tensor(self, sample) -> torch.Tensor:
        """The forward's sample argument as the one batch tensor the schedule carries (a UNet's already is)."""
        return sample

    def forward_units(self, state: BoundaryState, cond: Any, units: Sequence[Unit]) -> BoundaryState:
        for unit in units:
            state = unit(state, cond)
        return state

    def __call__(self, sample: torch.Tensor, timestep: Any, **kwargs) -> torch.Tensor:
        """Run the whole chain: must equal the denoiser's own forward exactly."""
        cond = self.conditioning(sample, timestep, **kwargs)
        return self.output(self.forward_units(self.initial_state(sample, cond), cond, self.units))


@dataclass
class Stage:
    """A contiguous run of units: what one rank (or replica group) computes."""

    index: int
    units: list[Unit]

    def __call__(self, split: DenoiserSplit, state: BoundaryState, cond: Any) -> BoundaryState:
        return split.forward_units(state, cond, self.units)

    def modules(self) -> list[nn.Module]:
        return [m for unit in self.units for m in unit.modules]

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]


def make_stages(split: DenoiserSplit, cuts: Sequence[int]) -> list[Stage]:
    n = len(split.units)
    if list(cuts) != sorted(cuts) or cuts[0] != 0 or cuts[-1] != n or len(set(cuts)) != len(cuts):
        raise ValueError(f"cut points must increase strictly from 0 to {n}, got {list(cuts)}")
    return [Stage(k, split.units[a:b]) for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
