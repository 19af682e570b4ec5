"""One training stage: its data, models, optimiser and starting state, the loop, and its evaluation.

`train_stage` trains one stage to config.num_epochs into ``<workdir>/<stage>``: it resumes
automatically from its latest checkpoint, stops cleanly on SIGTERM after saving, and refuses to start
when its inputs are missing, naming what to run first. `cleaq_jax.programs.pipeline.run` chooses the
stages.
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

from cleaq_jax import config_checks
from cleaq_jax.data import location, pipeline, records
from cleaq_jax.evaluation import inference
from cleaq_jax.models import factory
from cleaq_jax.programs import evaluate, teacher
from cleaq_jax.runtime import checkpoint, console, parallel, preemption, storage
from cleaq_jax.training import optim, stages, steps
from cleaq_jax.training import start as stage_init


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


def train_stage(cfg: ml_collections.ConfigDict, workdir: str, stage: str) -> dict[str, Any]:
    """Train one stage to config.num_epochs (resuming from <workdir>/<stage>/checkpoints if present);
    returns the stage's evaluation results (empty without config.eval_at_end)."""
    data = location.ensure_data(cfg, workdir)
    out = stage_init.stage_dir(workdir, stage)
    cfg = _for_stage(cfg, stage)
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    parallel.check_batch_divisible(cfg.batch_size, mesh)
    seed = stages.stage_seed(cfg, stage)
    loader = pipeline.train_loader(
        data, cfg.data.train_split, global_batch_size=cfg.batch_size,
        sampling=pipeline.EpochSampling(seed, cfg.data.class_balance, cfg.data.balance_by, cfg.data.augment),
        reading=pipeline.RecordReading(image_size=cfg.data.image_size, worker_count=cfg.data.worker_count))
    steps_per_epoch = pipeline.num_batches_per_epoch(
        data, cfg.data.train_split, global_batch_size=cfg.batch_size,
        sampling=pipeline.EpochSampling(seed, cfg.data.class_balance, cfg.data.balance_by, cfg.data.augment))
    total_steps = int(cfg.num_epochs) * steps_per_epoch
    models = factory.build_models(cfg)
    tx = optim.make_optimizer(cfg, steps_per_epoch)
    nets = stages.stage_nets(cfg, stage)
    val_split = _validation_split(cfg, data, stage)
    # The saved config names the metric that ranked its checkpoints (evaluation restores the best by it).
    cfg.checkpoint_metric, cfg.checkpoint_mode = checkpoint.best_metric(cfg, nets, val_split is not None)
    # Leaving the block (also on an error) waits for in-flight asynchronous saves: the last good
    # checkpoint is always complete on disk.
    with checkpoint.Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=cfg.keep_checkpoints,
                                 best_metric=cfg.checkpoint_metric, best_mode=cfg.checkpoint_mode) as ckpt:
        state, shardings = stage_init.initial_state(cfg, workdir, stage, models, nets, tx, mesh, ckpt, loader)
        start = int(jax.device_get(state.step))
        step_fn = parallel.jit_train_step(steps.make_train_step(cfg, models, tx, stage, steps_per_epoch),
                                          shardings, mesh)
        console.say("%s: %s, %d steps/epoch, steps %d..%d, mesh %s", stage, "+".join(nets), steps_per_epoch,
                    start, total_steps, dict(mesh.shape))
        progress = console.StageProgress(stage, start, total_steps, steps_per_epoch)
        validate = (_Validation(cfg, data, stage, models, nets, mesh, val_split, steps_per_epoch)
                    if val_split else None)
        state = _loop(cfg, out, stage, state, step_fn, loader, mesh, ckpt, start, total_steps, models, progress,
                      validate)
    if not cfg.eval_at_end:
        return {}
    evaluate_state = teacher.evaluate_state if stage in config_checks.TEACHER_STAGES else evaluate.evaluate_state
    return evaluate_state(cfg, workdir, stage, state, models, mesh, out_dir=os.path.join(out, "eval"))


