"""What a person reads on the terminal: one line per logging interval, evaluation tables, progress bars.

The libraries underneath (orbax, grain, absl, jax, etils, gcsfs) log at INFO through absl and Python
logging; a run prints hundreds of their lines. `setup` raises them to WARNING unless the program was asked
to say more (absl's ``--verbosity`` / ``-v`` for ``cleaq-run``, ``-v`` / ``--verbose`` for the argparse
programs: every program calls it), while `say` writes the project's own lines through a logger of its
own, so they show either way. Only process 0 writes. Errors are shown by `cleaq_jax.errors.reported`.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from absl import logging as absl_logging
from tqdm import tqdm

LOGGER_NAME = "cleaq_jax.runtime.console"
# Python loggers of the libraries that log at INFO through Python logging directly.
LIBRARY_LOGGERS = ("jax", "orbax", "grain", "tensorflow", "etils", "absl", "fsspec", "gcsfs")

_logger = logging.getLogger(LOGGER_NAME)
# Lines every process writes (a process joining a multi-process run), each to its own log.
_every_logger = logging.getLogger(LOGGER_NAME + ".every_process")


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a line is written: a program's lines follow a
    redirection made after `setup` (a test capturing a program it calls in-process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; the property always answers sys.stderr
        pass


def _is_main_process() -> bool:
    # jax.process_index() needs jax initialised; JAX_PROCESS_ID-free runs are process 0.
    return os.environ.get("CLEAQ_PROCESS_INDEX", "0") == "0"


def setup(verbose: bool) -> None:
    """Console output for a program: the project's lines on stderr (process 0); library INFO only when
    ``verbose`` (absl's -v / --verbosity given to cleaq-run, -v / --verbose to an argparse program),
    otherwise those libraries log warnings and errors only."""
    for logger in (_logger, _every_logger):
        if not logger.handlers:
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.propagate = False
    _logger.setLevel(logging.INFO if _is_main_process() else logging.WARNING)
    _every_logger.setLevel(logging.INFO)
    if verbose:
        # A program that absl's app did not start (the argparse ones) has no handler for library lines yet,
        # and absl's default hides INFO: show it, as --verbosity=0 does for cleaq-run.
        if absl_logging.get_absl_handler() not in logging.root.handlers:
            absl_logging.use_absl_handler()
            absl_logging.set_verbosity(absl_logging.INFO)
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # XLA's C++ logs, and TensorFlow's (read when XLA / TensorFlow load; an explicit value is kept).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The project does not import TensorFlow; where it is installed anyway, etils.epath loads it for
    # gs:// paths, which need no oneDNN kernels, and left on it announces them on every import (two lines
    # each, whatever the log level).
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def set_process_index(index: int) -> None:
    """Record which process this is (after jax.distributed started): only process 0 writes lines."""
    os.environ["CLEAQ_PROCESS_INDEX"] = str(index)
    _logger.setLevel(logging.INFO if index == 0 else logging.WARNING)


def say(message: str, *args) -> None:
    """One line for the person at the terminal (printf-style args), shown whatever the verbosity."""
    _logger.info(message, *args)


def say_every_process(message: str, *args) -> None:
    """Like `say`, but written by every process (each process's log shows it), e.g. joining a run."""
    _every_logger.info(message, *args)


def _duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class StageProgress:
    """The per-interval line of a training stage:
    ``stage1 epoch 2/6 step 40/120 loss=0.512 loss_dr=0.61 | 3.1 steps/s, ETA 0:25``.

    Steps/s is over the interval just ended (the first interval includes no compilation: timing starts
    at `start`), the ETA extrapolates it to the remaining steps.
    """

    def __init__(self, stage: str, first_step: int, total_steps: int, steps_per_epoch: int):
        self.stage, self.total, self.per_epoch = stage, int(total_steps), max(int(steps_per_epoch), 1)
        self._step, self._time = int(first_step), None

    def start(self) -> None:
        """Start the clock (after the step is compiled)."""
        self._time = time.perf_counter()

    def line(self, step: int, metrics: dict[str, float]) -> str:
        """The line for ``step`` with the interval's mean ``metrics`` (losses first); resets the clock."""
        now = time.perf_counter()
        rate = (step - self._step) / (now - self._time) if self._time is not None and now > self._time else 0.0
        self._step, self._time = step, now
        epoch = (step - 1) // self.per_epoch + 1
        epochs = -(-self.total // self.per_epoch)
        losses = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("loss"))
        eta = _duration((self.total - step) / rate) if rate > 0 else "?"
        return (f"{self.stage} epoch {epoch}/{epochs} step {step}/{self.total} {losses} | "
                f"{rate:.2f} steps/s, ETA {eta}")

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """Write `line` to the console."""
        say("%s", self.line(step, metrics))


def bar(total: int | None, desc: str, unit: str = "it", disable: bool = False):
    """A tqdm progress bar on stderr (process 0 only; others, and ``disable``, get a disabled one),
    closed by the caller."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=disable or not _is_main_process(), mininterval=1.0)
