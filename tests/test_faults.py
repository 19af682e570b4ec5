"""Faults a run survives by design: the best earlier checkpoint used by stage 3, a checkpoint of another
model shape, a second run on a busy workdir and the lock a killed run leaves, a disk that fills while a
checkpoint or a shard is written, and a stage killed again and again."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from cleaq_jax.data import location, shards
from cleaq_jax.models import factory
from cleaq_jax.runtime import checkpoint, lock, parallel
from cleaq_jax.training import optim
from cleaq_jax.training import start as stage_init
from cleaq_jax.training import state as train_state
from tests import tiny

# Every run through main below trains this tiny stage 1 (16 steps), so they share one compilation.
EPOCHS = 8
TIMEOUT = 600


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """16 training and 4 validation images at 32 px, built once for the module's runs."""
    path = str(tmp_path_factory.mktemp("data"))
    location.build_synthetic(path, 20, size=32, seed=0, splits={"train": 0.8, "val": 0.2}, workers=1)
    return path


def _command(workdir: str, data: str, *overrides: str) -> list[str]:
    return tiny.main_command(workdir, "stage=stage1", f"num_epochs={EPOCHS}", "eval_at_end=False",
                             "image_every_steps=0", "eval_every_epochs=0", "checkpoint_every_steps=1",
                             f"data.dir={data}", *overrides)


def _run(command: list[str], timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=tiny.subprocess_env(), cwd=tiny.REPO, capture_output=True, text=True,
                          timeout=timeout)


