"""Identities of the shared kernels against dense references (float64 on tiny problems)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxforget import compat, errors, kernels, mesh


def tiny_problem(key, dtype=jnp.float64, n=12, d_in=5, hidden=4, k=3):
    """A 2-layer tanh net with P = 39 parameters and a batch of inputs."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {
        "l1": {"w": jax.random.normal(k1, (d_in, hidden), dtype), "b": jnp.zeros((hidden,), dtype)},
        "l2": {"w": jax.random.normal(k2, (hidden, k), dtype), "b": 0.1 * jnp.ones((k,), dtype)},
    }
    x = jax.random.normal(k3, (n, d_in), dtype)
    t = jax.random.normal(k4, (n, k), dtype)
    apply = lambda p, x: jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"][None]) @ p["l2"]["w"] + p["l2"]["b"][None]
    return params, x, t, apply


def dense_jacobian(apply, params, x):
    """J as an [n*K, P] matrix (ravel order of ravel_pytree)."""
    flat, unravel = ravel_pytree(params)
    jac = jax.jacfwd(lambda w: apply(unravel(w), x).reshape(-1))(flat)
    return jac, flat, unravel


def ravel(tree):
    return ravel_pytree(tree)[0]


def test_tree_vdot_matches_ravelled_dot(key):
    with compat.enable_x64():
        params, *_ = tiny_problem(key)
        other = jax.tree.map(lambda a: a + 1.0, params)
        expected = jnp.dot(ravel(params), ravel(other))
        np.testing.assert_allclose(optax.tree.vdot(params, other), expected, rtol=1e-14)


def dot_precisions(jaxpr) -> list:
    """The ``precision`` of every ``dot_general`` in a jaxpr, sub-jaxprs (loops, conditionals) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out.extend(dot_precisions(inner))
    return out


def test_inner_products_and_cg_contract_at_highest_precision():
    """CG's inner products decide its step sizes and its stopping rule: on GPU a float32 contraction at default
    precision runs as TF32/bf16 passes, far above the tolerances a forget needs. Traced with the default matmul
    precision (not the test suite's "highest"), every contraction must still carry HIGHEST explicitly."""
    tree = {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.ones(4, jnp.float32)}
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    with jax.default_matmul_precision("default"):
        vdot = dot_precisions(jax.make_jaxpr(optax.tree.vdot)(tree, tree).jaxpr)
        cg = dot_precisions(jax.make_jaxpr(
            lambda b: kernels.cg_solve(lambda v: optax.tree.scale(2.0, v), b, maxiter=3))(tree).jaxpr)
        plain = dot_precisions(jax.make_jaxpr(lambda a: jnp.vdot(a, a))(tree["b"]).jaxpr)
    assert vdot and all(p == highest for p in vdot)
    assert len(cg) >= 2 and all(p == highest for p in cg)
    assert plain and plain[0] != highest  # the check can fail: an unannotated contraction is caught


def test_split_merge_round_trip():
    params = {"a": {"w": 1.0, "b": 2.0}, "head": {"w": 3.0}}
    lin, fix = kernels.split_params(params, lambda path: path[0] == "head")
    assert lin == {"head": {"w": 3.0}} and fix == {"a": {"w": 1.0, "b": 2.0}}
    assert kernels.merge_params(fix, lin) == params


def test_gn_matvec_equals_dense_and_is_symmetric_psd(key):
    with compat.enable_x64():
        params, x, _, apply = tiny_problem(key)
        f = lambda p: apply(p, x)
        n, mu = x.shape[0], 1e-3
        jac, _, unravel = dense_jacobian(apply, params, x)
        h_dense = jac.T @ jac / n + mu * jnp.eye(jac.shape[1])
        ku, kv = jax.random.split(jax.random.key(1))
        u = unravel(jax.random.normal(ku, (jac.shape[1],), jnp.float64))
        v = unravel(jax.random.normal(kv, (jac.shape[1],), jnp.float64))

        def h(v):
            gn = kernels.gn_matvec_sum(f, params, v, jnp.ones((n,), jnp.float64))
            return optax.tree.add_scale(optax.tree.scale(1.0 / n, gn), mu, v)

        np.testing.assert_allclose(ravel(h(v)), h_dense @ ravel(v), rtol=1e-12)
        assert abs(optax.tree.vdot(u, h(v)) - optax.tree.vdot(v, h(u))) < 1e-10
        assert optax.tree.vdot(v, h(v)) >= mu * optax.tree.vdot(v, v)


def test_gn_matvec_equals_hvp_of_linearized_square_loss(key):
    with compat.enable_x64():
        params, x, t, apply = tiny_problem(key)
        f = lambda p: apply(p, x)
        w_u = jax.tree.map(lambda a: 0.3 * jnp.ones_like(a), params)
        v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params)
        weights = jnp.ones((x.shape[0],), jnp.float64)
        loss = lambda w: 0.5 * jnp.sum((kernels.linearized_apply(f, params, w) - t) ** 2)
        gn = kernels.gn_matvec_sum(f, params, v, weights)
        np.testing.assert_allclose(
            ravel(gn), ravel(kernels.hvp(loss, w_u, v)), rtol=1e-11
        )
        g, value = kernels.square_loss_grad_sum(f, params, w_u, t, weights)
        np.testing.assert_allclose(ravel(g), ravel(jax.grad(loss)(w_u)), rtol=1e-12)
        np.testing.assert_allclose(value, loss(w_u), rtol=1e-12)


