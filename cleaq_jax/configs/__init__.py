"""The configs that ship with cleaq_jax, found by path or by name.

``--config`` takes a file path (``--config=configs/stage3.py`` in a checkout, where ``configs`` points
at this folder, or a config of your own) or the name of a config here: ``stage3``, ``stage3.py``,
``configs/stage3.py`` or ``ablations/cleaq_dr``. A path to an existing file always wins, so a
config of your own named like one of these is the one used.
"""

from __future__ import annotations

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
# Where the programs keep XLA's persistent compilation cache unless told otherwise (`runtime.compile_cache`).
COMPILATION_CACHE_DIR = "~/.cache/cleaq_jax/xla"


def names() -> list[str]:
    """Every config that ships with the package, as its name (``stage3``, ``ablations/cleaq_dr``)."""
    found = []
    for root, _, files in os.walk(DIRECTORY):
        for file in files:
            if file.endswith(".py") and not file.startswith("_") and file != "presets.py":
                found.append(os.path.relpath(os.path.join(root, file[:-3]), DIRECTORY).replace(os.sep, "/"))
    return sorted(found)


def path_of(name: str) -> str | None:
    """The file of the shipped config ``name`` (with or without ``configs/`` and ``.py``), or None."""
    stem = name.removeprefix("./").removeprefix("configs/").removesuffix(".py")
    return os.path.join(DIRECTORY, *stem.split("/")) + ".py" if stem in names() else None


def resolve(value: str) -> str:
    """``--config``'s value with its file part a path that exists where it can be: as given when that file
    exists or the value names no shipped config, else the shipped config's path. ml_collections'
    ``:argument`` suffix is kept."""
    path, colon, argument = value.partition(":")
    if os.path.exists(path):
        return value
    shipped = path_of(path)
    return shipped + colon + argument if shipped else value
