"""A run's files: where its eval.json and run.json are, and how the study reads and writes JSON.

eval.json is what the run's final stage wrote (its existence marks the run finished); run.json is the
study's record of the run: its command, status and wall time. Both may be in a bucket (a ``gs://`` study
workdir): they are read and written through `runtime.storage`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cleaq_jax.runtime import storage


def eval_json_path(run: Mapping[str, Any]) -> str:
    """The evaluation of the run's final stage: ``<run>/<stage>/eval/eval.json``."""
    return storage.join(run["dir"], run["stage"], "eval", "eval.json")


def run_json_path(run: Mapping[str, Any]) -> str:
    return storage.join(run["dir"], "run.json")


def read_json(path: str) -> dict[str, Any] | None:
    """The file's JSON, or None when there is no such file."""
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON, put at ``path`` whole."""
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    storage.atomic_file(path, dump)


def read_run_record(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's run.json (command, wall time, status), or None before its first start."""
    return read_json(run_json_path(run))
