"""The soak (issue: reliability): many sequential requests leave the ledger intact, and what drifts is measured;
through the benchmark launcher's config with no workloads."""

import json
import os

import ml_collections
import numpy as np
from helpers import tiny_forget_job

from jaxforget import benchmark, soak


def test_a_soak_keeps_the_ledger_and_measures_time_memory_and_compilations():
    job = tiny_forget_job("mixed_linear")
    job.method.linearize = "head"
    out = soak.soak(job, requests=24, ids_per_request=2)
    assert out["ledger_intact"] and out["requests"] == 24 and len(out["seconds"]) == 24
    assert out["compilations_after_first"] == 0  # the direct path is sized for the stream before the first request
    assert np.isfinite(out["resident_mib_slope_per_100"]) and out["resident_mib_last"] > 0
    assert out["window"] == 12 and out["last_over_first"] > 0


def test_the_benchmark_runs_a_soak_only_config_and_renders_it(tmp_path):
    config = ml_collections.ConfigDict(dict(repeats=1, soak=dict(requests=6, ids_per_request=1,
                                                                 jobs={"tiny_finetune": tiny_forget_job("finetune")})))
    out = benchmark.run(config, str(tmp_path))
    record = out["soak"]["tiny_finetune"]
    assert record["ledger_intact"] and record["method"] == "finetune"
    assert os.path.getsize(tmp_path / "soak.png") > 5_000
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    text = benchmark.markdown(saved)
    assert "| tiny_finetune | finetune | 6 × 1 | yes |" in text
