"""SAFE and SISA on the method contract (spec safe.md §14): deletion is bitwise the build from scratch, only the
affected nodes move, counted work equals the cost formula, bad requests leave the state unchanged."""

import os

import jax
import ml_collections
import numpy as np
import pytest
from helpers import tiny_forget_job

from jaxforget import errors, methods
from jaxforget.methods.safe import graph


def _build(kind="cliques", name="safe", **method):
    job = tiny_forget_job(name)
    job.method.graph.kind = kind
    job.method.width = 3  # narrower than the graph: several chunks, padded
    for key, value in method.items():
        if isinstance(value, dict):
            job.method[key].update(value)
        else:
            job.method[key] = value
    return methods.build(job)


@pytest.fixture(scope="module", params=["isolated", "cliques", "ring", "safe_shard"])
def built(request):
    method = _build(request.param)
    return method, method.init(jax.random.key(0))


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def _rows(tree, rows):
    return [a[rows] for a in _leaves(tree)]


def _assert_bitwise(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _requests(method, state):
    """A single id, a batch spanning shards, and a whole shard."""
    user = method.forgettable_ids()
    shard_of = np.asarray(state.shard_of)[np.searchsorted(method.train_ids, user)]
    first_shard = int(shard_of.min())
    whole = user[shard_of == first_shard + 1]
    rest = np.setdiff1d(user, whole)
    return [rest[:1], rest[[5, 40, 80, 120]], whole]


def test_every_deletion_is_bitwise_the_build_from_scratch_and_moves_only_affected_nodes(built):
    method, state = built
    x = method.splits.test.x
    for ids in _requests(method, state):
        shards = np.unique(np.asarray(state.shard_of)[np.searchsorted(method.train_ids, ids)])
        affected = np.asarray(method.graph.affected_by(shards))
        others = np.setdiff1d(np.arange(method.graph.num_nodes), affected)
        new, info = method.forget(state, ids)
        assert info.notes["affected_nodes"] == affected.tolist()
        np.testing.assert_array_equal(np.asarray(new.versions), np.asarray(state.versions) + np.isin(
            np.arange(method.graph.num_nodes), affected)[:, None])
        _assert_bitwise(_rows(new.adapters, others), _rows(state.adapters, others))
        reference = method.retrain(new)
        _assert_bitwise(_leaves(new.adapters), _leaves(reference.adapters))
        np.testing.assert_array_equal(np.asarray(method.predict(new, x)), np.asarray(method.predict(reference, x)))
        # Counted work: every retrained node made `epochs` passes over its post-deletion training set.
        retain = new.ledger.retain_mask()
        sizes = np.bincount(np.asarray(new.shard_of)[retain & (np.asarray(new.shard_of) >= 0)],
                            minlength=method.graph.num_nodes)
        retrained = affected[np.asarray(new.active)[affected]]  # a node whose own shard emptied is dropped
        assert info.notes["dropped_nodes"] == np.setdiff1d(affected, retrained).tolist()
        assert info.notes["sample_gradients"] == method.budget.epochs * graph.deletion_cost(
            method.graph, sizes, retrained, convention="sum")
        # Negative control: the same retrain without the new versions (a "warm" reuse of the old keys) differs.
        stale = method.rebuild(new.replace(versions=state.versions))
        assert not all(np.array_equal(a, b) for a, b in zip(_rows(stale.adapters, affected),
                                                             _rows(new.adapters, affected), strict=True))
        state = new
    # The whole-shard request emptied a node's own shard: it left the ensemble.
    assert not bool(np.asarray(state.active).all())


def test_two_sequential_deletions_equal_the_build_on_their_union(built):
    method, state = built
    user = method.forgettable_ids()
    a, b = user[[3, 30]], user[[60, 90]]
    seq = method.forget(method.forget(state, a)[0], b)[0]
    union = method.forget(state, np.concatenate([a, b]))[0]
    assert np.array_equal(seq.ledger.retain_mask(), union.ledger.retain_mask())
    # Same retained data; the versions differ where a node was retrained twice, and the build with those versions is
    # bitwise the sequential result.
    _assert_bitwise(_leaves(seq.adapters), _leaves(method.rebuild(union.replace(versions=seq.versions)).adapters))
    # The versions follow the ledger: the original given the sequential ledger retrains to the sequential result.
    _assert_bitwise(_leaves(seq.adapters), _leaves(method.retrain(method.with_ledger(state, seq.ledger)).adapters))
    with pytest.raises(errors.ShapeDtypeError, match="versions"):
        method.retrain(seq.replace(versions=union.versions))


def test_bad_requests_name_the_problem_and_leave_the_state_unchanged(built):
    method, state = built
    before = _leaves(state)
    core = method.core_ids[:2]
    user = method.forgettable_ids()
    with pytest.raises(errors.CoreIdsError):
        method.forget(state, core)
    with pytest.raises(errors.UnknownIdsError):
        method.forget(state, [10**9])
    with pytest.raises(errors.DuplicateIdsError):
        method.forget(state, [user[0], user[0]])
    gone, _ = method.forget(state, user[:1])
    with pytest.raises(errors.AlreadyForgottenError):
        method.forget(gone, user[:1])
    _assert_bitwise(_leaves(state), before)


def test_builds_are_deterministic_and_sisa_is_safe_on_the_isolated_graph():
    safe = _build("isolated")
    sisa = _build("isolated", name="sisa")
    a, b = safe.init(jax.random.key(1)), sisa.init(jax.random.key(1))
    _assert_bitwise(_leaves(a), _leaves(b))
    c = safe.init(jax.random.key(2))
    assert not np.array_equal(_leaves(a.adapters)[0], _leaves(c.adapters)[0])
    assert safe.describe(a)["expected_cost_sum"] == pytest.approx(1 / 4, abs=0.02)
    with pytest.raises(errors.ConfigError, match="isolated"):
        _build("cliques", name="sisa")


def test_configs_and_states_from_elsewhere_are_refused():
    with pytest.raises(errors.ConfigError, match="does not divide"):
        _build("cliques", graph=dict(kind="cliques", shards=5, clique=2, degree=1))
    with pytest.raises(errors.ConfigError, match="More shards than samples"):
        _build("isolated", graph=dict(kind="isolated", shards=10_000, clique=2, degree=1))
    with pytest.raises(errors.ConfigError, match="ensemble"):
        _build(ensemble="median")
    ring = _build("ring")
    state = ring.init(jax.random.key(0))
    isolated = _build("isolated")
    with pytest.raises(errors.StateMismatchError, match="model config"):
        isolated.forget(state, ring.forgettable_ids()[:1])
    # Even with its binding forged, the state's own structure is checked.
    forged = state.replace(ledger=state.ledger.replace(data=jax.device_put(isolated.data_binding)))
    with pytest.raises(errors.ShapeDtypeError, match="shard graph"):
        isolated.forget(forged, ring.forgettable_ids()[:1])


def test_cross_attention_on_a_cnn_token_map_is_exact_too():
    job = tiny_forget_job("safe")
    job.model = ml_collections.ConfigDict(dict(name="cnn", channels=(4,), hidden=8, num_classes=10))
    job.method.layer = "conv_0:output"
    job.method.adapter.name = "cross_attention"
    job.method.adapter.num_heads = 2
    job.method.width = 4
    method = methods.build(job)
    state = method.init(jax.random.key(0))
    assert method.describe(state)["adapter_params"] > 0
    new, _ = method.forget(state, method.forgettable_ids()[[0, 7]])
    _assert_bitwise(_leaves(new.adapters), _leaves(method.retrain(new).adapters))


@pytest.mark.parametrize("rule", ["logit_mean", "vote", "proportional", "coverage_aware"])
def test_every_ensemble_rule_predicts_valid_log_probabilities(rule):
    method = _build("cliques", ensemble=rule)
    state = method.init(jax.random.key(0))
    logp = np.asarray(method.predict(state, method.splits.test.x[:16]))
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-5)


