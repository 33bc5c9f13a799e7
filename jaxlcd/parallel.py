"""Device mesh, sharding rules as data, and host-local -> global arrays.

Mesh axes are always ("data", "fsdp", "tensor"). The batch dimension is split over ("data", "fsdp");
parameters (and the optimizer moments that mirror them) are split over "fsdp" by `FSDP_RULES`; "tensor" is
only used by explicit rules such as `TENSOR_RULES` (off by default). Parameters are created directly in their
shardings (`init_sharded`: eval_shape -> shardings -> jit(out_shardings)), never materialised on one host.
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxlcd.errors import InputError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
batch_spec = P(BATCH_AXES)
"""Leading (batch) dim over ("data", "fsdp"), other dims replicated: any rank."""

Spec = Union[P, str]  # a PartitionSpec, "fsdp" or "replicate"
Rules = Sequence[tuple]  # ordered ((regex over the '/'-joined path, Spec), ...); first re.search match wins

FSDP_RULES: Rules = (
    (r"(^|/)(bias|scale|embedding_scale)$", "replicate"),  # biases and norm scales: small, 1-D
    (r".*", "fsdp"),  # everything else: largest fsdp-divisible dim over "fsdp" if >= min_fsdp_size elements
)
"""Default rules: ZeRO-3 style FSDP. Paths look like 'params/down_blocks_1.resnets_0/conv1/kernel'; optax
state leaves end with the same suffix ('0/mu/params/.../kernel'), so moments get their parameter's spec."""

REPLICATE_RULES: Rules = ((r".*", "replicate"),)  # e.g. frozen models on few devices
TENSOR_RULES: Rules = (
    (r"/(to_q|to_k|to_v|ff\.net_0\.proj)/kernel$", P(None, "tensor")),  # column parallel [in, out/T]
    (r"/(to_out_0|ff\.net_2)/kernel$", P("tensor", None)),  # row parallel [in/T, out]
) + tuple(FSDP_RULES)
"""Example Megatron-style rules for the UNet's attention/MLP Dense kernels (not used by default); the
kernels they match are not also split over "fsdp"."""


