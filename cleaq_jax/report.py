"""Evaluation reports: eval.json, eval.md (the paper's tables for one run) and figures as PNG.

Plain host code over the dict `evaluate.summarise` returns; every file is written under a temporary
name and renamed, so a report is never half-written.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

QUALITY = ("good", "usable", "reject")


def _atomic(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _class_rows(block: dict[str, Any]) -> list[str]:
    rows = ["| subset | n | accuracy | kappa | precision | F1 |", "|---|---|---|---|---|---|"]
    subsets = [("all", block["overall"])] + list(block.get("per_quality", {}).items())
    for name, m in subsets:
        rows.append(f"| {name} | {m.get('n', 0)} | " + " | ".join(
            _fmt(m.get(k)) for k in ("accuracy", "kappa", "precision", "f1")) + " |")
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The run's tables as Markdown."""
    lines = [f"# Evaluation: {result.get('stage', '?')} on split {result.get('split', '?')}",
             "", f"{result.get('num_examples', 0)} examples from `{result.get('data_dir', '?')}`.", ""]
    if "dr" in result:
        lines += ["## DR grading (paper Tables II, V; per quality level as in Fig. 12)", ""]
        lines += _class_rows(result["dr"]) + [""]
    if "enhancement" in result:
        lines += ["## Enhancement (paper Tables III, IV): PSNR (dB) / SSIM inside the retinal mask", "",
                  "| subset | n | PSNR input | PSNR enhanced | SSIM input | SSIM enhanced |",
                  "|---|---|---|---|---|---|"]
        e = result["enhancement"]
        for name, m in [("all", e["overall"])] + list(e.get("per_quality", {}).items()):
            lines.append(f"| {name} | {m['n']} | {_fmt(m['psnr_input'], 2)} | {_fmt(m['psnr_enhanced'], 2)} | "
                         f"{_fmt(m['ssim_input'])} | {_fmt(m['ssim_enhanced'])} |")
        lines += ["", "Input = the QT-degraded original (op2 for good, op1 for usable images, fixed keys)."
                      " Reject images have no reference and are left out.", ""]
    if "iqa" in result:
        lines += ["## Quality assessment (paper Table VI)", ""] + _class_rows(result["iqa"]) + [""]
    return "\n".join(lines)


def write(result: dict[str, Any], out_dir: str, panels: np.ndarray | None = None) -> None:
    """eval.json, eval.md and the figures into out_dir (created)."""
    os.makedirs(out_dir, exist_ok=True)

    def dump_json(tmp):
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")

    def dump_md(tmp):
        with open(tmp, "w") as f:
            f.write(markdown(result))

    _atomic(os.path.join(out_dir, "eval.json"), dump_json)
    _atomic(os.path.join(out_dir, "eval.md"), dump_md)
    if "dr" in result or "iqa" in result:
        _atomic(os.path.join(out_dir, "confusion_matrix.png"), lambda t: confusion_figure(result, t))
        _atomic(os.path.join(out_dir, "per_quality.png"), lambda t: per_quality_figure(result, t))
    if panels is not None:
        _atomic(os.path.join(out_dir, "enhancement_grid.png"), lambda t: grid_figure(panels, t))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(result: dict[str, Any], path: str) -> None:
    """Confusion matrices (rows: truth, columns: prediction) of DR grading and IQA."""
    plt = _pyplot()
    tasks = [(t, title) for t, title in (("dr", "DR grade"), ("iqa", "Quality")) if t in result
             and "confusion_matrix" in result[t]["overall"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, (task, title) in zip(axes[0], tasks):
        cm = np.asarray(result[task]["overall"]["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        labels = list(QUALITY) if task == "iqa" else [str(i) for i in range(cm.shape[0])]
        ax.set(xticks=range(cm.shape[1]), yticks=range(cm.shape[0]), xticklabels=labels, yticklabels=labels,
               xlabel="predicted", ylabel="true", title=f"{title} (kappa {result[task]['overall']['kappa']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def per_quality_figure(result: dict[str, Any], path: str) -> None:
    """Accuracy and kappa per quality level (paper Fig. 12) for DR grading and IQA."""
    plt = _pyplot()
    tasks = [t for t in ("dr", "iqa") if t in result]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        per = result[task].get("per_quality", {})
        names = [q for q in QUALITY if q in per]
        x = np.arange(len(names))
        for k, (metric, off) in enumerate((("accuracy", -0.2), ("kappa", 0.2))):
            vals = [per[q].get(metric) or 0.0 for q in names]
            ax.bar(x + off, vals, width=0.4, label=metric)
        ax.set(xticks=x, xticklabels=names, ylim=(min(0.0, ax.get_ylim()[0]), 1.0),
               title=f"{'DR grading' if task == 'dr' else 'Quality assessment'} per quality level")
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def grid_figure(panels: np.ndarray, path: str) -> None:
    """Rows of degraded input | enhanced | reference | vessel mask."""
    plt = _pyplot()
    n = panels.shape[0]
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.1 * n), squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        ax.imshow(np.clip(panels[i], 0, 1), interpolation="nearest")
        ax.axis("off")
    axes[0, 0].set_title("QT-degraded input  |  enhanced  |  reference  |  vessel mask", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
