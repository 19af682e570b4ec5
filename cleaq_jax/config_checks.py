"""What every config key accepts, checked right after the flags are parsed, before any data or model work.

`check(config)` returns one line per bad key, naming the key, the value and what is allowed, e.g.
``config.loss.qe='l3': must be one of 'l2', 'l1'``. `flag_error_line` turns a failure of the flag
parser itself (an override naming no config key, a value of the wrong type, a config file that does
not load) into one such line. `cleaq_jax.main` prints them and exits with code 2.

`RULES` holds one entry per key of configs/default.py (a test keeps the two in step); keys that
only some programs read are checked where they are read as well. The module imports nothing heavy,
so a bad command line fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# The programs `cleaq_jax.main` dispatches on (`config.stage`); a test pins them to the programs'.
# The training stages (paper III-A, IV-B) and the vessel teacher's two (paper III-C); the one stage list.
PAPER_STAGES = ("stage1", "stage2", "stage3")
TEACHER_STAGES = ("teacher_a", "teacher_b")
TRAINING_STAGES = PAPER_STAGES + TEACHER_STAGES
PROGRAMS = TRAINING_STAGES + ("eval", "pipeline", "teacher")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one key accepts: ``ok(value)`` decides, ``allowed`` says it in words for the error line."""

    ok: Callable[[Any], bool]
    allowed: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def choice(*values: str) -> Rule:
    return Rule(lambda v: v in values, "one of " + ", ".join(repr(x) for x in values))


def integer(low: int | None = None, *, or_value: int | None = None) -> Rule:
    words = "an integer" + (f" >= {low}" if low is not None else "") + (f", or {or_value}" if or_value is not None else "")
    return Rule(lambda v: _is_int(v) and (v == or_value or low is None or v >= low), words)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    if low is not None and high is not None:
        words = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        words = f"a number {'>' if low_open else '>='} {low}"
    else:
        words = "a number"
    return Rule(ok, words)


def boolean() -> Rule:
    return Rule(lambda v: isinstance(v, bool), "True or False")


def text(*, empty: bool = True, what: str = "a string") -> Rule:
    return Rule(lambda v: isinstance(v, str) and (empty or bool(v)), what + ("" if empty else " (not empty)"))


def int_tuple(length: int, low: int = 1) -> Rule:
    return Rule(lambda v: isinstance(v, (tuple, list)) and len(v) == length and all(_is_int(x) and x >= low for x in v),
                f"{length} integers >= {low}, e.g. ({', '.join(['3'] * length)})")


def host_port() -> Rule:
    return Rule(lambda v: isinstance(v, str) and (v == "" or re.fullmatch(r"[^\s:]+:\d{1,5}", v) is not None),
                "'' (auto-detect) or 'host:port' of process 0")


_POSITIVE = integer(1)
_COUNT = integer(0)
_WEIGHT = number(0.0)

