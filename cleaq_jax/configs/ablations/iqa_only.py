"""Ablation "IQA only" (paper Table VI): IQA pre-trained alone (stage 2)."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.tasks.iqe = False
    c.tasks.dr = False
    return c
