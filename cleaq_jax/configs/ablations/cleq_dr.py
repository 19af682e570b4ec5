"""Ablation "CLEQ-DR (no IQA)" (paper Tables IV, V): IQE and DR trained jointly, no quality assessment."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.tasks.iqa = False
    return c
