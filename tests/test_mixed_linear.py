"""Acceptance tests of mixed-linear forgetting (spec §12): exactness against dense references, ledger, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxforget import compat, data, errors, evaluate, kernels, ledger, mesh, models, timing
from jaxforget.methods import mixed_linear

pytestmark = pytest.mark.xdist_group("mixed_linear")


def small_splits(n=400):
    digits = data.load_digits()
    ds = digits.subset(digits.ids[:n])
    return data.make_splits(ds, test_fraction=0.2, core_fraction=0.3, seed=0)


def small_config(**overrides):
    cfg = mixed_linear.default_method_config()
    cfg.core.epochs = 5
    cfg.linearize = "all"
    cfg.mu = 1e-2
    cfg.tol = 1e-5
    cfg.batch_size = 64
    cfg.solver = "cg"  # these tests exercise the matrix-free path; tests/test_direct.py covers the direct one
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def setup():
    splits = small_splits()
    model = models.MLP(hidden=(12,), activation="leaky_relu")
    ml = mixed_linear.MixedLinear(model, splits, small_config(), mesh=mesh.make_mesh(1))
    state = ml.init(jax.random.key(0))
    return splits, model, ml, state


@pytest.fixture(scope="module")
def dense(setup):
    """float64 Jacobian [n, K, P] of the linearized subtree at the core, core outputs [n, K], unravel."""
    splits, _, ml, state = setup
    with compat.enable_x64():
        lin, fix = ml.split(optax.tree.cast(state.core, jnp.float64))
        flat, unravel = ravel_pytree(lin)
        x = jnp.asarray(splits.train.x, jnp.float64)
        jac = np.asarray(jax.jacfwd(lambda w: ml.problem.apply(unravel(w), fix, x))(flat))
        fc = np.asarray(ml.problem.apply(lin, fix, x))
    return jac, fc, unravel


def normaliser(ml, keep):
    """The loss normaliser n of the config's convention: |D| ("fixed") or |D_r| ("retained")."""
    return ml.num_train if ml.config.regularization == "fixed" else int(keep.sum())


def dense_minimiser(ml, dense, removed_by):
    """Independent float64 lstsq on [J_r/√n ; √μ I] w = [(αY_r − F_c)/√n ; 0] (spec §12.8), n = normaliser."""
    jac, fc, _ = dense
    keep = ledger.retain_mask(removed_by)
    n_r, p = normaliser(ml, keep), jac.shape[-1]
    target = ml.config.target_scale * np.eye(ml.num_classes)[ml.splits.train.y[keep]]
    a = np.vstack([jac[keep].reshape(-1, p) / np.sqrt(n_r), np.sqrt(ml.config.mu) * np.eye(p)])
    b = np.concatenate([(target - fc[keep]).reshape(-1) / np.sqrt(n_r), np.zeros(p)])
    return np.linalg.lstsq(a, b, rcond=None)[0]


def ravel64(tree):
    """Host float64 ravel (ravel_pytree would round float64 leaves to float32 outside an x64 context)."""
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def rel(a, b):
    a = ravel64(a) if not isinstance(a, np.ndarray) else a
    b = ravel64(b) if not isinstance(b, np.ndarray) else b
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def removed(ml, state, ids, request=1):
    return ledger.record(state.ledger.removed_by, np.searchsorted(ml.train_ids, ids), request)


def test_linearized_model_at_zero_is_the_core_model(setup):
    splits, model, ml, state = setup
    logits = ml.predict_core(state, splits.test.x)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model.apply(state.core, splits.test.x)))


def test_linearized_model_is_linear_in_w_u(setup):
    splits, _, ml, state = setup
    u = optax.tree.random_like(jax.random.key(1), state.w_u)
    v = optax.tree.random_like(jax.random.key(2), state.w_u)
    fc = np.asarray(ml.predict_core(state, splits.test.x), np.float64)
    du = np.asarray(ml.predict(state, splits.test.x, w_u=u), np.float64) - fc
    dv = np.asarray(ml.predict(state, splits.test.x, w_u=v), np.float64) - fc
    both = np.asarray(ml.predict(state, splits.test.x, w_u=optax.tree.add_scale(optax.tree.scale(-3.0, v), 2.0, u)))
    np.testing.assert_allclose(both - fc, 2 * du - 3 * dv, atol=2e-4)


