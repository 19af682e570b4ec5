"""The ablation study of the paper (Tables IV, V, VI and Fig. 12): every variant x seed on one shard set.

    python -m cleaq_jax.programs.ablations --data DIR --workdir DIR --seeds 3 [--size S]
        [--variants dr_only,cleaq_dr,...] [--preset tiny|bench|full] [--build-synthetic N]
        [--jobs J] [--tabulate-only] [--config.KEY=VALUE ...]

Each variant is a config in configs/ablations/ (which subnetworks train); the preset
(configs/ablations/presets.py) sets sizes and schedule; ``--config.KEY=VALUE`` flags override both.
Run ``<variant>, seed k`` is ``python -m cleaq_jax.main --config=configs/ablations/<variant>.py
--workdir=<workdir>/<variant>/seed<k> --config.seed=k --config.data.dir=<data> ...`` in a subprocess:
each run starts with clean memory and JAX state, a crash stops only that run, its exact command is
recorded, and its log lands in ``<run>/train.log``. Runs share XLA's persistent compilation cache
(``<workdir>/.jax_cache`` unless JAX_COMPILATION_CACHE_DIR is set), so later seeds skip compilation.

A run is finished when its final stage wrote ``eval/eval.json`` (stage 3 for the joint variants,
stage 1 for dr_only / iqe_only / iqe_no_seg, stage 2 for iqa_*); finished runs are skipped, so the
study resumes where it stopped (an unfinished run resumes from its own checkpoints). The study then
tabulates every finished run's eval.json into ``results.json``, ``results.md``,
``per_quality_kappa.png`` and ``enhancement_examples.png`` in the workdir: mean and sample standard
deviation over seeds, nothing else. Shards from data_prep (EyeQ, Messidor) work unchanged: pass
``--config.data.num_grades=4`` for Messidor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from cleaq_jax.data import location, pipeline, records
from cleaq_jax.evaluation import inference, metrics, report, restore
from cleaq_jax.evaluation.report import atomic_file
from cleaq_jax.training import stages
from configs.ablations import presets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join("configs", "ablations")
# The paper's names for the variants, in the order the tables list them.
VARIANTS = {"dr_only": "DR grading", "iqe_only": "IQE", "iqe_no_seg": "IQE w/o Seg-IQE", "iqa_only": "IQA",
            "iqa_no_lqi": "IQA w/o LQI-IQA", "cleaq": "CLEAQ", "cleq_dr": "CLEQ-DR", "cleaq_dr": "CLEAQ-DR",
            "cleaq_dr_to_good": "CLEAQ-DR to_good", "dr_only_x2": "DR grading, 2x epochs"}
# Variants trained for a multiple of the study's epochs (num_epochs and optim.constant_epochs): DR alone as long
# as a joint variant's DR trains in stages 1 and 3 together, so that "joint beats DR alone" is not "more epochs".
EPOCHS_FACTOR = {"dr_only_x2": 2}
# Joint variants whose stage 3 starts from another variant's stage-1 and stage-2 checkpoints of the same
# seed when both are in the study (unless --separate-pretraining): their stages 1 and 2 would train the same
# networks alone on the same data again, and sharing them pairs the comparison of what stage 3 adds.
SHARED_PRETRAINING = {"cleaq": "cleaq_dr", "cleq_dr": "cleaq_dr", "cleaq_dr_to_good": "cleaq_dr"}
# Paired DR-kappa differences the claim is about (besides each variant against DR alone and its own stage 1).
PAIRS = (("cleaq_dr", "cleq_dr"), ("cleaq_dr_to_good", "cleq_dr"), ("cleaq_dr_to_good", "cleaq_dr"))
CLASSIFICATION = ("accuracy", "kappa", "precision", "f1")
ENHANCEMENT = ("psnr_input", "psnr_enhanced", "ssim_input", "ssim_enhanced")
SUBSETS = ("all",) + records.QUALITY_NAMES
BASELINE = "dr_only"
# Further baselines every variant is paired with when they are in the study.
BASELINES = (BASELINE, "dr_only_x2")


# --------------------------------------------------------------------------- configs and commands
def config_path(variant: str) -> str:
    """configs/ablations/<variant>.py, relative to the repository root (raises ValueError if unknown)."""
    path = os.path.join(CONFIG_DIR, f"{variant}.py")
    if variant not in VARIANTS or not os.path.exists(os.path.join(ROOT, path)):
        raise ValueError(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)} (configs in {CONFIG_DIR}/)")
    return path


def preset(name: str) -> dict[str, Any]:
    """configs/ablations/presets.py's entry: {"overrides": {key: value}, "data": {"num", "size"}}."""
    if name not in presets.PRESETS:
        raise ValueError(f"--preset {name!r} is not one of {', '.join(presets.PRESETS)} (configs/ablations/presets.py)")
    return presets.PRESETS[name]


