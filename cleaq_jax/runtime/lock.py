"""One run per stage directory: `StageLock`, the lock a training run holds on ``<workdir>/<stage>``.

Two runs started on one workdir by mistake would write the same checkpoints, TensorBoard files and data
position, each resuming over the other's saves. A training run therefore holds ``<stage dir>/lock.json``
(`LOCK_NAME`) while it trains that stage; a second run that finds it held stops at once with
`StageBusyError`, one line naming the first run's host and process id.

The lock file is created whole in one step: written under a temporary name and hard-linked to its own
name, which fails when the name exists (locally; on ``gs://`` it is written and read back, which narrows
but does not close the window in which two runs both take it). It names the host, the process id and
its start time, and a heartbeat that a thread refreshes every `HEARTBEAT_S` seconds. It is removed when
the run leaves the stage by any exit Python sees (the stage finished, SIGTERM, an error); a run killed
with SIGKILL, or a lost host, leaves it behind. Such a lock is stale, and the next run takes it over
saying so, when

- it names this host and its process is gone (or the process id now belongs to a process started
  later, or is a zombie), or
- its heartbeat is older than `STALE_AFTER_S` seconds (another host's run: its process cannot be
  looked up from here).

With several processes (jax.distributed) only process 0 takes the lock; the others learn its outcome
through the coordination service and stop with it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import jax

from cleaq_jax import errors
from cleaq_jax.runtime import console, parallel, storage

LOCK_NAME = "lock.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class StageBusyError(errors.UserError, RuntimeError):
    """The stage directory is being trained by another run (its lock is held and not stale)."""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of stat(5); fields[0] is field 3 (the state)
    except (OSError, IndexError):
        return None


def _process_state(pid: int) -> str | None:
    """The one-letter state of process ``pid`` (Linux /proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return _process_state(pid) != "Z"


def stale_reason(holder: dict[str, Any], now: float | None = None) -> str | None:
    """Why a lock written by ``holder`` (the lock file's content) is stale, or None while its run may
    still be alive (module docstring)."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid <= 0 or not _alive(pid):
            return f"process {pid} is not running on this host"
        started = holder.get("pid_start")
        if started is not None and _process_start(pid) not in (None, started):
            return f"process id {pid} now belongs to a process started later"
        return None
    age = now - float(holder.get("heartbeat", 0.0))
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age / 60:.0f} min old (a lock is stale after {STALE_AFTER_S / 60:.0f} min)"
    return None


def describe_holder(holder: dict[str, Any], now: float | None = None) -> str:
    """``pid 123 on host h (started 2026-01-02 03:04:05, heartbeat 12 s ago)``."""
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0.0))))
    age = max(now - float(holder.get("heartbeat", 0.0)), 0.0)
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {started}, "
            f"heartbeat {age:.0f} s ago)")


class StageLock:
    """The lock of one stage directory, held inside ``with`` (module docstring).

    directory: the stage directory (created if missing); the lock is ``<directory>/lock.json``.
    Entering raises `StageBusyError` when another live run holds it; a stale one is taken over with a
    line saying whose it was and why it is stale.
    """

    def __init__(self, directory: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S):
        self.directory = os.fspath(directory)
        self.path = storage.join(self.directory, LOCK_NAME)
        self._heartbeat_s = float(heartbeat_s)
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    # ------------------------------------------------------------------ content
    def _content(self) -> dict[str, Any]:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                "started": self._started, "heartbeat": now, "token": self._token}

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the lock's content, its raw text); (None, None) when there is no lock, ({}, text) when
        it cannot be parsed."""
        try:
            text = storage.read_text(self.path)
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(text)
        except ValueError:
            return {}, text
        return (holder if isinstance(holder, dict) else {}), text

    def _create(self) -> bool:
        """Put our lock file at ``self.path`` whole unless one is there; True when it is ours."""
        text = json.dumps(self._content(), indent=1)
        if storage.is_remote(self.path):
            if storage.exists(self.path):
                return False
            storage.atomic_file(self.path, text)
            holder, _ = self._read()
            return bool(holder) and holder.get("token") == self._token
        tmp = storage.join(self.directory, f".tmp-{self._token}-{LOCK_NAME}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            os.link(tmp, self.path)  # fails when the name exists: the whole file appears, or nothing
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def _remove_if(self, text: str) -> None:
        """Remove the lock if its content is still ``text`` (a stale one judged so), as one step locally:
        it is renamed aside first, and put back when another run replaced it meanwhile."""
        if storage.is_remote(self.path):
            if self._read()[1] == text:
                storage.remove(self.path)
            return
        aside = storage.join(self.directory, f".stale-{self._token}-{LOCK_NAME}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        with open(aside, encoding="utf-8") as f:
            taken = f.read()
        if taken != text:  # another run took over in between: its lock goes back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.remove(aside)

    # ------------------------------------------------------------------ acquire and release
    def acquire(self) -> None:
        """Take the lock, or raise `StageBusyError` naming the run that holds it."""
        storage.makedirs(self.directory)
        self._started = time.time()
        for _ in range(5):
            if self._create():
                self._held = True
                self._start_heartbeat()
                return
            holder, text = self._read()
            if holder is None:  # removed in between: try again
                continue
            if holder:
                reason = stale_reason(holder)
                who = describe_holder(holder)
            else:  # unreadable: stale only once nobody has written it for the heartbeat timeout
                age = time.time() - storage.mtime(self.path)
                reason = f"it is unreadable and {age / 60:.0f} min old" if age > STALE_AFTER_S else None
                who = f"a run whose lock {self.path} cannot be read"
            if reason is None:
                raise StageBusyError(
                    f"{self.directory} is being trained by another run: {who}. Wait for it or stop it, or give "
                    f"this run another --workdir (if that run is gone for good, delete {self.path})")
            console.say("%s: taking over the lock of an earlier run that is gone: %s; %s", self.directory, who, reason)
            self._remove_if(text)
        raise StageBusyError(f"{self.directory}: its lock {self.path} keeps changing hands; is another run starting?")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="stage-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                holder, _ = self._read()
                if holder and holder.get("token") == self._token:
                    storage.atomic_file(self.path, json.dumps(self._content(), indent=1))
            except OSError as e:  # a full disk or a lost bucket must not end the run from this thread
                console.say("%s: could not refresh the lock's heartbeat: %s", self.directory, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        if not self._held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._held = False
        holder, _ = self._read()
        if holder and holder.get("token") == self._token:
            storage.remove(self.path)

    def __enter__(self) -> StageLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RunLock:
    """The locks of the stage directories a run trains, taken together as the run starts (so a second
    run of a pipeline stops at once, not at the stage the first is in) and released as it ends. With
    several processes only process 0 takes them; the others wait for its outcome and share it."""

    def __init__(self, directories: list[str]):
        self._locks = [StageLock(d) for d in directories]
        self._taken: list[StageLock] = []

    def __enter__(self) -> RunLock:
        error = ""
        if jax.process_index() == 0:
            try:
                for lock in self._locks:
                    lock.acquire()
                    self._taken.append(lock)
            except StageBusyError as e:
                self._release()
                error = str(e)
        if jax.process_count() > 1:
            error = parallel.broadcast_text("stage-lock", error)
        if error:
            raise StageBusyError(error if jax.process_index() == 0 else f"(process 0) {error}")
        return self

    def _release(self) -> None:
        while self._taken:
            self._taken.pop().release()

    def __exit__(self, *exc: Any) -> None:
        self._release()