def test_newton_step_from_any_start_equals_exact_retrain_float64(setup, dense):
    """The forget kernel (one Newton-CG step) in float64, from a far-from-optimal w_u, vs a dense lstsq."""
    splits, _, ml, state = setup
    arbitrary = optax.tree.random_like(jax.random.key(3), state.w_u)
    after = ml._with_removed(state, removed(ml, state, splits.user_ids[:7]))
    w_ref = dense_minimiser(ml, dense, after.ledger.removed_by)
    w64, info = ml.solve(after, w_start=arbitrary, dtype=jnp.float64, tol=1e-12, maxiter=5000)
    assert bool(info.converged)
    assert rel(w64, w_ref) <= 1e-8


def test_float32_forget_equals_exact_retrain(setup, dense):
    splits, _, ml, state = setup
    new_state, info = ml.forget(state, splits.user_ids[:7], sigma=0.0)
    w_ref = dense_minimiser(ml, dense, new_state.ledger.removed_by)
    assert info.residual <= ml.config.tol
    assert rel(new_state.w_u, w_ref) <= 1e-5


def test_sum_form_hessian_with_mean_gradient_is_wrong(setup, dense):
    """Guards the convention: mixing Σ JᵀJ + μI with a mean-form g misses the minimiser."""
    splits, _, ml, state = setup
    new_removed = removed(ml, state, splits.user_ids[:7])
    w_ref = dense_minimiser(ml, dense, new_removed)
    jac_all, fc_all, _ = dense
    keep = ledger.retain_mask(new_removed)
    p = jac_all.shape[-1]
    jac, fc = jac_all[keep].reshape(-1, p), fc_all[keep].reshape(-1)
    w0 = ravel64(state.w_u)
    n_r, mu = normaliser(ml, keep), ml.config.mu
    t = np.eye(ml.num_classes)[splits.train.y[keep]].reshape(-1)
    g_mean = jac.T @ (fc + jac @ w0 - t) / n_r + mu * w0
    h_sum = jac.T @ jac + mu * np.eye(p)
    h_mean = jac.T @ jac / n_r + mu * np.eye(p)
    assert rel(w0 - np.linalg.solve(h_mean, g_mean), w_ref) <= 1e-8
    assert rel(w0 - np.linalg.solve(h_sum, g_mean), w_ref) > 1e-3


def test_sequential_requests_equal_one_request_for_the_union(setup):
    splits, _, ml, state = setup
    a, b, c = splits.user_ids[10:14], splits.user_ids[20:25], splits.user_ids[30:33]
    s = state
    for ids in (c, a, b):
        s, _ = ml.forget(s, ids, sigma=0.0)
    union, _ = ml.forget(state, np.concatenate([a, b, c]), sigma=0.0)
    assert rel(s.w_u, union.w_u) <= 1e-5
    np.testing.assert_array_equal(np.asarray(s.ledger.removed_by) > 0, np.asarray(union.ledger.removed_by) > 0)
    assert int(s.ledger.num_requests) == 3
    assert sorted(ledger.forgotten_ids(s.ledger.removed_by, ml.train_ids, 2)) == list(a)


def test_masked_retain_set_equals_physically_reduced_data(setup):
    splits, model, ml, state = setup
    ids = splits.user_ids[40:50]
    new_state, _ = ml.forget(state, ids, sigma=0.0)
    keep = np.setdiff1d(splits.train.ids, ids)
    reduced = data.Splits(train=splits.train.subset(keep), test=splits.test, core_ids=splits.core_ids,
                          user_ids=np.setdiff1d(splits.user_ids, ids), seed=splits.seed)
    cfg = ml.config.copy_and_resolve_references()
    if cfg.regularization == "fixed":  # (1/n)Σ_{D_r} + μ/2‖w‖² has the minimiser of (1/n_r)Σ_{D_r} + (μn/n_r)/2‖w‖²
        cfg.mu = ml.config.mu * ml.num_train / len(keep)
    ml_reduced = mixed_linear.MixedLinear(model, reduced, cfg, mesh=mesh.make_mesh(1))
    fresh = ml_reduced.init_state(state.core).replace(w_u=state.w_u)
    w64, _ = ml_reduced.solve(fresh, dtype=jnp.float64, tol=1e-12, maxiter=5000)
    assert rel(new_state.w_u, w64) <= 1e-5


