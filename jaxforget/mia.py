"""Per-example membership statistics and the named membership-inference attacks (spec §6).

**Statistics** (§6.1) are small pure functions of eval-mode logits ``z: [n, K]`` and labels ``y: [n]``,
computed in float64 on the host: ``loss``, ``confidence``, ``correctness``, ``entropy``, ``m_entropy``,
``prob``, ``logit_conf`` (LiRA's φ) and ``margin`` (φ without its floor, for KLOM §8). Every statistic is
computed per row, so no example's value depends on the rest of its batch (§11.2).

**Attacks** (§6.3-6.6) take one model's logits on named sample sets, a mapping ``{"forget": D_f,
"retain": D_r, "test": D_test}`` of :class:`SplitLogits`, and return one record (a ``dict``):

=================  ===========  =======================  ==============  ==========================
attack             statistic    members (label 1)        non-members     value
=================  ===========  =======================  ==============  ==========================
``lr_loss_cv``     loss         ``D_f``                  ``D_test``      mean 10-fold CV accuracy
``svc_entropy``    entropy      ``D_r`` (subsampled)     ``D_test``      fraction of ``D_f`` → member
``svc_features``   5 sets       ``|D_test|`` of ``D_r``  ``D_test``      fraction of ``D_f`` → member
``lira_conf``      φ            ``D_f`` (positives)      ``D_test``      ROC AUC
=================  ===========  =======================  ==============  ==========================

The two classifier-on-shadow-data attacks (``svc_*``) are *trained* on retain-vs-test and *applied* to
``D_f``; the other two measure how well the statistic separates ``D_f`` from ``D_test`` directly.

**Sign conventions** (§6.5, §11.1). Every SVC attack reports ``member_rate``, the fraction of ``D_f``
predicted member (Golatkar's number). SalUn's "MIA-efficacy" is the opposite, ``1 − member_rate``, and is
written beside it as ``salun_efficacy``. No value is "higher is better" or "lower is better", and 0.5 is not
the goal either: the target of every attack is its value on the model retrained without ``D_f`` (§0 rule 1).
:func:`attack_all_models` therefore runs one attack, with the same seeds, on the unlearned, retrained and
original models and returns ``value``, ``value_retrain`` and ``value_original`` side by side.

**Records** (§6.2). Every record names the attack, the statistic, the scikit-learn classifier and all its
hyper-parameters, the member, non-member and target id sets that were actually used (size plus the first 16
hex digits of the sha256 of the sorted int64 ids), the balance rule and its seed, and a ``convention`` string.
Model-dependent outputs beyond ``value`` (CV scores, held-out accuracy of the attack, TPR at low FPR, ...)
live in ``record["results"]``.

**Determinism.** Rows of a :class:`SplitLogits` are put in increasing id order, and every subsample is drawn
from ``numpy.random.default_rng(seed)`` over that order: an attack's result depends only on the samples and
the seed, never on row order, and the same inputs give bitwise the same record.

References:
  Song, Mittal, Systematic Evaluation of Privacy Risks of Machine Learning Models, USENIX Security 2021.
  Carlini, Chien, Nasr, Song, Terzis, Tramèr, Membership Inference Attacks From First Principles, S&P 2022.
  Golatkar, Achille, Soatto, Eternal Sunshine of the Spotless Net, CVPR 2020 (``membership_attack``).
  Fan et al., SalUn, ICLR 2024; Jia et al., Model Sparsity Can Simplify Machine Unlearning, NeurIPS 2023.
  NeurIPS 2023 Machine Unlearning Challenge starting kit (``simple_mia``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxforget import errors

__all__ = [
    "ATTACKS",
    "LIRA_FLOOR",
    "LIRA_MIN_ORACLES",
    "LIRA_SIGMA_FLOOR",
    "LOW_FPRS",
    "MODEL_NAMES",
    "M_ENTROPY_FLOOR",
    "STATISTICS",
    "SVC_FEATURES",
    "AttackInputError",
    "Inputs",
    "SplitLogits",
    "attack_all_models",
    "confidence",
    "correctness",
    "entropy",
    "ids_hash",
    "lira_conf",
    "logit_conf",
    "loss",
    "lr_loss_cv",
    "m_entropy",
    "margin",
    "prob",
    "statistic",
    "svc_entropy",
    "svc_features",
]

# Song & Mittal's reference code (inspire-group/membership-inference-evaluation) floors every log argument here.
M_ENTROPY_FLOOR = 1e-30
# LiRA's official floor; meaningful only in float64 (it is subnormal in float32), and it bounds |φ| by 103.6.
LIRA_FLOOR = 1e-45
# §6.6 (b): jaxforget's choices, recorded in every offline record.
LIRA_MIN_ORACLES = 8
LIRA_SIGMA_FLOOR = 1e-3
LOW_FPRS = (0.01, 0.001)
# StratifiedShuffleSplit's default test fraction is 0.1: with 10 per class its held-out fold has 2 samples.
_MIN_PER_CLASS_CV = 10
# svc_entropy holds out a stratified 20 %: 5 per class leaves one of each class in the held-out part.
_MIN_PER_CLASS_SVC = 5
_HELDOUT_FRACTION = 0.2

MODEL_NAMES = ("unlearned", "retrain", "original")
_CRITERION = "closest_to_retrain"


class AttackInputError(errors.JaxForgetError, ValueError):
    """Inputs an attack cannot use: missing or overlapping splits, mismatched ids, too few samples."""


# --------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------


def _check_logits_labels(logits: Any, labels: Any, what: str = "logits") -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(logits as given, labels as int64)``; raises ShapeDtypeError / NonFiniteError."""
    z = np.asarray(logits)
    if z.ndim != 2:
        raise errors.ShapeDtypeError(f"{what} must be a 2-D [n, K] array, got shape {z.shape}.")
    if z.dtype.kind in "bcOSUMm" or not (z.dtype.kind in "iuf" or np.can_cast(z.dtype, np.float64)):
        raise errors.ShapeDtypeError(f"{what} must be real numbers, got dtype {z.dtype}.")
    if z.shape[1] < 2:
        raise errors.ShapeDtypeError(f"{what} must have at least 2 classes (columns), got shape {z.shape}.")
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != z.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise errors.ShapeDtypeError(
            f"labels for {what} must be a 1-D integer array of length {z.shape[0]} (one per row of {what} "
            f"{z.shape}), got shape {y.shape} and dtype {y.dtype}."
        )
    errors.check_finite(np.asarray(z, np.float64), what)
    bad = (y < 0) | (y >= z.shape[1])
    if bad.any():
        raise errors.ShapeDtypeError(
            f"labels for {what} must lie in [0, {z.shape[1]}) (K = {z.shape[1]} logits per row), got "
            f"{errors._preview(np.unique(y[bad]))} at rows {errors._preview(np.flatnonzero(bad))}."
        )
    return z, y.astype(np.int64)


