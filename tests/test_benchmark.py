"""The benchmark job at quick size: its JSON holds measured, consistent figures (never timed assertions)."""

import json

import pytest

from configs import benchmark as benchmark_config
from jaxforget import benchmark

pytestmark = pytest.mark.xdist_group("benchmark")


def test_quick_benchmark_writes_consistent_json(tmp_path):
    benchmark.run(benchmark_config.get_config("quick"), str(tmp_path))
    out = json.loads((tmp_path / "benchmark.json").read_text())
    w = out["workloads"]["digits_head"]
    assert w["method"] == "mixed_linear" and w["recompilations_between_requests"] == 0
    assert w["details"]["num_linearized_params"] == 32 * 10 + 10
    assert w["profile"]["kappa"] > 1
    assert len(w["per_request"]) == 2
    for r in w["per_request"]:
        assert r["forget_rel_error"] <= 1e-3 and r["influence_left"] <= 0.05
        assert r["forget_passes"] == r["forget_iterations"] + 2
        assert set(r["retrain"]) == {"retrain", "cg_retrain", "cg_to_error", "sgd_retrain"}
        # Plain float64 CG from zero, stopped at the forget's error (at least the target's 1e-3), got there.
        to_error = r["retrain"]["cg_to_error"]
        assert to_error["target_rel_error"] == pytest.approx(max(r["forget_rel_error"], 1e-3))
        assert to_error["converged"] and to_error["rel_error"] <= to_error["target_rel_error"]
        assert to_error["passes"] == to_error["iterations"] + 2 and to_error["iterations"] > 0
        sgd = r["retrain"]["sgd_retrain"]
        assert sgd["passes"] == 10 and 0 < sgd["rel_error"] < float("inf")
        for name, base in r["retrain"].items():
            assert r["forget_over_retrain_time"][name] == pytest.approx(r["forget_seconds"] / base["seconds"],
                                                                         rel=1e-9)
    k = w["profile"]
    assert k["gn_matvec_over_forward_backward"] == pytest.approx(k["gn_matvec_seconds"] / k["forward_backward_seconds"])
    table = benchmark.markdown(out)
    assert "| digits_head | mixed_linear | cg |" in table and "| digits_head | cg_to_error |" in table
    cross = out["studies"]["crossover"]
    assert cross["method"] == "mixed_linear" and [r["width"] for r in cross["rows"]] == [16, 32]
    for r in cross["rows"]:
        assert r["num_params"] == (r["width"] + 1) * 10
        assert r["direct"]["memory_bytes"] >= 8 * r["num_params"] ** 2  # the float64 factor is held
        assert r["direct"]["amortised_seconds"] >= r["direct"]["forget_seconds"]
        assert r["direct"]["rel_residual"] <= 1e-5 and r["cg"]["rel_residual"] <= 1e-5
    assert "Direct vs CG by size" in table
    ev = out["evaluation"]
    assert ev["n_models"] == 16 and ev["max_abs_epsilon_difference"] <= 1e-9
    ratio = ev["challenge_score_seconds"] / ev["median_forget_seconds"]
    assert ev["challenge_score_over_forget"] == pytest.approx(ratio)
    assert w["readouts"]["solver_memory_bytes"] == {"factor": 0, "removal": 0, "preconditioner": 0}  # plain CG


def test_quick_ssse_benchmark_measures_structures_and_per_example_gradients(tmp_path):
    from configs import ssse_benchmark

    benchmark.run(ssse_benchmark.get_config("quick,calibration=0"), str(tmp_path))
    out = json.loads((tmp_path / "benchmark.json").read_text())
    w = out["workloads"]["digits_mlp_gn_block"]
    assert w["method"] == "ssse" and w["recompilations_between_requests"] == 0
    assert w["details"]["structure"] == "block" and w["details"]["build_seconds"] > 0
    for r in w["per_request"]:
        expected = (w["build_seconds"] + r["forget_seconds"]) / r["retrain"]["retrain"]["seconds"]
        assert r["forget_plus_build_over_retrain_time"]["retrain"] == pytest.approx(expected, rel=1e-9)
    k = w["profile"]
    assert k["per_example_over_batched_throughput"] == pytest.approx(
        k["batched_mean_grad_seconds"] / k["per_example_grads_seconds"])
    assert w["readouts"]["retained_objective_grad_norm"] >= 0 and w["readouts"]["mean_example_grad_norm"] > 0
    st = out["studies"]["structures"]
    rows, p = st["rows"], st["num_params"]
    assert rows["dense"]["bytes"] >= 4 * p * p and rows["woodbury"]["bytes"] < rows["dense"]["bytes"] / 10
    for name in ("sherman_morrison", "sherman_morrison_scan", "sherman_morrison_chunked", "naive_batch1_woodfisher"):
        assert rows[name]["solve_rel_error_vs_dense"] < 1e-2, name  # float32: the same matrix, inverted another way
    assert 0 < rows["block"]["solve_rel_error_vs_dense"] < 1  # cross-block curvature ignored
    assert "| sherman_morrison_chunked |" in benchmark.markdown(out)
