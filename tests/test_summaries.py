"""TensorBoard summaries without TensorFlow: what the writer puts in an event file comes back through
TensorBoard's own readers as scalars, images, text and hyperparameters; the profiler hook's schedule; and a
training stage that runs, writes its events and a profile, with TensorFlow not importable."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import cv2
import numpy as np
import pytest

from cleaq_jax.runtime import summaries
from tests import tiny


def _provider(logdir: str):
    """TensorBoard's data provider over ``logdir``: what its scalars, images, text and HParams dashboards read."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        tensor_size_guidance={"scalars": 0, "images": 0, "text": 0, "hparams": 0})
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    return data_provider.MultiplexerDataProvider(multiplexer, logdir)


def test_events_come_back_through_tensorboard_as_scalars_images_text_and_hparams(tmp_path):
    from tensorboard import context
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    rng = np.random.default_rng(0)
    grid = rng.random((2, 6, 10, 3)).astype(np.float32)  # two images of 6 x 10, RGB in [0, 1]
    with summaries.SummaryWriter(tmp_path) as writer:
        writer.write_scalars(2, {"train/loss": 0.5, "train/count": 3})
        writer.write_scalars(4, {"train/loss": np.float32(0.25), "train/count": np.int64(5)})
        writer.write_images(4, {"stage1/panels": grid})
        writer.write_texts(6, {"notes": "**config** lr=0.1"})
        writer.write_hparams({"optim": {"learning_rate": 0.1}, "model": {"stages": (1, 2)}, "tag": None, "ema": True})

    (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*.v2"))
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["tensors"]) == {"train/loss", "train/count", "stage1/panels", "notes",
                                          "_hparams_/session_start_info"}

    ctx, provider = context.RequestContext(), _provider(str(tmp_path))
    scalars = provider.read_scalars(ctx, experiment_id="", plugin_name="scalars", downsample=100)["."]
    assert {tag: [(d.step, d.value) for d in data] for tag, data in scalars.items()} == {
        "train/loss": [(2, 0.5), (4, 0.25)], "train/count": [(2, 3.0), (4, 5.0)]}

    (panels,) = provider.read_blob_sequences(ctx, experiment_id="", plugin_name="images", downsample=10)["."][
        "stage1/panels"]
    width, height, *pngs = [provider.read_blob(ctx, blob_key=b.blob_key) for b in panels.values]
    assert (panels.step, int(width), int(height), len(pngs)) == (4, 10, 6, 2)
    for png, image in zip(pngs, grid, strict=True):
        decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(decoded, np.rint(image * 255).astype(np.uint8))

    (text,) = provider.read_tensors(ctx, experiment_id="", plugin_name="text", downsample=10)["."]["notes"]
    assert (text.step, text.numpy.item()) == (6, b"**config** lr=0.1")

    (hparams,) = provider.list_tensors(ctx, experiment_id="", plugin_name=hparams_metadata.PLUGIN_NAME)["."].values()
    start = hparams_metadata.parse_session_start_info_plugin_data(hparams.plugin_content)
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert values == {"optim.learning_rate": 0.1, "model.stages.0": 1.0, "model.stages.1": 2.0, "tag": "",
                      "ema": True}
    assert os.path.getsize(path) > 0


def test_each_call_logs_one_line_and_without_a_directory_nothing_is_written(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="absl"):
        writer = summaries.SummaryWriter(None)
        writer.write_scalars(7, {"train/loss": 0.123456789, "train/step_count": 3})
        writer.write_images(7, {"grid": np.zeros((1, 4, 4, 3), np.float32)})
        writer.flush()
        writer.close()
    assert [r.getMessage() for r in caplog.records] == [
        "[7] train/loss=0.123457, train/step_count=3", "[7] Got images: {'grid': (1, 4, 4, 3)}."]
    assert os.listdir(tmp_path) == []


def test_a_remote_log_directory_gets_a_local_one_to_mirror(monkeypatch):
    monkeypatch.setattr(summaries.storage, "is_remote", lambda path: path.startswith("gs://"))
    writer = summaries.open_writer("gs://bucket/run/stage1/tensorboard")
    try:
        assert isinstance(writer, summaries.storage.MirroredWriter)
        assert writer.remote_dir == "gs://bucket/run/stage1/tensorboard"
        assert summaries.local_logdir(writer, "gs://bucket/run/stage1/tensorboard") == writer.local_dir
        assert glob.glob(os.path.join(writer.local_dir, "events.out.tfevents.*"))
    finally:
        writer._inner.close()
        shutil.rmtree(writer.local_dir)
    local = summaries.open_writer("/tmp/never-created", just_logging=True)
    assert local.logdir is None and not os.path.exists("/tmp/never-created")


