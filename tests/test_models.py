"""Properties of jaxforget.models: shapes and dtypes, activations, normalisation, eval-mode BatchNorm, core
BatchNorm statistics, layer order and the linearisation predicate."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxforget import compat
from jaxforget import models as m
from jaxforget.errors import ConfigError, ShapeDtypeError

DIGITS = (8, 8, 1)
CIFAR = (32, 32, 3)

# Tiny widths keep CPU compile times small.
TINY = {
    "mlp": {"name": "mlp", "hidden": (6, 5), "num_classes": 3},
    "cnn": {"name": "cnn", "channels": (3, 4), "hidden": 5, "num_classes": 3},
    "resnet": {"name": "resnet", "depth": 8, "width": 2, "num_classes": 3},
}


def _uniform(seed: int, shape: tuple) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _leaf_paths(tree) -> list[tuple[str, ...]]:
    return [tuple(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _apply(model, variables, x, train=False):
    return jax.jit(lambda v, x: model.apply(v, x, train=train))(variables, x)


@pytest.fixture(scope="module")
def resnet():
    """A tiny BN ResNet, its fresh variables and core inputs (digits-shaped)."""
    model = m.ResNet(depth=8, width=3, num_classes=4)
    variables = m.init_variables(model, jax.random.key(1), DIGITS)
    return model, variables, _uniform(0, (37, *DIGITS))


@pytest.fixture(scope="module")
def resnet_core_stats(resnet):
    model, variables, x_core = resnet
    return m.batch_stats_from_data(model, variables, x_core, batch_size=16)


# -- shapes and dtypes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [DIGITS, CIFAR], ids=["digits", "cifar"])
@pytest.mark.parametrize("name", list(TINY))
def test_output_shape_and_dtype(name, shape, key):
    model = m.get_model(TINY[name])
    variables = m.init_variables(model, key, shape)
    logits = _apply(model, variables, _uniform(0, (2, *shape)))
    assert logits.shape == (2, 3)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("name", list(TINY))
def test_float64_variables_give_float64_logits(name, key):
    model = m.get_model(TINY[name])
    variables = m.init_variables(model, key, DIGITS)
    x = _uniform(0, (2, *DIGITS))
    logits32 = _apply(model, variables, x)
    with compat.enable_x64(True):
        variables64 = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
        logits64 = _apply(model, variables64, x)  # float32 inputs follow the variables' dtype
        assert logits64.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(logits64), np.asarray(logits32), rtol=1e-4, atol=1e-5)
        if "batch_stats" in variables:  # train-mode BatchNorm runs in float64 too
            train_logits, updates = model.apply(variables64, x, train=True, mutable=["batch_stats"])
            assert {a.dtype for a in jax.tree.leaves((train_logits, updates))} == {jnp.dtype(jnp.float64)}


def test_param_dtype_float64_init(key):
    with compat.enable_x64(True):
        model = m.MLP(hidden=(4,), num_classes=2, param_dtype=jnp.float64)
        variables = m.init_variables(model, key, DIGITS)
        assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float64)}
        assert _apply(model, variables, _uniform(0, (1, *DIGITS))).dtype == jnp.float64


def test_mixed_variable_dtypes_are_rejected(resnet):
    model, variables, x_core = resnet
    with compat.enable_x64(True):
        mixed = {**variables, "params": jax.tree.map(lambda a: a.astype(jnp.float64), variables["params"])}
        with pytest.raises(ShapeDtypeError, match="share one float dtype"):
            model.apply(mixed, x_core[:1], train=False)


def test_integer_and_misshaped_inputs_are_rejected(key):
    model = m.SmallCNN(channels=(2,), hidden=3, num_classes=2)
    variables = m.init_variables(model, key, DIGITS)
    with pytest.raises(ShapeDtypeError, match="float inputs"):
        model.apply(variables, np.zeros((1, *DIGITS), np.uint8))
    with pytest.raises(ShapeDtypeError, match=r"\[batch, H, W, C\]"):
        model.apply(variables, np.zeros((1, 64), np.float32))
    with pytest.raises(ShapeDtypeError, match="input_shape"):
        m.init_variables(model, key, (8, 0, 1))


def test_init_variables_returns_plain_dicts(resnet, key):
    _, variables, _ = resnet
    assert list(variables) == ["params", "batch_stats"]
    for tree in (variables, variables["params"], variables["params"]["stem"], variables["batch_stats"]):
        assert type(tree) is dict
    no_bn = m.init_variables(m.ResNet(width=2, use_bn=False), key, DIGITS)
    assert list(no_bn) == ["params"]
    assert "bias" in no_bn["params"]["stem"]["conv"]  # without BN the convolutions carry biases


# -- activations and normalisation --------------------------------------------------------------------------


def test_activation_values():
    z = jnp.array([-2.0, -0.5, 0.0, 1.5])
    zn = np.asarray(z, np.float64)
    expected = {
        "relu": np.maximum(zn, 0.0),
        "leaky_relu": np.where(zn >= 0, zn, 0.2 * zn),
        "tanh": np.tanh(zn),
        "softplus": np.log1p(np.exp(zn)),
        "identity": zn,
        "gelu": 0.5 * zn * (1 + np.tanh(np.sqrt(2 / np.pi) * (zn + 0.044715 * zn**3))),
    }
    assert set(expected) == set(m.ACTIVATIONS)
    for name, want in expected.items():
        np.testing.assert_allclose(np.asarray(m.get_activation(name, 0.2)(z)), want, rtol=1e-6, atol=1e-6)


def test_mlp_matches_numpy_with_leaky_slope_and_normalisation(key):
    slope, mean, std = 0.3, 0.3, 0.7
    model = m.MLP(hidden=(5,), num_classes=3, leaky_slope=slope, input_mean=mean, input_std=std)
    variables = m.init_variables(model, key, DIGITS)
    x = _uniform(1, (4, *DIGITS))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    pre = ((x.reshape(4, -1) - mean) / std) @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
    assert (pre < 0).any() and (pre > 0).any()  # both branches of the Leaky-ReLU are exercised
    hidden = np.where(pre >= 0, pre, slope * pre)
    want = hidden @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(np.asarray(_apply(model, variables, x)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_input_mean_and_std_are_applied(name, key):
    # (x - m1) / s == ((x + m0 - m1) - m0) / s  and  (x - m) / s1 == ((m + (x - m) s0 / s1) - m) / s0.
    model = m.get_model(TINY[name])
    variables = m.init_variables(model, key, DIGITS)
    x = _uniform(2, (3, *DIGITS))
    shifted = model.clone(input_mean=0.2)
    np.testing.assert_allclose(
        np.asarray(_apply(shifted, variables, x)), np.asarray(_apply(model, variables, x + 0.3)), atol=1e-5
    )
    scaled = model.clone(input_std=0.5)
    np.testing.assert_allclose(
        np.asarray(_apply(scaled, variables, x)),
        np.asarray(_apply(model, variables, 0.5 + (x - 0.5) * 0.5)),
        atol=1e-5,
    )
    assert not np.allclose(np.asarray(_apply(shifted, variables, x)), np.asarray(_apply(model, variables, x)))


def test_per_channel_normalisation(key):
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    model = m.MLP(hidden=(), num_classes=2, input_mean=mean, input_std=std)
    variables = m.init_variables(model, key, (2, 2, 3))
    x = _uniform(3, (2, 2, 2, 3))
    p = variables["params"]["head"]
    want = ((x - np.array(mean)) / np.array(std)).reshape(2, -1) @ np.asarray(p["kernel"], np.float64)
    want = want + np.asarray(p["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(_apply(model, variables, x)), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="input_std"):
        m.MLP(input_std=0.0)


# -- registry and configuration errors ----------------------------------------------------------------------


def test_get_model_from_config_dict():
    config = ml_collections.ConfigDict({"name": "resnet", "depth": 14, "width": 4, "activation": "gelu"})
    model = m.get_model(config)
    assert isinstance(model, m.ResNet) and model.depth == 14 and model.activation == "gelu"
    assert m.get_model({"name": "cnn", "channels": [4, 8]}).channels == (4, 8)
    assert set(m.MODELS) == {"mlp", "cnn", "resnet"}


def test_configuration_errors_name_the_problem():
    with pytest.raises(KeyError, match="mlp, cnn, resnet"):
        m.get_model({"name": "vit"})
    with pytest.raises(ConfigError, match="widht"):
        m.get_model({"name": "resnet", "widht": 4})
    with pytest.raises(ConfigError, match="relu, leaky_relu, gelu, tanh, softplus, identity"):
        m.get_activation("swish", 0.01)
    with pytest.raises(ConfigError, match="swish"):
        m.get_model({"name": "mlp", "activation": "swish"})
    with pytest.raises(ConfigError, match="6k \\+ 2"):
        m.ResNet(depth=10)
    with pytest.raises(ConfigError, match="hidden"):
        m.MLP(hidden=(4, 0))


# -- head and Jacobian --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
def test_head_is_random_and_jacobian_below_it_is_nonzero(name, key):
    model = m.get_model(TINY[name])
    variables = m.init_variables(model, key, DIGITS)
    kernel = np.asarray(variables["params"]["head"]["kernel"])
    fan_in = kernel.shape[0]
    assert 0.3 < kernel.std() * np.sqrt(fan_in) < 2.0  # LeCun (fan-in) normal, not zeros
    x = _uniform(4, (2, *DIGITS))
    first = m.layer_names(variables["params"])[0]

    def summed_logits(params):
        return jnp.sum(model.apply({**variables, "params": params}, x, train=False))

    grads = jax.jit(jax.grad(summed_logits))(variables["params"])
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads[first]))


# -- BatchNorm ----------------------------------------------------------------------------------------------


def test_eval_mode_batchnorm_is_batch_independent(resnet, resnet_core_stats):
    model, _, x_core = resnet
    x = x_core[:5]
    batch = np.asarray(_apply(model, resnet_core_stats, x))
    alone = np.asarray(_apply(model, resnet_core_stats, x[2:3]))
    np.testing.assert_allclose(alone[0], batch[2], atol=1e-6, rtol=0)
    # Contrast: in train mode, a sample's logits depend on the rest of its batch.
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    assert not np.allclose(
        np.asarray(train(resnet_core_stats, x))[2], np.asarray(train(resnet_core_stats, x[:3]))[2]
    )


def test_batch_stats_equal_population_moments_of_bn_inputs(resnet, resnet_core_stats):
    model, variables, x_core = resnet
    stats = resnet_core_stats["batch_stats"]

    # The stem precisely: its BN input is the stem conv of the normalised core inputs, computed here directly.
    stem_conv = nn.Conv(3, (3, 3), padding="SAME", use_bias=False)
    h = np.asarray(stem_conv.apply({"params": variables["params"]["stem"]["conv"]}, (x_core - 0.5) / 0.25))
    h = h.astype(np.float64)
    np.testing.assert_allclose(
        np.asarray(stats["stem"]["bn"]["mean"]), h.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(stats["stem"]["bn"]["var"]), h.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
    )

    # Every BN layer: its input (the output of the conv before it), computed in eval mode with the new
    # statistics, has exactly the stored population mean and variance.
    _, state = model.apply(
        resnet_core_stats, x_core, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    captured = state["intermediates"]
    bn_paths = sorted({p[:-1] for p in _leaf_paths(stats)})
    assert len(bn_paths) == 1 + 3 * 2 + 2  # stem, two per block, two projections
    for path in bn_paths:
        node = captured
        for k in (*path[:-1], path[-1].replace("bn", "conv")):
            node = node[k]
        h = np.asarray(node["__call__"][0], np.float64)
        node_stats = stats
        for k in path:
            node_stats = node_stats[k]
        np.testing.assert_allclose(
            np.asarray(node_stats["mean"]), h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(np.asarray(node_stats["var"]), h.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_batch_stats_make_eval_mode_equal_full_batch_train_mode(resnet, resnet_core_stats):
    model, variables, x_core = resnet
    train_logits, _ = model.apply(variables, x_core, train=True, mutable=["batch_stats"])
    eval_logits = _apply(model, resnet_core_stats, x_core)
    np.testing.assert_allclose(np.asarray(eval_logits), np.asarray(train_logits), rtol=1e-4, atol=1e-4)
    with compat.enable_x64(True):  # the identity is exact: in float64 only rounding is left
        variables64 = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
        stats64 = m.batch_stats_from_data(model, variables64, x_core.astype(np.float64), batch_size=16)
        train_logits, _ = model.apply(variables64, x_core, train=True, mutable=["batch_stats"])
        eval_logits = _apply(model, stats64, x_core)
        np.testing.assert_allclose(np.asarray(eval_logits), np.asarray(train_logits), rtol=0, atol=1e-10)


def test_batch_stats_do_not_depend_on_batch_size(resnet, resnet_core_stats):
    model, variables, x_core = resnet
    one_batch = m.batch_stats_from_data(model, variables, x_core, batch_size=len(x_core))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        one_batch["batch_stats"],
        resnet_core_stats["batch_stats"],
    )
    assert one_batch["params"] is variables["params"]
    assert (
        jax.tree.leaves(variables["batch_stats"]["stem"])[0]
        is not jax.tree.leaves(one_batch["batch_stats"]["stem"])[0]
    )


def test_batch_stats_without_batchnorm_is_identity(key):
    model = m.ResNet(width=2, use_bn=False)
    variables = m.init_variables(model, key, DIGITS)
    assert m.batch_stats_from_data(model, variables, _uniform(0, (4, *DIGITS))) is variables


def test_batch_stats_input_checks(resnet):
    model, variables, x_core = resnet
    with pytest.raises(ShapeDtypeError):
        m.batch_stats_from_data(model, variables, x_core[:0])
    with pytest.raises(ConfigError):
        m.batch_stats_from_data(model, variables, x_core, batch_size=0)


# -- layer names and the linearisation predicate ------------------------------------------------------------


def test_layer_names_forward_order(resnet, key):
    model, variables, _ = resnet
    expected = ["stem", "stage0_block0", "stage1_block0", "stage2_block0", "head"]
    # Flax keeps module creation order in the dict init builds (read inside the trace, before jax re-sorts)...
    order = []

    def init(k):
        out = model.init(k, jnp.zeros((1, *DIGITS)))
        order.extend(out["params"])
        return out

    jax.eval_shape(init, key)
    assert order == expected
    # ...but jax tree utilities sort dict keys ("stage..." < "stem"), so the order must come from the names.
    resorted = jax.tree.map(lambda a: a, variables["params"])
    assert list(resorted) != expected
    assert m.layer_names(resorted) == expected
    deep = {f"dense_{i}": {} for i in range(12)} | {"head": {}}
    assert m.layer_names(dict(sorted(deep.items()))) == [f"dense_{i}" for i in range(12)] + ["head"]
    cnn = {"head": {}, "dense_0": {}, "conv_1": {}, "conv_0": {}}
    assert m.layer_names(cnn) == ["conv_0", "conv_1", "dense_0", "head"]
    with pytest.raises(ConfigError, match="naming scheme"):
        m.layer_names({"encoder": {}, "head": {}})


def test_linearize_predicate_selections(resnet):
    _, variables, _ = resnet
    params = variables["params"]
    paths = _leaf_paths(params)

    def selected(spec):
        pred = m.linearize_predicate(params, spec)
        return {p for p in paths if pred(p)}

    head = {p for p in paths if p[0] == "head"}
    assert head == {("head", "kernel"), ("head", "bias")}
    assert selected("last:1") == head
    assert selected("head") == head
    assert selected("all") == set(paths)
    stage2 = {p for p in paths if p[0].startswith("stage2")}
    assert selected("re:stage2") == stage2 and ("stage2_block0", "conv_0", "kernel") in stage2
    assert selected("last:2") == stage2 | head
    assert selected("re:^head/kernel$") == {("head", "kernel")}
    # Usable directly with jax key paths.
    pred = m.linearize_predicate(params, "last:1")
    marks = jax.tree_util.tree_map_with_path(lambda path, _: pred(path), params)
    assert sum(jax.tree.leaves(marks)) == 2


@pytest.mark.parametrize("spec", ["re:nothing_matches", "bogus", "last:0", "last:6", "last:x", "re:(", ""])
def test_linearize_predicate_errors(resnet, spec):
    _, variables, _ = resnet
    with pytest.raises(ConfigError):
        m.linearize_predicate(variables["params"], spec)


def test_count_params(key):
    variables = m.init_variables(m.MLP(hidden=(5,), num_classes=10), key, DIGITS)
    assert m.count_params(variables["params"]) == 64 * 5 + 5 + 5 * 10 + 10
