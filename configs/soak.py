"""The soak: 1,000 single-id requests in a row on digits, for mixed-linear and a general-network method.

Command:
  python -m launch.benchmark --config=configs/soak.py --workdir=runs/soak
  python -m launch.benchmark --config=configs/soak.py:quick --workdir=runs/soak_quick
  python -m launch.report runs/soak/benchmark.json --readme --block=soak

Jobs: mixed-linear forgetting of ``configs/mixed_linear_digits.py`` (the head linearized, the direct path, σ = 1e-4)
and fine-tuning of ``configs/baselines_digits.py``. Each request forgets one id in a seeded random order; the record
is the ledger's integrity at the end, the first and last 100 requests' median times, the resident memory's slope per
100 requests over the second half, and the compilations after the first request (:mod:`jaxforget.soak`). Runtime on
2 CPU cores: a few minutes (quick: under a minute). Results: <workdir>/benchmark.json and <workdir>/soak.png.
"""

from __future__ import annotations

import ml_collections

from configs import baselines_digits, common, mixed_linear_digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, requests=1000)
    quick = ",quick" if arg.quick else ""
    c = ml_collections.ConfigDict()
    c.repeats = 1
    c.soak = ml_collections.ConfigDict(dict(
        requests=min(arg.requests, 60) if arg.quick else arg.requests, ids_per_request=1,
        jobs={"digits_mixed_linear": mixed_linear_digits.get_config(f"linearize=head{quick}"),
              "digits_finetune": baselines_digits.get_config(f"method=finetune{quick}")}))
    return c
