"""The comparison job end to end on tiny data: one validated table, each method against its own gold standard,
originals and oracles shared by methods that share a retrain, and the oracle cache reused."""

import json
import os

import numpy as np
import pytest
from helpers import TINY_MLP, tiny_data, tiny_method

from jaxforget import compare, report
from jaxforget import config as config_lib

pytestmark = pytest.mark.xdist_group("compare")


def tiny_config():
    config = config_lib.compare_job()
    config.data = tiny_data()
    config.methods.mixed_linear = config_lib.method_entry("mixed_linear", TINY_MLP, baselines=("sgd_retrain",))
    config.methods.mixed_linear.method.linearize = "head"
    config.methods.mixed_linear.method.sigma = 1e-4
    for name in ("retrain", "finetune"):
        config.methods[name] = config_lib.method_entry(name, TINY_MLP)
    for entry in config.methods.values():
        tiny_method(entry.method)
    config.eval.n_models = 4
    config.eval.relearn.max_epochs, config.eval.relearn.size = 3, 100
    config.forget_fraction = 0.1
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("compare"))
    return workdir, compare.run(tiny_config(), workdir)


def test_report_validates_and_covers_every_method_seed_and_readout(run):
    workdir, rep = run
    report.validate_compare_report(rep)
    assert rep["methods"] == ["mixed_linear", "retrain", "finetune"] and rep["seeds"] == [0, 1, 2]
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
    assert rep["method_details"]["mixed_linear"]["solver_choice"]["path"].startswith("direct")
    assert set(rep["timings"]["mixed_linear"]["per_seed"][0]["baseline_seconds"]) == {"sgd_retrain"}
    table = open(os.path.join(workdir, "compare.md")).read()
    assert "mixed_linear" in table and "finetune" in table and "0.2" in table


def test_each_method_is_judged_against_its_own_gold_standard(run):
    _, rep = run
    by = {(r["name"], r["split"], r["method"]): r for r in rep["metrics"]}
    exact = by[("weight_distance_relative_to_original", "params", "mixed_linear")]["mean"]
    baseline = by[("weight_distance_relative_to_original", "params", "finetune")]["mean"]
    assert exact < 1e-2 < baseline
    for split in ("forget", "retain", "test"):
        assert by[("accuracy", split, "mixed_linear")]["mean_abs_gap"] <= 0.01
        # The retrain baseline *is* its gold standard: every readout equals the retrain value exactly.
        assert by[("accuracy", split, "retrain")]["mean_abs_gap"] == 0.0
        assert by[("activation_distance", split, "retrain")]["mean"] == 0.0
    assert by[("weight_distance", "params", "retrain")]["mean"] == 0.0
    # retrain and finetune share the original and the cached oracle; mixed-linear has its own.
    oracles = rep["oracle"]["0"]
    assert oracles["retrain"]["key"] == oracles["finetune"]["key"] != oracles["mixed_linear"]["key"]


def test_a_rerun_loads_the_cached_oracles(run, tmp_path):
    workdir, first = run
    config = tiny_config()
    config.seeds = (0,)
    del config.methods["retrain"], config.methods["finetune"]
    config.eval.oracle_cache = os.path.join(workdir, "oracle_cache")
    rep = compare.run(config, str(tmp_path))
    assert rep["oracle"]["0"]["mixed_linear"]["source"] == "loaded"
    assert rep["oracle"]["0"]["mixed_linear"]["population_source"] == "loaded"
    assert first["oracle"]["0"]["mixed_linear"]["source"] == "trained"
    np.testing.assert_equal(rep["data"]["forget_ids_sha256"][0], first["data"]["forget_ids_sha256"][0])
