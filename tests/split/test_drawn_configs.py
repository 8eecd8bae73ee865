"""Property tests (issue 26): valid small configs drawn at random, through their stock pipelines.

For each class with an embeddings-only pipeline builder (``embedding_pipelines``), a
config is drawn within the class's constraints (layer counts, heads and head widths,
patch sizes, channels, text widths and lengths, frames where they apply); then
``stages=1`` must equal the stock pipeline bit for bit, and the split taken from the
pipeline's first call must compose to the full forward at every cut. The default
(``ci``) profile runs 2 derandomized examples per class plus the explicit examples below
(issue 26's failing configs and what the long profile found); ``--hypothesis-profile=long``
draws 40 per class (run it on this file: ``tests/split/conftest.py`` registers the profiles).
"""

import torch
from hypothesis import assume, example, given, strategies as st

import embedding_pipelines
import tiny_models
from asyncgen.pipelines import AsyncDiffPipeline
from unseen_configs import CASES


def _check(name: str, config: dict, size: int, tokens: int, steps: int = 2) -> None:
    pipe, call = embedding_pipelines.pipeline(name, config, tokens=tokens, height=size, width=size, steps=steps)
    stock = embedding_pipelines.run(pipe, call)
    wrapped = AsyncDiffPipeline(pipe, stages=1)
    assert torch.equal(embedding_pipelines.run(wrapped, call), stock)
    split = wrapped.hook.split
    inputs = split.example_inputs()  # the pipeline's own first call
    n = len(split.units)
    with torch.no_grad(), wrapped.hook.stock_forward():  # the split's own runs of the forward, not the hook's
        reference = split.sample_tensor(pipe.transformer(**split.model_arguments(inputs), return_dict=False)[0])
        for cut in range(1, n):
            assert torch.equal(tiny_models.compose_stages(split, inputs, [0, cut, n]), reference), f"cut at {cut} of {n}"
        assert torch.equal(tiny_models.compose_stages(split, inputs, list(range(n + 1))), reference)


def _case(name: str):
    return CASES[name]["config"], CASES[name]["size"]


# ------------------------------------------------------------------ ZImage

@st.composite
def zimage(draw):
    head = draw(st.sampled_from([(8, [2, 2, 4]), (16, [4, 6, 6])]))
    heads = draw(st.integers(1, 2))
    config = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=draw(st.sampled_from([4, 8])),
                  dim=heads * head[0], n_layers=draw(st.integers(1, 3)), n_refiner_layers=draw(st.integers(1, 2)),
                  n_heads=heads, n_kv_heads=draw(st.sampled_from([h for h in (1, heads) if heads % h == 0])),
                  cap_feat_dim=draw(st.sampled_from([8, 16, 24])), axes_dims=head[1], axes_lens=[64, 32, 32])
    return config, draw(st.sampled_from([16, 32]))


@given(drawn=zimage(), tokens=st.integers(1, 9))
@example(drawn=_case("ZImageTransformer2DModel"), tokens=5)
@example(drawn=(dict(CASES["ZImageTransformer2DModel"]["config"], n_refiner_layers=2), 16), tokens=5)  # found: refiners side by side
@example(drawn=(dict(CASES["ZImageTransformer2DModel"]["config"], n_layers=1, dim=8, n_heads=1, n_kv_heads=1,
                     axes_dims=[2, 2, 4], cap_feat_dim=8), 16), tokens=1)  # found: one layer, no block list of two
def test_zimage(drawn, tokens, one_thread):
    _check("ZImageTransformer2DModel", *drawn, tokens)


# ------------------------------------------------------------------ HiDream

