"""Atomic, verified, resumable checkpoints with orbax, and a lock per workdir.

A step holds the whole state pytree (weights *and* deletion ledger) plus a JSON ``meta`` record (the report so far).
Orbax writes each step to a temporary directory and renames it when complete; then a **manifest** of the step, the
SHA-256 of every file in it, is written beside it (``.manifests/<step>.json``, written whole and renamed). The
manifest is the commit: a step without one is an interrupted save, never restored (the next save of that step
replaces it). Restoring checks every file against the manifest first and raises :class:`CorruptCheckpointError`
naming the step and the file, so a damaged or edited checkpoint is never loaded as a silently different model.

Older steps are deleted only after the new step's manifest is in place (``max_to_keep``), so a crash at any point
leaves a complete step to resume from. With ``max_to_keep=1`` no step older than the last committed one survives:
after a deletion request, no model that still holds the forgotten samples is left on disk.

Examples:
  >>> import tempfile, jax.numpy as jnp
  >>> directory = tempfile.mkdtemp()
  >>> with WorkdirLock(directory):
  ...     ckpt = Checkpointer(directory, max_to_keep=1)
  ...     ckpt.save(0, {"w": jnp.ones(3)}, {"note": "trained"})
  ...     ckpt.save(1, {"w": jnp.zeros(3)}, {"note": "forgot"})
  ...     state, meta = ckpt.restore(1, {"w": jnp.ones(3)})
  ...     ckpt.close()
  >>> ckpt.all_steps(), meta["note"], state["w"].tolist()
  ([1], 'forgot', [0.0, 0.0, 0.0])
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxforget import errors

PyTree = Any

MANIFESTS = ".manifests"
MANIFEST_FORMAT = "jaxforget.checkpoint.manifest/1"
LOCK_FILE = ".jaxforget.lock"


class CorruptCheckpointError(errors.JaxForgetError, RuntimeError):
    """A checkpoint step whose files do not match its manifest (damaged, edited, or copied from another step)."""


class WorkdirLockedError(errors.JaxForgetError, RuntimeError):
    """Another job holds the workdir (two writers would overwrite each other's steps)."""


def file_sha256(path: str) -> str:
    """SHA-256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_files(directory: str) -> dict[str, str]:
    """``{relative path ('/'-separated): sha256}`` of every file under ``directory``, sorted (checkpoint manifests
    and the oracle cache's sidecars)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory).replace(os.sep, "/")] = file_sha256(path)
    return out


def write_json_atomic(obj: Any, path: str) -> None:
    """Writes JSON to a temporary file, flushes it to disk and renames it over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores ``(state, meta)`` by integer step under ``directory``, each step verified on restore.

    Args:
      directory: where steps live (created if missing).
      max_to_keep: keep only the newest committed steps (``None``: all).
    """

    def __init__(self, directory: str, max_to_keep: int | None = 3):
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        # Retention is ours: orbax would delete old steps before this step's manifest commits it.
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        os.makedirs(os.path.join(self.directory, MANIFESTS), exist_ok=True)

    def _manifest_path(self, step: int) -> str:
        return os.path.join(self.directory, MANIFESTS, f"{int(step)}.json")

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def all_steps(self) -> list[int]:
        """Committed steps (a step directory with its manifest), oldest first."""
        return sorted(s for s in self._manager.all_steps() if os.path.exists(self._manifest_path(s)))

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Writes step ``step``, commits it with its manifest, then drops steps beyond ``max_to_keep``."""
        step = int(step)
        if os.path.exists(self._manifest_path(step)):
            os.remove(self._manifest_path(step))  # uncommit first: the step is about to be rewritten
        if step in self._manager.all_steps():
            self._manager.delete(step)  # an interrupted save's files, or the uncommitted step just above
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()
        write_json_atomic({"format": MANIFEST_FORMAT, "step": step, "files": tree_files(self._step_dir(step))},
                          self._manifest_path(step))
        self._prune(keep_from=step)

    def prune(self, keep: int) -> None:
        """Deletes every step (committed or not) but ``keep`` (a workdir settling after an interrupted job)."""
        self._delete_all_but({keep})

    def _prune(self, keep_from: int) -> None:
        """Deletes committed steps beyond ``max_to_keep`` and every uncommitted step but ``keep_from``'s."""
        committed = self.all_steps()
        self._delete_all_but(set(committed if self.max_to_keep is None else committed[-self.max_to_keep:])
                             | {keep_from})

    def _delete_all_but(self, keep: set[int]) -> None:
        for s in self._manager.all_steps():
            if s not in keep:
                if os.path.exists(self._manifest_path(s)):
                    os.remove(self._manifest_path(s))  # uncommitted before its files go
                self._manager.delete(s)
        self._manager.reload()

    def verify(self, step: int) -> dict:
        """Checks step ``step``'s files against its manifest; returns the manifest.

        Raises:
          CorruptCheckpointError: no or unreadable manifest, another step's manifest, or a missing, extra or changed
            file (named).
        """
        step = int(step)
        where = f"checkpoint step {step} in {self.directory}"
        path = self._manifest_path(step)
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{where} has no manifest: it was never committed.") from None
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{where}: its manifest {path} is unreadable ({e}).") from e
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(
                manifest.get("files"), dict):
            raise CorruptCheckpointError(f"{where}: {path} is not a jaxforget checkpoint manifest.")
        if manifest.get("step") != step:
            raise CorruptCheckpointError(f"{where}: its manifest belongs to step {manifest.get('step')!r} (a step "
                                         "copied or renamed from another).")
        if not os.path.isdir(self._step_dir(step)):
            raise CorruptCheckpointError(f"{where}: the step directory is missing.")
        files = tree_files(self._step_dir(step))
        for name in files:
            if os.path.islink(os.path.join(self._step_dir(step), name)):
                raise CorruptCheckpointError(f"{where}: file {name} is a symbolic link; a step holds plain files only.")
        expected = manifest["files"]
        for name in sorted(set(expected) | set(files)):
            if name not in files:
                raise CorruptCheckpointError(f"{where}: file {name} is missing.")
            if name not in expected:
                raise CorruptCheckpointError(f"{where}: file {name} is not part of the saved step.")
            if files[name] != expected[name]:
                raise CorruptCheckpointError(f"{where}: file {name} changed since it was saved (SHA-256 "
                                             f"{files[name][:12]}, saved {str(expected[name])[:12]}).")
        return manifest

    def restore(self, step: int, like: PyTree) -> tuple[PyTree, dict]:
        """Restores step ``step`` into the structure, shapes and dtypes of ``like``, after :meth:`verify`."""
        self.verify(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        except (ValueError, KeyError, TypeError) as e:  # verified bytes that do not fit ``like``: another state
            raise errors.ShapeDtypeError(f"checkpoint step {step} in {self.directory} does not fit the expected "
                                         f"state: {type(e).__name__}: {e}") from e
        return out["state"], out["meta"]

    def close(self) -> None:
        self._manager.close()


def restore_latest(directory: str, like: PyTree) -> tuple[PyTree, dict, int]:
    """``(state, meta, step)`` of the newest committed step under ``directory``, verified.

    Raises:
      FileNotFoundError: no committed step there.
      CorruptCheckpointError: the newest step does not match its manifest.
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


class WorkdirLock(contextlib.AbstractContextManager):
    """An exclusive lock on a workdir for one job (``flock`` on ``<workdir>/.jaxforget.lock``).

    The operating system releases it when the process ends, however it ends, so a killed job never leaves a stale
    lock. The file records the holder's pid and command for the error message.

    Raises:
      WorkdirLockedError: another process holds it.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self._file = None

    def __enter__(self) -> WorkdirLock:
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, LOCK_FILE)
        f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open while locked)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise WorkdirLockedError(f"{self.workdir} is in use by another job ({holder}); wait for it to finish or "
                                     "use another --workdir.") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def remove_tree(path: str) -> None:
    """Removes a directory tree if it exists (caches that depend on forgotten samples)."""
    if os.path.isdir(path):
        shutil.rmtree(path)
