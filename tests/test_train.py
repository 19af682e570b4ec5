"""The training engine: stage steps, the joint step's gradient reversal, device-count invariance,
resume after SIGKILL, guardrails, and what a finished run leaves on disk."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleaq_jax.models import factory
from cleaq_jax.programs import pipeline, train
from cleaq_jax.runtime import checkpoint, parallel
from cleaq_jax.training import optim, stages, steps
from cleaq_jax.training import start as stage_init
from cleaq_jax.training import state as train_state
from tests import tiny


# --------------------------------------------------------------------------- pure pieces
def test_lr_schedule_is_constant_then_polynomial_in_the_epoch():
    cfg = tiny.tiny_config(**{"optim.learning_rate": 1e-3, "optim.constant_epochs": 60, "num_epochs": 150})
    sched = optim.lr_schedule(tiny.stage(cfg, "stage1").optim, 10, "dr")
    assert float(sched(jnp.int32(0))) == pytest.approx(1e-3)
    assert float(sched(jnp.int32(599))) == pytest.approx(1e-3)  # epoch 59
    assert float(sched(jnp.int32(600))) == pytest.approx(1e-3 * (1 - 60 / 150) ** 0.9, rel=1e-5)
    assert float(sched(jnp.int32(1205))) == pytest.approx(1e-3 * (1 - 120 / 150) ** 0.9, rel=1e-5)


def test_joint_learning_rate_is_stage_3s_base_rate_only():
    """optim.joint_learning_rate replaces learning_rate in stage 3 when above 0; other stages, and 0,
    keep learning_rate (the paper's single rate)."""
    kw = {"optim.learning_rate": 1e-3, "optim.joint_learning_rate": 1e-4, "optim.constant_epochs": 2, "num_epochs": 4}
    def at(stage, count, **overrides):
        settings = tiny.stage(tiny.tiny_config(**{**kw, **overrides}), stage).optim
        return float(optim.lr_schedule(settings, 10, "dr")(jnp.int32(count)))

    assert at("stage3", 0) == pytest.approx(1e-4)
    assert at("stage3", 30) == pytest.approx(1e-4 * (1 - 3 / 4) ** 0.9, rel=1e-5)
    assert at("stage1", 0) == pytest.approx(1e-3)
    assert at("stage3", 0, **{"optim.joint_learning_rate": 0.0}) == pytest.approx(1e-3)


def test_a_subnetwork_with_its_own_stage_3_rate_moves_by_it_and_the_others_by_the_joint_rate():
    """optim.joint_net_learning_rate.dr = 1e-3 beside joint_learning_rate = 1e-4: Adam's first update is
    lr * g / (|g| + eps) per element, so the largest |change| of each subnetwork's parameters is its own rate
    (to eps / |g| and float32's rounding of parameters of size ~1, 1e-7, a thousandth of 1e-4)."""
    rates = {"optim.joint_learning_rate": 1e-4, "optim.joint_net_learning_rate.dr": 1e-3}
    cfg, models, state, batch = _joint_setup(**rates)
    joint = tiny.stage(cfg, "stage3")
    tx = optim.make_optimizer(joint.optim, 1)
    assert {n: joint.optim.rate(n) for n in stages.JOINT_NETS} == {"iqe": 1e-4, "iqa": 1e-4, "dr": 1e-3}
    new = jax.jit(steps.make_train_step(joint, models, tx))(state, batch)[0]
    for net, rate in (("iqe", 1e-4), ("iqa", 1e-4), ("dr", 1e-3)):
        moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new.params[net]),
                                                                   jax.tree.leaves(state.params[net])))
        assert moved == pytest.approx(rate, rel=1e-2), net
    # Without a per-network rate every subnetwork shares one transformation, and other stages ignore them.
    assert not isinstance(optim.make_optimizer(tiny.stage(cfg, "stage1").optim, 1), dict)


@pytest.mark.parametrize("name, expected", [
    ("dr_only", ("stage1",)), ("iqe_only", ("stage1",)), ("iqe_no_seg", ("stage1",)),
    ("iqa_only", ("stage2",)), ("iqa_no_lqi", ("stage2",)), ("cleaq", ("stage1", "stage2", "stage3")),
    ("cleq_dr", ("stage1", "stage3")), ("cleaq_dr", ("stage1", "stage2", "stage3"))])
