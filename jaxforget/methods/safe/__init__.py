"""SAFE: a shard graph of lightweight adapters on a frozen backbone (SISA = the graph with no edges).

Modules, one job each:

* :mod:`.graph`: shards, shard-graph generators, training and affected sets, expected and counted deletion cost;
* :mod:`.backbone`: the frozen backbone (core data only) and its cached features at one layer;
* :mod:`.adapter`: the adapters (linear head, cross-attention with positional embedding);
* :mod:`.nodes`: vmapped node training keyed by (node, version), per-node step budgets, inert lanes;
* :mod:`.ensemble`: combining the nodes' predictions;
* :mod:`.method`: :class:`Safe` (and :class:`Sisa`, the graph with no edges) on the method contract.
"""

from jaxforget.methods.safe import adapter, backbone, ensemble, graph, nodes
from jaxforget.methods.safe.method import Safe, SafeState, Sisa, default_config

__all__ = ["Safe", "SafeState", "Sisa", "adapter", "backbone", "default_config", "ensemble", "graph", "nodes"]
