"""The retrain-oracle cache and population training (``specs/evaluation.md`` §2; §12 "cache", test 6)."""

import collections
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxforget import errors, oracle

N_MODELS = 3

KEY_ARGS = dict(
    dataset_fingerprint="d" * 64,
    forget_ids=[5, 1, 3],
    model_config={"name": "mlp", "width": 8},
    train_config={"lr": 0.1, "epochs": 2, "batch_size": 32},
    seeds=[0, 1, 2],
    n_models=N_MODELS,
    code_version="0.1.0",
)


def make_entry(n=N_MODELS, seed=0, params=True) -> oracle.OracleEntry:
    rng = np.random.default_rng(seed)
    return oracle.OracleEntry(
        params={"dense": {"kernel": rng.normal(size=(n, 4, 3)).astype(np.float32), "bias": np.zeros((n, 3))},
                "steps": np.arange(n)} if params else None,
        logits={"forget": rng.normal(size=(n, 5, 3)).astype(np.float32),
                "test": rng.normal(size=(n, 7, 3)).astype(np.float32)},
        accuracies={"forget": rng.uniform(size=n), "test": rng.uniform(size=n)},
        train_seconds=rng.uniform(1, 2, size=n),
        meta={"recipe": "toy", "seeds": list(range(n))},
    )


def assert_entries_equal(a: oracle.OracleEntry, b: oracle.OracleEntry):
    assert a.n_models == b.n_models
    assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype
    for field in ("logits", "accuracies"):
        da, db = getattr(a, field), getattr(b, field)
        assert set(da) == set(db)
        for k in da:
            np.testing.assert_array_equal(da[k], db[k])
            assert da[k].dtype == db[k].dtype
    np.testing.assert_array_equal(a.train_seconds, b.train_seconds)
    assert a.meta == b.meta


class CountingTrainer:
    """A ``train_fn`` that records how often it was called."""

    def __init__(self, n=N_MODELS, fail=False):
        self.calls, self.n, self.fail = 0, n, fail

    def __call__(self):
        self.calls += 1
        if self.fail:
            raise RuntimeError("training diverged")
        return make_entry(self.n, seed=self.calls)


def entries_and_tmp(directory):
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(n for n in names if not n.startswith(".")), sorted(n for n in names if n.startswith("."))


# -------------------------------------------------------------------------- keys


def test_cache_key_is_canonical():
    key = oracle.cache_key(**KEY_ARGS)
    assert len(key) == 64 and int(key, 16) >= 0
    # Order and repeats of forget ids, and dict key order, do not matter.
    same = {**KEY_ARGS, "forget_ids": np.array([3, 5, 1, 5]),
            "train_config": {"batch_size": 32, "epochs": 2, "lr": 0.1}}
    assert oracle.cache_key(**same) == key
    # Numpy scalars and tuples canonicalise to their JSON forms.
    assert oracle.cache_key(**{**KEY_ARGS, "model_config": {"name": "mlp", "width": np.int64(8)}}) == key
    assert oracle.cache_key(**{**KEY_ARGS, "seeds": (0, 1, 2)}) == key


@pytest.mark.parametrize(
    "change",
    [
        {"dataset_fingerprint": "e" * 64},
        {"forget_ids": [5, 1, 4]},
        {"forget_ids": [5, 1]},
        {"model_config": {"name": "mlp", "width": 16}},
        {"train_config": {"lr": 0.1, "epochs": 3, "batch_size": 32}},
        {"seeds": [2, 1, 0]},
        {"n_models": 4},
        {"code_version": "0.1.1"},
    ],
)
def test_cache_key_changes_with_every_component(change):
    assert oracle.cache_key(**{**KEY_ARGS, **change}) != oracle.cache_key(**KEY_ARGS)


def test_cache_key_bad_inputs():
    with pytest.raises(errors.ShapeDtypeError, match="integer"):
        oracle.cache_key(**{**KEY_ARGS, "forget_ids": [1.0, 2.0]})
    with pytest.raises(TypeError, match=r"train_config\.opt"):
        oracle.cache_key(**{**KEY_ARGS, "train_config": {"opt": object()}})
    with pytest.raises(ValueError, match="n_models"):
        oracle.cache_key(**{**KEY_ARGS, "n_models": 0})


