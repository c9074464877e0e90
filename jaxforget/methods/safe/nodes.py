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
* **Slices** (SISA's, spec §3; ``Budget.slices = R``, default 1 = none). Every sample carries a slice index; stage
  ``s`` trains on the node's samples of slices ``0..s`` for ``e_s = ⌊(s+1)a⌋ − ⌊s a⌋`` epochs, ``a = 2e/(R+1)``
  (``Σ_s e_s (s+1)/R = e`` epochs of compute on equal slices), and its parameters are checkpointed. Each stage starts
  a fresh AdamW and its own cosine from the previous stage's parameters, and its randomness is the key of
  (node, the stage's version); epochs are numbered across stages. So a stage depends on nothing after it, and a
  node retrained from stage ``r`` (a deletion in slice ``r``) is bitwise the node trained from scratch. With
  ``R = 1`` this is exactly the unsliced trainer.

The trainer also counts the sample-gradient evaluations of each node (its masked batch entries over its active
steps): with no floor that is ``epochs · |D_i|``, the work the cost model of :mod:`.graph` counts.

Examples:
  >>> from jaxforget.methods.safe import adapter
  >>> budget = Budget(epochs=2, batch_size=4, min_steps=1, learning_rate=0.1, weight_decay=0.0)
  >>> feats = jnp.eye(6); labels = jnp.array([0, 1, 0, 1, 0, 1])
  >>> chunk = pack_chunk([np.array([0, 1, 2]), np.array([3, 4, 5])], [np.array([0, 1, 2]), np.array([3, 4, 5])],
  ...                    nodes=[0, 1], versions=[0, 0], capacity=4, width=4, budget=budget)
  >>> chunk.steps.tolist()                      # [W, R]: two epochs of one batch each; two inert lanes
  [[2], [2], [0], [0]]
  >>> root = jax.random.key_data(jax.random.key(0))
  >>> params, checkpoints, evaluations = train_chunk(adapter.LinearHead(2), budget, 4, root, chunk, feats, labels)
  >>> evaluations.tolist(), params["head"]["kernel"].shape, checkpoints["head"]["kernel"].shape
  ([6, 6, 0, 0], (4, 6, 2), (4, 0, 6, 2))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

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
      slices: ``R``, SISA's slices per node (1: no slicing).
    """

    epochs: int = 30
    batch_size: int = 32
    min_steps: int = 0
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    own_shard_weight: float = 1.0
    slices: int = 1

    def steps(self, size: int) -> int:
        """Optimiser steps of an unsliced node with ``size`` training samples (0 for an empty node: never train on
        nothing)."""
        if size <= 0:
            return 0
        return max(self.min_steps, self.epochs * -(-size // self.batch_size))

    def stage_epochs(self) -> tuple[int, ...]:
        """``e_s = ⌊(s+1)a⌋ − ⌊s a⌋`` with ``a = 2e/(R+1)``, in integers (``(e,)`` unsliced).

        Examples:
          >>> Budget(epochs=30, slices=4).stage_epochs(), Budget(epochs=1, slices=4).stage_epochs()
          ((12, 12, 12, 12), (0, 0, 1, 0))
        """
        r, twice = self.slices, 2 * self.epochs
        return tuple((s + 1) * twice // (r + 1) - s * twice // (r + 1) for s in range(r))

    def epoch_offsets(self) -> tuple[int, ...]:
        """The number of the first epoch of each stage (epochs are numbered across stages)."""
        return tuple(int(x) for x in np.cumsum((0,) + self.stage_epochs()[:-1]))

    def stage_steps(self, size: int, stage: int) -> int:
        """Optimiser steps of stage ``stage`` on ``size`` samples: ``max(floor_s, e_s ⌈size / B⌉)``, the floor
        ``min_steps`` shared out in proportion to the stage epochs (``steps(size)`` when unsliced)."""
        epochs = self.stage_epochs()
        if size <= 0 or epochs[stage] == 0:
            return 0
        floor = -(-self.min_steps * epochs[stage] // sum(epochs))
        return max(floor, epochs[stage] * -(-size // self.batch_size))

    def max_steps(self, capacity: int | Sequence[int]) -> tuple[int, ...]:
        """Each stage's static loop length: the steps of a node filling that stage's capacity."""
        caps = stage_capacities(capacity, self.slices)
        return tuple(self.stage_steps(caps[s], s) for s in range(self.slices))


def stage_capacities(capacity: int | Sequence[int], slices: int) -> tuple[int, ...]:
    """``capacity`` as one capacity per stage (an int serves every stage)."""
    caps = (int(capacity),) * slices if np.ndim(capacity) == 0 else tuple(int(c) for c in capacity)
    if len(caps) != slices or any(b > a for a, b in zip(caps[1:], caps[:-1], strict=True)):
        raise errors.ShapeDtypeError(f"Stage capacities {list(caps)} must be {slices} non-decreasing numbers.")
    return caps


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
      versions: ``[W, R]`` int32 each stage's version (how many times the node was retrained from that stage on).
      rows: ``[W, L]`` int32 rows of the feature table, sorted by sample id (padding points at row 0).
      ids: ``[W, L]`` int32 sample ids (the order's randomness is keyed by them).
      valid: ``[W, L]`` bool.
      own: ``[W, L]`` bool: the sample is in the node's own shard.
      slice_of: ``[W, L]`` int32 each sample's slice (stage ``s`` trains on slices ``0..s``).
      steps: ``[W, R]`` int32 optimiser steps per lane and stage.
      start: ``[W]`` int32 the stage each lane starts from (earlier stages come from its checkpoints).
    """

    nodes: np.ndarray
    versions: np.ndarray
    rows: np.ndarray
    ids: np.ndarray
    valid: np.ndarray
    own: np.ndarray
    slice_of: np.ndarray
    steps: np.ndarray
    start: np.ndarray

    @property
    def first(self) -> int:
        """The earliest stage any lane runs (stages before it are not compiled into the chunk's program)."""
        return int(self.start.min())


def pack_chunk(rows: Sequence[np.ndarray], ids: Sequence[np.ndarray], *, nodes: Sequence[int],
               versions: Sequence, capacity: int | Sequence[int], width: int, budget: Budget,
               own: Sequence[np.ndarray] | None = None, slices: Sequence[np.ndarray] | None = None,
               start: Sequence[int] | None = None) -> Chunk:
    """Lays out up to ``width`` nodes' training sets for :func:`train_chunk`.

    Args:
      rows: per node, the feature-table rows of its training samples.
      ids: per node, the sample ids of those rows (the layout sorts by id).
      nodes: per node, its id in the graph (its key's first fold).
      versions: per node, its version (an int, or one per stage).
      capacity: ``L`` (a multiple of the batch size, ≥ every node's size), or one capacity per stage.
      width: ``W`` lanes; missing lanes are inert.
      budget: the training budget (steps per node and stage).
      own: per node, whether each sample is in its own shard (default all True).
      slices: per node, each sample's slice in ``[0, R)`` (default all 0).
      start: per node, the stage it starts from (default 0: from scratch).

    Raises:
      ShapeDtypeError: more nodes than lanes, a node larger than the capacity, misaligned rows and ids, a capacity
        that is not a whole number of batches, or a slice or start stage outside ``[0, R)``.
    """
    r_ = budget.slices
    caps = stage_capacities(capacity, r_)
    if len(rows) > width or len(ids) != len(rows) or len(nodes) != len(rows) or len(versions) != len(rows):
        raise errors.ShapeDtypeError(f"A chunk of width {width} got {len(rows)} nodes, {len(ids)} id lists, "
                                     f"{len(nodes)} node ids and {len(versions)} versions.")
    if any(c % budget.batch_size for c in caps):
        raise errors.ShapeDtypeError(f"Capacity {list(caps)} is not a multiple of the batch size {budget.batch_size}.")
    shape = (width, caps[-1])
    chunk = Chunk(nodes=np.full(width, -1, np.int32), versions=np.zeros((width, r_), np.int32),
                  rows=np.zeros(shape, np.int32), ids=np.zeros(shape, np.int32), valid=np.zeros(shape, bool),
                  own=np.zeros(shape, bool), slice_of=np.zeros(shape, np.int32),
                  steps=np.zeros((width, r_), np.int32), start=np.zeros(width, np.int32))
    for lane, (r, i) in enumerate(zip(rows, ids, strict=True)):
        r, i = np.asarray(r), np.asarray(i)
        if r.shape != i.shape or r.ndim != 1:
            raise errors.ShapeDtypeError(f"Node in lane {lane}: rows {r.shape} and ids {i.shape} must be aligned 1-D.")
        if len(r) > caps[-1]:
            raise errors.ShapeDtypeError(f"Node in lane {lane} has {len(r)} samples, over the capacity {caps[-1]}.")
        sl = np.zeros(len(r), np.int32) if slices is None else np.asarray(slices[lane], np.int32)
        first = 0 if start is None else int(start[lane])
        if sl.shape != r.shape or (len(sl) and not 0 <= sl.min() <= sl.max() < r_) or not 0 <= first < r_:
            raise errors.ShapeDtypeError(f"Node in lane {lane}: slices must be one per sample in [0, {r_}) and the "
                                         f"start stage in [0, {r_}); got start {first}.")
        order = np.argsort(i, kind="stable")
        n = len(r)
        chunk.nodes[lane], chunk.versions[lane], chunk.start[lane] = nodes[lane], versions[lane], first
        chunk.rows[lane, :n], chunk.ids[lane, :n], chunk.valid[lane, :n] = r[order], i[order], True
        chunk.own[lane, :n] = True if own is None else np.asarray(own[lane], bool)[order]
        chunk.slice_of[lane, :n] = sl[order]
        for s in range(r_):
            size = int((sl <= s).sum())
            if size > caps[s]:
                raise errors.ShapeDtypeError(f"Node in lane {lane} has {size} samples in stage {s}, over its "
                                             f"capacity {caps[s]}.")
            chunk.steps[lane, s] = budget.stage_steps(size, s)
    # Inert lanes start where the earliest real lane does: they must not pull earlier stages into the program.
    chunk.start[len(rows):] = chunk.start[: len(rows)].min() if len(rows) else 0
    return chunk


def _optimizer(weight_decay: float) -> optax.GradientTransformation:
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))