def test_softmax_ggn_is_cross_entropy_hessian_for_a_linear_model(key):
    with compat.enable_x64():
        params, x, _, _ = tiny_problem(key)
        labels = jnp.arange(x.shape[0]) % 3
        lin_params = params["l2"]
        feats = jnp.tanh(x @ params["l1"]["w"])
        apply = lambda p: feats @ p["w"] + p["b"][None]
        ce = lambda p: -jnp.sum(jax.nn.log_softmax(apply(p))[jnp.arange(x.shape[0]), labels])
        v = jax.tree.map(lambda a: jnp.sin(1.0 + jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), lin_params)
        ggn = kernels.gn_matvec_sum(
            apply, lin_params, v, jnp.ones((x.shape[0],), jnp.float64), kernels.softmax_out_hvp
        )
        np.testing.assert_allclose(
            ravel(ggn), ravel(kernels.hvp(ce, lin_params, v)), rtol=1e-11
        )


def test_fisher_matvec_equals_dense_outer_products(key):
    with compat.enable_x64():
        params, x, t, apply = tiny_problem(key)
        loss_one = lambda p, xi, ti: 0.5 * jnp.sum((apply(p, xi[None])[0] - ti) ** 2)
        weights = (jnp.arange(x.shape[0]) % 2).astype(jnp.float64)
        grads = kernels.per_example_grads(loss_one, params, x, t)
        g = jnp.concatenate([a.reshape(x.shape[0], -1) for a in jax.tree.leaves(grads)], axis=1)
        v = jax.tree.map(lambda a: jnp.sin(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params)
        expected = g.T @ (weights * (g @ ravel(v)))
        got = kernels.fisher_matvec_sum(loss_one, params, v, weights, x, t)
        np.testing.assert_allclose(ravel(got), expected, rtol=1e-11)


def spd_problem(seed, p=30, cond=1e4):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    a = (q * np.logspace(0, np.log10(cond), p)) @ q.T
    return jnp.asarray(a), jnp.asarray(rng.normal(size=p))


def test_cg_equals_dense_solve_float64():
    with compat.enable_x64():
        a, b = spd_problem(0)
        x, info = kernels.cg_solve(lambda v: a @ v, b, tol=1e-11, maxiter=2000)
        exact = jnp.linalg.solve(a, b)
        assert bool(info.converged)
        assert float(jnp.linalg.norm(x - exact) / jnp.linalg.norm(exact)) < 1e-8
        # The reported residual is the true one.
        np.testing.assert_allclose(info.residual_norm, jnp.linalg.norm(b - a @ x), rtol=1e-6)


def test_cg_pytree_with_preconditioner_and_warm_start():
    with compat.enable_x64():
        a, b = spd_problem(1, p=20, cond=1e5)
        diag = jnp.diag(a)
        split = lambda v: {"x": v[:7], "y": v[7:]}
        join = lambda t: jnp.concatenate([t["x"], t["y"]])
        matvec = lambda t: split(a @ join(t))
        exact = jnp.linalg.solve(a, b)
        x, info = kernels.cg_solve(matvec, split(b), tol=1e-12, maxiter=500, precond=lambda t: split(join(t) / diag))
        assert bool(info.converged)
        np.testing.assert_allclose(join(x), exact, rtol=1e-8)
        _, warm = kernels.cg_solve(matvec, split(b), x0=split(exact), tol=1e-8)
        assert int(warm.iterations) == 0


def test_cg_reports_non_convergence_and_check_raises_or_warns():
    with compat.enable_x64():
        a, b = spd_problem(2, cond=1e6)
        _, info = kernels.cg_solve(lambda v: a @ v, b, tol=1e-12, maxiter=3)
        assert not bool(info.converged) and int(info.iterations) == 3
        with pytest.raises(errors.CGNotConvergedError, match="did not converge: relative residual"):
            kernels.check_converged(info, what="test solve")
        with pytest.warns(RuntimeWarning, match="did not converge"):
            kernels.check_converged(info, on_fail="warn")
        _, nan_info = kernels.cg_solve(lambda v: a @ v, b.at[0].set(jnp.nan), maxiter=3)
        with pytest.raises(errors.NonFiniteError, match="not finite"):
            kernels.check_converged(nan_info)


def test_cg_float32_residual_replacement_reaches_true_tolerance():
    a64, b64 = spd_problem(3, p=40, cond=1e3)
    a, b = a64.astype(jnp.float32), b64.astype(jnp.float32)
    x, info = kernels.cg_solve(lambda v: a @ v, b, tol=1e-5, maxiter=5000)
    true_res = float(jnp.linalg.norm(b - a @ x) / jnp.linalg.norm(b))
    # The recursive residual passed first; the true one needed a restart to get there.
    assert bool(info.converged) and int(info.restarts) >= 1 and true_res <= 1e-5 * 1.001


def test_power_iteration_on_a_pytree_operator_matches_eigh():
    """optax.power_iteration, as the methods call it: a matrix-free operator on pytrees."""
    split = lambda v: {"x": v[:10], "y": v[10:]}
    join = lambda t: jnp.concatenate([t["x"], t["y"]])
    with compat.enable_x64():
        a, _ = spd_problem(4, p=25, cond=50)
        lam, _ = optax.power_iteration(lambda t: split(a @ join(t)), v0=split(jnp.ones(25, jnp.float64)),
                                       num_iters=500, error_tolerance=1e-9)
        np.testing.assert_allclose(lam, jnp.linalg.eigvalsh(a).max(), rtol=1e-4)


def test_noise_has_one_key_per_leaf(key):
    tree = {"a": jnp.zeros((3000,)), "b": jnp.zeros((3000,))}
    noise = optax.tree.random_like(key, tree)
    assert not np.allclose(noise["a"], noise["b"])
    assert abs(float(jnp.std(noise["a"])) - 1.0) < 0.05


@pytest.mark.parametrize("num_devices", [1, 2])
def test_sharded_gradient_sum_equals_unsharded(key, num_devices):
    assert jax.device_count() >= 2, "conftest asks for 2 CPU devices"
    with compat.enable_x64():
        _check_sharded_sum(key, num_devices)


def _check_sharded_sum(key, num_devices):
    params, x, t, apply = tiny_problem(key, n=10)
    w_u = jax.tree.map(lambda a: 0.1 * jnp.ones_like(a), params)
    weights = (jnp.arange(10) % 3 != 0).astype(jnp.float64)
    m = mesh.make_mesh(num_devices)

    def batch_fn(args, batch):
        lin, w = args
        xb, tb, cb = batch
        g, value = kernels.square_loss_grad_sum(lambda p: apply(p, xb), lin, w, tb, cb)
        return g, value, jnp.sum(cb)

    data = mesh.shard_rows((x, t, weights), m, batch_size=2)
    total = jax.jit(mesh.data_parallel_sum(batch_fn, m, batch_size=2))
    g, value, count = total((params, w_u), data)
    g_ref, value_ref = kernels.square_loss_grad_sum(lambda p: apply(p, x), params, w_u, t, weights)
    np.testing.assert_allclose(ravel(g), ravel(g_ref), rtol=1e-12)
    np.testing.assert_allclose(value, value_ref, rtol=1e-12)
    assert float(count) == float(weights.sum())
