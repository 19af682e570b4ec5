"""Train-step benchmark: compile time, step time, images/s, FLOPs, MFU and memory of every stage.

    python bench/train_step.py --stages stage3 --size 128 --batch 4
    python bench/train_step.py --stages stage1,stage2,stage3,teacher_a --size 512 --batch 32 \
        --dtype bfloat16 --remat off,on            # on an accelerator; the peak is looked up
    python bench/train_step.py --size 256 --batch 2 --steps 0     # compile only: FLOPs per image
    python bench/train_step.py --set model.uiqe_blocks=3 ...      # any config key

The step is built exactly as training builds it (``steps.make_train_step`` jitted by
``parallel.jit_train_step`` over a mesh of all devices, state donated) and fed random loader-shaped
batches, so no data files are needed. Each configuration (stage x dtype x remat) runs in a fresh
process, so the backend's peak-memory counter and an out-of-memory failure belong to it alone, and
prints one JSON line:

- ``compile_s``: lowering + XLA compilation (no persistent cache is used).
- ``step_s``: median of ``--steps`` timed steps after ``--warmup`` untimed ones, with min, max and
  the inter-quartile range; ``cpu_s``: process CPU time per step (user + system, all threads), which
  shows how much of the machine the step got when other work shares it.
- ``images_per_s``: global batch / median step time.
- ``flops_per_image``: XLA's cost analysis of the compiled per-device program / per-device batch
  (forward, backward, optimizer and quality transform; 1 multiply-add = 2 FLOPs).
- ``tflops_per_s`` (per device) and ``mfu`` against ``--peak-tflops`` or the table below.
- ``peak_bytes``: the device's peak memory in use (``device.memory_stats()``; absent on CPU) and
  ``xla_temp_bytes`` / ``xla_argument_bytes`` from XLA's memory analysis of the program.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from cleaq_jax import config_checks  # noqa: E402  (no JAX: the flags parse before it loads)

STAGES = config_checks.TRAINING_STAGES
DEFAULT_STAGES = ("stage1", "stage2", "stage3", "teacher_a")  # teacher_b's step is teacher_a's with QT first

# Dense peak TFLOP/s per chip, (bfloat16, float32): NVIDIA float32 is TF32 tensor-core math (XLA's
# default precision for float32 convolutions on those GPUs); TPUs run float32 through bf16 passes,
# so their bf16 figure is the honest ceiling for both. Matched as substrings of device_kind.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 494.5)),
    ("H200", (989.0, 494.5)),
    ("A100", (312.0, 156.0)),
    ("TPU v4", (275.0, 275.0)),
    ("TPU v5 lite", (197.0, 197.0)),
    ("TPU v5e", (197.0, 197.0)),
    ("TPU v5p", (459.0, 459.0)),
    ("TPU v5", (459.0, 459.0)),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES), help=f"comma list of {STAGES}")
    p.add_argument("--size", type=int, default=128, help="image size (multiple of 32)")
    p.add_argument("--batch", type=int, default=4, help="per-device batch")
    p.add_argument("--dtype", default="float32", help="comma list of float32, bfloat16 (compute dtype)")
    p.add_argument("--remat", default="off", help="comma list of off, on")
    p.add_argument("--width", type=float, default=1.0, help="model.width (1 = the paper's networks)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (0: compile and cost analysis only)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak dense TFLOP/s of one device for the MFU (default: looked up; none for CPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of configs/default.py, e.g. model.uiqe_blocks=3")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="seconds allowed per configuration (0: no limit); a late one is recorded as an error")
    p.add_argument("--config-json", help=argparse.SUPPRESS)  # one configuration, in a child process
    args = p.parse_args(argv)
    for stage in _split(args.stages):
        if stage not in STAGES:
            p.error(f"--stages: {stage!r} is not one of {STAGES}")
    for d in _split(args.dtype):
        if d not in ("float32", "bfloat16"):
            p.error(f"--dtype: {d!r} is not float32 or bfloat16")
    for r in _split(args.remat):
        if r not in ("off", "on"):
            p.error(f"--remat: {r!r} is not off or on")
    if args.size % 32:
        p.error(f"--size {args.size}: IQE and IQA need a multiple of 32")
    return args


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# --------------------------------------------------------------------------- config and batch
def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["model.uiqe_blocks=3", ...] -> {"model.uiqe_blocks": 3}; values parsed as Python literals."""
    import ast

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. model.uiqe_blocks=3")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def bench_config(stage: str, size: int, global_batch: int, dtype: str, remat: bool, width: float,
                 overrides: dict[str, Any]):
    """configs/default.py with the benchmark's size, batch, dtype, remat and width, then overrides."""
    from cleaq_jax.configs import default

    cfg = default.get_config()
    cfg.stage, cfg.batch_size = stage, global_batch
    cfg.data.image_size = size
    cfg.model.dtype, cfg.model.remat, cfg.model.width = dtype, remat, width
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = cfg
        for name in path:
            node = node[name] if name in node else None
            if node is None:
                break
        if node is None or last not in node:
            raise SystemExit(f"--set {key}: not a key of configs/default.py")
        try:
            node[last] = value
        except TypeError as e:
            raise SystemExit(f"--set {key}={value!r}: {e}") from None
    return cfg


