"""Stage 3's IQA guidance of IQE (config.loss.iqe_guidance), the reversal-scale schedule, eq. (11)'s
task weights, L_QE against stored references, and per-stage seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleaq_jax import config_checks
from cleaq_jax.evaluation import inference
from cleaq_jax.models import factory
from cleaq_jax.training import optim, stages, steps
from cleaq_jax.training import state as train_state
from tests import tiny


def _setup(**overrides):
    return tiny.joint_setup(6, **{"tasks.dr": False, **overrides})


def _grads(stage="stage3", **overrides):
    cfg, models, state, batch = _setup(**overrides)
    loss_fn = steps.stage_loss(tiny.stage(cfg, stage), models)
    fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, state, batch, jax.random.key(1)), has_aux=True))
    (_, (metrics, _, _)), g = fn(state.params)
    return jax.tree.map(np.asarray, g), jax.tree.map(np.asarray, metrics)


def _flat(tree):
    return np.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def test_to_good_guidance_reaches_iqe_and_never_iqa():
    """The guidance term changes IQE's gradient and leaves IQA's exactly as it was: IQA's parameters are
    held fixed for that term."""
    off, _ = _grads(**{"loss.iqe_guidance": "to_good", "loss.guidance_weight": 0.0})
    on, metrics = _grads(**{"loss.iqe_guidance": "to_good", "loss.guidance_weight": 1.0})
    assert metrics["loss_guidance"] > 0
    assert np.linalg.norm(_flat(on["iqe"]) - _flat(off["iqe"])) > 1e-6 * np.linalg.norm(_flat(off["iqe"]))
    # The term's IQA gradient is stop_gradient's exact zero, added to the same float32 sums.
    np.testing.assert_array_equal(_flat(on["iqa"]), _flat(off["iqa"]))


def test_to_good_iqa_learns_from_the_detached_enhancement_only():
    """Under to_good, L_IQA never reaches IQE: IQE's gradient does not depend on IQA's task weight."""
    kw = {"loss.iqe_guidance": "to_good", "loss.guidance_weight": 0.0}
    low, _ = _grads(**kw, **{"loss.fixed.iqa": 1.0})
    high, _ = _grads(**kw, **{"loss.fixed.iqa": 5.0})
    np.testing.assert_array_equal(_flat(low["iqe"]), _flat(high["iqe"]))
    assert np.linalg.norm(_flat(high["iqa"]) - 5.0 * _flat(low["iqa"])) <= 1e-5 * np.linalg.norm(_flat(high["iqa"]))
    # Under the paper's reversal the same change of weight does reach IQE.
    low, _ = _grads(**{"loss.fixed.iqa": 1.0})
    high, _ = _grads(**{"loss.fixed.iqa": 5.0})
    assert np.linalg.norm(_flat(low["iqe"]) - _flat(high["iqe"])) > 1e-6


def test_grl_schedule_values():
    cfg = tiny.tiny_config(**{"loss.grl_scale": 0.5, "loss.grl_schedule": "ganin"})
    s = tiny.stage(cfg).loss
    for p in (0.0, 0.1, 0.5, 1.0):
        expected = 0.5 * (2.0 / (1.0 + np.exp(-10.0 * p)) - 1.0)
        assert float(steps.grl_scale_at(s, jnp.float32(p))) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert float(steps.grl_scale_at(s, jnp.float32(0.0))) == 0.0
    constant = tiny.stage(tiny.tiny_config(**{"loss.grl_scale": 0.5})).loss
    assert float(steps.grl_scale_at(constant, jnp.float32(0.0))) == 0.5


def test_eq11_weights_leave_dr_at_one_and_balance_the_others():
    cfg, models, state, batch = _setup(**{"loss.weighting": "lbtw", "tasks.dr": True})
    joint = tiny.stage(cfg, "stage3", steps_per_epoch=2)
    step = jax.jit(steps.make_train_step(joint, models, optim.make_optimizer(joint.optim, 2)))
    for _ in range(2):
        state, metrics = step(state, batch)
    assert float(metrics["weight_dr"]) == 1.0
    assert float(metrics["weight_iqe"]) + float(metrics["weight_iqa"]) == pytest.approx(2.0, rel=1e-6)
    assert float(metrics["weight_iqe"]) != pytest.approx(1.0, abs=1e-6)


def test_l_qe_uses_stored_references_for_every_quality_level_with_all_targets():
    """Reject images have no QT pair; with qe_targets "all" a stored clean reference still counts in L_QE."""
    cfg = tiny.tiny_config(**{"loss.qe_targets": "all"})
    models = factory.build_models(cfg)
    stage1 = tiny.stage(cfg, "stage1")
    state = jax.jit(lambda k: train_state.init_state(stage1, models, optim.make_optimizer(stage1.optim, 1), k))(
        jax.random.key(0))
    batch = tiny.random_batch(4, cfg.data.image_size)
    batch["quality"] = np.full(4, 2, np.int32)  # all reject
    loss_fn = jax.jit(lambda b: steps.stage_loss(stage1, models)(state.params, state, b, jax.random.key(1))[1][0])
    assert float(loss_fn(jax.tree.map(jnp.asarray, batch))["loss_qe"]) == 0.0
    batch["reference"] = np.flip(batch["image"], axis=1).copy()
    batch["has_reference"] = np.ones(4, bool)
    with_ref = loss_fn(jax.tree.map(jnp.asarray, batch))
    assert float(with_ref["loss_qe"]) > 0 and float(with_ref["loss_seg"]) > 0


def test_stages_draw_their_own_seeds():
    cfg = tiny.tiny_config()
    seeds = {stage: stages.stage_seed(cfg, stage) for stage in config_checks.TRAINING_STAGES}
    assert len(set(seeds.values())) == len(seeds)
    assert stages.stage_seed(cfg, "stage1") == stages.stage_seed(tiny.tiny_config(), "stage1")
    assert all(0 <= s < 2 ** 31 for s in seeds.values())


def test_two_stages_with_the_same_seed_draw_different_first_batches(tmp_path):
    from cleaq_jax.data import location, pipeline

    data = str(tmp_path / "data")
    location.build_synthetic(data, 16, size=32, splits={"train": 1.0}, workers=1)
    cfg = tiny.tiny_config()

    def first_ids(stage):
        loader = pipeline.train_loader(
            data, "train", global_batch_size=8,
            sampling=pipeline.EpochSampling(seed=stages.stage_seed(cfg, stage), class_balance=0.0, augment=False),
            reading=pipeline.RecordReading(image_size=32, worker_count=0))
        return next(iter(loader))["id_hash"].tolist()

    assert first_ids("stage1") == first_ids("stage1")
    assert first_ids("stage1") != first_ids("stage3")


def _stage3_inputs(fraction, n=64, targets="all"):
    """Stage 3's X~ for a batch of n images cycling good / usable / reject, half of them with a stored
    clean reference, and the batch's float images."""
    cfg = tiny.tiny_config(**{"loss.qt_good_fraction": fraction, "loss.qe_targets": targets})
    rng = np.random.default_rng(0)
    size = 16
    batch = {"image": jnp.asarray(rng.integers(50, 200, (n, size, size, 3)), jnp.uint8),
             "mask": jnp.ones((n, size, size), jnp.uint8),
             "quality": jnp.arange(n) % 3, "has_reference": jnp.arange(n) % 2 == 0}
    x, _ = inference.inputs(batch)
    out = steps._stage3_input(tiny.stage(cfg), batch, jax.random.key(3))
    changed = np.asarray(jnp.any(jnp.abs(out - x) > 1e-6, axis=(1, 2, 3)))
    return changed, np.asarray(batch["quality"]), np.asarray(batch["has_reference"])


