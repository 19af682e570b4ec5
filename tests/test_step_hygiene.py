"""The joint train step as the training loop runs it never waits on the host: it compiles once, it
runs with every implicit host-device transfer forbidden, and it donates the state it replaces.

One tiny joint (stage-3) step is built the way programs/train.py builds it (steps.make_train_step jitted by
parallel.jit_train_step over a mesh of all devices) and compiled once for the whole module.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from cleaq_jax.models import factory
from cleaq_jax.runtime import parallel
from cleaq_jax.training import optim, steps
from cleaq_jax.training import state as train_state
from tests import tiny

NUM_STEPS = 4
# jax logs each compilation here (at WARNING once jax_log_compiles is on).
COMPILE_LOGGER = "jax._src.interpreters.pxla"


class _CompileCounter(logging.Handler):
    """Collects the names of the programs jax compiles while attached."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("Compiling") and record.args:
            self.names.append(str(record.args[0]))


@pytest.fixture(scope="module")
def joint():
    """A tiny joint step, its state and mesh, and what compiling and running NUM_STEPS steps
    through the loop's device prefetcher logged."""
    cfg = tiny.tiny_config()
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    models = factory.build_models(cfg)
    stage = tiny.stage(cfg, "stage3", steps_per_epoch=NUM_STEPS)
    tx = optim.make_optimizer(stage.optim, NUM_STEPS)
    init = lambda k: train_state.init_state(stage, models, tx, k)  # noqa: E731
    state, shardings = train_state.sharded_state(init, mesh, jax.random.key(0))
    step = parallel.jit_train_step(steps.make_train_step(stage, models, tx), shardings, mesh)
    size = cfg.data.image_size
    host_batches = [tiny.random_batch(cfg.batch_size, size, seed=i) for i in range(NUM_STEPS)]
    counter, logger = _CompileCounter(), logging.getLogger(COMPILE_LOGGER)
    logger.addHandler(counter)
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        batches = parallel.prefetch_to_device(iter(host_batches), 2, mesh)
        for batch in batches:
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
    finally:
        jax.config.update("jax_log_compiles", previous)
        logger.removeHandler(counter)
    return dict(step=step, state=state, batch=batch, mesh=mesh, host_batch=host_batches[0],
                compiled=[n for n in counter.names if "step" in n])


def test_joint_step_compiles_once_over_several_steps(joint):
    assert len(joint["compiled"]) == 1, f"the step compiled {len(joint['compiled'])} times: {joint['compiled']}"
    assert joint["step"]._cache_size() == 1
    assert int(joint["state"].step) == NUM_STEPS


def test_joint_steps_run_with_implicit_transfers_disallowed(joint):
    step, state, batch = joint["step"], joint["state"], joint["batch"]
    start = int(state.step)
    with jax.transfer_guard("disallow"):
        for _ in range(2):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
    joint["state"] = state
    assert int(state.step) == start + 2
    assert np.isfinite(float(metrics["loss"]))
    assert step._cache_size() == 1


def test_the_guard_refuses_a_host_batch(joint):
    """The guard of the test above has teeth: a batch left in host memory is refused."""
    with pytest.raises(Exception, match="(?i)disallowed"):
        with jax.transfer_guard("disallow"):
            joint["step"](joint["state"], joint["host_batch"])


def test_the_step_donates_the_state_it_replaces(joint):
    step, state = joint["step"], joint["state"]
    new_state, _ = step(state, joint["batch"])
    joint["state"] = new_state
    leaves = jax.tree.leaves(state.params)
    assert leaves and all(leaf.is_deleted() for leaf in leaves)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state.params))
