"""gs:// paths against a Cloud Storage emulator on localhost: etils.epath (through gcsfs) and orbax
checkpoints (tensorstore's GCS driver) write into the emulator's bucket, and read back what they wrote."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests import gcs_emulator as emulator_lib
from tests import tiny


def _objects(emulator, bucket):
    """Relative paths of the objects the emulator holds in ``bucket`` (its filesystem backend)."""
    root = os.path.join(emulator.root, bucket)
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_epath_writes_lists_renames_and_removes_gs_objects(gcs_emulator, tmp_path):
    bucket = gcs_emulator.new_bucket()
    code = f"""
import os
from etils import epath
os.chdir({str(tmp_path)!r})
run = epath.Path("gs://{bucket}/run")
(run / "eval").mkdir(parents=True, exist_ok=True)
(run / "eval" / "eval.json").write_text('{{"kappa": 0.5}}')
(run / "a.bin").write_bytes(b"\\x00\\x01")
(run / "a.bin").rename(run / "b.bin")
assert (run / "eval" / "eval.json").read_text() == '{{"kappa": 0.5}}'
assert sorted(p.name for p in run.iterdir()) == ["b.bin", "eval"], list(run.iterdir())
assert (run / "eval").is_dir() and not (run / "a.bin").exists()
(run / "tmp").mkdir(); (run / "tmp" / "x").write_text("x"); (run / "tmp").rmtree()
assert not (run / "tmp").exists()
"""
    emulator_lib.run_python(gcs_emulator, code)
    assert _objects(gcs_emulator, bucket) == ["run/b.bin", "run/eval/eval.json"]
    assert os.listdir(tmp_path) == []  # nothing written to a local folder named gs:


def test_a_stage_lock_in_a_gs_workdir_refuses_a_second_run_and_a_stale_one_is_taken_over(gcs_emulator, tmp_path):
    """runtime.lock on a bucket: held, a second taker is refused naming the first; released, the object is
    gone; another host's lock whose heartbeat is old is taken over."""
    bucket = gcs_emulator.new_bucket()
    code = f"""
import json, os
from cleaq_jax.runtime import lock, storage
os.chdir({str(tmp_path)!r})
stage = "gs://{bucket}/run/stage1"
path = stage + "/" + lock.LOCK_NAME
held = lock.StageLock(stage)
held.acquire()
try:
    lock.StageLock(stage).acquire()
    raise SystemExit("a second run took a held lock")
except lock.StageBusyError as e:
    assert f"is being trained by another run: pid {{os.getpid()}} on host " in str(e), e
held.release()
assert not storage.exists(path)
storage.atomic_file(path, json.dumps({{"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": 0, "token": "x"}}))
with lock.StageLock(stage):
    assert json.loads(storage.read_text(path))["pid"] == os.getpid()
assert not storage.exists(path)
"""
    emulator_lib.run_python(gcs_emulator, code)
    assert _objects(gcs_emulator, bucket) == []
    assert os.listdir(tmp_path) == []  # nothing written to a local folder named gs:


def test_orbax_checkpoint_saves_to_and_restores_from_gs(gcs_emulator):
    bucket = gcs_emulator.new_bucket()
    code = f"""
import jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
from etils import epath
directory = epath.Path("gs://{bucket}/stage1/checkpoints")
tree = {{"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(7)}}
with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2)) as m:
    for step in (1, 2, 3):
        m.save(step, args=ocp.args.StandardSave({{**tree, "step": jnp.int32(step)}}))
    m.wait_until_finished()
with ocp.CheckpointManager(directory) as m:
    assert m.all_steps() == [2, 3], m.all_steps()
    back = m.restore(3, args=ocp.args.StandardRestore(tree))
np.testing.assert_array_equal(back["w"], tree["w"])
assert int(back["step"]) == 3
"""
    emulator_lib.run_python(gcs_emulator, code)
    objects = _objects(gcs_emulator, bucket)
    steps = sorted({p.split("/")[2] for p in objects})
    assert steps == ["2", "3"]  # step 1 was deleted in the bucket (max_to_keep=2)
    assert "stage1/checkpoints/3/_CHECKPOINT_METADATA" in objects
    assert any(p.startswith("stage1/checkpoints/3/default/") and "/d/" in p for p in objects)  # array data


