"""Readouts against the retrain oracle: distances, accuracy gaps, efficiency and relearn time.

Acceptance tests of ``specs/evaluation.md`` §12 ("Distances, KL, relearn, efficiency, cache" 1, 4, 5) and
the bad-input contract (named shapes, named non-finite arrays).
"""

import numpy as np
import pytest

from jaxforget import errors, evaluate


def _logits(seed, n=64, k=10, scale=3.0):
    return np.random.default_rng(seed).normal(size=(n, k)).astype(np.float32) * scale


# -------------------------------------------------------------------------- distances (§4)


def test_activation_distance_is_zero_for_a_model_against_itself():
    z = _logits(0)
    assert evaluate.activation_distance(z, z) == 0.0


def test_activation_distance_is_symmetric_and_in_0_2():
    for seed in range(5):
        a, b = _logits(seed, scale=10.0 * seed + 0.1), _logits(seed + 100, scale=10.0 * seed + 0.1)
        d = evaluate.activation_distance(a, b)
        assert d == evaluate.activation_distance(b, a)  # exactly: |p − q| = |q − p| in IEEE arithmetic
        assert 0.0 <= d <= 2.0
    # Disjoint one-hot predictions reach the upper bound.
    a = np.array([[100.0, -100.0]] * 3)
    assert evaluate.activation_distance(a, a[:, ::-1]) == pytest.approx(2.0, abs=1e-12)
    assert evaluate.activation_distance(a, a[:, ::-1]) <= 2.0


def test_logit_distance_ignores_per_example_shifts():
    z = _logits(1).astype(np.float64)
    shift = np.random.default_rng(2).normal(size=(len(z), 1)) * 50.0
    assert evaluate.logit_distance(z + shift, z) == pytest.approx(0.0, abs=1e-12)
    assert evaluate.logit_distance(z, z) == 0.0
    # A non-constant change is seen, and the value is the mean L2 of the centred difference.
    other = _logits(3).astype(np.float64)
    c = lambda x: x - x.mean(axis=1, keepdims=True)
    want = np.mean(np.linalg.norm(c(z) - c(other), axis=1))
    assert evaluate.logit_distance(z, other) == pytest.approx(want, rel=1e-12)
    assert evaluate.logit_distance(other, z) == pytest.approx(want, rel=1e-12)


def test_weight_distance_of_identical_trees_is_zero():
    tree = {"a": np.arange(6.0).reshape(2, 3), "b": [np.ones(4, np.float32)]}
    out = evaluate.weight_distance(tree, tree)
    assert out["l2"] == 0.0 and out["relative"] == 0.0
    assert out["relative_to_original"] is None


def test_weight_distance_relative_to_original():
    r = {"w": np.zeros(3)}
    o = {"w": np.array([4.0, 0.0, 3.0])}  # ‖θ_o − θ_r‖ = 5
    u = {"w": np.array([0.0, 1.0, 0.0])}  # ‖θ_u − θ_r‖ = 1
    out = evaluate.weight_distance(u, r, original=o)
    assert out["l2"] == 1.0
    assert out["relative"] == float("inf")  # ‖θ_r‖ = 0
    assert out["relative_to_original"] == pytest.approx(0.2)
    assert evaluate.weight_distance(o, r, original=o)["relative_to_original"] == 1.0
    # θ_o = θ_r: reaching it is 0, missing it is inf.
    assert evaluate.weight_distance(r, r, original=r)["relative_to_original"] == 0.0
    assert evaluate.weight_distance(u, r, original=r)["relative_to_original"] == float("inf")


def test_weight_distance_is_float64_on_the_host():
    # 1 + 1e-9 is not representable in float32: a float32 computation would give 0.
    a = {"w": np.array([1.0 + 1e-9])}
    b = {"w": np.array([1.0])}
    assert evaluate.weight_distance(a, b)["l2"] == pytest.approx(1e-9, rel=1e-6)


def test_weight_distance_reports_nan_for_a_diverged_model():
    out = evaluate.weight_distance({"w": np.array([np.nan, 1.0])}, {"w": np.ones(2)})
    assert np.isnan(out["l2"]) and np.isnan(out["relative"])


# -------------------------------------------------------------------------- accuracy gaps (§3.1)


def test_accuracy_gaps():
    method = {"forget": 0.5, "retain": 0.9, "test": 0.8, "val": 0.7}
    retrain = {"forget": 0.75, "retain": 1.0, "test": 0.8, "val": 0.8}
    original = {"forget": 1.0, "retain": 1.0, "test": 0.85, "val": 0.8}
    out = evaluate.accuracy_gaps(method, retrain, original)
    assert out["splits"]["forget"]["gap"] == pytest.approx(-0.25)  # over-forgetting is a miss, not a win
    assert out["splits"]["forget"]["abs_gap"] == pytest.approx(0.25)
    assert out["splits"]["retain"]["gap"] == pytest.approx(-0.1)
    assert out["splits"]["test"]["gap"] == 0.0
    assert out["splits"]["forget"]["original"] == 1.0
    # val gets a gap but is not averaged.
    assert out["splits"]["val"]["abs_gap"] == pytest.approx(0.1)
    assert out["avg_abs_gap"] == pytest.approx((0.25 + 0.1 + 0.0) / 3)
    assert evaluate.accuracy_gaps(retrain, retrain)["avg_abs_gap"] == 0.0


