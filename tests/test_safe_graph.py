"""Shard graphs (spec safe.md §2-§3): hand-worked training and affected sets, the cost formulas, sharding."""

import itertools

import numpy as np
import pytest

from jaxforget.methods.safe import graph as G


def _brute_training_sets(g: G.ShardGraph) -> list[set[int]]:
    return [{i, *g.out_neighbors[i]} for i in range(g.num_nodes)]


# ------------------------------------------------------------------------------------------------ generators


@pytest.mark.parametrize("g, training, affected", [
    (G.isolated(3), [(0,), (1,), (2,)], [(0,), (1,), (2,)]),
    (G.disjoint_cliques(6, 3), [(0, 1, 2)] * 3 + [(3, 4, 5)] * 3, [(0, 1, 2)] * 3 + [(3, 4, 5)] * 3),
    (G.disjoint_cliques(5, 2, allow_ragged=True), [(0, 1), (0, 1), (2, 3), (2, 3), (4,)],
     [(0, 1), (0, 1), (2, 3), (2, 3), (4,)]),
    (G.safe_shard(3), [(0,), (0, 1), (0, 2), (0, 3)], [(0, 1, 2, 3), (1,), (2,), (3,)]),
    (G.ring(5, 2), [(0, 1, 2), (1, 2, 3), (2, 3, 4), (0, 3, 4), (0, 1, 4)],
     [(0, 3, 4), (0, 1, 4), (0, 1, 2), (1, 2, 3), (2, 3, 4)]),
    (G.from_adjacency([[2], [2], []]), [(0, 2), (1, 2), (2,)], [(0,), (1,), (0, 1, 2)]),
    (G.no_sharding(), [(0,)], [(0,)]),
])
def test_generators_match_hand_worked_sets(g, training, affected):
    assert [g.training_shards(i) for i in range(g.num_nodes)] == training
    assert [g.affected(j) for j in range(g.num_nodes)] == affected


@pytest.mark.parametrize("g", [G.isolated(4), G.disjoint_cliques(8, 4), G.safe_shard(5), G.ring(7, 3),
                               G.from_adjacency(np.random.default_rng(0).random((6, 6)) * ~np.eye(6, dtype=bool)
                                                > 0.6)])
def test_affected_set_is_every_node_that_trained_on_the_shard(g):
    training = _brute_training_sets(g)
    for j in range(g.num_nodes):
        assert set(g.affected(j)) == {i for i in range(g.num_nodes) if j in training[i]}
    shards = [0, g.num_nodes - 1]
    assert set(g.affected_by(shards)) == set(g.affected(0)) | set(g.affected(g.num_nodes - 1))
    assert g.adjacency().sum() == g.num_edges


def test_adjacency_round_trip_and_clique_groups():
    g = G.ring(6, 2)
    assert G.from_adjacency(g.adjacency()).out_neighbors == g.out_neighbors
    groups = G.disjoint_cliques(4, 2, groups=[[0, 3], [2, 1]])
    assert groups.training_shards(0) == (0, 3) and groups.training_shards(1) == (1, 2)


@pytest.mark.parametrize("build, match", [
    (lambda: G.from_adjacency([[0]]), "self-loop"),
    (lambda: G.from_adjacency([[1, 1], []]), "duplicate edge"),
    (lambda: G.from_adjacency([[3], []]), "outside the graph"),
    (lambda: G.from_adjacency(np.zeros((2, 3), bool)), "square"),
    (lambda: G.disjoint_cliques(5, 2), "does not divide"),
    (lambda: G.disjoint_cliques(2, 3), "larger than"),
    (lambda: G.disjoint_cliques(4, 2, groups=[[0, 1], [1, 2]]), "partition"),
    (lambda: G.ring(3, 3), "at least"),
    (lambda: G.isolated(0), "integer ≥ 1"),
    (lambda: G.from_adjacency([]), "at least one node"),
])
def test_bad_graphs_are_refused_by_name(build, match):
    with pytest.raises(G.ShardGraphError, match=match):
        build()


# ------------------------------------------------------------------------------------------------ cost


@pytest.mark.parametrize("n, s", [(8, 5), (16, 3)])
def test_closed_forms_for_equal_shards(n, s):
    """The table of spec §3: isolated 1/n; cliques c²/n and c/n; ring (d+1)²/n and (2d+1)/n; no sharding 1."""
    sizes = [s] * n
    cases = [(G.isolated(n), 1 / n, 1 / n)]
    cases += [(G.disjoint_cliques(n, c), c * c / n, c / n) for c in (2, 4)]
    cases += [(G.ring(n, d), (d + 1) ** 2 / n, (2 * d + 1) / n) for d in (1, 2, 3)]
    for g, want_sum, want_union in cases:
        assert G.expected_cost(g, sizes, convention="sum") == pytest.approx(want_sum, rel=1e-12), g.kind
        assert G.expected_cost(g, sizes, convention="union") == pytest.approx(want_union, rel=1e-12), g.kind
    assert G.expected_cost(G.no_sharding(), [n * s], convention="sum") == 1.0


