"""The library's joint (stage-3) train step, `training.steps.make_train_step`, timed on machines that
have jax, flax, optax, orbax-checkpoint and numpy but not the project's config system (ml_collections)
nor its data stack (grain, array_record, OpenCV): the GPU check's benchmark.

    python bench/gpu_step.py --size 512 --batch 32 --dtype bfloat16 --remat off
    python bench/gpu_step.py --size 64 --batch 4 --width 0.125 --stages 1 --steps 3   # tiny, seconds

The stage is described by `stages.Stage.from_config`, the networks built by `factory.build_models` and the
state and optimiser by `state.init_state` / `optim.make_optimizer`, as in training; only the config is a
plain dict (`CONFIG`) of configs/default.py's keys, read by attribute like the config, with the command
line's size, batch and model keys set: the paper's loss settings (L2 L_QE on good images, Dice L_Seg, L2
L_LQI, lambdas 1, IQA guidance by gradient reversal at a constant scale 1, eq. (11)'s loss-balanced weights
on L_IQE and L_IQA with alpha 0.5 re-taken every epoch and L_DR at 1) and Adam at 1e-3 with the paper's
schedule (constant over the first 60 epochs, so over any benchmark). ``tests/test_gpu_step.py`` checks
that every key of `CONFIG` equals configs/default.py's, so the two cannot drift apart unnoticed.

One configuration per process; prints a summary line and one JSON line: ``compile_s`` (lower + compile of the step),
``init_s``, ``step_s`` (median of ``--steps`` after ``--warmup``), images/s, FLOPs per image (XLA's
cost analysis), TFLOP/s, MFU against ``--peak-tflops`` or the device table of bench/train_step.py,
the device's peak memory in use and the size of the optimised HLO. A progress line on stderr marks
each phase, so a configuration cut short says how far it got.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  (after the repository is on the path)
import numpy as np  # noqa: E402

from cleaq_jax.models import factory  # noqa: E402
from cleaq_jax.training import optim, stages, steps  # noqa: E402
from cleaq_jax.training import state as train_state  # noqa: E402

_START = time.perf_counter()
# No parameter depends on the image size, so every configuration of one width initialises at this size:
# one init program, compiled once and then read from the persistent cache.
INIT_SIZE = 64
# The joint step's epoch length: the loss-balanced weights re-take their initial losses once per epoch.
STEPS_PER_EPOCH = 1000

# configs/default.py's keys that the stage-3 description and the networks read (a test keeps them equal).
CONFIG = {
    "seed": 0,
    "batch_size": 32,
    "num_epochs": 150,
    "data": {"image_size": 512, "num_grades": 5, "train_split": "train", "class_balance": 1.0,
             "balance_by": "dr_grade", "augment": True, "worker_count": 0},
    "model": {"width": 1.0, "dtype": "float32", "remat": False, "use_seg": True, "use_lqi": True,
              "encoder_stages": (3, 4, 6, 3), "classifier_stages": (3, 4, 6, 3), "uiqe_blocks": 1,
              "uiqe_width": 0.0, "uiqe_residual": False, "upsample": "subpixel4", "upsample_init": "icnr",
              "stem_pool": "masked", "scan_blocks": False},
    "tasks": {"iqe": True, "iqa": True, "dr": True, "joint_iqe": "train"},
    "qt": {},
    "loss": {"qe": "l2", "seg": "dice", "lqi": "l2", "qe_targets": "paper", "lambda_seg": 1.0, "lambda_lqi": 1.0,
             "weighting": "lbtw", "alpha": 0.5, "lbtw_reset": "epoch", "fixed": {"dr": 1.0, "iqe": 1.0, "iqa": 1.0},
             "iqe_guidance": "reverse", "grl_scale": 1.0, "grl_schedule": "constant", "guidance_weight": 0.01,
             "usable_self_reference": False, "qt_good_fraction": 1.0},
    "optim": {"learning_rate": 1e-3, "joint_learning_rate": 0.0,
              "joint_net_learning_rate": {"iqe": 0.0, "iqa": 0.0, "dr": 0.0}, "constant_epochs": 60,
              "power": 0.9, "b1": 0.9, "b2": 0.999},
    "init": {"stage1": "", "stage2": "", "teacher_a": "", "checkpoint_step": "best"},
    "pretrained": {"dr": "", "c_iqa": "", "resnet34": ""},
}

# Dense peak TFLOP/s per chip (bfloat16, float32 as TF32), as bench/train_step.py's table.
PEAK_TFLOPS = (("H100 PCIe", (756.0, 378.0)), ("H100", (989.0, 494.5)), ("H200", (989.0, 494.5)),
               ("A100", (312.0, 156.0)))


class Keys(dict):
    """A nested dict read as the library reads a config: by key or by attribute."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value


def keys(tree: dict) -> Keys:
    return Keys({k: keys(v) if isinstance(v, dict) else v for k, v in tree.items()})


