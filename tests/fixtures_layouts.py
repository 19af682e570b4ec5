"""Fixture builders: fundus photographs made from scikit-image's real retina photo, and the EyeQ,
Messidor and DRIVE folder layouts as published, with the faults a prep run has to survive."""

from __future__ import annotations

import csv
import functools
import os

import cv2
import numpy as np
from PIL import Image

from cleaq_jax.data.fundus import Disc


@functools.lru_cache(maxsize=1)
def retina() -> np.ndarray:
    """scikit-image's colour fundus photograph, 1411x1411x3 uint8 RGB (read-only)."""
    from skimage import data

    image = data.retina()
    image.flags.writeable = False
    return image


@functools.lru_cache(maxsize=1)
def retina_disc() -> Disc:
    """The photo's disc measured independently of cleaq_jax: RANSAC circle on the thresholded outline."""
    from skimage import measure

    bright = (retina().max(axis=2) > 20).astype(np.uint8)
    contours, _ = cv2.findContours(bright, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=len)[:, 0, :].astype(np.float64)
    model, _ = measure.ransac(outline, measure.CircleModel, min_samples=3, residual_threshold=2,
                              max_trials=100, rng=0)
    return Disc(float(model.center[0]), float(model.center[1]), float(model.radius))


def place(canvas_wh: tuple[int, int], diameter: int, offset: tuple[int, int], *, gain: float = 1.0,
          noise: float = 3.0, flip: bool = False, seed: int = 0) -> tuple[np.ndarray, Disc]:
    """The photo scaled to ``diameter`` px, pasted at ``offset`` (x, y; may be negative, clipping it)
    on a black canvas with Gaussian sensor noise. Returns (HxWx3 uint8 RGB, the true disc)."""
    w, h = canvas_wh
    photo = cv2.resize(retina(), (diameter, diameter), interpolation=cv2.INTER_AREA).astype(np.float32) * gain
    if flip:
        photo = photo[:, ::-1]
    canvas = np.zeros((h, w, 3), np.float32)
    ox, oy = offset
    x0, y0, x1, y1 = max(0, ox), max(0, oy), min(w, ox + diameter), min(h, oy + diameter)
    canvas[y0:y1, x0:x1] = photo[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    canvas += np.random.default_rng(seed).normal(0.0, noise, canvas.shape)
    ref = retina_disc()
    s = diameter / retina().shape[0]
    cx = (1410 - ref.cx if flip else ref.cx)
    truth = Disc((cx + 0.5) * s - 0.5 + ox, (ref.cy + 0.5) * s - 0.5 + oy, ref.r * s)
    return np.clip(canvas, 0, 255).astype(np.uint8), truth


def small_fundus(i: int, canvas_wh: tuple[int, int] = (320, 240)) -> np.ndarray:
    """A small EyePACS-like photo (4:3 canvas, black border, noise), varied by ``i``."""
    w, h = canvas_wh
    diameter = int(h * (0.85 + 0.05 * (i % 3)))
    offset = ((w - diameter) // 2 + 6 * (i % 4) - 9, (h - diameter) // 2 + 3 * (i % 3) - 3)
    return place(canvas_wh, diameter, offset, gain=0.6 + 0.1 * (i % 5), flip=bool(i % 2), seed=i)[0]


def write_image(path: str, rgb: np.ndarray) -> str:
    """Write an RGB (or single-channel) uint8 array in the format named by the extension."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = rgb[..., ::-1] if rgb.ndim == 3 else rgb
    if not cv2.imwrite(path, np.ascontiguousarray(array)):
        raise OSError(f"could not write {path}")
    return path


def write_gif_mask(path: str, mask: np.ndarray) -> str:
    """A 0/255 palette GIF, as DRIVE publishes its masks."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((mask > 0).astype(np.uint8) * 255).convert("P").save(path)
    return path


def truncate(path: str) -> str:
    """Cut a file to half its length (a broken download)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def write_oversized_png(path: str, width: int = 40_000, height: int = 40_000) -> str:
    """A valid PNG of a few KB that declares width x height px (black, 8-bit RGB): a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compressobj(9)
    body = b"".join(rows.compress(b"\0" * (1 + 3 * width)) for _ in range(64)) + rows.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def write_unreadable(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("<html>404 Not Found</html>\n")
    return path


# --------------------------------------------------------------------------- EyeQ
EYEQ_HEADER = ["", "image", "quality", "DR_grade"]


def eyeq_layout(root: str, n_good: int = 6) -> dict:
    """EyePACS-style images/ and Label_EyeQ_train.csv with good rows and one of each fault.

    Returns {"images", "labels", "good": {id: (grade, quality)}, "bad": {id: reason keyword}}.
    """
    images = os.path.join(root, "images")
    rows, good, bad = [], {}, {}
    for i in range(n_good):
        image_id = f"{10009 + i}_{'left' if i % 2 else 'right'}"
        write_image(os.path.join(images, f"{image_id}.jpeg"), small_fundus(i))
        grade, quality = i % 5, i % 3
        rows.append([f"{image_id}.jpeg", quality, grade])
        good[image_id] = (grade, quality)
    faults = {
        "20001_left": ("truncated", lambda p: truncate(write_image(p, small_fundus(1)))),
        "20002_left": ("not a JPEG/PNG/TIFF/GIF image", write_unreadable),
        "20003_left": ("no retinal disc", lambda p: write_image(p, np.zeros((240, 320, 3), np.uint8))),
        "20004_left": ("not found", None),
    }
    for image_id, (reason, make) in faults.items():
        if make is not None:
            make(os.path.join(images, f"{image_id}.jpeg"))
        rows.append([f"{image_id}.jpeg", 0, 1])
        bad[image_id] = reason
    write_image(os.path.join(images, "20005_left.jpeg"), small_fundus(2))
    rows.append(["20005_left.jpeg", 7, 1])
    bad["20005_left"] = "quality 7 is out of range"
    write_image(os.path.join(images, "20006_left.jpeg"), small_fundus(3))
    rows.append(["20006_left.jpeg", 0, "severe"])
    bad["20006_left"] = "DR_grade 'severe' is not an integer"
    write_oversized_png(os.path.join(images, "20007_left.jpeg"))  # a PNG under a .jpeg name: decoded by content
    rows.append(["20007_left.jpeg", 0, 1])
    bad["20007_left"] = "declares 40000 x 40000 px, over the limit"
    labels = os.path.join(root, "Label_EyeQ_train.csv")
    write_csv(labels, EYEQ_HEADER, [[i, *r] for i, r in enumerate(rows)])
    return {"images": images, "labels": labels, "good": good, "bad": bad}


def write_csv(path: str, header: list, rows: list) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- Messidor
MESSIDOR_HEADER = ["Image name", "Ophthalmologic department", "Retinopathy grade", "Risk of macular edema "]


def write_xls(path: str, header: list, rows: list, sheet: str = "Feuil1") -> str:
    import xlwt

    book = xlwt.Workbook()
    ws = book.add_sheet(sheet)
    for c, name in enumerate(header):
        ws.write(0, c, name)
    for r, row in enumerate(rows, start=1):
        for c, value in enumerate(row):
            ws.write(r, c, value)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    book.save(path)
    return path


def messidor_layout(root: str, per_base: int = 6, bases: tuple[str, ...] = ("11", "12"),
                    faults: bool = True) -> dict:
    """Base folders with .tif images (Messidor's 3:2 canvas) and an Annotation_BaseNN.xls each.

    With ``faults``, the last base also lists a grade out of range, a missing image, a duplicated
    row and an image without a disc, and Annotation_Base13.xls lacks the grade column.
    Returns {"good": {id: grade}, "bad": {id or spreadsheet name: reason keyword}}.
    """
    good, bad = {}, {}
    for b, base in enumerate(bases):
        folder = os.path.join(root, f"Base{base}")
        rows = []
        for i in range(per_base):
            k = b * per_base + i
            name = f"2005{base}_{k:05d}_0100_PP.tif"
            write_image(os.path.join(folder, name), small_fundus(k, (300, 200)))
            rows.append([name, "Service Ophtalmologie Lariboisiere", float(k % 4), float(k % 3)])
            good[os.path.splitext(name)[0]] = k % 4
        if faults and b == len(bases) - 1:
            rows += _messidor_faults(folder, rows[0][0], bad)
        write_xls(os.path.join(root, f"Annotation_Base{base}.xls"), MESSIDOR_HEADER, rows)
    if faults:
        write_xls(os.path.join(root, "Annotation_Base13.xls"), ["Image name", "Grade"], [["x.tif", 1.0]])
        bad["Annotation_Base13.xls"] = "lacks column(s) Retinopathy grade"
    return {"good": good, "bad": bad}


def _messidor_faults(folder: str, first_name: str, bad: dict) -> list[list]:
    write_image(os.path.join(folder, "20059_90001_0100_PP.tif"), small_fundus(1, (300, 200)))
    write_image(os.path.join(folder, "20059_90003_0100_PP.tif"), np.zeros((200, 300, 3), np.uint8))
    bad.update({"20059_90001_0100_PP": "out of range 0-3", "20059_90002_0100_PP": "not found",
                "20059_90003_0100_PP": "no retinal disc", os.path.splitext(first_name)[0]: "annotated twice"})
    return [["20059_90001_0100_PP.tif", "x", 5.0, 0.0], ["20059_90002_0100_PP.tif", "x", 1.0, 0.0],
            ["20059_90003_0100_PP.tif", "x", 2.0, 0.0], [first_name, "x", 0.0, 0.0]]


# --------------------------------------------------------------------------- DRIVE
DRIVE_WH = (565, 584)


def drive_case(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(565x584 RGB photo, FOV mask {0,1}, vessel mask {0,1}) like one DRIVE case."""
    image, disc = place(DRIVE_WH, 546, (10 + 2 * (i % 3), 19 - (i % 2) * 4), flip=bool(i % 2), seed=i)
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    fov = (np.hypot(xx - disc.cx, yy - disc.cy) < disc.r - 2).astype(np.uint8)
    green = cv2.GaussianBlur(image[..., 1], (3, 3), 0)
    # Real vessels: dark thin structures of the photo's green channel (black-hat), inside the FOV.
    tophat = cv2.morphologyEx(green, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    vessel = ((tophat > np.percentile(tophat[fov > 0], 88)) & (fov > 0)).astype(np.uint8)
    return image, fov, vessel


def drive_layout(root: str, train: tuple[int, ...] = (21, 22), test: tuple[int, ...] = (1, 2)) -> dict:
    """DRIVE's training/ and test/ folders (images .tif, 1st_manual and mask .gif).

    Returns {"cases": {id: (fov, vessel)}} with the masks written for each image id.
    """
    cases = {}
    for folder, suffix, numbers in (("training", "training", train), ("test", "test", test)):
        for n in numbers:
            image, fov, vessel = drive_case(n)
            base = os.path.join(root, folder)
            write_image(os.path.join(base, "images", f"{n:02d}_{suffix}.tif"), image)
            write_gif_mask(os.path.join(base, "mask", f"{n:02d}_{suffix}_mask.gif"), fov)
            write_gif_mask(os.path.join(base, "1st_manual", f"{n:02d}_manual1.gif"), vessel)
            cases[f"{n:02d}_{suffix}"] = (fov, vessel)
    return {"cases": cases}
