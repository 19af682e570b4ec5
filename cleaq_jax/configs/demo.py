"""The demo: the whole pipeline (stage 1, 2, 3 and evaluation) on synthetic fundus images built on first
use, small enough to finish on a 2-core CPU in minutes. Same code path as a real run; only sizes differ.

    python -m cleaq_jax.main --config=configs/demo.py --workdir=demo_workdir
"""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.data.dir = ""  # -> <workdir>/data, built on first use
    # 336 training, 24 validation and 440 test images: enough training images for stage 1's DR to grade
    # above chance, and 110-120 test images per lower quality level (docs/training.md, "The demo" and
    # "Measurements behind the settings").
    c.data.synthetic.num = 800
    c.data.synthetic.splits.train = 0.42
    c.data.synthetic.splits.val = 0.03
    c.data.synthetic.splits.test = 0.55
    c.data.synthetic.lesion_scale = 4.0  # lesions of 1-2 px at 64 px, not sub-pixel specks (docs/data.md)
    c.data.image_size = 64
    c.data.class_balance = 0.5  # the paper's 1.0 makes an epoch of the synthetic grades 1.7x longer
    c.model.width = 0.125
    c.model.encoder_stages = (1, 1, 1, 1)
    c.model.classifier_stages = (1, 1, 1, 1)
    # Short runs: a U-IQE that starts as the identity. The synthetic records carry clean references at
    # every quality level, so usable images are not their own references (loss.usable_self_reference).
    c.model.uiqe_residual = True
    # Stage 3 fine-tunes (docs/training.md, "Learning rates"), takes half the good images as they are (the
    # path DR(IQE(X)) it is used on), and IQA guides IQE towards "good" through a frozen IQA instead of the
    # paper's gradient reversal.
    c.optim.joint_learning_rate = 1e-4
    c.loss.qt_good_fraction = 0.5
    c.loss.iqe_guidance = "to_good"
    # DR at the paper's rate in stage 3 (it must adapt to IQE's enhancements), and L_IQE weighted so that
    # DR's gradient through IQE does not erode the enhancement (docs/training.md, "Where the code departs from the paper").
    c.optim.joint_net_learning_rate.dr = 1e-3
    c.loss.weighting = "fixed"
    c.loss.fixed.iqe = 100.0
    c.batch_size = 16
    c.eval_batch_size = 16
    c.num_epochs = 6
    c.optim.constant_epochs = 4
    c.log_every_steps = 30  # one line per epoch (30 steps)
    c.eval_every_epochs = 3  # validation (24 images) after epochs 3 and 6
    c.image_every_steps = 90  # TensorBoard image grids after epochs 3 and 6
    c.checkpoint_every_steps = 90  # a checkpoint after epochs 3 and 6
    c.keep_checkpoints = 2
    return c
