"""Entry point: ``python -m cleaq_jax.main --config=configs/stage3.py --workdir=DIR``.

Parses flags, joins the other processes of a multi-host run, keeps TensorFlow (used only by the
TensorBoard writers) off the accelerators, and hands the config to `cleaq_jax.programs.pipeline.run`,
which dispatches on ``config.stage``. Override any config key on the command line: ``--config.batch_size=8``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from cleaq_jax import parallel
from cleaq_jax.programs import pipeline

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: every stage writes to <workdir>/<stage>.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process GPU/CPU runs (TPU and SLURM auto-detect).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "Index of this process in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _hide_accelerators_from_tensorflow() -> None:
    try:
        import tensorflow as tf  # optional and heavy: only the TensorBoard writers use it
    except ImportError:  # TensorBoard writing falls back to clu's logging writer.
        return
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _hide_accelerators_from_tensorflow()
    parallel.initialize_distributed(coordinator_address=FLAGS.coordinator_address,
                                    num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    logging.info("config:\n%s", FLAGS.config)
    pipeline.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
