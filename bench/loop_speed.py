"""Training-loop speed against the bare step, in one process: what the loop adds between steps.

    python bench/loop_speed.py --config=configs/demo.py --workdir=/tmp/loop_demo
    python bench/loop_speed.py --config=configs/demo.py --workdir=/tmp/loop_demo --config.data.dir=DEMO/data
    python bench/loop_speed.py --config=configs/ablations/cleaq_dr.py --preset=bench --workdir=/tmp/loop_bench
    python bench/loop_speed.py ... --stage stage1 --steps 40 --trace /tmp/trace   # any stage; a profiler trace

One process, one config (``--config`` and ``--config.KEY=VALUE`` overrides as ``cleaq-run`` takes them;
``--preset`` lays an ablation preset of configs/ablations/presets.py under them, its synthetic data size
included), three measurements of the same stage on the same machine load:

- ``bare``: the jitted train step as training builds and compiles it, on one device-resident batch from
  the stage's loader, called ``--steps`` times back to back and waited for once at the end (after
  ``--warmup`` untimed calls; compilation excluded): what the step alone sustains.
- ``fed``: the same compiled step fed by the loader through `parallel.prefetch_to_device`, as the loop
  feeds it, and nothing else: what decoding in the same process costs the step.
- ``loop``: the stage's loop itself (`cleaq_jax.programs.train.train_stage`, its end-of-stage evaluation
  off) for the config's steps, timed from its first step (after compilation) to the progress line of its
  last step, which waits for the last step's metrics. ``loop_steps_per_s`` counts everything in between,
  periodic work included; the time in that work (the image grid, validation, checkpoint saves and the
  gradient-share diagnostic) is measured apart (``periodic_s``, and each call's seconds in
  ``periodic_calls``), and ``loop_plain_steps_per_s`` leaves it out: the loop's rate between its periodic
  events. The metric fetch at each logging step is listed too but not left out: it waits for the
  interval's steps. ``intervals`` gives each progress line's rate.

The bare measurement runs again after the loop (``bare_after``) so a change in the machine's load shows.
``ratio`` = loop_plain / mean(bare, bare_after); ``ratio_all`` counts the periodic work too. ``*_cpu_s``
are the process's CPU seconds (all threads) per step of each measurement, which other work on a shared
machine disturbs less than wall time: ``loop_plain_cpu_s`` above ``bare_cpu_s`` is host work the loop adds.

Data: the config's (synthetic data is built under ``--workdir`` on first use; reuse a built set with
``--config.data.dir``). A stage that starts from earlier ones (stage 3 from stages 1 and 2) finds their
checkpoints where the config says (``config.init.stage1``, ...) or in ``--workdir``; where none is, the
bench writes freshly initialised ones there (the speed of a step does not depend on the weights). The
loop writes ``<workdir>/<stage>``, which is deleted before it starts. The step is compiled once: a
persistent compilation cache in ``<workdir>/jax_cache``, emptied at the start, serves the loop's
compilation of the same program; the loop compiles everything else as a stage's first run does.

Prints a JSON line with the three rates, the ratios, the periodic work's seconds and the 1-minute load
average at the start and at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_step as tsb  # noqa: E402  (bench/ sibling: where and when a figure was taken)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Config overrides: --config.KEY=VALUE.")
    p.add_argument("--config", required=True, help="a config file or a shipped config's name (configs/demo.py)")
    p.add_argument("--preset", default="", help="an ablation preset (configs/ablations/presets.py), e.g. bench")
    p.add_argument("--workdir", required=True, help="data, earlier stages' checkpoints and the loop's stage directory")
    p.add_argument("--stage", default="stage3", help="the stage to time (default stage3)")
    p.add_argument("--steps", type=int, default=60, help="timed bare and fed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed bare steps after compilation")
    p.add_argument("--loop-epochs", type=int, default=0,
                   help="train the loop for this many epochs (0: the config's num_epochs); the schedule follows")
    p.add_argument("--trace", default="", help="a jax.profiler trace of the loop's steps into this directory")
    p.add_argument("--no-cache", action="store_true", help="no persistent compilation cache (the loop compiles again)")
    args, rest = p.parse_known_args(argv)
    from cleaq_jax.programs.ablations import plan

    return args, plan.parse_overrides(rest)


def load_config(args: argparse.Namespace, overrides: dict[str, str]):
    """The config file with the preset's overrides and synthetic-data size, then the command line's."""
    from cleaq_jax.programs.ablations import plan

    settings: dict[str, str] = {}
    if args.preset:
        preset = plan.preset_settings(args.preset)
        settings.update({k: plan.flag_value(v) for k, v in preset["overrides"].items()})
        data = preset.get("data", {})
        for key, name in (("num", "data.synthetic.num"), ("size", "data.image_size"),
                          ("lesion_scale", "data.synthetic.lesion_scale")):
            if key in data:
                settings[name] = plan.flag_value(data[key])
        for split, fraction in data.get("splits", {}).items():
            settings[f"data.synthetic.splits.{split}"] = plan.flag_value(fraction)
    settings.update(overrides)
    cfg = plan.load_config(args.config, settings)
    if args.loop_epochs:
        cfg.num_epochs = args.loop_epochs
        cfg.optim.constant_epochs = min(int(cfg.optim.constant_epochs), args.loop_epochs)
    cfg.eval_at_end = False
    return cfg


# --------------------------------------------------------------------------- earlier stages
def ensure_earlier_stages(cfg, workdir: str, name: str) -> None:
    """Freshly initialised checkpoints of the stages ``name`` starts from, where neither the config nor
    ``workdir`` has them (step 0, the stage's own config beside them)."""
    import jax

    from cleaq_jax.models import factory
    from cleaq_jax.programs import train
    from cleaq_jax.runtime import checkpoint, parallel
    from cleaq_jax.training import optim, stages
    from cleaq_jax.training import state as ts

    for source, _ in stages.INIT_FROM.get(name, ()):
        directory = cfg.init[source] or os.path.join(workdir, source)
        if checkpoint.saved_steps(os.path.join(directory, "checkpoints")):
            continue
        stage, saved = train.describe(cfg, workdir, source)
        mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
        models = factory.build_models(cfg)
        tx = optim.make_optimizer(stage.optim, stage.steps_per_epoch)
        state, _ = ts.sharded_state(functools.partial(ts.init_state, stage, models, tx), mesh, jax.random.key(stage.seed))
        with checkpoint.Checkpointer(os.path.join(directory, "checkpoints"), max_to_keep=1) as ckpt:
            ckpt.save(0, state, config=saved, force=True)
        print(f"{source}: freshly initialised checkpoint written to {directory}", file=sys.stderr)


# --------------------------------------------------------------------------- bare and fed steps
def cpu_seconds() -> float:
    """This process's CPU time so far (user + system, every thread)."""
    t = os.times()
    return t.user + t.system


def _bench_cache(workdir: str) -> None:
    """A persistent compilation cache of this run alone: the loop finds the step the bare measurement
    compiled, and compiles everything else as a first run of the stage does."""
    import jax

    path = os.path.join(os.path.abspath(workdir), "jax_cache")
    shutil.rmtree(path, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class Step:
    """The stage's step built and compiled as `train.train_stage` builds it, a fresh state, and the loader."""

    def __init__(self, cfg, workdir: str, name: str):
        import jax

        from cleaq_jax.data import pipeline
        from cleaq_jax.models import factory
        from cleaq_jax.programs import train
        from cleaq_jax.runtime import parallel
        from cleaq_jax.training import optim, steps
        from cleaq_jax.training import state as ts

        stage, _ = train.describe(cfg, workdir, name)
        self.stage, self.mesh = stage, parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
        self.loader = lambda: pipeline.train_loader(stage.data_dir, stage.train_split, global_batch_size=stage.batch_size,
                                                    sampling=stage.sampling, reading=stage.reading)
        models = factory.build_models(cfg)
        tx = optim.make_optimizer(stage.optim, stage.steps_per_epoch)
        init = lambda k: ts.init_state(stage, models, tx, k)  # noqa: E731
        self.state, shardings = ts.sharded_state(init, self.mesh, jax.random.key(stage.seed))
        self.batch = parallel.global_batch(next(iter(self.loader())), self.mesh)
        jitted = parallel.jit_train_step(steps.make_train_step(stage, models, tx), shardings, self.mesh)
        start = time.perf_counter()
        self.step = jitted.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start

    def bare(self, steps: int, warmup: int) -> tuple[float, float]:
        """(steps/s, process CPU s per step) of ``steps`` calls on the one batch, dispatched back to back,
        waited for at the end."""
        import jax

        state = self.state
        for _ in range(warmup):
            state, metrics = self.step(state, self.batch)
        jax.block_until_ready((state, metrics) if warmup else state)
        start, cpu = time.perf_counter(), cpu_seconds()
        for _ in range(steps):
            state, metrics = self.step(state, self.batch)
        jax.block_until_ready((state, metrics))
        self.state = state
        return steps / (time.perf_counter() - start), (cpu_seconds() - cpu) / steps

    def fed(self, steps: int) -> tuple[float, float]:
        """(steps/s, process CPU s per step) of ``steps`` calls on the loader's batches through the device
        prefetcher (2 ahead)."""
        import jax

        from cleaq_jax.runtime import parallel

        batches = parallel.prefetch_to_device(iter(self.loader()), 2, self.mesh)
        try:
            state, batch = self.state, next(batches)
            state, metrics = self.step(state, batch)
            jax.block_until_ready((state, metrics))
            start, cpu = time.perf_counter(), cpu_seconds()
            for _ in range(steps):
                state, metrics = self.step(state, next(batches))
            jax.block_until_ready((state, metrics))
            self.state = state
            return steps / (time.perf_counter() - start), (cpu_seconds() - cpu) / steps
        finally:
            batches.close()


# --------------------------------------------------------------------------- the loop
class _Timed:
    """Seconds spent in the wrapped callables, by name, while the loop runs."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, list[float]] = {}

    def wrap(self, owner: Any, attribute: str, name: str, stack: contextlib.ExitStack) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), cpu_seconds()
            try:
                return original(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                self.seconds[name] = self.seconds.get(name, 0.0) + took
                self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds() - cpu
                self.calls.setdefault(name, []).append(round(took, 2))

        setattr(owner, attribute, timed)
        stack.callback(setattr, owner, attribute, original)


def run_loop(cfg, workdir: str, name: str, trace: str = "") -> dict[str, Any]:
    """`train.train_stage` for the config's steps, timed between its first step and its last progress line."""
    from cleaq_jax.evaluation import inference
    from cleaq_jax.programs import train
    from cleaq_jax.runtime import checkpoint, console

    directory = os.path.join(workdir, name)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    marks: list[tuple[int, float, float]] = []  # (step, time, CPU): the loop's first step, then each progress line

    class Recording(console.StageProgress):
        def start(self):
            super().start()
            marks.append((self._step, time.perf_counter(), cpu_seconds()))

        def report(self, step, metrics):
            marks.append((step, time.perf_counter(), cpu_seconds()))  # the metrics are on the host: the step is done
            super().report(step, metrics)

    timed = _Timed()
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, train.console, "StageProgress", console.StageProgress)
        train.console.StageProgress = Recording
        timed.wrap(inference, "enhancement_panels", "image_grid", stack)
        timed.wrap(train._Validation, "__call__", "validation", stack)
        timed.wrap(checkpoint.Checkpointer, "save", "checkpoint_save", stack)
        timed.wrap(train._Log, "flush", "metric_fetch_and_write", stack)
        timed.wrap(train._Log, "write_shares", "gradient_shares", stack)
        if trace:
            import jax

            stack.enter_context(jax.profiler.trace(trace))
        train.train_stage(cfg, workdir, name)
    (first, t0, c0), (last, t1, c1) = marks[0], marks[-1]
    intervals = [round((b - a) / (tb - ta), 3) for (a, ta, _), (b, tb, _) in zip(marks, marks[1:]) if b > a]
    # The progress lines' flush is the loop's own per-interval fetch (it waits for the interval's steps);
    # the rest is periodic work.
    periodic = sum(v for k, v in timed.seconds.items() if k != "metric_fetch_and_write")
    periodic_cpu = sum(v for k, v in timed.cpu.items() if k != "metric_fetch_and_write")
    steps = last - first
    return dict(loop_steps=steps, loop_s=round(t1 - t0, 2),
                loop_steps_per_s=round(steps / (t1 - t0), 3),
                loop_plain_steps_per_s=round(steps / (t1 - t0 - periodic), 3),
                loop_cpu_s=round((c1 - c0) / steps, 4), loop_plain_cpu_s=round((c1 - c0 - periodic_cpu) / steps, 4),
                intervals=intervals, periodic_s={k: round(v, 2) for k, v in sorted(timed.seconds.items())},
                periodic_calls=dict(sorted(timed.calls.items())))


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    load_start = os.getloadavg()[0]
    from cleaq_jax.runtime import console

    console.setup(verbose=False)
    cfg = load_config(args, overrides)
    os.makedirs(args.workdir, exist_ok=True)
    if not args.no_cache:
        _bench_cache(args.workdir)
    import jax

    ensure_earlier_stages(cfg, args.workdir, args.stage)
    step = Step(cfg, args.workdir, args.stage)
    print(f"{args.stage}: step compiled in {step.compile_s:.1f} s; {step.stage.steps_per_epoch} steps/epoch, "
          f"{step.stage.total_steps} in the loop", file=sys.stderr)
    bare, bare_cpu = step.bare(args.steps, args.warmup)
    fed, fed_cpu = step.fed(args.steps)
    print(f"bare {bare:.3f} steps/s, fed {fed:.3f} steps/s", file=sys.stderr)
    loop = run_loop(cfg, args.workdir, args.stage, args.trace)
    bare_after, bare_after_cpu = step.bare(args.steps, 0)
    mean_bare = (bare + bare_after) / 2
    record = dict(config=args.config, preset=args.preset or None, overrides=overrides, stage=args.stage,
                  batch_size=int(cfg.batch_size), image_size=int(cfg.data.image_size),
                  platform=jax.devices()[0].platform, devices=jax.device_count(),
                  compile_s=round(step.compile_s, 1), bare_steps_per_s=round(bare, 3),
                  bare_after_steps_per_s=round(bare_after, 3), fed_steps_per_s=round(fed, 3),
                  bare_cpu_s=round(bare_cpu, 4), bare_after_cpu_s=round(bare_after_cpu, 4), fed_cpu_s=round(fed_cpu, 4),
                  **loop,
                  ratio=round(loop["loop_plain_steps_per_s"] / mean_bare, 3),
                  ratio_all=round(loop["loop_steps_per_s"] / mean_bare, 3),
                  load_1min_start=round(load_start, 2), load_1min_end=round(os.getloadavg()[0], 2), **tsb._context())
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
