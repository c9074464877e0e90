"""Content keys of pytrees, for caches that only save time (keyed by content, never by object identity alone).

Examples:
  >>> a = {"w": np.ones(3, np.float32)}
  >>> fingerprint(a) == fingerprint({"w": np.ones(3, np.float32)}), fingerprint(a) == fingerprint({"w": -a["w"]})
  (True, False)
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

PyTree = Any


def fingerprint(tree: PyTree) -> str:
    """A content key of a pytree: a hash of its structure and every leaf's dtype, shape and bytes (host copy)."""
    digest = hashlib.blake2b(str(jax.tree.structure(tree)).encode(), digest_size=16)
    for leaf in jax.tree.leaves(tree):
        arr = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(arr.view(np.uint8).reshape(-1).data)
    return digest.hexdigest()


class Memo:
    """:func:`fingerprint`, remembered for the last tree whose leaves are the same immutable ``jax.Array`` objects:
    a request that passes the same state's arrays again pays no host copy and no hash.

    Examples:
      >>> memo = Memo()
      >>> tree = {"w": jax.numpy.ones(3)}
      >>> memo(tree) == fingerprint(tree) == memo(tree)
      True
    """

    def __init__(self):
        self._last: tuple = (None, None)

    def __call__(self, tree: PyTree) -> str:
        leaves = jax.tree.leaves(tree)
        last_leaves, digest = self._last
        if (last_leaves is not None and len(last_leaves) == len(leaves)
                and all(a is b for a, b in zip(leaves, last_leaves, strict=True))):
            return digest
        digest = fingerprint(tree)
        if all(isinstance(a, jax.Array) for a in leaves):  # immutable: the same objects hold the same content
            self._last = (leaves, digest)
        return digest
