"""Distributional forgetting scores: the NeurIPS 2023 challenge ε score and KLOM (evaluation spec §7, §8).

Both scores compare, example by example, the *distribution* of a forget example's statistic under N unlearned
models with its distribution under N models retrained without the forget set. A single pair of models says
little; these scores ask whether any test on the N samples tells the two populations apart.

* :func:`challenge_score` is the score of the NeurIPS 2023 machine-unlearning challenge
  (``google-deepmind/unlearning_evaluation``, ``metric.py`` and ``main.py``, Apache-2.0). For each example it
  finds the (ε, δ = 1e-5) privacy bound implied by the best of two families of threshold tests (single
  threshold, and "inside [l, r]" double thresholds), turns ε into points by 0.5-wide buckets, averages, and
  multiplies by the retain and test accuracy ratios. :func:`example_epsilons` and :func:`points` are its parts;
  :func:`oracle_vs_oracle` is the same score between two retrain populations, the ceiling every report shows
  next to it (spec §7 "Calibration": identical distributions score about 0.2 at realistic N, never 1).
* :func:`klom` is the per-example binned KL of Attribute-to-Delete (``RoyRin/data-unlearning-bench``,
  arXiv 2410.23232, App. E.1) between unlearned and retrained margins; :func:`klom_summary` reports it.

Everything runs in NumPy float64 on the host: the inputs are small ([N, m] statistics) and the result does
not depend on the accelerator (the reference hard-codes ``.cuda()``).

**Fast path.** The reference tiles [N, T] comparison tensors for every example, with T ≈ 160 000 (l, r) pairs
in the double family. Here each chunk of examples is sorted once (a pooled, sorted vocabulary of its values
plus per-example cumulative rank tables) and every threshold is counted by a ``searchsorted`` insertion
position: ``#(c ≥ t) = N − pos_left(c, t)`` and ``#(l ≤ c ≤ r) = max(0, pos_right(c, r) − pos_left(c, l))``.
Memory is O(N + T) per example, there is no Python loop over examples, and the counts are exact integers,
so ε agrees with the brute-force tiled reference (``_epsilons_bruteforce``) to rounding.

**Deviations from the reference** (spec §7 step 2 and 6), both documented and tested:

* both samples constant and *equal*: the reference divides 0/0, finds no valid threshold and fails;
  jaxforget returns ε = 0 (the populations are identical);
* no threshold survives (e.g. two constants closer than the 0.01-unit grid): the reference fails on an
  assertion; jaxforget raises :class:`ChallengeMetricError` naming the example.

Parity with the reference is to 1e-5 on ε, not bit for bit: the reference evaluates the single-threshold
grid, the rates and ``1 − δ − FPR`` in float32, while this module counts exactly in float64 (spec §7
"Implementation").
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from jaxforget import errors

DELTA = 1e-5
"""δ of the (ε, δ) bound, as in the reference (third-party ports with 0.01 are wrong, spec §7)."""
EPSILON_CAP = 50.0
"""Per-example ε is clipped to [0, EPSILON_CAP]; degenerate examples get the cap."""
THRESHOLDS_PER_UNIT = 100
"""Threshold grid density: ceil(100 × range) thresholds, i.e. about 0.01 apart."""
DOUBLE_BUFFER = 2.0
"""The buffer b of the double-threshold family (right thresholds span 2b, 400 left thresholds per right one)."""
DEGENERATE_RATIO = 0.01
"""min(range) / max(range) below this is a "peaky" sample: ε = cap without any attack (spec §7 step 2)."""
BUCKET_WIDTH = 0.5

# Thresholds evaluated at once in the fast path: bounds the working memory (~50 bytes per threshold).
_THRESHOLD_BUDGET = 1 << 20
_EXAMPLES_PER_CHUNK = 8
# Up to this many (tp, fp) pairs, per-threshold ε is looked up in a table built once per N: far cheaper than two
# logs per threshold, and bit-identical since the table holds the same formula's values.
_LOOKUP_LIMIT = 1 << 22
# The double family has ceil(4 × 100) = 400 left thresholds per right threshold.
_NUM_LEFT = int(math.ceil(2 * DOUBLE_BUFFER * THRESHOLDS_PER_UNIT))


class ChallengeMetricError(errors.JaxForgetError, ValueError):
    """The challenge ε of an example is undefined: no threshold of either family survives (spec §7 step 6)."""


# --------------------------------------------------------------------------------------------------
# Scoring: buckets and points
# --------------------------------------------------------------------------------------------------


def _check_n_models(n_models: int) -> int:
    n = operator.index(n_models)
    if n < 2:
        raise ValueError(f"The challenge score needs at least 2 models per population (N ≥ 2), got N = {n}.")
    return n


def num_buckets(n_models: int) -> int:
    """Number of 0.5-wide scoring buckets for N models: ``2 B`` with ``B = ceil(ln(N − 1))`` (spec §7).

    ε ≥ B earns no points. N = 2 gives 0 buckets (every score is 0), as in the official code.

    Args:
      n_models: N, the number of models in each population.

    Returns:
      The bucket count, e.g. 14 for N = 512 (buckets [0, 0.5) … [6.5, 7)).

    Raises:
      ValueError: N < 2.

    Examples:
      >>> [num_buckets(n) for n in (3, 8, 16, 64, 512)]
      [2, 4, 6, 10, 14]
    """
    n = _check_n_models(n_models)
    return 2 * math.ceil(math.log(n - 1))


def points(eps, n_models: int) -> np.ndarray:
    r"""Points of per-example ε: bucket ``k = floor(2ε)`` is worth :math:`2^{-k}`, and ``k ≥ num_buckets`` is 0.

    Args:
      eps: ``[m]`` (any shape) per-example ε ≥ 0.
      n_models: N, which sets the bucket count (:func:`num_buckets`).

    Returns:
      float64 array of the shape of ``eps``.

    Raises:
      ValueError: N < 2, or ε negative or NaN.

    Examples:
      >>> points([0.49, 0.5, 6.99, 7.0, 50.0], 512).tolist()
      [1.0, 0.5, 0.0001220703125, 0.0, 0.0]
    """
    nb = num_buckets(n_models)
    eps = np.asarray(eps, dtype=np.float64)
    bad = np.isnan(eps) | (eps < 0)
    if bad.any():
        raise ValueError(f"ε must be non-negative and not NaN; got {errors._preview(eps[bad].tolist())}.")
    k = np.floor(eps / BUCKET_WIDTH)  # the bucket [k/2, k/2 + 1/2) holding ε; inf stays inf
    inside = k < nb
    return np.where(inside, np.ldexp(1.0, -np.where(inside, k, 0).astype(np.int64)), 0.0)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _check_pair(a, b, names: tuple[str, str], *, min_models: int) -> tuple[np.ndarray, np.ndarray]:
    """Both [N, m], same shape, finite, N ≥ min_models, m ≥ 1; returned as float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    for arr, name in zip((a, b), names, strict=True):
        if arr.ndim != 2:
            raise errors.ShapeDtypeError(f"{name} must be [N models, m examples], got shape {arr.shape}.")
    if a.shape != b.shape:
        raise errors.ShapeDtypeError(
            f"{names[0]} has shape {a.shape} but {names[1]} has shape {b.shape}; both must be [N models, m examples]."
        )
    n, m = a.shape
    if n < min_models:
        raise ValueError(f"Need at least {min_models} models per population (rows), got N = {n}.")
    if m < 1:
        raise ValueError(f"Need at least one example (column), got shape {a.shape}.")
    errors.check_finite(a, names[0])
    errors.check_finite(b, names[1])
    return a, b


