"""SSSE (spec ssse.md §11): per-sample terms, every structure against the dense matrix, the exact downdate, the
certified-removal step on a convex model in float64, ε, the matrix-free path, two devices, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxforget import compat, data, errors, mesh, models
from jaxforget.methods import ssse
from jaxforget.methods.ssse import curvature as curv_lib

pytestmark = pytest.mark.xdist_group("ssse")


def small_splits(n=240):
    digits = data.load_digits()
    keep = np.arange(n)
    return data.make_splits(digits.subset(digits.ids[keep]), seed=0)


def config(**overrides):
    cfg = ssse.default_config()
    cfg.train.epochs = 5
    cfg.max_dense_params = 100_000
    cfg.chunk = 16
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def float64_state(method, seed=0):
    """A float64 original (the recipe's weights, cast) with its curvature built in float64 (call under x64)."""
    variables = models.init_variables(method.model, jax.random.key(seed), method.splits.train.x.shape[1:])
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    params = variables["params"]
    # A few steps of full-batch gradient descent so that the model is not at its initialisation.
    x, y = jnp.asarray(method.splits.train.x, jnp.float64), jnp.asarray(method.splits.train.y)
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        method.model.apply({"params": p}, x, train=False), y).mean()
    for _ in range(30):
        params = jax.tree.map(lambda a, g: a - 0.5 * g, params, jax.grad(loss)(params))
    variables = {"params": params}
    curvature = method.build_curvature(variables, np.arange(method.num_train))
    return ssse.SsseState(variables, method.empty_ledger(), jax.random.key_data(jax.random.key(seed)), curvature)


@pytest.fixture(scope="module")
def linear():
    """A linear softmax classifier on 240 digits (P = 650): Gauss-Newton is its exact Hessian."""
    return small_splits(), models.MLP(hidden=(), num_classes=10)


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def test_rows_give_the_per_example_gradients_and_the_gauss_newton_terms(linear):
    splits, _ = linear
    model = models.MLP(hidden=(4,), num_classes=10)
    with compat.enable_x64():
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                              models.init_variables(model, jax.random.key(1), (8, 8, 1))["params"])
        x, y = jnp.asarray(splits.train.x[:5], jnp.float64), jnp.asarray(splits.train.y[:5])
        loss = curv_lib.example_loss(model, {})
        ef = np.asarray(curv_lib.rows("empirical_fisher", model, params, {}, x, y))[:, 0]
        loop = np.stack([flat(jax.grad(loss)(params, x[i], y[i])) for i in range(5)])
        np.testing.assert_allclose(ef, loop, rtol=1e-12, atol=1e-14)
        gn = np.asarray(curv_lib.rows("gauss_newton", model, params, {}, x, y))
        vec, unravel = ravel_pytree(params)
        for i in range(5):
            logits = lambda v, i=i: model.apply({"params": unravel(v)}, x[i][None], train=False)[0]
            jac = np.asarray(jax.jacobian(logits)(vec))
            p = np.asarray(jax.nn.softmax(logits(vec)))
            expected = jac.T @ (np.diag(p) - np.outer(p, p)) @ jac
            np.testing.assert_allclose(gn[i].T @ gn[i], expected, rtol=1e-10, atol=1e-13)
        # In eval mode a sample's gradient does not depend on its batch.
        alone = np.asarray(curv_lib.rows("empirical_fisher", model, params, {}, x[2:3], y[2:3]))[0, 0]
        np.testing.assert_allclose(alone, ef[2], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("structure", ["block", "woodbury", "cg"])
def test_each_structure_solves_like_its_dense_matrix(linear, structure):
    """Block: the inverse of the block-masked dense matrix; Woodbury: the dense matrix of the stored samples; CG:
    the dense matrix on the retained data."""
    splits, model = linear
    with compat.enable_x64():
        dense_m = ssse.Ssse(model, splits, config(structure="dense", damping=1e-3), mesh=mesh.make_mesh(1))
        state = float64_state(dense_m)
        m = ssse.Ssse(model, splits, config(structure=structure, damping=1e-3, block_size=64, rank=50,
                                            cg_tol=1e-12, cg_maxiter=2000), mesh=mesh.make_mesh(1))
        curv = m.build_curvature(state.variables, np.arange(m.num_train), seed=3)
        full = np.asarray(dense_m._term_sum(state.variables["params"], {}, np.arange(m.num_train)))
        wd = 5e-4
        lam = float(state.curvature.damping) + wd
        u = np.random.default_rng(0).normal(size=m.layout.num_params)
        if structure == "block":
            mask = np.zeros_like(full, bool)
            for idx in m.layout.blocks:
                idx = idx[idx < m.layout.num_params]
                mask[np.ix_(idx, idx)] = True
            expected = np.linalg.solve(np.where(mask, full, 0) / m.num_train + lam * np.eye(len(u)), u)
            got, ok = curv_lib.solve(curv, m.layout, jnp.asarray(u), jnp.float64(wd))
        elif structure == "woodbury":
            stored = np.asarray(curv.owner)
            assert len(stored) == 50 and len(set(stored.tolist())) == 50
            part = np.asarray(dense_m._term_sum(state.variables["params"], {}, stored))
            lam_w = float(curv.damping) + wd  # its own damping: tr over the stored samples
            expected = np.linalg.solve(part / 50 + lam_w * np.eye(len(u)), u)
            got, ok = curv_lib.solve(curv, m.layout, jnp.asarray(u), jnp.float64(wd))
        else:
            assert curv.matrix.size == 1
            expected = np.linalg.solve(full / m.num_train + lam * np.eye(len(u)), u)
            state_cg = state.replace(curvature=curv)
            data_all = m._rows_data(np.arange(m.num_train))
            matvec = m._matvec_sum()
            got, info = jax.jit(lambda v: __import__("jaxforget").kernels.cg_solve(
                lambda w: matvec((state_cg.variables["params"], {}, w), data_all) / m.num_train + lam * w, v,
                tol=1e-13, maxiter=3000))(jnp.asarray(u))
            ok = info.converged
        assert bool(ok)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())


