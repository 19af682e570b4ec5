"""The joint (stage-3) train step built from the library's modules alone, for machines that have jax,
flax and optax but not the project's config system (ml_collections) nor its data stack (grain,
array_record): the GPU check's benchmark.

    python bench/gpu_step.py --size 512 --batch 32 --dtype bfloat16 --remat off
    python bench/gpu_step.py --size 64 --batch 4 --width 0.125 --stages 1 --steps 3   # tiny, seconds

It computes what ``steps.make_train_step(cfg, ..., "stage3", ...)`` computes with configs/default.py's
loss settings (the paper's: L2 L_QE on good images, Dice L_Seg, L2 L_LQI, lambdas 1, IQA guidance by
gradient reversal at a constant scale 1, eq. (11)'s loss-balanced weights on L_IQE and L_IQA with
alpha 0.5 re-taken every epoch and L_DR at 1) and Adam at a constant learning rate: the quality transform inside the step, IQE -> enhanced image -> IQA through the
gradient-reversal layer and DR. ``tests/test_gpu_step.py`` checks that its loss and gradients equal
the training step's, so the two cannot drift apart unnoticed.

One configuration per process; prints a summary line and one JSON line: ``compile_s`` (lower + compile of the step),
``init_s``, ``step_s`` (median of ``--steps`` after ``--warmup``), images/s, FLOPs per image (XLA's
cost analysis), TFLOP/s, MFU against ``--peak-tflops`` or the device table of bench/train_step.py,
the device's peak memory in use and the size of the optimised HLO. A progress line on stderr marks
each phase, so a configuration cut short says how far it got.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  (after the repository is on the path)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from cleaq_jax.data import degrade  # noqa: E402
from cleaq_jax.models import dr, iqa, iqe, layers  # noqa: E402
from cleaq_jax.training import losses  # noqa: E402

_START = time.perf_counter()
TASKS = ("dr", "iqe", "iqa")  # the training step's task order (steps.TASK_ORDER)
# No parameter depends on the image size, so every configuration of one width initialises at this size:
# one init program, compiled once and then read from the persistent cache.
INIT_SIZE = 64

# Dense peak TFLOP/s per chip (bfloat16, float32 as TF32), as bench/train_step.py's table.
PEAK_TFLOPS = (("H100 PCIe", (756.0, 378.0)), ("H100", (989.0, 494.5)), ("H200", (989.0, 494.5)),
               ("A100", (312.0, 156.0)))


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


def build_models(width: float, stages: int, dtype, remat: bool, forms) -> dict:
    """IQE, IQA and DR as factory.build_models makes them from configs/default.py's model keys."""

    enc = (stages,) * 4 if stages else (3, 4, 6, 3)
    common = dict(width=width, dtype=dtype, remat=remat, forms=forms)
    return {"iqe": iqe.IQE(encoder_stages=enc, **common),
            "iqa": iqa.IQA(num_classes=3, encoder_stages=enc, classifier_stages=enc, **common),
            "dr": dr.DRGrader(num_grades=5, stage_sizes=enc, **common)}


