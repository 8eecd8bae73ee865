"""The wire format of component outputs: a nested output's structure first, then its tensors.

A text encoder's or VAE's output (dataclasses, tuples, dicts of tensors) is flattened to
a skeleton and a list of tensors with their shapes, dtypes and strides; receivers rebuild
the very structure.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist

from asyncgen.comm.failure import remote_error
from asyncgen.comm.p2p import control_device, p2p_device, wait_for

if TYPE_CHECKING:  # the context imports this module
    from asyncgen.comm.context import DistContext


_OUTPUT_KIND, _SEQUENCE_KIND, _DICT_KIND, _GAUSSIAN_KIND = "output", "sequence", "dict", "gaussian"


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a tensor sits in an output's structure: its index in the tensor list, shape, dtype and strides.

    Strides travel too (``None``: the tensor is sent contiguous): the receivers rebuild the
    owner's memory layout, because a kernel may pick another algorithm for another
    layout (a channels-last latent through a convolution sums in another order).
    """

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...] | None = None


def dense_strides(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """``tensor``'s strides when its elements fill a block of memory without gaps or overlap, else None."""
    expected = 1
    dims = sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s > 1)
    for stride, size in dims:
        if stride != expected:
            return None
        expected *= size
    return tuple(tensor.stride())


def is_output(value) -> bool:
    # transformers' ModelOutput and diffusers' BaseOutput: ordered dicts that are also dataclasses
    return isinstance(value, OrderedDict) and dataclasses.is_dataclass(value)


def skeleton_of(value, tensors: list[torch.Tensor]):
    """``value`` with every tensor replaced by a :class:`Slot` (appending the tensor to ``tensors``)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return Slot(len(tensors) - 1, tuple(value.shape), value.dtype, dense_strides(value))
    if is_output(value):
        return (_OUTPUT_KIND, type(value), [(k, skeleton_of(v, tensors)) for k, v in value.items()])
    if isinstance(value, (tuple, list)):
        return (_SEQUENCE_KIND, type(value), [skeleton_of(v, tensors) for v in value])
    if isinstance(value, dict):
        return (_DICT_KIND, type(value), [(k, skeleton_of(v, tensors)) for k, v in value.items()])
    if type(value).__name__ == "DiagonalGaussianDistribution":
        # the VAE's latent distribution: its parameters define it (mean, std, ... are computed from them)
        return (_GAUSSIAN_KIND, type(value), (skeleton_of(value.parameters, tensors), bool(value.deterministic)))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot send a {type(value).__name__} between ranks (an output of a placed component)")


def rebuild(skeleton, tensors: Sequence[torch.Tensor]):
    if isinstance(skeleton, Slot):
        return tensors[skeleton.index]
    if isinstance(skeleton, tuple) and len(skeleton) == 3 and skeleton[0] in (
            _OUTPUT_KIND, _SEQUENCE_KIND, _DICT_KIND, _GAUSSIAN_KIND):
        kind, cls, items = skeleton
        if kind == _OUTPUT_KIND:
            return cls(**{k: rebuild(v, tensors) for k, v in items})
        if kind == _SEQUENCE_KIND:
            values = [rebuild(v, tensors) for v in items]
            return cls(*values) if hasattr(cls, "_fields") else cls(values)
        if kind == _DICT_KIND:
            return cls((k, rebuild(v, tensors)) for k, v in items)
        parameters, deterministic = items
        return cls(rebuild(parameters, tensors), deterministic=deterministic)
    return skeleton


def slots_of(skeleton) -> list[Slot]:
    found: list[Slot] = []

    def walk(node):
        if isinstance(node, Slot):
            found.append(node)
        elif isinstance(node, (tuple, list)):
            for item in node:
                walk(item)

    walk(skeleton)
    return sorted(found, key=lambda s: s.index)


class Wire:
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
                wait_for(work, self.ctx.timeout, stream_ordered=self.wire.type != "cpu")
        except Exception as exc:
            raise remote_error(self.ctx, exc) from exc

    def _outgoing(self, tensor: torch.Tensor, slot: Slot) -> torch.Tensor:
        tensor = tensor.detach()
        if slot.stride is not None:  # its block of memory as it is, in memory order
            tensor = tensor.as_strided((tensor.numel(),), (1,))
        if tensor.dtype == torch.bool:  # not every backend copies bool: send the bytes
            tensor = tensor.to(torch.uint8)
        return tensor.to(self.wire).contiguous()

    def _empty(self, slot: Slot) -> torch.Tensor:
        dtype = torch.uint8 if slot.dtype == torch.bool else slot.dtype
        shape = (math.prod(slot.shape),) if slot.stride is not None else slot.shape
        return torch.empty(shape, dtype=dtype, device=self.wire)

    def _arrived(self, buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
        buffer = buffer.to(self.device)
        if slot.dtype == torch.bool:
            buffer = buffer.to(torch.bool)
        return buffer.as_strided(slot.shape, slot.stride) if slot.stride is not None else buffer

    def broadcast(self, value, src: int):
        """``value`` from group rank ``src``; every other rank passes ``None`` and gets an equal object."""
        source = self.ctx.global_rank(src)
        tensors: list[torch.Tensor] = []
        header = [skeleton_of(value, tensors) if self.ctx.rank == src else None]
        self._comm(dist.broadcast_object_list, header, src=source, group=self.ctx.group, device=self.control)
        slots = slots_of(header[0])
        if self.ctx.rank == src:
            for tensor, slot in zip(tensors, slots):
                self._comm(dist.broadcast, self._outgoing(tensor, slot), source, group=self.ctx.group, async_op=True)
            return value
        received = []
        for slot in slots:
            buffer = self._empty(slot)
            self._comm(dist.broadcast, buffer, source, group=self.ctx.group, async_op=True)
            received.append(self._arrived(buffer, slot))
        return rebuild(header[0], received)

    def send(self, value, dst: int) -> None:
        peer = self.ctx.global_rank(dst)
        tensors: list[torch.Tensor] = []
        header = [skeleton_of(value, tensors)]
        self._comm(dist.send_object_list, header, peer, group=self.ctx.group, device=self.control)
        for tensor, slot in zip(tensors, slots_of(header[0])):
            self._comm(dist.isend, self._outgoing(tensor, slot), peer, group=self.ctx.group)

    def recv(self, src: int):
        peer = self.ctx.global_rank(src)
        header = [None]
        self._comm(dist.recv_object_list, header, peer, group=self.ctx.group, device=self.control)
        received = []
        for slot in slots_of(header[0]):
            buffer = self._empty(slot)
            self._comm(dist.irecv, buffer, peer, group=self.ctx.group)
            received.append(self._arrived(buffer, slot))
        return rebuild(header[0], received)
