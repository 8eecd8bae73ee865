"""Text encoders and the VAE on one rank (or a few), their outputs broadcast to the rest.

The stock pipeline ``__call__`` runs on every rank and calls ``self.text_encoder(...)``,
``self.vae.decode(...)`` and ``self.vae.encode(...)`` the same number of times, in the
same order, on every rank. A :class:`ComponentProxy` stands in for such a component
(the same idea as the denoiser proxy, :mod:`asyncgen.proxy`): on the rank the plan
gives the component it calls the real module; that rank then broadcasts the output,
its structure first (which fields, shapes, dtypes: the others cannot know them) and
then its tensors, and every rank returns an equal object of the stock output type
(``BaseModelOutputWithPooling``, ``CLIPTextModelOutput``, ``DecoderOutput``, a tuple
with ``return_dict=False``, ``AutoencoderKLOutput`` with its latent distribution, ...).
The tensors travel unchanged, so every rank's output equals the owner's bit for bit.

A text encoder placed as sequential layer ranges (:mod:`asyncgen.encoder_split`) runs
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

import dataclasses
import inspect
import math
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .distributed import DistContext, control_device, p2p_device, remote_error
from .encoder_split import modules_for_layers, run_layers, split_call_arguments
from .memory_plan import Placement

__all__ = [
    "ComponentProxy",
    "TextEncoderProxy",
    "VaeProxy",
    "PLACEABLE_COMPONENTS",
    "release_weights",
    "resident_modules",
]

# pipeline attributes a plan may place; anything else (tokenizers, controlnets, image encoders) stays replicated
PLACEABLE_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")


# ------------------------------------------------------------------ structure of an output


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a tensor sits in an output's structure: its index in the tensor list, shape, dtype and strides.

    Strides travel too (``None``: the tensor is sent contiguous): the receivers rebuild the
    owner's memory layout, because a kernel may pick another algorithm for another
    layout (a channels-last latent through a convolution sums in another order).
    """

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...] | None = None


def _dense_strides(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """``tensor``'s strides when its elements fill a block of memory without gaps or overlap, else None."""
    expected = 1
    dims = sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s > 1)
    for stride, size in dims:
        if stride != expected:
            return None
        expected *= size
    return tuple(tensor.stride())


_OUTPUT_KIND, _SEQUENCE_KIND, _DICT_KIND, _GAUSSIAN_KIND = "output", "sequence", "dict", "gaussian"


def _is_output(value) -> bool:
    # transformers' ModelOutput and diffusers' BaseOutput: ordered dicts that are also dataclasses
    return isinstance(value, OrderedDict) and dataclasses.is_dataclass(value)


