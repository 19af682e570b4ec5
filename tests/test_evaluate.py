"""Evaluation (cleaq_jax.programs.evaluate, cleaq_jax.evaluation.report): topology-free restore of a checkpoint for inference,
the paper's tables per quality level from per-example outputs, and the report files of a run.

The checkpoint is a tiny CLEAQ-DR state (32 px, width 1/16) with deterministic host-drawn weights, saved
by a subprocess that sees 8 fake CPU devices with parameters sharded over them; this process has one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.data
from sklearn.metrics import cohen_kappa_score

from cleaq_jax.data import fundus, pipeline, records
from cleaq_jax.data import shards
from cleaq_jax.evaluation import inference, metrics, report, restore
from cleaq_jax.models import factory
from cleaq_jax.programs import evaluate
from cleaq_jax.runtime import parallel
from cleaq_jax.training import optim, stages
from cleaq_jax.training import state as train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
NETS = ("iqe", "iqa", "dr")
# Grade and quality of the test split's examples: every quality level, grades 0-4.
GRADES = (0, 1, 2, 3, 4, 0)
QUALITIES = (0, 1, 2, 0, 1, 2)


# --------------------------------------------------------------------------- shared with test_predict.py
def tiny_config(stage: str = "stage3") -> ml_collections.ConfigDict:
    """configs/demo.py shrunk to 32 px and width 1/16: every subnetwork, seconds to compile."""
    from cleaq_jax.configs import demo

    cfg = demo.get_config()
    cfg.stage = stage
    cfg.data.image_size = SIZE
    cfg.data.synthetic.num = 0
    cfg.model.width = 1 / 16
    cfg.eval_batch_size = 4
    cfg.eval.num_examples_grid = 3
    return cfg


def _fill(path, leaf, rng: np.random.Generator) -> np.ndarray:
    name = jax.tree_util.keystr(path)
    if "params" in name and name.endswith("['kernel']"):
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
    if ("params" in name and name.endswith("['scale']")) or ("batch_stats" in name and name.endswith("['var']")):
        return np.ones(leaf.shape, leaf.dtype)
    if "params" in name and name.endswith("['bias']"):
        return (0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)


def host_state(cfg: ml_collections.ConfigDict, nets=NETS, seed: int = 0, quality_bias=None):
    """A full TrainState (as training saves it) of numpy arrays: He-scaled kernels, unit BatchNorm.

    Drawn on the host because compiling the flax initialisers takes minutes on a small CPU; the same
    seed gives the same state in any process. quality_bias: (3,) added to C-IQA's output bias.
    """
    models = factory.build_models(cfg)
    stage = dataclasses.replace(stages.Stage.from_config(cfg, "stage3", steps_per_epoch=1), nets=tuple(nets))
    tx = optim.make_optimizer(stage.optim, 1)
    abstract = jax.eval_shape(lambda k: train_state.init_state(stage, models, tx, k), jax.random.key(0))
    rng = np.random.default_rng(seed)
    state = jax.tree_util.tree_map_with_path(lambda p, leaf: _fill(p, leaf, rng), abstract)
    if quality_bias is not None:
        state.params["iqa"]["c_iqa"]["fc"]["bias"] = np.asarray(quality_bias, np.float32)
    return state


def save_checkpoint(cfg, directory: str, state, mesh) -> None:
    """Save `state` laid out on `mesh` (small leaves sharded too) as training does, with a config that
    names the metric ranking its checkpoints (the training loss, as for a stage without validation)."""
    from cleaq_jax.runtime import checkpoint

    shardings = parallel.state_shardings(state, mesh, fsdp_min_size=64)
    placed = jax.tree.map(lambda a, s: jax.device_put(a, s), state, shardings)
    saved = cfg.copy_and_resolve_references()
    saved.checkpoint_metric, saved.checkpoint_mode = checkpoint.best_metric(cfg.checkpoint_metric, cfg.checkpoint_mode, (),
                                                                              validating=False)
    with checkpoint.Checkpointer(os.path.join(directory, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(2, placed, config=saved)


def write_split(data_dir: str, split: str = "test", with_reference: bool = False) -> list[str]:
    """The real scikit-image fundus photograph at 32 px, flipped and dimmed into len(GRADES) examples.

    with_reference: each record keeps its undimmed flip as its clean ``reference``, and good records are
    left undimmed (their image is their reference), as synthetic and Messidor records are.
    """
    image, mask = fundus.preprocess(skimage.data.retina(), SIZE, name="retina")
    ids = []
    with shards.ShardWriter(data_dir, "retina", split, num_shards=2) as writer:
        for i, (grade, quality) in enumerate(zip(GRADES, QUALITIES)):
            flip = (i % 2, i // 3)
            img = np.flip(image, [a for a, f in zip((0, 1), flip) if f]) if any(flip) else image
            msk = np.flip(mask, [a for a, f in zip((0, 1), flip) if f]) if any(flip) else mask
            clean = np.ascontiguousarray(img)
            if not (with_reference and quality == 0):
                img = (img.astype(np.float32) * (1.0 - 0.1 * i)).astype(np.uint8)
            ids.append(f"retina-{i}")
            extra = {"reference": clean} if with_reference else {}
            writer.write({"image": np.ascontiguousarray(img), "mask": np.ascontiguousarray(msk),
                          "vessel": None, "dr_grade": grade, "quality": quality, "id": ids[-1],
                          "source": "skimage", **extra})
    return ids


_SAVE_ON_8 = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path[:0] = [{repo!r}, os.path.join({repo!r}, "tests")]
    import jax
    from cleaq_jax.runtime import parallel
    import test_evaluate as t
    assert jax.device_count() == 8, jax.devices()
    cfg = t.tiny_config()
    t.save_checkpoint(cfg, {out!r}, t.host_state(cfg), parallel.make_mesh(4, 2))
""")


