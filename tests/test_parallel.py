"""Sharding on a simulated 8-device CPU mesh (XLA_FLAGS set in conftest.py): mesh shapes, rules -> specs,
sharded init, optimizer state specs, global batches, and sharded == single-device numerics."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import rel_err
from jaxlcd import parallel
from jaxlcd.models import unet
from tiny_pipeline import TINY_UNET

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: set XLA_FLAGS="
                                "--xla_force_host_platform_device_count=8 before jax is imported")


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"data": 2, "fsdp": 4})


@pytest.fixture(scope="module")
def tiny():
    """(module, init args) of a tiny UNet whose largest params exceed min_fsdp_size."""
    module = unet.build(dict(diffusers.UNet2DConditionModel(**TINY_UNET).config))
    return module, (jax.random.key(0),) + unet.dummy_inputs(module)[:3]


@pytest.fixture(scope="module")
def sharded(tiny, mesh):
    module, args = tiny
    return parallel.init_sharded(module.init, mesh, parallel.FSDP_RULES, *args)


def flat(tree):
    return {parallel.path_str(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]}


# ---------------------------------------------------------------------------------------------- mesh
def test_mesh_shapes(mesh):
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(parallel.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(parallel.make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(parallel.make_mesh({"fsdp": 2}, devices=jax.devices()[:2]).shape)["fsdp"] == 2
    assert "data=2 fsdp=4 tensor=1" in parallel.describe(mesh)


@pytest.mark.parametrize("shape, match", [
    ({"data": 3, "fsdp": -1}, "product 3 does not divide the 8 devices"),
    ({"data": 2, "fsdp": 2}, "has product 4 but there are 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"model": 8}, "unknown"),
])
def test_mesh_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_mesh(shape)


# --------------------------------------------------------------------------------------------- rules
def test_unet_specs(tiny, mesh):
    module, args = tiny
    specs = flat(parallel.logical_specs(jax.eval_shape(module.init, *args), mesh))
    expected = {
        "params/down_blocks_1.resnets_0/conv1/kernel": P(None, None, None, "fsdp"),  # [3,3,32,64]
        "params/up_blocks_0.resnets_0/conv1/kernel": P(None, None, "fsdp"),  # [3,3,128,64]
        "params/mid_block.attentions_0/transformer_blocks_0/ff.net_0.proj/kernel": P(None, "fsdp"),  # [64,512]
        "params/mid_block.attentions_0/transformer_blocks_0/ff.net_2/kernel": P("fsdp"),  # [256,64] = 2**14
        "params/time_embedding/linear_2/kernel": P(None, "fsdp"),  # [128,128] tie -> later dim
        "params/conv_in/kernel": P(),  # 1152 elements < min_fsdp_size
        "params/time_embedding/linear_2/bias": P(),  # [128]
        "params/mid_block.resnets_0/norm1/scale": P(),
    }
    for name, spec in expected.items():
        assert specs[name] == spec, name
    assert sum(s != P() for s in specs.values()) >= 10
    # fsdp=1 -> everything replicated; tensor rules on a tensor mesh split attention kernels
    assert set(flat(parallel.logical_specs(jax.eval_shape(module.init, *args),
                                           parallel.make_mesh())).values()) == {P()}
    tmesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tspecs = flat(parallel.logical_specs(jax.eval_shape(module.init, *args), tmesh, parallel.TENSOR_RULES))
    blk = "params/mid_block.attentions_0/transformer_blocks_0/"
    assert tspecs[blk + "attn1/to_q/kernel"] == P(None, "tensor")
    assert tspecs[blk + "attn1/to_out_0/kernel"] == P("tensor", None)


def test_explicit_rule_must_divide(mesh):
    tree = {"w": jax.ShapeDtypeStruct((6, 8), jnp.float32)}
    with pytest.raises(ValueError, match="size 6 of 'w'"):
        parallel.logical_specs(tree, mesh, [(r"w", P("fsdp", None))])
    assert parallel.logical_specs(tree, mesh, [(r"w", P(None, "fsdp"))])["w"] == P(None, "fsdp")


def test_init_sharded_and_optimizer_state(sharded, mesh):
    params, shardings = sharded
    jax.tree.map(lambda x, s: (x.sharding == s) or pytest.fail(f"{x.sharding} != {s}"), params, shardings)
    kernel = params["params"]["down_blocks_1.resnets_0"]["conv1"]["kernel"]
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 32, 16)

    tx = optax.adamw(1e-3)
    opt_shardings = parallel.param_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    adam = opt_state[0]
    assert adam.count.sharding.spec == P()
    param_specs = jax.tree.map(lambda s: s.spec, shardings)
    for moment in (adam.mu, adam.nu):
        assert jax.tree.map(lambda x: x.sharding.spec, moment) == param_specs


# --------------------------------------------------------------------------------------------- batch
def test_global_batch(mesh):
    host = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "t": np.arange(8), "w": np.float32(2.0),
            "caption": np.array(["a cat"] * 8)}
    batch = parallel.global_batch(host, mesh)
    assert batch["x"].shape == (8, 3) and len(batch["x"].sharding.device_set) == 8
    assert batch["x"].sharding.spec == parallel.batch_spec
    assert {s.data.shape for s in batch["x"].addressable_shards} == {(1, 3)}
    np.testing.assert_array_equal(np.asarray(batch["t"]), host["t"])
    assert batch["w"].sharding.spec == P()
    assert batch["caption"] is host["caption"]
    with pytest.raises(ValueError, match="per-host batch 6, which is not divisible by the 8 local devices"):
        parallel.global_batch({"x": np.zeros((6, 3), np.float32)}, mesh)


def test_sharded_loss_matches_single_device(tiny, sharded, mesh):
    module, _ = tiny
    params, _ = sharded
    rng = np.random.default_rng(0)
    host = {"x": rng.standard_normal((8, 8, 8, 4), np.float32), "t": rng.integers(0, 1000, (8,)),
            "ctx": rng.standard_normal((8, 3, 32), np.float32)}

    def loss(p, b):
        return jnp.mean(jnp.square(module.apply(p, b["x"], b["t"], b["ctx"])))

    sharded_loss = jax.jit(loss)(params, parallel.global_batch(host, mesh))
    assert sharded_loss.sharding.is_fully_replicated
    single = jax.jit(loss)(jax.device_get(params), {k: jnp.asarray(v) for k, v in host.items()})
    assert rel_err(sharded_loss, single) < 1e-5


# ------------------------------------------------------------------------------------------ processes
def test_multi_process_detection(monkeypatch):
    assert not parallel.is_multi_process_launch({})
    assert not parallel.is_multi_process_launch({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert parallel.is_multi_process_launch({"TPU_WORKER_HOSTNAMES": "h0,h1"})
    assert parallel.is_multi_process_launch({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2"})
    assert not parallel.is_multi_process_launch({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "1"})
    for var in ("JAX_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "MEGASCALE_NUM_SLICES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.maybe_initialize_distributed() is False
    assert parallel.maybe_initialize_distributed() is False  # idempotent no-op