@st.composite
def hidream(draw):
    head = draw(st.sampled_from([(8, (4, 2, 2)), (16, (8, 4, 4))]))
    experts = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 2)) + draw(st.integers(1, 2))
    config = dict(patch_size=2, in_channels=draw(st.sampled_from([4, 8])), out_channels=None,
                  num_layers=layers - 1 if layers > 2 else 1, num_single_layers=layers - (layers - 1 if layers > 2 else 1),
                  attention_head_dim=head[0], num_attention_heads=draw(st.integers(1, 2)),
                  caption_channels=[draw(st.sampled_from([8, 16])), draw(st.sampled_from([8, 16, 24]))],
                  text_emb_dim=draw(st.sampled_from([8, 16])), num_routed_experts=experts + 1,
                  num_activated_experts=draw(st.integers(1, experts)), axes_dims_rope=head[1], max_resolution=(32, 32))
    # one Llama layer per block, as the pipeline hands them over
    config["llama_layers"] = list(range(config["num_layers"] + config["num_single_layers"]))
    return config, 16


@given(drawn=hidream(), tokens=st.integers(1, 9))
@example(drawn=_case("HiDreamImageTransformer2DModel"), tokens=5)
@example(drawn=(dict(CASES["HiDreamImageTransformer2DModel"]["config"], num_layers=1, num_single_layers=1,
                     llama_layers=[0, 1]), 16), tokens=1)  # found: one block per list
def test_hidream(drawn, tokens, one_thread):
    _check("HiDreamImageTransformer2DModel", *drawn, tokens)


# ------------------------------------------------------------------ AuraFlow

@st.composite
def auraflow(draw):
    heads = draw(st.integers(1, 2))
    patch = draw(st.sampled_from([1, 2]))
    config = dict(sample_size=8, patch_size=patch, in_channels=4, num_mmdit_layers=draw(st.integers(1, 3)),
                  num_single_dit_layers=draw(st.integers(1, 3)), attention_head_dim=draw(st.sampled_from([8, 16])),
                  num_attention_heads=heads, joint_attention_dim=draw(st.sampled_from([8, 16, 32])),
                  caption_projection_dim=0, out_channels=4, pos_embed_max_size=draw(st.sampled_from([16, 64])))
    config["caption_projection_dim"] = heads * config["attention_head_dim"]
    size = draw(st.sampled_from([8, 16]))
    # the learned positions cover pos_embed_max_size patches: at least the image's (the VAE halves the size)
    assume((size // 2 // patch) ** 2 <= config["pos_embed_max_size"])
    return config, size


@given(drawn=auraflow(), tokens=st.integers(1, 12))
@example(drawn=_case("AuraFlowTransformer2DModel"), tokens=5)
@example(drawn=(dict(CASES["AuraFlowTransformer2DModel"]["config"], patch_size=1, num_mmdit_layers=1,
                     num_single_dit_layers=1, pos_embed_max_size=16), 8), tokens=1)  # found: one block per list
def test_auraflow(drawn, tokens, one_thread):
    _check("AuraFlowTransformer2DModel", *drawn, tokens)


# ------------------------------------------------------------------ CogVideoX

@st.composite
def cogvideox(draw):
    learned = draw(st.booleans())
    latent = draw(st.sampled_from([4, 8]))
    config = dict(num_attention_heads=draw(st.integers(1, 2)), attention_head_dim=16, in_channels=4, out_channels=4,
                  time_embed_dim=draw(st.sampled_from([8, 16])), text_embed_dim=draw(st.sampled_from([16, 32])),
                  num_layers=draw(st.integers(1, 3)), sample_width=latent, sample_height=latent,
                  sample_frames=draw(st.sampled_from([5, 9])), patch_size=2, temporal_compression_ratio=4,
                  max_text_seq_length=draw(st.integers(2, 8)), use_rotary_positional_embeddings=True,
                  use_learned_positional_embeddings=learned)
    return config, latent * 4  # the tiny CogVideoX VAE compresses space by 4


@given(drawn=cogvideox())
@example(drawn=_case("CogVideoXTransformer3DModel"))
@example(drawn=(dict(CASES["CogVideoXTransformer3DModel"]["config"], num_layers=1, sample_width=4, sample_height=4,
                     sample_frames=5, use_learned_positional_embeddings=False), 16))  # found: one block
def test_cogvideox(drawn, one_thread):
    _check("CogVideoXTransformer3DModel", *drawn, tokens=0)
