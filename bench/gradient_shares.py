"""What stage 3's gradient-share diagnostic (config.log_gradient_shares) costs beside the train step.

    python bench/gradient_shares.py                       # the claim preset's networks at 64 px, batch 16
    python bench/gradient_shares.py --size 128 --batch 4 --set model.width=0.25

Builds the stage-3 train step and `steps.gradient_shares` exactly as training does (one device), feeds both
the same random loader-shaped batch, and prints one JSON line: compile seconds of each, the median of
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
    import numpy as np

    from cleaq_jax.configs import default
    from cleaq_jax.configs.ablations import presets
    from cleaq_jax.models import factory
    from cleaq_jax.training import optim, stages, steps
    from cleaq_jax.training import state as ts

    cfg = default.get_config()
    overrides = {**presets.PRESETS["claim"]["overrides"], "data.image_size": args.size, "batch_size": args.batch}
    overrides.update(dict(s.split("=", 1) for s in args.set))
    for key, value in overrides.items():
        node, *path = cfg, *key.split(".")
        for part in path[:-1]:
            node = node[part]
        old = node[path[-1]]
        node[path[-1]] = type(old)(value) if isinstance(value, str) and not isinstance(old, str) else value
    stage = stages.Stage.from_config(cfg, "stage3", steps_per_epoch=77)
    models = factory.build_models(cfg)
    tx = optim.make_optimizer(stage.optim, stage.steps_per_epoch)
    state = jax.jit(lambda k: ts.init_state(stage, models, tx, k))(jax.random.key(0))
    rng = np.random.default_rng(0)
    s, n = args.size, args.batch
    yy, xx = np.mgrid[:s, :s]
    disc = (((yy - s / 2) ** 2 + (xx - s / 2) ** 2) < (0.48 * s) ** 2).astype(np.uint8)
    batch = jax.tree.map(jnp.asarray, {
        "image": (rng.integers(0, 256, (n, s, s, 3)) * disc[..., None]).astype(np.uint8),
        "mask": np.broadcast_to(disc, (n, s, s)).copy(), "vessel": (rng.random((n, s, s)) < 0.1).astype(np.uint8),
        "has_vessel": np.ones(n, bool), "dr_grade": np.arange(n, dtype=np.int32) % 5,
        "quality": np.arange(n, dtype=np.int32) % 3, "id_hash": np.arange(n, dtype=np.int32), "valid": np.ones(n, bool)})

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
    print(json.dumps({"size": s, "batch": n, "guidance": cfg.loss.iqe_guidance, "compile_step_s": round(compile_step, 2),
                      "compile_shares_s": round(compile_shares, 2), "step_s": round(step_s, 4),
                      "shares_s": round(shares_s, 4), "shares_per_step": round(shares_s / step_s, 2),
                      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "jax": jax.__version__, "load_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
