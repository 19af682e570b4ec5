r"""Grade, quality-assess and enhance fundus photographs with a trained checkpoint or an exported model:

    python -m cleaq_jax.programs.predict --checkpoint RUN/stage3 --input photos/ extra.jpg --out predictions/ \
        [--gate-quality] [--explain] [--report] [--batch-size 8]
    python -m cleaq_jax.programs.predict --model MODEL_DIR --input photos/ --out predictions/ [--gate-quality]

--model takes a directory written by `python -m cleaq_jax.programs.export` and gives the same predictions
with only jax (and flatbuffers, for jax.export), numpy and OpenCV installed: this module imports no model,
training or checkpoint code; the checkpoint backend (`predict_checkpoint`, with flax and orbax) is
imported only for --checkpoint. Grad-CAM (--explain, --report) needs the model code and so a checkpoint.

Each photograph (JPEG, PNG, TIFF, any size; folders are searched recursively) is disc-cropped and resized
to the model's image size exactly as data preparation does (`fundus.preprocess`), then IQA rates its
quality, IQE enhances it, and DR grades it: a stage-3 (joint) model grades the enhanced image (paper
III-B), a stage-1 DR network the processed photograph. With ``--gate-quality`` only images IQA does not
rate good are enhanced and graded enhanced (enhancing good images costs accuracy, paper Fig. 12).

Writes into --out, each file under a temporary name first:
    predictions.csv   file, grade, p_grade_0.., quality, p_good, p_usable, p_reject, enhanced
    enhanced/*.png    IQE's output at the processed size (for the images that were enhanced)
    skipped.txt       file<TAB>reason for every input that could not be read or shows no retinal disc
    explain/*.png     with --explain (or --report): Grad-CAM of the reported grade over the processed
                      photograph (<stem>.png) and over its enhancement (<stem>-enhanced.png)
    report.html       with --report: a card per photograph (crop, enhancement, heatmaps, grade and quality
                      with probabilities), filterable by grade and quality; it links crops/, enhanced/ and
                      explain/ beside it, so keep the folder together
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import io
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import cv2
import numpy as np

from cleaq_jax import configs, errors
from cleaq_jax.data import fundus
from cleaq_jax.evaluation import exported
from cleaq_jax.runtime import cli, compile_cache, storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".gif", ".bmp")
NET_ROLES = {"dr": "grade", "iqa": "quality", "iqe": "enhanced image"}
PROGRESS_EVERY_S = 10.0
DIGITS = 6  # decimals of the probabilities in predictions.csv


# --------------------------------------------------------------------------- inputs
def list_inputs(paths: Iterable[str]) -> list[str]:
    """The photographs to process: files as given, folders searched recursively for image suffixes
    (sorted). A path that does not exist is kept, to be reported as skipped."""
    found: list[str] = []
    for path in paths:
        if not storage.isdir(path):
            found.append(path)
            continue
        if storage.is_remote(path):
            found += _remote_images(storage.absolute(path))
            continue
        for root, dirs, files in os.walk(path):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files)
                      if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
    return found


def _remote_images(folder: str) -> list[str]:
    """`list_inputs` for a bucket folder: one listing per folder, sub-folders after files, sorted."""
    entries = [(storage.join(folder, name), name) for name in sorted(storage.listdir(folder))]
    folders = {path for path, _ in entries if storage.isdir(path)}
    found = [path for path, name in entries if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")
             and path not in folders]
    for sub in (path for path, _ in entries if path in folders):
        found += _remote_images(sub)
    return found


def prepare(path: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and disc-crop one photograph: (image (size, size, 3) uint8 RGB, mask (size, size) uint8 {0,1}).

    Raises fundus.BadImageError (unreadable file) or fundus.NoDiscError (no retinal disc), naming path.
    """
    return fundus.preprocess(fundus.load_image(path), size, name=path)


