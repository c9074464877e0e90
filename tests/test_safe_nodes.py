"""SAFE node training and ensembling (spec safe.md §5, §6, §14.6-9): bitwise lane independence, id-keyed order,
counted work, real learning, the ensemble rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxforget import errors
from jaxforget.methods.safe import adapter as adapter_lib
from jaxforget.methods.safe import ensemble, nodes

BUDGET = nodes.Budget(epochs=3, batch_size=8, min_steps=0, learning_rate=0.05, weight_decay=1e-4)
HEAD = adapter_lib.LinearHead(num_classes=3)


def _data(n=60, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    centres = rng.normal(size=(3, dim)) * 3
    feats = centres[labels] + rng.normal(size=(n, dim))
    return jnp.asarray(feats, jnp.float32), jnp.asarray(labels, jnp.int32), np.arange(100, 100 + n)


ROOT = jax.random.key_data(jax.random.key(7))


def _train(node_sets, keys, *, width=4, capacity=24, budget=BUDGET, adapter=HEAD, feats=None, labels=None,
           ids=None):
    """Trains ``node_sets`` (rows) with ``keys`` = (node, version) pairs."""
    feats_, labels_, ids_ = _data()
    feats = feats_ if feats is None else feats
    labels = labels_ if labels is None else labels
    ids = ids_ if ids is None else ids
    chunk = nodes.pack_chunk([np.asarray(r) for r in node_sets], [ids[np.asarray(r)] for r in node_sets],
                             nodes=[k[0] for k in keys], versions=[k[1] for k in keys], capacity=capacity,
                             width=width, budget=budget)
    trained = nodes.train_chunk(adapter, budget, capacity, ROOT, chunk, feats, labels)
    return trained.params, trained.evaluations


def _lane(tree, lane):
    return jax.tree.map(lambda a: np.asarray(a[lane]), tree)


def _assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("adapter", [HEAD, adapter_lib.CrossAttentionAdapter(num_classes=3, num_heads=2)],
                         ids=["linear", "cross_attention"])
def test_a_node_is_bitwise_the_same_alone_among_others_and_in_any_lane(adapter):
    feats, labels, ids = _data()
    if adapter is not HEAD:
        feats = jnp.tile(feats[:, None, :4], (1, 3, 1))  # 3 tokens of width 4
    target = np.arange(0, 20)
    others = [np.arange(20, 30), np.arange(30, 54), np.arange(54, 57)]
    key = (2, 0)
    other_keys = [(i, 0) for i in (0, 1, 3)]
    kw = dict(adapter=adapter, feats=feats, labels=labels, ids=ids)
    alone, count_alone = _train([target], [key], **kw)
    mixed, counts = _train([others[0], others[1], target, others[2]], [other_keys[0], other_keys[1], key,
                                                                        other_keys[2]], **kw)
    last, _ = _train([*others, target], [*other_keys, key], **kw)
    _assert_bitwise(_lane(alone, 0), _lane(mixed, 2))
    _assert_bitwise(_lane(alone, 0), _lane(last, 3))
    assert int(count_alone[0]) == int(counts[2]) == BUDGET.epochs * len(target)


def test_the_order_is_keyed_by_ids_so_the_input_order_and_padding_do_not_matter():
    rows = np.arange(5, 25)
    key = (0, 0)
    a, _ = _train([rows], [key])
    b, _ = _train([rows[::-1]], [key])
    _assert_bitwise(a, b)
    # A different capacity changes the compiled program (spec §7.6), so it is stored, not recomputed.
    c, _ = _train([rows], [key], capacity=32)
    assert c["head"]["kernel"].shape == a["head"]["kernel"].shape


def test_retraining_on_the_reduced_set_is_training_from_scratch_on_it_and_differs_from_the_original():
    rows = np.arange(0, 24)
    key_v0, key_v1 = (0, 0), (0, 1)
    original, _ = _train([rows], [key_v0])
    reduced = np.delete(rows, [4, 11])
    retrained, count = _train([reduced, rows], [key_v1, key_v0])
    reference, _ = _train([reduced], [key_v1])
    _assert_bitwise(_lane(retrained, 0), _lane(reference, 0))
    _assert_bitwise(_lane(retrained, 1), _lane(original, 0))  # an unaffected lane is untouched by its neighbour
    assert not np.array_equal(np.asarray(retrained["head"]["kernel"][0]), np.asarray(original["head"]["kernel"][0]))
    assert int(count[0]) == BUDGET.epochs * len(reduced)


def test_inert_lanes_and_the_step_floor():
    budget = nodes.Budget(epochs=1, batch_size=8, min_steps=5, learning_rate=0.05)
    chunk = nodes.pack_chunk([np.arange(3)], [np.arange(3)], nodes=[0], versions=[0], capacity=8, width=3,
                             budget=budget)
    assert chunk.steps.tolist() == [[5], [0], [0]] and chunk.valid[1:].sum() == 0
    _, count = _train([np.arange(3)], [(0, 0)], width=3, capacity=8, budget=budget)
    assert count.tolist() == [15, 0, 0]  # 5 steps of a 3-sample partial batch; inert lanes do nothing
    assert budget.steps(0) == 0 and budget.steps(17) == 5 and nodes.Budget(epochs=2, batch_size=8).steps(17) == 6


def test_nodes_learn_a_separable_problem():
    feats, labels, _ = _data(n=60, seed=1)
    params, _ = _train([np.arange(60)], [(0, 0)], width=1, capacity=64,
                       budget=nodes.Budget(epochs=20, batch_size=8, learning_rate=0.05), feats=feats, labels=labels)
    logits = HEAD.apply({"params": _lane(params, 0)}, feats)
    assert float((jnp.argmax(logits, -1) == labels).mean()) >= 0.95


def test_bad_chunks_are_refused():
    with pytest.raises(errors.ShapeDtypeError, match="width 1 got 2 nodes"):
        nodes.pack_chunk([np.arange(2)] * 2, [np.arange(2)] * 2, nodes=[0, 1], versions=[0, 0], capacity=8,
                         width=1, budget=BUDGET)
    with pytest.raises(errors.ShapeDtypeError, match="over the capacity"):
        nodes.pack_chunk([np.arange(9)], [np.arange(9)], nodes=[0], versions=[0], capacity=8, width=1,
                         budget=BUDGET)
    with pytest.raises(errors.ShapeDtypeError, match="multiple of the batch size"):
        nodes.pack_chunk([np.arange(2)], [np.arange(2)], nodes=[0], versions=[0], capacity=12, width=1,
                         budget=BUDGET)


def test_adapter_registry_and_shapes():
    with pytest.raises(KeyError, match="valid names"):
        adapter_lib.get_adapter({"name": "mlp"})
    with pytest.raises(errors.ConfigError, match="num_heads"):
        adapter_lib.get_adapter({"name": "linear", "num_heads": 2})
    inca = adapter_lib.get_adapter({"name": "cross_attention", "num_classes": 4, "num_heads": 3})
    with pytest.raises(errors.ShapeDtypeError, match="divisible"):
        inca.init(jax.random.key(0), jnp.zeros((1, 5, 8)))
    # A feature map [H, W, D] is read as H·W tokens; positions are learnable.
    p = inca.init(jax.random.key(0), jnp.zeros((1, 2, 2, 6)))["params"]
    assert p["positional"].shape == (4, 6) and p["queries"].shape == (1, 6)


# ------------------------------------------------------------------------------------------------ ensembles


def test_ensemble_rules():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
    for rule in ("softmax_mean", "logit_mean", "vote"):
        np.testing.assert_allclose(ensemble.combine(logits, rule).sum(-1), 1.0, rtol=1e-6)
    votes = np.zeros((6, 5))
    for i in range(4):
        votes[np.arange(6), np.argmax(np.asarray(logits[i]), -1)] += 0.25
    np.testing.assert_allclose(ensemble.combine(logits, "vote"), votes, rtol=1e-6)
    np.testing.assert_allclose(ensemble.combine(logits, "proportional", weights=jnp.ones(4)),
                               ensemble.combine(logits, "softmax_mean"), rtol=1e-6)
    full = jnp.ones((4, 5), bool)
    np.testing.assert_allclose(ensemble.combine(logits, "coverage_aware", coverage=full),
                               ensemble.combine(logits, "softmax_mean"), rtol=1e-6)
    # A node that never saw class 0 gives it nothing; class 0 is averaged over the nodes that cover it only.
    coverage = full.at[0, 0].set(False)
    probs = ensemble.combine(logits, "coverage_aware", coverage=coverage)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    p = jax.nn.softmax(logits, -1)
    p0 = jax.nn.softmax(logits[0, :, 1:], -1)
    per_class = jnp.concatenate([p[1:, :, :1].sum(0) / 3, (p0 + p[1:, :, 1:].sum(0)) / 4], -1)
    np.testing.assert_allclose(probs, per_class / per_class.sum(-1, keepdims=True), rtol=1e-5)
    with pytest.raises(errors.ConfigError, match="valid"):
        ensemble.combine(logits, "median")
    with pytest.raises(errors.ShapeDtypeError, match="coverage"):
        ensemble.combine(logits, "coverage_aware")
