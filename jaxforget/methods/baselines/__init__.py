"""Baselines on a general network (every parameter may change), each a method on the contract.

* :mod:`.classifier`: the classifier recipe (its original and its gold-standard retrain) and the baselines that only
  say how a request changes the weights: ``retrain``, ``finetune``, ``neggrad`` (NegGrad+), ``random_label``;
* :mod:`.fisher_forgetting`: ``fisher_forgetting``, Gaussian noise shaped by the inverse diagonal Fisher of ``D_r``
  (Golatkar, Achille & Soatto, CVPR 2020);
* :mod:`.certified_removal`: ``certified_removal``, the Newton removal step of L2-regularised logistic regression with
  its residual bound and optional objective perturbation (Guo et al., ICML 2020): the exact reference SSSE equals on
  convex models.
"""

from jaxforget.methods.baselines.certified_removal import CertifiedRemoval, CertifiedRemovalState
from jaxforget.methods.baselines.classifier import (
                                                    SOLVERS,
                                                    ClassifierMethod,
                                                    ClassifierState,
                                                    Finetune,
                                                    NegGrad,
                                                    RandomLabel,
                                                    Retrain,
                                                    cycled_plan,
                                                    recipe_config,
                                                    recipe_key,
)
from jaxforget.methods.baselines.fisher_forgetting import FisherForgetting

__all__ = ["SOLVERS", "CertifiedRemoval", "CertifiedRemovalState", "ClassifierMethod", "ClassifierState", "Finetune",
           "FisherForgetting", "NegGrad", "RandomLabel", "Retrain", "cycled_plan", "recipe_config", "recipe_key"]
