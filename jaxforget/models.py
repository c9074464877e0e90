"""Flax (linen) image classifiers as pure ``apply(variables, x)`` functions.

Three families, registered in :data:`MODELS`: a multilayer perceptron (:class:`MLP`), a small convolutional
network (:class:`SmallCNN`) and a CIFAR-style residual network (:class:`ResNet`). Every model

* takes ``x: [batch, H, W, C]`` floats in ``[0, 1]`` and returns logits ``[batch, num_classes]``;
* normalises its input itself, ``(x - input_mean) / input_std``, so that the normalisation constants are part
  of the (core) model and never come from user data;
* uses Leaky-ReLU by default, since linearised networks with plain ReLU are barely better than a linear
  classifier on frozen features (Golatkar et al. 2021, after LQF);
* has a randomly initialised (LeCun-normal), never zero, head: a zero head makes the Jacobian of every layer
  below it vanish;
* computes in the dtype of its variables, so that float64 variables (under ``jax.enable_x64``) give float64
  logits for reference solves, whatever the dtype of ``x``.

BatchNorm (ResNet only) is meant to run in eval mode (``train=False``) with population statistics of the core
data, recomputed exactly by :func:`batch_stats_from_data`: train-mode BatchNorm would make each sample's
Jacobian depend on the rest of its batch and leak user data into the core.

:func:`layer_names` and :func:`linearize_predicate` name the parameter groups in forward order and select the
linearised subtree ``w_lin`` of the mixed-linear model.

References:
  Golatkar, Achille, Ravichandran, Polito, Soatto, Mixed-Privacy Forgetting in Deep Networks, CVPR 2021, §3.
  He, Zhang, Ren, Sun, Deep Residual Learning for Image Recognition, CVPR 2016, §4.2 (CIFAR ResNets).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxforget.errors import ConfigError, ShapeDtypeError, check_finite

PyTree = Any
Dtype = Any

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "MODELS",
    "ResNet",
    "SmallCNN",
    "batch_stats_from_data",
    "count_params",
    "get_activation",
    "get_model",
    "init_variables",
    "layer_names",
    "linearize_predicate",
]


# ------------------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------------------

ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "gelu", "tanh", "softplus", "identity")


def _identity(x: jax.Array) -> jax.Array:
    return x


def get_activation(name: str, leaky_slope: float = 0.01) -> Callable[[jax.Array], jax.Array]:
    """Returns the elementwise activation called ``name``.

    ``leaky_relu(x) = x if x >= 0 else leaky_slope * x``; the other names ignore ``leaky_slope``. The returned
    function keeps the shape and dtype of its input.

    Args:
      name: one of :data:`ACTIVATIONS`: ``relu``, ``leaky_relu``, ``gelu`` (tanh approximation), ``tanh``,
        ``softplus``, ``identity``.
      leaky_slope: slope of ``leaky_relu`` for negative inputs (a finite float).

    Returns:
      A function ``[...] float -> [...] float``.

    Raises:
      ConfigError: for an unknown name (the message lists the valid ones) or a non-finite slope.

    Examples:
      >>> act = get_activation("leaky_relu", leaky_slope=0.1)
      >>> print(act(jnp.array([-2.0, 3.0])))
      [-0.2  3. ]
    """
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ConfigError(f"Unknown activation {name!r}; valid names are {', '.join(ACTIVATIONS)}.")
    if (
        isinstance(leaky_slope, bool)
        or not isinstance(leaky_slope, (int, float, np.integer, np.floating))
        or not math.isfinite(leaky_slope)
    ):
        raise ConfigError(f"leaky_slope must be a finite float, got {leaky_slope!r}.")
    slope = float(leaky_slope)
    if name == "relu":
        return nn.relu
    if name == "leaky_relu":
        return functools.partial(nn.leaky_relu, negative_slope=slope)
    if name == "gelu":
        return nn.gelu
    if name == "tanh":
        return jnp.tanh
    if name == "softplus":
        return nn.softplus
    return _identity


# ------------------------------------------------------------------------------------------------------------
# Shared pieces of the models
# ------------------------------------------------------------------------------------------------------------


def _check_positive_ints(value: Any, what: str, *, allow_empty: bool = True) -> None:
    items = value if isinstance(value, (tuple, list)) else [value]
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1]
    if bad or (not allow_empty and not items):
        raise ConfigError(
            f"{what} must be {'a sequence of ' if isinstance(value, (tuple, list)) else ''}"
            f"positive integers, got {value!r}."
        )


def _check_constants(value: Any, what: str, *, positive: bool) -> None:
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    ok = bool(items) and all(
        isinstance(v, (int, float, np.floating, np.integer))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and (v > 0 or not positive)
        for v in items
    )
    if not ok:
        kind = "positive finite" if positive else "finite"
        raise ConfigError(f"{what} must be a {kind} float or a non-empty sequence of them, got {value!r}.")


def _check_common(module: Any) -> None:
    """Validates the attributes every model shares (eagerly, at construction)."""
    get_activation(module.activation, module.leaky_slope)
    _check_positive_ints(module.num_classes, "num_classes")
    _check_constants(module.input_mean, "input_mean", positive=False)
    _check_constants(module.input_std, "input_std", positive=True)
    if isinstance(module.input_mean, (tuple, list)) and isinstance(module.input_std, (tuple, list)):
        if len(module.input_mean) != len(module.input_std):
            raise ConfigError(
                f"input_mean has {len(module.input_mean)} channels but input_std has {len(module.input_std)}."
            )


def _variables_dtype(module: nn.Module) -> Dtype:
    """The float dtype of the model's variables, or ``param_dtype`` while they are being created.

    Reading the dtype off the variables (not ``param_dtype``) is what lets a float32-initialised model run a
    float64 reference solve once its variables are cast, under strict dtype promotion.
    """
    dtypes = {}
    # Only the model's own state: sown collections (e.g. "intermediates") may legitimately differ.
    state = {col: module.variables[col] for col in ("params", "batch_stats") if col in module.variables}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        dtype = jnp.dtype(leaf.dtype)
        if jnp.issubdtype(dtype, jnp.floating):
            dtypes.setdefault(dtype, jax.tree_util.keystr(path))
    if not dtypes:  # initialisation: no variables yet
        return jnp.dtype(module.param_dtype)
    if len(dtypes) > 1:
        found = ", ".join(f"{d} (e.g. {p})" for d, p in dtypes.items())
        raise ShapeDtypeError(f"All model variables must share one float dtype; found {found}.")
    return next(iter(dtypes))


def _compute_dtype(module: nn.Module) -> Dtype:
    """The dtype the model computes in: ``module.dtype`` if set, else the dtype of its variables."""
    return jnp.dtype(module.dtype) if module.dtype is not None else _variables_dtype(module)


def _prepare_input(module: Any, x: jax.Array, *, min_rank: int) -> jax.Array:
    """Checks ``x``, casts it to the compute dtype and applies the model's input normalisation."""
    x = jnp.asarray(x)
    if x.ndim < min_rank or (min_rank == 4 and x.ndim != 4):
        want = "[batch, H, W, C]" if min_rank == 4 else f"at least {min_rank} dimensions"
        raise ShapeDtypeError(f"{type(module).__name__} expects inputs of shape {want}, got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ShapeDtypeError(
            f"{type(module).__name__} expects float inputs in [0, 1], got dtype {x.dtype}; convert integer "
            "images (e.g. uint8 in [0, 255]) to floats first."
        )
    x = x.astype(_compute_dtype(module))
    return (x - _channel_constant(module.input_mean, x)) / _channel_constant(module.input_std, x)


