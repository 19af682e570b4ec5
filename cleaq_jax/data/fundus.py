"""Retinal-disc detection, crop and retinal mask for colour fundus photographs (paper Sec. IV-B).

A fundus photograph is a bright, roughly circular field of view (the "disc") on a dark canvas,
sometimes clipped at the top and bottom. `find_disc` locates it on a downscaled copy: a Hough
circle transform (cv2.HoughCircles, as the paper does) proposes circles, an EyeQ-style estimate
(threshold, largest component, holes filled, robust circle fit to its outline) is both the
fallback and the referee, and the chosen circle is refined on the outline to sub-pixel accuracy.
`preprocess` crops the square around the disc (padding with black where the circle leaves the
canvas), resizes it and returns the retinal mask (disc circle intersected with non-black pixels).
Nothing here imports model or training code.
"""

from __future__ import annotations

import dataclasses
import os

import cv2
import numpy as np

from cleaq_jax import errors
from cleaq_jax.runtime import storage

# Long side of the downscaled copy the disc is searched on: keeps detection to a few ms per image.
WORK_SIZE = 384
# Grey levels (0-255) between background and fundus below which an image holds no disc.
MIN_CONTRAST = 20
# A disc must cover the bright region this well (intersection over union) to be accepted.
MIN_IOU = 0.8
# Share of the disc's in-canvas outline that must sit on an actual bright/dark edge.
MIN_EDGE_SUPPORT = 0.5
# Share of the full circumference that must lie inside the canvas (else the "disc" is not seen).
MIN_VISIBLE_ARC = 0.25
# Largest photograph read (width x height): 100 megapixels, 4x a 6000x4000 fundus camera's frame; the
# decoded RGB image is 300 MB. The size is read from the file header before anything is decoded, so a
# small file declaring 40,000 x 40,000 px is refused without allocating it.
MAX_IMAGE_PIXELS = 100_000_000


class BadImageError(errors.UserError, ValueError):
    """A file that cannot be read as an image (missing, unreadable, truncated, over MAX_IMAGE_PIXELS)."""


class NoDiscError(errors.UserError, ValueError):
    """An image in which no circular retinal field of view can be found."""


@dataclasses.dataclass(frozen=True)
class Disc:
    """The retinal disc: centre (cx, cy) and radius r, in input pixels (pixel centres at integers)."""

    cx: float
    cy: float
    r: float

    def rescaled(self, factor: float) -> "Disc":
        """The same disc on an image resized by ``factor`` (OpenCV's pixel-centre convention)."""
        return Disc((self.cx + 0.5) * factor - 0.5, (self.cy + 0.5) * factor - 0.5, self.r * factor)


