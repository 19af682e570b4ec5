"""The one record schema every data source is written in: a record's fields, and their encoding.

A record is a msgpack map::

    schema    int      SCHEMA_VERSION
    image     bytes    PNG, RGB uint8, fundus-cropped and resized at prep time (HxWx3)
    mask      bytes    PNG, single channel, 0/255 retinal (field-of-view) mask (HxW)
    vessel    bytes    PNG, single channel, 0/255 vessel mask, or b"" when none is known
    reference bytes    optional: PNG, RGB uint8, the clean image ``image`` was degraded from (HxWx3);
                       absent when none is known (real photographs of unknown history)
    dr_grade  int      DR grade (0-4 EyeQ, 0-3 Messidor), -1 unknown
    quality   int      0 good, 1 usable, 2 reject, -1 unknown
    id        str      stable example id (file stem), unique within a dataset
    source    str      dataset name ("eyeq", "messidor", "drive", "synthetic", ...)

Shard sets of records are `data.shards`'.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import cv2
import msgpack
import numpy as np

from cleaq_jax import errors

SCHEMA_VERSION = 1


QUALITY_NAMES = ("good", "usable", "reject")


class RecordError(errors.DataError):
    """A record or shard set that does not follow the schema."""


def id_hash(example_id: str) -> int:
    """A stable 31-bit integer for an example id (used to derive fixed per-example eval keys)."""
    return zlib.crc32(example_id.encode("utf-8")) & 0x7FFFFFFF


# --------------------------------------------------------------------------- encode / decode
def encode_png(array: np.ndarray, what: str) -> bytes:
    """HxW uint8 (a mask, 0/255) or HxWx3 uint8 RGB -> the PNG bytes a record holds; `decode_png` reverses it.

    what: the field's name, for the error when OpenCV cannot encode the array.
    """
    if array.ndim == 3:
        array = array[..., ::-1]  # OpenCV writes BGR
    # Stored (level 0) PNG: ArrayRecord's zstd compresses it as well, and it decodes ~4x faster (loader).
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 0])
    if not ok:
        raise RecordError(f"could not PNG-encode the {what} (shape {array.shape}, dtype {array.dtype})")
    return buf.tobytes()


def encode_record(example: Mapping[str, Any]) -> bytes:
    """Serialise one example dict (fields as yielded by `decode_record`) to record bytes.

    image: HxWx3 uint8 RGB; mask: HxW (bool or 0/1 or 0/255); vessel: HxW or None; reference:
    HxWx3 uint8 RGB (the clean image ``image`` was made from) or None/absent. A record without a
    reference has no ``reference`` key at all (`decode_record` gives it reference None).
    """
    image = _rgb(example["image"], "image")
    mask = _binary(example["mask"], image.shape[:2], "mask")
    vessel = example.get("vessel")
    vessel_bytes = b"" if vessel is None else encode_png(_binary(vessel, image.shape[:2], "vessel") * 255, "vessel")
    reference = example.get("reference")
    if reference is not None:
        reference = _rgb(reference, "reference")
        if reference.shape != image.shape:
            raise RecordError(f"reference must have the image's shape {image.shape}, got {reference.shape}")
    payload = {
        "schema": SCHEMA_VERSION,
        "image": encode_png(image, "image"),
        "mask": encode_png(mask * 255, "mask"),
        "vessel": vessel_bytes,
        "dr_grade": int(example.get("dr_grade", -1)),
        "quality": int(example.get("quality", -1)),
        "id": str(example["id"]),
        "source": str(example.get("source", "")),
    }
    if reference is not None:
        payload["reference"] = encode_png(reference, "reference")
    return msgpack.packb(payload, use_bin_type=True)


def _rgb(array: Any, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise RecordError(f"{what} must be HxWx3 uint8, got {array.shape} {array.dtype}")
    return array


def _binary(array: Any, shape: tuple[int, int], what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != shape:
        raise RecordError(f"{what} must have the image's shape {shape}, got {array.shape}")
    return (array > (127 if array.dtype == np.uint8 and array.max() > 1 else 0)).astype(np.uint8)


def decode_record(data: bytes, *, decode_images: bool = True) -> dict[str, Any]:
    """Record bytes -> dict(image HxWx3 uint8 RGB, mask HxW uint8 {0,1}, vessel HxW uint8 {0,1}
    or None, reference HxWx3 uint8 RGB or None, dr_grade int, quality int, id str, source str).

    With ``decode_images=False`` image/mask/vessel/reference stay PNG bytes (vessel b"" when absent;
    reference only present when the record has one).
    """
    try:
        payload = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several types for corrupt input
        raise RecordError(f"not a cleaq_jax record ({e})") from e
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA_VERSION:
        raise RecordError(
            f"record schema {payload.get('schema') if isinstance(payload, dict) else '?'} is not "
            f"{SCHEMA_VERSION}: rebuild the shards with this version's data_prep")
    if not decode_images:
        return payload
    out = dict(payload)
    del out["schema"]
    out["image"] = decode_png(payload["image"], color=True)
    out["mask"] = (decode_png(payload["mask"], color=False) > 127).astype(np.uint8)
    out["vessel"] = (
        (decode_png(payload["vessel"], color=False) > 127).astype(np.uint8) if payload["vessel"] else None)
    out["reference"] = decode_png(payload["reference"], color=True) if payload.get("reference") else None
    return out


def decode_png(data: bytes, *, color: bool) -> np.ndarray:
    """PNG bytes -> HxWx3 RGB uint8 (color) or HxW uint8."""
    flag = cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if array is None:
        raise RecordError("undecodable PNG in record")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if color else array
