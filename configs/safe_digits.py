"""SAFE (or SISA) on scikit-learn's digits: a shard graph of adapters on a backbone trained on core data only.

Command:
  python -m launch.forget --config=configs/safe_digits.py --workdir=runs/safe
  python -m launch.forget --config=configs/safe_digits.py:graph=isolated,shards=16 --workdir=runs/sisa16
  python -m launch.forget --config=configs/safe_digits.py:quick --workdir=runs/safe_quick
  python -m launch.train --config=configs/safe_digits.py --workdir=runs/safe_model   # then launch.forget --ids
  python -m launch.forget --config=configs/safe_digits.py:graph=isolated,shards=8,slices=4 --workdir=runs/sisa_sliced
  python -m launch.forget --config=configs/safe_digits.py:backbone=/path/to/backbone --workdir=runs/safe_own

Setup: the MLP 64-128-128-10 (Leaky-ReLU) trained on the core split (30 % of each class of the train split) is
the frozen backbone; its penultimate features feed one linear head per node. The user data is dealt class-stratified
into ``shards`` shards; ``graph`` is isolated (SISA), cliques of ``clique`` nodes (default: 8 shards in cliques of 2),
safe_shard (every node also trains on the core data) or a ring of out-degree ``degree``. Adapters: AdamW, cosine,
30 epochs over each node's own data (recommended defaults of the spec, unverified against the paper). Each request
forgets one user id; the gold standard is the build from scratch on the retained data, which SAFE's forget
equals bitwise. ``slices`` > 1 trains every adapter in SISA's stages with a checkpoint after each, so a deletion
restarts from the stage before the deleted sample's slice. ``backbone`` is the directory of a backbone the user
brings (``jaxforget.methods.safe.backbone.save_backbone``, with the training ids it saw: it is refused if any is
forgettable); it must fit ``model``. Runtime on 2 CPU cores: about a minute (quick: well under). Results:
<workdir>/report.json.
"""

from __future__ import annotations

import ml_collections

from configs import common
from jaxforget import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, quick=False, graph="cliques", shards=8, clique=2, degree=1, adapter="linear",
                           requests=10, slices=1, backbone="")
    c = config_lib.forget_job("sisa" if arg.graph == "isolated" else "safe", model=common.DIGITS_MLP)
    c.method.graph.update(dict(kind=arg.graph, shards=arg.shards, clique=arg.clique, degree=arg.degree))
    c.method.adapter.name = arg.adapter
    c.method.budget.slices = arg.slices
    c.method.backbone.checkpoint = arg.backbone
    if arg.adapter == "cross_attention":  # tokens: the 4×4×16 map of the CNN's first stage
        c.model = ml_collections.ConfigDict(dict(name="cnn", channels=(16, 32), hidden=64, num_classes=10))
        c.method.layer = "conv_0:output"
    c.requests.num_requests = arg.requests
    c.requests.fraction = 0.001  # one sample per request: a person's deletion request, the case sharding serves
    if arg.quick:
        c.model.hidden = 32 if arg.adapter == "cross_attention" else (32,)
        c.method.backbone.epochs = 10
        c.method.budget.epochs = 10
        c.method.budget.learning_rate = 1e-2  # fewer steps: a larger step, so that the quick run still learns
        c.requests.num_requests = min(arg.requests, 3)
    return c
