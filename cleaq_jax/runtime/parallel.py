"""Device mesh, shardings, multi-process start-up and global batches from per-process data.

One program runs unchanged on 1 CPU device, on 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on two local processes and on
Cloud TPU slices or multi-GPU hosts. The recipe (no pmap anywhere):

1. ``initialize_distributed()`` once, before anything touches a device.
2. ``mesh = make_mesh(config.mesh.data, config.mesh.fsdp)``: axes ``("data", "fsdp")``.
3. ``state, shardings = train_state.sharded_state(init_fn, mesh, key)``: shapes first
   (``jax.eval_shape``), shardings from them (`state_shardings`), then
   ``run_once(init_fn, key, out_shardings=...)`` (a jit compiled for its single call).
4. ``step = jit_train_step(train_step, shardings, mesh)`` where
   ``train_step(state, batch) -> (state, metrics)``.
5. Each process reads its own slice of the data; ``global_batch`` (or ``prefetch_to_device``)
   assembles the global-view array whose batch dimension is split over every device, so
   BatchNorm statistics are global without any ``pmean``.

`barrier` lines the processes up at the coordination service (no device collective), and
`broadcast_text` hands process 0's words to the others through it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax._src import distributed as jax_distributed  # the coordination-service client; orbax uses it too
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cleaq_jax import errors

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# The batch dimension is split over both axes: every device holds a distinct slice of examples.
BATCH_AXES = MESH_AXES

PyTree = Any


# --------------------------------------------------------------------------- start-up
def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise errors.ConfigError(
            f"environment variable {name}={value!r} is not an integer; set one or unset it") from None


def _cluster_detected() -> str | None:
    """Names a launcher that jax's own cluster detection handles (SLURM, Cloud TPU), else None."""
    if _env_int("SLURM_NTASKS") not in (None, 1) and "SLURM_JOB_ID" in os.environ:
        return "SLURM"
    tpu_markers = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
    if any(os.environ.get(name) for name in tpu_markers):
        return "Cloud TPU"
    # A TPU VM has libtpu installed and TPU chips attached (/dev/accel* or /dev/vfio).
    has_chips = os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
    if has_chips and importlib.util.find_spec("libtpu") is not None:
        return "Cloud TPU"
    return None


def _launch_plan(address: str | None, num_processes: int | None, process_id: int | None) -> str | None:
    """How to start: "explicit", a launcher name for jax's auto-detection, or None (single process)."""
    cluster = _cluster_detected()
    if address is None and num_processes is None and process_id is None:
        return cluster
    missing = [
        name
        for name, value in (
            ("coordinator_address / JAX_COORDINATOR_ADDRESS", address),
            ("num_processes / JAX_NUM_PROCESSES", num_processes),
            ("process_id / JAX_PROCESS_ID", process_id),
        )
        if value is None
    ]
    if missing and cluster is None:
        raise errors.ConfigError(
            f"multi-process start needs {', '.join(missing)}; pass them or set the environment "
            "variables on every process (or unset all of them for a single-process run)"
        )
    return "explicit"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | list[int] | None = None,
) -> bool:
    """Starts the multi-process JAX runtime when this run spans several processes.

    Explicit arguments win; missing ones come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. With none of those set, SLURM (several tasks)
    and Cloud TPU are left to ``jax.distributed.initialize()``'s own auto-detection. Otherwise
    this is a single-process run and nothing happens. Must run before any device is used.

    Returns how this call joined the processes (``"explicit"``, ``"SLURM"``, ...) when it initialised
    the distributed runtime, else None.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _env_int("JAX_NUM_PROCESSES") if num_processes is None else num_processes
    process_id = _env_int("JAX_PROCESS_ID") if process_id is None else process_id
    if jax.distributed.is_initialized():
        logging.info("jax.distributed already initialised: process %d of %d", jax.process_index(), jax.process_count())
        return None
    plan = _launch_plan(address, num_processes, process_id)
    if plan is None:
        logging.info("single-process run: %d local devices (%s)", jax.local_device_count(), jax.default_backend())
        return None
    # Cross-process collectives on CPU need gloo; only the CPU backend reads this flag.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes, process_id, local_device_ids)
    if jax.default_backend() == "cpu":
        # jax writes the persistent compilation cache from process 0 only, so in a warm run process 0
        # loads each program from it while the others compile theirs. On CPU with jaxlib 0.12 (not
        # 0.10 or 0.11) such a mix never completes its first collective: the job hangs. CPU programs
        # compile in seconds; a multi-process CPU job leaves the cache off.
        jax.config.update("jax_enable_compilation_cache", False)
    return plan


def process_line(plan: str) -> str:
    """The line a process writes on joining a multi-process run (each process, to its own log)."""
    return (f"jax.distributed initialised ({plan}): process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} local / {jax.device_count()} global devices ({jax.default_backend()})")


def preemption_service_running() -> bool:
    """Whether jax.distributed started its preemption sync manager (SIGTERM -> a common stop step)."""
    return jax_distributed.global_state.preemption_sync_manager is not None


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait for every process at the coordination service (no device collective, so no collective
    timeout however long the others take, e.g. to compile or to build data). A no-op with one process."""
    if jax.process_count() == 1:
        return
    client = jax_distributed.global_state.client
    if client is None:
        multihost_utils.sync_global_devices(name)
    else:
        client.wait_at_barrier(f"cleaq_jax:{name}", timeout_in_ms=timeout_s * 1000)