def _check_accuracies(acc, n: int, name: str) -> np.ndarray:
    arr = np.asarray(acc, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{name} must hold one accuracy per model, shape ({n},), got shape {arr.shape}.")
    errors.check_finite(arr, name)
    return arr


def _check_settings(delta: float, eps_cap: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}.")
    if not eps_cap > 0.0:
        raise ValueError(f"eps_cap must be positive, got {eps_cap}.")


# --------------------------------------------------------------------------------------------------
# Per-example ε: shared pieces
# --------------------------------------------------------------------------------------------------


def _positive_negative(unlearned: np.ndarray, retrain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, m] inputs -> (pos, neg) as [m, N]: R is positive iff median(R) > median(U), strictly (spec §7 step 1)."""
    retrain_positive = np.median(retrain, axis=0) > np.median(unlearned, axis=0)
    pos = np.where(retrain_positive[None, :], retrain, unlearned)
    neg = np.where(retrain_positive[None, :], unlearned, retrain)
    return np.ascontiguousarray(pos.T), np.ascontiguousarray(neg.T)


def _linspace(start: np.ndarray, stop: np.ndarray, num, idx: np.ndarray) -> np.ndarray:
    """Entries ``idx`` of ``np.linspace(start, stop, num)``, bit for bit, for arrays of grids at once.

    ``start``, ``stop`` (and ``num`` if an array) have a common shape S; ``idx`` is a 1-D index vector. Returns
    S + (len(idx),). Entries with ``idx ≥ num`` are meaningless (callers mask them). NumPy computes
    ``j·step + start`` with ``step = (stop − start)/(num − 1)`` (``j/div·delta`` when the step underflows to 0)
    and sets the last entry to ``stop``; the fast and brute-force paths must see identical thresholds, since a
    threshold one ulp off changes a count when it ties with a sample.
    """
    start = np.asarray(start, dtype=np.float64)[..., None]
    stop = np.asarray(stop, dtype=np.float64)[..., None]
    num = np.asarray(num)[..., None] if np.ndim(num) else np.asarray(num)
    j = idx.astype(np.float64)
    delta = stop - start
    single = num == 1
    div = np.where(single, 1, num - 1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        step = delta / div
        underflow = step == 0
        body = np.where(underflow, j / div * delta, j * step) if underflow.any() else j * step
    body += start
    return np.where((idx == num - 1) & ~single, stop, body)


def _threshold_epsilons(tp: np.ndarray, fp: np.ndarray, n: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """ε of each threshold from its integer counts, and whether it survives (spec §7 step 5).

    ``tp``/``fp`` count the positive/negative sample predicted positive out of n each. Perfect separation
    (FPR = FNR = 0) gives ε = ∞. Otherwise FPR·FNR = 0 discards the threshold, and
    ``ε = max(0, nanmax(log(1−δ−FPR) − log FNR, log(1−δ−FNR) − log FPR))``, discarded when both are NaN.
    """
    fn = n - tp
    fpr = fp / n
    fnr = fn / n
    with np.errstate(divide="ignore", invalid="ignore"):
        # (1 − δ) − FPR, in the reference's order of operations.
        a = np.log((1.0 - delta) - fpr) - np.log(fnr)
        b = np.log((1.0 - delta) - fnr) - np.log(fpr)
    eps = np.maximum(np.fmax(a, b), 0.0)  # fmax ignores one NaN; NaN only when both are NaN
    perfect = (fp == 0) & (fn == 0)
    survives = perfect | ((fp != 0) & (fn != 0) & ~np.isnan(eps))
    return np.where(perfect, np.inf, eps), survives


# --------------------------------------------------------------------------------------------------
# Fast path: sorted counting, vectorised over examples
# --------------------------------------------------------------------------------------------------


class _SortedCounts:
    """Insertion positions of queries into each example's sorted sample, for a chunk of examples at once.

    The chunk's values are sorted once into a pooled vocabulary ``V``. A sample value ``c`` has rank
    ``index(c in V)``, and ``c < q ⟺ rank(c) < searchsorted(V, q, "left")`` (``≤`` with "right"). A cumulative
    table ``C[e, k] = #{c in sample e : rank(c) < k}`` then turns one ``searchsorted`` into V per query into
    ``pos_left``/``pos_right`` for every sample of the chunk, exactly, with no loop over examples. Tables are kept
    flat ([E·(|V|+1)]) and keys carry their row offset, so a count is one gather.
    """

    def __init__(self, *samples: np.ndarray):
        self.vocab = np.unique(np.concatenate([s.ravel() for s in samples]))
        self.width = self.vocab.size + 1
        e = samples[0].shape[0]
        self.offsets = np.arange(e) * self.width
        self.tables = []
        for s in samples:
            flat = (self.offsets[:, None] + np.searchsorted(self.vocab, s) + 1).ravel()
            hist = np.bincount(flat, minlength=e * self.width).reshape(e, self.width)
            self.tables.append(np.cumsum(hist, axis=1).ravel())

    def keys(self, queries: np.ndarray, side: str) -> np.ndarray:
        """Flat keys of queries [E, ...] (shared by every sample of the chunk): "left" counts c < q, "right" c ≤ q."""
        ranks = np.searchsorted(self.vocab, queries, side=side)
        return ranks + self.offsets.reshape((-1,) + (1,) * (queries.ndim - 1))

    def select(self, first: np.ndarray, second: np.ndarray, take_second: np.ndarray) -> np.ndarray:
        """Per example, the table ``second`` where ``take_second`` [E] else ``first``."""
        pick = np.repeat(take_second, self.width)
        return np.where(pick, second, first)

    @staticmethod
    def count(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """pos_left/pos_right (as the keys were made) of the queries in the sample behind ``table``."""
        return table[keys]


class _Best:
    """Running max of ε over surviving thresholds, per example. Non-survivors count as −∞."""

    def __init__(self, e: int, n: int, delta: float):
        self.n, self.delta = n, delta
        self.eps = np.full(e, -np.inf)
        self.table = None
        if (n + 1) ** 2 <= _LOOKUP_LIMIT:
            tp, fp = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
            eps, ok = _threshold_epsilons(tp, fp, n, delta)
            self.table = np.where(ok, eps, -np.inf).ravel()  # index tp·(n+1) + fp

    def update(self, tp: np.ndarray, fp: np.ndarray) -> None:
        """Folds in thresholds with counts tp, fp [E, ...]. tp = fp = 0 (padding) never survives."""
        if self.table is not None:
            values = self.table[tp * (self.n + 1) + fp]
        else:
            eps, ok = _threshold_epsilons(tp, fp, self.n, self.delta)
            values = np.where(ok, eps, -np.inf)
        self.eps = np.maximum(self.eps, values.reshape(values.shape[0], -1).max(axis=1))

    def result(self) -> np.ndarray:
        return np.where(self.eps > -np.inf, self.eps, np.nan)


def _attack_epsilons(pos: np.ndarray, neg: np.ndarray, delta: float) -> np.ndarray:
    """Max ε over both threshold families for a chunk of non-degenerate examples (spec §7 steps 3–6).

    Args:
      pos, neg: [E, N] positive and negative samples (rows are examples).
      delta: δ.

    Returns:
      [E] float64: the max ε over surviving thresholds (∞ for perfect separation, not yet clipped), NaN where
      no threshold survives.
    """
    e, n = pos.shape
    counts = _SortedCounts(pos, neg)
    table_pos, table_neg = counts.tables
    best = _Best(e, n, delta)

    # Single-threshold family: t = linspace(min, max, ceil(100·range)) over the pooled values; c ≥ t is positive.
    lo = np.minimum(pos.min(axis=1), neg.min(axis=1))
    hi = np.maximum(pos.max(axis=1), neg.max(axis=1))
    num = np.ceil((hi - lo) * THRESHOLDS_PER_UNIT).astype(np.int64)
    block = max(1, _THRESHOLD_BUDGET // e)
    for j0 in range(0, int(num.max()), block):
        j = np.arange(j0, min(j0 + block, int(num.max())))
        keys = counts.keys(_linspace(lo, hi, num, j), "left")
        valid = j[None, :] < num[:, None]  # padding beyond an example's own grid: tp = fp = 0 never survives
        tp = np.where(valid, n - counts.count(table_pos, keys), 0)
        fp = np.where(valid, n - counts.count(table_neg, keys), 0)
        best.update(tp, fp)

    # Double-threshold family: P is the peakier sample (positive for these rates), w = range(P), b = 2;
    # right thresholds r = linspace(min P + w − b, max P + b, ceil(100·(2b))), 400 left ones per r in
    # [r − w − b, r − w + b]; l ≤ c ≤ r is positive.
    range_pos = pos.max(axis=1) - pos.min(axis=1)
    range_neg = neg.max(axis=1) - neg.min(axis=1)
    swap = range_pos >= range_neg
    peaky = np.where(swap[:, None], neg, pos)
    table_p = counts.select(table_pos, table_neg, swap)
    table_q = counts.select(table_neg, table_pos, swap)
    width = np.minimum(range_pos, range_neg)
    lo_r = (peaky.min(axis=1) + width) - DOUBLE_BUFFER
    hi_r = peaky.max(axis=1) + DOUBLE_BUFFER
    num_r = np.ceil((hi_r - lo_r) * THRESHOLDS_PER_UNIT).astype(np.int64)
    left_idx = np.arange(_NUM_LEFT)
    block = max(1, _THRESHOLD_BUDGET // (e * _NUM_LEFT))
    for j0 in range(0, int(num_r.max()), block):
        j = np.arange(j0, min(j0 + block, int(num_r.max())))
        right = _linspace(lo_r, hi_r, num_r, j)  # [E, J]
        centre = right - width[:, None]
        left = _linspace(centre - DOUBLE_BUFFER, centre + DOUBLE_BUFFER, _NUM_LEFT, left_idx)  # [E, J, L]
        right_keys = counts.keys(right, "right")
        left_keys = counts.keys(left, "left")
        # Padded right thresholds count 0 on the right, hence tp = fp = 0 after the clamp: never a survivor.
        valid = j[None, :] < num_r[:, None]
        right_p = np.where(valid, counts.count(table_p, right_keys), 0)[..., None]
        right_q = np.where(valid, counts.count(table_q, right_keys), 0)[..., None]
        # The clamp matters when w < 2: a left threshold can then exceed its right one.
        tp = np.maximum(right_p - counts.count(table_p, left_keys), 0)
        fp = np.maximum(right_q - counts.count(table_q, left_keys), 0)
        best.update(tp, fp)

    return best.result()


def _raise_no_threshold(bad: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> None:
    i = int(bad[0])
    more = f" ({bad.size} examples in total: {errors._preview(bad.tolist())})" if bad.size > 1 else ""
    raise ChallengeMetricError(
        f"No threshold survives for example {i}{more}: every threshold of both families has FPR·FNR = 0 without "
        f"separating the samples, or an undefined ε (positive range [{pos[i].min()!r}, {pos[i].max()!r}], "
        f"negative range [{neg[i].min()!r}, {neg[i].max()!r}]), so ε is undefined; the reference fails here too. "
        "This happens for two constant samples closer than the 0.01-unit threshold grid."
    )


def _epsilons_from_pos_neg(pos: np.ndarray, neg: np.ndarray, delta: float, eps_cap: float) -> np.ndarray:
    m = pos.shape[0]
    range_pos = pos.max(axis=1) - pos.min(axis=1)
    range_neg = neg.max(axis=1) - neg.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.minimum(range_pos, range_neg) / np.maximum(range_pos, range_neg)
    # 0/0 is NaN and NaN < 0.01 is False: two constant samples go on to the attacks, as in the reference.
    degenerate = ratio < DEGENERATE_RATIO
    equal_constants = (range_pos == 0) & (range_neg == 0) & (pos[:, 0] == neg[:, 0])
    eps = np.zeros(m)
    eps[degenerate] = eps_cap
    todo = np.flatnonzero(~degenerate & ~equal_constants)
    for start in range(0, todo.size, _EXAMPLES_PER_CHUNK):
        idx = todo[start : start + _EXAMPLES_PER_CHUNK]
        eps[idx] = _attack_epsilons(pos[idx], neg[idx], delta)
    bad = todo[np.isnan(eps[todo])]
    if bad.size:
        _raise_no_threshold(bad, pos, neg)
    return np.clip(eps, 0.0, eps_cap)


def example_epsilons(unlearned_phi, retrain_phi, *, delta: float = DELTA, eps_cap: float = EPSILON_CAP) -> np.ndarray:
    r"""Per-example ε of the NeurIPS 2023 challenge metric (spec §7, "Per example").

    For example i with samples ``U[:, i]``, ``R[:, i]``:

    1. the positive sample is R if ``median(R_i) > median(U_i)``, else U;
    2. if ``min(range)/max(range) < 0.01`` then ε = cap with no attack (a peaky sample is maximally
       distinguishable); two equal constants give ε = 0 (a documented deviation);
    3. otherwise ε is the max over the single-threshold family (``c ≥ t``) and the double-threshold family
       (``l ≤ c ≤ r``, positive = the peakier sample) of
       :math:`\max(0, \log(1-δ-\mathrm{FPR}) - \log \mathrm{FNR}, \log(1-δ-\mathrm{FNR}) - \log \mathrm{FPR})`
       (∞ for perfect separation; thresholds with FPR·FNR = 0 are discarded), clipped to [0, cap].

    Counting is exact (sorted samples and ``searchsorted``), vectorised over chunks of examples.

    Args:
      unlearned_phi: ``[N, m]`` statistic (φ, spec §6.1) of m forget examples under N unlearned models.
      retrain_phi: ``[N, m]`` the same under N retrained models.
      delta: δ of the bound (1e-5 in the reference).
      eps_cap: the clip and the degenerate value (50 in the reference).

    Returns:
      ``[m]`` float64 ε in [0, eps_cap].

    Raises:
      ShapeDtypeError: shapes are not both [N, m].
      ValueError: N < 2 or m = 0, or bad δ / cap.
      NonFiniteError: NaN or Inf in an input.
      ChallengeMetricError: no threshold survives for some example (named in the message).

    Examples:
      >>> u = np.array([[0.0], [1.0], [2.0]])
      >>> example_epsilons(u, u).tolist(), example_epsilons(u + 10.0, u).tolist()
      ([0.0], [50.0])
    """
    _check_settings(delta, eps_cap)
    u, r = _check_pair(unlearned_phi, retrain_phi, ("unlearned φ", "retrain φ"), min_models=2)
    pos, neg = _positive_negative(u, r)
    return _epsilons_from_pos_neg(pos, neg, delta, eps_cap)


# --------------------------------------------------------------------------------------------------
# Brute-force reference (tests only)
# --------------------------------------------------------------------------------------------------


def _bruteforce_rates_eps(tpr, fnr, fpr, tnr, delta):
    """The reference's per-threshold ε bookkeeping on rate vectors: inf, NaN (discarded) or the formula."""
    thr = np.zeros(tpr.shape)
    thr[((fpr + fnr) == 0) & ((tpr + tnr) == 2)] = np.inf
    thr[(thr == 0) & ((fpr * fnr) == 0)] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        cand = np.stack([np.log(1 - delta - fpr) - np.log(fnr), np.log(1 - delta - fnr) - np.log(fpr)])
    all_nan = np.isnan(cand).all(axis=0)
    formula = np.clip(np.where(all_nan, np.nan, np.max(np.where(np.isnan(cand), -np.inf, cand), axis=0)), 0, None)
    thr = np.where(thr == 0, formula, thr)
    return thr[~np.isnan(thr)]


def _epsilons_bruteforce(unlearned_phi, retrain_phi, *, delta: float = DELTA, eps_cap: float = EPSILON_CAP):
    """Straightforward per-example implementation with tiled [N, T] comparisons, to check the fast path.

    Loops over examples, builds every threshold with ``np.linspace`` as the reference does, and compares
    all models against all thresholds. O(N·T) memory per example; for tests only.
    """
    u, r = _check_pair(unlearned_phi, retrain_phi, ("unlearned φ", "retrain φ"), min_models=2)
    n, m = u.shape
    out = np.empty(m)
    for i in range(m):
        p, q = (r[:, i], u[:, i]) if np.median(r[:, i]) > np.median(u[:, i]) else (u[:, i], r[:, i])
        p_diff, q_diff = p.max() - p.min(), q.max() - q.min()
        largest, smallest = max(p_diff, q_diff), min(p_diff, q_diff)
        if largest > 0 and smallest / largest < DEGENERATE_RATIO:
            out[i] = eps_cap
            continue
        if largest == 0 and p[0] == q[0]:
            out[i] = 0.0
            continue
        # Single threshold.
        lo, hi = min(p.min(), q.min()), max(p.max(), q.max())
        t = np.linspace(lo, hi, int(np.ceil((hi - lo) * THRESHOLDS_PER_UNIT)))
        tpr_s = (p[:, None] >= t[None]).mean(0)
        fpr_s = (q[:, None] >= t[None]).mean(0)
        fnr_s = (p[:, None] < t[None]).mean(0)
        tnr_s = (q[:, None] < t[None]).mean(0)
        # Double threshold, positive = the peakier sample.
        pp, qq = (q, p) if p_diff >= q_diff else (p, q)
        w, b = smallest, DOUBLE_BUFFER
        lo_r, hi_r = pp.min() + w - b, pp.max() + b
        right = np.linspace(lo_r, hi_r, int(np.ceil((hi_r - lo_r) * THRESHOLDS_PER_UNIT)))
        left = np.linspace(right - w - b, right - w + b, _NUM_LEFT, axis=1)  # [R, L]
        rr = np.broadcast_to(right[:, None], left.shape).ravel()
        ll = left.ravel()

        def inside(c, ll=ll, rr=rr):
            return (ll[None] <= c[:, None]) & (c[:, None] <= rr[None])

        tpr_d = inside(pp).mean(0)
        fpr_d = inside(qq).mean(0)
        fnr_d = (~inside(pp)).mean(0)
        tnr_d = (~inside(qq)).mean(0)
        kept = _bruteforce_rates_eps(
            np.concatenate([tpr_d, tpr_s]),
            np.concatenate([fnr_d, fnr_s]),
            np.concatenate([fpr_d, fpr_s]),
            np.concatenate([tnr_d, tnr_s]),
            delta,
        )
        if kept.size == 0:
            raise ChallengeMetricError(f"No threshold survives for example {i}.")
        out[i] = kept.max()
    return np.clip(out, 0.0, eps_cap)


# --------------------------------------------------------------------------------------------------
# The challenge score
# --------------------------------------------------------------------------------------------------


def _forget_part(u: np.ndarray, r: np.ndarray, delta: float, eps_cap: float) -> dict[str, Any]:
    n, m = u.shape
    pos, neg = _positive_negative(u, r)
    eps = _epsilons_from_pos_neg(pos, neg, delta, eps_cap)
    pts = points(eps, n)
    return {
        "epsilons": eps,
        "points": pts,
        "forget_score": float(pts.mean()),
        "num_buckets": num_buckets(n),
        "n_models": n,
        "num_examples": m,
        "delta": delta,
        "eps_cap": eps_cap,
    }


def challenge_score(
    unlearned_phi,
    retrain_phi,
    *,
    retain_acc_unlearned,
    retain_acc_retrain,
    test_acc_unlearned,
    test_acc_retrain,
    delta: float = DELTA,
    eps_cap: float = EPSILON_CAP,
) -> dict[str, Any]:
    r"""The NeurIPS 2023 unlearning-challenge score (spec §7).

    .. math::
       F = \frac{1}{m}\sum_i \mathrm{points}(ε_i), \qquad
       \mathrm{final} = F \cdot \frac{\overline{\mathrm{acc}}_{retain}(U)}{\overline{\mathrm{acc}}_{retain}(R)}
       \cdot \frac{\overline{\mathrm{acc}}_{test}(U)}{\overline{\mathrm{acc}}_{test}(R)}

    with ε_i from :func:`example_epsilons`, points from :func:`points`, and means over the N models (as in
    the reference ``main.py``). F of two retrain populations is about 0.2, not 1 (see :func:`oracle_vs_oracle`).

    Args:
      unlearned_phi: ``[N, m]`` φ of the m forget examples under N unlearned models.
      retrain_phi: ``[N, m]`` φ under N retrained models.
      retain_acc_unlearned, retain_acc_retrain: ``[N]`` per-model retain accuracies.
      test_acc_unlearned, test_acc_retrain: ``[N]`` per-model test accuracies.
      delta: δ (1e-5).
      eps_cap: ε clip (50).

    Returns:
      A dict with ``epsilons`` [m], ``points`` [m], ``forget_score`` (F), ``retain_ratio``, ``test_ratio``,
      ``final``, ``num_buckets``, ``n_models``, ``num_examples``, ``delta`` and ``eps_cap``.

    Raises:
      The errors of :func:`example_epsilons`; ValueError for accuracy arrays that are not [N] or a zero mean
      retrain accuracy.
    """
    _check_settings(delta, eps_cap)
    u, r = _check_pair(unlearned_phi, retrain_phi, ("unlearned φ", "retrain φ"), min_models=2)
    n = u.shape[0]
    acc = {
        name: _check_accuracies(value, n, name)
        for name, value in (
            ("retain_acc_unlearned", retain_acc_unlearned),
            ("retain_acc_retrain", retain_acc_retrain),
            ("test_acc_unlearned", test_acc_unlearned),
            ("test_acc_retrain", test_acc_retrain),
        )
    }
    for name in ("retain_acc_retrain", "test_acc_retrain"):
        if acc[name].mean() == 0:
            raise ValueError(f"{name} has mean 0, so the accuracy ratio is undefined.")
    out = _forget_part(u, r, delta, eps_cap)
    retain_ratio = float(acc["retain_acc_unlearned"].mean() / acc["retain_acc_retrain"].mean())
    test_ratio = float(acc["test_acc_unlearned"].mean() / acc["test_acc_retrain"].mean())
    out.update(retain_ratio=retain_ratio, test_ratio=test_ratio, final=out["forget_score"] * retain_ratio * test_ratio)
    return out


def oracle_vs_oracle(
    retrain_phi_a, retrain_phi_b, *, delta: float = DELTA, eps_cap: float = EPSILON_CAP
) -> dict[str, Any]:
    """The challenge forget score F between two independent retrain populations: the retrain reference for F.

    Two oracle sets drawn from the same distribution do not score 1 (about 0.16–0.21 for iid Gaussian φ at
    every N from 16 to 512, spec §7 "Calibration"); unlearning is judged against this value. Population a
    plays the unlearned role. To split one pool of 2N oracles, see :func:`split_pool`.

    Args:
      retrain_phi_a, retrain_phi_b: ``[N, m]`` φ under two disjoint sets of N oracles.
      delta, eps_cap: as in :func:`challenge_score`.

    Returns:
      A dict with ``epsilons``, ``points``, ``forget_score``, ``num_buckets``, ``n_models``, ``num_examples``,
      ``delta`` and ``eps_cap`` (no accuracy ratios).
    """
    _check_settings(delta, eps_cap)
    a, b = _check_pair(retrain_phi_a, retrain_phi_b, ("retrain φ (a)", "retrain φ (b)"), min_models=2)
    return _forget_part(a, b, delta, eps_cap)


def split_pool(pool, *, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Splits one pool of oracles ``[M, m]`` into two disjoint halves ``[M // 2, m]`` for :func:`oracle_vs_oracle`.

    Each half then uses the bucket count of its own size. With an odd M the last row (after shuffling) is
    left out.

    Args:
      pool: ``[M, m]`` φ under M oracles, M ≥ 4.
      seed: ``None`` splits first half / second half; an integer shuffles the rows first with
        ``np.random.default_rng(seed)``.

    Returns:
      ``(a, b)``, float64 arrays of shape ``[M // 2, m]``.

    Examples:
      >>> a, b = split_pool(np.arange(10.0).reshape(5, 2))
      >>> a.shape, b[:, 0].tolist()
      ((2, 2), [4.0, 6.0])
    """
    arr = np.asarray(pool, dtype=np.float64)
    if arr.ndim != 2:
        raise errors.ShapeDtypeError(f"The oracle pool must be [M models, m examples], got shape {arr.shape}.")
    half = arr.shape[0] // 2
    if half < 2:
        raise ValueError(f"Splitting needs at least 4 oracles (2 per half), got M = {arr.shape[0]}.")
    if seed is not None:
        arr = arr[np.random.default_rng(seed).permutation(arr.shape[0])]
    return arr[:half], arr[half : 2 * half]


# --------------------------------------------------------------------------------------------------
# KLOM
# --------------------------------------------------------------------------------------------------


def _klom_counts(
    unlearned: np.ndarray, retrain: np.ndarray, bins: int, clip: float, include_right_edge: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example histograms [m, bins] of the clipped unlearned and retrain margins on shared bins (spec §8)."""
    p = np.clip(unlearned.T, -clip, clip)  # [m, N]
    q = np.clip(retrain.T, -clip, clip)
    lo = np.minimum(p.min(axis=1), q.min(axis=1))
    hi = np.maximum(p.max(axis=1), q.max(axis=1))
    hi = np.where(lo >= hi, lo + 1.0, hi)
    edges = _linspace(lo, hi, bins + 1, np.arange(bins + 1))  # [m, bins + 1]

    def histogram(x):
        # np.digitize(x, edges) for increasing edges: the number of edges ≤ x, 1-based; = bins + 1 at the max.
        idx = np.sum(x[:, :, None] >= edges[:, None, :], axis=2)
        if include_right_edge:
            idx = np.minimum(idx, bins)
        rows = np.arange(x.shape[0])[:, None]
        flat = (rows * (bins + 2) + idx).ravel()
        return np.bincount(flat, minlength=x.shape[0] * (bins + 2)).reshape(x.shape[0], bins + 2)[:, 1 : bins + 1]

    return histogram(p), histogram(q)


def klom(
    unlearned_margins,
    retrain_margins,
    *,
    bins: int = 20,
    clip: float = 100.0,
    include_right_edge: bool = False,
) -> np.ndarray:
    r"""Per-example KLOM: binned :math:`\mathrm{KL}(p \,\|\, q)` of unlearned vs retrained margins (spec §8).

    For each example: clip both samples to [−clip, clip]; build ``bins`` equal-width bins over the pooled
    [min, max] (max = min + 1 when they are equal); histogram p (unlearned) and q (retrain); floor q at 1e-5
    where p > 0; and return :math:`\sum_k p_k \log(p_k / \tilde q_k)` with both renormalised (as
    ``scipy.stats.entropy`` does).

    Quirk: the reference bins with ``np.digitize``, which puts values equal to the pooled maximum past the last
    bin, so they are dropped. ``include_right_edge=False`` (default) reproduces it; ``True`` counts them in the
    last bin. In the faithful mode an example whose unlearned samples all sit at the pooled maximum has an
    empty p and gives NaN, as in the reference.

    Args:
      unlearned_margins: ``[N, m]`` margins ``z_y − logsumexp_{j≠y} z_j`` of m examples under N unlearned models.
      retrain_margins: ``[N, m]`` the same under N retrained models.
      bins: number of bins (20).
      clip: margins are clipped to [−clip, clip] (100).
      include_right_edge: count values equal to the pooled maximum (not faithful).

    Returns:
      ``[m]`` float64 KL values (≥ 0; NaN only in the case above). The reference value is oracle-vs-oracle KLOM.

    Examples:
      >>> u = np.array([[0.0], [0.0], [1.0]])
      >>> r = np.array([[0.0], [1.0], [1.0]])
      >>> klom(u, r, bins=2).tolist(), round(float(klom(u, r, bins=2, include_right_edge=True)[0]), 6)
      ([0.0], 0.231049)
    """
    bins = operator.index(bins)
    if bins < 1:
        raise ValueError(f"bins must be ≥ 1, got {bins}.")
    if not clip > 0:
        raise ValueError(f"clip must be positive, got {clip}.")
    u, r = _check_pair(unlearned_margins, retrain_margins, ("unlearned margins", "retrain margins"), min_models=1)
    n, m = u.shape
    out = np.empty(m)
    chunk = max(1, _THRESHOLD_BUDGET // (n * (bins + 1)))
    for start in range(0, m, chunk):
        sl = slice(start, start + chunk)
        p_counts, q_counts = _klom_counts(u[:, sl], r[:, sl], bins, clip, include_right_edge)
        with np.errstate(divide="ignore", invalid="ignore"):
            p_tot = p_counts.sum(axis=1, keepdims=True)
            q_tot = q_counts.sum(axis=1, keepdims=True)
            p = np.where(p_tot > 0, p_counts / p_tot, 0.0)
            q = np.where(q_tot > 0, q_counts / q_tot, 0.0)
            q = np.where(p > 0, np.maximum(q, 1e-5), q)
            # scipy.stats.entropy renormalises both; an all-zero p gives 0/0 = NaN there and here.
            p = p / p.sum(axis=1, keepdims=True)
            q = q / q.sum(axis=1, keepdims=True)
            terms = np.where(p > 0, p * np.log(p / q), np.where(np.isnan(p), np.nan, 0.0))
        out[sl] = terms.sum(axis=1)
    return out


def klom_summary(values) -> dict[str, float]:
    """Mean and 95th percentile (linear interpolation) of per-example KLOM values (spec §8 "Report").

    Args:
      values: ``[m]`` KLOM values, m ≥ 1. NaN propagates.

    Returns:
      ``{"mean": float, "p95": float}``.

    Examples:
      >>> klom_summary([0.0, 1.0, 2.0, 3.0, 4.0])
      {'mean': 2.0, 'p95': 3.8}
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("klom_summary needs at least one value.")
    return {"mean": float(arr.mean()), "p95": float(np.percentile(arr, 95))}
