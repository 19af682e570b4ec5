"""The one train-state pytree every stage carries through its jitted step.

``TrainState`` holds, per subnetwork name ("iqe", "iqa", "dr", "cenet"), the parameters, the BatchNorm
statistics and the optimizer state, plus the step, the loss-balanced-weighting state (initial task
losses and current weights, paper IV-B) and the RNG key. Everything that changes during training is in
here, so a step is a pure function ``(state, batch) -> (state, metrics)`` and a checkpoint of the state
resumes a run exactly. The optimizer itself (an optax transformation) is not state: it is built from the
config and closed over by the step.

This module is also the one builder of states and their layouts: `init_state` (a stage's fresh state),
`abstract_state` (shapes, dtypes and shardings without computing anything: restore targets and jit
layouts) and `sharded_state` (a state materialised directly in its sharded layout). The inference part
of a state and its restore target are `models.factory.InferenceState` / `abstract_variables`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from cleaq_jax.runtime import parallel
from cleaq_jax.training import losses, optim, stages

Variables = dict[str, Any]
PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """step: int32 scalar; params / batch_stats / opt_state: {subnetwork: pytree};
    lbtw: losses.LBTWState over the stage's tasks; rng: uint32[2] raw key data (orbax-friendly)."""

    step: jax.Array
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: dict[str, Any]
    lbtw: losses.LBTWState
    rng: jax.Array

    def next_key(self) -> tuple[jax.Array, "TrainState"]:
        """A fresh PRNG key for this step and the state carrying the advanced RNG."""
        key, new = jax.random.split(jax.random.wrap_key_data(self.rng))
        return key, self.replace(rng=jax.random.key_data(new))


def create(variables: dict[str, Variables], tx: optim.Optimizer, *, num_tasks: int,
           rng: jax.Array) -> TrainState:
    """A fresh state from initialised linen variables per subnetwork ({name: {'params', 'batch_stats'}});
    tx: one transformation for every subnetwork or one per name (`optim.make_optimizer`)."""
    params = {k: v["params"] for k, v in variables.items()}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={k: v.get("batch_stats", {}) for k, v in variables.items()},
        opt_state={k: optim.for_net(tx, k).init(p) for k, p in params.items()},
        lbtw=losses.lbtw_init(num_tasks),
        rng=jax.random.key_data(rng),
    )


def apply_gradients(state: TrainState, grads: dict[str, Any], batch_stats: dict[str, Any],
                    tx: optim.Optimizer) -> TrainState:
    """One optimizer update per subnetwork (each has its own optimizer state, and may have its own
    transformation)."""
    params, opt_state = {}, {}
    for name, p in state.params.items():
        updates, opt_state[name] = optim.for_net(tx, name).update(grads[name], state.opt_state[name], p)
        params[name] = optax.apply_updates(p, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         batch_stats={**state.batch_stats, **batch_stats})


# --------------------------------------------------------------------------- the builder
def init_state(stage: stages.Stage, models: dict[str, nn.Module], tx: optim.Optimizer, key: jax.Array,
               given: dict[str, Variables] | None = None) -> TrainState:
    """A fresh state of ``stage.nets`` at ``stage.image_size`` (use under jax.eval_shape / jit).

    models: `factory.build_models` output; key: a PRNG key (split into the parameters' and the state's
    RNG); given: variables of subnetworks that come from elsewhere (an earlier stage's checkpoint): taken
    as they are, not initialised, so a stage that starts from trained networks compiles no initialiser
    for them. The others get the same values with or without ``given``.
    """
    x = jnp.zeros((1, stage.image_size, stage.image_size, 3), jnp.float32)
    init_key, state_key = jax.random.split(key)
    given = given or {}
    variables = {}
    for i, name in enumerate(stage.nets):
        v = given[name] if name in given else models[name].init(jax.random.fold_in(init_key, i), x, train=False)
        variables[name] = {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
    # Single-loss stages (the vessel teacher) keep a one-task weighting state so every state has one shape.
    return create(variables, tx, num_tasks=max(1, len(stage.tasks)), rng=state_key)


def abstract_state(init: Callable[..., PyTree], mesh: jax.sharding.Mesh, *args: Any,
                   fsdp_min_size: int = 2**18) -> tuple[PyTree, PyTree]:
    """The layout of ``init(*args)`` on ``mesh`` without computing it.

    init: pure function returning a state pytree (e.g. ``lambda k: init_state(stage, models, tx, k)``).
    Returns (target, shardings): ShapeDtypeStructs carrying their shardings (a restore target for
    `checkpoint`) and the pytree of `parallel.state_shardings` (for `parallel.jit_train_step`).
    """
    abstract = jax.eval_shape(init, *args)
    shardings = parallel.state_shardings(abstract, mesh, fsdp_min_size=fsdp_min_size)
    return parallel.abstract_with_shardings(abstract, shardings), shardings


def sharded_state(init: Callable[..., PyTree], mesh: jax.sharding.Mesh, *args: Any,
                  fsdp_min_size: int = 2**18) -> tuple[PyTree, PyTree]:
    """Materialise ``init(*args)`` directly in its sharded layout (no full copy on one device first).

    Returns (state, shardings), shardings as in `abstract_state`.
    """
    _, shardings = abstract_state(init, mesh, *args, fsdp_min_size=fsdp_min_size)
    return parallel.run_once(init, *args, out_shardings=shardings), shardings
