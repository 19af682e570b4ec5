"""Ablation "CLEAQ-DR to_good": the full method with IQA guiding IQE towards "good" through a frozen IQA
(loss.iqe_guidance="to_good", docs/training.md) instead of the paper's gradient reversal."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.loss.iqe_guidance = "to_good"
    return c
