"""gs:// paths against a Cloud Storage emulator on localhost: etils.epath (through gcsfs) and orbax
checkpoints (tensorstore's GCS driver) write into the emulator's bucket, and read back what they wrote."""

import os

from tests import gcs_emulator as emulator_lib


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
