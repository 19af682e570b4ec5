"""The optimiser of every stage: Adam with the paper's learning-rate schedule (IV-B)."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import optax

from cleaq_jax.training.stages import OptimSettings

# One transformation for every subnetwork of a stage, or one per subnetwork name.
Optimizer = optax.GradientTransformation | Mapping[str, optax.GradientTransformation]


def lr_schedule(settings: OptimSettings, steps_per_epoch: int, net: str) -> optax.Schedule:
    """Paper IV-B: subnetwork ``net``'s starting rate, constant for ``constant_epochs``, then times
    (1 - epoch/num_epochs)^power. Returns ``schedule(count)``: the float32 learning rate at optimiser
    step ``count`` (int32 scalar)."""
    base, constant = settings.rate(net), settings.constant_epochs

    def schedule(count):
        epoch = (count // steps_per_epoch).astype(jnp.float32)
        decay = jnp.maximum(1.0 - epoch / settings.num_epochs, 0.0) ** settings.power
        return base * jnp.where(epoch < constant, 1.0, decay)

    return schedule


def make_optimizer(settings: OptimSettings, steps_per_epoch: int) -> Optimizer:
    """Adam (b1, b2) on `lr_schedule`: one instance for every subnetwork of the stage, or {net: Adam}
    when stage 3 gives one of them a rate of its own."""
    def adam(net: str) -> optax.GradientTransformation:
        return optax.adam(lr_schedule(settings, steps_per_epoch, net), b1=settings.b1, b2=settings.b2)

    if settings.per_net:
        return {net: adam(net) for net, _ in settings.rates}
    return adam(settings.rates[0][0])


def for_net(tx: Optimizer, net: str) -> optax.GradientTransformation:
    """Subnetwork ``net``'s transformation of a `make_optimizer` result."""
    return tx[net] if isinstance(tx, Mapping) else tx
