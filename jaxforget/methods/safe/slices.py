r"""SISA's slices on a shard graph: which stage a deletion restarts each affected node from, and what that costs.

Each shard is dealt into ``R`` slices (:func:`assign_slices`); a node's stage ``s`` trains on the samples of its
training set ``D_i`` in slices ``0..s`` for ``e_s`` epochs (:meth:`.nodes.Budget.stage_epochs`) and is checkpointed.
A request deleting samples ``X`` restarts each affected node ``i`` from the earliest slice among the deleted samples
it trained on (:func:`request_starts`), so it redoes the work

.. math::  C(i, r_i) = \sum_{s \ge r_i} \frac{e_s}{e'}\, |D_i^{\le s}| , \qquad e' = \sum_s e_s \frac{s+1}{R},

in samples times epochs over ``e'``, the epochs the schedule spends on equal slices (``= e`` when ``2e/(R+1)`` is
whole), so that training one model on all ``N`` samples costs ``N``; reported over ``N`` like :mod:`.graph`. For
``n`` equal shards of ``R`` equal slices with ``2e/(R+1)`` whole, the expected cost of a uniform single-sample request
is ``(2R+1)/(3Rn)`` (spec ``safe.md`` §3); with ``R = 1`` every function here is its unsliced counterpart.

Examples:
  >>> from jaxforget.methods.safe import graph, nodes
  >>> g = graph.isolated(2)
  >>> shard_of = np.array([0, 0, 0, 0, 1, 1, 1, 1]); slice_of = np.array([0, 0, 1, 1, 0, 0, 1, 1])
  >>> request_starts(g, shard_of, slice_of, np.array([2]))      # shard 0, slice 1
  {0: 1}
  >>> budget = nodes.Budget(epochs=3, slices=2)                    # stage epochs (2, 2)
  >>> round(expected_cost(g, shard_of, slice_of, np.ones(8, bool), budget), 6)   # (2R+1)/(3Rn)
  0.416667
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxforget.methods.safe import graph as graph_lib
from jaxforget.methods.safe import nodes


def assign_slices(shard_of: np.ndarray, slices: int, *, seed: int, fixed: np.ndarray | None = None) -> np.ndarray:
    """Each sample's slice: every shard's samples in a seeded random order, dealt round-robin over ``slices``.

    Args:
      shard_of: ``[N]`` each sample's shard (``-1``: in no shard).
      slices: ``R``.
      seed: the order's seed.
      fixed: ``[N]`` bool, samples that no request can name (core data): slice 0, so they never restart anything.

    Returns:
      ``int32[N]`` slices in ``[0, R)`` (0 outside every shard).
    """
    shard_of = np.asarray(shard_of)
    fixed = np.zeros(len(shard_of), bool) if fixed is None else np.asarray(fixed, bool)
    slice_of = np.zeros(len(shard_of), np.int32)
    rng = np.random.default_rng(seed)
    for j in np.unique(shard_of[shard_of >= 0]):
        members = np.flatnonzero((shard_of == j) & ~fixed)
        slice_of[members[rng.permutation(len(members))]] = np.arange(len(members)) % slices
    return slice_of


def request_starts(graph: graph_lib.ShardGraph, shard_of: np.ndarray, slice_of: np.ndarray,
                   positions: np.ndarray) -> dict[int, int]:
    """``{node: stage}`` for every node a request of the samples at ``positions`` affects: the earliest slice among
    the deleted samples in that node's training set."""
    shards, sl = np.asarray(shard_of)[positions], np.asarray(slice_of)[positions]
    starts = {}
    for i in graph.affected_by(np.unique(shards)):
        starts[int(i)] = int(sl[np.isin(shards, graph.training_shards(i))].min())
    return starts


def stage_members(graph: graph_lib.ShardGraph, shard_of: np.ndarray, slice_of: np.ndarray, retain: np.ndarray,
                  node: int, stage: int) -> np.ndarray:
    """``bool[N]``: the retained samples node ``node`` trains on in stage ``stage`` (``D_i^{≤s}``)."""
    return retain & np.isin(shard_of, graph.training_shards(node)) & (np.asarray(slice_of) <= stage)


def deletion_cost(graph: graph_lib.ShardGraph, shard_of: np.ndarray, slice_of: np.ndarray, retain: np.ndarray,
                  starts: Mapping[int, int], budget: nodes.Budget, *, convention: str) -> float:
    """Work of retraining the nodes ``starts`` from their stages, in samples × epochs / ``e'`` (not yet over ``N``).

    ``sum``: every restarted node's stage data; ``union``: per stage, the union of the restarted nodes' stage data.
    """
    epochs = budget.stage_epochs()
    total = 0.0
    for s, e_s in enumerate(epochs):
        running = [i for i, r in starts.items() if r <= s]
        if not running or not e_s:
            continue
        sets = [stage_members(graph, shard_of, slice_of, retain, i, s) for i in running]
        size = sum(int(m.sum()) for m in sets) if convention == "sum" else int(np.logical_or.reduce(sets).sum())
        total += e_s * size
    return float(total * budget.slices / sum(e * (s + 1) for s, e in enumerate(epochs)))


def expected_cost(graph: graph_lib.ShardGraph, shard_of: np.ndarray, slice_of: np.ndarray, retain: np.ndarray,
                  budget: nodes.Budget, *, convention: str = "sum", requestable: np.ndarray | None = None) -> float:
    """``E[C] / N`` of one uniformly drawn requestable retained sample, by enumeration over (shard, slice) classes.

    ``N`` is the number of requestable retained samples (the cost of one model retrained on all of them).
    """
    if convention not in graph_lib.CONVENTIONS:
        raise graph_lib.ShardGraphError(f"Unknown cost convention {convention!r}; valid: "
                                        f"{', '.join(graph_lib.CONVENTIONS)}.")
    shard_of, slice_of = np.asarray(shard_of), np.asarray(slice_of)
    pool = np.asarray(retain, bool) & (shard_of >= 0)
    if requestable is not None:
        pool &= np.asarray(requestable, bool)
    n = int(pool.sum())
    if n == 0:
        return 0.0
    cost = 0.0
    pairs, counts = np.unique(np.stack([shard_of[pool], slice_of[pool]], 1), axis=0, return_counts=True)
    for (j, r), count in zip(pairs, counts, strict=True):
        position = np.flatnonzero(pool & (shard_of == j) & (slice_of == r))[:1]
        starts = request_starts(graph, shard_of, slice_of, position)
        cost += count * deletion_cost(graph, shard_of, slice_of, retain, starts, budget, convention=convention)
    return float(cost / n / n)
