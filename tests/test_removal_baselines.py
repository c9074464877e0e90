"""The removal baselines on the contract (spec ssse.md §9–§11): certified removal (Guo et al.) against an independent
NumPy Newton step and against SSSE with the exact Hessian, its residual bound and objective perturbation; Fisher
forgetting (Golatkar et al.) against a loop of per-example gradients and its noise formula; the recipe's full-batch
solver; bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxforget import compat, data, errors, kernels, mesh, models, train
from jaxforget.methods import base, baselines, ssse
from jaxforget.methods.baselines import fisher_forgetting

pytestmark = pytest.mark.xdist_group("removal")

WEIGHT_DECAY = 1e-3  # the sum-form λ of spec §13 (mean-form coupled L2)
CLASSES = 4
LINEAR = models.MLP(hidden=(), num_classes=CLASSES, input_mean=0.0, input_std=1.0)  # pixels in [0, 1], as in §13
HIDDEN = models.MLP(hidden=(8,), num_classes=CLASSES)


def flat(tree):
    """Host float64 ravel in ``ravel_pytree`` order (outside ``enable_x64`` too: no device concatenation)."""
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def splits():
    """160 training images of 4×4 pixels in 4 classes: a linear classifier has P = 68 parameters."""
    return data.make_splits(data.synthetic(200, image_shape=(4, 4, 1), num_classes=CLASSES, seed=0), seed=0)


def removal_config(**fields):
    cfg = baselines.CertifiedRemoval.default_config()
    cfg.train.weight_decay = WEIGHT_DECAY
    for name, value in fields.items():
        cfg[name] = value
    return cfg


def train64(model, splits, rows, seed=0, tol=1e-11):
    """The float64 minimiser of the recipe's objective on ``rows`` (the exact gold standard of a convex model)."""
    variables = models.init_variables(model, jax.random.key(seed), splits.train.x.shape[1:])
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    out, info = train.train_full_batch(model, variables, splits.train.x, splits.train.y, rows=rows,
                                       weight_decay=WEIGHT_DECAY, solver="newton", tol=tol, max_iter=50)
    assert info.converged, info
    return out


@pytest.fixture(scope="module")
def stationary(splits):
    """A certified-removal method and a float64 state trained to ‖∇L_D‖ ≤ 1e-11 (spec §11.7)."""
    with compat.enable_x64():
        m = baselines.CertifiedRemoval(LINEAR, splits, removal_config(), mesh=mesh.make_mesh(1))
        variables = train64(LINEAR, splits, np.arange(m.num_train))
        state = baselines.CertifiedRemovalState(variables, m.empty_ledger(), jax.random.key_data(jax.random.key(0)),
                                                jnp.zeros((), jnp.float32))
    return m, state


