"""Checkpoints are verified, committed atomically and locked (issue: reliability of the forgetting state): no byte
flip restores silently, a step copied from another is refused, an interrupted save is never restored, a workdir
keeps no step older than its last commit, and a second job on a workdir is refused."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_forget_job

from jaxforget import checkpoint, errors, experiment, workflow

STATE = {"weights": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones(4)},
         "removed_by": jnp.array([0, 1, 0, 2], jnp.int32)}


def _saved(directory, steps=(0,), max_to_keep=None):
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=max_to_keep)
    for s in steps:
        ckpt.save(s, STATE, {"step": s, "ledger": [{"ids": [1, 2]}]})
    return ckpt


def _files(directory, step):
    root = os.path.join(directory, str(step))
    return sorted(os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs)


def test_a_round_trip_is_exact(tmp_path):
    ckpt = _saved(str(tmp_path))
    state, meta = ckpt.restore(0, STATE)
    for a, b in zip(np.asarray(state["weights"]["kernel"]), np.asarray(STATE["weights"]["kernel"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert meta["step"] == 0 and ckpt.verify(0)["step"] == 0
    ckpt.close()


def test_no_byte_flip_in_any_file_restores_silently(tmp_path):
    directory = str(tmp_path)
    ckpt = _saved(directory)
    step_dir = os.path.join(directory, "0")
    paths = [os.path.join(step_dir, f) for f in _files(directory, 0)]
    paths.append(os.path.join(directory, checkpoint.MANIFESTS, "0.json"))
    rng = np.random.default_rng(0)
    flips = 0
    for path in paths:
        data = bytearray(open(path, "rb").read())
        if not data:
            continue
        offsets = {0, len(data) // 2, len(data) - 1, *rng.integers(0, len(data), 5).tolist()}
        for offset in offsets:
            changed = bytearray(data)
            changed[offset] ^= 0xFF
            open(path, "wb").write(bytes(changed))
            with pytest.raises(checkpoint.CorruptCheckpointError, match="checkpoint step 0"):
                ckpt.restore(0, STATE)
            flips += 1
        open(path, "wb").write(bytes(data))
    assert flips > 3 * len(paths)
    ckpt.restore(0, STATE)  # intact again
    # A file added to or removed from the step is named too.
    extra = os.path.join(step_dir, "extra.bin")
    open(extra, "wb").write(b"x")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="extra.bin is not part"):
        ckpt.restore(0, STATE)
    os.remove(extra)
    victim = os.path.join(step_dir, _files(directory, 0)[-1])
    os.rename(victim, victim + ".moved")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="missing"):
        ckpt.restore(0, STATE)
    ckpt.close()


def test_a_step_copied_from_another_is_refused(tmp_path):
    directory = str(tmp_path)
    _saved(directory, steps=(0, 1)).close()
    shutil.copytree(os.path.join(directory, "0"), os.path.join(directory, "5"))
    shutil.copy(os.path.join(directory, checkpoint.MANIFESTS, "0.json"),
                os.path.join(directory, checkpoint.MANIFESTS, "5.json"))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="belongs to step 0"):
        checkpoint.restore_latest(directory, STATE)
    # Without its manifest a step was never committed: the newest committed one is restored.
    os.remove(os.path.join(directory, checkpoint.MANIFESTS, "5.json"))
    _, meta, step = checkpoint.restore_latest(directory, STATE)
    assert step == 1 and meta["step"] == 1


def test_an_interrupted_save_is_never_restored_and_the_old_step_survives(tmp_path, monkeypatch):
    directory = str(tmp_path)
    ckpt = _saved(directory, steps=(0,), max_to_keep=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between the step's files and its manifest")

    monkeypatch.setattr(checkpoint, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(1, STATE, {"step": 1})
    monkeypatch.undo()
    assert ckpt.latest_step() == 0 and ckpt.all_steps() == [0]
    assert ckpt.restore(0, STATE)[1]["step"] == 0  # the committed step is intact
    ckpt.save(1, STATE, {"step": 1})  # the retry replaces the uncommitted step and commits it
    assert ckpt.all_steps() == [1] and sorted(os.listdir(directory)) == [checkpoint.MANIFESTS, "1"]
    ckpt.close()


def test_a_second_job_on_a_workdir_is_refused_until_the_first_ends(tmp_path):
    workdir = str(tmp_path)
    probe = ("import sys; from jaxforget import checkpoint\n"
             "try:\n    checkpoint.WorkdirLock(sys.argv[1]).__enter__()\n"
             "except checkpoint.WorkdirLockedError as e:\n    print(e); sys.exit(3)\n")
    with checkpoint.WorkdirLock(workdir):
        with pytest.raises(checkpoint.WorkdirLockedError, match=f"pid {os.getpid()}"):
            checkpoint.WorkdirLock(workdir).__enter__()
        other = subprocess.run([sys.executable, "-c", probe, workdir], capture_output=True, text=True, check=False)
        assert other.returncode == 3 and "in use by another job" in other.stdout
    assert subprocess.run([sys.executable, "-c", probe, workdir], check=False).returncode == 0


def test_a_committed_request_leaves_no_model_that_held_the_forgotten_samples(tmp_path):
    workdir = str(tmp_path / "model")
    model = workflow.train(tiny_forget_job("finetune"), workdir)
    workflow.evaluate_workdir(workdir)  # fills the retrain cache of the untouched model
    assert os.path.isdir(os.path.join(workdir, workflow.ORACLE_CACHE))
    workflow.forget(workdir, model["forgettable_ids"][:4])
    assert sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == ["1"]
    assert not os.path.exists(os.path.join(workdir, workflow.ORACLE_CACHE))
    assert not os.path.exists(os.path.join(workdir, workflow.EVALUATION_FILE))
    out = workflow.evaluate_workdir(workdir)
    disk = next(c for c in out["verification"]["checks"] if c["check"] == "disk")
    assert disk["ok"], disk
    # A step left behind (the model before the next request) is named by verify.
    stale = os.path.join(tmp_path, "stale")
    shutil.copytree(os.path.join(workdir, "checkpoints", "1"), stale)
    workflow.forget(workdir, model["forgettable_ids"][4:6])
    checks = {c["check"]: c for c in workflow.verify(workdir)["checks"]}
    assert checks["disk"]["ok"]
    shutil.copytree(stale, os.path.join(workdir, "checkpoints", "1"))
    checks = {c["check"]: c for c in workflow.verify(workdir)["checks"]}
    assert not checks["disk"]["ok"] and "[1]" in checks["disk"]["detail"]


def test_a_resumed_job_with_another_config_names_the_fields(tmp_path):
    workdir = str(tmp_path / "job")
    job = tiny_forget_job("finetune", requests=1)
    experiment.run(job, workdir)
    job.method.learning_rate = 0.5 * job.method.learning_rate
    job.requests.num_requests = 2
    with pytest.raises(errors.ConfigError, match=r"method\.learning_rate: .*requests\.num_requests: 1 → 2"):
        experiment.run(job, workdir)


KILL = """
import os, signal, sys
import jax
import numpy as np
# The suite's numerics (tests/conftest.py): the killed process must compute what the test process does.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_default_matmul_precision", "highest")
from jaxforget import checkpoint, report, workflow

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