def test_report_files_and_mirrored_tensorboard_files_reach_the_bucket_whole(gcs_emulator, tmp_path):
    bucket = gcs_emulator.new_bucket()
    code = f"""
import os, tempfile
from etils import epath
from cleaq_jax.runtime import storage
os.chdir({str(tmp_path)!r})
run = "gs://{bucket}/run"
storage.makedirs(run + "/eval")
storage.atomic_file(run + "/eval/eval.md", lambda tmp: open(tmp, "w").write("| a |"))
storage.atomic_file(run + "/eval/eval.md", lambda tmp: open(tmp, "w").write("| b |"))  # replaces it
try:
    storage.atomic_file(run + "/eval/broken.md", lambda tmp: 1 / 0)
except ZeroDivisionError:
    pass
assert epath.Path(run + "/eval/eval.md").read_text() == "| b |"

class Events:  # stands in for the summary writer: appends to one event file
    def __init__(self, d): self.d = d
    def write_scalars(self, step, scalars): open(os.path.join(self.d, "events.out"), "a").write(f"{{step}}\\n")
    def flush(self): pass
    def close(self): pass

local = tempfile.mkdtemp()
writer = storage.MirroredWriter(Events(local), local, run + "/stage1/tensorboard")
writer.write_scalars(1, {{}})
writer.flush()
assert epath.Path(run + "/stage1/tensorboard/events.out").read_text() == "1\\n"
assert writer.mirror() == []  # unchanged files are not copied again
writer.write_scalars(2, {{}})
writer.close()
assert epath.Path(run + "/stage1/tensorboard/events.out").read_text() == "1\\n2\\n"
assert not os.path.exists(local)
"""
    emulator_lib.run_python(gcs_emulator, code)
    assert _objects(gcs_emulator, bucket) == ["run/eval/eval.md", "run/stage1/tensorboard/events.out"]
    assert os.listdir(tmp_path) == []


