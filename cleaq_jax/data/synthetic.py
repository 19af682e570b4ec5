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
from typing import Any

import cv2
import jax
import numpy as np

from cleaq_jax.data import anatomy, degrade, lesions

GRADE_PRIORS = (0.5, 0.15, 0.2, 0.08, 0.07)  # less skewed than EyeQ so small runs see every grade


QUALITY_PRIORS = (0.5, 0.25, 0.25)  # good, usable, reject (EyeQ train: 0.67, 0.15, 0.18)


# Usable: op1 with cofe-Net's parameters except the blur, which is 10-30 px wide at 512 px (cofe-Net's
# 1-7 px vanishes below 128 px, and a usable label needs a visible defect at every size).
USABLE_QT = degrade.QTParams(blur_sigma=(10.0, 20.0), blur_kernel=(1.0, 1.5))


# Reject: op2, stronger in every step (wider blur and colour jitter, darker hole, more and brighter spots).
REJECT_QT = degrade.QTParams(brightness=(0.55, 1.3), contrast=(0.5, 1.5), halo_weight=1.3,
                             hole_offset=(-0.36, -0.3), spot_count=(6, 12), spot_gain=1.5,
                             blur_sigma=(10.0, 20.0), blur_kernel=(2.0, 3.0))


_STREAMS = {"labels": 0, "anatomy": 1, "lesions": 2, "quality": 3}


def _rng(seed: int, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), _STREAMS[stream]])


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image fractions, (size, 1) and (1, size)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[:, None], c[None, :]


def _noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Smooth zero-mean unit-ish noise: a cells x cells normal grid upsampled to size x size."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, a: anatomy.Anatomy, size: int) -> np.ndarray:
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


def _paint_disc(image: np.ndarray, rng: np.random.Generator, a: anatomy.Anatomy) -> np.ndarray:
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


def _paint_lesions(image: np.ndarray, a: anatomy.Anatomy, rng: np.random.Generator, grade: int,
                   lesion_scale: float = 1.0) -> np.ndarray:
    """In place: the grade's lesions onto the image; returns their coverage (3, H, W)."""
    cover = lesions.render_lesions(rng, a, grade, image.shape[0], lesion_scale)
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
    masks HxW uint8 {0, 1}. The anatomy depends on (seed, index) only; the lesions on grade (and lesion_scale) too.

    After the lesions are painted, each channel's mean and standard deviation inside the mask are set
    back to the lesion-free eye's (an affine map moving other pixels by about 1/255): a grade's lesions
    then leave no trace in global colour statistics, only where they are.
    """
    rng = _rng(seed, index, "anatomy")
    a = anatomy.sample_anatomy(rng)
    image = _paint_disc(_background(rng, a, size), rng, a)
    vessels = anatomy.draw_paths(anatomy.sample_vessels(rng, a), size)
    # Blood absorbs green and blue most; veins (deoxygenated) more than arteries.
    for cover, transmit in zip(vessels, ((0.9, 0.72, 0.76), (0.8, 0.52, 0.6))):
        image *= 1 - cover[..., None] * (1 - np.float32(transmit) * rng.uniform(0.92, 1.05))
    yy, xx = _grid(size)
    mask = (np.hypot(xx - 0.5, yy - 0.5) <= a.fov_radius).astype(np.uint8)
    inside = mask > 0
    mean0, std0 = _channel_stats(image, inside)
    lesion_cover = _paint_lesions(image, a, _rng(seed, index, "lesions"), grade, lesion_scale)
    if lesion_cover.any():
        mean, std = _channel_stats(image, inside)
        image = mean0 + (image - mean) * (std0 / std)
    return {
        "image": np.clip(image, 0, 1).astype(np.float32) * mask[..., None],
        "mask": mask,
        "vessel": ((vessels.sum(0) >= 0.5) & inside).astype(np.uint8),
        "lesion": ((lesion_cover.max(0) >= 0.35) & inside).astype(np.uint8),
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
