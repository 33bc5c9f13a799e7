"""Model FLOPs of a traced program, and MFU.

Model FLOPs count the matmuls and convolutions of the math itself, 2 FLOPs per multiply-add: forward and backward,
no rematerialisation recompute, attention as its two matmuls whatever kernel runs it (the convention of PaLM's MFU
and of `torch.utils.flop_counter`). `count_flops` walks the jaxpr of a function (into jit, remat, custom-vjp,
shard_map and scan bodies); `model_flops` traces it under `jaxlcd.models.layers.reference_math`, i.e. with XLA
attention and no remat, so fused kernels (opaque to a jaxpr) and recompute do not change the count.
MFU = model FLOPs per step / step time / (devices x peak FLOP/s of one device, dense bf16).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jaxlcd.models.layers import reference_math

# dense bfloat16 peak FLOP/s per device, matched against jax's device_kind (first match wins, lower-cased)
PEAK_FLOPS = (
    ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12), ("gh200", 989e12), ("a100", 312e12),
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12), ("tpu v4", 275e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one device of this ``jax.Device.device_kind``; None when unknown (e.g. CPUs)."""
    kind = device_kind.lower()
    return next((peak for key, peak in PEAK_FLOPS if key in kind), None)


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rc), (_, rb) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
    return 2.0 * math.prod(lhs) * math.prod(rhs_free)


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec        # (out feature, in feature, *spatial) dims of the kernel
    per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
    # a transposed conv (lhs_dilation, the input gradient of a strided conv) multiplies the inserted zeros too
    return 2.0 * math.prod(out) * per_output / math.prod(eqn.params.get("lhs_dilation") or (1,))


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):     # ClosedJaxpr
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of the dot_general and conv_general_dilated equations of a (closed) jaxpr, nested ones included.

    cond: its most expensive branch; scan: its body times its length; while: its body once (the trip count is not
    in the program).
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0.0)
        else:
            inner = sum(jaxpr_flops(j) for key, v in eqn.params.items() if key != "cond_jaxpr"
                        for j in _sub_jaxprs(v))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def count_flops(fn: Callable, *args: Any) -> float:
    """Matmul + convolution FLOPs of ``fn(*args)`` as traced (args may be arrays or ShapeDtypeStructs).

    ``fn`` is traced through a new wrapper each time: jax caches traces by function, and a trace made under
    `reference_math` must neither be reused here nor by a later ``jax.jit(fn)``.
    """
    return jaxpr_flops(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def model_flops(make_fn: Callable[[], Callable], *args: Any) -> float:
    """Model FLOPs of the function ``make_fn()`` builds, traced on ``args`` under `reference_math`.

    ``make_fn`` builds the function inside the context, so settings read at build time see it too.
    """
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), args)
    with reference_math():
        return count_flops(make_fn(), *abstract)
