"""SSSE benchmark (timing ratios in one process, written to JSON), the structures study and the calibration.

Command:
  python -m launch.benchmark --config=configs/ssse_benchmark.py --workdir=runs/benchmark_ssse
  python -m launch.benchmark --config=configs/ssse_benchmark.py:quick --workdir=runs/benchmark_ssse_quick
  python -m launch.report runs/benchmark_ssse/benchmark.json --readme --block=benchmark_ssse
  python -m launch.benchmark --config=configs/ssse_benchmark.py:workloads=0,structures=0 --workdir=runs/ssse_calibration
  python -m launch.report runs/ssse_calibration/benchmark.json --readme --block=ssse_calibration

Workloads (forget jobs, each request judged against the recipe retrained from scratch in the same process, with
the curvature's one-off build reported apart and amortised): the digits MLP of configs/ssse_digits.py:model=mlp with the
Gauss-Newton curvature (block-diagonal, and Woodbury) and the paper's empirical Fisher (block-diagonal); the small
CNN on digits; a synthetic CIFAR-shaped ResNet-8 (32×32×3, ``synthetic_n`` images). Each workload's profile measures
per-example gradients against one batched gradient and the matrix-free matvec against held rows. Studies:
``structures`` (every structure of the empirical Fisher on an MLP 64-32-10: build time, memory and ``C⁻¹u`` against
the dense solve, with the rank-1 and chunked Sherman–Morrison recursions and the naive batch-1 WoodFisher loop);
``calibration`` (the unrecovered fraction of each curvature on logistic regression and the digits CNN, at ε = 1 and
at ε/λ tuned on held-out requests; :mod:`jaxforget.methods.ssse.calibration`). Runtime on 2 CPU cores: about half
an hour (quick: a couple of minutes). Results: <workdir>/benchmark.json, a report.json per workload and
<workdir>/calibration/ssse_calibration.png.
"""

from __future__ import annotations

import ml_collections

from configs import common, ssse_digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, requests=3, synthetic_n=600, workloads=True, structures=True,
                           calibration=True)
    quick = ",quick" if arg.quick else ""
    c = ml_collections.ConfigDict()
    c.repeats = 3
    mlp = f"model=mlp,requests={arg.requests}"
    jobs = {"digits_mlp_gn_block": ssse_digits.get_config(f"model=mlp,requests={2 if arg.quick else arg.requests}"
                                                          f"{quick}")}
    if not arg.quick:
        jobs["digits_mlp_ef_block"] = ssse_digits.get_config(f"{mlp},curvature=empirical_fisher")
        jobs["digits_mlp_gn_woodbury"] = ssse_digits.get_config(f"{mlp},structure=woodbury")
        jobs["digits_cnn_gn_block"] = ssse_digits.get_config(f"requests={arg.requests}")
        resnet = ssse_digits.get_config(f"requests={arg.requests}")
        resnet.data.name, resnet.data.n, resnet.data.image_shape = "synthetic", arg.synthetic_n, (32, 32, 3)
        resnet.model = ml_collections.ConfigDict(dict(name="resnet", depth=8, width=16, num_classes=10))
        resnet.method.train.epochs = 5  # every request also pays the retrain oracle: keep the CPU run bounded
        resnet.requests.fraction = 0.02
        jobs["synthetic_cifar_resnet8_gn_block"] = resnet
    c.workloads = ml_collections.ConfigDict(jobs if arg.workloads else {})
    # Targets (✓/✗): a request at most 0.01× the retrain from scratch (the line; 0.2 is the challenge's).
    c.targets = ml_collections.ConfigDict(dict(max_time_ratio={"retrain": 0.01}))
    small = ssse_digits.get_config("quick,model=mlp")
    small.method.train.epochs = 5 if arg.quick else 30
    studies = {} if not arg.structures else {"structures": dict(method="ssse", study="structures", config=dict(
        job=small, samples=64 if arg.quick else 512, repeats=2 if arg.quick else 3, rank=32 if arg.quick else 256,
        block_size=256, chunk=32))}
    if arg.calibration:
        from jaxforget.methods.ssse import calibration  # pylint: disable=import-outside-toplevel

        studies["calibration"] = dict(method="ssse", study="calibration",
                                      config=calibration.default_config(bool(arg.quick)))
    c.studies = ml_collections.ConfigDict(studies)
    c.evaluation = ml_collections.ConfigDict(dict(n_models=16, num_examples=50, bruteforce_examples=10))
    return c
