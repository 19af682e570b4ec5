"""Checkpoints of a stage (cleaq_jax.runtime.checkpoint): retention, topology-free restore, iterator and
config round-trips, and clean preemption on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import _toy
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny

from cleaq_jax.runtime import checkpoint, parallel, preemption

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_dist_worker.py")
TIMEOUT = 300


def _tiny(value: float) -> dict[str, jax.Array]:
    return {"w": jnp.full((3,), value, jnp.float32), "count": jnp.asarray(int(value), jnp.int32)}


def _tiny_target() -> dict[str, jax.ShapeDtypeStruct]:
    mesh = parallel.make_mesh()
    abstract = jax.eval_shape(lambda: _tiny(0.0))
    return parallel.abstract_with_shardings(abstract, parallel.state_shardings(abstract, mesh))


def _save_all(ckpt: checkpoint.Checkpointer, metric_values: list[float], name: str = "kappa",
              mode: str = "max") -> None:
    """Checkpoints 1..N with ``name`` = each value, and a config that ranks them by it."""
    cfg = ml_collections.ConfigDict({"checkpoint_metric": name, "checkpoint_mode": mode})
    for step, value in enumerate(metric_values, start=1):
        ckpt.save(step, _tiny(step), config=cfg, metrics={name: value})
    ckpt.wait_until_finished()


def _worker(cache_dir, *args: str) -> subprocess.Popen:
    # A compilation cache shared by the subprocesses: the restarted loop reuses the first one's step.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory):
    """Starts the 8-device save and the first (to be preempted) toy loop as the module begins,
    so they overlap with the single-device tests."""
    tmp = tmp_path_factory.mktemp("subprocesses")
    started = {
        "tmp": tmp,
        "save": _worker(tmp / "cache", "save", "--devices", "8", "--ckpt", str(tmp / "saved"), "--out",
                        str(tmp / "saved.npz")),
        "loop": _worker(tmp / "cache", "loop", "--ckpt", str(tmp / "loop"), "--ready", str(tmp / "ready"),
                        "--out", str(tmp / "first.json")),
    }
    yield started
    for proc in started.values():
        if isinstance(proc, subprocess.Popen) and proc.poll() is None:
            proc.kill()
            proc.wait()


def _finish(proc: subprocess.Popen) -> str:
    log, _ = proc.communicate(timeout=TIMEOUT)
    log = log.decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    return log


# --------------------------------------------------------------------------- retention
def test_keeps_latest_n_and_the_best_by_max(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2, best_metric="kappa", best_mode="max", async_save=False)
    _save_all(ckpt, [0.1, 0.9, 0.2, 0.3, 0.4, 0.5])
    ckpt.close()
    assert list(tiny.saved_metrics(tmp_path)) == [2, 5, 6]
    assert checkpoint.select_step(str(tmp_path), "best") == (2, "best by kappa = 0.9")


def test_keeps_the_best_by_min(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=1, best_metric="loss", best_mode="min", async_save=False)
    _save_all(ckpt, [0.5, 0.4, 0.1, 0.3, 0.2], name="loss", mode="min")
    ckpt.close()
    assert list(tiny.saved_metrics(tmp_path)) == [3, 5]
    assert checkpoint.select_step(str(tmp_path), "best") == (3, "best by loss = 0.1")


def test_keeps_only_latest_n_without_a_best_metric(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2, async_save=True)
    _save_all(ckpt, [0.9, 0.1, 0.1, 0.1])
    ckpt.close()
    assert tiny.saved_metrics(tmp_path) == {3: {"kappa": pytest.approx(0.1)}, 4: {"kappa": pytest.approx(0.1)}}


def test_metrics_without_the_best_metric_are_rejected(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, best_metric="kappa", async_save=False)
    with pytest.raises(KeyError, match="best_metric='kappa' is not among the saved metrics"):
        ckpt.save(1, _tiny(1), metrics={"accuracy": 0.5})
    ckpt.close()


def _validated_run(directory, saves: list[dict[str, float]]) -> checkpoint.Checkpointer:
    """Checkpoints 1..N ranked by validation DR kappa, which only some of them carry (as in training)."""
    cfg = ml_collections.ConfigDict({"checkpoint_metric": "val_dr_kappa", "checkpoint_mode": "max"})
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=1, best_metric="val_dr_kappa", best_mode="max",
                                   async_save=False)
    for step, metrics in enumerate(saves, start=1):
        ckpt.save(step, _tiny(step), config=cfg, metrics=metrics)
    return ckpt


def test_checkpoints_between_validations_rank_last_and_the_best_validated_one_is_kept(tmp_path):
    saves = [{"loss": 1.0}, {"loss": 0.5, "val_dr_kappa": 0.3}, {"loss": 0.4},
             {"loss": 0.3, "val_dr_kappa": 0.2}, {"loss": 0.2}]
    _validated_run(tmp_path, saves).close()
    assert list(tiny.saved_metrics(tmp_path)) == [2, 5]
    assert checkpoint.select_step(str(tmp_path), "best") == (2, "best by val_dr_kappa = 0.3")


def test_evaluation_picks_the_best_latest_or_a_named_step(tmp_path):
    saves = [{"loss": 1.0, "val_dr_kappa": 0.1}, {"loss": 0.5, "val_dr_kappa": 0.4}, {"loss": 0.4}]
    _validated_run(tmp_path, saves).close()
    assert checkpoint.select_step(str(tmp_path), "best") == (2, "best by val_dr_kappa = 0.4")
    assert checkpoint.select_step(str(tmp_path), "latest") == (3, "latest")
    assert checkpoint.select_step(str(tmp_path), "2")[0] == 2
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 1 .*saved steps: \[2, 3\]"):
        checkpoint.select_step(str(tmp_path), 1)
    with pytest.raises(ValueError, match="use 'best', 'latest' or a step number"):
        checkpoint.select_step(str(tmp_path), "newest")


def test_best_falls_back_to_the_latest_when_no_checkpoint_carries_the_metric(tmp_path):
    _validated_run(tmp_path, [{"loss": 1.0}, {"loss": 0.5}]).close()
    assert checkpoint.select_step(str(tmp_path), "best") == (2, "latest: no checkpoint carries val_dr_kappa")


@pytest.mark.parametrize("nets, validating, expected", [
    (("iqe", "dr"), True, ("val_dr_kappa", "max")),
    (("iqa",), True, ("val_iqa_kappa", "max")),
    (("iqe",), True, ("val_psnr_enhanced", "max")),
    (("iqe", "iqa", "dr"), False, ("loss", "min")),
])
def test_auto_ranks_by_the_stage_s_validation_metric_or_the_training_loss(nets, validating, expected):
    assert checkpoint.best_metric("auto", "auto", nets, validating) == expected


def test_a_validation_metric_without_validation_names_the_keys():
    with pytest.raises(ValueError, match=r"checkpoint_metric='val_iqa_kappa'.*eval_every_epochs.*val_split"):
        checkpoint.best_metric("val_iqa_kappa", "auto", ("iqa",), validating=False)


def test_saving_an_existing_step_again_returns_false(tmp_path):
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.save(3, _tiny(3)) is True
        assert ckpt.save(3, _tiny(4), force=True) is False
        state, step = ckpt.restore_intact(_tiny_target())
    assert step == 3
    np.testing.assert_array_equal(state["w"], np.full(3, 3.0))


# --------------------------------------------------------------------------- restore
def test_restore_without_checkpoint_names_the_directory(tmp_path):
    directory = tmp_path / "stage1" / "checkpoints"
    directory.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*stage1/checkpoints"):
        checkpoint.restore_state(directory, _tiny_target())


def test_restore_target_without_shardings_is_rejected_and_the_checkpoint_kept(tmp_path):
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, _tiny(1))
        with pytest.raises(ValueError, match="abstract_with_shardings"):
            ckpt.restore_intact(jax.eval_shape(lambda: _tiny(0.0)))
    assert (tmp_path / "1").is_dir()


def test_train_state_round_trips_with_rng_and_optimizer_state(tmp_path):
    mesh = parallel.make_mesh()
    abstract = jax.eval_shape(_toy.init_state, jax.random.key(0))
    shardings = parallel.state_shardings(abstract, mesh)
    # Compiled without LLVM optimisation: the init's random numbers are slow to compile, fast to run.
    init = jax.jit(_toy.init_state, out_shardings=shardings).lower(jax.random.key(0))
    state = init.compile(compiler_options={"xla_backend_optimization_level": 0})(jax.random.key(0))
    # Non-zero Adam moments and a moved step, as after training.
    state = jax.tree.map(lambda x: x + 0.25 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    state = state.replace(step=state.step + 7)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
        target = parallel.abstract_with_shardings(abstract, shardings)
        restored, _ = ckpt.restore_intact(target)
    assert isinstance(restored, _toy.ToyState)
    for got, want in zip(_toy.to_numpy(restored), _toy.to_numpy(state), strict=True):
        np.testing.assert_array_equal(got, want)


def test_restore_state_reads_a_chosen_step_with_a_fresh_manager(tmp_path):
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, _tiny(1))
        ckpt.save(2, _tiny(2))
    restored = checkpoint.restore_state(tmp_path, _tiny_target(), step=1)
    np.testing.assert_array_equal(restored["w"], np.full(3, 1.0))
    assert int(restored["count"]) == 1


# --------------------------------------------------------------------------- data and config
def _numbers(n: int = 20):
    return grain.MapDataset.range(n).map(lambda i: {"x": np.full((2,), i, np.int64)}).to_iter_dataset()


def test_data_iterator_position_round_trips(tmp_path):
    iterator = iter(_numbers())
    for _ in range(5):
        next(iterator)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, _tiny(5), data_iter=iterator)
        ckpt.wait_until_finished()
        next(iterator)  # moving on after the save must not change what was saved
        fresh = iter(_numbers())
        ckpt.restore_intact(_tiny_target(), data_iter=fresh)
    assert int(next(fresh)["x"][0]) == 5


def test_data_position_saved_by_two_processes_restores_in_one(tmp_path):
    iterator = iter(_numbers())
    for _ in range(7):
        next(iterator)
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(7, _tiny(7), data_iter=iterator)
    data = tmp_path / "7" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    (data / "process_1-of-2.json").write_text((data / "process_0-of-2.json").read_text())
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        fresh = iter(_numbers())
        ckpt.restore_intact(_tiny_target(), data_iter=fresh)
    assert int(next(fresh)["x"][0]) == 7


def test_prefetched_position_round_trips_without_losing_queued_batches(tmp_path):
    mesh = parallel.make_mesh()
    prefetcher = parallel.prefetch_to_device(iter(_numbers()), 2, mesh)
    consumed = [int(next(prefetcher)["x"][0]) for _ in range(3)]
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, _tiny(3), data_iter=prefetcher)
        ckpt.wait_until_finished()
        prefetcher.close()
        resumed = parallel.prefetch_to_device(iter(_numbers()), 2, mesh)
        ckpt.restore_intact(_tiny_target(), data_iter=resumed)
    assert consumed == [0, 1, 2]
    assert [int(next(resumed)["x"][0]) for _ in range(3)] == [3, 4, 5]


def test_restoring_an_iterator_from_a_checkpoint_without_one_is_an_error_not_damage(tmp_path):
    with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, _tiny(1))
        with pytest.raises(ValueError, match="holds no data-iterator state"):
            ckpt.restore_intact(_tiny_target(), data_iter=iter(_numbers()))
    assert (tmp_path / "1").is_dir()


def test_config_round_trips(tmp_path):
    config = ml_collections.ConfigDict()
    config.stage = "stage3"
    config.lambda_iqe = 0.5
    config.model = ml_collections.ConfigDict({"widths": (32, 64), "remat": True})
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _tiny(1), config=config)
    assert checkpoint.read_trained_config(tmp_path).to_dict() == config.to_dict()


# --------------------------------------------------------------------------- preemption
def test_guard_sets_the_flag_on_sigterm_and_restores_the_previous_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not guard.received and time.time() < deadline:
            time.sleep(0.01)
        assert guard.should_stop()
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.fixture(scope="module")
def preempted(background):
    """The toy loop gets SIGTERM once running, then a restart runs two more steps."""
    tmp, first = background["tmp"], background["loop"]
    deadline = time.time() + TIMEOUT
    while not os.path.exists(tmp / "ready") and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    log, _ = first.communicate(timeout=TIMEOUT)
    first_status = json.load(open(tmp / "first.json")) if first.returncode == 0 else None
    steps = (first_status or {}).get("stopped_at") or 0
    _finish(_worker(tmp / "cache", "loop", "--ckpt", str(tmp / "loop"), "--steps", str(steps + 2),
                    "--out", str(tmp / "second.json")))
    return {
        "returncode": first.returncode, "log": log.decode(errors="replace"), "first": first_status,
        "second": json.load(open(tmp / "second.json")),
    }


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(preempted):
    assert preempted["returncode"] == 0, preempted["log"][-3000:]
    assert preempted["first"]["saved"] is True
    assert preempted["first"]["stopped_at"] >= 2


def test_restart_resumes_from_the_preempted_step(preempted):
    stopped = preempted["first"]["stopped_at"]
    assert preempted["second"]["resumed_from"] == stopped
    assert preempted["second"]["stopped_at"] is None


# --------------------------------------------------------------------------- 8 fake devices (subprocess)
def test_checkpoint_saved_on_eight_devices_restores_on_one(background):
    tmp = background["tmp"]
    _finish(background["save"])
    saved = np.load(tmp / "saved.npz")
    assert int(saved["sharded"]) > 0  # the saved state really was fsdp-sharded
    mesh = parallel.make_mesh()
    abstract = jax.eval_shape(_toy.init_state, jax.random.key(0))
    target = parallel.abstract_with_shardings(abstract, parallel.state_shardings(abstract, mesh))
    restored = checkpoint.restore_state(tmp / "saved", target)
    leaves = _toy.to_numpy(restored)
    assert len(leaves) == len([k for k in saved.files if k.startswith("leaf")])
    for i, leaf in enumerate(leaves):
        np.testing.assert_array_equal(leaf, saved[f"leaf{i}"])


def _truncate_state_files(step_dir) -> int:
    """Cut every file of a checkpoint's state item to half its size (a crash mid-copy, a full disk)."""
    cut = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            if size > 1:
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
                cut += 1
    return cut


def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    with checkpoint.Checkpointer(directory, max_to_keep=5) as ckpt:
        _save_all(ckpt, [0.1, 0.2, 0.3])
    assert _truncate_state_files(directory / "3") > 0
    with checkpoint.Checkpointer(directory, max_to_keep=5) as ckpt:
        state, step = ckpt.restore_intact(_tiny_target())
        assert step == 2 and float(state["w"][0]) == 2.0
        assert ckpt.latest_step() == 2
        assert ckpt.save(3, _tiny(3.0))  # the step can be saved again
    assert (directory / "corrupt-3").is_dir()
    assert any("corrupt-3" in r.getMessage() for r in caplog.records)


def test_no_intact_checkpoint_names_the_directory(tmp_path):
    directory = tmp_path / "ckpt"
    with checkpoint.Checkpointer(directory, max_to_keep=5) as ckpt:
        _save_all(ckpt, [0.1])
    _truncate_state_files(directory / "1")
    with checkpoint.Checkpointer(directory, max_to_keep=5) as ckpt:
        with pytest.raises(checkpoint.CorruptCheckpointError, match=str(directory)):
            ckpt.restore_intact(_tiny_target())
