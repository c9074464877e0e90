"""The forget launcher end to end on the quick config, including a kill -9 mid-run and a resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
