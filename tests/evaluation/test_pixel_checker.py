import numpy as np
import pytest
import torch

from asyncgen.evaluation import pixel_checker, shapes


@pytest.fixture(scope="module")
def ground_truth():
    return shapes.ShapesDataset(seed=11).sample(600)


def _blur_and_noise(images: np.ndarray, sigma: float, noise: float, seed: int = 0) -> np.ndarray:
    """What a blurry, slightly noisy decoder might make of the ground truth."""
    taps = np.arange(-4, 5)
    kernel = torch.tensor(np.exp(-0.5 * (taps / sigma) ** 2), dtype=torch.float32)
    kernel /= kernel.sum()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    n, c, h, w = x.shape
    x = torch.nn.functional.pad(x.reshape(n * c, 1, h, w), (4, 4, 4, 4), mode="replicate")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1)).reshape(n, c, h, w)
    x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def test_reads_ground_truth_images(ground_truth):
    images, specs = ground_truth
    result = pixel_checker.accuracy(images, [s.caption for s in specs])
    for key in ("colour", "background", "shape", "size", "all"):
        assert result[key] >= 0.99, (key, result)


def test_survives_blur_and_noise(ground_truth):
    images, specs = ground_truth
    result = pixel_checker.accuracy(_blur_and_noise(images, sigma=1.0, noise=10.0), [s.caption for s in specs])
    for key in ("colour", "background", "shape", "size"):
        assert result[key] >= 0.97, (key, result)


def test_each_shape_is_told_apart():
    rng = np.random.default_rng(0)
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            spec = shapes.random_spec(rng, shape=shape, size=size, colour="green", background="black")
            found = pixel_checker.detect(shapes.render(spec))
            assert (found.shape, found.size, found.colour, found.background) == (shape, size, "green", "black")


def test_grades_a_mismatch_as_wrong():
    image = shapes.render(shapes.specs_for_captions(["a large red circle on a blue background"])[0])
    grade = pixel_checker.grade(image, "a small blue triangle on a red background")
    assert not any(grade[k] for k in ("colour", "background", "shape", "size"))
    grade = pixel_checker.grade(image, "a large red circle on a blue background")
    assert all(grade[k] for k in ("colour", "background", "shape", "size"))


def test_plain_background_has_no_shape():
    image = np.full((32, 32, 3), shapes.COLOURS["yellow"], dtype=np.uint8)
    found = pixel_checker.detect(image)
    assert found.background == "yellow" and found.shape is None and found.colour is None
    assert not pixel_checker.grade(image, "a large red circle on a yellow background")["shape"]


def test_float_and_pil_images_read_like_uint8():
    from PIL import Image

    image = shapes.render(shapes.specs_for_captions(["a small white square on a green background"])[0])
    expected = pixel_checker.detect(image)
    assert pixel_checker.detect(image / 255.0) == expected
    assert pixel_checker.detect(Image.fromarray(image)) == expected


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="shape"):
        pixel_checker.detect(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pixel_checker.detect(np.full((32, 32, 3), 2.0))
    images, specs = shapes.ShapesDataset(seed=0).sample(2)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        pixel_checker.accuracy(images, [specs[0].caption])


def test_blobs_are_four_connected_components():
    mask = np.zeros((6, 6), bool)
    mask[0:2, 0:2] = True  # a 2x2 square
    mask[2, 2] = True      # touches the square only diagonally: its own blob
    mask[4:6, 3:6] = True  # a 2x3 bar
    sizes = sorted(int(b.sum()) for b in pixel_checker.blobs(mask))
    assert sizes == [1, 4, 6]
    assert pixel_checker.blobs(np.zeros((3, 3), bool)) == []
