"""XLA's persistent compilation cache (`runtime.compile_cache`): where the programs keep it, what turns it
off, and that a second process loads what the first compiled. Each case is a child Python with its own
HOME, outside the test run's shared cache (conftest)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests import tiny

# One program compiled after `compile_cache.use` (its argument, or the programs' default), reporting the
# directory in use and how many programs jax loaded from the cache.
CHILD = r"""
import json, sys
import jax, jax.numpy as jnp
from cleaq_jax import configs
from cleaq_jax.runtime import compile_cache

hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
jax.jit(lambda x: x + 1)(1.0)  # something compiled before the cache is named: `use` must still take effect
used = compile_cache.use(sys.argv[1] if len(sys.argv) > 1 else configs.COMPILATION_CACHE_DIR)
jax.jit(lambda x: jnp.sin(x) * 2.0 + 1.0)(jnp.arange(4.0)).block_until_ready()
print(json.dumps({"used": used, "hits": len(hits)}))
"""


def _environ(tmp_path) -> dict[str, str]:
    """A child's environment with its own HOME and none of the test run's cache settings."""
    environ = tiny.subprocess_env(HOME=str(tmp_path / "home"))
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        environ.pop(name, None)
    return environ


def _child(tmp_path, *args: str, **env: str) -> dict:
    environ = _environ(tmp_path)
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", CHILD, *args], check=False, env=environ, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _entries(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith("-cache")] if directory.exists() else []


def test_the_default_cache_is_in_the_users_home_and_a_second_process_loads_from_it(tmp_path):
    expected = tmp_path / "home" / ".cache" / "cleaq_jax" / "xla"
    first = _child(tmp_path)
    assert first == {"used": str(expected), "hits": 0}
    # The program compiles in milliseconds, far below jax's own threshold of 1 s: every program is kept.
    assert _entries(expected), "the first process cached nothing"
    second = _child(tmp_path)
    assert second["used"] == str(expected) and second["hits"] >= 1, second


def test_an_empty_directory_turns_the_cache_off(tmp_path):
    for _ in range(2):
        assert _child(tmp_path, "") == {"used": None, "hits": 0}
    assert not (tmp_path / "home" / ".cache").exists()


def test_jax_compilation_cache_dir_when_set_wins_and_empty_turns_it_off(tmp_path):
    given, named = tmp_path / "given", tmp_path / "named"
    assert _child(tmp_path, str(named), JAX_COMPILATION_CACHE_DIR=str(given))["used"] == str(given)
    assert _entries(given) and not named.exists()
    assert _child(tmp_path, str(named), JAX_COMPILATION_CACHE_DIR="") == {"used": None, "hits": 0}
    assert not named.exists()


def test_a_later_call_moves_the_cache_for_later_compilations(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    code = (f"import jax\nfrom cleaq_jax.runtime import compile_cache\n"
            f"compile_cache.use({str(first)!r}); jax.jit(lambda x: x * 3.0)(1.0)\n"
            f"compile_cache.use({str(second)!r}); jax.jit(lambda x: x - 5.0)(1.0)\n")
    done = subprocess.run([sys.executable, "-c", code], check=False, env=_environ(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _entries(first) and _entries(second)


def test_jax_persistent_cache_min_compile_time_secs_when_set_is_kept(tmp_path):
    named = tmp_path / "named"
    assert _child(tmp_path, str(named), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="600")["used"] == str(named)
    assert not _entries(named), "a program compiled in milliseconds was kept against the user's threshold"