def flag_value(value: Any) -> str:
    """A config value as ml_collections' command-line parser reads it (tuples as "(1,1,1,1)")."""
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """["--config.a.b=1", ...] -> {"a.b": "1"}; anything else is an error naming the argument."""
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not key.startswith("--config.") or not sep or key == "--config.":
            raise ValueError(f"unexpected argument {arg!r}: config overrides are written --config.KEY=VALUE")
        out[key[len("--config."):]] = value
    return out


def override_flags(overrides: Mapping[str, str]) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def load_config(path: str, overrides: Mapping[str, str]) -> ml_collections.ConfigDict:
    """The config file at ``path`` (relative to the repository root) with overrides applied exactly as
    ``cleaq_jax.main`` applies them; a bad key or value raises naming it."""
    argv = ["ablations", f"--config={os.path.join(ROOT, path)}", *override_flags(overrides)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    try:
        values(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        raise ValueError(f"{path}: a --config override does not apply ({e}); keys are listed in "
                         "configs/default.py") from e
    return values.config


def final_stage(cfg: ml_collections.ConfigDict) -> str:
    """The last stage a variant's pipeline trains; its eval/eval.json holds the variant's results."""
    return stages.pipeline_stages(cfg)[-1]


# --------------------------------------------------------------------------- plan and run
def _longer(cfg: ml_collections.ConfigDict, factor: int) -> dict[str, str]:
    """The overrides that train ``factor`` times the config's epochs (the constant-rate part as well)."""
    if factor == 1:
        return {}
    return {"num_epochs": str(int(cfg.num_epochs) * factor),
            "optim.constant_epochs": str(int(cfg.optim.constant_epochs) * factor)}


def plan_runs(workdir: str, variants: Sequence[str], seeds: Sequence[int],
              overrides: Mapping[str, str], share_pretraining: bool = True) -> list[dict[str, Any]]:
    """One entry per variant x seed (seed-major, so later seeds reuse the first seed's compilations):
    variant, seed, dir, stage (the evaluated one), command (argv, run from the repository root), and
    pretrained: the variant whose run directory holds this run's stage-1/2 checkpoints and evaluations
    (itself, or its `SHARED_PRETRAINING` base, whose run is then listed first and is this one's ``after``)."""
    configs = {v: load_config(config_path(v), overrides) for v in variants}
    stages = {v: final_stage(c) for v, c in configs.items()}
    base = {v: SHARED_PRETRAINING[v] if share_pretraining and SHARED_PRETRAINING.get(v) in variants
            and stages[v] == "stage3" else v for v in variants}
    ordered = sorted(variants, key=lambda v: (variants.index(base[v]), v != base[v]))
    runs = []
    for seed in seeds:
        for v in ordered:
            run_dir = os.path.join(workdir, v, f"seed{seed}")
            run = {"variant": v, "seed": seed, "dir": run_dir, "stage": stages[v], "pretrained": base[v]}
            start = _longer(configs[v], EPOCHS_FACTOR.get(v, 1))
            if base[v] != v:
                run["after"] = source = os.path.join(workdir, base[v], f"seed{seed}")
                start = {**start, "stage": "stage3", "init.stage1": os.path.join(source, "stage1"),
                         "init.stage2": os.path.join(source, "stage2")}
            run["command"] = [sys.executable, "-m", "cleaq_jax.main", f"--config={config_path(v)}",
                              f"--workdir={run_dir}", *override_flags({**overrides, **start, "seed": str(seed)})]
            runs.append(run)
    return runs


def eval_json(run: Mapping[str, Any]) -> str:
    return os.path.join(run["dir"], run["stage"], "eval", "eval.json")


def run_record(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's run.json (command, wall time, status), or None before its first start."""
    path = os.path.join(run["dir"], "run.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def shown(command: Sequence[str]) -> str:
    """A run's command as a user types it (``python -m cleaq_jax.main ...``, from the repository root)."""
    return shlex.join(["python", *command[1:]])


def check_same_settings(run: Mapping[str, Any]) -> None:
    """Refuse to resume or reuse a run directory that was made with another command."""
    record = run_record(run)
    # Flags in another order (a preset's keys reordered) are the same settings.
    if record is not None and sorted(record["command"][1:]) != sorted(run["command"][1:]):
        raise ValueError(
            f"{run['dir']} was run with other settings:\n  {shown(record['command'])}\nnot\n  "
            f"{shown(run['command'])}\nUse another --workdir, or delete that run directory to redo it.")


def _write_json(path: str, obj: Any) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_file(path, dump)


def _environment(workdir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, ".jax_cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH", "")]))
    return env


def _start(run: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    os.makedirs(run["dir"], exist_ok=True)
    log = open(os.path.join(run["dir"], "train.log"), "ab")
    print(f"[ablations] start {run['variant']} seed {run['seed']}: {shown(run['command'])}", flush=True)
    started = time.time()
    _write_json(os.path.join(run["dir"], "run.json"),
                {"command": run["command"], "status": "running", "started": started})
    proc = subprocess.Popen(run["command"], cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
    return {"run": run, "proc": proc, "log": log, "started": started, "load_start": os.getloadavg()[0]}


def _finish(job: dict[str, Any]) -> dict[str, Any]:
    job["log"].close()
    run, rc = job["run"], job["proc"].returncode
    wall = time.time() - job["started"]
    status = "finished" if rc == 0 and os.path.exists(eval_json(run)) else "failed"
    record = {"command": run["command"], "status": status, "returncode": rc, "started": job["started"],
              "wall_s": round(wall, 1), "load_average_1min": [round(job["load_start"], 2),
                                                               round(os.getloadavg()[0], 2)]}
    _write_json(os.path.join(run["dir"], "run.json"), record)
    print(f"[ablations] {status} {run['variant']} seed {run['seed']} in {wall:.0f} s"
          + ("" if status == "finished" else f" (exit {rc}); log: {os.path.join(run['dir'], 'train.log')}"),
          flush=True)
    return record


def execute(runs: Sequence[dict[str, Any]], workdir: str, jobs: int = 1) -> list[dict[str, Any]]:
    """Run every unfinished run (at most ``jobs`` at once; a run with an ``after`` waits for that run and is
    not started when it failed); returns the runs that failed or could not start."""
    todo = []
    for run in runs:
        if os.path.exists(eval_json(run)):
            print(f"[ablations] skip {run['variant']} seed {run['seed']}: {eval_json(run)} exists", flush=True)
        else:
            todo.append(run)
    pending = {r["dir"] for r in todo}
    env, active, failed = _environment(workdir), [], []
    while todo or active:
        for run in [r for r in todo if r.get("after") in {f["dir"] for f in failed}]:
            todo.remove(run)
            failed.append(run)
            print(f"[ablations] not run {run['variant']} seed {run['seed']}: it starts from {run['after']}, "
                  "which failed", flush=True)
        ready = [r for r in todo if r.get("after") not in pending]
        while ready and len(active) < max(1, jobs):
            run = ready.pop(0)
            todo.remove(run)
            active.append(_start(run, env))
        time.sleep(0.2)
        for job in [j for j in active if j["proc"].poll() is not None]:
            active.remove(job)
            pending.discard(job["run"]["dir"])
            if _finish(job)["status"] != "finished":
                failed.append(job["run"])
    return failed


# --------------------------------------------------------------------------- tabulate
def stat(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; None with one value) of the defined values; n counts
    them, n_expected counts every value given (undefined ones, e.g. kappa of one class, are left out)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return {"mean": None, "std": None, "n": 0, "n_expected": len(values), "values": []}
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else None
    return {"mean": float(np.mean(kept)), "std": std, "n": len(kept), "n_expected": len(values), "values": kept}


def _subset(block: Mapping[str, Any], subset: str) -> Mapping[str, Any]:
    return block.get("overall", {}) if subset == "all" else block.get("per_quality", {}).get(subset, {})


def aggregate(evals: Sequence[Mapping[str, Any] | None], task: str, metrics: Sequence[str]) -> dict[str, Any] | None:
    """{subset: {metric: stat}} over one variant's runs (eval.json dicts, None for a run not finished)
    for one task ("dr", "iqa", "iqa_enhanced", "enhancement"); subsets are "all" and the quality levels.
    None when no run evaluated the task. "examples" is the subset's number of test images."""
    if not any(e and task in e for e in evals):
        return None
    blocks = [(e or {}).get(task, {}) for e in evals]
    first = next(b for b in blocks if b)
    return {s: {m: {**stat([_subset(b, s).get(m) for b in blocks]), "examples": _subset(first, s).get("n", 0)}
                for m in metrics} for s in SUBSETS if any(_subset(b, s) for b in blocks)}


def paired_difference(evals_by_seed: Mapping[str, Mapping[int, Mapping[str, Any] | None]], variant: str,
                      baseline: str = BASELINE, metric: str = "kappa", task: str = "dr") -> dict[str, Any]:
    """Per subset: stat of (variant - baseline) ``metric`` of ``task`` (DR grading by default), paired by seed."""
    out = {}
    for subset in SUBSETS:
        diffs = []
        for seed, e in evals_by_seed.get(variant, {}).items():
            base = evals_by_seed.get(baseline, {}).get(seed)
            a = _subset(e.get(task, {}), subset).get(metric) if e else None
            b = _subset(base.get(task, {}), subset).get(metric) if base else None
            diffs.append(None if a is None or b is None else a - b)
        out[subset] = stat(diffs)
    return out


def title(name: str, short: bool = False) -> str:
    """A table row's name: the paper's for a variant, and for "<variant>@stageN" that variant's own
    pre-training stage."""
    variant, _, stage = name.partition("@")
    if not stage:
        return VARIANTS[variant]
    return f"{VARIANTS[variant]} {stage}" if short else f"{VARIANTS[variant]}, its {stage} (pre-training)"


def _earlier_stages(run: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(row name, eval.json) of a joint run's pre-training stages: stage 1 trains IQE and DR alone and
    stage 2 IQA alone, the models stage 3 starts from (the cleanest baseline for what joint training adds).
    A run that shares its base's pre-training reads (and names) the base's rows."""
    if run["stage"] != "stage3":
        return []
    source = run.get("after", run["dir"])
    return [(f"{run.get('pretrained', run['variant'])}@{s}", os.path.join(source, s, "eval", "eval.json"))
            for s in ("stage1", "stage2")]


def tabulate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every table of the study from the finished runs' eval.json files (and their run.json). Rows named
    "<variant>@stageN" hold a joint variant's own pre-trained subnetworks, read from its earlier stages."""
    evals: dict[str, dict[int, dict[str, Any] | None]] = {}
    listed = []
    for run in runs:
        record = run_record(run) or {}
        done = os.path.exists(eval_json(run))
        for name, path in [(run["variant"], eval_json(run))] + _earlier_stages(run):
            if done or run["seed"] not in evals.get(name, {}):
                evals.setdefault(name, {})[run["seed"]] = _read_json(path) if done else None
        listed.append({k: run[k] for k in ("variant", "seed", "dir", "stage")} | {
            "eval_json": eval_json(run), "status": "finished" if done else record.get("status", "not run"),
            "wall_s": record.get("wall_s"), "command": shown(record.get("command", run["command"]))})
    tables: dict[str, Any] = {"runs": listed}
    for task, metrics in (("dr", CLASSIFICATION), ("iqa", CLASSIFICATION), ("iqa_enhanced", CLASSIFICATION),
                          ("enhancement", ENHANCEMENT)):
        per_variant = {v: aggregate(list(by_seed.values()), task, metrics) for v, by_seed in evals.items()}
        tables[task] = {v: t for v, t in per_variant.items() if t is not None}
    pretrained = {r["variant"]: r.get("pretrained", r["variant"]) for r in runs}
    pairs = [(v, base) for v in tables["dr"] if "@" not in v for base in (*BASELINES, f"{pretrained[v]}@stage1")]
    pairs += [p for p in PAIRS if p[0] in tables["dr"]]
    tables["dr_kappa_differences"] = {f"{v} - {base}": paired_difference(evals, v, base) for v, base in pairs
                                      if base != v and base in tables["dr"]}
    tables["enhancement_differences"] = {
        f"{v} - {pretrained[v]}@stage1": {m: paired_difference(evals, v, f"{pretrained[v]}@stage1", m, "enhancement")
                                          for m in ("psnr_enhanced", "ssim_enhanced")}
        for v in tables["enhancement"] if "@" not in v and f"{pretrained[v]}@stage1" in tables["enhancement"]}
    return tables


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- Markdown
def fmt(s: Mapping[str, Any] | None, digits: int = 3) -> str:
    """"mean ± std" of a `stat` ("mean" alone with one seed, "-" with none)."""
    if not s or s.get("mean") is None:
        return "-"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s.get("std") is not None else "") + (
        f" (n={s['n']})" if s.get("n_expected") and s["n"] != s["n_expected"] else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _classification_table(block: Mapping[str, Any], subset: str = "all") -> list[str]:
    rows = [[title(v), str(t[subset]["kappa"]["examples"])] + [fmt(t[subset][m]) for m in CLASSIFICATION]
            for v, t in _ordered(block) if subset in t]
    return _table(["method", "test images", "accuracy", "kappa", "precision", "F1"], rows)


def _ordered(block: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Rows in the paper's order, each joint variant followed by its own pre-training stages."""
    names = [n for v in VARIANTS for n in (f"{v}@stage1", f"{v}@stage2", v)]
    return [(n, block[n]) for n in names if n in block]


def _per_quality_table(results: Mapping[str, Any], metric: str) -> list[str]:
    dr = results["dr"]
    levels = [q for q in SUBSETS if any(q in t for t in dr.values())]
    rows = [[title(v)] + [fmt(t.get(q, {}).get(metric)) for q in levels] for v, t in _ordered(dr)]
    for name, diff in results.get("dr_kappa_differences", {}).items() if metric == "kappa" else []:
        a, b = name.split(" - ")
        rows.append([f"{title(a)} − {title(b)} (paired by seed)"] + [fmt(diff.get(q)) for q in levels])
    examples = {q: next((t[q][metric]["examples"] for t in dr.values() if q in t), 0) for q in levels}
    return _table(["method"] + [f"{q} (n={examples[q]})" for q in levels], rows)


def _enhancement_table(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for v, t in _ordered(results["enhancement"]):
        for q in [q for q in SUBSETS if q in t]:
            rows.append([title(v), q, str(t[q]["psnr_input"]["examples"])] + [
                fmt(t[q][m], 2 if m.startswith("psnr") else 3) for m in ENHANCEMENT])
    return _table(["method", "subset", "test images", "PSNR input", "PSNR enhanced", "SSIM input",
                   "SSIM enhanced"], rows)


def _enhancement_difference_table(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, diff in results.get("enhancement_differences", {}).items():
        a, b = name.split(" - ")
        for q in [q for q in SUBSETS if diff["psnr_enhanced"].get(q, {}).get("n")]:
            rows.append([f"{title(a)} − {title(b)}", q, fmt(diff["psnr_enhanced"][q], 2),
                         fmt(diff["ssim_enhanced"][q])])
    return _table(["paired by seed", "subset", "PSNR enhanced (dB)", "SSIM enhanced"], rows) if rows else []


def _runs_table(results: Mapping[str, Any]) -> list[str]:
    rows = [[VARIANTS[r["variant"]], str(r["seed"]), r["stage"], r["status"],
             "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"] for r in results["runs"]]
    return _table(["method", "seed", "evaluated stage", "status", "wall time (s)"], rows)


def _study_lines(study: Mapping[str, Any]) -> list[str]:
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
            *([f"- Shared pre-training: " + "; ".join(
                f"{title(a)} starts stage 3 from {title(b)}'s stage-1 and stage-2 checkpoints of the same seed"
                for a, b in study["shared_pretraining"]) + " (`--config.stage=stage3 "
               "--config.init.stage1=... --config.init.stage2=...`), so its pre-training rows are that run's."]
              if study.get("shared_pretraining") else []),
            f"- Machine: {study['machine']}; {study['jobs']} run(s) at a time; 1-min load average "
            f"{study['load_average'][0]:.1f} at the start, {study['load_average'][1]:.1f} at the end; "
            f"total wall time {study['wall_s']:.0f} s." + (
                f" Tables re-drawn from the runs' files by `{study['tabulated_by']}`." if study.get("tabulated_by") else ""),
            "- One run's exact command (every run's is in results.json):", "",
            f"      {study['example_command']}"]


def markdown(results: Mapping[str, Any]) -> str:
    """results.md: the study, then Tables V, Fig. 12, IV and VI analogues (mean ± sample std over seeds)."""
    lines = ["# Ablation study (paper Tables IV-VI, Fig. 12)", "", *_study_lines(results["study"]), "",
             "Every number is the mean ± sample standard deviation over the seeds of that method's runs, read "
             "from each run's eval.json; n is given where fewer seeds finished.", ""]
    if results["dr"]:
        lines += ["## DR grading (Table V analogue)", "", *_classification_table(results["dr"]), "",
                  "## DR grading per quality level of the original image (Fig. 12 analogue)", "",
                  "Quadratic-weighted kappa:", "", *_per_quality_table(results, "kappa"), "",
                  "Accuracy:", "", *_per_quality_table(results, "accuracy"), ""]
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


# --------------------------------------------------------------------------- figures
def per_quality_kappa_figure(results: Mapping[str, Any], path: str) -> None:
    """Grouped bars: DR kappa per quality level (and all) for each variant with DR grading; error bars are
    the sample std over seeds, dots the individual seeds (paper Fig. 12)."""
    plt = report.pyplot()
    dr = _ordered(results["dr"])
    levels = [q for q in SUBSETS if any(q in t for _, t in dr)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.75 * len(levels) * len(dr)), 3.8))
    width = 0.8 / max(1, len(dr))
    for k, (v, t) in enumerate(dr):
        x = np.arange(len(levels)) + (k - (len(dr) - 1) / 2) * width
        s = [t.get(q, {}).get("kappa", {}) for q in levels]
        means = [np.nan if si.get("mean") is None else si["mean"] for si in s]
        errs = [0.0 if si.get("std") is None else si["std"] for si in s]
        ax.bar(x, np.nan_to_num(means), width, yerr=errs, capsize=3, label=title(v, short=True), alpha=0.85)
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
    clean = np.asarray(inference.clean_reference(batch))
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


# --------------------------------------------------------------------------- the study
def study_info(args: argparse.Namespace, data_dir: str, overrides: Mapping[str, str], seeds: Sequence[int],
               runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What results.md states about the study: command, data, schedule, machine."""
    cfg = load_config(config_path(runs[0]["variant"]), overrides)
    splits = records.read_manifest(data_dir)["splits"]
    data = {name: {"num_records": s.get("num_records"),
                   "quality": {q: s.get("counts", {}).get(q, {}).get("all", 0) for q in records.QUALITY_NAMES}}
            for name, s in sorted(splits.items())}
    generator = splits.get(cfg.data.train_split, {}).get("generator")
    return {"command": "python -m cleaq_jax.programs.ablations " + shlex.join(args.argv), "preset": args.preset,
            "overrides": dict(overrides), "data_dir": data_dir, "data": data, "generator": generator,
            "eval_split": cfg.data.eval_split,
            "num_epochs": int(cfg.num_epochs), "seeds": list(seeds), "variants": sorted({r["variant"] for r in runs},
                                                                                       key=list(VARIANTS).index),
            "shared_pretraining": sorted({(r["variant"], r["pretrained"]) for r in runs if r["pretrained"] != r["variant"]}),
            "jobs": args.jobs, "machine": f"{os.cpu_count()}-core {platform.machine()} CPU ({platform.system()})",
            "example_command": shown(runs[-1]["command"])}


def _keep_training_run(study: dict[str, Any], previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """A --tabulate-only pass reports the command, wall time and load of the study that trained the runs
    (from the previous results.json), and names itself as what re-tabulated them."""
    before = (previous or {}).get("study", {})
    if "tabulate-only" in before.get("command", "") or "wall_s" not in before:
        return study
    kept = {k: before[k] for k in ("command", "wall_s", "load_average", "jobs") if k in before}
    return {**study, **kept, "tabulated_by": study["command"]}


def write_results(workdir: str, study: dict[str, Any], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """results.json, results.md and the figures into workdir, from the runs' own files."""
    results = {"study": study, **tabulate(runs)}
    _write_json(os.path.join(workdir, "results.json"), results)
    atomic_file(os.path.join(workdir, "results.md"), lambda tmp: open(tmp, "w").write(markdown(results)))
    if results["dr"]:
        per_quality_kappa_figure(results, os.path.join(workdir, "per_quality_kappa.png"))
    joint = [r for r in runs if r["variant"] == "cleaq_dr" and os.path.exists(eval_json(r))]
    if joint:
        enhancement_examples_figure(os.path.join(joint[0]["dir"], joint[0]["stage"]),
                                    os.path.join(workdir, "enhancement_examples.png"))
    return results


def prepare_data(data_dir: str, size: int | None, build_synthetic: int, synthetic_seed: int,
                 default_size: int = 512, lesion_scale: float = 1.0,
                 splits: Mapping[str, float] | None = None) -> int:
    """Check the shards (building ``build_synthetic`` synthetic examples at ``size`` or ``default_size``
    px, lesions enlarged by ``lesion_scale``, split by ``splits`` fractions, when there are none); returns
    their image size."""
    if not os.path.exists(os.path.join(data_dir, records.MANIFEST)):
        if not build_synthetic:
            raise FileNotFoundError(
                f"--data {data_dir}: no {records.MANIFEST} there. Prepare shards with data_prep (docs/data.md), "
                "or pass --build-synthetic N (and --size S) to build a synthetic set there")
        location.build_synthetic(data_dir, num=build_synthetic, size=size or default_size, seed=synthetic_seed,
                                  lesion_scale=lesion_scale, splits=splits)
    splits = records.read_manifest(data_dir)["splits"]
    sizes = {tuple(s["image_size"]) for s in splits.values() if s.get("image_size")}
    built = next(iter(sizes))[0] if len(sizes) == 1 else None
    if size is not None and built is not None and size != built:
        raise ValueError(f"--size {size}, but the shards in {data_dir} are {built} px: pass --size {built} "
                         "or another --data")
    if size is None and built is None:
        raise ValueError(f"--data {data_dir}: the manifest gives no single image size; pass --size S")
    return int(size or built)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cleaq_jax.programs.ablations", description=__doc__.split("\n")[0],
                                epilog="Further arguments --config.KEY=VALUE override every run's config.")
    p.add_argument("--data", required=True, help="shard directory (data_prep output) shared by every run")
    p.add_argument("--workdir", required=True, help="study directory: <variant>/seed<k>/ runs and the results")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant: 0..N-1 (default 3)")
    p.add_argument("--size", type=int, default=None, help="image size in px (default: the shards' size)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--preset", default="full", help="size preset: tiny, bench, study or full (configs/ablations/presets.py)")
    p.add_argument("--build-synthetic", type=int, default=0, metavar="N",
                   help="when --data has no shards yet, build N synthetic examples there first")
    p.add_argument("--synthetic-seed", type=int, default=0, help="generator seed for --build-synthetic")
    p.add_argument("--lesion-scale", type=float, default=None,
                   help="lesion size multiplier for --build-synthetic (default: the preset's; 1 = 512 px sizes)")
    p.add_argument("--splits", default=None, metavar="NAME=FRACTION,...",
                   help="split fractions for --build-synthetic (default: the preset's, else train=0.7,val=0.1,test=0.2)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1: a run uses every core)")
    p.add_argument("--tabulate-only", action="store_true", help="start no run; tabulate the finished ones")
    p.add_argument("--separate-pretraining", action="store_true",
                   help="every joint variant trains its own stages 1 and 2 (default: CLEAQ, CLEQ-DR and CLEAQ-DR "
                        "to_good start stage 3 from CLEAQ-DR's stage-1/2 checkpoints of the same seed)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = _parser().parse_known_args(argv)
    args.argv = argv
    t0, load0 = time.time(), os.getloadavg()[0]
    try:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        [config_path(v) for v in variants]  # noqa: B018  (unknown names fail before any work)
        if args.seeds < 1:
            raise ValueError(f"--seeds {args.seeds}: need at least 1")
        workdir, data_dir = os.path.abspath(args.workdir), os.path.abspath(args.data)
        chosen = preset(args.preset)
        overrides = {k: flag_value(v) for k, v in chosen["overrides"].items()}
        lesion_scale = chosen["data"].get("lesion_scale", 1.0) if args.lesion_scale is None else args.lesion_scale
        splits = location.parse_splits(args.splits) if args.splits else chosen["data"].get("splits")
        size = prepare_data(data_dir, args.size, args.build_synthetic, args.synthetic_seed, chosen["data"]["size"],
                            lesion_scale, splits)
        overrides.update({"data.dir": data_dir, "data.image_size": str(size), "data.synthetic.num": "0"})
        overrides.update(parse_overrides(rest))
        runs = plan_runs(workdir, variants, range(args.seeds), overrides, not args.separate_pretraining)
        for run in runs:
            check_same_settings(run)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(workdir, exist_ok=True)
    failed = [] if args.tabulate_only else execute(runs, workdir, args.jobs)
    study = study_info(args, data_dir, overrides, range(args.seeds), runs)
    study.update(wall_s=time.time() - t0, load_average=[load0, os.getloadavg()[0]])
    if args.tabulate_only:
        study = _keep_training_run(study, _read_json(os.path.join(workdir, "results.json")))
    write_results(workdir, study, runs)
    print(f"[ablations] results in {os.path.join(workdir, 'results.md')}", flush=True)
    if failed:
        print(f"[ablations] {len(failed)} run(s) failed: " + ", ".join(f"{r['variant']} seed {r['seed']}"
                                                                      for r in failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