def _log_softmax64(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(log p [n, K] float64, labels int64)`` after validation; log-softmax via the row max for stability."""
    z, y = _check_logits_labels(logits, labels)
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True)), y


def _rows(y: np.ndarray) -> np.ndarray:
    return np.arange(y.shape[0])


# --------------------------------------------------------------------------------------------------------------
# Statistics (§6.1)
# --------------------------------------------------------------------------------------------------------------


def loss(logits: Any, labels: Any) -> np.ndarray:
    r"""Cross-entropy :math:`-\log p_y` per example, via log-softmax in float64.

    Args:
      logits: ``[n, K]`` real logits (any float dtype; converted to float64).
      labels: ``[n]`` integer labels in ``[0, K)``.

    Returns:
      ``[n]`` float64, ``≥ 0``.

    Raises:
      ShapeDtypeError: wrong ranks, lengths, dtypes, ``K < 2`` or labels outside ``[0, K)``.
      NonFiniteError: NaN or Inf in ``logits``.

    Examples:
      >>> loss(np.zeros((1, 4)), np.array([2])).round(6).tolist()
      [1.386294]
    """
    logp, y = _log_softmax64(logits, labels)
    return -logp[_rows(y), y]


def confidence(logits: Any, labels: Any) -> np.ndarray:
    r"""Probability of the true label :math:`p_y`, float64 ``[n]`` in ``[0, 1]``.

    Examples:
      >>> confidence(np.log(np.array([[0.7, 0.2, 0.1]])), np.array([0])).round(6).tolist()
      [0.7]
    """
    logp, y = _log_softmax64(logits, labels)
    return np.exp(logp[_rows(y), y])


def correctness(logits: Any, labels: Any) -> np.ndarray:
    r"""Top-1 correctness :math:`1[\arg\max_k z_k = y]` as float64 ``[n]`` (ties go to the first maximum).

    Examples:
      >>> correctness(np.array([[2.0, 1.0], [0.0, 0.0]]), np.array([0, 1])).tolist()
      [1.0, 0.0]
    """
    z, y = _check_logits_labels(logits, labels)
    return (np.argmax(z, axis=1) == y).astype(np.float64)


def entropy(logits: Any, labels: Any = None) -> np.ndarray:
    r"""Prediction entropy :math:`H(p) = -\sum_j p_j \log p_j` with :math:`0 \log 0 = 0`, float64 ``[n]``.

    The labels are not used; they are accepted (and validated when given) for one signature across statistics.

    Examples:
      >>> entropy(np.zeros((1, 4))).round(6).tolist()  # uniform: log K
      [1.386294]
    """
    z = np.asarray(logits)
    if labels is None:
        labels = np.zeros(z.shape[:1], np.int64)
    logp, _ = _log_softmax64(z, labels)
    p = np.exp(logp)
    return -np.where(p > 0, p * logp, 0.0).sum(axis=1)


def m_entropy(logits: Any, labels: Any) -> np.ndarray:
    r"""Song & Mittal's modified entropy, per row, float64 ``[n]``.

    .. math:: \mathrm{Mentr}(p, y) = -(1-p_y)\log p_y - \sum_{j\neq y} p_j \log(1-p_j),

    with each log argument floored at 1e-30 as in ``inspire-group/membership-inference-evaluation``. It is 0
    for a confident correct prediction and large for a confident wrong one. ``1 − p_j`` is computed as the sum
    of the other probabilities for the row's most likely class, so it does not cancel to 0 when ``p_j → 1``
    (§11.16). Unlike SalUn's version (§11.2) each row only uses its own label.

    Examples:
      >>> p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
      >>> m_entropy(np.log(p), np.array([0, 1])).round(5).tolist()
      [0.16217, 0.0657]
    """
    logp, y = _log_softmax64(logits, labels)
    p = np.exp(logp)
    rows = _rows(y)
    # 1 − p_j: direct subtraction is exact enough for p_j ≤ 1/2, i.e. every class except possibly the
    # argmax; for the argmax use the sum of the other (small, positive) probabilities instead.
    comp = 1.0 - p
    top = np.argmax(p, axis=1)
    others = p.copy()
    others[rows, top] = 0.0
    comp[rows, top] = others.sum(axis=1)
    log_p = np.log(np.maximum(p, M_ENTROPY_FLOOR))
    log_comp = np.log(np.maximum(comp, M_ENTROPY_FLOOR))
    terms = -p * log_comp
    terms[rows, y] = -comp[rows, y] * log_p[rows, y]
    return terms.sum(axis=1)


def prob(logits: Any, labels: Any = None) -> np.ndarray:
    r"""The full softmax vector :math:`p = \mathrm{softmax}(z)`, float64 ``[n, K]`` (labels unused).

    Examples:
      >>> prob(np.zeros((1, 2))).tolist()
      [[0.5, 0.5]]
    """
    z = np.asarray(logits)
    if labels is None:
        labels = np.zeros(z.shape[:1], np.int64)
    logp, _ = _log_softmax64(z, labels)
    return np.exp(logp)


def logit_conf(logits: Any, labels: Any) -> np.ndarray:
    r"""LiRA's logit-scaled confidence φ (Carlini et al. 2022), float64 ``[n]``.

    .. math:: \phi = \log(p_y + 10^{-45}) - \log\Big(\sum_{j\neq y} p_j + 10^{-45}\Big)

    For parity with the official code the row max is subtracted and the exponential taken **in the logits'
    own dtype**, then converted to float64 and normalised (§6.1): with float32 logits φ differs from the
    float64 margin by ~1e-6, and saturates at margins of ~90-100. Integer logits are exponentiated in
    float64, and float types numpy has no native ``exp`` for (bfloat16, float8) in float32. Away from the
    floor φ equals :func:`margin`; with the floor it is bounded by ``±103.6``.

    Examples:
      >>> logit_conf(np.array([[2.0, 0.0]]), np.array([0])).round(6).tolist()
      [2.0]
      >>> logit_conf(np.array([[1e4, -1e4]], np.float32), np.array([0])).round(1).tolist()
      [103.6]
    """
    z, y = _check_logits_labels(logits, labels)
    if z.dtype.kind in "iu":
        z = z.astype(np.float64)
    elif z.dtype not in (np.float16, np.float32, np.float64, np.longdouble):
        z = z.astype(np.float32)
    e = np.exp(z - z.max(axis=1, keepdims=True)).astype(np.float64)
    p = e / e.sum(axis=1, keepdims=True)
    rows = _rows(y)
    p_true = p[rows, y]
    p[rows, y] = 0.0
    return np.log(p_true + LIRA_FLOOR) - np.log(p.sum(axis=1) + LIRA_FLOOR)


def margin(logits: Any, labels: Any) -> np.ndarray:
    r"""The unfloored margin :math:`z_y - \log\sum_{j\neq y} e^{z_j}` in float64, ``[n]`` (KLOM, §8).

    Examples:
      >>> margin(np.array([[2.0, 0.0, 0.0]]), np.array([0])).round(6).tolist()
      [1.306853]
    """
    z, y = _check_logits_labels(logits, labels)
    z = z.astype(np.float64)
    rows = _rows(y)
    z_true = z[rows, y]
    rest = z.copy()
    rest[rows, y] = -np.inf
    top = rest.max(axis=1)  # finite: K ≥ 2 and the logits are finite
    lse_rest = top + np.log(np.exp(rest - top[:, None]).sum(axis=1))
    return z_true - lse_rest


STATISTICS: dict[str, Callable[[Any, Any], np.ndarray]] = {
    "loss": loss,
    "confidence": confidence,
    "correctness": correctness,
    "entropy": entropy,
    "m_entropy": m_entropy,
    "prob": prob,
    "logit_conf": logit_conf,
    "margin": margin,
}


def statistic(name: str, logits: Any, labels: Any) -> np.ndarray:
    """The per-example statistic ``name`` (a key of :data:`STATISTICS`) of ``logits [n, K]``, ``labels [n]``.

    Returns:
      float64 ``[n]``, or ``[n, K]`` for ``"prob"``.

    Raises:
      ConfigError: unknown name (the message lists the valid ones).

    Examples:
      >>> statistic("correctness", np.array([[0.0, 1.0]]), np.array([1])).tolist()
      [1.0]
    """
    try:
        fn = STATISTICS[name]
    except (KeyError, TypeError):
        raise errors.ConfigError(f"Unknown statistic {name!r}; valid: {', '.join(STATISTICS)}.") from None
    return fn(logits, labels)


# --------------------------------------------------------------------------------------------------------------
# Attack inputs
# --------------------------------------------------------------------------------------------------------------


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


@dataclasses.dataclass(frozen=True, eq=False)
class SplitLogits:
    """One model's eval-mode logits on one named sample set, with the samples' labels and stable ids.

    Construction validates the arrays and puts the rows in increasing id order (so that subsamples depend
    on the samples, never on row order); the stored arrays are read-only. The logits keep their dtype, which
    :func:`logit_conf` needs for parity with LiRA.

    Attributes:
      logits: ``[n, K]`` real, finite.
      labels: ``[n]`` int64 in ``[0, K)``.
      ids: ``[n]`` int64, unique.

    Raises:
      ShapeDtypeError, NonFiniteError: as for the statistics; ids not 1-D integers of length ``n``.
      AttackInputError: duplicate ids.

    Examples:
      >>> s = SplitLogits(np.array([[0.0, 1.0], [2.0, 0.0]]), np.array([1, 0]), np.array([9, 4]))
      >>> s.ids.tolist(), s.labels.tolist(), len(s)
      ([4, 9], [0, 1], 2)
    """

    logits: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __post_init__(self):
        z, y = _check_logits_labels(self.logits, self.labels)
        ids = np.asarray(self.ids)
        if ids.ndim != 1 or ids.shape[0] != z.shape[0] or not np.issubdtype(ids.dtype, np.integer):
            raise errors.ShapeDtypeError(
                f"ids must be a 1-D integer array of length {z.shape[0]} (one per row of logits {z.shape}), "
                f"got shape {ids.shape} and dtype {ids.dtype}."
            )
        ids = ids.astype(np.int64)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        dup = ids[1:][np.diff(ids) == 0]
        if dup.size:
            raise AttackInputError(f"Duplicate sample ids {errors._preview(np.unique(dup))}.")
        object.__setattr__(self, "logits", _read_only(z[order]))
        object.__setattr__(self, "labels", _read_only(y[order]))
        object.__setattr__(self, "ids", _read_only(ids))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_dataset(cls, logits: Any, dataset: Any) -> SplitLogits:
        """Logits ``[n, K]`` of the rows of a :class:`jaxforget.data.Dataset` (labels and ids taken from it)."""
        return cls(logits, dataset.y, dataset.ids)

    def subset(self, ids: Any) -> SplitLogits:
        """The rows with the given ids (e.g. a fixed-seed subsample of a large ``D_r``), in id order.

        Raises:
          AttackInputError: ids that are not in this split, or repeated ids.

        Examples:
          >>> s = SplitLogits(np.zeros((3, 2)), np.array([0, 1, 0]), np.array([5, 6, 7]))
          >>> s.subset([7, 5]).ids.tolist()
          [5, 7]
        """
        wanted = np.asarray(ids, np.int64).ravel()
        pos = np.searchsorted(self.ids, wanted)
        found = np.zeros(wanted.shape, bool)
        inside = pos < len(self)
        found[inside] = self.ids[pos[inside]] == wanted[inside]
        if not found.all():
            raise AttackInputError(f"Ids not in this split: {errors._preview(np.unique(wanted[~found]))}.")
        return SplitLogits(self.logits[pos], self.labels[pos], self.ids[pos])


# One model's inputs: split name ("forget", "retain", "test") -> its logits.
Inputs = Mapping[str, SplitLogits]


def ids_hash(ids: Any) -> str:
    """First 16 hex digits of the sha256 of the sorted ids as little-endian int64 (order-independent).

    Examples:
      >>> ids_hash([3, 1, 2]) == ids_hash(np.array([1, 2, 3]))
      True
    """
    arr = np.sort(np.asarray(ids, np.int64).ravel())
    return hashlib.sha256(np.ascontiguousarray(arr, dtype="<i8").tobytes()).hexdigest()[:16]


def _get_splits(inputs: Inputs, names: Sequence[str], attack: str) -> list[SplitLogits]:
    """The named splits, checked to be SplitLogits of one K and pairwise disjoint in ids."""
    if not isinstance(inputs, Mapping):
        raise AttackInputError(f"{attack}: inputs must map split names to SplitLogits, got {type(inputs).__name__}.")
    missing = [n for n in names if n not in inputs]
    if missing:
        raise AttackInputError(
            f"{attack} needs the splits {list(names)}; missing {missing} (got {sorted(map(str, inputs))})."
        )
    out = []
    for n in names:
        s = inputs[n]
        if not isinstance(s, SplitLogits):
            raise AttackInputError(f"{attack}: split {n!r} must be a SplitLogits, got {type(s).__name__}.")
        out.append(s)
    widths = {n: s.logits.shape[1] for n, s in zip(names, out, strict=True)}
    if len(set(widths.values())) > 1:
        raise AttackInputError(f"{attack}: the splits have different numbers of classes K: {widths}.")
    for i, a in enumerate(names):
        for b, sb in zip(names[i + 1 :], out[i + 1 :], strict=True):
            common = np.intersect1d(out[i].ids, sb.ids)
            if common.size:
                raise AttackInputError(
                    f"{attack}: splits {a!r} and {b!r} share {common.size} id(s) {errors._preview(common)}; "
                    "members, non-members and targets must be disjoint."
                )
    return out


def _subsample(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of a uniform subsample of ``size`` out of ``n`` (all of them when ``size ≥ n``)."""
    if size >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))


