"""How a stage's training starts: from its own latest checkpoint (resume), else from a fresh state with
ImageNet trunks grafted in (config.pretrained) and, for stage 3 and teacher_b, the subnetworks the
earlier stages trained (config.init: their best checkpoints by default). Every state comes from the
builder in `training.state`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from cleaq_jax import errors
from cleaq_jax.models import factory, pretrained
from cleaq_jax.runtime import checkpoint, console, storage
from cleaq_jax.training import optim, stages
from cleaq_jax.training import state as ts

# Beside a stage's checkpoints: the earlier stages' checkpoints it started from, which step and why.
INIT_RECORD = "init.json"


def initial_state(stage: stages.Stage, models: dict, tx: optim.Optimizer, mesh: jax.sharding.Mesh,
                  ckpt: checkpoint.Checkpointer, loader: Any) -> tuple[ts.TrainState, Any]:
    """The state a stage's loop starts from, on ``mesh``, and its shardings.

    Resumes from ``ckpt``'s latest step when there is one (moving ``loader``, a grain iterator, to its
    saved position); otherwise takes the subnetworks the earlier stages trained (``stage.init_from``) as
    they are, initialises the others from the stage's seed and grafts the ImageNet trunks into those.
    """
    key = jax.random.key(stage.seed)
    if ckpt.latest_step() is not None:
        target, shardings = ts.abstract_state(lambda k: ts.init_state(stage, models, tx, k), mesh, key)
        state, step = ckpt.restore_intact(target, data_iter=loader)
        console.say("%s: resumed from step %d", stage.name, step)
        return state, shardings
    given = earlier_stages(stage, models, mesh)
    init = lambda k, g: ts.init_state(stage, models, tx, k, given=g)  # noqa: E731
    state, shardings = ts.sharded_state(init, mesh, key, given)
    return graft_imagenet(stage, state, skip=tuple(given)), shardings


def graft_imagenet(stage: stages.Stage, state: ts.TrainState, skip: tuple[str, ...] = ()) -> ts.TrainState:
    """Put torchvision ImageNet weights (converted by `python -m cleaq_jax.programs.import_weights`) into
    the ResNet trunks ``stage.pretrained`` names, before any training; ``skip``: subnetworks that came
    trained from an earlier stage and keep their weights."""
    params, batch_stats = dict(state.params), dict(state.batch_stats)
    for key, directory in stage.pretrained:
        weights = pretrained.load(directory)
        for net, path in stages.IMAGENET_TARGETS[key]:
            if net in params and net not in skip:
                merged = pretrained.graft({"params": params[net], "batch_stats": batch_stats[net]}, weights, into=path)
                params[net], batch_stats[net] = merged["params"], merged["batch_stats"]
                console.say("%s/%s initialised from ImageNet weights in %s", net, path, directory)
    return state.replace(params=params, batch_stats=batch_stats)


def _chosen_step(directory: str, source: str, which: str) -> tuple[int, str]:
    """`checkpoint.select_step`, except that "best" means best by validation: a source stage that was not
    validated ranks its checkpoints by a training metric, which says nothing of how well it generalises, so
    its latest checkpoint is taken."""
    if which == "best":
        metric = str(checkpoint.read_trained_config(directory).checkpoint_metric)
        if not metric.startswith("val_"):
            return checkpoint.select_step(directory, "latest")[0], f"latest: {source} was not validated (ranked by {metric})"
    return checkpoint.select_step(directory, which)


def earlier_stages(stage: stages.Stage, models: dict, mesh: jax.sharding.Mesh) -> dict[str, factory.Variables]:
    """Stage 3 starts from the stage-1 (IQE, DR) and stage-2 (IQA) checkpoints, teacher_b from teacher_a's
    (``stage.init_from``: (source stage, its nets, its stage directory)): by default the one each
    source's validation ranked best, the latest where it was not validated (``stage.init_step``,
    config.init.checkpoint_step, as `checkpoint.select_step` reads it). Says in one line per source
    which step and why, and records them in ``<stage dir>/init.json`` (`INIT_RECORD`). Returns
    {subnetwork: its variables}, laid out on ``mesh`` as a train state's; only those subnetworks'
    parameters and BatchNorm statistics are read, after their shapes are checked against the models'."""
    given: dict[str, factory.Variables] = {}
    record: dict[str, Any] = {}
    for source, nets, source_dir in stage.init_from:
        wanted = tuple(n for n in nets if n in stage.nets)
        if not wanted:
            continue
        directory = os.path.join(source_dir, "checkpoints")
        kept = checkpoint.saved_steps(directory)
        if not kept:
            config_name = dict(stages.INIT_FROM[stage.name])[source]
            raise errors.MissingError(
                f"{stage.name} starts from {source}'s checkpoint, but {directory} holds none (config.init.{source}). "
                f"Run `python -m cleaq_jax.main --config={config_name} --workdir={os.path.dirname(stage.directory)}` first, with the "
                f"same model and data settings.")
        try:
            step, why = _chosen_step(directory, source, stage.init_step)
        except FileNotFoundError as e:  # a step not kept, or a checkpoint without the config that ranks it
            raise FileNotFoundError(f"{stage.name}: config.init.checkpoint_step={stage.init_step!r}: {e}") from e
        target = factory.abstract_variables(models, wanted, stage.image_size, mesh)
        try:
            restored = checkpoint.restore_variables(directory, target, step)
        except checkpoint.CheckpointMismatchError as e:
            raise checkpoint.CheckpointMismatchError(
                f"{stage.name} cannot start from {source} (config.init.{source}): {e}") from e
        for n in wanted:
            given[n] = factory.variables(restored, n)
        console.say("%s: %s from %s step %d of %d kept (%s) in %s", stage.name, "+".join(wanted), source, step,
                    len(kept), why, directory)
        record[source] = {"directory": directory, "step": step, "why": why, "kept": kept, "nets": list(wanted),
                          "checkpoint_step": stage.init_step}
    if record and jax.process_index() == 0:
        storage.makedirs(stage.directory)
        storage.atomic_file(os.path.join(stage.directory, INIT_RECORD), json.dumps(record, indent=2) + "\n")
    return given
