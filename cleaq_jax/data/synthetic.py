"""Procedural colour fundus photographs with ground truth for grade, quality and vessels.

Each example is a function of (seed, index, size) alone. Four independent random streams keep the
ground truths apart:

- labels: grade and quality, drawn from class priors when not given;
- anatomy: global colour and brightness, pigment texture, vignetting, field of view, optic disc and
  macula position, the artery and vein trees (the vessel ground truth);
- lesions: where the grade's lesions go and how they look;
- quality: the JAX key of the quality transform.

So the same (seed, index) at grade 0 and at grade 4 is the same eye, and the grades differ only by
small lesions, never by global colour (a classifier on mean colour is at chance):

    grade  microaneurysms  haemorrhages        hard exudates  cotton-wool  neovascularisation
    0      -               -                   -              -            -
    1      2-6             -                   -              -            -
    2      4-12            2-6                 1-3 clusters   -            -
    3      8-20            8-16 + 1-4 flame    1-4 clusters   2-5          -
    4      10-24           10-20 + 2-5 flame   2-5 clusters   2-6          1-3 tufts

Quality is made by the quality transform QT of `cleaq_jax.data.degrade` from the clean image, which
is returned too: good = clean; usable = op1 (one or two degradations); reject = op2 (all three) at a
higher strength (`REJECT_QT`). Sizes are fractions of the image, so one (seed, index) gives the same
eye at every size; lesions are a few pixels at 512 px and sub-pixel specks at 64 px, unless
``lesion_scale`` enlarges them (the CPU benchmark at 64 px uses 4: microaneurysms of 1-2 px).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import cv2
import jax
import numpy as np

from cleaq_jax.data import degrade

GRADE_PRIORS = (0.5, 0.15, 0.2, 0.08, 0.07)  # less skewed than EyeQ so small runs see every grade
QUALITY_PRIORS = (0.5, 0.25, 0.25)  # good, usable, reject (EyeQ train: 0.67, 0.15, 0.18)
# Usable: op1 with cofe-Net's parameters except the blur, which is 10-30 px wide at 512 px (cofe-Net's
# 1-7 px vanishes below 128 px, and a usable label needs a visible defect at every size).
USABLE_QT = degrade.QTParams(blur_sigma=(10.0, 20.0), blur_kernel=(1.0, 1.5))
# Reject: op2, stronger in every step (wider blur and colour jitter, darker hole, more and brighter spots).
REJECT_QT = degrade.QTParams(brightness=(0.55, 1.3), contrast=(0.5, 1.5), halo_weight=1.3,
                             hole_offset=(-0.36, -0.3), spot_count=(6, 12), spot_gain=1.5,
                             blur_sigma=(10.0, 20.0), blur_kernel=(2.0, 3.0))
# Lesion counts (inclusive ranges) per grade 0-4: microaneurysms, dot/blot haemorrhages, flame
# haemorrhages, hard-exudate clusters, cotton-wool spots, neovascular tufts.
LESION_COUNTS = {
    "microaneurysm": ((0, 0), (2, 6), (4, 12), (8, 20), (10, 24)),
    "haemorrhage": ((0, 0), (0, 0), (2, 6), (8, 16), (10, 20)),
    "flame": ((0, 0), (0, 0), (0, 0), (1, 4), (2, 5)),
    "exudate_cluster": ((0, 0), (0, 0), (1, 3), (1, 4), (2, 5)),
    "cotton_wool": ((0, 0), (0, 0), (0, 0), (2, 5), (2, 6)),
    "neovascular": ((0, 0), (0, 0), (0, 0), (0, 0), (1, 3)),
}
_STREAMS = {"labels": 0, "anatomy": 1, "lesions": 2, "quality": 3}


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One eye, in image fractions (x right, y down)."""

    fov_radius: float
    base_color: np.ndarray  # (3,) RGB reflectance of the fundus background
    fovea: np.ndarray  # (2,) x, y
    disc: np.ndarray  # (2,) x, y
    disc_radius: float
    temporal: int  # +1 when the fovea lies to the right of the disc (x grows temporally), else -1


def _rng(seed: int, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), _STREAMS[stream]])


def _between(rng: np.random.Generator, r: tuple[int, int]) -> int:
    return int(rng.integers(r[0], r[1] + 1))


