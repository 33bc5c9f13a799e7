"""The one optimizer factory: optax AdamW from a config, used by every job.

Keys of the ``optim`` config (every one optional but ``learning_rate``):
    learning_rate   peak learning rate
    schedule        "constant" | "warmup_constant" | "warmup_cosine" (linear warmup from 0, then cosine decay to 0
                    at the run's last step)
    warmup_steps    steps of linear warmup (schedules with warmup)
    b1, b2, eps     Adam moments (0.9, 0.999, 1e-8)
    weight_decay    decoupled weight decay (0)
    grad_clip       clip the global gradient norm to this before the update (0 = no clipping)
    frozen          regexes of parameter paths ("a/b/kernel") that never change (their update is zero)
    lr_mults        ((regex, multiple), ...): parameters whose path matches train at that multiple of the rate
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import ml_collections
import numpy as np
import optax

from jaxlcd.errors import InputError

SCHEDULES = ("constant", "warmup_constant", "warmup_cosine")


def learning_rate_schedule(cfg, total_steps: int):
    """A float (constant: kept as a plain number, so the optimizer state stays as older checkpoints have it) or an
    optax schedule step -> rate."""
    kind, lr, warmup = cfg.get("schedule", "constant"), cfg.learning_rate, cfg.get("warmup_steps", 0)
    if kind not in SCHEDULES:
        raise InputError(f"optim.schedule={kind!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if kind == "constant":
        return lr
    if kind == "warmup_constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, total_steps - 1), total_steps)


def param_paths(params) -> list[str]:
    """The "a/b/kernel" path of every leaf of ``params``, in tree order."""
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def label_params(params, rules: Sequence[tuple[str, str]], default: str):
    """A tree like ``params`` whose leaves are the label of the first (regex, label) rule that searches the leaf's
    path, else ``default``."""
    compiled = [(re.compile(pattern), label) for pattern, label in rules]
    labels = [next((label for r, label in compiled if r.search(path)), default) for path in param_paths(params)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), labels)


def make_optimizer(cfg, total_steps: int, hyperparams_in_state: bool = True) -> optax.GradientTransformation:
    """AdamW (after optional global-norm clipping) with the schedule, frozen parameters and per-group rates of ``cfg``
    (the keys above).

    ``hyperparams_in_state``: wrap AdamW in ``optax.inject_hyperparams`` so the rate, moments and decay are part of
    the (checkpointed) optimizer state and changing them does not change the compiled step.
    """
    if isinstance(cfg, dict):
        cfg = ml_collections.ConfigDict(cfg)
    schedule = learning_rate_schedule(cfg, total_steps)
    b1, b2, eps, wd = cfg.get("b1", 0.9), cfg.get("b2", 0.999), cfg.get("eps", 1e-8), cfg.get("weight_decay", 0.0)

    def adamw(scale: float):
        lr = schedule if scale == 1.0 else (
            schedule * scale if not callable(schedule) else lambda step: scale * schedule(step))
        make = optax.inject_hyperparams(optax.adamw) if hyperparams_in_state else optax.adamw
        return make(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)

    mults = tuple((pattern, float(m)) for pattern, m in cfg.get("lr_mults", ()))
    frozen = tuple(cfg.get("frozen", ()))
    for pattern in frozen + tuple(p for p, _ in mults):
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"optim: {pattern!r} is not a valid regular expression ({e})") from None
    if not mults and not frozen:
        tx = adamw(1.0)
    else:
        groups = {f"x{m:g}": adamw(m) for m in {1.0} | {m for _, m in mults}}
        if frozen:
            groups["frozen"] = optax.set_to_zero()
        rules = [(p, "frozen") for p in frozen] + [(p, f"x{m:g}") for p, m in mults]
        tx = optax.multi_transform(groups, lambda params: label_params(params, rules, "x1"))
    clip = cfg.get("grad_clip", 0.0)
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def optim_config(**values) -> ml_collections.ConfigDict:
    """An ``optim`` config section with every key above at its default (constant rate, Adam's moments, no decay, no
    clipping, nothing frozen), then ``values``; e.g. ``optim_config(learning_rate=1e-3, schedule="warmup_cosine")``."""
    cfg = ml_collections.ConfigDict({"learning_rate": 1e-4, "schedule": "constant", "warmup_steps": 0, "b1": 0.9,
                                     "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 0.0, "frozen": (),
                                     "lr_mults": ()})
    cfg.update(values)
    return cfg


def refresh_hyperparams(opt_state, cfg):
    """``opt_state`` with the hyper-parameters that `make_optimizer` keeps in the state (``inject_hyperparams``)
    set from ``cfg`` (an ``optim`` section): a resumed run trains with the config it is given, not the one it was
    checkpointed with. The rate is set only for a constant schedule without rate multiples (a schedule is a
    function of the step, rebuilt from ``cfg`` anyway). Returns (new opt_state, {name: (old, new)} of what
    changed)."""
    values = {k: cfg.get(k) for k in ("b1", "b2", "eps", "weight_decay") if cfg.get(k) is not None}
    if cfg.get("schedule", "constant") == "constant" and not cfg.get("lr_mults"):
        values["learning_rate"] = cfg.learning_rate
    changed = {}

    def refresh(node):
        if not (hasattr(node, "hyperparams") and isinstance(node.hyperparams, dict)):
            return node
        hyperparams = dict(node.hyperparams)
        for name, value in values.items():
            if name in hyperparams:
                old = hyperparams[name]
                if float(old) != float(np.asarray(value, old.dtype)):   # as stored (float32): 0.9 is not 0.9
                    changed[name] = (float(old), float(value))
                    new = np.asarray(value, old.dtype)   # placed like the value it replaces
                    hyperparams[name] = jax.device_put(new, old.sharding) if hasattr(old, "sharding") else new
        return node._replace(hyperparams=hyperparams)

    is_node = lambda n: hasattr(n, "hyperparams") and isinstance(getattr(n, "hyperparams"), dict)
    return jax.tree_util.tree_map(refresh, opt_state, is_leaf=is_node), changed
