"""Entry point: ``cleaq-run --config=configs/stage3.py --workdir=DIR`` (or ``python -m cleaq_jax.main``).

Parses flags and checks every config key (`config_checks`: a bad key, value or type stops the run
with one line and exit code 2, before any data or model work), joins the other processes of a
multi-host run, and hands the config to `cleaq_jax.programs.pipeline.run`, which dispatches on
``config.stage``. Override any config key on the command line: ``--config.batch_size=8``. A run that
cannot go on for a reason outside the program (another run training the same stage directory, a
checkpoint of another model shape, a full disk) also stops with one line and exit code 2.
"""

import errno
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cleaq_jax import config_checks, configs
from cleaq_jax.runtime import console

config_flags.DEFINE_config_file(
    "config", None, "A config file, or the name of one that ships with cleaq_jax: "
    + ", ".join(configs.names()) + " (configs/NAME.py in a checkout).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: every stage writes to <workdir>/<stage>.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process GPU/CPU runs (TPU and SLURM auto-detect); "
                    "overrides config.distributed.coordinator_address.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run; overrides "
                     "config.distributed.num_processes.")
flags.DEFINE_integer("process_id", None, "Index of this process in a multi-process run; overrides "
                     "config.distributed.process_id.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
USAGE_ERROR = 2  # exit code of a bad command line or config, as argparse's


def _usage_error(line: str) -> None:
    print(f"error: {line}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every failure (unknown config key, wrong type, config file that does not
    load, missing flag) reported as one line and exit code 2 instead of a traceback."""
    argv = with_config_resolved(argv)
    try:
        rest = FLAGS(argv)
    # ml_collections raises AttributeError / KeyError for an unknown override, TypeError for a bad value.
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        _usage_error(config_checks.flag_error_line(argv, e))
    missing = config_checks.config_file_error(argv, FLAGS.config)
    if missing:
        _usage_error(missing)
    return rest


def with_config_resolved(argv: list[str]) -> list[str]:
    """``argv`` with ``--config``'s value a file path: a shipped config's name (``stage3``,
    ``configs/stage3.py`` outside a checkout) becomes its file (`configs.resolve`)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith(("--config=", "-config=")):
            flag, value = arg.split("=", 1)
            out[i] = f"{flag}={configs.resolve(value)}"
        elif arg in ("--config", "-config") and i + 1 < len(out):
            out[i + 1] = configs.resolve(out[i + 1])
    return out


def run() -> None:
    """The ``cleaq-run`` console script."""
    app.run(main, flags_parser=parse_flags)


def distributed_args(config) -> dict:
    """initialize_distributed's arguments: each flag given wins over its config.distributed key; the
    keys' "unset" values ('', 0, -1) leave it to the JAX_* variables or to auto-detection."""
    d = config.distributed
    address = FLAGS.coordinator_address if FLAGS.coordinator_address is not None else d.coordinator_address
    count = FLAGS.num_processes if FLAGS.num_processes is not None else d.num_processes
    index = FLAGS.process_id if FLAGS.process_id is not None else d.process_id
    return {"coordinator_address": address or None, "num_processes": count if count > 0 else None,
            "process_id": index if index >= 0 else None}


def main(argv):
    if len(argv) > 1:
        _usage_error(f"unexpected arguments: {' '.join(argv[1:])} (config keys go as --config.KEY=VALUE)")
    problems = config_checks.check(FLAGS.config)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    # Library INFO (orbax, grain, jax, absl) only when -v / --verbosity was given.
    console.setup(verbose=FLAGS["verbosity"].present)
    # The library loads JAX and flax: only once the command line is known to be good.
    import jax

    from cleaq_jax.programs import pipeline
    from cleaq_jax.runtime import checkpoint, lock, parallel

    joined = parallel.initialize_distributed(**distributed_args(FLAGS.config))
    console.set_process_index(jax.process_index())
    if joined:
        console.say_every_process("%s", parallel.process_line(joined))
    logging.info("config:\n%s", FLAGS.config)
    try:
        pipeline.run(FLAGS.config, FLAGS.workdir)
    # What a person fixes outside the program (another run on the workdir, a checkpoint of another model,
    # a full disk): one line naming the path and what to do, and exit code 2, as for a bad config.
    except (lock.StageBusyError, checkpoint.CheckpointError) as e:
        _usage_error(str(e))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _usage_error(f"{e.filename or 'a file of the run'}: {os.strerror(e.errno)}. Free space there and run the "
                     "same command again: training resumes from its last complete checkpoint")


if __name__ == "__main__":
    run()
