"""The anatomy of a synthetic eye: field of view, optic disc, fovea and colour (`Anatomy`), and its artery
and vein trees as paths drawn anti-aliased (the vessel ground truth of `data.synthetic`)."""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One eye, in image fractions (x right, y down)."""

    fov_radius: float
    base_color: np.ndarray  # (3,) RGB reflectance of the fundus background
    fovea: np.ndarray  # (2,) x, y
    disc: np.ndarray  # (2,) x, y
    disc_radius: float
    temporal: int  # +1 when the fovea lies to the right of the disc (x grows temporally), else -1


def between(rng: np.random.Generator, r: tuple[int, int]) -> int:
    return int(rng.integers(r[0], r[1] + 1))


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


@dataclasses.dataclass
class VesselPath:
    points: np.ndarray  # (n, 2) x, y in image fractions
    widths: np.ndarray  # (n,) widths in image fractions
    kind: int  # 0 artery, 1 vein (or red lesion line)


def walk(rng: np.random.Generator, start: np.ndarray, heading: float, length: float, curvature: float,
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
                   max_depth: int = 4) -> list[VesselPath]:
    """Artery and vein trees from the disc: tapering, branching (Murray's law) paths in image fractions."""
    # Vessels leave from around the cup, not one point.
    todo = [(a.disc + a.disc_radius * (0.2 * np.array([math.cos(h), math.sin(h)]) + rng.normal(0, 0.12, 2)),
             h, c, d, ln, w, k, 0) for h, c, d, ln, w, k in _trunks(rng, a)]
    paths = []
    while todo:
        start, heading, curv, decay, length, w0, kind, depth = todo.pop()
        points, theta = walk(rng, start, heading, length, curv, decay, wiggle=0.3 + 0.3 * depth)
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
            paths.append(VesselPath(points[keep], widths[keep], kind))
    return paths


def supersample(size: int) -> int:
    """Drawing canvases are at least 512 px so sub-pixel vessels and lesions keep their area."""
    return int(min(8, max(2, math.ceil(512 / size))))


def draw_paths(paths: list[VesselPath], size: int, kinds: int = 2) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of each kind of path, (kinds, size, size) float32.

    Drawn at a supersampled scale and area-averaged; a path thinner than a canvas pixel is drawn one
    pixel wide at proportionally lower intensity, so its coverage stays right.
    """
    ss = supersample(size)
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
