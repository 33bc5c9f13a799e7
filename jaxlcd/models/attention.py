"""The one multi-head attention every port calls, with a fused kernel picked by backend.

Implementations (``--config.attention``, the modules' ``attention_impl``):

- ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``. Writes the float32 score matrix
  [B, heads, Tq, Tk] to memory (8 GB for one first-level SD self-attention at 512 px, batch 8).
- ``cudnn``: cuDNN flash attention on NVIDIA GPUs where its constraints hold (bfloat16/float16, head dim a
  multiple of 8 and <= 256, no additive bias); the XLA path otherwise (e.g. the VAE's single 512-dim head,
  float32 parity runs). jax shards it over the batch by itself (custom partitioning).
- ``pallas``: the Pallas TPU splash-attention kernel for self-attention whose lengths are multiples of 128 (the
  UNet's 4096/1024/256-token maps); the XLA path for cross-attention (77 keys) and short sequences. Under a
  mesh (``jax.set_mesh``; the training loop sets it) it runs per device through ``shard_map`` over the batch axes;
  with several devices and no mesh in context it takes the XLA path (a Pallas call cannot be partitioned). Off TPU it
  runs in Pallas interpret mode: slow, for checking numerics only.
- ``auto`` (default): ``cudnn`` on GPU, ``pallas`` on TPU, ``xla`` elsewhere. The backend is the platform of the
  mesh being traced for (so an AOT compile for a TPU topology on a CPU host picks the TPU kernel), else jax's
  default backend.

Numerics: every path takes q/k/v in the compute dtype, accumulates the scores in float32, runs the softmax in
float32 and multiplies the probabilities (cast to v's dtype) with v, which is what diffusers'
``upcast_attention=True`` does; so SD 2.1-768 keeps its numerics on the fused kernels too.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlcd.errors import InputError
from jaxlcd.models.layers import in_reference_math
from jaxlcd.parallel import BATCH_AXES

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
_HALF = (jnp.bfloat16, jnp.float16)


def traced_platform() -> str:
    """'cpu' | 'gpu' | 'tpu': the platform of the mesh in context (``jax.set_mesh``), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    platform = None if mesh.empty else getattr(mesh.abstract_device, "platform", None)
    platform = platform or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve(impl: str, platform: str | None = None) -> str:
    """The implementation ``impl`` means on ``platform`` ('auto' -> cudnn / pallas / xla); InputError if unknown."""
    if impl not in IMPLEMENTATIONS:
        raise InputError(f"attention={impl!r} is not an attention implementation; use one of {list(IMPLEMENTATIONS)}")
    platform = platform or traced_platform()
    if impl == "auto":
        return {"gpu": "cudnn", "tpu": "pallas"}.get(platform, "xla")
    return impl


def check_available(impl: str, platform: str) -> str:
    """Validate a configured implementation for ``platform`` at start-up; returns the resolved name.

    cudnn off an NVIDIA GPU is refused in one sentence; pallas off TPU is allowed (interpret mode, slow).
    """
    name = resolve(impl, platform)
    if name == "cudnn" and platform != "gpu":
        raise InputError(f"attention='cudnn' needs an NVIDIA GPU, but this run's backend is {platform}; "
                         "use attention='auto' or 'xla'")
    return name


def attention(q, k, v, *, heads: int, impl: str = "auto", is_causal: bool = False, bias=None):
    """Multi-head scaled dot-product attention.

    q: [B, Tq, heads*dh], k/v: [B, Tk, heads*dh] (any float dtype) -> [B, Tq, heads*dh] in q's dtype.
    bias: additive logits bias broadcastable to [B, heads, Tq, Tk] (XLA path only) or None.
    """
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, a.shape[2] // heads)
    q4, k4, v4 = split(q), split(k), split(v)
    name = "xla" if in_reference_math() else resolve(impl)
    out = None
    if name == "cudnn" and bias is None and _cudnn_fits(q4, k4):
        try:
            out = jax.nn.dot_product_attention(q4, k4, v4, is_causal=is_causal, implementation="cudnn")
        except NotImplementedError:     # a shape/version cuDNN does not take: the XLA path
            out = None
    elif name == "pallas" and bias is None and not is_causal and _splash_fits(q4, k4):
        out = _splash_sharded(q4, k4, v4)
    if out is None:
        out = jax.nn.dot_product_attention(q4, k4, v4, bias=bias, is_causal=is_causal, implementation="xla")
    return out.reshape(out.shape[0], out.shape[1], -1).astype(q.dtype)


def _cudnn_fits(q4, k4) -> bool:
    dh = q4.shape[-1]
    return q4.dtype in _HALF and k4.dtype == q4.dtype and dh % 8 == 0 and dh <= 256


def _splash_fits(q4, k4) -> bool:
    return q4.shape[1] % 128 == 0 and k4.shape[1] % 128 == 0 and k4.dtype == q4.dtype


def _block(n: int) -> int:
    """The largest of 512/256/128 dividing a sequence length n (n % 128 == 0)."""
    return next(b for b in (512, 256, 128) if n % b == 0)


def _splash_kernel(heads: int, tq: int, tk: int, interpret: bool):
    """A splash-attention kernel with no mask; made at each call, inside the trace that uses it (its mask tables
    become arrays of that trace, so it cannot be cached across traces)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    bq, bk = _block(tq), _block(tk)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    mask = sm.MultiHeadMask([sm.FullMask((tq, tk))] * heads)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q4, k4, v4, interpret: bool):
    """Splash attention on [B, T, heads, dh] arrays; the head dim is zero-padded to the 128 lanes it tiles by."""
    b, tq, heads, dh = q4.shape
    pad = (-dh) % 128
    to_kernel = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, pad))).transpose(0, 2, 1, 3)
    kernel = _splash_kernel(heads, tq, k4.shape[1], interpret)
    out = jax.vmap(kernel)(to_kernel(q4 * jnp.asarray(1.0 / math.sqrt(dh), q4.dtype)), to_kernel(k4), to_kernel(v4))
    return out.transpose(0, 2, 1, 3)[..., :dh]


def _splash_sharded(q4, k4, v4):
    """Splash attention per device under the mesh in context (over its batch axes); None where it cannot run."""
    interpret = traced_platform() != "tpu"
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty and jax.device_count() > 1:
        return None     # no mesh in context: the inputs may be sharded, and a Pallas call cannot be partitioned
    if mesh.empty or mesh.size == 1:
        return _splash(q4, k4, v4, interpret)
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or q4.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return None         # the batch does not split over the mesh: the XLA path (the partitioner handles it)
    spec = P(axes)
    return jax.shard_map(functools.partial(_splash, interpret=interpret), mesh=mesh, in_specs=(spec, spec, spec),
                         out_specs=spec, check_vma=False)(q4, k4, v4)