def test_the_downdate_equals_the_curvature_rebuilt_on_the_retained_data(linear):
    splits, model = linear
    with compat.enable_x64():
        for structure in ("dense", "block", "woodbury"):
            m = ssse.Ssse(model, splits, config(structure=structure, block_size=64, rank=60), mesh=mesh.make_mesh(1))
            state = float64_state(m)
            params = state.variables["params"]
            built = m.build_curvature(state.variables, np.arange(m.num_train), seed=1)
            erased = np.array([3, 17, 40, 41, 100])
            if structure == "woodbury":
                erased = np.asarray(built.owner)[[0, 5, 9]]
            removed = m._term_sum(params, {}, erased) if structure != "woodbury" else None
            down = curv_lib.downdate(built, m.layout, removed, erased)
            if structure == "woodbury":
                kept = np.asarray(down.owner)
                assert (kept == -1).sum() == 3 and int(down.count) == 57
                assert np.all(np.asarray(down.matrix)[kept == -1] == 0)
                np.testing.assert_array_equal(np.asarray(down.matrix)[kept >= 0], np.asarray(built.matrix)[kept >= 0])
                continue
            rebuilt = m._term_sum(params, {}, np.setdiff1d(np.arange(m.num_train), erased))
            np.testing.assert_allclose(np.asarray(down.matrix), np.asarray(rebuilt), rtol=1e-9,
                                       atol=1e-12 * np.abs(np.asarray(rebuilt)).max())
            assert int(down.count) == m.num_train - len(erased)


