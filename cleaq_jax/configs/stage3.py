"""Stage 3: joint fine-tuning of IQE, IQA and DR (paper eq. 3, 11), from the stage-1 and stage-2 checkpoints."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "stage3"
    return c
