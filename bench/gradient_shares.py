"""What stage 3's gradient-share diagnostic (config.log_gradient_shares) costs beside the train step.

    python bench/gradient_shares.py                       # the claim preset's networks at 64 px, batch 16
    python bench/gradient_shares.py --size 128 --batch 4 --set model.width=0.25

Builds the stage-3 train step and `steps.gradient_shares` exactly as training does (one device), feeds both
the same random loader-shaped batch (`train_step.random_batch`), and prints one JSON line: compile seconds of each, the median of
``--repeat`` timed calls of each after one untimed call, and their ratio (the cost of one logging step's
shares in train steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_step as tsb  # noqa: E402  (bench/ sibling: the benchmark config and random batches)


def _timed(fn, *args, repeat: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a preset key, as in presets.py")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from cleaq_jax.configs.ablations import presets
    from cleaq_jax.models import factory
    from cleaq_jax.training import optim, stages, steps
    from cleaq_jax.training import state as ts

    # The claim preset's keys (its batch is --batch's), then --set's, typed as the preset's values are.
    preset = {k: v for k, v in presets.PRESETS["claim"]["overrides"].items() if k != "batch_size"}
    given = dict(s.split("=", 1) for s in args.set)
    overrides = {**preset, **{k: type(preset[k])(v) if k in preset else v for k, v in given.items()}}
    cfg = tsb.bench_config("stage3", args.size, args.batch, "float32", False, preset["model.width"], overrides)
    stage = stages.Stage.from_config(cfg, "stage3", steps_per_epoch=77)
    models = factory.build_models(cfg)
    tx = optim.make_optimizer(stage.optim, stage.steps_per_epoch)
    state = jax.jit(lambda k: ts.init_state(stage, models, tx, k))(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, tsb.random_batch(args.batch, args.size, int(cfg.data.num_grades)))

    step = jax.jit(steps.make_train_step(stage, models, tx))
    shares = jax.jit(steps.gradient_shares(stage, models))
    t0 = time.perf_counter()
    step_c = step.lower(state, batch).compile()
    compile_step = time.perf_counter() - t0
    t0 = time.perf_counter()
    shares_c = shares.lower(state, batch).compile()
    compile_shares = time.perf_counter() - t0
    # The step donates nothing here (plain jit), so the same state serves every call.
    step_s = _timed(step_c, state, batch, repeat=args.repeat)
    shares_s = _timed(shares_c, state, batch, repeat=args.repeat)
    print(json.dumps({"size": args.size, "batch": args.batch, "guidance": cfg.loss.iqe_guidance, "compile_step_s": round(compile_step, 2),
                      "compile_shares_s": round(compile_shares, 2), "step_s": round(step_s, 4),
                      "shares_s": round(shares_s, 4), "shares_per_step": round(shares_s / step_s, 2),
                      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "jax": jax.__version__, "load_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
