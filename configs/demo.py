"""The demo: the whole pipeline (stage 1, 2, 3 and evaluation) on synthetic fundus images built on first
use, small enough to finish on a 2-core CPU in minutes. Same code path as a real run; only sizes differ.

    python -m cleaq_jax.main --config=configs/demo.py --workdir=demo_workdir
"""

from configs import default


def get_config():
    c = default.get_config()
    c.stage = "pipeline"
    c.data.dir = ""  # -> <workdir>/data, built on first use
    # 168 training and 24 validation images as before, and 288 test images (not 48), so that the stage-1
    # and stage-3 tables differ by more than which few images a subset holds.
    c.data.synthetic.num = 480
    c.data.synthetic.splits.train = 0.35
    c.data.synthetic.splits.val = 0.05
    c.data.synthetic.splits.test = 0.6
    c.data.synthetic.lesion_scale = 4.0  # lesions of 1-2 px at 64 px, not sub-pixel specks (docs/data.md)
    c.data.image_size = 64
    c.data.class_balance = 0.5
    c.model.width = 0.125
    c.model.encoder_stages = (1, 1, 1, 1)
    c.model.classifier_stages = (1, 1, 1, 1)
    # Short runs: a U-IQE that starts as the identity. The synthetic records carry clean references at
    # every quality level, so usable images are not their own references (loss.usable_self_reference).
    c.model.uiqe_residual = True
    # Stage 3 in the form that kept its networks working here (docs/training.md, "Stage 3's learning
    # rate"): a fine-tuning rate, half the good images as they are (the path DR(IQE(X)) it is used on), and
    # IQA guiding IQE towards "good" through a frozen IQA instead of the paper's gradient reversal.
    c.optim.joint_learning_rate = 1e-4
    c.loss.qt_good_fraction = 0.5
    c.loss.iqe_guidance = "to_good"
    # DR at the paper's rate in stage 3 (it must adapt to IQE's enhancements), and L_IQE weighted so that
    # DR's gradient through IQE does not erode the enhancement (docs/training.md, "Per subnetwork").
    c.optim.joint_net_learning_rate.dr = 1e-3
    c.loss.weighting = "fixed"
    c.loss.fixed.iqe = 100.0
    c.batch_size = 16
    c.eval_batch_size = 16
    c.num_epochs = 6
    c.optim.constant_epochs = 4
    c.log_every_steps = 15  # one line per epoch (15 steps)
    c.eval_every_epochs = 2  # validation (24 images) after epochs 2, 4 and 6
    c.image_every_steps = 45  # TensorBoard image grids after epochs 3 and 6
    c.checkpoint_every_steps = 15  # a checkpoint per epoch
    c.keep_checkpoints = 2
    return c
