"""Shared pytest set-up: strict numerics and a fresh `key` per test."""

import jax
import pytest

# Catch silent broadcasting and silent dtype upcasts in the library.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key() -> jax.Array:
    """A fresh PRNG key; the same for every test so that failures reproduce."""
    return jax.random.key(0)
