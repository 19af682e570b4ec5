"""Ablation "DR grading only, 2x epochs": DR trained alone on the original images for twice the study's
epochs (the ablation script doubles num_epochs and optim.constant_epochs), as many as a joint variant's DR
trains in stages 1 and 3 together: the baseline that tells joint training from longer training."""

from cleaq_jax.configs.ablations import dr_only


def get_config():
    return dr_only.get_config()