def test_accuracy_gaps_bad_inputs():
    full = {"forget": 0.5, "retain": 0.9, "test": 0.8}
    with pytest.raises(errors.ShapeDtypeError, match="different splits"):
        evaluate.accuracy_gaps(full, {"forget": 0.5, "retain": 0.9})
    with pytest.raises(errors.ShapeDtypeError, match="missing"):
        evaluate.accuracy_gaps({"forget": 0.5}, {"forget": 0.5})
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        evaluate.accuracy_gaps({**full, "test": 80.0}, full)


# -------------------------------------------------------------------------- efficiency (§9)


def test_efficiency_line():
    assert evaluate.EFFICIENT_LINE == 0.2
    assert evaluate.is_efficient(0.2)
    assert not evaluate.is_efficient(0.2001)
    assert evaluate.is_efficient(evaluate.time_ratio(2.0, 10.0))
    assert not evaluate.is_efficient(float("nan"))
    assert not evaluate.is_efficient(evaluate.time_ratio(1.0, 0.0))  # no retrain time: inf


# -------------------------------------------------------------------------- relearn time (§5)

TARGET = np.array([1.0, -2.0, 0.5])


def _quadratic_relearn(lr=0.3):
    """A toy "model": state is a vector, one epoch is a gradient step on ½‖w − w*‖², the forget loss too."""

    def train_epoch(w, epoch):
        del epoch
        return w - lr * (w - TARGET)

    def forget_loss(w):
        return 0.5 * float(np.sum((w - TARGET) ** 2))

    return train_epoch, forget_loss


def test_relearn_time_of_the_retrained_model_itself_gives_ratio_one():
    train_epoch, forget_loss = _quadratic_relearn()
    theta_r = np.array([5.0, 5.0, 5.0])
    theta_o = TARGET + 0.01  # the original has seen D_f: relearns at once
    theta_u = theta_r.copy()  # θ_u := θ_r
    rt = {name: evaluate.relearn_time(train_epoch, forget_loss, w, tau=0.1, max_epochs=100)
          for name, w in (("u", theta_u), ("o", theta_o), ("r", theta_r))}
    assert not rt["r"]["censored"] and rt["r"]["epochs"] > 1
    assert rt["o"]["epochs"] == 1  # RT is 1-based: already below τ still costs one epoch
    assert rt["o"]["initial_loss"] <= 0.1
    # The closed form: loss_e = (1 − lr)^(2e) · loss_0.
    loss0 = forget_loss(theta_r)
    want = int(np.ceil(np.log(0.1 / loss0) / (2 * np.log(0.7))))
    assert rt["r"]["epochs"] == want
    assert len(rt["r"]["losses"]) == want and rt["r"]["losses"][-1] <= 0.1 < rt["r"]["losses"][-2]
    summary = evaluate.relearn_summary(rt["u"], rt["o"], rt["r"])
    assert summary["ratio"] == 1.0
    assert summary["rt_retrain"] == rt["r"]["epochs"] and summary["rt_original"] == 1
    assert not summary["ratio_censored"]


def test_relearn_time_passes_the_0_based_epoch_index():
    seen = []

    def train_epoch(w, epoch):
        seen.append(epoch)
        return w

    out = evaluate.relearn_time(train_epoch, lambda w: 1.0, 0, tau=0.5, max_epochs=4)
    assert seen == [0, 1, 2, 3]
    assert out["epochs"] == 5 and out["censored"]


def test_unreachable_tau_is_censored_at_cap_plus_one():
    train_epoch, forget_loss = _quadratic_relearn()
    out = evaluate.relearn_time(train_epoch, forget_loss, np.zeros(3), tau=-1.0, max_epochs=7)
    assert out["censored"] is True
    assert out["epochs"] == 8
    assert len(out["losses"]) == 7
    assert out["tau"] == -1.0 and out["max_epochs"] == 7


def test_relearn_summary_counts_censored_seeds():
    ok = {"epochs": 4, "censored": False}
    cens = {"epochs": 11, "censored": True}
    out = evaluate.relearn_summary([ok, cens, ok], [1, 1, 1], [ok, ok, cens])
    assert out["n"] == 3
    assert out["n_censored"] == {"unlearned": 1, "original": 0, "retrain": 1, "ratio": 2}
    assert [p["ratio"] for p in out["per_seed"]] == [1.0, 11 / 4, 4 / 11]
    assert [p["ratio_censored"] for p in out["per_seed"]] == [False, True, True]
    assert out["mean"]["rt_unlearned"] == pytest.approx(19 / 3)
    assert out["std"]["rt_original"] == 0.0
    single = evaluate.relearn_summary([ok], [ok], [ok])
    assert single["std"]["ratio"] is None and single["n_censored"]["ratio"] == 0
    with pytest.raises(errors.ShapeDtypeError, match="one sequence per model"):
        evaluate.relearn_summary([ok, ok], [ok], [ok, ok])
    with pytest.raises(errors.ShapeDtypeError):
        evaluate.relearn_summary([ok], ok, [ok])


