"""The optimiser of every stage: Adam with the paper's learning-rate schedule (IV-B)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Paper IV-B: lr constant for `constant_epochs`, then times (1 - epoch/num_epochs)^power.

    The base rate is ``optim.learning_rate``; stage 3 uses ``optim.joint_learning_rate`` instead when
    that is above 0 (the paper starts every stage at 1e-3). Returns ``schedule(count)``: the float32
    learning rate at optimiser step ``count`` (int32 scalar).
    """
    o = cfg.optim
    base, constant, total, power = base_learning_rate(cfg), int(o.constant_epochs), int(cfg.num_epochs), float(o.power)

    def schedule(count):
        epoch = (count // steps_per_epoch).astype(jnp.float32)
        decay = jnp.maximum(1.0 - epoch / total, 0.0) ** power
        return base * jnp.where(epoch < constant, 1.0, decay)

    return schedule


def base_learning_rate(cfg: ml_collections.ConfigDict) -> float:
    """The stage's starting learning rate: ``optim.joint_learning_rate`` for stage 3 when set (> 0),
    else ``optim.learning_rate``."""
    joint = float(cfg.optim.get("joint_learning_rate", 0.0))
    return joint if cfg.get("stage") == "stage3" and joint > 0 else float(cfg.optim.learning_rate)


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (config.optim.b1, b2) on `lr_schedule`; one instance serves every subnetwork of a stage."""
    return optax.adam(lr_schedule(cfg, steps_per_epoch), b1=float(cfg.optim.b1), b2=float(cfg.optim.b2))