def test_dataset_fingerprint():
    x, y, ids = np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]), np.arange(4)
    fp = oracle.dataset_fingerprint(x, y, ids)
    assert fp == oracle.dataset_fingerprint(x.copy(), y.copy(), ids.copy())
    x2 = x.copy()
    x2[1, 1] = 1.0
    others = [
        oracle.dataset_fingerprint(x2, y, ids),
        oracle.dataset_fingerprint(x, y[::-1], ids),
        oracle.dataset_fingerprint(x, y, ids + 1),
        oracle.dataset_fingerprint(x.astype(np.float64), y, ids),  # dtype
        oracle.dataset_fingerprint(x.reshape(4, 2, 1), y, ids),  # shape
    ]
    assert len({fp, *others}) == 6
    with pytest.raises(errors.ShapeDtypeError, match=r"\(4, 2\).*\(3,\)"):
        oracle.dataset_fingerprint(x, y[:3], ids)


# -------------------------------------------------------------------------- entries


def test_entry_checks_model_count_consistency():
    good = make_entry()
    assert good.n_models == N_MODELS
    assert good.logits["forget"].dtype == np.float32
    with pytest.raises(errors.ShapeDtypeError, match=r"logits\['test'\].*n_models=3"):
        oracle.OracleEntry(None, {"test": np.zeros((2, 5, 3))}, {}, np.ones(3))
    with pytest.raises(errors.ShapeDtypeError, match=r"accuracies\['test'\]"):
        oracle.OracleEntry(None, {}, {"test": np.zeros(4)}, np.ones(3))
    with pytest.raises(errors.ShapeDtypeError, match=r"\['w'\].*leading axis of n_models=3"):
        oracle.OracleEntry({"w": np.zeros((2, 4))}, {}, {}, np.ones(3))
    with pytest.raises(errors.ShapeDtypeError, match="train_seconds"):
        oracle.OracleEntry(None, {}, {}, np.ones((3, 1)))
    with pytest.raises(errors.NonFiniteError, match="forget"):
        oracle.OracleEntry(None, {"forget": np.full((3, 2, 2), np.nan)}, {}, np.ones(3))
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        oracle.OracleEntry(None, {}, {"test": np.array([0.5, 95.0, 0.5])}, np.ones(3))
    with pytest.raises(TypeError, match="JSON"):
        oracle.OracleEntry(None, {}, {}, np.ones(3), meta={"x": object()})


# -------------------------------------------------------------------------- the cache


def test_same_key_loads_with_zero_training_calls(tmp_path):
    cache = oracle.OracleCache(tmp_path / "oracles")
    key = oracle.cache_key(**KEY_ARGS)
    train = CountingTrainer()
    first, info = cache.get_or_train(key, N_MODELS, train)
    assert train.calls == 1 and info["source"] == "trained" and info["key"] == key
    assert info["seconds"] >= 0 and info["path"] == cache.path(key)

    train_again = CountingTrainer()
    second, info2 = oracle.OracleCache(tmp_path / "oracles").get_or_train(key, N_MODELS, train_again)
    assert train_again.calls == 0
    assert info2["source"] == "loaded" and info2["key"] == key
    assert_entries_equal(first, second)
    assert entries_and_tmp(tmp_path / "oracles") == ([key], [])


def test_changed_forget_ids_retrain(tmp_path):
    cache = oracle.OracleCache(tmp_path)
    train = CountingTrainer()
    key_a = oracle.cache_key(**KEY_ARGS)
    key_b = oracle.cache_key(**{**KEY_ARGS, "forget_ids": [1, 3, 5, 7]})
    assert key_a != key_b
    cache.get_or_train(key_a, N_MODELS, train)
    _, info = cache.get_or_train(key_b, N_MODELS, train)
    assert train.calls == 2 and info["source"] == "trained"
    cache.get_or_train(key_a, N_MODELS, train)
    assert train.calls == 2
    assert entries_and_tmp(tmp_path)[0] == sorted([key_a, key_b])


