"""SSSE, single-step sample erasure, on the method contract.

* :mod:`.method`: :class:`Ssse` (train, forget, retrain) and its state;
* :mod:`.curvature`: the per-sample curvature terms (Gauss-Newton, empirical Fisher, Hessian), the structures that
  hold them (dense, block-diagonal, Woodbury, Sherman–Morrison inverse, matrix-free) and the solves.
"""

from jaxforget.methods.ssse.method import Ssse, SsseState, default_config, erase_step

__all__ = ["Ssse", "SsseState", "default_config", "erase_step"]
