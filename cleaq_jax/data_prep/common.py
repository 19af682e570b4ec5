"""Machinery shared by the dataset prep CLIs (eyeq, messidor, drive).

A CLI turns its published label files into `Job`s (one per image, each with its split) and `Skip`s
(rows it could not use, with the reason), then calls `run`: images are decoded, disc-cropped and
PNG-encoded by a pool of worker processes, written in a fixed order through `ShardWriter` (so the
shards do not depend on ``--workers``), and every skipped item is printed at the end and listed in
``skipped-<split>.txt`` beside the shards. With ``--strict`` any skip stops the run with exit code 1
and nothing is written; an interrupted run leaves only hidden temporary directories, never a shard
name or manifest entry.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import multiprocessing
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from cleaq_jax import errors
from cleaq_jax.data import fundus
from cleaq_jax.data.records import encode_record
from cleaq_jax.data.shards import MANIFEST, ShardWriter, format_counts, read_manifest
from cleaq_jax.runtime import storage


class PrepError(errors.UserError):
    """A problem that stops a prep run (missing folder, no usable labels); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to prepare: its split, id (file stem), image path, labels and any other files it needs."""

    split: str
    id: str
    image: str
    dr_grade: int = -1
    quality: int = -1
    extra: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Skip:
    """An item left out, with the file at fault and why (a label row, an image, a whole label file)."""

    split: str
    id: str
    file: str
    reason: str

    def line(self) -> str:
        return f"{self.id or '-'}\t{self.file}\t{self.reason}"


# An encoder turns a job into a record dict (see cleaq_jax.data.records); it runs in worker processes,
# so it must be a module-level function, and raises ValueError/OSError for an item to be skipped.
Encoder = Callable[[Job, int], Mapping[str, Any]]
# A finisher rewrites a batch of encoded records in the main process (e.g. one batched JAX program over
# them), given their jobs; it returns as many records, in order.
Finisher = Callable[[Sequence[Job], Sequence[bytes]], Sequence[bytes]]


def add_arguments(parser: argparse.ArgumentParser, *, num_shards: int) -> None:
    """The options every prep CLI shares: --out, --size, --workers, --num-shards, --strict, -v."""
    parser.add_argument("--out", required=True, help="output folder for shards, manifest.json and skip reports")
    parser.add_argument("--size", type=positive_int, default=512, help="side of the square output images (px)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="worker processes for decoding and cropping (default: all cores)")
    parser.add_argument("--num-shards", type=positive_int, default=num_shards, help="ArrayRecord shards per split")
    parser.add_argument("--strict", action="store_true",
                        help="stop with exit code 2, writing nothing, at the first item that would be skipped")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The shell command that ran ``module`` with ``argv`` (default sys.argv[1:]), as the manifest records it."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def positive_int(text: str) -> int:
    """argparse type: a positive integer, or an error naming the value."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def encode_fundus(job: Job, size: int) -> dict[str, Any]:
    """Job -> record dict for a plain fundus photograph: disc-cropped image, retinal mask, labels."""
    image, mask = fundus.preprocess(fundus.load_image(job.image), size, name=job.image)
    return {"image": image, "mask": mask, "vessel": None, "dr_grade": job.dr_grade, "quality": job.quality,
            "id": job.id}


def _init_worker() -> None:
    import cv2

    # One OpenCV thread per process (the pool is the parallelism); failures are reported by name instead.
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def _work(encode: Encoder, source: str, size: int, job: Job) -> tuple[bytes | None, str]:
    try:
        return encode_record({**encode(job, size), "source": source}), ""
    except (ValueError, OSError) as e:
        # The report names the file already: drop the path that fundus errors start with.
        return None, str(e).removeprefix(f"{job.image}: ")


