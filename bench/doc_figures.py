"""Regenerate the demo's figures and tables that docs/evaluation.md and docs/training.md show.

    python bench/doc_figures.py                        # runs the demo in a temporary directory
    python bench/doc_figures.py --workdir demo_workdir # reuses a finished demo there, else runs (or resumes) it
    python bench/doc_figures.py --seeds 0,1,2 --workdir W   # the per-seed table: one demo per seed, W/seed<N>

For each seed it runs ``python -m cleaq_jax.main --config=configs/demo.py --workdir=W`` (with
``--config.seed=N`` for a seed other than 0) unless W already holds a finished run: the evaluation of
every stage the demo trains (``W/<stage>/eval/eval.json``) and every picture below. A run stopped part-way
resumes from its checkpoints. Then, from the first seed's run:

- copies the pictures stage 3's evaluation writes (``W/stage3/eval/``, `cleaq_jax.evaluation.report.write`)
  into ``docs/images/`` under the names docs/evaluation.md uses: ``confusion_matrix.png`` ->
  ``eval_confusion_matrix.png``, ``per_quality.png``, ``enhancement_grid.png``, ``vessels.png``,
  ``gradcam_grid.png`` likewise;
- draws the validation and training curves (``python -m cleaq_jax.programs.curves``) into
  ``docs/images/demo_curves.png`` (docs/training.md).

It prints, for docs/training.md: the machine (CPU model, cores), the versions, the date and the commit;
one row per seed of the stage-1 -> stage-3 table (DR kappa overall and per quality level, PSNR and SSIM of
the enhancement); and stage 1's and stage 3's ``eval.md`` of the first seed. The pictures and tables of a
demo trained on another CPU may differ in their digits (the joint step's gradients are sensitive to
rounding). ``--images DIR`` writes the pictures elsewhere (``--images ''``: none).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "configs/demo.py"
STAGES = ("stage1", "stage2", "stage3")  # what configs/demo.py's pipeline trains, each evaluated
# <workdir>/stage3/eval/<name> -> docs/images/<name> (the files docs/evaluation.md shows).
PICTURES = {
    "confusion_matrix.png": "eval_confusion_matrix.png",
    "per_quality.png": "eval_per_quality.png",
    "enhancement_grid.png": "eval_enhancement_grid.png",
    "vessels.png": "eval_vessels.png",
    "gradcam_grid.png": "eval_gradcam_grid.png",
}
CURVES = "demo_curves.png"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
LEVELS = ("good", "usable", "reject")


def eval_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage, "eval")


def finished(workdir: str) -> bool:
    """Whether ``workdir`` holds a finished demo: every stage's evaluation and stage 3's pictures."""
    if not all(os.path.exists(os.path.join(eval_dir(workdir, s), "eval.json")) for s in STAGES):
        return False
    return all(os.path.exists(os.path.join(eval_dir(workdir, "stage3"), name)) for name in PICTURES)


def _env() -> dict[str, str]:
    """This environment with the repository on PYTHONPATH (the programs import cleaq_jax and configs) and
    without a persistent compilation cache, so the wall time is a first run's, as on a fresh machine."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
            "JAX_COMPILATION_CACHE_DIR": ""}


def run_demo(workdir: str, seed: int) -> float:
    """The demo into ``workdir`` (resuming what is there); returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "cleaq_jax.main", f"--config={DEMO}", f"--workdir={workdir}"]
    if seed:
        cmd.append(f"--config.seed={seed}")
    print("running:", " ".join(cmd[1:]), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, cwd=REPO, env=_env(), check=True)
    seconds = time.monotonic() - start
    if not finished(workdir):
        raise SystemExit(f"error: the demo ended but {workdir} lacks an evaluation or a picture of stage 3")
    return seconds


def load(workdir: str, stage: str) -> dict:
    with open(os.path.join(eval_dir(workdir, stage), "eval.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """/proc/cpuinfo's model name and clock (Linux), else what platform knows."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    mhz = fields.get("cpu MHz")
    return f"{name} at {float(mhz) / 1000:.1f} GHz" if mhz else name


def cores() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{usable} usable of {os.cpu_count()}"


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"Python {platform.python_version()}, " + ", ".join(found)


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], check=False, cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


# --------------------------------------------------------------------------- the tables
def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pair(before, after, digits: int) -> str:
    return f"{_fmt(before, digits)} -> {_fmt(after, digits)}"