RULES: dict[str, Rule] = {
    "stage": choice(*PROGRAMS),
    "seed": Rule(lambda v: _is_int(v) and 0 <= v < 2**31, "an integer in [0, 2**31)"),
    # ArrayRecord opens local files only: a bucket's shards are read through a copy or a FUSE mount.
    "data.dir": Rule(lambda v: isinstance(v, str) and "://" not in v,
                     "a local (or mounted) shard directory written by data_prep, or '' for <workdir>/data: the "
                     "shard reader reads local files only, so copy the shards from the bucket to a local disk or "
                     "mount the bucket with Cloud Storage FUSE (docs/launch.md, section B, Data)"),
    "data.train_split": text(empty=False, what="a split name of the shards' manifest.json"),
    "data.eval_split": text(empty=False, what="a split name of the shards' manifest.json"),
    "data.val_split": text(empty=False, what="a split name of the shards' manifest.json"),
    # U-IQE's encoder halves the image five times and concatenates skips of equal size (models.layers).
    "data.image_size": Rule(lambda v: _is_int(v) and v >= 32 and v % 32 == 0,
                            "a multiple of 32 (the networks halve the image five times), e.g. 64, 96, 512"),
    "data.num_grades": integer(2),
    "data.class_balance": number(0.0, 1.0),
    "data.balance_by": choice("dr_grade", "quality"),
    "data.augment": boolean(),
    "data.worker_count": _COUNT,
    "data.synthetic.num": _COUNT,
    "data.synthetic.seed": _COUNT,
    "data.synthetic.lesion_scale": number(0.0, low_open=True),
    "data.synthetic.splits.train": number(0.0, 1.0),
    "data.synthetic.splits.val": number(0.0, 1.0),
    "data.synthetic.splits.test": number(0.0, 1.0),
    "model.width": number(0.0, low_open=True),
    "model.dtype": choice("float32", "bfloat16"),
    "model.remat": boolean(),
    "model.use_seg": boolean(),
    "model.use_lqi": boolean(),
    "model.encoder_stages": int_tuple(4),
    "model.classifier_stages": int_tuple(4),
    "model.uiqe_blocks": _POSITIVE,
    "model.uiqe_width": number(0.0),
    "model.upsample": choice("subpixel4", "subpixel", "transpose"),
    "model.upsample_init": choice("icnr", "lecun"),
    "model.stem_pool": choice("masked", "reduce_window"),
    "model.scan_blocks": boolean(),
    "model.uiqe_residual": boolean(),
    "tasks.iqe": boolean(),
    "tasks.iqa": boolean(),
    "tasks.dr": boolean(),
    "tasks.joint_iqe": choice("train", "frozen", "off"),
    "loss.qe": choice("l2", "l1"),
    "loss.seg": choice("dice", "bce"),
    "loss.lqi": choice("l2", "l1"),
    "loss.qe_targets": choice("paper", "all"),
    "loss.lambda_seg": _WEIGHT,
    "loss.lambda_lqi": _WEIGHT,
    "loss.weighting": choice("lbtw", "fixed"),
    "loss.alpha": _WEIGHT,
    "loss.lbtw_reset": choice("epoch", "once"),
    "loss.fixed.dr": _WEIGHT,
    "loss.fixed.iqe": _WEIGHT,
    "loss.fixed.iqa": _WEIGHT,
    "loss.grl_scale": _WEIGHT,
    "loss.iqe_guidance": choice("reverse", "to_good"),
    "loss.grl_schedule": choice("constant", "ganin"),
    "loss.guidance_weight": _WEIGHT,
    "loss.usable_self_reference": boolean(),
    "loss.qt_good_fraction": number(0.0, 1.0),
    "optim.learning_rate": number(0.0, low_open=True),
    "optim.joint_learning_rate": number(0.0),
    "optim.joint_net_learning_rate.iqe": number(0.0),
    "optim.joint_net_learning_rate.iqa": number(0.0),
    "optim.joint_net_learning_rate.dr": number(0.0),
    "optim.constant_epochs": _COUNT,
    "optim.power": _WEIGHT,
    "optim.b1": number(0.0, 1.0, high_open=True),
    "optim.b2": number(0.0, 1.0, high_open=True),
    "batch_size": _POSITIVE,
    "num_epochs": _POSITIVE,
    "eval_batch_size": _POSITIVE,
    "mesh.data": integer(1, or_value=-1),
    "mesh.fsdp": integer(1, or_value=-1),
    "distributed.coordinator_address": host_port(),
    "distributed.num_processes": integer(1, or_value=0),
    "distributed.process_id": integer(0, or_value=-1),
    "log_every_steps": _POSITIVE,
    "log_gradient_shares": boolean(),
    "image_every_steps": _COUNT,
    "checkpoint_every_steps": _POSITIVE,
    "keep_checkpoints": _POSITIVE,
    "eval_every_epochs": _COUNT,
    "checkpoint_metric": text(empty=False, what="'auto' or the name of a logged or validation metric"),
    "checkpoint_mode": choice("auto", "min", "max"),
    "profile_steps": _COUNT,
    "eval_at_end": boolean(),
    "compilation_cache_dir": text(what="a directory for XLA's compilation cache, or '' for none"),
    "init.stage1": text(what="a stage directory, or '' for <workdir>/stage1"),
    "init.stage2": text(what="a stage directory, or '' for <workdir>/stage2"),
    "init.teacher_a": text(what="a stage directory, or '' for <workdir>/teacher_a"),
    "init.checkpoint_step": Rule(lambda v: isinstance(v, str) and (v in ("best", "latest") or v.isdigit()),
                                 "'best', 'latest' or a step number (as a string)"),
    "pretrained.dr": text(what="a converted ResNet-50 directory, or ''"),
    "pretrained.c_iqa": text(what="a converted ResNet-50 directory, or ''"),
    "pretrained.resnet34": text(what="a converted ResNet-34 directory, or ''"),
    "checkpoint_dir": text(what="a stage directory or its checkpoints/ folder, or ''"),
    "checkpoint_step": Rule(lambda v: isinstance(v, str) and (v in ("best", "latest") or v.isdigit()),
                            "'best', 'latest' or a step number (as a string)"),
    "eval.gate_quality": boolean(),
    "eval.num_examples_grid": _COUNT,
    "eval.vessel_max_images": _COUNT,
    "eval.vessel_teacher": text(what="a teacher_b stage directory, or '' for the classical filter"),
    "eval.vessel_method": choice("frangi", "matched"),  # cleaq_jax.data.vesselness.METHODS (a test pins it)
    "eval.gradcam_per_grade": _COUNT,
}
# Blocks whose keys are free-form and checked by their reader (config.qt: degrade.QTParams.from_config).
FREE_BLOCKS = ("qt",)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': value} for every leaf of a (nested) ConfigDict or dict; blocks in FREE_BLOCKS stay whole."""
    out: dict[str, Any] = {}
    for key in config.keys():
        value, path = config[key], f"{prefix}{key}"
        if hasattr(value, "keys") and path not in FREE_BLOCKS:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _show(value: Any) -> str:
    return repr(tuple(value) if isinstance(value, list) else value)


