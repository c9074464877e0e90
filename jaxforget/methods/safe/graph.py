r"""Shard graphs: who trains on what, who a deletion touches, and what a deletion is expected to cost.

The forgettable data is split once into disjoint shards ``S_0 … S_{n-1}`` (:func:`assign_shards`). A shard graph has
one node per shard and directed edges; node ``i`` trains an adapter on its own shard and its out-neighbours' shards,

.. math::  D_i = S_i \cup \bigcup_{j \in N^+(i)} S_j ,

so deleting a sample of ``S_j`` must retrain exactly the nodes whose ``D_i`` held it, the affected set
``A(j) = {j} ∪ N⁻(j)``. Nothing else ever saw the sample. SISA is the graph with no edges.

Expected cost of a request (spec ``safe.md`` §3; both conventions are reported because they rank graphs
differently): a request lands in shard ``j`` with probability ``π_j`` (default ``|S_j| / N``), and

.. math::  C_{sum}(j) = \sum_{i \in A(j)} |D_i|, \qquad C_{union}(j) = \Bigl|\bigcup_{i \in A(j)} D_i\Bigr|,
           \qquad E[C] = \sum_j \pi_j\, C(j),

reported as ``E[C] / N`` (``N`` = the cost of retraining one model on everything). ``C_sum`` counts adapter work
(each affected adapter retrained on its own data); ``C_union`` counts backbone work (affected adapters sharing one
pass over the union of their data). For ``K`` independent requests served as one batch, node ``i`` is retrained
with probability ``1 − (1 − P_i)^K`` where ``P_i = Σ_{j ∈ {i} ∪ N⁺(i)} π_j``.

Everything here is host-side numpy on integer ids: it runs once per build or request, never inside a jitted step.

Examples:
  >>> g = ring(4, 1)                      # node i also trains on shard i+1 (mod 4)
  >>> g.training_shards(3), g.affected(0)
  ((0, 3), (0, 3))
  >>> round(expected_cost(g, [10, 10, 10, 10], convention="sum"), 6)   # (d+1)²/n
  1.0
  >>> round(expected_cost(g, [10, 10, 10, 10], convention="union"), 6)  # (2d+1)/n
  0.75
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxforget import errors

CONVENTIONS = ("sum", "union")


class ShardGraphError(errors.ConfigError):
    """A shard graph or shard assignment that cannot be built as asked (the message names the problem)."""


@dataclasses.dataclass(frozen=True)
class ShardGraph:
    """A directed graph over shard nodes ``0 … n-1``, held as sorted out-neighbour tuples.

    Attributes:
      out_neighbors: ``out_neighbors[i]`` = the nodes ``j`` with an edge ``i → j`` (node ``i`` trains on ``S_j``).
      kind: the generator that made it (``"isolated"``, ``"cliques"``, ``"safe_shard"``, ``"ring"``,
        ``"adjacency"``), for reports.
      protected: nodes whose shard never receives requests (the safe shard's node 0); ``π = 0`` there by default.
    """

    out_neighbors: tuple[tuple[int, ...], ...]
    kind: str = "adjacency"
    protected: tuple[int, ...] = ()

    def __post_init__(self):
        n = len(self.out_neighbors)
        if n == 0:
            raise ShardGraphError("A shard graph needs at least one node.")
        for i, outs in enumerate(self.out_neighbors):
            bad = [j for j in outs if not 0 <= j < n]
            if bad:
                raise ShardGraphError(f"Node {i} has edges to {bad}, outside the graph's nodes 0..{n - 1}.")
            if i in outs:
                raise ShardGraphError(f"Node {i} has a self-loop (a node always trains on its own shard).")
            if len(set(outs)) != len(outs):
                raise ShardGraphError(f"Node {i} lists a duplicate edge: {list(outs)}.")
        bad = [p for p in self.protected if not 0 <= p < n]
        if bad:
            raise ShardGraphError(f"Protected nodes {bad} are outside the graph's nodes 0..{n - 1}.")

    @property
    def num_nodes(self) -> int:
        return len(self.out_neighbors)

    @property
    def num_edges(self) -> int:
        return sum(len(outs) for outs in self.out_neighbors)

    def in_neighbors(self, j: int) -> tuple[int, ...]:
        """The nodes ``i`` with an edge ``i → j`` (they train on ``S_j``)."""
        return tuple(i for i, outs in enumerate(self.out_neighbors) if j in outs)

    def training_shards(self, i: int) -> tuple[int, ...]:
        """The shards node ``i`` trains on, ``{i} ∪ N⁺(i)``, sorted."""
        return tuple(sorted({i, *self.out_neighbors[i]}))

    def affected(self, j: int) -> tuple[int, ...]:
        """The nodes a deletion from shard ``j`` retrains, ``{j} ∪ N⁻(j)`` = ``{i : S_j ⊆ D_i}``, sorted."""
        return tuple(sorted({j, *self.in_neighbors(j)}))

    def affected_by(self, shards: Sequence[int]) -> tuple[int, ...]:
        """The nodes a batch deleting from ``shards`` retrains (each once), sorted."""
        return tuple(sorted(set().union(*(self.affected(int(j)) for j in shards)))) if len(shards) else ()

    def adjacency(self) -> np.ndarray:
        """The ``[n, n]`` boolean adjacency, ``adj[i, j] = (i → j)``."""
        adj = np.zeros((self.num_nodes, self.num_nodes), bool)
        for i, outs in enumerate(self.out_neighbors):
            adj[i, list(outs)] = True
        return adj


# ------------------------------------------------------------------------------------------------ generators


def _check_count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ShardGraphError(f"{name} must be an integer ≥ {low}, got {value!r}.")
    return int(value)


def isolated(n: int) -> ShardGraph:
    """``n`` nodes, no edges: SISA with adapters (``n = 1`` is no sharding).

    Examples:
      >>> isolated(3).out_neighbors
      ((), (), ())
    """
    return ShardGraph(((),) * _check_count("n", n, 1), kind="isolated")


def no_sharding() -> ShardGraph:
    """One node trained on everything; a deletion retrains it (the cost of a full retrain)."""
    return isolated(1)


def disjoint_cliques(n: int, c: int, *, groups: Sequence[Sequence[int]] | None = None,
                     allow_ragged: bool = False) -> ShardGraph:
    """Nodes in groups of ``c``, complete inside each group: every node of a group trains on the group's union.

    Args:
      n: number of nodes (shards).
      c: group (clique) size.
      groups: which nodes form each group (a partition of ``0..n-1``; default consecutive runs). Random or
        class-aware grouping is a permutation chosen by the caller; the shards are already random.
      allow_ragged: allow ``c ∤ n`` (the last group is smaller).

    Examples:
      >>> disjoint_cliques(4, 2).out_neighbors
      ((1,), (0,), (3,), (2,))
    """
    n, c = _check_count("n", n, 1), _check_count("c (clique size)", c, 1)
    if c > n:
        raise ShardGraphError(f"Clique size c={c} is larger than the number of nodes n={n}.")
    if groups is None:
        if n % c and not allow_ragged:
            raise ShardGraphError(f"Clique size c={c} does not divide n={n}; pass allow_ragged=True for a smaller "
                                  "last group.")
        groups = [range(s, min(s + c, n)) for s in range(0, n, c)]
    groups = [sorted(int(i) for i in g) for g in groups]
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(n)):
        raise ShardGraphError(f"groups must partition the nodes 0..{n - 1} exactly once each, got {groups}.")
    outs: list[tuple[int, ...]] = [()] * n
    for g in groups:
        for i in g:
            outs[i] = tuple(j for j in g if j != i)
    return ShardGraph(tuple(outs), kind="cliques")


def safe_shard(n: int) -> ShardGraph:
    """Node 0 holds the safe shard (data that never receives requests); nodes ``1..n`` each train on their own
    shard plus the safe shard. ``n + 1`` nodes in all; node 0 is protected (``π_0 = 0``).

    Examples:
      >>> g = safe_shard(2)
      >>> g.out_neighbors, g.affected(0), g.affected(1)
      (((), (0,), (0,)), (0, 1, 2), (1,))
    """
    n = _check_count("n", n, 1)
    return ShardGraph(((),) + ((0,),) * n, kind="safe_shard", protected=(0,))


def ring(n: int, d: int) -> ShardGraph:
    """Node ``i`` trains on shards ``i, i+1, …, i+d (mod n)``: regular in- and out-degree ``d``.

    Examples:
      >>> ring(5, 2).out_neighbors[4]
      (0, 1)
    """
    n, d = _check_count("n", n, 1), _check_count("d (ring degree)", d, 0)
    if d >= n:
        raise ShardGraphError(f"Ring degree d={d} needs at least d+1={d + 1} nodes, got n={n}.")
    return ShardGraph(tuple(tuple(sorted((i + k) % n for k in range(1, d + 1))) for i in range(n)), kind="ring")


def from_adjacency(out_lists: Sequence[Sequence[int]] | np.ndarray, *, protected: Sequence[int] = ()) -> ShardGraph:
    """A graph from out-neighbour lists, or from a square boolean adjacency ``adj[i, j] = (i → j)``.

    Examples:
      >>> from_adjacency([[1], [], [0, 1]]).affected(1)
      (0, 1, 2)
    """
    if isinstance(out_lists, np.ndarray) and out_lists.ndim == 2:
        if out_lists.shape[0] != out_lists.shape[1]:
            raise ShardGraphError(f"An adjacency matrix must be square, got shape {out_lists.shape}.")
        out_lists = [np.flatnonzero(row).tolist() for row in out_lists]
    elif isinstance(out_lists, np.ndarray):
        raise ShardGraphError(f"An adjacency matrix must be 2-D, got shape {out_lists.shape}.")
    outs = []
    for i, row in enumerate(out_lists):
        row = [int(j) for j in row]
        if len(set(row)) != len(row):
            raise ShardGraphError(f"Node {i} lists a duplicate edge: {row}.")
        outs.append(tuple(sorted(row)))
    return ShardGraph(tuple(outs), kind="adjacency", protected=tuple(int(p) for p in protected))


GENERATORS = {"isolated": isolated, "cliques": disjoint_cliques, "safe_shard": safe_shard, "ring": ring}


# ------------------------------------------------------------------------------------------------ shards


def assign_shards(ids: np.ndarray, labels: np.ndarray, n: int, *, seed: int, stratify: bool = True) -> np.ndarray:
    """The shard of every id, computed once and stored (deletions only remove ids; nothing is ever re-sharded).

    Stratified: within each class the ids are permuted and dealt round-robin, continuing the deal across classes, so
    each class's count per shard and each shard's size differ by at most one. Otherwise one random permutation is
    cut into near-equal parts. The result depends on the ids and labels given and the seed only.

    Args:
      ids: ``[N]`` unique integer sample ids.
      labels: ``[N]`` class labels of those ids.
      n: number of shards (``≤ N``: every shard gets a sample).
      seed: the assignment's seed.
      stratify: deal class by class (recommended) or not.

    Returns:
      ``[N]`` int32 shard index of ``ids[k]``.

    Examples:
      >>> s = assign_shards(np.arange(8), np.array([0, 0, 0, 0, 1, 1, 1, 1]), 2, seed=0)
      >>> np.bincount(s[:4]).tolist(), np.bincount(s[4:]).tolist()
      ([2, 2], [2, 2])
    """
    ids, labels = np.asarray(ids), np.asarray(labels)
    n = _check_count("n (shards)", n, 1)
    if ids.ndim != 1 or labels.shape != ids.shape:
        raise ShardGraphError(f"ids and labels must be 1-D and aligned, got shapes {ids.shape} and {labels.shape}.")
    if len(np.unique(ids)) != len(ids):
        raise ShardGraphError("ids must be unique to be assigned to shards.")
    if n > len(ids):
        raise ShardGraphError(f"More shards than samples: n={n} shards for {len(ids)} samples would leave "
                              f"{n - len(ids)} shard(s) empty.")
    rng = np.random.default_rng(seed)
    order = np.argsort(ids, kind="stable")  # canonical: the input order of ids does not matter
    shard = np.empty(len(ids), np.int32)
    if not stratify:
        perm = order[rng.permutation(len(ids))]
        shard[perm] = np.arange(len(ids)) % n
        return shard
    dealt = 0
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        members = members[rng.permutation(len(members))]
        shard[members] = (dealt + np.arange(len(members))) % n
        dealt += len(members)
    return shard


def node_members(graph: ShardGraph, shard_of: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    """``D_i`` for every node: the sorted ids of the shards node ``i`` trains on.

    Args:
      graph: the shard graph (``num_nodes`` = number of shards).
      shard_of: ``[N]`` shard of each id (from :func:`assign_shards`).
      ids: ``[N]`` the ids, aligned with ``shard_of``.
    """
    shard_of, ids = np.asarray(shard_of), np.asarray(ids)
    if len(shard_of) and (shard_of.min() < 0 or shard_of.max() >= graph.num_nodes):
        raise ShardGraphError(f"Shard indices span {shard_of.min()}..{shard_of.max()} but the graph has "
                              f"{graph.num_nodes} nodes.")
    return [np.sort(ids[np.isin(shard_of, graph.training_shards(i))]) for i in range(graph.num_nodes)]


# ------------------------------------------------------------------------------------------------ cost


def _sizes(graph: ShardGraph, shard_sizes) -> np.ndarray:
    sizes = np.asarray(shard_sizes, np.float64)
    if sizes.shape != (graph.num_nodes,):
        raise ShardGraphError(f"Need one shard size per node ({graph.num_nodes}), got shape {sizes.shape}.")
    if (sizes < 0).any():
        raise ShardGraphError(f"Shard sizes must be non-negative, got {sizes.tolist()}.")
    return sizes


def request_probabilities(graph: ShardGraph, shard_sizes) -> np.ndarray:
    """Default ``π``: uniform over requestable samples (``π_j ∝ |S_j|``, 0 on protected nodes)."""
    sizes = _sizes(graph, shard_sizes).copy()
    sizes[list(graph.protected)] = 0.0
    total = sizes.sum()
    if total <= 0:
        raise ShardGraphError("No shard can receive a request: every non-empty shard is protected.")
    return sizes / total


def training_sizes(graph: ShardGraph, shard_sizes) -> np.ndarray:
    """``|D_i|`` for every node (shards are disjoint, so a node's size is the sum of its shards' sizes)."""
    sizes = _sizes(graph, shard_sizes)
    return np.array([sizes[list(graph.training_shards(i))].sum() for i in range(graph.num_nodes)])


def deletion_cost(graph: ShardGraph, shard_sizes, nodes: Sequence[int], *, convention: str) -> float:
    """The work of retraining ``nodes`` on shards of the given sizes, in sample passes per epoch.

    ``sum``: ``Σ_{i ∈ nodes} |D_i|``; ``union``: ``|⋃_{i ∈ nodes} D_i|``. Counted work after a real deletion passes
    the post-deletion sizes.
    """
    if convention not in CONVENTIONS:
        raise ShardGraphError(f"Unknown cost convention {convention!r}; valid: {', '.join(CONVENTIONS)}.")
    sizes = _sizes(graph, shard_sizes)
    nodes = [int(i) for i in nodes]
    if convention == "sum":
        return float(training_sizes(graph, sizes)[nodes].sum())
    shards = set().union(*(graph.training_shards(i) for i in nodes)) if nodes else set()
    return float(sizes[sorted(shards)].sum())


def expected_cost(graph: ShardGraph, shard_sizes, *, convention: str, probabilities=None) -> float:
    r"""``E[C] / N`` for one request: :math:`\sum_j \pi_j C(j) / N` with ``N = Σ_j |S_j|``.

    Args:
      graph: the shard graph.
      shard_sizes: ``[n]`` sizes ``|S_j|``.
      convention: ``"sum"`` (adapter work) or ``"union"`` (backbone work).
      probabilities: ``[n]`` ``π_j`` (default :func:`request_probabilities`).
    """
    sizes = _sizes(graph, shard_sizes)
    pi = request_probabilities(graph, sizes) if probabilities is None else np.asarray(probabilities, np.float64)
    cost = np.array([deletion_cost(graph, sizes, graph.affected(j), convention=convention)
                     for j in range(graph.num_nodes)])
    return float(pi @ cost / sizes.sum())


def node_hit_probabilities(graph: ShardGraph, shard_sizes, probabilities=None) -> np.ndarray:
    """``P_i = Σ_{j ∈ {i} ∪ N⁺(i)} π_j``: the probability that one request retrains node ``i``."""
    sizes = _sizes(graph, shard_sizes)
    pi = request_probabilities(graph, sizes) if probabilities is None else np.asarray(probabilities, np.float64)
    return np.array([pi[list(graph.training_shards(i))].sum() for i in range(graph.num_nodes)])


def expected_batch_cost(graph: ShardGraph, shard_sizes, requests: int, probabilities=None) -> dict[str, float]:
    r"""``K`` independent requests served as one batch (each affected node retrained once).

    Returns:
      ``nodes``: expected nodes retrained, :math:`\sum_i 1 - (1 - P_i)^K`;
      ``sum``: :math:`E[C_{sum}^{(K)}] / N = \sum_i |D_i| (1 - (1 - P_i)^K) / N`.
    """
    requests = _check_count("requests", requests, 0)
    sizes = _sizes(graph, shard_sizes)
    hit = 1.0 - (1.0 - node_hit_probabilities(graph, sizes, probabilities)) ** requests
    return {"nodes": float(hit.sum()), "sum": float(training_sizes(graph, sizes) @ hit / sizes.sum())}
