import math

import numpy as np
import pytest

from asyncgen.evaluation import fidelity


@pytest.fixture
def image():
    return np.random.default_rng(0).random((32, 32, 3))


def _lpips_available() -> bool:
    try:
        return fidelity.lpips_weights_file().is_file()
    except fidelity.LPIPSUnavailable:
        return False


def test_identical_images(image):
    assert fidelity.psnr(image, image) == math.inf
    assert fidelity.ssim(image, image) == 1.0
    as_uint8 = (image * 255).astype(np.uint8)
    assert fidelity.ssim(as_uint8, as_uint8) == 1.0


def test_psnr_of_a_known_error(image):
    shifted = image + 0.1  # mse 0.01 -> 20 dB
    assert fidelity.psnr(shifted, image) == pytest.approx(20.0, abs=1e-9)  # float rounding only


def test_ssim_matches_the_reference_definition(image):
    ndimage = pytest.importorskip("scipy.ndimage")
    other = np.clip(image + 0.2 * np.random.default_rng(1).standard_normal(image.shape), 0, 1)

    def reference(x, y):
        # Wang et al.: Gaussian sigma 1.5 truncated to 11 taps, statistics where the window fits
        f = lambda a: ndimage.gaussian_filter(a, sigma=1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        c1, c2 = 0.01**2, 0.03**2
        return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean()

    expected = np.mean([reference(image[..., c], other[..., c]) for c in range(3)])
    assert fidelity.ssim(image, other) == pytest.approx(expected, abs=1e-12)  # same sums in another order


def test_ssim_falls_with_noise(image):
    rng = np.random.default_rng(2)
    values = [fidelity.ssim(np.clip(image + s * rng.standard_normal(image.shape), 0, 1), image) for s in (0.02, 0.1, 0.4)]
    assert 1.0 > values[0] > values[1] > values[2]


def test_shape_and_window_errors(image):
    with pytest.raises(ValueError, match="differs from reference shape"):
        fidelity.ssim(image, image[:16])
    with pytest.raises(ValueError, match="smaller than the 11-pixel window"):
        fidelity.ssim(image[:8, :8], image[:8, :8])
    with pytest.raises(ValueError, match="odd"):
        fidelity.ssim(image, image, window=4)


def test_lpips_is_skipped_with_a_reason_when_weights_are_absent(image):
    if _lpips_available():
        pytest.skip("LPIPS weights are present here; the skip path cannot be exercised")
    with pytest.raises(fidelity.LPIPSUnavailable, match="LPIPS"):
        fidelity.lpips(image, image)
    report = fidelity.fidelity(image, image)
    assert report["psnr"] == math.inf and report["ssim"] == 1.0
    assert report["lpips"] is None and "LPIPS" in report["lpips_skipped"]


def test_lpips_of_identical_images_is_zero(image):
    if not _lpips_available():
        pytest.skip("LPIPS needs the lpips package and its backbone weights locally")
    assert fidelity.lpips(image, image) == pytest.approx(0.0, abs=1e-6)  # float32 network
    assert fidelity.lpips(image, 1 - image) > 0.1
