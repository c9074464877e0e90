"""jaxforget: forget chosen training samples from JAX/Flax image classifiers, judged against retraining.

Flat public API; the modules are importable directly too (``from jaxforget import kernels``). Methods live in
:mod:`jaxforget.methods` behind one contract and a registry: ``jaxforget.get_method(name)``.
"""

from jaxforget import (
    checkpoint,
    compat,
    config,
    data,
    distributional,
    errors,
    evaluate,
    experiment,
    kernels,
    ledger,
    mesh,
    methods,
    mia,
    models,
    oracle,
    report,
    solvers,
    timing,
    train,
    woodbury,
    workflow,
)
from jaxforget.errors import (
    AlreadyForgottenError,
    CGNotConvergedError,
    ConfigError,
    CoreIdsError,
    DirectSolveError,
    DuplicateIdsError,
    EmptyRequestError,
    NonFiniteError,
    ShapeDtypeError,
    UnknownIdsError,
)
from jaxforget.methods import METHODS, ForgetInfo, Ledger, Method, build, get_method
from jaxforget.methods.mixed_linear import MixedLinear, MixedLinearState, default_method_config

__version__ = "0.2.0"

__all__ = [
    "METHODS", "AlreadyForgottenError", "CGNotConvergedError", "ConfigError", "CoreIdsError", "DirectSolveError",
    "DuplicateIdsError", "EmptyRequestError", "ForgetInfo", "Ledger", "Method", "MixedLinear", "MixedLinearState",
    "NonFiniteError", "ShapeDtypeError", "UnknownIdsError", "build", "checkpoint", "compat", "config", "data",
    "default_method_config", "distributional", "errors", "evaluate", "experiment", "get_method", "kernels", "ledger",
    "mesh", "methods", "mia", "models", "oracle", "report", "solvers", "timing", "train", "woodbury",
    "workflow",
]
