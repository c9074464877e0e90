"""Compare reports (spec evaluation.md §10, §12 test 7): records, schema validation, tables, plots, README block."""

import copy
import json

import numpy as np
import pytest

from jaxforget import report

SEEDS = [0, 1, 2]
METHODS = ["mixed_linear", "finetune"]
ACC_CONVENTION = "fraction of the split classified correctly (eval mode)"


def _rows(values, retrain, original):
    return [{"seed": s, "value": v, "retrain_value": r, "original_value": o}
            for s, v, r, o in zip(SEEDS, values, retrain, original, strict=True)]


def _metrics():
    rng = np.random.default_rng(0)
    recs = []
    for method, shift in (("mixed_linear", 0.001), ("finetune", -0.04)):
        for split, base in (("forget", 0.90), ("retain", 0.99), ("test", 0.95)):
            retrain = base + rng.normal(0, 0.004, 3)
            recs.append(report.metric_record(
                "accuracy", split, method, _rows(retrain + shift + rng.normal(0, 0.002, 3), retrain, [1.0, 1.0, 0.999]),
                convention=ACC_CONVENTION))
        recs.append(report.metric_record(
            "member_rate", "forget", method, _rows([0.52, 0.55, 0.50], [0.50, 0.51, 0.49], [0.8, 0.82, 0.79]),
            params={"attack": "svc_entropy", "statistic": "entropy"}, convention="fraction of D_f predicted member"))
    # Weight distance is meaningless without a shared init: "n/a" for the finetune method (spec §4).
    recs.append(report.metric_record("weight_distance", "all", "mixed_linear", _rows([1e-5, 2e-5, 3e-5], [0, 0, 0],
                                     [0.4, 0.5, 0.45]), convention="‖θ_u − θ_r‖₂ over the linearised head"))
    recs.append(report.metric_record("weight_distance", "all", "finetune", _rows([None, float("nan"), "n/a"],
                                     [None, None, None], [None, None, None]), convention="‖θ_u − θ_r‖₂ (n/a)"))
    recs.append(report.metric_record("l2ul_stop_steps", "forget", "finetune",
                                     [{"seed": s, "value": v} for s, v in zip(SEEDS, [12, 15, 11], strict=True)],
                                     convention="steps until acc(D_f) = 0", criterion="stop_count"))
    return recs


def _timings(ratios):
    return report.timing_record([{"seed": s, "seconds": 10.0 * r, "retrain_seconds": 10.0}
                                 for s, r in zip(SEEDS, ratios, strict=True)])


@pytest.fixture
def rep():
    rng = np.random.default_rng(1)
    return {
        "schema_version": report.COMPARE_SCHEMA_VERSION, "kind": "compare",
        "versions": {"jaxforget": "0.1.0", "jax": "0.0-test", "numpy": np.__version__},
        "devices": {"platform": "cpu", "kind": "cpu", "count": 2, "process_count": 1},
        "config": {"methods": METHODS, "seeds": SEEDS, "challenge": {"n_models": 16}},
        "seeds": list(SEEDS),
        "data": {"sizes": {"forget": 64, "retain": 900, "test": 500}, "forget_ids_sha256": ["ab", "cd", "ef"]},
        "oracle": {"cache_key": "k", "trained": True, "seconds": 10.0},
        "methods": list(METHODS),
        "metrics": _metrics(),
        "challenge": {m: {"forget_score": f, "final": f * 0.98, "oracle_vs_oracle": 0.18, "n_models": 16,
                          "epsilons": [rng.exponential(1.0, 64).tolist() for _ in SEEDS]}
                      for m, f in (("mixed_linear", 0.17), ("finetune", 0.05))},
        "timings": {"mixed_linear": _timings([0.01, 0.012, 0.011]), "finetune": _timings([0.3, 0.25, 0.35])},
        "flags": {"efficient": {"mixed_linear": True, "finetune": False}, "censored": {},
                  "deviations": ["challenge: equal constants give ε = 0"]},
    }


def _find(rep, name, method, split="forget"):
    return next(r for r in rep["metrics"] if (r["name"], r["method"], r["split"]) == (name, method, split))


