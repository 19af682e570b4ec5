"""Exported models (cleaq_jax.programs.export, cleaq_jax.evaluation.exported): a tiny stage-3 checkpoint
exported, then predict from the export in a Python that has only jax, numpy and OpenCV (no flax, orbax or
cleaq_jax model code) gives the checkpoint's predictions.csv and enhanced images; model.json says what the
model expects; any batch size gives the same answer; a broken model directory is one line and status 2."""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
import skimage.data
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_evaluate import SIZE
from test_predict import _canvas, _checkpoint, _main

from cleaq_jax.data import records
from cleaq_jax.evaluation import exported
from cleaq_jax.programs import export, predict, predict_checkpoint
from cleaq_jax.runtime import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How far the exported model's outputs may lie from the checkpoint's (probabilities, enhanced pixels in
# [0, 1]; values of magnitude <= 1). Both run the same float32 operations on the same CPU, and only XLA's
# compilation of them may differ: fusion and the order of a reduction's terms (and the checkpoint path
# turns the image into floats on the host, the exported function on the device). Reordering a sum of n
# terms moves it by about sqrt(n) u of its terms' magnitude (u = 2**-24); the tiny networks' sums have
# at most about a thousand terms (a 3 x 3 convolution over a hundred channels), sqrt(n) <= 32, and an
# output passes through about 40 such layers, each adding its own: 40 * 32 * u = 7.6e-5. (Measured on a
# 2-core x86-64 CPU: 2e-7.)
ATOL = 40 * 32 * 2.0**-24
CSV_ATOL = ATOL + 10.0**-predict.DIGITS  # the CSV rounds each value to half a unit of its last digit
# What the light Python gets of cleaq_jax: predict's path for an exported model, nothing else.
LIGHT_FILES = ("cleaq_jax/__init__.py", "cleaq_jax/data/__init__.py", "cleaq_jax/data/fundus.py",
               "cleaq_jax/evaluation/__init__.py", "cleaq_jax/evaluation/exported.py",
               "cleaq_jax/programs/__init__.py", "cleaq_jax/programs/predict.py",
               "cleaq_jax/runtime/__init__.py", "cleaq_jax/runtime/cli.py", "cleaq_jax/runtime/storage.py",
               "cleaq_jax/runtime/compile_cache.py", "cleaq_jax/configs/__init__.py", "cleaq_jax/errors.py")
# What it must not reach: the training stack's libraries and cleaq_jax's model, training and checkpoint code.
ABSENT = ("flax", "orbax", "optax", "grain", "array_record", "etils", "ml_collections", "clu", "tensorflow",
          "absl", "msgpack", "cleaq_jax.models", "cleaq_jax.training", "cleaq_jax.programs.predict_checkpoint",
          "cleaq_jax.evaluation.restore", "cleaq_jax.evaluation.inference", "cleaq_jax.runtime.checkpoint")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Five different photographs of one retina (flipped, dimmed, tinted, noisy) and an unreadable file."""
    folder = tmp_path_factory.mktemp("photos")
    retina = skimage.data.retina()
    tinted = retina.copy()
    tinted[..., 1:] //= 2
    noisy = np.clip(retina + np.random.default_rng(0).normal(0, 25, retina.shape), 0, 255).astype(np.uint8)
    variants = {"retina.jpg": retina, "flipped.png": np.ascontiguousarray(retina[::-1, ::-1]),
                "dim.jpg": (retina * 0.6).astype(np.uint8), "tinted.png": tinted, "noisy.tif": noisy}
    for name, image in variants.items():
        cv2.imwrite(str(folder / name), _canvas(image, 640, 480)[..., ::-1])
    (folder / "broken.jpg").write_bytes(b"this is not a photograph")
    return str(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("run"))


def _export(*argv: str) -> tuple[int, str]:
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        code = export.main(list(argv))
    return code, log.getvalue()


@pytest.fixture(scope="module")
def model_dir(checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("models") / "tiny")
    code, log = _export("--checkpoint", checkpoint, "--out", out)
    assert code == 0, log
    return out


@pytest.fixture(scope="module")
def from_checkpoint(checkpoint, photos, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("from_checkpoint"))
    code, log = _main("--checkpoint", checkpoint, "--input", photos, "--out", out, "--batch-size", "2")
    assert code == 0, log
    return out


def _crops(photos: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [predict.prepare(p, SIZE) for p in predict.list_inputs([photos]) if not p.endswith("broken.jpg")]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# --------------------------------------------------------------------------- a Python without the training stack
def _distributions(roots: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions ``roots`` need at run time: each root and what it requires, recursively
    (extras left out), from the distributions' metadata."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found[name] = dist = importlib.metadata.distribution(name)
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def light_python_path(root: pathlib.Path) -> str:
    """A directory for PYTHONPATH holding links to jax, numpy and OpenCV with what they need (their
    top-level packages and metadata from site-packages) and a copy of `LIGHT_FILES`; nothing else."""
    root.mkdir(parents=True)
    cv2_dists = importlib.metadata.packages_distributions()["cv2"]
    # jax.export's serialization needs flatbuffers, which jax's metadata does not require.
    dists = _distributions(["jax", cv2_dists[0], "flatbuffers"])
    for dist in dists.values():
        site = pathlib.Path(dist.locate_file(""))
        tops = {pathlib.PurePath(f).parts[0] for f in dist.files or ()} - {"..", "__pycache__"}
        for top in sorted(tops):
            if (site / top).exists() and not (root / top).exists() and not top.endswith(".pth"):
                os.symlink(site / top, root / top)
    for name in LIGHT_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(REPO, name), root / name)
    return str(root)


LIGHT_PREDICT = f"""
import importlib.util, sys
for name in {ABSENT!r}:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        spec = None
    if spec is not None:
        sys.exit(f"{{name}} is importable here: {{spec.origin}}")
from cleaq_jax.programs import predict
print("cleaq_jax from", predict.__file__, file=sys.stderr)
code = predict.main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "orbax", "etils", "absl"))
sys.exit(code if not loaded else f"loaded {{loaded}}")
"""


@pytest.fixture(scope="module")
def from_light_python(model_dir, photos, tmp_path_factory):
    """predict --model in `python -S` (no site-packages) whose path holds only `light_python_path`."""
    light = tmp_path_factory.mktemp("light")
    path = light_python_path(light / "path")
    out = str(light / "out")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=path, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-S", "-c", LIGHT_PREDICT, "--model", model_dir, "--input", photos,
                           "--out", out, "--batch-size", "2"], env=env, cwd=str(light), capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stderr, path


def _csv(out: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    with open(os.path.join(out, "predictions.csv"), newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or ()), {os.path.basename(r["file"]): r for r in reader}


# --------------------------------------------------------------------------- (a) the same predictions
def test_predict_from_the_export_without_flax_gives_the_checkpoints_predictions(from_checkpoint, from_light_python):
    out, log, path = from_light_python
    assert f"cleaq_jax from {path}" in log  # the copy, not the repository
    header, rows = _csv(out)
    expected_header, expected = _csv(from_checkpoint)
    assert header == expected_header and set(rows) == set(expected) and len(rows) == 5
    numeric = [c for c in header if c.startswith("p_")]
    for name, row in rows.items():
        want = expected[name]
        assert [row[c] for c in ("file", "grade", "quality", "enhanced")] == \
               [want[c] for c in ("file", "grade", "quality", "enhanced")]
        for column in numeric:
            assert abs(float(row[column]) - float(want[column])) <= CSV_ATOL, (name, column)
    # The comparison can tell photographs apart: any two rows differ by more than the tolerance, so
    # predictions of the wrong photograph (or one preprocessed otherwise) would not pass.
    spread = [max(abs(float(a[c]) - float(b[c])) for c in numeric)
              for i, a in enumerate(expected.values()) for b in list(expected.values())[i + 1:]]
    assert min(spread) > CSV_ATOL
    with open(os.path.join(out, "skipped.txt")) as f, open(os.path.join(from_checkpoint, "skipped.txt")) as g:
        assert f.read() == g.read() != ""


def test_the_enhanced_images_match_to_one_grey_level(from_checkpoint, from_light_python):
    out = from_light_python[0]
    names = sorted(os.listdir(os.path.join(from_checkpoint, "enhanced")))
    assert sorted(os.listdir(os.path.join(out, "enhanced"))) == names and len(names) == 5
    for name in names:
        a = cv2.imread(os.path.join(out, "enhanced", name)).astype(int)
        b = cv2.imread(os.path.join(from_checkpoint, "enhanced", name)).astype(int)
        # |enhanced - expected| <= ATOL, and 255 * ATOL < 1: rounding to uint8 leaves at most one level.
        assert a.shape == (SIZE, SIZE, 3) and np.abs(a - b).max() <= 1 and b.max() > 0


def test_the_exported_outputs_match_the_checkpoints_in_float32(model_dir, checkpoint, photos):
    model, reference = exported.load(model_dir), predict_checkpoint.open_checkpoint(checkpoint)
    images, masks = _crops(photos)
    for gate in (False, True):
        got, want = model(images, masks, gate), reference(images, masks, gate)
        assert set(got) == set(want) == {"quality_probs", "enhanced", "enhance", "dr_probs"}
        np.testing.assert_array_equal(got["enhance"], want["enhance"])
        for key in ("quality_probs", "enhanced", "dr_probs"):
            assert got[key].dtype == np.float32
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=ATOL, err_msg=f"{key}, gate {gate}")
    # The gate is an input that matters: the tiny IQA rates these photographs good, so gated, none is
    # enhanced and DR grades the photographs themselves, which moves its answer by more than the
    # tolerance (grading the wrong image would not pass the comparison above).
    ungated, gated = model(images, masks, False), model(images, masks, True)
    assert ungated["enhance"].all() and not gated["enhance"].any()
    assert np.abs(ungated["dr_probs"] - gated["dr_probs"]).max(axis=1).min() > ATOL


# --------------------------------------------------------------------------- (b) model.json, any batch size
def test_model_json_says_what_the_model_expects(model_dir, checkpoint):
    with open(os.path.join(model_dir, exported.MODEL_JSON)) as f:
        meta = json.load(f)
    assert sorted(os.listdir(model_dir)) == sorted(exported.FILES)
    assert meta["format"] == exported.FORMAT and meta["format_version"] == exported.FORMAT_VERSION
    assert meta["jax_version"] == jax.__version__ and meta["platforms"] == ["cpu", "cuda"]
    assert meta["stage"] == "stage3" and meta["nets"] == ["iqe", "iqa", "dr"] and meta["dr_input"] == "enhanced"
    assert meta["image_size"] == SIZE and meta["num_grades"] == 5 and len(meta["grade_names"]) == 5
    assert meta["quality_names"] == list(records.QUALITY_NAMES) and meta["quality_gate"] == "input"
    assert "fundus.preprocess" in meta["preprocessing"]["function"]
    assert meta["inputs"]["image"] == {"shape": ["batch", SIZE, SIZE, 3], "dtype": "uint8", "range": [0, 255],
                                       "channels": "RGB", "note": "the preprocessed crop, zero outside the mask"}
    assert meta["inputs"]["mask"]["dtype"] == "uint8" and meta["inputs"]["gate"]["dtype"] == "bool"
    assert {k: (v["shape"], v["dtype"]) for k, v in meta["outputs"].items()} == {
        "quality_probs": (["batch", 3], "float32"), "enhanced": (["batch", SIZE, SIZE, 3], "float32"),
        "enhance": (["batch"], "bool"), "dr_probs": (["batch", 5], "float32")}
    with np.load(os.path.join(model_dir, exported.WEIGHTS_FILE)) as npz:
        assert len(npz.files) == meta["inputs"]["weights"]["arrays"]
        assert sum(npz[k].size for k in npz.files) == meta["inputs"]["weights"]["values"]
        assert "params/dr/backbone/fc/kernel" in npz.files
    assert meta["source"]["checkpoint"].startswith(checkpoint) and meta["source"]["step"] == 2


def test_any_batch_size_gives_each_image_the_same_answer(model_dir, photos):
    model = exported.load(model_dir)
    images, masks = _crops(photos)
    whole = model(images, masks)
    for i in range(len(images)):
        one = model(images[i:i + 1], masks[i:i + 1])
        for key in whole:
            assert one[key].shape[0] == 1
            np.testing.assert_allclose(one[key][0], whole[key][i], rtol=0, atol=ATOL, err_msg=key)
    three = model(images[:3], masks[:3])
    np.testing.assert_allclose(three["dr_probs"], whole["dr_probs"][:3], rtol=0, atol=ATOL)


def test_a_stage1_export_grades_the_photograph_and_refuses_the_gate(tmp_path, photos):
    checkpoint = _checkpoint(tmp_path, nets=("iqe", "dr"), stage="stage1")
    out = str(tmp_path / "stage1-model")
    assert _export("--checkpoint", checkpoint, "--out", out)[0] == 0
    model, reference = exported.load(out), predict_checkpoint.open_checkpoint(checkpoint)
    assert model.meta["dr_input"] == "photograph" and model.meta["quality_gate"].startswith("unavailable")
    images, masks = _crops(photos)
    got, want = model(images, masks), reference(images, masks, False)
    assert set(got) == {"enhanced", "enhance", "dr_probs"}
    np.testing.assert_allclose(got["dr_probs"], want["dr_probs"], rtol=0, atol=ATOL)
    code, log = _main("--model", out, "--input", photos, "--out", str(tmp_path / "o"), "--gate-quality")
    assert code == 2 and "--gate-quality needs the IQA network" in log


def test_other_platforms_are_lowered_here_and_refused_at_loading(checkpoint, tmp_path):
    out = str(tmp_path / "tpu-only")
    code, log = _export("--checkpoint", checkpoint, "--out", out, "--platforms", "tpu")
    assert code == 0, log
    with open(os.path.join(out, exported.MODEL_JSON)) as f:
        assert json.load(f)["platforms"] == ["tpu"]
    with pytest.raises(ValueError, match="exported for tpu, and jax runs on cpu here: export it again with "
                                         "--platforms tpu,cpu"):
        exported.load(out)


# --------------------------------------------------------------------------- (c) bad input: one line, status 2
def _one_line_error(code: int, log: str) -> str:
    lines = [line for line in log.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), log
    return lines[0]


@pytest.mark.parametrize("damage", ["no directory", "no weights", "no function", "format version",
                                    "not a model.json", "garbled function", "another function",
                                    "weights of another model"])
def test_a_broken_model_directory_is_one_line_and_status_2(damage, model_dir, photos, tmp_path):
    broken = str(tmp_path / "model")
    shutil.copytree(model_dir, broken)
    meta_path = os.path.join(broken, exported.MODEL_JSON)
    meta = json.loads(pathlib.Path(meta_path).read_text())
    if damage == "no directory":
        shutil.rmtree(broken)
        expected = "is not an exported model (no such directory)"
    elif damage == "no weights":
        os.remove(os.path.join(broken, exported.WEIGHTS_FILE))
        expected = "has no weights.npz"
    elif damage == "no function":
        os.remove(os.path.join(broken, exported.FUNCTION_FILE))
        expected = "has no function.jaxexport"
    elif damage == "format version":
        meta["format_version"] = exported.FORMAT_VERSION + 1
        pathlib.Path(meta_path).write_text(json.dumps(meta))
        expected = f"has format version {exported.FORMAT_VERSION + 1}, and this cleaq_jax reads version"
    elif damage == "not a model.json":
        pathlib.Path(meta_path).write_text('{"image_size": 32}')
        expected = "does not describe a cleaq_jax exported model"
    elif damage == "garbled function":
        pathlib.Path(broken, exported.FUNCTION_FILE).write_bytes(b"\x00" * 64)
        expected = "function.jaxexport cannot be loaded by jax"
    elif damage == "another function":
        other = jax.export.export(jax.jit(lambda x: 2 * x))(jax.ShapeDtypeStruct((3,), np.float32))
        pathlib.Path(broken, exported.FUNCTION_FILE).write_bytes(other.serialize())
        expected = "function.jaxexport is not a function of (weights, image, mask, gate)"
    else:
        with np.load(os.path.join(broken, exported.WEIGHTS_FILE)) as npz:
            weights = {k: npz[k] for k in npz.files}
        weights["params/dr/backbone/fc/kernel"] = weights["params/dr/backbone/fc/kernel"][:, :2]
        np.savez(os.path.join(broken, exported.WEIGHTS_FILE), **weights)
        expected = "params/dr/backbone/fc/kernel is float32"
    line = _one_line_error(*_main("--model", broken, "--input", photos, "--out", str(tmp_path / "o")))
    assert expected in line and broken in line
    assert not os.path.exists(tmp_path / "o")


def test_grad_cam_and_a_checkpoint_step_are_refused_with_an_exported_model(model_dir, photos, tmp_path):
    for extra in (["--explain"], ["--report"], ["--checkpoint-step", "latest"]):
        line = _one_line_error(*_main("--model", model_dir, "--input", photos, "--out", str(tmp_path / "o"), *extra))
        assert ("--checkpoint" in line) and ("Grad-CAM" in line or "exported model holds one" in line)


def test_bad_export_arguments_are_one_line_and_status_2(checkpoint, model_dir, tmp_path):
    line = _one_line_error(*_export("--checkpoint", checkpoint, "--out", str(tmp_path / "m"), "--platforms", "gpu"))
    assert "each must be one of cpu, cuda, rocm, tpu" in line
    line = _one_line_error(*_export("--checkpoint", str(tmp_path), "--out", str(tmp_path / "m")))
    assert f"no checkpoint in {tmp_path}" in line
    line = _one_line_error(*_export("--checkpoint", checkpoint, "--out", model_dir))
    assert "exists and is not an empty directory" in line
    assert not os.path.exists(tmp_path / "m")


def test_the_model_directory_appears_whole_or_not_at_all(checkpoint, tmp_path, monkeypatch):
    written = []

    def fail_on_the_weights(path, content):
        if path.endswith(exported.WEIGHTS_FILE):
            assert not os.path.exists(tmp_path / "model")  # the function is written, the directory not there
            raise OSError("disk full")
        written.append(path)
        storage_atomic_file(path, content)

    storage_atomic_file = storage.atomic_file
    monkeypatch.setattr(storage, "atomic_file", fail_on_the_weights)
    with pytest.raises(OSError, match="disk full"):
        export.export(predict_checkpoint.open_checkpoint(checkpoint).restored, str(tmp_path / "model"))
    assert written and os.listdir(tmp_path) == []  # neither the directory nor its hidden staging copy
    monkeypatch.undo()
    export.export(predict_checkpoint.open_checkpoint(checkpoint).restored, str(tmp_path / "model"))
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert sorted(os.listdir(tmp_path / "model")) == sorted(exported.FILES)


def test_the_light_path_is_only_the_light_files():
    """LIGHT_FILES, the copy the light Python gets, are the cleaq_jax modules predict imports (in a fresh
    interpreter: the checkpoint backend only for --checkpoint)."""
    code = ("import sys; from cleaq_jax.programs import predict; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('cleaq_jax'))))")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    modules = {name[:-len(".py")].replace("/", ".").removesuffix(".__init__") for name in LIGHT_FILES}
    assert set(proc.stdout.split()) == modules