def save_on_8_devices(directory: str) -> None:
    """Write the tiny stage-3 checkpoint from a process with 8 fake CPU devices (data 4 x fsdp 2)."""
    code = _SAVE_ON_8.format(repo=REPO, out=directory)
    # The child inherits conftest's settings, the shared compilation cache among them: orbax compiles a few
    # hundred small slicing programs for an 8-way replicated save.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def stage3_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("run") / "stage3")
    cfg = tiny_config()
    save_checkpoint(cfg, directory, host_state(cfg), parallel.make_mesh())
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("shards"))
    write_split(directory)
    return directory


def _evaluate(stage3_dir: str, data_dir: str, out: str):
    from cleaq_jax.configs import eval as eval_config

    cfg = eval_config.get_config()
    cfg.checkpoint_dir = stage3_dir
    cfg.data.dir = data_dir
    cfg.eval_batch_size = 4
    cfg.eval.num_examples_grid = 3
    return evaluate.run(cfg, out), os.path.join(out, "eval")


@pytest.fixture(scope="module")
def evaluated_and_log(stage3_dir, data_dir, tmp_path_factory):
    """The evaluation's (result, eval directory) and what it wrote to stderr (its progress bar)."""
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        evaluated = _evaluate(stage3_dir, data_dir, str(tmp_path_factory.mktemp("eval")))
    return evaluated, log.getvalue()


@pytest.fixture(scope="module")
def evaluated(evaluated_and_log):
    return evaluated_and_log[0]


@pytest.fixture(scope="module")
def referenced_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("shards_ref"))
    write_split(directory, with_reference=True)
    return directory