def _id_set(split: str, ids: np.ndarray, n_split: int) -> dict[str, Any]:
    return {"split": split, "n": int(ids.size), "n_split": int(n_split), "ids_sha256_16": ids_hash(ids)}


def _classifier_entry(clf: Any) -> tuple[str, dict[str, Any]]:
    cls = type(clf)
    # Every hyper-parameter, defaults included, so that a record pins down the classifier; JSON-safe values only.
    params = {k: v if isinstance(v, str | int | float | bool | None) else repr(v) for k, v in clf.get_params().items()}
    return f"{cls.__module__.split('._')[0]}.{cls.__name__}", params


def _record(attack: str, statistic_name: str, clf: Any, **fields: Any) -> dict[str, Any]:
    """The §6.2 common fields, in a fixed order, plus attack-specific ``fields``."""
    if clf is None:
        classifier, params = "none (threshold on the statistic)", {}
    else:
        classifier, params = _classifier_entry(clf)
    rec: dict[str, Any] = {"attack": attack, "statistic": statistic_name, "classifier": classifier,
                           "classifier_params": params}
    rec.update(fields)
    rec.setdefault("value_retrain", None)
    rec.setdefault("value_original", None)
    rec["criterion"] = _CRITERION
    return rec


def _too_few(attack: str, minimum: int, **sizes: int) -> None:
    small = {k: v for k, v in sizes.items() if v < minimum}
    if small:
        described = ", ".join(f"{k} = {v}" for k, v in sizes.items())
        raise AttackInputError(f"{attack}: too few samples ({described}); needs at least {minimum} in each.")


