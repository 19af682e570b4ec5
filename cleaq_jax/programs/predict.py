r"""Grade, quality-assess and enhance fundus photographs with a trained checkpoint:

    python -m cleaq_jax.programs.predict --checkpoint RUN/stage3 --input photos/ extra.jpg --out predictions/ \
        [--gate-quality] [--explain] [--report] [--batch-size 8]

Each photograph (JPEG, PNG, TIFF, any size; folders are searched recursively) is disc-cropped and resized
to the checkpoint's image size exactly as data preparation does (`fundus.preprocess`), then IQA rates its
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
import jax
import numpy as np
from etils import epath

from cleaq_jax.data import fundus, records
from cleaq_jax.evaluation import inference, restore
from cleaq_jax.programs import explain as explain_lib
from cleaq_jax.runtime import parallel, storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".gif", ".bmp")
NET_ROLES = {"dr": "grade", "iqa": "quality", "iqe": "enhanced image"}
PROGRESS_EVERY_S = 10.0


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
            found += _remote_images(epath.Path(path))
            continue
        for root, dirs, files in os.walk(path):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files)
                      if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
    return found


def _remote_images(folder: epath.Path) -> list[str]:
    """`list_inputs` for a bucket folder: one listing per folder, sub-folders after files, sorted."""
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    found = [str(p) for p in entries if p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")
             and not p.is_dir()]
    for sub in (p for p in entries if p.is_dir()):
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


def csv_header(num_grades: int) -> list[str]:
    """Columns of predictions.csv."""
    return (["file", "grade"] + [f"p_grade_{g}" for g in range(num_grades)] + ["quality"]
            + [f"p_{q}" for q in records.QUALITY_NAMES] + ["enhanced"])


def csv_row(path: str, out: dict[str, np.ndarray], i: int, num_grades: int, enhanced_file: str) -> list[str]:
    """One row of predictions.csv from row i of the model's outputs (empty cells for absent networks)."""
    row = [path]
    if "dr_probs" in out:
        p = out["dr_probs"][i]
        row += [str(int(np.argmax(p)))] + [f"{v:.6f}" for v in p]
    else:
        row += [""] * (1 + num_grades)
    if "quality_probs" in out:
        p = out["quality_probs"][i]
        row += [records.QUALITY_NAMES[int(np.argmax(p))]] + [f"{v:.6f}" for v in p]
    else:
        row += [""] * (1 + len(records.QUALITY_NAMES))
    return row + [enhanced_file]


# --------------------------------------------------------------------------- the model
def check_checkpoint(restored: restore.Restored, gate_quality: bool) -> list[str]:
    """Notes on what a checkpoint cannot answer; raises ValueError when --gate-quality cannot work."""
    where = f"{restored.directory} ({restored.stage}: {'+'.join(restored.nets)})"
    if gate_quality and "iqa" not in restored.nets:
        raise ValueError(f"--gate-quality needs the IQA network, which {where} lacks; use a stage-3 "
                         "checkpoint (configs/stage3.py) or drop --gate-quality")
    return [f"{where} has no {net.upper()} network: the {role} columns stay empty (a stage-3 checkpoint, "
            f"configs/stage3.py, has all three)" for net, role in NET_ROLES.items() if net not in restored.nets]


def _run_batch(fn, restored: restore.Restored, mesh, images: list[np.ndarray], masks: list[np.ndarray],
               batch_size: int) -> dict[str, np.ndarray]:
    """The model on up to batch_size images, padded to batch_size (one compilation for every batch)."""
    n = len(images)
    pad = batch_size - n
    image = np.stack(images + [np.zeros_like(images[0])] * pad)
    mask = np.stack(masks + [np.zeros_like(masks[0])] * pad).astype(np.float32)
    x = image.astype(np.float32) / 255.0 * mask[..., None]
    batch = parallel.global_batch({"x": x, "mask": mask}, mesh)
    out = jax.device_get(fn(restored.state, batch["x"], batch["mask"]))
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


