"""Test-wide settings: CPU only, TensorFlow kept off accelerators, absl flags parsed (grain needs them)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests run tiny models: XLA's LLVM optimisation costs seconds per compilation and saves microseconds.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
# One compilation of each tiny program per machine, shared with the tests' subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/cleaq_jax_test_compile_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A Cloud Storage emulator on a free localhost port, started once per test process and stopped at
    its end (tests/gcs_emulator.py says which clients it reaches and how)."""
    from tests import gcs_emulator as emulator_lib

    server = emulator_lib.GCSEmulator(str(tmp_path_factory.mktemp("gcs") / "objects"))
    server.start()
    yield server
    server.stop()
