"""What a training stage writes for TensorBoard: metric event files and profiler traces.

`SummaryWriter` takes the values of a step (``write_scalars``, ``write_images``, ``write_texts``,
``write_hparams``; then ``flush`` and ``close``). Each call logs one absl INFO line (``[step] tag=value,
...``; shown with ``-v``) and, when the writer has a log directory, appends one event to a TensorBoard
event file there in the forms TensorFlow 2's ``tf.summary`` writes: a tensor with the scalars, images
(PNG) or text plugin's metadata, and the HParams plugin's session-start summary. TensorBoard, its
``EventAccumulator`` and `cleaq_jax.programs.curves` read them as such. The file is written with the
standard library, the ``tensorboard`` package's protocol buffers and its plugins' metadata, and OpenCV's
PNG encoder: nothing here imports TensorFlow.

`open_writer` is the writer of a stage: process 0's writes event files into the log directory, through a
`storage.MirroredWriter` when that is remote; the others only log. `StepProfiler` takes the jax.profiler
trace that ``config.profile_steps`` asks for.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any, Self

import numpy as np
from absl import logging

from cleaq_jax.runtime import storage

try:  # a C implementation, installed with google-cloud-storage (gcsfs)
    from google_crc32c import value as _crc32c
except ImportError:  # TensorBoard's own, in Python: about 0.13 s per MB
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as _crc32c

_file_numbers = itertools.count(1)  # event files opened by this process: part of each name, as TensorFlow's


def _masked_crc32c(data: bytes) -> int:
    crc = _crc32c(data) & 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the data, the data's masked CRC-32C (little-endian)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc32c(length)) + data + struct.pack("<I", _masked_crc32c(data))


def _png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, C) image, C in 1, 3, 4 (RGB order): floats are taken as [0, 1], as
    tf.summary.image takes them, and rounded to 8 bits; integers are clipped to 0..255."""
    import cv2  # heavy: only when writing images

    image = np.asarray(image)
    if image.dtype.kind == "f":
        image = np.rint(np.clip(image, 0.0, 1.0) * 255.0)
    image = np.clip(image, 0, 255).astype(np.uint8)
    channels = image.shape[-1]
    if image.ndim != 3 or channels not in (1, 3, 4):
        raise ValueError(f"an image is (H, W, C) with C in 1, 3, 4; got shape {image.shape}")
    if channels > 1:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR if channels == 3 else cv2.COLOR_RGBA2BGRA)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"could not encode an image of shape {image.shape} as PNG")
    return encoded.tobytes()