def _steps(directory: str) -> list[int]:
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a run that stops for a reason outside the program ends with (and no traceback)."""
    assert proc.returncode == 2, f"exit status {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-4000:]
    return last


def _said(monkeypatch, module) -> list[str]:
    """The lines ``module`` writes through `console.say`, collected."""
    lines: list[str] = []
    monkeypatch.setattr(module.console, "say", lambda message, *args: lines.append(message % args))
    return lines


# --------------------------------------------------------------------------- the best checkpoint used
def _joint_states(cfg, seeds):
    """Stage-3 train states from different seeds: each holds IQE, IQA and DR, so it stands for a
    stage-1 or a stage-2 checkpoint alike (the restore reads only the subnetworks it needs)."""
    models = factory.build_models(cfg)
    joint = tiny.stage(cfg, "stage3")
    tx = optim.make_optimizer(joint.optim, 1)
    init = jax.jit(lambda k: train_state.init_state(joint, models, tx, k))
    return models, joint, tx, [init(jax.random.key(s)) for s in seeds]


def _save(directory, saves, metric: str) -> None:
    """Checkpoints (step, state, metrics) ranked by ``metric`` as a validated stage ranks them."""
    ranked = {"checkpoint_metric": metric, "checkpoint_mode": "max"}
    with checkpoint.Checkpointer(directory, best_metric=metric, best_mode="max", async_save=False) as ckpt:
        for step, state, metrics in saves:
            ckpt.save(step, state, config=ranked, metrics=metrics)


def test_stage3_starts_from_the_best_stage1_checkpoint_not_the_latest(tmp_path, monkeypatch):
    cfg = tiny.tiny_config()
    models, joint, tx, (best, latest, iqa_old, iqa_new) = _joint_states(cfg, (1, 2, 3, 4))
    workdir = str(tmp_path)
    stage1, stage2 = os.path.join(workdir, "stage1"), os.path.join(workdir, "stage2")
    _save(os.path.join(stage1, "checkpoints"), [(1, best, {"loss": 1.0, "val_dr_kappa": 0.5}),
                                                (2, latest, {"loss": 0.5, "val_dr_kappa": 0.25})], "val_dr_kappa")
    # Stage 2 validated never: no checkpoint carries its metric, so "best" falls back to its latest.
    _save(os.path.join(stage2, "checkpoints"), [(1, iqa_old, {"loss": 1.0}), (2, iqa_new, {"loss": 0.5})],
          "val_iqa_kappa")
    joint = dataclasses.replace(joint, directory=os.path.join(workdir, "stage3"),
                                init_from=(("stage1", ("iqe", "dr"), stage1), ("stage2", ("iqa",), stage2)))
    lines = _said(monkeypatch, stage_init)
    mesh = parallel.make_mesh()
    with checkpoint.Checkpointer(tmp_path / "stage3" / "checkpoints") as ckpt:
        state, _ = stage_init.initial_state(joint, models, tx, mesh, ckpt, loader=None)
    for net, source in (("iqe", best), ("dr", best), ("iqa", iqa_new)):
        jax.tree.map(np.testing.assert_array_equal, state.params[net], source.params[net])
        jax.tree.map(np.testing.assert_array_equal, state.batch_stats[net], source.batch_stats[net])
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(latest.params)))
    assert lines[0].startswith("stage3: iqe+dr from stage1 step 1 of 2 kept (best by val_dr_kappa = 0.5)"), lines
    assert lines[1].startswith("stage3: iqa from stage2 step 2 of 2 kept (latest: no checkpoint carries val_iqa_kappa)")
    with open(os.path.join(workdir, "stage3", stage_init.INIT_RECORD)) as f:
        record = json.load(f)
    assert record["stage1"]["step"] == 1 and record["stage1"]["why"] == "best by val_dr_kappa = 0.5"
    assert record["stage2"]["step"] == 2 and record["stage1"]["kept"] == [1, 2]
    # The config key picks the latest, or a step, instead.
    for which, step in (("latest", 2), ("1", 1)):
        given = stage_init.earlier_stages(dataclasses.replace(joint, init_step=which), models, mesh)
        source = latest if step == 2 else best
        jax.tree.map(np.testing.assert_array_equal, given["dr"]["params"], source.params["dr"])


# --------------------------------------------------------------------------- another model shape
@pytest.mark.slow
def test_stage3_from_a_stage1_checkpoint_of_another_width_stops_with_both_shapes(tmp_path, data_dir):
    """A stage-1 checkpoint of model.width 1/8 under a stage 3 of width 1/16: one line naming the first
    differing parameter and both its shapes, exit status 2, before the step is compiled."""
    wide = tiny.tiny_config(**{"model.width": 1 / 8})
    stage1 = tiny.stage(wide, "stage1")
    models = factory.build_models(wide)
    tx = optim.make_optimizer(stage1.optim, 1)
    state = jax.jit(lambda k: train_state.init_state(stage1, models, tx, k))(jax.random.key(0))
    workdir = str(tmp_path / "run")
    _save(os.path.join(workdir, "stage1", "checkpoints"), [(1, state, {"loss": 1.0})], "loss")
    proc = _run(_command(workdir, data_dir, "stage=stage3"))
    line = _error_line(proc)
    print(line)
    assert line.startswith("error: stage3 cannot start from stage1 (config.init.stage1): checkpoint "
                           f"{workdir}/stage1/checkpoints/1 holds another model shape: params/"), line
    shapes = line.split(" is shaped ")[1]
    there, here = shapes.split(" there, ")[0], shapes.split(" there, ")[1].split(" here")[0]
    assert there.startswith("(") and here.startswith("(") and there != here, line
    assert "compiled" not in proc.stderr, proc.stderr[-3000:]


# --------------------------------------------------------------------------- two runs on one workdir
@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_stops_naming_the_first_and_a_killed_runs_lock_is_taken_over(
        tmp_path, data_dir, monkeypatch):
    workdir = str(tmp_path / "run")
    lock_path = os.path.join(workdir, "stage1", lock.LOCK_NAME)
    first = subprocess.Popen(_command(workdir, data_dir), env=tiny.subprocess_env(), cwd=tiny.REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + TIMEOUT
        while not os.path.exists(lock_path) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert os.path.exists(lock_path), "the first run took no lock"
        t0 = time.time()
        second = _run(_command(workdir, data_dir))
        took = time.time() - t0
        assert first.poll() is None, "the first run ended before the second was refused: nothing was tested"
        line = _error_line(second)
        print(line, f"({took:.1f} s)")
        assert line.startswith(f"error: {workdir}/stage1 is being trained by another run: pid {first.pid} on host "
                               f"{socket.gethostname()} (started "), line
        assert "step compiled" not in second.stderr and "building" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # SIGKILL leaves the lock behind; the next run finds its process gone and takes it over.
    with open(lock_path) as f:
        assert json.load(f)["pid"] == first.pid
    lines = _said(monkeypatch, lock)
    with lock.StageLock(os.path.join(workdir, "stage1")):
        with open(lock_path) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert not os.path.exists(lock_path), "a clean exit leaves the lock behind"
    assert len(lines) == 1 and f"pid {first.pid} on host" in lines[0] and "is not running on this host" in lines[0], lines


def _write_lock(directory, **content) -> str:
    os.makedirs(directory, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": lock._process_start(os.getpid()),
              "started": time.time(), "heartbeat": time.time(), "token": "theirs", **content}
    path = os.path.join(directory, lock.LOCK_NAME)
    with open(path, "w") as f:
        json.dump(holder, f)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the id names no process (until the system reuses it)
    return proc.pid


@pytest.mark.parametrize("holder, stale", [
    ({"pid": "dead"}, "is not running on this host"),
    ({"pid_start": "1"}, "now belongs to a process started later"),
    ({"host": "elsewhere", "age": 2 * lock.STALE_AFTER_S}, "heartbeat is 20 min old"),
    ({}, None),  # this process, alive
    ({"host": "elsewhere", "age": 30}, None),
])
def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path, monkeypatch, holder, stale):
    if holder.get("pid") == "dead":
        holder = {"pid": _dead_pid()}
    if "age" in holder:  # seconds since another host's run last refreshed its heartbeat
        holder = {"host": holder["host"], "heartbeat": time.time() - holder["age"]}
    path = _write_lock(str(tmp_path), **holder)
    lines = _said(monkeypatch, lock)
    if stale is None:
        with pytest.raises(lock.StageBusyError, match=r"is being trained by another run: pid \d+ on host "):
            lock.StageLock(str(tmp_path)).acquire()
        with open(path) as f:
            assert json.load(f)["token"] == "theirs", "a refused run touched the lock"
        return
    with lock.StageLock(str(tmp_path)) as held:
        with open(path) as f:
            assert json.load(f)["token"] == held._token
    assert len(lines) == 1 and stale in lines[0], lines
    assert not os.path.exists(path)


def test_one_of_many_runs_starting_at_once_gets_the_lock(tmp_path):
    """The lock file appears whole in one step: of eight takers started together exactly one holds it
    (the others see a live holder: the same process)."""
    barrier, outcomes, held = threading.Barrier(8), [], []

    def take():
        taker = lock.StageLock(str(tmp_path))
        barrier.wait()
        try:
            taker.acquire()
            outcomes.append("held")
            held.append(taker)
        except lock.StageBusyError:
            outcomes.append("busy")

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["busy"] * 7 + ["held"]
    assert [n for n in os.listdir(tmp_path) if n != lock.LOCK_NAME] == [], "temporary files left behind"
    held[0].release()
    assert os.listdir(tmp_path) == []


def test_the_heartbeat_refreshes_the_lock_and_release_leaves_another_runs_lock(tmp_path):
    held = lock.StageLock(str(tmp_path), heartbeat_s=0.05)
    held.acquire()
    path = os.path.join(tmp_path, lock.LOCK_NAME)
    with open(path) as f:
        first = json.load(f)["heartbeat"]
    time.sleep(0.5)
    with open(path) as f:
        assert json.load(f)["heartbeat"] > first
    _write_lock(str(tmp_path), token="someone else's")  # e.g. taken over after this run was judged gone
    held.release()
    assert os.path.exists(path)


# --------------------------------------------------------------------------- a full disk
def _small_filesystem(code: str, tmp_path, size: str = "2m", runs: int = 1,
                      **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` ``runs`` times, one fresh Python after another (argument: the run's number), inside a
    user and mount namespace of its own where $ROOT is a tmpfs of ``size``: a disk that really fills,
    mounted without root, kept across the runs. Skips where the system forbids unprivileged user
    namespaces (then the fault-injecting tests below stand alone)."""
    root = tmp_path / "small"
    root.mkdir()
    mount = f'mount -t tmpfs -o size={size} cleaq-test "$1"'
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "sh", "-c", mount, "sh", str(root)], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged user and mount namespaces here (unshare -rm) to mount a small tmpfs")
    python = " && ".join(f'"$2" -c "$3" {i}' for i in range(runs))
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} && {python}", "sh", str(root),
                           sys.executable, code], env=tiny.subprocess_env(ROOT=str(root), **env), cwd=tiny.REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


