"""Mesh, shardings, global batches, the jitted step and multi-process start-up (cleaq_jax.runtime.parallel).

Multi-device runs happen in subprocesses (tests/_dist_worker.py): the pytest process has one CPU
device, and the device count is fixed when jax starts. They are launched together, once per module.
"""

from __future__ import annotations

import os
import subprocess
import sys

import _toy
import grain
import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from cleaq_jax.runtime import checkpoint, parallel
from cleaq_jax.training import state as train_state

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_dist_worker.py")
TIMEOUT = 300


def _abstract_mesh(data: int, fsdp: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def _clean_env(cache_dir: str) -> dict[str, str]:
    """The test's environment without multi-process settings, with a compilation cache that the
    subprocesses share (identical programs compile once)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


class _Run:
    """A worker subprocess whose result file is read once it has finished."""

    def __init__(self, out: str, args: list[str], env: dict[str, str]):
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, *args, "--out", out], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._result: dict[str, np.ndarray] | None = None

    def result(self) -> dict[str, np.ndarray]:
        if self._result is None:
            log, _ = self.proc.communicate(timeout=TIMEOUT)
            assert self.proc.returncode == 0, log.decode(errors="replace")[-3000:]
            with np.load(self.out) as data:
                self._result = dict(data)
        return self._result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _two_processes(tmp, init: str) -> dict[str, _Run]:
    """Two workers of one 2-process job, started with explicit flags or JAX_* variables."""
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    started = {}
    for pid in range(2):
        args = ["multi", "--devices", "2", "--init", init]
        env = _clean_env(str(tmp / "cache"))
        if init == "explicit":
            args += ["--coordinator", address, "--num-processes", "2", "--process-id", str(pid),
                     "--ckpt", str(tmp / "ckpt")]
        else:
            env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        started[f"{init}{pid}"] = _Run(str(tmp / f"{init}{pid}.npz"), args, env)
    return started


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory):
    """Starts the 8-device meshes run and the 2-process job with explicit flags in the background
    as the module begins, so they overlap with the single-device tests."""
    tmp = tmp_path_factory.mktemp("dist")
    started = {"meshes": _Run(str(tmp / "meshes.npz"), ["meshes", "--devices", "8"], _clean_env(str(tmp / "cache")))}
    started.update(_two_processes(tmp, "explicit"))
    started["tmp"] = tmp
    yield started
    for run in started.values():
        if isinstance(run, _Run):
            run.kill()


@pytest.fixture(scope="module")
def env_job(runs):
    """The 2-process job through JAX_* variables, started once the first job filled the cache."""
    for pid in range(2):
        runs[f"explicit{pid}"].result()
    started = _two_processes(runs["tmp"], "env")
    yield started
    for run in started.values():
        run.kill()


@pytest.fixture(scope="module")
def meshes(runs):
    return runs["meshes"].result()


def _counter_init(key: jax.Array) -> dict[str, jax.Array]:
    return {"w": jax.random.key_data(key).astype(np.float32), "n": jnp.zeros((), np.int32)}


def _counter_step(state, batch):
    """A minimal step (state, batch) -> (state, metrics) for properties of the jitted step itself."""
    return {"w": state["w"] + batch["x"].mean(), "n": state["n"] + 1}, {"mean": batch["x"].mean()}


# --------------------------------------------------------------------------- mesh
def test_mesh_has_data_and_fsdp_axes_of_auto_type():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data", "fsdp")
    assert tuple(mesh.axis_types) == (AxisType.Auto, AxisType.Auto)
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}


def test_mesh_size_mismatch_names_the_config_keys():
    with pytest.raises(ValueError, match=r"mesh\.data=2, mesh\.fsdp=3 asks for 6 devices but 1"):
        parallel.make_mesh(2, 3)


def test_mesh_rejects_both_axes_minus_one():
    with pytest.raises(ValueError, match="mesh.data and mesh.fsdp cannot both be -1"):
        parallel.make_mesh(-1, -1)


# --------------------------------------------------------------------------- start-up
_LAUNCH_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
                     "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


def test_initialize_distributed_is_a_no_op_without_settings(monkeypatch):
    for name in _LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() is None
    assert not jax.distributed.is_initialized()


def test_initialize_distributed_names_missing_settings(monkeypatch):
    for name in _LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ValueError, match="num_processes / JAX_NUM_PROCESSES, process_id / JAX_PROCESS_ID"):
        parallel.initialize_distributed()


# --------------------------------------------------------------------------- shardings
def test_fsdp_shards_largest_divisible_dimension():
    abstract = {"w": jax.ShapeDtypeStruct((3, 64, 32), np.float32)}
    spec = parallel.state_shardings(abstract, _abstract_mesh(4, 2), fsdp_min_size=16)["w"].spec
    assert spec == PartitionSpec(None, "fsdp", None)


def test_fsdp_skips_a_larger_indivisible_dimension():
    abstract = {"w": jax.ShapeDtypeStruct((63, 32), np.float32)}
    spec = parallel.state_shardings(abstract, _abstract_mesh(2, 4), fsdp_min_size=16)["w"].spec
    assert spec == PartitionSpec(None, "fsdp")


def test_small_indivisible_and_scalar_leaves_stay_replicated():
    abstract = {
        "small": jax.ShapeDtypeStruct((4, 2), np.float32),
        "odd": jax.ShapeDtypeStruct((33, 35), np.float32),
        "count": jax.ShapeDtypeStruct((), np.int32),
    }
    shardings = parallel.state_shardings(abstract, _abstract_mesh(4, 2), fsdp_min_size=16)
    assert all(s.spec == PartitionSpec() for s in shardings.values())


def test_without_fsdp_every_leaf_is_replicated():
    abstract = jax.eval_shape(_toy.init_state, jax.random.key(0))
    shardings = parallel.state_shardings(abstract, _abstract_mesh(8, 1), fsdp_min_size=1)
    assert all(s.spec == PartitionSpec() for s in jax.tree.leaves(shardings))


def test_batch_not_divisible_names_batch_size_and_parallel_size():
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the data-parallel size 8"):
        parallel.check_batch_divisible(12, _abstract_mesh(4, 2))


def test_per_device_batch_is_global_over_data_times_fsdp():
    assert parallel.check_batch_divisible(32, _abstract_mesh(4, 2)) == 4


def test_global_batch_builds_arrays_split_on_the_batch_dimension():
    mesh = parallel.make_mesh()
    batch = parallel.global_batch(_toy.make_batch(4, 0), mesh)
    assert batch["image"].shape == (4, _toy.IMAGE_SIZE, _toy.IMAGE_SIZE, 3)
    assert batch["image"].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(batch["label"]), _toy.make_batch(4, 0)["label"])


# --------------------------------------------------------------------------- the step
def _counter_setup(donate: bool):
    mesh = parallel.make_mesh()
    state, shardings = train_state.sharded_state(_counter_init, mesh, jax.random.key(0))
    step = parallel.jit_train_step(_counter_step, shardings, mesh, donate=donate)
    return state, step, parallel.global_batch({"x": np.ones((4, 2), np.float32)}, mesh)


def test_donated_state_buffers_are_deleted_after_the_step():
    state, step, batch = _counter_setup(donate=True)
    old_leaves = jax.tree.leaves(state)
    new_state, _ = step(state, batch)
    assert all(leaf.is_deleted() for leaf in old_leaves)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))


def test_state_is_kept_when_donation_is_off():
    state, step, batch = _counter_setup(donate=False)
    step(state, batch)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))


def test_step_returns_state_in_its_shardings_and_metrics_replicated():
    state, step, batch = _counter_setup(donate=False)
    new_state, metrics = step(state, batch)
    assert int(new_state["n"]) == 1 and float(metrics["mean"]) == 1.0
    assert new_state["w"].sharding.is_equivalent_to(state["w"].sharding, 1)
    assert metrics["mean"].sharding.is_fully_replicated


def test_run_once_gives_jits_values_in_the_requested_layout():
    # Integer arithmetic (threefry's bits) is exact under any compiler optimisation level, so the
    # single-call compilation must agree with jax.jit bit for bit.
    mesh = parallel.make_mesh()
    fn = lambda key: {"bits": jax.random.bits(key, (8, 4), jnp.uint32), "n": jnp.arange(8) * 3}  # noqa: E731
    shardings = {"bits": parallel.batch_sharding(mesh), "n": parallel.replicated(mesh)}
    got = parallel.run_once(fn, jax.random.key(7), out_shardings=shardings)
    want = jax.jit(fn)(jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(got["bits"]), np.asarray(want["bits"]))
    np.testing.assert_array_equal(np.asarray(got["n"]), np.asarray(want["n"]))
    assert got["bits"].sharding.is_equivalent_to(shardings["bits"], 2)
    assert got["n"].sharding.is_fully_replicated


# --------------------------------------------------------------------------- prefetch
def _batches(n: int):
    return (
        grain.MapDataset.range(n)
        .map(lambda i: {"x": np.full((2, 3), i, np.float32)})
        .to_iter_dataset()
    )


def test_prefetch_yields_every_batch_in_order_on_device():
    mesh = parallel.make_mesh()
    got = [b for b in parallel.prefetch_to_device(iter(_batches(5)), 2, mesh)]
    assert [int(b["x"][0, 0]) for b in got] == [0, 1, 2, 3, 4]
    assert all(isinstance(b["x"], jax.Array) and b["x"].sharding == parallel.batch_sharding(mesh) for b in got)


def test_prefetch_state_resumes_after_the_last_batch_consumed():
    mesh = parallel.make_mesh()
    prefetcher = parallel.prefetch_to_device(iter(_batches(8)), 2, mesh)
    next(prefetcher), next(prefetcher)
    state = prefetcher.get_state()  # the thread has read further ahead by now
    prefetcher.close()
    resumed = parallel.prefetch_to_device(iter(_batches(8)), 2, mesh)
    resumed.set_state(state)
    assert [int(b["x"][0, 0]) for b in resumed] == [2, 3, 4, 5, 6, 7]


def test_prefetch_reraises_the_iterator_error():
    def broken():
        yield {"x": np.zeros((1, 2), np.float32)}
        raise OSError("shard 3 unreadable")

    prefetcher = parallel.prefetch_to_device(broken(), 2, parallel.make_mesh())
    next(prefetcher)
    with pytest.raises(OSError, match="shard 3 unreadable"):
        next(prefetcher)


# --------------------------------------------------------------------------- 8 fake devices (subprocess)
def test_mesh_minus_one_takes_the_remaining_devices(meshes):
    assert meshes["fsdp2_mesh"].tolist() == [4, 2]
    assert meshes["data8_mesh"].tolist() == [8, 1]


def test_fsdp_shards_parameters_and_adam_moments_on_eight_devices(meshes):
    # conv and dense kernels, and their Adam mu and nu: 6 leaves split over "fsdp".
    assert int(meshes["fsdp2_sharded"]) == 6
    assert int(meshes["data8_sharded"]) == 0


def test_eight_devices_give_one_device_losses(meshes):
    np.testing.assert_allclose(meshes["data8_losses"], meshes["one_losses"], rtol=1e-5)


def test_batchnorm_statistics_are_global_on_eight_devices(meshes):
    # Example i is shifted by i: per-device statistics would differ from one device's.
    for key in (k for k in meshes if k.startswith("one_bn")):
        np.testing.assert_allclose(meshes[key.replace("one_", "data8_")], meshes[key], rtol=1e-5, atol=1e-6)


def test_fsdp_two_by_data_four_gives_one_device_training(meshes):
    np.testing.assert_allclose(meshes["fsdp2_losses"], meshes["one_losses"], rtol=1e-5)
    for key in (k for k in meshes if k.startswith(("one_bn", "one_param"))):
        np.testing.assert_allclose(meshes[key.replace("one_", "fsdp2_")], meshes[key], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- two processes (subprocesses)
# Two processes reduce the gradient across processes in another order than one device does, so float32
# gradients differ by a few ulps (relative ~1e-6); Adam divides by sqrt(v), which amplifies that where a
# parameter's successive gradients nearly cancel (seen: 1.9e-6 absolute on one of 216 weights). A real
# fault (a shard read twice, a gradient not reduced) moves parameters by the order of one Adam step,
# lr = 1e-2; 1e-5 is a thousandth of that and a few times the round-off seen.
PROCESS_ATOL = 1e-5


@pytest.mark.parametrize("init", ["explicit", "env"])
def test_two_processes_match_single_process(request, meshes, init):
    job = request.getfixturevalue("runs" if init == "explicit" else "env_job")
    for pid in range(2):
        result = job[f"{init}{pid}"].result()
        assert int(result["process_count"]) == 2 and int(result["local_devices"]) == 2
        np.testing.assert_allclose(result["losses"], meshes["one_losses"], rtol=1e-5)
        params = sorted(k for k in meshes if k.startswith("one_param"))
        assert len(params) == len([k for k in result if k.startswith("param")])
        for key in params:
            np.testing.assert_allclose(result[key.replace("one_", "")], meshes[key], rtol=1e-5, atol=PROCESS_ATOL)


def test_sigterm_to_one_process_stops_every_process_at_one_common_step(runs):
    # The signal reaches process 1 at its step 3, through jax's preemption notifier: the processes
    # agree on a step after every step any of them had reached, and stop there together.
    results = [runs[f"explicit{pid}"].result() for pid in range(2)]
    assert [bool(r["received"]) for r in results] == [True, True]
    stopped = [int(r["stopped_at"]) for r in results]
    assert stopped[0] == stopped[1] >= 4, stopped


def test_two_processes_save_and_restore_one_checkpoint_with_their_own_data_positions(runs):
    results = [runs[f"explicit{pid}"].result() for pid in range(2)]
    assert all(bool(r["restored_equal"]) for r in results)
    # Process i had read i + 1 elements when it saved.
    assert [int(r["next_after_restore"]) for r in results] == [1, 2]


def test_two_process_fsdp_checkpoint_restores_on_one_device(runs, meshes):
    assert all(int(runs[f"explicit{pid}"].result()["sharded"]) == 6 for pid in range(2))
    mesh = parallel.make_mesh()
    abstract = jax.eval_shape(_toy.init_state, jax.random.key(0))
    target = parallel.abstract_with_shardings(abstract, parallel.state_shardings(abstract, mesh))
    restored = checkpoint.restore_state(runs["tmp"] / "ckpt", target)
    params = _toy.to_numpy(restored.params)
    for i, leaf in enumerate(params):
        np.testing.assert_allclose(leaf, meshes[f"one_param{i}"], rtol=1e-5, atol=PROCESS_ATOL)
