"""Control "DR alone, QT and stage-3 schedule": stage 3 without IQE or IQA. DR, from its stage-1 checkpoint,
trains on QT(X) (the op2-degraded good images, op1 usable ones, as the joint stage feeds IQE) at stage 3's
learning rates and for as long: what the joint stage gives DR besides collaboration (augmentation, the
optimiser restart), which a joint gain must exceed to count as collaboration."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.tasks.iqa = False
    c.tasks.joint_iqe = "off"
    return c
