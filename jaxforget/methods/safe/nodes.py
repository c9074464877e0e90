r"""Training SAFE nodes: every adapter of a chunk trained at once with ``vmap``, each from its own data only.

A node's result is a pure function of (the sorted ids of its training set ``D_i`` with their features and labels,
its key, the budget, the capacity ``L`` and the chunk width ``W``): spec ``safe.md`` §5.2, §5.3 and §7.

* **Keys** depend only on (seed, node id, version): :func:`node_key`. A retrained node gets the next version.
* **Order.** Epoch ``e`` visits the node's valid samples sorted by ``u = uniform(fold_in(order_key(e), id))``: the
  order depends on the ids, so removing one id leaves the others' relative order unchanged and padding never
  matters.
* **Budget in optimiser steps, with a floor**: ``steps_i = max(min_steps, epochs · ⌈|D_i| / B⌉)``; a tiny shard
  still gets ``min_steps`` updates. The last batch of an epoch is partial and masked, never dropped.
* **Schedule per node**: AdamW (``scale_by_adam`` + decoupled weight decay, times ``-lr_i(t)``) with a cosine from
  ``lr`` to 0 over the node's own ``steps_i`` and its own step counter.
* **Fixed width.** The chunk runs ``max_steps`` steps (static, from ``L``); on a node's inactive steps its
  parameters *and* optimiser state are kept (``where(active, new, old)``), so a short node in a long chunk is
  bitwise the node trained alone. Chunks are padded to ``W`` lanes with inert nodes (no steps), so a retrain of a
  few nodes runs the same compiled program as the build.

The trainer also counts the sample-gradient evaluations of each node (its masked batch entries over its active
steps): with no floor that is ``epochs · |D_i|``, the work the cost model of :mod:`.graph` counts.

Examples:
  >>> from jaxforget.methods.safe import adapter
  >>> budget = Budget(epochs=2, batch_size=4, min_steps=1, learning_rate=0.1, weight_decay=0.0)
  >>> feats = jnp.eye(6); labels = jnp.array([0, 1, 0, 1, 0, 1])
  >>> chunk = pack_chunk([np.array([0, 1, 2]), np.array([3, 4, 5])], [np.array([0, 1, 2]), np.array([3, 4, 5])],
  ...                    nodes=[0, 1], versions=[0, 0], capacity=4, width=4, budget=budget)
  >>> chunk.steps.tolist()                      # two epochs of one batch each; two inert lanes
  [2, 2, 0, 0]
  >>> root = jax.random.key_data(jax.random.key(0))
  >>> params, evaluations = train_chunk(adapter.LinearHead(2), budget, 4, root, chunk, feats, labels)
  >>> evaluations.tolist(), params["head"]["kernel"].shape
  ([6, 6, 0, 0], (4, 6, 2))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxforget import errors

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long and how a node trains (spec §5.4; recommended defaults, unverified against the paper).

    Attributes:
      epochs: passes over the node's own ``D_i`` (before the floor).
      batch_size: ``B``.
      min_steps: the floor on optimiser steps per node (tiny shards would otherwise get a handful of updates).
      learning_rate: peak learning rate of the per-node cosine.
      weight_decay: AdamW's decoupled weight decay.
      own_shard_weight: loss weight of the node's own shard relative to its neighbours' samples.
    """

    epochs: int = 30
    batch_size: int = 32
    min_steps: int = 0
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    own_shard_weight: float = 1.0

    def steps(self, size: int) -> int:
        """Optimiser steps of a node with ``size`` training samples (0 for an empty node: never train on nothing)."""
        if size <= 0:
            return 0
        return max(self.min_steps, self.epochs * -(-size // self.batch_size))

    def max_steps(self, capacity: int) -> int:
        """The chunk's static loop length: the steps of a node filling the capacity."""
        return self.steps(capacity)


def capacity_for(max_size: int, batch_size: int) -> int:
    """The per-node capacity ``L``: the largest training set rounded up to a whole batch (at least one batch).

    Fixed at build time and stored: a retrain and the reference build must use the same ``L``.

    Examples:
      >>> capacity_for(33, 32), capacity_for(0, 32)
      (64, 32)
    """
    return max(1, -(-int(max_size) // batch_size)) * batch_size


def node_key(root: Array, node: Array, version: Array) -> Array:
    """``fold_in(fold_in(root, node), version)``: the only source of a node's randomness (typed key).

    Never derived from data, lane, chunk or time. Computed inside the trainer, from the node ids and versions a
    :class:`Chunk` carries.
    """
    return jax.random.fold_in(jax.random.fold_in(root, node), version)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """``W`` lanes of node data, padded (host arrays; inert lanes have no valid samples and no steps).

    Attributes:
      nodes: ``[W]`` int32 node ids (inert lanes: -1).
      versions: ``[W]`` int32 node versions (how many times each node was retrained).
      rows: ``[W, L]`` int32 rows of the feature table, sorted by sample id (padding points at row 0).
      ids: ``[W, L]`` int32 sample ids (the order's randomness is keyed by them).
      valid: ``[W, L]`` bool.
      own: ``[W, L]`` bool: the sample is in the node's own shard.
      steps: ``[W]`` int32 optimiser steps per lane.
    """

    nodes: np.ndarray
    versions: np.ndarray
    rows: np.ndarray
    ids: np.ndarray
    valid: np.ndarray
    own: np.ndarray
    steps: np.ndarray


def pack_chunk(rows: Sequence[np.ndarray], ids: Sequence[np.ndarray], *, nodes: Sequence[int],
               versions: Sequence[int], capacity: int, width: int, budget: Budget,
               own: Sequence[np.ndarray] | None = None) -> Chunk:
    """Lays out up to ``width`` nodes' training sets for :func:`train_chunk`.

    Args:
      rows: per node, the feature-table rows of its training samples.
      ids: per node, the sample ids of those rows (the layout sorts by id).
      nodes: per node, its id in the graph (its key's first fold).
      versions: per node, its version (its key's second fold).
      capacity: ``L`` (a multiple of the batch size, ≥ every node's size).
      width: ``W`` lanes; missing lanes are inert.
      budget: the training budget (steps per node).
      own: per node, whether each sample is in its own shard (default all True).

    Raises:
      ShapeDtypeError: more nodes than lanes, a node larger than the capacity, misaligned rows and ids, or a
        capacity that is not a whole number of batches.
    """
    if len(rows) > width or len(ids) != len(rows) or len(nodes) != len(rows) or len(versions) != len(rows):
        raise errors.ShapeDtypeError(f"A chunk of width {width} got {len(rows)} nodes, {len(ids)} id lists, "
                                     f"{len(nodes)} node ids and {len(versions)} versions.")
    if capacity % budget.batch_size:
        raise errors.ShapeDtypeError(f"Capacity {capacity} is not a multiple of the batch size {budget.batch_size}.")
    shape = (width, capacity)
    chunk = Chunk(nodes=np.full(width, -1, np.int32), versions=np.zeros(width, np.int32),
                  rows=np.zeros(shape, np.int32), ids=np.zeros(shape, np.int32), valid=np.zeros(shape, bool),
                  own=np.zeros(shape, bool), steps=np.zeros(width, np.int32))
    for lane, (r, i) in enumerate(zip(rows, ids, strict=True)):
        r, i = np.asarray(r), np.asarray(i)
        if r.shape != i.shape or r.ndim != 1:
            raise errors.ShapeDtypeError(f"Node in lane {lane}: rows {r.shape} and ids {i.shape} must be aligned 1-D.")
        if len(r) > capacity:
            raise errors.ShapeDtypeError(f"Node in lane {lane} has {len(r)} samples, over the capacity {capacity}.")
        order = np.argsort(i, kind="stable")
        n = len(r)
        chunk.nodes[lane], chunk.versions[lane] = nodes[lane], versions[lane]
        chunk.rows[lane, :n], chunk.ids[lane, :n], chunk.valid[lane, :n] = r[order], i[order], True
        chunk.own[lane, :n] = True if own is None else np.asarray(own[lane], bool)[order]
        chunk.steps[lane] = budget.steps(n)
    return chunk


def _optimizer(weight_decay: float) -> optax.GradientTransformation:
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))


def _train_node(adapter: nn.Module, budget: Budget, max_steps: int, root, node, version, rows, ids, valid, own, steps,
                feats, labels):
    """One node (vmapped over lanes by :func:`train_chunk`). Returns its params and its sample-gradient count."""
    k_node = node_key(jax.random.wrap_key_data(root), node, version)
    size = valid.sum()
    batch = budget.batch_size
    per_epoch = jnp.maximum(1, (size + batch - 1) // batch)
    params = adapter.init(jax.random.fold_in(k_node, 0), feats[:1])["params"]
    tx = _optimizer(budget.weight_decay)
    opt = tx.init(params)
    order_key = jax.random.fold_in(k_node, 1)
    slots = jnp.arange(batch)

    def loss(p, x, y, w):
        ce = optax.softmax_cross_entropy_with_integer_labels(adapter.apply({"params": p}, x), y)
        return (w * ce).sum() / jnp.maximum(w.sum(), 1.0)

    def step(t, carry):
        params, opt, count = carry
        epoch, b = t // per_epoch, t % per_epoch
        k = jax.random.fold_in(order_key, epoch)
        u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(k, i)))(ids)
        order = jnp.argsort(jnp.where(valid, u, jnp.inf), stable=True)
        sl = jax.lax.dynamic_slice(order, (b * batch,), (batch,))
        mask = (b * batch + slots) < size
        w = mask.astype(jnp.float32) * jnp.where(own[sl], jnp.float32(budget.own_shard_weight), jnp.float32(1.0))
        r = rows[sl]
        grads = jax.grad(loss)(params, feats[r], labels[r], w)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam bias correction is float ** int32
            updates, new_opt = tx.update(grads, opt, params)
        progress = t.astype(jnp.float32) / jnp.maximum(steps, 1).astype(jnp.float32)
        lr = budget.learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        new_params = optax.apply_updates(params, optax.tree.scale(-lr, updates))
        active = t < steps
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(active, new, old))
        return keep(new_params, params), keep(new_opt, opt), count + jnp.where(active, mask.sum(), 0)

    params, _, count = jax.lax.fori_loop(0, max_steps, step, (params, opt, jnp.zeros((), jnp.int32)))
    return params, count


