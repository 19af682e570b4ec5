"""Launching at scale (docs/launch.md, scripts/): the commands the doc gives, run here on CPU devices.

- one process driving every local device, two processes joined by explicit coordinator flags
  (scripts/multi_gpu.sh, as on a GPU host or cluster), and two SLURM tasks joined through SLURM's
  variables (scripts/slurm_task.sh, as srun starts them): each trains two steps of a tiny stage 1 and
  writes a checkpoint that this single process restores;
- input at scale: each process reads only its own share of the shards;
- the launch scripts' own behaviour (process groups, signals, GPU shares, quoting).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import grain
import jax
import numpy as np
import portpicker
import pytest

from cleaq_jax.data import pipeline
from cleaq_jax.data import shards
from cleaq_jax.models import factory
from cleaq_jax.runtime import checkpoint, parallel
from cleaq_jax.training import optim, stages
from cleaq_jax.training import state as train_state
from tests import tiny

DOC = os.path.join(tiny.REPO, "docs", "launch.md")
SBATCH = os.path.join(tiny.REPO, "scripts", "slurm_train.sbatch")  # sbatch runs a copy, from the submit dir
TIMEOUT = 1200  # seconds per launch: XLA compiles the step in every process on two shared cores

# The doc's commands, verbatim (test_doc_gives_the_commands_these_tests_run); the shell expands the variables.
SINGLE_CMD = "python -m cleaq_jax.main --config=$CONFIG --workdir=$WORKDIR --config.data.dir=$DATA"
EXPLICIT_CMD = ("scripts/multi_gpu.sh --num-processes $NUM_PROCESSES --port $PORT -- "
                "--config=$CONFIG --workdir=$WORKDIR --config.data.dir=$DATA")
SLURM_TASK_CMD = "scripts/slurm_task.sh --config=$CONFIG --workdir=$WORKDIR --config.data.dir=$DATA"
# Appended to each: stage 1 of DR alone at 32 px and width 1/16, two steps of 8 images, a checkpoint after each.
TINY = ("--config.data.image_size=32 --config.model.width=0.0625 --config.model.encoder_stages='(1,1,1,1)' "
        "--config.model.classifier_stages='(1,1,1,1)' --config.tasks.iqe=False --config.batch_size=8 "
        "--config.num_epochs=1 --config.eval_at_end=False --config.image_every_steps=0 "
        "--config.log_every_steps=1 --config.checkpoint_every_steps=1")
TRAIN_RECORDS = 16  # two global batches of 8


# --------------------------------------------------------------------------- data
def write_split(out: str, split: str, num: int, size: int, seed: int = 0, num_shards: int = 4) -> None:
    """``num`` records of random images inside a disc (incompressible, so bytes track records)."""
    batch = tiny.random_batch(num, size, seed=seed)
    with shards.ShardWriter(out, "launch", split, num_shards=num_shards) as writer:
        for i in range(num):
            writer.write({"image": batch["image"][i], "mask": batch["mask"][i], "vessel": batch["vessel"][i],
                          "dr_grade": int(batch["dr_grade"][i]), "quality": int(batch["quality"][i]),
                          "id": f"{split}-{i:05d}", "source": "launch"})


def shard_bytes(data_dir: str, split: str) -> int:
    return sum(os.path.getsize(p) for p in shards.split_shards(data_dir, split))


# --------------------------------------------------------------------------- the three launches
def _env(devices: int, *, compile_cache: bool = True, **extra: str) -> dict[str, str]:
    """A child's environment: ``devices`` CPU devices, no inherited multi-process settings, ``extra``.

    compile_cache=False leaves out the test run's shared compilation cache (JAX_COMPILATION_CACHE_DIR), so the
    command's config.compilation_cache_dir decides; a multi-process CPU job turns the cache off whatever it
    says: jax writes the persistent cache from process 0 only, so a warm cache lets process 0 reach the first
    collective long before the others, past the 30 s within which gloo's CPU collectives must all join.
    """
    env = tiny.subprocess_env(devices, CONFIG="configs/stage1.py", PYTHON=sys.executable)
    # Tiny models: compiling fast matters more than running fast (and keeps the processes in step).
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    for name in [n for n in env if n.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS", "SLURM_"))]:
        del env[name]
    if not compile_cache:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.update(extra)
    return env


def _start(command: str, env: dict[str, str], log: str, extra: str = "") -> subprocess.Popen:
    """``command`` with TINY's flags, then ``extra`` (later flags win), its output in ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen(["bash", "-c", f"{command} {TINY} {extra}"], cwd=tiny.REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: str) -> None:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode != 0:
        with open(log) as f:
            raise AssertionError(f"{log} exited with {proc.returncode}:\n{f.read()[-6000:]}")


