"""The demo: the whole pipeline (stage 1, 2, 3 and evaluation) on synthetic fundus images built on first
use, small enough to finish on a 2-core CPU in minutes. Same code path as a real run; only sizes differ.

    python -m cleaq_jax.main --config=configs/demo.py --workdir=demo_workdir
"""

from configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.data.dir = ""  # -> <workdir>/data, built on first use
    c.data.synthetic.num = 240
    c.data.synthetic.lesion_scale = 4.0  # lesions of 1-2 px at 64 px, not sub-pixel specks (docs/data.md)
    c.data.image_size = 64
    c.data.class_balance = 0.5
    c.model.width = 0.125
    c.model.encoder_stages = (1, 1, 1, 1)
    c.model.classifier_stages = (1, 1, 1, 1)
    # Short runs: a U-IQE that starts as the identity, and usable images as their own references.
    c.model.uiqe_residual = True
    c.loss.usable_self_reference = True
    # The paper's reversal scale 1 lets IQE wreck its output to defeat IQA in a short joint stage;
    # 0.1 keeps the enhancement (docs/results.md).
    c.loss.grl_scale = 0.1
    c.batch_size = 16
    c.eval_batch_size = 16
    c.num_epochs = 6
    c.optim.constant_epochs = 4
    c.log_every_steps = 15  # one line per epoch (15 steps)
    c.image_every_steps = 20
    c.checkpoint_every_steps = 10
    c.keep_checkpoints = 2
    return c
