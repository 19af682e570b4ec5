"""Paths that may name Cloud Storage (``gs://BUCKET/...``) as well as local disk.

Checkpoints, iterator positions, evaluation reports and TensorBoard logs go to the run's workdir, which
on Cloud TPU is usually a bucket. Remote paths go through `etils.epath`, which reaches ``gs://``
through gcsfs (a dependency), or through TensorFlow's tf.io.gfile when TensorFlow happens to be installed
(``EPATH_USE_TF=false`` chooses gcsfs then; the tests do, against a local emulator). Local paths keep
plain file operations, so local behaviour is that of the standard library, and etils is imported only
when a remote path is met: predict from an exported model runs where etils is not installed.

Every program reads and writes a run's files (workdirs, reports, study results, pretrained weights,
TensorBoard logs) through this module, so the same code serves a local folder and a bucket; a local
path is always made absolute with `absolute`, which leaves ``gs://`` paths as they are (``os.path.abspath``
would turn ``gs://B`` into ``$PWD/gs:/B``). A library that opens local files only (TensorBoard's event
reader, numpy's ``.npz`` loader) gets a local copy of a remote file or of a directory's files from
`local_file` / `local_files`, removed afterwards.

`atomic_file` puts a file at its path whole, locally or in a bucket; `move_into_place` puts a finished local
file or directory at its path in one rename. `MirroredWriter` is the TensorBoard writer of a remote log
directory (`summaries.open_writer`): its event files are written in a local temporary directory and
copied to the bucket at every flush and at close, because an event file grows by appends, which a Cloud
Storage object cannot take.

Shards are the exception: ArrayRecord reads local files only, so a ``gs://`` data directory is refused
with the two ways to reach it (`require_local`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob as glob_lib
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Iterator

from cleaq_jax import errors


def _remote(path: str | os.PathLike) -> Any:
    """``etils.epath.Path(path)``, for a remote path."""
    from etils import epath  # only remote paths need it: local ones use the standard library (module doc)

    return epath.Path(path)


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL-like path (``gs://...``, ``s3://...``), False for a local one."""
    return "://" in os.fspath(path)


def join(*parts: str | os.PathLike) -> str:
    """``os.path.join`` for strings: also right for ``gs://`` paths, whose separator is ``/``."""
    return os.path.join(*(os.fspath(p) for p in parts))


