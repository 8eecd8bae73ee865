import numpy as np
import pytest

from asyncgen.evaluation import set_metrics, shapes
from miniature_helpers import build_tiny_clip


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((200, 8))
    assert set_metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)  # eigendecomposition rounding


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    x = np.random.default_rng(0).standard_normal((300, 6)) @ np.random.default_rng(1).standard_normal((6, 6))
    shift = np.arange(6, dtype=float)
    # same covariance, so the trace terms cancel and only |shift|^2 remains (up to eigen rounding)
    assert set_metrics.frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9, abs=1e-8)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert set_metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)  # two sqrtm algorithms


def test_kid_tells_different_distributions_apart():
    rng = np.random.default_rng(0)
    a, same, other = rng.standard_normal((300, 16)), rng.standard_normal((300, 16)), rng.standard_normal((300, 16)) + 0.5
    kid_same, std_same = set_metrics.kernel_inception_distance(a, same, subsets=20, subset_size=200)
    kid_other, _ = set_metrics.kernel_inception_distance(a, other, subsets=20, subset_size=200)
    assert abs(kid_same) < 0.05 and kid_other > 10 * abs(kid_same) + 0.05
    assert std_same >= 0


def test_bad_feature_sets_are_named():
    with pytest.raises(ValueError, match="feature sizes differ"):
        set_metrics.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="need at least 2 samples"):
        set_metrics.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        set_metrics.kernel_inception_distance(np.zeros(5), np.zeros((5, 3)))


def test_set_metrics_over_a_clip_image_tower(tmp_path):
    encoder = set_metrics.image_encoder(clip_model=build_tiny_clip(tmp_path / "clip"))
    assert encoder.name.startswith("clip:") and encoder.fallback_reason == "no Inception weights given"
    images, _ = shapes.ShapesDataset(seed=0).sample(24)
    others, _ = shapes.ShapesDataset(seed=1).sample(24)
    itself = set_metrics.set_metrics(images, images, encoder, kid_subsets=5)
    apart = set_metrics.set_metrics(images, others, encoder, kid_subsets=5)
    # a Fréchet distance over CLIP features is not FID: it must not be reported as one
    assert "fid" not in itself and "fid" not in apart
    assert itself["fd_clip"] == pytest.approx(0.0, abs=1e-6) and apart["fd_clip"] > itself["fd_clip"]
    assert itself["n_a"] == apart["n_b"] == 24 and itself["encoder"] == encoder.name


def test_an_encoder_that_does_not_name_its_distance_gets_fd():
    class Pixels:
        name = "pixels"

        def __call__(self, images):
            return np.stack([np.asarray(image, dtype=np.float64).reshape(-1)[:8] for image in images])

    images, _ = shapes.ShapesDataset(seed=0).sample(4)
    result = set_metrics.set_metrics(images, images, Pixels(), kid_subsets=1)
    assert set(result) == {"fd", "kid", "kid_std", "encoder", "n_a", "n_b"} and result["fd"] == pytest.approx(0.0, abs=1e-9)


def test_inception_needs_safe_local_weights(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        set_metrics.InceptionEncoder(tmp_path / "missing.safetensors")
    pickle = tmp_path / "inception.pth"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        set_metrics.InceptionEncoder(pickle)


def test_inception_features_from_a_safetensors_file(tmp_path):
    pytest.importorskip("torchvision")
    import torch
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "inception.safetensors")
    # a str path, as a CLI option or a config file gives it (a Path was the only kind that worked)
    encoder = set_metrics.image_encoder(inception_weights=str(tmp_path / "inception.safetensors"))
    assert encoder.name == "inception:inception.safetensors"
    images, _ = shapes.ShapesDataset(seed=0).sample(3)
    features = encoder(images)
    assert features.shape == (3, 2048) and np.isfinite(features).all()
    result = set_metrics.set_metrics(images, images[::-1], encoder, kid_subsets=1)
    assert "fd_clip" not in result and result["fid"] == pytest.approx(0.0, abs=1e-6)  # the same set, reordered
