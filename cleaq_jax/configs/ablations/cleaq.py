"""Ablation "CLEAQ (no DR)" (paper Tables IV, VI): IQE and IQA trained jointly, no DR grader."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.tasks.dr = False
    return c