_FILL = r"""
def fill(path):
    # Write until the file system refuses: 64 KiB at a time, then a page at a time.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    for chunk in (1 << 16, 1 << 12):
        try:
            while True:
                os.write(fd, os.urandom(chunk))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    os.close(fd)
"""

_FULL_DISK_CHECKPOINT = r"""
import errno, json, os, sys
import jax, numpy as np
from cleaq_jax.runtime import checkpoint, parallel
""" + _FILL + r"""
root = os.environ["ROOT"]
directory = os.path.join(root, "checkpoints")
state = lambda seed: {"w": jax.random.normal(jax.random.key(seed), (50_000,))}  # 200 kB that do not compress
out = {}
if sys.argv[1] == "0":  # the run that meets the full disk
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
    ckpt.save(1, state(1))
    ckpt.wait_until_finished()
    fill(os.path.join(root, "filler"))
    try:
        ckpt.save(2, state(2))
        ckpt.wait_until_finished()
    except checkpoint.CheckpointWriteError as e:
        out["error"] = str(e)
    os.remove(os.path.join(root, "filler"))  # the user frees space
else:  # the same run started again
    again = checkpoint.Checkpointer(directory, max_to_keep=3)
    abstract = jax.eval_shape(lambda: state(0))
    target = parallel.abstract_with_shardings(abstract, parallel.state_shardings(abstract, parallel.make_mesh()))
    restored, out["resumed"] = again.restore_intact(target)
    out["equal"] = bool(np.array_equal(restored["w"], state(1)["w"]))
    again.save(2, state(2))
    again.close()
    out["kept"] = checkpoint.saved_steps(directory)
    out["left"] = sorted(os.listdir(directory))
print(json.dumps(out), flush=True)
os._exit(0)  # the failed write's threads are not waited for (orbax's may wait 300 s for a signal that never comes)
"""


