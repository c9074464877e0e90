"""SAFE: a shard graph of lightweight adapters on a frozen backbone (SISA = the graph with no edges).

Modules, one job each:

* :mod:`.graph`: shards, shard-graph generators, training and affected sets, expected and counted deletion cost.

The method itself (adapters, vmapped training, affected-node retrain, ensembles) is issue 14's work in progress and
is not registered in :data:`jaxforget.methods.METHODS` yet.
"""

from jaxforget.methods.safe import graph

__all__ = ["graph"]