# --------------------------------------------------------------------------------------------------------------
# Attacks (§6.3-6.6)
# --------------------------------------------------------------------------------------------------------------


def lr_loss_cv(inputs: Inputs, *, seed: int = 0) -> dict[str, Any]:
    r"""NeurIPS'23 starting kit ``simple_mia``: cross-validated logistic regression on the loss (§6.3).

    Members ``D_f`` (label 1) and non-members ``D_test`` (label 0), each represented by its :func:`loss`
    (one feature). The larger set is subsampled, with ``numpy.random.default_rng(seed)``, to the size ``m``
    of the smaller (the kit always shrank forget to ``len(test)``, unseeded). Samples are stacked
    non-members first, as in the kit, and scored by ``cross_val_score(LogisticRegression(), X, y,
    cv=StratifiedShuffleSplit(n_splits=10, random_state=0), scoring="accuracy")``.

    Args:
      inputs: one model's :class:`SplitLogits` under ``"forget"`` and ``"test"``.
      seed: subsample seed.

    Returns:
      A record with ``value`` = mean CV accuracy (chance 0.5) and ``results = {"cv_scores": [10 floats]}``.

    Raises:
      AttackInputError: missing/overlapping splits, or fewer than 10 samples in the smaller set (or any
        other split sklearn's cross-validation rejects; the message names the sizes).
    """
    from sklearn import linear_model, model_selection

    attack = "lr_loss_cv"
    forget, test = _get_splits(inputs, ("forget", "test"), attack)
    _too_few(attack, _MIN_PER_CLASS_CV, forget=len(forget), test=len(test))
    m = min(len(forget), len(test))
    rng = np.random.default_rng(seed)
    f_pos = _subsample(len(forget), m, rng)
    t_pos = _subsample(len(test), m, rng)
    x = np.concatenate([loss(test.logits[t_pos], test.labels[t_pos]), loss(forget.logits[f_pos], forget.labels[f_pos])])
    y = np.concatenate([np.zeros(m, np.int64), np.ones(m, np.int64)])
    clf = linear_model.LogisticRegression()
    cv = model_selection.StratifiedShuffleSplit(n_splits=10, random_state=0)
    try:
        scores = model_selection.cross_val_score(clf, x[:, None], y, cv=cv, scoring="accuracy", error_score="raise")
    except ValueError as e:
        raise AttackInputError(
            f"{attack}: cross-validation failed on {m} members and {m} non-members (|D_f| = {len(forget)}, "
            f"|D_test| = {len(test)}): {e}"
        ) from e
    n_fold = int(math.ceil(0.1 * 2 * m))  # sklearn's held-out size: ceil(test_size * n_samples)
    return _record(
        attack, "loss", clf,
        cv={"splitter": "sklearn.model_selection.StratifiedShuffleSplit", "n_splits": 10, "test_size": 0.1,
            "random_state": 0, "scoring": "accuracy", "n_heldout_per_fold": n_fold},
        members=_id_set("forget", forget.ids[f_pos], len(forget)),
        nonmembers=_id_set("test", test.ids[t_pos], len(test)),
        targets=_id_set("forget", forget.ids[f_pos], len(forget)),
        balance="subsample the larger of D_f, D_test to the smaller",
        seed=int(seed),
        value=float(np.mean(scores)),
        results={"cv_scores": [float(s) for s in scores]},
        convention="mean 10-fold CV accuracy of LR(loss) separating D_f (1) from D_test (0); 0.5 = chance; "
        "the target is the retrain value",
    )


