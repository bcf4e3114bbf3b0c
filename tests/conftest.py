"""Shared pytest set-up: strict numerics and a fresh `key` per test."""

import contextlib
import warnings

import jax
import pytest

# On a failing property test, hypothesis imports libcst to suggest a patch; that
# import warns (a DeprecationWarning from mypy_extensions), and
# `filterwarnings = error` turns it into an INTERNALERROR that hides every
# result. Import it quietly up front.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with contextlib.suppress(ImportError):
        import libcst  # noqa: F401

# Catch silent broadcasting and silent dtype upcasts in the library.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key() -> jax.Array:
    """A fresh PRNG key; the same for every test so that failures reproduce."""
    return jax.random.key(0)
