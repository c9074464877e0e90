"""Acceptance tests of the membership statistics and attacks (spec §12 "Statistics" 1-3 and "Attacks" 1-3)."""

import json
import math

import jax
import numpy as np
import pytest
from scipy import special

import jaxforget as jf
from jaxforget import errors, mia

pytestmark = pytest.mark.xdist_group("mia")

SVC_ATTACKS = ("svc_entropy", "svc_features")


def as_list(rec):
    return rec if isinstance(rec, list) else [rec]


def run_all(inputs):
    """Every attack on one model's inputs, as a flat list of records."""
    return [r for fn in mia.ATTACKS.values() for r in as_list(fn(inputs))]


def auc_null_sd(n_pos, n_neg):
    """Standard deviation of a Mann-Whitney AUC under the null (no separation)."""
    return math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))


# ---------------------------------------------------------------------------------------------------------
# Statistics (§12 Statistics 1-3)
# ---------------------------------------------------------------------------------------------------------


def test_statistics_on_hand_values():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    z, y = np.log(p), np.array([0, 2])
    np.testing.assert_allclose(mia.loss(z, y), [-math.log(0.7), -math.log(0.1)], rtol=1e-12)
    np.testing.assert_allclose(mia.confidence(z, y), [0.7, 0.1], rtol=1e-12)
    np.testing.assert_array_equal(mia.correctness(z, y), [1.0, 0.0])
    np.testing.assert_allclose(mia.prob(z, y), p, rtol=1e-12)
    for name in mia.STATISTICS:
        out = mia.statistic(name, z.astype(np.float32), y)
        assert out.dtype == np.float64 and out.shape == ((2, 3) if name == "prob" else (2,)), name
    # Softmax statistics ignore a per-row shift of the logits.
    np.testing.assert_allclose(mia.m_entropy(z + 7.0, y), mia.m_entropy(z, y), rtol=1e-12)
    with pytest.raises(errors.ConfigError, match="logit_conf"):
        mia.statistic("mia", z, y)


def test_logit_conf_is_the_margin_and_stays_finite():
    rng = np.random.default_rng(0)
    z = 3.0 * rng.normal(size=(64, 10))
    y = rng.integers(0, 10, 64)
    p = special.softmax(z, axis=1)[np.arange(64), y]
    phi = mia.logit_conf(z, y)
    np.testing.assert_allclose(phi, np.log(p) - np.log1p(-p), rtol=1e-9)
    np.testing.assert_allclose(phi, mia.margin(z, y), rtol=1e-9)
    # float32 logits: the exponential in float32 (LiRA parity) moves φ by ~1e-6 only.
    np.testing.assert_allclose(mia.logit_conf(z.astype(np.float32), y), phi, atol=1e-5)

    big = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], np.float32)
    phi_big = mia.logit_conf(big, np.array([0, 0]))
    assert np.isfinite(phi_big).all() and np.abs(phi_big).max() <= 103.7
    np.testing.assert_allclose(phi_big, [103.6, -103.6], atol=0.05)
    np.testing.assert_allclose(mia.margin(big, np.array([0, 0])), [1e4, -2e4], rtol=1e-12)  # unfloored