def broadcast_text(name: str, text: str, timeout_s: int = 3600) -> str:
    """Process 0's ``text``, on every process (each passes its own; only process 0's is read), through
    the coordination service's key-value store (no device collective). ``text`` as it is with one process."""
    if jax.process_count() == 1:
        return text
    client = jax_distributed.global_state.client
    key = f"cleaq_jax:{name}"
    if client is None:
        data = np.frombuffer(text.encode("utf-8")[:4096].ljust(4096, b"\0"), np.uint8)
        return bytes(multihost_utils.broadcast_one_to_all(data)).rstrip(b"\0").decode("utf-8", "replace")
    if jax.process_index() == 0:
        client.key_value_set(key, text or " ")  # an empty value is not stored everywhere: a space stands for it
        return text
    return client.blocking_key_value_get(key, timeout_s * 1000).strip()

# --------------------------------------------------------------------------- mesh and shardings
def make_mesh(data: int = -1, fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
    """A 2-D device mesh with axes ("data", "fsdp"), both of axis type Auto.

    data, fsdp: sizes (config keys ``mesh.data`` and ``mesh.fsdp``); -1 takes all remaining devices.
    devices: the devices to lay out (default: every device of every process).
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    sizes = {"mesh.data": int(data), "mesh.fsdp": int(fsdp)}
    if list(sizes.values()).count(-1) > 1:
        raise errors.ConfigError("mesh.data and mesh.fsdp cannot both be -1; set one of them to a device count")
    for key, value in sizes.items():
        if value == 0 or value < -1:
            raise errors.ConfigError(f"{key}={value} must be a positive device count or -1 (all remaining devices)")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    for key, value in sizes.items():
        if value == -1:
            if count % fixed:
                raise errors.ConfigError(
                    f"{count} devices cannot be split evenly with {_fmt(sizes)}; "
                    f"make the fixed axis divide {count}"
                )
            sizes[key] = count // fixed
    if sizes["mesh.data"] * sizes["mesh.fsdp"] != count:
        raise errors.ConfigError(
            f"{_fmt(sizes)} asks for {sizes['mesh.data'] * sizes['mesh.fsdp']} devices but {count} are "
            f"available; make mesh.data x mesh.fsdp = {count} (or set mesh.data=-1)"
        )
    shape = (sizes["mesh.data"], sizes["mesh.fsdp"])
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def _fmt(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) dimension over both mesh axes; other dimensions stay whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh (scalars, metrics, RNG keys, small parameters)."""
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: mesh.data x mesh.fsdp."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def _leaf_sharding(leaf: Any, mesh: Mesh, fsdp_size: int, min_size: int) -> NamedSharding:
    shape = tuple(getattr(leaf, "shape", ()))
    if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
        return replicated(mesh)
    # Largest dimension first: it gives the most even shards and the smallest per-device slices.
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return NamedSharding(mesh, PartitionSpec(*spec))
    return replicated(mesh)


def state_shardings(abstract_state: PyTree, mesh: Mesh, fsdp_min_size: int = 2**18) -> PyTree:
    """Shardings for a train-state pytree, one NamedSharding per leaf.

    abstract_state: any pytree of arrays or ShapeDtypeStruct (e.g. ``jax.eval_shape`` of the init),
        optax states and integer counters included.
    With ``mesh.fsdp`` = 1 every leaf is replicated. With fsdp > 1, each leaf of at least
    ``fsdp_min_size`` elements is split over "fsdp" along its largest dimension divisible by the
    fsdp size (parameters and optimizer moments alike: fully-sharded data parallelism); smaller
    or indivisible leaves stay replicated.
    """
    fsdp_size = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda leaf: _leaf_sharding(leaf, mesh, fsdp_size, fsdp_min_size), abstract_state)


