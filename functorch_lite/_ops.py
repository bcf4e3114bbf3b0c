"""Array operations that XLA's CPU backend runs faster in another form."""

from __future__ import annotations

import jax


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for `x` of any rank >= 1 and a 2-D `w`, as one 2-D matmul.

    The leading axes of `x` are folded into one before the matmul and unfolded
    after. Same values as `x @ w`; the difference is the reverse pass: for a
    3-D `x`, the gradient of `w` is a contraction over two axes, which XLA's
    CPU backend ran 3-4x slower than the same product as a 2-D matmul
    (bench/lstm_core.py, the sequence workload's input projection and head).
    """
    if x.ndim <= 2:
        return x @ w
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*lead, w.shape[-1])
