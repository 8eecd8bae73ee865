"""The boundary state between stages and its wire format (asyncgen/split/boundary.py)."""

import pytest
import torch

from asyncgen.split.boundary import BoundaryLayout, BoundaryState, pack, unpack


def test_boundary_wire_format_round_trips():
    state = BoundaryState(torch.randn(2, 3, 4, 4), (torch.randn(2, 5, 4, 4), torch.randn(2, 3, 8, 8)),
                          {"text": torch.randn(2, 7, 6)})
    layout = state.layout()
    again = BoundaryLayout.decode(layout.encode(("text", "video")), ("text", "video"))
    assert again == layout
    back = unpack(pack(state), again)
    assert all(torch.equal(a, b) for a, b in zip(back.tensors(), state.tensors()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_wire_format_keeps_the_dtype(dtype):
    state = BoundaryState(torch.randn(2, 3, 4).to(dtype), (torch.randn(2, 5).to(dtype),), {"text": torch.randn(7).to(dtype)})
    layout = BoundaryLayout.decode(state.layout().encode(("text",)), ("text",))
    buffer = pack(state)
    received = unpack(buffer.clone(), layout)
    assert layout.dtype == buffer.dtype == dtype
    for sent, got in zip(state.tensors(), received.tensors()):
        assert got.dtype == dtype and torch.equal(sent, got)