def _for_stage(cfg: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """A copy of the config naming the stage it trains (checkpoints record which stage they hold)."""
    stage_cfg = ml_collections.ConfigDict(cfg.to_dict())
    stage_cfg.stage = stage
    return stage_cfg


# --------------------------------------------------------------------------- validation
def _validation_split(cfg: ml_collections.ConfigDict, data: str, stage: str) -> str | None:
    """config.data.val_split when this stage validates during training, else None (said once)."""
    if not int(cfg.eval_every_epochs) or stage in config_checks.TEACHER_STAGES:
        return None
    split = str(cfg.data.val_split)
    if split not in records.read_manifest(data).get("splits", {}):
        console.say("%s: no validation during training: %s has no %r split (config.data.val_split; prepare "
                    "one with data_prep's --split %s, or set config.eval_every_epochs=0 to silence this)",
                    stage, data, split, split)
        return None
    return split


class _Validation:
    """Every config.eval_every_epochs epochs and at the last step: the stage's evaluation on the val
    split, its headline metrics (`evaluate.validation_metrics`) to TensorBoard (val/...) and the console,
    returned for the checkpoint saved at that step, which they rank."""

    def __init__(self, cfg, data, stage, models, nets, mesh, split, steps_per_epoch):
        self.cfg, self.data, self.stage, self.models, self.mesh, self.split = cfg, data, stage, models, mesh, split
        self.nets = tuple(n for n in ("iqe", "iqa", "dr") if n in nets)
        self.every, self.per_epoch = int(cfg.eval_every_epochs) * steps_per_epoch, steps_per_epoch

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def __call__(self, writer, state, step: int) -> dict[str, float]:
        out = evaluate.collect(self.cfg, state, self.models, self.nets, self.mesh, self.data, self.stage,
                               split=self.split, show_progress=False)
        values = evaluate.validation_metrics(evaluate.summarise(out))
        writer.write_scalars(step, {f"val/{k.removeprefix('val_')}": v for k, v in values.items()})
        console.say("%s validation (%s, %d images) at epoch %.3g: %s", self.stage, self.split, len(out["quality"]),
                    step / self.per_epoch, " ".join(f"{k.removeprefix('val_')}={v:.4g}" for k, v in values.items()))
        return values


# --------------------------------------------------------------------------- the loop
def _loop(cfg, out, stage, state, step_fn, loader, mesh, ckpt, start, total_steps, models, progress, validate):
    # Process 0 writes TensorBoard files (through a local directory mirrored to a remote workdir); the
    # others only log. Closing it (also on an error or SIGTERM) copies the last events to a bucket.
    logdir = os.path.join(out, "tensorboard")
    writer = storage.summary_writer(logdir, just_logging=jax.process_index() != 0)
    try:
        return _train(cfg, stage, state, step_fn, loader, mesh, ckpt, start, total_steps, models, progress,
                      validate, writer, logdir)
    finally:
        writer.close()


def _train(cfg, stage, state, step_fn, loader, mesh, ckpt, start, total_steps, models, progress, validate, writer,
           logdir):
    from clu import (
        periodic_actions,  # heavy: pulls TensorFlow, which only the writers need
    )

    hooks = []  # the per-interval console line replaces clu's ReportProgress (a log line per note)
    if cfg.profile_steps and jax.process_index() == 0:
        # Traces go where the writer's event files go, so a remote workdir gets them mirrored too.
        local_logdir = writer.local_dir if isinstance(writer, storage.MirroredWriter) else logdir
        hooks.append(periodic_actions.Profile(logdir=local_logdir, num_profile_steps=cfg.profile_steps,
                                              first_profile=start + 5))
    batches = parallel.prefetch_to_device(iter(loader), 2, mesh)
    if start >= total_steps:
        return state
    first = next(batches)
    step_fn = _compile(step_fn, state, first, stage)
    progress.start()
    stream = itertools.chain([first], batches)
    pending: list[dict[str, jax.Array]] = []
    last_metrics: dict[str, float] = {}
    # Several processes stop at one common step after a SIGTERM to any (JAX's preemption sync point);
    # without the preemption service they compare flags at checkpoint steps (an all-gather every step stalls).
    with preemption.PreemptionGuard(sync_every_steps=cfg.checkpoint_every_steps) as guard:
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
                progress.report(step, last_metrics)
            if cfg.image_every_steps and (step % cfg.image_every_steps == 0 or last):
                _write_images(cfg, writer, step, state, batch, models, stage)
            stop = guard.should_stop(step)
            validated = validate(writer, state, step) if validate and not stop and validate.due(step, last) else {}
            if step % cfg.checkpoint_every_steps == 0 or last or stop or validated:
                if pending:
                    last_metrics = _write_metrics(writer, step, pending, stage)
                    pending = []
                # The prefetcher's position is that of the last batch consumed, not of those queued.
                ckpt.save(step, state, data_iter=batches, config=cfg, metrics={**last_metrics, **validated},
                          force=last or stop or bool(validated))
                writer.flush()  # the events on disk (or in the bucket) reach the step a resume starts from
            if stop:
                logging.warning("%s: SIGTERM received; saved step %d and stopping", stage, step)
                ckpt.wait_until_finished()
                raise SystemExit(0)
    writer.flush()
    return state


def _compile(step_fn, state, batch, stage: str):
    """Compile the step before the first step and line the processes up after it: collectives time out
    when one process (e.g. with a warm compilation cache) reaches step 1 long before the others."""
    t0 = time.time()
    compiled = step_fn.lower(state, batch).compile()
    console.say("%s: step compiled in %.1f s", stage, time.time() - t0)
    parallel.barrier(f"{stage}-compiled")
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
    n = min(4, batch["image"].shape[0])
    small = jax.tree.map(lambda a: a[:n], batch)
    grid = inference.enhancement_panels(stages.qt_params(cfg), state, models, small)
    writer.write_images(step, {f"{stage}/low_enhanced_reference_vessel": grid})
