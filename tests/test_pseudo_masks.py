"""The pseudo-mask pass: masks in every record with the other fields byte for byte, resuming after an
interruption without duplicates, the classical fallback without a teacher, and how good teacher and
fallback masks are against the synthetic data's true vessels.

The teacher here is CE-Net (width 1/4, one block per stage) trained for 240 steps on 33 synthetic 64-px
images, in a subprocess sharing the tests' compilation cache. Its Dice is low (0.2-0.33 in runs here,
against 0.15 for an all-field-of-view mask and 0.57 for the Frangi fallback): the tests show that the
pass writes exactly the teacher's thresholded predictions and that those beat an all-zero mask, not how
good a DRIVE-trained teacher is; bench/vessel_masks.py measures that at larger sizes
(docs/vessel_masks.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import msgpack
import numpy as np
import pytest

from cleaq_jax.data import pipeline, records
from cleaq_jax.data import shards
from cleaq_jax.data_prep import pseudo_masks
from tests import tiny

SIZE = 64
FRANGI_MIN_DICE = 0.4  # measured 0.57 on these 64-px images; the all-FOV mask scores 0.15


def _dice(pred: np.ndarray, truth: np.ndarray, fov: np.ndarray) -> tuple[int, int]:
    pred, truth = pred.astype(bool) & (fov > 0), truth.astype(bool) & (fov > 0)
    return 2 * int((pred & truth).sum()), int(pred.sum() + truth.sum())


def _pooled_dice(out_dir: str, truth: dict[str, np.ndarray], split: str = "test") -> float:
    num = den = 0
    for r in shards.iter_records(out_dir, split):
        a, b = _dice(r["vessel"], truth[r["id"]], r["mask"])
        num, den = num + a, den + b
    return num / den


def _strip_vessels(src: str, dst: str, shards_per_split: int = 3) -> None:
    """A copy of a shard set whose records carry no vessel mask (as EyeQ's do), several shards per split."""
    for split in shards.read_manifest(src)["splits"]:
        with shards.ShardWriter(dst, "synthetic", split, num_shards=shards_per_split) as w:
            for payload in shards.iter_records(src, split, decode_images=False):
                w.write(msgpack.packb({**payload, "vessel": b""}, use_bin_type=True))


def _payloads(path: str) -> dict[str, dict]:
    return {p["id"]: p for p in shards.iter_records(path, decode_images=False)}


def _run(*args: str, devices: int = 1) -> None:
    proc = subprocess.run([sys.executable, *args], env=tiny.subprocess_env(devices), cwd=tiny.REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(48 synthetic 64-px images with true vessels: train 33 / val 5 / test 10, the same without vessels)."""
    root = tmp_path_factory.mktemp("pseudo")
    data, plain = str(root / "data"), str(root / "plain")
    _run("-m", "cleaq_jax.data_prep.synthetic", "--out", data, "--num", "48", "--size", str(SIZE), "--workers", "1")
    _strip_vessels(data, plain)
    return data, plain


@pytest.fixture(scope="module")
def teacher_dir(synthetic, tmp_path_factory):
    """teacher_a of configs/vessel_teacher.py trained on the synthetic train split (240 steps)."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    overrides = {"stage": "teacher_a", "data.dir": synthetic[0], "data.image_size": SIZE, "model.width": 0.25,
                 "model.encoder_stages": "(1,1,1,1)", "batch_size": 8, "eval_batch_size": 8, "num_epochs": 60,
                 "optim.learning_rate": 1e-2, "optim.constant_epochs": 60, "log_every_steps": 60,
                 "checkpoint_every_steps": 1000}
    _run("-m", "cleaq_jax.main", "--config=configs/vessel_teacher.py", f"--workdir={workdir}",
         *(f"--config.{k}={v}" for k, v in overrides.items()))
    return os.path.join(workdir, "teacher_a")


@pytest.fixture(scope="module")
def teacher_pass(synthetic, teacher_dir, tmp_path_factory):
    """The pass over the vessel-free copy with that teacher, on two devices, 5 records per batch."""
    out = str(tmp_path_factory.mktemp("teacher_masks") / "out")
    _run("-m", "cleaq_jax.data_prep.pseudo_masks", "--shards", synthetic[1], "--teacher", teacher_dir, "--out", out,
         "--batch-size", "5", devices=2)
    return out


def _truth(synthetic) -> dict[str, np.ndarray]:
    return {r["id"]: r["vessel"] for r in shards.iter_records(synthetic[0], "test")}


# --------------------------------------------------------------------------- the teacher's pass
@pytest.mark.slow
def test_teacher_pass_adds_a_mask_to_every_record_and_copies_every_other_field_byte_for_byte(synthetic, teacher_pass):
    source, output = _payloads(synthetic[1]), _payloads(teacher_pass)
    assert sorted(output) == sorted(source)
    for example_id, before in source.items():
        after = output[example_id]
        assert after["vessel"], f"{example_id} has no vessel mask"
        assert {k: v for k, v in after.items() if k != "vessel"} == {k: v for k, v in before.items() if k != "vessel"}
        vessel = records.decode_png(after["vessel"], color=False)
        assert vessel.shape == (SIZE, SIZE) and set(np.unique(vessel)) <= {0, 255}


@pytest.mark.slow
def test_teacher_pass_manifest_counts_the_masks_and_names_method_and_checkpoint(synthetic, teacher_dir,
                                                                                teacher_pass):
    manifest = shards.read_manifest(teacher_pass)
    source = shards.read_manifest(synthetic[1])
    assert set(manifest["splits"]) == set(source["splits"])
    for split, entry in manifest["splits"].items():
        assert entry["with_vessel_mask"] == entry["num_records"] == source["splits"][split]["num_records"]
        assert entry["shards"] == source["splits"][split]["shards"]
        info = entry["vessel_masks"]
        assert info["method"] == "teacher" and info["teacher_stage"] == "teacher_a"
        assert info["teacher"] == os.path.join(teacher_dir, "checkpoints") and info["teacher_step"] == 240


@pytest.mark.slow
def test_teacher_masks_score_the_teachers_own_evaluation_and_beat_an_all_zero_mask(synthetic, teacher_dir,
                                                                                   teacher_pass):
    with open(os.path.join(teacher_dir, "eval", "eval.json")) as f:
        evaluated = json.load(f)["raw"]["dice"]
    dice = _pooled_dice(teacher_pass, _truth(synthetic))
    # The pass writes the masks the evaluation thresholded (other batches and devices: a pixel may flip).
    assert dice == pytest.approx(evaluated, abs=2e-3)
    assert dice > 0.05  # an all-zero mask scores 0


# --------------------------------------------------------------------------- the classical fallback
def test_frangi_pass_needs_no_teacher_and_reaches_the_stated_dice(synthetic, tmp_path):
    out = str(tmp_path / "frangi")
    assert pseudo_masks.main(["--shards", synthetic[1], "--method", "frangi", "--out", out, "--workers", "1"]) == 0
    manifest = shards.read_manifest(out)
    assert {e["vessel_masks"]["method"] for e in manifest["splits"].values()} == {"frangi"}
    assert _pooled_dice(out, _truth(synthetic)) > FRANGI_MIN_DICE


def test_a_masked_set_carries_every_sidecar_and_feeds_a_class_balanced_loader(synthetic, tmp_path):
    out = str(tmp_path / "masked")
    assert pseudo_masks.main(["--shards", synthetic[1], "--method", "matched", "--out", out, "--workers", "1"]) == 0
    manifest = shards.read_manifest(out)
    for split, entry in manifest["splits"].items():
        with open(os.path.join(synthetic[1], entry["labels"])) as a, open(os.path.join(out, entry["labels"])) as b:
            assert a.read() == b.read(), split
        assert entry["vessel_masks"]["input"] == os.path.abspath(synthetic[1])
    batch = next(pipeline.train_loader(out, "train", global_batch_size=4,
                                       sampling=pipeline.EpochSampling(seed=0, class_balance=0.5),
                                       reading=pipeline.RecordReading(process_index=0, process_count=1,
                                                                      read_threads=0)))
    assert batch["has_vessel"].all() and batch["has_reference"].all()


def test_a_damaged_input_shard_is_named_before_any_shard_is_masked(synthetic, tmp_path, capsys):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(synthetic[1], damaged)
    shard = shards.split_shards(damaged, "val")[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    out = str(tmp_path / "out")
    assert pseudo_masks.main(["--shards", damaged, "--method", "matched", "--out", out, "--workers", "1"]) == 2
    message = capsys.readouterr().err
    assert shard in message and "truncated or corrupt" in message
    assert not [n for n in os.listdir(out) if ".array_record-" in n]


# --------------------------------------------------------------------------- resuming
def _shard_files(out: str) -> dict[str, int]:
    return {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if not n.startswith(".")
            and ".array_record-" in n}


class _Interrupt(Exception):
    pass


def _failing_after(masker, calls: int):
    count = [0]

    def masks(payloads):
        count[0] += 1
        if count[0] > calls:
            raise _Interrupt("simulated kill")
        return masker(payloads)

    return masks


def test_a_pass_interrupted_mid_shard_resumes_to_the_uninterrupted_result_without_duplicates(synthetic, tmp_path):
    plain = synthetic[1]
    settings = {"method": "matched", "keep_existing": False}
    masker = pseudo_masks.FilterMasker("matched", workers=1)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    pseudo_masks.run_pass(plain, straight, masker, settings, batch_size=2)
    with pytest.raises(_Interrupt):  # 3 shards of 2-4 records at 2 per batch: dies inside the third shard
        pseudo_masks.run_pass(plain, resumed, _failing_after(masker, 5), settings, batch_size=2)
    done_before = _shard_files(resumed)
    assert 0 < len(done_before) < len(_shard_files(straight))
    assert not os.path.exists(os.path.join(resumed, shards.MANIFEST))  # incomplete: no manifest
    open(os.path.join(resumed, f".{next(iter(done_before))}.tmp-99999"), "wb").close()  # a killed writer's leftover
    pseudo_masks.run_pass(plain, resumed, masker, settings, batch_size=2)
    after = _shard_files(resumed)
    assert {n: after[n] for n in done_before} == done_before  # finished shards were not redone
    assert sorted(os.listdir(resumed)) == sorted(os.listdir(straight))  # no partial files left
    ids = [p["id"] for p in shards.iter_records(resumed, decode_images=False)]
    assert len(ids) == len(set(ids)) == sum(e["num_records"] for e in shards.read_manifest(plain)["splits"].values())
    for name in after:
        with open(os.path.join(resumed, name), "rb") as a, open(os.path.join(straight, name), "rb") as b:
            assert a.read() == b.read(), name


def test_rerunning_a_finished_pass_rewrites_nothing_but_other_settings_redo_every_shard(synthetic, tmp_path):
    out = str(tmp_path / "out")
    args = ["--shards", synthetic[1], "--out", out, "--workers", "1"]
    assert pseudo_masks.main(args + ["--method", "matched"]) == 0
    first = _shard_files(out)
    assert pseudo_masks.main(args + ["--method", "matched"]) == 0
    assert _shard_files(out) == first
    assert pseudo_masks.main(args + ["--method", "frangi"]) == 0
    assert all(t != first[n] for n, t in _shard_files(out).items())
    with open(os.path.join(out, shards.MANIFEST)) as f:
        assert {e["vessel_masks"]["method"] for e in json.load(f)["splits"].values()} == {"frangi"}


def test_keep_existing_copies_records_that_carry_a_mask_unchanged(synthetic, tmp_path):
    out = str(tmp_path / "kept")
    assert pseudo_masks.main(["--shards", synthetic[0], "--out", out, "--method", "matched", "--workers", "1",
                              "--keep-existing"]) == 0
    source = {r["id"]: r for r in shards.iter_records(synthetic[0], decode_images=False)}
    assert _payloads(out) == source
    assert all(e["vessel_masks"]["kept_existing"] == e["num_records"]
               for e in shards.read_manifest(out)["splits"].values())


# --------------------------------------------------------------------------- guardrails
def test_teacher_method_without_a_checkpoint_names_the_config_and_the_fallback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pseudo_masks.main(["--shards", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "configs/vessel_teacher.py" in message and "--method frangi" in message


def test_writing_over_the_input_directory_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pseudo_masks.main(["--shards", str(tmp_path), "--out", str(tmp_path), "--method", "frangi"])
    assert "is the input directory" in capsys.readouterr().err


def test_a_checkpoint_of_another_stage_is_refused_by_name(tmp_path, capsys):
    from cleaq_jax.runtime import checkpoint

    batch = tiny.random_batch(1, 32)
    with shards.ShardWriter(str(tmp_path / "shards"), "tiny", "train", num_shards=1) as w:
        w.write({"image": batch["image"][0], "mask": batch["mask"][0], "id": "a"})
    ckpt = str(tmp_path / "stage1" / "checkpoints")
    with checkpoint.Checkpointer(ckpt, async_save=False) as saver:
        saver.save(1, {"x": np.zeros(2, np.float32)}, config={"stage": "stage1"})
    assert pseudo_masks.main(["--shards", str(tmp_path / "shards"), "--teacher", str(tmp_path / "stage1"),
                              "--out", str(tmp_path / "out")]) == 2
    assert "not a vessel teacher's" in capsys.readouterr().err
