r"""SAFE on the method contract: adapters of a shard graph on a frozen backbone; a deletion retrains what it touched.

* ``init``: train the backbone on core data only, cache its features at ``config.layer``, deal the forgettable ids
  into shards once (stored in the state), then train every node's adapter from scratch on ``D_i`` (vmapped in
  chunks of ``W``; :mod:`.nodes`).
* ``forget(state, ids)``: the affected nodes ``A = ⋃_x {shard(x)} ∪ N⁻(shard(x))`` get the next version and a fresh
  initialisation and are retrained on their reduced ``D_i``, at the build's width and capacity; every other node is
  untouched. The result is **bitwise** the build from scratch on the retained data with the same versions
  (:meth:`Safe.retrain`, the gold standard), so SAFE's forgetting is exact by construction and that is tested.
* ``predict``: one backbone pass, every active node's adapter, combined by ``config.ensemble``
  (:mod:`.ensemble`); returned as log-probabilities (floored at the smallest normal float), valid logits.

With ``budget.slices = R > 1`` every node is trained in SISA's stages (:mod:`.nodes`, :mod:`.slices`) and keeps a
checkpoint after each; a deletion restarts each affected node from the stage before the earliest deleted sample's
slice in its data, and the result is still bitwise the sliced build from scratch.

The state holds everything a later request needs: backbone, stacked adapters and their stage checkpoints, versions,
the shard and slice assignments, the graph's adjacency, the capacities, the ledger and the root key. The only caches
are the backbone's features (keyed by the backbone's content; :class:`.backbone.FeatureCache`) and the frozen
backbone itself (a function of the config and the data).

With ``graph.kind = "safe_shard"`` the safe shard (node 0) is the core data, which no request may name: every
other node trains on its own shard plus the core. A node whose own shard a deletion empties is dropped from the
ensemble (and trains on nothing); the build applies the same rule, so exactness holds (spec ``safe.md`` §12.5).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from jaxforget import errors, models
from jaxforget.methods import base
from jaxforget.methods.safe import adapter as adapter_lib
from jaxforget.methods.safe import backbone as backbone_lib
from jaxforget.methods.safe import ensemble, graph, nodes, slices

PyTree = Any

GRAPH_KINDS = ("isolated", "cliques", "safe_shard", "ring")


@struct.dataclass
class SafeState:
    """Everything a SAFE system needs for its next request.

    Attributes:
      backbone: the frozen backbone's variables (trained on core data only; never changes).
      adapters: every node's adapter parameters, stacked on a leading node axis ``[n_nodes, …]``.
      checkpoints: ``[n_nodes, R-1, …]`` each node's parameters after each stage but the last (``R = 1``: None).
      versions: ``int32[n_nodes, R]`` how many times each node's stage was retrained (its key's second fold).
      active: ``bool[n_nodes]`` nodes whose own shard still holds data (the ensemble's members).
      shard_of: ``int32[n_train]`` each training sample's shard (``-1``: core data no adapter trains on).
      slice_of: ``int32[n_train]`` each training sample's slice (stage ``s`` trains on slices ``0..s``).
      adjacency: ``bool[n_nodes, n_nodes]`` the shard graph, ``adjacency[i, j] = (i → j)``.
      capacity: ``int32[R]`` the per-node capacity of each stage, fixed at build.
      ledger: the deletion ledger.
      key: ``uint32[2]`` the root key data (node ``i`` at version ``v`` trains from ``fold_in(fold_in(root, i), v)``).
    """

    backbone: PyTree
    adapters: PyTree
    checkpoints: PyTree
    versions: jax.Array
    active: jax.Array
    shard_of: jax.Array
    slice_of: jax.Array
    adjacency: jax.Array
    capacity: jax.Array
    ledger: base.Ledger
    key: jax.Array


def default_config(name: str = "safe", kind: str = "cliques") -> ml_collections.ConfigDict:
    """The SAFE method config (recommended defaults, spec §9; unverified against the paper)."""
    return ml_collections.ConfigDict(dict(
        name=name,
        # The frozen backbone, an input of every build: the orbax checkpoint `checkpoint` (written by
        # backbone.save_backbone with the ids it was trained on), or else cross-entropy SGD on core data only from
        # `seed`.
        backbone=dict(checkpoint="", seed=0, epochs=30, batch_size=64, learning_rate=0.05, momentum=0.9,
                      weight_decay=5e-4),
        layer="head:input",  # features: the input of the backbone's head (its penultimate representation)
        # kind: isolated | cliques (groups of `clique`) | safe_shard (node 0 = the core data) | ring (`degree`)
        graph=dict(kind=kind, shards=8, clique=2, degree=1),
        stratify=True,  # deal each class round-robin over the shards
        adapter=dict(name="linear", num_heads=4, num_queries=1, positional=True),
        # min_steps: a floor on each adapter's optimiser steps, so that a small shard is not left under-trained by
        # an epoch budget (the shard sweep in the README measures what it buys).
        # slices: SISA's slices per node (1: none); a deletion restarts from the stage before its slice.
        budget=dict(epochs=30, batch_size=32, min_steps=300, learning_rate=1e-3, weight_decay=1e-4,
                    own_shard_weight=1.0, slices=1),
        # Nodes trained at once (vmap width; inert lanes cost as much as real ones). 0: the largest affected set of
        # one requestable shard, so that a one-shard request is one chunk with no idle lane.
        width=0,
        ensemble="softmax_mean",
    ))


def build_graph(config: ml_collections.ConfigDict) -> graph.ShardGraph:
    """The shard graph ``config.graph`` describes (``safe_shard``: ``shards`` user shards plus node 0)."""
    g = config.graph
    base.check_choice(g.kind, GRAPH_KINDS, "method.graph.kind")
    if g.kind == "isolated":
        return graph.isolated(g.shards)
    if g.kind == "cliques":
        return graph.disjoint_cliques(g.shards, g.clique)
    if g.kind == "safe_shard":
        return graph.safe_shard(g.shards)
    return graph.ring(g.shards, g.degree)


class Safe(base.Method):
    """SAFE: a shard graph of adapters on a frozen backbone (see the module docstring)."""

    name = "safe"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return default_config(cls.name)

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        super().validate_config(config)
        for field in ("shards", "clique", "degree"):
            base.check_range(config.graph[field], f"method.graph.{field}", low=1 if field != "degree" else 0)
        build_graph(config)  # named errors for an impossible graph, at construction
        backbone_lib.parse_layer(config.layer)
        base.check_choice(config.adapter.name, tuple(adapter_lib.ADAPTERS), "method.adapter.name")
        for field in ("num_heads", "num_queries"):
            base.check_range(config.adapter[field], f"method.adapter.{field}", low=1)
        base.check_choice(config.ensemble, ensemble.RULES, "method.ensemble")
        b = config.budget
        base.check_range(b.epochs, "method.budget.epochs", low=1)
        base.check_range(b.batch_size, "method.budget.batch_size", low=1)
        base.check_range(b.min_steps, "method.budget.min_steps", low=0)
        base.check_range(b.learning_rate, "method.budget.learning_rate", low=0, low_open=True)
        base.check_range(b.weight_decay, "method.budget.weight_decay", low=0)
        base.check_range(b.own_shard_weight, "method.budget.own_shard_weight", low=0, low_open=True)
        base.check_range(b.slices, "method.budget.slices", low=1)
        base.check_range(config.width, "method.width", low=0)
        t = config.backbone
        if not isinstance(t.checkpoint, str):
            raise errors.ConfigError(f"method.backbone.checkpoint is a directory path or '', got {t.checkpoint!r}.")
        if t.checkpoint and not os.path.isdir(t.checkpoint):
            raise errors.ConfigError(f"method.backbone.checkpoint: no directory {t.checkpoint!r} (write one with "
                                     "jaxforget.methods.safe.backbone.save_backbone, or '' to train one on core data).")
        base.check_range(t.seed, "method.backbone.seed", low=0)
        base.check_range(t.epochs, "method.backbone.epochs", low=1)
        base.check_range(t.batch_size, "method.backbone.batch_size", low=1)
        base.check_range(t.learning_rate, "method.backbone.learning_rate", low=0, low_open=True)
        base.check_range(t.momentum, "method.backbone.momentum", low=0, high=1)
        base.check_range(t.weight_decay, "method.backbone.weight_decay", low=0)

    def __init__(self, model, splits, config, *, mesh=None):
        super().__init__(model, splits, config, mesh=mesh)
        self.graph = build_graph(config)
        self.core_ids = np.asarray(splits.core_ids)
        self.is_core = np.isin(self.train_ids, self.core_ids)
        num_user = int((~self.is_core).sum())
        if config.graph.shards > num_user:
            raise graph.ShardGraphError(f"More shards than samples: {config.graph.shards} shards for {num_user} "
                                        "forgettable samples.")
        a = config.adapter  # one section for every adapter kind: each takes the fields it has
        self.adapter = adapter_lib.get_adapter({"name": a.name, "num_classes": self.num_classes,
                                                **{k: a[k] for k in adapter_lib.fields(a.name) if k in a}})
        b = config.budget
        self.budget = nodes.Budget(epochs=int(b.epochs), batch_size=int(b.batch_size), min_steps=int(b.min_steps),
                                   learning_rate=float(b.learning_rate), weight_decay=float(b.weight_decay),
                                   own_shard_weight=float(b.own_shard_weight), slices=int(b.slices))
        # Protected shards (the safe shard) never receive a request: their affected sets do not size a request.
        widest = max(len(self.graph.affected(j)) for j in range(self.graph.num_nodes) if j not in self.graph.protected)
        self.width = min(int(config.width) or widest, self.graph.num_nodes)
        self.labels = jax.device_put(np.asarray(splits.train.y, np.int32))
        self._features = backbone_lib.FeatureCache(model, np.asarray(splits.train.x), config.layer)
        # A layer the model lacks is named now, not after the backbone has trained (shapes only: nothing runs).
        jax.eval_shape(lambda x: backbone_lib.layer_features(
            model, models.init_variables(model, jax.random.key(0), x.shape[1:]), x, config.layer),
            jax.ShapeDtypeStruct((1, *splits.train.x.shape[1:]), jnp.float32))
        self._backbone = None  # the frozen backbone, a function of the config and the data: made once

    def frozen_backbone(self) -> PyTree:
        """The backbone every :meth:`init` uses: loaded from ``config.backbone.checkpoint`` (refused if it saw a
        forgettable id), or trained on core data only from ``config.backbone.seed``.

        Raises:
          BackboneDataError: the checkpoint's training ids intersect the forgettable ids, or are undeclared.
          CorruptBackboneError, ShapeDtypeError, ConfigError: an unreadable, altered or mismatched checkpoint.
        """
        if self._backbone is None:
            path = self.config.backbone.checkpoint
            if path:
                like = models.init_variables(self.model, jax.random.key(0), self.splits.train.x.shape[1:])
                backbone, seen = backbone_lib.load_backbone(path, like)
                backbone_lib.check_disjoint(seen, self.forgettable_ids())
            else:
                backbone = self.train_backbone(jax.random.key(int(self.config.backbone.seed)))
            self._backbone = backbone
        return self._backbone

    def protected_ids(self) -> np.ndarray:
        return self.core_ids

    # ------------------------------------------------------------------ node data

    def _training_rows(self, shard_of: np.ndarray, retain: np.ndarray, node: int) -> tuple[np.ndarray, np.ndarray]:
        """Retained rows of node ``node``'s training set and whether each is in its own shard."""
        rows = np.flatnonzero(retain & np.isin(shard_of, self.graph.training_shards(node)))
        return rows, shard_of[rows] == node

    def versions_of(self, shard_of: np.ndarray, slice_of: np.ndarray, removed_by: np.ndarray) -> np.ndarray:
        """Each node stage's version implied by a ledger: how many requests retrained it (a request retrains, from
        :func:`.slices.request_starts` on, the nodes its samples' shards affect). Versions are a function of the
        ledger, so a state given another ledger (:meth:`with_ledger`, the harness's oracles) rebuilds exactly what
        that sequence of requests would give."""
        versions = np.zeros((self.graph.num_nodes, self.budget.slices), np.int32)
        removed_by = np.asarray(removed_by)
        for request in np.unique(removed_by[removed_by > 0]):
            _bump(versions, slices.request_starts(self.graph, shard_of, slice_of,
                                                  np.flatnonzero(removed_by == request)))
        return versions

    def with_ledger(self, state: SafeState, new_ledger: base.Ledger) -> SafeState:
        shard_of = np.asarray(state.shard_of)
        retain = new_ledger.retain_mask()
        versions = self.versions_of(shard_of, np.asarray(state.slice_of), np.asarray(new_ledger.removed_by))
        return state.replace(ledger=new_ledger, versions=versions, active=self._active(shard_of, retain))

    def _active(self, shard_of: np.ndarray, retain: np.ndarray) -> np.ndarray:
        return np.bincount(shard_of[retain & (shard_of >= 0)], minlength=self.graph.num_nodes) > 0

    def _train(self, state: SafeState, adapters: PyTree, checkpoints: PyTree, starts: dict[int, int],
               versions: np.ndarray, retain: np.ndarray) -> tuple[PyTree, PyTree, np.ndarray, np.ndarray]:
        """``adapters`` and ``checkpoints`` with each node of ``starts`` retrained from its stage on its retained
        data (from scratch at stage 0), in chunks of the build's width (every chunk the same compiled shape); also
        the sample-gradient evaluations and the optimiser steps per node.

        Nodes are grouped by start stage, so a chunk compiles only the stages its nodes run.
        """
        shard_of, slice_of = np.asarray(state.shard_of), np.asarray(state.slice_of)
        active = self._active(shard_of, retain)
        capacity = tuple(int(c) for c in np.asarray(state.capacity))
        feats = self._features.get(state.backbone)
        order = sorted(starts, key=lambda i: (-starts[i], i))
        counts, steps = [], []
        for lo in range(0, len(order), self.width):
            chunk_nodes = order[lo : lo + self.width]
            rows, own = [], []
            for i in chunk_nodes:
                r, o = self._training_rows(shard_of, retain, i) if active[i] else (np.zeros(0, np.int64),) * 2
                rows.append(r)
                own.append(o.astype(bool))
            chunk = nodes.pack_chunk(rows, [self.train_ids[r] for r in rows], nodes=chunk_nodes,
                                     versions=[versions[i] for i in chunk_nodes], capacity=capacity,
                                     width=self.width, budget=self.budget, own=own,
                                     slices=[slice_of[r] for r in rows], start=[starts[i] for i in chunk_nodes])
            # Inert lanes gather node 0's checkpoints (unused) and scatter past the end, which the update drops.
            index = np.full(self.width, self.graph.num_nodes, np.int32)
            index[: len(chunk_nodes)] = chunk_nodes
            index = jax.device_put(index)
            trained = nodes.train_chunk(self.adapter, self.budget, capacity, state.key, chunk, feats, self.labels,
                                        None if checkpoints is None else _get_rows(checkpoints, index))
            adapters = _set_rows(adapters, index, trained.params)
            if checkpoints is not None:
                checkpoints = _set_rows(checkpoints, index, trained.checkpoints)
            counts.append(np.asarray(trained.evaluations)[: len(chunk_nodes)])
            run = np.arange(self.budget.slices) >= chunk.start[:, None]
            steps.append(np.where(run, chunk.steps, 0)[: len(chunk_nodes)].sum(axis=1))
        return adapters, checkpoints, np.concatenate(counts), np.concatenate(steps)

    # ------------------------------------------------------------------ the contract

    def init(self, key: jax.Array, backbone: PyTree | None = None, *, backbone_ids=None) -> SafeState:
        """Deals the shards and slices and trains every node on the frozen backbone.

        Args:
          key: the build's randomness (shards, slices, every node's key).
          backbone: variables of the model to use instead of :meth:`frozen_backbone` (e.g. one per seed in a sweep).
          backbone_ids: the training ids ``backbone`` saw (required with it; refused if any is forgettable).
        """
        return self.rebuild(self._blank(key, self._given_backbone(backbone, backbone_ids)))

    def _given_backbone(self, backbone: PyTree | None, backbone_ids) -> PyTree:
        if backbone is None:
            return self.frozen_backbone()
        backbone_lib.check_disjoint(backbone_ids, self.forgettable_ids())
        return backbone

    def _blank(self, key: jax.Array, backbone: PyTree) -> SafeState:
        """The state ``key`` deals on ``backbone``, with no adapter trained yet (:meth:`rebuild` trains them)."""
        errors.check_finite(self._features.get(backbone), "backbone features")
        shard_of = np.full(self.num_train, -1, np.int32)
        user = np.flatnonzero(~self.is_core)
        first = 1 if self.graph.kind == "safe_shard" else 0
        shard_of[user] = first + graph.assign_shards(self.train_ids[user], np.asarray(self.splits.train.y)[user],
                                                     self.config.graph.shards, seed=base.seed_of(
                                                         jax.random.fold_in(key, 2)),
                                                     stratify=self.config.stratify)
        if first:
            shard_of[self.is_core] = 0
        slice_of = slices.assign_slices(shard_of, self.budget.slices, seed=base.seed_of(jax.random.fold_in(key, 3)),
                                        fixed=self.is_core)
        retain = np.ones(self.num_train, bool)
        capacity = [nodes.capacity_for(max(int(slices.stage_members(self.graph, shard_of, slice_of, retain, i, s).sum())
                                           for i in range(self.graph.num_nodes)), self.budget.batch_size)
                    for s in range(self.budget.slices)]
        state = SafeState(backbone=backbone, adapters=None, checkpoints=None,
                          versions=np.zeros((self.graph.num_nodes, self.budget.slices), np.int32),
                          active=self._active(shard_of, retain), shard_of=shard_of, slice_of=slice_of,
                          adjacency=self.graph.adjacency(), capacity=np.asarray(capacity, np.int32),
                          ledger=self.empty_ledger(),
                          key=jax.random.key_data(jax.random.fold_in(key, 1)))
        return state

    def retrain_population(self, state: SafeState, keys) -> list[SafeState]:
        """One independent build per key on ``state``'s backbone and retained data (each key deals its own shards,
        and its versions follow the ledger); trained once each, not built and then retrained.

        The backbone is SAFE's fixed input (never trained on forgettable data; :meth:`frozen_backbone`), so every
        population varies what SAFE itself draws: shards, slices and node keys.
        """
        return [self.rebuild(self.with_ledger(self._blank(k, state.backbone), state.ledger)) for k in keys]

    def train_backbone(self, key: jax.Array) -> PyTree:
        """A backbone trained from ``key`` on core data only (the default :meth:`frozen_backbone` uses
        ``config.backbone.seed``)."""
        return backbone_lib.train_backbone(self.model, self.splits, self.config.backbone, jax.random.fold_in(key, 0))

    def rebuild(self, state: SafeState) -> SafeState:
        """Every node trained from scratch on the state's retained data at the state's stored versions (what
        :meth:`retrain` runs once the versions are checked against the ledger)."""
        retain = state.ledger.retain_mask()
        versions = np.asarray(state.versions, np.int32)
        adapters, checkpoints = self._zero_adapters(state.backbone)
        adapters, checkpoints, _, _ = self._train(state, adapters, checkpoints, dict.fromkeys(
            range(self.graph.num_nodes), 0), versions, retain)
        return jax.device_put(state.replace(adapters=adapters, checkpoints=checkpoints, versions=versions,
                                            active=self._active(np.asarray(state.shard_of), retain)))

    def retrain(self, state: SafeState, key: jax.Array | None = None) -> SafeState:
        """The build from scratch on the retained data with the same backbone, shards, capacity and versions (and
        the same root key unless ``key`` is given): bitwise what :meth:`forget` produces."""
        self.check_state(state)
        if key is not None:
            state = state.replace(key=jax.random.key_data(jax.random.fold_in(key, 1)))
        return self.rebuild(state)

    def forget(self, state: SafeState, ids, *, key: jax.Array | None = None) -> tuple[SafeState, base.ForgetInfo]:
        """Retrains the affected nodes (``key`` is unused: a node's randomness is its id and version)."""
        del key
        positions = self.validate_request(state, ids)
        began = time.perf_counter()
        new_ledger = state.ledger.record(positions)
        retain = new_ledger.retain_mask()
        shard_of = np.asarray(state.shard_of)
        starts = slices.request_starts(self.graph, shard_of, np.asarray(state.slice_of), positions)
        affected = np.asarray(sorted(starts), np.int64)
        versions = _bump(np.asarray(state.versions, np.int32).copy(), starts)
        active = self._active(shard_of, retain)
        # A node whose own shard emptied trains on nothing, from scratch, as the build would.
        runs = {i: (stage if active[i] else 0) for i, stage in starts.items()}
        adapters, checkpoints, counts, steps = self._train(state, state.adapters, state.checkpoints, runs, versions,
                                                           retain)
        new_state = state.replace(adapters=adapters, checkpoints=checkpoints, versions=jax.device_put(versions),
                                  active=jax.device_put(active), ledger=new_ledger)
        jax.block_until_ready(new_state.adapters)
        seconds = time.perf_counter() - began
        total = max(int((retain & (shard_of >= 0)).sum()), 1)
        retrained = {i: stage for i, stage in starts.items() if active[i]}  # an emptied node is dropped, not retrained
        cost = functools.partial(slices.deletion_cost, self.graph, shard_of, np.asarray(state.slice_of), retain,
                                 retrained, self.budget)
        return new_state, base.ForgetInfo(
            request=int(new_ledger.num_requests), num_forgotten=len(positions), num_retained=int(retain.sum()),
            seconds=seconds, passes=float(counts.sum()) / total, solver="safe-retrain-affected",
            residual=0.0,  # exact: bitwise the rebuild from scratch
            iterations=int(steps.sum()),  # a dropped node trains for 0 steps
            notes={"affected_nodes": affected.tolist(), "dropped_nodes": affected[~active[affected]].tolist(),
                   "nodes": self.graph.num_nodes, "sample_gradients": int(counts.sum()),
                   "start_stages": [starts[i] for i in affected.tolist()],
                   "cost_sum": cost(convention="sum") / total, "cost_union": cost(convention="union") / total})

    def predict(self, state: SafeState, x) -> jax.Array:
        x = self.check_inputs(x)
        feats = backbone_lib.features(self.model, state.backbone, x, self.config.layer)
        logits = _node_logits(self.adapter)(state.adapters, feats)
        shard_of, retain = np.asarray(state.shard_of), state.ledger.retain_mask()
        extra = {}
        if self.config.ensemble == "proportional":
            extra["weights"] = jax.device_put(np.array(
                [len(self._training_rows(shard_of, retain, i)[0]) for i in range(self.graph.num_nodes)], np.float32))
        if self.config.ensemble == "coverage_aware":
            labels = np.asarray(self.splits.train.y)
            cover = np.zeros((self.graph.num_nodes, self.num_classes), bool)
            for i in range(self.graph.num_nodes):
                cover[i, labels[self._training_rows(shard_of, retain, i)[0]]] = True
            extra["coverage"] = jax.device_put(cover)
        probs = ensemble.combine(logits, self.config.ensemble, active=state.active, **extra)
        return jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))

    def warm_up(self, state: SafeState, ids, baselines=()) -> None:
        """One forget of ``ids``, then every other start stage's program (a chunk compiles the stages from its
        earliest start on), so that no timed request compiles, whichever slice it deletes from."""
        super().warm_up(state, ids, baselines)
        capacity = tuple(int(c) for c in np.asarray(state.capacity))
        feats = self._features.get(state.backbone)
        for stage in range(1, self.budget.slices):
            inert = nodes.pack_chunk([], [], nodes=[], versions=[], capacity=capacity, width=self.width,
                                     budget=self.budget)
            inert = dataclasses.replace(inert, start=np.full(self.width, stage, np.int32))
            index = jax.device_put(np.zeros(self.width, np.int32))
            jax.block_until_ready(nodes.train_chunk(self.adapter, self.budget, capacity, state.key, inert, feats,
                                                    self.labels, _get_rows(state.checkpoints, index)).params)

    def fit(self, state: SafeState, ids, *, epochs: int, learning_rate: float, batch_size: int, momentum: float,
            seed: int) -> SafeState:
        """Every adapter fine-tuned on the samples ``ids`` (SGD with momentum on its own cross-entropy)."""
        rows = self.splits.train.index_of(np.asarray(ids))
        adapters = nodes.finetune(self.adapter, state.adapters, self._features.get(state.backbone), self.labels, rows,
                                  epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                                  momentum=momentum, seed=seed)
        return state.replace(adapters=adapters)

    def mean_loss(self, state: SafeState, x, y) -> float:
        """Cross-entropy of the ensemble's probabilities, ``mean −log p(y|x)``."""
        logp = np.asarray(self.predict(state, x), np.float64)
        return float(-np.mean(logp[np.arange(len(logp)), np.asarray(y)]))

    def params(self, state: SafeState) -> PyTree:
        return state.adapters

    def _zero_adapters(self, backbone: PyTree) -> tuple[PyTree, PyTree]:
        """Zeros shaped like every node's adapter parameters, stacked ``[n_nodes, …]``, and like their stage
        checkpoints ``[n_nodes, R-1, …]`` (None unsliced: orbax stores no empty arrays)."""
        shape = self.splits.train.x.shape[1:]
        feat = jax.eval_shape(lambda v: backbone_lib.layer_features(self.model, v, jnp.zeros((1, *shape)),
                                                                    self.config.layer), backbone)
        one = jax.eval_shape(lambda: self.adapter.init(jax.random.key(0), jnp.zeros(feat.shape, feat.dtype))["params"])
        n, r = self.graph.num_nodes, self.budget.slices
        return (jax.tree.map(lambda s: jnp.zeros((n, *s.shape), s.dtype), one),
                jax.tree.map(lambda s: jnp.zeros((n, r - 1, *s.shape), s.dtype), one) if r > 1 else None)

    def abstract_state(self) -> SafeState:
        backbone = models.init_variables(self.model, jax.random.key(0), self.splits.train.x.shape[1:])
        n, r = self.graph.num_nodes, self.budget.slices
        adapters, checkpoints = self._zero_adapters(backbone)
        return SafeState(backbone=backbone, adapters=adapters, checkpoints=checkpoints,
                         versions=jnp.zeros((n, r), jnp.int32), active=jnp.zeros(n, bool),
                         shard_of=jnp.zeros(self.num_train, jnp.int32), slice_of=jnp.zeros(self.num_train, jnp.int32),
                         adjacency=jnp.zeros((n, n), bool), capacity=jnp.zeros(r, jnp.int32),
                         ledger=self.empty_ledger(), key=jax.random.key_data(jax.random.key(0)))

    # ------------------------------------------------------------------ checks and hooks

    def state_key(self) -> dict:
        # SISA is SAFE on the graph with no edges: the name and the vmap width (how many nodes train at once) do not
        # change what a state holds.
        config = {k: v for k, v in self.config.to_dict().items() if k not in ("name", "width")}
        return {"family": "safe", "model": repr(self.model), "config": config}

    def check_state(self, state: SafeState) -> None:
        super().check_state(state)
        adjacency = np.asarray(state.adjacency)
        if adjacency.shape != (self.graph.num_nodes,) * 2 or not np.array_equal(adjacency, self.graph.adjacency()):
            raise errors.ShapeDtypeError(f"The state's shard graph ({adjacency.shape[0]} nodes) is not the "
                                         f"configured {self.graph.kind} graph of {self.graph.num_nodes} nodes.")
        shard_of = np.asarray(state.shard_of)
        if shard_of.shape != (self.num_train,) or not np.array_equal(shard_of < 0, self.is_core & (
                self.graph.kind != "safe_shard")):
            raise errors.ShapeDtypeError("The state's shard assignment does not fit this training set's core/user "
                                         "split: the state comes from another dataset or split.")
        slice_of = np.asarray(state.slice_of)
        if slice_of.shape != (self.num_train,) or slice_of.min(initial=0) < 0 or slice_of.max(
                initial=0) >= self.budget.slices or np.asarray(state.capacity).shape != (self.budget.slices,):
            capacities = np.asarray(state.capacity).tolist()
            raise errors.ShapeDtypeError(f"The state's slices (capacities {capacities}) do not "
                                         f"fit method.budget.slices = {self.budget.slices} on this training set.")
        implied = self.versions_of(shard_of, slice_of, np.asarray(state.ledger.removed_by))
        if not np.array_equal(np.asarray(state.versions), implied):
            raise errors.ShapeDtypeError(f"The state's node versions {np.asarray(state.versions).tolist()} disagree "
                                         f"with the {implied.tolist()} its ledger implies: the state was altered.")

    @classmethod
    def study(cls, name: str, config: ml_collections.ConfigDict, *, workdir: str | None = None) -> dict:
        if name == "shards":
            from jaxforget.methods.safe import study  # pylint: disable=import-outside-toplevel

            return study.shard_sweep(config.job, graphs=list(config.graphs), shards=list(config.shards),
                                     seeds=list(config.seeds), requests=int(config.requests), plots_dir=workdir)
        return super().study(name, config, workdir=workdir)

    def retrain_inputs(self, state: SafeState) -> PyTree:
        return (state.backbone, state.key, state.shard_of, state.slice_of, state.versions, state.capacity)

    def describe(self, state: SafeState) -> dict:
        shard_of = np.asarray(state.shard_of)
        sizes = np.bincount(shard_of[shard_of >= 0], minlength=self.graph.num_nodes)
        if self.budget.slices == 1:
            cost = functools.partial(graph.expected_cost, self.graph, sizes)
        else:  # by enumeration over (shard, slice) classes of the build's data
            cost = functools.partial(slices.expected_cost, self.graph, shard_of, np.asarray(state.slice_of),
                                     np.ones(self.num_train, bool), self.budget, requestable=~self.is_core)
        return {"graph": self.graph.kind, "nodes": self.graph.num_nodes, "edges": self.graph.num_edges,
                "slices": self.budget.slices, "width": self.width,
                "capacity": np.asarray(state.capacity).tolist(),
                "adapter_params": int(sum(np.prod(a.shape[1:]) for a in jax.tree.leaves(state.adapters))),
                "expected_cost_sum": cost(convention="sum"), "expected_cost_union": cost(convention="union")}


