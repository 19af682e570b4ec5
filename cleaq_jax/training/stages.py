"""A training stage described once: `Stage`, derived from the checked config and handed down.

Stages (paper III-A, IV-B): stage1 (IQE and, independently, DR), stage2 (IQA), stage3 (joint), and
the vessel teacher's teacher_a / teacher_b (CE-Net, paper III-C). A `Stage` holds everything below the
stage runner needs: its subnetworks and weighted tasks, seed, quality transform, loss and optimiser
settings, data location and steps per epoch, validation split, where it starts from and how its
checkpoints are ranked. Nothing below `programs/train.py` reads the config again.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from cleaq_jax import errors
from cleaq_jax.config_checks import TEACHER_STAGES, TRAINING_STAGES
from cleaq_jax.data import degrade, loading

if TYPE_CHECKING:  # only named: a stage built directly needs no config system
    import ml_collections

TASK_ORDER = ("dr", "iqe", "iqa")
JOINT_NETS = ("iqe", "iqa", "dr")  # stage 3's subnetworks, each of which may get its own learning rate
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


def stage_nets(cfg: ml_collections.ConfigDict, stage: str) -> tuple[str, ...]:
    """The subnetworks a stage trains, in a fixed order, after the config's task switches (stage 3 of the
    control tasks.joint_iqe="off" trains DR alone; "frozen" keeps IQE, held fixed: `Stage.frozen`)."""
    t = cfg.tasks
    if stage in TEACHER_STAGES:
        return ("cenet",)
    if stage == "stage1":
        nets = tuple(n for n in ("iqe", "dr") if t[n])
    elif stage == "stage2":
        nets = ("iqa",) if t.iqa else ()
    elif t.joint_iqe == "off":
        nets = ("dr",) if t.dr else ()
    else:
        if not t.iqe:
            raise errors.ConfigError("config.tasks.iqe=False: stage 3 trains IQE jointly with IQA and/or DR; "
                                     "for a DR-only model run stage1 with tasks.iqe=False")
        nets = tuple(n for n in JOINT_NETS if t[n])
    if not nets:
        raise errors.ConfigError(f"config.tasks switches off every subnetwork that {stage} trains")
    return nets


def stage_seed(cfg: ml_collections.ConfigDict, stage: str) -> int:
    """config.seed with the stage folded in (a 31-bit int): each stage draws its own initialisation,
    loader order, augmentation and QT keys, so stage 3's step k does not replay stage 1's step k."""
    return int(np.random.SeedSequence([int(cfg.seed), TRAINING_STAGES.index(stage)]).generate_state(1)[0] >> 1)


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
    jitted steps and evaluation functions)."""
    return degrade.QTParams.from_config(cfg.qt, image_size=int(cfg.data.image_size))


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """config.loss, read once (hashable)."""

    qe: str  # L_QE: "l2" (eq. 6) or "l1"
    seg: str  # L_Seg: "dice" (eq. 5) or "bce"
    lqi: str  # L_LQI: "l2" (eq. 9) or "l1"
    lambda_seg: float
    lambda_lqi: float
    weighting: str  # "lbtw" or "fixed"
    alpha: float
    lbtw_reset: str  # "epoch" or "once"
    fixed: tuple[tuple[str, float], ...]  # (task, weight) in TASK_ORDER, for weighting="fixed"
    grl_scale: float
    grl_schedule: str  # "constant" or "ganin"
    usable_self_reference: bool
    qe_targets: str  # "paper": L_QE on good images only; "all": also wherever a record stores a clean reference
    iqe_guidance: str  # "reverse" or "to_good"
    guidance_weight: float
    qt_good_fraction: float

    @classmethod
    def from_config(cls, loss: ml_collections.ConfigDict) -> LossSettings:
        return cls(qe=loss.qe, seg=loss.seg, lqi=loss.lqi, lambda_seg=float(loss.lambda_seg),
                   lambda_lqi=float(loss.lambda_lqi), weighting=loss.weighting, alpha=float(loss.alpha),
                   lbtw_reset=loss.lbtw_reset, fixed=tuple((k, float(loss.fixed[k])) for k in TASK_ORDER),
                   grl_scale=float(loss.grl_scale), grl_schedule=loss.grl_schedule,
                   usable_self_reference=bool(loss.usable_self_reference), qe_targets=str(loss.qe_targets),
                   iqe_guidance=loss.iqe_guidance,
                   guidance_weight=float(loss.guidance_weight), qt_good_fraction=float(loss.qt_good_fraction))


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """config.optim for one stage (paper IV-B): Adam, each subnetwork's starting rate, the schedule."""

    rates: tuple[tuple[str, float], ...]  # (subnetwork, starting learning rate)
    per_net: bool  # one Adam per subnetwork (stage 3 with a rate of its own for one of them)
    constant_epochs: int
    num_epochs: int
    power: float
    b1: float
    b2: float

    def rate(self, net: str) -> float:
        """Subnetwork ``net``'s starting learning rate."""
        return dict(self.rates)[net]

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, stage: str, nets: tuple[str, ...]) -> OptimSettings:
        """Stage 3 starts ``net`` at optim.joint_net_learning_rate.<net>, else optim.joint_learning_rate,
        whichever is first above 0; every other stage (and the fallback) at optim.learning_rate."""
        o = cfg.optim
        joint = stage == "stage3"

        def rate(net: str) -> float:
            candidates = (float(o.joint_net_learning_rate[net]), float(o.joint_learning_rate)) if joint else ()
            return next((r for r in candidates if r > 0), float(o.learning_rate))

        per_net = joint and any(float(o.joint_net_learning_rate[n]) > 0 for n in JOINT_NETS)
        return cls(rates=tuple((n, rate(n)) for n in nets), per_net=per_net,
                   constant_epochs=int(o.constant_epochs), num_epochs=int(cfg.num_epochs), power=float(o.power),
                   b1=float(o.b1), b2=float(o.b2))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: everything its start, step, loop and evaluation need, derived once.

    ``init_from``: (source stage, the subnetworks it trained, its stage directory) of the checkpoints it
    starts from (stage 3 and teacher_b), ``init_step`` which of each source's checkpoints; ``pretrained``: (config.pretrained key, converted ImageNet weights directory) of the
    trunks to graft into a fresh state; ``checkpoint_metric`` / ``checkpoint_mode``: what ranks its
    checkpoints (config.checkpoint_metric with "auto" resolved).
    """

    name: str
    nets: tuple[str, ...]
    seed: int
    image_size: int
    batch_size: int
    num_epochs: int
    qt: degrade.QTParams
    loss: LossSettings
    optim: OptimSettings
    train_split: str
    sampling: loading.EpochSampling  # the loader's epoch plan and augmentation, seeded by the stage
    reading: loading.RecordReading
    steps_per_epoch: int = 0
    directory: str = ""
    data_dir: str = ""
    val_split: str | None = None
    init_from: tuple[tuple[str, tuple[str, ...], str], ...] = ()
    init_step: str = "best"  # which of their checkpoints: "best", "latest" or a step (config.init.checkpoint_step)
    pretrained: tuple[tuple[str, str], ...] = ()
    checkpoint_metric: str = "loss"
    checkpoint_mode: str = "min"
    frozen: tuple[str, ...] = ()  # subnetworks the stage runs but holds fixed (config.tasks.joint_iqe="frozen")

    @property
    def tasks(self) -> tuple[str, ...]:
        """The weighted tasks (eq. 11): one per trained subnetwork, in TASK_ORDER (none for the vessel
        teacher, whose single loss needs no weighting)."""
        return tuple(t for t in TASK_ORDER if t in self.nets)

    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.steps_per_epoch

    @property
    def is_teacher(self) -> bool:
        return self.name in TEACHER_STAGES

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, name: str, **where) -> Stage:
        """The stage ``name`` of a checked config. ``where``: the fields that need the file system
        (steps_per_epoch, directory, data_dir, val_split, init_from, checkpoint_metric, checkpoint_mode),
        resolved by the stage runner; without them the stage describes its networks, losses and step."""
        nets, seed, d = stage_nets(cfg, name), stage_seed(cfg, name), cfg.data
        return cls(name=name, nets=nets, seed=seed, image_size=int(d.image_size), batch_size=int(cfg.batch_size),
                   num_epochs=int(cfg.num_epochs), qt=qt_params(cfg), loss=LossSettings.from_config(cfg.loss),
                   optim=OptimSettings.from_config(cfg, name, nets), train_split=str(d.train_split),
                   sampling=loading.EpochSampling(seed, float(d.class_balance), str(d.balance_by), bool(d.augment)),
                   reading=loading.RecordReading(image_size=int(d.image_size), worker_count=int(d.worker_count)),
                   pretrained=tuple((k, str(v)) for k, v in cfg.pretrained.items() if v),
                   init_step=str(cfg.init.get("checkpoint_step", "best")),
                   frozen=("iqe",) if name == "stage3" and cfg.tasks.joint_iqe == "frozen" else (), **where)
