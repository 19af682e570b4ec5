"""Evaluation reports: eval.json, eval.md (the paper's tables for one run) and figures as PNG.

Plain host code over the dict `cleaq_jax.programs.evaluate.summarise` returns; every file is written
under a temporary name and renamed, so a report is never half-written.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from cleaq_jax.data.records import QUALITY_NAMES as QUALITY
from cleaq_jax.runtime import storage

TASK_TITLES = {"dr": "DR grading", "iqa": "Quality assessment (raw image)",
               "iqa_enhanced": "Quality assessment (enhanced image)"}
DR_INPUT = {"raw": "DR grades the images as they are (a stage-1 DR network was trained on them).",
            "enhanced": "DR grades IQE's enhancement of each image (inference is IQE then DR, paper III-B).",
            "gated": "DR grades IQE's enhancement of the images IQA does not rate good, and the good ones as "
                     "they are (config.eval.gate_quality)."}


atomic_file = storage.atomic_file  # the report's files appear whole, on local disk or in a bucket


def _fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _class_rows(block: dict[str, Any]) -> list[str]:
    rows = ["| subset | n | accuracy | kappa | precision | F1 |", "|---|---|---|---|---|---|"]
    subsets = [("all", block["overall"])] + list(block.get("per_quality", {}).items())
    for name, m in subsets:
        cells = [_fmt(m.get(k)) for k in ("accuracy", "kappa", "precision", "f1")]
        if m.get("n", 0) and m.get("kappa") is None:
            cells[1] = "undefined"  # a single true class in the subset: no agreement beyond chance to measure
        rows.append(f"| {name} | {m.get('n', 0)} | " + " | ".join(cells) + " |")
    return rows


def enhancement_footnote(overall: dict[str, Any]) -> str:
    """Which reference the enhancement table's rows were scored against, from its overall block."""
    n, clean = int(overall.get("n", 0)), int(overall.get("n_clean_reference", 0))
    own = ("the reference is the original itself, of op2(good) and op1(usable) images (fixed QT keys); "
           "reject images have no reference and are left out")
    theirs = ("the reference is the record's clean image (before QT): good images enter through op2 "
              "(fixed QT keys), usable and reject images as they are")
    if clean == 0:
        return f"Reference: {own}."
    if clean == n:
        return f"Reference: {theirs}."
    return f"Reference: for {clean} of {n} images {theirs}; for the other {n - clean} {own}."


def markdown(result: dict[str, Any]) -> str:
    """The run's tables as Markdown (the `programs.evaluate.summarise` dict with stage, split, data_dir, nets)."""
    lines = [f"# Evaluation: {result.get('stage', '?')} on split {result.get('split', '?')}",
             "", f"{result.get('num_examples', 0)} examples from `{result.get('data_dir', '?')}`; "
                 f"subnetworks: {', '.join(result.get('nets', [])) or '?'}.", ""]
    if "dr" in result:
        lines += ["## DR grading (paper Tables II, V; per quality level as in Fig. 12)", "",
                  DR_INPUT.get(result.get("dr_input"), ""), ""]
        lines += _class_rows(result["dr"]) + [""]
    if "enhancement" in result:
        lines += ["## Enhancement (paper Tables III, IV): PSNR (dB) / SSIM inside the retinal mask", "",
                  "| subset | n | PSNR input | PSNR enhanced | SSIM input | SSIM enhanced |",
                  "|---|---|---|---|---|---|"]
        e = result["enhancement"]
        for name, m in [("all", e["overall"])] + list(e.get("per_quality", {}).items()):
            lines.append(f"| {name} | {m['n']} | {_fmt(m['psnr_input'], 2)} | {_fmt(m['psnr_enhanced'], 2)} | "
                         f"{_fmt(m['ssim_input'])} | {_fmt(m['ssim_enhanced'])} |")
        lines += ["", enhancement_footnote(e["overall"]), ""]
    if "iqa" in result:
        lines += ["## Quality assessment (paper Table VI): IQA on the raw image", ""] + _class_rows(result["iqa"]) + [""]
    if "iqa_enhanced" in result:
        lines += ["## Quality assessment of IQE's output (the joint model's own input to IQA)", "",
                  "Labelled with the quality of the original, as in training (why the joint model's "
                  "IQA accuracy falls, paper Table VI).", ""] + _class_rows(result["iqa_enhanced"]) + [""]
    if "vessels" in result:
        lines += vessel_markdown(result["vessels"])
    elif result.get("vessels_skipped"):
        lines += ["## Downstream vessel segmentation (paper Fig. 8)", "",
                  f"Not scored: {result['vessels_skipped']}.", ""]
    return "\n".join(lines)


