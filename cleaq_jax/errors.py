"""The project's own errors, and the one way every program shows them.

An error whose message is written for the person at the terminal (it names the file, key or option and
says what to do) derives from `UserError`: a setting that cannot work with the data, checkpoint or
machine found once they are known (`ConfigError`), a file or directory that is not there
(`MissingError`), data that does not follow the record schema (`DataError`; records and shards raise
its `RecordError` and `ShardError`), remote storage where only local files work (`StorageError`), a
checkpoint or exported model that cannot be used as asked (`CheckpointError`; a stage whose every
checkpoint is damaged raises `CorruptCheckpointError`), and the kinds of their own modules (pretrained
weights, photographs, data preparation, pseudo masks, a non-finite loss). Each also derives from the
built-in error it replaced (ValueError, FileNotFoundError, ...), so code that catches that still does.

`reported` runs a program's body: a `UserError` becomes ONE line ``error: <message>`` on stderr and exit
status 2 (a bad command line's status, as argparse and `cleaq_jax.main` give it). Its traceback comes
first only when the program was asked to say more: ``-v`` / ``--verbose`` of the argparse programs
(`runtime.cli.parser`), absl's ``--verbosity`` / ``-v`` of ``cleaq-run``. Any other exception is a bug:
it propagates, and Python prints its traceback (status 1).

This module imports only the standard library: predict from an exported model uses it where only jax,
numpy and OpenCV are installed.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable, TextIO

USAGE_ERROR = 2  # exit status of a project error, as of a bad command line (argparse, cleaq_jax.main)


class UserError(Exception):
    """An error the person running the program can act on; its message names what and says how."""


class ConfigError(UserError, ValueError):
    """A setting (config key, flag or option) that cannot work with the data, checkpoint or machine at hand."""


class MissingError(UserError, FileNotFoundError):
    """A file or directory the program needs is not there; the message says what makes it."""


class DataError(UserError, ValueError):
    """Records, shards or a manifest that do not follow the schema, or cannot be read as it says."""


class StorageError(UserError, ValueError):
    """A path on storage that cannot serve what is asked of it (remote shards, which ArrayRecord cannot read)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or exported model that cannot be used as asked (wrong kind, missing part, another format)."""


def line(error: BaseException) -> str:
    """The one line shown for ``error``: ``error: <its message>``, whitespace runs folded to one space."""
    # A KeyError's str() is the repr of its message: its one argument is the message itself.
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    message = " ".join(text.split()) or type(error).__name__
    return f"error: {message}"


def reported(body: Callable[[], int | None], verbose: bool = False, stream: TextIO | None = None) -> int:
    """Run a program's ``body`` and return its exit status: what it returns (None: 0), or `USAGE_ERROR`
    after writing `line` of a `UserError` to ``stream`` (default stderr), preceded by its traceback when
    ``verbose``. Other exceptions propagate (a bug: Python's traceback, status 1)."""
    try:
        status = body()
    except UserError as error:
        stream = sys.stderr if stream is None else stream
        if verbose:
            traceback.print_exception(error, file=stream)
        print(line(error), file=stream, flush=True)
        return USAGE_ERROR
    return 0 if status is None else int(status)