def test_m_entropy_values_and_batch_invariance():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    y = np.array([0, 1])
    np.testing.assert_allclose(mia.m_entropy(np.log(p), y), [0.16217, 0.06570], atol=1e-5)
    assert mia.m_entropy(np.zeros((1, 10)), np.array([3]))[0] == pytest.approx(2.16715, abs=1e-5)
    assert mia.m_entropy(np.array([[1000.0, 0.0, 0.0]]), np.array([0]))[0] == 0.0  # one-hot correct
    # Confidently wrong: 1 − p_j must not cancel to 0 (floored to 1e-30, which would give ~119 instead of 100).
    assert mia.m_entropy(np.array([[0.0, 50.0]]), np.array([0]))[0] == pytest.approx(100.0, rel=1e-9)

    rng = np.random.default_rng(1)
    z = np.concatenate([np.log(p), rng.normal(size=(30, 3))])
    labels = np.concatenate([y, rng.integers(0, 3, 30)])
    batch = mia.m_entropy(z, labels)
    alone = np.array([mia.m_entropy(z[i : i + 1], labels[i : i + 1])[0] for i in range(len(z))])
    np.testing.assert_allclose(batch, alone, rtol=1e-14)

    def salun_m_entropy(prob, labels):  # Unlearn-Saliency evaluation/SVC_MIA.py, ported (§11.2)
        log_prob = np.log(np.maximum(prob, 1e-30))
        modified_probs, modified_log_probs = prob.copy(), log_prob.copy()  # the "reverse" log is log p
        modified_probs[:, labels] = (1 - prob)[:, labels]  # whole columns, not one entry per row
        modified_log_probs[:, labels] = log_prob[:, labels]
        return -np.sum(modified_probs * modified_log_probs, axis=-1)

    # The same batch-invariance check catches the peer bug: 1.6248 in the batch vs 0.6591 alone.
    assert salun_m_entropy(p, y)[0] == pytest.approx(1.6248, abs=1e-4)
    assert salun_m_entropy(p[:1], y[:1])[0] == pytest.approx(0.6591, abs=1e-4)


def test_entropy_uniform_and_one_hot():
    for k in (2, 10, 100):
        assert mia.entropy(np.zeros((1, k)))[0] == pytest.approx(math.log(k), rel=1e-12)
    assert mia.entropy(np.array([[0.0, 1000.0, 0.0]]))[0] == 0.0


def test_statistics_reject_bad_inputs():
    z, y = np.zeros((3, 4)), np.array([0, 1, 2])
    with pytest.raises(errors.ShapeDtypeError, match="2-D"):
        mia.loss(np.zeros(4), y)
    with pytest.raises(errors.ShapeDtypeError, match="length 3"):
        mia.loss(z, y[:2])
    with pytest.raises(errors.ShapeDtypeError, match="integer"):
        mia.loss(z, y.astype(np.float32))
    with pytest.raises(errors.ShapeDtypeError, match=r"\[0, 4\)"):
        mia.loss(z, np.array([0, 4, 1]))
    with pytest.raises(errors.ShapeDtypeError, match="2 classes"):
        mia.loss(np.zeros((3, 1)), y * 0)
    bad = z.copy()
    bad[1, 2] = np.nan
    with pytest.raises(errors.NonFiniteError, match="logits"):
        mia.m_entropy(bad, y)
    bad[1, 2] = np.inf
    with pytest.raises(errors.NonFiniteError):
        mia.SplitLogits(bad, y, np.arange(3))


# ---------------------------------------------------------------------------------------------------------
# A model vs itself retrained gives chance (§12 Attacks 1), on real digits logits
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """Trained once per module: a retrain model (on D_r), an original (on D) and a memorising model."""
    splits = jf.data.make_splits(jf.data.load_digits(), seed=0)
    train, test = splits.train, splits.test
    rng = np.random.default_rng(0)
    forget = train.subset(rng.choice(train.ids, 200, replace=False))
    retain = train.subset(np.setdiff1d(train.ids, forget.ids))

    def fit(model, x, y, epochs, seed=0, batch_size=64):
        variables = jf.models.init_variables(model, jax.random.key(seed), train.image_shape)
        variables, _ = jf.train.train_classifier(
            model, variables, x, y, epochs=epochs, batch_size=batch_size, learning_rate=0.1, seed=seed
        )
        return jax.jit(lambda xs: model.apply(variables, xs, train=False))

    def inputs(apply, **sets):
        return {name: mia.SplitLogits.from_dataset(np.asarray(apply(ds.x)), ds) for name, ds in sets.items()}

    mlp = jf.models.MLP(hidden=(32,))
    retrain = fit(mlp, retain.x, retain.y, epochs=20)
    original = fit(mlp, train.x, train.y, epochs=20)
    # Memorisation: 150 training images with random labels, fitted to zero loss. Its members have near-zero
    # loss and test images a large one, so every attack must see membership clearly.
    small = train.subset(rng.choice(train.ids, 150, replace=False))
    noisy = rng.integers(0, 10, len(small)).astype(np.int32)
    memo = fit(jf.models.MLP(hidden=(64,)), small.x, noisy, epochs=150, batch_size=32)
    memorised = {
        "forget": mia.SplitLogits(np.asarray(memo(small.x)), noisy, small.ids),
        "test": mia.SplitLogits.from_dataset(np.asarray(memo(test.x)), test),
    }
    return {
        "sets": {"forget": forget, "retain": retain, "test": test},
        "retrain": inputs(retrain, forget=forget, retain=retain, test=test),
        "original": inputs(original, forget=forget, retain=retain, test=test),
        "memorised": memorised,
    }


