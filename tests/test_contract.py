"""The method contract, proven from outside the library: a method defined in this file (not in ``jaxforget``) runs
through the forget job, the comparison and the benchmark, with no change to any library file; the registry names
its methods and refuses unknown ones."""

import json

import jax
import numpy as np
import pytest
from helpers import TINY_MLP, tiny_data, tiny_forget_job, tiny_method

from jaxforget import benchmark, compare, errors, experiment, methods, report, train
from jaxforget import config as config_lib
from jaxforget.methods import ClassifierMethod

pytestmark = pytest.mark.xdist_group("contract")


class OneEpochFinetune(ClassifierMethod):
    """Fine-tunes the published classifier for one epoch on the retained data (a new method in 15 lines)."""

    name = "one_epoch_finetune"

    def unlearn(self, state, *, forget_rows, retain_rows, key):
        del forget_rows
        batch = min(self.config.train.batch_size, len(retain_rows))
        seed, steps = methods.base.seed_of(key), len(retain_rows) // batch  # host-side: requests run under a guard
        plan = lambda epoch: train.epoch_plan(retain_rows, batch, seed=seed, epoch=epoch,
                                              num_steps=self.num_train // batch)
        variables, _ = train.fit(self.model, state.variables, self.splits.train.x, self.splits.train.y, plan,
                                 epochs=1, total_steps=steps, learning_rate=0.01, momentum=0.9)
        return variables, {"steps": steps, "examples": steps * batch}


@pytest.fixture
def registered(monkeypatch):
    """The new method under its name, for this test only (one registry line, set from outside the library)."""
    monkeypatch.setitem(methods.METHODS, OneEpochFinetune.name, OneEpochFinetune)


def test_the_registry_names_every_method_and_refuses_unknown_ones():
    assert {"mixed_linear", "retrain", "finetune", "neggrad", "random_label"} <= set(methods.METHODS)
    with pytest.raises(KeyError, match="Unknown method 'finetuen'; valid: certified_removal, finetune, "):
        methods.get_method("finetuen")
    for name, cls in methods.METHODS.items():
        assert cls.name == name and cls.default_config().name == name


def test_a_new_method_runs_the_forget_job(registered, tmp_path):
    rep = experiment.run(tiny_forget_job(OneEpochFinetune.name), str(tmp_path))
    assert rep["method"] == OneEpochFinetune.name and [r["request"] for r in rep["requests"]] == [1, 2]
    for r in rep["requests"]:
        assert r["forget"]["solver"] == OneEpochFinetune.name and r["forget"]["iterations"] > 0
        assert 0 < r["rel_weight_distance"] < float("inf") and set(r["retrain"]) == {"retrain"}
        assert r["readouts"]["test"]["oracle_accuracy"] > 0.5  # the gold standard learned the task
    assert rep["recompilations_between_requests"] == 0
    assert "one_epoch_finetune forget" in report.markdown_table(rep)
    # Retrain oracles are cached by content: a rerun elsewhere with the same cache trains none.
    job = tiny_forget_job(OneEpochFinetune.name)
    job.eval.oracle_cache = str(tmp_path / "oracle_cache")
    again = experiment.run(job, str(tmp_path / "again"))
    assert [r["oracle"]["source"] for r in again["requests"]] == ["loaded", "loaded"]
    assert [r["readouts"] for r in again["requests"]] == [r["readouts"] for r in rep["requests"]]


def test_a_new_method_runs_the_comparison(registered, tmp_path):
    config = config_lib.compare_job()
    config.data = tiny_data()
    config.methods[OneEpochFinetune.name] = config_lib.method_entry(OneEpochFinetune.name, TINY_MLP)
    tiny_method(config.methods[OneEpochFinetune.name].method)
    config.seeds, config.eval.n_models = (0, 1, 2), 4
    config.eval.relearn.max_epochs, config.eval.relearn.size = 2, 100
    rep = compare.run(config, str(tmp_path))
    report.validate_compare_report(rep)
    assert rep["methods"] == [OneEpochFinetune.name] and rep["seeds"] == [0, 1, 2]
    accuracy = {r["split"]: r for r in rep["metrics"] if r["name"] == "accuracy"}
    assert set(accuracy) == {"forget", "retain", "test"} and accuracy["test"]["retrain_mean"] > 0.5
    assert rep["challenge"][OneEpochFinetune.name]["n_models"] == 4


def test_a_new_method_runs_the_benchmark(registered, tmp_path):
    config = benchmark_config(tiny_forget_job(OneEpochFinetune.name))
    out = benchmark.run(config, str(tmp_path))
    w = out["workloads"]["new"]
    assert w["method"] == OneEpochFinetune.name and len(w["per_request"]) == 2
    for r in w["per_request"]:
        assert r["forget_over_retrain_time"]["retrain"] == pytest.approx(
            r["forget_seconds"] / r["retrain"]["retrain"]["seconds"], rel=1e-9)
    assert json.loads((tmp_path / "benchmark.json").read_text())["workloads"]["new"]["method"] == OneEpochFinetune.name
    assert "| new | one_epoch_finetune |" in benchmark.markdown(out)


def benchmark_config(job):
    import ml_collections

    return ml_collections.ConfigDict(dict(
        repeats=1, workloads={"new": job}, targets=dict(max_time_ratio={"retrain": 0.2}), studies={},
        evaluation=dict(n_models=4, num_examples=10, bruteforce_examples=2)))


def test_every_registered_method_checkpoints_through_its_abstract_state(tmp_path):
    """A state restores into ``abstract_state()`` with the same structure, shapes and dtypes, for every method."""
    from jaxforget import checkpoint

    for name in methods.METHODS:
        method = methods.build(tiny_forget_job(name))
        state = method.init(jax.random.key(0))
        ckpt = checkpoint.Checkpointer(str(tmp_path / name))
        ckpt.save(0, state, {"method": name})
        restored, meta = ckpt.restore(0, method.abstract_state())
        ckpt.close()
        assert meta == {"method": name}
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["mixed_linear", "finetune", "sisa"])
def test_a_state_is_bound_to_the_data_it_was_made_on(name):
    job = tiny_forget_job(name)
    if name == "mixed_linear":
        job.method.linearize = "head"
    made_on = methods.build(job)
    state = made_on.init(jax.random.key(0))
    job.data.seed = 1  # another split of the same size
    other = methods.build(job)
    assert other.num_train == made_on.num_train
    ids = other.forgettable_ids()[:2]
    with pytest.raises(errors.StateMismatchError, match="another dataset, split, core"):
        other.forget(state, ids)
    with pytest.raises(errors.StateMismatchError):
        other.retrain(state)
    made_on.forget(state, made_on.forgettable_ids()[:2])  # its own method takes it
    # Bound to the config that makes the model too: another model-defining field is refused, a per-request one
    # (noise, solver, unlearning schedule) is not.
    job.data.seed = 0
    defining, per_request = {"mixed_linear": ("mu", "sigma"), "finetune": ("train.epochs", "epochs"),
                             "sisa": ("budget.epochs", None)}[name]
    for field, refused in ((defining, True), (per_request, False)):
        if field is None:
            continue
        changed = job.copy_and_resolve_references()
        *path, last = field.split(".")
        node = changed.method
        for key in path:
            node = node[key]
        node[last] = node[last] * 2 if node[last] else 0.5
        other = methods.build(changed)
        if refused:
            with pytest.raises(errors.StateMismatchError, match="model config"):
                other.forget(state, ids)
        else:
            other.forget(state, made_on.forgettable_ids()[:2])


