"""A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``): no
Python dependency beyond the standard library. Used to check that HTML pages load cleanly.

The browser reads commands from its fd 3 and writes replies and events to its fd 4, each message a JSON
object ended by a NUL byte. `Page` collects the console errors, uncaught exceptions and log errors (a
missing image, a blocked request) of the page it opens.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REQUIRE_ENV = "CLEAQ_REQUIRE_BROWSER"


def find_browser() -> str:
    """Path of a Chromium binary; skips the test without one, or fails when CLEAQ_REQUIRE_BROWSER=1."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    why = f"no Chromium found (looked for {', '.join(NAMES)}); on Debian: apt-get install chromium"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{why} ({REQUIRE_ENV}=1 demands the browser test)")
    pytest.skip(why)


def _high_fd(fd: int) -> int:
    """``fd`` moved to a descriptor number of at least 10 (close-on-exec, as pipes are made)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def _bash() -> str:
    path = shutil.which("bash")
    if path is None:
        pytest.skip("bash is needed to hand the browser its DevTools pipes")
    return path


class Page:
    """One headless browser with one page. Use as a context manager; `open(url)` waits for the load."""

    def __init__(self, profile_dir: str, timeout_s: float = 60.0, window=(1280, 900)):
        self.timeout_s = timeout_s
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()
        # Above 9, so the moves below never overwrite each other (the pipes may have been given 3 or 4).
        to_child, from_child = (_high_fd(fd) for fd in (to_child, from_child))
        flags = ["--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe", "--no-first-run",
                 "--no-default-browser-check", f"--user-data-dir={profile_dir}",
                 f"--window-size={window[0]},{window[1]}", "about:blank"]
        # The browser expects its command pipe on fd 3 and its reply pipe on fd 4. bash moves them there, so
        # no Python runs between fork and exec (unsafe beside JAX's threads); dash cannot name fds above 9.
        move = f'exec "$0" "$@" 3<&{to_child} 4>&{from_child} {to_child}<&- {from_child}>&-'
        self.proc = subprocess.Popen([_bash(), "-c", move, find_browser(), *flags],
                                     pass_fds=(to_child, from_child),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._next_id, self.events = b"", 0, []
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=True)

    # ------------------------------------------------------------------ protocol
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"the browser sent nothing for {self.timeout_s:.0f} s")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError(f"the browser exited (status {self.proc.poll()})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _wait(self, accept) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while True:
            message = self._read_message(deadline)
            if "method" in message:
                self.events.append(message)
            if accept(message):
                return message

    def call(self, method: str, session: bool = False, **params) -> dict:
        """Send one command (to the page's session when ``session``) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == message["id"])
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    # ------------------------------------------------------------------ what a test uses
    def open(self, url: str) -> None:
        """Navigate and wait for the load event (scripts have run, images have loaded or failed)."""
        self.events.clear()
        reply = self.call("Page.navigate", session=True, url=url)
        if "loaderId" not in reply:  # a fragment change within the open page: no new load, so reload it
            self.call("Page.reload", session=True)
        self._wait(lambda m: m.get("method") == "Page.loadEventFired")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries since the last `open`."""
        self.evaluate("0")  # a round trip, so events the page sent before now have arrived
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')} "
                             f"{params['exceptionDetails'].get('exception', {}).get('description', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                   for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found

    def screenshot(self, path: str, full_page: bool = False) -> None:
        """The viewport (or, with full_page, the whole page) as a PNG file."""
        params = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.call("Page.captureScreenshot", session=True, **params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