def test_self_retrained_model_gives_chance(digits):
    r = digits["retrain"]
    models = {"unlearned": r, "retrain": r, "original": digits["original"]}
    n_f, n_t = len(r["forget"]), len(r["test"])
    assert n_f >= 150
    records = {}
    for name, fn in mia.ATTACKS.items():
        for rec in as_list(mia.attack_all_models(fn, models)):
            assert rec["value"] - rec["value_retrain"] == 0.0 and rec["gap"] == 0.0, (name, rec["statistic"])
            assert np.isfinite(rec["value_original"]) and rec["results_original"] is not None
            assert rec["attack"] == name and rec["convention"] and rec["criterion"] == "closest_to_retrain"
            assert len(rec["targets"]["ids_sha256_16"]) == 16
            json.dumps(rec)  # the record goes into report.json as is
            records[name, rec["statistic"]] = rec

    lr = records["lr_loss_cv", "loss"]
    n_fold = lr["cv"]["n_heldout_per_fold"]
    assert n_fold == math.ceil(0.1 * 2 * min(n_f, n_t))
    assert abs(lr["value"] - 0.5) <= 4 * math.sqrt(0.25 / n_fold)
    assert lr["members"]["n"] == lr["nonmembers"]["n"] == min(n_f, n_t)

    lira = records["lira_conf", "logit_conf"]
    assert abs(lira["value"] - 0.5) <= 4 * auc_null_sd(n_f, n_t)
    assert set(lira["results"]["tpr_at_fpr"]) == {"0.01", "0.001"}

    for (name, _), rec in records.items():
        if name in SVC_ATTACKS:
            assert rec["results"]["member_rate"] + rec["results"]["salun_efficacy"] == pytest.approx(1.0, abs=1e-12)
            assert rec["value"] == rec["results"]["member_rate"]


def test_svc_entropy_member_rate_matches_unseen_test_half(digits):
    """The retrain model never saw D_f: its member rate there equals that on unseen test images."""
    r = digits["retrain"]
    half_a, half_b = np.array_split(np.random.default_rng(1).permutation(r["test"].ids), 2)
    shadow = {"retain": r["retain"], "test": r["test"].subset(half_a)}
    on_forget = mia.svc_entropy({**shadow, "forget": r["forget"]})
    on_half_b = mia.svc_entropy({**shadow, "forget": r["test"].subset(half_b)})
    assert on_forget["members"] == on_half_b["members"]  # the very same attack classifier
    r_f, r_b = on_forget["value"], on_half_b["value"]
    n_f, n_b = len(r["forget"]), len(half_b)
    pooled = (r_f * n_f + r_b * n_b) / (n_f + n_b)
    tol = 4 * math.sqrt(pooled * (1 - pooled) * (1 / n_f + 1 / n_b)) + 1e-12
    assert abs(r_f - r_b) <= tol
    assert 0.0 <= on_forget["results"]["attack_heldout_accuracy"] <= 1.0