# --------------------------------------------------------------------------- anatomy and background
def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Global colour, field of view, disc and fovea of one eye."""
    pigment = rng.uniform()
    color = (1 - pigment) * np.array([0.95, 0.41, 0.26]) + pigment * np.array([0.74, 0.26, 0.13])
    color = color * rng.uniform(0.78, 1.12) * np.exp(rng.normal(0, 0.07, 3))
    fovea = np.array([0.5, 0.5]) + rng.normal(0, 0.02, 2)
    disc_radius = rng.uniform(0.056, 0.07)
    temporal = 1 if rng.uniform() < 0.5 else -1
    offset = np.array([-temporal * rng.uniform(2.2, 2.6), rng.uniform(-0.4, 0.15)]) * 2 * disc_radius
    # float32 throughout: a float64 scalar would promote every image-sized array it touches (NEP 50).
    return Anatomy(fov_radius=rng.uniform(0.46, 0.49), base_color=np.clip(color, 0.03, 0.97).astype(np.float32),
                   fovea=fovea.astype(np.float32), disc=(fovea + offset).astype(np.float32), disc_radius=disc_radius,
                   temporal=temporal)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image fractions, (size, 1) and (1, size)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[:, None], c[None, :]


def _noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Smooth zero-mean unit-ish noise: a cells x cells normal grid upsampled to size x size."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, a: Anatomy, size: int) -> np.ndarray:
    """Fundus reflectance HxWx3: base colour, pigment texture, vignetting, macula and fovea."""
    yy, xx = _grid(size)
    texture = (rng.uniform(0.02, 0.1) * _noise(rng, 6, size) + rng.uniform(0.015, 0.04) * _noise(rng, 24, size)
               + rng.uniform(0.01, 0.025) * _noise(rng, 96, size))
    r = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / a.fov_radius
    tilt_x, tilt_y = (float(t) for t in rng.uniform(-0.12, 0.12, 2))
    light = (1 - rng.uniform(0.1, 0.5) * r ** rng.uniform(2.0, 4.0)) * (1 + tilt_x * (xx - 0.5) + tilt_y * (yy - 0.5))
    d2 = (xx - a.fovea[0]) ** 2 + (yy - a.fovea[1]) ** 2
    macula = 1 - rng.uniform(0.2, 0.38) * np.exp(-d2 / (2 * rng.uniform(0.05, 0.08) ** 2))
    fovea = 1 - rng.uniform(0.1, 0.25) * np.exp(-d2 / (2 * 0.012 ** 2))
    shade = (light * macula * fovea)[..., None]
    # The macular pigment absorbs red less than green and blue: darken those more.
    tint = np.array([0.85, 1.0, 1.0], np.float32)
    shade = 1 - (1 - shade) * tint
    return a.base_color * (1 + texture)[..., None] * shade


def _blend(image: np.ndarray, alpha: np.ndarray, color: np.ndarray, top: int, left: int) -> None:
    """In place: image[window] = (1 - alpha) * image + alpha * color over the window of alpha at (top, left)."""
    if not alpha.any():
        return
    win = image[top:top + alpha.shape[0], left:left + alpha.shape[1]]
    win *= 1 - alpha[..., None]
    win += alpha[..., None] * color.astype(np.float32)


def _paint_disc(image: np.ndarray, rng: np.random.Generator, a: Anatomy) -> np.ndarray:
    """Optic disc (pale, yellow-orange, sharp-edged ellipse) with a paler cup; drawn in a window around it."""
    size = image.shape[0]
    top, left = (max(0, int((c - 1.5 * a.disc_radius) * size)) for c in (a.disc[1], a.disc[0]))
    span = int(3 * a.disc_radius * size) + 2
    yy = ((np.arange(top, min(size, top + span), dtype=np.float32) + 0.5) / size)[:, None]
    xx = ((np.arange(left, min(size, left + span), dtype=np.float32) + 0.5) / size)[None, :]
    rx, ry = a.disc_radius * rng.uniform(0.9, 1.0), a.disc_radius * rng.uniform(1.0, 1.12)
    d = np.sqrt(((xx - a.disc[0]) / rx) ** 2 + ((yy - a.disc[1]) / ry) ** 2)
    level = min(float(np.mean(a.base_color)) / 0.45, 1.15) ** 0.5
    rim_color = np.clip(np.array([1.0, 0.7, 0.45]) * rng.uniform(0.88, 1.0) * level, 0, 1)
    _blend(image, 0.8 / (1 + np.exp((d - 1) / 0.035)), rim_color, top, left)
    cup_c = a.disc + np.array([a.temporal * 0.15 * a.disc_radius, 0], np.float32) * rng.uniform(0, 1)
    dc = np.sqrt((xx - cup_c[0]) ** 2 + (yy - cup_c[1]) ** 2) / (a.disc_radius * rng.uniform(0.3, 0.5))
    _blend(image, 0.7 / (1 + np.exp((dc - 1) / 0.12)), np.clip(np.array([1.0, 0.86, 0.66]) * level, 0, 1), top, left)
    return image


# --------------------------------------------------------------------------- vessels
@dataclasses.dataclass
class _Path:
    points: np.ndarray  # (n, 2) x, y in image fractions
    widths: np.ndarray  # (n,) widths in image fractions
    kind: int  # 0 artery, 1 vein (or red lesion line)


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, length: float, curvature: float,
          decay: float, wiggle: float, step: float = 0.006) -> tuple[np.ndarray, np.ndarray]:
    """A smooth curve: heading turns by ``curvature`` (rad per unit length) fading over ``decay``,
    plus a random walk of ``wiggle`` rad per sqrt(unit length). Returns points (n, 2), headings (n,)."""
    n = max(2, int(math.ceil(length / step)) + 1)
    s = np.arange(n) * step
    theta = heading + curvature * decay * (1 - np.exp(-s / decay))
    theta = theta + np.cumsum(rng.normal(0, wiggle * math.sqrt(step), n))
    steps = np.stack([np.cos(theta), np.sin(theta)], 1) * step
    return start + np.concatenate([np.zeros((1, 2)), np.cumsum(steps[:-1], 0)]), theta


def _inside_prefix(points: np.ndarray, a: Anatomy) -> int:
    """Length of the prefix of a path that stays in the field of view and out of the foveal avascular zone."""
    out = (np.hypot(*(points - 0.5).T) > a.fov_radius * 0.985) | (np.hypot(*(points - a.fovea).T) < 0.035)
    return int(np.argmax(out)) if out.any() else len(points)


def _trunks(rng: np.random.Generator, a: Anatomy) -> list[tuple]:
    """(heading, curvature, decay, length, width, kind) of the vessels leaving the disc.

    Angles are drawn for a right-to-left eye layout (temporal = +x, superior = -y) and mirrored.
    """
    specs = []
    for kind, w0 in ((0, rng.uniform(0.0075, 0.0095)), (1, rng.uniform(0.0105, 0.013))):
        turn = rng.uniform(4.5, 6.0, 2)  # the arcades curve round the macula by 75-105 degrees
        specs += [
            (math.radians(-78 + rng.normal(0, 6)), turn[0], rng.uniform(0.27, 0.35), 0.95, w0, kind),  # superotemporal
            (math.radians(78 + rng.normal(0, 6)), -turn[1], rng.uniform(0.27, 0.35), 0.95, w0, kind),  # inferotemporal
            (math.radians(-118 + rng.normal(0, 10)), rng.uniform(-1, 1), 0.5, 0.7, 0.75 * w0, kind),  # superonasal
            (math.radians(118 + rng.normal(0, 10)), rng.uniform(-1, 1), 0.5, 0.7, 0.75 * w0, kind),  # inferonasal
            (math.radians(180 + rng.normal(0, 12)), rng.uniform(-1, 1), 0.5, 0.5, 0.55 * w0, kind),  # nasal
            (math.radians(rng.choice([-1, 1]) * rng.uniform(5, 25)), rng.uniform(-1, 1), 0.5, 0.4, 0.4 * w0, kind),
        ]
    if a.temporal < 0:  # mirror: heading -> pi - heading, turning the other way
        specs = [(math.pi - h, -c, d, ln, w, k) for h, c, d, ln, w, k in specs]
    return specs


def sample_vessels(rng: np.random.Generator, a: Anatomy, min_width: float = 0.0016,
                   max_depth: int = 4) -> list[_Path]:
    """Artery and vein trees from the disc: tapering, branching (Murray's law) paths in image fractions."""
    # Vessels leave from around the cup, not one point.
    todo = [(a.disc + a.disc_radius * (0.2 * np.array([math.cos(h), math.sin(h)]) + rng.normal(0, 0.12, 2)),
             h, c, d, ln, w, k, 0) for h, c, d, ln, w, k in _trunks(rng, a)]
    paths = []
    while todo:
        start, heading, curv, decay, length, w0, kind, depth = todo.pop()
        points, theta = _walk(rng, start, heading, length, curv, decay, wiggle=0.3 + 0.3 * depth)
        full, n = len(points), _inside_prefix(points, a)
        if n < 3:
            continue
        points, theta = points[:n], theta[:n]
        widths = w0 * (1 - 0.55 * np.arange(n) / (full - 1))  # taper over the planned length
        if depth < max_depth:
            s = rng.uniform(0.03, 0.08) + np.cumsum(rng.uniform(0.05, 0.12, 16) * (1 + 0.4 * depth))
            for i in (s / 0.006).astype(int):
                if i >= n - 2:
                    break
                child = widths[i] * rng.uniform(0.55, 0.8)
                if child < min_width:
                    continue
                widths[i:] *= (1 - (child / widths[i]) ** 3) ** (1 / 3)  # Murray: w^3 = w1^3 + w2^3
                side = rng.choice([-1.0, 1.0])
                todo.append((points[i], theta[i] + side * rng.uniform(0.45, 1.1), rng.uniform(-2.0, 2.0),
                             0.3, rng.uniform(45, 75) * child, child, kind, depth + 1))
        keep = widths >= 0.6 * min_width
        if keep.sum() >= 2:
            paths.append(_Path(points[keep], widths[keep], kind))
    return paths


def _supersample(size: int) -> int:
    """Drawing canvases are at least 512 px so sub-pixel vessels and lesions keep their area."""
    return int(min(8, max(2, math.ceil(512 / size))))


def draw_paths(paths: list[_Path], size: int, kinds: int = 2) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of each kind of path, (kinds, size, size) float32.

    Drawn at a supersampled scale and area-averaged; a path thinner than a canvas pixel is drawn one
    pixel wide at proportionally lower intensity, so its coverage stays right.
    """
    ss = _supersample(size)
    big = size * ss
    runs = []
    for path in paths:
        w = path.widths[:-1] * big
        thick = np.maximum(1, np.round(w)).astype(int)
        value = np.round(np.minimum(1.0, w) * 16).astype(int)  # 16 grey levels for sub-pixel widths
        pts = np.round((path.points * big - 0.5) * 16).astype(np.int32)  # shift=4: 1/16 px precision
        cut = np.flatnonzero((np.diff(thick) != 0) | (np.diff(value) != 0)) + 1
        for lo, hi in zip([0, *cut], [*cut, len(w)]):
            runs.append((thick[lo], value[lo], path.kind, pts[lo:hi + 1]))
    canvases = np.zeros((kinds, big, big), np.uint8)
    for thick, value, kind, pts in sorted(runs, key=lambda r: (r[0], r[1])):  # thick vessels drawn last, on top
        cv2.polylines(canvases[kind], [pts], False, int(min(255, value * 16)), int(thick), cv2.LINE_AA, 4)
    return np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in canvases]
                    ).astype(np.float32) / 255


# --------------------------------------------------------------------------- lesions
def _sites(rng: np.random.Generator, a: Anatomy, n: int, center: np.ndarray, spread: float) -> np.ndarray:
    """n points ~ N(center, spread) inside the field of view and clear of the optic disc, (n, 2)."""
    found = np.zeros((0, 2))
    for _ in range(50):
        if len(found) >= n:
            break
        cand = center + rng.normal(0, spread, (4 * n + 4, 2))
        ok = (np.hypot(*(cand - 0.5).T) < 0.9 * a.fov_radius) & (np.hypot(*(cand - a.disc).T) > 1.3 * a.disc_radius)
        found = np.concatenate([found, cand[ok]])
    return found[:n]


def _ellipse(canvas: np.ndarray, center, axes, angle: float, value: int) -> None:
    """Filled anti-aliased ellipse; center and axes in canvas pixels (float)."""
    c = tuple(int(round(v * 16)) for v in center)
    ax = tuple(max(1, int(round(v * 16))) for v in axes)
    cv2.ellipse(canvas, c, ax, float(angle), 0.0, 360.0, int(value), -1, cv2.LINE_AA, 4)


def _red_lesions(rng: np.random.Generator, a: Anatomy, counts: dict, canvas: np.ndarray,
                 scale: float = 1.0) -> list[_Path]:
    """Microaneurysms, dot/blot and flame haemorrhages onto ``canvas`` (sizes times ``scale``); returns
    neovascular paths."""
    side = canvas.shape[0]
    big = side * scale
    for p in _sites(rng, a, counts["microaneurysm"], a.fovea, 0.16):
        r = rng.uniform(0.0022, 0.0045) * big
        _ellipse(canvas, p * side - 0.5, (r, r), 0, rng.integers(200, 256))
    for p in _sites(rng, a, counts["haemorrhage"], a.fovea, 0.2):
        r = rng.uniform(0.004, 0.011)
        for _ in range(rng.integers(1, 4)):  # a blot is a few overlapping ellipses, a dot just one
            q = (p + rng.normal(0, 0.5 * r * scale, 2)) * side - 0.5
            _ellipse(canvas, q, (r * big, r * big * rng.uniform(0.6, 1.0)), rng.uniform(0, 180), rng.integers(190, 256))
    temporal = np.array([a.temporal, 0.0])
    for p in _sites(rng, a, counts["flame"], a.disc + 0.12 * temporal, 0.12):
        along = math.degrees(math.atan2(*(p - a.disc)[::-1]))  # flames follow the nerve fibres, radially
        _ellipse(canvas, p * side - 0.5, (rng.uniform(0.012, 0.022) * big, rng.uniform(0.003, 0.006) * big),
                 along, rng.integers(170, 230))
    tufts = []
    for _ in range(counts["neovascular"]):
        if rng.uniform() < 0.6:  # on the disc (NVD) or elsewhere along the arcades (NVE)
            ang = rng.uniform(0, 2 * math.pi)
            center = a.disc + a.disc_radius * rng.uniform(0.5, 1.3) * np.array([math.cos(ang), math.sin(ang)])
        else:
            side = rng.choice([-1, 1])
            center = a.disc + np.array([a.temporal * rng.uniform(0.1, 0.25), side * rng.uniform(0.08, 0.16)])
        for _ in range(rng.integers(3, 8)):
            pts, _ = _walk(rng, center + rng.normal(0, 0.008, 2), rng.uniform(0, 2 * math.pi), rng.uniform(0.025, 0.06),
                           rng.uniform(-30, 30), 0.05, wiggle=10.0, step=0.002)
            tufts.append(_Path(pts, np.full(len(pts), rng.uniform(0.0011, 0.0018) * scale), 0))
    return tufts


def _bright_lesions(rng: np.random.Generator, a: Anatomy, counts: dict, exudate: np.ndarray,
                    cotton: np.ndarray, scale: float = 1.0) -> None:
    """Hard exudates (clusters of small yellow dots) and cotton-wool spots (soft white patches), sizes
    times ``scale``."""
    side = exudate.shape[0]
    big = side * scale
    for c in _sites(rng, a, counts["exudate_cluster"], a.fovea, 0.12):
        spread = rng.uniform(0.008, 0.025) * scale
        for p in c + rng.normal(0, spread, (rng.integers(4, 15), 2)):
            r = rng.uniform(0.0018, 0.0045) * big
            axes = (r, r * rng.uniform(0.6, 1.0))
            _ellipse(exudate, p * side - 0.5, axes, rng.uniform(0, 180), rng.integers(200, 256))
    for p in _sites(rng, a, counts["cotton_wool"], a.disc + np.array([a.temporal * 0.12, 0.0]), 0.14):
        r = rng.uniform(0.009, 0.018) * big
        _ellipse(cotton, p * side - 0.5, (r, r * rng.uniform(0.5, 0.9)), rng.uniform(0, 180), rng.integers(170, 230))


def lesion_counts(rng: np.random.Generator, grade: int) -> dict[str, int]:
    """How many lesions of each kind an eye of this grade gets (see LESION_COUNTS)."""
    return {name: _between(rng, ranges[grade]) for name, ranges in LESION_COUNTS.items()}


def render_lesions(rng: np.random.Generator, a: Anatomy, grade: int, size: int, lesion_scale: float = 1.0) -> np.ndarray:
    """Coverage maps (3, size, size) float32 in [0, 1]: red lesions, hard exudates, cotton-wool spots.

    ``lesion_scale`` multiplies every lesion's size (not its count or place), so lesions stay visible
    on small images (a benchmark at 64 px needs about 4x to show microaneurysms as pixels).
    """
    ss = _supersample(size)
    big = size * ss
    counts = lesion_counts(rng, grade)
    red, exudate, cotton = (np.zeros((big, big), np.uint8) for _ in range(3))
    tufts = _red_lesions(rng, a, counts, red, lesion_scale)
    _bright_lesions(rng, a, counts, exudate, cotton, lesion_scale)
    small = [cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
             for c in (red, exudate, cotton)]
    if tufts:
        small[0] = np.maximum(small[0], 0.85 * draw_paths(tufts, size, kinds=1)[0])
    # Cotton-wool spots are fluffy: soften their edges by a quarter of a typical spot radius.
    small[2] = cv2.GaussianBlur(small[2], (0, 0), sigmaX=max(0.25, 0.004 * size * lesion_scale))
    return np.stack(small)


# --------------------------------------------------------------------------- composition
def _paint_lesions(image: np.ndarray, a: Anatomy, rng: np.random.Generator, grade: int,
                   lesion_scale: float = 1.0) -> np.ndarray:
    """In place: the grade's lesions onto the image; returns their coverage (3, H, W)."""
    cover = render_lesions(rng, a, grade, image.shape[0], lesion_scale)
    red, exudate, cotton = cover
    level = float(np.clip(np.mean(a.base_color) / 0.45, 0.75, 1.1))  # lesions follow the eye's brightness
    image *= 1 - red[..., None] * (1 - np.float32((0.66, 0.3, 0.36)))
    _blend(image, exudate, level * np.float32((0.98, 0.84, 0.24)), 0, 0)  # yellow: little blue
    _blend(image, 0.6 * cotton, level * np.float32((0.94, 0.84, 0.66)), 0, 0)
    return cover


def _channel_stats(image: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels = image[inside]
    return pixels.mean(0), pixels.std(0) + 1e-6


def render_clean(seed: int, index: int, size: int, grade: int, lesion_scale: float = 1.0) -> dict[str, np.ndarray]:
    """The undegraded eye: image HxWx3 float32 in [0, 1] (0 outside the mask), mask, vessel and lesion
    masks HxW uint8 {0, 1}. Anatomy depends on (seed, index) only; lesions on grade (and lesion_scale) too.

    After the lesions are painted, each channel's mean and standard deviation inside the mask are set
    back to the lesion-free eye's (an affine map moving other pixels by about 1/255): a grade's lesions
    then leave no trace in global colour statistics, only where they are.
    """
    rng = _rng(seed, index, "anatomy")
    a = sample_anatomy(rng)
    image = _paint_disc(_background(rng, a, size), rng, a)
    vessels = draw_paths(sample_vessels(rng, a), size)
    # Blood absorbs green and blue most; veins (deoxygenated) more than arteries.
    for cover, transmit in zip(vessels, ((0.9, 0.72, 0.76), (0.8, 0.52, 0.6))):
        image *= 1 - cover[..., None] * (1 - np.float32(transmit) * rng.uniform(0.92, 1.05))
    yy, xx = _grid(size)
    mask = (np.hypot(xx - 0.5, yy - 0.5) <= a.fov_radius).astype(np.uint8)
    inside = mask > 0
    mean0, std0 = _channel_stats(image, inside)
    lesions = _paint_lesions(image, a, _rng(seed, index, "lesions"), grade, lesion_scale)
    if lesions.any():
        mean, std = _channel_stats(image, inside)
        image = mean0 + (image - mean) * (std0 / std)
    return {
        "image": np.clip(image, 0, 1).astype(np.float32) * mask[..., None],
        "mask": mask,
        "vessel": ((vessels.sum(0) >= 0.5) & inside).astype(np.uint8),
        "lesion": ((lesions.max(0) >= 0.35) & inside).astype(np.uint8),
    }


@functools.lru_cache(maxsize=None)
def _degrader(quality: int, params: degrade.QTParams):
    """op1 or op2 jitted for a QTParams (compiled once per image size by jax.jit's cache)."""
    op = degrade.op1 if quality == 1 else degrade.op2
    return jax.jit(lambda image, mask, key: op(image, mask, key, params))


def _priors(priors: Any, n: int, name: str) -> np.ndarray:
    p = np.asarray(priors, np.float64)
    if p.shape != (n,) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"{name} must be {n} non-negative weights with a positive sum, got {priors!r}")
    return p / p.sum()


def draw_labels(seed: int, index: int, grade_priors: Any = GRADE_PRIORS,
                quality_priors: Any = QUALITY_PRIORS) -> tuple[int, int]:
    """(grade, quality) of example (seed, index) drawn from the priors (5 and 3 non-negative weights)."""
    labels = _rng(seed, index, "labels")
    grade = int(labels.choice(5, p=_priors(grade_priors, 5, "grade_priors")))
    return grade, int(labels.choice(3, p=_priors(quality_priors, 3, "quality_priors")))


@dataclasses.dataclass(frozen=True)
class Population:
    """What the generated eyes share beyond their own (seed, index): the label priors, the quality
    transforms and the lesion size.

    grade_priors: 5 non-negative weights of DR grades 0-4, quality_priors: 3 of good, usable, reject
    (drawn from when an example's grade or quality is not given); usable_qt, reject_qt: QT
    parameters of op1 (usable) and op2 (reject); lesion_scale: multiplier on every lesion's size
    (> 0; 1 = the sizes of a 512 px photograph).
    """

    grade_priors: Any = GRADE_PRIORS
    quality_priors: Any = QUALITY_PRIORS
    usable_qt: degrade.QTParams = USABLE_QT
    reject_qt: degrade.QTParams = REJECT_QT
    lesion_scale: float = 1.0


def generate_example(seed: int, index: int, size: int, *, grade: int | None = None, quality: int | None = None,
                     population: Population = Population()) -> dict:
    """One synthetic example in the record schema, deterministic in (seed, index, size).

    Args:
      seed, index: identify the example (ids are unique per (seed, index)).
      size: image side in px (>= 16).
      grade: DR grade 0-4, or None to draw it from ``population.grade_priors``.
      quality: 0 good, 1 usable, 2 reject, or None to draw it from ``population.quality_priors``.
      population: priors, quality transforms and lesion size (`Population`).
    Returns: dict with image (HxWx3 uint8), clean (HxWx3 uint8, the undegraded image), mask, vessel and
      lesion (HxW uint8 {0, 1}), dr_grade, quality (int), id (str), source "synthetic".
    """
    if int(size) < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    lesion_scale = population.lesion_scale
    drawn_grade, drawn_quality = draw_labels(seed, index, population.grade_priors, population.quality_priors)
    grade = drawn_grade if grade is None else int(grade)
    quality = drawn_quality if quality is None else int(quality)
    if not 0 <= grade <= 4 or not 0 <= quality <= 2:
        raise ValueError(f"grade must be 0-4 and quality 0-2, got grade={grade}, quality={quality}")
    if not lesion_scale > 0:
        raise ValueError(f"lesion_scale must be > 0, got {lesion_scale}")
    out = render_clean(seed, index, int(size), grade, float(lesion_scale))
    clean = np.round(out["image"] * 255).astype(np.uint8)
    image = clean
    if quality > 0:
        key = jax.random.key(int(_rng(seed, index, "quality").integers(0, 2**31 - 1)))
        fn = _degrader(quality, population.usable_qt if quality == 1 else population.reject_qt)
        degraded = np.asarray(fn(clean.astype(np.float32) / 255, out["mask"], key))
        image = np.round(np.clip(degraded, 0, 1) * 255).astype(np.uint8)
    return {"image": image, "clean": clean, "mask": out["mask"], "vessel": out["vessel"], "lesion": out["lesion"],
            "dr_grade": grade, "quality": quality, "id": example_id(seed, index), "source": "synthetic"}


def example_id(seed: int, index: int) -> str:
    """The record id of synthetic example (seed, index)."""
    return f"synthetic-{seed}-{index:07d}"