# ----------------------------------------------------------------------------------------------- mesh
def make_mesh(shape: Mapping[str, int] = {"data": -1, "fsdp": 1, "tensor": 1}, devices=None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor"); missing axes are 1 and one axis may be -1 (fills the rest).

    `devices` defaults to all global devices. Axes are `AxisType.Auto`, so plain `jax.jit` with
    in/out shardings propagates shardings (jax.make_mesh defaults to Explicit since jax 0.7).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    shape = dict(shape.items())
    unknown = sorted(set(shape) - set(AXES))
    if unknown:
        raise InputError(f"Mesh axes {unknown} are unknown; the mesh axes are {list(AXES)}.")
    sizes = [int(shape.get(a, 1)) for a in AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise InputError(f"Mesh shape {dict(zip(AXES, sizes))} must hold positive sizes and at most one -1.")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % fixed:
            raise InputError(f"Mesh shape {dict(zip(AXES, sizes))}: the fixed axes' product {fixed} does not "
                             f"divide the {n} devices.")
        sizes[sizes.index(-1)] = n // fixed
    elif fixed != n:
        raise InputError(f"Mesh shape {dict(zip(AXES, sizes))} has product {fixed} but there are {n} devices; "
                         f"make the product {n} or set one axis to -1.")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def describe(mesh: Mesh) -> str:
    """One line for logs, e.g. 'mesh data=2 fsdp=4 tensor=1 | 8 x cpu (cpu) | 1 process'."""
    axes = " ".join(f"{a}={s}" for a, s in mesh.shape.items())
    d = mesh.devices.flat[0]
    return (f"mesh {axes} | {mesh.devices.size} x {d.platform} ({getattr(d, 'device_kind', '?')}) | "
            f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}")


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, rngs, frozen small things)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int | None = None) -> NamedSharding:
    """Leading dim [B, ...] over ("data", "fsdp"), rest replicated; `ndim` only pads the spec with None."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * max((ndim or 1) - 1, 0))))


# ---------------------------------------------------------------------------------------------- rules
def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """'/'-joined key path, e.g. 'params/conv_in/kernel' or '0/mu/params/conv_in/kernel'."""
    return "/".join(_key_str(k) for k in path)


def _axis_size(mesh: Mesh, axes) -> int:
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes if a is not None)


def _spec_for(name: str, shape: tuple, mesh: Mesh, rules: Rules, min_fsdp_size: int) -> P:
    if not shape:  # scalars (optax count, step) always replicate
        return P()
    for pattern, spec in rules:
        if re.search(pattern, name):
            break
    else:
        return P()
    if isinstance(spec, P):
        if len(spec) > len(shape):
            raise InputError(f"Sharding rule {pattern!r} gives {spec} for {name!r} of shape {shape}: too many dims.")
        for dim, axes in zip(shape, spec):
            if axes is not None and dim % _axis_size(mesh, axes):
                raise InputError(f"Sharding rule {pattern!r} splits a dim of size {dim} of {name!r} {shape} over "
                                 f"{axes} of size {_axis_size(mesh, axes)}, which does not divide it.")
        return spec
    if spec == "replicate":
        return P()
    if spec != "fsdp":
        raise InputError(f"Sharding rule {pattern!r} has spec {spec!r}; use a PartitionSpec, 'fsdp' or 'replicate'.")
    k = mesh.shape["fsdp"]
    if k == 1 or math.prod(shape) < min_fsdp_size:
        return P()
    candidates = [(d, i) for i, d in enumerate(shape) if d % k == 0]
    if not candidates:
        return P()
    _, i = max(candidates)  # largest dim; ties go to the later (output) dim
    return P(*([None] * i), "fsdp")


def logical_specs(abstract_tree: Any, mesh: Mesh, rules: Rules | None = FSDP_RULES,
                  min_fsdp_size: int = 2 ** 14) -> Any:
    """PartitionSpec per leaf of any pytree whose leaves have `.shape` (ShapeDtypeStruct, arrays, optax state).

    First rule whose regex `re.search`es the leaf's '/'-joined path wins; unmatched leaves replicate.
    """
    rules = FSDP_RULES if rules is None else rules
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _spec_for(path_str(path), tuple(np.shape(x)), mesh, rules, min_fsdp_size), abstract_tree)


def param_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules | None = FSDP_RULES,
                    min_fsdp_size: int = 2 ** 14) -> Any:
    """NamedSharding per leaf (same tree structure as `abstract_tree`); see `logical_specs`."""
    specs = logical_specs(abstract_tree, mesh, rules, min_fsdp_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def init_sharded(init_fn: Callable, mesh: Mesh, rules: Rules | None, *args, min_fsdp_size: int = 2 ** 14):
    """Run `init_fn(*args)` under jit with out_shardings from the rules -> (params, shardings).

    Each device only ever holds its own shards; e.g. `init_sharded(module.init, mesh, None, rng, *dummy)`.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh, rules, min_fsdp_size)
    return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


def place(tree: Any, mesh: Mesh, rules: Rules | None = FSDP_RULES):
    """``tree`` (host or single-device arrays) put on the shardings the rules give -> (placed tree, shardings).
    For the small models of the demo jobs; large models are initialised straight into their shards
    (`init_sharded`)."""
    shardings = param_shardings(jax.eval_shape(lambda: tree), mesh, rules)
    return jax.device_put(tree, shardings), shardings


# ---------------------------------------------------------------------------------------------- batch
def local_batch_shards(mesh: Mesh) -> int:
    """Number of distinct batch slices (positions on the ("data", "fsdp") axes) held by this process."""
    di, fi = mesh.axis_names.index("data"), mesh.axis_names.index("fsdp")
    me = jax.process_index()
    return len({(idx[di], idx[fi]) for idx in np.ndindex(mesh.devices.shape)
                if mesh.devices[idx].process_index == me})