def test_the_forget_job_judges_safe_against_its_retrain(tmp_path):
    from jaxforget import experiment

    job = tiny_forget_job("safe")
    job.method.budget.epochs = 20
    job.method.budget.learning_rate = 0.01
    rep = experiment.run(job, str(tmp_path))
    assert [r["request"] for r in rep["requests"]] == [1, 2]
    for r in rep["requests"]:
        assert r["forget"]["solver"] == "safe-retrain-affected"
        assert r["rel_weight_distance"] == 0.0  # exact: bitwise the retrain
        assert r["readouts"]["test"]["oracle_accuracy"] > 0.5
    assert rep["recompilations_between_requests"] == 0


def test_the_shard_sweep_measures_accuracy_and_cost_for_every_graph(tmp_path):
    from jaxforget.methods.safe import study

    job = tiny_forget_job("safe")
    out = methods.get_method("safe").study("shards", ml_collections.ConfigDict(dict(
        job=job, graphs=("isolated", "cliques2"), shards=(2, 4), seeds=(0,), requests=1)), workdir=str(tmp_path))
    rows = {(r["graph"], r["shards"]): r for r in out["rows"]}
    assert set(rows) == {("no_sharding", 1), ("isolated", 2), ("isolated", 4), ("cliques2", 2), ("cliques2", 4)}
    for (label, n), r in rows.items():
        c = 2 if label == "cliques2" else 1
        assert r["expected_cost_sum"]["mean"] == pytest.approx(c * c / n, abs=0.03), (label, n)
        assert r["expected_cost_union"]["mean"] == pytest.approx(c / n, abs=0.03), (label, n)
        assert r["affected_nodes"]["mean"] == c  # a single-sample request retrains its clique
        assert r["counted_cost_sum"]["mean"] == pytest.approx(c * c / n, abs=0.06), (label, n)
        assert 0 < r["accuracy"]["mean"] <= 1
        for field in ("predict_ms", "adapter_bytes", "adapter_bytes_per_node", "latency_vs_no_sharding"):
            assert np.isfinite(r[field]["mean"]) and r[field]["mean"] > 0, (label, n, field)
        assert r["adapter_bytes"]["mean"] == r["nodes"]["mean"] * r["adapter_bytes_per_node"]["mean"], (label, n)
    assert rows[("no_sharding", 1)]["accuracy_gap_points"]["mean"] == 0.0
    assert rows[("no_sharding", 1)]["latency_vs_no_sharding"]["mean"] == 1.0
    cache = out["feature_cache"]
    for field in ("backbone_pass_seconds", "test_backbone_ms", "retrain_seconds", "backbone_pass_over_retrain"):
        assert np.isfinite(cache[field]["mean"]) and cache[field]["mean"] > 0, field
    assert os.path.exists(tmp_path / "inference_vs_shards.png")
    assert out["parallel"]["nodes"] == 4 and out["parallel"]["speedup"] > 0
    assert all(os.path.exists(p) for p in out["plots"]) and "Shard sweep" in out["markdown"]
    assert study.sweep_markdown(out) == out["markdown"]


def test_safe_runs_the_comparison_with_relearn_time(tmp_path):
    from helpers import tiny_data, tiny_method

    from jaxforget import compare, report
    from jaxforget import config as config_lib

    config = config_lib.compare_job()
    config.data = tiny_data()
    config.methods.safe = config_lib.method_entry("safe", dict(name="mlp", hidden=(16,), num_classes=10))
    tiny_method(config.methods.safe.method)
    config.methods.safe.method.budget.update(dict(epochs=20, learning_rate=0.01))
    config.seeds, config.eval.n_models = (0, 1), 4
    config.eval.relearn.max_epochs, config.eval.relearn.size = 2, 100
    rep = compare.run(config, str(tmp_path))
    report.validate_compare_report(rep)
    rows = {(r["name"], r["split"]): r for r in rep["metrics"]}
    assert rows[("accuracy", "test")]["retrain_mean"] > 0.5
    # Exact: the forget is the retrain, so every distance to it is zero.
    assert rows[("weight_distance", "params")]["mean"] == 0.0, rows[("weight_distance", "params")]
    assert rows[("activation_distance", "test")]["mean"] == 0.0
    assert ("relearn_epochs", "forget") in rows
