"""The training program: one loop for every stage, and the dispatcher main.py calls.

``run(config, workdir)`` dispatches on ``config.stage``: "stage1", "stage2", "stage3" (and the vessel
teacher's "teacher_a", "teacher_b") train one stage into ``<workdir>/<stage>``; "eval" evaluates a
checkpoint; "pipeline" runs stage 1, 2, 3, each followed by its evaluation (the demo); "teacher" runs
teacher_a then teacher_b. A stage resumes automatically from its latest checkpoint, stops cleanly on SIGTERM after
saving, and refuses to start when its inputs are missing, naming what to run first.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cleaq_jax import checkpoint, parallel, steps
from cleaq_jax import train_state as ts
from cleaq_jax.data import pipeline, records



class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


# --------------------------------------------------------------------------- entry points
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run what ``cfg.stage`` names; returns the evaluation results when an evaluation ran."""
    from cleaq_jax import evaluate

    if cfg.stage == "eval":  # the data settings come from the checkpoint's config (evaluate.merge_for_eval)
        return evaluate.run(cfg, workdir)
    ensure_data(cfg, workdir)
    if cfg.stage in steps.STAGES:
        return train_stage(cfg, workdir, cfg.stage)
    if cfg.stage in ("pipeline", "teacher"):
        result: dict[str, Any] = {}
        for stage in pipeline_stages(cfg) if cfg.stage == "pipeline" else ("teacher_a", "teacher_b"):
            result = train_stage(cfg, workdir, stage)
        return result
    raise ValueError(f"config.stage={cfg.stage!r} is not one of {steps.STAGES + ('eval', 'pipeline', 'teacher')}")


def pipeline_stages(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The stages a full run goes through after the task switches (ablations drop some)."""
    t = cfg.tasks
    chosen = []
    if t.iqe or t.dr:
        chosen.append("stage1")
    if t.iqa:
        chosen.append("stage2")
    if t.iqe and (t.iqa or t.dr):
        chosen.append("stage3")
    return tuple(chosen)


def data_dir(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """config.data.dir, or <workdir>/data when it is empty and synthetic data is configured."""
    if cfg.data.dir:
        return cfg.data.dir
    if cfg.data.synthetic.num > 0:
        return os.path.join(workdir, "data")
    raise ValueError("config.data.dir is empty: point it at shards written by data_prep "
                     "(e.g. `python -m data_prep.eyeq ... --out DIR`, then --config.data.dir=DIR)")


def ensure_data(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Check the shards exist (building the synthetic set on first use when configured)."""
    path = data_dir(cfg, workdir)
    manifest = os.path.join(path, records.MANIFEST)
    if not os.path.exists(manifest) and cfg.data.synthetic.num > 0:
        if jax.process_index() == 0:
            from data_prep import synthetic

            logging.info("building %d synthetic fundus images at %d px into %s", cfg.data.synthetic.num,
                         cfg.data.image_size, path)
            synthetic.build_synthetic(path, num=int(cfg.data.synthetic.num), size=int(cfg.data.image_size),
                                      seed=int(cfg.data.synthetic.seed),
                                      lesion_scale=float(cfg.data.synthetic.lesion_scale))
        _barrier("synthetic-data")
    if not os.path.exists(manifest):
        raise FileNotFoundError(
            f"no shards at config.data.dir={path} ({records.MANIFEST} missing). Build them first, e.g. "
            f"`python -m data_prep.synthetic --out {path} --size {cfg.data.image_size}` or the data_prep "
            f"CLI for your dataset (docs/data.md)")
    size = records.read_manifest(path)["splits"].get(cfg.data.train_split, {}).get("image_size")
    if size and size[0] != cfg.data.image_size:
        raise ValueError(f"config.data.image_size={cfg.data.image_size} but the shards in {path} are "
                         f"{size[0]} px: set --config.data.image_size={size[0]} or re-run data_prep with --size")
    return path


def _barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait for every process at the coordination service (no device collective, so no collective
    timeout however long the others take, e.g. to compile or to build data)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination-service client; orbax uses it the same way

    client = distributed.global_state.client
    if client is None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
    else:
        client.wait_at_barrier(f"cleaq_jax:{name}", timeout_in_ms=timeout_s * 1000)


# --------------------------------------------------------------------------- one stage
def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


def train_stage(cfg: ml_collections.ConfigDict, workdir: str, stage: str) -> dict[str, Any]:
    """Train one stage to config.num_epochs (resuming from <workdir>/<stage>/checkpoints if present)."""
    from cleaq_jax import evaluate

    data = ensure_data(cfg, workdir)
    out = stage_dir(workdir, stage)
    cfg = _for_stage(cfg, stage)
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    parallel.check_batch_divisible(cfg.batch_size, mesh)
    loader = pipeline.train_loader(
        data, cfg.data.train_split, global_batch_size=cfg.batch_size, seed=cfg.seed,
        class_balance=cfg.data.class_balance, balance_by=cfg.data.balance_by, augment=cfg.data.augment,
        worker_count=cfg.data.worker_count, image_size=cfg.data.image_size)
    steps_per_epoch = pipeline.num_batches_per_epoch(
        data, cfg.data.train_split, global_batch_size=cfg.batch_size, class_balance=cfg.data.class_balance,
        balance_by=cfg.data.balance_by, seed=cfg.seed)
    total_steps = int(cfg.num_epochs) * steps_per_epoch
    models = steps.build_models(cfg)
    tx = steps.make_optimizer(cfg, steps_per_epoch)
    nets = steps.stage_nets(cfg, stage)
    # Leaving the block (also on an error) waits for in-flight asynchronous saves: the last good
    # checkpoint is always complete on disk.
    with checkpoint.Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=cfg.keep_checkpoints,
                                 best_metric=cfg.checkpoint_metric, best_mode=cfg.checkpoint_mode) as ckpt:
        state, shardings = _initial_state(cfg, workdir, stage, models, nets, tx, mesh, ckpt, loader)
        start = int(jax.device_get(state.step))
        step_fn = parallel.jit_train_step(steps.make_train_step(cfg, models, tx, stage, steps_per_epoch),
                                          shardings, mesh)
        logging.info("%s: %s, %d steps/epoch, steps %d..%d, mesh %s", stage, "+".join(nets), steps_per_epoch,
                     start, total_steps, dict(mesh.shape))
        state = _loop(cfg, out, stage, state, step_fn, loader, mesh, ckpt, start, total_steps, models)
    if not cfg.eval_at_end:
        return {}
    if stage.startswith("teacher"):
        from cleaq_jax import teacher

        return teacher.evaluate_state(cfg, workdir, stage, state, models, mesh, out_dir=os.path.join(out, "eval"))
    return evaluate.evaluate_state(cfg, workdir, stage, state, models, mesh, out_dir=os.path.join(out, "eval"))


