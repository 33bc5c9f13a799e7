"""The state of a job that trains one model: a typed pytree, donated to the compiled step."""
from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: the trained params (float32); opt_state: their optax state; rng: the base PRNG
    key (per-step keys are folded from it and ``step``); ema_params: an exponential moving average of ``params``
    (None when the job keeps none)."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Optional[Any] = None

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, seed: int, ema: bool = False) -> "TrainState":
        """Step 0 of ``params`` under ``tx``; with ``ema`` the average starts as its own copy of ``params``."""
        params = jax.tree_util.tree_map(jnp.asarray, params)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jax.random.PRNGKey(seed),
                   ema_params=jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params) if ema else None)

    def apply_gradients(self, tx: optax.GradientTransformation, grads) -> "TrainState":
        """One optimizer step: params and opt_state updated, step + 1 (the EMA is the caller's)."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)
