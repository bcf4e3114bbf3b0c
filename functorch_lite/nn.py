"""Layers as `(init, apply)` pure-function pairs over parameter pytrees, and losses."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from functorch_lite._checks import check_int

__all__ = ["Layer", "linear", "mse_loss", "relu"]

Params = Any


class Layer(NamedTuple):
    """A layer: `init(key) -> params` and `apply(params, x) -> y`, both pure.

    Hyperparameters live in the closure as Python values, never as leaves.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]


def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    # Explicit broadcast: the library stays correct under
    # `jax_numpy_rank_promotion="raise"`, which users may switch on.
    return y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)


def linear(d_in: int, d_out: int, *, bias: bool = True) -> Layer:
    """Create a fully connected layer, initialized like `torch.nn.Linear`.

    `weight` has shape `(d_in, d_out)` so that `x @ weight + bias` needs no
    transpose; `weight` and `bias` are drawn from U(-1/sqrt(d_in), 1/sqrt(d_in)),
    float32.

    Args:
      d_in: input features.
      d_out: output features.
      bias: whether the layer has a `bias` leaf of shape `(d_out,)`.

    Returns:
      A `Layer` whose `apply(params, x)` maps `x` of shape `(..., d_in)` to
      `(..., d_out)`.

    >>> import jax, jax.numpy as jnp
    >>> import functorch_lite as fl
    >>> layer = fl.nn.linear(3, 2)
    >>> params = layer.init(jax.random.key(0))
    >>> {k: v.shape for k, v in params.items()}
    {'weight': (3, 2), 'bias': (2,)}
    >>> layer.apply(params, jnp.ones((5, 3))).shape
    (5, 2)
    """
    for name, value in (("d_in", d_in), ("d_out", d_out)):
        check_int(value, where="linear", name=name, minimum=1)
    bound = 1.0 / math.sqrt(d_in)

    def init(key: jax.Array) -> Params:
        w_key, b_key = jax.random.split(key)
        params = {
            "weight": jax.random.uniform(
                w_key, (d_in, d_out), jnp.float32, -bound, bound
            )
        }
        if bias:
            params["bias"] = jax.random.uniform(
                b_key, (d_out,), jnp.float32, -bound, bound
            )
        return params

    def apply(params: Params, x: jax.Array) -> jax.Array:
        _check_linear_apply(params, x, d_in, d_out, bias)
        y = x @ params["weight"]
        return _add_bias(y, params["bias"]) if bias else y

    return Layer(init, apply)


def _check_linear_apply(params: Any, x: Any, d_in: int, d_out: int, bias: bool) -> None:
    """Shapes and dtypes only: free under jit, where they are static."""
    where = f"linear({d_in}, {d_out}).apply"
    want = {"weight": (d_in, d_out)} | ({"bias": (d_out,)} if bias else {})
    if not isinstance(params, dict) or set(params) != set(want):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise TypeError(
            f"{where}: `params` must be a dict with keys {sorted(want)}; got {got}. "
            "Create it with the layer's `init(key)`."
        )
    for key, shape in want.items():
        if jnp.shape(params[key]) != shape:
            raise ValueError(
                f"{where}: `params['{key}']` must have shape {shape}; got "
                f"{jnp.shape(params[key])}."
            )
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{where}: `x` must be an array; got {type(x).__name__}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{where}: `x` must have a floating dtype; got {x.dtype}. Cast it, "
            "for example `x.astype(jnp.float32)`."
        )
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(
            f"{where}: `x` must have shape (..., {d_in}); got {tuple(x.shape)}."
        )


def relu() -> Layer:
    """Create a parameter-free ReLU layer (its params are `{}`).

    >>> import jax.numpy as jnp
    >>> import functorch_lite as fl
    >>> fl.nn.relu().apply({}, jnp.array([-1.0, 2.0]))
    Array([0., 2.], dtype=float32)
    """
    return Layer(lambda key: {}, lambda params, x: jax.nn.relu(x))


def mse_loss(
    pred: jax.Array,
    target: jax.Array,
    *,
    reduction: str = "sum",
    mask: jax.Array | None = None,
) -> jax.Array:
    """Compute the squared error between `pred` and `target`.

    Args:
      pred: predictions, any shape, floating dtype.
      target: targets, the same shape as `pred`.
      reduction: `"sum"` (the reference programs' loss) or `"mean"` over every
        element, as in `torch.nn.functional.mse_loss`.
      mask: optional `(N,)` row weights, 1 for real rows and 0 for padding
        (from `fl.train.pad_batch`): padded rows add exactly nothing, to the
        loss and to its gradient, whatever they hold (even NaN or Inf), and
        `"mean"` divides by the real rows only, so the loss equals the
        unpadded one. With `"mean"`, a mask with no real row raises
        `ValueError` when concrete, and gives NaN when traced.

    Returns:
      A scalar.

    >>> import jax.numpy as jnp
    >>> import functorch_lite as fl
    >>> fl.nn.mse_loss(jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0]))
    Array(5., dtype=float32)
    >>> fl.nn.mse_loss(jnp.array([1.0, 2.0]), jnp.zeros(2), reduction="mean")
    Array(2.5, dtype=float32)
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(
            f'mse_loss: `reduction` must be "sum" or "mean"; got {reduction!r}.'
        )
    for name, value in (("pred", pred), ("target", target)):
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise TypeError(
                f"mse_loss: `{name}` must be an array; got {type(value).__name__}."
            )
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(
                f"mse_loss: `{name}` must have a floating dtype; got {value.dtype}. "
                "Cast it, for example `.astype(jnp.float32)`."
            )
    pred_dtype = jax.dtypes.canonicalize_dtype(pred.dtype)
    target_dtype = jax.dtypes.canonicalize_dtype(target.dtype)
    if pred_dtype != target_dtype:
        raise TypeError(
            f"mse_loss: `pred` and `target` must have the same dtype; got "
            f"{pred_dtype} and {target_dtype}. Cast one of them."
        )
    pred_shape, target_shape = jnp.shape(pred), jnp.shape(target)
    if pred_shape != target_shape:
        raise ValueError(
            f"mse_loss: `pred` and `target` must have the same shape; got "
            f"{pred_shape} and {target_shape}. Reshape one of them; the loss does "
            "not broadcast, so that a (N,) vs (N, 1) mix-up cannot pass silently."
        )
    if mask is None:
        sq = jnp.square(pred - target)
        return jnp.sum(sq) if reduction == "sum" else jnp.mean(sq)
    mask_shape = jnp.shape(mask)
    if len(pred_shape) == 0 or mask_shape != pred_shape[:1]:
        raise ValueError(
            f"mse_loss: `mask` must have shape (N,) = {pred_shape[:1]}, one weight "
            f"per row of `pred`; got {mask_shape}."
        )
    weights = jnp.asarray(mask, pred_dtype).reshape(
        mask_shape + (1,) * (len(pred_shape) - 1)
    )
    # Select, do not multiply: 0 * Inf is NaN. The difference itself is
    # selected, so that the gradient of a dropped row is 0, not 0 * Inf.
    diff = jnp.where(weights != 0, pred - target, 0)
    total = jnp.sum(jnp.square(diff) * weights)
    if reduction == "sum":
        return total
    if not isinstance(mask, Tracer) and not np.any(np.asarray(mask)):
        raise ValueError(
            'mse_loss: with reduction="mean", `mask` must keep at least one row; '
            "got a mask of zeros, whose mean is undefined."
        )
    per_row = math.prod(pred_shape[1:])
    return total / (jnp.sum(weights) * per_row)