def guo_step(model, splits, w_star, erased, retained, wd):
    """Guo et al.'s certified-removal Newton step in NumPy (sum form): w* + H⁻¹Δ with H = Σ_{D_r} ∇²ℓ_i +
    λ_wd (n−k) I and Δ = Σ_S (∇ℓ_i + λ_wd w*), for the linear softmax model on flattened, normalised pixels."""
    vec, unravel = ravel_pytree(w_star)
    x = (np.asarray(splits.train.x, np.float64).reshape(len(splits.train.x), -1) - model.input_mean) / model.input_std
    y = np.asarray(splits.train.y)
    kernel = np.asarray(w_star["head"]["kernel"])  # [D, K]
    bias = np.asarray(w_star["head"]["bias"])
    d, k_cls = kernel.shape
    feats = np.concatenate([x, np.ones((len(x), 1))], axis=1)  # [n, D+1]: weights then bias per class

    def prob(rows):
        z = feats[rows] @ np.concatenate([kernel, bias[None]], axis=0)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    # Parameter order of ravel_pytree: head/bias [K], then head/kernel [D, K] row-major.
    def to_vec(g_w):  # g_w: [D+1, K] (kernel rows then the bias row)
        return np.concatenate([g_w[-1], g_w[:-1].reshape(-1)])

    p_s = prob(erased)
    onehot = np.eye(k_cls)[y[erased]]
    grads = sum(to_vec(np.outer(feats[i], p_s[j] - onehot[j])) for j, i in enumerate(erased))
    delta = grads + len(erased) * wd * np.asarray(vec)
    p_r = prob(retained)
    hess = np.zeros((len(vec), len(vec)))
    order = np.concatenate([d * k_cls + np.arange(k_cls), np.arange(d * k_cls)])  # (D+1)xK layout -> ravel order
    for j, i in enumerate(retained):
        h_out = np.diag(p_r[j]) - np.outer(p_r[j], p_r[j])
        block = np.kron(np.outer(feats[i], feats[i]), h_out)  # over [(D+1) x K] in row-major (feature, class)
        hess += block[np.ix_(order, order)]
    hess += wd * len(retained) * np.eye(len(vec))
    return np.asarray(vec) + np.linalg.solve(hess, delta)


@pytest.mark.parametrize("kind", ["gauss_newton", "hessian"])
def test_the_exact_curvature_step_is_the_certified_removal_newton_step(linear, kind):
    """Linear softmax classifier with L2 (convex), damping 0, ε = 1: SSSE with the exact curvature (Gauss-Newton is
    the Hessian here) equals an independent NumPy implementation of Guo et al.'s removal step (rel. < 1e-8)."""
    splits, model = linear
    with compat.enable_x64():
        m = ssse.Ssse(model, splits, config(curvature=kind, structure="dense", damping=0.0), mesh=mesh.make_mesh(1))
        state = float64_state(m)
        ids = m.forgettable_ids()[[2, 30, 31, 77, 150]]
        after, info = m.forget(state, ids)
        erased = np.searchsorted(m.train_ids, ids)
        retained = np.setdiff1d(np.arange(m.num_train), erased)
        expected = guo_step(model, splits, state.variables["params"], erased, retained, m.config.train.weight_decay)
        got = flat(after.variables["params"])
        assert np.linalg.norm(got - expected) <= 1e-8 * np.linalg.norm(expected - flat(state.variables["params"]))
        assert info.num_forgotten == 5 and info.residual is None


def test_epsilon_zero_is_the_original_and_the_step_is_linear_in_epsilon(linear):
    splits, model = linear
    with compat.enable_x64():
        steps = {}
        for eps in (0.0, 0.5, 1.0):
            m = ssse.Ssse(model, splits, config(structure="block", block_size=128, epsilon=eps),
                          mesh=mesh.make_mesh(1))
            state = float64_state(m)
            after, _ = m.forget(state, m.forgettable_ids()[:7])
            steps[eps] = flat(after.variables["params"]) - flat(state.variables["params"])
        assert np.all(steps[0.0] == 0)
        np.testing.assert_allclose(steps[0.5] * 2, steps[1.0], rtol=1e-10, atol=1e-14)


