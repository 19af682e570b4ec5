"""What the fair test of the claim rests on: L_QE only where the paper has a target (config.loss.qe_targets),
the gradient shares of stage 3's terms on IQE, the two attribution controls (config.tasks.joint_iqe) and the
paper's class balance in the stage configs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cleaq_jax import config_checks
from cleaq_jax.models import factory
from cleaq_jax.training import optim, stages, steps
from cleaq_jax.training import state as train_state
from tests import tiny


def _state(cfg, name):
    models = factory.build_models(cfg)
    stage = tiny.stage(cfg, name)
    tx = optim.make_optimizer(stage.optim, 1)
    state = jax.jit(lambda k: train_state.init_state(stage, models, tx, k))(jax.random.key(0))
    return stage, models, tx, state


def _batch_of(quality: int, n: int = 4, size: int = 32) -> dict:
    """Records of one quality level, each storing a clean reference unlike its image (as synthetic and
    Messidor records do)."""
    batch = tiny.random_batch(n, size)
    batch["quality"] = np.full(n, quality, np.int32)
    batch["reference"] = np.flip(batch["image"], axis=1).copy()
    batch["has_reference"] = np.ones(n, bool)
    return jax.tree.map(jnp.asarray, batch)


def _l_qe_gradient_norm(targets: str, name: str, quality: int) -> float:
    """||d L_QE / d IQE's parameters|| for a batch of one quality level, in stage ``name``."""
    cfg = tiny.tiny_config(**{"loss.qe_targets": targets, "loss.weighting": "fixed"})
    stage, models, _, state = _state(cfg, name)
    loss_fn = steps.stage_loss(stage, models)

    def l_qe(iqe):
        return loss_fn({**state.params, "iqe": iqe}, state, _batch_of(quality), jax.random.key(1))[1][0]["loss_qe"]

    return float(optax.tree.norm(jax.jit(jax.grad(l_qe))(state.params["iqe"])))


@pytest.mark.parametrize("name", ["stage1", "stage3"])
def test_paper_targets_train_l_qe_on_qt_degraded_good_images_only(name):
    """With "paper" targets usable and reject records give L_QE no gradient although they store a clean
    reference; QT-degraded good images do. With "all" the references of usable and reject records train it."""
    assert _l_qe_gradient_norm("paper", name, 0) > 0
    assert _l_qe_gradient_norm("paper", name, 1) == 0.0
    assert _l_qe_gradient_norm("paper", name, 2) == 0.0
    assert _l_qe_gradient_norm("all", name, 1) > 0
    assert _l_qe_gradient_norm("all", name, 2) > 0


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("guidance", ["reverse", "to_good"])
def test_gradient_shares_sum_to_one_and_match_each_terms_own_gradient(guidance):
    """Each share is its term's gradient norm on IQE over their sum; each norm equals that of the gradient
    of the term alone, and the terms' gradients add up to the whole loss's gradient on IQE."""
    cfg, models, state, batch = tiny.joint_setup(
        6, **{"loss.iqe_guidance": guidance, "loss.guidance_weight": 1.0, "loss.fixed.iqa": 0.5})
    stage = tiny.stage(cfg)
    shares = jax.device_get(jax.jit(steps.gradient_shares(stage, models))(state, batch))
    assert set(shares) == {f"grad_{k}_{t}" for k in ("norm", "share") for t in steps.SHARE_TERMS}
    assert sum(float(shares[f"grad_share_{t}"]) for t in steps.SHARE_TERMS) == pytest.approx(1.0, rel=1e-6)

    key, _ = state.next_key()  # the key the step, and the shares, draw QT with
    bound = steps._Bound(models, stage)

    def term(name):
        return lambda iqe: steps._stage3_terms(bound, {**state.params, "iqe": iqe}, state, batch, key)[1][name]

    grads = {t: _flat(jax.jit(jax.grad(term(t)))(state.params["iqe"])) for t in steps.SHARE_TERMS}
    for t, g in grads.items():
        # One backward pass alone against the same pass batched by jacrev: float32 sums in another order
        # (tests/tiny.py, LAYOUT_RTOL, says how far that moves a gradient).
        assert float(shares[f"grad_norm_{t}"]) == pytest.approx(np.linalg.norm(g), rel=tiny.LAYOUT_RTOL)
        assert np.linalg.norm(g) > 0
    whole = _flat(jax.jit(jax.grad(lambda iqe: steps.stage_loss(stage, models)(
        {**state.params, "iqe": iqe}, state, batch, key)[0]))(state.params["iqe"]))
    assert tiny.relative_difference(sum(grads.values()), whole) < tiny.LAYOUT_RTOL


def test_frozen_iqe_control_trains_dr_on_a_fixed_enhancer():
    """joint_iqe="frozen": a step leaves IQE's parameters and BatchNorm statistics exactly as they were and
    trains DR."""
    cfg = tiny.tiny_config(**{"tasks.iqa": False, "tasks.joint_iqe": "frozen", "loss.weighting": "fixed"})
    assert config_checks.check(cfg) == []
    stage, models, tx, state = _state(cfg, "stage3")
    assert stage.nets == ("iqe", "dr") and stage.frozen == ("iqe",)
    before = jax.device_get((state.params, state.batch_stats))
    new, metrics = jax.jit(steps.make_train_step(stage, models, tx))(state, _batch_of(0, n=6))
    after = jax.device_get((new.params, new.batch_stats))
    np.testing.assert_array_equal(_flat(after[0]["iqe"]), _flat(before[0]["iqe"]))
    np.testing.assert_array_equal(_flat(after[1]["iqe"]), _flat(before[1]["iqe"]))
    assert np.linalg.norm(_flat(after[0]["dr"]) - _flat(before[0]["dr"])) > 0
    assert np.isfinite(float(metrics["loss_dr"]))


def test_dr_alone_control_trains_stage3_without_iqe():
    """joint_iqe="off": stage 3 trains DR alone (on QT(X), at stage 3's rates), from stage 1's DR; a control
    with IQA's guidance on is refused in one line naming the key."""
    cfg = tiny.tiny_config(**{"tasks.iqa": False, "tasks.joint_iqe": "off", "optim.joint_net_learning_rate.dr": 1e-3,
                              "optim.joint_learning_rate": 1e-4})
    assert config_checks.check(cfg) == []
    stage, models, tx, state = _state(cfg, "stage3")
    assert stage.nets == ("dr",) and set(state.params) == {"dr"}
    assert stage.optim.rate("dr") == 1e-3
    assert stages.pipeline_stages(cfg) == ("stage1", "stage3")
    _, metrics = jax.jit(steps.make_train_step(stage, models, tx))(state, _batch_of(1, n=6))
    assert np.isfinite(float(metrics["loss_dr"])) and "loss_qe" not in metrics
    problems = config_checks.check(tiny.tiny_config(**{"tasks.joint_iqe": "off"}))
    assert len(problems) == 1 and problems[0].startswith("config.tasks.joint_iqe='off'")


@pytest.mark.parametrize("name", ["default", "stage1", "stage2", "stage3"])
def test_the_paper_stage_configs_balance_classes_as_iv_b(name):
    """Paper IV-B balances the classes by augmentation: every class as many times per epoch as the largest."""
    import importlib

    cfg = importlib.import_module(f"cleaq_jax.configs.{name}").get_config()
    assert cfg.data.class_balance == 1.0
