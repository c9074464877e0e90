"""The shared solvers on abstract problems: Newton-CG, refinement, Nyström, removal kernels and stream state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxforget import compat, errors, kernels, solvers, woodbury


def spd_problem(seed, p=30, cond=1e4):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    return (q * np.logspace(0, np.log10(cond), p)) @ q.T, rng.normal(size=p)


def split(v, at=7):
    return {"x": v[:at], "y": v[at:]}


def join(t):
    return jnp.concatenate([t["x"], t["y"]])


def test_a_newton_cg_step_from_any_start_lands_on_the_minimiser():
    """A quadratic ½wᵀHw − bᵀw: one step from an arbitrary start is the dense solve (pytree weights)."""
    h, b = spd_problem(0, p=20, cond=1e3)
    with compat.enable_x64():
        h, b = jnp.asarray(h), jnp.asarray(b)
        start = split(jnp.asarray(np.random.default_rng(1).normal(size=20)))
        step = jax.jit(lambda w: solvers.newton_cg_step(lambda u: split(h @ join(u) - b), lambda v: split(h @ join(v)),
                                                        w, tol=1e-12, maxiter=500))
        w, g_norm, v_norm, info = step(start)
        exact = np.linalg.solve(np.asarray(h), np.asarray(b))
        assert bool(info.converged)
        np.testing.assert_allclose(np.asarray(join(w)), exact, rtol=1e-9)
        np.testing.assert_allclose(float(g_norm), np.linalg.norm(np.asarray(h @ join(start) - b)), rtol=1e-12)
        np.testing.assert_allclose(float(v_norm), np.linalg.norm(np.asarray(join(start)) - exact), rtol=1e-9)


def test_refinement_reaches_float64_accuracy_with_float32_corrections():
    """float32 CG corrections to a loose tolerance, float64 residuals: float64 accuracy, which a float32 solve
    alone cannot reach at this conditioning."""
    h64, b64 = spd_problem(2, p=40, cond=1e4)
    exact = np.linalg.solve(h64, b64)
    h32 = jnp.asarray(h64, jnp.float32)
    solve32 = jax.jit(lambda g: kernels.cg_solve(lambda v: h32 @ v, g, tol=1e-2, maxiter=400))
    alone, _ = kernels.cg_solve(lambda v: h32 @ v, jnp.asarray(b64, jnp.float32), tol=1e-12, maxiter=400)
    with compat.enable_x64():
        h, b = jnp.asarray(h64), jnp.asarray(b64)

        def gradient(w):
            g = h @ w - b
            return g, float(jnp.linalg.norm(g))

        def correction(g, budget):
            delta, info = solve32(g.astype(jnp.float32))
            return delta.astype(jnp.float64), int(info.iterations)

        out = solvers.refined_newton(jnp.zeros(40), gradient, correction, tol=1e-11, max_corrections=30,
                                     maxiter=100_000)
        w = np.asarray(out.w)
    assert out.rel_residual <= 1e-11 and out.corrections >= 2
    assert out.passes == out.iterations + out.corrections + 1
    assert np.linalg.norm(w - exact) <= 1e-9 * np.linalg.norm(exact)
    assert np.linalg.norm(np.asarray(alone, np.float64) - exact) > 1e-6 * np.linalg.norm(exact)
    # The budget stops it: one correction only.
    with compat.enable_x64():
        short = solvers.refined_newton(jnp.zeros(40), gradient, correction, tol=1e-11, max_corrections=1,
                                       maxiter=100_000)
    assert short.corrections == 1 and short.rel_residual > 1e-11


def test_iterative_refinement_stops_at_tol_after_the_minimum_steps():
    steps_seen = []
    check = lambda w: abs(w - 1.0)
    correct = lambda w: steps_seen.append(w) or w + 0.9 * (1.0 - w)
    w, rel, steps = solvers.iterative_refinement(0.0, check, correct, tol=1e-3, max_steps=10)
    assert rel <= 1e-3 and steps == 4  # 1 → 0.1 → 0.01 → 1e-3 (not yet: rounding) → 1e-4
    _, _, forced = solvers.iterative_refinement(1.0, check, correct, tol=1e-3, max_steps=10, min_steps=2)
    assert forced == 2
    _, rel, capped = solvers.iterative_refinement(0.0, check, correct, tol=1e-30, max_steps=4)
    assert capped == 4 and rel > 1e-30


def test_nystrom_sketch_recovers_a_low_rank_operator_and_preconditions_cg():
    with compat.enable_x64():
        rng = np.random.default_rng(5)
        p, k, mu = 60, 8, 1e-4
        q, _ = np.linalg.qr(rng.normal(size=(p, p)))
        eig = np.concatenate([np.logspace(2, 0, k), np.logspace(-2, -3, p - k)])
        a = jnp.asarray((q * eig) @ q.T)
        nys = solvers.nystrom_sketch(lambda t: split(a @ join(t), 25), split(jnp.zeros(p), 25), rank=20,
                                     key=jax.random.key(0))
        # The top eigenvalues are recovered up to the mass of the discarded tail.
        np.testing.assert_allclose(nys.lam[:k], eig[:k], atol=eig[k:].sum())
        assert float(nys.lam.min()) >= 0
        h = a + mu * jnp.eye(p)
        b = jnp.asarray(rng.normal(size=p))
        matvec = lambda t: split(h @ join(t), 25)
        x_plain, plain = kernels.cg_solve(matvec, split(b, 25), tol=1e-10, maxiter=5000)
        x_pre, pre = kernels.cg_solve(matvec, split(b, 25), tol=1e-10, maxiter=5000,
                                      precond=solvers.nystrom_precond(nys, mu))
        exact = jnp.linalg.solve(h, b)
        assert bool(plain.converged) and bool(pre.converged)
        np.testing.assert_allclose(join(x_pre), exact, rtol=1e-7)
        np.testing.assert_allclose(join(x_plain), exact, rtol=1e-7)
        assert int(pre.iterations) * 3 < int(plain.iterations)


def test_the_preconditioner_cache_is_keyed_by_content_and_variant():
    cache, built = solvers.PreconditionerCache(), []

    def make():
        built.append(1)
        return solvers.Nystrom(jnp.eye(3)[:, :1], jnp.ones(1))

    first = cache.get("core-a", "float32", make)
    assert cache.get("core-a", "float32", make) is first and len(built) == 1
    cache.get("core-a", "float64", make)
    cache.get("core-b", "float32", make)  # another content: the old entries go
    assert len(built) == 3 and len(cache.arrays()) == 1
    cache.clear()
    cache.get("core-b", "float32", make)
    assert len(built) == 4


def test_cholesky_inverse_matches_a_dense_inverse_and_names_a_singular_factor():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 7))
    spd = a @ a.T + 7 * np.eye(7)
    with compat.enable_x64():
        inv = np.asarray(woodbury.cholesky_inverse(jnp.asarray(np.linalg.cholesky(spd))))
    np.testing.assert_allclose(inv, np.linalg.inv(spd), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(inv, inv.T)
    with pytest.raises(errors.DirectSolveError, match="potri failed"):
        woodbury.cholesky_inverse(jnp.array([[1.0, 0.0], [1.0, 0.0]]))


def test_the_dual_row_buffer_holds_the_rows_of_every_request_in_removal_order():
    rng = np.random.default_rng(3)
    inv = rng.normal(size=(12, 12)).astype(np.float32)
    fetched = []

    def fetch(index, m):
        fetched.append(index[:m].tolist())
        return jnp.asarray(inv[index])

    kw = dict(fetch=fetch, write=lambda buf, fresh, target: buf.at[jnp.asarray(target)].set(fresh, mode="drop"),
              zeros=jnp.zeros, num_cols=12, min_bucket=2)
    buf = woodbury.extend_dual_rows(woodbury.DualRowBuffer.empty(), np.array([7, 3]), 6, **kw)
    buf = woodbury.extend_dual_rows(buf, np.array([1, 3, 7]), 6, **kw)  # only row 1 is new
    assert fetched == [[3, 7], [1]] and buf.slots[: buf.count].tolist() == [3, 7, 1]
    np.testing.assert_array_equal(np.asarray(buf.rows)[: buf.count], inv[[3, 7, 1]])
    assert buf.valid.tolist() == [True] * 3 + [False] * 3
    # Rows that are not a superset of the held ones, or another width: start over, reusing memory when it fits.
    again = woodbury.extend_dual_rows(buf, np.array([2]), 6, **kw)
    assert again.slots[: again.count].tolist() == [2] and again.rows.shape == (6, 12)
    wider = woodbury.extend_dual_rows(again, np.array([2, 5]), 8, **kw)
    assert wider.rows.shape == (8, 12) and wider.slots[: wider.count].tolist() == [2, 5]


def test_the_running_primal_inverse_in_blocks_equals_one_update_and_the_dense_inverse():
    rng = np.random.default_rng(4)
    jac = rng.normal(size=(30, 6))
    targets = rng.normal(size=30)
    lam = 0.5
    with compat.enable_x64():
        a_inv = jnp.asarray(np.linalg.inv(jac.T @ jac + lam * np.eye(6)))
        rhs = jnp.asarray(jac.T @ targets)

        def remove_block(inv, b, positions, valid):
            rows = jnp.asarray(jac[positions] * valid[:, None])
            return (*woodbury.primal_remove_rows(inv, b, rows, jnp.asarray(targets[positions] * valid)), rows)

        state = woodbury.PrimalRunningInverse(np.zeros(0, np.int64), a_inv, rhs)
        for request in (np.array([4, 5, 6]), np.array([20])):  # blocks of 2: the first request is two blocks
            state = woodbury.extend_primal_inverse(state, request, block_size=2, remove_block=remove_block,
                                                  keep_rows=True)
        once, b_once = woodbury.primal_remove_rows(a_inv, rhs, jnp.asarray(jac[[4, 5, 6, 20]]),
                                                  jnp.asarray(targets[[4, 5, 6, 20]]))
        keep = np.setdiff1d(np.arange(30), [4, 5, 6, 20])
    assert state.removed.tolist() == [4, 5, 6, 20] and len(state.blocks) == 3
    np.testing.assert_allclose(np.asarray(state.inverse), np.asarray(once), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(np.asarray(state.rhs), np.asarray(b_once), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(state.inverse), np.linalg.inv(jac[keep].T @ jac[keep] + lam * np.eye(6)),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(state.blocks[-1])[1], 0.0)  # the padded slot of the last block
