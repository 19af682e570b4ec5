"""A bad command line or config stops `python -m cleaq_jax.main` at once: one stderr line naming the key,
the value and what is allowed, exit code 2, no traceback, nothing written."""

import json
import os
import subprocess
import sys
import time

import pytest
from ml_collections.config_flags import config_flags

from cleaq_jax import config_checks, configs
from cleaq_jax.data import vesselness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(tmp_path, *args, config="configs/stage1.py", cwd=REPO):
    workdir = tmp_path / "run"
    argv = [sys.executable, "-m", "cleaq_jax.main", *([f"--config={config}"] if config else []),
            f"--workdir={workdir}", *args]
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO})
    return proc, time.monotonic() - start, workdir


@pytest.mark.parametrize("args, expected", [
    (["--config.loss.qe=l3"], "config.loss.qe='l3': must be one of 'l2', 'l1'"),
    (["--config.batch_size=abc"], "config.batch_size='abc': must be an integer >= 1"),
    (["--config.batch_size=0"], "config.batch_size=0: must be an integer >= 1"),
    (["--config.data.class_balance=1.5"], "config.data.class_balance=1.5: must be a number in [0.0, 1.0]"),
    (["--config.data.augment=maybe"], "config.data.augment='maybe': must be True or False"),
    (["--config.model.encoder_stages=(1,2)"], "config.model.encoder_stages=(1, 2): must be 4 integers >= 1"),
    (["--config.stage=stage4"], "config.stage='stage4': must be one of 'stage1'"),
    (["--config.model.stem_pool=fast"], "config.model.stem_pool='fast': must be one of 'masked', 'reduce_window'"),
    (["--config.nonexistent=1"], "--config.nonexistent=1: config has no key 'nonexistent' (it has: batch_size,"),
    (["--config.loss.nope=1"], "--config.loss.nope=1: config.loss has no key 'nope' (it has: alpha,"),
    (["--config.lossx.qe=l1"], "config has no key 'lossx'"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "at most one axis may take the remaining devices"),
    (["--config.distributed.num_processes=2", "--config.distributed.process_id=2"],
     "config.distributed.process_id=2: must be below config.distributed.num_processes=2"),
    (["--config.data.image_size=80"], "config.data.image_size=80: must be a multiple of 32"),
    (["--config.data.dir=gs://bucket/data/eyeq"],
     "config.data.dir='gs://bucket/data/eyeq': must be a local (or mounted) shard directory"),
    (["--config.distributed.coordinator_address=localhost"],
     "config.distributed.coordinator_address='localhost': must be '' (auto-detect) or 'host:port'"),
])
def test_bad_key_value_or_type_is_one_line_and_exit_code_2_before_any_work(tmp_path, args, expected):
    proc, seconds, workdir = _main(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not workdir.exists()  # no data built, no run directory made
    assert seconds < 60  # no model or data work (measured: well under 1 s on an idle 2-core CPU)


def test_missing_config_file_and_missing_flag_are_one_line_too(tmp_path):
    proc, _, workdir = _main(tmp_path, config="configs/nope.py")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--config=configs/nope.py: cannot load it" in proc.stderr and "No such file" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "cleaq_jax.main", "--config=configs/stage1.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: flag --workdir=None: Flag --workdir must have a value other than None.")


def test_checking_needs_neither_jax_nor_tensorflow():
    code = ("import sys\nfrom cleaq_jax import config_checks, main\nfrom cleaq_jax.configs import default\n"
            "assert config_checks.check(default.get_config()) == []\n"
            "print(sorted(m for m in ('jax', 'flax', 'tensorflow', 'grain', 'orbax') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

@pytest.mark.parametrize("config", ["stage1", "stage1.py", "configs/stage1.py", "ablations/dr_only"])
def test_a_shipped_config_is_found_by_name_outside_the_checkout(tmp_path, config):
    # From an empty folder: the config loads (the override's key is checked against it) and is the shipped one.
    proc, _, _ = _main(tmp_path, "--config.batch_size=0", config=config, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: config.batch_size=0: must be an integer >= 1"
    proc, _, _ = _main(tmp_path, "--config.nope=1", config=config, cwd=tmp_path)
    assert "config has no key 'nope'" in proc.stderr


def test_a_config_file_of_your_own_wins_over_the_shipped_one_of_that_name(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "stage1.py").write_text(
        "from cleaq_jax.configs import stage1\n\n\ndef get_config():\n"
        "    c = stage1.get_config()\n    c.batch_size = 0\n    return c\n")
    proc, _, _ = _main(tmp_path, config="configs/stage1.py", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: config.batch_size=0: must be an integer >= 1"
    assert configs.resolve("nope") == "nope" and configs.path_of("configs/nope.py") is None


CONFIG_FILES = [configs.path_of(name) for name in configs.names()]


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # inside ml_collections' loader
@pytest.mark.parametrize("path", CONFIG_FILES, ids=configs.names())
def test_every_shipped_config_passes_the_checks(path):
    config = config_flags.ConfigFileFlagParser(name="config").parse(path)
    assert config_checks.check(config) == []


def test_every_ablation_preset_passes_the_checks():
    from cleaq_jax.configs import default
    from cleaq_jax.configs.ablations import presets

    for name, preset in presets.PRESETS.items():
        config = default.get_config()
        for key, value in preset["overrides"].items():
            *parents, leaf = key.split(".")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = value
        assert config_checks.check(config) == [], name


def test_every_default_key_has_a_rule_and_every_rule_a_key():
    from cleaq_jax.configs import default

    keys = set(config_checks.flatten(default.get_config()))
    missing = sorted(keys - set(config_checks.RULES) - set(config_checks.FREE_BLOCKS))
    assert not missing, f"add a rule for these config keys to cleaq_jax/config_checks.py RULES: {missing}"
    assert not sorted(set(config_checks.RULES) - keys), "RULES names keys that configs/default.py lacks"


def test_the_programs_named_are_those_main_dispatches_on():

    assert config_checks.TRAINING_STAGES == config_checks.TRAINING_STAGES
    assert set(config_checks.TEACHER_STAGES) <= set(config_checks.TRAINING_STAGES)


def _distributed_args(*flags_):
    argv = ["m", "--config=configs/stage1.py", "--workdir=w", *flags_]
    # ml_collections reads the overrides from sys.argv, so the parse runs as a command line would.
    code = (f"import json, sys\nsys.argv = {argv!r}\nfrom cleaq_jax import main\nmain.FLAGS(sys.argv)\n"
            "print(json.dumps(main.distributed_args(main.FLAGS.config)))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_distributed_flags_win_over_config_keys_and_unset_values_mean_auto():
    given = _distributed_args("--num_processes=3", "--config.distributed.num_processes=5",
                              "--config.distributed.process_id=1",
                              "--config.distributed.coordinator_address=10.0.0.1:1234")
    assert given == {"coordinator_address": "10.0.0.1:1234", "num_processes": 3, "process_id": 1}
    assert _distributed_args() == {"coordinator_address": None, "num_processes": None, "process_id": None}


def test_the_vessel_method_rule_names_the_classical_filters():
    assert all(config_checks.RULES["eval.vessel_method"].ok(m) for m in vesselness.METHODS)
    assert not config_checks.RULES["eval.vessel_method"].ok("hough")
