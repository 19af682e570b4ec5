"""Trained runs loaded read-only for inference: `load_checkpoint` (any stage's subnetworks, for
evaluation, predict and the pictures) and `restore_teacher` (the vessel teacher, for the mask pass).
Each reads the config the run was saved with, builds its models and restores their variables onto a
mesh; the orbax reads themselves are `runtime.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import ml_collections

from cleaq_jax import config_checks, errors
from cleaq_jax.models import factory
from cleaq_jax.runtime import checkpoint, parallel


@dataclasses.dataclass
class Restored:
    """A checkpoint ready for inference: the trained config, the stage that trained it, its subnetworks
    (a tuple of "iqe", "iqa", "dr"), the linen modules, and their variables on the given mesh."""

    config: ml_collections.ConfigDict
    stage: str
    nets: tuple[str, ...]
    models: dict
    state: factory.InferenceState
    directory: str
    step: int
    chosen: str = ""  # why this step: "best by val_dr_kappa = 0.41", "latest", ...


def _stage_of(cfg: ml_collections.ConfigDict, directory: str, nets: tuple[str, ...]) -> str:
    """The stage that wrote the checkpoint: its config's stage, else its stage directory's name."""
    if cfg.stage in config_checks.TRAINING_STAGES:
        return cfg.stage
    name = os.path.basename(os.path.dirname(directory.rstrip(os.sep)))
    if name in config_checks.TRAINING_STAGES:
        return name
    # Neither names it: IQA alone is stage 2, DR without IQE stage 1, IQE with others the joint stage.
    return "stage2" if nets == ("iqa",) else "stage1" if "iqe" not in nets else "stage3"


def load_checkpoint(path: str, mesh: jax.sharding.Mesh | None = None, step: int | str = "best") -> Restored:
    """Restore the parameters and BatchNorm statistics of a stage checkpoint for inference.

    path: a stage directory (<workdir>/stage3) or its checkpoints/ folder, saved on any number of
        devices; mesh: where to put the variables (default: every present device, replicated);
    step: "best" (default; see `select_step`), "latest" or a step number. Optimizer state is not read.
    Raises FileNotFoundError / ValueError naming the directory when it holds no cleaq_jax checkpoint.
    """
    directory = checkpoint.checkpoint_directory(path)
    step, chosen = checkpoint.select_step(directory, step)
    cfg = checkpoint.read_trained_config(directory, step)
    mesh = parallel.make_mesh(-1, 1) if mesh is None else mesh
    models = factory.build_models(cfg)
    nets = tuple(n for n in checkpoint.saved_nets(directory, step) if n != "cenet")
    if not nets:
        raise errors.CheckpointError(f"checkpoint {directory}/{step} holds none of the subnetworks iqe, iqa, dr")
    target = factory.abstract_variables(models, nets, int(cfg.data.image_size), mesh)
    state = checkpoint.restore_variables(directory, target, step)
    return Restored(cfg, _stage_of(cfg, directory, nets), nets, models, state, directory, int(step), chosen)


@dataclasses.dataclass
class Teacher:
    """A restored vessel teacher: its training config, CE-Net module and variables (on ``mesh``)."""

    config: ml_collections.ConfigDict
    model: nn.Module
    variables: dict
    mesh: jax.sharding.Mesh
    directory: str
    step: int

    @property
    def image_size(self) -> int:
        """The side the teacher was trained at (inputs are resized to it)."""
        return int(self.config.data.image_size)


def restore_teacher(path: str, mesh: jax.sharding.Mesh | None = None, step: int | None = None) -> Teacher:
    """Restore a teacher_a / teacher_b checkpoint (saved on any device count) onto ``mesh``.

    path: the stage directory (<workdir>/teacher_b) or its checkpoints/ folder; mesh: default every
    local device on the data axis; step: default the latest. Raises FileNotFoundError / ValueError
    naming the directory when it holds no vessel teacher.
    """
    directory = checkpoint.checkpoint_directory(path)
    cfg = checkpoint.read_trained_config(directory, step)
    if cfg.stage not in config_checks.TEACHER_STAGES:
        raise errors.CheckpointError(
            f"{directory} holds a {cfg.stage!r} checkpoint, not a vessel teacher's: pass "
            "<workdir>/teacher_b written by `python -m cleaq_jax.main --config=configs/vessel_teacher.py`")
    mesh = parallel.make_mesh(-1, 1, devices=jax.local_devices()) if mesh is None else mesh
    models = factory.build_models(cfg)
    step, _ = checkpoint.select_step(directory, "latest" if step is None else step)
    target = factory.abstract_variables(models, ("cenet",), int(cfg.data.image_size), mesh)
    restored = checkpoint.restore_variables(directory, target, step)
    return Teacher(cfg, models["cenet"], factory.variables(restored, "cenet"), mesh, directory, step)
