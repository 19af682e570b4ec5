"""DR lesions of a synthetic eye by grade: microaneurysms, haemorrhages, hard exudates, cotton-wool spots and
neovascular tufts (`LESION_COUNTS`), placed on its `anatomy.Anatomy` and drawn as coverage maps."""

from __future__ import annotations

import math

import cv2
import numpy as np

from cleaq_jax.data import anatomy

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


def _sites(rng: np.random.Generator, a: anatomy.Anatomy, n: int, center: np.ndarray, spread: float) -> np.ndarray:
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


def _red_lesions(rng: np.random.Generator, a: anatomy.Anatomy, counts: dict, canvas: np.ndarray,
                 scale: float = 1.0) -> list[anatomy.VesselPath]:
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
            pts, _ = anatomy.walk(rng, center + rng.normal(0, 0.008, 2), rng.uniform(0, 2 * math.pi), rng.uniform(0.025, 0.06),
                           rng.uniform(-30, 30), 0.05, wiggle=10.0, step=0.002)
            tufts.append(anatomy.VesselPath(pts, np.full(len(pts), rng.uniform(0.0011, 0.0018) * scale), 0))
    return tufts


def _bright_lesions(rng: np.random.Generator, a: anatomy.Anatomy, counts: dict, exudate: np.ndarray,
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
    return {name: anatomy.between(rng, ranges[grade]) for name, ranges in LESION_COUNTS.items()}


def render_lesions(rng: np.random.Generator, a: anatomy.Anatomy, grade: int, size: int, lesion_scale: float = 1.0) -> np.ndarray:
    """Coverage maps (3, size, size) float32 in [0, 1]: red lesions, hard exudates, cotton-wool spots.

    ``lesion_scale`` multiplies every lesion's size (not its count or place), so lesions stay visible
    on small images (a benchmark at 64 px needs about 4x to show microaneurysms as pixels).
    """
    ss = anatomy.supersample(size)
    big = size * ss
    counts = lesion_counts(rng, grade)
    red, exudate, cotton = (np.zeros((big, big), np.uint8) for _ in range(3))
    tufts = _red_lesions(rng, a, counts, red, lesion_scale)
    _bright_lesions(rng, a, counts, exudate, cotton, lesion_scale)
    small = [cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
             for c in (red, exudate, cotton)]
    if tufts:
        small[0] = np.maximum(small[0], 0.85 * anatomy.draw_paths(tufts, size, kinds=1)[0])
    # Cotton-wool spots are fluffy: soften their edges by a quarter of a typical spot radius.
    small[2] = cv2.GaussianBlur(small[2], (0, 0), sigmaX=max(0.25, 0.004 * size * lesion_scale))
    return np.stack(small)
