"""results.md: the study's Markdown page, its tables drawn from `collect.collect_results`' numbers: first
the pre-declared comparisons (paired intervals and their verdicts), then "mean ± sample std" over seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cleaq_jax.programs.ablations.collect import CLASSIFICATION, ENHANCEMENT
from cleaq_jax.programs.ablations.plan import VARIANTS, VESSEL_DICE_GAIN, override_flags
from cleaq_jax.programs.ablations.statistics import SUBSETS


def format_mean_sd(s: Mapping[str, Any] | None, digits: int = 3) -> str:
    """"mean ± std" of a `statistics.mean_sd` ("mean" alone with one seed, "-" with none)."""
    if not s or s.get("mean") is None:
        return "-"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s.get("std") is not None else "") + (
        f" (n={s['n']})" if s.get("n_expected") and s["n"] != s["n_expected"] else "")


def variant_title(name: str, short: bool = False) -> str:
    """A table row's name: the paper's for a variant, and for "<variant>@stageN" that variant's own
    pre-training stage."""
    variant, _, stage = name.partition("@")
    if not stage:
        return VARIANTS[variant]
    return f"{VARIANTS[variant]} {stage}" if short else f"{VARIANTS[variant]}, its {stage} (pre-training)"


def rows_in_paper_order(block: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Rows in the paper's order, each joint variant followed by its own pre-training stages."""
    names = [n for v in VARIANTS for n in (f"{v}@stage1", f"{v}@stage2", v)]
    return [(n, block[n]) for n in names if n in block]


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _classification_table(block: Mapping[str, Any], subset: str = "all") -> list[str]:
    rows = [[variant_title(v), str(t[subset]["kappa"]["examples"])] + [format_mean_sd(t[subset][m])
                                                                       for m in CLASSIFICATION]
            for v, t in rows_in_paper_order(block) if subset in t]
    return _markdown_table(["method", "test images", "accuracy", "kappa", "precision", "F1"], rows)


def per_quality_table(results: Mapping[str, Any], metric: str) -> list[str]:
    """DR ``metric`` per quality level, one row per variant; for kappa, the paired differences below them."""
    dr = results["dr"]
    levels = [q for q in SUBSETS if any(q in t for t in dr.values())]
    rows = [[variant_title(v)] + [format_mean_sd(t.get(q, {}).get(metric)) for q in levels]
            for v, t in rows_in_paper_order(dr)]
    for name, diff in results.get("dr_kappa_differences", {}).items() if metric == "kappa" else []:
        a, b = name.split(" - ")
        rows.append([f"{variant_title(a)} − {variant_title(b)} (paired by seed)"]
                    + [format_mean_sd(diff.get(q)) for q in levels])
    examples = {q: next((t[q][metric]["examples"] for t in dr.values() if q in t), 0) for q in levels}
    return _markdown_table(["method"] + [f"{q} (n={examples[q]})" for q in levels], rows)