def progress(phase: str) -> None:
    """A line on stderr: the phase reached and the seconds since start-up."""
    print(json.dumps({"phase": phase, "elapsed_s": round(time.perf_counter() - _START, 1)}),
          file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="image size (multiple of 32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the paper's networks)")
    p.add_argument("--stages", type=int, default=0,
                   help="blocks per ResNet stage for every ResNet (0: the paper's 3-4-6-3); 1 for a tiny check")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--remat", default="off", choices=("off", "on"))
    p.add_argument("--upsample", default="subpixel4", help="layers.LayerForms.upsample")
    p.add_argument("--stem-pool", default="masked", help="layers.LayerForms.stem_pool")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak of one device (default: looked up)")
    args = p.parse_args(argv)
    if args.size % 32:
        p.error(f"--size {args.size}: IQE and IQA need a multiple of 32")
    return args


def config(args: argparse.Namespace) -> Keys:
    """`CONFIG` with the command line's image size, batch and model keys."""
    cfg = keys(CONFIG)
    cfg.data.image_size, cfg.batch_size = args.size, args.batch
    m = cfg.model
    m.width, m.dtype, m.remat = args.width, args.dtype, args.remat == "on"
    m.upsample, m.stem_pool = args.upsample, args.stem_pool
    if args.stages:
        m.encoder_stages = m.classifier_stages = (args.stages,) * 4
    return cfg


def joint_stage(cfg: Keys) -> stages.Stage:
    """Stage 3 of ``cfg`` as the stage runner derives it, without data on disk."""
    return stages.Stage.from_config(cfg, "stage3", steps_per_epoch=STEPS_PER_EPOCH)


def init_setup(cfg: Keys, stage: stages.Stage) -> tuple[stages.Stage, dict]:
    """The stage and networks every configuration of one width initialises with: INIT_SIZE px, float32,
    no remat (the parameters are the same; one init program for all of them)."""
    init_cfg = keys(cfg)
    init_cfg.model.dtype, init_cfg.model.remat = "float32", False
    return dataclasses.replace(stage, image_size=INIT_SIZE), factory.build_models(init_cfg)


def random_batch(n: int, size: int, seed: int = 0) -> dict:
    """A loader-shaped batch: uint8 noise inside a disc, every quality and grade, a vessel mask."""

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = (yy ** 2 + xx ** 2 <= (size / 2) ** 2).astype(np.uint8)
    return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) * disc[..., None],
            "mask": np.repeat(disc[None], n, 0), "vessel": (rng.random((n, size, size)) < 0.1).astype(np.uint8) * disc,
            "has_vessel": np.ones(n, bool), "dr_grade": (np.arange(n) % 5).astype(np.int32),
            "quality": (np.arange(n) % 3).astype(np.int32)}


def _peak(kind: str, dtype: str, override: float) -> float | None:
    if override > 0:
        return override
    for name, (bf16, fp32) in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def measure(args: argparse.Namespace) -> dict:
    """Build, initialise, compile and time one configuration."""
    device = jax.devices()[0]
    progress(f"backend {device.platform} ready")
    cfg = config(args)
    stage = joint_stage(cfg)
    models = factory.build_models(cfg)
    tx = optim.make_optimizer(stage.optim, stage.steps_per_epoch)
    init_stage, init_models = init_setup(cfg, stage)
    start = time.perf_counter()
    state = jax.jit(lambda k: train_state.init_state(init_stage, init_models, tx, k))(jax.random.key(0))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    progress("initialised")
    batch = jax.device_put(random_batch(args.batch, args.size))
    start = time.perf_counter()
    compiled = jax.jit(steps.make_train_step(stage, models, tx), donate_argnums=(0,)).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    progress("compiled")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    progress("warmed up")
    wall = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        wall.append(time.perf_counter() - t)
    rec = dict(size=args.size, batch=args.batch, width=args.width, stages=args.stages or "3-4-6-3",
               dtype=args.dtype, remat=args.remat, upsample=args.upsample, stem_pool=args.stem_pool,
               device_kind=device.device_kind, platform=device.platform, init_s=round(init_s, 1),
               compile_s=round(compile_s, 1), hlo_chars=len(compiled.as_text()),
               flops_per_image=flops / args.batch, loss=float(metrics["loss"]))
    if wall:
        med = statistics.median(wall)
        peak = _peak(device.device_kind, args.dtype, args.peak_tflops)
        rec.update(step_s=round(med, 4), step_s_min=round(min(wall), 4), step_s_max=round(max(wall), 4),
                   images_per_s=round(args.batch / med, 3), tflops_per_s=round(flops / med / 1e12, 4),
                   mfu=round(flops / med / 1e12 / peak, 4) if peak else None, peak_tflops=peak)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    rec["peak_bytes"] = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
    rec["elapsed_s"] = round(time.perf_counter() - _START, 1)
    return rec


def summary(rec: dict) -> str:
    """One human line: the figures of a configuration as they arrive."""
    gib = lambda b: f"{b / 2 ** 30:.1f} GiB" if b else "n/a"  # noqa: E731
    head = (f"{rec['size']} px batch {rec['batch']} width {rec['width']} {rec['dtype']} remat {rec['remat']}: "
            f"compile {rec['compile_s']:.0f} s (init {rec['init_s']:.0f} s)")
    if "step_s" not in rec:
        return head
    mfu = f"{100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else "n/a (unknown peak)"
    return (f"{head}, step {rec['step_s'] * 1e3:.0f} ms, {rec['images_per_s']:.1f} images/s, "
            f"{rec['tflops_per_s']:.3g} TFLOP/s, MFU {mfu}, peak memory {gib(rec['peak_bytes'])}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rec = measure(args)
    print(summary(rec), flush=True)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