# --------------------------------------------------------------------------- restore
@pytest.mark.slow
def test_restores_a_checkpoint_saved_on_8_devices_onto_1(tmp_path):
    save_on_8_devices(str(tmp_path / "stage3"))
    one = parallel.make_mesh(devices=jax.devices()[:1])
    restored = restore.load_checkpoint(str(tmp_path / "stage3"), one)
    expected = host_state(tiny_config())
    assert restored.nets == NETS and restored.stage == "stage3" and restored.step == 2
    got = jax.tree_util.tree_leaves_with_path(restored.state.params)
    want = dict(jax.tree_util.tree_leaves_with_path(expected.params))
    assert len(got) == len(want)
    for path, leaf in got:
        assert leaf.sharding.device_set == {jax.devices()[0]}
        np.testing.assert_array_equal(np.asarray(leaf), want[path], err_msg=jax.tree_util.keystr(path))


def test_restored_config_is_the_trained_one(stage3_dir):
    restored = restore.load_checkpoint(stage3_dir)
    assert restored.config.data.image_size == SIZE
    assert restored.config.model.encoder_stages == (1, 1, 1, 1)  # JSON lists come back as tuples


def test_a_folder_without_checkpoints_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        restore.load_checkpoint(str(tmp_path))


def test_eval_without_checkpoint_dir_names_the_key(tmp_path):
    from cleaq_jax.configs import eval as eval_config

    with pytest.raises(ValueError, match="config.checkpoint_dir"):
        evaluate.run(eval_config.get_config(), str(tmp_path))


# --------------------------------------------------------------------------- summarise
def _probs(pred: list[int], k: int) -> np.ndarray:
    return np.eye(k, dtype=np.float32)[pred] * 0.8 + 0.2 / k


def test_summarise_splits_dr_grading_by_quality_level():
    quality = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    grade = np.array([0, 1, 2, 3, 4, 0, 2, -1])
    pred = [0, 1, 2, 4, 4, 1, 2, 3]
    result = evaluate.summarise({"quality": quality, "dr_grade": grade, "dr_probs": _probs(pred, 5)})
    per = result["dr"]["per_quality"]
    assert {q: per[q]["n"] for q in per} == {"good": 3, "usable": 2, "reject": 2}  # unknown grade left out
    assert (per["good"]["accuracy"], per["usable"]["accuracy"], per["reject"]["accuracy"]) == (1.0, 0.5, 0.5)
    assert result["dr"]["overall"]["n"] == 7
    assert np.asarray(result["dr"]["overall"]["confusion_matrix"]).sum() == 7


def test_summarise_kappa_equals_the_metric_and_scikit_learn():
    rng = np.random.default_rng(3)
    quality = rng.integers(0, 3, 60)
    grade = rng.integers(0, 5, 60)
    pred = np.where(rng.random(60) < 0.6, grade, rng.integers(0, 5, 60))
    result = evaluate.summarise({"quality": quality, "dr_grade": grade, "dr_probs": _probs(pred, 5)})
    for level, name in enumerate(records.QUALITY_NAMES):
        rows = quality == level
        got = result["dr"]["per_quality"][name]["kappa"]
        assert got == pytest.approx(float(metrics.quadratic_weighted_kappa(grade[rows], pred[rows], 5)), abs=1e-6)
        assert got == pytest.approx(cohen_kappa_score(grade[rows], pred[rows], weights="quadratic",
                                                      labels=range(5)), abs=1e-5)


