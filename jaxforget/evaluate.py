"""Readouts that compare a forgetting method with the retrain-from-scratch oracle.

Each readout is a small pure function on logits or weights; :func:`compare` applies them to named
sample sets (``forget``, ``retain``, ``test``) and puts the oracle's own value beside the method's,
because a readout only means something next to the retrain value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxforget import errors, kernels

PyTree = Any


def accuracy(logits, labels) -> float:
    """Top-1 accuracy of ``logits [n, K]`` against integer ``labels [n]``.

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


def activation_distance(logits, reference_logits) -> float:
    r"""Mean L1 distance between softmax outputs, :math:`\frac1n\sum_i \lVert p(x_i) - p^{ref}(x_i)\rVert_1`.

    Golatkar et al. (Mixed-Privacy Forgetting, §5): 0 for a model compared with itself.

    Examples:
      >>> activation_distance(np.zeros((3, 2)), np.zeros((3, 2)))
      0.0
    """
    a, b = np.asarray(logits, np.float64), np.asarray(reference_logits, np.float64)
    if a.shape != b.shape:
        raise errors.ShapeDtypeError(f"activation_distance: shapes {a.shape} and {b.shape} differ.")
    if len(a) == 0:
        return float("nan")
    return float(np.mean(np.sum(np.abs(_softmax(a) - _softmax(b)), axis=1)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Host float64 softmax over the last axis (readouts never depend on the device's precision)."""
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def weight_distance(weights: PyTree, reference: PyTree) -> dict[str, float]:
    """``{"l2": ‖w − w_ref‖, "relative": ‖w − w_ref‖/‖w_ref‖}`` computed in float64 on the host."""
    a = np.asarray(kernels.tree_ravel(jax.tree.map(lambda t: np.asarray(t, np.float64), weights)))
    b = np.asarray(kernels.tree_ravel(jax.tree.map(lambda t: np.asarray(t, np.float64), reference)))
    if a.shape != b.shape:
        raise errors.ShapeDtypeError(f"weight_distance: {a.size} vs {b.size} parameters.")
    dist = float(np.linalg.norm(a - b))
    ref = float(np.linalg.norm(b))
    return {"l2": dist, "relative": dist / ref if ref > 0 else float("inf")}


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
    """
    if set(logits) != set(oracle_logits) or set(logits) != set(labels):
        raise errors.ShapeDtypeError("compare: method, oracle and labels must cover the same sets.")
    return {
        name: {
            "accuracy": accuracy(logits[name], labels[name]),
            "oracle_accuracy": accuracy(oracle_logits[name], labels[name]),
            "activation_distance": activation_distance(logits[name], oracle_logits[name]),
        }
        for name in logits
    }


def time_ratio(method_seconds: float, retrain_seconds: float) -> float:
    """``method / retrain`` wall time; the unlearning challenge's efficiency line is 0.2."""
    return float(method_seconds) / float(retrain_seconds) if retrain_seconds > 0 else float("inf")