def _kappa(result: dict, level: str):
    block = result.get("dr", {})
    table = block.get("overall", {}) if level == "all" else block.get("per_quality", {}).get(level, {})
    return table.get("kappa")


def _enhancement(result: dict, key: str):
    return result.get("enhancement", {}).get("overall", {}).get(key)


def seed_row(seed: int, stage1: dict, stage3: dict) -> str:
    """One row of docs/training.md's demo table: stage 1 -> stage 3 on the test split."""
    cells = [str(seed)] + [_pair(_kappa(stage1, lv), _kappa(stage3, lv), 3) for lv in ("all",) + LEVELS]
    cells.append(_pair(_enhancement(stage1, "psnr_enhanced"), _enhancement(stage3, "psnr_enhanced"), 2))
    cells.append(_pair(_enhancement(stage1, "ssim_enhanced"), _enhancement(stage3, "ssim_enhanced"), 4))
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/doc_figures.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="", help="the demo's run directory, kept (default: a temporary one, "
                        "deleted at the end); with several seeds, one subdirectory seed<N> per seed")
    parser.add_argument("--seeds", default="0", help="comma-separated config.seed values (default 0, the demo)")
    parser.add_argument("--images", default=os.path.join(REPO, "docs", "images"),
                        help="where the pictures go ('' for nowhere)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        parser.error("--seeds names no seed")

    temporary = None
    root = os.path.abspath(args.workdir) if args.workdir else None
    if root is None:
        temporary = tempfile.mkdtemp(prefix="doc_figures_")
        root = temporary
    workdirs = {s: root if len(seeds) == 1 else os.path.join(root, f"seed{s}") for s in seeds}
    wall: dict[int, float] = {}
    for seed, workdir in workdirs.items():
        if finished(workdir):
            print(f"using the finished demo in {workdir} (seed {seed})", flush=True)
        else:
            wall[seed] = run_demo(workdir, seed)

    first = workdirs[seeds[0]]
    if args.images:
        os.makedirs(args.images, exist_ok=True)
        for source, target in PICTURES.items():
            shutil.copyfile(os.path.join(eval_dir(first, "stage3"), source), os.path.join(args.images, target))
            print(f"{os.path.join(eval_dir(first, 'stage3'), source)} -> {os.path.join(args.images, target)}")
        curves = [sys.executable, "-m", "cleaq_jax.programs.curves", "--workdir", first,
                  "--out", os.path.join(args.images, CURVES)]
        subprocess.run(curves, cwd=REPO, env=_env(), check=True)

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    print()
    print(f"Machine: {cpu_model()}, {cores()} cores, {platform.system()} {platform.machine()}; "
          f"1-minute load average {os.getloadavg()[0]:.2f} at the end")
    print(f"Versions: {versions()}")
    print(f"Date: {date}; commit {commit()}")
    print(f"Command: python -m cleaq_jax.main --config={DEMO} --workdir=W (--config.seed=N for seed N)")
    for seed, seconds in wall.items():
        minutes, rest = divmod(round(seconds), 60)
        print(f"Wall time of the demo, seed {seed}: {minutes} min {rest} s (a timing only on an otherwise idle machine)")
    print()
    print("| seed | DR kappa all | good | usable | reject | PSNR all (dB) | SSIM all |")
    print("|---|---|---|---|---|---|---|")
    for seed, workdir in workdirs.items():
        print(seed_row(seed, load(workdir, "stage1"), load(workdir, "stage3")))
    stage2, stage3 = load(first, "stage2"), load(first, "stage3")
    iqa = [r.get("iqa", {}).get("overall", {}).get("kappa") for r in (stage2, stage3)]
    print(f"\nIQA kappa (seed {seeds[0]}): {_fmt(iqa[0], 3)} after stage 2, {_fmt(iqa[1], 3)} after stage 3")
    for stage in ("stage1", "stage3"):
        with open(os.path.join(eval_dir(first, stage), "eval.md")) as f:
            print(f"\n<!-- {stage}/eval/eval.md, seed {seeds[0]} -->\n")
            print(f.read())
    if temporary:
        shutil.rmtree(temporary, ignore_errors=True)  # give --workdir to keep the run
    return 0


if __name__ == "__main__":
    sys.exit(main())
