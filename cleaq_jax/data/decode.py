"""One record -> one example of the loaders' batch layout, with the random rotation and flips of training.

`decode_example` decodes a record (bytes in the `records` schema, or a TFDS-decoded record) into the
fields of one batch row (`cleaq_jax.data.pipeline` lists them) at side S, and, given a generator,
warps image, masks and reference with one `augment_matrix` (paper IV-B: a rotation by any angle about
the centre, horizontal and vertical flips). This is the host-side geometric augmentation of every
training example; `cleaq_jax.data.augment` is the on-device augmentation of the CE-Net teacher.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from cleaq_jax.data import records


def augment_matrix(rng: np.random.Generator, size: int) -> np.ndarray:
    """(2, 3) float64 affine map from output to input pixel coordinates of a ``size`` x ``size``
    image: rotation by an angle drawn from U(0, 2 pi) about the centre, then horizontal and vertical
    flips each with probability 1/2 (flips folded into the matrix, so one resampling does all)."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    flip_x, flip_y = rng.random(2) < 0.5
    sx, sy = (-1.0 if flip_x else 1.0), (-1.0 if flip_y else 1.0)
    c, s = math.cos(angle), math.sin(angle)
    a, b, d, e = c * sx, -s * sy, s * sx, c * sy  # rotation @ diag(sx, sy)
    m = (size - 1) / 2.0  # pixel-centre convention: flips map pixels onto pixels
    # Plain floats: the same matrix from small numpy ops cost ~0.3 ms per example.
    return np.array([[a, b, m - a * m - b * m], [d, e, m - d * m - e * m]])


def decode_example(record: bytes | Mapping[str, Any], *, image_size: int, rng: np.random.Generator | None = None
                   ) -> dict[str, np.ndarray]:
    """One record -> one example: a row of the loaders' batch layout (`pipeline`), without the batch axis.

    record: bytes in the `records` schema, or that record decoded by a TFDS data source
    (`tfds_features.as_tfds_example`: the same example comes out of either); image_size: output
    side S (resized with INTER_AREA when the record differs); rng: augmentation generator, or None
    for no augmentation. Image and retinal mask are warped together as one 4-channel image, the
    vessel mask and the reference with the same matrix, so all stay aligned; masks are thresholded
    back to {0, 1} after the warp.
    """
    payload, bgr, mask, vessel, reference = _decoded(record)
    bgr, mask = _resized(bgr, image_size), _resized(mask, image_size)
    vessel = _resized(vessel, image_size) if vessel is not None else None
    reference = _resized(reference, image_size) if reference is not None else None
    if rng is None:
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        reference = cv2.cvtColor(reference, cv2.COLOR_BGR2RGB) if reference is not None else None
    else:
        image, mask, vessel, reference = warp_fields(bgr, mask, vessel, reference, augment_matrix(rng, image_size))
    return {
        "image": image,
        "mask": _binary(mask),
        "vessel": _binary(vessel) if vessel is not None else np.zeros((image_size, image_size), np.uint8),
        "has_vessel": np.bool_(vessel is not None),
        "reference": reference if reference is not None else np.zeros((image_size, image_size, 3), np.uint8),
        "has_reference": np.bool_(reference is not None),
        "dr_grade": np.int32(payload["dr_grade"]),
        "quality": np.int32(payload["quality"]),
        "id_hash": np.int32(records.id_hash(payload["id"])),
        "valid": np.bool_(True),
    }


def _decoded(record: bytes | Mapping[str, Any]):
    """(labels, BGR image, 0/255 mask, 0/255 vessel mask or None, BGR reference or None) of record bytes
    or a TFDS-decoded record."""
    if isinstance(record, Mapping):
        # Masks back to 0/255, as their PNGs hold them, so resizing gives the bytes path's pixels.
        vessel = record["vessel"] * np.uint8(255) if record["has_vessel"] else None
        reference = cv2.cvtColor(record["reference"], cv2.COLOR_RGB2BGR) if record["has_reference"] else None
        return (record, cv2.cvtColor(record["image"], cv2.COLOR_RGB2BGR), record["mask"] * np.uint8(255), vessel,
                reference)
    payload = records.decode_record(record, decode_images=False)
    where = f"record {payload['id']!r}"
    vessel = _imdecode(payload["vessel"], cv2.IMREAD_GRAYSCALE, where) if payload["vessel"] else None
    reference = _imdecode(payload["reference"], cv2.IMREAD_COLOR, where) if payload.get("reference") else None
    return (payload, _imdecode(payload["image"], cv2.IMREAD_COLOR, where),
            _imdecode(payload["mask"], cv2.IMREAD_GRAYSCALE, where), vessel, reference)


def padding_example(image_size: int) -> dict[str, np.ndarray]:
    """The all-zero row (valid=False, labels -1) that fills the final eval batch."""
    zeros = np.zeros((image_size, image_size), np.uint8)
    return {"image": np.zeros((image_size, image_size, 3), np.uint8), "mask": zeros, "vessel": zeros,
            "has_vessel": np.bool_(False), "reference": np.zeros((image_size, image_size, 3), np.uint8),
            "has_reference": np.bool_(False), "dr_grade": np.int32(-1), "quality": np.int32(-1),
            "id_hash": np.int32(0), "valid": np.bool_(False)}


def warp_fields(bgr: np.ndarray, mask: np.ndarray, vessel: np.ndarray | None, reference: np.ndarray | None,
                matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The fields of one example warped by one affine map, so they stay aligned pixel for pixel.

    bgr: (S, S, 3) uint8 BGR image; mask: (S, S) uint8 retinal mask (0/255); vessel: (S, S) uint8 vessel
    mask or None; reference: (S, S, 3) uint8 BGR clean image or None; matrix: (2, 3) float64 map from
    output to input pixel coordinates (`augment_matrix`). Returns (image (S, S, 3) uint8 RGB, mask, vessel
    or None, reference (S, S, 3) uint8 RGB or None), bilinear, black outside the input; masks are not
    thresholded here.
    """
    size = (bgr.shape[1], bgr.shape[0])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP

    def warp(array: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(array, matrix, size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    # 4 channels take OpenCV's vectorised path: image + mask in one warp costs less than the image alone.
    rgba = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGBA)
    rgba[..., 3] = mask
    warped = warp(rgba)
    vessel = warp(vessel) if vessel is not None else None
    if reference is not None:
        reference = cv2.cvtColor(warp(cv2.cvtColor(reference, cv2.COLOR_BGR2RGBA)), cv2.COLOR_RGBA2RGB)
    return cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB), cv2.extractChannel(warped, 3), vessel, reference


def _imdecode(data: bytes, flag: int, where: str) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if array is None:
        raise records.RecordError(f"undecodable image in {where}: rebuild the shards with data_prep")
    return array


def _resized(array: np.ndarray, size: int) -> np.ndarray:
    if array.shape[:2] == (size, size):
        return array
    shrink = array.shape[0] > size or array.shape[1] > size
    return cv2.resize(array, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _binary(array: np.ndarray) -> np.ndarray:
    return cv2.threshold(array, 127, 1, cv2.THRESH_BINARY)[1]