def test_a_full_disk_during_a_checkpoint_write_names_it_and_keeps_the_previous_one(tmp_path):
    """A real full disk (a 2 MB tmpfs filled up): orbax's asynchronous write fails inside tensorstore;
    the error names the checkpoint and the intact one; started again after space is freed, the run
    resumes from that one, clears what the failed write left and saves the step again."""
    proc = _small_filesystem(_FULL_DISK_CHECKPOINT, tmp_path, runs=2)
    failed, resumed = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    root = str(tmp_path / "small")
    assert failed.get("error", "").startswith(f"cannot write checkpoint {root}/checkpoints/2: No space left on "
                                              "device. The run stopped; the checkpoint of step 1 is intact"), failed
    assert resumed["resumed"] == 1 and resumed["equal"] and resumed["kept"] == [1, 2], resumed
    assert resumed["left"] == ["1", "2"], resumed


_FAILING_CHECKPOINT_WRITE = r"""
import errno, os, sys
from cleaq_jax.runtime import checkpoint
fail_at = int(os.environ["FAIL_AT"])
write = checkpoint.Checkpointer._write

def failing(self, step, *args):
    if step != fail_at:
        return write(self, step, *args)
    # What a disk that fills mid-write leaves: orbax's temporary directory, written in part.
    part = os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp", "state")
    os.makedirs(part, exist_ok=True)
    with open(os.path.join(part, "partial"), "wb") as f:
        f.write(bytes(1000))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), part)

checkpoint.Checkpointer._write = failing
from cleaq_jax import main
sys.argv = ["cleaq_jax.main", *sys.argv[1:]]
main.run()
"""