def joint_loss(models: dict, qt, params: dict, batch_stats: dict, step, lbtw, batch: dict, key,
               steps_per_epoch: int):
    """Eq. (3), (11) as the training step computes them, for the state's ``batch_stats``, ``step``
    (int32 scalar) and ``lbtw`` (losses.LBTWState): -> (loss, (metrics, new batch_stats, new lbtw))."""
    def apply(name, x):
        out, upd = models[name].apply({"params": params[name], "batch_stats": batch_stats[name]}, x,
                                      train=True, mutable=["batch_stats"])
        return out, upd["batch_stats"]

    mask = batch["mask"].astype(jnp.float32)
    x = batch["image"].astype(jnp.float32) / 255.0 * mask[..., None]
    quality = batch["quality"]
    degraded = degrade.quality_transform_batch(x, mask, quality, jax.random.split(key, x.shape[0]), qt)
    new_bs, task = {}, {}
    out, new_bs["iqe"] = apply("iqe", degraded)
    enhanced = out["enhanced"] * mask[..., None]
    task["iqe"], metrics = losses.iqe_loss(
        enhanced, x, (quality == 0).astype(jnp.float32), out["vessel_logits"], batch["vessel"].astype(jnp.float32),
        batch["has_vessel"].astype(jnp.float32), mask, lambda_seg=1.0, qe="l2", seg="dice")
    out, new_bs["iqa"] = apply("iqa", layers.grad_reverse(enhanced, jnp.float32(1.0)))
    task["iqa"], terms = losses.iqa_loss(out["quality_logits"], quality, out["lqi"], degraded, mask,
                                         lambda_lqi=1.0, lqi="l2")
    logits, new_bs["dr"] = apply("dr", enhanced)
    task["dr"] = losses.cross_entropy(logits, batch["dr_grade"])
    vector = jnp.stack([task[t] for t in TASKS])
    weights, lbtw = losses.lbtw_weights(vector, lbtw, epoch=step // steps_per_epoch, alpha=0.5, reset="epoch")
    # Eq. (11): the dynamic weights on L_IQE and L_IQA only (renormalised to sum to 2), L_DR at 1.
    dynamic = jnp.asarray([t != "dr" for t in TASKS])
    share = jnp.sum(jnp.where(dynamic, weights, 0.0))
    weights = jnp.where(dynamic, weights * (dynamic.sum() / jnp.where(share > 0, share, 1.0)), 1.0)
    lbtw = lbtw.replace(weights=weights)
    metrics = {**metrics, **terms, **{f"loss_{t}": vector[i] for i, t in enumerate(TASKS)}}
    return losses.combine(vector, weights), (metrics, new_bs, lbtw)


def make_step(models: dict, qt, tx, steps_per_epoch: int = 1000):
    """(state, batch) -> (state, metrics): the joint step with the optimizer update. ``state`` is a
    dict with train_state.TrainState's fields (that module needs the config system, so it is not used)."""

    def step(state, batch):
        key, rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        (loss, (metrics, new_bs, lbtw)), grads = jax.value_and_grad(
            lambda p: joint_loss(models, qt, p, state["batch_stats"], state["step"], state["lbtw"], batch, key,
                                 steps_per_epoch), has_aux=True)(state["params"])
        params, opt_state = {}, {}
        for name, p in state["params"].items():  # one optimizer state per subnetwork, as in training
            updates, opt_state[name] = tx.update(grads[name], state["opt_state"][name], p)
            params[name] = optax.apply_updates(p, updates)
        new = dict(step=state["step"] + 1, params=params, batch_stats={**state["batch_stats"], **new_bs},
                   opt_state=opt_state, lbtw=lbtw, rng=jax.random.key_data(rng))
        return new, {**metrics, "loss": loss}

    return step


def init_state(models: dict, tx, size: int, key) -> dict:
    """The train state of the three subnetworks, initialised at ``size`` (call under jit)."""
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    init_key, state_key = jax.random.split(key)
    params, stats = {}, {}
    for i, name in enumerate(("iqe", "iqa", "dr")):  # stages.stage_nets order for stage 3
        v = models[name].init(jax.random.fold_in(init_key, i), x, train=False)
        params[name], stats[name] = v["params"], v.get("batch_stats", {})
    return dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                opt_state={k: tx.init(p) for k, p in params.items()}, lbtw=losses.lbtw_init(len(TASKS)),
                rng=jax.random.key_data(state_key))


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
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    forms = layers.LayerForms(upsample=args.upsample, stem_pool=args.stem_pool)
    models = build_models(args.width, args.stages, dtype, args.remat == "on", forms)
    init_models = build_models(args.width, args.stages, jnp.float32, False, forms)  # one init program for all
    tx = optax.adam(1e-3)
    start = time.perf_counter()
    state = jax.jit(lambda k: init_state(init_models, tx, INIT_SIZE, k))(jax.random.key(0))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    progress("initialised")
    qt = degrade.QTParams.from_config(None, image_size=args.size)
    batch = jax.device_put(random_batch(args.batch, args.size))
    start = time.perf_counter()
    compiled = jax.jit(make_step(models, qt, tx), donate_argnums=(0,)).lower(state, batch).compile()
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