def _prepared(paths: list[str], size: int, ahead: int) -> Iterator[tuple[str, Any]]:
    """(path, (image, mask) or the exception) in input order, read by a thread per core at most ``ahead``
    files (or two per thread) ahead of the consumer, so memory stays bounded on long inputs."""
    workers = os.cpu_count() or 1
    ahead = max(ahead, 2 * workers)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        todo = iter(paths)
        for path in todo:
            pending.append((path, pool.submit(prepare, path, size)))
            if len(pending) >= ahead:
                break
        while pending:
            path, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(prepare, nxt, size)))
            try:
                yield path, future.result()
            except (fundus.BadImageError, fundus.NoDiscError, ValueError) as error:
                yield path, error


# --------------------------------------------------------------------------- outputs
def _png(image_rgb_uint8: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image_rgb_uint8[..., ::-1]))
    if not ok:
        raise OSError(f"could not PNG-encode an image of shape {image_rgb_uint8.shape}")
    return buf.tobytes()


def enhanced_name(path: str, taken: set[str]) -> str:
    """``<stem>.png`` for an input path, with ``-2``, ``-3`` ... when the name is taken (recorded)."""
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    name, k = f"{stem}.png", 1
    while name in taken:
        k += 1
        name = f"{stem}-{k}.png"
    taken.add(name)
    return name


def csv_header(num_grades: int, quality_names: tuple[str, ...]) -> list[str]:
    """Columns of predictions.csv."""
    return (["file", "grade"] + [f"p_grade_{g}" for g in range(num_grades)] + ["quality"]
            + [f"p_{q}" for q in quality_names] + ["enhanced"])


def csv_row(path: str, out: dict[str, np.ndarray], i: int, num_grades: int, enhanced_file: str,
            quality_names: tuple[str, ...]) -> list[str]:
    """One row of predictions.csv from row i of the model's outputs (empty cells for absent networks)."""
    row = [path]
    if "dr_probs" in out:
        p = out["dr_probs"][i]
        row += [str(int(np.argmax(p)))] + [f"{v:.{DIGITS}f}" for v in p]
    else:
        row += [""] * (1 + num_grades)
    if "quality_probs" in out:
        p = out["quality_probs"][i]
        row += [quality_names[int(np.argmax(p))]] + [f"{v:.{DIGITS}f}" for v in p]
    else:
        row += [""] * (1 + len(quality_names))
    return row + [enhanced_file]


# --------------------------------------------------------------------------- the model
# A model, for `predict`, is either backend: `exported.ExportedModel` (--model) or
# `predict_checkpoint.CheckpointModel` (--checkpoint). Both have directory, stage, nets, image_size,
# num_grades, quality_names and description, and are called as model(image, mask, gate) with a batch of
# uint8 crops (B, S, S, 3) and masks (B, S, S), returning inference.inference_outputs' arrays as numpy.
# The checkpoint backend also draws Grad-CAM (`outputs`, `heatmaps`) and checks the batch against its mesh.
def check_checkpoint(model, gate_quality: bool) -> list[str]:
    """Notes on what a model (a checkpoint or an exported one) cannot answer; raises `errors.ConfigError` when
    --gate-quality cannot work."""
    where = f"{model.directory} ({model.stage}: {'+'.join(model.nets)})"
    if gate_quality and "iqa" not in model.nets:
        raise errors.ConfigError(f"--gate-quality needs the IQA network, which {where} lacks; use a stage-3 "
                                 "checkpoint (configs/stage3.py) or drop --gate-quality")
    return [f"{where} has no {net.upper()} network: the {role} columns stay empty (a stage-3 checkpoint, "
            f"configs/stage3.py, has all three)" for net, role in NET_ROLES.items() if net not in model.nets]


def _run_batch(model, images: list[np.ndarray], masks: list[np.ndarray], batch_size: int,
               gate_quality: bool) -> dict[str, np.ndarray]:
    """The model on up to batch_size images, padded to batch_size (one compilation for every batch)."""
    n = len(images)
    pad = batch_size - n
    image = np.stack(images + [np.zeros_like(images[0])] * pad)
    mask = np.stack(masks + [np.zeros_like(masks[0])] * pad)
    out = model(image, mask, gate_quality)
    return {k: np.asarray(v)[:n] for k, v in out.items()}


