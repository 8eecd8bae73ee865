"""ASG's map-recording attention processors (asyncgen/schedules/asg_attention.py)."""

import pytest
import torch

import tiny_models
from asyncgen.schedules.asg_attention import AttentionMapStore, cross_attention_layers, record_attention_maps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("path_fixture, cls", [("sd_path", "StableDiffusionPipeline"),
                                                ("sdxl_path", "StableDiffusionXLPipeline")])
def test_recording_processors_leave_outputs_unchanged(request, path_fixture, cls):
    pipe = tiny_models.load(request.getfixturevalue(path_fixture), cls)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    expected = unet(sample, 10, text, **kwargs).sample
    layers = cross_attention_layers(unet, "up")
    assert layers and all(name.startswith("up_blocks.") and name.endswith("attn2") for name in layers)
    originals = {name: m.processor for name, m in layers.items()}
    store = AttentionMapStore()
    with record_attention_maps(layers, store):
        with store.recording(rows=slice(1, 2)):
            recorded = unet(sample, 10, text, **kwargs).sample
        maps = store.take()
        not_recording = unet(sample, 10, text, **kwargs).sample
    assert torch.equal(recorded, expected) and torch.equal(not_recording, expected)
    assert {name: m.processor for name, m in layers.items()} == originals  # put back
    assert len(maps) == len(layers) and store.take() == []
    for m in maps:
        assert m.shape[0] == 1 and m.shape[-1] == 77
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))  # probabilities over the tokens
