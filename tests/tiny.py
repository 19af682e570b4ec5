"""Tiny configurations and data for tests: the real code paths at sizes two CPU cores afford."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """configs/demo.py shrunk: 32 px, width 1/16, one block per ResNet stage, 1 epoch."""
    from cleaq_jax.configs import demo

    c = demo.get_config()
    c.data.image_size = 32
    c.data.synthetic.num = 40
    c.data.synthetic.splits.update(train=0.7, val=0.1, test=0.2)
    c.model.width = 1 / 16
    c.model.encoder_stages = (1, 1, 1, 1)
    c.model.classifier_stages = (1, 1, 1, 1)
    # The paper's forms (the demo turns on switches meant for its short runs).
    c.model.uiqe_residual = False
    c.loss.usable_self_reference = False
    c.loss.grl_scale = 1.0
    c.loss.iqe_guidance = "reverse"
    c.loss.qt_good_fraction = 1.0
    c.optim.joint_learning_rate = 0.0
    c.optim.joint_net_learning_rate.dr = 0.0
    c.loss.weighting = "lbtw"
    c.loss.fixed.iqe = 1.0
    c.loss.guidance_weight = 0.01
    c.data.synthetic.lesion_scale = 1.0
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_epochs = 1
    c.eval.vessel_max_images = 0  # evaluation's pictures cost a compilation each; tests/test_pictures.py runs them
    c.log_every_steps = 2
    c.eval_every_epochs = 1
    c.image_every_steps = 2
    c.checkpoint_every_steps = 2
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def main_command(workdir: str, *overrides: str) -> list[str]:
    """`python -m cleaq_jax.main` on the tiny config (3 epochs of 40 images, 14 of them training ones)
    in ``workdir``; ``overrides``: more ``KEY=VALUE`` config settings, which win."""
    cfg = tiny_config()
    args = [sys.executable, "-m", "cleaq_jax.main", "--config=configs/demo.py", f"--workdir={workdir}"]
    for key in ("data.image_size", "data.synthetic.num", "data.synthetic.lesion_scale", "model.width",
                "model.uiqe_residual", "loss.usable_self_reference", "loss.grl_scale", "loss.iqe_guidance",
                "loss.qt_good_fraction", "optim.joint_learning_rate", "optim.joint_net_learning_rate.dr",
                "loss.weighting", "loss.fixed.iqe", "loss.guidance_weight", "batch_size",
                "eval_batch_size", "log_every_steps", "eval_every_epochs", "image_every_steps", "checkpoint_every_steps"):
        node = cfg
        for p in key.split("."):
            node = node[p]
        args.append(f"--config.{key}={node}")
    args += ["--config.model.encoder_stages=(1,1,1,1)", "--config.model.classifier_stages=(1,1,1,1)",
             "--config.num_epochs=3", "--config.optim.constant_epochs=2",
             # 14 training, 2 validation and 24 test images of the 40, whatever split the demo uses.
             "--config.data.synthetic.splits.train=0.35", "--config.data.synthetic.splits.val=0.05",
             "--config.data.synthetic.splits.test=0.6"]
    return args + [f"--config.{o}" for o in overrides]


def stage(cfg, name: str = "stage3", steps_per_epoch: int = 1):
    """The `stages.Stage` of a tiny config without data on disk: its networks, losses, optimiser and step."""
    from cleaq_jax.training import stages

    return stages.Stage.from_config(cfg, name, steps_per_epoch=steps_per_epoch)


def joint_setup(batch_size: int = 4, **overrides):
    """(cfg, models, stage-3 state, random batch on device) of a tiny joint stage, fixed task weights
    unless overridden: the starting point of the stage-3 step tests."""
    import jax
    import jax.numpy as jnp

    from cleaq_jax.models import factory
    from cleaq_jax.training import optim
    from cleaq_jax.training import state as train_state

    cfg = tiny_config(**{"loss.weighting": "fixed", **overrides})
    models = factory.build_models(cfg)
    joint = stage(cfg)
    tx = optim.make_optimizer(joint.optim, 1)
    state = jax.jit(lambda k: train_state.init_state(joint, models, tx, k))(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, random_batch(batch_size, cfg.data.image_size))
    return cfg, models, state, batch


def random_batch(n: int, size: int, seed: int = 0, num_grades: int = 5) -> dict[str, np.ndarray]:
    """A loader-shaped batch of random images inside a disc mask, every quality level present."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2) < (0.48 * size) ** 2).astype(np.uint8)
    vessel = (rng.random((n, size, size)) < 0.1).astype(np.uint8) * disc
    return {
        "image": (rng.integers(0, 256, (n, size, size, 3)) * disc[..., None]).astype(np.uint8),
        "mask": np.broadcast_to(disc, (n, size, size)).copy(),
        "vessel": vessel,
        "has_vessel": np.ones(n, bool),
        "dr_grade": (np.arange(n) % num_grades).astype(np.int32),
        "quality": (np.arange(n) % 3).astype(np.int32),
        "id_hash": np.arange(n, dtype=np.int32),
        "valid": np.ones(n, bool),
    }


# How far one train step may differ between two layouts of the same computation (1 device vs 8, one
# process vs two), as ||a - b|| / ||b|| over a loss, a whole gradient or a set of BatchNorm statistics.
# Only the order of float32 sums differs (u = 2**-24 = 6e-8 per operation): a sum of n terms reordered
# moves by about sqrt(n) u of its terms' magnitude, 5e-6 for the largest reductions here (BatchNorm over
# 8 x 32 x 32 values, weight gradients over as many products); BatchNorm's division by a batch standard
# deviation and the ~40 such layers forward and backward compound that by a factor of ten or so, to
# about 1e-4. Measured on a 2-core x86-64 CPU: gradients 4e-5 (joint step) and 4e-6 (DR, two processes),
# losses 1e-5, statistics 6e-7. The errors these comparisons exist to catch change the step itself:
# per-device BatchNorm statistics (emulated) moved the gradients by 1.0, the losses by 5%, the statistics
# by 3%; one process feeding the other's slice of the batch moved the gradient by 4, the statistics by 3%.
# The joint step's gradients are the exception: a flipped ReLU or max-pool decision moves them by more
# than any such bound (1.6e-3 on another x86-64 CPU), so tests/test_train.py holds them to a nudge instead.
LAYOUT_RTOL = 1e-3


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (Euclidean norms of the flattened arrays); NaN when b is all zeros."""
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float("nan")


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """Environment for a child Python: CPU, `devices` fake devices, the run's compilation cache (conftest)."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def run_python(code: str, devices: int = 1, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter; raises with its output on failure."""
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(devices, **env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def saved_metrics(directory) -> dict[int, dict | None]:
    """{step: the metrics saved with it} of every checkpoint in a checkpoints/ folder, read with orbax itself."""
    import orbax.checkpoint as ocp
    from etils import epath

    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(epath.Path(directory).absolute(), options=options) as manager:
        return {step: manager.metrics(step) for step in sorted(manager.all_steps())}
