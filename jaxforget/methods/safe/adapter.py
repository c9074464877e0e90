r"""The adapters a SAFE node trains on frozen backbone features (spec ``safe.md`` §4).

* :class:`LinearHead`: ``logits = Dense_C(flatten(z))`` on a feature vector (or any feature map, flattened).
* :class:`CrossAttentionAdapter` (InCA, reconstructed): ``m`` learnable queries attend to the LayerNorm'd token map
  ``Z ∈ R^{T×D}`` of one backbone layer, with a learnable positional embedding (a CNN's token map carries no
  position otherwise):

  .. math::  Z_n = \mathrm{LN}(Z) + E_{pos}, \quad H = \mathrm{MHA}(q, K = Z_n W_K, V = Z_n W_V)\, W_O \in
             \mathbb{R}^{m\times D}, \quad \text{logits} = \mathrm{Dense}_C(\mathrm{LN}(H).\mathrm{reshape}(mD)).

  ``4D²`` projection parameters; queries and the positional embedding start ``N(0, 0.02²)``, the head at zero.

Both take features ``[batch, …]`` and return logits ``[batch, C]``; a node's parameters are ``adapter.init``'s
``params`` and everything the node learns. Nothing here normalises with statistics of the data (spec §7.4).

Examples:
  >>> head = get_adapter({"name": "linear", "num_classes": 3})
  >>> p = head.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
  >>> head.apply({"params": p}, jnp.ones((2, 5))).shape
  (2, 3)
  >>> inca = get_adapter({"name": "cross_attention", "num_classes": 3, "num_heads": 2})
  >>> p = inca.init(jax.random.key(0), jnp.zeros((1, 4, 8)))["params"]
  >>> inca.apply({"params": p}, jnp.ones((2, 4, 8))).tolist()    # the head starts at zero
  [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxforget import errors

_SMALL = nn.initializers.normal(0.02)


class LinearHead(nn.Module):
    """A linear classifier on flattened features (the cheapest adapter; SISA's usual choice on frozen features).

    Attributes:
      num_classes: number of output logits ``C``.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """Logits ``[batch, C]`` of features ``z: [batch, …]`` (float32)."""
        return nn.Dense(self.num_classes, name="head")(z.reshape((z.shape[0], -1)).astype(jnp.float32))


class CrossAttentionAdapter(nn.Module):
    """Learnable queries cross-attending to a frozen token map, then a linear head (InCA, reconstructed).

    Attributes:
      num_classes: number of output logits ``C``.
      num_queries: ``m`` learnable queries (1: one pooled summary; ``C``: the Open-InCA variant's count).
      num_heads: attention heads ``h``; the token width ``D`` must be divisible by it.
      positional: add a learnable positional embedding ``[T, D]`` to the normalised tokens.
    """

    num_classes: int = 10
    num_queries: int = 1
    num_heads: int = 4
    positional: bool = True

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """Logits ``[batch, C]`` of tokens ``z: [batch, T, D]`` (a feature map ``[batch, H, W, D]`` is flattened
        to ``H·W`` tokens)."""
        if z.ndim == 4:
            z = z.reshape((z.shape[0], -1, z.shape[-1]))
        if z.ndim != 3:
            raise errors.ShapeDtypeError(f"The cross-attention adapter needs tokens [batch, T, D] (or a feature map "
                                         f"[batch, H, W, D]), got shape {z.shape}.")
        batch, tokens, width = z.shape
        if width % self.num_heads:
            raise errors.ShapeDtypeError(f"Token width D={width} is not divisible by num_heads={self.num_heads}.")
        zn = nn.LayerNorm(name="token_norm")(z.astype(jnp.float32))
        if self.positional:
            zn = zn + self.param("positional", _SMALL, (tokens, width), jnp.float32)[None]
        queries = self.param("queries", _SMALL, (self.num_queries, width), jnp.float32)
        h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=width, out_features=width,
                                            name="attention")(jnp.broadcast_to(queries, (batch, *queries.shape)), zn)
        h = nn.LayerNorm(name="query_norm")(h).reshape((batch, -1))
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(h)


ADAPTERS: dict[str, type[nn.Module]] = {"linear": LinearHead, "cross_attention": CrossAttentionAdapter}


def get_adapter(config: Mapping[str, Any] | Any) -> nn.Module:
    """The adapter ``config`` names: ``name`` (a key of :data:`ADAPTERS`) plus the module's attributes.

    Raises:
      KeyError: an unknown name (the valid ones are listed). ConfigError: an attribute the adapter does not take.
    """
    kwargs = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    name = kwargs.pop("name", None)
    if name not in ADAPTERS:
        raise KeyError(f"Unknown adapter {name!r}; valid names are {', '.join(ADAPTERS)}.")
    valid = fields(name)
    unknown = sorted(k for k in kwargs if k not in valid)
    if unknown:
        raise errors.ConfigError(f"Adapter {name!r} takes no argument(s) {', '.join(unknown)}; valid arguments are "
                                 f"{', '.join(valid)}.")
    return ADAPTERS[name](**kwargs)


def fields(name: str) -> tuple[str, ...]:
    """The attributes adapter ``name`` takes.

    Examples:
      >>> fields("linear")
      ('num_classes',)
    """
    return tuple(f for f in ADAPTERS[name].__dataclass_fields__ if f not in ("parent", "name"))