# ------------------------------------------------------------------------------------------------ metric_record
def test_metric_record_stats_match_numpy():
    v, r, o = [0.91, 0.93, 0.905], [0.90, 0.915, 0.91], [1.0, 0.99, 1.0]
    rec = report.metric_record("accuracy", "test", "m", _rows(v, r, o), convention=ACC_CONVENTION)
    v, r, o = (np.asarray(x, np.float64) for x in (v, r, o))
    assert rec["n"] == 3
    assert rec["mean"] == v.mean() and rec["std"] == v.std(ddof=1)
    assert rec["retrain_mean"] == r.mean() and rec["retrain_std"] == r.std(ddof=1)
    assert rec["original_mean"] == o.mean()
    assert rec["mean_gap"] == pytest.approx((v - r).mean(), abs=1e-15)
    assert rec["mean_abs_gap"] == pytest.approx(np.abs(v - r).mean(), abs=1e-15)
    assert rec["criterion"] == "closest_to_retrain" and rec["params"] == {}
    assert json.loads(json.dumps(rec)) == rec  # JSON-safe as built


def test_metric_record_single_seed_has_no_std_and_no_plus_minus():
    rec = report.metric_record("accuracy", "test", "m", [{"seed": 0, "value": 0.9, "retrain_value": 0.8}],
                               convention=ACC_CONVENTION)
    assert rec["n"] == 1 and rec["std"] is None and rec["retrain_std"] is None and rec["original_mean"] is None
    cell = report.format_mean_std(rec["mean"], rec["std"], rec["n"])
    assert cell == "0.900, n=1" and "±" not in cell


def test_metric_record_missing_values_give_none_stats_not_partial_means():
    rec = report.metric_record("weight_distance", "all", "m", _rows([0.1, None, 0.3], [0, 0, 0], [1, 1, 1]),
                               convention="‖θ_u − θ_r‖₂")
    assert rec["mean"] is None and rec["std"] is None and rec["mean_gap"] is None and rec["mean_abs_gap"] is None
    assert rec["retrain_mean"] == 0.0  # the retrain side is complete, so it is still summarised


def test_metric_record_rejects_what_the_validator_rejects():
    with pytest.raises(ValueError, match="no retrain_value"):
        report.metric_record("accuracy", "forget", "m", [{"seed": 0, "value": 0.9}], convention=ACC_CONVENTION)
    with pytest.raises(ValueError, match="bare name 'MIA'"):
        report.metric_record("MIA", "forget", "m", _rows([0.5] * 3, [0.5] * 3, [0.5] * 3), convention="x")
    with pytest.raises(ValueError, match="convention"):
        report.metric_record("accuracy", "forget", "m", _rows([0.5] * 3, [0.5] * 3, [0.5] * 3), convention=" ")
    stop = report.metric_record("stop_steps", "forget", "m", [{"seed": 0, "value": 3}], convention="steps",
                                criterion="stop_count")
    assert stop["mean"] == 3.0 and stop["retrain_mean"] is None and stop["mean_abs_gap"] is None


def test_timing_record_efficiency_boundary():
    assert report.timing_record([{"seed": 0, "seconds": 0.2, "retrain_seconds": 1.0}])["efficient"] is True
    assert report.timing_record([{"seed": 0, "seconds": 0.2001, "retrain_seconds": 1.0}])["efficient"] is False


def test_format_mean_std():
    assert report.format_mean_std(0.91234, 0.0041, 3) == "0.912 ± 0.004, n=3"
    assert report.format_mean_std(None, None, 3) == "n/a"
    assert report.format_mean_std(float("nan"), 0.1, 3) == "n/a"
    assert report.format_mean_std(0.5, 0.1, 1) == "0.500, n=1"


# ------------------------------------------------------------------------------------------------ validation
def test_validate_passes_on_good_report_and_after_a_json_round_trip(rep, tmp_path):
    report.validate_compare_report(rep)
    path = tmp_path / "report.json"
    report.write_json(rep, str(path))
    report.validate_compare_report(json.loads(path.read_text()))


def _break_retrain(rep):
    del _find(rep, "accuracy", "finetune", "retain")["per_seed"][1]["retrain_value"]


def _break_mean(rep):
    _find(rep, "accuracy", "mixed_linear", "test")["mean"] += 1e-9


def _break_std(rep):
    rec = _find(rep, "accuracy", "mixed_linear", "test")
    rec["std"] = float(np.std([p["value"] for p in rec["per_seed"]], ddof=0))  # population std: the classic slip


def _bare_mia(rep):
    _find(rep, "member_rate", "finetune")["name"] = "MIA"


def _no_seeds_key(rep):
    del rep["seeds"]


def _empty_seeds(rep):
    rep["seeds"] = []


def _unknown_seed(rep):
    _find(rep, "member_rate", "mixed_linear")["per_seed"][0]["seed"] = 7


def _no_config(rep):
    del rep["config"]


