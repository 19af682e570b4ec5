"""The study plan: which variants and seeds, each run's config flags, directory, evaluated stage and command,
and which variants the tables compare.

A run is a dict: variant, seed, dir (``<workdir>/<variant>/seed<k>``), stage (the one whose evaluation
holds the variant's results), pretrained (the variant whose run directory holds this run's stage-1/2
checkpoints), command (argv) and, for a run that starts from another
run's pre-training, after (that run's directory).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from cleaq_jax import configs as shipped_configs, errors
from cleaq_jax.configs.ablations import presets
from cleaq_jax.training import stages

# The paper's names for the variants, in the order the tables list them.
VARIANTS = {"dr_only": "DR grading", "iqe_only": "IQE", "iqe_no_seg": "IQE w/o Seg-IQE", "iqa_only": "IQA",
            "iqa_no_lqi": "IQA w/o LQI-IQA", "cleaq": "CLEAQ", "cleq_dr": "CLEQ-DR", "cleaq_dr": "CLEAQ-DR",
            "cleaq_dr_to_good": "CLEAQ-DR to_good", "dr_only_x2": "DR grading, 2x epochs",
            "dr_qt": "DR alone, QT and stage-3 schedule", "dr_frozen_iqe": "DR on a frozen stage-1 IQE"}
# Variants trained for a multiple of the study's epochs (num_epochs and optim.constant_epochs): DR alone as long
# as a joint variant's DR trains in stages 1 and 3 together, so that "joint beats DR alone" is not "more epochs".
EPOCHS_FACTOR = {"dr_only_x2": 2}
# Joint variants whose stage 3 starts from another variant's stage-1 and stage-2 checkpoints of the same
# seed when both are in the study (unless --separate-pretraining): their stages 1 and 2 would train the same
# networks alone on the same data again, and sharing them pairs the comparison of what stage 3 adds.
SHARED_PRETRAINING = {"cleaq": "cleaq_dr", "cleq_dr": "cleaq_dr", "cleaq_dr_to_good": "cleaq_dr",
                      "dr_qt": "cleaq_dr", "dr_frozen_iqe": "cleaq_dr"}
# DR alone: the baseline every variant's DR kappa is compared with.
BASELINE = "dr_only"
# Further baselines every variant is paired with when they are in the study.
BASELINES = (BASELINE, "dr_only_x2")
# Paired DR-kappa differences the claim is about (besides each variant against DR alone and its own stage 1).
PAIRS = (("cleaq_dr", "cleq_dr"), ("cleaq_dr_to_good", "cleq_dr"), ("cleaq_dr_to_good", "cleaq_dr"))

# The pre-declared test of the paper's claim, fixed before the runs: each (a, b) is "a minus b, paired by
# seed", judged by `statistics.paired_interval`'s rule. dr_qt (DR alone in stage 3 on QT-degraded images, the
# joint stage's schedule) and dr_frozen_iqe (DR on a frozen stage-1 IQE) train as long as the joint stage from
# the same stage-1 checkpoint, so they separate what joint training adds from longer training, QT's
# augmentation and an enhancement front end.
COMPARISONS = (("cleaq_dr", "cleq_dr"), ("cleaq_dr", "dr_only"), ("cleq_dr", "dr_only"), ("cleaq_dr", "dr_qt"),
               ("cleq_dr", "dr_qt"), ("cleaq_dr", "dr_frozen_iqe"), ("cleq_dr", "dr_frozen_iqe"),
               ("dr_qt", "dr_only"), ("dr_frozen_iqe", "dr_only"))
# eval.json's "vessels" metric of the comparisons: Dice of the segmented enhancement minus that of IQE's input
# (the paper's Fig. 8), per run.
VESSEL_DICE_GAIN = "dice_enhanced_minus_input"
# (task, metric, subsets) each comparison is made on; one absent in either variant (no enhancement in DR-only
# variants, vessels not scored) is left out.
COMPARISON_METRICS = (("dr", "kappa", ("usable", "reject", "all")),
                      ("enhancement", "psnr_enhanced", ("usable", "reject")),
                      ("enhancement", "ssim_enhanced", ("usable", "reject")),
                      ("vessels", VESSEL_DICE_GAIN, ("usable", "reject")))


# --------------------------------------------------------------------------- configs and flags
def config_path(variant: str) -> str:
    """``configs/ablations/<variant>.py``, as a run's ``--config`` names it (`cleaq_jax.configs` finds the
    shipped file by that name); raises ValueError if there is no such variant."""
    path = f"configs/ablations/{variant}.py"
    if variant not in VARIANTS or shipped_configs.path_of(path) is None:
        raise errors.ConfigError(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)} (configs/ablations/)")
    return path


def preset_settings(name: str) -> dict[str, Any]:
    """configs/ablations/presets.py's entry: {"overrides": {key: value}, "data": {"num", "size"}}."""
    if name not in presets.PRESETS:
        raise errors.ConfigError(
            f"--preset {name!r} is not one of {', '.join(presets.PRESETS)} (configs/ablations/presets.py)")
    return presets.PRESETS[name]


