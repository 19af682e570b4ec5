"""Default configuration: every knob of every stage, with the paper's values (IV-B).

Stage configs (stage1.py, stage2.py, stage3.py, eval.py, demo.py, ablations/*) import this and change a
few keys. Any key can be overridden on the command line, e.g. ``--config.batch_size=8``.
"""

import ml_collections

from cleaq_jax import configs


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Which program main.py runs: "stage1" (IQE + DR pre-training), "stage2" (IQA pre-training),
    # "stage3" (joint fine-tuning), "eval", "pipeline" (stage1 -> stage2 -> stage3, each evaluated),
    # "teacher" (the CE-Net vessel teacher: teacher_a on DRIVE, then teacher_b on QT-degraded DRIVE).
    c.stage = "stage3"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # Shard directory written by data_prep (holds manifest.json).
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.val_split = "val"  # Validated during training (eval_every_epochs); EyeQ / Messidor prep: --split val.
    c.data.image_size = 512  # Must equal the size the shards were prepared at.
    c.data.num_grades = 5  # 5 for EyeQ (DR-0..4), 4 for Messidor (0..3).
    # Copies of each class per epoch, (n_max / n_c) ** class_balance times its images: 0 natural frequencies, 1 equal
    # classes, the paper's class-balanced augmentation (IV-B).
    c.data.class_balance = 1.0
    c.data.balance_by = "dr_grade"
    c.data.augment = True  # Random rotation + horizontal/vertical flips.
    c.data.worker_count = 0  # grain worker processes per host (0: decode in the main process).
    # Build synthetic shards into data.dir on first use when num > 0 (demo and tests); lesion_scale
    # enlarges the lesions so the grade stays visible on small images (4 at 64 px); splits: the fraction
    # of the images in each split (summing to 1).
    c.data.synthetic = ml_collections.ConfigDict(dict(num=0, seed=0, lesion_scale=1.0))
    c.data.synthetic.splits = ml_collections.ConfigDict(dict(train=0.7, val=0.1, test=0.2))

    c.model = ml_collections.ConfigDict()
    c.model.width = 1.0  # Channel multiplier of every subnetwork (1.0 = the paper's networks).
    c.model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (parameters stay float32).
    c.model.remat = False  # Rematerialise residual blocks (less memory, ~30% more compute).
    c.model.use_seg = True  # Seg-IQE branch of IQE (False: the "IQE w/o Seg-IQE" ablation).
    c.model.use_lqi = True  # LQI-IQA branch of IQA (False: the "IQA w/o LQI-IQA" ablation).
    c.model.encoder_stages = (3, 4, 6, 3)  # ResNet-34 blocks per stage (Seg-IQE, LQI-IQA encoders).
    c.model.classifier_stages = (3, 4, 6, 3)  # ResNet-50 blocks per stage (C-IQA, DR).
    c.model.uiqe_blocks = 1  # Residual blocks per U-IQE level (paper: 1; the authors' code: 3).
    c.model.uiqe_width = 0.0  # U-IQE's own channel multiplier (0: model.width); cheap at small sizes.
    c.model.uiqe_residual = False  # U-IQE corrects its input (True) or draws the image anew (paper).
    # Equivalent formulations (same values and gradients; docs/performance.md has the timings):
    # stride-2 transposed convs as four 2x2 convs ("subpixel4"), one 2x2 conv to 4x channels
    # ("subpixel") or XLA's transposed conv ("transpose", slow backward on CPU).
    c.model.upsample = "subpixel4"
    # Transposed-conv kernel init: "icnr" starts the four output phases equal (no checkerboard in
    # an untrained U-IQE); "lecun" draws every tap independently (docs/performance.md, "U-IQE without
    # checkerboard").
    c.model.upsample_init = "icnr"
    # ResNet stem max-pool gradient: "masked" (custom_vjp, elementwise) or "reduce_window"
    # (nn.max_pool's select-and-scatter, slow on CPU). Same values and gradients.
    c.model.stem_pool = "masked"
    # Run each ResNet stage's repeated blocks under nn.scan (one compiled body per stage: shorter
    # compile). Same maths, but the parameter tree stacks those blocks (resnet.stack_blocks converts).
    c.model.scan_blocks = False

    # Which subnetworks are trained (ablations switch them off). Stage 1 trains IQE and DR, stage 2 IQA.
    c.tasks = ml_collections.ConfigDict(dict(iqe=True, iqa=True, dr=True))
    # IQE in stage 3: "train" (the method: trained jointly), or one of the controls that tell collaboration
    # from its side effects (docs/training.md, "Controls"): "frozen", DR trains on the output of the stage-1 IQE
    # held fixed; "off", DR trains alone on QT(X) with stage 3's schedule. Both need tasks.iqa=False.
    c.tasks.joint_iqe = "train"

    # Quality transform QT (cofe-Net degradation model); empty = the documented defaults. Keys are the
    # fields of cleaq_jax.data.degrade.QTParams.
    c.qt = ml_collections.ConfigDict()

    c.loss = ml_collections.ConfigDict()
    c.loss.qe = "l2"  # L_QE: "l2" (paper eq. 6) or "l1" (the authors' code).
    c.loss.seg = "dice"  # L_Seg: "dice" (paper eq. 5) or "bce" (the authors' code).
    c.loss.lqi = "l2"  # L_LQI: "l2" (paper eq. 9) or "l1" (the authors' code).
    # Where L_QE has a target: "paper", only good images, QT-degraded, against their original (eq. 1, the pairs
    # EyeQ offers); the clean references some records store (synthetic data, Messidor's QT thirds) then only
    # score the enhancement. "all": also every record's stored clean reference (IQE is told the answer for
    # usable and reject images, which real data cannot do).
    c.loss.qe_targets = "paper"
    c.loss.lambda_seg = 1.0
    c.loss.lambda_lqi = 1.0
    c.loss.weighting = "lbtw"  # "lbtw" (loss-balanced task weighting, paper IV-B) or "fixed".
    c.loss.alpha = 0.5  # LBTW exponent.
    c.loss.lbtw_reset = "epoch"  # Re-take the initial losses L(0) every "epoch" or "once".
    c.loss.fixed = ml_collections.ConfigDict(dict(dr=1.0, iqe=1.0, iqa=1.0))  # weights when weighting="fixed"
    # How IQA guides IQE in stage 3: "reverse", the paper's gradient-reversal layer (IQE ascends L_IQA on
    # every image); "to_good", IQE descends CE(IQA(X^), good) over non-good images through a frozen IQA,
    # IQA trains on the detached X^ and on X (docs/training.md).
    c.loss.iqe_guidance = "reverse"
    c.loss.grl_scale = 1.0  # Gradient-reversal scale between IQA and IQE in stage 3 ("reverse").
    # "constant", or "ganin": grl_scale * (2 / (1 + exp(-10 p)) - 1) over the stage's progress p.
    c.loss.grl_schedule = "constant"
    c.loss.guidance_weight = 0.01  # Weight of the "to_good" term, outside the dynamic task weighting.
    # Stages 1 and 3: L_QE also on usable images (op1-degraded) against themselves.
    c.loss.usable_self_reference = False
    # Stage 3: the fraction of good images QT degrades (op2) before IQE; the rest enter as they are, so
    # DR and IQE also train on the path they are evaluated and used on, DR(IQE(X)). 1.0 is eq. (3)'s
    # literal DR(QE(QT(X))) for every image (docs/training.md, "Stage 3").
    c.loss.qt_good_fraction = 1.0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    # Stage 3's starting learning rate when above 0, else learning_rate (the paper: 1e-3 for every stage).
    # Stage 3 starts Adam afresh on pre-trained networks, which a lower rate fine-tunes (docs/training.md,
    # "Learning rates").
    c.optim.joint_learning_rate = 0.0
    # Stage 3's starting rate of one subnetwork when above 0 (before joint_learning_rate): e.g. DR at the
    # paper's 1e-3 while IQE and IQA fine-tune at joint_learning_rate (docs/training.md, "Learning rates").
    c.optim.joint_net_learning_rate = ml_collections.ConfigDict(dict(iqe=0.0, iqa=0.0, dr=0.0))
    c.optim.constant_epochs = 60  # lr constant, then times (1 - epoch/total_epochs)^power
    c.optim.power = 0.9
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999

    c.batch_size = 32  # Global batch (all devices, all hosts).
    c.num_epochs = 150
    c.eval_batch_size = 32

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # devices on the data / parameter-sharding axes
    # Multi-process launch (jax.distributed): "host:port" of process 0, the process count and this process's
    # index. The flags --coordinator_address, --num_processes, --process_id override them; "", 0 and -1
    # leave each to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID or to auto-detection.
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))

    c.log_every_steps = 50
    # Stage 3, at each logging step: the norm of each loss term's gradient on IQE's parameters (enhancement, DR
    # through the enhanced image, IQA's guidance) and its share of their sum, train/grad_norm_* and
    # train/grad_share_* (docs/training.md, "Gradient shares"; costs about two train steps each time).
    c.log_gradient_shares = False
    c.image_every_steps = 500  # TensorBoard image grid (low-quality / enhanced / reference / vessel mask).
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3  # Latest checkpoints kept; the best one by checkpoint_metric is kept as well.
    # Validation during training: every eval_every_epochs epochs (and at the last step) the stage is
    # evaluated on data.val_split, written to TensorBoard (val/...) and saved with a checkpoint ranked by
    # it. 0, or a dataset without that split, turns it off.
    c.eval_every_epochs = 1
    # Metric that picks the best checkpoint (evaluation and predict restore it by default): "auto" is the
    # validation DR kappa (stages 1 and 3) or IQA kappa (stage 2), the training "loss" without validation;
    # or a training metric ("loss", "loss_dr", ...) or a validation one (val_dr_kappa, val_dr_accuracy,
    # val_iqa_kappa, val_iqa_accuracy, val_psnr_enhanced, val_ssim_enhanced).
    c.checkpoint_metric = "auto"
    c.checkpoint_mode = "auto"  # higher ("max") or lower ("min") is better; "auto": max for val_*, else min
    c.profile_steps = 0  # >0: a profiler trace of that many steps (at least 3 s) to TensorBoard after warm-up, hourly.
    c.eval_at_end = True  # Evaluate on data.eval_split when a stage ends.
    # XLA's persistent compilation cache: a rerun, a resumed run or an evaluation of the same model loads
    # the programs an earlier run compiled (docs/performance.md, "The compilation cache"). '' turns it off;
    # JAX_COMPILATION_CACHE_DIR, when set, wins.
    c.compilation_cache_dir = configs.COMPILATION_CACHE_DIR

    # Stage 3 starts from the checkpoints of these stage directories (teacher_b from teacher_a); ""
    # means <workdir>/<stage> (every stage writes to <workdir>/<stage>). checkpoint_step: which of their
    # checkpoints: "best" (the one each stage's validation ranked best; the latest where that stage was not
    # validated or none carries the metric), "latest", or a step number (as a string).
    c.init = ml_collections.ConfigDict(dict(stage1="", stage2="", teacher_a="", checkpoint_step="best"))
    # Optional torchvision ImageNet weights, converted with `python -m cleaq_jax.programs.import_weights`
    # (docs/pretrained.md): a ResNet-50 directory for the DR grader and for C-IQA, a ResNet-34 directory
    # for the Seg-IQE, LQI-IQA and CE-Net encoders. Used when a stage starts from scratch.
    c.pretrained = ml_collections.ConfigDict(dict(dr="", c_iqa="", resnet34=""))

    # Evaluation (configs/eval.py): checkpoint directory to restore (a stage directory or its checkpoints/).
    c.checkpoint_dir = ""
    c.checkpoint_step = "best"  # which of its checkpoints: "best" (by its checkpoint_metric), "latest", or a step
    c.eval = ml_collections.ConfigDict(dict(gate_quality=False, num_examples_grid=8))
    # Evaluation's pictures (docs/evaluation.md): on the first vessel_max_images test examples (0: off),
    # the downstream vessel table (paper Fig. 8; splits with true vessels only), segmented by the CE-Net
    # vessel teacher in vessel_teacher (a teacher_b directory) or, when "", the classical vessel_method
    # ("matched": ~10x faster than "frangi", similar masks); and a Grad-CAM grid of gradcam_per_grade
    # images per grade (paper Fig. 9).
    c.eval.vessel_max_images = 64
    c.eval.vessel_teacher = ""
    c.eval.vessel_method = "matched"
    c.eval.gradcam_per_grade = 2
    return c
