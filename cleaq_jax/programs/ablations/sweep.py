"""The guidance sweep on the validation split: how strongly IQA should guide IQE, chosen before the study.

    python -m cleaq_jax.programs.ablations --sweep --data DIR --workdir DIR --preset claim [--jobs 2]

Stage 3 is trained once per point of `POINTS` (no guidance, ``to_good`` at four weights, the paper's reversal
under Ganin and Lempitsky's ramp at four scales) from one shared stage-1/2 pre-training of seed `SEED`, a seed
the study does not use, and evaluated on ``data.val_split``, never the test split. Each run logs the gradient
shares on IQE (config.log_gradient_shares). ``<workdir>/sweep/sweep.md`` and ``sweep.json`` hold the table and
the point `choose` picks by the rule written there; the study's preset then carries that point.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cleaq_jax.programs.ablations.plan import config_path, override_flags
from cleaq_jax.programs.ablations.run_files import eval_json_path, read_json, write_json
from cleaq_jax.programs.ablations.statistics import subset_metrics
from cleaq_jax.runtime import storage

SEED = 100
# (name, variant, overrides) of each point; the first is the baseline the rule compares with.
_TO_GOOD = {"loss.iqe_guidance": "to_good"}
_RAMP = {"loss.iqe_guidance": "reverse", "loss.grl_schedule": "ganin"}
POINTS = (("none", "cleq_dr", {}),
          *((f"to_good {w}", "cleaq_dr", {**_TO_GOOD, "loss.guidance_weight": w}) for w in ("0.03", "0.1", "0.3", "1.0")),
          *((f"reverse ramp {s}", "cleaq_dr", {**_RAMP, "loss.grl_scale": s}) for s in ("0.03", "0.1", "0.3", "1.0")))
# The point whose run also trains the shared stages 1 and 2 (a pipeline run); the others start stage 3 from it.
BASE = "reverse ramp 1.0"
# The rule: the highest validation DR kappa over all images among the guided points whose enhancement on usable
# and reject images stays within this many dB of no guidance (guidance must not buy DR with a worse enhancer).
PSNR_MARGIN_DB = 0.5
SHARES = ("enhancement", "dr", "guidance")


def _slug(name: str) -> str:
    return name.replace(" ", "_")


def plan_sweep(workdir: str, overrides: Mapping[str, str], python: str) -> list[dict[str, Any]]:
    """The sweep's runs (the base pipeline first), as `execution.run_unfinished` takes them."""
    common = {**overrides, "data.eval_split": "val", "log_gradient_shares": "True", "seed": str(SEED)}
    base_dir = os.path.join(workdir, "sweep", _slug(BASE))
    runs = []
    for name, variant, point in sorted(POINTS, key=lambda p: p[0] != BASE):
        run_dir = os.path.join(workdir, "sweep", _slug(name))
        start = {} if name == BASE else {"stage": "stage3", "init.stage1": os.path.join(base_dir, "stage1"),
                                         "init.stage2": os.path.join(base_dir, "stage2")}
        run = {"variant": f"sweep {name}", "seed": SEED, "dir": run_dir, "stage": "stage3", "point": name,
               "command": [python, "-m", "cleaq_jax.main", f"--config={config_path(variant)}",
                           f"--workdir={run_dir}", *override_flags({**common, **point, **start})]}
        if name != BASE:
            run["after"] = base_dir
        runs.append(run)
    return runs


def _mean_shares(stage_dir: str) -> dict[str, float]:
    """Mean over the logged steps of each term's share of the gradient on IQE (TensorBoard train/grad_share_*)."""
    from cleaq_jax.programs import curves

    logdir = storage.join(stage_dir, "tensorboard")
    if not storage.isdir(logdir):
        return {}
    scalars = curves.read_scalars(logdir)
    return {t: float(np.mean(scalars[f"train/grad_share_{t}"][1])) for t in SHARES
            if f"train/grad_share_{t}" in scalars}


def _row(run: Mapping[str, Any]) -> dict[str, Any] | None:
    result = read_json(eval_json_path(run))
    if result is None:
        return None
    dr, enh = result.get("dr", {}), result.get("enhancement", {})
    return {"point": run["point"], "kappa": {q: subset_metrics(dr, q).get("kappa") for q in ("all", "usable", "reject")},
            "psnr": {q: subset_metrics(enh, q).get("psnr_enhanced") for q in ("usable", "reject")},
            "ssim": {q: subset_metrics(enh, q).get("ssim_enhanced") for q in ("usable", "reject")},
            "shares": _mean_shares(os.path.join(run["dir"], "stage3"))}


def choose(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The rule (module docstring): the guided point of highest val DR kappa whose usable and reject PSNR are
    each within PSNR_MARGIN_DB of the unguided point's; None when the unguided point or every guided one is
    missing."""
    base = next((r for r in rows if r["point"] == POINTS[0][0]), None)
    if base is None:
        return None
    allowed = [r for r in rows if r["point"] != base["point"] and r["kappa"]["all"] is not None
               and all(r["psnr"][q] is not None and base["psnr"][q] is not None
                       and r["psnr"][q] >= base["psnr"][q] - PSNR_MARGIN_DB for q in ("usable", "reject"))]
    return max(allowed, key=lambda r: r["kappa"]["all"])["point"] if allowed else None


def _cell(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def sweep_markdown(rows: Sequence[Mapping[str, Any]], chosen: str | None, command: str) -> str:
    """sweep.md: the rule, the table of every finished point and the choice."""
    lines = ["# Guidance sweep on the validation split", "", f"Command: `{command}`; seed {SEED}; stage 3 of every "
             "point starts from the same stage-1/2 checkpoints.", "",
             f"Rule (fixed before the runs): the guided point of highest val DR kappa (all images) whose PSNR of the "
             f"enhanced usable and reject images is each within {PSNR_MARGIN_DB} dB of no guidance.", "",
             "| guidance | DR kappa all | usable | reject | PSNR usable (dB) | PSNR reject (dB) | SSIM usable | "
             "SSIM reject | gradient share on IQE: enhancement / DR / guidance |", "|" + "---|" * 9]
    for r in rows:
        shares = " / ".join(_cell(r["shares"].get(t), 2) for t in SHARES) if r["shares"] else "-"
        lines.append(f"| {r['point']} | " + " | ".join(
            [_cell(r["kappa"][q]) for q in ("all", "usable", "reject")] + [_cell(r["psnr"][q], 2) for q in ("usable", "reject")]
            + [_cell(r["ssim"][q]) for q in ("usable", "reject")] + [shares]) + " |")
    lines += ["", f"Chosen: **{chosen}**." if chosen else "Chosen: none yet (points missing).", ""]
    return "\n".join(lines)


def write_sweep(workdir: str, runs: Sequence[Mapping[str, Any]], command: str) -> str | None:
    """sweep.json and sweep.md from the finished runs; returns the chosen point."""
    rows = [r for r in map(_row, runs) if r is not None]
    order = [p[0] for p in POINTS]
    rows.sort(key=lambda r: order.index(r["point"]))
    chosen = choose(rows)
    out = os.path.join(workdir, "sweep")
    write_json(os.path.join(out, "sweep.json"), {"command": command, "seed": SEED, "rows": rows, "chosen": chosen})
    storage.atomic_file(storage.join(out, "sweep.md"), sweep_markdown(rows, chosen, command))
    return chosen