@functools.lru_cache(maxsize=16)
def _compiled(adapter: nn.Module, budget: Budget, capacity: int):
    body = functools.partial(_train_node, adapter, budget, budget.max_steps(capacity))
    return jax.jit(jax.vmap(body, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, None, None)))


def train_chunk(adapter: nn.Module, budget: Budget, capacity: int, root: Array, chunk: Chunk, feats: Array,
                labels: Array) -> tuple[dict, Array]:
    """Trains the ``W`` lanes of ``chunk`` together (one compiled program per adapter, budget and capacity).

    Args:
      adapter: the adapter module (:mod:`.adapter`).
      budget: the training budget.
      capacity: ``L``, the chunk's per-node length.
      root: ``uint32[2]`` the method's root key data (node keys fold in node id and version).
      chunk: the lanes (:func:`pack_chunk`).
      feats: ``[N, …]`` the feature table (frozen backbone features of every trainable sample).
      labels: ``[N]`` int labels.

    Returns:
      ``params`` stacked on a leading lane axis ``[W, …]`` (inert lanes hold an untrained init) and ``[W]`` int32
      sample-gradient evaluations per lane.
    """
    fn = _compiled(adapter, budget, int(capacity))
    # Explicit copies: requests run under a host-to-device transfer guard.
    arrays = jax.device_put((np.asarray(root, np.uint32), chunk.nodes, chunk.versions, chunk.rows, chunk.ids,
                             chunk.valid, chunk.own, chunk.steps))
    return fn(*arrays, feats, labels)


