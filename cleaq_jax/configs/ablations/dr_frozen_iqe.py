"""Control "DR on a frozen stage-1 IQE": stage 3 with IQE held at its stage-1 parameters (inference mode, no
gradient) and no IQA. DR trains on the fixed enhancer's output of QT(X) at stage 3's learning rates and for as
long: what an enhancer in front of DR gives without the two learning together."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.tasks.iqa = False
    c.tasks.joint_iqe = "frozen"
    return c