def _results(jobs: Sequence[Job], encode: Encoder, source: str, size: int,
             workers: int) -> Iterator[tuple[bytes | None, str]]:
    """(record bytes or None, skip reason) for each job, in job order whatever the worker count."""
    fn = functools.partial(_work, encode, source, size)
    if workers <= 1 or len(jobs) <= 1:
        _init_worker()
        yield from map(fn, jobs)
        return
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_init_worker)
    try:
        yield from pool.imap(fn, jobs, chunksize=max(1, min(8, len(jobs) // (4 * workers))))
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _progress(total: int, source: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{source}", unit="img", file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}")


def _report(skips: Sequence[Skip]) -> None:
    if skips:
        print(f"skipped {len(skips)} item(s):", file=sys.stderr)
        for s in skips:
            print(f"  [{s.split}] {s.id or '-'}: {s.file}: {s.reason}", file=sys.stderr)


def _write_skip_files(out: str, source: str, counts: Mapping[str, int], skips: Sequence[Skip]) -> None:
    for split, written in counts.items():
        lines = [s.line() for s in skips if s.split == split]
        header = (f"# {source}/{split}: {len(lines)} skipped, {written} written. "
                  "Columns: id, file, reason (tab-separated).\n")
        storage.atomic_file(os.path.join(out, f"skipped-{split}.txt"), header + "".join(f"{x}\n" for x in lines))


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How a job becomes record bytes: ``encode`` in the worker processes, then, when ``finish`` is given,
    ``finish`` in this process over ``finish_batch`` records at a time."""

    encode: Encoder = encode_fundus
    finish: Finisher | None = None
    finish_batch: int = 16


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What the manifest records about where a split came from: ``command``, the command line that
    rebuilds it (as ``prep_command``), ``extra`` keys on every split and ``per_split[split]`` on one."""

    command: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    per_split: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


def run(args: argparse.Namespace, source: str, jobs: Sequence[Job], skips: Sequence[Skip],
        encoding: Encoding = Encoding(), provenance: Provenance = Provenance()) -> int:
    """Prepare ``jobs`` into ArrayRecord shards under ``args.out``; returns the process exit code.

    args: the options of `add_arguments` (out, size, workers, num_shards, strict). source: the
    dataset's name. jobs: images with split and labels (their order within a split is fixed by
    sorting on id); skips: items the CLI already rejected while reading labels. Writes one shard set
    per split, ``skipped-<split>.txt`` beside it, and merges the splits into manifest.json with the
    ``provenance``; records are made as ``encoding`` says. Prints the manifest's counts table.
    Raises `PrepError`, writing nothing (after listing the skips), when --strict meets a skip or a split
    ends up with no records.
    """
    skips = list(skips)
    splits = list(dict.fromkeys([j.split for j in jobs] + [s.split for s in skips]))
    if skips and args.strict:
        _fail(f"--strict: {skips[0].file}: {skips[0].reason}", skips)
    if not jobs:
        _fail(f"{source}: no usable items to prepare", skips)
    order = {s: i for i, s in enumerate(splits)}
    jobs = sorted(jobs, key=lambda j: (order[j.split], j.id))
    command = {"prep_command": provenance.command} if provenance.command else {}
    extra = {"source": source, **provenance.extra, **command}
    writers = {s: ShardWriter(args.out, source, s, args.num_shards, {**extra, **provenance.per_split.get(s, {})})
               for s in dict.fromkeys(j.split for j in jobs)}
    results = _results(jobs, encoding.encode, source, args.size, args.workers)
    try:
        with _progress(len(jobs), source) as bar, contextlib.closing(results):
            for job, data, reason in _finished(jobs, results, encoding.finish, encoding.finish_batch):
                bar.update(1)
                if data is None:
                    skips.append(Skip(job.split, job.id, job.image, reason))
                    if args.strict:
                        raise PrepError(f"--strict: {job.image}: {reason}")
                    bar.set_postfix_str(f"skipped {len(skips)}", refresh=False)
                    continue
                writers[job.split].write(data)
        empty = [s for s in splits if s not in writers or len(writers[s]) == 0]
        if empty:
            raise PrepError(f"{source}: every item of split(s) {', '.join(empty)} was skipped; nothing written")
    except BaseException as e:  # also KeyboardInterrupt: a stopped run must leave no shards behind
        for w in writers.values():
            w.abort()
        if isinstance(e, PrepError):
            _report(skips)
        raise
    _close(args.out, source, writers, skips)
    return 0


def _finished(jobs: Sequence[Job], results: Iterator[tuple[bytes | None, str]], finish: Finisher | None,
              batch: int) -> Iterator[tuple[Job, bytes | None, str]]:
    """(job, record bytes or None, skip reason); records go through ``finish`` ``batch`` at a time, keeping
    their order (skips pass at once: they write nothing)."""
    pending: list[tuple[Job, bytes]] = []

    def flush() -> Iterator[tuple[Job, bytes | None, str]]:
        done = finish([j for j, _ in pending], [d for _, d in pending]) if finish else [d for _, d in pending]
        batch_jobs = [j for j, _ in pending]
        pending.clear()
        for job, data in zip(batch_jobs, done, strict=True):
            yield job, data, ""

    for job, (data, reason) in zip(jobs, results):
        if data is None:
            yield job, None, reason
            continue
        pending.append((job, data))
        if finish is None or len(pending) >= batch:
            yield from flush()
    if pending:
        yield from flush()


def _close(out: str, source: str, writers: Mapping[str, ShardWriter], skips: Sequence[Skip]) -> None:
    """Move every split into place, write the skip reports and print them and the counts table."""
    for split, w in writers.items():
        w.extra["skipped"] = sum(s.split == split for s in skips)
        paths = w.close()
        print(f"{source}/{split}: {len(w)} records in {len(paths)} shard(s) under {out}", file=sys.stderr)
    _write_skip_files(out, source, {s: len(w) for s, w in writers.items()}, skips)
    _report(skips)
    print(f"counts by split x quality x grade ({os.path.join(out, MANIFEST)}):\n"
          f"{format_counts(read_manifest(out))}", file=sys.stderr)


def _fail(message: str, skips: Sequence[Skip]) -> None:
    """List the skips, then stop with `PrepError` (its line comes last, from `errors.reported`)."""
    _report(skips)
    raise PrepError(message)
