"""Shared helpers for config files: ``--config=file.py:quick,requests=3`` argument parsing, shared models."""

from __future__ import annotations

import ml_collections

#: The MLP 64-128-128-10 (Leaky-ReLU 0.01) every digits config starts from.
DIGITS_MLP = dict(name="mlp", hidden=(128, 128), num_classes=10, activation="leaky_relu", leaky_slope=0.01)
#: A small CNN for the 8×8 digits: two 3×3 convolutions (16, 32 channels, each followed by 2×2 pooling), 64 hidden.
DIGITS_CNN = dict(name="cnn", channels=(16, 32), hidden=64, num_classes=10)


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """Parses ``"quick,requests=3"`` into typed fields, using ``spec`` as names, defaults and types.

    A bare name means ``True``. Unknown names raise ``ValueError`` listing the valid ones.

    Examples:
      >>> parse_arg("quick,requests=3", quick=False, requests=10).to_dict()
      {'quick': True, 'requests': 3}
    """
    out = ml_collections.ConfigDict(dict(spec))
    for item in filter(None, (arg or "").split(",")):
        name, _, value = item.partition("=")
        if name not in spec:
            raise ValueError(f"Unknown config argument {name!r}; valid: {', '.join(sorted(spec))}.")
        kind = type(spec[name])
        if kind is bool:
            out[name] = value.lower() not in ("0", "false", "no") if value else True
        else:
            out[name] = kind(value)
    return out
