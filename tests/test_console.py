"""The console: one line per logging interval, library INFO hidden unless -v, the project's lines shown."""

import logging
import os
import subprocess
import sys

from cleaq_jax.runtime import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interval_line_names_stage_epoch_step_losses_rate_and_eta(monkeypatch):
    clock = iter([100.0, 110.0])  # start, then the first report 10 s later
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
    progress = console.StageProgress("stage2", first_step=0, total_steps=60, steps_per_epoch=20)
    progress.start()
    line = progress.line(20, {"loss": 0.5, "loss_iqa": 0.25, "accuracy": 0.9})
    # 20 steps in 10 s -> 2 steps/s; 40 steps left -> 20 s. Step 20 is the last of epoch 1.
    assert line == "stage2 epoch 1/3 step 20/60 loss=0.5 loss_iqa=0.25 | 2.00 steps/s, ETA 0:20"


def test_rate_is_over_the_interval_just_ended(monkeypatch):
    clock = iter([0.0, 10.0, 15.0])
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
    progress = console.StageProgress("stage1", first_step=10, total_steps=40, steps_per_epoch=10)
    progress.start()
    assert "1.00 steps/s" in progress.line(20, {"loss": 1.0})  # resumed at 10: 10 steps in 10 s
    assert progress.line(30, {"loss": 1.0}).startswith("stage1 epoch 3/4 step 30/40 loss=1 | 2.00 steps/s, ETA 0:05")


def _run(verbose_flag: list[str]) -> str:
    code = ("import sys\nfrom absl import flags, logging\nfrom cleaq_jax.runtime import console\n"
            "flags.FLAGS(sys.argv)\nconsole.setup(verbose=flags.FLAGS['verbosity'].present)\n"
            "from absl import logging as absl_logging\n"
            "absl_logging.info('library-info-line')\n"
            "import logging as pylogging\npylogging.getLogger('orbax').info('orbax-info-line')\n"
            "absl_logging.warning('library-warning-line')\nconsole.say('project-line %d', 7)\n"
            "absl_logging.flush()\n")
    proc = subprocess.run([sys.executable, "-c", code, *verbose_flag], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_library_info_hidden_by_default_project_lines_shown():
    err = _run([])
    assert "project-line 7" in err and "library-warning-line" in err
    assert "library-info-line" not in err


def test_verbosity_flag_shows_library_info():
    err = _run(["-v", "0"])
    assert "library-info-line" in err and "project-line 7" in err


def test_other_processes_write_no_lines():
    console.set_process_index(1)
    try:
        assert not logging.getLogger(console.LOGGER_NAME).isEnabledFor(logging.INFO)
    finally:
        console.set_process_index(0)
    assert logging.getLogger(console.LOGGER_NAME).isEnabledFor(logging.INFO)
