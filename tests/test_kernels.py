"""Attention implementations, remat policies and model-FLOP counting (issue: throughput).

The Pallas splash kernel runs here in Pallas interpret mode (the kernel's own code, interpreted on the CPU); cuDNN
needs an NVIDIA GPU and its test is skipped elsewhere.
"""
import diffusers
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention as TorchAttention, AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from conftest import nchw_to_nhwc, perturb_, rel_err
from jaxlcd import parallel
from jaxlcd.models import attention as attn_lib, layers
from jaxlcd.training import flops
from jaxlcd.weights import load_component

TINY_UNET = dict(  # 16x16 latents: the first level's self-attention has 256 tokens (a splash block multiple)
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)


def qkv(shape_q, shape_k, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, shape_q, dtype), jax.random.normal(kk, shape_k, dtype),
            jax.random.normal(kv, shape_k, dtype))


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_(diffusers.UNet2DConditionModel(**TINY_UNET), seed=0).eval()
    path = str(tmp_path_factory.mktemp("unet"))
    model.save_pretrained(path)
    module, params = load_component(path)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 24, generator=g)
    t = torch.tensor([10, 900])
    return model, module, params, (x, t, ctx)


def one_device():
    """A one-device mesh in context: the Pallas kernel runs unsharded (the tests' process has 8 CPU devices)."""
    return jax.set_mesh(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))


def jax_inputs(inputs):
    x, t, ctx = inputs
    return nchw_to_nhwc(x), t.numpy(), ctx.numpy()


# ------------------------------------------------------------------------------------------ attention

@pytest.mark.parametrize("tq,tk", [(256, 256), (128, 384)])
def test_pallas_splash_matches_xla_forward_and_backward(tq, tk):
    q, k, v = qkv((2, tq, 2 * 64), (2, tk, 2 * 64))
    ct = jax.random.normal(jax.random.PRNGKey(3), q.shape)

    def run(impl):
        f = lambda q, k, v: attn_lib.attention(q, k, v, heads=2, impl=impl)
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(ct))

    with one_device():
        fused = run("pallas")
    for a, b in zip(fused, run("xla")):
        assert rel_err(a, b) <= 1e-5


def test_pallas_kernel_really_runs_and_falls_back_where_it_cannot():
    traced = lambda tq, tk, **kw: str(jax.make_jaxpr(lambda q, k, v: attn_lib.attention(
        q, k, v, heads=2, impl="pallas", **kw))(*qkv((1, tq, 32), (1, tk, 32))))
    assert "pallas_call" not in traced(256, 256)                 # 8 devices, no mesh in context: XLA
    with one_device():
        assert "pallas_call" in traced(256, 256)
        assert "pallas_call" not in traced(256, 77)                  # cross-attention to 77 tokens: XLA
        assert "pallas_call" not in traced(128, 128, is_causal=True)  # causal text attention: XLA
        with layers.reference_math():                                 # counting FLOPs: always the XLA math
            assert "pallas_call" not in traced(256, 256)
    # under a 2-device mesh: per device through shard_map, the same numbers as the XLA path
    q, k, v = qkv((4, 128, 64), (4, 128, 64))
    with jax.set_mesh(parallel.make_mesh({"data": 2}, devices=jax.devices()[:2])):
        f = jax.jit(lambda *a: attn_lib.attention(*a, heads=1, impl="pallas"))
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v))
        out = f(q, k, v)
    assert rel_err(out, attn_lib.attention(q, k, v, heads=1, impl="xla")) <= 1e-5


def test_unet_with_the_pallas_kernel_matches_diffusers(tiny_unet):
    model, module, params, inputs = tiny_unet
    with torch.no_grad():
        ref = nchw_to_nhwc(model(*inputs).sample)
    fused = module.clone(attention_impl="pallas")
    with one_device():
        assert "pallas_call" in str(jax.make_jaxpr(fused.apply)({"params": params}, *jax_inputs(inputs)))
        out = jax.jit(fused.apply)({"params": params}, *jax_inputs(inputs))
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_half_precision_attention_keeps_diffusers_upcast_attention_numerics(impl):
    """SD 2.1-768's upcast_attention in bf16: diffusers' own upcast path (float32 scores and softmax from bf16 q/k,
    probabilities cast back, bf16 @ v) vs each implementation, on the same bf16 inputs."""
    heads, dh = 2, 64
    q, k, v = qkv((2, 256, heads * dh), (2, 256, heads * dh), jnp.bfloat16, seed=4)
    ref_attn = TorchAttention(query_dim=heads * dh, heads=heads, dim_head=dh, upcast_attention=True,
                              upcast_softmax=True, processor=AttnProcessor())
    t = lambda a: ref_attn.head_to_batch_dim(torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16))
    probs = ref_attn.get_attention_scores(t(q), t(k))                  # diffusers' upcast scores -> bf16 probs
    ref = ref_attn.batch_to_head_dim(torch.bmm(probs, t(v))).float().numpy()
    with one_device():
        out = np.asarray(attn_lib.attention(q, k, v, heads=heads, impl=impl), np.float32)
    full_fp32 = np.asarray(attn_lib.attention(*(a.astype(jnp.float32) for a in (q, k, v)), heads=heads), np.float32)
    assert out.dtype == np.float32 and rel_err(out, ref) <= 1e-2     # within bf16 rounding of the reference
    assert rel_err(out, full_fp32) <= 1e-2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_matches_xla_within_bf16_tolerance():
    q, k, v = qkv((2, 1024, 5 * 64), (2, 1024, 5 * 64), jnp.bfloat16)
    traced = str(jax.make_jaxpr(lambda *a: attn_lib.attention(*a, heads=5, impl="cudnn"))(q, k, v))
    assert "xla" not in traced or "cudnn" in traced
    out = attn_lib.attention(q, k, v, heads=5, impl="cudnn").astype(jnp.float32)
    assert rel_err(out, attn_lib.attention(q, k, v, heads=5, impl="xla").astype(jnp.float32)) <= 1e-2


