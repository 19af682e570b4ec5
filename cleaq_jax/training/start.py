"""How a stage's training starts: from its own latest checkpoint (resume), else from a fresh state with
ImageNet trunks grafted in (config.pretrained) and, for stage 3 and teacher_b, the subnetworks the
earlier stages trained (config.init). Every state comes from the builder in `training.state`.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from cleaq_jax import errors
from cleaq_jax.models import factory, pretrained
from cleaq_jax.runtime import checkpoint, console
from cleaq_jax.training import optim, stages
from cleaq_jax.training import state as ts


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


def earlier_stages(stage: stages.Stage, models: dict, mesh: jax.sharding.Mesh) -> dict[str, factory.Variables]:
    """Stage 3 starts from the stage-1 (IQE, DR) and stage-2 (IQA) checkpoints, teacher_b from teacher_a's
    (``stage.init_from``: (source stage, its nets, its stage directory)). Returns {subnetwork: its
    variables}, laid out on ``mesh`` as a train state's; only those subnetworks' parameters and
    BatchNorm statistics are read."""
    given: dict[str, factory.Variables] = {}
    for source, nets, source_dir in stage.init_from:
        wanted = tuple(n for n in nets if n in stage.nets)
        if not wanted:
            continue
        directory = os.path.join(source_dir, "checkpoints")
        target = factory.abstract_variables(models, wanted, stage.image_size, mesh)
        try:
            restored = checkpoint.restore_variables(directory, target)
        except FileNotFoundError as e:
            config_name = dict(stages.INIT_FROM[stage.name])[source]
            raise errors.MissingError(
                f"{stage.name} starts from {source}'s checkpoint, but {directory} holds none (config.init.{source}). "
                f"Run `python -m cleaq_jax.main --config={config_name} --workdir={os.path.dirname(stage.directory)}` first, with the "
                f"same model and data settings.") from e
        for n in wanted:
            given[n] = factory.variables(restored, n)
        console.say("%s: %s initialised from %s", stage.name, "+".join(wanted), directory)
    return given