def test_each_ablation_config_runs_the_stages_its_variant_needs(name, expected):
    import importlib

    cfg = importlib.import_module(f"configs.ablations.{name}").get_config()
    assert stages.pipeline_stages(cfg) == expected
    if "stage3" in expected:
        nets = stages.stage_nets(cfg, "stage3")
        assert ("iqa" in nets) == cfg.tasks.iqa and ("dr" in nets) == cfg.tasks.dr


_joint_setup = tiny.joint_setup


def test_joint_step_reverses_the_iqa_gradient_into_iqe():
    """IQE receives -scale times IQA's gradient: (g(1) - g(0)) == -(g(-1) - g(0)) and is not zero,
    while IQA descends its own loss whatever the scale."""
    def grads(scale):
        cfg, models, state, batch = _joint_setup(**{"tasks.dr": False, "loss.grl_scale": scale})
        loss_fn = steps.stage_loss(tiny.stage(cfg), models)
        g = jax.jit(jax.grad(lambda p: loss_fn(p, state, batch, jax.random.key(1))[0]))(state.params)
        return jax.tree.map(np.asarray, g)

    g1, g0, gm1 = (grads(v) for v in (1.0, 0.0, -1.0))
    reversed_part = jax.tree.map(lambda a, b: a - b, g1["iqe"], g0["iqe"])
    plain_part = jax.tree.map(lambda a, b: a - b, gm1["iqe"], g0["iqe"])
    r = np.concatenate([x.ravel() for x in jax.tree.leaves(reversed_part)])
    p = np.concatenate([x.ravel() for x in jax.tree.leaves(plain_part)])
    assert np.linalg.norm(r) > 1e-6, "the IQA loss does not reach IQE at all"
    # Equal and opposite up to float32 cancellation in the differences.
    assert np.linalg.norm(r + p) <= 1e-3 * np.linalg.norm(r)
    for a, b in zip(jax.tree.leaves(g1["iqa"]), jax.tree.leaves(gm1["iqa"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_joint_step_updates_every_subnetwork_and_the_task_weights():
    cfg, models, state, batch = _joint_setup(**{"loss.weighting": "lbtw"})
    joint = tiny.stage(cfg, "stage3", steps_per_epoch=2)
    step = jax.jit(steps.make_train_step(joint, models, optim.make_optimizer(joint.optim, 2)))
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, batch)
    state, metrics = step(state, batch)
    for net in ("iqe", "iqa", "dr"):
        changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[net]),
                                                               jax.tree.leaves(state.params[net]))]
        assert all(changed), f"{net}: {changed.count(False)} parameter arrays did not move"
    weights = np.array([float(metrics[f"weight_{t}"]) for t in ("dr", "iqe", "iqa")])
    assert weights.sum() == pytest.approx(3.0, rel=1e-5)
    assert int(state.step) == 2 and int(state.lbtw.epoch) == 0


def _stage1_qe_loss(usable_self_reference: bool, batch) -> float:
    # Without Seg-IQE (BatchNorm couples the images of a batch) each image's enhancement is its own.
    cfg = tiny.tiny_config(**{"tasks.dr": False, "model.use_seg": False,
                              "loss.usable_self_reference": usable_self_reference})
    models = factory.build_models(cfg)
    stage1 = tiny.stage(cfg, "stage1")
    state = jax.jit(lambda k: train_state.init_state(stage1, models, optim.make_optimizer(stage1.optim, 1), k))(
        jax.random.key(0))
    loss_fn = jax.jit(steps.stage_loss(stage1, models))
    _, (metrics, _, _) = loss_fn(state.params, state, jax.tree.map(jnp.asarray, batch), jax.random.key(1))
    return float(metrics["loss_qe"])