# --------------------------------------------------------------------------- batches
def check_batch_divisible(global_batch_size: int, mesh: Mesh, key: str = "batch_size") -> int:
    """Returns the per-device batch; raises when the batch does not split over the devices.

    key: the setting the size came from, named in the error (e.g. "eval_batch_size", "--batch-size").
    """
    size = data_parallel_size(mesh)
    if global_batch_size <= 0 or global_batch_size % size:
        raise errors.ConfigError(
            f"{key}={global_batch_size} is not divisible by the data-parallel size {size} "
            f"(mesh.data={mesh.shape[DATA_AXIS]} x mesh.fsdp={mesh.shape[FSDP_AXIS]}); "
            f"set {key} to a multiple of {size}"
        )
    return global_batch_size // size


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles global-view arrays from this process's slice of the batch.

    local: name -> array of shape [B_local, ...] (B_local = global batch / process count, equal in
        every process); the global array has shape [B_local * process_count, ...], split over
        the devices along the batch dimension.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"batch field {name!r} is a scalar; every batch field needs a leading batch dimension")
        check_batch_divisible(value.shape[0] * jax.process_count(), mesh)
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


# --------------------------------------------------------------------------- state and step
def abstract_with_shardings(abstract_state: PyTree, shardings: PyTree) -> PyTree:
    """The ShapeDtypeStructs of ``abstract_state`` carrying ``shardings`` (a restore target, a jit layout).

    abstract_state: pytree of arrays or ShapeDtypeStruct (``jax.eval_shape`` of the init);
    shardings: matching pytree of jax.sharding.Sharding, e.g. from `state_shardings` on the mesh to
        restore onto (which may differ from the mesh that saved).
    """
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def jit_train_step(
    step_fn: Callable[[PyTree, dict[str, jax.Array]], tuple[PyTree, PyTree]],
    state_shardings: PyTree,
    mesh: Mesh,
    *,
    donate: bool = True,
) -> Callable[[PyTree, dict[str, jax.Array]], tuple[PyTree, PyTree]]:
    """Compiles a train step ``step_fn(state, batch) -> (state, metrics)`` for the mesh.

    state: the train-state pytree laid out as ``state_shardings``; its RNG key lives inside it,
        so the step is a pure function of its two arguments.
    batch: dict of global arrays, batch dimension split as `batch_sharding` (from `global_batch`).
    metrics: any pytree of scalars; returned replicated so every process can read them.
    donate: reuse the input state's buffers for the output (the old state is deleted; never
        touch it after the call).
    """
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )


