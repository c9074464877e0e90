"""Mixed-linear forgetting (ML-Forgetting, Golatkar et al., CVPR 2021) on the method contract.

Split by job:

* :mod:`.method`: :class:`MixedLinear` (the contract: init, forget, predict, retrain, hooks) and its state;
* :mod:`.config`: the config section's defaults and validation;
* :mod:`.problem`: the linearized least-squares problem on the mesh and its jitted full-pass kernels;
* :mod:`.direct`: the direct path (solver choice, factorisation, the stream state and the exact removal);
* :mod:`.paths`: how a request is solved on each path, and the Newton-CG / reference solves;
* :mod:`.sgd`: the paper's SGD (training recipe and forget solver);
* :mod:`.core`: core training (one core, or vmapped populations);
* :mod:`.cache`: the content-keyed caches, and why each is safe;
* :mod:`.harness`: the answers to the harness hooks (baselines, warm-up, readouts, profile, studies).

The shared numerics are :mod:`jaxforget.solvers` (Newton-CG, refinement, Nyström) and :mod:`jaxforget.woodbury`
(Cholesky, Woodbury / Schur removal and their stream state).
"""

from jaxforget.methods.mixed_linear.method import (
    DIRECT_CHECKS,
    MixedLinear,
    MixedLinearState,
    certificate_kl,
    default_method_config,
)

__all__ = ["DIRECT_CHECKS", "MixedLinear", "MixedLinearState", "certificate_kl", "default_method_config"]