def _enhancement_table(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for v, t in rows_in_paper_order(results["enhancement"]):
        for q in [q for q in SUBSETS if q in t]:
            rows.append([variant_title(v), q, str(t[q]["psnr_input"]["examples"])] + [
                format_mean_sd(t[q][m], 2 if m.startswith("psnr") else 3) for m in ENHANCEMENT])
    return _markdown_table(["method", "subset", "test images", "PSNR input", "PSNR enhanced", "SSIM input",
                            "SSIM enhanced"], rows)


def _enhancement_difference_table(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, diff in results.get("enhancement_differences", {}).items():
        a, b = name.split(" - ")
        for q in [q for q in SUBSETS if diff["psnr_enhanced"].get(q, {}).get("n")]:
            rows.append([f"{variant_title(a)} − {variant_title(b)}", q, format_mean_sd(diff["psnr_enhanced"][q], 2),
                         format_mean_sd(diff["ssim_enhanced"][q])])
    return _markdown_table(["paired by seed", "subset", "PSNR enhanced (dB)", "SSIM enhanced"], rows) if rows else []


METRIC_NAMES = {"kappa": "DR kappa", "psnr_enhanced": "PSNR enhanced (dB)", "ssim_enhanced": "SSIM enhanced",
                VESSEL_DICE_GAIN: "vessel Dice, enhanced − input"}


def _interval(low: float | None, high: float | None, digits: int) -> str:
    return "-" if low is None else f"[{low:.{digits}f}, {high:.{digits}f}]"


def comparison_row(c: Mapping[str, Any]) -> list[str]:
    """One pre-declared comparison (a `collect.comparisons` entry) as a row: A − B (one method: its own
    within-run difference), metric, subset, seeds, mean difference, t and bootstrap intervals, smallest
    detectable difference, verdict ("-" with fewer than two seeds)."""
    digits = 2 if c["metric"].startswith("psnr") else 3
    fmt = lambda v: "-" if v is None else f"{v:.{digits}f}"  # noqa: E731
    verdict = "-" if c["detected"] is None else "detected" if c["detected"] else "not detected at this power"
    return [variant_title(c["a"]) + ("" if c["b"] is None else f" − {variant_title(c['b'])}"),
            METRIC_NAMES.get(c["metric"], c["metric"]), c["subset"],
            str(c["n"]) + ("" if c["n"] == c["n_expected"] else f" of {c['n_expected']}"), fmt(c["mean"]),
            _interval(c["t_low"], c["t_high"], digits), _interval(c["boot_low"], c["boot_high"], digits),
            fmt(c["smallest_detectable"]), verdict]


def comparisons_section(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    """The pre-declared comparisons: the rule, then one row per comparison (`comparison_row`); none when the
    study holds none. The confidence and power are those the intervals were computed with."""
    if not comparisons:
        return []
    confidence, power = comparisons[0]["confidence"], comparisons[0]["power"]
    c, p = f"{100 * confidence:g}%", f"{100 * power:g}%"
    rule = (f"Each row is a difference fixed in the study's plan before the runs (`plan.COMPARISONS`, "
            f"`plan.COMPARISON_METRICS`): A − B between the two methods' runs of the same seed. The rule: a "
            f"difference is detected when its paired t interval, mean ± t((1+c)/2, n−1)·sd/√n at c = {c}, excludes "
            f"0; the percentile bootstrap interval of the mean is reported beside it and does not enter the verdict. "
            f"The smallest detectable difference is the true mean difference this test detects with probability "
            f"{p} given the seeds' spread, (t((1+c)/2, n−1) + t({power:g}, n−1))·sd/√n: \"not detected at this "
            f"power\" rules out little below it, and is no evidence that there is no difference. Rows naming one "
            f"method are its own runs' vessel Dice of the enhancement minus that of IQE's input (paper Fig. 8).")
    header = ["A − B", "metric", "subset", "seeds (n)", "mean difference", f"t interval ({c})",
              f"bootstrap interval ({c})", "smallest detectable difference", "verdict"]
    return [f"## Pre-declared comparisons (paired by seed, {c} intervals)", "", rule, "",
            *_markdown_table(header, [comparison_row(x) for x in comparisons]), ""]


def _runs_table(results: Mapping[str, Any]) -> list[str]:
    rows = [[VARIANTS[r["variant"]], str(r["seed"]), r["stage"], r["status"],
             "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"] for r in results["runs"]]
    return _markdown_table(["method", "seed", "evaluated stage", "status", "wall time (s)"], rows)


def _study_section(study: Mapping[str, Any]) -> list[str]:
    counts = ", ".join(f"{split}: {info['num_records']} ({', '.join(f'{q} {n}' for q, n in info['quality'].items())})"
                       for split, info in study["data"].items())
    o, g = study["overrides"], study.get("generator")
    made = (f" Synthetic: {g['num']} images at {g['size']} px, generator seed {g['seed']}, lesion scale "
            f"{g.get('lesion_scale', 1.0):g}." if g else "")
    return [f"- Command: `{study['command']}`",
            f"- Data: `{study['data_dir']}`; {counts}. Evaluated on split `{study['eval_split']}`.{made}",
            f"- Preset `{study['preset']}`: {o.get('data.image_size', '?')} px, width {o.get('model.width', '?')}, "
            f"batch {o.get('batch_size', '?')}, {study['num_epochs']} epoch(s) per stage, seeds "
            f"{', '.join(map(str, study['seeds']))}.",
            f"- Overrides given to every run: `{' '.join(override_flags(o))}`",
            *(["- Shared pre-training: " + "; ".join(
                f"{variant_title(a)} starts stage 3 from {variant_title(b)}'s stage-1 and stage-2 checkpoints of "
                "the same seed" for a, b in study["shared_pretraining"]) + " (`--config.stage=stage3 "
               "--config.init.stage1=... --config.init.stage2=...`), so its pre-training rows are that run's."]
              if study.get("shared_pretraining") else []),
            f"- Machine: {study['machine']}; {study['jobs']} run(s) at a time; 1-min load average "
            f"{study['load_average'][0]:.1f} at the start, {study['load_average'][1]:.1f} at the end; "
            f"total wall time {study['wall_s']:.0f} s." + (
                f" Tables re-drawn from the runs' files by `{study['tabulated_by']}`." if study.get("tabulated_by") else ""),
            "- One run's exact command (every run's is in results.json):", "",
            f"      {study['example_command']}"]


def results_markdown(results: Mapping[str, Any]) -> str:
    """results.md: the study, the pre-declared comparisons, then Tables V, Fig. 12, IV and VI analogues (mean ±
    sample std over seeds)."""
    lines = ["# Ablation study (paper Tables IV-VI, Fig. 12)", "", *_study_section(results["study"]), "",
             *comparisons_section(results.get("comparisons", [])),
             "In the tables below, every number is the mean ± sample standard deviation over the seeds of that "
             "method's runs, read from each run's eval.json; n is given where fewer seeds finished.", ""]
    if results["dr"]:
        lines += ["## DR grading (Table V analogue)", "", *_classification_table(results["dr"]), "",
                  "## DR grading per quality level of the original image (Fig. 12 analogue)", "",
                  "Quadratic-weighted kappa:", "", *per_quality_table(results, "kappa"), "",
                  "Accuracy:", "", *per_quality_table(results, "accuracy"), ""]
    if results["enhancement"]:
        lines += ["## Enhancement (Table IV analogue): PSNR (dB) and SSIM against the reference, inside the mask",
                  "", "Input: IQE's input in the evaluation (fixed QT keys); reference: the record's clean image "
                  "wherever it stores one (good images through op2, usable and reject ones as they are), else the "
                  "original of good (op2) and usable (op1) images.", "",
                  *_enhancement_table(results), ""]
        if results.get("enhancement_differences"):
            lines += ["What the joint stage changes in each seed's enhancement (stage 3 minus the stage 1 it started "
                      "from):", "", *_enhancement_difference_table(results), ""]
    for task, title in (("iqa", "IQA on the raw image"), ("iqa_enhanced", "IQA on IQE's enhancement (joint models)")):
        if results[task]:
            lines += [f"## Quality assessment (Table VI analogue): {title}", "", *_classification_table(results[task]), ""]
    lines += ["## Runs", "", *_runs_table(results), ""]
    return "\n".join(lines)