def random_batch(n: int, size: int, num_grades: int, seed: int = 0) -> dict:
    """A loader-shaped batch (uint8 images and masks, int labels; see docs/input_pipeline.md) of
    uniform noise inside a centred disc, with every quality level and a vessel mask on each image."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = (yy ** 2 + xx ** 2 <= (size / 2) ** 2).astype(np.uint8)
    return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) * disc[..., None],
            "mask": np.repeat(disc[None], n, 0),
            "vessel": (rng.random((n, size, size)) < 0.1).astype(np.uint8) * disc,
            "has_vessel": np.ones(n, bool),
            "dr_grade": (np.arange(n) % num_grades).astype(np.int32),
            "quality": (np.arange(n) % 3).astype(np.int32),
            "id_hash": np.arange(n, dtype=np.int32),
            "valid": np.ones(n, bool)}


# --------------------------------------------------------------------------- build, compile, time
def build_step(cfg, stage: str, steps_per_epoch: int = 1000):
    """The training program's step for ``stage`` over a mesh of all devices.

    Returns (jitted step, state, device batch, mesh); the state is laid out by
    ``train_state.sharded_state`` and the batch by ``parallel.global_batch``, as in training. The
    state is initialised by float32 models without remat: the same tree (dtype and remat change no
    parameter), and one init program for every configuration, so a compilation cache compiles it once.
    """
    import jax
    import ml_collections

    from cleaq_jax.models import factory
    from cleaq_jax.runtime import parallel
    from cleaq_jax.training import optim, stages, steps
    from cleaq_jax.training import state as train_state

    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    models = factory.build_models(cfg)
    described = stages.Stage.from_config(cfg, stage, steps_per_epoch=steps_per_epoch)
    tx = optim.make_optimizer(described.optim, steps_per_epoch)
    init_cfg = ml_collections.ConfigDict(cfg.to_dict())
    init_cfg.model.dtype, init_cfg.model.remat = "float32", False
    init_models = factory.build_models(init_cfg)
    init = lambda k: train_state.init_state(described, init_models, tx, k)  # noqa: E731
    state, shardings = train_state.sharded_state(init, mesh, jax.random.key(int(cfg.seed)))
    jax.block_until_ready(state)
    progress("initialised")
    step = parallel.jit_train_step(steps.make_train_step(described, models, tx), shardings, mesh)
    local = cfg.batch_size // jax.process_count()
    batch = parallel.global_batch(random_batch(local, int(cfg.data.image_size), int(cfg.data.num_grades)),
                                  mesh)
    return step, state, batch, mesh


_START = time.perf_counter()
PHASES: dict[str, float] = {}  # phase -> seconds since start-up, in the record as "phases"


def progress(phase: str) -> None:
    """A line on stderr: how far a configuration got and when (read back when it runs out of time)."""
    PHASES[phase] = round(time.perf_counter() - _START, 1)
    print(json.dumps({"phase": phase, "elapsed_s": PHASES[phase]}), file=sys.stderr, flush=True)


def compile_step(step, state, batch) -> tuple[Any, dict]:
    """Lower and compile; returns (compiled, {compile_s, flops (per device), xla memory bytes})."""
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    info: dict[str, Any] = {"compile_s": time.perf_counter() - start}
    progress("compiled")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    info["flops"] = float(cost.get("flops", 0.0)) if cost else 0.0
    memory = compiled.memory_analysis()
    if memory is not None:
        info["xla_temp_bytes"] = int(memory.temp_size_in_bytes)
        info["xla_argument_bytes"] = int(memory.argument_size_in_bytes)
    return compiled, info


def time_steps(compiled, state, batch, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Run ``warmup`` then ``steps`` steps (each waited for); returns (wall s, process CPU s) per step."""
    import jax

    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics) if warmup else state)
    progress("warmed up")
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), _cpu_seconds()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        wall.append(time.perf_counter() - t)
        cpu.append(_cpu_seconds() - c)
    return wall, cpu


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def peak_tflops(device_kind: str, dtype: str, override: float) -> tuple[float | None, str]:
    """(peak dense TFLOP/s of one device for ``dtype``, where the figure comes from)."""
    if override > 0:
        return override, "--peak-tflops"
    for name, (bf16, fp32) in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return (bf16 if dtype == "bfloat16" else fp32), f"table: {name} {dtype}"
    return None, "unknown device: pass --peak-tflops (a CPU's peak depends on its cores and clock)"