def test_two_device_forget_equals_one_device(setup):
    splits, model, ml, state = setup
    ml2 = mixed_linear.MixedLinear(model, splits, ml.config, mesh=mesh.make_mesh(2))
    ids = splits.user_ids[60:66]
    s1, _ = ml.forget(state, ids, sigma=0.0)
    s2, _ = ml2.forget(state, ids, sigma=0.0)
    assert rel(s2.w_u, s1.w_u) <= 1e-5


def test_nothing_recompiles_across_requests(setup):
    splits, _, ml, state = setup
    s, _ = ml.forget(state, splits.user_ids[70:72])
    compiles = timing.CompileCounter()  # every XLA compilation, eager operations included
    with compiles:
        for k in range(3):
            s, _ = ml.forget(s, splits.user_ids[72 + 2 * k : 74 + 2 * k])
    assert compiles.count == 0


def test_forget_all_is_the_core_model(setup):
    splits, _, ml, state = setup
    s = ml.forget_all(state)
    assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in jax.tree.leaves(s.w_u))
    np.testing.assert_array_equal(np.asarray(ml.predict(s, splits.test.x)),
                                  np.asarray(ml.predict_core(state, splits.test.x)))
    assert set(ledger.forgotten_ids(s.ledger.removed_by, ml.train_ids)) == set(splits.user_ids)


def test_forgetting_every_user_id_routes_to_forget_all(setup):
    splits, _, ml, state = setup
    s, info = ml.forget(state, splits.user_ids)
    assert info.solver == "forget_all"
    assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in jax.tree.leaves(s.w_u))


def test_noise_has_std_sigma_and_fresh_draws():
    splits = small_splits()
    cfg = small_config(tol=1e-3, on_fail="warn")
    ml = mixed_linear.MixedLinear(models.MLP(hidden=(150,)), splits, cfg, mesh=mesh.make_mesh(1))
    state = ml.init(jax.random.key(0))
    d = optax.tree.size(state.w_u)
    assert d >= 10_000
    sigma = 1e-3
    s1, info1 = ml.forget(state, splits.user_ids[:3], sigma=sigma)
    noise1 = ravel_pytree(optax.tree.sub(s1.w_u, info1.noiseless.w_u))[0]
    assert abs(float(jnp.std(noise1)) / sigma - 1) < 0.03
    s2, info2 = ml.forget(state, splits.user_ids[:3], sigma=sigma)  # same request, no key: a fresh draw
    noise2 = ravel_pytree(optax.tree.sub(s2.w_u, info2.noiseless.w_u))[0]
    assert float(jnp.abs(noise1 - noise2).max()) > 0
    # The state holds no noise key: weights, core, ledger and the recorded request check only.
    assert set(s1.__dataclass_fields__) == {"core", "w_u", "ledger", "direct_check"}


def test_sgd_solver_approaches_the_cg_solution_as_tau_grows(setup):
    """The paper's SGD solver converges to the Newton step; a well-conditioned problem (large μ) shows it
    within a test's budget (at μ = 1e-2 its progress per epoch is ~μ/β, as the spec's calibration found)."""
    splits, model, _, state = setup
    cg = mixed_linear.MixedLinear(model, splits, small_config(mu=10.0), mesh=mesh.make_mesh(1))
    state = cg.init_state(state.core).replace(w_u=state.w_u)  # the same core and start, bound to μ = 10's problem
    ids = splits.user_ids[80:90]
    exact, _ = cg.forget(state, ids, sigma=0.0)
    step = optax.tree.sub(exact.w_u, state.w_u)
    errs = []
    for epochs in (1, 4, 40):
        cfg = small_config(mu=10.0, solver="sgd", sgd_epochs=epochs, sgd_batch_size=64)
        ml_sgd = mixed_linear.MixedLinear(model, splits, cfg, mesh=mesh.make_mesh(1))
        s, info = ml_sgd.forget(state, ids, sigma=0.0)
        assert info.solver == "sgd" and info.passes == epochs + 2
        errs.append(rel(optax.tree.sub(s.w_u, state.w_u), step))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.05


