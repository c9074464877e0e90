"""Train once, forget over time, verify: the workflow from Python and from the launchers, its ledger, idempotent
replays, and every bad input refused by name with the saved state unchanged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import tiny_forget_job

from jaxforget import checkpoint, errors, methods, workflow

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("workflow")


def saved_steps(workdir):
    return sorted(p.name for p in (Path(workdir) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("model"))
    config = tiny_forget_job("finetune")
    return workdir, config, workflow.train(config, workdir)


def test_train_saves_the_model_and_the_ids_a_request_may_name(trained):
    workdir, config, model = trained
    assert model["method"] == "finetune" and len(model["forgettable_ids"]) == model["num_train"]
    assert json.loads((Path(workdir) / "model.json").read_text())["config_sha256"] == workflow.config_sha256(config)
    assert workflow.train(config, workdir) == json.loads((Path(workdir) / "model.json").read_text())  # a no-op
    other = tiny_forget_job("neggrad")
    with pytest.raises(workflow.WorkdirError, match=r"already holds a model of method 'finetune'.*method 'neggrad'"):
        workflow.train(other, workdir)


def test_a_request_is_applied_once_recorded_and_verified(trained):
    workdir, config, model = trained
    method, state, _, _ = workflow.load(workdir)
    ids = np.asarray(model["forgettable_ids"][:5])
    live, _ = method.forget(state, ids)  # what the live object would do with the same request
    record = workflow.forget(workdir, ids, request_id="ticket-1")
    assert record["status"] == "applied" and record["request"] == 1 and record["ids"] == sorted(ids.tolist())
    assert record["params_sha256_before"] != record["params_sha256_after"]
    # The restored state forgets exactly like the live one: the same parameters, bit for bit.
    assert record["params_sha256_after"] == workflow.params_sha256(method.params(live))
    steps = saved_steps(workdir)
    again = workflow.forget(workdir, ids[::-1], request_id="ticket-1")  # a replay: reported, not applied twice
    assert again["status"] == "already_applied" and saved_steps(workdir) == steps
    with pytest.raises(workflow.RequestIdError, match="'ticket-1' was already applied"):
        workflow.forget(workdir, model["forgettable_ids"][10:12], request_id="ticket-1")
    assert saved_steps(workdir) == steps
    result = workflow.verify(workdir)
    assert result["ok"], result
    ledger = json.loads((Path(workdir) / "ledger.json").read_text())["requests"]
    assert [r["request_id"] for r in ledger] == ["ticket-1"]


@pytest.mark.parametrize("ids, error, message", [
    ([], errors.EmptyRequestError, "empty"),
    ([10**9], errors.UnknownIdsError, "Unknown sample ids"),
    ("FIRST,FIRST", errors.DuplicateIdsError, "Duplicate ids"),
])
def test_bad_requests_are_refused_by_name_and_change_nothing(trained, ids, error, message):
    workdir, _, model = trained
    if ids == "FIRST,FIRST":
        ids = [model["forgettable_ids"][20]] * 2
    steps = saved_steps(workdir)
    with pytest.raises(error, match=message):
        workflow.forget(workdir, ids)
    assert saved_steps(workdir) == steps


def test_ids_files_parse_or_name_the_bad_line(tmp_path):
    good = tmp_path / "ids.csv"
    good.write_text("id\n3\n5, 9  # a comment\n\n11;12\n")
    assert workflow.parse_ids(str(good)).tolist() == [3, 5, 9, 11, 12]
    np.save(tmp_path / "ids.npy", np.array([4, 2]))
    assert workflow.parse_ids(str(tmp_path / "ids.npy")).tolist() == [4, 2]
    bad = tmp_path / "bad.txt"
    bad.write_text("3\n4\nfive\n")
    with pytest.raises(errors.ShapeDtypeError, match=r"bad.txt, line 3: 'five' is not an integer id"):
        workflow.parse_ids(str(bad))
    with pytest.raises(errors.EmptyRequestError):
        workflow.parse_ids(str(tmp_path / "ids.csv").replace("ids.csv", "ids.csv") if False else "#")


def test_evaluate_judges_against_a_retrain_and_catches_a_tampered_ledger(tmp_path):
    # Its own workdir: it forges a checkpoint, and it must not depend on which tests ran before it on this worker.
    workdir = str(tmp_path / "model")
    model = workflow.train(tiny_forget_job("finetune"), workdir)
    workflow.forget(workdir, model["forgettable_ids"][:5])
    out = workflow.evaluate_workdir(workdir)
    assert out["verification"]["ok"] and out["num_forgotten"] == 5
    assert 0 <= out["readouts"]["test"]["oracle_accuracy"] <= 1
    assert json.loads((Path(workdir) / "evaluation.json").read_text())["method"] == "finetune"
    # A checkpoint whose ledger record does not match its state fails verification, naming the check.
    method, state, meta, step = workflow.load(workdir)
    forged = {**meta, "ledger": [{**meta["ledger"][0], "ids": meta["ledger"][0]["ids"][:-1]}]}
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    ckpt.save(step + 1, state, forged)
    ckpt.close()
    with pytest.raises(workflow.VerificationError, match="ledger: .*the ledger 4"):
        workflow.evaluate_workdir(workdir)


def test_mixed_linear_refuses_core_ids_and_another_config(tmp_path):
    workdir = str(tmp_path / "ml")
    config = tiny_forget_job("mixed_linear")
    config.method.linearize = "head"
    model = workflow.train(config, workdir)
    method = methods.build(config)
    core = method.splits.core_ids[:2]
    assert not set(core.tolist()) & set(model["forgettable_ids"])
    steps = saved_steps(workdir)
    with pytest.raises(errors.CoreIdsError, match="core set"):
        workflow.forget(workdir, core)
    other = tiny_forget_job("finetune")
    with pytest.raises(workflow.WorkdirError, match=r"method 'mixed_linear'.*given config is method 'finetune'"):
        workflow.forget(workdir, model["forgettable_ids"][:2], config=other)
    assert saved_steps(workdir) == steps
    record = workflow.forget(workdir, model["forgettable_ids"][:3])
    assert record["request_id"] == "request-1" and record["info"]["solver"].startswith("direct")
    out = workflow.evaluate_workdir(workdir)
    assert out["readouts"]["weights"]["relative"] <= 1e-3  # the exact forget sits on its retrain


def test_the_launchers_train_forget_and_evaluate(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXFORGET_PROGRESS="0")
    workdir = tmp_path / "cli"

    def launch(module, *args):
        return subprocess.run([sys.executable, "-m", f"launch.{module}", f"--workdir={workdir}", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)

    out = launch("train", "--config=configs/baselines_digits.py:method=random_label,quick")
    assert out.returncode == 0, out.stderr
    ids = json.loads((workdir / "model.json").read_text())["forgettable_ids"][:4]
    (tmp_path / "ids.txt").write_text("\n".join(map(str, ids)))
    out = launch("forget", f"--ids={tmp_path / 'ids.txt'}", "--request_id=t-1")
    assert out.returncode == 0 and "forgot 4 ids (t-1) with random_label" in out.stdout, out.stderr
    out = launch("forget", f"--ids={ids[0]},{ids[0] + 100000}")
    assert out.returncode == 2 and "error: UnknownIdsError" in out.stderr
    out = launch("evaluate")
    assert out.returncode == 0 and "verification OK" in out.stdout, out.stderr
    out = launch("evaluate", "--verify_only")
    assert out.returncode == 0 and json.loads(out.stdout)["ok"]
    _ = jax  # the launchers run in subprocesses; this process only reads their files


def test_a_seeded_noise_key_makes_requests_bit_identical_and_an_unseeded_one_stays_secret(tmp_path):
    config = tiny_forget_job("mixed_linear")
    config.method.linearize = "head"
    config.method.sigma = 1e-2
    records = {}
    for run in ("a", "b"):
        workdir = str(tmp_path / run)
        model = workflow.train(config, workdir)
        ids = model["forgettable_ids"]
        records[run] = [workflow.forget(workdir, ids[:3], noise_seed=7), workflow.forget(workdir, ids[3:5])]
    seeded, secret = zip(*records.values(), strict=True)
    assert seeded[0]["params_sha256_after"] == seeded[1]["params_sha256_after"]
    assert seeded[0]["noise"] == {"seed": 7}
    assert secret[0]["params_sha256_after"] != secret[1]["params_sha256_after"]
    assert secret[0]["noise"] == "secret" and "7" not in json.dumps(secret[0]["noise"])


def test_the_residual_budget_warns_and_retrains_exactly_when_asked(tmp_path, capsys):
    exact = tiny_forget_job("mixed_linear")
    exact.method.linearize = "head"
    exact.method.sigma = 0.0  # noiseless: the published retrain below is comparable bit for bit
    workdir = str(tmp_path / "exact")
    ids = workflow.train(exact, workdir)["forgettable_ids"]
    record = workflow.forget(workdir, ids[:3])
    assert not record["residual"]["over_budget"] and record["residual_total"] <= exact.residual_budget
    sgd = exact.copy_and_resolve_references()
    sgd.method.solver = "sgd"  # the paper's approximate solver: it leaves a measured residual
    workdir = str(tmp_path / "sgd")
    workflow.train(sgd, workdir)
    record = workflow.forget(workdir, ids[:3])
    assert record["residual"]["over_budget"] and record["residual"]["request"] > sgd.residual_budget
    assert "over the residual budget" in capsys.readouterr().out
    record = workflow.forget(workdir, ids[3:5], retrain_when_over_budget=True)
    assert record["residual"]["retrained"] and record["residual_total"] == 0.0
    method, state, _, _ = workflow.load(workdir)
    exact = jax.tree.map(lambda new, old: np.asarray(new, old.dtype), method.params(method.retrain(state)),
                         method.params(state))
    assert workflow.params_sha256(method.params(state)) == workflow.params_sha256(exact)  # the exact retrain
    assert workflow.verify(workdir)["ok"]
    # A method with no residual measure exhausts the budget at once; the gold standard as a method spends none.
    for name, over in (("finetune", True), ("retrain", False)):
        workdir = str(tmp_path / name)
        ids = workflow.train(tiny_forget_job(name), workdir)["forgettable_ids"]
        assert workflow.forget(workdir, ids[:2])["residual"]["over_budget"] is over