def test_stage3_input_degrades_good_images_by_qt_good_fraction():
    """Eq. (3)'s literal form (fraction 1) degrades every good image; fraction 0 none; 0.5 some of each.
    Reject images and usable records with a clean reference (already degraded) enter as they are; usable
    records without one go through op1."""
    for fraction in (1.0, 0.5, 0.0):
        changed, quality, has_ref = _stage3_inputs(fraction)
        assert not changed[quality == 2].any()
        assert not changed[(quality == 1) & has_ref].any()
        assert changed[(quality == 1) & ~has_ref].any()  # op1 draws its operations: some may leave an image as is
        good = changed[quality == 0]
        if fraction == 1.0:
            assert good.all()
        elif fraction == 0.0:
            assert not good.any()
        else:  # 22 good images: all on one side has probability 2 * 0.5 ** 22
            assert good.any() and not good.all()


def test_paper_targets_send_every_usable_image_through_op1():
    """With qe_targets "paper" the stored references are not looked at: QT is eq. (4)'s, op1 on usable images
    whether or not their record stores a clean one."""
    changed, quality, has_ref = _stage3_inputs(1.0, targets="paper")
    assert changed[(quality == 1) & has_ref].any() and changed[(quality == 1) & ~has_ref].any()
    assert changed[quality == 0].all() and not changed[quality == 2].any()