def test_safe_shard_cost_and_protection():
    n, s, s0 = 4, 10, 6
    g = G.safe_shard(n)
    sizes = [s0] + [s] * n
    total = n * s + s0
    for convention in G.CONVENTIONS:
        assert G.expected_cost(g, sizes, convention=convention) == pytest.approx((s + s0) / total, rel=1e-12)
    # A request inside the safe shard (if it were allowed) retrains every node.
    assert G.deletion_cost(g, sizes, g.affected(0), convention="sum") == s0 + n * (s + s0)
    assert G.deletion_cost(g, sizes, g.affected(0), convention="union") == total
    assert G.request_probabilities(g, sizes)[0] == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_cost_identities_on_random_graphs_and_sizes(seed):
    rng = np.random.default_rng(seed)
    n = 7
    adj = (rng.random((n, n)) < 0.3) & ~np.eye(n, dtype=bool)
    g = G.from_adjacency(adj)
    sizes = rng.integers(1, 20, n)
    total = sizes.sum()
    d = G.training_sizes(g, sizes)
    hit = G.node_hit_probabilities(g, sizes)
    # E[C_sum] = Σ_i |D_i| P_i; under uniform requests over all of D that is Σ_i (|D_i|/N)².
    assert G.expected_cost(g, sizes, convention="sum") == pytest.approx(d @ hit / total, rel=1e-12)
    assert G.expected_cost(g, sizes, convention="sum") == pytest.approx(((d / total) ** 2).sum(), rel=1e-12)
    # The union never exceeds the sum and never falls below the largest affected node.
    for j in range(n):
        union = G.deletion_cost(g, sizes, g.affected(j), convention="union")
        assert d[list(g.affected(j))].max() <= union <= G.deletion_cost(g, sizes, g.affected(j), convention="sum")
    # One request in a batch of K = 1 is the single-request expectation.
    assert G.expected_batch_cost(g, sizes, 1)["sum"] == pytest.approx(d @ hit / total, rel=1e-12)


def test_batch_cost_matches_enumeration_and_sisa_formula():
    s_count, k = 4, 3
    g = G.isolated(s_count)
    sizes = [5] * s_count
    batch = G.expected_batch_cost(g, sizes, k)
    assert batch["nodes"] == pytest.approx(s_count * (1 - (1 - 1 / s_count) ** k), rel=1e-12)
    # Enumerate every sequence of K requests on a small ring: the expected nodes and work retrained, exactly.
    ring = G.ring(4, 1)
    sizes = np.array([3, 5, 2, 6])
    pi = sizes / sizes.sum()
    d = G.training_sizes(ring, sizes)
    nodes = work = 0.0
    for seq in itertools.product(range(4), repeat=k):
        p = np.prod(pi[list(seq)])
        hit = ring.affected_by(seq)
        nodes += p * len(hit)
        work += p * d[list(hit)].sum() / sizes.sum()
    batch = G.expected_batch_cost(ring, sizes, k)
    assert batch["nodes"] == pytest.approx(nodes, rel=1e-12)
    assert batch["sum"] == pytest.approx(work, rel=1e-12)


def test_counted_cost_of_a_real_deletion_uses_post_deletion_sizes():
    ids = np.arange(40)
    labels = ids % 4
    shard_of = G.assign_shards(ids, labels, 4, seed=1)
    g = G.ring(4, 1)
    deleted = np.array([3, 17])
    keep = ~np.isin(ids, deleted)
    after = G.node_members(g, shard_of[keep], ids[keep])
    nodes = g.affected_by(np.unique(shard_of[np.isin(ids, deleted)]))
    sizes_after = np.bincount(shard_of[keep], minlength=4)
    assert G.deletion_cost(g, sizes_after, nodes, convention="sum") == sum(len(after[i]) for i in nodes)
    union = set().union(*(after[i].tolist() for i in nodes))
    assert G.deletion_cost(g, sizes_after, nodes, convention="union") == len(union)
    assert not union & set(deleted.tolist())


def test_unknown_convention_and_wrong_sizes_are_refused():
    with pytest.raises(G.ShardGraphError, match="convention"):
        G.expected_cost(G.isolated(2), [1, 1], convention="max")
    with pytest.raises(G.ShardGraphError, match="one shard size per node"):
        G.expected_cost(G.isolated(2), [1, 1, 1], convention="sum")


# ------------------------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("stratify", [True, False])
def test_assign_shards_is_a_balanced_deterministic_partition(stratify):
    rng = np.random.default_rng(0)
    ids = rng.permutation(1000)[:257] + 10_000
    labels = rng.integers(0, 10, ids.shape)
    n = 8
    shard_of = G.assign_shards(ids, labels, n, seed=3, stratify=stratify)
    sizes = np.bincount(shard_of, minlength=n)
    assert sizes.sum() == len(ids) and sizes.max() - sizes.min() <= 1
    if stratify:
        for cls in range(10):
            per = np.bincount(shard_of[labels == cls], minlength=n)
            assert per.max() - per.min() <= 1, cls
    # Deterministic, and independent of the order the ids come in.
    perm = rng.permutation(len(ids))
    again = G.assign_shards(ids[perm], labels[perm], n, seed=3, stratify=stratify)
    assert np.array_equal(again, shard_of[perm])
    assert not np.array_equal(G.assign_shards(ids, labels, n, seed=4, stratify=stratify), shard_of)
    members = G.node_members(G.isolated(n), shard_of, ids)
    assert sorted(np.concatenate(members).tolist()) == sorted(ids.tolist())


@pytest.mark.parametrize("args, match", [
    ((np.arange(3), np.zeros(3), 4), "More shards than samples"),
    ((np.array([1, 1, 2]), np.zeros(3), 2), "unique"),
    ((np.arange(3), np.zeros(2), 2), "aligned"),
])
def test_assign_shards_refuses_bad_input(args, match):
    with pytest.raises(G.ShardGraphError, match=match):
        G.assign_shards(*args, seed=0)