def _skeleton(value, tensors: list[torch.Tensor]):
    """``value`` with every tensor replaced by a :class:`_Slot` (appending the tensor to ``tensors``)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1, tuple(value.shape), value.dtype, _dense_strides(value))
    if _is_output(value):
        return (_OUTPUT_KIND, type(value), [(k, _skeleton(v, tensors)) for k, v in value.items()])
    if isinstance(value, (tuple, list)):
        return (_SEQUENCE_KIND, type(value), [_skeleton(v, tensors) for v in value])
    if isinstance(value, dict):
        return (_DICT_KIND, type(value), [(k, _skeleton(v, tensors)) for k, v in value.items()])
    if type(value).__name__ == "DiagonalGaussianDistribution":
        # the VAE's latent distribution: its parameters define it (mean, std, ... are computed from them)
        return (_GAUSSIAN_KIND, type(value), (_skeleton(value.parameters, tensors), bool(value.deterministic)))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot send a {type(value).__name__} between ranks (an output of a placed component)")


def _rebuild(skeleton, tensors: Sequence[torch.Tensor]):
    if isinstance(skeleton, _Slot):
        return tensors[skeleton.index]
    if isinstance(skeleton, tuple) and len(skeleton) == 3 and skeleton[0] in (
            _OUTPUT_KIND, _SEQUENCE_KIND, _DICT_KIND, _GAUSSIAN_KIND):
        kind, cls, items = skeleton
        if kind == _OUTPUT_KIND:
            return cls(**{k: _rebuild(v, tensors) for k, v in items})
        if kind == _SEQUENCE_KIND:
            values = [_rebuild(v, tensors) for v in items]
            return cls(*values) if hasattr(cls, "_fields") else cls(values)
        if kind == _DICT_KIND:
            return cls((k, _rebuild(v, tensors)) for k, v in items)
        parameters, deterministic = items
        return cls(_rebuild(parameters, tensors), deterministic=deterministic)
    return skeleton


def _slots(skeleton) -> list[_Slot]:
    found: list[_Slot] = []

    def walk(node):
        if isinstance(node, _Slot):
            found.append(node)
        elif isinstance(node, (tuple, list)):
            for item in node:
                walk(item)

    walk(skeleton)
    return sorted(found, key=lambda s: s.index)


# ------------------------------------------------------------------ moving outputs between ranks


class _Wire:
    """Sends structured outputs over the wrapper's group: the structure as an object, then each tensor."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        backend = dist.get_backend(ctx.group)
        self.device = ctx.device or torch.device("cpu")
        self.wire = p2p_device(backend, self.device)
        self.control = control_device(backend, self.wire)

    def _comm(self, fn, *args, **kwargs):
        try:
            work = fn(*args, **kwargs)
            if isinstance(work, dist.Work):  # an async_op's handle (the object-list calls return nothing to wait for)
                if self.wire.type == "cpu":
                    work.wait(self.ctx.timeout)
                else:  # the compute stream waits for the transfer; the group's own timeout covers a hang
                    work.wait()
        except Exception as exc:
            raise remote_error(self.ctx, exc) from exc

    def _outgoing(self, tensor: torch.Tensor, slot: _Slot) -> torch.Tensor:
        tensor = tensor.detach()
        if slot.stride is not None:  # its block of memory as it is, in memory order
            tensor = tensor.as_strided((tensor.numel(),), (1,))
        if tensor.dtype == torch.bool:  # not every backend copies bool: send the bytes
            tensor = tensor.to(torch.uint8)
        return tensor.to(self.wire).contiguous()

    def _empty(self, slot: _Slot) -> torch.Tensor:
        dtype = torch.uint8 if slot.dtype == torch.bool else slot.dtype
        shape = (math.prod(slot.shape),) if slot.stride is not None else slot.shape
        return torch.empty(shape, dtype=dtype, device=self.wire)

    def _arrived(self, buffer: torch.Tensor, slot: _Slot) -> torch.Tensor:
        buffer = buffer.to(self.device)
        if slot.dtype == torch.bool:
            buffer = buffer.to(torch.bool)
        return buffer.as_strided(slot.shape, slot.stride) if slot.stride is not None else buffer

    def broadcast(self, value, src: int):
        """``value`` from group rank ``src``; every other rank passes ``None`` and gets an equal object."""
        source = self.ctx.global_rank(src)
        tensors: list[torch.Tensor] = []
        header = [_skeleton(value, tensors) if self.ctx.rank == src else None]
        self._comm(dist.broadcast_object_list, header, src=source, group=self.ctx.group, device=self.control)
        slots = _slots(header[0])
        if self.ctx.rank == src:
            for tensor, slot in zip(tensors, slots):
                self._comm(dist.broadcast, self._outgoing(tensor, slot), source, group=self.ctx.group, async_op=True)
            return value
        received = []
        for slot in slots:
            buffer = self._empty(slot)
            self._comm(dist.broadcast, buffer, source, group=self.ctx.group, async_op=True)
            received.append(self._arrived(buffer, slot))
        return _rebuild(header[0], received)

    def send(self, value, dst: int) -> None:
        peer = self.ctx.global_rank(dst)
        tensors: list[torch.Tensor] = []
        header = [_skeleton(value, tensors)]
        self._comm(dist.send_object_list, header, peer, group=self.ctx.group, device=self.control)
        for tensor, slot in zip(tensors, _slots(header[0])):
            self._comm(dist.isend, self._outgoing(tensor, slot), peer, group=self.ctx.group)

    def recv(self, src: int):
        peer = self.ctx.global_rank(src)
        header = [None]
        self._comm(dist.recv_object_list, header, peer, group=self.ctx.group, device=self.control)
        received = []
        for slot in _slots(header[0]):
            buffer = self._empty(slot)
            self._comm(dist.irecv, buffer, peer, group=self.ctx.group)
            received.append(self._arrived(buffer, slot))
        return _rebuild(header[0], received)


# ------------------------------------------------------------------ residency


def resident_modules(component: nn.Module, placements: Sequence[Placement], rank: int) -> list[nn.Module]:
    """The modules of ``component`` that ``rank`` runs under ``placements`` (empty when it runs none)."""
    modules: list[nn.Module] = []
    for p in placements:
        if p.rank != rank:
            continue
        if p.layers is None:
            return [component]
        modules += modules_for_layers(component, p.layers[0], p.layers[1])
    return modules


def _kept_buffers(component: nn.Module) -> list[tuple[str, nn.Module, str, torch.Tensor]]:
    """(module path, module, name, tensor) of the buffers every rank keeps: all of the component's own and the
    persistent ones of its submodules (statistics and constants, a few numbers each; rotary tables and position
    ids are non-persistent and stay out)."""
    return [(prefix, module, name, tensor)
            for prefix, module in component.named_modules() for name, tensor in module._buffers.items()
            if tensor is not None and (module is component or name not in module._non_persistent_buffers_set)]


