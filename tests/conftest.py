"""Strict numerics for the whole suite, two fake CPU devices, and a PRNG-key fixture."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

from jaxforget import compat  # noqa: E402

compat.set_cpu_device_count(2)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Small models compile much faster without XLA's heavier passes; results are unchanged.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture
def key():
    """A fresh PRNG key per test."""
    return jax.random.key(0)
