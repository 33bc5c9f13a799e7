"""One first-level SD 2.1 self-attention through each attention implementation: time, memory traffic, temporaries.

The attention of the UNet's first down block at 512 px: batch 8, 4096 tokens (64 x 64 latent), 5 heads x 64,
bfloat16, forward + backward (d q, d k, d v of sum(out * cotangent)), as `jaxlcd.models.attention.attention` runs it
inside the ports. For each implementation the backend has (cpu: xla; gpu: xla, cudnn; tpu: xla, pallas):

- from the compiled program: `cost_analysis()` bytes accessed and FLOPs, `memory_analysis()` temporaries;
- on a device (not with --tpu-topology): the median step time over --steps runs, and TFLOP/s from the model FLOPs
  (4 matmuls of 2*B*T*S*D each in the backward, 2 in the forward: 12*B*T*S*D).

With libtpu installed (see benchmarks/aot_tpu.py for the separate venv), ``--tpu-topology v5e:2x2`` compiles both
TPU implementations for one chip of that topology on this host (ahead of time, no TPU needed): no times then.

    PYTHONPATH=. python benchmarks/attention.py                           # this machine's backend
    PYTHONPATH=. .venv-tpu/bin/python benchmarks/attention.py --tpu-topology v5e:2x2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp

from jaxlcd.models.attention import attention
from common import print_table

GiB = 2 ** 30
IMPLS = {"cpu": ["xla"], "gpu": ["xla", "cudnn"], "tpu": ["xla", "pallas"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096, help="query and key length (64 x 64 latent at 512 px)")
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--steps", type=int, default=10, help="timed runs per implementation (device only)")
    p.add_argument("--tpu-topology", default="", help="AOT-compile for one chip of this TPU topology, e.g. v5e:2x2")
    p.add_argument("--out", default="", help="JSON file for the rows")
    return p.parse_args(argv)


def fwd_bwd(impl: str, heads: int):
    """(q, k, v, cotangent) [B,T,H*D] -> (dq, dk, dv): one forward and backward of the attention."""
    def loss(q, k, v, ct):
        return jnp.sum(attention(q, k, v, heads=heads, impl=impl).astype(jnp.float32) * ct)
    return jax.grad(loss, argnums=(0, 1, 2))


def measure(impl: str, args, device, timed: bool) -> dict:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    b, t, d = args.batch, args.tokens, args.heads * args.head_dim
    dtype = jnp.dtype(args.dtype)
    mesh = Mesh([device], ("data",))
    sharding = NamedSharding(mesh, P())
    shapes = [jax.ShapeDtypeStruct((b, t, d), dtype, sharding=sharding) for _ in range(3)]
    shapes.append(jax.ShapeDtypeStruct((b, t, d), jnp.float32, sharding=sharding))
    with jax.set_mesh(mesh):    # the backend `auto` and the kernels see is the device's, also for an AOT target
        t0 = time.perf_counter()
        compiled = jax.jit(fwd_bwd(impl, args.heads)).lower(*shapes).compile()
        compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    mem = compiled.memory_analysis()
    model_flop = 12 * b * t * t * d
    row = {"impl": impl, "device": device.device_kind, "temp_gib": mem.temp_size_in_bytes / GiB,
           "bytes_accessed_gib": float(cost.get("bytes accessed", float("nan"))) / GiB,
           "xla_gflop": float(cost.get("flops", float("nan"))) / 1e9, "model_gflop": model_flop / 1e9,
           "compile_s": compile_s}
    if timed:
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        inputs = [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, shapes)]
        jax.block_until_ready(compiled(*inputs))
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times.append(time.perf_counter() - t0)
        row["ms"] = 1e3 * statistics.median(times)
        row["tflops"] = model_flop / statistics.median(times) / 1e12
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tpu_topology:
        from jax.experimental import topologies

        device = topologies.get_topology_desc(platform="tpu", topology_name=args.tpu_topology).devices[0]
        platform, timed = "tpu", False
    else:
        device = jax.devices()[0]
        platform, timed = ("gpu" if device.platform in ("gpu", "cuda") else device.platform), True
    print(f"one self-attention: batch {args.batch}, {args.tokens} tokens, {args.heads} heads x {args.head_dim}, "
          f"{args.dtype}, forward + backward; {device.device_kind} ({'AOT' if not timed else 'run'}), "
          f"jax {jax.__version__}", flush=True)
    rows = []
    for impl in IMPLS.get(platform, ["xla"]):
        try:
            rows.append(measure(impl, args, device, timed))
        except Exception as e:  # noqa: BLE001 - report and go on with the next implementation
            rows.append({"impl": impl, "error": f"{type(e).__name__}: {str(e)[:500]}"})
        print(json.dumps(rows[-1]), flush=True)
    print()
    print_table(rows, ["impl", "bytes_accessed_gib", "temp_gib", "xla_gflop", "model_gflop", "ms", "tflops", "error"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
