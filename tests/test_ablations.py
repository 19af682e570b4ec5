"""The ablation study script: planning, tabulation, and one tiny study run end to end.

The end-to-end fixture runs two variants x two seeds at the tiny preset (four training subprocesses,
two at a time); every other test reads what it wrote or works on hand-made eval.json dicts.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cleaq_jax.programs.ablations import cli, collect, execution, figures, plan, results, statistics, tables

VARIANTS = "dr_only,iqe_no_seg"
SEEDS = 2


def _study_args(data, workdir, *extra):
    return ["--data", str(data), "--workdir", str(workdir), "--seeds", str(SEEDS), "--variants", VARIANTS,
            "--preset", "tiny", "--jobs", "2", *extra]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablations")
    data, workdir = root / "data", root / "study"
    args = _study_args(data, workdir, "--build-synthetic", "40", "--size", "32")
    assert cli.main(args) == 0
    with open(workdir / "results.json") as f:
        results = json.load(f)
    return {"data": data, "workdir": workdir, "args": args, "results": results}


def _eval(workdir, variant, seed, stage="stage1"):
    with open(workdir / variant / f"seed{seed}" / stage / "eval" / "eval.json") as f:
        return json.load(f)


# --------------------------------------------------------------------------- end to end
def test_every_variant_and_seed_is_trained_and_evaluated_in_its_final_stage(study):
    runs = study["results"]["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        (v, s) for v in VARIANTS.split(",") for s in range(SEEDS))
    for r in runs:
        assert r["stage"] == "stage1" and r["status"] == "finished" and r["wall_s"] > 0
        assert os.path.exists(r["eval_json"])
        assert f"--config.seed={r['seed']}" in r["command"]


def test_dr_table_is_mean_and_sample_std_of_the_runs_eval_json(study):
    accuracy = [_eval(study["workdir"], "dr_only", s)["dr"]["overall"]["accuracy"] for s in range(SEEDS)]
    got = study["results"]["dr"]["dr_only"]["all"]["accuracy"]
    assert got["values"] == pytest.approx(accuracy)
    assert got["mean"] == pytest.approx(np.mean(accuracy))
    assert got["std"] == pytest.approx(np.std(accuracy, ddof=1))
    text = (study["workdir"] / "results.md").read_text()
    assert tables.format_mean_sd(got) in text


def test_per_quality_enhancement_table_comes_from_the_runs(study):
    psnr = [_eval(study["workdir"], "iqe_no_seg", s)["enhancement"]["per_quality"]["good"]["psnr_enhanced"]
            for s in range(SEEDS)]
    got = study["results"]["enhancement"]["iqe_no_seg"]["good"]["psnr_enhanced"]
    assert got["mean"] == pytest.approx(np.mean(psnr)) and got["std"] == pytest.approx(np.std(psnr, ddof=1))
    assert "dr_only" not in study["results"]["enhancement"] and "iqe_no_seg" not in study["results"]["dr"]


def test_per_quality_kappa_figure_is_written(study):
    with open(study["workdir"] / "per_quality_kappa.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_runs(study, capsys):
    before = {p: os.stat(p).st_mtime_ns for p in study["workdir"].glob("*/seed*/run.json")}
    assert len(before) == 4
    assert cli.main(study["args"]) == 0
    out = capsys.readouterr().out
    assert out.count("[ablations] skip") == 4 and "[ablations] start" not in out
    assert {p: os.stat(p).st_mtime_ns for p in before} == before


def test_rerun_with_other_settings_is_refused(study, capsys):
    assert cli.main(study["args"] + ["--config.num_epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "was run with other settings" in err and str(study["workdir"]) in err


def test_enhancement_examples_show_each_quality_level(study, tmp_path):
    path = tmp_path / "examples.png"
    figures.enhancement_examples_figure(str(study["workdir"] / "iqe_no_seg" / "seed0" / "stage1"), str(path),
                                        per_quality=1)
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > image.shape[1]  # three rows (good, usable, reject) of three panels


# --------------------------------------------------------------------------- planning and arguments
@pytest.mark.parametrize("variant, stage", [("dr_only", "stage1"), ("iqe_only", "stage1"), ("iqe_no_seg", "stage1"),
                                            ("iqa_only", "stage2"), ("iqa_no_lqi", "stage2"), ("cleaq", "stage3"),
                                            ("cleq_dr", "stage3"), ("cleaq_dr", "stage3"),
                                            ("cleaq_dr_to_good", "stage3")])
def test_each_variant_is_read_from_its_final_stage(variant, stage):
    assert plan.final_stage(plan.load_config(plan.config_path(variant), {})) == stage


def test_overrides_reach_the_config_as_main_parses_them():
    cfg = plan.load_config(plan.config_path("cleaq_dr"),
                           {"model.encoder_stages": "(1,1,1,1)", "tasks.iqa": "False", "model.width": "0.5"})
    assert cfg.model.encoder_stages == (1, 1, 1, 1) and cfg.tasks.iqa is False and cfg.model.width == 0.5


def test_unknown_override_key_is_named():
    with pytest.raises(ValueError, match="not_a_key"):
        plan.load_config(plan.config_path("dr_only"), {"not_a_key": "1"})


def test_arguments_other_than_config_overrides_are_refused():
    with pytest.raises(ValueError, match="--config.KEY=VALUE"):
        plan.parse_overrides(["--epochs=3"])


def test_tuples_are_written_as_the_command_line_reads_them():
    assert plan.flag_value((1, 2, 3)) == "(1,2,3)" and plan.flag_value((4,)) == "(4,)"


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="dr_ony"):
        plan.config_path("dr_ony")


def test_missing_data_without_build_flag_names_the_directory(tmp_path, capsys):
    assert cli.main(["--data", str(tmp_path / "none"), "--workdir", str(tmp_path / "w"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "none") in err and "--build-synthetic" in err


def test_seeds_are_run_seed_major_so_later_seeds_reuse_compilations(tmp_path):
    runs = plan.plan_runs(str(tmp_path), ["dr_only", "iqa_only"], range(2), {"data.dir": "/d"})
    assert [(r["variant"], r["seed"]) for r in runs] == [("dr_only", 0), ("iqa_only", 0), ("dr_only", 1),
                                                         ("iqa_only", 1)]
    assert runs[3]["command"][-1] == "--config.seed=1" and "--config.data.dir=/d" in runs[3]["command"]


# --------------------------------------------------------------------------- statistics
def test_mean_sd_is_mean_and_sample_std_of_defined_values():
    s = statistics.mean_sd([0.5, None, 0.7, float("nan")])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert (s["n"], s["n_expected"]) == (2, 4)


def test_mean_sd_of_one_value_has_no_std():
    assert statistics.mean_sd([0.3]) | {"values": None} == {"mean": 0.3, "std": None, "n": 1, "n_expected": 1,
                                                            "values": None}


def _dr_eval(kappa_all, kappa_reject):
    return {"dr": {"overall": {"n": 10, "kappa": kappa_all}, "per_quality": {"reject": {"n": 3, "kappa": kappa_reject}}}}


def test_an_unfinished_seed_is_counted_and_shown():
    table = statistics.mean_sd_per_subset([_dr_eval(0.4, 0.2), None, _dr_eval(0.6, 0.4)], "dr", ("kappa",))
    assert table["all"]["kappa"]["n"] == 2 and table["all"]["kappa"]["n_expected"] == 3
    assert tables.format_mean_sd(table["all"]["kappa"]).endswith("(n=2)")
    assert table["reject"]["kappa"]["examples"] == 3


def test_difference_to_dr_only_is_paired_by_seed():
    evals = {"dr_only": {0: _dr_eval(0.5, 0.1), 1: _dr_eval(0.6, 0.5)},
             "cleaq_dr": {0: _dr_eval(0.7, 0.4), 1: None}}
    diff = statistics.paired_difference(evals, "cleaq_dr")
    assert diff["reject"]["values"] == [pytest.approx(0.3)] and diff["reject"]["n_expected"] == 2
    assert diff["all"]["mean"] == pytest.approx(0.2)


def test_a_run_recorded_with_its_flags_in_another_order_counts_as_the_same(tmp_path):
    run = plan.plan_runs(str(tmp_path), ["dr_only"], range(1), {"data.dir": "/d", "batch_size": "8"})[0]
    os.makedirs(run["dir"])
    reordered = run["command"][:4] + run["command"][4:][::-1]
    with open(os.path.join(run["dir"], "run.json"), "w") as f:
        json.dump({"command": reordered}, f)
    execution.check_same_settings(run)
    with open(os.path.join(run["dir"], "run.json"), "w") as f:
        json.dump({"command": [c.replace("batch_size=8", "batch_size=4") for c in reordered]}, f)
    with pytest.raises(ValueError, match="other settings"):
        execution.check_same_settings(run)


def _write_dr_evals(runs, kappas):
    """eval.json files for the planned runs: {(variant, stage): (kappa of seed 0, of seed 1)}, all and reject."""
    for run in runs:
        for (variant, stage), values in kappas.items():
            if variant == run["variant"]:
                os.makedirs(os.path.join(run["dir"], stage, "eval"))
                with open(os.path.join(run["dir"], stage, "eval", "eval.json"), "w") as f:
                    json.dump(_dr_eval(values[run["seed"]], values[run["seed"]]), f)


def test_a_joint_run_also_reports_its_own_pre_trained_stages(tmp_path):
    runs = plan.plan_runs(str(tmp_path), ["dr_only", "cleaq_dr"], range(2), {"data.dir": "/d"})
    kappas = {("dr_only", "stage1"): (0.1, 0.2), ("cleaq_dr", "stage1"): (0.3, 0.1), ("cleaq_dr", "stage3"): (0.5, 0.6)}
    _write_dr_evals(runs, kappas)
    collected = collect.collect_results(runs)
    assert collected["dr"]["cleaq_dr@stage1"]["all"]["kappa"]["values"] == [0.3, 0.1]
    differences = collected["dr_kappa_differences"]
    assert differences["cleaq_dr - cleaq_dr@stage1"]["reject"]["values"] == pytest.approx([0.2, 0.5])
    assert differences["cleaq_dr - dr_only"]["all"]["values"] == pytest.approx([0.4, 0.4])
    text = "\n".join(tables.per_quality_table(collected, "kappa"))
    assert "CLEAQ-DR − CLEAQ-DR, its stage1 (pre-training) (paired by seed)" in text


def test_dr_alone_at_2x_epochs_trains_twice_the_studys_epochs_and_pairs_every_variant_with_it(tmp_path):
    overrides = {"data.dir": "/d", "num_epochs": "3", "optim.constant_epochs": "2"}
    runs = plan.plan_runs(str(tmp_path), ["dr_only", "dr_only_x2", "cleaq_dr"], range(2), overrides)
    by = {(r["variant"], r["seed"]): r for r in runs}
    for variant, epochs, constant in (("dr_only", 3, 2), ("dr_only_x2", 6, 4), ("cleaq_dr", 3, 2)):
        config = plan.load_config(plan.config_path(variant),
                                  plan.parse_overrides(by[(variant, 1)]["command"][5:]))
        assert (config.num_epochs, config.optim.constant_epochs) == (epochs, constant), variant
    kappas = {("dr_only", "stage1"): (0.1, 0.2), ("dr_only_x2", "stage1"): (0.3, 0.5),
              ("cleaq_dr", "stage1"): (0.3, 0.1), ("cleaq_dr", "stage3"): (0.5, 0.6)}
    _write_dr_evals(runs, kappas)
    differences = collect.collect_results(runs)["dr_kappa_differences"]
    assert differences["cleaq_dr - dr_only_x2"]["reject"]["values"] == pytest.approx([0.2, 0.1])
    assert differences["dr_only_x2 - dr_only"]["all"]["values"] == pytest.approx([0.2, 0.3])


def test_the_study_builds_its_synthetic_set_with_the_given_splits_and_refuses_a_bad_one(tmp_path, capsys):
    data = tmp_path / "data"
    args = ["--data", str(data), "--workdir", str(tmp_path / "w"), "--preset", "tiny", "--variants", "dr_only",
            "--seeds", "1", "--build-synthetic", "20", "--size", "32", "--tabulate-only"]
    assert cli.main([*args, "--splits", "train=0.5,test=0.6"]) == 2
    assert "--splits" in capsys.readouterr().err and not data.exists()
    assert cli.main([*args, "--splits", "train=0.3,val=0.2,test=0.5"]) == 0
    with open(data / "manifest.json") as f:
        splits = json.load(f)["splits"]
    assert {k: v["num_records"] for k, v in splits.items()} == {"train": 6, "val": 4, "test": 10}


# --------------------------------------------------------------------------- shared pre-training
def test_joint_variants_start_stage3_from_the_base_variants_pretraining_of_the_same_seed(tmp_path):
    runs = plan.plan_runs(str(tmp_path), ["dr_only", "cleaq", "cleq_dr", "cleaq_dr", "cleaq_dr_to_good"],
                          range(2), {"data.dir": "/d"})
    order = [(r["variant"], r["seed"]) for r in runs]
    assert order[:5] == [("dr_only", 0), ("cleaq_dr", 0), ("cleaq", 0), ("cleq_dr", 0), ("cleaq_dr_to_good", 0)]
    by = {(r["variant"], r["seed"]): r for r in runs}
    base = by[("cleaq_dr", 1)]
    assert "after" not in base and not any("init.stage1" in c for c in base["command"])
    for v in ("cleaq", "cleq_dr", "cleaq_dr_to_good"):
        run = by[(v, 1)]
        assert run["after"] == base["dir"] and run["pretrained"] == "cleaq_dr" and run["stage"] == "stage3"
        assert "--config.stage=stage3" in run["command"]
        assert f"--config.init.stage1={os.path.join(base['dir'], 'stage1')}" in run["command"]
        assert f"--config.init.stage2={os.path.join(base['dir'], 'stage2')}" in run["command"]
        assert run["command"][-1] == "--config.seed=1"
    separate = plan.plan_runs(str(tmp_path), ["cleaq", "cleaq_dr"], range(1), {}, share_pretraining=False)
    assert all("after" not in r and r["pretrained"] == r["variant"] for r in separate)
    alone = plan.plan_runs(str(tmp_path), ["cleaq"], range(1), {})  # no base in the study: its own stages
    assert "after" not in alone[0] and "--config.stage=stage3" not in alone[0]["command"]


def _process(code):
    import sys

    return [sys.executable, "-c", code]


def test_a_run_whose_pretraining_failed_is_not_started(tmp_path, capsys):
    marker = tmp_path / "started"
    base = {"variant": "cleaq_dr", "seed": 0, "dir": str(tmp_path / "cleaq_dr" / "seed0"), "stage": "stage3",
            "command": _process("raise SystemExit(3)")}
    dependant = {"variant": "cleq_dr", "seed": 0, "dir": str(tmp_path / "cleq_dr" / "seed0"), "stage": "stage3",
                 "after": base["dir"], "command": _process(f"open({str(marker)!r}, 'w')")}
    failed = execution.run_unfinished([base, dependant], str(tmp_path), jobs=2)
    assert [r["variant"] for r in failed] == ["cleaq_dr", "cleq_dr"]
    assert not marker.exists()
    assert "it starts from" in capsys.readouterr().out


def test_a_run_waits_for_its_pretraining_even_with_free_jobs(tmp_path):
    log = tmp_path / "order.txt"
    base_dir = tmp_path / "cleaq_dr" / "seed0"
    write = "import os, sys; os.makedirs(sys.argv[1], exist_ok=True); open(sys.argv[1] + '/eval.json', 'w'); " \
            f"open({str(log)!r}, 'a').write(sys.argv[2] + chr(10))"
    runs = [{"variant": v, "seed": 0, "dir": str(tmp_path / v / "seed0"), "stage": "stage3",
             "command": [*_process(write), str(tmp_path / v / "seed0" / "stage3" / "eval"), v]}
            for v in ("cleaq_dr", "cleq_dr")]
    runs[1]["after"] = str(base_dir)
    assert execution.run_unfinished(runs, str(tmp_path), jobs=2) == []
    assert log.read_text().split() == ["cleaq_dr", "cleq_dr"]


def test_shared_pretraining_rows_are_the_base_runs_and_pair_each_joint_variant_with_them(tmp_path):
    runs = plan.plan_runs(str(tmp_path), ["dr_only", "cleq_dr", "cleaq_dr"], range(2), {"data.dir": "/d"})
    kappas = {("dr_only", "stage1"): (0.1, 0.2), ("cleaq_dr", "stage1"): (0.3, 0.1), ("cleaq_dr", "stage3"): (0.5, 0.6),
              ("cleq_dr", "stage3"): (0.4, 0.2)}
    _write_dr_evals(runs, kappas)
    collected = collect.collect_results(runs)
    assert "cleq_dr@stage1" not in collected["dr"]
    assert collected["dr"]["cleaq_dr@stage1"]["all"]["kappa"]["values"] == [0.3, 0.1]
    differences = collected["dr_kappa_differences"]
    assert differences["cleq_dr - cleaq_dr@stage1"]["reject"]["values"] == pytest.approx([0.1, 0.1])
    assert differences["cleaq_dr - cleq_dr"]["all"]["values"] == pytest.approx([0.1, 0.4])


def test_a_tabulate_only_pass_keeps_the_training_studys_command_and_wall_time():
    trained = {"study": {"command": "python -m cleaq_jax.programs.ablations --data d --workdir w", "wall_s": 4000.0,
                         "load_average": [0.1, 2.0], "jobs": 2}}
    redrawn = {"command": "python -m cleaq_jax.programs.ablations --data d --workdir w --tabulate-only",
               "wall_s": 3.0, "load_average": [1.0, 1.0], "jobs": 1, "seeds": [0, 1, 2]}
    kept = results.keep_training_study(redrawn, trained)
    assert kept["wall_s"] == 4000.0 and kept["jobs"] == 2 and kept["command"] == trained["study"]["command"]
    assert kept["tabulated_by"] == redrawn["command"] and kept["seeds"] == [0, 1, 2]
    assert results.keep_training_study(redrawn, None) == redrawn
    assert results.keep_training_study(redrawn, {"study": redrawn}) == redrawn
