"""The CE-Net vessel teacher of the pseudo structure masks (paper III-C), in two stages:

  teacher_a  CE-Net on DRIVE's 20 training images and their manual vessel masks;
  teacher_b  initialised from teacher_a, fine-tuned on op1/op2 QT-degraded copies of the same images.

Each stage trains with Dice + BCE inside the field of view, augmented as CE-Net's training is: random
rotation and flips in the loader, HSV colour shift and scale/aspect/shift on device (cleaq_jax/data/augment.py),
and ends with an evaluation on DRIVE test (Dice, accuracy, AUC inside the FOV mask) in <stage>/eval/.

    python -m cleaq_jax.data_prep.drive --root DRIVE --out data/drive --size 512
    python -m cleaq_jax.main --config=configs/vessel_teacher.py --workdir=runs/teacher
    python -m cleaq_jax.data_prep.pseudo_masks --shards data/eyeq --teacher runs/teacher/teacher_b --out data/eyeq_vessels

(docs/vessel_masks.md has the whole chain and the classical fallback for when DRIVE is not at hand.)
"""

from cleaq_jax.configs import default


def get_config():
    c = default.get_config()
    c.stage = "teacher"  # teacher_a, then teacher_b (or name one of them to run it alone)
    # DRIVE shards from `python -m cleaq_jax.data_prep.drive --root DRIVE --out data/drive --size 512`.
    c.data.dir = "data/drive"
    c.data.train_split = "train"  # DRIVE training/, 20 images with 1st_manual masks
    c.data.eval_split = "test"  # DRIVE test/, 20 images
    # The size of the shards the masks go into (512 by default), so the mask pass needs no resizing;
    # CE-Net itself trained at 448. Must be a multiple of 32 and equal the DRIVE prep's --size.
    c.data.image_size = 512
    c.data.class_balance = 0.0  # DRIVE has no grade or quality labels to balance
    c.data.augment = True  # loader: random rotation + horizontal/vertical flips
    c.data.synthetic.num = 0

    c.model.width = 1.0  # CE-Net's ResNet-34 encoder at full width
    c.model.encoder_stages = (3, 4, 6, 3)
    # CE-Net starts from an ImageNet ResNet-34: convert torchvision's weights (docs/pretrained.md) and set
    # --config.pretrained.resnet34=DIR (used by teacher_a; teacher_b starts from teacher_a).
    c.pretrained.resnet34 = ""

    # CE-Net's optimiser: Adam, learning rate 2e-4, here constant for 3/4 of each stage, then decaying.
    c.optim.learning_rate = 2e-4
    c.optim.constant_epochs = 150
    c.optim.power = 0.9
    c.batch_size = 4  # 20 training images -> 5 steps per epoch
    c.eval_batch_size = 4  # DRIVE test: 20 images, 5 batches
    c.num_epochs = 200  # per stage: 1,000 steps for teacher_a, 1,000 more for teacher_b

    c.log_every_steps = 10
    c.image_every_steps = 0  # the teacher has no enhancement grid
    c.checkpoint_every_steps = 250
    c.keep_checkpoints = 2
    c.checkpoint_metric = "loss"
    c.checkpoint_mode = "min"
    c.init.teacher_a = ""  # teacher_b starts from <workdir>/teacher_a unless this names another directory
    return c