def flag_value(value: Any) -> str:
    """A config value as ml_collections' command-line parser reads it (tuples as "(1,1,1,1)")."""
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """["--config.a.b=1", ...] -> {"a.b": "1"}; anything else is an error naming the argument."""
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not key.startswith("--config.") or not sep or key == "--config.":
            raise errors.ConfigError(f"unexpected argument {arg!r}: config overrides are written --config.KEY=VALUE")
        out[key[len("--config."):]] = value
    return out


def override_flags(overrides: Mapping[str, str]) -> list[str]:
    """{"a.b": "1"} -> ["--config.a.b=1"], the inverse of `parse_overrides`."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def load_config(path: str, overrides: Mapping[str, str]) -> ml_collections.ConfigDict:
    """The config file at ``path`` (a path, or a shipped config's name: `cleaq_jax.configs.resolve`) with
    overrides applied exactly as ``cleaq_jax.main`` applies them; a bad key or value raises naming it."""
    argv = ["ablations", f"--config={shipped_configs.resolve(path)}", *override_flags(overrides)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    try:
        values(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        raise errors.ConfigError(f"{path}: a --config override does not apply ({e}); keys are listed in "
                                 "configs/default.py") from e
    return values.config


def final_stage(cfg: ml_collections.ConfigDict) -> str:
    """The last stage a variant's pipeline trains; its eval/eval.json holds the variant's results."""
    return stages.pipeline_stages(cfg)[-1]


def _longer_schedule(cfg: ml_collections.ConfigDict, factor: int) -> dict[str, str]:
    """The overrides that train ``factor`` times the config's epochs (the constant-rate part as well)."""
    if factor == 1:
        return {}
    return {"num_epochs": str(int(cfg.num_epochs) * factor),
            "optim.constant_epochs": str(int(cfg.optim.constant_epochs) * factor)}


# --------------------------------------------------------------------------- runs
def plan_runs(workdir: str, variants: Sequence[str], seeds: Sequence[int],
              overrides: Mapping[str, str], share_pretraining: bool = True) -> list[dict[str, Any]]:
    """One entry per variant x seed (seed-major, so later seeds reuse the first seed's compilations):
    variant, seed, dir, stage (the evaluated one), command (argv), and
    pretrained: the variant whose run directory holds this run's stage-1/2 checkpoints and evaluations
    (itself, or its `SHARED_PRETRAINING` base, whose run is then listed first and is this one's ``after``)."""
    configs = {v: load_config(config_path(v), overrides) for v in variants}
    evaluated = {v: final_stage(c) for v, c in configs.items()}
    base = {v: SHARED_PRETRAINING[v] if share_pretraining and SHARED_PRETRAINING.get(v) in variants
            and evaluated[v] == "stage3" else v for v in variants}
    ordered = sorted(variants, key=lambda v: (variants.index(base[v]), v != base[v]))
    runs = []
    for seed in seeds:
        for v in ordered:
            run_dir = os.path.join(workdir, v, f"seed{seed}")
            run = {"variant": v, "seed": seed, "dir": run_dir, "stage": evaluated[v], "pretrained": base[v]}
            start = _longer_schedule(configs[v], EPOCHS_FACTOR.get(v, 1))
            if base[v] != v:
                run["after"] = source = os.path.join(workdir, base[v], f"seed{seed}")
                start = {**start, "stage": "stage3", "init.stage1": os.path.join(source, "stage1"),
                         "init.stage2": os.path.join(source, "stage2")}
            run["command"] = [sys.executable, "-m", "cleaq_jax.main", f"--config={config_path(v)}",
                              f"--workdir={run_dir}", *override_flags({**overrides, **start, "seed": str(seed)})]
            runs.append(run)
    return runs


def typed_command(command: Sequence[str]) -> str:
    """A run's command as a user types it (``python -m cleaq_jax.main ...``)."""
    return shlex.join(["python", *command[1:]])
