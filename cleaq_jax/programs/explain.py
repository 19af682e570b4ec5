"""What predict adds for a reader: Grad-CAM heatmaps of the grade (``--explain``) and report.html (``--report``).

- `explain_batch`: Grad-CAM of the DR grader over a batch of processed photographs and over IQE's
  enhancement of them, each map explaining the grade predict reports for that photograph.
- `Outputs`: writes the overlays as ``explain/<stem>.png`` (over the photograph) and
  ``explain/<stem>-enhanced.png`` (over the enhancement), the crops the report shows as ``crops/<stem>.png``,
  and collects one `html_report.Card` per photograph for ``report.html``, which links those files
  (so the folder can be moved or archived whole; nothing is fetched from the network).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np

from cleaq_jax.evaluation import gradcam, html_report, report
from cleaq_jax.models import factory
from cleaq_jax.runtime import storage

EXPLAIN_DIR = "explain"
CROPS_DIR = "crops"
REPORT = "report.html"


def explain_batch(restored, x: np.ndarray, mask: np.ndarray, grade: np.ndarray,
                  enhanced: np.ndarray | None) -> dict[str, np.ndarray]:
    """Grad-CAM of the reported grade over the photographs and their enhancement.

    restored: a checkpoint with a DR network (its `models`, `state`); x: (B, S, S, 3) float32 in [0, 1]
    zero outside mask (B, S, S); grade: (B,) int, the grade predict reports; enhanced: (B, S, S, 3) or None.
    Returns {'photo': (B, S, S) heat in [0, 1]} and 'enhanced' likewise when given. B is fixed by the caller
    (predict pads every batch to one size), so this compiles once.
    """
    fn = functools.partial(gradcam.compiled(restored.models["dr"]), factory.variables(restored.state, "dr"))
    out = {"photo": np.asarray(jax.device_get(fn(x, grade)["heatmap"]))}
    if enhanced is not None:
        out["enhanced"] = np.asarray(jax.device_get(fn(np.asarray(enhanced, np.float32), grade)["heatmap"]))
    return out


def padded_heatmaps(restored, images: list[np.ndarray], masks: list[np.ndarray], out: dict[str, np.ndarray],
                    batch_size: int) -> list[dict[str, np.ndarray]]:
    """`explain_batch` for up to batch_size processed photographs, padded to batch_size (one compilation).

    images: (S, S, 3) uint8 each; masks: (S, S) each; out: predict's model outputs for them (dr_probs,
    optional enhanced / enhance). Returns per photograph {'photo': heat, 'enhanced': heat when enhanced}.
    """
    n, pad = len(images), batch_size - len(images)
    mask = np.stack(masks + [np.zeros_like(masks[0])] * pad).astype(np.float32)
    x = np.stack(images + [np.zeros_like(images[0])] * pad).astype(np.float32) / 255.0 * mask[..., None]
    grade = np.concatenate([np.argmax(out["dr_probs"], -1), np.zeros(pad, int)]).astype(np.int32)
    enhanced = None
    if "enhanced" in out:
        enhanced = np.concatenate([out["enhanced"], np.zeros((pad, *out["enhanced"].shape[1:]), np.float32)])
    heat = explain_batch(restored, x, mask, grade, enhanced)
    enhanced_rows = out.get("enhance", np.zeros(n, bool))
    return [{k: v[i] for k, v in heat.items() if k == "photo" or enhanced_rows[i]} for i in range(n)]


def _uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)


class Outputs:
    """Writes the explanation PNGs and collects the report's cards for one predict run into ``out_dir``.

    explain: write heatmap overlays; report: write crops and, at `finish`, report.html.
    """

    def __init__(self, out_dir: str, *, explain: bool, report_html: bool, title: str = "Predictions",
                 subtitle: str = ""):
        self.out_dir, self.explain, self.report_html = out_dir, explain or report_html, report_html
        self.title, self.subtitle = title, subtitle
        self.cards: list[html_report.Card] = []
        for folder, wanted in ((EXPLAIN_DIR, self.explain), (CROPS_DIR, report_html)):
            if wanted:
                storage.makedirs(os.path.join(out_dir, folder))

    @property
    def needs_heatmaps(self) -> bool:
        return self.explain

    def _write_png(self, relative: str, image: np.ndarray) -> str:
        data = html_report.png_bytes(image)

        def dump(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        report.atomic_file(os.path.join(self.out_dir, relative), dump)
        return relative

    def add(self, path: str, stem: str, x: np.ndarray, mask: np.ndarray, enhanced: np.ndarray | None,
            enhanced_file: str, heat: dict[str, np.ndarray] | None, grade_probs, quality_probs) -> dict[str, str]:
        """One photograph: x (S, S, 3) float in [0, 1], mask (S, S), enhanced (S, S, 3) or None, the relative
        enhanced PNG written by predict ("" when none), heat `explain_batch` rows (or None without DR).

        Returns the relative paths written: 'heat_photo', 'heat_enhanced' (when made), 'crop'.
        """
        written: dict[str, str] = {}
        if heat is not None:
            written["heat_photo"] = self._write_png(os.path.join(EXPLAIN_DIR, f"{stem}.png"),
                                                    _uint8(gradcam.overlay(x, heat["photo"], mask)))
            if "enhanced" in heat and enhanced is not None:
                written["heat_enhanced"] = self._write_png(
                    os.path.join(EXPLAIN_DIR, f"{stem}-enhanced.png"),
                    _uint8(gradcam.overlay(enhanced, heat["enhanced"], mask)))
        if self.report_html:
            written["crop"] = self._write_png(os.path.join(CROPS_DIR, f"{stem}.png"), _uint8(x))
            images = [("photograph (cropped)", written["crop"])]
            if enhanced_file:
                images.append(("enhanced", enhanced_file))
            images += [(caption, written[key]) for key, caption in
                       (("heat_photo", "Grad-CAM on photograph"), ("heat_enhanced", "Grad-CAM on enhanced"))
                       if key in written]
            self.cards.append(html_report.Card(path, images, _list(grade_probs), _list(quality_probs)))
        return written

    def finish(self, skipped: list[tuple[str, str]]) -> str | None:
        """Write report.html (when asked); returns its path."""
        if not self.report_html:
            return None
        return html_report.write(os.path.join(self.out_dir, REPORT), self.cards, skipped, title=self.title,
                                 subtitle=self.subtitle)


def _list(values: Any) -> list[float] | None:
    return None if values is None else [float(v) for v in np.asarray(values)]
