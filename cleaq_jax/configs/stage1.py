"""Stage 1: pre-train IQE on (QT_op2(X^H) -> X^H, pseudo vessel masks) and DR on X (paper eq. 1, IV-B)."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "stage1"
    return c
