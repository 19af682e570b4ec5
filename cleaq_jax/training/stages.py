"""Which subnetworks a stage trains, its seed and its weighted tasks, and the stages a full run goes
through (paper III-A, IV-B): stage1 (IQE and, independently, DR), stage2 (IQA), stage3 (joint), and
the vessel teacher's teacher_a / teacher_b (CE-Net, paper III-C).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from cleaq_jax.config_checks import TEACHER_STAGES, TRAINING_STAGES
from cleaq_jax.data import degrade

TASK_ORDER = ("dr", "iqe", "iqa")


def stage_nets(cfg: ml_collections.ConfigDict, stage: str) -> tuple[str, ...]:
    """The subnetworks a stage trains, in a fixed order, after the config's task switches."""
    t = cfg.tasks
    if stage in TEACHER_STAGES:
        return ("cenet",)
    if stage == "stage1":
        nets = tuple(n for n in ("iqe", "dr") if t[n])
    elif stage == "stage2":
        nets = ("iqa",) if t.iqa else ()
    else:
        if not t.iqe:
            raise ValueError("config.tasks.iqe=False: stage 3 trains IQE jointly with IQA and/or DR; "
                             "for a DR-only model run stage1 with tasks.iqe=False")
        nets = tuple(n for n in ("iqe", "iqa", "dr") if t[n])
    if not nets:
        raise ValueError(f"config.tasks switches off every subnetwork that {stage} trains")
    return nets


def stage_seed(cfg: ml_collections.ConfigDict, stage: str) -> int:
    """config.seed with the stage folded in (a 31-bit int): each stage draws its own initialisation,
    loader order, augmentation and QT keys, so stage 3's step k does not replay stage 1's step k."""
    return int(np.random.SeedSequence([int(cfg.seed), TRAINING_STAGES.index(stage)]).generate_state(1)[0] >> 1)


def stage_tasks(nets: tuple[str, ...]) -> tuple[str, ...]:
    """The weighted tasks of a stage (eq. 11): one per trained subnetwork, in TASK_ORDER (none for the
    vessel teacher, whose single loss needs no weighting)."""
    return tuple(t for t in TASK_ORDER if t in nets)


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


def qt_params(cfg: ml_collections.ConfigDict) -> degrade.QTParams:
    """The quality transform of config.qt at config.data.image_size (hashable: a static argument of the
    jitted steps)."""
    return degrade.QTParams.from_config(cfg.qt, image_size=int(cfg.data.image_size))
