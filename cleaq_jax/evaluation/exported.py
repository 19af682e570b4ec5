"""A trained model exported for inference without the training stack, and its loader.

`cleaq_jax.programs.export` writes a checkpoint's inference into a directory:

    model.json          what the model expects and answers (`FORMAT_VERSION`, image size, preprocessing,
                        inputs and outputs, grade and quality names, networks, stage, platforms, jax version)
    function.jaxexport  the inference function serialized by `jax.export` (StableHLO for each platform)
    weights.npz         its parameters and BatchNorm statistics, one float32 array per leaf, named by the
                        leaf's path ("params/dr/backbone/fc/kernel", ...)

The function is ``f(weights, image, mask, gate) -> outputs``:

    weights  {name: array}, weights.npz as it is
    image    (B, S, S, 3) uint8 RGB: the disc crop of `cleaq_jax.data.fundus.preprocess` at S = image_size
    mask     (B, S, S) uint8 {0, 1}: its retinal mask
    gate     () bool: enhance, and grade enhanced, only the images IQA does not rate good
    outputs  for the networks present: quality_probs (B, 3) float32 (IQA on the image), enhanced
             (B, S, S, 3) float32 in [0, 1] (IQE's output, zero outside the mask), enhance (B,) bool
             (counted as enhanced), dr_probs (B, K) float32 (DR on the enhanced image for a stage-3
             model where enhance, else on the image)

B is a symbolic dimension: any batch size runs. The weights are arguments rather than constants baked
into the function, so the function stays small (it is the same bytes for every checkpoint of one model
shape), the weights stay plain arrays anyone can read with numpy, and they are put on the device once.

This module needs jax (with flatbuffers, which jax.export's deserialization imports), numpy and the
standard library only (and `runtime.storage`, which reaches remote paths through etils when it is
installed): predict runs an exported model where flax, orbax and the model code are not installed
(setup.cfg's import contracts hold it to that).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from typing import Any

import jax
import numpy as np

from cleaq_jax import errors
from cleaq_jax.runtime import storage

FORMAT = "cleaq_jax exported model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
FUNCTION_FILE = "function.jaxexport"
WEIGHTS_FILE = "weights.npz"
FILES = (FUNCTION_FILE, WEIGHTS_FILE, MODEL_JSON)  # in the order the exporter writes them
# The keys of model.json a reader relies on (the others describe the model for a person).
REQUIRED_KEYS = ("format", "format_version", "image_size", "nets", "stage", "num_grades", "quality_names",
                 "platforms")
EXPORT_COMMAND = "python -m cleaq_jax.programs.export --checkpoint RUN/stage3 --out MODEL_DIR"


@dataclasses.dataclass
class ExportedModel:
    """An exported model ready to run: its description (model.json), the deserialized function and the
    weights on the default device. Call it with uint8 image and mask batches and the gate."""

    directory: str
    meta: dict[str, Any]
    exported: jax.export.Exported
    weights: dict[str, jax.Array]

    def __post_init__(self):
        self._call = jax.jit(self.exported.call)

    @property
    def stage(self) -> str:
        return str(self.meta["stage"])

    @property
    def nets(self) -> tuple[str, ...]:
        return tuple(self.meta["nets"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def num_grades(self) -> int:
        return int(self.meta["num_grades"])

    @property
    def quality_names(self) -> tuple[str, ...]:
        return tuple(self.meta["quality_names"])

    @property
    def description(self) -> str:
        """One line on where the model came from, for logs and reports."""
        source = self.meta.get("source", {})
        origin = f" from {source['checkpoint']} step {source['step']}" if "checkpoint" in source else ""
        return (f"{self.directory} ({self.stage}: {'+'.join(self.nets)}; exported{origin} with jax "
                f"{self.meta.get('jax_version', '?')})")

    def __call__(self, image: np.ndarray, mask: np.ndarray, gate: bool = False) -> dict[str, np.ndarray]:
        """The outputs (module doc) for image (B, S, S, 3) uint8 and mask (B, S, S) uint8, as numpy arrays.

        Each new B compiles once; callers that run many batches pad them to one size.
        """
        out = self._call(self.weights, np.asarray(image, np.uint8), np.asarray(mask, np.uint8),
                         np.asarray(gate, bool))
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def read_meta(directory: str) -> dict[str, Any]:
    """model.json of an exported model, checked for its format and version and the keys readers need.

    Raises FileNotFoundError (no model.json) or ValueError (not an exported model of this format version),
    each naming the file and what to do, in one line.
    """
    path = storage.join(directory, MODEL_JSON)
    try:
        text = storage.read_text(path)
    except (FileNotFoundError, NotADirectoryError):
        what = (f"no {MODEL_JSON} in it" if storage.isdir(directory) else
                "not a directory" if storage.exists(directory) else "no such directory")
        raise errors.MissingError(f"{directory} is not an exported model ({what}); write one with "
                                  f"{EXPORT_COMMAND}") from None
    except OSError as error:
        raise errors.CheckpointError(f"{path} cannot be read ({error.strerror or error})") from None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise errors.CheckpointError(f"{path} is not JSON ({error}); export the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise errors.CheckpointError(f"{path} does not describe a cleaq_jax exported model (its format is "
                                     f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}); "
                                     f"write one with {EXPORT_COMMAND}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise errors.CheckpointError(
            f"{path} has format version {meta.get('format_version')!r}, and this cleaq_jax reads "
            f"version {FORMAT_VERSION}: export the checkpoint again with this cleaq_jax")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise errors.CheckpointError(f"{path} lacks {', '.join(missing)}; export the model again")
    return meta


def _read(directory: str, name: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(directory, name))
    except FileNotFoundError:
        raise errors.MissingError(f"{directory} has no {name}: an exported model is {', '.join(FILES)} together; "
                                  "copy the whole directory, or export the model again") from None
    except OSError as error:
        raise errors.CheckpointError(
            f"{storage.join(directory, name)} cannot be read ({error.strerror or error})") from None


def _deserialize(directory: str, blob: bytes) -> jax.export.Exported:
    try:
        return jax.export.deserialize(bytearray(blob))
    # Whatever the flatbuffer reader or jax's version checks raise: the file is unusable either way.
    except Exception as error:  # noqa: BLE001
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise errors.CheckpointError(
            f"{storage.join(directory, FUNCTION_FILE)} cannot be loaded by jax {jax.__version__} "
            f"({reason}); export the model again with this jax") from None


def _weights(directory: str, blob: bytes, expected: dict[str, Any]) -> dict[str, np.ndarray]:
    path = storage.join(directory, WEIGHTS_FILE)
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            weights = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise errors.CheckpointError(f"{path} is not a readable .npz ({error}); export the model again") from None
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise errors.CheckpointError(f"{path} does not match {FUNCTION_FILE}: "
                                     + "; ".join(f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                                     for what, names in (("missing", missing), ("unexpected", extra)) if names))
    for name, aval in expected.items():
        if weights[name].shape != tuple(aval.shape) or weights[name].dtype != aval.dtype:
            raise errors.CheckpointError(
                f"{path}: {name} is {weights[name].dtype}{list(weights[name].shape)}, the function "
                f"takes {aval.dtype}{list(aval.shape)}; export the model again")
    return weights


def _arguments(exported: jax.export.Exported) -> tuple[dict[str, Any], Any] | None:
    """The abstract weights ({name: aval}) and image the function takes, or None when it does not take
    (weights, image, mask, gate) as the exporter writes it."""
    try:
        (weights, image, mask, gate), kwargs = jax.tree.unflatten(exported.in_tree, exported.in_avals)
    except (TypeError, ValueError):
        return None
    shaped = [getattr(a, "ndim", None) for a in (image, mask, gate)] == [4, 3, 0]
    return (weights, image) if isinstance(weights, dict) and not kwargs and shaped else None


def load(directory: str) -> ExportedModel:
    """Load an exported model (a local or ``gs://`` directory) onto the default device.

    Raises FileNotFoundError or ValueError, naming the file and what to do in one line, when the directory
    is not a whole exported model of this format version, or was exported for other platforms than the
    one jax runs on here.
    """
    directory = os.fspath(directory).rstrip("/") or "/"
    meta = read_meta(directory)
    exported = _deserialize(directory, _read(directory, FUNCTION_FILE))
    here = jax.export.default_export_platform()
    if here not in exported.platforms:
        raise errors.CheckpointError(
            f"{directory} was exported for {', '.join(exported.platforms)}, and jax runs on {here} "
            f"here: export it again with --platforms {','.join((*exported.platforms, here))}")
    arguments = _arguments(exported)
    if arguments is None:
        raise errors.CheckpointError(
            f"{storage.join(directory, FUNCTION_FILE)} is not a function of (weights, image, mask, "
            f"gate); write the model with {EXPORT_COMMAND}")
    weight_avals, image = arguments
    size = int(meta["image_size"])
    if tuple(image.shape[1:]) != (size, size, 3):
        raise errors.CheckpointError(f"{storage.join(directory, MODEL_JSON)} says image_size {size}, but "
                                     f"{FUNCTION_FILE} takes images of {image.shape[1:]}; export the model again")
    weights = _weights(directory, _read(directory, WEIGHTS_FILE), weight_avals)
    device = jax.devices()[0]
    return ExportedModel(directory, meta, exported, {k: jax.device_put(v, device) for k, v in weights.items()})
