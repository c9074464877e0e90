"""The deletion ledger: which training samples each forget request removed.

The ledger is one int32 array over the training set, ``removed_by[i] = k`` if request ``k`` (1-based)
removed sample ``i`` and ``0`` if it is retained. It lives inside each method's state pytree, so it is
saved in the same checkpoint step as the weights and the two can never diverge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxforget import errors


def new_ledger(n: int) -> jnp.ndarray:
    """An empty ledger for ``n`` training samples: ``int32[n]`` zeros."""
    return jnp.zeros((n,), jnp.int32)


def validate(removed_by, train_ids: np.ndarray, core_ids: np.ndarray, ids) -> np.ndarray:
    """Checks a request against the training set and the ledger; returns the samples' positions.

    Args:
      removed_by: ``int32[n]`` ledger.
      train_ids: ``int64[n]`` sorted ids of the training set (ledger order).
      core_ids: ids that can never be forgotten.
      ids: the requested ids.

    Returns:
      ``int64[k]`` positions of the requested samples in ``train_ids``.

    Raises:
      EmptyRequestError, ShapeDtypeError, DuplicateIdsError, UnknownIdsError, CoreIdsError,
      AlreadyForgottenError.

    Examples:
      >>> validate(np.zeros(4, np.int32), np.arange(4), np.array([0]), [3, 2]).tolist()
      [2, 3]
    """
    removed_by = np.asarray(removed_by)
    forgotten = train_ids[removed_by > 0]
    uniq = errors.check_request_ids(ids, known_ids=train_ids, core_ids=core_ids, forgotten_ids=forgotten)
    return np.searchsorted(train_ids, uniq)


def record(removed_by, positions: np.ndarray, request: int) -> jnp.ndarray:
    """A new ledger with ``positions`` marked as removed by request number ``request`` (≥ 1)."""
    out = np.array(removed_by, dtype=np.int32)  # a host copy: a device scatter costs more than the whole update
    out[np.asarray(positions, dtype=np.int64)] = request
    return jax.device_put(out)  # explicit: requests run under a host-to-device transfer guard


def retain_mask(removed_by) -> np.ndarray:
    """``bool[n]``: True for retained samples."""
    return np.asarray(removed_by) == 0


def forgotten_ids(removed_by, train_ids: np.ndarray, request: int | None = None) -> np.ndarray:
    """Ids removed so far (or by one request when ``request`` is given)."""
    removed_by = np.asarray(removed_by)
    sel = removed_by > 0 if request is None else removed_by == request
    return train_ids[sel]