def _for_stage(cfg: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """A copy of the config naming the stage it trains (checkpoints record which stage they hold)."""
    stage_cfg = ml_collections.ConfigDict(cfg.to_dict())
    stage_cfg.stage = stage
    return stage_cfg


def _initial_state(cfg, workdir, stage, models, nets, tx, mesh, ckpt, loader):
    """Resume from the stage's latest checkpoint, else initialise (stage 3: from stages 1 and 2)."""
    key = jax.random.key(int(cfg.seed))
    init = lambda k: steps.init_state(cfg, models, nets, tx, k)  # noqa: E731
    abstract = jax.eval_shape(init, key)
    shardings = parallel.state_shardings(abstract, mesh)
    if ckpt.latest_step() is not None:
        target = checkpoint.abstract_with_shardings(abstract, shardings)
        state = ckpt.restore(target, data_iter=loader)
        logging.info("%s: resumed from step %d", stage, ckpt.latest_step())
        return state, shardings
    state = jax.jit(init, out_shardings=shardings)(key)
    state = _graft_imagenet(cfg, state)
    state = _load_pretrained_stages(cfg, workdir, stage, models, nets, state, shardings)
    return state, shardings


# config.pretrained key -> the ResNet trunks it initialises: (subnetwork, module path inside it).
IMAGENET_TARGETS = {
    "dr": (("dr", "backbone"),),
    "c_iqa": (("iqa", "c_iqa"),),
    "resnet34": (("iqe", "seg_iqe/encoder"), ("iqa", "lqi_iqa/encoder"), ("cenet", "encoder")),
}


def _graft_imagenet(cfg, state: ts.TrainState) -> ts.TrainState:
    """Put torchvision ImageNet weights (converted by `python -m cleaq_jax.models.pretrained`) into the
    ResNet trunks that config.pretrained names, before any training."""
    from cleaq_jax.models import pretrained

    params, batch_stats = dict(state.params), dict(state.batch_stats)
    for key, targets in IMAGENET_TARGETS.items():
        directory = cfg.pretrained.get(key, "")
        if not directory:
            continue
        weights = pretrained.load(directory)
        for net, path in targets:
            if net in params:
                merged = pretrained.graft({"params": params[net], "batch_stats": batch_stats[net]}, weights, into=path)
                params[net], batch_stats[net] = merged["params"], merged["batch_stats"]
                logging.info("%s/%s initialised from ImageNet weights in %s", net, path, directory)
    return state.replace(params=params, batch_stats=batch_stats)


# A stage that starts from earlier stages' checkpoints: (source stage, config that trains it).
INIT_FROM = {
    "stage3": (("stage1", "configs/stage1.py"), ("stage2", "configs/stage2.py")),
    "teacher_b": (("teacher_a", "configs/vessel_teacher.py"),),
}


def _load_pretrained_stages(cfg, workdir, stage, models, nets, state, shardings):
    """Stage 3 starts from the stage-1 (IQE, DR) and stage-2 (IQA) checkpoints named by config.init;
    the teacher's fine-tuning (teacher_b) from teacher_a."""
    params, batch_stats = dict(state.params), dict(state.batch_stats)
    for source, config_name in INIT_FROM.get(stage, ()):
        source_nets = _trained_nets(cfg, source)
        wanted = tuple(n for n in source_nets if n in nets)
        if not wanted:
            continue
        directory = os.path.join(cfg.init.get(source, "") or stage_dir(workdir, source), "checkpoints")
        init = lambda k: steps.init_state(cfg, models, source_nets, steps.make_optimizer(cfg, 1), k)  # noqa: E731
        abstract = jax.eval_shape(init, jax.random.key(0))
        target = checkpoint.abstract_with_shardings(abstract, parallel.state_shardings(abstract, state_mesh(shardings)))
        try:
            restored = checkpoint.restore_state(directory, target)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{stage} starts from {source}'s checkpoint, but {directory} holds none (config.init.{source}). "
                f"Run `python -m cleaq_jax.main --config={config_name} --workdir={workdir}` first, with the "
                f"same model and data settings.") from e
        for n in wanted:
            params[n], batch_stats[n] = restored.params[n], restored.batch_stats[n]
        logging.info("%s: %s initialised from %s", stage, "+".join(wanted), directory)
    return state.replace(params=params, batch_stats=batch_stats)


