"""The forget launcher end to end on the quick config, including a kill -9 mid-run and a resume; the forget job's
request selection (random by fraction or size, whole classes) and its refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_data, tiny_forget_job

from jaxforget import config as config_lib
from jaxforget import data as data_lib
from jaxforget import errors, experiment

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("launch")


def launch(workdir, config_arg="quick", **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXFORGET_PROGRESS="0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "launch.forget", f"--config=configs/mixed_linear_digits.py:{config_arg}",
           f"--workdir={workdir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def test_quick_run_is_killed_then_resumes_and_reports(tmp_path):
    workdir = tmp_path / "run"
    proc = launch(workdir)
    first_step = workdir / "checkpoints" / ".manifests" / "1.json"  # step 1 committed
    deadline = time.monotonic() + 300
    while not first_step.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it could be killed:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "report.json").exists()

    rerun = launch(workdir)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert "resumed from checkpoint step" in out

    report = json.loads((workdir / "report.json").read_text())
    assert [r["request"] for r in report["requests"]] == [1, 2, 3]
    assert report["resumed_at"] and 1 <= report["resumed_at"][0] < 3
    for r in report["requests"]:
        assert r["rel_weight_distance"] <= 1e-3  # the target on the quick config
        assert r["influence_left"] <= 0.05  # >= 95 % of the request's influence removed
        assert r["forget"]["num_forgotten"] == 10 and r["oracle"]["source"] in ("trained", "loaded")
        assert set(r["speedup_vs_retrain"]) == {"retrain", "cg_retrain", "sgd_retrain"}
        for name in ("forget", "retain", "test"):
            assert 0.0 <= r["readouts"][name]["accuracy"] <= 1.0
    assert report["recompilations_between_requests"] == 0
    assert report["method_readouts"]["forget_all"]["max_abs_logit_diff_to_core"] == 0.0
    assert report["environment"]["jax"] and report["config"]["method"]["linearize"] == "head"
    assert (workdir / "requests.png").stat().st_size > 10_000
    assert (workdir / "sigma_sweep.png").stat().st_size > 10_000

    # The same workdir with a different request plan is refused, and the saved state is untouched.
    saved = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    other = launch(workdir, "quick,requests=2")
    out, _ = other.communicate(timeout=300)
    assert other.returncode != 0 and "requests.num_requests: 3 → 2" in out
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == saved


# ------------------------------------------------------------------ the forget job's request selection


def _tiny_splits():
    return data_lib.get_splits(tiny_data())


def _requests(**fields):
    section = config_lib.requests_section()
    section.update(fields)
    return section


def test_forget_job_requests_by_size_hold_exactly_size_ids_and_are_disjoint():
    splits = _tiny_splits()
    plan, classes = experiment.plan_requests(_requests(num_requests=4, size=7), splits.user_ids, splits.train)
    assert [len(r) for r in plan] == [7] * 4 and classes == [None] * 4
    together = np.concatenate(plan)
    assert np.unique(together).size == 28 and np.isin(together, splits.user_ids).all()
    # size 0 keeps the fraction's plan, id for id.
    default, _ = experiment.plan_requests(_requests(num_requests=3, fraction=0.05), splits.user_ids, splits.train)
    expected = data_lib.draw_disjoint(splits.user_ids, 3, round(0.05 * len(splits.user_ids)), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(default, expected, strict=True))


def test_forget_job_requests_by_class_are_exactly_the_forgettable_ids_of_the_class():
    splits = _tiny_splits()
    train, user = splits.train, splits.user_ids  # the core is protected, as mixed-linear's is
    label_of = dict(zip(train.ids.tolist(), train.y.tolist(), strict=True))
    plan, classes = experiment.plan_requests(_requests(num_requests=2, select="class", classes=(3, 5)), user, train)
    assert classes == [3, 5]
    for ids, c in zip(plan, classes, strict=True):
        assert np.array_equal(ids, [i for i in user if label_of[i] == c])
    drawn, drawn_classes = experiment.plan_requests(_requests(num_requests=4, select="class", seed=1), user, train)
    assert len(set(drawn_classes)) == 4 and all(0 <= c < train.num_classes for c in drawn_classes)
    assert drawn_classes == experiment.plan_requests(_requests(num_requests=4, select="class", seed=1), user,
                                                     train)[1]  # the draw is seeded
    for ids, c in zip(drawn, drawn_classes, strict=True):
        assert ids.size and all(label_of[i] == c for i in ids.tolist())


@pytest.mark.parametrize("fields, match", [
    (dict(size=-1), "requests.size"),
    (dict(select="classes"), "requests.select"),
    (dict(classes=(3,)), "requests.classes"),  # classes without select="class"
    (dict(select="class", size=5), "requests.size"),
    (dict(select="class", num_requests=2, classes=(3,)), "requests.classes"),
    (dict(select="class", num_requests=2, classes=(3, 3)), "requests.classes"),
    (dict(select="class", num_requests=1, classes=(-1,)), "requests.classes"),
])
def test_forget_job_bad_request_selections_are_refused_naming_the_field(fields, match):
    job = tiny_forget_job("finetune")
    job.requests.update(fields)
    with pytest.raises(errors.ConfigError, match=match):
        config_lib.validate_forget_job(job)


def test_forget_job_selections_the_data_cannot_satisfy_are_refused_naming_the_field():
    splits = _tiny_splits()
    train, user = splits.train, splits.user_ids
    without_3 = user[train.y[train.index_of(user)] != 3]
    table = [(_requests(num_requests=2, size=len(user) // 2 + 1), user, r"requests\.size = \d+: 2 disjoint"),
             (_requests(num_requests=2, fraction=0.6), user, r"requests\.fraction"),
             (_requests(num_requests=1, select="class", classes=(10,)), user, r"requests\.classes: class 10 is not"),
             (_requests(num_requests=1, select="class", classes=(3,)), without_3, r"requests\.classes: class 3 has no"),
             (_requests(num_requests=11, select="class"), user, r"requests\.num_requests = 11")]
    for section, ids, match in table:
        with pytest.raises(errors.ConfigError, match=match):
            experiment.plan_requests(section, np.asarray(ids), train)


def test_forget_job_erases_a_whole_class_and_records_it(tmp_path):
    job = tiny_forget_job("retrain", requests=1)
    job.method.train.epochs = 2
    job.requests.update(dict(select="class", classes=(3,)))
    rep = experiment.run(job, str(tmp_path / "class"))
    splits = _tiny_splits()
    (record,) = rep["requests"]
    assert record["selection"] == {"select": "class", "size": int((splits.train.y == 3).sum()), "class": 3}
    assert record["forget"]["num_forgotten"] == record["selection"]["size"]
    assert rep["config"]["requests"]["select"] == "class"
    job.requests.classes = (10,)  # refused when the plan is drawn, before the model is trained
    with pytest.raises(errors.ConfigError, match="class 10"):
        experiment.run(job, str(tmp_path / "unknown"))
    assert not (tmp_path / "unknown" / "checkpoints").exists()
