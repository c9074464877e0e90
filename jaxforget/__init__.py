"""jaxforget: forget chosen training samples from JAX/Flax image classifiers, judged against retraining.

Flat public API; the modules are importable directly too (``from jaxforget import kernels``).
"""

from jaxforget import (
    checkpoint,
    compat,
    data,
    distributional,
    errors,
    evaluate,
    experiment,
    kernels,
    ledger,
    mesh,
    mia,
    mixed_linear,
    models,
    oracle,
    report,
    train,
)
from jaxforget.errors import (
    AlreadyForgottenError,
    CGNotConvergedError,
    CoreIdsError,
    DirectSolveError,
    DuplicateIdsError,
    EmptyRequestError,
    NonFiniteError,
    ShapeDtypeError,
    UnknownIdsError,
)
from jaxforget.mixed_linear import MixedLinear, MixedLinearState, default_method_config

__version__ = "0.1.0"

# The method registry: name -> method class with init / forget / predict. Later methods add one entry.
METHODS = {"mixed_linear": MixedLinear}


def get_method(name: str):
    """The method class registered under ``name``; ``KeyError`` lists the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"Unknown method {name!r}; valid: {', '.join(sorted(METHODS))}.") from None


__all__ = [
    "METHODS", "AlreadyForgottenError", "CGNotConvergedError", "CoreIdsError", "DirectSolveError", "DuplicateIdsError",
    "EmptyRequestError", "MixedLinear", "MixedLinearState", "NonFiniteError", "ShapeDtypeError", "UnknownIdsError",
    "checkpoint", "compat", "data", "default_method_config", "distributional", "errors", "evaluate", "experiment",
    "get_method", "kernels", "ledger", "mesh", "mia", "mixed_linear", "models", "oracle", "report", "train",
]