def _svc():
    """The SVC of Golatkar and SalUn; ``gamma="auto"`` is ``1/n_features``, set by sklearn at fit time."""
    from sklearn import svm

    return svm.SVC(C=3, kernel="rbf", gamma="auto")


def svc_entropy(inputs: Inputs, *, balance: bool = True, seed: int = 0) -> dict[str, Any]:
    r"""SelectiveForgetting (Golatkar) ``membership_attack``: an SVC on prediction entropy (§6.4).

    ``SVC(C=3, kernel="rbf", gamma="auto")`` is fit on :func:`entropy` with ``D_r`` labelled member (1) and
    ``D_test`` non-member (0), stacked retain first as in the original; it then predicts ``D_f``.
    ``balance=True`` (default) subsamples ``D_r`` to ``|D_test|`` with ``default_rng(seed)`` (if ``D_r`` is
    the smaller set, ``D_test`` is subsampled to ``|D_r|``); ``balance=False`` reproduces the original's
    imbalanced fit.

    The attack's own quality (§11.9): a second SVC with the same hyper-parameters is fit on a stratified
    80 % of the same training data (``train_test_split(..., test_size=0.2, random_state=seed)``) and scored
    on the other 20 %: ``attack_heldout_accuracy``. Near its chance level (0.5 when balanced,
    ``attack_heldout_chance`` otherwise) ``member_rate`` is meaningless.

    Args:
      inputs: one model's :class:`SplitLogits` under ``"forget"``, ``"retain"`` and ``"test"``.
      balance: subsample to equal class sizes.
      seed: seed of the balancing subsample and the held-out split.

    Returns:
      A record with ``value = member_rate`` (fraction of ``D_f`` predicted member) and ``results`` holding
      ``member_rate``, ``salun_efficacy = 1 − member_rate``, ``attack_heldout_accuracy`` and
      ``attack_heldout_chance``.

    Raises:
      AttackInputError: missing/overlapping splits; fewer than 5 samples in the retain or test set used, or
        an empty forget set.
    """
    from sklearn import model_selection

    attack = "svc_entropy"
    forget, retain, test = _get_splits(inputs, ("forget", "retain", "test"), attack)
    _too_few(attack, _MIN_PER_CLASS_SVC, retain=len(retain), test=len(test))
    _too_few(attack, 1, forget=len(forget))
    rng = np.random.default_rng(seed)
    if balance:
        m = min(len(retain), len(test))
        r_pos, t_pos = _subsample(len(retain), m, rng), _subsample(len(test), m, rng)
    else:
        r_pos, t_pos = np.arange(len(retain)), np.arange(len(test))
    x = np.concatenate(
        [entropy(retain.logits[r_pos], retain.labels[r_pos]), entropy(test.logits[t_pos], test.labels[t_pos])]
    )[:, None]
    y = np.concatenate([np.ones(r_pos.size, np.int64), np.zeros(t_pos.size, np.int64)])
    clf = _svc().fit(x, y)
    member_rate = float(np.mean(clf.predict(entropy(forget.logits, forget.labels)[:, None])))

    x_fit, x_held, y_fit, y_held = model_selection.train_test_split(
        x, y, test_size=_HELDOUT_FRACTION, random_state=seed, stratify=y
    )
    heldout = float(np.mean(_svc().fit(x_fit, y_fit).predict(x_held) == y_held))
    chance = float(max(np.mean(y_held), 1.0 - np.mean(y_held)))
    return _record(
        attack, "entropy", clf,
        members=_id_set("retain", retain.ids[r_pos], len(retain)),
        nonmembers=_id_set("test", test.ids[t_pos], len(test)),
        targets=_id_set("forget", forget.ids, len(forget)),
        balance="subsample the larger of D_r, D_test to the smaller" if balance else "none (Golatkar's original)",
        seed=int(seed),
        heldout={"fraction": _HELDOUT_FRACTION, "split": "sklearn.model_selection.train_test_split, stratified",
                 "random_state": int(seed)},
        value=member_rate,
        results={"member_rate": member_rate, "salun_efficacy": 1.0 - member_rate,
                 "attack_heldout_accuracy": heldout, "attack_heldout_chance": chance},
        convention="member_rate = fraction of D_f predicted member by an SVC(entropy) trained on D_r (1) vs "
        "D_test (0); salun_efficacy = 1 - member_rate; the target is the retrain value",
    )


