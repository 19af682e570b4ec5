"""A run's training and validation curves, read back from its TensorBoard event files, as one figure.

    python -m cleaq_jax.programs.curves --workdir RUN --out RUN/curves.png

One panel per metric (validation DR kappa, IQA kappa, enhancement PSNR and SSIM, then the training
loss), one line per stage directory of RUN that logged it, against the epoch (the step divided by the
stage's steps per epoch, read from its saved config). The same numbers TensorBoard shows
(``tensorboard --logdir RUN``); this draws them without a browser. RUN and the PNG may be in a bucket
(``gs://...``): the event files are read from a local copy (TensorBoard's reader would reach a bucket
only through TensorFlow's file system when TensorFlow is installed, gcsfs otherwise).
"""

from __future__ import annotations

import sys

import numpy as np

from cleaq_jax import config_checks, errors
from cleaq_jax.evaluation import report
from cleaq_jax.runtime import cli, console, storage

EVENT_FILES = "events.out.tfevents.*"
STAGES = config_checks.PAPER_STAGES
COLOURS = {"stage1": "tab:blue", "stage2": "tab:green", "stage3": "tab:orange"}  # the same in every panel
PANELS = (("val/dr_kappa", "validation DR kappa"), ("val/iqa_kappa", "validation IQA kappa"),
          ("val/psnr_enhanced", "validation PSNR of IQE (dB)"), ("val/ssim_enhanced", "validation SSIM of IQE"),
          ("train/loss", "training loss"))


def read_scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tag -> (steps, values) of every scalar in the event files of ``logdir``, local or remote (training
    writes them as tensor summaries, as TensorFlow 2 does; older writers as scalars)."""
    with storage.local_files(logdir, EVENT_FILES) as local:
        return _read_local_scalars(local)


def _read_local_scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from tensorboard.backend.event_processing import (
        event_accumulator,  # heavy: only when reading
    )
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        values = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
        if all(np.ndim(v) == 0 for v in values):
            out[tag] = (np.array([e.step for e in events]), np.array(values, np.float64))
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], np.float64))
    return out


def _steps_per_epoch(stage_dir: str) -> float | None:
    """The stage's last checkpoint step over its epochs (from its saved config): the steps per epoch of a
    finished stage (a stage stopped early gets a stretched epoch axis); None if unknown."""
    from cleaq_jax.runtime import (
        checkpoint,  # heavy (orbax, jax): only for a stage that has checkpoints
    )

    directory = storage.join(stage_dir, "checkpoints")
    steps = sorted(int(d) for d in storage.listdir(directory) if d.isdigit()) if storage.isdir(directory) else []
    if not steps:
        return None
    epochs = int(checkpoint.read_trained_config(directory, steps[-1]).num_epochs)
    return steps[-1] / epochs if epochs else None


def figure(workdir: str, path: str) -> list[str]:
    """Draw the curves of the stages under ``workdir`` into ``path`` (PNG, written atomically); returns
    the tags drawn. Raises FileNotFoundError when no stage there has event files."""
    runs = {}
    for stage in STAGES:
        logdir = storage.join(workdir, stage, "tensorboard")
        if storage.glob(logdir, EVENT_FILES):
            runs[stage] = (read_scalars(logdir), _steps_per_epoch(storage.join(workdir, stage)))
    if not runs:
        raise errors.MissingError(f"no TensorBoard event files under {workdir}/<stage>/tensorboard; "
                                  "pass the --workdir a training run wrote")
    panels = [(tag, title) for tag, title in PANELS if any(tag in scalars for scalars, _ in runs.values())]
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
    for ax, (tag, title) in zip(axes[0], panels, strict=True):
        for stage, (scalars, per_epoch) in runs.items():
            if tag in scalars:
                steps, values = scalars[tag]
                x = steps / per_epoch if per_epoch else steps
                ax.plot(x, values, marker="o" if tag.startswith("val/") else None, markersize=3, label=stage,
                        color=COLOURS[stage])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch" if all(p for _, p in runs.values()) else "step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(storage.basename(workdir), fontsize=10)
    fig.tight_layout()
    report.atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return [tag for tag, _ in panels]


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m cleaq_jax.programs.curves", __doc__)
    parser.add_argument("--workdir", required=True,
                        help="the run directory (holds stage1/, stage2/, stage3/), local or gs://")
    parser.add_argument("--out", required=True, help="PNG file to write, local or gs://")
    args = parser.parse_args(argv)
    # TensorBoard's reader imports TensorFlow when it is installed, whose C++ start-up notices would bury
    # the one line here (console.setup sets their level unless --verbose).
    console.setup(args.verbose)
    return errors.reported(lambda: _draw(args.workdir, args.out), args.verbose)


def _draw(workdir: str, out: str) -> None:
    tags = figure(workdir, out)
    print(f"curves: {', '.join(tags)} -> {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