def _train_stage(adapter: nn.Module, budget: Budget, length: int, params, order_key, epoch0, member, ids, own, rows,
                 steps, feats, labels):
    """One stage of one node: a fresh AdamW and a cosine over ``steps`` from ``params``, on the ``member`` samples.

    Returns the parameters after ``steps`` updates (of the static ``length``) and the sample gradients evaluated.
    """
    size = member.sum()
    batch = budget.batch_size
    per_epoch = jnp.maximum(1, (size + batch - 1) // batch)
    tx = _optimizer(budget.weight_decay)
    opt = tx.init(params)
    slots = jnp.arange(batch)

    def loss(p, x, y, w):
        ce = optax.softmax_cross_entropy_with_integer_labels(adapter.apply({"params": p}, x), y)
        return (w * ce).sum() / jnp.maximum(w.sum(), 1.0)

    def step(t, carry):
        params, opt, count = carry
        epoch, b = t // per_epoch, t % per_epoch
        k = jax.random.fold_in(order_key, epoch0 + epoch)
        u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(k, i)))(ids)
        order = jnp.argsort(jnp.where(member, u, jnp.inf), stable=True)
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

    params, _, count = jax.lax.fori_loop(0, length, step, (params, opt, jnp.zeros((), jnp.int32)))
    return params, count