def own_buffers(component: nn.Module) -> list[nn.Module]:
    """The component's persistent buffers (its own and its submodules'), in a holder module; [] when it has none.

    Every rank keeps them, running the component or not: pipelines read a few of them
    directly (LTX's ``vae.latents_mean``/``latents_std``, Flux.2's ``vae.bn.running_mean``/
    ``running_var``). The holder registers the same tensor objects, so loading into it loads
    into the component (a non-persistent buffer is in no weight file: it stays out).
    """
    holder = nn.Module()
    for prefix, module, name, tensor in _kept_buffers(component):
        if name not in module._non_persistent_buffers_set:
            holder.register_buffer(f"{prefix}.{name}".replace(".", "_") if prefix else name, tensor)
    return [holder] if holder._buffers else []


def release_weights(component: nn.Module, keep: Sequence[nn.Module]) -> int:
    """Move every parameter and buffer of ``component`` outside ``keep`` to the meta device; returns bytes freed.

    Tied parameters stay tied (T5's token embedding is ``shared``'s weight). The
    component's own buffers and its submodules' persistent ones stay too: pipelines read them
    as attributes on every rank (LTX's ``self.vae.latents_mean``/``latents_std``, Flux.2's
    ``self.vae.bn.running_mean``), and they are a few numbers.
    """
    kept = {id(t) for m in keep for t in (*m.parameters(), *m.buffers())}
    kept |= {id(t) for _, _, _, t in _kept_buffers(component)}
    replaced: dict[int, torch.Tensor] = {}
    freed = 0
    for module in component.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or id(tensor) in kept or tensor.device.type == "meta":
                    continue
                if id(tensor) not in replaced:
                    freed += tensor.numel() * tensor.element_size()
                    meta = tensor.detach().to("meta")
                    if isinstance(tensor, nn.Parameter):
                        meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
                    replaced[id(tensor)] = meta
                table[name] = replaced[id(tensor)]
    return freed


# ------------------------------------------------------------------ the proxies


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


