"""One training stage: its description, data, models, optimiser and starting state, the loop, and its
evaluation.

`train_stage` trains one stage to config.num_epochs into ``<workdir>/<stage>``: it resumes
automatically from its latest checkpoint, stops cleanly on SIGTERM after saving, and refuses to start
when its inputs are missing, naming what to run first. `describe` reads the config once into a
`stages.Stage` that everything below is handed. `cleaq_jax.programs.pipeline.run` chooses the stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cleaq_jax import errors
from cleaq_jax.data import location, pipeline
from cleaq_jax.data import shards
from cleaq_jax.evaluation import inference
from cleaq_jax.models import factory
from cleaq_jax.programs import evaluate, teacher
from cleaq_jax.runtime import checkpoint, console, parallel, preemption, summaries
from cleaq_jax.training import optim, stages, start, steps


class NonFiniteLossError(errors.UserError, FloatingPointError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


def describe(cfg: ml_collections.ConfigDict, workdir: str, name: str) -> tuple[stages.Stage, ml_collections.ConfigDict]:
    """The stage ``name`` of a checked config, with its data (built on first use when synthetic), steps
    per epoch, validation split, earlier stages' directories and checkpoint ranking resolved; and the
    config its checkpoints save (naming the stage and the metric that ranks them, which evaluation
    restores the best by)."""
    data_dir = location.ensure_data(cfg.data, workdir)
    nets = stages.stage_nets(cfg, name)
    val_split = _validation_split(cfg, data_dir, name)
    metric, mode = checkpoint.best_metric(cfg.checkpoint_metric, cfg.checkpoint_mode, nets,
                                           val_split is not None)
    init_from = tuple((source, _trained_nets(cfg, source), cfg.init[source] or os.path.join(workdir, source))
                      for source, _ in stages.INIT_FROM.get(name, ()))
    stage = stages.Stage.from_config(
        cfg, name, directory=os.path.join(workdir, name), data_dir=data_dir, val_split=val_split,
        init_from=init_from, checkpoint_metric=metric, checkpoint_mode=mode)
    stage = dataclasses.replace(stage, steps_per_epoch=pipeline.num_batches_per_epoch(
        data_dir, stage.train_split, global_batch_size=stage.batch_size, sampling=stage.sampling))
    saved = ml_collections.ConfigDict(cfg.to_dict())
    saved.stage, saved.checkpoint_metric, saved.checkpoint_mode = name, metric, mode
    return stage, saved


def _trained_nets(cfg: ml_collections.ConfigDict, stage: str) -> tuple[str, ...]:
    try:
        return stages.stage_nets(cfg, stage)
    except ValueError:  # the task switches leave that stage nothing to train
        return ()


def _validation_split(cfg: ml_collections.ConfigDict, data_dir: str, stage: str) -> str | None:
    """config.data.val_split when this stage validates during training, else None (said once)."""
    if not int(cfg.eval_every_epochs) or stage in stages.TEACHER_STAGES:
        return None
    split = str(cfg.data.val_split)
    if split not in shards.read_manifest(data_dir)["splits"]:
        console.say("%s: no validation during training: %s has no %r split (config.data.val_split; prepare "
                    "one with data_prep's --split %s, or set config.eval_every_epochs=0 to silence this)",
                    stage, data_dir, split, split)
        return None
    return split


def train_stage(cfg: ml_collections.ConfigDict, workdir: str, name: str) -> dict[str, Any]:
    """Train one stage to config.num_epochs (resuming from <workdir>/<stage>/checkpoints if present);
    returns the stage's evaluation results (empty without config.eval_at_end)."""
    stage, saved_config = describe(cfg, workdir, name)
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    parallel.check_batch_divisible(stage.batch_size, mesh)
    loader = pipeline.train_loader(stage.data_dir, stage.train_split, global_batch_size=stage.batch_size,
                                   sampling=stage.sampling, reading=stage.reading)
    models = factory.build_models(cfg)
    tx = optim.make_optimizer(stage.optim, stage.steps_per_epoch)
    validate = _Validation(cfg, stage, models, mesh) if stage.val_split else None
    # Leaving the block (also on an error) waits for in-flight asynchronous saves: the last good
    # checkpoint is always complete on disk.
    with checkpoint.Checkpointer(os.path.join(stage.directory, "checkpoints"), max_to_keep=cfg.keep_checkpoints,
                                 best_metric=stage.checkpoint_metric, best_mode=stage.checkpoint_mode) as ckpt:
        state, shardings = start.initial_state(stage, models, tx, mesh, ckpt, loader)
        first_step = int(jax.device_get(state.step))
        step_fn = parallel.jit_train_step(steps.make_train_step(stage, models, tx), shardings, mesh)
        console.say("%s: %s, %d steps/epoch, steps %d..%d, mesh %s", name, "+".join(stage.nets),
                    stage.steps_per_epoch, first_step, stage.total_steps, dict(mesh.shape))
        # Process 0 writes TensorBoard files (through a local directory mirrored to a remote workdir); the
        # others only log. Closing it (also on an error or SIGTERM) copies the last events to a bucket.
        logdir = os.path.join(stage.directory, "tensorboard")
        writer = summaries.open_writer(logdir, just_logging=jax.process_index() != 0)
        log = _Log(writer, name)
        # config.profile_steps: process 0 traces beside its event files (mirrored with them). Closed before
        # the writer, so a trace still running when the loop ends is written and copied.
        profiler = summaries.StepProfiler(summaries.local_logdir(writer, logdir),
                                          cfg.profile_steps if jax.process_index() == 0 else 0, first_step)
        batches = parallel.prefetch_to_device(iter(loader), 2, mesh)
        shares = _gradient_shares(cfg, stage, models)
        progress = console.StageProgress(name, first_step, stage.total_steps, stage.steps_per_epoch)
        images = bool(cfg.image_every_steps) and "iqe" in stage.nets
        ahead = _CompileAhead()
        # Several processes stop at one common step after a SIGTERM to any (JAX's preemption sync point);
        # without the preemption service they compare flags at checkpoint steps (an all-gather every step stalls).
        # The prefetcher's thread stops with the stage (a pipeline's later stages run in the same process), and
        # however the loop ends, it first waits for a compilation still running (no exit under it).
        with contextlib.closing(writer), contextlib.closing(profiler), contextlib.closing(batches), \
                contextlib.closing(ahead), \
                preemption.PreemptionGuard(sync_every_steps=cfg.checkpoint_every_steps) as guard:
            for step in range(first_step + 1, stage.total_steps + 1):
                batch = next(batches)
                if step == first_step + 1:
                    step_fn = _compile(step_fn, state, batch, name)
                    progress.start()
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = step_fn(state, batch)
                if step == first_step + 1:
                    ahead.start(_periodic_programs(cfg, stage, models, mesh, state, batch, images=images,
                                                   validating=validate is not None))
                log.pending.append(metrics)
                profiler(step)
                last = step == stage.total_steps
                if step % cfg.log_every_steps == 0 or last:
                    progress.report(step, log.flush(step))
                    if shares:
                        log.write_shares(step, shares(state, batch))
                if images and (step % cfg.image_every_steps == 0 or last):
                    ahead.wait()
                    grid = inference.enhancement_panels(stage.qt, state, models, _grid_rows(batch))
                    writer.write_images(step, {f"{name}/low_enhanced_reference_vessel": grid})
                stop = guard.should_stop(step)
                validated = {}
                if validate and not stop and validate.due(step, last):
                    ahead.wait()
                    validated = validate(writer, state, step)
                if step % cfg.checkpoint_every_steps == 0 or last or stop or validated:
                    # The prefetcher's position is that of the last batch consumed, not of those queued.
                    ckpt.save(step, state, data_iter=batches, config=saved_config,
                              metrics={**log.flush(step), **validated}, force=last or stop or bool(validated))
                    writer.flush()  # the events on disk (or in the bucket) reach the step a resume starts from
                if stop:
                    logging.warning("%s: SIGTERM received; saved step %d and stopping", name, step)
                    ckpt.wait_until_finished()
                    raise SystemExit(0)
    if not cfg.eval_at_end:
        return {}
    evaluate_state = teacher.evaluate_state if stage.is_teacher else evaluate.evaluate_state
    return evaluate_state(cfg, stage, state, models, mesh)


