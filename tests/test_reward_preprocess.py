"""The reward models' differentiable preprocessing vs PyTorch / torchvision semantics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxlcd.rewards import preprocess

# vs torch float64: our matrices are built in float64 and applied in float32 (measured <= 2.4e-7 max abs on
# inputs in [0, 1]); torch's float32 kernel itself differs from its float64 result by up to ~1e-4 (rounding of
# the source coordinate), so float64 is the reference.
ATOL = 1e-6


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("shape", [(512, 512, 224, 224), (64, 48, 28, 36), (16, 24, 40, 30)])
def test_resize_matches_torch_bicubic(shape, antialias):
    h, w, oh, ow = shape
    x = np.random.default_rng(0).random((2, h, w, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).double().permute(0, 3, 1, 2), size=(oh, ow), mode="bicubic",
                        align_corners=False, antialias=antialias).permute(0, 2, 3, 1).numpy()
    ours = np.asarray(preprocess.resize_bicubic(jnp.asarray(x), oh, ow, antialias))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= ATOL


def test_resize_shorter_and_crop_is_torchvision_resize_centercrop():
    # torchvision.transforms.Resize(224, BICUBIC) + CenterCrop(224) on a tensor = interpolate to the shorter side
    # (int(224 * long / short)) then crop at round((size - 224) / 2).
    x = np.random.default_rng(1).random((1, 96, 160, 3)).astype(np.float32)
    nh, nw = 56, int(56 * 160 / 96)
    ref = F.interpolate(torch.from_numpy(x).double().permute(0, 3, 1, 2), size=(nh, nw), mode="bicubic",
                        align_corners=False, antialias=True).permute(0, 2, 3, 1).numpy()
    left = int(round((nw - 56) / 2.0))
    ours = np.asarray(preprocess.resize_shorter_and_crop(jnp.asarray(x), 56))
    np.testing.assert_allclose(ours, ref[:, :, left:left + 56], atol=ATOL)


def test_antialias_removes_high_frequencies_that_plain_bicubic_lets_through():
    # A +-1 checkerboard at 512 px (the reward-hacking pattern): the antialiased resize averages it away,
    # non-antialiased bicubic keeps most of its amplitude.
    yy, xx = np.mgrid[:512, :512]
    board = ((yy + xx) % 2 * 2.0 - 1.0).astype(np.float32)[None, :, :, None]
    aa = np.asarray(preprocess.resize_bicubic(board, 224, 224, antialias=True))
    plain = np.asarray(preprocess.resize_bicubic(board, 224, 224, antialias=False))
    assert np.abs(aa).mean() < 0.05 < 0.3 < np.abs(plain).mean()


def test_reward_pixels_is_differentiable_and_normalised():
    x = jnp.full((1, 64, 64, 3), 0.5)
    out = preprocess.reward_pixels(x, size=32)
    expected = (0.5 - np.asarray(preprocess.CLIP_MEAN)) / np.asarray(preprocess.CLIP_STD)
    np.testing.assert_allclose(np.asarray(out[0, 5, 5]), expected, rtol=1e-5)
    g = jax.grad(lambda im: preprocess.reward_pixels(im, size=32).sum())(x)
    # each output pixel's weights sum to 1, so d sum / d input sums to (32*32) / std per channel
    np.testing.assert_allclose(np.asarray(g.sum(axis=(0, 1, 2))), 32 * 32 / np.asarray(preprocess.CLIP_STD),
                               rtol=1e-4)