def test_memorising_model_is_clearly_detected(digits):
    m = digits["memorised"]
    n_f, n_t = len(m["forget"]), len(m["test"])
    lr = mia.lr_loss_cv(m)
    assert lr["value"] > 0.5 + 4 * math.sqrt(0.25 / lr["cv"]["n_heldout_per_fold"])
    lira = mia.lira_conf(m)
    assert lira["value"] > 0.5 + 8 * auc_null_sd(n_f, n_t)


# ---------------------------------------------------------------------------------------------------------
# Synthetic statistics (§12 Attacks 2-3) and bad inputs
# ---------------------------------------------------------------------------------------------------------


def synthetic_split(n, *, member, start, k=10, seed=0):
    """Members: confident and correct; non-members: soft and wrong. Every statistic separates them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = 0.1 * rng.normal(size=(n, k))
    if member:
        z[np.arange(n), y] += 12.0
    else:
        z[np.arange(n), (y + 1) % k] += 1.0
    return mia.SplitLogits(z, y, np.arange(start, start + n))


@pytest.fixture(scope="module")
def separable():
    return {
        "forget": synthetic_split(100, member=True, start=0, seed=1),
        "retain": synthetic_split(400, member=True, start=1000, seed=2),
        "test": synthetic_split(200, member=False, start=5000, seed=3),
    }


def test_separable_statistics_are_detected(separable):
    assert mia.lr_loss_cv(separable)["value"] >= 0.99
    svc_records = [mia.svc_entropy(separable), mia.svc_entropy(separable, balance=False)]
    svc_records += mia.svc_features(separable)
    assert [r["statistic"] for r in svc_records[2:]] == list(mia.SVC_FEATURES)
    for rec in svc_records:
        assert rec["value"] == rec["results"]["member_rate"] == 1.0, rec["statistic"]
        assert rec["results"]["member_rate"] + rec["results"]["salun_efficacy"] == 1.0
        assert rec["classifier"] == "sklearn.svm.SVC"
        assert {"C": 3, "kernel": "rbf", "gamma": "auto"}.items() <= rec["classifier_params"].items()
    assert svc_records[0]["results"]["attack_heldout_accuracy"] == 1.0
    assert svc_records[0]["members"]["n"] == 200 and svc_records[1]["members"]["n"] == 400
    lira = mia.lira_conf(separable)
    assert lira["value"] == 1.0 and lira["results"]["tpr_at_fpr"] == {"0.01": 1.0, "0.001": 1.0}


def test_records_do_not_depend_on_row_order(separable):
    shuffled = {}
    for name, s in separable.items():
        perm = np.random.default_rng(4).permutation(len(s))
        shuffled[name] = mia.SplitLogits(s.logits[perm], s.labels[perm], s.ids[perm])
    for a, b in zip(run_all(separable), run_all(shuffled), strict=True):
        assert a == b


def phi_split(phi, start):
    """A K = 2 split whose logit_conf is exactly ``phi`` (up to rounding)."""
    ids = np.arange(start, start + phi.size)
    return mia.SplitLogits(np.stack([phi, np.zeros_like(phi)], 1), np.zeros(phi.size, int), ids)


def test_lira_tpr_at_low_fpr_interpolates_the_roc():
    # φ = s exactly for K = 2 logits [s, 0] with label 0. Scores: positives {1, 1}, negatives {1, 0}; the ROC
    # is (0, 0) -> (0.5, 1) -> (1, 1), so TPR at FPR f < 0.5 is 2 f.
    rec = mia.lira_conf({"forget": phi_split(np.array([1.0, 1.0]), 0), "test": phi_split(np.array([1.0, 0.0]), 10)})
    assert rec["value"] == pytest.approx(0.75)
    assert rec["results"]["tpr_at_fpr"]["0.01"] == pytest.approx(0.02)
    assert rec["results"]["tpr_at_fpr"]["0.001"] == pytest.approx(0.002)


def test_lira_offline_reference_form():
    rng = np.random.default_rng(0)
    n_f, n_t = 60, 100
    mu = rng.normal(0.0, 3.0, n_f + n_t)

    def model(shift_forget, noise_seed):
        phi = mu + np.random.default_rng(noise_seed).normal(size=mu.size)
        phi[:n_f] += shift_forget
        return {"forget": phi_split(phi[:n_f], 0), "test": phi_split(phi[n_f:], 1000)}

    oracles = [model(0.0, 100 + k) for k in range(9)]
    member_like = mia.lira_conf(model(5.0, 7), oracles=oracles, seed=3)
    assert member_like["form"] == "offline_reference" and member_like["value"] > 0.99
    assert member_like["nonmembers"]["n"] == n_f and member_like["reference"]["n_oracles"] == 9
    # The retrain reference: a held-out oracle as the target is left out of the fit, and gives chance.
    held_out = mia.lira_conf(oracles[0], oracles=oracles, seed=3)
    assert held_out["results"]["excluded_oracles"] == [0] and held_out["reference"]["n_oracles"] == 8
    assert abs(held_out["value"] - 0.5) <= 4 * auc_null_sd(n_f, n_f)
    # Single-model form on the same data has only the per-example spread of μ to go on.
    assert mia.lira_conf(model(5.0, 7))["form"] == "single_model"

    with pytest.raises(mia.AttackInputError, match="at least 8"):
        mia.lira_conf(model(5.0, 7), oracles=oracles[:7])
    with pytest.raises(mia.AttackInputError, match="at least 8"):
        mia.lira_conf(oracles[0], oracles=oracles[:8])  # 7 left after leaving the target out
    other = dict(oracles[3], test=phi_split(mu[n_f:], 2000))
    with pytest.raises(mia.AttackInputError, match=r"oracle 3 split 'test'"):
        mia.lira_conf(model(5.0, 7), oracles=[*oracles[:3], other, *oracles[4:]])


def test_attacks_reject_bad_inputs(separable):
    few = {"forget": synthetic_split(5, member=True, start=0), "test": separable["test"]}
    with pytest.raises(mia.AttackInputError, match="forget = 5") as info:
        mia.lr_loss_cv(few)
    assert isinstance(info.value, ValueError) and "test = 200" in str(info.value)
    with pytest.raises(mia.AttackInputError, match="missing \\['retain'\\]"):
        mia.svc_entropy({"forget": separable["forget"], "test": separable["test"]})
    overlap = dict(separable, test=synthetic_split(200, member=False, start=50))
    with pytest.raises(mia.AttackInputError, match="'forget' and 'test' share 50"):
        mia.lira_conf(overlap)
    with pytest.raises(errors.ConfigError, match="features"):
        mia.svc_features(separable, features=("confidence", "loss"))

    # Logits and labels (or ids) of different lengths, and duplicate ids.
    s = separable["forget"]
    with pytest.raises(errors.ShapeDtypeError, match="length 100"):
        mia.SplitLogits(s.logits, s.labels[:-1], s.ids)
    with pytest.raises(errors.ShapeDtypeError, match="ids must be"):
        mia.SplitLogits(s.logits, s.labels, s.ids[:-1])
    with pytest.raises(mia.AttackInputError, match="Duplicate"):
        mia.SplitLogits(s.logits[:2], s.labels[:2], np.array([3, 3]))

    # The three models must cover the same samples, split by split.
    models = {"unlearned": separable, "retrain": separable, "original": separable}
    shifted = dict(separable, retain=synthetic_split(400, member=True, start=1001, seed=2))
    with pytest.raises(mia.AttackInputError, match="Split 'retain' has different samples"):
        mia.attack_all_models(mia.svc_entropy, {**models, "retrain": shifted})
    relabelled = dict(separable, test=mia.SplitLogits(separable["test"].logits, (separable["test"].labels + 1) % 10,
                                                      separable["test"].ids))
    with pytest.raises(mia.AttackInputError, match="Split 'test' has different labels"):
        mia.attack_all_models(mia.lr_loss_cv, {**models, "original": relabelled})
    with pytest.raises(mia.AttackInputError, match="original"):
        mia.attack_all_models(mia.lr_loss_cv, {"unlearned": separable, "retrain": separable})