@pytest.mark.slow
def test_a_run_whose_checkpoint_write_fails_for_space_stops_with_one_line_and_resumes(tmp_path, data_dir):
    """ENOSPC injected where every checkpoint is written (`Checkpointer._write`) at step 3 of a run
    through main: one line naming checkpoint 3 and the intact step 2, exit status 2, the lock released;
    the same command then resumes from step 2 and finishes."""
    workdir = str(tmp_path / "run")
    command = _command(workdir, data_dir)
    proc = subprocess.run([sys.executable, "-c", _FAILING_CHECKPOINT_WRITE, *command[3:]],
                          env=tiny.subprocess_env(FAIL_AT="3"), cwd=tiny.REPO, capture_output=True, text=True,
                          timeout=TIMEOUT)
    line = _error_line(proc)
    print(line)
    ckpts = os.path.join(workdir, "stage1", "checkpoints")
    assert line == (f"error: cannot write checkpoint {ckpts}/3: No space left on device. The run stopped; the "
                    "checkpoint of step 2 is intact: free space there (or fix the disk) and run the same command "
                    "again to resume"), line
    assert _steps(ckpts) == [1, 2]
    assert not os.path.exists(os.path.join(workdir, "stage1", lock.LOCK_NAME))
    resumed = _run(command)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "stage1: resumed from step 2" in resumed.stderr, resumed.stderr[-3000:]
    assert _steps(ckpts)[-1] == 2 * EPOCHS


def _example(i: int, size: int) -> dict:
    rng = np.random.default_rng(i)
    return {"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),  # noise: PNG cannot shrink it
            "mask": np.ones((size, size), np.uint8), "vessel": None, "dr_grade": i % 5, "quality": i % 3,
            "id": f"img_{i:03d}", "source": "test"}


def _good_split(out: str) -> dict:
    with shards.ShardWriter(out, "t", "train", num_shards=2) as writer:
        for i in range(4):
            writer.write(_example(i, 16))
    return {name: os.path.getsize(os.path.join(out, name)) for name in os.listdir(out)}


_ARRAY_RECORD_WRITER = shards.array_record_module.ArrayRecordWriter


class _FullDiskWriter:
    """ArrayRecord's writer, whose last shard's bytes do not fit: it reports the failure as ArrayRecord
    does, when it closes, after writing part of the file."""

    def __init__(self, path: str, options: str):
        self._inner, self._path = _ARRAY_RECORD_WRITER(path, options), path

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    def close(self) -> None:
        self._inner.close()
        if self._path.endswith("part-00001"):
            raise RuntimeError(f"write() failed: No space left on device; writing {self._path}; at byte 4096")


def test_a_shard_write_that_fails_for_space_leaves_no_shard_and_the_previous_split_whole(tmp_path, monkeypatch):
    out = str(tmp_path)
    before = _good_split(out)
    monkeypatch.setattr(shards.array_record_module, "ArrayRecordWriter", _FullDiskWriter)
    with pytest.raises(shards.ShardWriteError, match=r"cannot write the t/train shards in .*: write\(\) failed: "
                                                     r"No space left on device"):
        with shards.ShardWriter(out, "t", "train", num_shards=2) as writer:
            for i in range(8):
                writer.write(_example(10 + i, 16))
    after = {name: os.path.getsize(os.path.join(out, name)) for name in os.listdir(out)}
    assert after == before, "the failed write changed or left files"
    assert [r["id"] for r in shards.iter_records(out, "train")] == [f"img_{i:03d}" for i in (0, 2, 1, 3)]