def test_two_devices_equal_one(linear):
    splits, model = linear
    with compat.enable_x64():
        outs = []
        for devices in (1, 2):
            m = ssse.Ssse(model, splits, config(structure="block", block_size=128), mesh=mesh.make_mesh(devices))
            state = float64_state(m)
            after, _ = m.forget(state, m.forgettable_ids()[:9])
            outs.append((np.asarray(state.curvature.matrix), flat(after.variables["params"])))
        np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12 * np.abs(outs[0][0]).max())
        np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-9)


def test_sequential_requests_and_bad_input(linear):
    splits, model = linear
    m = ssse.Ssse(model, splits, config(structure="block", block_size=128), mesh=mesh.make_mesh(1))
    state = m.init(jax.random.key(0))
    ids = m.forgettable_ids()
    with jax.transfer_guard_host_to_device("disallow"):  # as the workflow runs requests
        one, _ = m.forget(state, ids[:3])
        two, info = m.forget(one, ids[3:8])
    assert info.request == 2 and int(two.curvature.count) == m.num_train - 8
    before = [np.array(a) for a in jax.tree.leaves(two)]
    edited = two.replace(variables={"params": jax.tree.map(lambda a: a * 1.01, two.variables["params"])})
    with pytest.raises(errors.StateMismatchError, match="other parameters"):
        m.forget(edited, ids[10:12])
    other = ssse.Ssse(model, splits, config(structure="woodbury", rank=20), mesh=mesh.make_mesh(1))
    with pytest.raises(errors.StateMismatchError, match="model config"):  # the curvature config makes the state
        other.forget(two, ids[10:12])
    # A curvature that holds less than the erased samples' terms: the downdate leaves it indefinite.
    negative = -1e6 * jnp.broadcast_to(jnp.eye(128, dtype=jnp.float32), two.curvature.matrix.shape)
    broken = two.replace(curvature=two.curvature.replace(matrix=negative))
    strict = ssse.Ssse(model, splits, config(structure="block", block_size=128, downdate="raise"),
                       mesh=mesh.make_mesh(1))
    with pytest.raises(errors.CurvatureError, match="downdate guard"):
        strict.forget(broken, ids[10:12])
    clipped, info = m.forget(broken, ids[10:12])  # "clip": projected onto the PSD cone, and the share reported
    assert info.notes["downdate_clipped"] > 0.99
    with pytest.raises(errors.ForgetRequestError, match="all .* remaining samples"):
        m.forget(two, np.setdiff1d(ids, ids[:8]))
    for a, b in zip(before, jax.tree.leaves(two), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    for field, value, message in (("epsilon", 11.0, "epsilon"), ("epsilon", -0.1, "epsilon"),
                                  ("structure", "block", "hessian"), ("structure", "dense", "max_dense_params")):
        cfg = config(**{field: value})
        if message == "hessian":
            cfg.curvature = "hessian"
        if message == "max_dense_params":
            cfg.max_dense_params = 100
        with pytest.raises(errors.ConfigError, match=message):
            ssse.Ssse(model, splits, cfg, mesh=mesh.make_mesh(1))


def test_sherman_morrison_scan_chunks_and_downdate_equal_the_dense_inverse():
    """Spec §11.3/4: the rank-1 recursion and its chunked form equal the dense inverse (rel. < 1e-8); removing rows
    by the chunked downdate equals the inverse rebuilt without them; rows that A does not hold trip the guard."""
    rng = np.random.default_rng(0)
    g = rng.normal(size=(40, 30))
    shift = 0.3
    with compat.enable_x64():
        dense = np.linalg.inv(shift * np.eye(30) + g.T @ g)
        for chunk in (1, 7, 40):
            got = np.asarray(curv_lib.sherman_morrison_inverse(jnp.asarray(g), jnp.float64(shift), chunk=chunk))
            assert np.linalg.norm(got - dense) <= 1e-8 * np.linalg.norm(dense), chunk
        gone = np.array([3, 7, 9, 21])
        kept = np.setdiff1d(np.arange(40), gone)
        rebuilt = np.linalg.inv(shift * np.eye(30) + g[kept].T @ g[kept])
        down, ok = curv_lib.sherman_morrison_downdate(jnp.asarray(dense), jnp.asarray(g[gone]))
        assert bool(ok) and np.linalg.norm(np.asarray(down) - rebuilt) <= 1e-8 * np.linalg.norm(rebuilt)
        _, ok = curv_lib.sherman_morrison_downdate(jnp.asarray(dense), jnp.asarray(3.0 * g[:1]))
        assert not bool(ok)


def test_the_sherman_morrison_structure_holds_the_damped_inverse_and_downdates_it(linear):
    """The method's Sherman–Morrison structure holds (A + N_0 λ' I)⁻¹ of the dense terms, solves with
    C⁻¹ = N·(A + N_0 λ' I)⁻¹, and its downdate by the erased samples' rows equals the inverse rebuilt on D_r;
    a broken curvature is reported by the guard."""
    splits, model = linear
    with compat.enable_x64():
        dense_m = ssse.Ssse(model, splits, config(structure="dense"), mesh=mesh.make_mesh(1))
        m = ssse.Ssse(model, splits, config(structure="sherman_morrison", chunk=64), mesh=mesh.make_mesh(1))
        state = float64_state(m)
        params, curv = state.variables["params"], state.curvature
        n, p = m.num_train, m.layout.num_params
        shift_sum = n * (float(curv.damping) + m.config.train.weight_decay)
        full = np.asarray(dense_m._term_sum(params, {}, np.arange(n)))
        expected = np.linalg.inv(full + shift_sum * np.eye(p))
        np.testing.assert_allclose(np.asarray(curv.matrix), expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())
        u = np.random.default_rng(1).normal(size=p)
        got, ok = curv_lib.solve(curv, m.layout, jnp.asarray(u), jnp.float64(m.config.train.weight_decay))
        assert bool(ok)
        np.testing.assert_allclose(np.asarray(got), n * expected @ u, rtol=1e-7)
        erased = np.array([3, 17, 40, 41, 100])
        down = curv_lib.downdate(curv, m.layout, m._rows(params, {}, m._rows_data(erased)), erased)
        kept = np.setdiff1d(np.arange(n), erased)
        rebuilt = np.linalg.inv(np.asarray(dense_m._term_sum(params, {}, kept)) + shift_sum * np.eye(p))
        np.testing.assert_allclose(np.asarray(down.matrix), rebuilt, rtol=1e-7, atol=1e-9 * np.abs(rebuilt).max())
        assert int(down.count) == n - len(erased)
        after, info = m.forget(state, m.forgettable_ids()[erased])
        assert info.solver == "ssse-gauss_newton-sherman_morrison"
        np.testing.assert_allclose(np.asarray(after.curvature.matrix), rebuilt, rtol=1e-7,
                                   atol=1e-9 * np.abs(rebuilt).max())
        broken = curv.replace(matrix=curv.matrix * 1e6)  # A⁻¹ scaled up: A holds far less than the erased terms
        with pytest.raises(errors.CurvatureError, match="downdate guard"):
            m.forget(state.replace(curvature=broken), m.forgettable_ids()[erased])


def ridge_problem(n=90, d=5, classes=3, wd=1e-2, seed=0):
    """Multi-output ridge regression ``L(θ) = (1/n) Σ ½‖W̃ᵀx̃_i − y_i‖² + (λ_wd/2)‖θ‖²`` (x̃ with a bias feature):
    per-sample losses, their Hessians and the closed-form minimiser on any subset."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=(n, d)), np.ones((n, 1))], axis=1)
    y = x @ rng.normal(size=(d + 1, classes)) + 0.3 * rng.normal(size=(n, classes))

    def loss(theta, i):
        r = jnp.asarray(x[i]) @ theta.reshape(d + 1, classes) - jnp.asarray(y[i])
        return 0.5 * jnp.sum(r * r)

    def solution(rows):
        a = x[rows].T @ x[rows] / len(rows) + wd * np.eye(d + 1)
        return np.linalg.solve(a, x[rows].T @ y[rows] / len(rows)).reshape(-1)

    grad_sum = lambda theta, rows: sum(jax.grad(loss)(theta, i) for i in rows)
    hess_sum = lambda theta, rows: sum(jax.hessian(loss)(theta, i) for i in rows)
    return loss, grad_sum, hess_sum, solution, wd


def test_ridge_exact_curvature_step_is_the_retrain_and_sequential_requests_equal_their_union():
    """Spec §11.6/8/11: on a quadratic, the exact (Hessian) curvature downdated by the erased samples and ε = 1 give
    the closed-form retrain on D_r (rel. < 1e-10) for k = 1 and k = 10; without the λ_wd θ term the step misses it;
    the erased-only form equals the full-retain-gradient form at the stationary θ*; two sequential requests equal one
    for their union."""
    with compat.enable_x64():
        loss, grad_sum, hess_sum, solution, wd = ridge_problem()
        n = 90
        everyone = np.arange(n)
        theta = jnp.asarray(solution(everyone))
        lay = curv_lib.layout(theta, "dense")
        held = curv_lib.Curvature(matrix=hess_sum(theta, everyone), owner=jnp.full(1, -1, jnp.int32),
                                  count=jnp.int32(n), damping=jnp.float64(0), layout=jnp.zeros(2, jnp.int32),
                                  params=jnp.zeros(4, jnp.uint32))
        wd_ = jnp.float64(wd)

        def request(theta, curv, erased, retained_after, *, with_decay=True):
            curv = curv_lib.downdate(curv, lay, hess_sum(theta, erased), erased)
            solve = lambda u: curv_lib.solve(curv, lay, u, wd_)
            k = float(len(erased)) if with_decay else 0.0  # k multiplies the λ_wd θ term only
            new, ok, _ = ssse.erase_step(theta, grad_sum(theta, erased), k, float(len(retained_after)), wd_, 1.0,
                                         solve)
            assert bool(ok)
            return new, curv

        def rel(a, b):
            return np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b - np.asarray(theta))

        for erased in (np.array([4]), np.arange(10, 20)):
            retained = np.setdiff1d(everyone, erased)
            exact = solution(retained)
            new, curv = request(theta, held, erased, retained)
            assert rel(new, exact) < 1e-10
            without, _ = request(theta, held, erased, retained, with_decay=False)
            assert rel(without, exact) > 1e-4
            # At a stationary θ*, Σ_S (g_i + λ_wd θ*) = −n_r ∇L_{D_r}(θ*): the erased-only form is the full form.
            full_grad = grad_sum(theta, retained) / len(retained) + wd_ * theta
            full, _ = np.linalg.solve(np.asarray(curv.matrix) / len(retained) + wd * np.eye(len(theta)),
                                      np.asarray(full_grad)), None
            np.testing.assert_allclose(np.asarray(theta) - full, np.asarray(new), rtol=1e-10)
        first, second = np.array([1, 5, 8]), np.array([30, 31, 60, 61, 62])
        after_first = np.setdiff1d(everyone, first)
        union = np.setdiff1d(after_first, second)
        mid, curv = request(theta, held, first, after_first)
        final, _ = request(mid, curv, second, union)
        one, _ = request(theta, held, np.concatenate([first, second]), union)
        np.testing.assert_allclose(np.asarray(final), np.asarray(one), rtol=1e-10)
        assert rel(final, solution(union)) < 1e-10
