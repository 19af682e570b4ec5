"""Write constraints.txt: the exact version of every package cleaq_jax[test,tfds] installs, as found in
the environment the test suite just passed in (setup.cfg keeps ranges; this file pins what was tested).

    python scripts/constraints.py > constraints.txt
    pip install -c constraints.txt -e ".[test]"        # what .ci/run installs

Walks the installed distributions' requirements from those setup.cfg declares, so packages that happen
to be installed for other reasons are left out.
"""

from __future__ import annotations

import configparser
import os
import platform
import re
import sys
from importlib import metadata

EXTRAS = ("test", "tfds")


def _name(requirement: str) -> tuple[str, set[str]]:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
    return m.group(1), {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}


def _applies(requirement: str, extras: set[str]) -> bool:
    """Whether a requirement line applies here (its environment marker, with the chosen extras)."""
    if ";" not in requirement:
        return True
    marker = requirement.split(";", 1)[1]
    env = {"python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform,
           "platform_system": platform.system(), "platform_machine": platform.machine(),
           "implementation_name": sys.implementation.name, "os_name": "posix" if sys.platform != "win32" else "nt"}
    try:
        from packaging.markers import Marker  # pip's own dependency, present wherever pip is

        return any(Marker(marker).evaluate({**env, "extra": e}) for e in (extras or {""}))
    except ImportError:
        return "extra" not in marker


def declared(setup_cfg: str, extras: tuple[str, ...]) -> list[str]:
    """The requirement lines of setup.cfg's install_requires and the given extras."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += cfg["options.extras_require"][extra].splitlines()
    return [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]


def closure(requirements: list[str]) -> dict[str, str]:
    """{distribution name: installed version} of the requirements and everything they need."""
    seen: dict[str, str] = {}
    walked: dict[str, set[str]] = {}  # extras already followed per distribution
    todo = list(requirements)
    while todo:
        dep, dep_extras = _name(todo.pop())
        if not _installed(dep):
            continue  # an optional dependency for another platform
        dist = metadata.distribution(dep)
        key = dist.metadata["Name"]
        done = walked.get(key.lower())
        if done is not None and dep_extras <= done:
            continue
        walked[key.lower()] = (done or set()) | dep_extras
        seen[key] = dist.version
        todo += [r for r in dist.requires or [] if _applies(r, dep_extras)]
    return seen


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pins = closure(declared(os.path.join(root, "setup.cfg"), EXTRAS))
    print(f"# Exact versions of the environment the test suite runs in (Python {platform.python_version()}, "
          f"{platform.machine()} Linux, CPU). Written by `python scripts/constraints.py`;")
    print("# setup.cfg declares the ranges. Install with: pip install -c constraints.txt -e \".[test]\"")
    for name in sorted(pins, key=str.lower):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
