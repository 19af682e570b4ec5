"""The paper path end to end, as the README gives it: EyeQ, Messidor and DRIVE folders in their published
layouts (synthetic fundus photographs at 32 px), each prep, both vessel-teacher stages, the pseudo
masks, stages 1, 2 and 3 with class-balanced sampling, evaluation, and predict on the photographs;
Messidor's stages 1 and 3 with 4 grades. Every command runs as a user would run it, in a subprocess,
at tiny widths and one epoch. Each stage must train every loss it says it trains (present in its
TensorBoard scalars, non-zero, changing between logged steps), and every evaluation table must have a
row for each quality level that has a reference.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import fixtures_layouts as layouts
from tests import tiny

pytestmark = pytest.mark.slow

SIZE = 32
QUALITY = ("good", "usable", "reject")
# The overrides every tiny training run of the tests uses (tests/tiny.py), as command-line flags.
TINY = ("--config.model.width=0.0625", "--config.model.encoder_stages=(1,1,1,1)",
        "--config.model.classifier_stages=(1,1,1,1)", f"--config.data.image_size={SIZE}",
        "--config.data.synthetic.num=0", "--config.batch_size=4", "--config.eval_batch_size=4",
        "--config.num_epochs=1", "--config.log_every_steps=1", "--config.image_every_steps=0",
        "--config.checkpoint_every_steps=1000", "--config.eval.num_examples_grid=0")
# Losses each stage trains, as its step logs them (cleaq_jax/training/steps.py, cleaq_jax/training/losses.py).
STAGE_LOSSES = {"stage1": ("loss_iqe", "loss_qe", "loss_seg", "loss_dr"),
                "stage2": ("loss_iqa", "loss_qa", "loss_lqi"),
                "stage3": ("loss_iqe", "loss_qe", "loss_seg", "loss_iqa", "loss_qa", "loss_lqi", "loss_dr"),
                "teacher_a": ("loss_dice", "loss_bce"), "teacher_b": ("loss_dice", "loss_bce")}


def _run(log: list, command: str, *args: str) -> str:
    """Run the console script ``command`` with ``args`` in the repository as a user would (the install
    put it beside this Python); its stdout + stderr."""
    start = time.monotonic()
    script = os.path.join(os.path.dirname(sys.executable), command)
    proc = subprocess.run([script, *args], env=tiny.subprocess_env(1), cwd=tiny.REPO,
                          capture_output=True, text=True, timeout=900)
    log.append((" ".join((command, *args[:2])), round(time.monotonic() - start, 1)))
    assert proc.returncode == 0, f"{command} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _eyeq(root: str) -> tuple[str, str, str]:
    """EyePACS images and both EyeQ label CSVs (published columns): 12 train and 6 test photographs."""
    images = os.path.join(root, "images")
    for name, first, n in (("train", 10009, 12), ("test", 30001, 6)):
        rows = []
        for i in range(n):
            image_id = f"{first + i}_{'left' if i % 2 else 'right'}"
            layouts.write_image(os.path.join(images, f"{image_id}.jpeg"), layouts.small_fundus(i + first))
            rows.append([i, f"{image_id}.jpeg", i % 3, i % 5])
        layouts.write_csv(os.path.join(root, f"Label_EyeQ_{name}.csv"), layouts.EYEQ_HEADER, rows)
    return images, os.path.join(root, "Label_EyeQ_train.csv"), os.path.join(root, "Label_EyeQ_test.csv")


def _scalars(stage_dir: str) -> dict[str, list[float]]:
    """{tag: values in step order} of a stage's train scalars from its TensorBoard event files."""
    from tensorboard.backend.event_processing import (
        event_accumulator,  # heavy: TensorBoard's reader
    )
    from tensorboard.util import tensor_util

    events = glob.glob(os.path.join(stage_dir, "tensorboard", "events.out.tfevents.*"))
    assert events, f"no TensorBoard events in {stage_dir}"
    acc = event_accumulator.EventAccumulator(os.path.dirname(events[0]), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    out: dict[str, list[float]] = {}
    for tag in acc.Tags()["tensors"]:
        out[tag] = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
    for tag in acc.Tags()["scalars"]:
        out[tag] = [e.value for e in acc.Scalars(tag)]
    return out


def _assert_trains(stage_dir: str, losses: tuple[str, ...]) -> None:
    scalars = _scalars(stage_dir)
    for name in losses:
        values = scalars.get(f"train/{name}")
        assert values is not None, f"{stage_dir}: train/{name} not logged ({sorted(scalars)})"
        # Non-zero at some logged step (a batch may hold no image a term applies to), changing between them.
        assert all(np.isfinite(values)) and any(v != 0.0 for v in values), f"{stage_dir}: {name} = {values}"
        assert len(values) >= 2 and len(set(values)) > 1, f"{stage_dir}: {name} never changes: {values}"


def _assert_tables(eval_dir: str, levels_with_reference: set[str]) -> dict:
    with open(os.path.join(eval_dir, "eval.json")) as f:
        result = json.load(f)
    for task in ("dr", "iqa", "iqa_enhanced"):
        if task in result:
            assert result[task]["overall"]["n"] > 0, (eval_dir, task)
    if "enhancement" in result:
        assert set(result["enhancement"]["per_quality"]) == levels_with_reference, eval_dir
    return result


@pytest.fixture(scope="module")
def paper_path(tmp_path_factory):
    """Every README command on the three fixtures; {'root', 'log': [(command, seconds)], 'messidor_out'}."""
    root = str(tmp_path_factory.mktemp("paper"))
    p = lambda *parts: os.path.join(root, *parts)  # noqa: E731
    log: list = []
    images, train_csv, test_csv = _eyeq(p("eyeq"))
    layouts.messidor_layout(p("messidor"), per_base=9, bases=("11", "12"), faults=False)
    layouts.drive_layout(p("drive"), train=(21, 22, 23, 24), test=(1, 2))
    common = ("--size", str(SIZE), "--workers", "1")
    _run(log, "cleaq-prep-eyeq", "--images", images, "--labels", train_csv, "--split", "train",
         "--out", p("eyeq_shards"), *common)
    _run(log, "cleaq-prep-eyeq", "--images", images, "--labels", test_csv, "--split", "test",
         "--out", p("eyeq_shards"), *common)
    messidor_out = _run(log, "cleaq-prep-messidor", "--root", p("messidor"), "--out", p("messidor_shards"),
                        "--train", "12", "--test", "6", *common)
    _run(log, "cleaq-prep-drive", "--root", p("drive"), "--out", p("drive_shards"), *common)
    _run(log, "cleaq-run", "--config=configs/vessel_teacher.py", f"--workdir={p('teacher')}",
         f"--config.data.dir={p('drive_shards')}", *TINY, "--config.batch_size=2", "--config.eval_batch_size=2")
    for data in ("eyeq", "messidor"):
        _run(log, "cleaq-prep-pseudo-masks", "--shards", p(f"{data}_shards"), "--teacher",
             p("teacher", "teacher_b"), "--out", p(f"{data}_v"))
    for stage in ("stage1", "stage2", "stage3"):
        _run(log, "cleaq-run", f"--config=configs/{stage}.py", f"--config.data.dir={p('eyeq_v')}",
             f"--workdir={p('run')}", "--config.data.class_balance=0.5", *TINY)
    _run(log, "cleaq-run", "--config=configs/eval.py", f"--config.checkpoint_dir={p('run', 'stage3')}",
         f"--config.data.dir={p('eyeq_v')}", f"--workdir={p('eval')}", "--config.eval_batch_size=4")
    _run(log, "cleaq-predict", "--checkpoint", p("run", "stage3"), "--input", images,
         "--out", p("predicted"), "--batch-size", "4")
    for stage in ("stage1", "stage3"):
        _run(log, "cleaq-run", f"--config=configs/{stage}.py", f"--config.data.dir={p('messidor_v')}",
             f"--workdir={p('messidor_run')}", "--config.data.class_balance=0.5", "--config.data.num_grades=4",
             f"--config.init.stage2={p('run', 'stage2')}", *TINY)
    return {"root": root, "log": log, "messidor_out": messidor_out}


def test_every_stage_trains_every_loss_it_names(paper_path):
    run = os.path.join(paper_path["root"], "run")
    for stage in ("stage1", "stage2", "stage3"):
        _assert_trains(os.path.join(run, stage), STAGE_LOSSES[stage])
    for stage in ("teacher_a", "teacher_b"):
        _assert_trains(os.path.join(paper_path["root"], "teacher", stage), STAGE_LOSSES[stage])


def test_messidor_stage3_trains_every_loss_with_four_grades(paper_path):
    _assert_trains(os.path.join(paper_path["root"], "messidor_run", "stage3"), STAGE_LOSSES["stage3"])


def test_messidor_stage1_trains_enhancement_against_the_clean_references(paper_path):
    # Messidor's records are usable / reject only through QT, with the clean crop as reference: stage 1's
    # L_QE and L_Seg are non-zero only once L_QE uses the record's reference.
    _assert_trains(os.path.join(paper_path["root"], "messidor_run", "stage1"), STAGE_LOSSES["stage1"])


def test_every_evaluation_has_rows_for_each_level_with_a_reference(paper_path):
    root = paper_path["root"]
    for stage in ("stage1", "stage2", "stage3"):
        _assert_tables(os.path.join(root, "run", stage, "eval"), {"good", "usable"})
    result = _assert_tables(os.path.join(root, "eval", "eval"), {"good", "usable"})
    assert result["stage"] == "stage3" and set(result["dr"]["per_quality"]) == set(QUALITY)
    for stage in ("stage1", "stage3"):
        # Every Messidor record carries its clean reference: all three levels are scored.
        result = _assert_tables(os.path.join(root, "messidor_run", stage, "eval"), set(QUALITY))
        assert result["enhancement"]["overall"]["n_clean_reference"] == result["enhancement"]["overall"]["n"]
        assert np.asarray(result["dr"]["overall"]["confusion_matrix"]).shape == (4, 4)


def test_predict_grades_every_fixture_photograph(paper_path):
    with open(os.path.join(paper_path["root"], "predicted", "predictions.csv")) as f:
        assert len(f.read().strip().splitlines()) == 1 + 18  # header + every EyeQ photograph


def test_messidor_prep_prints_its_counts_table(paper_path):
    out = paper_path["messidor_out"]
    assert all(level in out for level in QUALITY) and "train" in out and "test" in out
    print("\n".join(f"{cmd}: {sec} s" for cmd, sec in paper_path["log"]))