class _Progress:
    """A line on stderr at most every PROGRESS_EVERY_S seconds (and at the end) for long inputs."""

    def __init__(self, total: int, stream, every_s: float = PROGRESS_EVERY_S):
        self.total, self.stream, self.every_s = total, stream, every_s
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, skipped: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_text = "" if final or not np.isfinite(eta) else f", ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        print(f"predict: {done}/{self.total} images ({skipped} skipped), {rate:.2f} img/s{eta_text}",
              file=self.stream, flush=True)


def predict(model, paths: list[str], out_dir: str, *, gate_quality: bool = False, batch_size: int = 8,
            log=None, explain: bool = False, report_html: bool = False) -> dict[str, Any]:
    """Run a model over photographs and write predictions.csv, enhanced/*.png and skipped.txt.

    model: a checkpoint (`predict_checkpoint.open_checkpoint`) or an exported model (`exported.load`);
    paths: photograph files; batch_size: images per step (for a checkpoint a multiple of the device
    count); log: where notes, skips and progress go (default stderr); explain: Grad-CAM overlays into
    explain/; report_html: report.html (and crops/, explain/) too; both need a checkpoint.
    Returns {'rows': CSV rows (lists of str), 'skipped': [(path, reason)], 'report': its path or None}.
    """
    log = sys.stderr if log is None else log
    if batch_size < 1:
        raise errors.ConfigError(f"--batch-size must be at least 1, not {batch_size}")
    if hasattr(model, "check_batch"):
        model.check_batch(batch_size)
    if (explain or report_html) and not hasattr(model, "outputs"):
        raise errors.ConfigError(
            f"--explain and --report draw Grad-CAM, which needs the model code: the exported model "
            f"{model.directory} has none; pass the checkpoint it was exported from with --checkpoint")
    for note in check_checkpoint(model, gate_quality):
        print(f"note: {note}", file=log)
    if (explain or report_html) and "dr" not in model.nets:
        print("note: Grad-CAM explains the DR grade, and this checkpoint has no DR network: no heatmaps",
              file=log)
    size, grades, qualities = int(model.image_size), int(model.num_grades), tuple(model.quality_names)
    enhanced_dir = os.path.join(out_dir, "enhanced")
    storage.makedirs(enhanced_dir)
    extras = model.outputs(out_dir, explain=explain, report_html=report_html) if explain or report_html else None
    rows: list[list[str]] = []
    skipped: list[tuple[str, str]] = []
    taken: set[str] = set()
    progress = _Progress(len(paths), log)
    chunk: list[tuple[str, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        images, masks = [c[1] for c in chunk], [c[2] for c in chunk]
        out = _run_batch(model, images, masks, batch_size, gate_quality)
        heat = (model.heatmaps(images, masks, out, batch_size)
                if extras is not None and extras.needs_heatmaps and "dr_probs" in out else [None] * len(chunk))
        row = lambda key, i: out[key][i] if key in out else None  # noqa: E731
        for i, (path, image, mask) in enumerate(chunk):
            # One name per photograph, shared by its enhanced, explain/ and crops/ files.
            stem, name, enhanced = enhanced_name(path, taken)[:-len(".png")], "", None
            if "enhanced" in out and out["enhance"][i]:
                enhanced = out["enhanced"][i]
                name = os.path.join("enhanced", f"{stem}.png")
                storage.atomic_file(os.path.join(out_dir, name),
                                    _png(np.clip(np.rint(enhanced * 255.0), 0, 255).astype(np.uint8)))
            rows.append(csv_row(path, out, i, grades, name, qualities))
            if extras is not None:
                extras.add(path, stem, image.astype(np.float32) / 255.0 * mask[..., None], mask, enhanced, name,
                           heat[i], row("dr_probs", i), row("quality_probs", i))
        chunk.clear()
        progress(len(rows) + len(skipped), len(skipped))

    for path, prepared in _prepared(paths, size, ahead=2 * batch_size):
        if isinstance(prepared, Exception):
            reason = str(prepared).removeprefix(f"{path}: ")  # the errors name the file already
            skipped.append((path, reason))
            print(f"skipped {path}: {reason}", file=log)
        else:
            chunk.append((path, *prepared))
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    _write_tables(out_dir, rows, skipped, grades, qualities)
    page = extras.finish(skipped) if extras is not None else None
    progress(len(rows) + len(skipped), len(skipped), final=True)
    return {"rows": rows, "skipped": skipped, "report": page}


def _write_tables(out_dir: str, rows: list[list[str]], skipped: list[tuple[str, str]], grades: int,
                  quality_names: tuple[str, ...]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(csv_header(grades, quality_names))
    writer.writerows(rows)
    storage.atomic_file(os.path.join(out_dir, "predictions.csv"), text.getvalue().encode())
    # Always written, so an old list from an earlier run in the same folder cannot mislead.
    lines = "".join(f"{path}\t{' '.join(reason.split())}\n" for path, reason in skipped)
    storage.atomic_file(os.path.join(out_dir, "skipped.txt"), lines.encode())


# --------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (argv without the program name; default sys.argv[1:])."""
    parser = cli.parser("python -m cleaq_jax.programs.predict", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="stage directory written by training (e.g. RUN/stage3) or its checkpoints/ folder")
    source.add_argument("--model", metavar="MODEL_DIR",
                        help="a model exported by python -m cleaq_jax.programs.export (needs only jax, numpy "
                             "and OpenCV)")
    parser.add_argument("--checkpoint-step", default=None, metavar="best|latest|STEP",
                        help="which of the checkpoint's steps: the best by the run's validation metric "
                             "(default), the latest, or a step number")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="photographs and/or folders of photographs (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--gate-quality", action="store_true",
                        help="enhance (and grade enhanced) only images IQA does not rate good")
    parser.add_argument("--explain", action="store_true",
                        help="write Grad-CAM heatmaps of the reported grade over each photograph and its "
                             "enhancement into explain/ (with --checkpoint)")
    parser.add_argument("--report", action="store_true",
                        help="write report.html: a card per photograph, filterable by grade and quality "
                             "(implies --explain; with --checkpoint)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--compilation-cache", default=configs.COMPILATION_CACHE_DIR, metavar="DIR",
                        help="XLA's persistent compilation cache: a later prediction with the same model and "
                             "batch size loads the programs this one compiles; '' for none "
                             "(JAX_COMPILATION_CACHE_DIR, when set, wins)")
    return parser.parse_args(argv)


def open_model(args: argparse.Namespace):
    """The model the command line names: `exported.load` of --model, or the --checkpoint restored.

    Raises `errors.UserError` (one line each) for what cannot be read or combined.
    """
    if args.model is not None:
        if args.checkpoint_step is not None:
            raise errors.ConfigError(
                "--checkpoint-step chooses among a checkpoint's steps; an exported model holds one "
                "(pick it when exporting)")
        if args.explain or args.report:
            raise errors.ConfigError("--explain and --report draw Grad-CAM, which needs the model code: pass the "
                                     "checkpoint the model was exported from with --checkpoint instead of --model")
        return exported.load(args.model)
    # Flax, orbax and the model code: only a checkpoint needs them (module doc).
    from cleaq_jax.programs import predict_checkpoint

    return predict_checkpoint.open_checkpoint(args.checkpoint, step=args.checkpoint_step or "best")


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (1 when no photograph could be processed, 2 for bad input)."""
    args = parse_args(argv)
    return errors.reported(lambda: run(args), args.verbose)


def run(args: argparse.Namespace) -> int:
    """What the command line asks; raises `errors.UserError` for what cannot be read or combined."""
    paths = list_inputs(args.input)
    if not paths:
        raise errors.MissingError(f"no photographs ({', '.join(IMAGE_SUFFIXES)}) found in {' '.join(args.input)}")
    if args.checkpoint is not None:
        # The checkpoint backend's libraries (orbax, absl) log through the console: quiet unless --verbose.
        from cleaq_jax.runtime import console

        console.setup(args.verbose)
    compile_cache.use(args.compilation_cache)
    model = open_model(args)
    print(f"predict: {model.description}", file=sys.stderr)
    storage.makedirs(args.out)
    result = predict(model, paths, args.out, gate_quality=args.gate_quality, batch_size=args.batch_size,
                     explain=args.explain, report_html=args.report)
    print(f"predict: {len(result['rows'])} predicted, {len(result['skipped'])} skipped; "
          f"{os.path.join(args.out, 'predictions.csv')}" + (f", {result['report']}" if result["report"] else ""),
          file=sys.stderr)
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