def test_model_count_mismatch_raises(tmp_path):
    cache = oracle.OracleCache(tmp_path)
    cache.save("k", make_entry(N_MODELS))
    with pytest.raises(oracle.OracleCacheError, match=r"holds 3 models, but 4 were requested"):
        cache.load("k", 4)
    train = CountingTrainer()
    with pytest.raises(oracle.OracleCacheError, match="holds 3 models"):
        cache.get_or_train("k", 2, train)
    assert train.calls == 0  # never silently retrained over
    # A train_fn that returns the wrong count is not saved.
    with pytest.raises(oracle.OracleCacheError, match="returned 3 models"):
        cache.get_or_train("other", 4, CountingTrainer(n=3))
    assert cache.load("other", 3) is None


def _entry_files(path):
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


def _damaged_copy(tmp_path, name, mode):
    """A copy of the cache at ``tmp_path / "c"`` with entry file ``name`` truncated or one byte flipped."""
    scratch = tmp_path / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(tmp_path / "c", scratch)
    cache = oracle.OracleCache(scratch)
    target = os.path.join(cache.path("k"), name)
    with open(target, "r+b") as f:
        data = bytearray(f.read())
        if mode == "truncate":
            f.truncate(len(data) // 2)
        else:
            data[len(data) // 2] ^= 0xFF
            f.seek(0)
            f.write(data)
    return cache, target


def test_corrupted_entry_raises_naming_the_path(tmp_path):
    cache = oracle.OracleCache(tmp_path / "c")
    entry = make_entry()
    path = cache.save("k", entry)
    files = _entry_files(path)
    assert "entry.json" in files and sum(f.startswith("arrays/") for f in files) > 3
    for name in files:
        for mode in ("truncate", "flip"):
            damaged, target = _damaged_copy(tmp_path, name, mode)
            train = CountingTrainer()
            with pytest.raises(oracle.OracleCacheError, match="unreadable|corrupt") as e:
                damaged.get_or_train("k", N_MODELS, train)
            assert damaged.path("k") in str(e.value)
            if name != "entry.json":
                assert target in str(e.value)  # the damaged file itself is named
            assert train.calls == 0  # never silently retrained over


def test_missing_or_extra_files_and_missing_sidecar_raise(tmp_path):
    cache = oracle.OracleCache(tmp_path)
    path = cache.save("k", make_entry())
    extra = os.path.join(path, "arrays", "stray")
    with open(extra, "w") as f:
        f.write("x")
    with pytest.raises(oracle.OracleCacheError, match="is unexpected") as e:
        cache.load("k", N_MODELS)
    assert extra in str(e.value)
    os.remove(extra)
    gone = os.path.join(path, "arrays", _entry_files(os.path.join(path, "arrays"))[0])
    os.remove(gone)
    with pytest.raises(oracle.OracleCacheError, match="is missing") as e:
        cache.load("k", N_MODELS)
    assert gone in str(e.value)
    sidecar = os.path.join(path, "entry.json")
    os.remove(sidecar)
    train = CountingTrainer()
    with pytest.raises(oracle.OracleCacheError, match="unreadable") as e:
        cache.get_or_train("k", N_MODELS, train)
    assert sidecar in str(e.value) and train.calls == 0


def test_sidecar_of_another_key_raises(tmp_path):
    cache = oracle.OracleCache(tmp_path)
    path = cache.save("k", make_entry())
    os.rename(path, cache.path("k2"))
    with pytest.raises(oracle.OracleCacheError, match="records key 'k'"):
        cache.load("k2", N_MODELS)


def test_failing_training_or_saving_leaves_no_entry(tmp_path, monkeypatch):
    cache = oracle.OracleCache(tmp_path)
    with pytest.raises(RuntimeError, match="diverged"):
        cache.get_or_train("k", N_MODELS, CountingTrainer(fail=True))
    assert cache.load("k", N_MODELS) is None
    assert entries_and_tmp(tmp_path) == ([], [])

    # Saving fails after orbax has written the arrays (the sidecar write raises): nothing is visible.
    def broken_write_json(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(oracle.report, "write_json", broken_write_json)
    with pytest.raises(OSError, match="disk full"):
        cache.get_or_train("k", N_MODELS, CountingTrainer())
    assert cache.load("k", N_MODELS) is None
    assert entries_and_tmp(tmp_path) == ([], [])


def test_save_replaces_an_existing_entry(tmp_path):
    cache = oracle.OracleCache(tmp_path)
    cache.save("k", make_entry(seed=1))
    newer = make_entry(seed=2)
    cache.save("k", newer)
    assert_entries_equal(cache.load("k", N_MODELS), newer)
    assert entries_and_tmp(tmp_path) == (["k"], [])


def test_entry_without_params_and_params_like(tmp_path):
    cache = oracle.OracleCache(tmp_path)
    no_params = make_entry(params=False)
    cache.save("outputs-only", no_params)
    assert_entries_equal(cache.load("outputs-only", N_MODELS), no_params)

    # Custom pytree nodes come back in the caller's structure when a one-model template is given.
    Params = collections.namedtuple("Params", ["w", "b"])
    stacked = Params(w=np.ones((N_MODELS, 2, 2), np.float32), b=(np.arange(N_MODELS, dtype=np.float32),))
    entry = oracle.OracleEntry(stacked, {}, {"test": np.full(N_MODELS, 0.5)}, np.ones(N_MODELS))
    cache.save("custom", entry)
    like = Params(w=jax.ShapeDtypeStruct((2, 2), jnp.float32), b=(jax.ShapeDtypeStruct((), jnp.float32),))
    loaded = cache.load("custom", N_MODELS, params_like=like)
    assert isinstance(loaded.params, Params)
    assert_entries_equal(loaded, entry)
    with pytest.raises(errors.ShapeDtypeError, match="params_like"):
        cache.load("custom", N_MODELS, params_like=Params(w=np.zeros((2, 3), np.float32), b=(np.float32(0),)))


def test_invalid_keys_are_rejected(tmp_path):
    cache = oracle.OracleCache(tmp_path)
    for bad in ("", ".hidden", "a/b", "../x"):
        with pytest.raises(ValueError, match="invalid key"):
            cache.path(bad)


# -------------------------------------------------------------------------- populations


def _least_squares_trainer(steps=5, lr=0.1):
    """A few gradient-descent steps on a fixed least-squares problem, from a key-dependent init."""
    x = jax.random.normal(jax.random.key(123), (16, 3), jnp.float32)
    y = x @ jnp.array([1.0, -1.0, 0.5], jnp.float32)

    def train_one(key):
        w = jax.random.normal(key, (3,), jnp.float32)
        for _ in range(steps):
            w = w - lr * x.T @ (x @ w - y) / x.shape[0]
        return {"w": w, "loss": jnp.mean((x @ w - y) ** 2)}

    return train_one


def test_train_population_vectorised_equals_loop():
    train_one = _least_squares_trainer()
    seeds = [0, 1, 2, 7]
    vec = oracle.train_population(train_one, seeds)
    loop = oracle.train_population(jax.jit(train_one), seeds, vectorize=False)
    chunked = oracle.train_population(train_one, seeds, batch_size=3)
    assert vec["w"].shape == (4, 3) and vec["loss"].shape == (4,)
    for other in (loop, chunked):
        for a, b in zip(jax.tree.leaves(vec), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Model i depends on seeds[i] alone, and different seeds give different models.
    single = train_one(jax.random.key(7))
    np.testing.assert_allclose(np.asarray(vec["w"][3]), np.asarray(single["w"]), rtol=1e-5, atol=1e-6)
    assert len({tuple(np.round(np.asarray(w), 4)) for w in vec["w"]}) == 4


def test_population_params_round_trip_through_the_cache(tmp_path):
    seeds = [0, 1]
    cache = oracle.OracleCache(tmp_path)
    key = oracle.cache_key(**{**KEY_ARGS, "seeds": seeds, "n_models": len(seeds)})
    train_one = _least_squares_trainer()

    def train_fn():
        out = oracle.train_population(train_one, seeds)  # device arrays, stacked over seeds
        return oracle.OracleEntry(params={"w": out["w"]}, logits={}, accuracies={}, train_seconds=np.ones(2),
                                  meta={"loss": np.asarray(out["loss"]).tolist()})

    trained, info = cache.get_or_train(key, 2, train_fn)
    assert info["source"] == "trained" and isinstance(trained.params["w"], jax.Array)
    loaded, info = cache.get_or_train(key, 2, train_fn, params_like={"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert info["source"] == "loaded"
    np.testing.assert_array_equal(loaded.params["w"], np.asarray(trained.params["w"]))
    assert loaded.meta == trained.meta