@dataclasses.dataclass
class _Log:
    """The training metrics of the steps since the last write, kept on device until then."""

    writer: Any
    stage: str
    pending: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)
    last: dict[str, float] = dataclasses.field(default_factory=dict)

    def flush(self, step: int) -> dict[str, float]:
        """Fetch the pending metrics from device once, average, check finiteness, write; returns the
        means (the last written means when nothing is pending)."""
        if not self.pending:
            return self.last
        stacked = jax.device_get(jax.tree.map(lambda *v: jnp.stack(v), *self.pending))
        self.pending = []
        means = {k: float(np.mean(v)) for k, v in stacked.items()}
        bad = {k: v for k, v in means.items() if k.startswith("loss") and not np.isfinite(v)}
        if bad:
            raise NonFiniteLossError(
                f"{self.stage}: non-finite loss at or before step {step}: {bad}. The last good checkpoint is kept; "
                f"lower config.optim.learning_rate or check the data.")
        self.writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
        self.last = means
        return means

    def write_shares(self, step: int, shares: dict[str, jax.Array]) -> None:
        """Stage 3's gradient norms and shares on IQE (`steps.gradient_shares`) to TensorBoard and one line."""
        values = {k: float(v) for k, v in jax.device_get(shares).items()}
        self.writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
        console.say("%s: step %d, share of the gradient on IQE: %s", self.stage, step,
                    ", ".join(f"{k.removeprefix('grad_share_')} {v:.3f}" for k, v in values.items()
                              if k.startswith("grad_share_")))


