"""Recording cross-attention probability maps without changing what attention computes.

:class:`RecordingAttnProcessor` wraps the processor a layer already has (diffusers'
``AttnProcessor2_0`` by default in a UNet) and calls it for the output, so the layer's
output is the same tensor it would have been; while its :class:`AttentionMapStore` is
recording it also computes ``softmax(q kᵀ · scale)`` for the text tokens, averaged over
heads, and stores it. The map costs one more query/key projection and score product on
the recorded layers only (the fused kernel that computes the output does not expose
its probabilities).

    layers = cross_attention_layers(unet, "up")
    store = AttentionMapStore()
    with record_attention_maps(layers, store):
        with store.recording(rows=slice(1, 2)):   # e.g. the conditional half of a CFG batch
            unet(...)
        maps = store.take()                       # [(B, Q, T) per call of each layer]
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

LAYER_GROUPS = ("up", "mid", "down", "all")


class AttentionMapStore:
    """Where recording processors put their maps; records only inside :meth:`recording`."""

    def __init__(self):
        self.maps: list[torch.Tensor] = []
        self.active = False
        self.rows: slice = slice(None)

    @contextlib.contextmanager
    def recording(self, rows: slice = slice(None)) -> Iterator["AttentionMapStore"]:
        """Record the maps of the batch rows ``rows`` of every call made inside the block."""
        self.active, self.rows = True, rows
        try:
            yield self
        finally:
            self.active, self.rows = False, slice(None)

    def take(self) -> list[torch.Tensor]:
        """The maps recorded so far, in call order; the store is emptied."""
        maps, self.maps = self.maps, []
        return maps


def attention_probabilities(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, Q, T)``: the attention probabilities of ``attn`` (a diffusers ``Attention``), mean over heads.

    Follows the steps ``AttnProcessor2_0`` takes before its fused kernel (group norm,
    projections, cross norm, q/k norms, scale, upcasting) so the map is the one behind
    the layer's output.
    """
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query, key = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
    # get_attention_scores wants (batch·heads, length, head_dim) and applies scale, mask and upcasting
    probs = attn.get_attention_scores(query.flatten(0, 1), key.flatten(0, 1), attention_mask)
    return probs.view(batch, attn.heads, *probs.shape[1:]).mean(dim=1)


class RecordingAttnProcessor:
    """Computes the output with ``base`` (unchanged) and records the cross-attention map."""

    def __init__(self, base, store: AttentionMapStore):
        self.base, self.store = base, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if self.store.active and encoder_hidden_states is not None:
            rows = self.store.rows
            mask = attention_mask[rows] if attention_mask is not None else None
            with torch.no_grad():
                self.store.maps.append(attention_probabilities(
                    attn, hidden_states[rows], encoder_hidden_states[rows], mask).detach())
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def cross_attention_layers(unet: nn.Module, group: str = "up") -> dict[str, nn.Module]:
    """The cross-attention modules (``attn2`` of each transformer block) in the UNet's
    ``up_blocks``, ``mid_block``, ``down_blocks`` or all of them, by module name."""
    if group not in LAYER_GROUPS:
        raise ValueError(f"attention layers {group!r} is not one of {', '.join(LAYER_GROUPS)}")
    prefixes = {"up": ("up_blocks.",), "mid": ("mid_block.",), "down": ("down_blocks.",),
                "all": ("up_blocks.", "mid_block.", "down_blocks.")}[group]
    return {
        name: module for name, module in unet.named_modules()
        if name.endswith(".attn2") and name.startswith(prefixes) and hasattr(module, "set_processor")
    }


@contextlib.contextmanager
def record_attention_maps(layers: dict[str, nn.Module], store: AttentionMapStore):
    """Wrap each layer's current processor in a :class:`RecordingAttnProcessor` for the block,
    then put the original processors back (also when the block raises)."""
    originals = {name: module.processor for name, module in layers.items()}
    try:
        for name, module in layers.items():
            module.set_processor(RecordingAttnProcessor(originals[name], store))
        yield store
    finally:
        for name, module in layers.items():
            module.set_processor(originals[name])