def console_summary(result: dict[str, Any], out_dir: str) -> str:
    """The evaluation as the terminal shows it: `markdown`'s tables without their explanations, the
    vessel table's overall rows only, and where the full report is."""
    full = markdown(result).split("\n")
    keep, section = [], ""
    for line in full:
        if line.startswith("#"):
            section = line
            keep.append(line.lstrip("# ").strip() if line.startswith("## ") else line)
        elif line.startswith("|"):
            vessel_detail = section.startswith("## Downstream") and not line.startswith(("| all ", "| subset", "|---"))
            if not vessel_detail:
                keep.append(line)
    return "\n".join(keep + [f"(explanations, every vessel row and the figures: {os.path.join(out_dir, 'eval.md')})"])


VESSEL_INPUTS = {"input": "the degraded input of the enhancement table",
                 "enhanced": "IQE's enhancement of it",
                 "reference": "its reference (the clean image where the record has one, else the original)",
                 "Seg-IQE": "the degraded input segmented by IQE's own Seg-IQE branch (probability > 0.5), not by the segmenter"}


def vessel_markdown(block: dict[str, Any]) -> list[str]:
    """Lines of the downstream vessel segmentation section (paper Fig. 8) from ``result['vessels']``:
    {'segmenter': str, 'note': str, 'overall' / 'per_quality'[level]: {input kind: {n, dice, auc, accuracy}}}."""
    lines = ["## Downstream vessel segmentation (paper Fig. 8): Dice, AUC, accuracy inside the field of view", "",
             f"Segmenter: {block.get('segmenter', '?')}. Scored against the true vessels; means over images.",
             "", "| subset | image segmented | n | Dice | AUC | accuracy |", "|---|---|---|---|---|---|"]
    for name, per_input in [("all", block.get("overall", {}))] + list(block.get("per_quality", {}).items()):
        for kind, m in per_input.items():
            lines.append(f"| {name} | {kind} | {m.get('n', 0)} | " + " | ".join(
                _fmt(m.get(k)) for k in ("dice", "auc", "accuracy")) + " |")
    kinds = "; ".join(f"{k}: {v}" for k, v in VESSEL_INPUTS.items())
    lines += ["", f"Images: {kinds}. {block.get('note', '')}".rstrip(), ""]
    return lines


def write(result: dict[str, Any], out_dir: str, panels: np.ndarray | None = None, *,
          vessel_panels: np.ndarray | None = None, gradcam: dict[str, np.ndarray] | None = None) -> None:
    """eval.json, eval.md and the figures into out_dir (created).

    panels: enhancement grid rows (`grid_figure`); vessel_panels: downstream vessel rows
    (`vessel_figure`, drawn with result['vessels']); gradcam: the Grad-CAM grid (`gradcam_figure`).
    """
    storage.makedirs(out_dir)

    def dump_json(tmp):
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")

    def dump_md(tmp):
        with open(tmp, "w") as f:
            f.write(markdown(result))

    atomic_file(os.path.join(out_dir, "eval.json"), dump_json)
    atomic_file(os.path.join(out_dir, "eval.md"), dump_md)
    if "dr" in result or "iqa" in result:
        atomic_file(os.path.join(out_dir, "confusion_matrix.png"), lambda t: confusion_figure(result, t))
    if any(k in result for k in ("dr", "iqa", "enhancement")):
        atomic_file(os.path.join(out_dir, "per_quality.png"), lambda t: per_quality_figure(result, t))
    if panels is not None:
        atomic_file(os.path.join(out_dir, "enhancement_grid.png"), lambda t: grid_figure(panels, t))
    if "vessels" in result:
        atomic_file(os.path.join(out_dir, "vessels.png"), lambda t: vessel_figure(result["vessels"], vessel_panels, t))
    if gradcam is not None:
        atomic_file(os.path.join(out_dir, "gradcam_grid.png"), lambda t: gradcam_figure(gradcam, t))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib  # heavy: imported only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend, as matplotlib requires

    return plt


