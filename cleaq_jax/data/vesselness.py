"""Classical pseudo vessel masks: the documented fallback when no DRIVE-trained CE-Net teacher is at hand.

`vessel_mask` works on the green channel (where vessels contrast best), optionally CLAHE-enhanced,
with the outside of the retinal mask filled by the mean in-mask level so the dark canvas adds no edge.
A ridge filter for dark curvilinear structure then scores every pixel:

- ``"frangi"``: Frangi et al. (1998) multi-scale Hessian vesselness, `skimage.filters.frangi` with
  ``black_ridges=True``;
- ``"matched"``: the matched filter of Chaudhuri et al. (1989), a zero-mean Gaussian vessel profile
  rotated through 12 orientations (maximum response kept); about 10x faster, similar masks.

Scales are given for a field of view 512 pixels wide (the default record size) and scaled with the
retinal mask's width. Pixels within a margin of the field-of-view edge (the filter's reach plus 1% of
the width) are never vessels, so the bright/dark rim does not show up as one. The threshold rule:

- ``threshold="fraction"`` (default): keep the top `fraction` (0.12) of scored pixels in the eroded
  field of view, the vessel density of manual annotations at this scale (DRIVE: about 12%);
- ``threshold="otsu"``: Otsu's threshold on the in-field scores; thinner masks (major vessels only).

Finally connected components smaller than `min_size` pixels (at 512 px, scaled) are dropped.
Nothing here imports model or training code.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.filters import frangi, threshold_otsu

METHODS = ("frangi", "matched")
THRESHOLDS = ("fraction", "otsu")
REFERENCE_WIDTH = 512  # field-of-view width in pixels that the default scales are given for
FRANGI_SIGMAS = (1.5, 2.0, 3.0)  # Hessian scales at REFERENCE_WIDTH: vessels about 2-10 px wide
MATCHED_SIGMA = 1.5  # matched-filter Gaussian profile width at REFERENCE_WIDTH
MATCHED_LENGTH = 9.0  # matched-filter segment length at REFERENCE_WIDTH (vessels are straight over it)
MATCHED_ANGLES = 12  # orientations, 15 degrees apart
VESSEL_FRACTION = 0.12
MIN_SIZE = 20  # smallest kept component, in pixels at REFERENCE_WIDTH
MIN_SIGMA = 0.7  # below this a Gaussian no longer resolves a 1-pixel vessel


def _check_inputs(image: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    """The retinal mask as bool HxW after checking shapes and dtypes."""
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name}: vessel_mask needs an HxWx3 uint8 RGB image, got shape {image.shape} "
                         f"dtype {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{name}: retinal mask shape {mask.shape} differs from the image's {image.shape[:2]}")
    inside = mask != 0
    if not inside.any():
        raise ValueError(f"{name}: the retinal mask is empty; run fundus preprocessing first so the mask "
                         "marks the field of view")
    return inside


def _scale(inside: np.ndarray) -> float:
    """Field-of-view width over REFERENCE_WIDTH (the width survives top/bottom clipping of the disc)."""
    cols = np.flatnonzero(inside.any(axis=0))
    return (cols[-1] - cols[0] + 1) / REFERENCE_WIDTH


def green_channel(image_rgb_uint8: np.ndarray, inside: np.ndarray, clahe: bool = True) -> np.ndarray:
    """Green channel as float32 HxW in [0, 1], CLAHE-enhanced if asked, outside filled by the inside mean.

    Args:
      image_rgb_uint8: HxWx3 uint8 RGB.
      inside: HxW bool retinal mask.
      clahe: contrast-limited adaptive histogram equalisation (clip 2, 8x8 tiles) of the green channel.
    """
    green = image_rgb_uint8[..., 1]
    if clahe:
        green = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(np.ascontiguousarray(green))
    green = green.astype(np.float32) / 255.0
    return np.where(inside, green, green[inside].mean()).astype(np.float32)


def frangi_response(green: np.ndarray, scale: float, sigmas=FRANGI_SIGMAS) -> tuple[np.ndarray, float]:
    """Frangi vesselness of dark ridges (float HxW >= 0) and the filter's reach in pixels.

    Args:
      green: float32 HxW in [0, 1].
      scale: field-of-view width / REFERENCE_WIDTH; `sigmas` are multiplied by it.
    """
    scaled = sorted({max(MIN_SIGMA, s * scale) for s in sigmas})
    return frangi(green, sigmas=scaled, black_ridges=True), 2.0 * max(scaled)


def _matched_kernel(sigma: float, length: float, angle: float) -> np.ndarray:
    """Zero-mean kernel of a dark Gaussian-profile segment at `angle` (radians), float32."""
    half = int(np.ceil(max(3 * sigma, length / 2)))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    across = xx * np.cos(angle) + yy * np.sin(angle)
    along = -xx * np.sin(angle) + yy * np.cos(angle)
    support = (np.abs(across) <= 3 * sigma) & (np.abs(along) <= length / 2)
    kernel = np.where(support, -np.exp(-across**2 / (2 * sigma**2)), 0.0).astype(np.float32)
    # Zero mean over the support: flat background scores 0 whatever its brightness.
    kernel[support] -= kernel[support].mean()
    return kernel


def matched_response(green: np.ndarray, scale: float, sigma: float = MATCHED_SIGMA,
                     length: float = MATCHED_LENGTH, angles: int = MATCHED_ANGLES) -> tuple[np.ndarray, float]:
    """Matched-filter response to dark vessels (float32 HxW, max over orientations) and its reach in pixels.

    Args:
      green: float32 HxW in [0, 1].
      scale: field-of-view width / REFERENCE_WIDTH; `sigma` and `length` are multiplied by it.
    """
    sigma = max(MIN_SIGMA, sigma * scale)
    length = max(3.0, length * scale)
    response = None
    for k in range(angles):
        kernel = _matched_kernel(sigma, length, np.pi * k / angles)
        r = cv2.filter2D(green, cv2.CV_32F, kernel, borderType=cv2.BORDER_REFLECT)
        response = r if response is None else np.maximum(response, r)
    return response, max(3 * sigma, length / 2)


def _erode(inside: np.ndarray, margin: int) -> np.ndarray:
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    # Pad with background so the image border counts as field-of-view edge too.
    eroded = cv2.erode(inside.astype(np.uint8), disc, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return eroded.astype(bool)


def threshold_response(response: np.ndarray, region: np.ndarray, rule: str = "fraction",
                       fraction: float = VESSEL_FRACTION) -> np.ndarray:
    """Vessel pixels (bool HxW) inside `region` by the named rule ("fraction" or "otsu").

    Args:
      response: float HxW vesselness.
      region: bool HxW, pixels that may be vessels.
      rule: "fraction" keeps the top `fraction` of region pixels; "otsu" applies Otsu's threshold.
    """
    scores = response[region]
    if scores.size == 0:
        return np.zeros(response.shape, bool)
    if rule == "fraction":
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
        cut = np.quantile(scores, 1.0 - fraction)
    elif rule == "otsu":
        cut = threshold_otsu(scores) if np.ptp(scores) > 0 else np.inf
    else:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLDS}")
    return (response > cut) & region


def _drop_small(vessels: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1:
        return vessels
    count, labels, stats, _ = cv2.connectedComponentsWithStats(vessels.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_size
    keep[0] = False  # background
    return keep[labels]


def vessel_response(image_rgb_uint8: np.ndarray, mask: np.ndarray, method: str = "frangi", *,
                    clahe: bool = True, name: str = "<array>") -> tuple[np.ndarray, np.ndarray]:
    """Vesselness score of every pixel and the region where vessels may be (the eroded field of view).

    Args: as `vessel_mask` (image HxWx3 uint8 RGB, mask HxW non-zero inside, method, clahe, name).
    Returns:
      (response float32 HxW, larger = more vessel-like, 0 outside the region; region bool HxW).
    """
    inside = _check_inputs(image_rgb_uint8, mask, name)
    if method not in METHODS:
        raise ValueError(f"{name}: unknown vesselness method {method!r}; choose one of {METHODS}")
    scale = _scale(inside)
    green = green_channel(np.asarray(image_rgb_uint8), inside, clahe)
    response_fn = frangi_response if method == "frangi" else matched_response
    response, reach = response_fn(green, scale)
    region = _erode(inside, int(np.ceil(reach + 0.01 * scale * REFERENCE_WIDTH)))
    return np.where(region, response, 0.0).astype(np.float32), region


def vessel_segmentation(image_rgb_uint8: np.ndarray, mask: np.ndarray, method: str = "frangi", *,
                        threshold: str = "fraction", fraction: float = VESSEL_FRACTION, clahe: bool = True,
                        min_size: int = MIN_SIZE, name: str = "<array>") -> tuple[np.ndarray, np.ndarray]:
    """`vessel_response` and `vessel_mask` of one image from one filter pass.

    Returns (response float32 HxW, 0 outside the region; vessels uint8 HxW {0, 1}).
    """
    response, region = vessel_response(image_rgb_uint8, mask, method, clahe=clahe, name=name)
    vessels = threshold_response(response, region, threshold, fraction)
    vessels = _drop_small(vessels, int(round(min_size * _scale(np.asarray(mask) != 0) ** 2)))
    return response, vessels.astype(np.uint8)


def vessel_mask(image_rgb_uint8: np.ndarray, mask: np.ndarray, method: str = "frangi", *,
                threshold: str = "fraction", fraction: float = VESSEL_FRACTION, clahe: bool = True,
                min_size: int = MIN_SIZE, name: str = "<array>") -> np.ndarray:
    """Pseudo vessel mask of a fundus photograph by a classical ridge filter.

    Args:
      image_rgb_uint8: HxWx3 uint8 RGB, fundus-cropped (as records store it).
      mask: HxW retinal (field-of-view) mask, non-zero inside.
      method: "frangi" (Hessian vesselness) or "matched" (matched filter); see the module docstring.
      threshold: "fraction" (top `fraction` of in-field pixels) or "otsu".
      fraction: vessel share of the eroded field of view for threshold="fraction".
      clahe: enhance the green channel with CLAHE first.
      min_size: drop vessel components smaller than this many pixels at a 512-px field of view.
      name: what to call the image in error messages (e.g. its file name).
    Returns:
      HxW uint8 {0, 1}; 0 outside the retinal mask and near its edge.
    """
    return vessel_segmentation(image_rgb_uint8, mask, method, threshold=threshold, fraction=fraction,
                               clahe=clahe, min_size=min_size, name=name)[1]
