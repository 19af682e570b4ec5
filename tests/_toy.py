"""A tiny conv + BatchNorm classifier, its train state and step: the stand-in for the CLEAQ model.

The state has the trainer's shape (step, params/batch_stats/opt_state per subnetwork, an RNG key),
so parallelism and checkpointing are tested on the same kind of pytree the trainer uses.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

IMAGE_SIZE = 8
CLASSES = 4
FEATURES = 8  # even, so the fsdp=2 rules have dimensions to split
TX = optax.adam(1e-2)


class ToyNet(nn.Module):
    """Conv 3x3 -> BatchNorm -> ReLU -> global mean -> Dense. x: [B, H, W, 3] float32."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(FEATURES, (3, 3), use_bias=False)(x)  # a bias before BN has no gradient, only noise
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        x = nn.relu(x)
        return nn.Dense(CLASSES)(x.mean(axis=(1, 2)))


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    params: Any  # {"net": ...}: one entry per subnetwork, as in the trainer
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def init_state(key: jax.Array) -> ToyState:
    """A fresh state from a PRNG key (pure: usable under jax.eval_shape and jax.jit)."""
    init_key, rng = jax.random.split(key)
    variables = ToyNet().init(init_key, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False)
    params = {"net": variables["params"]}
    return ToyState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={"net": variables["batch_stats"]},
        opt_state=TX.init(params),
        rng=rng,
    )


def train_step(state: ToyState, batch: dict[str, jax.Array]) -> tuple[ToyState, dict[str, jax.Array]]:
    """One Adam step on cross-entropy; batch: image [B, H, W, 3] float32, label [B] int32."""
    rng, _ = jax.random.split(state.rng)  # the key advances inside the state, as in the trainer

    def loss_fn(params):
        logits, updates = ToyNet().apply(
            {"params": params["net"], "batch_stats": state.batch_stats["net"]},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = TX.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats={"net": batch_stats},
        opt_state=opt_state,
        rng=rng,
    )
    return new_state, {"loss": loss}


def make_batch(size: int, step: int) -> dict[str, np.ndarray]:
    """A deterministic global batch for a step; example i is shifted by i so per-device
    statistics differ from the global ones (only sync BatchNorm reproduces one device)."""
    rs = np.random.RandomState(1000 + step)
    image = rs.normal(size=(size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    image += np.arange(size, dtype=np.float32)[:, None, None, None]
    label = (np.arange(size) % CLASSES).astype(np.int32)
    return {"image": image, "label": label}


def to_numpy(tree: Any) -> list[np.ndarray]:
    """Host copies of a pytree's array leaves, in tree order (PRNG keys as their key data)."""
    def host(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return [host(x) for x in jax.tree.leaves(tree)]
