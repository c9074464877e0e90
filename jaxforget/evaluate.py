"""Readouts that compare a forgetting method with the retrain-from-scratch oracle.

Each readout is a small pure function on logits, weights, accuracies or timings. The target of every
readout is the *retrain value* (``specs/evaluation.md`` §0), never 0 % or 100 %: a readout only means
something next to the oracle's own value, so :func:`compare` and :func:`accuracy_gaps` put the two side by
side, and :func:`relearn_summary` divides by the oracle's relearn time.

Contents (spec sections in brackets):

* accuracy and per-split gaps to retrain, ``avg_abs_gap`` (§3.1);
* activation, logit and weight distances to the retrained model (§4);
* relearn time: a model-agnostic driver, the relearn sample set, and a censoring-aware summary (§5);
* the time ratio and the challenge's efficiency line (§9).

All statistics are computed in float64 on the host (§0.4), whatever the device dtype of the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from jaxforget import errors

PyTree = Any
S = TypeVar("S")

#: The unlearning challenge's efficiency pass line: a method is efficient when ``T_u / T_r ≤ 0.2`` (§9).
EFFICIENT_LINE = 0.2

#: The splits that enter ``avg_abs_gap`` (§3.1). ``val`` gets a gap when present but is not averaged.
GAP_SPLITS = ("forget", "retain", "test")

#: Relearn-set constructions of §5.
RELEARN_MODES = ("resample", "forget_plus_retain")


# --------------------------------------------------------------------------------------------------
# Accuracy (§3.1)
# --------------------------------------------------------------------------------------------------


def accuracy(logits, labels) -> float:
    """Top-1 accuracy of ``logits [n, K]`` against integer ``labels [n]``.

    Ties go to the first maximum, as in ``jnp.argmax`` (§3.1). An empty set gives NaN.

    Examples:
      >>> accuracy(np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([0, 0]))
      0.5
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise errors.ShapeDtypeError(f"accuracy: logits {logits.shape} and labels {labels.shape} do not match.")
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def accuracy_gaps(
    method: Mapping[str, float],
    retrain: Mapping[str, float],
    original: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    r"""Per-split gap to the retrain oracle and jaxforget's summary ``avg_abs_gap`` (§3.1).

    .. math::
       \mathrm{gap}_S = \mathrm{acc}(\theta_u, S) - \mathrm{acc}(\theta_r, S), \qquad
       \mathrm{avg\_abs\_gap} = \tfrac13 \sum_{S \in \{f, r, test\}} |\mathrm{gap}_S|.

    A negative forget gap (forgetting past retrain) is a miss, not a success (§0.1): only ``|gap|`` ranks.

    Args:
      method: split name -> accuracy of the unlearned model, a fraction in [0, 1]. Must contain
        ``forget``, ``retain`` and ``test``; other splits (``val``) get a gap but are not averaged.
      retrain: split name -> accuracy of the retrained oracle; the same splits as ``method``.
      original: optional split name -> accuracy of the original model, reported beside (§0.2).

    Returns:
      ``{"splits": {split: {"method", "retrain", "gap", "abs_gap"[, "original"]}}, "avg_abs_gap": float}``.
      An empty split's NaN accuracy propagates to its gap and to ``avg_abs_gap``.

    Raises:
      ShapeDtypeError: the dictionaries cover different splits, or miss one of forget/retain/test.
      ValueError: an accuracy outside [0, 1] (a percentage passed by mistake).

    Examples:
      >>> g = accuracy_gaps({"forget": 0.5, "retain": 1.0, "test": 0.75},
      ...                   {"forget": 0.75, "retain": 1.0, "test": 0.75})
      >>> g["splits"]["forget"]["gap"], g["avg_abs_gap"]
      (-0.25, 0.08333333333333333)
    """
    if set(method) != set(retrain) or (original is not None and set(original) != set(method)):
        sets = f"method {sorted(method)} vs retrain {sorted(retrain)}"
        if original is not None:
            sets += f" vs original {sorted(original)}"
        raise errors.ShapeDtypeError(f"accuracy_gaps: the accuracies cover different splits: {sets}.")
    missing = [s for s in GAP_SPLITS if s not in method]
    if missing:
        raise errors.ShapeDtypeError(
            f"accuracy_gaps: splits {missing} are missing; avg_abs_gap needs {list(GAP_SPLITS)}, got {sorted(method)}."
        )
    sources = {"method": method, "retrain": retrain, **({"original": original} if original is not None else {})}
    for who, accs in sources.items():
        for split, value in accs.items():
            if not (math.isnan(float(value)) or 0.0 <= float(value) <= 1.0):
                raise ValueError(
                    f"accuracy_gaps: {who} accuracy on {split!r} is {value}; accuracies are fractions in [0, 1]."
                )
    splits = {}
    for split in method:
        gap = float(method[split]) - float(retrain[split])
        row = {"method": float(method[split]), "retrain": float(retrain[split]), "gap": gap, "abs_gap": abs(gap)}
        if original is not None:
            row["original"] = float(original[split])
        splits[split] = row
    avg = float(np.mean([splits[s]["abs_gap"] for s in GAP_SPLITS]))
    return {"splits": splits, "avg_abs_gap": avg}


# --------------------------------------------------------------------------------------------------
# Distances to the retrained model (§4)
# --------------------------------------------------------------------------------------------------


def _paired_logits(logits, reference_logits, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both logit arrays as host float64 ``[n, K]``, checked for equal shapes and finiteness."""
    a, b = np.asarray(logits, np.float64), np.asarray(reference_logits, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise errors.ShapeDtypeError(
            f"{what}: logits {a.shape} and reference logits {b.shape} must have the same shape [n, K]."
        )
    errors.check_finite(a, "logits")
    errors.check_finite(b, "reference logits")
    return a, b


def activation_distance(logits, reference_logits) -> float:
    r"""Mean L1 distance between softmax outputs, :math:`\frac1n\sum_i \lVert p(x_i) - p^{ref}(x_i)\rVert_1`.

    Golatkar et al. (CVPR'20, CVPR'21), §4. Symmetric, 0 for a model compared with itself, and in
    [0, 2] (each row is clipped at 2 so that float rounding of the two softmax sums cannot exceed it).

    Args:
      logits: ``[n, K]`` logits of the evaluated model.
      reference_logits: ``[n, K]`` logits of the reference (retrained) model on the same samples.

    Returns:
      The mean distance (host float64); NaN for ``n = 0``.

    Raises:
      ShapeDtypeError: different shapes, or not 2-D. NonFiniteError: NaN or Inf logits.

    Examples:
      >>> activation_distance(np.zeros((3, 2)), np.zeros((3, 2)))
      0.0
    """
    a, b = _paired_logits(logits, reference_logits, "activation_distance")
    if len(a) == 0:
        return float("nan")
    return float(np.mean(np.minimum(np.sum(np.abs(_softmax(a) - _softmax(b)), axis=1), 2.0)))


def logit_distance(logits, reference_logits) -> float:
    r"""Mean L2 distance between centred logits, :math:`\frac1n\sum_i \lVert c(z_i) - c(z^{ref}_i)\rVert_2` (§4).

    :math:`c(z) = z - \operatorname{mean}_k z_k`. Centring makes the distance blind to a per-example constant
    shift of all logits, to which softmax (and hence every prediction) is invariant.

    Args:
      logits: ``[n, K]`` logits of the evaluated model.
      reference_logits: ``[n, K]`` logits of the reference (retrained) model on the same samples.

    Returns:
      The mean distance (host float64); NaN for ``n = 0``.

    Raises:
      ShapeDtypeError: different shapes, or not 2-D. NonFiniteError: NaN or Inf logits.

    Examples:
      >>> logit_distance(np.array([[1.0, 2.0]]), np.array([[11.0, 12.0]]))
      0.0
    """
    a, b = _paired_logits(logits, reference_logits, "logit_distance")
    if len(a) == 0:
        return float("nan")
    diff = (a - a.mean(axis=1, keepdims=True)) - (b - b.mean(axis=1, keepdims=True))
    return float(np.mean(np.linalg.norm(diff, axis=1)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Host float64 softmax over the last axis (readouts never depend on the device's precision)."""
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _ravel64(tree: PyTree) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """All leaves as one host float64 vector, and the leaf shapes (in ``jax.tree.leaves`` order)."""
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    shapes = [leaf.shape for leaf in leaves]
    if not leaves:
        return np.zeros((0,), np.float64), shapes
    # numpy, not jnp: with x64 disabled jnp.concatenate would silently round to float32.
    return np.concatenate([leaf.astype(np.float64).ravel() for leaf in leaves]), shapes


def unravel64(flat, like: PyTree) -> PyTree:
    """A host float64 pytree shaped like ``like`` from its ravelled leaves (the inverse of ``_ravel64``).

    Examples:
      >>> unravel64(np.arange(3.0), {"a": np.zeros(2), "b": np.zeros(1)})["b"].tolist()
      [2.0]
    """
    flat = np.asarray(flat, np.float64)
    leaves, treedef = jax.tree.flatten(like)
    sizes = [int(np.size(leaf)) for leaf in leaves]
    if sum(sizes) != flat.size:
        raise errors.ShapeDtypeError(f"unravel64: {flat.size} values for a tree of {sum(sizes)}.")
    parts = np.split(flat, np.cumsum(sizes)[:-1]) if leaves else []
    return treedef.unflatten([p.reshape(np.shape(leaf)) for p, leaf in zip(parts, leaves, strict=True)])


def weight_distance(weights: PyTree, reference: PyTree, original: PyTree | None = None) -> dict[str, float | None]:
    r"""Distances in weight space to the retrained model, host float64 (§4, Thudi et al.'s verification error).

    * ``l2`` :math:`= \lVert\theta_u - \theta_r\rVert_2` over all leaves of the compared (sub)tree;
    * ``relative`` :math:`= \lVert\theta_u - \theta_r\rVert / \lVert\theta_r\rVert` (``inf`` when
      :math:`\theta_r = 0`);
    * ``relative_to_original`` :math:`= \lVert\theta_u - \theta_r\rVert / \lVert\theta_o - \theta_r\rVert`:
      0 means "reached retrain", 1 means "as far as the original". ``None`` when ``original`` is not given;
      when :math:`\theta_o = \theta_r`, it is 0 if :math:`\theta_u = \theta_r` too and ``inf`` otherwise.

    Only meaningful when the models share an initialisation (mixed-linear ``w_u`` with a shared core, convex
    or last-layer models); otherwise permutation symmetry makes it meaningless and the report writes "n/a".
    NaN weights (a diverged baseline) give NaN distances rather than an error, so that they can be reported.

    Args:
      weights: pytree ``θ_u``.
      reference: pytree ``θ_r`` with the same leaf shapes (container types may differ; dtypes may differ).
      original: optional pytree ``θ_o`` with the same leaf shapes.

    Returns:
      ``{"l2", "relative", "relative_to_original"}``.

    Raises:
      ShapeDtypeError: the leaf shapes differ (both shape lists are named).

    Examples:
      >>> weight_distance({"w": np.ones(2)}, {"w": np.ones(2)})["l2"]
      0.0
    """
    a, shapes_a = _ravel64(weights)
    b, shapes_b = _ravel64(reference)
    if shapes_a != shapes_b:
        raise errors.ShapeDtypeError(
            f"weight_distance: weights have leaf shapes {shapes_a} but reference has {shapes_b}."
        )
    dist = float(np.linalg.norm(a - b))
    ref = float(np.linalg.norm(b))
    out: dict[str, float | None] = {"l2": dist, "relative": dist / ref if ref > 0 else float("inf")}
    out["relative_to_original"] = None
    if original is not None:
        o, shapes_o = _ravel64(original)
        if shapes_o != shapes_b:
            raise errors.ShapeDtypeError(
                f"weight_distance: original has leaf shapes {shapes_o} but reference has {shapes_b}."
            )
        denom = float(np.linalg.norm(o - b))
        if denom > 0 or math.isnan(denom):
            out["relative_to_original"] = dist / denom
        else:
            out["relative_to_original"] = 0.0 if dist == 0 else float("inf")
    return out


def kl_proxy(w_pre_noise: PyTree, w_oracle: PyTree, sigma: float, c: float = 1.0) -> float:
    r"""Isotropic-Gaussian KL proxy :math:`\mathrm{KL}(N(m, c\sigma^2 I)\,\|\,N(w^*, \sigma^2 I))` in nats.

    .. math::  \tfrac12\left[d(c - 1 - \ln c) + \lVert m - w^*\rVert^2/\sigma^2\right]

    With an exact solver ``c = 1`` and ``m`` is the pre-noise weight vector. ``σ = 0`` gives ``inf``
    unless ``m = w*``.

    Examples:
      >>> kl_proxy({"w": np.array([1.0, 0.0])}, {"w": np.zeros(2)}, sigma=0.5)
      2.0
    """
    d = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(w_pre_noise))
    dist2 = weight_distance(w_pre_noise, w_oracle)["l2"] ** 2  # host float64, any input dtypes
    if sigma == 0:
        return 0.0 if dist2 == 0 else float("inf")
    return float(0.5 * (d * (c - 1 - np.log(c)) + dist2 / sigma**2))


# --------------------------------------------------------------------------------------------------
# Side-by-side readouts
# --------------------------------------------------------------------------------------------------


def compare(
    logits: Mapping[str, np.ndarray],
    oracle_logits: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
) -> dict[str, dict[str, float]]:
    """Accuracy of method and oracle, and their activation distance, on each named set.

    Args:
      logits: set name -> ``[n, K]`` method logits.
      oracle_logits: set name -> ``[n, K]`` retrain-oracle logits (same samples).
      labels: set name -> ``[n]`` labels.

    Returns:
      ``{set: {"accuracy", "oracle_accuracy", "activation_distance"}}``.

    Raises:
      ShapeDtypeError: the three mappings name different sets, or shapes differ within a set.
    """
    if set(logits) != set(oracle_logits) or set(logits) != set(labels):
        raise errors.ShapeDtypeError(
            "compare: method, oracle and labels must cover the same sets, got "
            f"{sorted(logits)}, {sorted(oracle_logits)} and {sorted(labels)}."
        )
    return {
        name: {
            "accuracy": accuracy(logits[name], labels[name]),
            "oracle_accuracy": accuracy(oracle_logits[name], labels[name]),
            "activation_distance": activation_distance(logits[name], oracle_logits[name]),
        }
        for name in logits
    }


# --------------------------------------------------------------------------------------------------
# Efficiency (§9)
# --------------------------------------------------------------------------------------------------


def time_ratio(method_seconds: float, retrain_seconds: float) -> float:
    """``method / retrain`` wall time (§9); ``inf`` when the retrain time is not positive.

    Examples:
      >>> time_ratio(2.0, 10.0)
      0.2
    """
    return float(method_seconds) / float(retrain_seconds) if retrain_seconds > 0 else float("inf")


def is_efficient(ratio: float, line: float = EFFICIENT_LINE) -> bool:
    """Whether a time ratio passes the challenge's efficiency line, ``ratio ≤ line`` (§9). NaN is not efficient.

    Examples:
      >>> is_efficient(0.2), is_efficient(0.2001)
      (True, False)
    """
    return bool(float(ratio) <= float(line))


# --------------------------------------------------------------------------------------------------
# Relearn time (§5)
# --------------------------------------------------------------------------------------------------


def relearn_time(
    train_epoch: Callable[[S, int], S],
    forget_loss: Callable[[S], float],
    state: S,
    *,
    tau: float,
    max_epochs: int = 100,
) -> dict[str, Any]:
    r"""Epochs of fine-tuning until the forget set is fitted again (§5): a proxy for information left.

    Model-agnostic: the caller supplies one epoch of fine-tuning on the relearn set (see :func:`relearn_set`;
    SGD lr 0.01, no weight decay, cross-entropy in the faithful setting) and the mean loss on ``D_f``.

    .. math::
       RT = \min\{e \in \{1, \dots, E\} : L_{D_f}(\theta_e) \le \tau\}, \quad\text{else } RT = E + 1
       \text{ (censored)}.

    The loss is evaluated once before training too (``initial_loss``), for the record only: RT counts
    epochs, so a model already below τ still has RT = 1.

    Args:
      train_epoch: ``(state, epoch) -> state`` for one epoch; ``epoch`` is the 0-based epoch index, so that the
        same ``(seed, epoch)`` data order and noise can be replayed for ``θ_o``, ``θ_u`` and ``θ_r``.
      forget_loss: ``state -> float``, the mean loss on ``D_f`` (CE; MSE for mixed-linear).
      state: the starting state (the model to probe).
      tau: the loss threshold τ (0.1 for CE in §5).
      max_epochs: the cap E (100 in §5).

    Returns:
      ``{"epochs": RT, "censored": bool, "losses": [loss after epoch 1, ...], "initial_loss", "tau",
      "max_epochs"}``. Training stops at the first epoch that reaches τ, so ``len(losses) == min(RT, E)``.

    Raises:
      ValueError: a non-finite τ or ``max_epochs < 1``. NonFiniteError: a NaN or Inf loss (a diverged
      fine-tune must not pass for a censored one).
    """
    tau = float(tau)
    if not math.isfinite(tau):
        raise ValueError(f"relearn_time: tau must be finite, got {tau}.")
    if int(max_epochs) != max_epochs or max_epochs < 1:
        raise ValueError(f"relearn_time: max_epochs must be an integer >= 1, got {max_epochs}.")

    def loss_of(s, when: str) -> float:
        value = float(forget_loss(s))
        if not math.isfinite(value):
            raise errors.NonFiniteError(f"relearn_time: the forget loss {when} is {value}.")
        return value

    initial = loss_of(state, "before training")
    losses: list[float] = []
    for epoch in range(int(max_epochs)):
        state = train_epoch(state, epoch)
        losses.append(loss_of(state, f"after epoch {epoch + 1}"))
        if losses[-1] <= tau:
            return _relearn_record(epoch + 1, False, losses, initial, tau, max_epochs)
    return _relearn_record(int(max_epochs) + 1, True, losses, initial, tau, max_epochs)


def _relearn_record(epochs, censored, losses, initial, tau, max_epochs) -> dict[str, Any]:
    return {
        "epochs": int(epochs),
        "censored": bool(censored),
        "losses": losses,
        "initial_loss": initial,
        "tau": tau,
        "max_epochs": int(max_epochs),
    }


def _as_ids(ids, what: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise errors.ShapeDtypeError(f"relearn_set: {what} must be a 1-D integer array, got {arr.dtype}{arr.shape}.")
    return arr.astype(np.int64)


def relearn_set(retain_ids, forget_ids, *, mode: str = "resample", size: int = 500, seed: int = 0) -> np.ndarray:
    """Ids of the relearn set (§5), drawn with ``np.random.default_rng(seed)``.

    * ``"resample"`` (SelectiveForgetting, SCRUB): ``size`` draws **with replacement** from ``D_r ∪ D_f``.
    * ``"forget_plus_retain"``: all of ``D_f`` plus ``size − |D_f|`` ids of ``D_r`` drawn without replacement.
      Use it when ``|D_f| ≪ |D|/m``: a resample then rarely contains forget samples.

    The draws depend only on the id *sets*, not on the input order (both are sorted first), so the same
    config gives the same relearn set for ``θ_o``, ``θ_u`` and ``θ_r``.

    Args:
      retain_ids: ``[n_r]`` ids of ``D_r``.
      forget_ids: ``[n_f]`` ids of ``D_f``, disjoint from ``retain_ids``.
      mode: ``"resample"`` or ``"forget_plus_retain"``.
      size: m, the number of ids returned.
      seed: the draw's seed (recorded with the config).

    Returns:
      ``[size]`` int64 ids. ``resample``: in draw order, with repeats. ``forget_plus_retain``: the sorted forget
      ids followed by the sorted retain sample (the fine-tune's own data order shuffles them).

    Raises:
      ConfigError (a ValueError): an unknown mode, ``size < 1``, ``size < |D_f|`` or ``size > |D_r| + |D_f|``
      in ``forget_plus_retain`` mode, an empty pool, or overlapping retain and forget ids.
      ShapeDtypeError: ids that are not a 1-D integer array.

    Examples:
      >>> relearn_set([3, 4, 5, 6], [1, 2], mode="forget_plus_retain", size=4, seed=0)[:2]
      array([1, 2])
    """
    if mode not in RELEARN_MODES:
        raise errors.ConfigError(f"relearn_set: mode must be one of {list(RELEARN_MODES)}, got {mode!r}.")
    if int(size) != size or size < 1:
        raise errors.ConfigError(f"relearn_set: size must be an integer >= 1, got {size}.")
    size = int(size)
    retain = np.unique(_as_ids(retain_ids, "retain_ids"))
    forget = np.unique(_as_ids(forget_ids, "forget_ids"))
    both = np.intersect1d(retain, forget)
    if both.size:
        raise errors.ConfigError(f"relearn_set: ids {both[:10].tolist()} are in both the retain and forget sets.")
    rng = np.random.default_rng(seed)
    if mode == "resample":
        pool = np.union1d(retain, forget)
        if pool.size == 0:
            raise errors.ConfigError("relearn_set: the retain and forget sets are both empty.")
        return rng.choice(pool, size=size, replace=True).astype(np.int64)
    if size < forget.size or size > forget.size + retain.size:
        raise errors.ConfigError(
            f"relearn_set: forget_plus_retain needs |D_f| = {forget.size} <= size <= |D_r| + |D_f| = "
            f"{retain.size + forget.size}, got size = {size}."
        )
    sample = np.sort(rng.choice(retain, size=size - forget.size, replace=False))
    return np.concatenate([forget, sample]).astype(np.int64)


def _rt(value, who: str) -> tuple[int, bool]:
    """``(epochs, censored)`` from a :func:`relearn_time` record or a plain (uncensored) epoch count."""
    if isinstance(value, Mapping):
        epochs, censored = value["epochs"], bool(value["censored"])
    else:
        epochs, censored = value, False
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"relearn_summary: RT of the {who} model must be an integer >= 1, got {epochs}.")
    return int(epochs), censored


def _relearn_one(rt_u, rt_o, rt_r) -> dict[str, Any]:
    (u, cu), (o, co), (r, cr) = _rt(rt_u, "unlearned"), _rt(rt_o, "original"), _rt(rt_r, "retrain")
    return {
        "rt_unlearned": u,
        "rt_original": o,
        "rt_retrain": r,
        "censored": {"unlearned": cu, "original": co, "retrain": cr},
        # RT_r >= 1 always, so the ratio is defined; with a censored RT it is a bound, flagged below.
        "ratio": u / r,
        "ratio_censored": cu or cr,
    }


def relearn_summary(rt_unlearned, rt_original, rt_retrain) -> dict[str, Any]:
    r"""``RT_u``, ``RT_o``, ``RT_r`` and ``RT_u / RT_r`` (retrain = 1.0) with censoring flags (§5).

    Each argument is a :func:`relearn_time` record (or a plain epoch count, taken as uncensored), or a list or
    tuple of them, one per seed, in the same seed order for the three models.

    With a censored ``RT_u`` the ratio is only a lower bound, with a censored ``RT_r`` an upper bound:
    ``ratio_censored`` flags both. Censored values are never averaged silently: the per-seed form reports
    the count of censored seeds next to every mean (means include censored seeds at ``cap + 1``).

    Returns:
      One seed: ``{"rt_unlearned", "rt_original", "rt_retrain", "censored": {role: bool}, "ratio",
      "ratio_censored"}``.
      Several: ``{"per_seed": [one-seed summaries], "n", "mean": {rt_unlearned, rt_original, rt_retrain, ratio},
      "std": {...} (ddof = 1; None for n = 1), "n_censored": {"unlearned", "original", "retrain", "ratio"}}``.

    Examples:
      >>> relearn_summary(3, 10, 3)["ratio"]
      1.0
    """
    seqs = [not isinstance(v, Mapping) and isinstance(v, Sequence) for v in (rt_unlearned, rt_original, rt_retrain)]
    if not any(seqs):
        return _relearn_one(rt_unlearned, rt_original, rt_retrain)
    if not all(seqs) or not len(rt_unlearned) == len(rt_original) == len(rt_retrain):
        raise errors.ShapeDtypeError(
            "relearn_summary: pass one record per model, or one sequence per model with one record per seed; got "
            + ", ".join(f"{len(v)} seeds" if s else "one record" for v, s in
                        zip((rt_unlearned, rt_original, rt_retrain), seqs, strict=True))
            + " (unlearned, original, retrain)."
        )
    if len(rt_unlearned) == 0:
        raise ValueError("relearn_summary: no seeds.")
    per_seed = [_relearn_one(u, o, r) for u, o, r in zip(rt_unlearned, rt_original, rt_retrain, strict=True)]
    n = len(per_seed)
    fields = ("rt_unlearned", "rt_original", "rt_retrain", "ratio")
    values = {f: np.array([p[f] for p in per_seed], np.float64) for f in fields}
    return {
        "per_seed": per_seed,
        "n": n,
        "mean": {f: float(values[f].mean()) for f in fields},
        "std": {f: float(values[f].std(ddof=1)) if n > 1 else None for f in fields},
        "n_censored": {
            **{role: sum(p["censored"][role] for p in per_seed) for role in ("unlearned", "original", "retrain")},
            "ratio": sum(p["ratio_censored"] for p in per_seed),
        },
    }