# XLA options for programs that run once (a state's initialisation): on CPU, LLVM's optimisation of
# the generated loops is most of their compile time (the demo's stage-2 init: 21 s of 22, 5.6 s
# without it) and buys nothing for a single run. Other backends keep their defaults.
RUN_ONCE_CPU_OPTIONS = {"xla_backend_optimization_level": 0}


def run_once(fn: Callable[..., PyTree], *args: Any, out_shardings: Any = None) -> PyTree:
    """``jax.jit(fn, out_shardings=out_shardings)(*args)``, compiled for a single call: on CPU without
    the backend's loop optimisation (`RUN_ONCE_CPU_OPTIONS`). Same values, a quarter of the compile time
    for an initialiser; a function that runs many times (a train step) should use ``jax.jit``."""
    lowered = jax.jit(fn, out_shardings=out_shardings).lower(*args)
    options = RUN_ONCE_CPU_OPTIONS if jax.default_backend() == "cpu" else None
    return lowered.compile(compiler_options=options)(*args)


# --------------------------------------------------------------------------- prefetch
_END = object()


class DevicePrefetcher:
    """Iterator of global batches assembled by a background thread, ``size`` batches ahead.

    It also behaves as a checkpointable grain iterator (get_state/set_state/start_prefetch):
    its state is the underlying iterator's position just after the last batch handed out, not
    after the batches waiting in the queue, so a resumed run loses and repeats nothing. Pass the
    prefetcher itself, not the iterator it wraps, as ``data_iter`` to the checkpointer.
    """

    def __init__(self, iterator: Iterator[Mapping[str, np.ndarray]], size: int, mesh: Mesh):
        if size < 1:
            raise ValueError(f"prefetch size must be at least 1, got {size}")
        self._it, self._size, self._mesh = iterator, size, mesh
        self._state = self._read_state()
        self._thread: threading.Thread | None = None
        self.start_prefetch()

    def _read_state(self) -> Any:
        return self._it.get_state() if hasattr(self._it, "get_state") else None

    @staticmethod
    def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
        """Blocks until the item is queued (True) or a stop is requested (False)."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for local in self._it:
                if not self._put(out, (global_batch(local, self._mesh), self._read_state()), stop):
                    return
            item = (_END, None)
        except Exception as error:  # pylint: disable=broad-except
            item = (error, None)  # re-raised in the consumer's thread
        self._put(out, item, stop)

    def start_prefetch(self) -> None:
        """Starts the background thread unless it runs already (a restart would drop queued batches)."""
        if self._thread is not None:
            return
        self._queue: queue.Queue = queue.Queue(maxsize=self._size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True)
        self._thread.start()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._thread is None:
            raise StopIteration
        batch, state = self._queue.get()
        if batch is _END:
            self._thread = None
            raise StopIteration
        if isinstance(batch, Exception):
            self._thread = None
            raise batch
        self._state = state
        return batch

    def get_state(self) -> bytes:
        """The wrapped iterator's state after the last batch returned, as JSON bytes."""
        if self._state is None:
            raise TypeError(f"{type(self._it).__name__} has no get_state(); its position cannot be checkpointed")
        state = self._state
        return state if isinstance(state, bytes) else json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        """Moves the wrapped iterator to a saved position and drops the batches queued ahead."""
        self._stop_thread()
        wrapped = self._it.get_state()
        self._it.set_state(state if isinstance(wrapped, bytes) else json.loads(state))
        self._state = self._read_state()
        self.start_prefetch()

    def close(self) -> None:
        """Stops the background thread."""
        self._stop_thread()


def prefetch_to_device(
    iterator: Iterator[Mapping[str, np.ndarray]], size: int, mesh: Mesh
) -> DevicePrefetcher:
    """Wraps an iterator of per-process numpy batches into global device batches, ``size`` ahead.

    iterator: yields dicts name -> [B_local, ...] numpy arrays (this process's slice), e.g. a grain
        DatasetIterator; a background thread calls `global_batch` on them so the training loop
        never waits on host->device transfers. Usual size: 2.
    """
    return DevicePrefetcher(iterator, size, mesh)