def absolute(path: str | os.PathLike) -> str:
    """``os.path.abspath`` of a local path; a remote path as given, without a trailing ``/``."""
    path = os.fspath(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def basename(path: str | os.PathLike) -> str:
    """The last name of a path, local or remote (``gs://b/run/`` -> ``run``; ``.`` -> the current folder's)."""
    return os.path.basename(absolute(path))


def exists(path: str | os.PathLike) -> bool:
    return _remote(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    return _remote(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names in a directory (no order promised)."""
    return [p.name for p in _remote(path).iterdir()] if is_remote(path) else os.listdir(path)


def glob(directory: str | os.PathLike, pattern: str) -> list[str]:
    """Paths of the entries directly in ``directory`` whose names match the shell ``pattern`` (sorted;
    none when ``directory`` does not exist)."""
    if not is_remote(directory):
        return sorted(glob_lib.glob(os.path.join(glob_lib.escape(os.fspath(directory)), pattern)))
    if not isdir(directory):
        return []
    return sorted(join(directory, name) for name in listdir(directory) if fnmatch.fnmatchcase(name, pattern))


def makedirs(path: str | os.PathLike) -> None:
    _remote(path).mkdir(parents=True, exist_ok=True) if is_remote(path) else os.makedirs(path, exist_ok=True)


def remove(path: str | os.PathLike) -> None:
    """Delete a file."""
    _remote(path).unlink() if is_remote(path) else os.remove(path)


def mtime(path: str | os.PathLike) -> float:
    """A file's modification time (seconds since the epoch)."""
    return _remote(path).stat().mtime if is_remote(path) else os.path.getmtime(path)


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content."""
    return read_bytes(path).decode("utf-8")


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's content."""
    if is_remote(path):
        return _remote(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def local_file(path: str | os.PathLike) -> Iterator[str]:
    """A local file name holding ``path``'s content, for readers that open local files only: ``path``
    itself when local, else a copy in a temporary directory that is removed on leaving the context."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="cleaq-") as local_dir:
        local = os.path.join(local_dir, os.path.basename(absolute(path)))
        with open(local, "wb") as f:
            f.write(read_bytes(path))
        yield local


@contextlib.contextmanager
def local_files(directory: str | os.PathLike, pattern: str = "*") -> Iterator[str]:
    """A local directory holding the files directly in ``directory`` whose names match ``pattern``:
    ``directory`` itself when local, else a temporary copy removed on leaving the context."""
    if not is_remote(directory):
        yield os.fspath(directory)
        return
    with tempfile.TemporaryDirectory(prefix="cleaq-") as local_dir:
        for path in glob(directory, pattern):
            if not isdir(path):
                with open(os.path.join(local_dir, os.path.basename(path)), "wb") as f:
                    f.write(read_bytes(path))
        yield local_dir


def atomic_file(path: str | os.PathLike, content: bytes | str | Callable[[str], None]) -> None:
    """Put a whole file at ``path``: ``content`` as bytes, as UTF-8 text, or written by ``content(tmp)``.

    A callable ``content`` is called with a temporary local file name and writes that file itself (any
    format: figures, tables, ArrayRecord shards). The result is first put at ``.tmp-<uuid>-<name>`` beside
    ``path`` and renamed over it, so a reader never sees half a file, and the temporary name is removed
    if anything fails. Local ``path``: the temporary file is written in place (created with open(), so it
    gets the usual umask permissions). Remote ``path``: it is filled in a local temporary directory
    (figures and tables are drawn by libraries that open local files), uploaded to the temporary name
    through epath and renamed there.
    """
    write = content if callable(content) else functools.partial(_write_content, content=content)
    path = os.fspath(path)
    tmp = join(os.path.dirname(path) or ".", f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    if is_remote(path):
        target, staged = _remote(path), _remote(tmp)
        try:
            with tempfile.TemporaryDirectory(prefix="cleaq-") as local_dir:
                local = os.path.join(local_dir, os.path.basename(path))
                write(local)
                with open(local, "rb") as f:
                    staged.write_bytes(f.read())
            staged.replace(target)
        finally:
            if staged.exists():
                staged.unlink()
        return
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_content(tmp: str, content: bytes | str) -> None:
    if isinstance(content, bytes):
        with open(tmp, "wb") as f:
            f.write(content)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)


def move_into_place(finished: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished local file or directory to ``path`` in one step, replacing a file there.

    For what was written whole under a hidden name beside its destination (a shard, a shard set's files):
    a reader sees the old ``path`` or the complete new one, never part of it. Both paths must be on one
    local file system.
    """
    os.replace(finished, path)


class MirroredWriter:
    """A metric writer whose TensorBoard files go to a local directory first and then, whole, to a
    remote one: `flush` and `close` copy every file under ``local_dir`` that changed since the last copy
    (a Cloud Storage object cannot be appended to, so a grown event file is uploaded again), and `close`
    removes ``local_dir``. The event files (and profiler traces written beside them) travel through
    `etils.epath` like every other file of a run.

    inner: the writer into ``local_dir`` (e.g. ``summaries.SummaryWriter(local_dir)``); every other
    method is ``inner``'s.
    """

    def __init__(self, inner: Any, local_dir: str, remote_dir: str):
        self._inner, self.local_dir, self.remote_dir = inner, local_dir, os.fspath(remote_dir)
        self._copied: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) when last copied

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def flush(self) -> None:
        self._inner.flush()
        self.mirror()

    def close(self) -> None:
        try:
            self._inner.close()
            self.mirror()
        finally:
            shutil.rmtree(self.local_dir, ignore_errors=True)

    def mirror(self) -> list[str]:
        """Copy the files under ``local_dir`` that changed since the last call to the same relative paths
        under ``remote_dir``; returns their relative paths."""
        copied = []
        for root, _, files in os.walk(self.local_dir):
            for name in sorted(files):
                local = os.path.join(root, name)
                relative = os.path.relpath(local, self.local_dir)
                stat = os.stat(local)
                if self._copied.get(relative) == (stat.st_size, stat.st_mtime_ns):
                    continue
                target = _remote(self.remote_dir) / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(local, "rb") as f:
                    target.write_bytes(f.read())
                self._copied[relative] = (stat.st_size, stat.st_mtime_ns)
                copied.append(relative)
        return copied


def require_local(path: str | os.PathLike, what: str) -> None:
    """Refuse a remote ``path`` for data that only local file reads can open (ArrayRecord shards)."""
    if is_remote(path):
        raise errors.StorageError(
            f"{what} {os.fspath(path)} is on remote storage, which ArrayRecord cannot read: copy the shards to "
            f"a local disk (gcloud storage cp -r {os.fspath(path)} DIR) or mount the bucket with Cloud Storage "
            f"FUSE, and pass that local path (docs/launch.md)")