def test_auto_resolves_by_platform_and_cudnn_off_gpu_is_one_sentence():
    assert [attn_lib.resolve("auto", p) for p in ("cpu", "gpu", "tpu")] == ["xla", "cudnn", "pallas"]
    assert attn_lib.check_available("pallas", "cpu") == "pallas"      # interpret mode: slow, allowed
    with pytest.raises(attn_lib.InputError, match="attention='cudnn' needs an NVIDIA GPU"):
        attn_lib.check_available("cudnn", "cpu")


# ------------------------------------------------------------------------------------------ remat

def test_remat_policies_give_the_same_gradients_and_cost_their_recompute(tiny_unet):
    """Same gradients under every policy; the compiled and the traced FLOPs grow with what a policy recomputes.
    (Their memory is measured by benchmarks/remat.py on a TPU target: the CPU compiler's temporaries do not
    reflect rematerialisation.)"""
    _, module, params, inputs = tiny_unet
    x, t, ctx = jax_inputs(inputs)
    results = {}
    for policy in ("none", "full", "dots", "dots_no_batch"):
        m = module.clone(remat=policy)
        loss = lambda p: jnp.mean(m.apply({"params": p}, x, t, ctx) ** 2)
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        results[policy] = (compiled(params), compiled.cost_analysis()["flops"], flops.count_flops(jax.grad(loss), params))
    ref_grads = results["none"][0]
    for policy, (grads, _, _) in results.items():
        assert rel_err(ravel_pytree(grads)[0], ravel_pytree(ref_grads)[0]) <= 1e-5   # float32 rounding
    compiled = {p: r[1] for p, r in results.items()}
    counted = {p: r[2] for p, r in results.items()}
    assert compiled["none"] < compiled["dots"] < compiled["dots_no_batch"] < compiled["full"]
    assert counted["full"] > counted["dots_no_batch"] > counted["none"]   # matmuls/convs recomputed
    assert counted["dots"] == counted["none"]          # dots_saveable keeps every matmul/conv output
    with pytest.raises(layers.InputError, match="remat='dot' is not a remat policy"):
        module.clone(remat="dot").apply({"params": params}, x, t, ctx)


# ------------------------------------------------------------------------------------------ FLOPs

def test_dense_and_conv_flops_equal_the_analytic_counts():
    w, x = jnp.ones((64, 32)), jnp.ones((8, 10, 64))
    assert flops.count_flops(lambda x, w: x @ w, x, w) == 2 * 8 * 10 * 64 * 32
    img, kern = jnp.ones((2, 16, 16, 3)), jnp.ones((3, 3, 3, 8))
    conv = lambda img, kern, s: jax.lax.conv_general_dilated(img, kern, (s, s), "SAME",
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    fwd = 2 * 2 * 16 * 16 * 8 * 3 * 3 * 3
    assert flops.count_flops(lambda i, k: conv(i, k, 1), img, kern) == fwd
    # backward of a stride-2 conv: weight and input gradients each cost the forward's multiply-adds
    fwd2 = fwd / 4
    grads = jax.grad(lambda i, k: jnp.sum(conv(i, k, 2)), argnums=(0, 1))
    assert flops.count_flops(grads, img, kern) == pytest.approx(3 * fwd2)


def test_unet_flops_match_torch_flop_counter_forward_and_backward(tiny_unet):
    model, module, params, inputs = tiny_unet
    model.set_attn_processor(AttnProcessor())   # attention as bmm, which FlopCounterMode counts
    with FlopCounterMode(display=False) as fwd_counter:
        with torch.no_grad():
            model(*inputs)
    with FlopCounterMode(display=False) as train_counter:
        model(*inputs).sample.pow(2).mean().backward()
    x, t, ctx = jax_inputs(inputs)
    forward = flops.count_flops(lambda p: module.apply({"params": p}, x, t, ctx), params)
    grad = jax.grad(lambda p: jnp.mean(module.apply({"params": p}, x, t, ctx) ** 2))
    train = flops.model_flops(lambda: grad, params)
    assert forward == pytest.approx(fwd_counter.get_total_flops(), rel=1e-3)
    assert train == pytest.approx(train_counter.get_total_flops(), rel=1e-3)
    # model FLOPs leave out recompute and fused kernels: the same count with full remat and the Pallas kernel
    fused = module.clone(remat="full", attention_impl="pallas")
    fused_grad = jax.grad(lambda p: jnp.mean(fused.apply({"params": p}, x, t, ctx) ** 2))
    assert flops.model_flops(lambda: fused_grad, params) == train
    assert flops.count_flops(fused_grad, params) != train     # as traced: recompute in, the kernel's matmuls out


def test_peak_table_knows_the_accelerators_and_not_cpus():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and flops.peak_flops("NVIDIA H200") == 989e12
    assert flops.peak_flops("TPU v5 lite") == 197e12 and flops.peak_flops("TPU v5p") == 459e12
    assert flops.peak_flops("TPU v6 lite") == 918e12 and flops.peak_flops("cpu") is None
