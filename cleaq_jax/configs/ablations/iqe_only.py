"""Ablation "IQE only" (paper Table IV): IQE pre-trained alone (stage 1 without DR)."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.tasks.dr = False
    c.tasks.iqa = False
    return c