class Sisa(Safe):
    """SISA with adapters: SAFE on the graph with no edges (every node trains on its own shard only)."""

    name = "sisa"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return default_config(cls.name, kind="isolated")

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        super().validate_config(config)
        if config.graph.kind != "isolated":
            raise errors.ConfigError(f"method 'sisa' is SAFE on the isolated graph; got method.graph.kind = "
                                     f"{config.graph.kind!r} (use method 'safe' for other graphs).")


@jax.jit
def _set_rows(stacked: PyTree, index: jax.Array, rows: PyTree) -> PyTree:
    """``stacked`` with its node rows ``index`` replaced by ``rows``; out-of-range indices are dropped (jitted: no
    implicit host scalars)."""
    return jax.tree.map(lambda a, r: a.at[index].set(r, mode="drop"), stacked, rows)


def _bump(versions: np.ndarray, starts: dict[int, int]) -> np.ndarray:
    """``versions`` (in place) after one request that retrains each node of ``starts`` from its stage on."""
    for i, stage in starts.items():
        versions[i, stage:] += 1
    return versions


@jax.jit
def _get_rows(stacked: PyTree, index: jax.Array) -> PyTree:
    """The node rows ``index`` of ``stacked`` (out-of-range indices clamp: their lanes are inert)."""
    return jax.tree.map(lambda a: a[index], stacked)


@functools.lru_cache(maxsize=16)
def _node_logits(adapter):
    """Jitted ``[n, batch, C]`` logits of stacked adapters on shared features (one program per adapter module)."""
    return jax.jit(jax.vmap(lambda p, z: adapter.apply({"params": p}, z), in_axes=(0, None)))
