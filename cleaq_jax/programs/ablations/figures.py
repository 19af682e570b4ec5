"""The study's figures: DR kappa per quality level for every variant (paper Fig. 12), and a trained IQE's
enhancement of the first test images of each quality level."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from cleaq_jax.data import pipeline, records
from cleaq_jax.evaluation import inference, metrics, report, restore
from cleaq_jax.programs.ablations.statistics import SUBSETS
from cleaq_jax.programs.ablations.tables import rows_in_paper_order, variant_title
from cleaq_jax.runtime.storage import atomic_file
from cleaq_jax.training import stages


def per_quality_kappa_figure(results: Mapping[str, Any], path: str) -> None:
    """Grouped bars: DR kappa per quality level (and all) for each variant with DR grading; error bars are
    the sample std over seeds, dots the individual seeds (paper Fig. 12)."""
    plt = report.pyplot()
    dr = rows_in_paper_order(results["dr"])
    levels = [q for q in SUBSETS if any(q in t for _, t in dr)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.75 * len(levels) * len(dr)), 3.8))
    width = 0.8 / max(1, len(dr))
    for k, (v, t) in enumerate(dr):
        x = np.arange(len(levels)) + (k - (len(dr) - 1) / 2) * width
        s = [t.get(q, {}).get("kappa", {}) for q in levels]
        means = [np.nan if si.get("mean") is None else si["mean"] for si in s]
        errs = [0.0 if si.get("std") is None else si["std"] for si in s]
        ax.bar(x, np.nan_to_num(means), width, yerr=errs, capsize=3, label=variant_title(v, short=True), alpha=0.85)
        for xi, si in zip(x, s):
            ax.plot([xi] * len(si.get("values", [])), si.get("values", []), "k.", markersize=3)
    examples = [next((t[q]["kappa"]["examples"] for _, t in dr if q in t), 0) for q in levels]
    ax.set_xticks(np.arange(len(levels)), [f"{q}\n(n={n})" for q, n in zip(levels, examples)])
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_ylabel("quadratic-weighted kappa")
    ax.set_title("DR grading per quality level of the original image\n(bars: mean ± std over seeds; dots: "
                 "single seeds)", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _examples_by_quality(cfg: ml_collections.ConfigDict, per_quality: int) -> dict[str, np.ndarray]:
    """The first ``per_quality`` test images of each quality level (host arrays)."""
    loader = pipeline.eval_loader(cfg.data.dir, cfg.data.eval_split, global_batch_size=int(cfg.eval_batch_size),
                                  reading=pipeline.RecordReading(image_size=int(cfg.data.image_size),
                                                                 process_index=0, process_count=1))
    picked: dict[int, list[dict[str, np.ndarray]]] = {q: [] for q in range(len(records.QUALITY_NAMES))}
    for batch in loader:
        for i in np.flatnonzero(batch["valid"]):
            q = int(batch["quality"][i])
            if q in picked and len(picked[q]) < per_quality:
                picked[q].append({k: v[i] for k, v in batch.items()})
        if all(len(p) == per_quality for p in picked.values()):
            break
    rows = [row for q in sorted(picked) for row in picked[q]]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def enhancement_examples_figure(stage_dir: str, path: str, per_quality: int = 2) -> None:
    """Rows of low-quality input | enhanced | reference from a trained IQE (a stage directory), for the
    first test images of each quality level. Good and usable inputs are QT-degraded (op2 / op1, the
    evaluation's fixed keys); reject images pass unchanged, scored against the record's clean image when it
    stores one, else shown without a reference."""
    restored = restore.load_checkpoint(stage_dir)
    batch = _examples_by_quality(restored.config, per_quality)
    panels = inference.enhancement_panels(stages.qt_params(restored.config), restored.state, restored.models, batch)
    size = panels.shape[1]
    plt = report.pyplot()
    fig, axes = plt.subplots(len(panels), 3, figsize=(6.3, 2.2 * len(panels)), squeeze=False)
    mask = batch["mask"].astype(np.float32)
    clean = np.asarray(inference.has_reference(batch))
    for i, row in enumerate(panels):
        low, enhanced, ref = (row[:, j * size:(j + 1) * size] for j in range(3))
        quality = records.QUALITY_NAMES[int(batch["quality"][i])]
        if quality == "reject" and not clean[i]:
            # QT leaves it as it is and the record stores no clean image: there is no reference
            titles = ("reject: input", "enhanced", "(no reference: the input)")
        else:
            titles = (f"{quality}, QT-degraded: {float(metrics.psnr(low, ref, mask[i])):.1f} dB",
                      f"enhanced: {float(metrics.psnr(enhanced, ref, mask[i])):.1f} dB", "reference")
        for ax, image, title in zip(axes[i], (low, enhanced, ref), titles):
            ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    where = os.path.join(*os.path.normpath(stage_dir).split(os.sep)[-3:])
    fig.suptitle(f"IQE of {where} (PSNR against the reference, inside the mask)", fontsize=8)
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