def _slurm_port() -> int:
    """A free port that jax's SLURM detection derives from a job id: 61440 + job id mod 4096."""
    candidates = list(range(61440, 65536))
    random.shuffle(candidates)
    return next(p for p in candidates if portpicker.is_port_free(p))


def _slurm_task_env(rank: int, port: int, **extra: str) -> dict[str, str]:
    """What srun sets for task ``rank`` of 2 on one node (the variables jax's SLURM detection reads)."""
    return _env(2, compile_cache=False, SLURM_JOB_ID=str(port - 61440), SLURM_NTASKS="2",
                SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_STEP_NODELIST="localhost",
                SLURM_STEP_NUM_NODES="1", SLURM_STEP_TASKS_PER_NODE="2", **extra)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Runs the single-process and the flag-started 2-process job side by side, then the SLURM-started
    job; returns their workdirs."""
    tmp = tmp_path_factory.mktemp("launch")
    data = str(tmp / "data")
    write_split(data, "train", TRAIN_RECORDS, 32)
    write_split(data, "test", 8, 32, seed=1)
    work = {name: str(tmp / name) for name in ("single", "explicit", "slurm")}
    started: list[subprocess.Popen] = []
    try:
        # Each job names its own compilation cache by the config key (test_compilation_cache_...).
        started.append(_start(SINGLE_CMD, _env(4, compile_cache=False, WORKDIR=work["single"], DATA=data),
                              str(tmp / "single.log"), f"--config.compilation_cache_dir={tmp / 'xla_single'}"))
        explicit_env = _env(2, compile_cache=False, WORKDIR=work["explicit"], DATA=data, NUM_PROCESSES="2",
                            PORT=str(portpicker.pick_unused_port()))
        started.append(_start(EXPLICIT_CMD, explicit_env, str(tmp / "explicit.log"),
                              f"--config.compilation_cache_dir={tmp / 'xla_explicit'}"))
        _finish(started[1], str(tmp / "explicit.log"))
        port = _slurm_port()
        for rank in range(2):
            env = _slurm_task_env(rank, port, WORKDIR=work["slurm"], DATA=data)
            started.append(_start(SLURM_TASK_CMD, env, str(tmp / f"slurm{rank}.log"),
                                  f"--config.compilation_cache_dir={tmp / 'xla_slurm'}"))
        _finish(started[2], str(tmp / "slurm0.log"))
        _finish(started[3], str(tmp / "slurm1.log"))
        _finish(started[0], str(tmp / "single.log"))
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {"work": work, "tmp": tmp}


def _stage1_init():
    """init(key) -> the train state TINY's stage 1 starts from (DR alone), as programs/train.py builds it."""
    cfg = tiny.tiny_config(stage="stage1", **{"tasks.iqe": False})
    models = factory.build_models(cfg)
    stage1 = tiny.stage(cfg, "stage1")
    return lambda key: train_state.init_state(stage1, models, optim.make_optimizer(stage1.optim, 1), key)