def confusion_figure(result: dict[str, Any], path: str) -> None:
    """Confusion matrices (rows: truth, columns: prediction; counts, coloured by share of the row) of DR
    grading and IQA, as in paper Fig. 11."""
    plt = pyplot()
    tasks = [t for t in ("dr", "iqa", "iqa_enhanced") if "confusion_matrix" in result.get(t, {}).get("overall", {})]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.9), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cm = np.asarray(result[task]["overall"]["confusion_matrix"])
        share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # rare grades stay readable
        ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
        labels = list(QUALITY) if task.startswith("iqa") else [str(i) for i in range(cm.shape[0])]
        ax.set(xticks=range(cm.shape[1]), yticks=range(cm.shape[0]), xticklabels=labels, yticklabels=labels,
               xlabel="predicted", ylabel="true")
        ax.set_title(f"{TASK_TITLES[task]}\nkappa {_fmt(result[task]['overall'].get('kappa'), 3)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _bars(ax, per: dict[str, Any], metrics: tuple[str, ...], title: str, ylim: tuple[float, float]) -> None:
    """Grouped bars of ``metrics`` per quality level; an undefined value is marked n/a, not drawn as 0."""
    names = [q for q in QUALITY if q in per]
    x = np.arange(len(names))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        offset = (k - (len(metrics) - 1) / 2) * width
        values = [per[q].get(metric) for q in names]
        ax.bar(x + offset, [0.0 if v is None else v for v in values], width=width, label=metric.replace("_", " "))
        for xi, v in zip(x, values):
            if v is None:
                ax.text(xi + offset, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(x, [f"{q}\n(n={per[q].get('n', 0)})" for q in names])
    drawn = [per[q].get(m) for q in names for m in metrics if per[q].get(m) is not None]
    ax.set_ylim(min([ylim[0]] + [v - 0.05 for v in drawn]), ylim[1] + 0.15)  # room for a negative kappa, the legend
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", ncol=len(metrics), fontsize=8, frameon=False)


def per_quality_figure(result: dict[str, Any], path: str) -> None:
    """Per quality level of the original image (paper Fig. 12): accuracy and kappa of DR grading, IQA's
    accuracy (the recall of that level), and SSIM of the QT-degraded input and of its enhancement."""
    plt = pyplot()
    panels = [("dr", ("accuracy", "kappa"), TASK_TITLES["dr"], (0.0, 1.0))] if "dr" in result else []
    if "iqa" in result:
        # Within one quality level the true class is constant: kappa says nothing, accuracy is its recall.
        panels.append(("iqa", ("accuracy",), TASK_TITLES["iqa"], (0.0, 1.0)))
    if "enhancement" in result:
        panels.append(("enhancement", ("ssim_input", "ssim_enhanced"), "Enhancement: SSIM vs reference", (0.0, 1.0)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.5), squeeze=False)
    for ax, (task, metrics, title, ylim) in zip(axes[0], panels):
        _bars(ax, result[task].get("per_quality", {}), metrics, title + " per quality level", ylim)
        ax.axhline(0.0, color="black", linewidth=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def grid_figure(panels: np.ndarray, path: str) -> None:
    """Rows of input | enhanced | reference | vessel mask; panels (n, H, 4W, 3) in [0, 1]."""
    plt = pyplot()
    n = panels.shape[0]
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.1 * n), squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        ax.imshow(np.clip(panels[i], 0, 1), interpolation="nearest")
        ax.axis("off")
    axes[0, 0].set_title("input  |  enhanced  |  reference  |  vessel mask", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


VESSEL_COLUMNS = ("degraded input", "its vessels", "Seg-IQE's map", "enhanced", "its vessels", "reference",
                  "its vessels", "true vessels")


def vessel_rows(images: dict[str, np.ndarray], segmented: dict[str, np.ndarray], truth: np.ndarray) -> np.ndarray:
    """Panels for `vessel_figure` (`VESSEL_COLUMNS`): each row the degraded input, its segmentation and
    Seg-IQE's map of it, the enhancement and the reference each followed by its segmentation, then the
    true vessels.

    images: {'input', 'enhanced', 'reference'} (n, H, W, 3) float in [0, 1] (a missing one is drawn black);
    segmented: the same keys and 'Seg-IQE', (n, H, W) binary (a missing one is drawn black); truth: (n, H, W)
    binary. Returns (n, H, 8W, 3) float32.
    """
    n, h, w = truth.shape
    black = np.zeros((n, h, w, 3), np.float32)
    grey = lambda m: np.repeat(np.asarray(m, np.float32)[..., None], 3, axis=-1)  # noqa: E731
    parts = []
    segmentation = lambda kind: grey(segmented[kind]) if kind in segmented else black  # noqa: E731
    for kind in ("input", "enhanced", "reference"):
        parts += [np.asarray(images.get(kind, black), np.float32), segmentation(kind)]
        if kind == "input":
            parts.append(segmentation("Seg-IQE"))
    return np.concatenate(parts + [grey(truth)], axis=2)


def vessel_figure(block: dict[str, Any], rows: np.ndarray | None, path: str) -> None:
    """Paper Fig. 8's analogue: example rows (`vessel_rows`, optional; labelled by block['figure_rows'], the
    quality level of each) above Dice per quality level of the segmentation of the degraded input, its
    enhancement and the reference."""
    plt = pyplot()
    n = 0 if rows is None else rows.shape[0]
    fig = plt.figure(figsize=(10, 1.5 * n + 3.2))
    grid = fig.add_gridspec(n + 1, 1, height_ratios=[1.0] * n + [2.2])
    for i in range(n):
        ax = fig.add_subplot(grid[i])
        ax.imshow(np.clip(rows[i], 0, 1), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        if i < len(block.get("figure_rows", ())):
            ax.set_ylabel(block["figure_rows"][i], fontsize=8)
        if i == 0:
            ax.set_title("  |  ".join(VESSEL_COLUMNS), fontsize=8)
    per = {q: {"n": block["per_quality"][q].get("input", {}).get("n", 0),
               **{f"dice_{k}": v.get("dice") for k, v in block["per_quality"][q].items()}}
           for q in block.get("per_quality", {})}
    metrics = tuple(f"dice_{k}" for k in VESSEL_INPUTS if any(f"dice_{k}" in p for p in per.values()))
    ax = fig.add_subplot(grid[n])
    _bars(ax, per, metrics, f"Vessel Dice ({block.get('segmenter', '?')})", (0.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def gradcam_figure(grid: dict[str, Any], path: str) -> None:
    """Paper Fig. 9's analogue: per row a test image, its enhancement, and Grad-CAM of the DR grader on each.

    grid: 'input', 'enhanced', 'heat_input', 'heat_enhanced' (n, H, W, 3) float in [0, 1] (heat as
    overlays); 'grade' (n,) true grades; 'pred_input', 'pred_enhanced' (n,) predicted grades; optional
    'quality' (n,) level index.
    """
    plt = pyplot()
    n = len(grid["grade"])
    columns = (("input", "photograph"), ("enhanced", "enhanced"), ("heat_input", "Grad-CAM on photograph"),
               ("heat_enhanced", "Grad-CAM on enhanced"))
    fig, axes = plt.subplots(n, 4, figsize=(7.2, 1.9 * n), squeeze=False)
    for i in range(n):
        quality = grid.get("quality")
        label = f"grade {int(grid['grade'][i])}" + (f", {QUALITY[int(quality[i])]}" if quality is not None else "")
        for j, (key, title) in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(np.clip(grid[key][i], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if key.startswith("heat"):
                pred = int(grid["pred_" + key.removeprefix("heat_")][i])
                ax.set_xlabel(f"graded {pred}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
