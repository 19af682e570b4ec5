"""Evaluate a checkpoint on data.eval_split and write the paper's tables and figures:

    python -m cleaq_jax.main --config=configs/eval.py --config.checkpoint_dir=DIR \
        --config.data.dir=SHARDS --workdir=OUT

checkpoint_dir is a stage directory (<workdir>/stage3) or its checkpoints/ folder. The model settings
must match the ones the checkpoint was trained with (they are read back from the checkpoint's config).
"""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "eval"
    return c