SVC_FEATURES = ("correctness", "confidence", "entropy", "m_entropy", "prob")


def svc_features(
    inputs: Inputs, *, features: Sequence[str] = SVC_FEATURES, seed: int = 0
) -> list[dict[str, Any]]:
    r"""SalUn / Unlearn-Sparse ``SVC_MIA``, corrected (§6.5): one SVC per feature set, one record each.

    Shadow members are a ``default_rng(seed)`` random subset of ``|D_test|`` samples of ``D_r`` (SalUn takes
    the first ones in loader order, §11.15; all of ``D_r`` if it is smaller); shadow non-members are
    ``D_test``. For each feature set (``correctness``, ``confidence``, ``entropy``, ``m_entropy``: 1 feature;
    ``prob``: K features) ``SVC(C=3, kernel="rbf", gamma="auto")`` is fit on the shadow data, stacked
    members first as in SalUn, and predicts ``D_f``. ``m_entropy`` is the per-row statistic of §6.1, not
    SalUn's batch-dependent version (§11.2).

    Args:
      inputs: one model's :class:`SplitLogits` under ``"forget"``, ``"retain"`` and ``"test"``.
      features: which feature sets to attack with, a subset of :data:`SVC_FEATURES`.
      seed: seed of the shadow-member subset (the same subset for every feature).

    Returns:
      One record per feature, in the order of ``features``, with ``value = member_rate`` and ``results``
      holding ``member_rate`` and ``salun_efficacy = 1 − member_rate`` (SalUn's "MIA-efficacy", whose
      headline feature is ``confidence``).

    Raises:
      AttackInputError: missing/overlapping splits, too few samples (fewer than 5 retain or test samples,
        or no forget samples).
      ConfigError: an unknown or repeated feature set.
    """
    attack = "svc_features"
    features = tuple(features)
    unknown = [f for f in features if f not in SVC_FEATURES]
    if unknown or not features or len(set(features)) != len(features):
        raise errors.ConfigError(
            f"{attack}: features must be distinct names from {list(SVC_FEATURES)}, got {list(features)}."
        )
    forget, retain, test = _get_splits(inputs, ("forget", "retain", "test"), attack)
    _too_few(attack, _MIN_PER_CLASS_SVC, retain=len(retain), test=len(test))
    _too_few(attack, 1, forget=len(forget))
    rng = np.random.default_rng(seed)
    r_pos = _subsample(len(retain), len(test), rng)
    y = np.concatenate([np.ones(r_pos.size, np.int64), np.zeros(len(test), np.int64)])

    records = []
    for name in features:
        fn = STATISTICS[name]

        def feat(s: SplitLogits, pos: np.ndarray | None = None, fn=fn) -> np.ndarray:
            z, lab = (s.logits, s.labels) if pos is None else (s.logits[pos], s.labels[pos])
            v = fn(z, lab)
            return v.reshape(v.shape[0], -1)

        x = np.concatenate([feat(retain, r_pos), feat(test)])
        clf = _svc().fit(x, y)
        member_rate = float(np.mean(clf.predict(feat(forget))))
        records.append(
            _record(
                attack, name, clf,
                members=_id_set("retain", retain.ids[r_pos], len(retain)),
                nonmembers=_id_set("test", test.ids, len(test)),
                targets=_id_set("forget", forget.ids, len(forget)),
                balance="shadow members: a random |D_test| subset of D_r (fixed seed)",
                seed=int(seed),
                num_features=int(x.shape[1]),
                value=member_rate,
                results={"member_rate": member_rate, "salun_efficacy": 1.0 - member_rate},
                convention=f"member_rate = fraction of D_f predicted member by an SVC({name}) trained on D_r subset "
                "(1) vs D_test (0); salun_efficacy = 1 - member_rate is SalUn's MIA-efficacy (fraction predicted "
                "non-member); the target is the retrain value",
            )
        )
    return records