def _config_leaves(section, prefix="method."):
    for key, value in section.items():
        if hasattr(value, "items"):
            yield from _config_leaves(value, f"{prefix}{key}.")
        elif key != "name":  # the registry names an unknown method (tested above)
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_refuses_bad_configs_at_construction_and_bad_requests_by_name(name):
    """The bad-input table, for every registered method: a non-finite or out-of-range number, a misspelt choice and
    an unknown field are refused when the method is built (before any training), naming the field; every bad
    request raises its named error and leaves the state it was given unchanged, bit for bit."""
    for field, value in _config_leaves(tiny_forget_job(name).method):
        bads = ([float("nan"), float("inf"), -1.0] if isinstance(value, float) and not isinstance(value, bool)
                else [-1] if isinstance(value, int) and not isinstance(value, bool)
                else ["misspelt"] if isinstance(value, str) else [])
        for bad in bads:
            job = tiny_forget_job(name)
            *path, last = field.split(".")[1:]
            node = job.method
            for key in path:
                node = node[key]
            with node.ignore_type():
                node[last] = bad
            with pytest.raises(errors.ConfigError, match=last):
                methods.build(job)
    job = tiny_forget_job(name)
    job.method.misspelt_field = 1
    with pytest.raises(errors.ConfigError, match="misspelt_field"):
        methods.build(job)

    method = methods.build(tiny_forget_job(name))
    state = method.init(jax.random.key(0))
    ids = method.forgettable_ids()
    state, _ = method.forget(state, ids[:2], key=jax.random.key(1))
    before = [np.array(leaf) for leaf in jax.tree.leaves(state)]
    table = [([], errors.EmptyRequestError, "empty"),
             ([10**9], errors.UnknownIdsError, "Unknown sample ids"),
             ([ids[3], ids[3]], errors.DuplicateIdsError, "Duplicate ids"),
             ([ids[0]], errors.AlreadyForgottenError, "Ids already forgotten"),
             (np.asarray(ids[3:5], np.float32), errors.ShapeDtypeError, "must be integers"),
             (np.asarray(ids[3:7]).reshape(2, 2), errors.ShapeDtypeError, "1-D")]
    if method.protected_ids().size:
        table.append(([method.protected_ids()[0]], errors.CoreIdsError, "core"))
    for bad, error, message in table:
        with pytest.raises(error, match=message):
            method.forget(state, bad, key=jax.random.key(2))
        for a, b in zip(before, jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
