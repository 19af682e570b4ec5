"""Ablation "IQA w/o LQI-IQA" (paper Table VI): C-IQA alone, without the LQI-IQA branch."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.tasks.iqe = False
    c.tasks.dr = False
    c.model.use_lqi = False
    return c
