"""Train, evaluate or run the whole pipeline: ``cleaq-run --config=CONFIG --workdir=DIR [--config.KEY=VALUE ...]``
(or ``python -m cleaq_jax.main``).

    cleaq-run --config=demo --workdir=demo_workdir                   # the demo: synthetic data, every stage
    cleaq-run --config=stage1 --config.data.dir=SHARDS --workdir=RUN   # one stage of the paper
    cleaq-run --config=eval --config.checkpoint_dir=RUN/stage3 --config.data.dir=SHARDS --workdir=OUT

Parses the flags and checks every config key (`config_checks`: a bad key, value or type stops the run
with one line and exit code 2, before any data or model work), joins the other processes of a
multi-host run, and hands the config to `cleaq_jax.programs.pipeline.run`, which runs what
``config.stage`` names into ``<workdir>/<stage>``. An error in the data, a checkpoint or storage met
during the run is one line and exit code 2 too; ``--verbosity=1`` (or ``-v 1``) adds its traceback and
the libraries' INFO lines.
A run that cannot go on for a reason outside the program (another run training the same stage
directory, a checkpoint of another model shape, a full disk) stops the same way.
"""

import errno
import os
import sys
import textwrap

from absl import app, flags, logging
from ml_collections import config_flags

from cleaq_jax import config_checks, configs, errors
from cleaq_jax.runtime import console

config_flags.DEFINE_config_file(
    "config", None, "A config file, or the name of one that ships with cleaq_jax (listed above; "
    "configs/NAME.py in a checkout).", lock_config=True)
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
USAGE_ERROR = errors.USAGE_ERROR  # exit code of a bad command line or config, as argparse's


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


def usage() -> str:
    """What ``--help`` prints above the flags: the module description, the shipped configs, what a config
    can run, and how to see and override its keys."""
    def listing(title: str, items: list[str]) -> str:
        return textwrap.fill(f"{title}: {', '.join(items)}.", width=100, subsequent_indent="  ")

    return "\n".join([
        __doc__.strip(), "",
        listing("Configs that ship with cleaq_jax (--config=NAME, or a config file of your own)", configs.names()),
        listing("What a config runs (config.stage)", list(config_checks.PROGRAMS)),
        "Override any key with --config.KEY=VALUE (--config.batch_size=8, --config.data.dir=SHARDS). Every key,",
        "its default and what it does: cleaq_jax/configs/default.py (configs/default.py in a checkout); a",
        "shipped config's values: python -c 'from cleaq_jax.configs import stage3; print(stage3.get_config())'.",
        "An unknown key's error lists the keys of its level. Flags are absl's: --workdir=DIR (or --workdir DIR);",
        "the other programs (cleaq-predict, cleaq-prep-*, ...) spell options with dashes (docs/architecture.md).",
        "Exit status: 0 done, 2 a bad command line or config, or an error in the data, a checkpoint or storage.",
        "",
    ]).replace("%", "%%")  # absl's usage fills %s in the text with the program's name


def run() -> None:
    """The ``cleaq-run`` console script (and ``python -m cleaq_jax.main``)."""
    # absl's --help prints the __main__ module's docstring and the flags of the module sys.argv[0] names:
    # the console script's wrapper has neither.
    sys.modules["__main__"].__doc__ = usage()
    for flag in FLAGS.get_key_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
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
    # Library INFO (orbax, grain, jax, absl), and the traceback of a project error, only when -v /
    # --verbosity was given.
    verbose = FLAGS["verbosity"].present
    console.setup(verbose=verbose)
    # Data, checkpoint and storage errors met during the run: one line and exit status 2, as a bad config.
    return errors.reported(lambda: run_config(FLAGS.config, FLAGS.workdir), verbose)


def run_config(config, workdir: str) -> None:
    """Join the other processes of a multi-process run, then run what ``config.stage`` names."""
    # The library loads JAX and flax: only once the command line is known to be good.
    import jax

    from cleaq_jax.programs import pipeline
    from cleaq_jax.runtime import compile_cache, parallel

    compile_cache.use(config.compilation_cache_dir)
    joined = parallel.initialize_distributed(**distributed_args(config))
    console.set_process_index(jax.process_index())
    if joined:
        console.say_every_process("%s", parallel.process_line(joined))
    logging.info("config:\n%s", config)
    try:
        pipeline.run(config, workdir)
    except OSError as e:  # a full disk or quota: one line (errors.reported) naming the path and what to do
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise errors.StorageError(f"{e.filename or 'a file of the run'}: {os.strerror(e.errno)}. Free space there "
                                  "and run the same command again: training resumes from its last complete "
                                  "checkpoint") from e


if __name__ == "__main__":
    run()