def _gradient_shares(cfg: ml_collections.ConfigDict, stage: stages.Stage, models: dict):
    """config.log_gradient_shares: stage 3's `steps.gradient_shares`, jitted, when IQE trains; else None."""
    if not cfg.log_gradient_shares or stage.name != "stage3" or "iqe" not in stage.nets or stage.frozen:
        return None
    return jax.jit(steps.gradient_shares(stage, models))


def _grid_rows(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The rows of a training batch the TensorBoard image grid shows."""
    return jax.tree.map(lambda a: a[:4], batch)


def _periodic_programs(cfg: ml_collections.ConfigDict, stage: stages.Stage, models: dict, mesh, state, batch, *,
                       images: bool, validating: bool) -> dict[str, Callable[[], None]]:
    """What `_CompileAhead` compiles for the loop's periodic work: validation's evaluation and the image
    grid, for states shaped and laid out as ``state`` (a step's output; only its shapes are read)."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding, weak_type=a.weak_type),
                          state)
    programs: dict[str, Callable[[], None]] = {}
    if validating:
        programs["validation"] = functools.partial(evaluate.compile_ahead, cfg, stage, shapes, models, mesh,
                                                   stage.val_split)
    if images:
        programs["the image grid"] = functools.partial(inference.compile_enhancement_panels, stage.qt, shapes,
                                                       models, _grid_rows(batch))
    return programs


class _CompileAhead:
    """The loop's periodic programs (validation's evaluation, the image grid) compiled in a background
    thread while the steps run. Compiled at their first call instead, each would stop training for as
    long as compiling takes (on a 2-core CPU, 5 to 20 s each at the demo's size); compiled ahead, the
    call finds them in jax's in-memory caches. The loop calls `wait` before each periodic call, so no
    program is compiled twice, and `close` when it ends. A failure is logged and leaves the compilation
    to the call, as without this. Nothing here runs a program: a background thread launching
    computations on a mesh spanning processes could interleave its collectives with the steps'."""

    def __init__(self):
        self._thread: threading.Thread | None = None

    def start(self, programs: dict[str, Callable[[], None]]) -> None:
        """Compile ``programs`` (name: a function compiling it) one after the other in a background thread."""
        self.wait()
        if programs:
            self._thread = threading.Thread(target=self._compile, args=(programs,), name="compile-ahead", daemon=True)
            self._thread.start()

    @staticmethod
    def _compile(programs: dict[str, Callable[[], None]]) -> None:
        for what, compile_program in programs.items():
            try:
                compile_program()
            except Exception as error:  # noqa: BLE001  (the first call compiles it, as without this)
                logging.warning("compiling %s ahead of its first call failed; it compiles when called: %s",
                                what, error)

    def wait(self) -> None:
        """Returns once every program is compiled (or failed to)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    close = wait


def _compile(step_fn, state, batch, stage: str):
    """Compile the step before the first step and line the processes up after it: collectives time out
    when one process (e.g. with a warm compilation cache) reaches step 1 long before the others."""
    t0 = time.time()
    compiled = step_fn.lower(state, batch).compile()
    console.say("%s: step compiled in %.1f s", stage, time.time() - t0)
    parallel.barrier(f"{stage}-compiled")
    return compiled


class _Validation:
    """Every config.eval_every_epochs epochs and at the last step: the stage's evaluation on its val
    split, its headline metrics (`evaluate.validation_metrics`) to TensorBoard (val/...) and the console,
    returned for the checkpoint saved at that step, which they rank."""

    def __init__(self, cfg: ml_collections.ConfigDict, stage: stages.Stage, models: dict, mesh):
        self.cfg, self.stage, self.models, self.mesh = cfg, stage, models, mesh
        self.every = int(cfg.eval_every_epochs) * stage.steps_per_epoch

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def __call__(self, writer, state, step: int) -> dict[str, float]:
        s = self.stage
        out = evaluate.collect(self.cfg, s, state, self.models, self.mesh, s.val_split, show_progress=False)
        values = evaluate.validation_metrics(evaluate.summarise(out))
        writer.write_scalars(step, {f"val/{k.removeprefix('val_')}": v for k, v in values.items()})
        console.say("%s validation (%s, %d images) at epoch %.3g: %s", s.name, s.val_split, len(out["quality"]),
                    step / s.steps_per_epoch, " ".join(f"{k.removeprefix('val_')}={v:.4g}" for k, v in values.items()))
        return values
