"""What a mixed-linear object remembers between calls: every entry keyed by content, and why each is safe.

The state (:class:`~jaxforget.methods.mixed_linear.method.MixedLinearState`) holds everything a request needs; a
:class:`SolverCache` only avoids recomputing. Entries are keyed by a fingerprint of the core's leaves
(:meth:`~jaxforget.methods.mixed_linear.problem.LinearizedProblem.fingerprint`), never by object identity, and
one core is held at a time (the matrices can be large).

* **Time-only** (a miss recomputes exactly what a hit returns): the solver choice, the direct factorisation, the
  Nyström preconditioner, and ``β = λ_max`` of the full-data system. The factorisation's build-time decisions
  follow the config and the planned stream (``reserve_capacity``); ``direct_check="auto"`` decides by timing, once: the
  state records the decision (``MixedLinearState.direct_check``) and a factor for that state is built with it.
* **The direct path's stream** (:class:`~jaxforget.methods.mixed_linear.direct.DirectStream`): the dual path's
  removal rows or the primal path's running inverse. Its contents change results at rounding level, so it is
  keyed by the core *and* the ledger it served, and a miss rebuilds it by replaying the ledger request by request
  (:func:`~jaxforget.methods.mixed_linear.direct.advance_stream`): a fresh object, e.g. after a restore, forgets
  the next request bit for bit like the live one that served the whole stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxforget import solvers
from jaxforget.methods.mixed_linear import direct
from jaxforget.methods.mixed_linear.problem import LinearizedProblem

PyTree = Any


class SolverCache:
    """Content-keyed solver state of one mixed-linear object (see the module docstring).

    Args:
      problem: the linearized problem (fingerprints, kernels).
      config: the method config.
    """

    def __init__(self, problem: LinearizedProblem, config: ml_collections.ConfigDict):
        self.problem, self.config = problem, config
        self.kernels = direct.DirectKernels(problem)
        #: Samples a planned stream removes (``reserve_capacity``): the dual buffer's width and the explicit-inverse
        #: decision follow it.
        self.capacity = 0
        self.preconditioners = solvers.PreconditionerCache()
        self._choice: dict = {}  # {"key": core fingerprint, "choice": SolverChoice}
        self._factor: dict = {}  # {"key": core fingerprint, "factor": DirectFactor, "stream": DirectStream | None}
        self._beta: dict = {}  # {"key": core fingerprint, "beta": float}
        self._spare_rows = None  # a dropped dual buffer whose memory the next stream reuses

    def choice(self, core: PyTree) -> direct.SolverChoice:
        """:func:`.direct.choose_solver` for this core."""
        key = self.problem.fingerprint(core)
        if self._choice.get("key") != key:
            num_params = optax.tree.size(self.problem.split(core)[0])
            num_rows = self.problem.num_train * self.problem.num_classes
            self._choice = {"key": key, "choice": direct.choose_solver(self.config, num_params, num_rows)}
        return self._choice["choice"]

    def factor(self, core: PyTree, check: str | None = None) -> direct.DirectFactor:
        """:func:`.direct.build_factor` for this core, built once; ``check`` pins the primal path's request check
        (a state's recorded choice) instead of ``config.direct_check``."""
        key = self.problem.fingerprint(core)
        held = self._factor.get("factor") if self._factor.get("key") == key else None
        if held is None or (check is not None and held.space == "primal" and held.check != check):
            self._factor = {}
            planned = self.capacity * self.problem.num_classes
            factor = direct.build_factor(self.problem, self.kernels, core, self.choice(core), self.config,
                                         planned_rows=planned, check=check)
            self._factor = {"key": key, "factor": factor, "stream": None}
        return self._factor["factor"]

    def held_factor(self, core: PyTree) -> direct.DirectFactor | None:
        """The factor held for this core, if one was built (never builds)."""
        return self._factor.get("factor") if self._factor.get("key") == self.problem.fingerprint(core) else None

    def stream(self, core: PyTree, removed_by) -> direct.DirectStream:
        """The stream state after serving the ledger ``removed_by`` on this core: the held one if it served
        exactly that, else the held one continued (when it served the ledger's first requests) or a replay."""
        factor = self.factor(core)
        stream = self._factor.pop("stream", None)  # consumed: its buffers are donated to the update
        if stream is None:
            stream = direct.start_stream(self.kernels, factor, self.problem.num_train, self._spare_rows)
            self._spare_rows = None
        stream = direct.advance_stream(self.problem, self.kernels, factor, core, stream, removed_by,
                                       capacity=self.capacity)
        self._factor["stream"] = stream
        return stream

    def clear_stream(self) -> None:
        """Drops the stream state (the next request replays its ledger); a dual buffer's memory is kept."""
        stream = self._factor.get("stream")
        if stream is not None and stream.dual is not None:
            self._spare_rows = stream.dual.rows
        if self._factor:
            self._factor["stream"] = None

    def preconditioner(self, core: PyTree, dtype, core_rows: np.ndarray) -> solvers.Nystrom | None:
        """The rank-``nystrom_rank`` Nyström sketch of the Gauss-Newton term over ``core_rows`` (``bool[n]``) in
        ``dtype`` (``None`` without a preconditioner)."""
        if self.config.preconditioner == "none":
            return None
        pb = self.problem

        def build():
            lin, fix = pb.split_as(core, dtype)
            c = pb.row_weights(core_rows, dtype)
            return pb.nystrom(lin, fix, pb.data(dtype)[0], c, int(self.config.nystrom_rank))

        return self.preconditioners.get(pb.fingerprint(core), jnp.dtype(dtype).name, build)

    def beta(self, core: PyTree, compute: Callable[[], float]) -> float:
        """``λ_max`` of the full-data system on this core, computed once by ``compute()``."""
        key = self.problem.fingerprint(core)
        if self._beta.get("key") != key:
            self._beta = {"key": key, "beta": float(compute())}
        return self._beta["beta"]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: ``factor`` (direct: the factor or explicit inverse, solution and right-hand side),
        ``removal`` (the stream: dual removal rows, or the primal running inverse) and ``preconditioner``."""
        factor, stream = self._factor.get("factor"), self._factor.get("stream")
        removal = [*(stream.arrays() if stream is not None else []), self._spare_rows]
        held = [factor.chol, factor.inverse, factor.solution, factor.targets, factor.gram] if factor else []
        size = lambda tree: int(sum(getattr(a, "nbytes", 0) for a in jax.tree.leaves(tree)))
        return {"factor": size(held), "removal": size([a for a in removal if a is not None]),
                "preconditioner": size(self.preconditioners.arrays())}


__all__ = ["SolverCache"]
