"""Ablation "DR grading only" (paper Tables II, V): DR trained alone on the original images (stage 1, no IQE/IQA)."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.tasks.iqe = False
    c.tasks.iqa = False
    return c
