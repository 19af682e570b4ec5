"""XLA's persistent compilation cache for the programs: a second run of the same stage, a resumed one, an
evaluation of the same model or a second `cleaq-predict` loads the programs an earlier run compiled
instead of compiling them again (docs/performance.md, "The compilation cache").

``cleaq-run`` calls `use` with ``config.compilation_cache_dir`` and ``cleaq-predict`` with
``--compilation-cache`` before anything compiles, both defaulting to `configs.COMPILATION_CACHE_DIR`.
JAX_COMPILATION_CACHE_DIR, when set (empty turns the cache off), is the user's own choice and wins, as
XLA_FLAGS does. Every program is kept, however quickly it compiled (jax's default keeps only those over
1 s, which leaves out the evaluation's many small ones; docs/performance.md measures both); a
JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS the user set is kept. Entries are never evicted: remove the
directory to reclaim its space (the demo's programs take about 8 MB). A multi-process job on CPU leaves the
cache off (`parallel.initialize_distributed`).

Imports only the standard library until `use` is called: predict from an exported model uses it.
"""

from __future__ import annotations

import os

ENV = "JAX_COMPILATION_CACHE_DIR"
MIN_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def use(directory: str) -> str | None:
    """Point jax's persistent compilation cache at ``directory`` (``~`` expanded; '' turns it off), unless
    JAX_COMPILATION_CACHE_DIR is set, which wins. Returns the directory in use, or None when the cache is
    off. Call it before the first compilation; a later call moves the cache for later ones."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if MIN_TIME_ENV not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if ENV in os.environ:
        return os.environ[ENV] or None
    path = os.path.expanduser(directory) if directory else ""
    jax.config.update("jax_compilation_cache_dir", path or None)
    compilation_cache.reset_cache()  # jax opens the cache once, at a compilation: one opened elsewhere is closed
    return path or None