def _main(emulator, cwd, *flags):
    """python -m cleaq_jax.main in a child process with the emulator's environment, started in ``cwd``."""
    env = tiny.subprocess_env(**emulator.env)
    proc = subprocess.run([sys.executable, "-m", "cleaq_jax.main", *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{flags}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


_TINY = ("--config.model.width=0.0625", "--config.model.encoder_stages=(1,1,1,1)",
         "--config.model.classifier_stages=(1,1,1,1)", "--config.data.image_size=32",
         "--config.data.synthetic.num=0", "--config.batch_size=4", "--config.eval_batch_size=4",
         "--config.log_every_steps=2", "--config.image_every_steps=0", "--config.checkpoint_every_steps=1000",
         "--config.eval.num_examples_grid=0", "--config.eval_every_epochs=1")


@pytest.mark.slow
def test_a_stage_trains_resumes_and_evaluates_in_a_gs_workdir(gcs_emulator, tmp_path):
    """The run's workdir in a bucket: checkpoints with the data-iterator position, TensorBoard events and
    the end-of-stage report land there; a second run resumes from the bucket's checkpoint and position;
    evaluation reads the checkpoint from the bucket and writes its report there. Nothing goes to a local
    folder named gs:."""
    bucket = gcs_emulator.new_bucket()
    shards, cwd = str(tmp_path / "shards"), tmp_path / "cwd"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "cleaq_jax.data_prep.synthetic", "--out", shards, "--num", "40", "--size", "32"],
                   cwd=tiny.REPO, env=tiny.subprocess_env(), check=True, capture_output=True, timeout=600)
    run = f"gs://{bucket}/run"
    stage1 = (f"--config={tiny.REPO}/configs/stage1.py", f"--workdir={run}", f"--config.data.dir={shards}", *_TINY)
    first = _main(gcs_emulator, cwd, *stage1, "--config.num_epochs=1")
    per_epoch = int(re.search(r"stage1: iqe\+dr, (\d+) steps/epoch, steps 0\.\.", first).group(1))
    objects = _objects(gcs_emulator, bucket)
    assert f"run/stage1/checkpoints/{per_epoch}/data/process_0-of-1.json" in objects
    assert {"run/stage1/eval/eval.json", "run/stage1/eval/eval.md", "run/stage1/eval/confusion_matrix.png",
            "run/stage1/eval/per_quality.png"} <= set(objects)
    assert [p for p in objects if p.startswith("run/stage1/tensorboard/events.out.tfevents.")], objects
    assert not [p for p in objects if "/.tmp-" in p]  # each report file was renamed into place

    second = _main(gcs_emulator, cwd, *stage1, "--config.num_epochs=2")
    # Resumed at the bucket's step, its data position read from there (a missing one fails the restore).
    assert f"stage1: resumed from step {per_epoch}" in second and f"steps {per_epoch}..{2 * per_epoch}" in second
    events = [p for p in _objects(gcs_emulator, bucket) if p.startswith("run/stage1/tensorboard/events.")]
    assert len(events) == 2, events  # one event file per run, the first run's kept
    assert f"run/stage1/checkpoints/{2 * per_epoch}/data/process_0-of-1.json" in _objects(gcs_emulator, bucket)

    _main(gcs_emulator, cwd, f"--config={tiny.REPO}/configs/eval.py", f"--config.checkpoint_dir={run}/stage1",
          f"--config.data.dir={shards}", f"--workdir={run}/evaluated", "--config.eval_batch_size=4")
    report = json.loads(open(os.path.join(gcs_emulator.root, bucket, "run/evaluated/eval/eval.json")).read())
    assert report["split"] == "test" and report["dr"]["overall"]["n"] > 0

    # predict: photographs read from the bucket, its outputs written there (a real fundus photograph).
    emulator_lib.run_python(gcs_emulator, f"""
import cv2, skimage.data
from etils import epath
ok, png = cv2.imencode(".png", cv2.cvtColor(skimage.data.retina(), cv2.COLOR_RGB2BGR))
for name in ("a.png", "b.png"):
    epath.Path("gs://{bucket}/photos/" + name).write_bytes(png.tobytes())
epath.Path("gs://{bucket}/photos/notes.txt").write_text("not a photograph")
""")
    proc = subprocess.run([sys.executable, "-m", "cleaq_jax.programs.predict", "--checkpoint", f"{run}/stage1",
                           "--input", f"gs://{bucket}/photos", "--out", f"{run}/predicted", "--batch-size", "2"],
                          cwd=cwd, env=tiny.subprocess_env(**gcs_emulator.env), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = open(os.path.join(gcs_emulator.root, bucket, "run/predicted/predictions.csv")).read().splitlines()
    assert len(rows) == 3 and rows[1].startswith(f"gs://{bucket}/photos/a.png"), rows
    assert {"run/predicted/enhanced/a.png", "run/predicted/enhanced/b.png"} <= set(_objects(gcs_emulator, bucket))
    assert os.listdir(cwd) == []  # nothing written to a local folder named gs:


def test_predict_runs_an_exported_model_from_the_bucket(gcs_emulator, tmp_path):
    """predict --model reads model.json, the function and the weights from gs:// (through etils) and gives
    what the same model gives from a local directory."""
    import cv2
    import skimage.data
    from test_predict import _canvas, _checkpoint

    from cleaq_jax.programs import export

    bucket = gcs_emulator.new_bucket()
    local_model = str(tmp_path / "model")
    assert export.main(["--checkpoint", _checkpoint(tmp_path / "run"), "--out", local_model]) == 0
    names = sorted(os.listdir(local_model))
    emulator_lib.run_python(gcs_emulator, f"""
import os
from etils import epath
for name in {names!r}:
    epath.Path("gs://{bucket}/model/" + name).write_bytes(open(os.path.join({local_model!r}, name), "rb").read())
""")
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "retina.jpg"), _canvas(skimage.data.retina(), 640, 480)[..., ::-1])
    outputs = {}
    for where, model in (("local", local_model), ("bucket", f"gs://{bucket}/model")):
        out = str(tmp_path / where)
        proc = subprocess.run([sys.executable, "-m", "cleaq_jax.programs.predict", "--model", model, "--input",
                               str(photos), "--out", out], cwd=str(tmp_path), env=tiny.subprocess_env(**gcs_emulator.env),
                              capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(os.path.join(out, "predictions.csv")) as f:
            outputs[where] = f.read()
    assert outputs["bucket"] == outputs["local"] and outputs["local"].count("\n") == 2


def test_storage_lists_and_copies_gs_objects_for_readers_of_local_files(gcs_emulator, tmp_path):
    """The helpers the programs read a bucket with: glob, absolute and basename of gs:// paths, and local
    copies (of a file, of a directory's matching files) that are gone after use."""
    bucket = gcs_emulator.new_bucket()
    code = f"""
import os
from etils import epath
from cleaq_jax.runtime import storage
os.chdir({str(tmp_path)!r})
logdir = "gs://{bucket}/run/stage1/tensorboard"
for name in ("events.out.tfevents.2", "events.out.tfevents.1", "notes.txt"):
    epath.Path(logdir, name).write_text(name)
epath.Path(logdir, "plugins", "events.out.tfevents.9").write_text("nested")
assert storage.glob(logdir, "events.out.tfevents.*") == [logdir + "/events.out.tfevents.1",
                                                         logdir + "/events.out.tfevents.2"]
assert storage.glob("gs://{bucket}/nothing", "*") == []
assert storage.absolute("gs://{bucket}/run/") == "gs://{bucket}/run" and storage.basename("gs://{bucket}/run/") == "run"
with storage.local_file(logdir + "/notes.txt") as local:
    assert not storage.is_remote(local) and open(local).read() == "notes.txt"
with storage.local_files(logdir, "events.out.tfevents.*") as copy:
    assert sorted(os.listdir(copy)) == ["events.out.tfevents.1", "events.out.tfevents.2"]
assert not os.path.exists(local) and not os.path.exists(copy)
"""
    emulator_lib.run_python(gcs_emulator, code)
    assert os.listdir(tmp_path) == []


def test_storage_keeps_local_paths_as_the_standard_library_has_them(tmp_path):
    (tmp_path / "events.out.tfevents.1").write_text("a")
    (tmp_path / "[x]").mkdir()
    (tmp_path / "[x]" / "events.out.tfevents.2").write_text("b")
    from cleaq_jax.runtime import storage

    assert storage.glob(tmp_path, "events.*") == [str(tmp_path / "events.out.tfevents.1")]
    assert storage.glob(tmp_path / "[x]", "events.*") == [str(tmp_path / "[x]" / "events.out.tfevents.2")]
    assert storage.glob(tmp_path / "none", "*") == []
    assert storage.absolute("run/") == os.path.join(os.getcwd(), "run") and storage.basename(".") == os.path.basename(os.getcwd())
    with storage.local_file(tmp_path / "events.out.tfevents.1") as local, storage.local_files(tmp_path) as folder:
        assert (local, folder) == (str(tmp_path / "events.out.tfevents.1"), str(tmp_path))


def test_curves_reads_a_bucket_runs_event_files_and_draws_its_figure_there(gcs_emulator, tmp_path):
    """cleaq-curves on a gs:// workdir: the event files a stage mirrored into the bucket are found and read
    (from a local copy, with TensorFlow not importable), and the PNG is written into the bucket."""
    bucket = gcs_emulator.new_bucket()
    code = f"""
import os, sys
sys.modules["tensorflow"] = None  # as where TensorFlow is not installed: TensorBoard's reader uses its own files
os.chdir({str(tmp_path)!r})
from cleaq_jax.programs import curves
from cleaq_jax.runtime import summaries
run = "gs://{bucket}/run"
writer = summaries.open_writer(run + "/stage1/tensorboard")
for step in (2, 4):
    writer.write_scalars(step, {{"train/loss": 1.0 / step, "val/dr_kappa": step / 8}})
writer.close()
assert curves.main(["--workdir", run, "--out", run + "/curves.png"]) == 0
steps, values = curves.read_scalars(run + "/stage1/tensorboard")["val/dr_kappa"]
assert steps.tolist() == [2, 4] and values.tolist() == [0.25, 0.5], (steps, values)
"""
    proc = emulator_lib.run_python(gcs_emulator, code)
    assert f"curves: val/dr_kappa, train/loss -> gs://{bucket}/run/curves.png" in proc.stderr, proc.stderr[-3000:]
    objects = _objects(gcs_emulator, bucket)
    assert "run/curves.png" in objects and [p for p in objects if p.startswith("run/stage1/tensorboard/events.")]
    assert os.listdir(tmp_path) == []


def _local_gs_paths(root):
    """Files or folders named gs:... under ``root`` or in the checkout, where the test's subprocesses start
    (what os.path.abspath or os.makedirs make of a gs:// path)."""
    found = [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if n.startswith("gs:")]
    return found + [os.path.join(tiny.REPO, n) for n in os.listdir(tiny.REPO) if n.startswith("gs:")]


def test_pretrained_weights_convert_into_and_load_from_the_bucket(gcs_emulator, tmp_path):
    """import_weights reads a gs:// weight file and writes its directory into the bucket; config.pretrained
    names that directory and `pretrained.load` reads it as it reads a local one."""
    import numpy as np

    from cleaq_jax.models import pretrained

    with np.load(os.path.join(tiny.REPO, "tests", "fixtures", "resnet_torch.npz")) as z:
        state = {k[len("bottleneck/"):]: z[k] for k in z.files
                 if k.startswith("bottleneck/") and k.split("/")[1] not in ("logits", "feat")}
    weights = tmp_path / "r50.npz"
    np.savez(weights, **state)
    local = str(tmp_path / "local")
    pretrained.export(str(weights), local, "resnet50", 0.125, (1, 1, 1, 1))
    bucket = gcs_emulator.new_bucket()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    emulator_lib.run_python(gcs_emulator, f"""
from etils import epath
epath.Path("gs://{bucket}/weights/r50.npz").write_bytes(open({str(weights)!r}, "rb").read())
""")
    proc = subprocess.run([sys.executable, "-m", "cleaq_jax.programs.import_weights", "--torchvision-file",
                           f"gs://{bucket}/weights/r50.npz", "--arch", "resnet50", "--out", f"gs://{bucket}/pretrained/r50",
                           "--width", "0.125", "--stage-sizes", "1,1,1,1"], cwd=cwd,
                          env=tiny.subprocess_env(**gcs_emulator.env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    objects = _objects(gcs_emulator, bucket)
    assert objects == ["pretrained/r50/meta.json", "pretrained/r50/variables.msgpack", "weights/r50.npz"]
    with open(os.path.join(local, "variables.msgpack"), "rb") as a, \
            open(os.path.join(gcs_emulator.root, bucket, "pretrained/r50/variables.msgpack"), "rb") as b:
        assert a.read() == b.read()  # the same conversion as from the local file
    emulator_lib.run_python(gcs_emulator, f"""
import json, jax, numpy as np
from cleaq_jax.models import pretrained
meta = pretrained.load_meta("gs://{bucket}/pretrained/r50")
assert meta == json.load(open({os.path.join(local, "meta.json")!r})), meta
jax.tree.map(np.testing.assert_array_equal, pretrained.load("gs://{bucket}/pretrained/r50"), pretrained.load({local!r}))
sd = pretrained.read_state_dict("gs://{bucket}/weights/r50.npz")
assert sorted(sd) == sorted(np.load({str(weights)!r}).files)
try:
    pretrained.load("gs://{bucket}/pretrained/none")
except pretrained.PretrainedError as e:
    assert "gs://{bucket}/pretrained/none/meta.json: missing" in str(e), e
else:
    raise AssertionError("a missing directory loaded")
""")
    assert os.listdir(cwd) == [] and not _local_gs_paths(tmp_path)


def _manifest(size=32):
    """A manifest.json as data_prep writes it, as much as tabulation reads (no shards: nothing trains)."""
    entry = {"image_size": [size, size], "num_records": 4, "counts": {"good": {"all": 2}, "usable": {"all": 1},
                                                                       "reject": {"all": 1}}}
    return {"schema": 1, "splits": {"train": dict(entry), "val": dict(entry), "test": dict(entry)}}


def test_tabulating_a_gs_study_writes_its_tables_into_the_bucket(gcs_emulator, tmp_path):
    """--tabulate-only over a gs:// study workdir: the runs' eval.json read from the bucket, results.json,
    results.md and the figure written there (not into $PWD/gs:/...); a gs:// --data is refused in one line."""
    data, cwd = tmp_path / "data", tmp_path / "cwd"
    data.mkdir()
    cwd.mkdir()
    (data / "manifest.json").write_text(json.dumps(_manifest()))
    bucket = gcs_emulator.new_bucket()
    study = f"gs://{bucket}/study"
    evals = {seed: {"dr": {"overall": {"n": 4, "kappa": 0.25 * (seed + 1), "accuracy": 0.5},
                           "per_quality": {"reject": {"n": 1, "kappa": 0.5 * seed}}}} for seed in (0, 1)}
    emulator_lib.run_python(gcs_emulator, f"""
import json
from etils import epath
for seed, result in {evals!r}.items():
    epath.Path("{study}/dr_only/seed%d/stage1/eval/eval.json" % seed).write_text(json.dumps(result))
""")
    args = ["-m", "cleaq_jax.programs.ablations", "--data", str(data), "--workdir", study, "--variants", "dr_only",
            "--seeds", "2", "--preset", "tiny", "--tabulate-only"]
    env = tiny.subprocess_env(**gcs_emulator.env)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert f"results in {study}/results.md" in proc.stdout
    objects = _objects(gcs_emulator, bucket)
    assert {"study/results.json", "study/results.md", "study/per_quality_kappa.png"} <= set(objects), objects
    results = json.loads(open(os.path.join(gcs_emulator.root, bucket, "study/results.json")).read())
    assert results["dr"]["dr_only"]["all"]["kappa"]["values"] == [0.25, 0.5]
    assert [r["status"] for r in results["runs"]] == ["finished", "finished"]
    assert os.listdir(cwd) == [] and not _local_gs_paths(tmp_path)

    refused = subprocess.run([sys.executable, *args[:3], f"gs://{bucket}/data", *args[4:]], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"--data gs://{bucket}/data is on remote storage" in refused.stderr


def test_a_study_run_in_a_bucket_leaves_its_log_and_record_there(gcs_emulator, tmp_path):
    """The study's runner with a gs:// workdir: the run's output lands in the bucket's train.log (appended
    to at a rerun), its record in run.json, and a run whose eval.json is in the bucket is skipped."""
    bucket = gcs_emulator.new_bucket()
    run_dir = f"gs://{bucket}/study/dr_only/seed0"
    train = ("from etils import epath; print('trained', flush=True); "
             f"epath.Path('{run_dir}/stage1/eval/eval.json').write_text('{{}}')")
    code = f"""
import os, sys
from cleaq_jax.programs.ablations import execution
os.chdir({str(tmp_path)!r})
run = {{"variant": "dr_only", "seed": 0, "dir": "{run_dir}", "stage": "stage1",
        "command": [sys.executable, "-c", {train!r}]}}
assert execution.run_unfinished([run], "gs://{bucket}/study") == []
assert execution.run_unfinished([run], "gs://{bucket}/study") == []  # finished: skipped
failing = dict(run, dir="{run_dir}-failed", command=[sys.executable, "-c", "print('broken'); raise SystemExit(3)"])
assert execution.run_unfinished([failing], "gs://{bucket}/study") == [failing]
assert execution.run_unfinished([failing], "gs://{bucket}/study") == [failing]
"""
    proc = emulator_lib.run_python(gcs_emulator, code)
    assert "skip dr_only seed 0" in proc.stdout
    root = os.path.join(gcs_emulator.root, bucket, "study", "dr_only")
    assert open(os.path.join(root, "seed0", "train.log")).read() == "trained\n"
    assert json.loads(open(os.path.join(root, "seed0", "run.json")).read())["status"] == "finished"
    assert open(os.path.join(root, "seed0-failed", "train.log")).read() == "broken\nbroken\n"
    record = json.loads(open(os.path.join(root, "seed0-failed", "run.json")).read())
    assert (record["status"], record["returncode"]) == ("failed", 3)
    assert os.listdir(tmp_path) == [] and not _local_gs_paths(tmp_path)


def test_shard_writers_refuse_a_gs_output_in_one_line_and_write_nothing_locally(tmp_path, monkeypatch):
    """Shards are local (ArrayRecord): a data-prep --out in a bucket stops before any work, naming the two
    ways to get them there, instead of building them under $PWD/gs:/..."""
    proc = subprocess.run([sys.executable, "-m", "cleaq_jax.data_prep.synthetic", "--out", "gs://bucket/shards",
                           "--num", "4", "--size", "32"], cwd=tmp_path, env=tiny.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "gs://bucket/shards is on remote storage" in proc.stderr and "gcloud storage cp" in proc.stderr
    assert os.listdir(tmp_path) == []
    from cleaq_jax import errors
    from cleaq_jax.data import shards

    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.StorageError, match="the shard output directory gs://bucket/x is on remote storage"):
        shards.ShardWriter("gs://bucket/x", "synthetic", "train")
    assert os.listdir(tmp_path) == []


def test_predict_lists_the_photographs_of_a_bucket_folder_as_of_a_local_one(gcs_emulator, tmp_path):
    bucket = gcs_emulator.new_bucket()
    names = ("b.png", "a.JPG", "notes.txt", ".hidden.png", "sub/c.png", "sub/deeper/d.tif", "zz/e.png")
    code = f"""
import os
from etils import epath
from cleaq_jax.programs import predict
for name in {names!r}:
    epath.Path("gs://{bucket}/photos/" + name).write_bytes(b"x")
    os.makedirs(os.path.dirname(os.path.join({str(tmp_path)!r}, "photos", name)), exist_ok=True)
    open(os.path.join({str(tmp_path)!r}, "photos", name), "wb").write(b"x")
remote = predict.list_inputs(["gs://{bucket}/photos/"])
local = predict.list_inputs([{str(tmp_path / "photos")!r}])
assert [p.split("/photos/")[1] for p in remote] == [p.split("/photos/")[1] for p in local] == [
    "a.JPG", "b.png", "sub/c.png", "sub/deeper/d.tif", "zz/e.png"], (remote, local)
assert remote[0] == "gs://{bucket}/photos/a.JPG"
"""
    emulator_lib.run_python(gcs_emulator, code)


def _program(emulator, cwd, module, *args, timeout=900):
    """python -m ``module`` ``args`` in a child process with the emulator's environment, started in ``cwd``."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=tiny.subprocess_env(**emulator.env),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_tiny_study_its_evaluation_curves_tables_and_predict_report_live_in_the_bucket(gcs_emulator, tmp_path):
    """The demo-sized pipeline (CLEAQ-DR, stages 1-3, at the ablations' tiny preset) trained by the study
    runner into a gs:// workdir, then every program that reads a run, each against the bucket: the
    evaluation of its stage-3 checkpoint, its curves, the study's tables (--tabulate-only over the finished
    run) and predict --report. Every file they write is in the bucket; the folder they start in stays empty,
    and no local path named gs: appears. The shards are the one local input (ArrayRecord reads local files)."""
    bucket = gcs_emulator.new_bucket()
    data, cwd = str(tmp_path / "data"), tmp_path / "cwd"
    cwd.mkdir()
    study = f"gs://{bucket}/study"
    run = f"{study}/cleaq_dr/seed0"
    flags = ["--data", data, "--workdir", study, "--variants", "cleaq_dr", "--seeds", "1", "--preset", "tiny"]
    out = _program(gcs_emulator, cwd, "cleaq_jax.programs.ablations", *flags, "--build-synthetic", "40", "--size", "32")
    assert "finished cleaq_dr seed 0" in out and f"results in {study}/results.md" in out

    _program(gcs_emulator, cwd, "cleaq_jax.main", f"--config={tiny.REPO}/configs/eval.py",
             f"--config.checkpoint_dir={run}/stage3", f"--config.data.dir={data}", f"--workdir={study}/evaluated",
             "--config.eval_batch_size=8", "--config.eval.vessel_max_images=0", "--config.eval.num_examples_grid=0")
    out = _program(gcs_emulator, cwd, "cleaq_jax.programs.curves", "--workdir", run, "--out", f"{run}/curves.png")
    assert "val/dr_kappa" in out and "train/loss" in out, out
    out = _program(gcs_emulator, cwd, "cleaq_jax.programs.ablations", *flags, "--tabulate-only")
    assert "start cleaq_dr" not in out and "skip cleaq_dr seed 0" not in out  # --tabulate-only starts nothing

    emulator_lib.run_python(gcs_emulator, f"""
import cv2, skimage.data
from etils import epath
ok, png = cv2.imencode(".png", cv2.cvtColor(skimage.data.retina(), cv2.COLOR_RGB2BGR))
for name in ("a.png", "b.png"):
    epath.Path("gs://{bucket}/photos/" + name).write_bytes(png.tobytes())
""")
    _program(gcs_emulator, cwd, "cleaq_jax.programs.predict", "--checkpoint", f"{run}/stage3", "--input",
             f"gs://{bucket}/photos", "--out", f"{study}/predicted", "--batch-size", "2", "--report")

    objects = set(_objects(gcs_emulator, bucket))
    expected = {f"study/cleaq_dr/seed0/{name}" for name in ("run.json", "train.log", "curves.png")}
    for stage in ("stage1", "stage2", "stage3"):
        expected |= {f"study/cleaq_dr/seed0/{stage}/eval/{name}" for name in ("eval.json", "eval.md")}
        assert any(p.startswith(f"study/cleaq_dr/seed0/{stage}/tensorboard/events.out.tfevents.") for p in objects)
        assert any(p.startswith(f"study/cleaq_dr/seed0/{stage}/checkpoints/") for p in objects)
    expected |= {f"study/{name}" for name in ("results.json", "results.md", "per_quality_kappa.png",
                                               "enhancement_examples.png")}
    expected |= {f"study/evaluated/eval/{name}" for name in ("eval.json", "eval.md", "confusion_matrix.png",
                                                              "per_quality.png")}
    expected |= {f"study/predicted/{name}" for name in ("predictions.csv", "report.html", "enhanced/a.png",
                                                         "enhanced/b.png", "explain/a.png", "crops/a.png")}
    assert expected <= objects, sorted(expected - objects)
    assert not [p for p in objects if "/.tmp-" in p or p.startswith(".tmp-")]  # each file renamed into place
    results = json.loads(open(os.path.join(gcs_emulator.root, bucket, "study/results.json")).read())
    assert [r["status"] for r in results["runs"]] == ["finished"]
    assert results["study"]["tabulated_by"].endswith("--tabulate-only")  # the training study's command kept
    assert "kappa" in json.loads(open(os.path.join(gcs_emulator.root, bucket, "study/evaluated/eval/eval.json"))
                                 .read())["dr"]["overall"]
    report = open(os.path.join(gcs_emulator.root, bucket, "study/predicted/report.html")).read()
    assert report.count('<article class="card"') == 2, report[:2000]
    assert os.listdir(cwd) == [] and not _local_gs_paths(tmp_path)