def _train_node(adapter: nn.Module, budget: Budget, lengths: tuple[int, ...], first: int, root, node, versions, rows,
                ids, valid, own, slice_of, steps, start, checkpoints, feats, labels):
    """One node (vmapped over lanes by :func:`train_chunk`): stages ``first..R-1``, each run from ``start`` on.

    Returns its final params, its per-stage checkpoints ``[R-1, …]`` (stages before ``start`` passed through) and its
    sample-gradient count.
    """
    root = jax.random.wrap_key_data(root)
    offsets = budget.epoch_offsets()
    select = lambda cond, a, b: jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)  # noqa: E731
    stage_ckpt = lambda s: jax.tree.map(lambda c: c[s], checkpoints)  # noqa: E731
    params = adapter.init(jax.random.fold_in(node_key(root, node, versions[0]), 0), feats[:1])["params"]
    count = jnp.zeros((), jnp.int32)
    out = [stage_ckpt(s) for s in range(first)]
    for s in range(first, budget.slices):
        begin = params if s == 0 else select(start == s, stage_ckpt(s - 1), params)
        order_key = jax.random.fold_in(node_key(root, node, versions[s]), 1)
        member = valid & (slice_of <= s)
        trained, n = _train_stage(adapter, budget, lengths[s], begin, order_key, offsets[s], member, ids, own, rows,
                                  jnp.where(s >= start, steps[s], 0), feats, labels)
        params = trained if s == budget.slices - 1 else select(s < start, stage_ckpt(s), trained)
        out.append(params)
        count = count + n
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *out[:-1]) if len(out) > 1 else jax.tree.map(
        lambda c: c[:0], checkpoints)
    return params, stacked, count