def test_summarise_iqa_tables_use_quality_as_the_label():
    quality = np.array([0, 0, 1, 1, 2, 2])
    result = evaluate.summarise({"quality": quality, "dr_grade": np.zeros(6, int),
                                 "quality_probs": _probs([0, 1, 1, 1, 2, 0], 3)})
    assert result["iqa"]["overall"]["accuracy"] == pytest.approx(4 / 6)
    assert result["iqa"]["overall"]["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert result["iqa"]["per_quality"]["usable"]["accuracy"] == 1.0


def test_summarise_enhancement_leaves_out_images_without_reference():
    nan = np.nan
    out = {"quality": np.array([0, 0, 1, 2]), "dr_grade": np.zeros(4, int),
           "psnr_input": np.array([10.0, 20.0, 30.0, nan]), "psnr_enhanced": np.array([12.0, 22.0, np.inf, nan]),
           "ssim_input": np.array([0.5, 0.7, 0.9, nan]), "ssim_enhanced": np.array([0.6, 0.8, 0.95, nan])}
    e = evaluate.summarise(out)["enhancement"]
    assert e["overall"]["n"] == 3 and set(e["per_quality"]) == {"good", "usable"}
    assert e["per_quality"]["good"]["psnr_input"] == pytest.approx(15.0)
    assert e["per_quality"]["good"]["ssim_enhanced"] == pytest.approx(0.7)
    assert e["overall"]["psnr_enhanced"] == pytest.approx(17.0)  # the +inf of an identical image is left out
    assert e["per_quality"]["usable"]["psnr_enhanced"] is None


def test_summarise_reports_undefined_kappa_as_none_in_strict_json():
    out = {"quality": np.array([0, 0]), "dr_grade": np.array([2, 2]), "dr_probs": _probs([2, 2], 5)}
    result = evaluate.summarise(out)
    assert result["dr"]["overall"]["kappa"] is None and result["dr"]["overall"]["accuracy"] == 1.0
    json.dumps(result, allow_nan=False)


# --------------------------------------------------------------------------- a whole evaluation
def test_evaluation_counts_every_test_example_by_quality(evaluated):
    result, _ = evaluated
    assert result["num_examples"] == len(GRADES)
    assert result["nets"] == list(NETS) and result["dr_input"] == "enhanced"
    assert {q: m["n"] for q, m in result["dr"]["per_quality"].items()} == {"good": 2, "usable": 2, "reject": 2}
    assert np.asarray(result["dr"]["overall"]["confusion_matrix"]).sum(axis=1).tolist() == [2, 1, 1, 1, 1]
    assert np.asarray(result["iqa"]["overall"]["confusion_matrix"]).sum(axis=1).tolist() == [2, 2, 2]
    assert result["iqa_enhanced"]["overall"]["n"] == len(GRADES)


def test_evaluation_progress_bar_counts_batches_out_of_the_splits_total(evaluated_and_log):
    # 6 test records in batches of 4: 2 batches, known from the manifest before the first one is read,
    # so the bar shows a fraction and the time left ("0/2 [00:00<?, ...]"), not a bare count.
    log = evaluated_and_log[1]
    assert "stage3 evaluation (test)" in log
    assert re.search(r"\b[0-2]/2 \[\d+:\d+<", log), log


def test_evaluation_measures_enhancement_on_images_with_a_reference(evaluated):
    result, _ = evaluated
    e = result["enhancement"]
    assert e["overall"]["n"] == 4 and set(e["per_quality"]) == {"good", "usable"}
    assert 0.0 < e["overall"]["ssim_input"] < 1.0  # QT degraded the originals
    assert np.isfinite(e["overall"]["psnr_enhanced"])


def test_evaluation_without_references_scores_good_and_usable_against_the_original(evaluated):
    result, out_dir = evaluated
    assert result["enhancement"]["overall"]["n_clean_reference"] == 0
    with open(os.path.join(out_dir, "eval.md")) as f:
        assert "Reference: the reference is the original itself" in f.read()


def test_evaluation_scores_every_quality_level_against_the_records_clean_reference(
        stage3_dir, referenced_dir, tmp_path):
    result, out_dir = _evaluate(stage3_dir, referenced_dir, str(tmp_path))
    e = result["enhancement"]
    assert {q: m["n"] for q, m in e["per_quality"].items()} == {"good": 2, "usable": 2, "reject": 2}
    assert all(m["n_clean_reference"] == m["n"] for m in [e["overall"], *e["per_quality"].values()])
    # Usable and reject images enter as they are: the input's scores are those of image vs reference.
    batch = next(iter(pipeline.eval_loader(referenced_dir, "test", global_batch_size=len(GRADES),
                                           reading=pipeline.RecordReading(image_size=SIZE))))
    x, mask = inference.inputs(batch)
    ref = jnp.asarray(batch["reference"], jnp.float32) / 255.0 * mask[..., None]
    psnr, ssim = np.asarray(metrics.psnr(x, ref, mask)), np.asarray(metrics.ssim(x, ref, mask))
    for level, name in ((1, "usable"), (2, "reject")):
        rows = batch["quality"] == level
        assert e["per_quality"][name]["psnr_input"] == pytest.approx(float(psnr[rows].mean()), rel=1e-5)
        assert e["per_quality"][name]["ssim_input"] == pytest.approx(float(ssim[rows].mean()), rel=1e-5)
    # A good image is its own clean image: it is degraded by op2 first, so its input scores are finite.
    assert 0.0 < e["per_quality"]["good"]["ssim_input"] < 1.0
    with open(os.path.join(out_dir, "eval.md")) as f:
        md = f.read()
    assert "| reject | 2 |" in md.split("## Enhancement")[1].split("##")[0]
    assert "Reference: the reference is the record's clean image" in md


def test_enhancement_footnote_names_both_references_when_mixed():
    note = report.enhancement_footnote({"n": 5, "n_clean_reference": 3})
    assert "for 3 of 5 images" in note and "clean image" in note and "the other 2" in note


def test_evaluation_writes_json_markdown_and_figures(evaluated):
    result, out_dir = evaluated
    with open(os.path.join(out_dir, "eval.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    with open(os.path.join(out_dir, "eval.md")) as f:
        md = f.read()
    assert "| reject | 2 |" in md and "## Enhancement" in md and "## Quality assessment" in md
    for name in ("confusion_matrix.png", "per_quality.png", "enhancement_grid.png"):
        with open(os.path.join(out_dir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert not [n for n in os.listdir(out_dir) if n.startswith(".tmp")]


def test_grid_shows_input_enhanced_reference_and_vessels(stage3_dir, data_dir):
    restored = restore.load_checkpoint(stage3_dir)
    cfg = evaluate.merge_for_eval(restored.config, restored.config)
    batch = evaluate.first_examples(cfg, data_dir, 3)  # the report's grid size: its compilation is reused
    panels = inference.enhancement_panels(stages.qt_params(cfg), restored.state, restored.models, batch)
    assert panels.shape == (3, SIZE, 4 * SIZE, 3)
    reference = batch["image"].astype(np.float32) / 255 * batch["mask"][..., None]
    np.testing.assert_allclose(panels[:, :, 2 * SIZE:3 * SIZE], reference, atol=1e-6)


# --------------------------------------------------------------------------- which image DR grades
def _inference(restored, stage):
    image, mask = fundus.preprocess(skimage.data.retina(), SIZE, name="retina")
    # Two images, as test_predict's batches: run in one pytest process they share this compilation.
    x = jnp.asarray(np.stack([image, image[:, ::-1]]), jnp.float32) / 255.0
    fn = inference.compiled_inference(restored.models, restored.nets, gate_quality=False,
                                     enhance_first=inference.enhance_before_grading(stage))
    return x, fn(restored.state, x, jnp.asarray(np.stack([mask, mask[:, ::-1]]), jnp.float32))


def _dr(restored, image):
    apply = jax.jit(lambda v, im: jax.nn.softmax(restored.models["dr"].apply(v, im, train=False)))
    return np.asarray(apply(factory.variables(restored.state, "dr"), image))


def test_joint_model_grades_the_enhanced_image_and_stage1_the_raw_one(stage3_dir):
    restored = restore.load_checkpoint(stage3_dir)
    x, joint = _inference(restored, "stage3")
    _, separate = _inference(restored, "stage1")
    np.testing.assert_allclose(joint["dr_probs"], _dr(restored, joint["enhanced"]), atol=1e-5)
    np.testing.assert_allclose(separate["dr_probs"], _dr(restored, x), atol=1e-5)
    assert not np.allclose(joint["dr_probs"], separate["dr_probs"], atol=1e-4)
