"""bench/gpu_step.py (the GPU check's benchmark) times the library's own joint step with configs/default.py's
settings, and it and that step run where neither the config system nor the data stack is installed."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest
from tiny import REPO, run_python, subprocess_env

from cleaq_jax.configs import default
from cleaq_jax.models import factory
from cleaq_jax.training import optim, stages
from cleaq_jax.training import state as train_state

# What the GPU machine lacks: a finder that refuses them, as an interpreter without them would.
ABSENT = ("ml_collections", "grain", "array_record", "cv2", "tensorflow", "tensorflow_datasets", "clu", "skimage",
          "matplotlib", "tensorboard", "gcsfs", "tqdm", "xlrd")
BLOCK = ("import sys\n"
         "class _Absent:\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         f"        if name.partition('.')[0] in {ABSENT!r}:\n"
         "            raise ImportError(f'{name} is not installed here')\n"
         "sys.meta_path.insert(0, _Absent())\n")
TINY = ["--size", "64", "--batch", "2", "--width", "0.125", "--stages", "1"]


def _gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", os.path.join(REPO, "bench", "gpu_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_gpu_step_config_is_the_default_config_s():
    g = _gpu_step()
    ours, theirs = _flat(g.CONFIG), _flat(default.get_config().to_dict())
    assert {k: theirs.get(k, "<absent>") for k in ours} == ours


def test_gpu_step_describes_stage_3_as_the_stage_runner_does():
    g = _gpu_step()
    args = g.parse_args(TINY + ["--dtype", "bfloat16", "--remat", "on"])
    cfg = default.get_config()
    cfg.data.image_size, cfg.batch_size = 64, 2
    m = cfg.model
    m.width, m.dtype, m.remat, m.encoder_stages, m.classifier_stages = 0.125, "bfloat16", True, (1,) * 4, (1,) * 4
    assert g.joint_stage(g.config(args)) == stages.Stage.from_config(cfg, "stage3", steps_per_epoch=g.STEPS_PER_EPOCH)
    assert factory.build_models(g.config(args)) == factory.build_models(cfg)


def test_gpu_step_initialises_the_state_the_step_s_stage_would():
    # One init program for every configuration of a width: INIT_SIZE px, float32, no remat.
    g = _gpu_step()
    cfg = g.config(g.parse_args(TINY + ["--size", "128", "--dtype", "bfloat16", "--remat", "on"]))
    stage = g.joint_stage(cfg)
    tx = optim.make_optimizer(stage.optim, stage.steps_per_epoch)
    init_stage, init_models = g.init_setup(cfg, stage)
    shapes = lambda s, models: jax.eval_shape(  # noqa: E731
        lambda k: train_state.init_state(s, models, tx, k), jax.random.key(0))
    ours, theirs = shapes(init_stage, init_models), shapes(stage, factory.build_models(cfg))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(ours)] == [(a.shape, a.dtype) for a in jax.tree.leaves(theirs)]


def test_the_joint_step_s_modules_import_without_the_config_system_or_the_data_stack():
    run_python(BLOCK + "from cleaq_jax.training import optim, stages, state, steps\n"
               "from cleaq_jax.models import cenet, dr, factory, iqa, iqe, layers, pretrained, resnet\n"
               "from cleaq_jax.data import augment, degrade, loading\n"
               f"assert not set({ABSENT!r}) & {{m.partition('.')[0] for m in sys.modules}}\n")


@pytest.mark.slow
def test_gpu_step_runs_the_joint_step_without_the_config_system_or_the_data_stack():
    path = os.path.join(REPO, "bench", "gpu_step.py")
    argv = [path, *TINY, "--dtype", "float32", "--steps", "1", "--warmup", "0"]
    code = BLOCK + f"import runpy\nsys.argv = {argv!r}\nrunpy.run_path({path!r}, run_name='__main__')\n"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(1), cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary, record = proc.stdout.strip().splitlines()[-2:]
    rec = json.loads(record)
    assert summary.startswith("64 px batch 2 width 0.125 float32 remat off: compile ")
    assert math.isfinite(rec["step_s"]) and rec["step_s"] > 0 and math.isfinite(rec["loss"])
    phases = [json.loads(line)["phase"] for line in proc.stderr.splitlines() if line.startswith('{"phase"')]
    assert phases == ["backend cpu ready", "initialised", "compiled", "warmed up"]
