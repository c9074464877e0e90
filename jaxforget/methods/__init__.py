"""The method registry: every unlearning method and baseline under one name, all on the contract of
:mod:`jaxforget.methods.base`.

Adding a method touches its own module, its config file and one line of :data:`METHODS`.

Examples:
  >>> sorted(METHODS)  # doctest: +NORMALIZE_WHITESPACE
  ['certified_removal', 'finetune', 'fisher_forgetting', 'mixed_linear', 'neggrad', 'random_label', 'retrain', 'safe',
   'sisa', 'ssse']
  >>> get_method("mixed_linear").name
  'mixed_linear'
"""

from __future__ import annotations

import jax
import ml_collections

from jaxforget import data as data_lib
from jaxforget import mesh as mesh_lib
from jaxforget import models
from jaxforget.methods import base
from jaxforget.methods.base import ForgetInfo, Ledger, Method
from jaxforget.methods.baselines import (
    CertifiedRemoval,
    CertifiedRemovalState,
    ClassifierMethod,
    ClassifierState,
    Finetune,
    FisherForgetting,
    NegGrad,
    RandomLabel,
    Retrain,
)
from jaxforget.methods.mixed_linear import MixedLinear, MixedLinearState
from jaxforget.methods.safe import Safe, SafeState, Sisa
from jaxforget.methods.ssse import Ssse, SsseState

#: name -> method class.
METHODS: dict[str, type[Method]] = {
    "mixed_linear": MixedLinear,
    "retrain": Retrain,
    "finetune": Finetune,
    "neggrad": NegGrad,
    "random_label": RandomLabel,
    "safe": Safe,
    "sisa": Sisa,
    "ssse": Ssse,
    "fisher_forgetting": FisherForgetting,
    "certified_removal": CertifiedRemoval,
}


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``; ``KeyError`` lists the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"Unknown method {name!r}; valid: {', '.join(sorted(METHODS))}.") from None


def build(config: ml_collections.ConfigDict, *, splits: data_lib.Splits | None = None,
          mesh: jax.sharding.Mesh | None = None) -> Method:
    """The method a job config describes: ``config.method.name`` on ``config.data`` with ``config.model``.

    Args:
      config: a job config with ``data``, ``model`` and ``method`` sections (and ``num_devices``).
      splits: the dataset split, if already loaded (else from ``config.data``).
      mesh: the device mesh (else ``config.num_devices`` devices, 0 meaning all).

    Raises:
      KeyError: unknown method name (the valid ones are listed). ConfigError: an invalid method config.
    """
    cls = get_method(config.method.name)
    splits = data_lib.get_splits(config.data) if splits is None else splits
    mesh = mesh_lib.make_mesh(config.num_devices or None) if mesh is None else mesh
    return cls(models.get_model(config.model), splits, config.method, mesh=mesh)


__all__ = ["METHODS", "CertifiedRemoval", "CertifiedRemovalState", "ClassifierMethod", "ClassifierState",
           "Finetune", "FisherForgetting", "ForgetInfo", "Ledger", "Method",
           "MixedLinear", "MixedLinearState", "NegGrad", "RandomLabel", "Retrain", "Safe", "SafeState", "Sisa", "Ssse",
           "SsseState", "base",
           "build", "get_method"]
