"""The dispatcher `cleaq_jax.main` calls: ``run(config, workdir)`` runs what ``config.stage`` names.

"stage1", "stage2", "stage3" (and the vessel teacher's "teacher_a", "teacher_b") train one stage into
``<workdir>/<stage>``; "eval" evaluates a checkpoint; "pipeline" runs stage 1, 2, 3 (those the task
switches leave), each followed by its evaluation (the demo); "teacher" runs teacher_a then teacher_b.
A training run holds the lock of every stage directory it trains (`runtime.lock`) from start to end.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from cleaq_jax import config_checks
from cleaq_jax.programs import evaluate, train
from cleaq_jax.runtime import lock, storage
from cleaq_jax.training import stages


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run what ``cfg.stage`` names; returns the evaluation results of the last stage that ran."""
    if cfg.stage == "eval":  # the data settings come from the checkpoint's config (evaluate.merge_for_eval)
        return evaluate.run(cfg, workdir)
    if cfg.stage in config_checks.TRAINING_STAGES:
        names = (cfg.stage,)
    else:
        names = stages.pipeline_stages(cfg) if cfg.stage == "pipeline" else config_checks.TEACHER_STAGES
    result: dict[str, Any] = {}
    # One run per stage directory: a second run on the same workdir stops here, before any work.
    with lock.RunLock([storage.join(workdir, name) for name in names]):
        for name in names:
            result = train.train_stage(cfg, workdir, name)
    return result