def predict(restored: restore.Restored, paths: list[str], out_dir: str, *, gate_quality: bool = False,
            batch_size: int = 8, mesh=None, log=None, explain: bool = False, report_html: bool = False
            ) -> dict[str, Any]:
    """Run the checkpoint over photographs and write predictions.csv, enhanced/*.png and skipped.txt.

    restored: from `restore.load_checkpoint`; paths: photograph files; batch_size: images per step (a
    multiple of the device count); log: where notes, skips and progress go (default stderr);
    explain: Grad-CAM overlays into explain/; report_html: report.html (and crops/, explain/) too.
    Returns {'rows': CSV rows (lists of str), 'skipped': [(path, reason)], 'report': its path or None}.
    """
    log = sys.stderr if log is None else log
    mesh = parallel.make_mesh(-1, 1) if mesh is None else mesh
    parallel.check_batch_divisible(batch_size, mesh, "--batch-size")
    for note in check_checkpoint(restored, gate_quality):
        print(f"note: {note}", file=log)
    if (explain or report_html) and "dr" not in restored.nets:
        print("note: Grad-CAM explains the DR grade, and this checkpoint has no DR network: no heatmaps",
              file=log)
    size, grades = int(restored.config.data.image_size), int(restored.config.data.num_grades)
    fn = inference.compiled_inference(restored.models, restored.nets, gate_quality=gate_quality,
                                      enhance_first=inference.enhance_before_grading(restored.stage))
    enhanced_dir = os.path.join(out_dir, "enhanced")
    storage.makedirs(enhanced_dir)
    extras = explain_lib.Outputs(out_dir, explain=explain, report_html=report_html,
                                 subtitle=f"{restored.directory} ({restored.stage}, step {restored.step})")
    rows: list[list[str]] = []
    skipped: list[tuple[str, str]] = []
    taken: set[str] = set()
    progress = _Progress(len(paths), log)
    chunk: list[tuple[str, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        images, masks = [c[1] for c in chunk], [c[2] for c in chunk]
        out = _run_batch(fn, restored, mesh, images, masks, batch_size)
        heat = (explain_lib.padded_heatmaps(restored, images, masks, out, batch_size)
                if extras.needs_heatmaps and "dr_probs" in out else [None] * len(chunk))
        row = lambda key, i: out[key][i] if key in out else None  # noqa: E731
        for i, (path, image, mask) in enumerate(chunk):
            # One name per photograph, shared by its enhanced, explain/ and crops/ files.
            stem, name, enhanced = enhanced_name(path, taken)[:-len(".png")], "", None
            if "enhanced" in out and out["enhance"][i]:
                enhanced = out["enhanced"][i]
                name = os.path.join("enhanced", f"{stem}.png")
                storage.atomic_file(os.path.join(out_dir, name),
                                    _png(np.clip(np.rint(enhanced * 255.0), 0, 255).astype(np.uint8)))
            rows.append(csv_row(path, out, i, grades, name))
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
    _write_tables(out_dir, rows, skipped, grades)
    page = extras.finish(skipped)
    progress(len(rows) + len(skipped), len(skipped), final=True)
    return {"rows": rows, "skipped": skipped, "report": page}


def _write_tables(out_dir: str, rows: list[list[str]], skipped: list[tuple[str, str]], grades: int) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(csv_header(grades))
    writer.writerows(rows)
    storage.atomic_file(os.path.join(out_dir, "predictions.csv"), text.getvalue().encode())
    # Always written, so an old list from an earlier run in the same folder cannot mislead.
    lines = "".join(f"{path}\t{' '.join(reason.split())}\n" for path, reason in skipped)
    storage.atomic_file(os.path.join(out_dir, "skipped.txt"), lines.encode())


# --------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (argv without the program name; default sys.argv[1:])."""
    parser = argparse.ArgumentParser(prog="python -m cleaq_jax.programs.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="stage directory written by training (e.g. RUN/stage3) or its checkpoints/ folder")
    parser.add_argument("--checkpoint-step", default="best", metavar="best|latest|STEP",
                        help="which of its checkpoints: the best by the run's validation metric (default), "
                             "the latest, or a step number")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="photographs and/or folders of photographs (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--gate-quality", action="store_true",
                        help="enhance (and grade enhanced) only images IQA does not rate good")
    parser.add_argument("--explain", action="store_true",
                        help="write Grad-CAM heatmaps of the reported grade over each photograph and its "
                             "enhancement into explain/")
    parser.add_argument("--report", action="store_true",
                        help="write report.html: a card per photograph, filterable by grade and quality "
                             "(implies --explain)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (1 when no photograph could be processed)."""
    args = parse_args(argv)
    paths = list_inputs(args.input)
    if not paths:
        print(f"error: no photographs ({', '.join(IMAGE_SUFFIXES)}) found in {' '.join(args.input)}",
              file=sys.stderr)
        return 2
    try:
        restored = restore.load_checkpoint(args.checkpoint, step=args.checkpoint_step)
        print(f"predict: {restored.directory} step {restored.step} ({restored.chosen})", file=sys.stderr)
        storage.makedirs(args.out)
        result = predict(restored, paths, args.out, gate_quality=args.gate_quality, batch_size=args.batch_size,
                         explain=args.explain, report_html=args.report)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"predict: {len(result['rows'])} predicted, {len(result['skipped'])} skipped; "
          f"{os.path.join(args.out, 'predictions.csv')}" + (f", {result['report']}" if result["report"] else ""),
          file=sys.stderr)
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
