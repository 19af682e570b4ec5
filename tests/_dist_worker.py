"""Subprocess entry for the multi-device and multi-process tests (run as a script, not by pytest).

The device count must be fixed before jax is imported, hence a separate process:

  meshes   --devices 8: the toy trained 3 steps on 1 device, data=8 and data=4 x fsdp=2
  multi    --devices 2 per process, jax.distributed (explicit flags or JAX_* environment):
           3 steps with per-process data on data=2 x fsdp=2, a checkpoint saved and restored by
           both processes (with --ckpt), then a SIGTERM to the last process only
  save     --devices 8: train 2 steps with data=4 x fsdp=2 and checkpoint them
  loop     a toy loop up to --steps that saves every --save-every steps and on SIGTERM,
           resuming from the latest checkpoint

Results go to --out (a .npz, or JSON for the loop) for the test to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

ARGS = argparse.ArgumentParser()
ARGS.add_argument("mode", choices=("meshes", "multi", "save", "loop"))
ARGS.add_argument("--devices", type=int, default=1)
ARGS.add_argument("--out", required=True)
ARGS.add_argument("--init", choices=("explicit", "env"), default="explicit")
ARGS.add_argument("--coordinator")
ARGS.add_argument("--num-processes", type=int)
ARGS.add_argument("--process-id", type=int)
ARGS.add_argument("--ckpt")
ARGS.add_argument("--save-every", type=int, default=1000)
ARGS.add_argument("--ready")
ARGS.add_argument("--steps", type=int, default=100000)

GLOBAL_BATCH = 8
FSDP_MIN_SIZE = 16  # small enough that the toy's conv and dense kernels are sharded


def _setup(devices: int):
    # The toy runs in milliseconds but compiles in seconds: skip LLVM optimisation to compile fast.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.dirname(here), here]


def _train(mesh, steps, rows=slice(None), initial=None):
    """Trains the toy on `mesh`; each process feeds `rows` of every global batch.

    initial: a state to start from (moved onto this mesh) instead of a fresh sharded init.
    """
    import _toy
    import jax

    from cleaq_jax.runtime import parallel
    from cleaq_jax.training import state as train_state

    if initial is None:
        state, shardings = train_state.sharded_state(
            _toy.init_state, mesh, jax.random.key(0), fsdp_min_size=FSDP_MIN_SIZE
        )
    else:
        shardings = parallel.state_shardings(initial, mesh, fsdp_min_size=FSDP_MIN_SIZE)
        state = jax.device_put(initial, shardings, may_alias=False)  # the step donates it
    step_fn = parallel.jit_train_step(_toy.train_step, shardings, mesh)
    losses = []
    for i in range(steps):
        local = {k: v[rows] for k, v in _toy.make_batch(GLOBAL_BATCH, i).items()}
        state, metrics = step_fn(state, parallel.global_batch(local, mesh))
        losses.append(float(metrics["loss"]))
    return state, shardings, step_fn, losses


def _sharded_leaves(state) -> int:
    return sum(x.sharding.shard_shape(x.shape) != x.shape for x in __import__("jax").tree.leaves(state))


def run_meshes(args):
    import _toy
    import jax
    import numpy as np

    from cleaq_jax.runtime import parallel
    from cleaq_jax.training import state as train_state

    out = {}
    one_device_init = train_state.sharded_state(_toy.init_state, parallel.make_mesh(1, 1, jax.devices()[:1]),
                                                jax.random.key(0))[0]
    # one and fsdp2 initialise independently (sharded init = unsharded init); data8 reuses one's
    # init to save a compile.
    layouts = {"one": (1, 1, jax.devices()[:1], one_device_init), "data8": (-1, 1, None, one_device_init),
               "fsdp2": (-1, 2, None, None)}
    for name, (data, fsdp, devices, initial) in layouts.items():
        mesh = parallel.make_mesh(data, fsdp, devices)
        state, _, _, losses = _train(mesh, 3, initial=initial)
        out[f"{name}_mesh"] = np.asarray([mesh.shape["data"], mesh.shape["fsdp"]])
        out[f"{name}_losses"] = np.asarray(losses)
        out[f"{name}_sharded"] = np.asarray(_sharded_leaves(state))
        for i, leaf in enumerate(_toy.to_numpy(state.batch_stats)):
            out[f"{name}_bn{i}"] = leaf
        for i, leaf in enumerate(_toy.to_numpy(state.params)):
            out[f"{name}_param{i}"] = leaf
    np.savez(args.out, **out)


def run_multi(args):
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from cleaq_jax.runtime import parallel

    if args.init == "explicit":
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    else:
        parallel.initialize_distributed()
    pid, count = jax.process_index(), jax.process_count()
    per = GLOBAL_BATCH // count
    mesh = parallel.make_mesh(-1, 2)  # fsdp across devices, data across processes
    state, shardings, _, losses = _train(mesh, 3, slice(pid * per, (pid + 1) * per))
    gather = lambda tree: [np.asarray(x) for x in jax.tree.leaves(multihost_utils.process_allgather(tree, tiled=True))]
    out = {f"param{i}": p for i, p in enumerate(gather(state.params))}
    out["sharded"] = _sharded_leaves(state)
    if args.ckpt:
        out.update(_multi_checkpoint(args.ckpt, state, shardings, pid, gather))
    out.update(_multi_preemption(pid, count))
    np.savez(args.out, losses=np.asarray(losses), process_count=count, local_devices=jax.local_device_count(), **out)


def _multi_checkpoint(directory, state, shardings, pid, gather):
    """Every process saves (its own data position: pid + 1 elements read) and restores."""
    import _toy
    import grain
    import jax
    import numpy as np

    from cleaq_jax.runtime import checkpoint, parallel

    dataset = grain.MapDataset.range(10).to_iter_dataset()
    data = iter(dataset)
    for _ in range(pid + 1):
        next(data)
    with checkpoint.Checkpointer(directory) as ckpt:
        ckpt.save(3, state, data_iter=data)
        ckpt.wait_until_finished()
        fresh = iter(dataset)
        abstract = jax.eval_shape(_toy.init_state, jax.random.key(0))
        restored, _ = ckpt.restore_intact(parallel.abstract_with_shardings(abstract, shardings), data_iter=fresh)
    numeric = lambda s: (s.step, s.params, s.batch_stats, s.opt_state, jax.random.key_data(s.rng))
    same = all(np.array_equal(a, b) for a, b in zip(gather(numeric(restored)), gather(numeric(state)), strict=True))
    return {"restored_equal": same, "next_after_restore": int(next(fresh))}


def _multi_preemption(pid, count):
    """A SIGTERM to the last process only, at its step 3; every process runs until the guard stops it."""
    from cleaq_jax.runtime.preemption import PreemptionGuard

    with PreemptionGuard() as guard:
        step = 0
        while True:  # the test's deadline guards against a hang
            step += 1
            if step == 3 and pid == count - 1:
                os.kill(os.getpid(), signal.SIGTERM)
            if guard.should_stop(step):
                stopped_at = step
                break
            time.sleep(0.01)  # pacing only: the agreed step does not depend on it
    return {"stopped_at": stopped_at, "received": guard.received}


def run_save(args):
    import _toy
    import numpy as np

    from cleaq_jax.runtime import checkpoint, parallel

    state, _, _, _ = _train(parallel.make_mesh(4, 2), 2)
    with checkpoint.Checkpointer(args.ckpt) as ckpt:
        ckpt.save(2, state)
    np.savez(args.out, sharded=_sharded_leaves(state), **{f"leaf{i}": x for i, x in enumerate(_toy.to_numpy(state))})


def run_loop(args):
    import _toy
    import jax

    from cleaq_jax.runtime import checkpoint, parallel, preemption
    from cleaq_jax.training import state as train_state

    mesh = parallel.make_mesh()
    abstract = jax.eval_shape(_toy.init_state, jax.random.key(0))
    shardings = parallel.state_shardings(abstract, mesh)
    step_fn = parallel.jit_train_step(_toy.train_step, shardings, mesh)
    status = {"resumed_from": 0, "stopped_at": None}
    with checkpoint.Checkpointer(args.ckpt, async_save=True) as ckpt, preemption.PreemptionGuard() as guard:
        if ckpt.latest_step() is not None:  # resuming: no fresh init needed
            state, _ = ckpt.restore_intact(parallel.abstract_with_shardings(abstract, shardings))
            status["resumed_from"] = int(state.step)
        else:
            state, _ = train_state.sharded_state(_toy.init_state, mesh, jax.random.key(0))
        while int(state.step) < args.steps:
            step = int(state.step)
            if guard.should_stop():
                status["saved"] = ckpt.save(step, state, force=True)
                status["stopped_at"] = step
                break
            state, _ = step_fn(state, parallel.global_batch(_toy.make_batch(GLOBAL_BATCH, step), mesh))
            if int(state.step) % args.save_every == 0:
                ckpt.save(int(state.step), state)
            if args.ready and int(state.step) == status["resumed_from"] + 2:
                open(args.ready, "w").close()  # the test may signal from now on
            time.sleep(0.02)
    with open(args.out, "w") as f:
        json.dump(status, f)


if __name__ == "__main__":
    parsed = ARGS.parse_args()
    _setup(parsed.devices)
    {"meshes": run_meshes, "multi": run_multi, "save": run_save, "loop": run_loop}[parsed.mode](parsed)