def test_stage1_enhancement_loss_covers_usable_images_only_with_usable_self_reference():
    """Paper eq. (1) pairs op2(good) with good; the switch adds op1(usable) -> usable. Repainting the
    usable images moves L_QE only when the switch is on; reject images never count."""
    batch = tiny.random_batch(6, 32)  # qualities 0, 1, 2, 0, 1, 2
    repainted = {**batch, "image": batch["image"].copy()}
    usable, reject = batch["quality"] == 1, batch["quality"] == 2
    repainted["image"][usable] = 128 * batch["mask"][usable][..., None]  # flat grey: an easy target
    assert _stage1_qe_loss(False, batch) == pytest.approx(_stage1_qe_loss(False, repainted), rel=1e-6)
    assert abs(_stage1_qe_loss(True, batch) - _stage1_qe_loss(True, repainted)) > 1e-3
    rejected = {**batch, "image": batch["image"].copy()}
    rejected["image"][reject] = 128 * batch["mask"][reject][..., None]
    assert _stage1_qe_loss(True, batch) == pytest.approx(_stage1_qe_loss(True, rejected), rel=1e-6)


# --------------------------------------------------------------------------- device-count invariance
# One joint (stage-3) step from the same state on the same 8 images, on 1 device and on 8 (one image
# each). Compared: the step's losses (the forward pass from the initial parameters), each subnetwork's
# gradient (Adam's first moment after one step is (1 - b1) x the gradient) and the BatchNorm running
# statistics. Not compared: parameters or losses after an Adam update, whose first step is about
# lr x sign(gradient): round-off picks that sign wherever a gradient is zero up to round-off.
_DEVICES_SCRIPT = r"""
import os, jax, numpy as np
from cleaq_jax.models import factory
from cleaq_jax.runtime import parallel
from cleaq_jax.training import optim, steps, state as train_state
from tests import tiny
cfg = tiny.tiny_config(**{"batch_size": 8})
models = factory.build_models(cfg)
joint = tiny.stage(cfg, "stage3", steps_per_epoch=3)
nets = joint.nets
tx = optim.make_optimizer(joint.optim, 3)
init = lambda k: train_state.init_state(joint, models, tx, k)
flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])

def perturbed(state, rel):
    # Every weight times (1 +- rel), signs drawn at random: rel / 2**-24 units of float32 round-off.
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    scaled = [p * (1 + rel * jax.random.rademacher(k, p.shape, p.dtype)) for p, k in zip(leaves, keys)]
    return state.replace(params=jax.tree.unflatten(treedef, scaled))

out = {}
for name, devices, rel in (("one", jax.devices()[:1], 0.0), ("nudged", jax.devices()[:1], float(os.environ["REL"])),
                           ("eight", jax.devices(), 0.0)):
    mesh = parallel.make_mesh(devices=devices)
    state, shardings = train_state.sharded_state(init, mesh, jax.random.key(0))
    if rel:
        state = jax.jit(lambda s: perturbed(s, rel), out_shardings=shardings)(state)
    step = parallel.jit_train_step(steps.make_train_step(joint, models, tx), shardings, mesh)
    state, metrics = step(state, parallel.global_batch(tiny.random_batch(8, 32), mesh))
    out.update({f"{name}/{k}": np.asarray(v) for k, v in metrics.items() if k.startswith("loss")})
    for net in nets:
        out[f"{name}/gradient/{net}"] = flat(state.opt_state[net][0].mu) / (1 - cfg.optim.b1)
        out[f"{name}/batch_stats/{net}"] = flat(state.batch_stats[net])
np.savez(os.environ["OUT"], **out)
"""

# The gradients of the joint step are not continuous in its inputs: a ReLU or max-pool decision that a
# reordered float32 sum flips routes a finite gradient elsewhere, so no bound argued from u = 2**-24 holds
# for them (two x86-64 CPUs gave 4e-5 and 1.6e-3 for IQA's gradient, 8 devices vs 1). They are held to what
# the same step does on one device when every weight moves by 1e-6 of itself (17 units of round-off; the
# reordered sums move BatchNorm statistics by less than that nudge does), times 3. The nudge must move each
# gradient by under 0.1, or the comparison could not see the errors it is for, which move gradients by >= 1.
NUDGE = 1e-6