def _channel_constant(value: float | Sequence[float], x: jax.Array) -> float | jax.Array:
    if not isinstance(value, (tuple, list)):
        return float(value)  # a weakly-typed scalar never changes the dtype of x
    if len(value) != x.shape[-1]:
        raise ShapeDtypeError(
            f"Per-channel normalisation has {len(value)} channels, inputs have {x.shape[-1]}."
        )
    # Explicit rank: the library runs with jax_numpy_rank_promotion="raise".
    return jnp.asarray(np.asarray(value, np.float64), x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))


def _head(module: Any) -> nn.Dense:
    # Fan-in (LeCun) normal init: a zero head would kill the Jacobian of everything below it.
    return nn.Dense(
        module.num_classes,
        kernel_init=nn.initializers.lecun_normal(),
        param_dtype=module.param_dtype,
        dtype=module.dtype,
        name="head",
    )


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Multilayer perceptron on flattened images.

    ``logits = head(act(dense_{L-1}(... act(dense_0(flatten((x - input_mean) / input_std))))))``.
    Parameter groups in forward order: ``dense_0``, ..., ``dense_{L-1}``, ``head``.

    Attributes:
      hidden: widths of the hidden layers (may be empty: a linear classifier).
      num_classes: number of output logits K.
      activation: name of the hidden activation, see :func:`get_activation`.
      leaky_slope: negative slope of ``leaky_relu``.
      input_mean: normalisation offset, a float or one float per channel (fixed, or computed from core data).
      input_std: normalisation scale (positive), a float or one per channel.
      param_dtype: dtype of freshly initialised parameters.
      dtype: compute dtype; ``None`` (default) follows the dtype of the variables.

    Examples:
      >>> model = MLP(hidden=(8,), num_classes=3)
      >>> variables = init_variables(model, jax.random.key(0), (4, 4, 1))
      >>> model.apply(variables, jnp.zeros((2, 4, 4, 1)), train=False).shape
      (2, 3)
    """

    hidden: Sequence[int] = (128, 128)
    num_classes: int = 10
    activation: str = "leaky_relu"
    leaky_slope: float = 0.01
    input_mean: float | Sequence[float] = 0.5
    input_std: float | Sequence[float] = 0.25
    param_dtype: Dtype = jnp.float32
    dtype: Dtype | None = None

    def __post_init__(self) -> None:
        _check_positive_ints(tuple(self.hidden), "hidden")
        _check_common(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``[batch, num_classes]`` of ``x: [batch, H, W, C]`` (``train`` is accepted and unused)."""
        del train  # no train-mode behaviour; the argument keeps one call signature for all models
        act = get_activation(self.activation, self.leaky_slope)
        x = _prepare_input(self, x, min_rank=2)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = act(nn.Dense(width, param_dtype=self.param_dtype, dtype=self.dtype, name=f"dense_{i}")(x))
        return _head(self)(x)