def test_profiler_traces_at_least_its_steps_and_three_seconds_from_the_fifth_step_and_hourly():
    now, calls = [0.0], []
    profiler = summaries.StepProfiler("logdir", steps=2, first_step=10, start=lambda d: calls.append(("start", d)),
                                      stop=lambda: calls.append(("stop",)), clock=lambda: now[0])

    def run(steps, seconds_per_step):
        for step in steps:
            now[0] += seconds_per_step
            profiler(step)
            calls.append(step)

    # Resumed at step 10: the trace starts after step 15; 2 steps of 1 s are not yet 3 s, so it stops
    # after step 18, not 17.
    run(range(11, 20), 1.0)
    assert calls == [11, 12, 13, 14, ("start", "logdir"), 15, 16, 17, ("stop",), 18, 19]
    calls.clear()
    run(range(20, 24), 1.0)
    now[0] += 3600.0  # an hour after the last start: another trace, after the next step
    run(range(24, 28), 2.0)  # 2 s a step: 2 steps are 4 s, so it stops after the second
    assert calls == [20, 21, 22, 23, ("start", "logdir"), 24, 25, ("stop",), 26, 27]
    calls.clear()
    profiler.close()  # nothing running: nothing stopped
    now[0] += 3601.0
    run([40], 1.0)
    profiler.close()  # the stage ended during a trace: it is stopped, so written
    assert calls == [("start", "logdir"), 40, ("stop",)]

    quiet = summaries.StepProfiler("logdir", steps=0, first_step=0, start=lambda d: calls.append("x"),
                                   stop=lambda: calls.append("x"))
    for step in range(1, 10):
        quiet(step)
    quiet.close()
    assert "x" not in calls


_BLOCK_TENSORFLOW = """
import builtins, json, os, runpy, sys
sys.modules["tensorflow"] = None  # as if not installed: an import fails, importlib.util.find_spec finds nothing
tried, _import = [], builtins.__import__
def _recording_import(name, *args, **kwargs):
    if name == "tensorflow" or name.startswith("tensorflow."):
        tried.append(name)
    return _import(name, *args, **kwargs)
builtins.__import__ = _recording_import
sys.argv = ["cleaq_jax.main", *json.loads(os.environ["ARGS"])]
try:
    runpy.run_module("cleaq_jax.main", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert not e.code, f"exit code {e.code}"
assert not tried and not [m for m in sys.modules if m.startswith("tensorflow.")], tried
from cleaq_jax.programs import curves
scalars = curves.read_scalars(os.environ["LOGDIR"])
print("RESULT", json.dumps({tag: steps.tolist() for tag, (steps, _) in scalars.items()}))
"""


@pytest.mark.slow
def test_a_stage_trains_writes_its_events_and_a_profile_with_tensorflow_not_importable(tmp_path):
    """python -m cleaq_jax.main trains a tiny stage 1 (2 epochs) in a child where TensorFlow cannot be imported
    and every import of it is recorded: none is tried, the events read back (with TensorFlow still
    blocked, through the project's reader) and the profiler's trace of the steps after the fifth is in the
    event files' directory."""
    from tensorboard.backend.event_processing import event_accumulator

    workdir = str(tmp_path / "run")
    cfg = tiny.tiny_config()
    args = ["--config=configs/demo.py", f"--workdir={workdir}", "--config.stage=stage1", "--config.num_epochs=2",
            "--config.eval_every_epochs=0", "--config.eval_at_end=False", "--config.profile_steps=1",
            "--config.checkpoint_every_steps=100", "--config.model.encoder_stages=(1,1,1,1)",
            "--config.model.classifier_stages=(1,1,1,1)"]
    for key in ("data.image_size", "data.synthetic.num", "data.synthetic.splits.train", "data.synthetic.splits.val",
                "data.synthetic.splits.test", "model.width", "batch_size", "eval_batch_size", "log_every_steps",
                "image_every_steps"):
        node = cfg
        for part in key.split("."):
            node = node[part]
        args.append(f"--config.{key}={node}")
    logdir = os.path.join(workdir, "stage1", "tensorboard")
    proc = tiny.run_python(_BLOCK_TENSORFLOW, ARGS=json.dumps(args), LOGDIR=logdir)
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    steps = json.loads(line.removeprefix("RESULT "))
    logged = steps["train/loss"]
    assert len(logged) >= 3 and logged == list(range(2, logged[-1] + 1, 2)), steps  # log_every_steps=2
    assert steps["train/learning_rate"] == logged, steps
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("stage1/low_enhanced_reference_vessel")] == logged  # image_every_steps=2
    assert glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")), os.listdir(logdir)
