"""What a config builds: the subnetworks, their compute dtype, the stages and the subnetworks each
trains, and the quality-transform settings. The only reader of config.model and config.tasks.

Stages (paper III-A, IV-B): stage1 (IQE and, independently, DR), stage2 (IQA), stage3 (joint), and
the vessel teacher's teacher_a / teacher_b (CE-Net, paper III-C).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from cleaq_jax.data import degrade
from cleaq_jax.models import cenet as cenet_lib
from cleaq_jax.models import dr as dr_lib
from cleaq_jax.models import iqa as iqa_lib
from cleaq_jax.models import iqe as iqe_lib
from cleaq_jax.models import layers

STAGES = ("stage1", "stage2", "stage3", "teacher_a", "teacher_b")
TEACHER_STAGES = ("teacher_a", "teacher_b")
TASK_ORDER = ("dr", "iqe", "iqa")


def check_choice(value: Any, allowed: tuple[str, ...], key: str) -> None:
    """Raise ValueError naming config.<key> when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"config.{key}={value!r} is not one of {allowed}")


def compute_dtype(cfg: ml_collections.ConfigDict) -> Any:
    """jnp.float32 or jnp.bfloat16, from config.model.dtype."""
    check_choice(cfg.model.dtype, ("float32", "bfloat16"), "model.dtype")
    return jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32


def build_models(cfg: ml_collections.ConfigDict) -> dict[str, nn.Module]:
    """The subnetworks {"iqe", "iqa", "dr", "cenet"} as linen modules, from config.model (the only
    place it is read)."""
    m = cfg.model
    forms = layers.LayerForms(upsample=m.upsample, upsample_init=m.upsample_init, stem_pool=m.stem_pool,
                              scan_blocks=bool(m.scan_blocks))
    common = dict(width=float(m.width), dtype=compute_dtype(cfg), remat=bool(m.remat), forms=forms)
    return {
        "iqe": iqe_lib.IQE(use_seg=bool(m.use_seg), encoder_stages=tuple(m.encoder_stages),
                           blocks_per_level=int(m.uiqe_blocks), uiqe_width=float(m.uiqe_width) or None,
                           residual=bool(m.uiqe_residual), **common),
        "iqa": iqa_lib.IQA(use_lqi=bool(m.use_lqi), num_classes=3, encoder_stages=tuple(m.encoder_stages),
                           classifier_stages=tuple(m.classifier_stages), **common),
        "dr": dr_lib.DRGrader(num_grades=int(cfg.data.num_grades), stage_sizes=tuple(m.classifier_stages),
                              **common),
        "cenet": cenet_lib.CENet(stage_sizes=tuple(m.encoder_stages), **common),
    }


def stage_nets(cfg: ml_collections.ConfigDict, stage: str) -> tuple[str, ...]:
    """The subnetworks a stage trains, in a fixed order, after the config's task switches."""
    check_choice(stage, STAGES, "stage")
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
    check_choice(stage, STAGES, "stage")
    return int(np.random.SeedSequence([int(cfg.seed), STAGES.index(stage)]).generate_state(1)[0] >> 1)


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
    """The quality transform of config.qt, checked against config.data.image_size (hashable: a static
    argument of the jitted steps)."""
    return degrade.QTParams.from_config(cfg.qt, image_size=int(cfg.data.image_size))