point = sys.argv[2]
if point == "before_save":
    checkpoint.Checkpointer.save = die
elif point == "before_commit":  # the step's files written, its manifest not
    checkpoint.write_json_atomic = die
elif point == "after_commit":  # committed, the previous step not yet deleted
    checkpoint.Checkpointer._prune = die
elif point == "before_ledger_file":  # committed and pruned, ledger.json and the caches not yet settled
    report.write_json = die
workflow.forget(sys.argv[1], np.load(sys.argv[3]), request_id="r1")
"""


@pytest.mark.parametrize("point", ["before_save", "before_commit", "after_commit", "before_ledger_file"])
def test_a_forget_killed_anywhere_then_rerun_ends_hash_equal_to_an_uninterrupted_one(tmp_path, point):
    base = str(tmp_path / "base")
    ids = np.asarray(workflow.train(tiny_forget_job("finetune"), base)["forgettable_ids"])
    workflow.evaluate_workdir(base)  # a retrain cache that the first request must drop
    np.save(tmp_path / "r1.npy", ids[:3])
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    shutil.copytree(base, reference)
    shutil.copytree(base, killed)
    for workdir in (reference,):
        workflow.forget(workdir, ids[:3], request_id="r1")
        workflow.forget(workdir, ids[3:5], request_id="r2")
    run = subprocess.run([sys.executable, "-c", KILL, killed, point, str(tmp_path / "r1.npy")], check=False,
                         capture_output=True, text=True)
    assert run.returncode == -9, run.stderr[-2000:]
    first = workflow.forget(killed, ids[:3], request_id="r1")  # applied now, or found already applied
    assert first["status"] == ("already_applied" if point in ("after_commit", "before_ledger_file") else "applied")
    workflow.forget(killed, ids[3:5], request_id="r2")
    loaded = {}
    for name, workdir in (("reference", reference), ("killed", killed)):
        method, state, meta, _ = workflow.load(workdir)
        loaded[name] = (workflow.params_sha256(method.params(state)), [r["request_id"] for r in meta["ledger"]])
        assert workflow.verify(workdir)["ok"]
        assert len(json.loads((Path(workdir) / workflow.LEDGER_FILE).read_text())["requests"]) == 2
        assert not os.path.exists(os.path.join(workdir, workflow.ORACLE_CACHE))
    assert loaded["killed"] == loaded["reference"]


def test_a_step_whose_state_and_ledger_disagree_is_refused_on_load(tmp_path):
    workdir = str(tmp_path / "model")
    ids = workflow.train(tiny_forget_job("finetune"), workdir)["forgettable_ids"]
    workflow.forget(workdir, ids[:2])
    method, state, meta, step = workflow.load(workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1)
    ckpt.save(step + 1, state, {**meta, "ledger": []})  # a valid step, written by something else
    ckpt.close()
    with pytest.raises(checkpoint.CorruptCheckpointError, match="served 1 request.*ledger records 0"):
        workflow.forget(workdir, ids[2:4])