def check(config: Mapping[str, Any]) -> list[str]:
    """One line per value that breaks its rule (empty when the config is fine); keys without a rule
    pass, so configs may carry keys this table does not know yet."""
    problems = []
    for path, value in flatten(config).items():
        rule = RULES.get(path)
        if rule is not None and not rule.ok(value):
            problems.append(f"config.{path}={_show(value)}: must be {rule.allowed}")
    if problems:
        return problems
    flat = flatten(config)
    if flat.get("mesh.data") == -1 and flat.get("mesh.fsdp") == -1:
        problems.append("config.mesh.data=-1 and config.mesh.fsdp=-1: at most one axis may take the remaining devices")
    control = flat.get("tasks.joint_iqe", "train")
    if control != "train" and (flat.get("tasks.iqa") or not flat.get("tasks.dr")):
        problems.append(f"config.tasks.joint_iqe={control!r}: a control trains DR without IQA's guidance; "
                        "set config.tasks.iqa=False and config.tasks.dr=True")
    count, index = flat.get("distributed.num_processes", 0), flat.get("distributed.process_id", -1)
    if count > 0 and index >= count:
        problems.append(f"config.distributed.process_id={index}: must be below config.distributed.num_processes={count}")
    return problems


# --------------------------------------------------------------------------- flag parser failures
def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """(key path, text) of every ``--config.KEY=VALUE`` (``--config.KEY`` / ``--noconfig.KEY`` for booleans)."""
    out = []
    for arg in argv:
        m = re.match(r"^--?(no)?config\.([^=]+)(?:=(.*))?$", arg)
        if m:
            out.append((m.group(2), m.group(3) if m.group(3) is not None else ("False" if m.group(1) else "True")))
    return out


def _unknown_key(config: Any, path: str) -> str | None:
    """Why ``path`` names no key of ``config`` (None when it does)."""
    node, walked = config, "config"
    for part in path.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            if not hasattr(node, "keys"):
                return f"{walked} is a value, not a block of keys"
            near = [k for k in node.keys() if k.startswith(part[:3]) or part in k]
            hint = f"; did you mean {', '.join(near[:3])}?" if near else ""
            return f"{walked} has no key {part!r} (it has: {', '.join(sorted(node.keys()))}){hint}"
        node, walked = node[part], f"{walked}.{part}"
    return None


def _load(path: str) -> Any:
    from ml_collections.config_flags import config_flags  # here: the stage names above need no config system

    return config_flags.ConfigFileFlagParser(name="config", lock_config=False).parse(path)


def config_file_error(argv: Sequence[str], config: Any) -> str | None:
    """One line when ``--config`` named a file that did not load (ml_collections defers that error to
    the first use of the config), else None."""
    try:
        config.keys()
    except OSError as e:
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        return f"--config={_config_path(argv)}: cannot load it ({reason})"
    return None


def flag_error_line(argv: Sequence[str], error: BaseException) -> str:
    """One line for an exception raised while absl parsed ``argv`` (ml_collections raises a bare
    AttributeError for an override that names no key, absl a flags.Error for a value of the wrong type)."""
    message = " ".join(str(error).split())
    path = _config_path(argv)
    config = None
    if path is not None:
        try:
            config = _load(path)
        except Exception as e:  # the config file itself does not load: say so
            return f"--config={path}: the config file does not load ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
    if config is not None:
        for key, value in _overrides(argv):
            unknown = _unknown_key(config, key)
            if unknown:
                return f"--config.{key}={value}: {unknown}"
        m = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", message)
        if m and _unknown_key(config, m.group(1)) is None:
            key, default = m.group(1), flatten(config).get(m.group(1))
            rule = RULES.get(key)
            if rule is not None:
                return f"config.{key}={m.group(2)!r}: must be {rule.allowed}"
            return f"config.{key}={m.group(2)!r}: must be a {type(default).__name__} like the default " \
                   f"{_show(default)} ({m.group(3)})"
    return message