def _trained_nets(cfg, stage) -> tuple[str, ...]:
    try:
        return steps.stage_nets(cfg, stage)
    except ValueError:
        return ()


def state_mesh(shardings) -> jax.sharding.Mesh:
    return jax.tree.leaves(shardings)[0].mesh


# --------------------------------------------------------------------------- the loop
def _loop(cfg, out, stage, state, step_fn, loader, mesh, ckpt, start, total_steps, models):
    from clu import metric_writers, periodic_actions

    writer = metric_writers.create_default_writer(os.path.join(out, "tensorboard"),
                                                  just_logging=jax.process_index() != 0)
    hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_secs=None,
                                             every_steps=cfg.log_every_steps)]
    if cfg.profile_steps and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(logdir=os.path.join(out, "tensorboard"),
                                              num_profile_steps=cfg.profile_steps, first_profile=start + 5))
    batches = parallel.prefetch_to_device(iter(loader), 2, mesh)
    if start >= total_steps:
        return state
    first = next(batches)
    step_fn = _compile(step_fn, state, first, stage)
    stream = itertools.chain([first], batches)
    pending: list[dict[str, jax.Array]] = []
    last_metrics: dict[str, float] = {}
    # Processes agree on a SIGTERM only at checkpoint steps: an all-gather every step would stall.
    with checkpoint.PreemptionGuard(sync_every_steps=cfg.checkpoint_every_steps) as guard:
        for step in range(start + 1, total_steps + 1):
            batch = next(stream)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = step_fn(state, batch)
            pending.append(metrics)
            for hook in hooks:
                hook(step)
            last = step == total_steps
            if step % cfg.log_every_steps == 0 or last:
                last_metrics = _write_metrics(writer, step, pending, stage)
                pending = []
            if cfg.image_every_steps and (step % cfg.image_every_steps == 0 or last):
                _write_images(cfg, writer, step, state, batch, models, stage)
            stop = guard.should_stop(step)
            if step % cfg.checkpoint_every_steps == 0 or last or stop:
                if pending:
                    last_metrics = _write_metrics(writer, step, pending, stage)
                    pending = []
                # The prefetcher's position is that of the last batch consumed, not of those queued.
                ckpt.save(step, state, data_iter=batches, config=cfg, metrics=last_metrics, force=last or stop)
            if stop:
                logging.warning("%s: SIGTERM received; saved step %d and stopping", stage, step)
                ckpt.wait_until_finished()
                writer.flush()
                raise SystemExit(0)
    writer.flush()
    return state


def _compile(step_fn, state, batch, stage: str):
    """Compile the step before the first step and line the processes up after it: collectives time out
    when one process (e.g. with a warm compilation cache) reaches step 1 long before the others."""
    t0 = time.time()
    compiled = step_fn.lower(state, batch).compile()
    logging.info("%s: step compiled in %.1f s", stage, time.time() - t0)
    _barrier(f"{stage}-compiled")
    return compiled


def _write_metrics(writer, step: int, pending: list[dict[str, jax.Array]], stage: str) -> dict[str, float]:
    """Fetch the interval's metrics from device once, average, check finiteness, write."""
    stacked = jax.device_get(jax.tree.map(lambda *v: jnp.stack(v), *pending))
    means = {k: float(np.mean(v)) for k, v in stacked.items()}
    bad = {k: v for k, v in means.items() if k.startswith("loss") and not np.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"{stage}: non-finite loss at or before step {step}: {bad}. The last good checkpoint is kept; "
            f"lower config.optim.learning_rate or check the data.")
    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
    return means


def _write_images(cfg, writer, step, state, batch, models, stage) -> None:
    """TensorBoard grid: low-quality input / enhanced / reference / vessel mask (first examples)."""
    if "iqe" not in state.params:
        return
    from cleaq_jax import evaluate

    n = min(4, batch["image"].shape[0])
    small = jax.tree.map(lambda a: a[:n], batch)
    grid = evaluate.enhancement_panels(cfg, state, models, small)
    writer.write_images(step, {f"{stage}/low_enhanced_reference_vessel": grid})