# --------------------------------------------------------------------------- reading
def _read_bytes(path: str | os.PathLike) -> np.ndarray:
    try:
        if storage.is_remote(path):
            data = np.frombuffer(storage.read_bytes(path), np.uint8)
        else:
            data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise BadImageError(f"{path}: cannot read the file ({e.strerror or e})") from e
    if data.size == 0:
        raise BadImageError(f"{path}: the file is empty; copy or download it again")
    return data


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read a JPEG/PNG/TIFF/GIF photograph as HxWx3 uint8 RGB (grey files are expanded to RGB).

    Raises BadImageError naming the file when it is missing, not an image, truncated (decoding from
    memory makes OpenCV reject truncated JPEGs instead of padding them with grey), or larger than
    MAX_IMAGE_PIXELS by its header.
    """
    data = _read_bytes(path)
    image = _decode(path, data, cv2.IMREAD_COLOR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode(path: str | os.PathLike, data: np.ndarray, flag: int) -> np.ndarray:
    size = image_dimensions(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise BadImageError(f"{path}: the image declares {size[0]} x {size[1]} px, over the limit of "
                            f"{MAX_IMAGE_PIXELS:,} pixels (cleaq_jax.data.fundus.MAX_IMAGE_PIXELS); "
                            "downscale it first")
    try:
        image = cv2.imdecode(data, flag)
    except cv2.error as e:  # OpenCV's own limits (CV_IO_MAX_IMAGE_PIXELS) and decoder failures
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "decoder error"
        raise BadImageError(f"{path}: OpenCV cannot decode the file ({reason})") from e
    if image is None:
        raise BadImageError(_undecodable(path, data))
    return image


def image_dimensions(data: np.ndarray | bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, GIF or TIFF header without decoding, or None when the bytes
    are none of these or the header is cut short."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if raw.startswith(b"\x89PNG") and len(raw) >= 24:
        return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    if raw.startswith(b"GIF8") and len(raw) >= 10:
        return int.from_bytes(raw[6:8], "little"), int.from_bytes(raw[8:10], "little")
    if raw.startswith(b"\xff\xd8"):
        return _jpeg_dimensions(raw)
    if raw[:4] in (b"II*\x00", b"MM\x00*"):  # the first directory may sit anywhere, often at the end
        return _tiff_dimensions(raw)
    return None


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the frame size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF and i + 9 <= len(data):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        i += 2 + length
    return None


def _tiff_dimensions(data: bytes) -> tuple[int, int] | None:
    order = "little" if data[:2] == b"II" else "big"
    offset = int.from_bytes(data[4:8], order)
    count = int.from_bytes(data[offset:offset + 2], order)
    found: dict[int, int] = {}
    for k in range(count):
        entry = data[offset + 2 + 12 * k: offset + 14 + 12 * k]
        if len(entry) < 12:
            break
        tag, kind = int.from_bytes(entry[:2], order), int.from_bytes(entry[2:4], order)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            found[tag] = int.from_bytes(entry[8:10] if kind == 3 else entry[8:12], order)
    return (found[256], found[257]) if len(found) == 2 else None


_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"GIF8": "GIF"}


def _undecodable(path: str | os.PathLike, data: np.ndarray) -> str:
    head = data[:8].tobytes()
    kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
    if kind:
        return f"{path}: the {kind} file is truncated or corrupt; copy or download it again"
    return f"{path}: not a JPEG/PNG/TIFF/GIF image (it starts with {head!r})"


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel mask (e.g. DRIVE's GIF masks) as HxW uint8 {0,1} (pixel > 127)."""
    data = _read_bytes(path)
    return (_decode(path, data, cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8)


# --------------------------------------------------------------------------- disc detection
def _check_rgb(image: np.ndarray, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected an HxWx3 uint8 RGB image, got "
                         f"{getattr(image, 'shape', type(image))} {getattr(image, 'dtype', '')}")
    if min(image.shape[:2]) < 16:
        raise NoDiscError(f"{name}: image of {image.shape[1]}x{image.shape[0]} px is too small to hold a disc")


def _grey(image: np.ndarray) -> np.ndarray:
    # The brightest channel keeps dark (red-dominated) fundi bright; the median filter removes sensor noise.
    return cv2.medianBlur(image.max(axis=2), 5)


def _foreground(grey: np.ndarray, name: str) -> tuple[np.ndarray, float]:
    """Bright-region mask (uint8 {0,1}: largest component, holes filled) and the threshold used."""
    low, high = np.percentile(grey, [1, 99])
    if high - low < MIN_CONTRAST:
        raise NoDiscError(f"{name}: no retinal disc found (the image is uniform: grey levels "
                          f"{low:.0f}-{high:.0f}); is this a fundus photograph?")
    threshold = low + max(6.0, 0.1 * (high - low))
    fg = (grey > threshold).astype(np.uint8)
    k = max(3, int(round(0.015 * min(grey.shape))) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    fg = cv2.morphologyEx(cv2.morphologyEx(fg, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n < 2:
        raise NoDiscError(f"{name}: no retinal disc found (no bright region above grey level {threshold:.0f})")
    fg = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    return fill_holes(fg), float(threshold)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """HxW {0,1} uint8 mask with every background region that does not reach the border filled."""
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    outside = padded.copy()
    cv2.floodFill(outside, None, (0, 0), 2)
    return (outside[1:-1, 1:-1] != 2).astype(np.uint8)


def _outline(fg: np.ndarray) -> np.ndarray:
    """(N, 2) float x, y of the bright region's outline, leaving out where it runs along the canvas edge."""
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros((0, 2))
    pts = np.concatenate([c[:, 0, :] for c in contours]).astype(np.float64)
    h, w = fg.shape
    inside = (pts[:, 0] > 1) & (pts[:, 0] < w - 2) & (pts[:, 1] > 1) & (pts[:, 1] < h - 2)
    return pts[inside]


def _fit_circle(pts: np.ndarray, iterations: int = 5) -> Disc | None:
    """Algebraic least-squares circle through the points, re-fit without outliers (notches, flares)."""
    keep = np.ones(len(pts), bool)
    disc = None
    for _ in range(iterations):
        if keep.sum() < 12:
            return disc
        x, y = pts[keep, 0], pts[keep, 1]
        a = np.stack([x, y, np.ones_like(x)], axis=1)
        (d, e, f), *_ = np.linalg.lstsq(a, x * x + y * y, rcond=None)
        cx, cy = d / 2, e / 2
        r2 = f + cx * cx + cy * cy
        if r2 <= 0:
            return disc
        disc = Disc(float(cx), float(cy), float(np.sqrt(r2)))
        resid = np.abs(np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) - disc.r)
        keep = resid < max(1.5, 3.0 * float(np.median(resid[keep])))
    return disc


def _hough(grey: np.ndarray, contrast_edge: float, count: int = 4) -> list[Disc]:
    """The strongest Hough circles of a plausible disc size, best first."""
    h, w = grey.shape
    circles = cv2.HoughCircles(
        grey, cv2.HOUGH_GRADIENT, dp=1, minDist=max(4, min(h, w) // 8),
        param1=max(20.0, contrast_edge), param2=20,
        minRadius=int(0.25 * min(h, w)), maxRadius=int(0.75 * max(h, w)))
    if circles is None:
        return []
    return [Disc(float(x), float(y), float(r)) for x, y, r in circles[0, :count]]


def _disc_mask(shape: tuple[int, int], disc: Disc) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    shift = 4  # sub-pixel drawing
    cv2.circle(mask, (int(round(disc.cx * 16)), int(round(disc.cy * 16))), int(round(disc.r * 16)), 1,
               thickness=-1, lineType=cv2.LINE_8, shift=shift)
    return mask


def _iou(fg: np.ndarray, disc: Disc) -> float:
    circle = _disc_mask(fg.shape, disc)
    union = np.count_nonzero(fg | circle)
    return np.count_nonzero(fg & circle) / union if union else 0.0


def _edge_support(pts: np.ndarray, shape: tuple[int, int], disc: Disc) -> tuple[float, float]:
    """(share of the circumference inside the canvas, share of that part lying on the outline)."""
    h, w = shape
    t = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    x, y = disc.cx + disc.r * np.cos(t), disc.cy + disc.r * np.sin(t)
    visible = (x > 2) & (x < w - 3) & (y > 2) & (y < h - 3)
    if not visible.any() or len(pts) == 0:
        return float(visible.mean()), 0.0
    near = np.zeros(shape, np.uint8)
    near[pts[:, 1].astype(int), pts[:, 0].astype(int)] = 1
    near = cv2.dilate(near, np.ones((5, 5), np.uint8))
    rows = np.clip(np.round(y[visible]), 0, h - 1).astype(int)
    cols = np.clip(np.round(x[visible]), 0, w - 1).astype(int)
    on_edge = near[rows, cols]
    return float(visible.mean()), float(on_edge.mean())


def _locate(image: np.ndarray, name: str) -> tuple[Disc, float]:
    """(disc in input pixels, background/fundus grey threshold) for an HxWx3 uint8 image."""
    _check_rgb(image, name)
    h, w = image.shape[:2]
    factor = min(1.0, WORK_SIZE / max(h, w))
    small = cv2.resize(image, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
    grey = _grey(small)
    fg, threshold = _foreground(grey, name)
    pts = _outline(fg)
    candidates = _hough(grey, 0.5 * (float(np.percentile(grey, 99)) - threshold))
    fitted = _fit_circle(pts) if len(pts) else None
    candidates += [fitted] if fitted is not None else []
    if not candidates:
        raise NoDiscError(f"{name}: no retinal disc found (no circular outline around the bright region)")
    best = max(candidates, key=lambda d: _iou(fg, d))
    # Refine on the outline points near the chosen circle: sub-pixel, and blind to flares and notches.
    band = np.abs(np.hypot(pts[:, 0] - best.cx, pts[:, 1] - best.cy) - best.r) < max(2.0, 0.05 * best.r)
    best = _fit_circle(pts[band]) or best
    iou = _iou(fg, best)
    visible, support = _edge_support(pts, fg.shape, best)
    if iou < MIN_IOU or visible < MIN_VISIBLE_ARC or support < MIN_EDGE_SUPPORT:
        raise NoDiscError(
            f"{name}: no retinal disc found (best circle covers the bright region with IoU {iou:.2f}, "
            f"{visible:.0%} of its outline in the image, {support:.0%} of that on an edge)")
    # Outline points are the centres of the outermost bright pixels: the edge lies half a pixel out.
    best = Disc(best.cx, best.cy, best.r + 0.5)
    return best.rescaled(1.0 / factor), threshold


def find_disc(image_rgb_uint8: np.ndarray, *, name: str = "<array>") -> Disc:
    """Locate the retinal disc of an HxWx3 uint8 RGB fundus photograph.

    Returns Disc(cx, cy, r) as floats in input pixels; the circle may extend beyond the canvas
    (clipped fundus). Raises NoDiscError (naming ``name``) when the image holds no disc.
    """
    return _locate(image_rgb_uint8, name)[0]


# --------------------------------------------------------------------------- crop and mask
def crop_to_disc(array: np.ndarray, disc: Disc, size: int, interpolation: int | None = None) -> np.ndarray:
    """The square of side 2r around ``disc`` from an HxW or HxWxC array, resized to size x size.

    Parts of the square outside the canvas are zero (black). Interpolation defaults to area when
    shrinking and cubic when enlarging.
    """
    h, w = array.shape[:2]
    d = max(1, int(round(2 * disc.r)))
    x0, y0 = int(np.floor(disc.cx - disc.r + 0.5)), int(np.floor(disc.cy - disc.r + 0.5))
    square = np.zeros((d, d) + array.shape[2:], array.dtype)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + d), min(h, y0 + d)
    if sx1 > sx0 and sy1 > sy0:
        square[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = array[sy0:sy1, sx0:sx1]
    if interpolation is None:
        interpolation = cv2.INTER_AREA if d >= size else cv2.INTER_CUBIC
    return cv2.resize(square, (size, size), interpolation=interpolation)


def crop_mask(mask: np.ndarray, disc: Disc, size: int, *, keep_thin: bool = False) -> np.ndarray:
    """Crop and resize an HxW binary mask like `crop_to_disc`, returning size x size uint8 {0,1}.

    Area interpolation gives each output pixel its covered share; it is kept above 1/2, or, with
    ``keep_thin``, above 1/(2*shrink factor) so that one-pixel vessels survive strong shrinking.
    """
    shrink = max(1.0, 2 * disc.r / size)
    share = crop_to_disc((np.asarray(mask) > 0).astype(np.float32), disc, size, cv2.INTER_AREA)
    return (share > (0.5 / shrink if keep_thin else 0.5)).astype(np.uint8)


def _retinal_mask(crop: np.ndarray, threshold: float) -> np.ndarray:
    size = crop.shape[0]
    nonblack = fill_holes((cv2.medianBlur(crop.max(axis=2), 3) > threshold).astype(np.uint8))
    circle = _disc_mask((size, size), Disc((size - 1) / 2, (size - 1) / 2, size / 2))
    return nonblack & circle


def preprocess(image_rgb_uint8: np.ndarray, size: int = 512, *, name: str = "<array>"
               ) -> tuple[np.ndarray, np.ndarray]:
    """Crop a fundus photograph to its retinal disc, pad square, resize, and mask it.

    image_rgb_uint8: HxWx3 uint8 RGB. Returns (image size x size x 3 uint8 RGB, black outside the
    mask; mask size x size uint8 {0,1}: the disc circle intersected with non-black pixels).
    Raises NoDiscError naming ``name`` when no disc is found.
    """
    if size < 8:
        raise ValueError(f"{name}: size must be >= 8, got {size}")
    disc, threshold = _locate(image_rgb_uint8, name)
    crop = crop_to_disc(image_rgb_uint8, disc, size)
    mask = _retinal_mask(crop, threshold)
    return crop * mask[..., None], mask
