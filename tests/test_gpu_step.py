"""bench/gpu_step.py (the GPU check's config-free joint step) computes what the training step computes."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import tiny
from tiny import REPO, random_batch, run_python

from cleaq_jax.models import factory, layers
from cleaq_jax.training import optim, steps
from cleaq_jax.training import state as train_state
from cleaq_jax.configs import default

SIZE, WIDTH = 32, 1 / 16


def _gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", os.path.join(REPO, "bench", "gpu_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config():
    """configs/default.py (the paper's loss settings) at a tiny size."""
    cfg = default.get_config()
    cfg.data.image_size, cfg.model.width, cfg.batch_size = SIZE, WIDTH, 6
    cfg.model.encoder_stages = cfg.model.classifier_stages = (1, 1, 1, 1)
    return cfg


def test_gpu_step_models_have_the_training_models_parameter_trees():
    g, cfg = _gpu_step(), _config()
    ours = g.build_models(WIDTH, 1, jnp.float32, False, layers.LayerForms())
    theirs = factory.build_models(cfg)
    x = jnp.zeros((1, SIZE, SIZE, 3))
    for name in ("iqe", "iqa", "dr"):
        shapes = lambda m: jax.tree.map(lambda a: a.shape, jax.eval_shape(lambda: m.init(jax.random.key(0), x)))
        assert shapes(ours[name]) == shapes(theirs[name])


def test_gpu_step_imports_nothing_the_gpu_machine_lacks():
    # A module set to None in sys.modules fails to import, as it would on a machine without it.
    absent = ("ml_collections", "grain", "array_record", "clu", "tensorflow", "tensorflow_datasets")
    path = os.path.join(REPO, "bench", "gpu_step.py")
    run_python("import runpy, sys\n"
               f"for name in {absent!r}:\n    sys.modules[name] = None\n"
               f"assert 'joint_loss' in runpy.run_path({path!r})\n")


def test_gpu_step_state_has_the_training_state_s_leaves():
    g, cfg = _gpu_step(), _config()
    models = factory.build_models(cfg)
    joint = tiny.stage(cfg, "stage3", steps_per_epoch=10)
    tx = optim.make_optimizer(joint.optim, 10)
    # gpu_step initialises every configuration at INIT_SIZE: no parameter depends on the image size.
    ours = jax.eval_shape(lambda k: g.init_state(models, tx, g.INIT_SIZE, k), jax.random.key(0))
    theirs = jax.eval_shape(lambda k: train_state.init_state(joint, models, tx, k), jax.random.key(0))
    for field in ("step", "params", "batch_stats", "opt_state", "lbtw", "rng"):
        shapes = lambda t: [(a.shape, a.dtype) for a in jax.tree.leaves(t)]  # noqa: E731
        assert shapes(ours[field]) == shapes(getattr(theirs, field)), field


def test_gpu_step_joint_loss_and_gradients_equal_the_training_step_s():
    g, cfg = _gpu_step(), _config()
    models = factory.build_models(cfg)
    joint = tiny.stage(cfg, "stage3", steps_per_epoch=10)
    tx = optim.make_optimizer(joint.optim, 10)
    state = jax.jit(lambda k: train_state.init_state(joint, models, tx, k))(jax.random.key(0))
    batch = jax.device_put(random_batch(6, SIZE))
    key = jax.random.key(1)
    qt = joint.qt
    theirs_fn = steps.stage_loss(joint, models)
    ours_fn = lambda p: g.joint_loss(models, qt, p, state.batch_stats, state.step, state.lbtw, batch, key, 10)  # noqa: E731
    (l_theirs, (_, bs_theirs, lbtw_theirs)), g_theirs = jax.jit(jax.value_and_grad(
        lambda p: theirs_fn(p, state, batch, key), has_aux=True))(state.params)
    (l_ours, (_, bs_ours, lbtw_ours)), g_ours = jax.jit(jax.value_and_grad(ours_fn, has_aux=True))(state.params)
    # The same float32 operations in the same order; 1e-5 leaves room for XLA fusing them otherwise.
    np.testing.assert_allclose(float(l_ours), float(l_theirs), rtol=1e-5)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    jax.tree.map(close, g_ours, g_theirs)
    jax.tree.map(close, bs_ours, bs_theirs)
    jax.tree.map(close, lbtw_ours, lbtw_theirs)
    assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g_ours["iqe"]))  # not vacuous