@pytest.mark.slow
def test_eight_devices_take_the_same_joint_step_as_one(tmp_path):
    tiny.run_python(_DEVICES_SCRIPT, devices=8, OUT=str(tmp_path / "step.npz"), REL=str(NUDGE))
    with np.load(tmp_path / "step.npz") as f:
        results = dict(f)
    names = sorted(k.removeprefix("one/") for k in results if k.startswith("one/"))
    assert {"loss_iqa", "loss_dr", "gradient/iqe", "gradient/iqa", "gradient/dr", "batch_stats/iqa"} <= set(names)
    for name in names:
        difference = tiny.relative_difference(results[f"eight/{name}"], results[f"one/{name}"])
        if name.startswith("gradient/"):
            nudge = tiny.relative_difference(results[f"nudged/{name}"], results[f"one/{name}"])
            assert 0 < nudge < 0.1, f"{name}: a 1e-6 nudge of the weights moves it by {nudge:.2e}"
            bound = max(tiny.LAYOUT_RTOL, 3 * nudge)
        else:  # losses and BatchNorm statistics are continuous in every sum's rounding (tiny.LAYOUT_RTOL)
            bound = tiny.LAYOUT_RTOL
        assert difference <= bound, f"{name}: 8 devices vs 1 differ by {difference:.2e} (relative; bound {bound:.2e})"


# --------------------------------------------------------------------------- runs through main
_main_cmd = tiny.main_command


