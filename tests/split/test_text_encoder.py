"""Text encoders run as layer ranges (asyncgen/split/text_encoder.py): the ranges chain to the stock encoder
exactly and cover every parameter once."""

import pytest
import torch

from asyncgen.evaluation import random_models
from asyncgen.split.text_encoder import encoder_blocks, modules_for_layers, run_layers, split_call_arguments


def _umt5(layers: int = 3):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=random_models.BYTE_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=layers,
                        num_heads=2, relative_attention_num_buckets=8)
    return UMT5EncoderModel(config).eval()


ENCODERS = {
    "t5": lambda: random_models.t5_text_encoder(32, layers=3),
    "umt5": _umt5,
    "clip": lambda: random_models.clip_text_encoder(32, layers=3),
    "clip_projection": lambda: random_models.clip_text_encoder(32, layers=3, projection=True),
}


def _assert_outputs_equal(out, ref, what):
    assert type(out) is type(ref), what
    if isinstance(ref, tuple):
        assert len(out) == len(ref), what
        for o, r in zip(out, ref):
            _assert_outputs_equal(o, r, what)
        return
    if isinstance(ref, torch.Tensor):
        assert torch.equal(out, ref), what
        return
    assert list(out.keys()) == list(ref.keys()), what
    for key in ref.keys():
        _assert_outputs_equal(out[key], ref[key], f"{what}: {key}")


@pytest.mark.parametrize("family", list(ENCODERS))
def test_layer_ranges_chain_to_the_stock_encoder(family):
    torch.manual_seed(0)
    model = ENCODERS[family]()
    ids = torch.randint(0, 200, (2, 9))
    ids[:, -1] = random_models.BYTE_VOCAB_SIZE - 1  # CLIP pools at the eos token
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    n = len(encoder_blocks(model))
    with torch.no_grad():  # as in a pipeline's __call__; the same grad mode picks the same kernels
        for kwargs in ({}, {"output_hidden_states": True}, {"attention_mask": mask, "output_hidden_states": True},
                       {"attention_mask": mask, "return_dict": False}):
            reference = model(ids, **kwargs)
            call = split_call_arguments(model, (ids,), kwargs)
            for cuts in ([0, n], [0, 1, n], [0, 2, n], [0, 1, 2, n]):
                carry = None
                for a, b in zip(cuts, cuts[1:]):
                    carry = run_layers(model, a, b, call, carry)
                # float32 on the CPU, the same operations in the same order: bit for bit
                _assert_outputs_equal(carry, reference, f"{family} {sorted(kwargs)} cuts {cuts}")


@pytest.mark.parametrize("family", list(ENCODERS))
def test_layer_ranges_cover_every_parameter_once(family):
    model = ENCODERS[family]()
    n = len(encoder_blocks(model))
    ranges = [(0, 1), (1, 2), (2, n)]
    owned = [{id(p) for m in modules_for_layers(model, a, b, n) for p in m.parameters()} for a, b in ranges]
    assert set().union(*owned) == {id(p) for p in model.parameters()}
    assert sum(map(len, owned)) == len({id(p) for p in model.parameters()})


def test_layer_range_errors():
    model = ENCODERS["t5"]()
    with pytest.raises(ValueError, match=r"\[2, 5\)"):
        modules_for_layers(model, 2, 5)
    with pytest.raises(TypeError, match="AutoencoderKL cannot be split"):
        encoder_blocks(random_models.vae())
    with pytest.raises(NotImplementedError, match="inputs_embeds"):
        split_call_arguments(model, (), {"inputs_embeds": torch.zeros(1, 3, 32)})
    with pytest.raises(ValueError, match="needs the carry"):
        run_layers(model, 1, 3, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
