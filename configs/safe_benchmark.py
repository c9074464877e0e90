"""SAFE and SISA benchmark (timing ratios in one process, written to JSON) and the shard sweep.

Command:
  python -m launch.benchmark --config=configs/safe_benchmark.py --workdir=runs/benchmark_safe
  python -m launch.benchmark --config=configs/safe_benchmark.py:quick --workdir=runs/benchmark_safe_quick
  python -m launch.report runs/benchmark_safe/benchmark.json --readme --block=benchmark_safe

Workloads (forget jobs of configs/safe_digits.py, one sample per request): SAFE with cliques of 2 over 8 shards, and
SISA over 8 shards, with and without 4 slices per shard, each judged against its build from scratch (which the forget
equals bitwise). Study ``shards``: n ∈ {1, 2, 4, …, 64} shards for isolated (SISA), cliques of 2, 4 and 8, a ring of
out-degree 1 and the safe-shard graph, over 3 seeds: test accuracy, the gap to no sharding, expected deletion cost under
both conventions, time per deletion against retraining every adapter and against retraining the unsharded model, vmap vs
a loop over nodes, predict latency and adapter memory vs shards, and one backbone pass (what the feature cache saves) vs
training the unsharded adapter from cached features. Runtime on 2 CPU cores: about six minutes (quick: about a minute).
Results: <workdir>/benchmark.json, <workdir>/shards/safe_shard_sweep.png, <workdir>/shards/inference_vs_shards.png.
"""

from __future__ import annotations

import ml_collections

from configs import common, safe_digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, requests=5, min_steps=-1)
    quick = ",quick" if arg.quick else ""
    c = ml_collections.ConfigDict()
    c.repeats = 3
    c.workloads = ml_collections.ConfigDict({
        "digits_safe_cliques2_n8": safe_digits.get_config(f"requests={arg.requests}{quick}"),
        "digits_sisa_n8": safe_digits.get_config(f"graph=isolated,requests={arg.requests}{quick}"),
        # SISA's slices: a deletion restarts its shard's adapter from the stage before the sample's slice.
        "digits_sisa_n8_slices4": safe_digits.get_config(f"graph=isolated,slices=4,requests={arg.requests}{quick}"),
    })
    # Targets (✓/✗): a single-sample deletion at most 0.5× the retrain of every adapter.
    c.targets = ml_collections.ConfigDict(dict(max_rel_error=0.0, max_time_ratio={"retrain": 0.5}))
    sweep = safe_digits.get_config("quick" if arg.quick else None)
    if arg.min_steps >= 0:  # the floor on each adapter's optimiser steps (-1: the method's default)
        for job in (sweep, *c.workloads.values()):
            job.method.budget.min_steps = arg.min_steps
    c.studies = ml_collections.ConfigDict({"shards": dict(method="safe", study="shards", config=dict(
        job=sweep, requests=2 if arg.quick else 3, seeds=(0,) if arg.quick else (0, 1, 2),
        shards=(2, 4) if arg.quick else (2, 4, 8, 16, 32, 64),
        graphs=("isolated", "cliques2") if arg.quick else ("isolated", "cliques2", "cliques4", "cliques8", "ring1",
                                                           "safe_shard")))})
    c.evaluation = ml_collections.ConfigDict(dict(n_models=16, num_examples=50, bruteforce_examples=10))
    return c