def _hparam_values(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, bool | float | int | str]:
    """Nested mappings and sequences flattened to dotted names (``optim.learning_rate``,
    ``model.encoder_stages.0``), as clu flattened them; numpy scalars become Python ones, None the empty
    string and anything else its ``str``."""
    out: dict[str, bool | float | int | str] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "items"):
            out.update(_hparam_values(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out.update(_hparam_values({str(i): v for i, v in enumerate(value)}, name + "."))
        else:
            value = value.item() if isinstance(value, np.generic) else value
            out[name] = "" if value is None else value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


class SummaryWriter:
    """A stage's metric writer: an absl INFO line per call and, with ``logdir``, one TensorBoard event
    file there (created with the directory; one new file per writer, named as TensorFlow names its own:
    ``events.out.tfevents.<time>.<host>.<pid>.<count>.v2``). Every call's event reaches the file before
    the call returns, so a killed run loses nothing it logged.

    logdir: a local directory, or None for log lines only.
    """

    def __init__(self, logdir: str | os.PathLike | None = None):
        self.logdir, self.path, self._file = (None if logdir is None else os.fspath(logdir)), None, None
        if self.logdir is None:
            return
        os.makedirs(self.logdir, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(_file_numbers)}.v2")
        self.path = os.path.join(self.logdir, name)
        self._file = open(self.path, "wb")  # noqa: SIM115  (open until close)
        from tensorboard.compat.proto import event_pb2

        self._write_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Scalars (Python or numpy numbers, 0-d arrays), as float32 tensors of the scalars plugin."""
        values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(scalars.items())]
        logging.info("[%d] %s", step, ", ".join(values))
        if self._file is None:
            return
        from tensorboard.plugins.scalar import summary_v2 as scalar_summary

        summary = _summary()
        for tag, value in scalars.items():
            summary.value.extend(scalar_summary.scalar_pb(tag, np.asarray(value, np.float32)).value)
        self._write_summary(step, summary)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Images: (N, H, W, C) or (H, W, C), C in 1, 3, 4, floats in [0, 1] or integers in 0..255; all N
        of them PNG-encoded under the tag, as tf.summary.image with ``max_outputs=N`` writes them."""
        logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})
        if self._file is None:
            return
        from tensorboard.plugins.image import metadata as image_metadata
        from tensorboard.util import tensor_util

        summary = _summary()
        for tag, value in images.items():
            value = np.asarray(value)
            batch = value[None] if value.ndim == 3 else value
            if batch.ndim != 4:
                raise ValueError(f"{tag}: images are (N, H, W, C) or (H, W, C); got shape {value.shape}")
            height, width = batch.shape[1:3]
            content = [str(width).encode(), str(height).encode(), *(_png(image) for image in batch)]
            summary.value.add(tag=tag, metadata=image_metadata.create_summary_metadata(None, None),
                              tensor=tensor_util.make_tensor_proto(np.array(content, dtype=object)))
        self._write_summary(step, summary)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Texts (Markdown, as TensorBoard's text plugin renders it)."""
        logging.info("[%d] Got texts: %s.", step, dict(texts))
        if self._file is None:
            return
        from tensorboard.plugins.text import summary_v2 as text_summary

        summary = _summary()
        for tag, text in texts.items():
            summary.value.extend(text_summary.text_pb(tag, str(text)).value)
        self._write_summary(step, summary)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Hyperparameters (nested mappings flattened to dotted names) for the HParams plugin, at step 0."""
        values = _hparam_values(hparams)
        logging.info("[Hyperparameters] %s", values)
        if self._file is None:
            return
        from tensorboard.plugins.hparams import summary_v2 as hparams_summary

        self._write_summary(0, hparams_summary.hparams_pb(values))

    def flush(self) -> None:
        """Every event is already in the file; this pushes the file to the operating system."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_summary(self, step: int, summary) -> None:
        from tensorboard.compat.proto import event_pb2

        self._write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def _write_event(self, event) -> None:
        if self._file is None:
            raise ValueError(f"the summary writer of {self.logdir} is closed")
        self._file.write(_record(event.SerializeToString()))
        self._file.flush()


def _summary():
    from tensorboard.compat.proto import summary_pb2

    return summary_pb2.Summary()


def open_writer(logdir: str, *, just_logging: bool = False) -> SummaryWriter | storage.MirroredWriter:
    """A stage's writer: log lines only with ``just_logging`` (the processes other than 0); otherwise
    also event files in ``logdir``, directly when it is local, through a `storage.MirroredWriter` over a
    local temporary directory when it is remote (an event file grows by appends, which a Cloud Storage
    object cannot take)."""
    if just_logging:
        return SummaryWriter(None)
    if not storage.is_remote(logdir):
        return SummaryWriter(logdir)
    local_dir = tempfile.mkdtemp(prefix="cleaq-tensorboard-")
    return storage.MirroredWriter(SummaryWriter(local_dir), local_dir, logdir)


def local_logdir(writer: Any, logdir: str) -> str:
    """Where files beside ``writer``'s event files go so that they reach ``logdir``: its local directory
    when it mirrors one, else ``logdir``."""
    return writer.local_dir if isinstance(writer, storage.MirroredWriter) else logdir


class StepProfiler:
    """config.profile_steps as a hook called after every training step: a jax.profiler trace into
    ``logdir`` (TensorBoard's profile plugin reads ``logdir/plugins/profile``), started after step
    ``first_step + 5`` (past compilation and the first steps) and stopped once at least ``steps`` steps
    and 3 s have passed; another one every hour after the last start. `close` stops a trace still
    running (the stage ended or stopped first), so it is written. ``steps`` = 0: does nothing.

    These are the semantics of clu's ``periodic_actions.Profile(num_profile_steps=steps,
    first_profile=first_step + 5)`` with its defaults (3 s, every hour), which the stages used before;
    a trace that cannot start (another one is running) is logged and skipped, as there.

    start, stop, clock: jax.profiler.start_trace, jax.profiler.stop_trace and time.monotonic, replaceable
    for tests.
    """

    AFTER_FIRST_STEPS = 5
    MIN_SECONDS = 3.0
    EVERY_SECONDS = 3600.0

    def __init__(self, logdir: str, steps: int, first_step: int, *, start: Callable[[str], None] | None = None,
                 stop: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic):
        if start is None or stop is None:
            import jax  # heavy: only for a stage

            start, stop = start or jax.profiler.start_trace, stop or jax.profiler.stop_trace
        self.logdir, self.steps, self.first = logdir, int(steps), int(first_step) + self.AFTER_FIRST_STEPS
        self._start, self._stop, self._clock = start, stop, clock
        self._running_since: tuple[int, float] | None = None  # (step, time) of the running trace's start
        self._last_start: float | None = None

    def __call__(self, step: int) -> None:
        if not self.steps:
            return
        now = self._clock()
        if self._running_since is not None:
            started_step, started = self._running_since
            if step >= started_step + self.steps and now - started >= self.MIN_SECONDS:
                self._finish(f"after step {step}")
            return
        if step == self.first or (self._last_start is not None and now - self._last_start > self.EVERY_SECONDS):
            try:
                self._start(self.logdir)
            except (RuntimeError, OSError) as error:  # e.g. a trace started elsewhere: the stage goes on
                logging.warning("could not start a profiler trace after step %d: %s", step, error)
                return
            logging.info("profiler trace started after step %d, into %s", step, self.logdir)
            self._running_since, self._last_start = (step, now), now

    def close(self) -> None:
        if self._running_since is not None:
            self._finish("at the end of the stage")

    def _finish(self, when: str) -> None:
        self._running_since = None
        self._stop()
        logging.info("profiler trace stopped %s", when)