def numpy_newton_step(splits, params, erased, retained, wd):
    """Guo et al.'s removal step in NumPy for the linear softmax classifier: ``w + H⁻¹Δ`` with
    ``H = Σ_{D_r} x̃x̃ᵀ ⊗ (diag p − ppᵀ) + λ n_r I`` and ``Δ = Σ_S (x̃ (p − e_y)ᵀ + λ W)``, over ``W = [kernel; bias]``
    ``[(D+1), K]`` vectorised row-major; returned in ``ravel_pytree`` order (bias, then kernel)."""
    x = np.asarray(splits.train.x, np.float64).reshape(len(splits.train.x), -1)
    feats = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    y = np.asarray(splits.train.y)
    w = np.concatenate([np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"])[None]], axis=0)
    k = w.shape[1]

    def probs(rows):
        z = feats[rows] @ w
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    delta = sum(np.outer(feats[i], p - np.eye(k)[y[i]]) for i, p in zip(erased, probs(erased), strict=True))
    delta = (delta + len(erased) * wd * w).reshape(-1)
    hess = sum(np.kron(np.outer(feats[i], feats[i]), np.diag(p) - np.outer(p, p))
               for i, p in zip(retained, probs(retained), strict=True))
    hess = hess + wd * len(retained) * np.eye(len(delta))
    new = w + np.linalg.solve(hess, delta).reshape(w.shape)
    return np.concatenate([new[-1], new[:-1].reshape(-1)])


def test_certified_removal_is_the_newton_step_and_ssse_with_the_exact_hessian_equals_it(splits, stationary):
    """Spec §11.7: on a stationary L2-logistic model (float64) the method equals an independent NumPy Newton step
    (rel. ≤ 1e-8 of the step), and so does SSSE with the exact Hessian, ε = 1 and no damping; the measured residual
    gradient lies under the data-dependent bound."""
    m, state = stationary
    ids = m.forgettable_ids()[[2, 30, 31, 77, 150]]
    erased = np.searchsorted(m.train_ids, ids)
    retained = np.setdiff1d(np.arange(m.num_train), erased)
    w0 = flat(state.variables["params"])
    expected = numpy_newton_step(splits, state.variables["params"], erased, retained, WEIGHT_DECAY)
    with compat.enable_x64():
        assert m.stationarity(state) <= 1e-10
        after, info = m.forget(state, ids)
        s_cfg = ssse.default_config()
        s_cfg.update(dict(curvature="hessian", structure="dense", epsilon=1.0, damping=0.0))
        s_cfg.train.weight_decay = WEIGHT_DECAY
        s_method = ssse.Ssse(LINEAR, splits, s_cfg, mesh=mesh.make_mesh(1))
        s_state = ssse.SsseState(state.variables, s_method.empty_ledger(), state.key,
                                 s_method.build_curvature(state.variables, np.arange(m.num_train)))
        s_after, _ = s_method.forget(s_state, ids)
    got = flat(after.variables["params"])
    assert after.variables["params"]["head"]["kernel"].dtype == jnp.float64
    assert np.linalg.norm(got - expected) <= 1e-8 * np.linalg.norm(expected - w0)
    assert np.linalg.norm(flat(s_after.variables["params"]) - got) <= 1e-8 * np.linalg.norm(got - w0)
    notes = info.notes
    assert info.solver == "newton-removal" and info.num_forgotten == 5 and not notes["certified"]
    assert 0 < notes["gradient_residual"] <= notes["gradient_bound"] == notes["gradient_bound_total"]
    assert info.residual == pytest.approx(notes["gradient_bound"] / notes["removed_gradient_norm"])
    assert float(after.gradient_bound) == pytest.approx(notes["gradient_bound"], rel=1e-6)
    # ‖X̃_r‖₂ of the pixel features with a bias column, as NumPy computes it.
    x = np.asarray(splits.train.x, np.float64).reshape(m.num_train, -1)[retained]
    feats = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    assert notes["feature_norm"] == pytest.approx(np.linalg.norm(feats, 2), rel=1e-6)


def test_the_unrecovered_fraction_is_small_and_shrinks_with_k(splits, stationary):
    """‖ŵ − w_r*‖ / ‖w* − w_r*‖ against the exact float64 retrain: ≤ 0.1 at k = 1, smaller at k = 1 than at k = 10
    (the step's error is second order in the removed influence); sequential requests recompute at the current
    weights and accumulate the bound."""
    m, state = stationary
    ids = m.forgettable_ids()
    w0 = flat(state.variables["params"])
    fractions = {}
    with compat.enable_x64():
        for k in (1, 10):
            after, _ = m.forget(state, ids[40:40 + k])
            retrain = flat(train64(LINEAR, splits, m.retained_positions(after))["params"])
            fractions[k] = np.linalg.norm(flat(after.variables["params"]) - retrain) / np.linalg.norm(w0 - retrain)
        one, first = m.forget(state, ids[:3])
        two, second = m.forget(one, ids[3:6])
    assert fractions[1] <= 0.1 and fractions[1] < fractions[10] < 1
    assert second.request == 2 and second.num_retained == m.num_train - 6
    assert second.notes["gradient_bound_total"] == pytest.approx(
        first.notes["gradient_bound"] + second.notes["gradient_bound"], rel=1e-6)


def test_objective_perturbation_is_shared_by_the_retrain_and_the_request_is_deterministic(splits):
    """σ > 0: the perturbation comes from the state's key, so the retrain of an untouched state is the original
    bit for bit and differs from the unperturbed model; the request itself draws nothing (any key, same result);
    the certificate's ε follows Guo et al.'s Theorem 3; a population is the loop of its members."""
    m = baselines.CertifiedRemoval(LINEAR, splits, removal_config(sigma=1.0), mesh=mesh.make_mesh(1))
    plain = baselines.CertifiedRemoval(LINEAR, splits, removal_config(), mesh=mesh.make_mesh(1))
    key = jax.random.key(3)
    state = m.init(key)
    assert m.describe(state)["stationarity"] <= m.config.train.tol
    for a, b in zip(jax.tree.leaves(m.retrain(state).variables), jax.tree.leaves(state.variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.linalg.norm(flat(plain.init(key).variables) - flat(state.variables)) > 1e-3
    assert m.retrain_key() != plain.retrain_key()  # the perturbation makes another gold standard
    ids = m.forgettable_ids()[:4]
    keys = jax.random.key(1), jax.random.key(2)
    with jax.transfer_guard_host_to_device("disallow"):  # as the workflow runs requests
        one, info = m.forget(state, ids, key=keys[0])
        other, _ = m.forget(state, ids, key=keys[1])
    for a, b in zip(jax.tree.leaves(one.variables), jax.tree.leaves(other.variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    notes = info.notes
    assert notes["certified"] and notes["delta"] == m.config.delta
    assert notes["epsilon"] == pytest.approx(np.sqrt(2 * np.log(1.5 / m.config.delta)) * notes["gradient_bound_total"]
                                             / m.config.sigma)
    assert notes["gradient_residual"] <= notes["gradient_bound"]  # measured on the perturbed retained objective
    population = m.init_population([key, jax.random.key(4)])
    np.testing.assert_array_equal(flat(population[0].variables), flat(state.variables))


def test_the_full_batch_solver_reaches_its_tolerance_and_sgd_is_the_old_recipe(splits):
    x, y = splits.train.x, splits.train.y
    model = LINEAR
    variables = models.init_variables(model, jax.random.key(0), x.shape[1:])
    rows = np.arange(0, len(x), 2)
    b = jax.tree.map(lambda a: jnp.full_like(a, 0.3), variables["params"])
    for solver, tol in (("newton", 1e-6), ("lbfgs", 1e-5)):
        out, info = train.train_full_batch(model, variables, x, y, rows=rows, weight_decay=1e-2, solver=solver,
                                           tol=tol, max_iter=300, linear=b, mesh=mesh.make_mesh(1))

        def objective(p):
            logits = model.apply({"params": p}, jnp.asarray(x[rows]), train=False)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y[rows])).mean()
            return ce + 0.5e-2 * optax.tree.norm(p, squared=True) + optax.tree.vdot(b, p) / len(rows)

        grad_norm = float(optax.tree.norm(jax.grad(objective)(out["params"])))
        assert info.converged and info.iterations > 0 and grad_norm <= 2 * tol, (solver, info, grad_norm)
    _, info = train.train_full_batch(model, variables, x, y, weight_decay=1e-2, tol=1e-12, max_iter=1,
                                     mesh=mesh.make_mesh(1))
    assert not info.converged and info.iterations == 1
    with compat.enable_x64():  # L-BFGS in float64 (optax's memory index under strict promotion)
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        out, info = train.train_full_batch(model, v64, x, y, rows=rows, weight_decay=1e-2, solver="lbfgs", tol=1e-10,
                                           max_iter=500, mesh=mesh.make_mesh(1))
        assert info.converged and out["params"]["head"]["kernel"].dtype == jnp.float64
    # The default recipe ("sgd") is train.train_classifier, bit for bit, and its retrain key has no solver fields.
    cfg = baselines.Retrain.default_config()
    cfg.train.epochs = 2
    assert cfg.train.solver == "sgd"
    method = baselines.Retrain(HIDDEN, splits, cfg, mesh=mesh.make_mesh(1))
    key = jax.random.key(5)
    init_key, order_key = jax.random.split(key)
    start = models.init_variables(method.model, init_key, splits.train.x.shape[1:])
    old, _ = train.train_classifier(method.model, start, splits.train.x, splits.train.y, rows=np.arange(30),
                                    epochs=2, batch_size=64, learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
                                    seed=base.seed_of(order_key))
    new = method._recipe(key, np.arange(30), desc="recipe")
    for a, c in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert set(method.retrain_key()["train"]) == {"epochs", "batch_size", "learning_rate", "momentum", "weight_decay"}


def test_the_fisher_diagonal_is_the_expected_squared_gradient_and_the_noise_follows_the_formula():
    model = models.MLP(hidden=(3,), num_classes=4)
    rng = np.random.default_rng(0)
    with compat.enable_x64():
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                              models.init_variables(model, jax.random.key(1), (2, 2, 1))["params"])
        x = jnp.asarray(rng.uniform(size=(5, 2, 2, 1)))
        w = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0])
        got = fisher_forgetting.fisher_diagonal_sum(model, {}, params, x, jnp.zeros(5, jnp.int32), w)
        grad = jax.jit(jax.grad(kernels.example_cross_entropy(model, {})))
        probs = np.asarray(jax.nn.softmax(model.apply({"params": params}, x, train=False)))
        expected = np.zeros(len(flat(params)))
        for i in range(5):
            for c in range(4):
                expected += float(w[i]) * probs[i, c] * flat(grad(params, x[i], jnp.int32(c))) ** 2
        np.testing.assert_allclose(flat(got), expected, rtol=1e-12, atol=1e-15)
    cfg = baselines.FisherForgetting.default_config()
    cfg.alpha = 1e-4
    fisher = {"dense_0": {"kernel": rng.uniform(0, 2e-3, size=(4, 3)), "bias": rng.uniform(0, 2e-3, size=3)},
              "head": {"kernel": rng.uniform(0, 2e-2, size=(3, 4)), "bias": rng.uniform(0, 2e-2, size=4)}}
    std = fisher_forgetting.fisher_noise_std(jax.tree.map(jnp.asarray, fisher), cfg)
    for layer, cap, scale in (("dense_0", 1e3, 1.0), ("head", 1e2, 10.0)):
        kernel = cfg.alpha * np.minimum(1 / (fisher[layer]["kernel"] + 1e-8), cap)
        kernel = np.broadcast_to(kernel.mean(axis=0, keepdims=True), kernel.shape) * scale  # the fan-in mean
        bias = cfg.alpha * np.minimum(1 / (fisher[layer]["bias"] + 1e-8), cap) * 10.0
        np.testing.assert_allclose(np.asarray(std[layer]["kernel"]), np.sqrt(kernel), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(std[layer]["bias"]), np.sqrt(bias), rtol=1e-6)
    cfg.exponent = 0.25  # the paper's F^{-1/4}
    quarter = fisher_forgetting.fisher_noise_std(jax.tree.map(jnp.asarray, fisher), cfg)
    np.testing.assert_allclose(np.asarray(quarter["head"]["bias"]), np.asarray(std["head"]["bias"]) ** 0.5,
                               rtol=1e-6)


def test_fisher_forgetting_is_reproducible_per_key_and_scales_with_alpha(splits):
    def method(alpha):
        cfg = baselines.FisherForgetting.default_config()
        cfg.train.epochs, cfg.alpha, cfg.chunk = 2, alpha, 16
        return baselines.FisherForgetting(HIDDEN, splits, cfg, mesh=mesh.make_mesh(2))

    small, large = method(1e-6), method(1e-4)
    state = small.init(jax.random.key(0))
    ids = small.forgettable_ids()[:3]
    one, two = jax.random.key(1), jax.random.key(2)
    with jax.transfer_guard_host_to_device("disallow"):  # as the workflow runs requests
        a, info = small.forget(state, ids, key=one)
        again, _ = small.forget(state, ids, key=one)
        other, _ = small.forget(state, ids, key=two)
        big, _ = large.forget(state, ids, key=one)
    w0 = flat(state.variables)
    np.testing.assert_array_equal(flat(a.variables), flat(again.variables))
    assert np.linalg.norm(flat(other.variables) - flat(a.variables)) > 0
    moved = np.linalg.norm(flat(a.variables) - w0)
    assert 0 < moved and np.linalg.norm(flat(big.variables) - w0) == pytest.approx(10 * moved, rel=1e-5)
    np.testing.assert_array_equal(flat(info.noiseless.variables), w0)  # the mean of the scrub: the model itself
    assert info.residual is None and info.sigma == 0 and info.passes == CLASSES and info.notes["noise_std_max"] > 0
    assert info.notes["noise_std_min"] <= info.notes["noise_std_rms"] <= info.notes["noise_std_max"]
    # Without a key the request's key comes from the original's key and the request number.
    np.testing.assert_array_equal(flat(small.forget(state, ids)[0].variables),
                                  flat(small.forget(state, ids)[0].variables))
    published = small.publish(state, jax.random.key(1))
    assert np.linalg.norm(flat(published.variables) - w0) > 0 and published.ledger is state.ledger


def test_bad_configs_are_refused_naming_the_field(splits):
    for model, match in ((HIDDEN, "hidden=\\(\\)"), (models.SmallCNN(num_classes=CLASSES), "linear classifier")):
        with pytest.raises(errors.ConfigError, match=match):
            baselines.CertifiedRemoval(model, splits, removal_config(), mesh=mesh.make_mesh(1))
    for cls, field, value in ((baselines.CertifiedRemoval, "sigma", -1.0), (baselines.CertifiedRemoval, "delta", 0.0),
                              (baselines.CertifiedRemoval, "max_params", 50),
                              (baselines.FisherForgetting, "alpha", -1.0),
                              (baselines.FisherForgetting, "exponent", 0.0),
                              (baselines.FisherForgetting, "fisher_eps", 0.0)):
        cfg = cls.default_config()
        cfg[field] = value
        with pytest.raises(errors.ConfigError, match=field):
            cls(LINEAR, splits, cfg, mesh=mesh.make_mesh(1))
    for field, value in (("solver", "adam"), ("tol", 0.0), ("max_iter", 0)):
        cfg = removal_config()
        cfg.train[field] = value
        with pytest.raises(errors.ConfigError, match=f"train.{field}"):
            baselines.CertifiedRemoval(LINEAR, splits, cfg, mesh=mesh.make_mesh(1))
    cfg = removal_config(sigma=0.1)
    cfg.train.solver = "sgd"
    with pytest.raises(errors.ConfigError, match="sigma > 0 .* solver"):
        baselines.CertifiedRemoval(LINEAR, splits, cfg, mesh=mesh.make_mesh(1))
