"""Text encoders cut into sequential layer ranges, each range runnable on its own rank.

A T5-XXL encoder is 40 % of Flux.1-dev: too big to sit whole beside a rank's share of
the transformer. Its blocks run one after the other, so it splits like a denoiser
without any staleness: the rank of range ``[a, b)`` takes what crosses the cut before
block ``a`` (the hidden state, the prepared attention mask, T5's shared position bias,
the hidden states recorded so far), runs its blocks and hands the same on. The last
range applies the final norm (and CLIP's pooling and projection) and builds the very
output the stock ``forward`` returns. Chaining the ranges computes exactly what the
stock forward computes, operation for operation (bit for bit in float32 on the CPU).

Splittable: ``T5EncoderModel`` and ``UMT5EncoderModel`` (``encoder.block``),
``CLIPTextModel`` and ``CLIPTextModelWithProjection`` (``encoder.layers`` of the text
model). Anything else runs whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from asyncgen._compat import (
    clip_causal_mask,
    clip_layer_forward,
    t5_attention_mask,
    t5_block_forward,
)

__all__ = [
    "EncoderCarry",
    "encoder_blocks",
    "is_splittable",
    "modules_for_layers",
    "run_layers",
    "split_call_arguments",
]


@dataclass
class EncoderCarry:
    """What crosses a cut between two layer ranges of a text encoder.

    ``hidden`` is the hidden state entering the next block; ``mask`` the attention mask
    as the stock forward prepared it for its blocks (``None`` when it needs none);
    ``position_bias`` T5's relative position bias, computed by block 0 and shared by
    every later block; ``recorded`` the hidden states recorded so far when the call asked
    for ``output_hidden_states`` (else ``None``).
    """

    hidden: torch.Tensor
    mask: torch.Tensor | None = None
    position_bias: torch.Tensor | None = None
    recorded: list[torch.Tensor] | None = field(default=None)

    def tensors(self) -> dict[str, Any]:
        """The carry as a flat name -> tensor-or-None-or-list mapping (what travels between ranks)."""
        return {"hidden": self.hidden, "mask": self.mask, "position_bias": self.position_bias,
                "recorded": self.recorded}


def _t5_stack(model: nn.Module) -> nn.Module | None:
    encoder = getattr(model, "encoder", None)
    blocks = getattr(encoder, "block", None)
    if isinstance(blocks, nn.ModuleList) and hasattr(encoder, "final_layer_norm") and not getattr(
            encoder, "is_decoder", False):
        return encoder
    return None


def _clip_text(model: nn.Module) -> nn.Module | None:
    """The module holding ``embeddings``, ``encoder.layers`` and ``final_layer_norm`` of a CLIP text model."""
    text = getattr(model, "text_model", model)
    layers = getattr(getattr(text, "encoder", None), "layers", None)
    if isinstance(layers, nn.ModuleList) and hasattr(text, "embeddings") and hasattr(text, "final_layer_norm"):
        return text
    return None


def _family(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name in ("T5EncoderModel", "UMT5EncoderModel") and _t5_stack(model) is not None:
        return "t5"
    if name in ("CLIPTextModel", "CLIPTextModelWithProjection") and _clip_text(model) is not None:
        return "clip"
    return None


def is_splittable(model: nn.Module) -> bool:
    """Whether :func:`encoder_blocks` knows ``model``'s block list (else it runs whole)."""
    return _family(model) is not None


def encoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The sequential blocks of a T5/UMT5 encoder or a CLIP text encoder."""
    family = _family(model)
    if family == "t5":
        return _t5_stack(model).block
    if family == "clip":
        return _clip_text(model).encoder.layers
    raise TypeError(
        f"{type(model).__name__} cannot be split into layer ranges (splittable: T5EncoderModel, "
        "UMT5EncoderModel, CLIPTextModel, CLIPTextModelWithProjection); place it whole on one rank"
    )


def _check_range(model: nn.Module, start: int, stop: int, total: int | None) -> int:
    count = len(encoder_blocks(model))
    if total is not None and total != count:
        raise ValueError(f"total={total}, but {type(model).__name__} has {count} blocks")
    if not (0 <= start < stop <= count):
        raise ValueError(f"layer range [{start}, {stop}) is not a non-empty range within the {count} blocks "
                         f"of {type(model).__name__}")
    return count


def modules_for_layers(model: nn.Module, start: int, stop: int, total: int | None = None) -> list[nn.Module]:
    """The modules the range ``[start, stop)`` of ``model``'s blocks runs.

    The blocks themselves, the embeddings when ``start == 0`` and the final norm (plus
    CLIP's text projection) when ``stop == total``. T5's token embedding is tied to
    ``shared``: both are listed (they hold one parameter).
    """
    total = _check_range(model, start, stop, total)
    blocks = encoder_blocks(model)
    modules: list[nn.Module] = []
    if _family(model) == "t5":
        stack = _t5_stack(model)
        if start == 0:
            modules += [m for m in (getattr(model, "shared", None), stack.embed_tokens) if m is not None]
        modules += list(blocks[start:stop])
        if stop == total:
            modules.append(stack.final_layer_norm)
    else:
        text = _clip_text(model)
        if start == 0:
            modules.append(text.embeddings)
        modules += list(blocks[start:stop])
        if stop == total:
            modules.append(text.final_layer_norm)
            projection = getattr(model, "text_projection", None)
            if projection is not None:
                modules.append(projection)
    return modules


# ------------------------------------------------------------------ running a range

_SUPPORTED = {"input_ids", "attention_mask", "position_ids", "output_hidden_states", "return_dict"}


def split_call_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The stock forward's arguments by name, refusing what a split run does not reproduce.

    Pipelines call text encoders with ``input_ids`` and, at most, ``attention_mask``,
    ``position_ids`` (CLIP), ``output_hidden_states=True/False`` and ``return_dict``.
    """
    import inspect

    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    extra = dict(bound.pop("kwargs", {}) or {})
    bound.update(extra)
    given = {k: v for k, v in bound.items() if v is not None and v is not False}
    unsupported = sorted(set(given) - _SUPPORTED)
    hidden = bound.get("output_hidden_states")
    if hidden is not None and not isinstance(hidden, bool):
        unsupported.append(f"output_hidden_states={hidden!r}")
    if unsupported:
        raise NotImplementedError(
            f"a {type(model).__name__} split into layer ranges is called with {', '.join(unsupported)}; it runs "
            f"{', '.join(sorted(_SUPPORTED))} (place the encoder whole on one rank for anything else)"
        )
    if bound.get("input_ids") is None:
        raise ValueError(f"a {type(model).__name__} split into layer ranges needs input_ids")
    if _family(model) == "t5" and "position_ids" in given:
        raise NotImplementedError(f"{type(model).__name__} takes no position_ids")
    if hidden is None:  # the stock forward falls back to the config's default
        bound["output_hidden_states"] = bool(getattr(model.config, "output_hidden_states", False))
    return bound


def _record(carry: EncoderCarry, hidden: torch.Tensor) -> None:
    if carry.recorded is not None:
        carry.recorded.append(hidden)


def _t5_begin(model, call: dict) -> EncoderCarry:
    stack = _t5_stack(model)
    embeds = stack.embed_tokens(call["input_ids"])
    mask = t5_attention_mask(stack.config, embeds, call.get("attention_mask"))
    hidden = stack.dropout(embeds)
    carry = EncoderCarry(hidden, mask, None, [] if call.get("output_hidden_states") else None)
    _record(carry, hidden)  # the stock forward records the first block's input
    return carry


def _t5_block(model, index: int, carry: EncoderCarry) -> EncoderCarry:
    block = encoder_blocks(model)[index]
    if type(model).__name__ == "UMT5EncoderModel":  # UMT5Block returns the hidden state alone; no position bias
        hidden, bias = block(carry.hidden, carry.mask), None
    else:
        hidden, bias = t5_block_forward(block, carry.hidden, carry.mask, carry.position_bias)
    _record(carry, hidden)
    return replace(carry, hidden=hidden, position_bias=bias)


def _t5_finish(model, call: dict, carry: EncoderCarry):
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    stack = _t5_stack(model)
    hidden = stack.dropout(stack.final_layer_norm(carry.hidden))
    fields = {"last_hidden_state": hidden}
    if carry.recorded is not None:
        # T5 ties the last recorded state to the output (after the final norm)
        fields["hidden_states"] = tuple(carry.recorded[:-1]) + (hidden,)
    return BaseModelOutputWithPastAndCrossAttentions(**fields)  # what the stock stack returns


def _clip_begin(model, call: dict) -> EncoderCarry:
    text = _clip_text(model)
    input_ids = call["input_ids"]
    input_ids = input_ids.view(-1, input_ids.shape[-1])
    hidden = text.embeddings(input_ids=input_ids, position_ids=call.get("position_ids"))
    mask = clip_causal_mask(text.config, hidden, call.get("attention_mask"))
    carry = EncoderCarry(hidden, mask, None, [] if call.get("output_hidden_states") else None)
    _record(carry, hidden)
    return carry


def _clip_block(model, index: int, carry: EncoderCarry) -> EncoderCarry:
    hidden = clip_layer_forward(encoder_blocks(model)[index], carry.hidden, carry.mask)
    _record(carry, hidden)
    return replace(carry, hidden=hidden)


def _clip_finish(model, call: dict, carry: EncoderCarry):
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPTextModelOutput

    text = _clip_text(model)
    hidden = text.final_layer_norm(carry.hidden)
    input_ids = call["input_ids"]
    input_ids = input_ids.view(-1, input_ids.shape[-1]).to(dtype=torch.int, device=hidden.device)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if text.eos_token_id == 2:  # CLIP configs from before transformers' eos fix pool at the largest id
        pooled = hidden[rows, input_ids.argmax(dim=-1)]
    else:
        pooled = hidden[rows, (input_ids == text.eos_token_id).int().argmax(dim=-1)]
    recorded = tuple(carry.recorded) if carry.recorded is not None else None  # CLIP keeps the pre-norm last state
    projection = getattr(model, "text_projection", None)
    if projection is None:
        fields = {"last_hidden_state": hidden, "pooler_output": pooled}
        if recorded is not None:
            fields["hidden_states"] = recorded
        return BaseModelOutputWithPooling(**fields)
    fields = {"text_embeds": projection(pooled), "last_hidden_state": hidden}
    if recorded is not None:
        fields["hidden_states"] = recorded
    return CLIPTextModelOutput(**fields)


_STEPS = {"t5": (_t5_begin, _t5_block, _t5_finish), "clip": (_clip_begin, _clip_block, _clip_finish)}


def run_layers(model: nn.Module, start: int, stop: int, call: dict, carry: EncoderCarry | None = None):
    """Run blocks ``[start, stop)`` of ``model`` for the call arguments ``call``.

    ``call`` comes from :func:`split_call_arguments`. The first range (``start == 0``)
    embeds ``input_ids`` itself; any other takes the previous range's ``carry``. Returns
    the next :class:`EncoderCarry`, or, for the last range, what ``model(**call)``
    returns (a ``ModelOutput``; a tuple with ``return_dict=False``).
    """
    total = _check_range(model, start, stop, None)
    if (start == 0) != (carry is None):
        raise ValueError(f"layer range [{start}, {stop}): "
                         + ("the first range embeds the input itself; pass no carry" if start == 0
                            else "needs the carry of the range before it"))
    # no torch.no_grad() of its own: the caller's grad mode picks the same kernels as the stock forward's
    begin, block, finish = _STEPS[_family(model)]
    if carry is None:
        carry = begin(model, call)
    elif carry.recorded is not None:
        carry = replace(carry, recorded=list(carry.recorded))
    for index in range(start, stop):
        carry = block(model, index, carry)
    if stop < total:
        return carry
    output = finish(model, call, carry)
    return output if call.get("return_dict", True) is not False else output.to_tuple()