def global_batch(host_batch: Mapping[str, Any], mesh: Mesh) -> dict:
    """Host-local numpy batch {name: [b, ...]} -> global jax.Arrays [b * hosts, ...] split over ("data", "fsdp").

    Numeric entries (bool/int/float) become global arrays (0-d ones replicated; every host must pass the same
    value). Non-numeric entries (e.g. caption string arrays) are returned unchanged, as host-local numpy.
    Raises ValueError when b is not a multiple of this host's batch shards.
    """
    n_local = local_batch_shards(mesh)

    def convert(path, value):
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            return value
        if arr.ndim == 0:
            return jax.make_array_from_process_local_data(replicated(mesh), arr)
        if arr.shape[0] % n_local:
            raise InputError(f"Batch entry {path_str(path)!r} has per-host batch {arr.shape[0]}, which is not "
                             f"divisible by the {n_local} local devices on the ('data', 'fsdp') mesh axes; use a "
                             f"per-host batch size that is a multiple of {n_local}.")
        return jax.make_array_from_process_local_data(batch_sharding(mesh), arr)

    return jax.tree_util.tree_map_with_path(convert, dict(host_batch))


# ------------------------------------------------------------------------------------------- processes
def is_multi_process_launch(environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment says this is one of several processes (explicit JAX vars, TPU pod, Slurm, MPI)."""
    env = os.environ if environ is None else environ

    def count(name, sep=None):
        v = env.get(name, "").strip()
        if not v:
            return 0
        return len([h for h in v.split(sep) if h.strip()]) if sep else int(v)

    if env.get("JAX_NUM_PROCESSES"):
        return count("JAX_NUM_PROCESSES") > 1
    return bool(env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS")
                or count("TPU_WORKER_HOSTNAMES", ",") > 1 or count("MEGASCALE_NUM_SLICES") > 1
                or count("SLURM_NTASKS") > 1 or count("OMPI_COMM_WORLD_SIZE") > 1)


HEARTBEAT_TIMEOUT_S = int(os.environ.get("JAXLCD_HEARTBEAT_TIMEOUT_S", "30"))


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` once when launched as several processes; no-op otherwise.

    Must run before anything touches a JAX backend. Reads JAX_NUM_PROCESSES / JAX_PROCESS_ID when set
    (JAX_COORDINATOR_ADDRESS is read by JAX itself); otherwise JAX auto-detects TPU pods, Slurm and MPI. A process
    that stops answering (killed, crashed) is noticed by the others within HEARTBEAT_TIMEOUT_S seconds (env
    JAXLCD_HEARTBEAT_TIMEOUT_S, default 30), which then stop with JAX's error naming the lost task instead of
    waiting forever. On processes other than 0, jaxlcd logs warnings and errors only. Returns True when running
    multi-process.
    """
    if jax.distributed.is_initialized():
        return True
    if not is_multi_process_launch():
        return False
    kwargs = {"heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    if jax.process_index() != 0:
        logging.getLogger("jaxlcd").setLevel(logging.WARNING)
    return True


def barrier(name: str) -> None:
    """Wait until every process has reached this point (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxlcd:{name}")


def process_zero_first(fn: Callable, *args, name: str):
    """``fn(*args)`` on process 0, then, after every process has reached the same point, on the others: for work
    that writes shared files once and reuses them when they exist (data preparation, the tiny variant's models).
    One process: just ``fn(*args)``."""
    if jax.process_count() == 1:
        return fn(*args)
    out = fn(*args) if jax.process_index() == 0 else None
    barrier(name)
    return out if jax.process_index() == 0 else fn(*args)


def to_host(tree: Any) -> Any:
    """A pytree of (possibly cross-process sharded) jax.Arrays as full numpy arrays on every process. Every process
    must call it (it is a collective when the run has several processes)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def all_processes_strings(text: str | bytes) -> list[str]:
    """Every process's ``text`` (str or UTF-8 bytes), in process order (a collective)."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8")
    if jax.process_count() == 1:
        return [raw.decode("utf-8")]
    data = np.frombuffer(raw, np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([len(data)], np.int32)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    rows = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode("utf-8") for row, n in zip(rows, lengths)]


def any_process(flag: bool) -> bool:
    """True when ``flag`` is True on any process (a collective; one process: ``flag``)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.asarray([flag], np.bool_)).any())
