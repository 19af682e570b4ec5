"""Paths that may name Cloud Storage (``gs://BUCKET/...``) as well as local disk.

Checkpoints, iterator positions, evaluation reports and TensorBoard logs go to the run's workdir, which
on Cloud TPU is usually a bucket. Everything here goes through `etils.epath`, which reaches ``gs://``
through TensorFlow's tf.io.gfile when TensorFlow is installed and through gcsfs otherwise
(``EPATH_USE_TF=false`` chooses gcsfs; the tests do, against a local emulator). Local paths keep plain
file operations, so local behaviour is that of the standard library.

Shards are the exception: ArrayRecord reads local files only, so a ``gs://`` data directory is refused
with the two ways to reach it (`require_local`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Callable

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL-like path (``gs://...``, ``s3://...``), False for a local one."""
    return "://" in os.fspath(path)


def join(*parts: str | os.PathLike) -> str:
    """``os.path.join`` for strings: also right for ``gs://`` paths, whose separator is ``/``."""
    return os.path.join(*(os.fspath(p) for p in parts))


def exists(path: str | os.PathLike) -> bool:
    return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names in a directory (no order promised)."""
    return [p.name for p in epath.Path(path).iterdir()] if is_remote(path) else os.listdir(path)


def makedirs(path: str | os.PathLike) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True) if is_remote(path) else os.makedirs(path, exist_ok=True)


def read_text(path: str | os.PathLike) -> str:
    return epath.Path(path).read_text()


def atomic_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` with a local temporary file name, then put the result at ``path`` whole.

    Local ``path``: the temporary name is beside it (``.tmp-<uuid>-<name>``, created by ``write`` with the
    usual umask permissions) and renamed over it, so a reader never sees half a file; it is removed if
    ``write`` fails. Remote ``path``: ``write`` fills a file in a local temporary directory, which is then
    uploaded as one object (a Cloud Storage object appears only when its upload completes).
    """
    path = os.fspath(path)
    if is_remote(path):
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = os.path.join(tmp_dir, os.path.basename(path))
            write(tmp)
            with open(tmp, "rb") as f:
                epath.Path(path).write_bytes(f.read())
        return
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def mirror(local_dir: str, remote_dir: str) -> None:
    """Copy every file under ``local_dir`` to the same relative path under ``remote_dir``, each whole
    (objects cannot be appended to, so a growing file is uploaded again)."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            target = epath.Path(remote_dir) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(os.path.join(root, name), "rb") as f:
                target.write_bytes(f.read())


def local_stand_in(remote_dir: str) -> str:
    """A new local temporary directory that stands in for ``remote_dir`` (see `mirror`)."""
    return tempfile.mkdtemp(prefix="cleaq-" + os.path.basename(remote_dir.rstrip("/")) + "-")


def remove_tree(local_dir: str) -> None:
    shutil.rmtree(local_dir, ignore_errors=True)


def require_local(path: str | os.PathLike, what: str) -> None:
    """Refuse a remote ``path`` for data that only local file reads can open (ArrayRecord shards)."""
    if is_remote(path):
        raise ValueError(
            f"{what} {os.fspath(path)} is on remote storage, which ArrayRecord cannot read: copy the shards to "
            f"a local disk (gcloud storage cp -r {os.fspath(path)} DIR) or mount the bucket with Cloud Storage "
            f"FUSE, and pass that local path (docs/launch.md)")
