"""Atomic, resumable checkpoints with orbax.

A step holds the whole state pytree (weights *and* deletion ledger) plus a JSON ``meta`` record (the
report so far). Orbax writes each step to a temporary directory and renames it when complete, so a
crash mid-save never leaves a half-written step: a rerun resumes from the last complete one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
    """Saves and restores ``(state, meta)`` by integer step under ``directory``.

    Args:
      directory: where steps live (created if missing).
      max_to_keep: keep only the newest steps (``None``: all).
    """

    def __init__(self, directory: str, max_to_keep: int | None = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None``."""
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Writes step ``step`` and waits until it is durable (then swapped in atomically)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, like: PyTree) -> tuple[PyTree, dict]:
        """Restores step ``step`` into the structure, shapes and dtypes of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return out["state"], out["meta"]

    def close(self) -> None:
        self._manager.close()


def restore_latest(directory: str, like: PyTree) -> tuple[PyTree, dict, int]:
    """``(state, meta, step)`` of the newest complete step under ``directory``.

    Raises:
      FileNotFoundError: no complete step there.
    """
    ckpt = Checkpointer(directory, max_to_keep=None)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"No checkpoint under {directory}.")
        state, meta = ckpt.restore(step, like)
    finally:
        ckpt.close()
    return state, meta, step
