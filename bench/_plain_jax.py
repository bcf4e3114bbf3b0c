"""The `plain-jax` peer: the DynamicNet step hand-written with jax.jit + optax.

This file must not import functorch_lite: it is what a JAX user would write without
the library, so that the benchmark shows what the library itself costs. It uses the
same loop as the library's `static_method="scan"` (a `lax.scan` over `max_depth`
whose steps past `depth` are skipped by `lax.cond`), so compare it with
`static-scan`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

__all__ = ["make_plain_jax_step"]


def _linear(p: dict, h: jax.Array) -> jax.Array:
    # Explicit bias broadcast: the tests run with jax_numpy_rank_promotion="raise".
    return h @ p["weight"] + p["bias"][None, :]


def make_plain_jax_step(
    max_depth: int, lr: float, momentum: float
) -> tuple[Any, optax.GradientTransformation]:
    """Return `(plain_jax_step, optimizer)` for the reference DynamicNet.

    `plain_jax_step(params, opt_state, x, y, depth) -> (params, opt_state, loss)`,
    with `depth` a traced int32 scalar, `params` and `opt_state` donated. The
    params tree is the library's: `{"input_linear": {"weight": (d_in, H), "bias":
    (H,)}, "middle_linear": ..., "output_linear": ...}`, float32.
    """
    optimizer = optax.sgd(lr, momentum=momentum)
    layer_index = jnp.arange(max_depth, dtype=jnp.int32)

    def forward(params: dict, x: jax.Array, depth: jax.Array) -> jax.Array:
        h = jax.nn.relu(_linear(params["input_linear"], x))

        def middle(h: jax.Array) -> jax.Array:
            return jax.nn.relu(_linear(params["middle_linear"], h))

        def body(h: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
            return lax.cond(i < depth, middle, lambda h_: h_, h), None

        h, _ = lax.scan(body, h, layer_index)
        return _linear(params["output_linear"], h)

    def loss_fn(params: dict, x: jax.Array, y: jax.Array, depth: jax.Array):
        return jnp.sum(jnp.square(forward(params, x, depth) - y))

    def plain_jax_step(params, opt_state, x, y, depth):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, depth)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(plain_jax_step, donate_argnums=(0, 1)), optimizer
