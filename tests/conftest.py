"""Test-wide settings: CPU only, TensorFlow kept off accelerators, absl flags parsed (grain needs them),
one compilation cache per test run, and the Cloud Storage emulator."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests run tiny models: XLA's LLVM optimisation costs seconds per compilation and saves microseconds.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
_CACHE_GIVEN = "JAX_COMPILATION_CACHE_DIR" in os.environ

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Each tiny program compiled once per run: a cache in the run's temporary directory, shared by its
    xdist workers and the tests' subprocesses (they inherit the environment), never by two runs (jax
    writes entries in place, so a reader can meet a half-written one, and a killed writer leaves one
    behind), and removed with the run's other temporary files. JAX_COMPILATION_CACHE_DIR, if set, wins."""
    if _CACHE_GIVEN:
        return
    import jax  # after the settings above; jax reads the cache directory at the first compilation

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    path = str(root / "jax_compilation_cache")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    jax.config.update("jax_compilation_cache_dir", path)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A Cloud Storage emulator on a free localhost port, started once per test process and stopped at
    its end (tests/gcs_emulator.py says which clients it reaches and how)."""
    from tests import gcs_emulator as emulator_lib

    server = emulator_lib.GCSEmulator(str(tmp_path_factory.mktemp("gcs") / "objects"))
    server.start()
    yield server
    server.stop()
