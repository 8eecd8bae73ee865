"""The state that crosses a cut between two stages, and its wire format.

A boundary state is everything stage k hands to stage k+1: the running hidden state,
the skip tensors that later (up) blocks will still consume, and, for models with more
than one stream (DiT-style joint blocks), further named streams. Embeddings are *not*
part of it: every rank recomputes them from the step's conditioning, which is cheaper
than shipping them and lets a stale stage use another timestep (``time_shift``).

On the wire a state is one flat buffer in asyncgen's wire format
(:mod:`asyncgen.comm.wire`: one message per hop, each tensor at an aligned offset) plus a
small int64 header describing the layout. The header only travels when the layout may have
changed (exact warm-up steps); asynchronous steps reuse the layout already known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from asyncgen.comm.wire import flat_offsets, pack_flat, unpack_flat
from asyncgen.models import WIRE_DTYPES

# header: [version, stream mask, n_skips, dtype_code, (ndim, *shape) per tensor ...]
_HEADER_VERSION = 1
HEADER_LEN = 256



@dataclass
class BoundaryState:
    """Tensors crossing one cut.

    ``hidden`` is the main activation; ``skips`` is the stack of skip tensors not yet
    consumed (last element is popped first); ``streams`` holds further named
    activations (e.g. the text stream of a joint transformer block).
    """

    hidden: torch.Tensor
    skips: tuple[torch.Tensor, ...] = ()
    streams: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        return [self.hidden, *self.skips, *(self.streams[k] for k in sorted(self.streams))]

    def layout(self) -> "BoundaryLayout":
        tensors = self.tensors()
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            raise TypeError(f"a boundary state must have a single dtype, got {sorted(map(str, dtypes))}")
        return BoundaryLayout(
            shapes=tuple(tuple(t.shape) for t in tensors),
            n_skips=len(self.skips),
            stream_names=tuple(sorted(self.streams)),
            dtype=tensors[0].dtype,
        )


@dataclass(frozen=True)
class BoundaryLayout:
    """Shapes and dtype of a boundary state: what a receiver needs to allocate it."""

    shapes: tuple[tuple[int, ...], ...]
    n_skips: int
    stream_names: tuple[str, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Elements of the flat buffer the state travels in (its tensors and the alignment between them)."""
        return flat_offsets([math.prod(shape) for shape in self.shapes], self.dtype.itemsize)[1]

    def encode(self, known_streams: tuple[str, ...] = ()) -> torch.Tensor:
        # stream names are fixed by the model family and known to both ends; only which
        # of them are present travels (SD3's last joint block drops the text stream)
        unknown = set(self.stream_names) - set(known_streams)
        if unknown:
            raise ValueError(f"streams {sorted(unknown)} are not among the model's streams {list(known_streams)}")
        mask = sum(1 << i for i, name in enumerate(known_streams) if name in self.stream_names)
        values = [_HEADER_VERSION, mask, self.n_skips, WIRE_DTYPES.index(self.dtype)]
        for shape in self.shapes:
            values += [len(shape), *shape]
        if len(values) > HEADER_LEN:
            raise ValueError(f"boundary layout needs {len(values)} header slots, more than {HEADER_LEN}")
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[: len(values)] = torch.tensor(values, dtype=torch.int64)
        return header

    @classmethod
    def decode(cls, header: torch.Tensor, known_streams: tuple[str, ...] = ()) -> "BoundaryLayout":
        values = header.tolist()
        version, mask, n_skips, dtype_code = values[:4]
        if version != _HEADER_VERSION:
            raise RuntimeError(f"unexpected boundary header version {version}; ranks run different asyncgen versions?")
        stream_names = tuple(sorted(name for i, name in enumerate(known_streams) if mask >> i & 1))
        shapes, pos = [], 4
        for _ in range(1 + n_skips + len(stream_names)):
            ndim = values[pos]
            shapes.append(tuple(values[pos + 1 : pos + 1 + ndim]))
            pos += 1 + ndim
        return cls(tuple(shapes), n_skips, stream_names, WIRE_DTYPES[dtype_code])


def pack(state: BoundaryState, out: torch.Tensor | None = None) -> torch.Tensor:
    """A state as one contiguous 1-D buffer (one message on the wire)."""
    return pack_flat(state.tensors(), out=out)


def unpack(buffer: torch.Tensor, layout: BoundaryLayout) -> BoundaryState:
    """Inverse of :func:`pack`; the returned tensors are views of ``buffer``."""
    hidden, *rest = unpack_flat(buffer, layout.shapes)
    skips = tuple(rest[: layout.n_skips])
    streams = dict(zip(layout.stream_names, rest[layout.n_skips :]))
    return BoundaryState(hidden, skips, streams)
