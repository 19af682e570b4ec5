"""The guidance sweep on val (`cleaq_jax.programs.ablations.sweep`): its runs and its rule."""

import shlex

from cleaq_jax.programs.ablations import sweep


def _row(point, kappa, psnr_usable, psnr_reject):
    return {"point": point, "kappa": {"all": kappa, "usable": None, "reject": None},
            "psnr": {"usable": psnr_usable, "reject": psnr_reject}, "ssim": {"usable": None, "reject": None},
            "shares": {}}


def test_plan_scores_every_point_on_val_from_one_shared_pretraining(tmp_path):
    runs = sweep.plan_sweep(str(tmp_path), {"model.width": "0.125"}, "python")
    assert [r["point"] for r in runs][0] == sweep.BASE and len(runs) == len(sweep.POINTS)
    base = runs[0]
    assert "after" not in base and not any(a.startswith("--config.stage=") for a in base["command"])
    for run in runs:
        flags = dict(a.split("=", 1) for a in run["command"] if a.startswith("--config."))
        assert flags["--config.data.eval_split"] == "val" and flags["--config.log_gradient_shares"] == "True"
        assert flags["--config.seed"] == str(sweep.SEED)
        if run is not base:
            assert run["after"] == base["dir"] and flags["--config.stage"] == "stage3"
            assert flags["--config.init.stage1"].startswith(base["dir"])
    by_point = {r["point"]: shlex.join(r["command"]) for r in runs}
    assert "--config.loss.guidance_weight=0.3" in by_point["to_good 0.3"]
    assert "--config.loss.grl_schedule=ganin" in by_point["reverse ramp 0.1"]
    assert "ablations/cleq_dr.py" in by_point["none"]


def test_the_rule_takes_the_best_val_kappa_that_keeps_the_enhancement():
    rows = [_row("none", 0.50, 24.0, 18.0),
            _row("to_good 0.03", 0.55, 23.8, 17.9),
            _row("to_good 1.0", 0.70, 22.0, 18.0),  # best kappa, but 2 dB worse on usable images
            _row("reverse ramp 0.1", 0.52, 24.1, 18.2)]
    assert sweep.choose(rows) == "to_good 0.03"
    assert sweep.choose(rows[1:]) is None  # without the unguided baseline nothing is chosen
    assert sweep.choose([rows[0], rows[2]]) is None
    page = sweep.sweep_markdown(rows, "to_good 0.03", "cmd")
    assert "**to_good 0.03**" in page and "| to_good 1.0 | 0.700 |" in page
