import json

import numpy as np
import pytest
import torch

from asyncgen.evaluation import shapes
from asyncgen.evaluation.clip_score import ClipScorer
from miniature_helpers import build_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def pairs():
    images, specs = shapes.ShapesDataset(seed=5).sample(10)
    return images, [s.caption for s in specs]


def test_score_is_100_times_the_clipped_cosine(tiny_clip, pairs):
    from transformers import CLIPModel, CLIPProcessor

    images, captions = pairs
    scorer = ClipScorer.from_transformers(tiny_clip, batch_size=4)
    scores = scorer.scores(images, captions)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**processor(text=captions, images=list(images), return_tensors="pt", padding="max_length"))
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).double().numpy()
    # the same float32 network, batched differently
    np.testing.assert_allclose(scores, 100 * np.clip(cos, 0, None), atol=1e-4)
    assert scorer.score(images, captions) == pytest.approx(scores.mean())
    assert ((scores >= 0) & (scores <= 100)).all()


def test_pairs_agree_with_the_similarity_matrix_and_batching(tiny_clip, pairs):
    images, captions = pairs
    one = ClipScorer.from_transformers(tiny_clip, batch_size=1)
    many = ClipScorer.from_transformers(tiny_clip, batch_size=64)
    matrix = many.similarity(images, captions)
    assert matrix.shape == (10, 10)
    np.testing.assert_allclose(np.diag(matrix), one.scores(images, captions), atol=1e-4)  # float32, batched differently
    floats = [im / 255.0 for im in images]
    np.testing.assert_allclose(many.scores(floats, captions), many.scores(images, captions), atol=1e-4)


def test_clear_errors(tiny_clip, pairs, tmp_path):
    images, captions = pairs
    scorer = ClipScorer.from_transformers(tiny_clip)
    with pytest.raises(ValueError, match="10 images but 9 prompts"):
        scorer.scores(images, captions[:9])
    with pytest.raises(ValueError, match="no images"):
        scorer.scores([], [])
    with pytest.raises(FileNotFoundError, match="no_such_clip"):
        ClipScorer.from_transformers(tmp_path / "no_such_clip")
    with pytest.raises(OSError, match="could not load a transformers CLIP"):
        ClipScorer.from_transformers("asyncgen-tests/no-such-model")  # HF_HUB_OFFLINE=1: the cache is all there is
    with pytest.raises(ValueError, match="batch_size=0"):
        ClipScorer.from_transformers(tiny_clip, batch_size=0)
    with pytest.raises(ValueError, match=r"expected \(H, W, 3\) RGB"):
        scorer.scores([np.zeros((32, 32), np.uint8)], ["a"])


def test_open_clip_from_a_local_checkpoint(tmp_path, pairs):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "asyncgen-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "asyncgen-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("asyncgen-tiny-clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "tiny.safetensors")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")

    images, captions = pairs
    scorer = ClipScorer.from_open_clip("asyncgen-tiny-clip", tmp_path / "tiny.safetensors")
    scores = scorer.scores(images, captions)
    assert scores.shape == (10,) and ((scores >= 0) & (scores <= 100)).all()
    with pytest.raises(ValueError, match="allow_pickle=True"):
        ClipScorer.from_open_clip("asyncgen-tiny-clip", tmp_path / "tiny.pt")
    pickled = ClipScorer.from_open_clip("asyncgen-tiny-clip", tmp_path / "tiny.pt", allow_pickle=True)
    np.testing.assert_allclose(pickled.scores(images, captions), scores, atol=1e-5)  # same weights, same float32 ops
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        ClipScorer.from_open_clip("asyncgen-tiny-clip", tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="not an open_clip model"):
        ClipScorer.from_open_clip("no-such-architecture", tmp_path / "tiny.safetensors")


def test_matching_captions_score_higher_with_the_miniature_clip():
    images, specs = shapes.ShapesDataset(seed=123).sample(60)
    scorer = ClipScorer.miniature()
    names = list(shapes.COLOURS)

    def swapped(s):  # shape colour and background exchanged: same words, other picture
        return shapes.caption(s.shape, s.background, s.colour, s.size)

    def other_shape(s):
        return shapes.caption(shapes.SHAPES[(shapes.SHAPES.index(s.shape) + 1) % 3], s.colour, s.background, s.size)

    def other_colour(s):
        colour = next(c for c in names[names.index(s.colour) + 1:] + names if c not in (s.colour, s.background))
        return shapes.caption(s.shape, colour, s.background, s.size)

    matching = scorer.scores(images, [s.caption for s in specs])
    for wrong in (swapped, other_shape, other_colour):
        mismatched = scorer.scores(images, [wrong(s) for s in specs])
        assert matching.mean() > mismatched.mean() + 5, wrong.__name__
        assert (matching > mismatched).mean() >= 0.9, wrong.__name__
