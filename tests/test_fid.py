"""FID: the Flax FID Inception equals torch-fidelity's FeatureExtractorInceptionV3 on random weights (features at
several input sizes, through the TF1 resize), the distance equals torch-fidelity's formula, statistics files
round-trip, and the weight conversion refuses what is not the Inception state dict."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fidelity_ref import fid_from_statistics, inception_class, resize_tf1
from jaxlcd.errors import InputError
from jaxlcd.metrics import fid
from jaxlcd.models.inception import FIDInceptionV3, resize_bilinear_tf1
from jaxlcd.rewards.convert import main as convert_main
from jaxlcd.weights import tables


def _random_state_dict(seed: int = 0) -> dict:
    """Random Inception weights in torch-fidelity's names, scaled so activations stay O(1) through the 94 layers."""
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3), jnp.uint8))
    rng = np.random.default_rng(seed)
    out = {}
    for entry in tables.build_table(shapes["params"]):
        shape = tables.to_pt_layout(np.empty(_leaf(shapes["params"], entry.flax_path).shape), entry.layout).shape
        name = entry.pt_key
        if name.endswith("running_var") or (name.endswith("bn.weight")):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("running_mean", "bias")):
            value = rng.normal(0, 0.1, shape)
        else:
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        out[name] = torch.tensor(value, dtype=torch.float32)
    return out


def _leaf(tree, path):
    for p in path:
        tree = tree[p]
    return tree


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(torch-fidelity extractor, converted safetensors path) for one random state dict."""
    root = tmp_path_factory.mktemp("inception")
    state = _random_state_dict()
    torch.save(state, root / "pt_inception_random.pth")
    out = str(root / "fid_inception.safetensors")
    assert convert_main(["--allow-pickle", "--kind", "fid_inception", str(root / "pt_inception_random.pth"), out]) == 0
    reference = inception_class()("inception-v3-compat", ["2048"],
                                  feature_extractor_weights_path=str(root / "pt_inception_random.pth"))
    return reference, out


@pytest.mark.parametrize("size", [299, 64, 320])
def test_features_equal_torch_fidelity(weights, size):
    reference, path = weights
    images = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    ours = fid.inception_features(images, path, batch_size=2)
    with torch.no_grad():
        (theirs,) = reference(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    theirs = theirs.numpy()
    assert ours.shape == theirs.shape == (2, 2048) and np.abs(theirs).max() > 1e-2
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_a_partial_last_batch_gives_the_same_features(weights):
    _, path = weights
    images = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(fid.inception_features(images, path, batch_size=2),
                               fid.inception_features(images, path, batch_size=3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("src,dst", [(32, 299), (299, 299), (512, 299), (77, 50)])
def test_resize_equals_torch_fidelity_tf1_bilinear(src, dst):
    x = np.random.default_rng(src).uniform(0, 255, (2, src, src + 3, 3)).astype(np.float32)   # non-square too
    theirs = resize_tf1()(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), size=(dst, dst), align_corners=False)
    ours = np.asarray(resize_bilinear_tf1(jnp.asarray(x), dst))
    np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("n", [10, 300])
def test_frechet_distance_equals_torch_fidelity(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(0, 1, (n, 64)), rng.normal(0.3, 1.2, (n + 5, 64))
    (mu1, s1), (mu2, s2) = fid.statistics(a), fid.statistics(b)
    expected = fid_from_statistics(mu1, s1, mu2, s2)
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)   # eigvals of a singular product: ~1e-6


def test_frechet_distance_equals_the_scipy_sqrtm_formula():
    """pytorch-fid's computation: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)) (well-conditioned case)."""
    import scipy.linalg

    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, (400, 32)), rng.normal(0.2, 0.9, (300, 32)) @ rng.normal(0, 0.3, (32, 32))
    (mu1, s1), (mu2, s2) = fid.statistics(a), fid.statistics(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_statistics_files_round_trip_and_mix_with_features(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (50, 16)), rng.normal(0.5, 1, (40, 16))
    fid.save_statistics(str(tmp_path / "ref.npz"), *fid.statistics(b))
    with np.load(tmp_path / "ref.npz") as f:
        assert set(f.files) == {"mu", "sigma"}   # pytorch-fid's and clean-fid's keys
    assert fid.frechet_distance(a, fid.load_statistics(str(tmp_path / "ref.npz"))) == pytest.approx(
        fid.frechet_distance(a, b), rel=1e-12)
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(InputError, match="is not an FID statistics file"):
        fid.load_statistics(str(tmp_path / "bad.npz"))


def test_bad_inputs_are_one_sentence(weights, tmp_path, capsys):
    with pytest.raises(InputError, match="wants uint8 images"):
        fid.inception_features(np.zeros((1, 8, 8, 3), np.float32), weights[1])
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    assert convert_main(["--allow-pickle", "--kind", "fid_inception", str(tmp_path / "other.pth"),
                         str(tmp_path / "o.safetensors")]) == 2
    assert "is not the FID Inception state dict" in capsys.readouterr().err