def _efficient_lies(rep):
    rep["timings"]["finetune"]["efficient"] = True


@pytest.mark.parametrize("breaker, message", [
    (_break_retrain, r"metric 'accuracy' split='retain' method='finetune'.*seed 1 has no retrain_value"),
    (_break_mean, r"split='test' method='mixed_linear'.*mean=.*does not match"),
    (_break_std, r"split='test' method='mixed_linear'.*std=.*does not match"),
    (_bare_mia, r"metric 'MIA' split='forget' method='finetune'.*bare name 'MIA'"),
    (_no_seeds_key, r"missing required keys \['seeds'\]"),
    (_empty_seeds, r"seeds must be a non-empty list"),
    (_unknown_seed, r"method='mixed_linear'.*seeds \[7\] are not in the report's seeds"),
    (_no_config, r"missing required keys \['config'\]"),
    (_efficient_lies, r"timings\['finetune'\]: efficient=True contradicts"),
])
def test_validate_names_the_problem(rep, breaker, message):
    bad = copy.deepcopy(rep)
    breaker(bad)
    with pytest.raises(ValueError, match=message):
        report.validate_compare_report(bad)


def test_stop_count_records_may_omit_the_retrain_value(rep):
    stop = _find(rep, "l2ul_stop_steps", "finetune")
    for p in stop["per_seed"]:
        del p["retrain_value"]
    report.validate_compare_report(rep)


# ------------------------------------------------------------------------------------------------ table
def test_compare_markdown_rows(rep):
    md = report.compare_markdown(rep)
    acc = _find(rep, "accuracy", "finetune", "forget")
    expected = (f"| accuracy | forget | {acc['original_mean']:.3f} "
                f"| {report.format_mean_std(acc['mean'], acc['std'], 3)} "
                f"| {report.format_mean_std(acc['retrain_mean'], acc['retrain_std'], 3)} | {acc['mean_abs_gap']:.3f} |")
    assert expected in md
    assert "| metric | split | original | finetune (mean ± std) | retrain (mean ± std) | \\|gap\\| |" in md
    assert "| member_rate (attack=svc_entropy, statistic=entropy) | forget |" in md
    assert "| weight_distance | all | n/a | n/a | n/a | n/a |" in md
    assert "| l2ul_stop_steps | forget | n/a | 12.667 ± 2.082, n=3 | n/a (stop count) | n/a |" in md
    assert "✓ efficient (≤ 0.2)" in md and "✗ not efficient (> 0.2)" in md
    assert "| challenge F (forget score, N=16) | forget | | 0.170, n=3 | 0.180, n=3 (oracle-vs-oracle F) | |" in md
    assert "| challenge F | oracle-vs-oracle F | F ÷ oracle-vs-oracle (goal ≥ 0.9) |" in md
    assert "| 0.170 | 0.180 | 0.94 |" in md and "| 0.050 | 0.180 | 0.28 |" in md
    assert "- `member_rate (attack=svc_entropy, statistic=entropy)`: fraction of D_f predicted member" in md
    assert "deviation: challenge: equal constants give ε = 0" in md
    assert "Warning" not in md and "MIA" not in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert all(line.replace("\\|", "").count("|") == rows[0].replace("\\|", "").count("|") for line in rows[:10])


def test_compare_markdown_without_challenge_and_with_few_seeds(rep):
    del rep["challenge"]
    rep["seeds"] = [0]
    rep["metrics"] = [report.metric_record("accuracy", "test", m, [{"seed": 0, "value": 0.9, "retrain_value": 0.8}],
                                           convention=ACC_CONVENTION) for m in METHODS]
    del rep["timings"]
    report.validate_compare_report(rep)  # one seed is a valid report, just not a reportable table
    md = report.compare_markdown(rep)
    assert "oracle-vs-oracle" not in md and "challenge" not in md.split("Conventions:")[0]
    assert "at least 3" in md
    assert "| accuracy | test | n/a | 0.900, n=1 | 0.800, n=1 | 0.100 |" in md


