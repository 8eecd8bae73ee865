"""asyncgen's one wire format: tensors packed into one flat buffer per dtype, at aligned offsets.

Whatever crosses ranks travels as a *description* and a *buffer*. The buffer holds the
tensors one after the other in memory order, each starting at a multiple of
``ALIGN_BYTES`` (:func:`pack_flat`); the receiver allocates it from the description and
takes each tensor as a view (:func:`unpack_flat`). Two descriptions use it:

- a boundary state (:mod:`asyncgen.split.boundary`): one dtype, a small int64 header that
  travels only when the layout may have changed; it is the per-step hot path, so the
  header is a tensor (no host synchronisation on NCCL);
- a component output (a text encoder's or the VAE's, :class:`Wire`): any nesting of
  outputs, tuples and dicts, flattened to a skeleton of :class:`Slot` s (shape, dtype,
  strides) that travels as an object once per call, then one buffer per dtype.
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


#: each tensor of a flat buffer starts at a multiple of this many bytes, as a fresh allocation would: a received
#: tensor (a view of the buffer) then takes the same vectorised kernels as the sender's own
ALIGN_BYTES = 64


def flat_offsets(numels: Sequence[int], element_size: int) -> tuple[list[int], int]:
    """Where each of tensors of ``numels`` elements starts in a flat buffer, and the buffer's length (elements)."""
    step = max(1, ALIGN_BYTES // element_size)
    offsets, end = [], 0
    for n in numels:
        start = -(-end // step) * step
        offsets.append(start)
        end = start + n
    return offsets, end


def _memory_order(tensor: torch.Tensor, keep_strides: bool) -> torch.Tensor:
    # a tensor whose elements fill a block of memory travels as that block; anything else as its contiguous copy
    if keep_strides and dense_strides(tensor) is not None:
        return tensor.as_strided((tensor.numel(),), (1,))
    return tensor.reshape(-1)


def pack_flat(tensors: Sequence[torch.Tensor], keep_strides: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``tensors`` (one dtype, one device) in one contiguous 1-D buffer at :func:`flat_offsets` (one ``cat``).

    ``keep_strides``: a dense tensor goes in its own memory order (its strides travel in the description).
    """
    offsets, total = flat_offsets([t.numel() for t in tensors], tensors[0].element_size())
    padding = tensors[0].new_empty(max(1, ALIGN_BYTES // tensors[0].element_size()))  # never read; one allocation
    pieces, end = [], 0
    for tensor, start in zip(tensors, offsets):
        if start > end:
            pieces.append(padding[: start - end])
        pieces.append(_memory_order(tensor, keep_strides))
        end = start + tensor.numel()
    return torch.cat(pieces) if out is None else torch.cat(pieces, out=out)


def unpack_flat(buffer: torch.Tensor, shapes: Sequence[tuple[int, ...]],
                strides: Sequence[tuple[int, ...] | None] | None = None) -> list[torch.Tensor]:
    """The tensors :func:`pack_flat` put in ``buffer``, as views of it (with their strides, where given)."""
    numels = [math.prod(shape) for shape in shapes]
    offsets, _ = flat_offsets(numels, buffer.element_size())
    strides = strides or [None] * len(shapes)
    return [buffer[start:start + n].as_strided(shape, stride) if stride is not None else
            buffer[start:start + n].view(shape) for shape, start, n, stride in zip(shapes, offsets, numels, strides)]


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

    @staticmethod
    def _by_dtype(slots: Sequence[Slot]) -> list[tuple[torch.dtype, list[Slot]]]:
        """The slots grouped by the dtype they travel in (a bool as bytes: not every backend copies bool), in an
        order both ends derive from the skeleton alone."""
        groups: dict[torch.dtype, list[Slot]] = {}
        for slot in slots:
            groups.setdefault(torch.uint8 if slot.dtype == torch.bool else slot.dtype, []).append(slot)
        return sorted(groups.items(), key=lambda item: str(item[0]))

    def _outgoing(self, tensors: Sequence[torch.Tensor], slots: Sequence[Slot]) -> list[torch.Tensor]:
        """One flat buffer per dtype group, on the wire's device."""
        buffers = []
        for dtype, group in self._by_dtype(slots):
            parts = [tensors[slot.index].detach() for slot in group]
            parts = [t.to(torch.uint8) if t.dtype == torch.bool else t for t in parts]
            buffers.append(pack_flat([t.to(self.wire) for t in parts], keep_strides=True))
        return buffers

    def _empty(self, slots: Sequence[Slot]) -> list[torch.Tensor]:
        return [torch.empty(flat_offsets([math.prod(s.shape) for s in group], dtype.itemsize)[1], dtype=dtype,
                            device=self.wire) for dtype, group in self._by_dtype(slots)]

    def _arrived(self, buffers: Sequence[torch.Tensor], slots: Sequence[Slot]) -> list[torch.Tensor]:
        """The received tensors in slot order: views of their buffer (on this rank's device), bools rebuilt."""
        received: dict[int, torch.Tensor] = {}
        for buffer, (_, group) in zip(buffers, self._by_dtype(slots)):
            views = unpack_flat(buffer.to(self.device), [s.shape for s in group], [s.stride for s in group])
            for slot, view in zip(group, views):
                received[slot.index] = view.to(torch.bool) if slot.dtype == torch.bool else view
        return [received[slot.index] for slot in slots]

    def broadcast(self, value, src: int):
        """``value`` from group rank ``src``; every other rank passes ``None`` and gets an equal object."""
        source = self.ctx.global_rank(src)
        tensors: list[torch.Tensor] = []
        header = [skeleton_of(value, tensors) if self.ctx.rank == src else None]
        self._comm(dist.broadcast_object_list, header, src=source, group=self.ctx.group, device=self.control)
        slots = slots_of(header[0])
        if self.ctx.rank == src:
            for buffer in self._outgoing(tensors, slots):
                self._comm(dist.broadcast, buffer, source, group=self.ctx.group, async_op=True)
            return value
        buffers = self._empty(slots)
        for buffer in buffers:
            self._comm(dist.broadcast, buffer, source, group=self.ctx.group, async_op=True)
        return rebuild(header[0], self._arrived(buffers, slots))

    def send(self, value, dst: int) -> None:
        peer = self.ctx.global_rank(dst)
        tensors: list[torch.Tensor] = []
        header = [skeleton_of(value, tensors)]
        self._comm(dist.send_object_list, header, peer, group=self.ctx.group, device=self.control)
        for buffer in self._outgoing(tensors, slots_of(header[0])):
            self._comm(dist.isend, buffer, peer, group=self.ctx.group)

    def recv(self, src: int):
        peer = self.ctx.global_rank(src)
        header = [None]
        self._comm(dist.recv_object_list, header, peer, group=self.ctx.group, device=self.control)
        slots = slots_of(header[0])
        buffers = self._empty(slots)
        for buffer in buffers:
            self._comm(dist.irecv, buffer, peer, group=self.ctx.group)
        return rebuild(header[0], self._arrived(buffers, slots))