_FULL_DISK_SHARDS = r"""
import json, os
import numpy as np
from cleaq_jax.data import shards
out_dir = os.path.join(os.environ["ROOT"], "shards")
rng = np.random.default_rng(0)
result = {}
try:
    with shards.ShardWriter(out_dir, "t", "train", num_shards=2) as writer:
        for i in range(80):  # 80 images of noise, 48 kB each as PNG: twice what the disk holds
            writer.write({"image": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
                          "mask": np.ones((128, 128), np.uint8), "vessel": None, "dr_grade": 0, "quality": 0,
                          "id": f"img_{i:03d}"})
except shards.ShardWriteError as e:
    result["error"] = str(e)
result["left"] = sorted(os.listdir(out_dir))
print(json.dumps(result))
"""


def test_a_full_disk_while_shards_are_written_leaves_nothing_under_their_names(tmp_path):
    proc = _small_filesystem(_FULL_DISK_SHARDS, tmp_path)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "No space left on device" in out.get("error", ""), out
    assert out["left"] == [], out


# --------------------------------------------------------------------------- repeated kills
def _final_state(workdir: str) -> dict[str, np.ndarray]:
    """Every leaf of the train state (parameters, BatchNorm statistics, optimizer state, step, keys,
    task weighting) of a stage-1 run's latest checkpoint, by path."""
    cfg = tiny.tiny_config()
    models = factory.build_models(cfg)
    described = tiny.stage(cfg, "stage1")
    abstract = jax.eval_shape(
        lambda k: train_state.init_state(described, models, optim.make_optimizer(described.optim, 1), k),
        jax.random.key(0))
    target = parallel.abstract_with_shardings(abstract, parallel.state_shardings(abstract, parallel.make_mesh()))
    state = checkpoint.restore_state(os.path.join(workdir, "stage1", "checkpoints"), target)

    def plain(x):
        return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)

    return {jax.tree_util.keystr(k): plain(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.slow
def test_a_stage_killed_five_times_at_drawn_steps_ends_equal_to_an_uninterrupted_run(tmp_path, data_dir):
    """SIGKILL once the run's checkpoint reaches each of five steps drawn from a printed seed (set
    CLEAQ_KILL_SEED to replay one), the same command again after each kill (each taking over the lock
    the killed run left); the final state equals, bit for bit, that of a run never interrupted."""
    seed = int(os.environ.get("CLEAQ_KILL_SEED", random.SystemRandom().randrange(2**31)))
    total = 2 * EPOCHS
    points = sorted(int(p) for p in np.random.default_rng(seed).choice(np.arange(1, total - 5), 5, replace=False))
    print(f"kill seed {seed}: kill points {points}")
    killed = str(tmp_path / "killed")
    command = _command(killed, data_dir)
    ckpts = os.path.join(killed, "stage1", "checkpoints")
    kills = []
    for n, point in enumerate(points):
        saved = _steps(ckpts)
        target = max(point, (saved[-1] if saved else 0) + 1)
        log = tmp_path / f"run{n}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(command, env=tiny.subprocess_env(), cwd=tiny.REPO, stdout=out,
                                    stderr=subprocess.STDOUT)
        deadline = time.time() + TIMEOUT
        while proc.poll() is None and time.time() < deadline and not any(s >= target for s in _steps(ckpts)):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append((point, target, _steps(ckpts)[-1] if _steps(ckpts) else None))
        text = log.read_text()
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: run {n} ended before the kill:\n{text[-3000:]}"
        assert kills[-1][2] is not None and target <= kills[-1][2] < total, f"seed {seed}: {kills}"
        if n:
            assert "taking over the lock of an earlier run that is gone" in text, text[-3000:]
    print("kills (drawn step, step waited for, last checkpoint):", kills)
    finished = _run(command)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert f"stage1: resumed from step {kills[-1][2]}" in finished.stderr
    straight = str(tmp_path / "straight")
    assert _run(_command(straight, data_dir)).returncode == 0
    a, b = _final_state(straight), _final_state(killed)
    assert a.keys() == b.keys() and any("opt_state" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=f"seed {seed}: {k}")
