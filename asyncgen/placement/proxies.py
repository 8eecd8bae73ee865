"""Text encoders and the VAE on one rank (or a few), their outputs broadcast to the rest.

The stock pipeline ``__call__`` runs on every rank and calls ``self.text_encoder(...)``,
``self.vae.decode(...)`` and ``self.vae.encode(...)`` the same number of times, in the
same order, on every rank. A :class:`ComponentProxy` stands in for such a component
(a proxy, because a pipeline calls the VAE's ``decode``/``encode``, which no forward hook sees): on the rank the plan
gives the component it calls the real module; that rank then broadcasts the output,
its structure first (which fields, shapes, dtypes: the others cannot know them) and
then its tensors, and every rank returns an equal object of the stock output type
(``BaseModelOutputWithPooling``, ``CLIPTextModelOutput``, ``DecoderOutput``, a tuple
with ``return_dict=False``, ``AutoencoderKLOutput`` with its latent distribution, ...).
The tensors travel unchanged, so every rank's output equals the owner's bit for bit.

A text encoder placed as sequential layer ranges (:mod:`asyncgen.split.text_encoder`) runs
range after range: each range's rank receives what crosses the cut from the rank of
the range before, runs its blocks and sends on; the last range's rank broadcasts.

The proxy registers only the modules this rank runs, so ``parameters()`` and
``pipe.to(device)`` see exactly the resident weights; the rest of the component stays on
the meta device (a dtype change still reaches it, so ``vae.dtype`` agrees on every rank:
SDXL upcasts its VAE by ``self.vae.to(dtype=torch.float32)`` and reads the dtype back).
Any other attribute (``config``, ``dtype``, ``enable_tiling``, ...) is the real
component's. LoRA on a text encoder: load it before wrapping.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn

from asyncgen._compat import compiled_original, parse_to_arguments, replace_tensor
from asyncgen.comm.context import DistContext
from asyncgen.comm.wire import Wire
from asyncgen.models import PLACEABLE_COMPONENTS
from asyncgen.placement.planner import Placement
from asyncgen.placement.residency import StandIn, kept_buffers, resident_modules
from asyncgen.split.text_encoder import run_layers, split_call_arguments




class _Mirrored:
    """A proxy method that reports the signature of the component's method it stands for.

    Pipelines branch on those signatures: StableVideoDiffusionPipeline and LattePipeline
    pass ``num_frames`` to ``vae.decode`` only when ``inspect.signature(self.vae.forward)``
    has it. A plain class (not a closure) so that a deep copy of the proxy calls the copy.
    """

    def __init__(self, method, signature: inspect.Signature):
        self.method, self.__signature__ = method, signature
        self.__name__ = method.__name__
        self.__doc__ = method.__doc__

    def __call__(self, *args, **kwargs):
        return self.method(*args, **kwargs)


class ComponentProxy(StandIn):
    """Stands in for a pipeline component that runs on some ranks only (see the module docstring)."""

    # the methods whose signatures the proxy reports as the component's
    mirrored_methods: tuple[str, ...] = ("forward",)

    def __init__(self, name: str, component: nn.Module, placements: Sequence[Placement], ctx: DistContext):
        if not placements:
            raise ValueError(f"{name}: a placed component needs at least one placement")
        super().__init__(component)  # held, not registered: on most ranks its weights are on the meta device
        object.__setattr__(self, "_wire", Wire(ctx))
        self.name, self.placements, self.ctx = name, list(placements), ctx
        self.resident = nn.ModuleList(resident_modules(component, placements, ctx.rank))
        self._home = ctx.device or torch.device("cpu")
        self.calls = 0  # outputs this rank computed itself
        real = compiled_original(component)  # a torch.compile'd component: the module it compiled
        for method in self.mirrored_methods:
            if callable(getattr(real, method, None)):
                object.__setattr__(self, method, _Mirrored(getattr(self, method), inspect.signature(getattr(real, method))))

    @property
    def component(self) -> nn.Module:
        return self._held

    @property
    def runs_here(self) -> bool:
        return any(p.rank == self.ctx.rank for p in self.placements)


    @property
    def device(self) -> torch.device:
        for p in self.resident.parameters():
            return p.device
        return self._home  # the rank's device, not meta: DiffusionPipeline.device reads the first component's

    def to(self, *args, **kwargs):
        """Move the resident modules; a dtype change also reaches the meta rest (so ``dtype`` agrees everywhere)."""
        device, dtype = parse_to_arguments(*args, **kwargs)
        super().to(*args, **kwargs)
        if device is not None:
            self._home = torch.device(device)
        # the kept buffers (its own, its submodules' persistent ones) stay on every rank (see release_weights):
        # move them here when the resident modules do not hold them
        held = {id(t) for t in self.resident.buffers()}
        for _, module, name, tensor in kept_buffers(self._held):
            if id(tensor) not in held and tensor.device.type != "meta":
                to_dtype = dtype if dtype is not None and tensor.is_floating_point() else None
                replace_tensor(module, name, tensor.to(device=device, dtype=to_dtype))
        if dtype is not None:
            for module in self._held.modules():
                for name, tensor in module.named_parameters(recurse=False, remove_duplicate=False):
                    if tensor.device.type == "meta" and tensor.is_floating_point():
                        tensor.data = tensor.data.to(dtype)
                for name, tensor in module.named_buffers(recurse=False, remove_duplicate=False):
                    if tensor.device.type == "meta" and tensor.is_floating_point():
                        tensor.data = tensor.data.to(dtype)
        return self

    def _owner_run(self, owner: int, fn, *args, **kwargs):
        """``fn`` on ``owner``, its output broadcast to every rank."""
        value = None
        if self.ctx.rank == owner:
            value = fn(*args, **kwargs)
            self.calls += 1
        return self._wire.broadcast(value, owner)


class TextEncoderProxy(ComponentProxy):
    """``pipe.text_encoder*``: the same call signature and output type as the encoder it stands for."""

    def forward(self, *args, **kwargs):
        # a decoder-only encoder (Gemma2 for Sana, GLM for CogView4) returns the prompt's KV cache by default: no
        # pipeline reads it and a Cache object cannot travel, so every rank gets past_key_values=None instead
        if "use_cache" not in kwargs and "use_cache" in inspect.signature(self._held.forward).parameters:
            kwargs["use_cache"] = False
        if len(self.placements) == 1 and self.placements[0].layers is None:
            return self._owner_run(self.placements[0].rank, self._held, *args, **kwargs)
        return self._run_ranges(args, kwargs)

    def _run_ranges(self, args, kwargs):
        ranges = sorted(self.placements, key=lambda p: p.layers)
        # every rank checks the arguments (they are the same everywhere): a refusal happens on all of them
        call = split_call_arguments(self._held, args, kwargs)
        carry, rank = None, self.ctx.rank
        for i, p in enumerate(ranges):
            if p.rank != rank:
                continue
            if i > 0 and ranges[i - 1].rank != rank:
                carry = self._wire.recv(ranges[i - 1].rank)
                carry = _carry_from(carry)
            carry = run_layers(self._held, p.layers[0], p.layers[1], call, carry)
            if i + 1 < len(ranges) and ranges[i + 1].rank != rank:
                self._wire.send(carry.tensors(), ranges[i + 1].rank)
        if ranges[-1].rank == rank:
            self.calls += 1
        return self._wire.broadcast(carry if ranges[-1].rank == rank else None, ranges[-1].rank)


def _carry_from(received: dict):
    from asyncgen.split.text_encoder import EncoderCarry

    recorded = received["recorded"]
    return EncoderCarry(received["hidden"], received["mask"], received["position_bias"],
                        list(recorded) if recorded is not None else None)


class VaeProxy(ComponentProxy):
    """``pipe.vae``: ``decode``, ``encode`` and ``forward`` run on the owner; every rank gets the output."""

    mirrored_methods = ("forward", "decode", "encode")

    def _owner(self) -> int:
        if len(self.placements) != 1 or self.placements[0].layers is not None:
            raise ValueError(f"{self.name} runs whole on one rank, got placements {self.placements}")
        return self.placements[0].rank

    def decode(self, *args, **kwargs):
        return self._owner_run(self._owner(), self._held.decode, *args, **kwargs)

    def encode(self, *args, **kwargs):
        return self._owner_run(self._owner(), self._held.encode, *args, **kwargs)

    def forward(self, *args, **kwargs):
        return self._owner_run(self._owner(), self._held, *args, **kwargs)


def make_proxy(name: str, component: nn.Module, placements: Sequence[Placement], ctx: DistContext) -> ComponentProxy:
    """The proxy for pipeline attribute ``name`` (``text_encoder*`` or ``vae``)."""
    if name == "vae":
        return VaeProxy(name, component, placements, ctx)
    if name.startswith("text_encoder"):
        return TextEncoderProxy(name, component, placements, ctx)
    raise ValueError(f"component {name!r} cannot be placed; placeable: {', '.join(PLACEABLE_COMPONENTS)}")