def _final_params(workdir: str, stage: str) -> dict[str, np.ndarray]:
    from cleaq_jax.runtime import checkpoint

    cfg = tiny.tiny_config()
    models = factory.build_models(cfg)
    described = tiny.stage(cfg, stage)
    abstract = jax.eval_shape(
        lambda k: train_state.init_state(described, models, optim.make_optimizer(described.optim, 1), k),
        jax.random.key(0))
    mesh = parallel.make_mesh()
    target = parallel.abstract_with_shardings(abstract, parallel.state_shardings(abstract, mesh))
    state = checkpoint.restore_state(os.path.join(workdir, stage, "checkpoints"), target)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_and_ends_equal_to_an_uninterrupted_run(tmp_path):
    common = ("stage=stage1", "num_epochs=3", "eval_at_end=False", "image_every_steps=0")
    env = tiny.subprocess_env()
    # The data set is built once and shared, so both runs see identical shards.
    data = str(tmp_path / "data")
    subprocess.run(_main_cmd(str(tmp_path / "straight"), *common, f"data.dir={data}",
                             "data.synthetic.num=40"), env=env, cwd=tiny.REPO, check=True, capture_output=True,
                   timeout=900)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(_main_cmd(killed, *common, f"data.dir={data}"), env=env, cwd=tiny.REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = os.path.join(killed, "stage1", "checkpoints")
    deadline = time.time() + 600
    while time.time() < deadline and not any(d.isdigit() and int(d) >= 4 for d in _ls(ckpts)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(d) for d in _ls(ckpts) if d.isdigit())
    assert saved and saved[-1] < 12, f"the run was not interrupted mid-stage (checkpoints {saved})"
    subprocess.run(_main_cmd(killed, *common, f"data.dir={data}"), env=env, cwd=tiny.REPO, check=True,
                   capture_output=True, timeout=900)
    a, b = _final_params(str(tmp_path / "straight"), "stage1"), _final_params(killed, "stage1")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _ls(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def test_the_loop_logs_and_saves_what_its_step_gives_by_hand_and_compiles_periodic_work_aside(tmp_path):
    """The loop's machinery (batches prefetched to the device, metrics kept on device until each logging
    step, validation and the image grid compiled in a background thread) changes no number: the losses it
    logs are the interval means of those the stage's step returns when called by hand on the loader's
    batches from the same start, and its last checkpoint holds the state those calls end in, bit for bit.
    Validation's and the image grid's programs are compiled off the loop's thread."""
    cfg = tiny.tiny_config(stage="stage1", num_epochs=2, eval_at_end=False, log_every_steps=2, image_every_steps=2,
                           checkpoint_every_steps=2, eval_every_epochs=1)
    workdir = str(tmp_path / "run")
    compiled: list[tuple[str, str]] = []  # (program, thread) of every compilation during the stage

    def on_compile(event: str, _duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append((str(kwargs.get("fun_name")), threading.current_thread().name))

    jax.monitoring.register_event_duration_secs_listener(on_compile)
    try:
        train.train_stage(cfg, workdir, "stage1")
    finally:
        jax.monitoring.unregister_event_duration_listener(on_compile)
    # None of them on the loop's thread (none at all where an earlier test in this process compiled them).
    periodic = [(name, thread) for name, thread in compiled if name in ("jit(_eval_step)", "jit(_panels)")]
    assert all(thread == "compile-ahead" for _, thread in periodic) and len(periodic) <= 2, compiled

    stage, _ = train.describe(cfg, workdir, "stage1")
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    models = factory.build_models(cfg)
    tx = optim.make_optimizer(stage.optim, stage.steps_per_epoch)
    loader = train.pipeline.train_loader(stage.data_dir, stage.train_split, global_batch_size=stage.batch_size,
                                         sampling=stage.sampling, reading=stage.reading)
    with checkpoint.Checkpointer(str(tmp_path / "none")) as empty:
        state, shardings = stage_init.initial_state(stage, models, tx, mesh, empty, loader)
    step = parallel.jit_train_step(steps.make_train_step(stage, models, tx), shardings, mesh)
    losses = []
    for _, local in zip(range(stage.total_steps), loader):
        state, metrics = step(state, parallel.global_batch(local, mesh))
        losses.append(np.float32(jax.device_get(metrics["loss"])))
    assert stage.total_steps >= 4 and len(losses) == stage.total_steps

    from cleaq_jax.programs import curves

    logged_steps, logged = curves.read_scalars(os.path.join(workdir, "stage1", "tensorboard"))["train/loss"]
    starts = [0, *logged_steps[:-1]]
    # Every logging step, and the validation steps, whose checkpoints write the means of their interval.
    assert set(range(2, stage.total_steps + 1, 2)) <= set(logged_steps) and logged_steps[-1] == stage.total_steps
    expected = [np.float32(np.mean(np.stack(losses[a:b]))) for a, b in zip(starts, logged_steps)]
    np.testing.assert_array_equal(np.asarray(logged, np.float32), expected)
    target, _ = train_state.abstract_state(lambda k: train_state.init_state(stage, models, tx, k), mesh,
                                           jax.random.key(0))
    saved = checkpoint.restore_state(os.path.join(workdir, "stage1", "checkpoints"), target, stage.total_steps)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------- guardrails
def test_stage3_without_stage1_checkpoint_names_the_config_to_run_first(tmp_path):
    cfg = tiny.tiny_config(stage="stage3")
    with pytest.raises(FileNotFoundError, match=r"configs/stage1\.py"):
        pipeline.run(cfg, str(tmp_path))


def test_missing_shards_name_the_command_that_builds_them(tmp_path):
    cfg = tiny.tiny_config(stage="stage1", **{"data.dir": str(tmp_path / "nowhere"), "data.synthetic.num": 0})
    with pytest.raises(FileNotFoundError, match=r"data_prep"):
        pipeline.run(cfg, str(tmp_path))


def test_a_non_finite_loss_stops_naming_step_and_loss_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny.tiny_config(stage="stage2", num_epochs=1, eval_at_end=False, image_every_steps=0,
                           **{"optim.learning_rate": 1e30, "checkpoint_every_steps": 1, "log_every_steps": 1})
    with pytest.raises(train.NonFiniteLossError, match=r"step \d+.*loss"):
        pipeline.run(cfg, str(tmp_path))
    saved = tiny.saved_metrics(os.path.join(tmp_path, "stage2", "checkpoints"))
    assert saved, "no good checkpoint was kept"
    assert all(np.isfinite(metrics["loss"]) for metrics in saved.values())


# --------------------------------------------------------------------------- a whole (tiny) pipeline
@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    result = pipeline.run(tiny.tiny_config(), workdir)
    return workdir, result


@pytest.mark.slow
def test_pipeline_leaves_a_checkpoint_per_stage_and_an_evaluation(pipeline_run):
    workdir, result = pipeline_run
    for stage in ("stage1", "stage2", "stage3"):
        steps_saved = [d for d in _ls(os.path.join(workdir, stage, "checkpoints")) if d.isdigit()]
        assert steps_saved, stage
        with open(os.path.join(workdir, stage, "eval", "eval.json")) as f:
            report = json.load(f)
        assert report["stage"] == stage and report["num_examples"] > 0
    assert {"dr", "iqa", "enhancement"} <= set(result)


def test_given_subnetworks_are_taken_as_they_are_and_the_others_initialised_as_without_them():
    cfg = tiny.tiny_config()
    models = factory.build_models(cfg)
    stage1 = tiny.stage(cfg, "stage1")
    assert stage1.nets == ("iqe", "dr")
    tx = optim.make_optimizer(stage1.optim, 1)
    plain = jax.jit(lambda k: train_state.init_state(stage1, models, tx, k))(jax.random.key(0))
    given = {"dr": jax.tree.map(lambda a: a + 1.0, {"params": plain.params["dr"], "batch_stats": plain.batch_stats["dr"]})}
    state = jax.jit(lambda k, g: train_state.init_state(stage1, models, tx, k, given=g))(jax.random.key(0), given)
    for got, want in ((state.params["iqe"], plain.params["iqe"]), (state.params["dr"], given["dr"]["params"]),
                      (state.batch_stats["dr"], given["dr"]["batch_stats"])):
        jax.tree.map(np.testing.assert_array_equal, got, want)
    jax.tree.map(lambda mu: np.testing.assert_array_equal(mu, 0.0), state.opt_state["dr"][0].mu)


@pytest.mark.slow
def test_stage3_starts_from_the_last_stage1_and_stage2_networks(pipeline_run, tmp_path):
    workdir, _ = pipeline_run
    cfg = tiny.tiny_config()
    models = factory.build_models(cfg)
    joint, _ = train.describe(cfg, workdir, "stage3")
    mesh = parallel.make_mesh()
    with checkpoint.Checkpointer(tmp_path / "stage3") as ckpt:
        state, _ = stage_init.initial_state(joint, models, optim.make_optimizer(joint.optim, 1), mesh, ckpt,
                                            loader=None)
    assert int(state.step) == 0
    for source, trained in (("stage1", ("iqe", "dr")), ("stage2", ("iqa",))):
        target = factory.abstract_variables(models, trained, cfg.data.image_size, mesh)
        saved = checkpoint.restore_variables(os.path.join(workdir, source, "checkpoints"), target)
        for n in trained:
            jax.tree.map(np.testing.assert_array_equal, state.params[n], saved.params[n])
            jax.tree.map(np.testing.assert_array_equal, state.batch_stats[n], saved.batch_stats[n])


@pytest.mark.slow
def test_pipeline_writes_tensorboard_scalars_and_images(pipeline_run):
    from tensorboard.backend.event_processing import event_accumulator

    workdir, _ = pipeline_run
    events = glob.glob(os.path.join(workdir, "stage3", "tensorboard", "events.out.tfevents.*"))
    assert events
    acc = event_accumulator.EventAccumulator(os.path.dirname(events[0]), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_dr", "train/loss_iqa", "train/loss_iqe", "train/weight_dr",
                "train/learning_rate"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    image_tags = set(acc.Tags()["images"]) | {t for t in tags if "enhanced" in t}
    assert any("low_enhanced_reference_vessel" in t for t in image_tags), sorted(image_tags)


@pytest.mark.slow
def test_each_stage_validates_on_the_val_split_and_ranks_its_checkpoints_by_it(pipeline_run):
    from cleaq_jax.programs import curves
    from cleaq_jax.runtime import checkpoint

    workdir, _ = pipeline_run
    for stage, metric, logged in (("stage1", "val_dr_kappa", "val/dr_accuracy"),
                                  ("stage2", "val_iqa_kappa", "val/iqa_accuracy"),
                                  ("stage3", "val_dr_kappa", "val/psnr_enhanced")):
        directory = os.path.join(workdir, stage, "checkpoints")
        assert checkpoint.read_trained_config(directory).checkpoint_metric == metric
        scalars = curves.read_scalars(os.path.join(workdir, stage, "tensorboard"))
        assert logged in scalars, f"{stage}: {logged} not among {sorted(scalars)}"
        steps, _ = scalars[logged]
        saved_metrics = tiny.saved_metrics(directory)
        last = max(saved_metrics)
        assert steps.tolist() == [last]  # one epoch: validated once, at the last step
        saved = saved_metrics[last]
        assert logged.replace("/", "_") in saved and "loss" in saved, saved


@pytest.mark.slow
def test_curves_draws_the_validation_and_training_curves_of_a_run(pipeline_run, tmp_path):
    from cleaq_jax.programs import curves

    workdir, _ = pipeline_run
    out = str(tmp_path / "curves.png")
    tags = curves.figure(workdir, out)
    assert "train/loss" in tags and "val/psnr_enhanced" in tags
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[1] > 3 * matplotlib.image.imread(out).shape[0]  # a row of panels