def test_certificate_bounds_the_solver_error():
    rng = np.random.default_rng(0)
    mu = 1e-2
    with compat.enable_x64():
        for _ in range(5):
            q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
            h = jnp.asarray((q * (mu + rng.uniform(0, 10, 20))) @ q.T)
            g = jnp.asarray(rng.normal(size=20))
            v, info = kernels.cg_solve(lambda u, h=h: h @ u, g, tol=1e-2, maxiter=4)
            err = float(jnp.linalg.norm(v - jnp.linalg.solve(h, g)))
            assert err <= float(info.residual_norm) / mu
    delta = {"w": jnp.array([0.3, -0.4])}
    assert evaluate.kl_proxy(delta, {"w": jnp.zeros(2)}, sigma=0.1) == pytest.approx(0.25 / (2 * 0.01))
    assert evaluate.kl_proxy(delta, {"w": jnp.zeros(2)}, sigma=0.1, c=2.0) > 12.5
    assert mixed_linear.certificate_kl(1e-6, 1e-2, 1e-3) == pytest.approx(1e-12 / (2 * 1e-4 * 1e-6))


def test_power_iteration_beta_matches_dense_eigenvalue(setup, dense):
    _, _, ml, state = setup
    jac = dense[0].reshape(-1, dense[0].shape[-1])
    beta = np.linalg.eigvalsh(jac.T @ jac / dense[0].shape[0]).max() + ml.config.mu
    assert ml.largest_eigenvalue(state) == pytest.approx(beta, rel=1e-4)


def test_bn_eval_mode_jacobian_is_batch_independent():
    splits = small_splits(200)
    model = models.ResNet(depth=8, width=4)
    cfg = small_config(linearize="last:2")
    cfg.core.epochs = 1
    ml = mixed_linear.MixedLinear(model, splits, cfg, mesh=mesh.make_mesh(1))
    state = ml.init_state(ml.train_core(jax.random.key(0)))  # w_u is drawn below: no user solve needed
    w = optax.tree.random_like(jax.random.key(1), state.w_u)
    x = splits.test.x[:8]
    together = np.asarray(ml.predict(state, x, w_u=w))
    alone = np.concatenate([np.asarray(ml.predict(state, x[i : i + 1], w_u=w)) for i in range(8)])
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bad input: a named error, and the state unchanged.
# ------------------------------------------------------------------------------------------------


def snapshot(state):
    return jax.tree.map(lambda a: np.array(a, copy=True), state)


@pytest.mark.parametrize(
    "make_ids, error, message",
    [
        (lambda s: [], errors.EmptyRequestError, "empty"),
        (lambda s: [s.user_ids[0], s.user_ids[0]], errors.DuplicateIdsError, "Duplicate ids"),
        (lambda s: [10_000_000], errors.UnknownIdsError, "Unknown sample ids.*10000000"),
        (lambda s: [s.core_ids[0]], errors.CoreIdsError, "cannot be forgotten without retraining the core"),
        (lambda s: np.array([0.5]), errors.ShapeDtypeError, "integers"),
        (lambda s: np.array([[1, 2]]), errors.ShapeDtypeError, "1-D"),
    ],
)
def test_bad_requests_raise_named_errors_and_leave_state_unchanged(setup, make_ids, error, message):
    splits, _, ml, state = setup
    before = snapshot(state)
    with pytest.raises(error, match=message):
        ml.forget(state, make_ids(splits))
    jax.tree.map(np.testing.assert_array_equal, snapshot(state), before)


def test_already_forgotten_ids_are_rejected(setup):
    splits, _, ml, state = setup
    s, _ = ml.forget(state, splits.user_ids[100:102])
    before = snapshot(s)
    with pytest.raises(errors.AlreadyForgottenError, match=str(splits.user_ids[101])):
        ml.forget(s, splits.user_ids[101:103])
    jax.tree.map(np.testing.assert_array_equal, snapshot(s), before)