def _by_path(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _restored_state(workdir: str, step: int):
    """The stage-1 checkpoint of ``workdir`` at ``step`` restored onto this process's one device."""
    abstract = jax.eval_shape(_stage1_init(), jax.random.key(0))
    target = parallel.abstract_with_shardings(abstract, parallel.state_shardings(abstract, parallel.make_mesh()))
    state = checkpoint.restore_state(os.path.join(workdir, "stage1", "checkpoints"), target, step=step)
    assert int(state.step) == step
    return state


@pytest.fixture(scope="module")
def states(launched):
    """{launch: {step: train state}} after each of the two steps."""
    return {name: {step: _restored_state(path, step) for step in (1, 2)} for name, path in launched["work"].items()}


@pytest.mark.slow
def test_two_processes_started_with_coordinator_flags_train_what_one_process_trains(states):
    single, explicit = states["single"], states["explicit"]
    initial = _stage1_init()(jax.random.key(stages.stage_seed(tiny.tiny_config(), "stage1")))
    assert _by_path(single[2].params).keys() == _by_path(explicit[2].params).keys() == _by_path(initial.params).keys()
    assert np.abs(_flat(single[2].params) - _flat(initial.params)).mean() > 1e-4, "no step was trained"
    # The first step, from the same initial state on the same 8 images (4 devices in one process vs 2 x 2):
    # its gradient (Adam's first moment after one step is (1 - b1) x the gradient) and the BatchNorm
    # statistics it measured. Parameters after an Adam step are not compared: Adam's first update is about
    # lr x sign(gradient), and round-off picks that sign wherever a gradient is zero up to round-off.
    for what, get in (("gradient", lambda s: s.opt_state["dr"][0].mu),
                      ("BatchNorm statistics", lambda s: s.batch_stats)):
        difference = tiny.relative_difference(_flat(get(explicit[1])), _flat(get(single[1])))
        assert difference <= tiny.LAYOUT_RTOL, f"{what} of the first step differ by {difference:.2e} (relative)"


@pytest.mark.slow
def test_compilation_cache_dir_keeps_a_single_process_programs_and_a_cpu_job_of_two_processes_leaves_it_empty(launched):
    """config.compilation_cache_dir reaches jax (runtime.compile_cache); a multi-process CPU job turns the cache
    off (parallel.initialize_distributed: with jaxlib 0.12 a warm cache hangs its first collective)."""
    tmp = launched["tmp"]
    assert [p for p in (tmp / "xla_single").iterdir() if p.name.endswith("-cache")], "the single process cached nothing"
    for job in ("xla_explicit", "xla_slurm"):
        assert not (tmp / job).exists() or not any((tmp / job).iterdir()), f"{job}: a multi-process CPU job cached"


@pytest.mark.slow
def test_slurm_variables_start_the_same_job_as_coordinator_flags(states):
    explicit, slurm = _by_path(states["explicit"][2].params), _by_path(states["slurm"][2].params)
    assert explicit.keys() == slurm.keys()
    for key in explicit:
        np.testing.assert_array_equal(slurm[key], explicit[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name, how", [("explicit", "explicit"), ("slurm", "SLURM")])
def test_each_launch_joins_two_processes_of_two_devices(launched, name, how):
    logs = ([os.path.join(launched["work"]["explicit"], "logs", f"process_{i}.log") for i in range(2)]
            if name == "explicit" else [str(launched["tmp"] / f"slurm{i}.log") for i in range(2)])
    for i, log in enumerate(logs):
        with open(log) as f:
            text = f.read()
        assert f"jax.distributed initialised ({how}): process {i} of 2, 2 local / 4 global devices" in text


def _logged_step(log: str, proc: subprocess.Popen) -> int:
    """The step of the last per-interval line in ``log`` (0 before the first)."""
    with open(log) as f:
        found = re.findall(r"^stage1 epoch \d+/\d+ step (\d+)/", f.read(), flags=re.M)
    if not found and proc.poll() is not None:
        raise AssertionError(f"{log}: the process ended (status {proc.returncode}) before its first step")
    return int(found[-1]) if found else 0


def _saved_on_stop(log: str) -> int:
    with open(log) as f:
        found = re.findall(r"stage1: SIGTERM received; saved step (\d+) and stopping", f.read())
    assert len(found) == 1, f"{log}: no single preemption save:\n{open(log).read()[-3000:]}"
    return int(found[0])


@contextlib.contextmanager
def _slurm_job(work: str, data: str, logs: list[str], extra: str):
    """Two SLURM-started tasks of TINY's stage 1 plus ``extra`` flags; any still running on leaving is killed."""
    port = _slurm_port()
    procs = [_start(SLURM_TASK_CMD, _slurm_task_env(rank, port, WORKDIR=work, DATA=data), logs[rank], extra)
             for rank in range(2)]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
def test_sigterm_to_one_process_saves_every_process_at_one_step_and_the_rerun_resumes_there(tmp_path):
    data = str(tmp_path / "data")
    write_split(data, "train", TRAIN_RECORDS, 32)
    work = str(tmp_path / "work")
    logs = [str(tmp_path / f"task{rank}.log") for rank in range(2)]
    # 400 steps, no checkpoint before the notice: the save the notice triggers is the only one.
    with _slurm_job(work, data, logs, "--config.num_epochs=200 --config.checkpoint_every_steps=100000") as procs:
        deadline = time.monotonic() + TIMEOUT
        while _logged_step(logs[0], procs[0]) < 3:  # training, past compilation, in both processes
            assert time.monotonic() < deadline, "no training step logged before the deadline"
            time.sleep(0.2)
        os.killpg(procs[1].pid, signal.SIGTERM)  # process 1 only
        for proc, log in zip(procs, logs, strict=True):
            _finish(proc, log)
    saved = [_saved_on_stop(log) for log in logs]
    assert saved[0] == saved[1] > 3, saved
    step = saved[0]
    checkpoints = os.path.join(work, "stage1", "checkpoints")
    assert sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit()) == [step]
    positions = [f for f in os.listdir(os.path.join(checkpoints, str(step), "data")) if f.startswith("process_")]
    assert sorted(positions) == ["process_0-of-2.json", "process_1-of-2.json"]
    # The rerun (same job, a step or two to go) resumes from that step in both processes.
    with _slurm_job(work, data, logs, f"--config.num_epochs={step // 2 + 1}") as procs:
        for proc, log in zip(procs, logs, strict=True):
            _finish(proc, log)
    with open(logs[0]) as f:
        assert f"stage1: resumed from step {step}" in f.read()
    assert max(int(d) for d in os.listdir(checkpoints) if d.isdigit()) == 2 * (step // 2 + 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["explicit", "slurm"])
def test_checkpoint_keeps_the_data_position_of_every_process(launched, name):
    data = os.path.join(launched["work"][name], "stage1", "checkpoints", "2", "data")
    assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == ["process_0-of-2.json", "process_1-of-2.json"]


# --------------------------------------------------------------------------- input at scale
class _CountingSource(grain.sources.ArrayRecordDataSource):
    """The loader's ArrayRecord source, recording every record index it is asked for."""

    read: list[int] = []

    def __getitem__(self, key):
        _CountingSource.read.append(int(key))
        return super().__getitem__(key)

    def __getitems__(self, keys):
        _CountingSource.read.extend(int(k) for k in keys)
        return super().__getitems__(keys)


@pytest.fixture(scope="module")
def input_data(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("input") / "data")
    write_split(data, "train", 64, 32)
    return data


def _one_epoch(data: str, process_index: int, process_count: int, class_balance: float = 0.0) -> None:
    sampling = pipeline.EpochSampling(seed=0, class_balance=class_balance, augment=False)
    loader = pipeline.train_loader(data, "train", global_batch_size=16, sampling=sampling,
                                   reading=pipeline.RecordReading(process_index=process_index,
                                                                  process_count=process_count, read_threads=0))
    batches = pipeline.num_batches_per_epoch(data, "train", global_batch_size=16, sampling=sampling)
    for _ in range(batches):
        next(loader)
    loader.close()


@pytest.mark.parametrize("process_count", [2, 4])
def test_each_process_reads_its_own_disjoint_share_of_the_records(input_data, monkeypatch, process_count):
    monkeypatch.setattr(grain.sources, "ArrayRecordDataSource", _CountingSource)
    shares = []
    for p in range(process_count):
        _CountingSource.read = []
        _one_epoch(input_data, p, process_count)
        shares.append(list(_CountingSource.read))
    assert [len(s) for s in shares] == [64 // process_count] * process_count
    assert all(len(set(s)) == len(s) for s in shares), "a process read a record twice in one epoch"
    assert sorted(i for s in shares for i in s) == list(range(64))


def _bytes_read() -> int:
    """Bytes this process has read through system calls (Linux /proc/self/io rchar)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


# ArrayRecord reads up to 1 MiB of a shard's end to find its index, and grain opens each shard twice
# (to count records, then to read them): a fixed cost per shard and process, besides the records.
FOOTER_READ = 2 * 2**20  # per shard
SHARDS = 2


def _bytes_for_one_epoch(tmp: str, class_balance: float) -> tuple[int, int, int]:
    """(bytes process 0 of 4 reads building its loader and running one epoch over 128 records of
    ~200 KB in SHARDS shards that no cache has seen, the shard bytes, the bytes its own records take)."""
    write_split(os.path.join(tmp, "warm"), "train", 16, 64, num_shards=1)
    _one_epoch(os.path.join(tmp, "warm"), 0, 4, class_balance)  # imports and lazy set-up happen here
    data = os.path.join(tmp, "data")
    write_split(data, "train", 128, 256, seed=2, num_shards=SHARDS)
    before = _bytes_read()
    _one_epoch(data, 0, 4, class_balance)
    read = _bytes_read() - before
    copies = pipeline.num_batches_per_epoch(data, "train", global_batch_size=16,
                                            sampling=pipeline.EpochSampling(seed=0, class_balance=class_balance)) * 4
    total = shard_bytes(data, "train")
    return read, total, total * copies // 128


needs_proc_io = pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")


@needs_proc_io
def test_one_of_four_processes_reads_its_records_and_the_shard_indexes_only(tmp_path):
    read, total, own = _bytes_for_one_epoch(str(tmp_path), class_balance=0.0)
    assert own < read < own + SHARDS * FOOTER_READ + 0.02 * total, f"read {read} of {total} bytes; own records {own}"
    assert read < 0.5 * total


@needs_proc_io
def test_with_class_balance_one_of_four_processes_reads_its_records_and_the_shard_indexes_only(tmp_path):
    read, total, own = _bytes_for_one_epoch(str(tmp_path), class_balance=0.5)
    assert own < read < own + SHARDS * FOOTER_READ + 0.02 * total, f"read {read} of {total} bytes; own records {own}"


# --------------------------------------------------------------------------- the scripts themselves
# A stand-in for `python -m cleaq_jax.main`: records its arguments and the signal that ends it, the way
# the trainer does (SIGTERM -> "save" -> exit 0). It writes ready<i> once its handler is installed and
# its arguments are written: a test signals it only after that. FAIL_PROCESS=i makes process i exit 3
# once every other process is ready (so each of them can answer the SIGTERM that follows).
STAND_IN = """#!{python}
import os, signal, sys, time
out = os.environ["STAND_IN_OUT"]
flag = lambda name, default: next((a.split("=", 1)[1] for a in sys.argv if a.startswith(f"--{{name}}=")), default)
pid, count = flag("process_id", "0"), int(flag("num_processes", "1"))
def saved(signum, frame):
    open(os.path.join(out, f"saved{{pid}}"), "w").write(str(signum))
    sys.exit(0)
signal.signal(signal.SIGTERM, saved)
def mark(name, text):  # written whole, then renamed: a file that exists is complete
    with open(os.path.join(out, f".{{name}}"), "w") as f:
        f.write(text)
    os.rename(os.path.join(out, f".{{name}}"), os.path.join(out, name))
mark(f"args{{pid}}", "\\n".join(sys.argv[1:]) + "\\n" + os.environ.get("JAX_LOCAL_DEVICE_IDS", "<unset>"))
mark(f"pid{{pid}}", str(os.getpid()))
mark(f"ready{{pid}}", "")
if os.environ.get("FAIL_PROCESS") == pid:
    others = [os.path.join(out, f"ready{{i}}") for i in range(count) if str(i) != pid]
    while not all(os.path.exists(p) for p in others):
        time.sleep(0.01)
    sys.exit(3)
time.sleep(3600)  # until signalled; the fixture ends any stand-in a failed test leaves behind
"""
DEADLINE = 300  # seconds: only a guard against a hang; every wait below ends on an event


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "python"
    path.write_text(STAND_IN.format(python=sys.executable))
    path.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=str(path), STAND_IN_OUT=str(out))
    yield env, out
    for pid_file in out.glob("pid*"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _multi_gpu(env: dict[str, str], tmp_path, n: int = 3, stdout=subprocess.PIPE) -> subprocess.Popen:
    cmd = ["scripts/multi_gpu.sh", "--num-processes", str(n), "--port", "1", "--log-dir", str(tmp_path / "logs"),
           "--", "--config=configs/stage1.py", "--workdir=w"]
    # SIGINT as at a terminal: a test runner started in the background (`cmd &` in a script) ignores it,
    # the script would inherit that, and bash cannot trap a signal ignored on entry.
    return subprocess.Popen(cmd, cwd=tiny.REPO, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(paths: list, proc: subprocess.Popen | None = None) -> None:
    """Returns once every path exists; fails if ``proc`` exits first or after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while not all(os.path.exists(p) for p in paths):
        missing = [str(p) for p in paths if not os.path.exists(p)]
        assert proc is None or proc.poll() is None, f"exited with {proc.returncode} before writing {missing}"
        assert time.monotonic() < deadline, f"not written in {DEADLINE} s: {missing}"
        time.sleep(0.01)


def _ready(out, n: int) -> list:
    return [out / f"ready{i}" for i in range(n)]


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm-to-script", "ctrl-c-to-terminal-group"])
def test_multi_gpu_turns_a_stop_signal_into_sigterm_for_every_process(stand_in, tmp_path, signum, to_group):
    env, out = stand_in
    proc = _multi_gpu(env, tmp_path)
    _wait_for(_ready(out, 3), proc)
    os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)
    assert proc.wait(timeout=DEADLINE) == 0
    assert [(out / f"saved{i}").read_text() for i in range(3)] == [str(int(signal.SIGTERM))] * 3


def _full_pipe() -> tuple[int, int]:
    """(read end, write end) of a pipe already full: a write to it blocks until the read end is drained."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    for chunk in (4096, 1):
        try:
            while True:
                os.write(write, b"x" * chunk)
        except BlockingIOError:
            pass
    os.set_blocking(write, True)
    return read, write


def test_multi_gpu_stopped_while_starting_processes_stops_those_started_and_starts_no_more(stand_in, tmp_path):
    env, out = stand_in
    # The script's first message, after it started process 0, waits on a full pipe: the stop comes
    # while the script is still starting processes, whatever the machine's speed.
    read, write = _full_pipe()
    proc = _multi_gpu(env, tmp_path, stdout=write)
    os.close(write)
    _wait_for(_ready(out, 1), proc)
    proc.send_signal(signal.SIGTERM)
    pipe = os.fdopen(read, "rb")
    threading.Thread(target=pipe.read, daemon=True).start()  # drains until the script closes it
    try:
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (out / "saved0").read_text() == str(int(signal.SIGTERM))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("args")) == ["args0"]


def test_multi_gpu_stops_the_other_processes_when_one_fails(stand_in, tmp_path):
    env, out = stand_in
    proc = _multi_gpu({**env, "FAIL_PROCESS": "1"}, tmp_path)
    assert proc.wait(timeout=DEADLINE) == 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("saved")) == ["saved0", "saved2"]
    assert "exited with status 3" in proc.stdout.read().decode()


def test_multi_gpu_gives_each_process_the_coordinator_flags(stand_in, tmp_path):
    env, out = stand_in
    proc = _multi_gpu(env, tmp_path, n=2)
    _wait_for(_ready(out, 2), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=DEADLINE) == 0
    for i in range(2):
        args = (out / f"args{i}").read_text().splitlines()[:-1]
        assert args == ["-m", "cleaq_jax.main", "--config=configs/stage1.py", "--workdir=w",
                        "--coordinator_address=127.0.0.1:1", "--num_processes=2", f"--process_id={i}"]


@pytest.mark.parametrize("tasks_per_node, visible, local_id, expected", [
    ("1(x2)", "0,1,2,3,4,5,6,7", "0", "0,1,2,3,4,5,6,7"),  # one task per node drives every GPU
    ("8(x2)", "0,1,2,3,4,5,6,7", "3", "3"),  # one task per GPU: its own
    ("4", "0,1,2,3,4,5,6,7", "1", "2,3"),  # 4 tasks share 8 GPUs: 2 each
    ("8", "5", "5", "0"),  # --gpus-per-task=1: the one GPU the task sees
    ("2", "", "1", "<unset>"),  # no GPUs (CPU): jax's default
])
def test_slurm_task_gives_each_task_its_share_of_the_gpus(stand_in, tasks_per_node, visible, local_id, expected):
    env, out = stand_in
    env.update(SLURM_JOB_ID="7", SLURM_PROCID=local_id, SLURM_LOCALID=local_id,
               SLURM_STEP_TASKS_PER_NODE=tasks_per_node, CUDA_VISIBLE_DEVICES=visible)
    env.pop("JAX_LOCAL_DEVICE_IDS", None)
    proc = subprocess.Popen(["scripts/slurm_task.sh", "--config=configs/stage1.py"], cwd=tiny.REPO, env=env)
    _wait_for(_ready(out, 1), proc)
    proc.terminate()
    assert proc.wait(timeout=DEADLINE) == 0
    assert (out / "args0").read_text().splitlines()[-1] == expected


def test_slurm_task_outside_a_job_says_how_to_start_it(stand_in):
    env, _ = stand_in
    proc = subprocess.run(["scripts/slurm_task.sh", "--config=configs/stage1.py"], cwd=tiny.REPO, env=env,
                          capture_output=True, text=True, timeout=DEADLINE)
    assert proc.returncode == 2 and "start it with srun" in proc.stderr


def test_tpu_pod_train_runs_main_on_each_worker_with_the_arguments_unchanged(stand_in, tmp_path):
    env, out = stand_in
    args = ["--config=configs/stage1.py", "--workdir=gs://bucket/run 1", "--config.data.dir=data/it's"]
    sent = subprocess.run(["scripts/tpu_pod.sh", "--name", "slice", "--zone", "z", "train", *args], cwd=tiny.REPO,
                          env={**env, "DRY_RUN": "1"}, capture_output=True, text=True, check=True, timeout=DEADLINE)
    gcloud = shlex.split(sent.stdout)
    assert gcloud[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "slice"] and "--worker=all" in gcloud
    remote = next(a for a in gcloud if a.startswith("--command=")).removeprefix("--command=")
    # Play one worker: its home holds the checkout with the virtualenv's python.
    home = tmp_path / "worker"
    (home / "cleaq_jax" / ".venv" / "bin").mkdir(parents=True)
    os.symlink(env["PYTHON"], home / "cleaq_jax" / ".venv" / "bin" / "python")
    subprocess.run(["bash", "-c", remote], env={**env, "HOME": str(home)}, check=True, timeout=DEADLINE)
    _wait_for(_ready(out, 1))
    os.kill(int((out / "pid0").read_text()), signal.SIGTERM)  # the stand-in runs on in the background
    assert (out / "args0").read_text().splitlines()[:-1] == ["-m", "cleaq_jax.main", *args]


def _sbatch_env(stand_in_env: dict[str, str], tmp_path, **extra: str) -> dict[str, str]:
    """The environment of the batch step, with an ``srun`` that records how it was called (no SLURM here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/srun_args\n')
    srun.chmod(0o755)
    env = {k: v for k, v in stand_in_env.items() if k not in ("CONFIG", "WORKDIR", "DATA")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_SUBMIT_DIR=tiny.REPO, **extra)
    return env


def test_sbatch_file_starts_the_doc_task_command_with_extra_arguments(stand_in, tmp_path):
    env = _sbatch_env(stand_in[0], tmp_path, CONFIG="configs/stage3.py", WORKDIR="/shared/run", DATA="/shared/d",
                      SLURM_GPUS_ON_NODE="8")
    subprocess.run(["bash", SBATCH, "--config.batch_size=64"], cwd=str(tmp_path), env=env, check=True,
                   capture_output=True, timeout=DEADLINE)
    expected = shlex.split(SLURM_TASK_CMD.replace("$CONFIG", "configs/stage3.py").replace(
        "$WORKDIR", "/shared/run").replace("$DATA", "/shared/d"))
    srun_args = (tmp_path / "srun_args").read_text().splitlines()
    assert srun_args == ["--kill-on-bad-exit=1", "--label", *expected, "--config.batch_size=64"]


def test_sbatch_file_without_config_names_the_variable(stand_in, tmp_path):
    env = _sbatch_env(stand_in[0], tmp_path, WORKDIR="/shared/run")
    proc = subprocess.run(["bash", SBATCH], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=DEADLINE)
    assert proc.returncode != 0 and "CONFIG" in proc.stderr and not (tmp_path / "srun_args").exists()


def test_doc_gives_the_commands_these_tests_run():
    with open(DOC) as f:
        doc = f.read()
    for command in (SINGLE_CMD, EXPLICIT_CMD, SLURM_TASK_CMD):
        assert command in doc, command
