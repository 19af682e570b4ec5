"""The one train-state pytree every stage carries through its jitted step.

``TrainState`` holds, per subnetwork name ("iqe", "iqa", "dr", "cenet"), the parameters, the BatchNorm
statistics and the optimizer state, plus the step, the loss-balanced-weighting state (initial task
losses and current weights, paper IV-B) and the RNG key. Everything that changes during training is in
here, so a step is a pure function ``(state, batch) -> (state, metrics)`` and a checkpoint of the state
resumes a run exactly. The optimizer itself (an optax transformation) is not state: it is built from the
config and closed over by the step.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from cleaq_jax import losses

Variables = dict[str, Any]


class TrainState(flax.struct.PyTreeNode):
    """step: int32 scalar; params / batch_stats / opt_state: {subnetwork: pytree};
    lbtw: losses.LBTWState over the stage's tasks; rng: uint32[2] raw key data (orbax-friendly)."""

    step: jax.Array
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: dict[str, Any]
    lbtw: losses.LBTWState
    rng: jax.Array

    def variables(self, name: str) -> Variables:
        """The linen variables of one subnetwork, for ``module.apply``."""
        return {"params": self.params[name], "batch_stats": self.batch_stats[name]}

    def next_key(self) -> tuple[jax.Array, "TrainState"]:
        """A fresh PRNG key for this step and the state carrying the advanced RNG."""
        key, new = jax.random.split(jax.random.wrap_key_data(self.rng))
        return key, self.replace(rng=jax.random.key_data(new))


def create(variables: dict[str, Variables], tx: optax.GradientTransformation, *, num_tasks: int,
           rng: jax.Array) -> TrainState:
    """A fresh state from initialised linen variables per subnetwork ({name: {'params', 'batch_stats'}})."""
    params = {k: v["params"] for k, v in variables.items()}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={k: v.get("batch_stats", {}) for k, v in variables.items()},
        opt_state={k: tx.init(p) for k, p in params.items()},
        lbtw=losses.lbtw_init(num_tasks),
        rng=jax.random.key_data(rng),
    )


def apply_gradients(state: TrainState, grads: dict[str, Any], batch_stats: dict[str, Any],
                    tx: optax.GradientTransformation) -> TrainState:
    """One optimizer update per subnetwork (each has its own optimizer state)."""
    params, opt_state = {}, {}
    for name, p in state.params.items():
        updates, opt_state[name] = tx.update(grads[name], state.opt_state[name], p)
        params[name] = optax.apply_updates(p, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         batch_stats={**state.batch_stats, **batch_stats})
