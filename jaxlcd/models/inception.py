"""Flax linen port of the FID Inception network: the TensorFlow InceptionV3 graph of 2015-12-05 that FID is defined
with, as torch-fidelity's ``FeatureExtractorInceptionV3`` (and pytorch-fid's ``FIDInceptionA/C/E``) rebuild it.

Input: uint8 images [B, H, W, 3] (NHWC) of any size. They are resized to 299 x 299 with TensorFlow 1.x's bilinear
resize (``align_corners=False``, no half-pixel offset, no antialiasing: `resize_bilinear_tf1`), scaled by
``(x - 128) / 128``, and run through the network. Output: the 2048-d pool features (and the 1008 logits).

Differences from torchvision's InceptionV3, all as in the TF graph: BatchNorm eps 1e-3; the average pools of the
A, C and first E blocks exclude the zero padding (``count_include_pad=False``); the last E block pools with max, not
average; 1008 classes. Module names mirror the PyTorch state-dict keys (``Mixed_6b.branch7x7_2.conv.weight`` <->
``Mixed_6b/branch7x7_2/conv/kernel``), so `jaxlcd.weights.tables` maps torch-fidelity's weights file directly.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxlcd.models.modified_resnet import BatchNorm2d

INPUT_SIZE = 299
FEATURES = 2048
CLASSES = 1008


def resize_bilinear_tf1(x, size: int):
    """TF 1.x ``resize_bilinear(align_corners=False)`` of [B, H, W, C] float32 to [B, size, size, C].

    The source coordinate of output pixel i is ``i * (in / out)`` (float32, no half-pixel centre), blended
    between its floor and the next pixel (clamped at the border), as torch-fidelity's
    ``interpolate_bilinear_2d_like_tensorflow1x(method="slow")``."""
    def axis_weights(n_in):
        pos = jnp.arange(size, dtype=jnp.float32) * jnp.float32(n_in / size)
        lo = pos.astype(jnp.int32)
        return lo, jnp.minimum(lo + 1, n_in - 1), pos - lo.astype(jnp.float32)

    y_lo, y_hi, dy = axis_weights(x.shape[1])
    x_lo, x_hi, dx = axis_weights(x.shape[2])
    dx = dx[None, None, :, None]
    top = x[:, y_lo][:, :, x_lo] + (x[:, y_lo][:, :, x_hi] - x[:, y_lo][:, :, x_lo]) * dx
    bottom = x[:, y_hi][:, :, x_lo] + (x[:, y_hi][:, :, x_hi] - x[:, y_hi][:, :, x_lo]) * dx
    return top + (bottom - top) * dy[None, :, None, None]


class BasicConv2d(nn.Module):
    """Bias-free conv + BatchNorm (eps 1e-3) + ReLU; ``kernel``/``padding`` as (h, w)."""
    features: int
    kernel: tuple = (1, 1)
    stride: int = 1
    padding: tuple = (0, 0)

    @nn.compact
    def __call__(self, x):
        (ph, pw), s = self.padding, self.stride
        x = nn.Conv(self.features, self.kernel, strides=(s, s), padding=((ph, ph), (pw, pw)), use_bias=False,
                    name="conv")(x)
        return nn.relu(BatchNorm2d(self.features, eps=1e-3, name="bn")(x))


def _conv(features, kernel=1, stride=1, padding=0, name=None):
    pair = lambda v: tuple(v) if isinstance(v, tuple) else (v, v)
    return BasicConv2d(features, pair(kernel), stride, pair(padding), name=name)


def _avg_pool_3x3(x):
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int, padding: int = 0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _conv(64, name="branch1x1")(x)
        b5 = _conv(64, 5, padding=2, name="branch5x5_2")(_conv(48, name="branch5x5_1")(x))
        b3 = _conv(64, name="branch3x3dbl_1")(x)
        b3 = _conv(96, 3, padding=1, name="branch3x3dbl_3")(_conv(96, 3, padding=1, name="branch3x3dbl_2")(b3))
        bp = _conv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv(384, 3, stride=2, name="branch3x3")(x)
        bd = _conv(96, 3, padding=1, name="branch3x3dbl_2")(_conv(64, name="branch3x3dbl_1")(x))
        bd = _conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = _conv(192, name="branch1x1")(x)
        b7 = _conv(c7, name="branch7x7_1")(x)
        b7 = _conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = _conv(c7, name="branch7x7dbl_1")(x)
        for i, (features, kernel, pad) in enumerate(((c7, (7, 1), (3, 0)), (c7, (1, 7), (0, 3)),
                                                     (c7, (7, 1), (3, 0)), (192, (1, 7), (0, 3))), start=2):
            bd = _conv(features, kernel, padding=pad, name=f"branch7x7dbl_{i}")(bd)
        bp = _conv(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv(320, 3, stride=2, name="branch3x3_2")(_conv(192, name="branch3x3_1")(x))
        b7 = _conv(192, name="branch7x7x3_1")(x)
        b7 = _conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = _conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """``pool="avg"``: torch-fidelity's InceptionE_1 (Mixed_7b); ``"max"``: InceptionE_2 (Mixed_7c)."""
    pool: str

    @nn.compact
    def __call__(self, x):
        def split(h, prefix):   # parallel 1x3 and 3x1 convolutions, concatenated
            return jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name=f"{prefix}a")(h),
                                    _conv(384, (3, 1), padding=(1, 0), name=f"{prefix}b")(h)], axis=-1)

        b1 = _conv(320, name="branch1x1")(x)
        b3 = split(_conv(384, name="branch3x3_1")(x), "branch3x3_2")
        bd = _conv(384, 3, padding=1, name="branch3x3dbl_2")(_conv(448, name="branch3x3dbl_1")(x))
        bd = split(bd, "branch3x3dbl_3")
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1, padding=1)
        bp = _conv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """uint8 [B, H, W, 3] -> (pool features [B, 2048] float32, logits [B, 1008] float32); computed in float32."""

    @nn.compact
    def __call__(self, images):
        x = resize_bilinear_tf1(images.astype(jnp.float32), INPUT_SIZE)
        x = (x - 128.0) / 128.0
        x = _conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = _conv(32, 3, name="Conv2d_2a_3x3")(x)
        x = _max_pool_3x3(_conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x), 2)
        x = _conv(80, name="Conv2d_3b_1x1")(x)
        x = _max_pool_3x3(_conv(192, 3, name="Conv2d_4a_3x3")(x), 2)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        features = jnp.mean(x, axis=(1, 2))
        return features, nn.Dense(CLASSES, name="fc")(features)
