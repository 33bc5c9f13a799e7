"""The distillation state pytree (student, EMA target, optimizer, optional online LRM) and its step 0."""
from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class DistillState:
    """Everything that changes during training (donated to the compiled step).

    params / target_params: student and EMA-target UNet params (float32 masters); opt_state: optax state
    of the student; rng: the run's base PRNG key (per-step keys are folded from it and ``step``);
    lrm_params / lrm_opt_state: the latent proxy reward model and its optimizer (None without an LRM).
    """
    step: jax.Array
    params: Any
    target_params: Any
    opt_state: Any
    rng: jax.Array
    lrm_params: Optional[Any] = None
    lrm_opt_state: Optional[Any] = None


def create_state(student_params, tx: optax.GradientTransformation, seed: int, lrm_params=None,
                 lrm_tx: Optional[optax.GradientTransformation] = None) -> DistillState:
    """Step 0: the EMA target starts equal to the student (float32 copies); the LRM (if any) in float32."""
    f32 = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
    params = f32(student_params)
    lrm = f32(lrm_params) if lrm_params is not None else None
    return DistillState(step=jnp.zeros((), jnp.int32), params=params,
                      target_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed), lrm_params=lrm,
                      lrm_opt_state=lrm_tx.init(lrm) if lrm_tx is not None else None)
