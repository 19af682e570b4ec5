"""Every program's command line: the project's own errors as one stderr line and exit status 2 (the
traceback only when asked for, and for bugs), and help that shows the whole description and the defaults.

The truncated shard is the case a user meets: a shard set built, then cut short (a copy that stopped,
a full disk), then read by training (`cleaq_jax.main`) or by a data_prep command.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys

import pytest

from cleaq_jax import config_checks, configs, errors
from cleaq_jax.data import location, shards
from cleaq_jax.data_prep import synthetic as synthetic_prep
from cleaq_jax.programs import predict
from tests import tiny


@pytest.fixture(scope="module")
def truncated(tmp_path_factory):
    """A tiny synthetic shard set (32 px) whose second train shard was cut to half its size after the
    build: (shard directory, the truncated shard's path)."""
    built = str(tmp_path_factory.mktemp("built"))
    location.build_synthetic(built, 8, size=32, workers=1)
    data = str(tmp_path_factory.mktemp("cut") / "shards")
    shutil.copytree(built, data)
    shard = shards.split_shards(data, "train")[-1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    return data, shard


def _run(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=tiny.subprocess_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _main(data: str, workdir: str, *extra: str) -> subprocess.CompletedProcess:
    return _run("-m", "cleaq_jax.main", "--config=demo", f"--workdir={workdir}", f"--config.data.dir={data}",
                "--config.data.image_size=32", "--config.stage=stage1", *extra, cwd=workdir)


# --------------------------------------------------------------------------- one error path
def test_a_truncated_shard_stops_training_with_one_line_naming_it_and_exit_status_2(truncated, tmp_path):
    data, shard = truncated
    proc = _main(data, str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: {shard}: ") and "truncated or corrupt" in lines[0]
    assert "python -m cleaq_jax.data_prep.synthetic --out" in lines[0]  # how to rebuild it
    assert "Traceback" not in proc.stderr


def test_the_same_error_with_verbosity_shows_its_traceback_then_the_line(truncated, tmp_path):
    data, shard = truncated
    proc = _main(data, str(tmp_path), "--verbosity=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "ShardError" in proc.stderr
    errors_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors_lines) == 1 and errors_lines[0].startswith(f"error: {shard}: ")


def test_a_data_prep_command_reports_the_truncated_shard_the_same_way(truncated, tmp_path):
    data, shard = truncated
    args = ("-m", "cleaq_jax.data_prep.pseudo_masks", "--shards", data, "--out", str(tmp_path / "out"),
            "--method", "frangi", "--workers", "1")
    proc = _run(*args, cwd=str(tmp_path))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {shard}: "), proc.stderr
    verbose = _run(*args, "--verbose", cwd=str(tmp_path))
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == lines[0]


def test_reported_turns_a_project_error_into_one_line_and_status_2():
    def body():
        raise shards.UnknownSplitError("split 'valid' is not in d/manifest.json\n(it has: ['test', 'train'])")

    quiet, loud = io.StringIO(), io.StringIO()
    assert errors.reported(body, verbose=False, stream=quiet) == errors.USAGE_ERROR == 2
    # The KeyError's own quotes are not shown, and the line stays one line.
    assert quiet.getvalue() == "error: split 'valid' is not in d/manifest.json (it has: ['test', 'train'])\n"
    assert errors.reported(body, verbose=True, stream=loud) == 2
    assert loud.getvalue().startswith("Traceback") and loud.getvalue().endswith(quiet.getvalue())


def test_a_bug_is_not_a_project_error_its_traceback_stays():
    with pytest.raises(ZeroDivisionError):
        errors.reported(lambda: 1 // 0, stream=io.StringIO())
    assert errors.reported(lambda: None) == 0 and errors.reported(lambda: 1) == 1


def test_the_projects_error_types_are_user_errors_and_still_their_builtin_kinds():
    from cleaq_jax.data import fundus, records
    from cleaq_jax.data_prep import common, pseudo_masks
    from cleaq_jax.models import pretrained
    from cleaq_jax.programs import train
    from cleaq_jax.runtime import checkpoint

    kinds = {shards.ShardError: ValueError, records.RecordError: ValueError, shards.UnknownSplitError: KeyError,
             checkpoint.CorruptCheckpointError: RuntimeError, pretrained.PretrainedError: ValueError,
             fundus.NoDiscError: ValueError, fundus.BadImageError: ValueError, errors.ConfigError: ValueError,
             errors.MissingError: FileNotFoundError, errors.StorageError: ValueError,
             errors.CheckpointError: ValueError, train.NonFiniteLossError: FloatingPointError,
             common.PrepError: Exception, pseudo_masks.PseudoMaskError: Exception}
    for kind, builtin in kinds.items():
        assert issubclass(kind, errors.UserError) and issubclass(kind, builtin), kind


def test_an_argparse_program_called_in_process_returns_2_with_one_line(tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = synthetic_prep.main(["--out", str(tmp_path / "d"), "--num", "2", "--size", "32"])
    assert code == 2 and err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: need num >= 3")


# --------------------------------------------------------------------------- help
def _help(parse, *argv: str) -> str:
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(out):
        parse([*argv, "--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def test_main_help_names_the_configs_the_programs_and_how_to_set_keys(tmp_path):
    proc = _run("-m", "cleaq_jax.main", "--help", cwd=str(tmp_path))
    text = " ".join(proc.stdout.split())  # absl wraps the listings
    for name in configs.names() + list(config_checks.PROGRAMS):
        assert f" {name}," in text or f" {name}." in text, name
    assert "--config.KEY=VALUE" in text and "configs/default.py" in text
    assert "--workdir" in text and "--config:" in text  # the flags follow the description


def test_predict_help_is_the_whole_description_with_defaults():
    text = _help(predict.parse_args)
    last_line = predict.__doc__.strip().splitlines()[-1].strip()
    assert last_line in text and "--model MODEL_DIR --input photos/" in text  # its usage examples
    assert "images per step (default 8)" in text


def test_synthetic_help_keeps_its_examples_and_shows_defaults():
    text = _help(synthetic_prep.main)
    doc = synthetic_prep.__doc__.strip().splitlines()
    assert doc[-1].strip() in text and doc[1].strip() in text  # the description's last line and its sentence's end
    assert "--qt-examples PNG [--size S] [--seed K]" in text  # the examples
    assert "(default 1000)" in text and "(default: 1.0)" not in text  # stated once, where the help says it


def test_options_without_a_stated_default_get_theirs_appended():
    from cleaq_jax.data_prep import pseudo_masks

    text = " ".join(_help(pseudo_masks.parse_args).split())
    assert "where the masks come from (default: teacher)" in text
    assert "teacher vessel probability cut (default: 0.5)" in text
    assert "--teacher TEACHER teacher checkpoint" in text and "(default: None)" not in text
