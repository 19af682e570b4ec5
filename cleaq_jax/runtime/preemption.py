"""Preemption: SIGTERM turned into a stop every process of a run agrees on (`PreemptionGuard`)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cleaq_jax.runtime import parallel


class PreemptionGuard:
    """Turns SIGTERM (a preemption notice) into a stop every process agrees on, polled by the loop.

    Use as a context manager around the loop; the previous handlers are restored on exit::

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.should_stop(step):
                    checkpointer.save(step, state, force=True); break

    One process: a Python handler sets a flag, and `should_stop` returns it at every step.

    Several processes (jax.distributed started, with its preemption service, the default): JAX's
    preemption sync point. The runtime's own SIGTERM handler, installed by jax.distributed.initialize,
    takes the notice on whichever process gets it and tells the others through the coordination
    service, which picks the first step every process can still reach (the largest step any reports,
    plus one); `should_stop(step)` is True on every process at exactly that step. It must be called at
    every step, from the same first step on every process; it waits for no device and costs nothing
    until a notice comes. No Python handler is installed then for SIGTERM (it would replace the
    runtime's). Without the preemption service (``JAX_ENABLE_PREEMPTION_SERVICE=false``) the local
    flags are all-gathered at steps divisible by ``sync_every_steps`` instead.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), sync_every_steps: int = 1):
        if sync_every_steps < 1:
            raise ValueError(f"sync_every_steps={sync_every_steps} must be at least 1")
        self._signals = tuple(signals)
        self._sync_every = int(sync_every_steps)
        self._received = threading.Event()
        self._previous: dict[int, Any] = {}
        self._sync_point = False

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        logging.warning("received signal %d: will save a checkpoint and stop at the next check", signum)
        self._received.set()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread (Python delivers signals there)")
        self._sync_point = jax.process_count() > 1 and parallel.preemption_service_running()
        for sig in self._signals:
            if self._sync_point and sig == signal.SIGTERM:
                continue  # the runtime's preemption notifier handles it
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            # None means a handler installed outside Python; the default action is the closest restore.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    @property
    def received(self) -> bool:
        """True once this process got a handled signal, or (several processes) once the processes
        reached the preemption sync point."""
        return self._received.is_set()

    def should_stop(self, step: int | None = None) -> bool:
        """True once a signal arrived (one process) or at the step all processes agreed to stop at.

        step: the training step (needed with several processes; None agrees now by all-gather).
        """
        if jax.process_count() == 1:
            return self._received.is_set()
        if self._sync_point and step is not None and multihost_utils.reached_preemption_sync_point(int(step)):
            self._received.set()
            return True
        if self._sync_point and not self._previous:
            return False  # SIGTERM was the only signal, and the sync point handles it
        if step is not None and int(step) % self._sync_every:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self._received.is_set(), np.int32))
        return bool(np.any(flags))