# ------------------------------------------------------------------------------------------------ plots
def test_every_plot_writes_a_png(rep, tmp_path):
    rng = np.random.default_rng(2)
    paths = {k: str(tmp_path / f"{k}.png") for k in ("acc", "time", "eps", "eps2", "hist", "klom")}
    report.plot_compare_accuracy(rep, paths["acc"])
    report.plot_time_ratios(rep, paths["time"])
    report.plot_epsilons({m: c["epsilons"] for m, c in rep["challenge"].items()}, 16, paths["eps"])
    report.plot_epsilons({"degenerate": np.full(8, 50.0)}, 2, paths["eps2"])  # N = 2: no buckets, all 0 points
    stats = {stat: {model: {"forget": rng.normal(mu, 1, 64), "test": rng.normal(0, 1, 200)}
                    for model, mu in (("original", -2.0), ("unlearned", -0.5), ("retrain", 0.0))}
             for stat in ("loss", "φ (logit_conf)")}
    report.plot_statistic_histograms(stats, paths["hist"])
    klom = {m: {s: rng.exponential(scale, 50) for s in ("forget", "retain", "test")}
            for m, scale in (("mixed_linear", 0.05), ("finetune", 0.5), ("oracle_vs_oracle", 0.04))}
    report.plot_klom(klom, paths["klom"])
    for p in paths.values():
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_plot_epsilon_buckets_follow_the_spec():
    assert [2 * report._num_buckets(n) for n in (3, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)] == \
        [2, 4, 6, 8, 10, 10, 12, 14, 14, 16]
    assert report._num_buckets(2) == 0
    with pytest.raises(ValueError):
        report._num_buckets(1)
    pts = report._epsilon_points([0.49, 0.5, 6.99, 7.0, 50.0], 512)
    assert pts.tolist() == [1.0, 0.5, 2.0**-13, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------ README + CLI
def test_update_readme_compare_block_round_trips(rep, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\n<!-- results:start -->\nold results\n<!-- results:end -->\n\n"
                      "<!-- compare:start -->\nold\n<!-- compare:end -->\ntail\n", encoding="utf-8")
    path = tmp_path / "report.json"
    report.write_json(rep, str(path))
    table = report.main([str(path), "--readme", str(readme)])
    assert table == report.compare_markdown(json.loads(path.read_text()))
    text = readme.read_text(encoding="utf-8")
    block = text.split("<!-- compare:start -->\n")[1].split("\n<!-- compare:end -->")[0]
    assert block.split("\n", 1)[1] == table and "old results" in text and text.endswith("tail\n")
    report.main([str(path), "--readme", str(readme)])  # idempotent
    assert readme.read_text(encoding="utf-8") == text


def test_cli_rejects_an_invalid_compare_report(rep, tmp_path):
    _bare_mia(rep)
    path = tmp_path / "report.json"
    report.write_json(rep, str(path))
    with pytest.raises(ValueError, match="bare name 'MIA'"):
        report.main([str(path)])


def test_cli_keeps_rendering_other_reports_into_the_results_block(tmp_path):
    readout = {"accuracy": 0.9, "oracle_accuracy": 0.9, "activation_distance": 1e-3}
    final = {s: dict(readout) for s in ("forget", "retain", "test")}
    run = {"method": "mixed_linear",
           "summary": {"num_requests": 1, "final": final, "max_rel_weight_distance": 1e-4, "max_influence_left": 1e-3,
                       "median_iterations": 10, "median_forget_seconds": 0.1,
                       "median_speedup_vs_retrain": {"retrain": 3.0, "cg_retrain": 2.0}},
           "requests": [{"forget": {"num_forgotten": 10},
                         "retrain": {"retrain": {"rel_error": 0.0}, "cg_retrain": {"rel_error": 1e-4}}}],
           "environment": {"device_kind": "cpu", "jax": "x"}, "recompilations_between_requests": 0}
    path, readme = tmp_path / "report.json", tmp_path / "README.md"
    report.write_json(run, str(path))
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n"
                      "<!-- compare:start -->\nkeep\n<!-- compare:end -->\n")
    table = report.main([str(path), "--readme", str(readme)])
    assert table == report.markdown_table(run)
    assert "mixed_linear forget" in table and "speed-up vs cg_retrain" in table
    text = readme.read_text()
    assert table in text.split("<!-- results:end -->")[0] and "\nkeep\n" in text
    # --block=NAME writes another block (a second benchmark's, say) and leaves the others alone.
    readme.write_text(text + "<!-- other:start -->\n<!-- other:end -->\n")
    report.main([str(path), "--readme", str(readme), "--block=other"])
    after = readme.read_text()
    assert after.split("<!-- other:start -->")[0] == text.split("<!-- other:start -->")[0]
    assert table in after.split("<!-- other:start -->")[1] and "--block=other" in after


def test_importing_the_library_does_not_load_matplotlib():
    """Plots import matplotlib on first use: ``import jaxforget`` stays light (and never picks a backend)."""
    import subprocess
    import sys

    code = "import sys, jaxforget; sys.exit(1 if 'matplotlib' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
