import math

import numpy as np
import pytest

from asyncgen.evaluation import shapes


def test_captions_cover_every_combination_and_parse_back():
    captions = shapes.all_captions()
    n = len(shapes.SIZES) * len(shapes.SHAPES) * len(shapes.COLOURS) * (len(shapes.COLOURS) - 1)
    assert len(captions) == len(set(captions)) == n
    for text in captions:
        attributes = shapes.parse_caption(text)
        assert shapes.caption(**attributes) == text
    assert shapes.parse_caption("A Large red circle on a blue background") == {
        "size": "large", "colour": "red", "shape": "circle", "background": "blue"}


@pytest.mark.parametrize("text, word", [
    ("a large purple circle on a blue background", "purple"),
    ("a huge red circle on a blue background", "huge"),
    ("a large red star on a blue background", "star"),
])
def test_unknown_words_are_named(text, word):
    with pytest.raises(ValueError, match=word):
        shapes.parse_caption(text)


def test_same_colour_and_background_is_rejected():
    with pytest.raises(ValueError, match="must differ"):
        shapes.caption("circle", "red", "red", "large")
    with pytest.raises(ValueError, match="not a shapes caption"):
        shapes.parse_caption("a photo of an astronaut")


def test_vocabulary_holds_every_caption_word_once():
    words = shapes.vocabulary()
    assert len(words) == len(set(words))
    assert {w for c in shapes.all_captions() for w in c.split()} == set(words)


def test_stream_is_reproducible_from_the_seed():
    a_images, a_specs = shapes.ShapesDataset(seed=3).sample(20)
    b_images, b_specs = shapes.ShapesDataset(seed=3).sample(20)
    c_images, _ = shapes.ShapesDataset(seed=4).sample(20)
    assert a_specs == b_specs and np.array_equal(a_images, b_images)
    assert not np.array_equal(a_images, c_images)


def test_images_show_the_spec():
    images, specs = shapes.ShapesDataset(seed=0).sample(60)
    for image, spec in zip(images, specs):
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == shapes.COLOURS[spec.background]).all()  # shapes keep one pixel of margin
        centre = image[int(spec.cy), int(spec.cx)] if spec.shape != "triangle" else image[int(spec.cy + spec.radius / 2), int(spec.cx)]
        assert tuple(centre) == shapes.COLOURS[spec.colour]
        assert spec.size in shapes.SIZES and shapes.SIZES[spec.size][0] <= spec.radius <= shapes.SIZES[spec.size][1]


@pytest.mark.parametrize("shape, unit_area", [("circle", math.pi), ("square", 1.8**2), ("triangle", 2.0)])
def test_coverage_has_the_geometric_area(shape, unit_area):
    spec = shapes.ShapeSpec(shape, "red", "blue", "large", cx=15.3, cy=16.1, radius=11.0)
    area = shapes.coverage(spec).sum()
    # 4x4 supersampling quantises the edge: a relative error of a few percent at most
    assert area == pytest.approx(unit_area * spec.radius**2, rel=0.03)


def test_random_spec_keeps_requested_attributes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        spec = shapes.random_spec(rng, shape="triangle", colour="white", size="small")
        assert (spec.shape, spec.colour, spec.size) == ("triangle", "white", "small")
        assert spec.background != "white"
    specs = shapes.specs_for_captions(["a small black square on a yellow background"])
    assert (specs[0].shape, specs[0].colour, specs[0].background, specs[0].size) == ("square", "black", "yellow", "small")


def test_to_tensor_scales_to_minus_one_one():
    images, _ = shapes.ShapesDataset(seed=0).sample(2)
    x = shapes.to_tensor(images)
    assert tuple(x.shape) == (2, 3, 32, 32)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert float(x[0, 0, 0, 0]) == pytest.approx(images[0, 0, 0, 0] / 127.5 - 1)
