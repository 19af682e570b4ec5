"""Ablation "CLEAQ-DR" (paper Tables IV-VI): the full method: stage 1, 2 and the joint stage 3."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    return c
