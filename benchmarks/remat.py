"""Memory and FLOPs of each student remat policy, from the compiled executable (and time on a device).

Compiles the student UNet's forward + backward (d params of mean(unet(z, t, ctx, w)^2)) of SD 2.1-base
(`aot_tpu.SD21_BASE_UNET` + time_cond_proj_dim 256; `--small`: the quarter-width one at 256 px) in bfloat16 with
float32 params, once per policy (`--config.remat`: none | full | dots | dots_no_batch), on one device:

- `memory_analysis()` temporaries (activations kept for the backward live here) and arguments;
- model FLOPs (`jaxlcd.training.flops.model_flops`: no recompute) and the FLOPs as traced with the policy
  (recompute included, attention counted as its matmuls): their difference is what the policy recomputes;
- on a device (not with --tpu-topology): the median time of a step.

    PYTHONPATH=. python benchmarks/remat.py --small                                   # this machine's backend
    PYTHONPATH=. .venv-tpu/bin/python benchmarks/remat.py --tpu-topology v5e:2x2      # one v5e chip, AOT

The CPU compiler's temporaries do not reflect rematerialisation (it does not schedule for memory): use a TPU
target (ahead of time, see benchmarks/aot_tpu.py for libtpu) or a GPU for the memory column.
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

from jaxlcd.models import unet
from jaxlcd.training import flops
from common import print_table

GiB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", nargs="+", default=["none", "full", "dots", "dots_no_batch"])
    p.add_argument("--batch", type=int, default=2, help="images per device")
    p.add_argument("--small", action="store_true", help="the quarter-width UNet at 256 px")
    p.add_argument("--attention", default="auto", help="auto | xla | cudnn | pallas")
    p.add_argument("--steps", type=int, default=5, help="timed runs per policy (device only)")
    p.add_argument("--tpu-topology", default="", help="AOT-compile for one chip of this TPU topology, e.g. v5e:2x2")
    p.add_argument("--out", default="", help="JSON file for the rows")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from aot_tpu import SD21_BASE_UNET, SMALL_UNET

    args = parse_args(argv)
    if args.tpu_topology:
        from jax.experimental import topologies

        device, timed = topologies.get_topology_desc(platform="tpu", topology_name=args.tpu_topology).devices[0], False
    else:
        device, timed = jax.devices()[0], True
    ucfg = dict(SMALL_UNET if args.small else SD21_BASE_UNET, time_cond_proj_dim=256)
    px = 256 if args.small else 512
    b, h, ctx_dim = args.batch, px // 8, ucfg["cross_attention_dim"]
    mesh = Mesh([device], ("data",))
    rep = NamedSharding(mesh, P())
    base = unet.build(ucfg, dtype=jnp.bfloat16, attention_impl=args.attention)
    shapes = (jax.ShapeDtypeStruct((b, h, h, 4), jnp.float32, sharding=rep),
              jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rep),
              jax.ShapeDtypeStruct((b, 77, ctx_dim), jnp.float32, sharding=rep),
              jax.ShapeDtypeStruct((b, 256), jnp.float32, sharding=rep))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=rep),
                          jax.eval_shape(lambda: base.init(jax.random.PRNGKey(0), *unet.dummy_inputs(base))["params"]))

    def grad_fn(module):
        loss = lambda p, z, t, c, w: jnp.mean(module.apply({"params": p}, z, t, c, w).astype(jnp.float32) ** 2)
        return jax.grad(loss)

    model = flops.model_flops(lambda: grad_fn(base), params, *shapes)
    print(f"student UNet fwd+bwd, {'small ' if args.small else ''}{px} px, batch {b}, bf16 compute, attention "
          f"{args.attention}; {device.device_kind} ({'run' if timed else 'AOT'}), jax {jax.__version__}; "
          f"model {model / 1e12:.3f} TFLOP", flush=True)
    rows = []
    for policy in args.policies:
        module = base.clone(remat=policy)
        traced = flops.count_flops(grad_fn(module.clone(attention_impl="xla")), params, *shapes)
        with jax.set_mesh(mesh):
            t0 = time.perf_counter()
            compiled = jax.jit(grad_fn(module)).lower(params, *shapes).compile()
            compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
        row = {"remat": policy, "temp_gib": mem.temp_size_in_bytes / GiB, "args_gib": mem.argument_size_in_bytes / GiB,
               "model_tflop": model / 1e12, "traced_tflop": traced / 1e12, "recompute_pct": 100 * (traced / model - 1),
               "xla_tflop": float(cost.get("flops", float("nan"))) / 1e12, "compile_s": compile_s}
        if timed:
            key = jax.random.PRNGKey(0)
            p = jax.tree.map(lambda s: jax.random.normal(key, s.shape, s.dtype) * 0.02, params)
            inputs = [jax.random.normal(key, s.shape, s.dtype) if s.dtype == jnp.float32
                      else jnp.full(s.shape, 500, s.dtype) for s in shapes]
            jax.block_until_ready(compiled(p, *inputs))
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(p, *inputs))
                times.append(time.perf_counter() - t0)
            row["step_s"] = statistics.median(times)
            peak = flops.peak_flops(device.device_kind)
            row["mfu_pct"] = 100 * model / row["step_s"] / peak if peak else float("nan")
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print_table(rows, ["remat", "temp_gib", "args_gib", "model_tflop", "traced_tflop", "recompute_pct", "xla_tflop",
                       "step_s", "mfu_pct"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
