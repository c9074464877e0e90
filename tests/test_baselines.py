"""The general-network baselines on the contract: the retrain is the recipe on D_r (exactly the recipe on the
physically reduced data), ``retrain`` as a method equals its own gold standard, and each baseline does what its
name says: fine-tuning lowers the retained loss, NegGrad raises the forget loss, random labels move D_f."""

import chex
import jax
import ml_collections
import numpy as np
import pytest
from helpers import tiny_forget_job

from jaxforget import data, errors, methods, models, train
from jaxforget.methods import baselines

pytestmark = pytest.mark.xdist_group("baselines")


def build(name, **overrides):
    job = tiny_forget_job(name)
    for key, value in overrides.items():
        job.method[key] = value
    return methods.build(job)


@pytest.fixture(scope="module")
def original():
    method = build("retrain")
    return method.init(jax.random.key(0))


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                                            strict=True))


def test_training_on_masked_rows_equals_training_on_the_reduced_data():
    ds = data.synthetic(200, image_shape=(4, 4, 1), num_classes=3, seed=0)
    model = models.MLP(hidden=(8,), num_classes=3)
    v = models.init_variables(model, jax.random.key(1), ds.x.shape[1:])
    rows = np.setdiff1d(np.arange(200), [3, 50, 51, 120])
    kw = dict(epochs=2, batch_size=16, learning_rate=0.1, momentum=0.9, weight_decay=1e-3, seed=5)
    masked, _ = train.train_classifier(model, v, ds.x, ds.y, rows=rows, **kw)
    reduced, _ = train.train_classifier(model, v, ds.x[rows], ds.y[rows], **kw)
    for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(reduced), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same batches, the same updates


def test_one_compiled_epoch_serves_every_retained_set():
    """Plans over different row sets keep one shape: the epoch traces once (chex.assert_max_traces)."""
    ds = data.synthetic(120, image_shape=(4, 4, 1), num_classes=3, seed=0)
    model = models.MLP(hidden=(8,), num_classes=3)
    v = models.init_variables(model, jax.random.key(1), ds.x.shape[1:])
    epoch = jax.jit(chex.assert_max_traces(train._classifier_epoch(model), n=1))
    opt = train.init_optimizer(v["params"], momentum=0.9)
    lr, total, count = train.scalar(0.1, np.float32), train.scalar(10, np.float32), train.scalar(0, np.int32)
    for rows in (np.arange(120), np.arange(7, 120), np.arange(0, 120, 2)):
        plan = tuple(jax.device_put(a) for a in train.epoch_plan(rows, 16, seed=0, epoch=0, num_steps=120 // 16))
        epoch(v, opt, count, jax.device_put(ds.x), jax.device_put(ds.y), plan, lr, total)


def test_weighted_cross_entropy_is_the_neggrad_plus_objective():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 4, 6)
    alpha = 0.3
    w = np.array([alpha / 4] * 4 + [-(1 - alpha) / 2] * 2, np.float32)
    expected = alpha * train.cross_entropy(logits[:4], labels[:4]) - (1 - alpha) * train.cross_entropy(logits[4:],
                                                                                                        labels[4:])
    np.testing.assert_allclose(float(train.cross_entropy(logits, labels, w)), float(expected), rtol=1e-6)


def test_retrain_as_a_method_is_exactly_its_gold_standard(original):
    method = build("retrain")
    ids = method.forgettable_ids()[:6]
    forgotten, info = method.forget(original, ids)
    assert info.solver == "retrain" and info.num_forgotten == 6 and info.passes > 0
    assert leaves_equal(forgotten.variables, method.retrain(forgotten).variables)
    assert not leaves_equal(forgotten.variables, original.variables)


def test_a_request_without_a_key_is_reproducible_and_a_key_changes_it(original):
    method = build("finetune")
    ids = method.forgettable_ids()[:6]
    a, _ = method.forget(original, ids)
    b, _ = method.forget(original, ids)
    c, _ = method.forget(original, ids, key=jax.random.key(7))
    assert leaves_equal(a.variables, b.variables) and not leaves_equal(a.variables, c.variables)


def test_finetune_lowers_the_retained_loss_and_neggrad_raises_the_forget_loss(original):
    ft, ng = build("finetune", epochs=2), build("neggrad", epochs=3, learning_rate=0.05)
    ids = ft.forgettable_ids()[:20]
    train_set = ft.splits.train
    forget_set = train_set.subset(ids)
    retain_set = train_set.subset(np.setdiff1d(train_set.ids, ids))
    tuned, info = ft.forget(original, ids)
    assert info.iterations == 2 * (len(retain_set) // 64)
    assert ft.mean_loss(tuned, retain_set.x, retain_set.y) < ft.mean_loss(original, retain_set.x, retain_set.y)
    ascended, _ = ng.forget(original, ids)
    assert ng.mean_loss(ascended, forget_set.x, forget_set.y) > ng.mean_loss(original, forget_set.x, forget_set.y)
    plus = build("neggrad", epochs=3, learning_rate=0.05, retain_weight=0.9)
    kept, info = plus.forget(original, ids)
    assert info.notes["retain_weight"] == 0.9
    assert plus.mean_loss(kept, retain_set.x, retain_set.y) < ng.mean_loss(ascended, retain_set.x, retain_set.y)


def test_random_labels_move_the_forget_set_and_say_whether_they_read_retained_data(original):
    rl = build("random_label", epochs=5, learning_rate=0.05, use_retain=False)
    assert rl.uses_retained_data is False and build("random_label").uses_retained_data is True
    ids = rl.forgettable_ids()[:20]
    forget_set = rl.splits.train.subset(ids)
    moved, _ = rl.forget(original, ids)
    before = np.mean(np.argmax(np.asarray(rl.predict(original, forget_set.x)), 1) == forget_set.y)
    after = np.mean(np.argmax(np.asarray(rl.predict(moved, forget_set.x)), 1) == forget_set.y)
    assert after < before


def test_populations_equal_one_by_one_training(original):
    method = build("retrain")
    keys = [jax.random.key(3), jax.random.key(4)]
    together = method.init_population(keys)
    for key, state in zip(keys, together, strict=True):
        alone = method.init(key)
        for a, b in zip(jax.tree.leaves(state.variables), jax.tree.leaves(alone.variables), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_bad_configs_and_foreign_states_are_refused(original):
    with pytest.raises(errors.ConfigError, match="method.learning_rate must be >= 0"):
        build("finetune", learning_rate=-1.0)
    with pytest.raises(errors.ConfigError, match="method.retain_weight must be <= 1"):
        build("neggrad", retain_weight=1.5)
    job = tiny_forget_job("finetune")
    job.method.epochz = 3
    with pytest.raises(errors.ConfigError, match=r"unknown config field\(s\) \['epochz'\]"):
        methods.build(job)
    other = methods.build(tiny_forget_job("finetune", data=ml_collections.ConfigDict(
        {**tiny_forget_job("finetune").data.to_dict(), "n": 300})))
    with pytest.raises(errors.ShapeDtypeError, match="another dataset or split"):
        other.forget(original, other.forgettable_ids()[:2])
    assert isinstance(original, baselines.ClassifierState)
