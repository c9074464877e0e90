"""Named exceptions and host-side input checks.

Every error names the problem and the offending values, so that a user knows what to fix. Checks run
eagerly at API boundaries, before any state is touched: a failed request leaves the state unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np


class JaxForgetError(Exception):
    """Base class of all jaxforget errors."""


class ForgetRequestError(JaxForgetError, ValueError):
    """A forget request that cannot be honoured as given."""


class EmptyRequestError(ForgetRequestError):
    """A forget request with no ids."""


class DuplicateIdsError(ForgetRequestError):
    """The same id appears more than once in one request."""


class UnknownIdsError(ForgetRequestError, KeyError):
    """Ids that are not in the training set."""

    def __str__(self) -> str:  # KeyError would otherwise print the message's repr
        return str(self.args[0]) if self.args else ""


class AlreadyForgottenError(ForgetRequestError):
    """Ids that an earlier request already removed."""


class CoreIdsError(ForgetRequestError):
    """Ids of core samples, which the method cannot forget without retraining the core."""


class ShapeDtypeError(JaxForgetError, ValueError):
    """An array whose shape or dtype does not match what the model or state expects."""


class NonFiniteError(JaxForgetError, FloatingPointError):
    """NaN or Inf in inputs, weights, gradients or solver output."""


class CGNotConvergedError(JaxForgetError, ArithmeticError):
    """The conjugate-gradient solver did not reach its tolerance within its iteration budget."""


class DirectSolveError(JaxForgetError, ArithmeticError):
    """A direct (factorised) solve failed: the matrix was not numerically positive definite, or the
    solution's residual missed the tolerance."""


class CurvatureError(JaxForgetError, ArithmeticError):
    """A stored curvature cannot serve a request (e.g. a downdate that left it not positive definite)."""


class ConfigError(JaxForgetError, ValueError):
    """An invalid or inconsistent configuration value."""


class StateMismatchError(JaxForgetError, ValueError):
    """A state used with a method built on other data or another model config than the state was made on."""


def _preview(values: Iterable, limit: int = 10) -> str:
    values = list(values)
    head = ", ".join(str(v) for v in values[:limit])
    more = f", ... ({len(values)} in total)" if len(values) > limit else ""
    return f"[{head}{more}]"


def check_finite(tree, what: str) -> None:
    """Raises :class:`NonFiniteError` naming ``what`` and the first non-finite leaf.

    Args:
      tree: a pytree of arrays (host or device).
      what: a human-readable name used in the message, e.g. ``"inputs x"``.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    for path, leaf in leaves:
        arr = np.asarray(leaf)
        if not np.issubdtype(arr.dtype, np.inexact):
            continue
        bad = ~np.isfinite(arr)
        if bad.any():
            name = jax.tree_util.keystr(path) or "(root)"
            raise NonFiniteError(
                f"{what} contains {int(bad.sum())} non-finite value(s) (NaN or Inf) in leaf {name} "
                f"of shape {arr.shape}."
            )


def check_like(tree, reference, what: str) -> None:
    """Raises :class:`ShapeDtypeError` unless ``tree`` has the structure, shapes and dtypes of ``reference``."""
    ref_struct = jax.tree.structure(reference)
    struct = jax.tree.structure(tree)
    if struct != ref_struct:
        raise ShapeDtypeError(f"{what} has tree structure {struct}, expected {ref_struct}.")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(reference), strict=True):
        if np.shape(a) != np.shape(b) or jax.numpy.result_type(a) != jax.numpy.result_type(b):
            raise ShapeDtypeError(
                f"{what} leaf {jax.tree_util.keystr(path)} has shape {np.shape(a)} and dtype "
                f"{jax.numpy.result_type(a)}, expected {np.shape(b)} and {jax.numpy.result_type(b)}."
            )


def check_request_ids(
    ids,
    *,
    known_ids: np.ndarray,
    core_ids: np.ndarray,
    forgotten_ids: np.ndarray,
) -> np.ndarray:
    """Validates one forget request and returns its ids as a sorted int64 array.

    Args:
      ids: the requested sample ids, any integer sequence ``[k]``.
      known_ids: ``[n]`` ids of the training set the model was trained on.
      core_ids: ids of core samples (never forgettable).
      forgotten_ids: ids removed by earlier requests.

    Raises:
      EmptyRequestError, ShapeDtypeError, DuplicateIdsError, UnknownIdsError, CoreIdsError,
      AlreadyForgottenError: in that order of checking.
    """
    arr = np.asarray(ids)
    if arr.size == 0:
        raise EmptyRequestError("The forget request is empty: pass at least one sample id.")
    if arr.ndim != 1:
        raise ShapeDtypeError(f"Forget ids must be a 1-D sequence of integers, got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ShapeDtypeError(f"Forget ids must be integers, got dtype {arr.dtype}.")
    arr = arr.astype(np.int64)
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise DuplicateIdsError(f"Duplicate ids in the forget request: {_preview(uniq[counts > 1])}.")
    unknown = np.setdiff1d(uniq, known_ids)
    if unknown.size:
        raise UnknownIdsError(f"Unknown sample ids (not in the training set): {_preview(unknown)}.")
    core = np.intersect1d(uniq, core_ids)
    if core.size:
        raise CoreIdsError(
            f"Ids {_preview(core)} belong to the core set, which cannot be forgotten without retraining "
            "the core model; only user data can be forgotten."
        )
    again = np.intersect1d(uniq, forgotten_ids)
    if again.size:
        raise AlreadyForgottenError(f"Ids already forgotten by an earlier request: {_preview(again)}.")
    return uniq