def _tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """TPR at ``target`` FPR on the linearly interpolated empirical ROC (top of a vertical step on ties)."""
    # roc_curve's fpr and tpr are non-decreasing; i is the last point with fpr ≤ target, i.e. the top of
    # its vertical run, and the next point is the bottom of the next run.
    i = int(np.searchsorted(fpr, target, side="right")) - 1
    if i >= fpr.size - 1 or fpr[i] == target:
        return float(tpr[i])
    return float(np.interp(target, fpr[i : i + 2], tpr[i : i + 2]))


def _roc_summary(pos: np.ndarray, neg: np.ndarray) -> dict[str, Any]:
    from sklearn import metrics

    y = np.concatenate([np.ones(pos.size, np.int64), np.zeros(neg.size, np.int64)])
    s = np.concatenate([pos, neg])
    auc = float(metrics.roc_auc_score(y, s))
    fpr, tpr, _ = metrics.roc_curve(y, s, drop_intermediate=False)
    return {"auc": auc, "tpr_at_fpr": {str(f): _tpr_at_fpr(fpr, tpr, f) for f in LOW_FPRS}}


def lira_conf(inputs: Inputs, *, oracles: Sequence[Inputs] | None = None, seed: int = 0) -> dict[str, Any]:
    r"""LiRA-style attacks on φ = :func:`logit_conf` (Carlini et al., S&P'22; §6.6).

    **(a) Single model** (``oracles=None``): the ROC of φ(θ) for ``D_f`` (positive) against all of ``D_test``
    (negative). ``value`` is ``sklearn.metrics.roc_auc_score``; TPR at FPR = 1 % and 0.1 % are read off
    ``roc_curve`` by linear interpolation (at an FPR reached exactly, the top of the vertical step).

    **(b) Offline reference models** (``oracles`` given, at least 8 used): with ``T`` a
    ``default_rng(seed)`` subset of ``D_test`` of size ``min(|D_f|, |D_test|)``, each example i of
    ``D_f ∪ T`` gets a Gaussian fit of φ over the oracles, none of which trained on it,

    .. math:: \mu_i = \mathrm{mean}_k\,\phi_i^{(k)},\quad \sigma_i = \max(\mathrm{std}_k\,\phi_i^{(k)}, 10^{-3})
              \ (\text{ddof}=0),\quad s_i = \Phi\big((\phi_i(\theta) - \mu_i)/\sigma_i\big),

    and ``value`` is the AUC of ``s`` for ``D_f`` against ``T``. Scores are ranked through
    ``scipy.special.log_ndtr`` (monotone in Φ), so that Φ's saturation at 1.0 in float64 creates no false
    ties. An oracle whose logits on ``D_f ∪ T`` are bitwise those of ``θ`` is ``θ`` itself (the retrain
    reference is "a held-out oracle as the target") and is left out of the fit.

    Args:
      inputs: the target model's :class:`SplitLogits` under ``"forget"`` and ``"test"``.
      oracles: for (b), one such mapping per retrain oracle, with the same ids and labels as ``inputs``.
      seed: seed of ``T`` (form b only).

    Returns:
      A record with ``value`` = AUC (0.5 = chance) and ``results = {"auc", "tpr_at_fpr": {"0.01", "0.001"}}``
      (plus ``excluded_oracles`` for b).

    Raises:
      AttackInputError: missing/overlapping splits, an empty ``D_f`` or ``D_test``, an oracle whose ids or
        labels differ from the target's (naming the oracle and split), or fewer than 8 oracles left for (b).
    """
    attack = "lira_conf"
    forget, test = _get_splits(inputs, ("forget", "test"), attack)
    _too_few(attack, 1, forget=len(forget), test=len(test))
    common = dict(
        members=_id_set("forget", forget.ids, len(forget)),
        targets=_id_set("forget", forget.ids, len(forget)),
    )
    if oracles is None:
        roc = _roc_summary(logit_conf(forget.logits, forget.labels), logit_conf(test.logits, test.labels))
        return _record(
            attack, "logit_conf", None,
            form="single_model",
            **common,
            nonmembers=_id_set("test", test.ids, len(test)),
            balance="none (all of D_f vs all of D_test; AUC is insensitive to class sizes)",
            seed=None,
            value=roc["auc"],
            results=roc,
            convention="ROC AUC of phi separating D_f (positive) from D_test (negative), TPR at FPR 1%/0.1% by "
            "linear interpolation; 0.5 = chance, below 0.5 is a miss the other way; the target is the retrain value",
        )

    from scipy import special

    oracles = list(oracles)
    rng = np.random.default_rng(seed)
    t_pos = _subsample(len(test), min(len(forget), len(test)), rng)
    target = np.concatenate([forget.logits, test.logits[t_pos]])
    phi_t = logit_conf(target, np.concatenate([forget.labels, test.labels[t_pos]]))
    phis, excluded = [], []
    for k, o in enumerate(oracles):
        of, ot = _get_splits(o, ("forget", "test"), f"{attack} oracle {k}")
        for split, mine, theirs in (("forget", forget, of), ("test", test, ot)):
            if not np.array_equal(mine.ids, theirs.ids) or not np.array_equal(mine.labels, theirs.labels):
                raise AttackInputError(
                    f"{attack}: oracle {k} split {split!r} has other ids or labels than the target's "
                    f"({len(theirs)} vs {len(mine)} samples, ids hash {ids_hash(theirs.ids)} vs {ids_hash(mine.ids)})."
                )
        o_logits = np.concatenate([of.logits, ot.logits[t_pos]])
        if o_logits.dtype == target.dtype and np.array_equal(o_logits, target):
            excluded.append(k)
            continue
        phis.append(logit_conf(o_logits, np.concatenate([of.labels, ot.labels[t_pos]])))
    if len(phis) < LIRA_MIN_ORACLES:
        raise AttackInputError(
            f"{attack}: the offline form needs at least {LIRA_MIN_ORACLES} reference oracles in the fit, got "
            f"{len(phis)} ({len(oracles)} given, {len(excluded)} left out as identical to the target)."
        )
    phis = np.stack(phis)  # [N, |D_f| + |T|]
    mu, sigma = phis.mean(axis=0), np.maximum(phis.std(axis=0), LIRA_SIGMA_FLOOR)
    log_score = special.log_ndtr((phi_t - mu) / sigma)
    n_f = len(forget)
    roc = _roc_summary(log_score[:n_f], log_score[n_f:])
    roc["excluded_oracles"] = excluded
    return _record(
        attack, "logit_conf", None,
        form="offline_reference",
        **common,
        nonmembers=_id_set("test", test.ids[t_pos], len(test)),
        balance="T = random min(|D_f|, |D_test|) subset of D_test (fixed seed)",
        seed=int(seed),
        reference={"n_oracles": len(phis), "min_oracles": LIRA_MIN_ORACLES, "sigma_floor": LIRA_SIGMA_FLOOR,
                   "fit": "per-example mean and std (ddof=0) of phi over the oracles, all out for D_f and T",
                   "score": "Phi((phi - mu) / sigma), ranked via log_ndtr"},
        value=roc["auc"],
        results=roc,
        convention="ROC AUC of the offline LiRA score separating D_f (positive) from T (negative), TPR at FPR "
        "1%/0.1% by linear interpolation; 0.5 = chance; the target is the retrain value (a held-out oracle)",
    )


