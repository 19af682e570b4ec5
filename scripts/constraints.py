"""Write a constraints file: the exact version of every package cleaq_jax[test,tfds] installs, as found in
the environment the test suite just passed in (setup.cfg keeps ranges; these files pin what was tested).
Two sets are tested, the two ends of setup.cfg's ranges:

    python scripts/constraints.py --set oldest --out constraints.txt         # Python 3.11, lower bounds
    python scripts/constraints.py --set newest --out constraints-py313.txt   # Python 3.13, newest releases
    pip install -c constraints.txt -e ".[test]"        # what .ci/run installs

--set oldest checks that every declared package sits at its lower bound; --set newest is the set pip
picks with no constraints, written down on the day it was tested. Without --out the file goes to stdout.

Walks the installed distributions' requirements from those setup.cfg declares, so packages that happen
to be installed for other reasons are left out.
"""

from __future__ import annotations

import argparse
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


SETS = {
    "oldest": "the oldest set: each package setup.cfg declares at its lower bound",
    "newest": "the newest set: the latest release of each package for this Python",
}


def not_at_lower_bound(requirements: list[str], pins: dict[str, str]) -> list[str]:
    """The declared requirements whose installed version is not their lower bound (>=)."""
    from packaging.requirements import Requirement  # pip's own dependency, present wherever pip is

    installed = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    off = []
    for line in requirements:
        req = Requirement(line)
        have = installed.get(req.name.lower().replace("_", "-"))
        low = [s.version for s in req.specifier if s.operator == ">="]
        if have is not None and low and have != low[0]:
            off.append(f"{req.name} {have} (lower bound {low[0]})")
    return off


def render(pins: dict[str, str], which: str, out: str) -> str:
    name = os.path.basename(out) if out != "-" else "constraints.txt"
    python = f"Python {platform.python_version()}"
    lines = [f"# {name}: {SETS[which]}, tested on {python} ({platform.machine()} Linux, CPU).",
             f"# Written by `python scripts/constraints.py --set {which} --out {name}` in the environment the test",
             f"# suite passed in; setup.cfg declares the ranges. Install with: pip install -c {name} -e \".[test]\""]
    lines += [f"{n}=={pins[n]}" for n in sorted(pins, key=str.lower)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="which", choices=sorted(SETS), default="oldest",
                        help="which end of setup.cfg's ranges this environment is (named in the header)")
    parser.add_argument("--out", default="-", help="the file to write (default: stdout)")
    args = parser.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    requirements = declared(os.path.join(root, "setup.cfg"), EXTRAS)
    pins = closure(requirements)
    if args.which == "oldest" and (off := not_at_lower_bound(requirements, pins)):
        print("not the oldest set: " + "; ".join(off), file=sys.stderr)
        return 1
    text = render(pins, args.which, args.out)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