def _pool2x2(x: jax.Array) -> jax.Array:
    # A 1-pixel map is left alone, so that deep stacks still run on 8x8 digits.
    # (flax's avg_pool divides by a numpy integer, which strict dtype promotion rejects.)
    batch, height, width, channels = x.shape
    ph, pw = min(2, height), min(2, width)
    x = x[:, : height - height % ph, : width - width % pw]
    x = x.reshape((batch, height // ph, ph, width // pw, pw, channels))
    return jnp.mean(x, axis=(2, 4))


class SmallCNN(nn.Module):
    """Small convolutional network: per stage a 3x3 conv, the activation and a 2x2 average pool.

    ``conv_0 -> act -> pool -> ... -> flatten -> dense_0 -> act -> head``. Convolutions use SAME padding, so
    8x8x1 digits and 32x32x3 images both work. Parameter groups in forward order: ``conv_0``, ...,
    ``conv_{S-1}``, ``dense_0``, ``head``.

    Attributes:
      channels: output channels of each conv stage.
      hidden: width of the dense layer before the head.
      num_classes: number of output logits K.
      activation: name of the activation, see :func:`get_activation`.
      leaky_slope: negative slope of ``leaky_relu``.
      input_mean: normalisation offset, a float or one float per channel.
      input_std: normalisation scale (positive), a float or one per channel.
      param_dtype: dtype of freshly initialised parameters.
      dtype: compute dtype; ``None`` (default) follows the dtype of the variables.
    """

    channels: Sequence[int] = (16, 32)
    hidden: int = 64
    num_classes: int = 10
    activation: str = "leaky_relu"
    leaky_slope: float = 0.01
    input_mean: float | Sequence[float] = 0.5
    input_std: float | Sequence[float] = 0.25
    param_dtype: Dtype = jnp.float32
    dtype: Dtype | None = None

    def __post_init__(self) -> None:
        _check_positive_ints(tuple(self.channels), "channels", allow_empty=False)
        _check_positive_ints(self.hidden, "hidden")
        _check_common(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``[batch, num_classes]`` of ``x: [batch, H, W, C]`` (``train`` is accepted and unused)."""
        del train
        act = get_activation(self.activation, self.leaky_slope)
        x = _prepare_input(self, x, min_rank=4)
        for i, features in enumerate(self.channels):
            conv = nn.Conv(
                features,
                (3, 3),
                padding="SAME",
                param_dtype=self.param_dtype,
                dtype=self.dtype,
                name=f"conv_{i}",
            )
            x = _pool2x2(act(conv(x)))
        x = x.reshape((x.shape[0], -1))
        x = act(nn.Dense(self.hidden, param_dtype=self.param_dtype, dtype=self.dtype, name="dense_0")(x))
        return _head(self)(x)


class _ConvBN(nn.Module):
    """3x3 conv followed (optionally) by BatchNorm; the ResNet stem. Children ``conv`` and ``bn``."""

    features: int
    use_bn: bool
    bn_momentum: float
    bn_epsilon: float
    param_dtype: Dtype
    dtype: Dtype | None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(
            self.features,
            (3, 3),
            padding="SAME",
            use_bias=not self.use_bn,
            param_dtype=self.param_dtype,
            dtype=self.dtype,
            name="conv",
        )(x)
        if self.use_bn:
            x = _batch_norm(self, train, "bn")(x)
        return x


def _batch_norm(module: Any, train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=module.bn_momentum,
        epsilon=module.bn_epsilon,
        param_dtype=module.param_dtype,
        dtype=module.dtype,
        # flax's float32 floor for the statistics calls promote_types(float64, float32), which strict dtype
        # promotion rejects; 64-bit statistics need no floor anyway.
        force_float32_reductions=jnp.dtype(module.param_dtype).itemsize < 8,
        name=name,
    )


class _BasicBlock(nn.Module):
    """Pre-addition residual block: ``act(bn_1(conv_1(act(bn_0(conv_0(x))))) + shortcut(x))``.

    The shortcut is the identity, or ``proj_bn(proj_conv(x))`` (1x1, strided) when the shape changes.
    """

    features: int
    strides: int
    use_bn: bool
    bn_momentum: float
    bn_epsilon: float
    activation: str
    leaky_slope: float
    param_dtype: Dtype
    dtype: Dtype | None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act = get_activation(self.activation, self.leaky_slope)
        conv = functools.partial(
            nn.Conv,
            self.features,
            padding="SAME",
            use_bias=not self.use_bn,
            param_dtype=self.param_dtype,
            dtype=self.dtype,
        )
        strides = (self.strides, self.strides)
        y = conv((3, 3), strides=strides, name="conv_0")(x)
        if self.use_bn:
            y = _batch_norm(self, train, "bn_0")(y)
        y = conv((3, 3), name="conv_1")(act(y))
        if self.use_bn:
            y = _batch_norm(self, train, "bn_1")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv((1, 1), strides=strides, name="proj_conv")(x)
            if self.use_bn:
                shortcut = _batch_norm(self, train, "proj_bn")(shortcut)
        return act(y + shortcut)


class ResNet(nn.Module):
    """CIFAR-style residual network (He et al. 2016, §4.2) of depth ``6k + 2``.

    A 3x3 stem (conv + BatchNorm + act) with ``width`` channels, three stages of ``k`` basic blocks with
    ``width``, ``2 width`` and ``4 width`` channels (the first block of stages 1 and 2 has stride 2 and a 1x1
    projection shortcut), global average pooling and a dense head. SAME padding throughout, so 8x8 digits
    work (spatial sizes 8, 4, 2). Parameter groups in forward order: ``stem``, ``stage0_block0``, ...,
    ``stage2_block{k-1}``, ``head``; inside a block ``conv_0``, ``bn_0``, ``conv_1``, ``bn_1`` and optionally
    ``proj_conv``, ``proj_bn``.

    Use ``train=False`` (eval-mode BatchNorm with statistics from :func:`batch_stats_from_data`) for
    everything the mixed-linear model computes; ``train=True`` needs ``mutable=["batch_stats"]``.

    Attributes:
      depth: total depth ``6k + 2`` (8, 14, 20, ...).
      width: channels of the stem and the first stage.
      num_classes: number of output logits K.
      use_bn: whether to use BatchNorm (without it, convolutions get biases).
      bn_momentum: momentum of the running BatchNorm statistics in train mode.
      bn_epsilon: BatchNorm epsilon.
      activation: name of the activation, see :func:`get_activation`.
      leaky_slope: negative slope of ``leaky_relu``.
      input_mean: normalisation offset, a float or one float per channel.
      input_std: normalisation scale (positive), a float or one per channel.
      param_dtype: dtype of freshly initialised parameters and statistics.
      dtype: compute dtype; ``None`` (default) follows the dtype of the variables.
    """

    depth: int = 8
    width: int = 16
    num_classes: int = 10
    use_bn: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    activation: str = "leaky_relu"
    leaky_slope: float = 0.01
    input_mean: float | Sequence[float] = 0.5
    input_std: float | Sequence[float] = 0.25
    param_dtype: Dtype = jnp.float32
    dtype: Dtype | None = None

    def __post_init__(self) -> None:
        _check_positive_ints(self.depth, "depth")
        if (self.depth - 2) % 6 != 0 or self.depth < 8:
            raise ConfigError(
                f"ResNet depth must be 6k + 2 with k >= 1 (8, 14, 20, 32, ...), got {self.depth}."
            )
        _check_positive_ints(self.width, "width")
        _check_constants(self.bn_momentum, "bn_momentum", positive=False)
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ConfigError(f"bn_momentum must lie in [0, 1), got {self.bn_momentum}.")
        _check_constants(self.bn_epsilon, "bn_epsilon", positive=True)
        _check_common(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``[batch, num_classes]`` of ``x: [batch, H, W, C]``; ``train`` selects batch statistics."""
        act = get_activation(self.activation, self.leaky_slope)
        x = _prepare_input(self, x, min_rank=4)
        # BatchNorm casts its statistics and scale to its param_dtype when they are not floored at float32,
        # so the layers get the dtype the variables actually have (the same as param_dtype at init).
        param_dtype = _variables_dtype(self)
        stem = _ConvBN(
            self.width,
            self.use_bn,
            self.bn_momentum,
            self.bn_epsilon,
            param_dtype,
            self.dtype,
            name="stem",
        )
        x = stem(x, train)
        x = act(x)
        blocks_per_stage = (self.depth - 2) // 6
        for stage in range(3):
            for block in range(blocks_per_stage):
                x = _BasicBlock(
                    features=self.width * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    use_bn=self.use_bn,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    activation=self.activation,
                    leaky_slope=self.leaky_slope,
                    param_dtype=param_dtype,
                    dtype=self.dtype,
                    name=f"stage{stage}_block{block}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return _head(self)(x)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "resnet": ResNet}


def _model_kwargs(cls: type[nn.Module]) -> tuple[str, ...]:
    return tuple(f for f in cls.__dataclass_fields__ if f not in ("parent", "name"))


def get_model(config: Mapping[str, Any] | Any) -> nn.Module:
    """Builds the model that ``config`` names.

    Args:
      config: an ``ml_collections.ConfigDict`` or a mapping with ``name`` (a key of :data:`MODELS`) and the
        constructor keyword arguments of that model, e.g. ``{"name": "mlp", "hidden": (64,)}``. Lists are
        turned into tuples (flax modules must be hashable).

    Returns:
      The unbound flax module.

    Raises:
      KeyError: for a missing or unknown ``name``, listing the valid names.
      ConfigError: for a keyword the model does not take (named in the message) or an invalid value.

    Examples:
      >>> get_model({"name": "mlp", "hidden": [16], "num_classes": 3}).hidden
      (16,)
    """
    kwargs = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    name = kwargs.pop("name", None)
    if name not in MODELS:
        raise KeyError(f"Unknown model {name!r}; valid names are {', '.join(MODELS)}.")
    cls = MODELS[name]
    valid = _model_kwargs(cls)
    unknown = sorted(k for k in kwargs if k not in valid)
    if unknown:
        raise ConfigError(
            f"Model {name!r} takes no argument(s) {', '.join(unknown)}; "
            f"valid arguments are {', '.join(valid)}."
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------------------
# Variables
# ------------------------------------------------------------------------------------------------------------


def _plain(tree: Any) -> Any:
    """Nested mappings (FrozenDict included) as plain dicts, leaves untouched, key order kept."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def init_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """Initialises ``model`` for inputs of one example's shape ``input_shape`` (``(H, W, C)``).

    Args:
      model: an unbound model, e.g. from :func:`get_model`.
      key: a PRNG key (typed ``jax.random.key`` or raw ``uint32[2]``).
      input_shape: the shape of one example, ``(H, W, C)``.

    Returns:
      ``{"params": ...}`` plus ``{"batch_stats": ...}`` for models with BatchNorm, as plain nested dicts of
      ``param_dtype`` arrays. Top-level groups are inserted in forward order, but code must not rely on dict
      order (``jax.tree.map`` sorts keys): use :func:`layer_names`.

    Raises:
      ShapeDtypeError: if ``input_shape`` is not a non-empty tuple of positive integers.

    Examples:
      >>> variables = init_variables(MLP(hidden=(4,), num_classes=2), jax.random.key(0), (2, 2, 1))
      >>> list(variables["params"]), variables["params"]["head"]["kernel"].shape
      (['dense_0', 'head'], (4, 2))
    """
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if not shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
        raise ShapeDtypeError(f"input_shape must be one example's shape (H, W, C), got {input_shape!r}.")
    shape = tuple(int(d) for d in shape)

    variables = _plain(_jitted_init(model, shape)(key))
    # jit returns dicts with sorted keys; put params first and its groups in forward order, for readability.
    params = variables.pop("params")
    return {"params": {name: params[name] for name in layer_names(params)}, **variables}


def _jitted_init(model: nn.Module, shape: tuple[int, ...]) -> Callable:
    """The jitted initialiser of ``model`` for one example's ``shape``, built once per (model, shape): a fresh
    ``jax.jit`` of a new closure would compile again on every call (a retrain initialises a model every time)."""
    try:
        return _cached_init(model, shape)
    except TypeError:  # an unhashable model (e.g. list attributes): compile for this call only
        return _make_init(model, shape)


def _make_init(model: nn.Module, shape: tuple[int, ...]) -> Callable:
    return jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape), model.param_dtype), train=False))


_cached_init = functools.lru_cache(maxsize=32)(_make_init)


def split_variables(variables: dict) -> tuple[PyTree, dict]:
    """``(params, rest)``: a model's trainable parameters and its other collections (e.g. BatchNorm statistics).

    Examples:
      >>> split_variables({"params": 1, "batch_stats": 2})
      (1, {'batch_stats': 2})
    """
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def count_params(params: PyTree) -> int:
    """Total number of scalars in a pytree of arrays.

    Examples:
      >>> count_params({"head": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros((2,))}})
      10
    """
    return sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params))


# ------------------------------------------------------------------------------------------------------------
# Layer names and the linearisation predicate
# ------------------------------------------------------------------------------------------------------------

_GROUP_PATTERNS: tuple[tuple[re.Pattern, int], ...] = (
    (re.compile(r"stem"), 0),
    (re.compile(r"conv_(\d+)"), 1),
    (re.compile(r"stage(\d+)_block(\d+)"), 2),
    (re.compile(r"dense_(\d+)"), 3),
    (re.compile(r"head"), 4),
)


def _group_rank(name: str) -> tuple[int, ...] | None:
    for pattern, rank in _GROUP_PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return (rank, *(int(g) for g in match.groups()))
    return None


def layer_names(params: Mapping[str, Any]) -> list[str]:
    """Top-level parameter groups of a jaxforget model, in forward order.

    The order comes from the naming scheme (``stem``, ``conv_i``, ``stage{s}_block{b}``, ``dense_i``,
    ``head``), not from dict order, which ``jax.tree.map``, ``jit`` and checkpoint restores do not keep.

    Args:
      params: the ``"params"`` collection (not the whole variables dict).

    Returns:
      The group names, first layer first.

    Raises:
      ConfigError: if a name does not follow the scheme (the order would be a guess).

    Examples:
      >>> layer_names({"head": {}, "stem": {}, "stage1_block0": {}, "stage0_block0": {}})
      ['stem', 'stage0_block0', 'stage1_block0', 'head']
    """
    if not isinstance(params, Mapping) or not params:
        raise ConfigError("layer_names expects a non-empty params dict (the 'params' collection).")
    ranks = {name: _group_rank(str(name)) for name in params}
    unknown = [name for name, rank in ranks.items() if rank is None]
    if unknown:
        hint = " (pass variables['params'], not variables)" if "params" in unknown else ""
        raise ConfigError(
            f"Parameter groups {unknown} do not follow the naming scheme stem, conv_i, "
            f"stage{{s}}_block{{b}}, dense_i, head{hint}."
        )
    return sorted(params, key=lambda name: ranks[name])


def _path_key(entry: Any) -> str:
    """A path entry as a string: plain strings, or jax key-path entries (``DictKey`` and friends)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(tree, Mapping):
        return [p for k, v in tree.items() for p in _leaf_paths(v, (*prefix, str(k)))]
    return [prefix]


def linearize_predicate(params: Mapping[str, Any], spec: str) -> Callable[[tuple[str, ...]], bool]:
    """Which parameter leaves form the linearised subtree ``w_lin`` of the mixed-linear model.

    Specs:

    * ``"all"``: every leaf (the default for small MLPs and CNNs);
    * ``"head"``: the head only, the same as ``"last:1"``;
    * ``"last:k"``: the last ``k`` top-level groups in forward order (:func:`layer_names`); for ResNets
      ``"last:<k+1>"`` is the recommended "last stage + head";
    * ``"re:<regex>"``: leaves whose "/"-joined path (e.g. ``"stage2_block0/conv_0/kernel"``) matches
      ``re.search``.

    Args:
      params: the ``"params"`` collection, used to resolve ``last:k`` and to reject specs selecting nothing.
      spec: one of the forms above.

    Returns:
      ``predicate(path) -> bool`` for a leaf path relative to ``params``: a tuple of keys such as
      ``("stage2_block0", "conv_0", "kernel")`` (jax key-path entries such as ``DictKey`` are accepted too, so
      it can be used with ``jax.tree_util.tree_map_with_path``).

    Raises:
      ConfigError: for an unknown form, a bad ``k`` or regex, or a spec that selects no leaf.

    Examples:
      >>> params = {"dense_0": {"kernel": 0, "bias": 0}, "head": {"kernel": 0, "bias": 0}}
      >>> pred = linearize_predicate(params, "last:1")
      >>> pred(("head", "kernel")), pred(("dense_0", "bias"))
      (True, False)
    """
    if not isinstance(spec, str):
        raise ConfigError(f"linearize spec must be a string, got {spec!r}.")
    forms = "'all', 'head', 'last:<k>' or 're:<regex>'"
    if spec == "all":
        predicate = _select_all
    elif spec == "head" or spec.startswith("last:"):
        names = layer_names(params)
        k_text = "1" if spec == "head" else spec[len("last:") :]
        if not k_text.isdigit() or not 1 <= int(k_text) <= len(names):
            raise ConfigError(
                f"linearize spec {spec!r}: k must be an integer in [1, {len(names)}] (the number of layer "
                f"groups {names})."
            )
        predicate = functools.partial(_select_groups, frozenset(names[-int(k_text) :]))
    elif spec.startswith("re:"):
        try:
            pattern = re.compile(spec[len("re:") :])
        except re.error as err:
            raise ConfigError(f"linearize spec {spec!r} is not a valid regular expression: {err}.") from None
        predicate = functools.partial(_select_regex, pattern)
    else:
        raise ConfigError(f"Unknown linearize spec {spec!r}; use {forms}.")
    if not any(predicate(path) for path in _leaf_paths(params)):
        groups = list(params) if isinstance(params, Mapping) else params
        raise ConfigError(f"linearize spec {spec!r} selects no parameter; the parameter groups are {groups}.")
    return predicate


def _select_all(path: tuple[Any, ...]) -> bool:
    del path
    return True


def _select_groups(groups: frozenset[str], path: tuple[Any, ...]) -> bool:
    return bool(path) and _path_key(path[0]) in groups


def _select_regex(pattern: re.Pattern, path: tuple[Any, ...]) -> bool:
    return pattern.search("/".join(_path_key(p) for p in path)) is not None


# ------------------------------------------------------------------------------------------------------------
# BatchNorm statistics from core data
# ------------------------------------------------------------------------------------------------------------


def _bn_input_interceptor(records: list) -> Callable:
    """A flax method interceptor that appends ``(bn path, bn input)`` for every BatchNorm call."""

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            records.append((tuple(context.module.path), args[0]))
        return next_fun(*args, **kwargs)

    return interceptor


def _bn_moments(model: nn.Module, variables: PyTree, x: jax.Array, weights: jax.Array) -> list:
    """Per-channel weighted mean and centred sum of squares of every BatchNorm input, in call order."""
    records: list = []
    with nn.intercept_methods(_bn_input_interceptor(records)):
        model.apply(variables, x, train=False)
    moments = []
    for _, h in records:
        axes = tuple(range(h.ndim - 1))
        w = weights.astype(h.dtype).reshape((-1,) + (1,) * (h.ndim - 1))
        count = jnp.sum(weights.astype(h.dtype)) * (h.size // (h.shape[0] * h.shape[-1]))
        mean = jnp.sum(w * h, axis=axes) / count
        centred = h - mean.reshape((1,) * (h.ndim - 1) + (-1,))
        moments.append((mean, jnp.sum(w * centred * centred, axis=axes)))
    return moments


@functools.lru_cache(maxsize=16)
def _jitted_bn_moments(model: nn.Module) -> Callable:
    return jax.jit(functools.partial(_bn_moments, model))


def batch_stats_from_data(
    model: nn.Module, variables: PyTree, x_core: np.ndarray, batch_size: int = 256
) -> dict:
    """Replaces the BatchNorm running statistics by the exact population statistics of the core data.

    Layer by layer in forward order, the running mean and (biased) variance of BatchNorm layer ``l`` become
    the per-channel mean and variance of its inputs over all samples and positions of ``x_core``, where the
    inputs are computed in eval mode with the already-updated statistics of layers ``< l``. Afterwards eval
    mode on ``x_core`` equals train mode on ``x_core`` as one batch, and no statistic depends on user data.
    Costs one pass over ``x_core`` per BatchNorm layer; batch moments are merged on the host in float64
    (Chan et al.'s pairwise update), so the result does not depend on ``batch_size`` beyond rounding.

    Args:
      model: the model the variables belong to.
      variables: ``{"params": ..., "batch_stats": ...}``; returned unchanged without ``batch_stats``.
      x_core: ``[n, H, W, C]`` float core inputs in [0, 1] (host or device array), ``n >= 1``.
      batch_size: samples per forward pass; the last batch is zero-padded with weight 0, so one compilation
        serves all batches.

    Returns:
      A new variables dict with the same params and recomputed ``batch_stats`` (in their original dtype).

    Raises:
      ShapeDtypeError: if ``x_core`` is not a non-empty 4-D float array.
      NonFiniteError: if ``x_core`` contains NaN or Inf.
      ConfigError: for a non-positive ``batch_size`` or a BatchNorm layer called more than once.

    References:
      Chan, Golub, LeVeque, Updating Formulae and a Pairwise Algorithm for Computing Sample Variances, 1979.
    """
    batch_stats = variables.get("batch_stats") if isinstance(variables, Mapping) else None
    if not batch_stats or not jax.tree.leaves(batch_stats):
        return variables
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    x_core = np.asarray(jax.device_get(x_core))
    if x_core.ndim != 4 or x_core.shape[0] == 0 or not np.issubdtype(x_core.dtype, np.floating):
        raise ShapeDtypeError(
            f"x_core must be a non-empty [n, H, W, C] float array, got shape {x_core.shape} "
            f"and dtype {x_core.dtype}."
        )
    check_finite(x_core, "core inputs x_core")
    n = x_core.shape[0]
    batch_size = int(min(batch_size, n))
    n_batches = -(-n // batch_size)
    padded = np.zeros((n_batches * batch_size, *x_core.shape[1:]), x_core.dtype)
    padded[:n] = x_core
    weights = (np.arange(n_batches * batch_size) < n).astype(x_core.dtype)

    # Discover the BatchNorm layers in call order, which is a valid dependency order.
    records: list = []
    with nn.intercept_methods(_bn_input_interceptor(records)):
        jax.eval_shape(
            lambda v, x: model.apply(v, x, train=False),
            variables,
            jax.ShapeDtypeStruct((batch_size, *x_core.shape[1:]), x_core.dtype),
        )
    paths = [path for path, _ in records]
    # Spatial positions per sample at each BatchNorm input (only shapes are kept from the abstract trace).
    positions = [math.prod(h.shape[1:-1]) for _, h in records]
    records.clear()
    if len(set(paths)) != len(paths):
        raise ConfigError("A BatchNorm layer is called more than once; its input statistics are ambiguous.")

    try:
        moments_fn = _jitted_bn_moments(model)
    except TypeError:  # an unhashable model (e.g. list attributes): compile for this call only
        moments_fn = jax.jit(functools.partial(_bn_moments, model))

    stats = _plain(batch_stats)
    batches = [
        (
            jax.device_put(padded[i * batch_size : (i + 1) * batch_size]),
            jax.device_put(weights[i * batch_size : (i + 1) * batch_size]),
        )
        for i in range(n_batches)
    ]
    for layer, path in enumerate(paths):
        node = stats
        for key in path:
            node = node[key]
        total, mean, m2 = 0.0, None, None
        for i, (xb, wb) in enumerate(batches):
            b_mean, b_m2 = jax.device_get(moments_fn({**variables, "batch_stats": stats}, xb, wb)[layer])
            b_count = float(min(batch_size, n - i * batch_size) * positions[layer])
            b_mean, b_m2 = np.asarray(b_mean, np.float64), np.asarray(b_m2, np.float64)
            if mean is None:
                total, mean, m2 = b_count, b_mean, b_m2
                continue
            delta = b_mean - mean
            new_total = total + b_count
            mean = mean + delta * (b_count / new_total)
            m2 = m2 + b_m2 + delta * delta * (total * b_count / new_total)
            total = new_total
        node["mean"] = jax.device_put(mean.astype(np.dtype(node["mean"].dtype)))
        node["var"] = jax.device_put((m2 / total).astype(np.dtype(node["var"].dtype)))
    return {**variables, "batch_stats": stats}
