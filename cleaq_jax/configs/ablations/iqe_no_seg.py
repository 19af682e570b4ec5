"""Ablation "IQE w/o Seg-IQE" (paper Table IV): U-IQE alone, without the Seg-IQE structure branch."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.tasks.dr = False
    c.tasks.iqa = False
    c.model.use_seg = False
    return c
