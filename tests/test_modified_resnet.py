"""Parity of the Flax ModifiedResNet (CLIP RN tower / latent_rn50) with open_clip on tiny random models.

Tolerances are relative L2 errors ||ours - ref|| / ||ref|| against open_clip in float32, eval mode.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from jaxlcd.models import modified_resnet as mr
from jaxlcd.models.config import ConfigError
from jaxlcd.weights import tables
from open_clip_ref import open_clip  # open_clip without torchvision (see open_clip_ref)
from conftest import nchw_to_nhwc, perturb_, rel_err

FP32_RTOL = 1e-5   # float32 compute vs open_clip float32
BF16_RTOL = 3e-2   # bfloat16 compute (fp32 params, fp32 BN/softmax/pool means) vs open_clip fp32; measured ~6.5e-3
GRAD_RTOL = 1e-4
CASES = {  # name: (layers, width, in_channels)
    "rgb": ((1, 1, 1, 1), 8, 3),
    "latent": ((1, 2, 1, 1), 8, 4),
}
IMAGE, HEADS, OUT = 64, 2, 16
RefResNet = open_clip.modified_resnet.ModifiedResNet


def _make_ref(layers, width, in_channels, seed=0):
    torch.manual_seed(seed)
    model = RefResNet(list(layers), output_dim=OUT, heads=HEADS, image_size=IMAGE, width=width)
    if in_channels != 3:
        model.conv1 = torch.nn.Conv2d(in_channels, width // 2, 3, stride=2, padding=1, bias=False)
    perturb_(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial running statistics (running_var kept positive)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(0.2 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.mul_(torch.exp(0.3 * torch.randn(buf.shape, generator=g)))
    return model.eval()


def _state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _convert(model, layers, width, in_channels, **kw):
    cfg = mr.ModifiedResNetConfig(layers=layers, width=width, output_dim=OUT, heads=HEADS, image_size=IMAGE,
                                  in_channels=in_channels)
    module = mr.ModifiedResNet(cfg, **kw)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *mr.dummy_inputs(module)))["params"]
    table = tables.build_table(shapes)
    sd = {mr.canonical_key(k): v for k, v in _state_dict(model).items() if mr.canonical_key(k)}
    return module, tables.pt_to_flax(sd, table, shapes), table


def _inputs(in_channels, seed=0, batch=2):
    x = torch.randn(batch, in_channels, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))
    return x, nchw_to_nhwc(x)


def _apply(module, params, x):
    return jax.jit(lambda p, a: module.apply({"params": p}, a))(params, jnp.asarray(x))


@functools.lru_cache(maxsize=None)
def _case(name):
    layers, width, ch = CASES[name]
    ref = _make_ref(layers, width, ch)
    module, params, table = _convert(ref, layers, width, ch)
    return ref, module, params, table, ch


@pytest.fixture(params=list(CASES))
def case(request):
    return _case(request.param)


def test_fp32_parity(case):
    ref, module, params, _, ch = case
    x_pt, x = _inputs(ch, seed=1)
    out = _apply(module, params, x)
    with torch.no_grad():
        want = ref(x_pt).numpy()
    assert out.shape == (2, OUT) and out.dtype == jnp.float32
    err = rel_err(out, want)
    print(f"fp32 rel err ({ch} ch): {err:.2e}")
    assert err <= FP32_RTOL


def test_bf16_compute():
    """Latent case only (compile time on the shared CPU)."""
    ref, module, params, _, ch = _case("latent")
    module16 = module.clone(dtype=jnp.bfloat16)
    x_pt, x = _inputs(ch, seed=2)
    out = _apply(module16, params, x)
    with torch.no_grad():
        want = ref(x_pt).numpy()
    assert out.dtype == jnp.bfloat16 and params["bn1"]["running_var"].dtype == jnp.float32
    err = rel_err(np.asarray(out, np.float32), want)
    print(f"bf16 rel err ({ch} ch): {err:.2e}")
    assert err <= BF16_RTOL


def test_round_trip_bit_exact_and_key_complete(case):
    ref, _, params, table, _ = case
    original = {k: v for k, v in _state_dict(ref).items() if not k.endswith("num_batches_tracked")}
    back = tables.flax_to_pt(params, table)
    assert set(back) == set(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
    assert "layer1.0.downsample.1.running_var" in back and "attnpool.positional_embedding" in back


def test_batchnorm_stat_mask(case):
    ref, _, params, table, _ = case
    mask = traverse_util.flatten_dict(mr.batchnorm_stat_mask(params))
    by_path = {e.flax_path: e.pt_key for e in table}
    marked = {by_path[p] for p, m in mask.items() if m}
    assert all(isinstance(m, bool) for m in mask.values())
    assert marked == {k for k, _ in ref.named_buffers() if k.endswith(("running_mean", "running_var"))}
    assert not marked & {k for k, _ in ref.named_parameters()}


def test_wrong_input_size_is_refused(case):
    _, module, params, _, ch = case
    with pytest.raises(ValueError, match=r"input must be \[batch, 64, 64, %d\].*got shape \(1, 96, 96, %d\)" % (ch, ch)):
        module.apply({"params": params}, jnp.zeros((1, 96, 96, ch)))
    with pytest.raises(ValueError, match="in_channels"):
        module.apply({"params": params}, jnp.zeros((1, IMAGE, IMAGE, ch + 1)))


def test_remat_grads_match_torch():
    """Gradients through the rematerialised model equal torch autograd's (eval-mode BN, names via the table)."""
    layers, width, ch = CASES["latent"]
    ref = _make_ref(layers, width, ch, seed=3)
    module, params, table = _convert(ref, layers, width, ch, remat=True)
    x_pt, x = _inputs(ch, seed=4)
    w = np.random.RandomState(0).randn(2, OUT).astype(np.float32)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, jnp.asarray(x)) * w)))(params)
    (ref(x_pt) * torch.tensor(w)).sum().backward()
    ours = tables.flax_to_pt(grads, table)
    for k, p in ref.named_parameters():
        if k == "attnpool.k_proj.bias":  # softmax ignores it: the true gradient is 0
            assert np.abs(ours[k]).max() < 1e-5 and np.abs(p.grad.numpy()).max() < 1e-5
        else:
            assert rel_err(ours[k], p.grad.numpy()) <= GRAD_RTOL, k


def test_config_validation_and_canonical_key():
    cfg = mr.ModifiedResNetConfig.from_dict({"layers": [1, 2, 1, 1], "width": 8, "heads": 2, "in_channels": 4})
    assert cfg.layers == (1, 2, 1, 1) and cfg.embed_dim == 256 and cfg.to_dict()["layers"] == [1, 2, 1, 1]
    assert mr.ModifiedResNetConfig() == mr.ModifiedResNetConfig(layers=(3, 4, 6, 3), width=64, output_dim=1024,
                                                                heads=32, image_size=224, in_channels=3)
    with pytest.raises(ConfigError, match="heads"):
        mr.ModifiedResNetConfig.from_dict({"width": 8, "heads": 3})
    with pytest.raises(ConfigError, match="layers"):
        mr.ModifiedResNetConfig.from_dict({"layers": [1, 1, 1]})
    assert mr.canonical_key("layer1.0.bn1.num_batches_tracked") is None
    assert mr.canonical_key("layer1.0.bn1.running_var") == "layer1.0.bn1.running_var"