def test_relearn_time_bad_inputs():
    train_epoch, forget_loss = _quadratic_relearn()
    with pytest.raises(ValueError, match="max_epochs"):
        evaluate.relearn_time(train_epoch, forget_loss, np.zeros(3), tau=0.1, max_epochs=0)
    with pytest.raises(ValueError, match="tau"):
        evaluate.relearn_time(train_epoch, forget_loss, np.zeros(3), tau=float("nan"))
    with pytest.raises(errors.NonFiniteError, match="after epoch 2"):
        evaluate.relearn_time(lambda w, e: w + 1, lambda w: 1.0 if w < 2 else float("nan"), 0, tau=0.1)


def test_relearn_set_resample():
    retain, forget = np.arange(10, 1000), np.arange(10)
    ids = evaluate.relearn_set(retain, forget, mode="resample", size=500, seed=3)
    assert ids.shape == (500,) and ids.dtype == np.int64
    assert len(np.unique(ids)) < 500  # with replacement (birthday bound: repeats are certain here)
    assert np.isin(ids, np.arange(1000)).all()
    # Fixed seed; independent of the input order.
    again = evaluate.relearn_set(retain[::-1], forget[::-1], mode="resample", size=500, seed=3)
    np.testing.assert_array_equal(ids, again)
    assert not np.array_equal(ids, evaluate.relearn_set(retain, forget, mode="resample", size=500, seed=4))


def test_relearn_set_forget_plus_retain():
    retain, forget = np.arange(10, 1000), np.array([7, 3, 5])
    ids = evaluate.relearn_set(retain, forget, mode="forget_plus_retain", size=50, seed=0)
    assert ids.shape == (50,)
    np.testing.assert_array_equal(ids[:3], [3, 5, 7])
    assert len(np.unique(ids)) == 50 and np.isin(ids[3:], retain).all()
    np.testing.assert_array_equal(ids, evaluate.relearn_set(retain, forget, mode="forget_plus_retain", size=50))


def test_relearn_set_bad_inputs():
    retain, forget = np.arange(10, 20), np.arange(5)
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate.relearn_set(retain, forget, mode="bogus")
    with pytest.raises(ValueError, match="size must be"):
        evaluate.relearn_set(retain, forget, size=0)
    with pytest.raises(ValueError, match=r"\|D_f\| = 5 <= size"):
        evaluate.relearn_set(retain, forget, mode="forget_plus_retain", size=4)
    with pytest.raises(ValueError, match=r"\|D_f\| = 15, got size = 16"):
        evaluate.relearn_set(retain, forget, mode="forget_plus_retain", size=16)
    with pytest.raises(ValueError, match="both the retain and forget"):
        evaluate.relearn_set(np.arange(10), forget)
    with pytest.raises(ValueError, match="both empty"):
        evaluate.relearn_set([], [])
    with pytest.raises(errors.ShapeDtypeError, match="integer"):
        evaluate.relearn_set(retain.astype(float), forget)


# -------------------------------------------------------------------------- bad inputs


def test_mismatched_shapes_name_both_shapes():
    a, b = np.zeros((4, 3)), np.zeros((5, 3))
    for fn in (evaluate.activation_distance, evaluate.logit_distance):
        with pytest.raises(errors.ShapeDtypeError, match=r"\(4, 3\).*\(5, 3\)"):
            fn(a, b)
    with pytest.raises(errors.ShapeDtypeError, match=r"\(4, 3\).*\(5,\)"):
        evaluate.accuracy(a, np.zeros(5, int))
    with pytest.raises(errors.ShapeDtypeError, match=r"\(2, 3\).*\(3, 2\)"):
        evaluate.weight_distance({"w": np.zeros((2, 3))}, {"w": np.zeros((3, 2))})
    with pytest.raises(errors.ShapeDtypeError, match=r"\['forget', 'test'\].*\['test'\]"):
        evaluate.compare({"forget": a, "test": a}, {"test": a}, {"forget": np.zeros(4), "test": np.zeros(4)})


def test_nan_logits_raise():
    z = _logits(0)
    bad = z.copy()
    bad[3, 2] = np.nan
    for fn in (evaluate.activation_distance, evaluate.logit_distance):
        with pytest.raises(errors.NonFiniteError, match="logits"):
            fn(bad, z)
        with pytest.raises(errors.NonFiniteError, match="reference logits"):
            fn(z, bad)


def test_empty_sets_give_nan():
    empty = np.zeros((0, 3))
    assert np.isnan(evaluate.activation_distance(empty, empty))
    assert np.isnan(evaluate.logit_distance(empty, empty))
    assert np.isnan(evaluate.accuracy(empty, np.zeros(0, int)))
