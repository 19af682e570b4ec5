"""Running the study's runs: each unfinished run as a ``cleaq_jax.main`` subprocess, a few at a time.

A run waits for the run it starts from (its ``after``) and is not started when that one failed. Each run's
output goes to ``<run>/train.log`` and its command, status, wall time and load to ``<run>/run.json``. In a
bucket (a ``gs://`` study workdir) the run trains there itself (``cleaq_jax.main`` writes gs:// workdirs);
its output is collected in a local temporary file and appended to the bucket's train.log when it ends.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import cleaq_jax
from cleaq_jax import errors
from cleaq_jax.programs.ablations.plan import typed_command
from cleaq_jax.programs.ablations.run_files import eval_json_path, read_run_record, run_json_path, write_json
from cleaq_jax.runtime import storage

# The folder holding the cleaq_jax that plans the study; the runs import cleaq_jax from there.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(cleaq_jax.__file__)))


def check_same_settings(run: Mapping[str, Any]) -> None:
    """Refuse to resume or reuse a run directory that was made with another command."""
    record = read_run_record(run)
    # Flags in another order (a preset's keys reordered) are the same settings.
    if record is not None and sorted(record["command"][1:]) != sorted(run["command"][1:]):
        raise errors.ConfigError(
            f"{run['dir']} was run with other settings:\n  {typed_command(record['command'])}\nnot\n  "
            f"{typed_command(run['command'])}\nUse another --workdir, or delete that run directory to redo it.")


def _run_environment(workdir: str) -> dict[str, str]:
    """The runs' environment: the study's shared compilation cache, and this cleaq_jax importable first (a
    run trains with the code that planned it)."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", storage.join(workdir, ".jax_cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_PARENT, env.get("PYTHONPATH", "")]))
    return env


def _log_path(run: Mapping[str, Any]) -> str:
    return storage.join(run["dir"], "train.log")


def _start_run(run: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    storage.makedirs(run["dir"])
    if storage.is_remote(run["dir"]):  # a bucket object takes no appends: collected here, copied at the end
        log = tempfile.NamedTemporaryFile(prefix="cleaq-train-", suffix=".log", delete=False)  # noqa: SIM115
    else:
        log = open(_log_path(run), "ab")  # noqa: SIM115  (open until the run ends)
    print(f"[ablations] start {run['variant']} seed {run['seed']}: {typed_command(run['command'])}", flush=True)
    started = time.time()
    write_json(run_json_path(run), {"command": run["command"], "status": "running", "started": started})
    proc = subprocess.Popen(run["command"], env=dict(env), stdout=log, stderr=subprocess.STDOUT)
    return {"run": run, "proc": proc, "log": log, "started": started, "load_start": os.getloadavg()[0]}


def _finish_run(job: dict[str, Any]) -> dict[str, Any]:
    job["log"].close()
    run, rc = job["run"], job["proc"].returncode
    if storage.is_remote(run["dir"]):
        _append_remote_log(job["log"].name, _log_path(run))
    wall = time.time() - job["started"]
    status = "finished" if rc == 0 and storage.exists(eval_json_path(run)) else "failed"
    record = {"command": run["command"], "status": status, "returncode": rc, "started": job["started"],
              "wall_s": round(wall, 1), "load_average_1min": [round(job["load_start"], 2),
                                                               round(os.getloadavg()[0], 2)]}
    write_json(run_json_path(run), record)
    print(f"[ablations] {status} {run['variant']} seed {run['seed']} in {wall:.0f} s"
          + ("" if status == "finished" else f" (exit {rc}); log: {_log_path(run)}"),
          flush=True)
    return record


def _append_remote_log(local: str, remote: str) -> None:
    """Put the bucket's ``remote`` log back whole with the local file's lines added, and remove ``local``."""
    try:
        with open(local, "rb") as f:
            new = f.read()
        old = storage.read_bytes(remote) if storage.exists(remote) else b""
        storage.atomic_file(remote, old + new)
    finally:
        os.remove(local)


def run_unfinished(runs: Sequence[dict[str, Any]], workdir: str, jobs: int = 1) -> list[dict[str, Any]]:
    """Run every unfinished run (at most ``jobs`` at once; a run with an ``after`` waits for that run and is
    not started when it failed); returns the runs that failed or could not start."""
    todo = []
    for run in runs:
        if storage.exists(eval_json_path(run)):
            print(f"[ablations] skip {run['variant']} seed {run['seed']}: {eval_json_path(run)} exists", flush=True)
        else:
            todo.append(run)
    pending = {r["dir"] for r in todo}
    env, active, failed = _run_environment(workdir), [], []
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
            active.append(_start_run(run, env))
        time.sleep(0.2)
        for job in [j for j in active if j["proc"].poll() is not None]:
            active.remove(job)
            pending.discard(job["run"]["dir"])
            if _finish_run(job)["status"] != "finished":
                failed.append(job["run"])
    return failed