class ComponentProxy(nn.Module):
    """Stands in for a pipeline component that runs on some ranks only (see the module docstring)."""

    # the methods whose signatures the proxy reports as the component's
    mirrored_methods: tuple[str, ...] = ("forward",)

    def __init__(self, name: str, component: nn.Module, placements: Sequence[Placement], ctx: DistContext):
        super().__init__()
        if not placements:
            raise ValueError(f"{name}: a placed component needs at least one placement")
        # not registered as a submodule: on most ranks its weights are on the meta device
        object.__setattr__(self, "_component", component)
        object.__setattr__(self, "_wire", _Wire(ctx))
        self.name, self.placements, self.ctx = name, list(placements), ctx
        self.resident = nn.ModuleList(resident_modules(component, placements, ctx.rank))
        self._home = ctx.device or torch.device("cpu")
        self.calls = 0  # outputs this rank computed itself
        real = getattr(component, "_orig_mod", component)  # a torch.compile'd component: the module it compiled
        for method in self.mirrored_methods:
            if callable(getattr(real, method, None)):
                object.__setattr__(self, method, _Mirrored(getattr(self, method), inspect.signature(getattr(real, method))))

    @property
    def component(self) -> nn.Module:
        return self._component

    @property
    def runs_here(self) -> bool:
        return any(p.rank == self.ctx.rank for p in self.placements)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            component = self.__dict__.get("_component")
            if component is None:
                raise
            return getattr(component, name)

    @property
    def device(self) -> torch.device:
        for p in self.resident.parameters():
            return p.device
        return self._home  # the rank's device, not meta: DiffusionPipeline.device reads the first component's

    def to(self, *args, **kwargs):
        """Move the resident modules; a dtype change also reaches the meta rest (so ``dtype`` agrees everywhere)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        super().to(*args, **kwargs)
        if device is not None:
            self._home = torch.device(device)
        # the kept buffers (its own, its submodules' persistent ones) stay on every rank (see release_weights):
        # move them here when the resident modules do not hold them
        held = {id(t) for t in self.resident.buffers()}
        for _, module, name, tensor in _kept_buffers(self._component):
            if id(tensor) not in held and tensor.device.type != "meta":
                to_dtype = dtype if dtype is not None and tensor.is_floating_point() else None
                module._buffers[name] = tensor.to(device=device, dtype=to_dtype)
        if dtype is not None:
            for module in self._component.modules():
                for table in (module._parameters, module._buffers):
                    for name, tensor in table.items():
                        if tensor is not None and tensor.device.type == "meta" and tensor.is_floating_point():
                            table[name].data = tensor.data.to(dtype)
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
        if "use_cache" not in kwargs and "use_cache" in inspect.signature(self._component.forward).parameters:
            kwargs["use_cache"] = False
        if len(self.placements) == 1 and self.placements[0].layers is None:
            return self._owner_run(self.placements[0].rank, self._component, *args, **kwargs)
        return self._run_ranges(args, kwargs)

    def _run_ranges(self, args, kwargs):
        ranges = sorted(self.placements, key=lambda p: p.layers)
        # every rank checks the arguments (they are the same everywhere): a refusal happens on all of them
        call = split_call_arguments(self._component, args, kwargs)
        carry, rank = None, self.ctx.rank
        for i, p in enumerate(ranges):
            if p.rank != rank:
                continue
            if i > 0 and ranges[i - 1].rank != rank:
                carry = self._wire.recv(ranges[i - 1].rank)
                carry = _carry_from(carry)
            carry = run_layers(self._component, p.layers[0], p.layers[1], call, carry)
            if i + 1 < len(ranges) and ranges[i + 1].rank != rank:
                self._wire.send(carry.tensors(), ranges[i + 1].rank)
        if ranges[-1].rank == rank:
            self.calls += 1
        return self._wire.broadcast(carry if ranges[-1].rank == rank else None, ranges[-1].rank)


def _carry_from(received: dict):
    from .encoder_split import EncoderCarry

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
        return self._owner_run(self._owner(), self._component.decode, *args, **kwargs)

    def encode(self, *args, **kwargs):
        return self._owner_run(self._owner(), self._component.encode, *args, **kwargs)

    def forward(self, *args, **kwargs):
        return self._owner_run(self._owner(), self._component, *args, **kwargs)


def make_proxy(name: str, component: nn.Module, placements: Sequence[Placement], ctx: DistContext) -> ComponentProxy:
    """The proxy for pipeline attribute ``name`` (``text_encoder*`` or ``vae``)."""
    if name == "vae":
        return VaeProxy(name, component, placements, ctx)
    if name.startswith("text_encoder"):
        return TextEncoderProxy(name, component, placements, ctx)
    raise ValueError(f"component {name!r} cannot be placed; placeable: {', '.join(PLACEABLE_COMPONENTS)}")


# ------------------------------------------------------------------ where components go (until the planner's plan)


def _bytes_of(modules: Sequence[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def lightest_rank_placements(components: dict[str, nn.Module], rank_bytes: Sequence[int]) -> list[Placement]:
    """Each component whole on the rank that holds the fewest bytes so far (largest component first).

    ``rank_bytes`` is what each rank already holds (its denoiser stage and the shared
    modules). A simple default for when no memory plan is given: it never splits an
    encoder into layer ranges. Ties go to the lowest rank, so every rank computes the
    same placements.
    """
    load = list(rank_bytes)
    placements = []
    names = list(components)
    for name in sorted(names, key=lambda n: (-_bytes_of([components[n]]), names.index(n))):
        rank = min(range(len(load)), key=lambda r: (load[r], r))
        load[rank] += _bytes_of([components[name]])
        placements.append(Placement(name, rank, None))
    return placements


def place_components(pipeline, stage_modules: Sequence[Sequence[nn.Module]], shared_modules: Sequence[nn.Module],
                     stage_of_rank: Sequence[int], ctx: DistContext, placements: Sequence[Placement] | None = None,
                     release: bool = True) -> dict[str, list[Placement]]:
    """Put a proxy in place of each text encoder and the VAE of ``pipeline``; returns where each runs.

    ``placements`` (e.g. from a memory plan) says where; without it, each component goes
    whole to the lightest rank (:func:`lightest_rank_placements`, counting each rank's
    stage ``stage_of_rank[r]`` plus the shared modules). With ``release`` the weights this
    rank does not run move to the meta device (``False`` when the modules are shared with
    another pipeline, as after ``from_pipe``).
    """
    present = {name: getattr(pipeline, name) for name in PLACEABLE_COMPONENTS
               if isinstance(getattr(pipeline, name, None), nn.Module)
               and not isinstance(getattr(pipeline, name), ComponentProxy)}
    if placements is None:
        shared = _bytes_of(shared_modules)
        rank_bytes = [shared + _bytes_of(stage_modules[s]) for s in stage_of_rank]
        placements = lightest_rank_placements(present, rank_bytes)
    by_name: dict[str, list[Placement]] = {}
    for p in placements:
        if p.component in present:
            by_name.setdefault(p.component, []).append(p)
        if not 0 <= p.rank < ctx.world_size:
            raise ValueError(f"placement {p} names a rank outside the group of {ctx.world_size}")
    for name, component in present.items():
        mine = sorted(by_name.get(name, []), key=lambda p: p.layers or (0, 0))
        if not mine:
            continue  # not placed: stays replicated
        proxy = make_proxy(name, component, mine, ctx)
        if release:
            release_weights(component, list(proxy.resident))
        # bypass DiffusionPipeline.__setattr__: the pipeline's config still names the real class
        object.__setattr__(pipeline, name, proxy)
        by_name[name] = mine
    return by_name