ATTACKS: dict[str, Callable[..., Any]] = {
    "lr_loss_cv": lr_loss_cv,
    "svc_entropy": svc_entropy,
    "svc_features": svc_features,
    "lira_conf": lira_conf,
}


# --------------------------------------------------------------------------------------------------------------
# One attack on the three models
# --------------------------------------------------------------------------------------------------------------


def _check_same_samples(models: Mapping[str, Inputs]) -> None:
    """Every model must cover the same splits with the same ids and labels (else the values do not compare)."""
    ref_name = MODEL_NAMES[0]
    ref = models[ref_name]
    for name in MODEL_NAMES[1:]:
        other = models[name]
        if set(other) != set(ref):
            raise AttackInputError(
                f"Models {ref_name!r} and {name!r} cover different splits: {sorted(ref)} vs {sorted(other)}."
            )
        for split in ref:
            a, b = ref[split], other[split]
            if not (isinstance(a, SplitLogits) and isinstance(b, SplitLogits)):
                raise AttackInputError(f"Split {split!r} of every model must be a SplitLogits.")
            if not np.array_equal(a.ids, b.ids):
                only_a, only_b = np.setdiff1d(a.ids, b.ids), np.setdiff1d(b.ids, a.ids)
                raise AttackInputError(
                    f"Split {split!r} has different samples for models {ref_name!r} ({len(a)}) and {name!r} "
                    f"({len(b)}): ids only in {ref_name!r} {errors._preview(only_a)}, only in {name!r} "
                    f"{errors._preview(only_b)}."
                )
            if not np.array_equal(a.labels, b.labels):
                bad = a.ids[a.labels != b.labels]
                raise AttackInputError(
                    f"Split {split!r} has different labels for models {ref_name!r} and {name!r} at ids "
                    f"{errors._preview(bad)}."
                )


def attack_all_models(
    attack: Callable[..., Any], models: Mapping[str, Inputs], **kwargs: Any
) -> dict[str, Any] | list[dict[str, Any]]:
    """Runs ``attack`` with the same arguments and seeds on the unlearned, retrained and original models.

    The attack-set configuration (id sets, seeds, classifier) is identical for the three calls, since the
    models are checked to cover the same samples; only the model-dependent outputs differ.

    Args:
      attack: one of :data:`ATTACKS` (or any function ``attack(inputs, **kwargs)`` returning a record or a
        list of records).
      models: ``{"unlearned": Inputs, "retrain": Inputs, "original": Inputs}``; each maps split names to
        :class:`SplitLogits` with the same ids and labels across the three models.
      **kwargs: passed to every call (e.g. ``seed``, ``balance``, ``oracles``).

    Returns:
      The unlearned model's record (or list of records, for :func:`svc_features`) with ``value_retrain``,
      ``value_original``, ``results_retrain`` and ``results_original`` filled in, plus ``gap = value −
      value_retrain`` and ``abs_gap``.

    Raises:
      AttackInputError: a missing or unknown model name, or splits whose ids or labels differ between
        models (naming the split); whatever ``attack`` raises.
    """
    if not isinstance(models, Mapping) or set(models) != set(MODEL_NAMES):
        got = sorted(models) if isinstance(models, Mapping) else type(models).__name__
        raise AttackInputError(f"models must map exactly {list(MODEL_NAMES)} to their inputs, got {got}.")
    _check_same_samples(models)
    out = {name: attack(models[name], **kwargs) for name in MODEL_NAMES}
    single = isinstance(out["unlearned"], Mapping)
    per_model = {name: [r] if single else list(r) for name, r in out.items()}
    merged = []
    for u, r, o in zip(per_model["unlearned"], per_model["retrain"], per_model["original"], strict=True):
        rec = dict(u)
        rec["value_retrain"], rec["value_original"] = r["value"], o["value"]
        rec["results_retrain"], rec["results_original"] = r.get("results"), o.get("results")
        rec["gap"] = rec["value"] - rec["value_retrain"]
        rec["abs_gap"] = abs(rec["gap"])
        merged.append(rec)
    return merged[0] if single else merged