@functools.lru_cache(maxsize=32)
def _compiled(adapter: nn.Module, budget: Budget, capacities: tuple[int, ...], first: int):
    body = functools.partial(_train_node, adapter, budget, budget.max_steps(capacities), first)
    return jax.jit(jax.vmap(body, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, None, None)))


class Trained(NamedTuple):
    """What :func:`train_chunk` returns, stacked on the lane axis ``[W, …]``."""

    params: dict  # the final adapters (inert lanes: an untrained init)
    checkpoints: dict  # ``[W, R-1, …]`` the parameters after each stage but the last (``R = 1``: an empty axis)
    evaluations: Array  # ``[W]`` int32 sample-gradient evaluations


@functools.lru_cache(maxsize=16)
def _empty_checkpoints(adapter: nn.Module, slices: int, feature: jax.ShapeDtypeStruct, width: int):
    one = jax.eval_shape(lambda: adapter.init(jax.random.key(0), jnp.zeros(feature.shape, feature.dtype))["params"])
    # Made on the device by a program: requests run under a host-to-device transfer guard.
    return jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros((width, slices - 1, *a.shape), a.dtype), one))


def empty_checkpoints(adapter: nn.Module, budget: Budget, feats: Array, width: int) -> dict:
    """Zeros shaped like ``[width, R-1] +`` one adapter's parameters (the checkpoints of nodes never trained)."""
    feature = jax.ShapeDtypeStruct((1, *feats.shape[1:]), feats.dtype)
    return _empty_checkpoints(adapter, budget.slices, feature, width)()


def train_chunk(adapter: nn.Module, budget: Budget, capacity: int | Sequence[int], root: Array, chunk: Chunk,
                feats: Array, labels: Array, checkpoints: dict | None = None) -> Trained:
    """Trains the ``W`` lanes of ``chunk`` together (one compiled program per adapter, budget, capacities and first
    stage).

    Args:
      adapter: the adapter module (:mod:`.adapter`).
      budget: the training budget.
      capacity: ``L``, the chunk's per-node length, or one per stage.
      root: ``uint32[2]`` the method's root key data (node keys fold in node id and version).
      chunk: the lanes (:func:`pack_chunk`).
      feats: ``[N, …]`` the feature table (frozen backbone features of every trainable sample).
      labels: ``[N]`` int labels.
      checkpoints: ``[W, R-1, …]`` each lane's stage checkpoints (needed where a lane starts after stage 0).

    Returns:
      :class:`Trained`: final params, stage checkpoints and sample-gradient evaluations per lane.
    """
    caps = stage_capacities(capacity, budget.slices)
    if checkpoints is None:
        checkpoints = empty_checkpoints(adapter, budget, feats, len(chunk.nodes))
    fn = _compiled(adapter, budget, caps, chunk.first)
    # Explicit copies: requests run under a host-to-device transfer guard.
    arrays = jax.device_put((np.asarray(root, np.uint32), chunk.nodes, chunk.versions, chunk.rows, chunk.ids,
                             chunk.valid, chunk.own, chunk.slice_of, chunk.steps, chunk.start))
    return Trained(*fn(*arrays, checkpoints, feats, labels))


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
