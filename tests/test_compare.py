"""The comparison job end to end on a tiny digits config: one validated table, the oracle cache reused."""

import json
import os

import numpy as np
import pytest

from configs import compare_digits
from jaxforget import compare, report

pytestmark = pytest.mark.xdist_group("compare")


def tiny_config():
    config = compare_digits.get_config("quick,n_models=4,fraction=0.1")
    config.model.hidden = (16,)
    config.method.core.epochs = 3
    config.eval.relearn.max_epochs = 3
    config.finetune.epochs = 1
    config.methods = ("mixed_linear", "finetune")
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("compare"))
    return workdir, compare.run(tiny_config(), workdir)


def test_report_validates_and_covers_every_method_seed_and_readout(run):
    workdir, rep = run
    report.validate_compare_report(rep)
    assert rep["methods"] == ["mixed_linear", "finetune"] and rep["seeds"] == [0, 1, 2]
    with open(os.path.join(workdir, "report.json")) as f:
        assert json.load(f)["kind"] == "compare"
    names = {r["name"] for r in rep["metrics"]}
    for expected in ("accuracy", "activation_distance", "logit_distance", "weight_distance", "relearn_epochs",
                     "lr_loss_cv[loss]", "svc_entropy[entropy]", "svc_features[m_entropy]", "lira_conf[logit_conf]",
                     "klom_mean", "kl_proxy_nats"):
        assert expected in names, expected
    assert all("MIA" not in r["name"] for r in rep["metrics"])
    for rec in rep["metrics"]:
        assert len(rec["per_seed"]) == 3 and all("retrain_value" in p for p in rec["per_seed"])
    for png in ("accuracy.png", "time_ratio.png", "statistics.png", "klom.png"):
        assert os.path.getsize(os.path.join(workdir, png)) > 0
    assert rep["solver_choice"]["path"].startswith("direct")
    table = open(os.path.join(workdir, "compare.md")).read()
    assert "mixed_linear" in table and "finetune" in table and "0.2" in table


def test_the_exact_forget_matches_the_retrain_and_the_baseline_does_not(run):
    _, rep = run
    by = {(r["name"], r["split"], r["method"]): r for r in rep["metrics"]}
    exact = by[("weight_distance_relative_to_original", "user_weights", "mixed_linear")]["mean"]
    baseline = by[("weight_distance_relative_to_original", "user_weights", "finetune")]["mean"]
    assert exact < 1e-2 < baseline
    for split in ("forget", "retain", "test"):
        assert by[("accuracy", split, "mixed_linear")]["mean_abs_gap"] <= 0.01


def test_a_rerun_loads_the_cached_oracles(run, tmp_path):
    workdir, first = run
    config = tiny_config()
    config.seeds = (0,)
    config.eval.oracle_cache = os.path.join(workdir, "oracle_cache")
    rep = compare.run(config, str(tmp_path))
    assert rep["oracle"]["0"]["source"] == "loaded"
    assert first["oracle"]["0"]["source"] == "trained"
    np.testing.assert_equal(rep["data"]["forget_ids_sha256"][0], first["data"]["forget_ids_sha256"][0])
