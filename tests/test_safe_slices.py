"""SISA's slices (spec safe.md §3, §14.7): a deletion restarts each affected node from the stage before its slice,
the result is bitwise the sliced build from scratch, the earlier checkpoints are untouched, and the counted work
equals the schedule's."""

import time

import jax
import numpy as np
import pytest
from helpers import tiny_forget_job

from jaxforget import errors, methods
from jaxforget.methods.safe import graph, nodes, slices


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def _assert_bitwise(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_the_stage_schedule_spends_the_epochs_of_one_unsliced_training():
    for epochs, r in [(30, 4), (5, 4), (3, 2), (7, 3), (1, 4)]:
        budget = nodes.Budget(epochs=epochs, slices=r)
        e = budget.stage_epochs()
        assert sum(e) == 2 * epochs * r // (r + 1) and len(e) == r  # ⌊R a⌋ stage-epochs
        assert budget.epoch_offsets() == tuple(np.cumsum((0,) + e[:-1]))
    assert nodes.Budget(epochs=7).stage_epochs() == (7,)
    # The floor is shared out in proportion to the stage epochs; unsliced it is the plain floor.
    b = nodes.Budget(epochs=2, batch_size=8, min_steps=40, slices=3)  # stage epochs (1, 1, 1)
    assert [b.stage_steps(8, s) for s in range(3)] == [14, 14, 14]
    assert nodes.Budget(epochs=2, batch_size=8, min_steps=40).stage_steps(17, 0) == 40


def test_slices_deal_every_shard_evenly_and_keep_fixed_samples_in_slice_0():
    shard_of = np.repeat(np.arange(3), [10, 7, 5])
    fixed = np.zeros(22, bool)
    fixed[:4] = True
    slice_of = slices.assign_slices(shard_of, 3, seed=0, fixed=fixed)
    assert (slice_of[:4] == 0).all()
    for j in range(3):
        counts = np.bincount(slice_of[(shard_of == j) & ~fixed], minlength=3)
        assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(slice_of, slices.assign_slices(shard_of, 3, seed=0, fixed=fixed))
    assert (slices.assign_slices(shard_of, 1, seed=0) == 0).all()


@pytest.mark.parametrize("r,epochs", [(2, 3), (4, 5)])  # 2e/(R+1) whole
def test_the_expected_sliced_cost_is_sisas_closed_form(r, epochs):
    n, m = 4, 6  # shards, samples per slice
    g = graph.isolated(n)
    shard_of = np.repeat(np.arange(n), r * m)
    slice_of = np.tile(np.repeat(np.arange(r), m), n)
    budget = nodes.Budget(epochs=epochs, slices=r)
    got = slices.expected_cost(g, shard_of, slice_of, np.ones(len(shard_of), bool), budget)
    assert got == pytest.approx((2 * r + 1) / (3 * r * n), rel=1e-12)


@pytest.mark.parametrize("g", [graph.disjoint_cliques(6, 2), graph.ring(6, 1), graph.isolated(6)],
                         ids=["cliques", "ring", "isolated"])
def test_unsliced_costs_are_the_graph_closed_forms(g):
    shard_of = np.repeat(np.arange(6), [5, 9, 6, 7, 8, 5])
    retain = np.ones(len(shard_of), bool)
    budget = nodes.Budget(epochs=3)
    sizes = np.bincount(shard_of)
    for convention in graph.CONVENTIONS:
        got = slices.expected_cost(g, shard_of, np.zeros_like(shard_of), retain, budget, convention=convention)
        assert got == pytest.approx(graph.expected_cost(g, sizes, convention=convention), rel=1e-12)


def _sliced(kind, **graph_fields):
    job = tiny_forget_job("sisa" if kind == "isolated" else "safe")
    job.method.graph.update(dict(kind=kind, **graph_fields))
    job.method.budget.slices = 3
    job.method.budget.epochs = 4  # stage epochs (2, 2, 2)
    job.method.width = 2
    method = methods.build(job)
    return method, method.init(jax.random.key(1))


@pytest.fixture(scope="module", params=["isolated", "cliques"])
def sliced(request):
    return _sliced(request.param)


def test_a_deletion_restarts_from_its_slice_and_is_bitwise_the_sliced_build(sliced):
    method, state = sliced
    user = method.forgettable_ids()
    pos = np.searchsorted(method.train_ids, user)
    slice_of, shard_of = np.asarray(state.slice_of)[pos], np.asarray(state.shard_of)[pos]
    # A sample of slice 2, then one of slice 1 in another shard, then a slice-0 sample with a slice-2 one.
    first = user[slice_of == 2][:1]
    other = user[(slice_of == 1) & (shard_of != shard_of[slice_of == 2][0])][:1]
    pair = np.concatenate([user[(slice_of == 0) & (shard_of == 1)][:1], user[(slice_of == 2) & (shard_of == 1)][1:2]])
    for ids in (first, other, pair):
        began = time.perf_counter()
        new, info = method.forget(state, ids)
        assert 0 < info.seconds <= time.perf_counter() - began  # the reported time is the request's own
        starts = slices.request_starts(method.graph, np.asarray(state.shard_of), np.asarray(state.slice_of),
                                       np.searchsorted(method.train_ids, ids))
        assert info.notes["affected_nodes"] == sorted(starts)
        assert info.notes["start_stages"] == [starts[i] for i in sorted(starts)]
        expected_versions = np.asarray(state.versions).copy()
        for i, s in starts.items():
            expected_versions[i, s:] += 1
        np.testing.assert_array_equal(np.asarray(new.versions), expected_versions)
        # The checkpoints before each node's start stage, and every other node, are untouched.
        for i, s in starts.items():
            for a, b in zip(_leaves(new.checkpoints), _leaves(state.checkpoints), strict=True):
                np.testing.assert_array_equal(a[i, :s], b[i, :s])
        others = np.setdiff1d(np.arange(method.graph.num_nodes), list(starts))
        for a, b in zip(_leaves(new.adapters), _leaves(state.adapters), strict=True):
            np.testing.assert_array_equal(a[others], b[others])
        # Bitwise the sliced build from scratch on the retained data (adapters, checkpoints, predictions).
        reference = method.retrain(new)
        _assert_bitwise(new.adapters, reference.adapters)
        _assert_bitwise(new.checkpoints, reference.checkpoints)
        x = method.splits.test.x
        np.testing.assert_array_equal(np.asarray(method.predict(new, x)), np.asarray(method.predict(reference, x)))
        # Counted work: stages s ≥ start, e_s passes over D_i^{≤s} (no floor in the tiny config).
        retain = new.ledger.retain_mask()
        e = method.budget.stage_epochs()
        counted = sum(e[s] * int(slices.stage_members(method.graph, np.asarray(new.shard_of),
                                                      np.asarray(new.slice_of), retain, i, s).sum())
                      for i, start in starts.items() for s in range(start, method.budget.slices))
        assert info.notes["sample_gradients"] == counted
        # Negative control: restarting from scratch with the old stage versions is not the same model.
        stale = method.rebuild(new.replace(versions=np.asarray(state.versions)))
        assert any(not np.array_equal(a, b) for a, b in zip(_leaves(stale.adapters), _leaves(new.adapters),
                                                              strict=True))
        state = new
    # The ledger alone determines the versions (and so the result).
    _assert_bitwise(state.adapters, method.retrain(method.with_ledger(method.init(jax.random.key(1)),
                                                                      state.ledger)).adapters)


def test_a_later_slice_costs_less_than_an_earlier_one():
    method, state = _sliced("isolated")
    user = method.forgettable_ids()
    pos = np.searchsorted(method.train_ids, user)
    slice_of, shard_of = np.asarray(state.slice_of)[pos], np.asarray(state.shard_of)[pos]
    work = [method.forget(state, user[(slice_of == s) & (shard_of == 0)][:1])[1].notes["sample_gradients"]
            for s in range(3)]
    assert work[0] > work[1] > work[2] > 0
    d = method.describe(state)
    assert d["slices"] == 3 and len(d["capacity"]) == 3 and 0 < d["expected_cost_sum"] < 1 / 4


def test_sliced_states_refuse_another_slicing_and_bad_slice_configs():
    method, state = _sliced("isolated")
    job = tiny_forget_job("sisa")
    job.method.budget.slices = 0
    with pytest.raises(errors.ConfigError, match="slices"):
        methods.build(job)
    job.method.budget.slices = 2
    other = methods.build(job)
    with pytest.raises(errors.StateMismatchError, match="model config"):
        other.check_state(state)
    # Even with its binding forged, the state's own structure is checked.
    forged = state.replace(ledger=state.ledger.replace(data=jax.device_put(other.data_binding)))
    with pytest.raises(errors.ShapeDtypeError, match="slices"):
        other.check_state(forged.replace(versions=np.zeros((method.graph.num_nodes, 2), np.int32)))
