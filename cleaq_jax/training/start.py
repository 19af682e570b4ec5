"""How a stage's training starts: from its own latest checkpoint (resume), else from a fresh state
with ImageNet trunks grafted in (config.pretrained) and, for stage 3 and teacher_b, the subnetworks
the earlier stages trained (config.init). Every state comes from the builder in `train_state`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from cleaq_jax.models import factory, pretrained
from cleaq_jax.runtime import checkpoint, console
from cleaq_jax.training import optim, stages
from cleaq_jax.training import state as ts

# config.pretrained key -> the ResNet trunks it initialises: (subnetwork, module path inside it).
IMAGENET_TARGETS = {
    "dr": (("dr", "backbone"),),
    "c_iqa": (("iqa", "c_iqa"),),
    "resnet34": (("iqe", "seg_iqe/encoder"), ("iqa", "lqi_iqa/encoder"), ("cenet", "encoder")),
}
# A stage that starts from earlier stages' checkpoints: (source stage, config that trains it).
INIT_FROM = {
    "stage3": (("stage1", "configs/stage1.py"), ("stage2", "configs/stage2.py")),
    "teacher_b": (("teacher_a", "configs/vessel_teacher.py"),),
}


def stage_dir(workdir: str, stage: str) -> str:
    """Where a stage writes: ``<workdir>/<stage>`` (checkpoints/, tensorboard/, eval/)."""
    return os.path.join(workdir, stage)


def initial_state(cfg: ml_collections.ConfigDict, workdir: str, stage: str, models: dict, nets: tuple[str, ...],
                  tx: optim.Optimizer, mesh: jax.sharding.Mesh, ckpt: checkpoint.Checkpointer,
                  loader: Any) -> tuple[ts.TrainState, Any]:
    """The state a stage's loop starts from, on ``mesh``, and its shardings.

    Resumes from ``ckpt``'s latest step when there is one (moving ``loader``, a grain iterator, to its
    saved position); otherwise takes the subnetworks the earlier stages trained (config.init) as they
    are, initialises the others from the stage's seed (`stages.stage_seed`) and grafts the ImageNet
    trunks into those.
    """
    key = jax.random.key(stages.stage_seed(cfg, stage))
    if ckpt.latest_step() is not None:
        target, shardings = ts.abstract_state(lambda k: ts.init_state(cfg, models, nets, tx, k), mesh, key)
        state, step = ckpt.restore_intact(target, data_iter=loader)
        console.say("%s: resumed from step %d", stage, step)
        return state, shardings
    given = earlier_stages(cfg, workdir, stage, models, nets, mesh)
    init = lambda k, g: ts.init_state(cfg, models, nets, tx, k, given=g)  # noqa: E731
    state, shardings = ts.sharded_state(init, mesh, key, given)
    return graft_imagenet(cfg, state, skip=tuple(given)), shardings


def graft_imagenet(cfg: ml_collections.ConfigDict, state: ts.TrainState, skip: tuple[str, ...] = ()) -> ts.TrainState:
    """Put torchvision ImageNet weights (converted by `python -m cleaq_jax.programs.import_weights`) into the
    ResNet trunks that config.pretrained names, before any training; ``skip``: subnetworks that came
    trained from an earlier stage and keep their weights."""
    params, batch_stats = dict(state.params), dict(state.batch_stats)
    for key, targets in IMAGENET_TARGETS.items():
        directory = cfg.pretrained.get(key, "")
        if not directory:
            continue
        weights = pretrained.load(directory)
        for net, path in targets:
            if net in params and net not in skip:
                merged = pretrained.graft({"params": params[net], "batch_stats": batch_stats[net]}, weights, into=path)
                params[net], batch_stats[net] = merged["params"], merged["batch_stats"]
                console.say("%s/%s initialised from ImageNet weights in %s", net, path, directory)
    return state.replace(params=params, batch_stats=batch_stats)


def earlier_stages(cfg: ml_collections.ConfigDict, workdir: str, stage: str, models: dict,
                   nets: tuple[str, ...], mesh: jax.sharding.Mesh) -> dict[str, ts.Variables]:
    """Stage 3 starts from the stage-1 (IQE, DR) and stage-2 (IQA) checkpoints named by config.init
    (default ``<workdir>/stage1``, ``<workdir>/stage2``); the teacher's fine-tuning (teacher_b) from
    teacher_a. Returns {subnetwork: its variables}, laid out on ``mesh`` as a train state's; only
    those subnetworks' parameters and BatchNorm statistics are read."""
    given: dict[str, ts.Variables] = {}
    for source, config_name in INIT_FROM.get(stage, ()):
        wanted = tuple(n for n in _trained_nets(cfg, source) if n in nets)
        if not wanted:
            continue
        directory = os.path.join(cfg.init.get(source, "") or stage_dir(workdir, source), "checkpoints")
        target = factory.abstract_variables(models, wanted, int(cfg.data.image_size), mesh)
        try:
            restored = checkpoint.restore_variables(directory, target)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{stage} starts from {source}'s checkpoint, but {directory} holds none (config.init.{source}). "
                f"Run `python -m cleaq_jax.main --config={config_name} --workdir={workdir}` first, with the "
                f"same model and data settings.") from e
        for n in wanted:
            given[n] = {"params": restored.params[n], "batch_stats": restored.batch_stats[n]}
        console.say("%s: %s initialised from %s", stage, "+".join(wanted), directory)
    return given


def _trained_nets(cfg: ml_collections.ConfigDict, stage: str) -> tuple[str, ...]:
    try:
        return stages.stage_nets(cfg, stage)
    except ValueError:
        return ()