def test_nan_weights_and_inputs_are_rejected(setup):
    splits, _, ml, state = setup
    bad = state.replace(w_u=jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), state.w_u))
    with pytest.raises(errors.NonFiniteError, match="user weights w_u"):
        ml.forget(bad, splits.user_ids[:2])
    x = np.array(splits.test.x[:4])
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(errors.NonFiniteError, match="inputs x"):
        ml.predict(state, x)
    with pytest.raises(errors.ShapeDtypeError, match=r"shape \[n, 8, 8, 1\]"):
        ml.predict(state, np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(errors.ShapeDtypeError, match="float images"):
        ml.predict(state, np.zeros((2, 8, 8, 1), np.int32))


def test_cg_not_converged_raises_with_the_residual_and_keeps_state(setup):
    splits, model, ml, state = setup
    strict = mixed_linear.MixedLinear(model, splits, small_config(maxiter=2, tol=1e-12), mesh=mesh.make_mesh(1))
    before = snapshot(state)
    with pytest.raises(errors.CGNotConvergedError, match=r"relative residual .* after 2 iterations"):
        strict.forget(state, splits.user_ids[:3])
    jax.tree.map(np.testing.assert_array_equal, snapshot(state), before)
    lenient = mixed_linear.MixedLinear(model, splits, small_config(maxiter=2, tol=1e-12, on_fail="warn"),
                                       mesh=mesh.make_mesh(1))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        lenient.forget(state, splits.user_ids[:3])


def test_bad_config_is_rejected(setup):
    splits, model, *_ = setup
    with pytest.raises(errors.ConfigError, match="mu must be > 0"):
        mixed_linear.MixedLinear(model, splits, small_config(mu=0.0))
    with pytest.raises(errors.ConfigError, match="solver must be"):
        mixed_linear.MixedLinear(model, splits, small_config(solver="adam"))
    # Checked where the config is built, not at forget time: non-finite noise, misspelt choices and fields.
    for field, value, message in (("sigma", float("nan"), "sigma must be a finite number"),
                                  ("sigma", float("inf"), "sigma must be a finite number"),
                                  ("on_fail", "rasie", "on_fail must be one of"),
                                  ("direct_inverse", "sometimes", "direct_inverse must be one of")):
        with pytest.raises(errors.ConfigError, match=message):
            mixed_linear.MixedLinear(model, splits, small_config(**{field: value}))
    cfg = small_config()
    cfg.sigam = 0.1
    with pytest.raises(errors.ConfigError, match=r"unknown config field\(s\) \['sigam'\]"):
        mixed_linear.MixedLinear(model, splits, cfg)


def test_readouts_compare_with_the_oracle(setup):
    splits, _, ml, state = setup
    logits = np.asarray(ml.predict(state, splits.test.x))
    assert evaluate.activation_distance(logits, logits) == 0.0
    out = evaluate.compare({"test": logits}, {"test": logits}, {"test": splits.test.y})
    assert out["test"]["accuracy"] == out["test"]["oracle_accuracy"] > 0.5


def test_nystrom_preconditioned_forget_reaches_the_same_solution_in_fewer_iterations(setup, dense):
    splits, model, ml, state = setup
    ids = splits.user_ids[110:120]
    plain, plain_info = ml.forget(state, ids, sigma=0.0)
    pre_ml = mixed_linear.MixedLinear(model, splits, small_config(preconditioner="nystrom", nystrom_rank=300),
                                      mesh=mesh.make_mesh(1))
    pre, pre_info = pre_ml.forget(state, ids, sigma=0.0)
    w_ref = dense_minimiser(ml, dense, pre.ledger.removed_by)
    assert rel(pre.w_u, w_ref) <= 1e-5 and rel(plain.w_u, w_ref) <= 1e-5
    assert pre_info.iterations < plain_info.iterations
    with pytest.raises(errors.ConfigError, match="preconditioner must be"):
        mixed_linear.MixedLinear(model, splits, small_config(preconditioner="jacobi"))


@pytest.mark.parametrize("c", [0.25, 1.0, 3.0])
def test_kl_proxy_equals_the_dense_gaussian_kl(c):
    """KL(N(m, cσ²I) ‖ N(w*, σ²I)) from the general formula with dense covariances (trace, Mahalanobis, log-dets)."""
    rng = np.random.default_rng(3)
    d, sigma = 7, 0.3
    m, w_star = rng.normal(size=d), rng.normal(size=d)
    cov_p, cov_q = c * sigma**2 * np.eye(d), sigma**2 * np.eye(d)
    q_inv = np.linalg.inv(cov_q)
    diff = w_star - m
    expected = 0.5 * (np.trace(q_inv @ cov_p) + diff @ q_inv @ diff - d
                      + np.linalg.slogdet(cov_q)[1] - np.linalg.slogdet(cov_p)[1])
    got = evaluate.kl_proxy({"a": jnp.asarray(m[:3]), "b": jnp.asarray(m[3:])},
                                {"a": jnp.asarray(w_star[:3]), "b": jnp.asarray(w_star[3:])}, sigma=sigma, c=c)
    assert got == pytest.approx(expected, rel=1e-5)