@functools.lru_cache(maxsize=16)
def _finetune_step(adapter: nn.Module, learning_rate: float, momentum: float):
    tx = optax.sgd(learning_rate, momentum=momentum or None)

    def one(params, opt, x, y, w):
        def loss(p):
            ce = optax.softmax_cross_entropy_with_integer_labels(adapter.apply({"params": p}, x), y)
            return (w * ce).sum() / jnp.maximum(w.sum(), 1.0)

        updates, opt = tx.update(jax.grad(loss)(params), opt, params)
        return optax.apply_updates(params, updates), opt

    step = jax.vmap(one, in_axes=(0, 0, None, None, None))
    return tx, jax.jit(step)


def finetune(adapter: nn.Module, stacked: dict, feats: Array, labels: Array, rows: np.ndarray, *, epochs: int,
             learning_rate: float, batch_size: int, momentum: float, seed: int) -> dict:
    """Every node's adapter fine-tuned on the same ``rows`` (SGD with momentum on its own cross-entropy), together.

    What relearn time measures (the comparison's probe): how fast the published system picks a forgotten set back
    up. Batches follow a permutation of ``rows`` by ``seed`` per epoch; the last batch is padded and masked, so one
    program serves every batch.
    """
    tx, step = _finetune_step(adapter, float(learning_rate), float(momentum))
    opt = jax.vmap(tx.init)(stacked)
    rows = np.asarray(rows)
    size = max(1, min(int(batch_size), len(rows)))
    rng = np.random.default_rng(seed)
    for _ in range(int(epochs)):
        order = rows[rng.permutation(len(rows))]
        for lo in range(0, len(order), size):
            part = order[lo : lo + size]
            valid = np.zeros(size, np.float32)
            valid[: len(part)] = 1.0
            part = np.concatenate([part, np.full(size - len(part), part[0])])
            index, w = jax.device_put((part.astype(np.int32), valid))
            stacked, opt = step(stacked, opt, feats[index], labels[index], w)
    return stacked