def device_peak_bytes(devices) -> int | None:
    """Largest peak memory in use over the local devices, where the backend reports it."""
    peaks = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


# --------------------------------------------------------------------------- one configuration
def measure(stage: str, args: argparse.Namespace, dtype: str, remat: bool) -> dict[str, Any]:
    """Build, compile and time one configuration in this process; returns its JSON record."""
    import jax

    devices = jax.devices()
    progress(f"backend {devices[0].platform} ready")
    cfg = bench_config(stage, args.size, args.batch * len(devices), dtype, remat, args.width,
                       parse_overrides(args.set))
    step, state, batch, _ = build_step(cfg, stage)
    compiled, info = compile_step(step, state, batch)
    wall, cpu = time_steps(compiled, state, batch, args.warmup, args.steps) if args.steps else ([], [])
    kind = devices[0].device_kind
    peak, source = peak_tflops(kind, dtype, args.peak_tflops)
    record: dict[str, Any] = dict(
        stage=stage, size=args.size, batch_per_device=args.batch, global_batch=cfg.batch_size,
        devices=len(devices), platform=devices[0].platform, device_kind=kind, dtype=dtype,
        remat=remat, width=args.width, overrides=args.set, compile_s=round(info["compile_s"], 2),
        flops_per_image=info["flops"] / args.batch, peak_tflops=peak, peak_source=source)
    if wall:
        median = statistics.median(wall)
        q = statistics.quantiles(wall, n=4) if len(wall) > 1 else [median] * 3
        record.update(step_s=round(median, 4), step_s_min=round(min(wall), 4),
                      step_s_max=round(max(wall), 4), step_s_iqr=round(q[2] - q[0], 4),
                      cpu_s=round(statistics.median(cpu), 3), steps=len(wall),
                      images_per_s=round(cfg.batch_size / median, 3),
                      tflops_per_s=round(info["flops"] / median / 1e12, 4))
        record["mfu"] = round(record["tflops_per_s"] / peak, 4) if peak else None
    record["peak_bytes"] = device_peak_bytes(jax.local_devices())
    record["phases"] = dict(PHASES)
    record.update({k: info[k] for k in ("xla_temp_bytes", "xla_argument_bytes") if k in info})
    return record


def _run_child(config: dict, args_list: list[str], timeout: float) -> dict[str, Any]:
    """One configuration in a fresh interpreter; a failure (out of memory, time-out) becomes its record."""
    cmd = [sys.executable, os.path.abspath(__file__), *args_list, "--config-json", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout or None)
    except subprocess.TimeoutExpired as late:
        phases = _phases(late.stderr)
        reached = f"; it had reached {phases[-1]['phase']!r} at {phases[-1]['elapsed_s']} s" if phases else ""
        return {**config, "error": f"no result within --timeout {timeout:g} s{reached}", "phases": phases}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = any(w in (proc.stderr or "") for w in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))
    return {**config, "error": "out of memory" if oom else f"exit {proc.returncode}: {' | '.join(tail)}"}


def _phases(stderr: bytes | str | None) -> list[dict]:
    """The progress lines a child printed on stderr."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    return [json.loads(l) for l in text.splitlines() if l.startswith('{"phase"')]


def _context() -> dict[str, Any]:
    """Where and when: commit, host, load average, UTC time (added to every record)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return dict(commit=commit, host=platform.machine(), cpus=os.cpu_count(), load_1min=load,
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.config_json:
        c = json.loads(args.config_json)
        record = measure(c["stage"], args, c["dtype"], c["remat"])
        print(json.dumps({**record, **_context()}), flush=True)
        return
    for stage in _split(args.stages):
        for dtype in _split(args.dtype):
            for remat in _split(args.remat):
                config = dict(stage=stage, dtype=dtype, remat=remat == "on", size=args.size,
                              batch_per_device=args.batch)
                print(json.dumps({**_run_child(config, argv, args.timeout), **_context()}), flush=True)


if __name__ == "__main__":
    main()
