"""Stage 2: pre-train IQA on (X, QT(X), quality labels) (paper eq. 2)."""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "stage2"
    return c
