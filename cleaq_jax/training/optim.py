"""The optimiser of every stage: Adam with the paper's learning-rate schedule (IV-B)."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections
import optax


# The subnetworks stage 3 trains, each of which may get its own rate (optim.joint_net_learning_rate).
JOINT_NETS = ("iqe", "iqa", "dr")

# One transformation for every subnetwork of a stage, or one per subnetwork name.
Optimizer = optax.GradientTransformation | Mapping[str, optax.GradientTransformation]


def lr_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int, net: str = "") -> optax.Schedule:
    """Paper IV-B: lr constant for `constant_epochs`, then times (1 - epoch/num_epochs)^power.

    The base rate is ``optim.learning_rate``; stage 3 uses ``optim.joint_learning_rate`` instead when
    that is above 0 (the paper starts every stage at 1e-3), and ``optim.joint_net_learning_rate.<net>``
    for subnetwork ``net`` of stage 3 when that is. Returns ``schedule(count)``: the float32 learning rate
    at optimiser step ``count`` (int32 scalar).
    """
    o = cfg.optim
    base = base_learning_rate(cfg, net)
    constant, total, power = int(o.constant_epochs), int(cfg.num_epochs), float(o.power)

    def schedule(count):
        epoch = (count // steps_per_epoch).astype(jnp.float32)
        decay = jnp.maximum(1.0 - epoch / total, 0.0) ** power
        return base * jnp.where(epoch < constant, 1.0, decay)

    return schedule


def base_learning_rate(cfg: ml_collections.ConfigDict, net: str = "") -> float:
    """The starting learning rate of subnetwork ``net`` (any, when "") in the config's stage: for stage 3
    ``optim.joint_net_learning_rate.<net>``, else ``optim.joint_learning_rate``, when set (> 0); else
    ``optim.learning_rate``."""
    if cfg.get("stage") == "stage3":
        for rate in (_net_rates(cfg).get(net, 0.0), float(cfg.optim.get("joint_learning_rate", 0.0))):
            if rate > 0:
                return rate
    return float(cfg.optim.learning_rate)


def _net_rates(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    rates = cfg.optim.get("joint_net_learning_rate", None)
    return {} if rates is None else {k: float(v) for k, v in rates.items()}


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> Optimizer:
    """Adam (config.optim.b1, b2) on `lr_schedule`: one instance for every subnetwork of the stage, or
    {net: Adam} for stage 3's subnetworks when one of them has its own rate."""
    def adam(net: str = "") -> optax.GradientTransformation:
        return optax.adam(lr_schedule(cfg, steps_per_epoch, net), b1=float(cfg.optim.b1), b2=float(cfg.optim.b2))

    if cfg.get("stage") == "stage3" and any(r > 0 for r in _net_rates(cfg).values()):
        return {net: adam(net) for net in JOINT_NETS}
    return adam()


def for_net(tx: Optimizer, net: str) -> optax.GradientTransformation:
    """Subnetwork ``net``'s transformation of a `make_optimizer` result."""
    return tx[net] if isinstance(tx, Mapping) else tx
