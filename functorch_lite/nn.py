"""Layers as `(init, apply)` pure-function pairs over parameter pytrees, and losses."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from functorch_lite._checks import check_int, reject_torch

# Imported here too (the layers themselves are re-exported at the bottom): the
# dtype argument check shared by every layer. `_recurrent` does not import `nn`.
from functorch_lite._ops import dense
from functorch_lite._recurrent import _float_dtype

__all__ = [
    "Layer",
    "RecurrentLayer",
    "cross_entropy",
    "embedding",
    "linear",
    "lstm",
    "mse_loss",
    "relu",
    "rnn",
]

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


def _cast(value: Any, dtype: Any) -> Any:
    """`value` as an array of `dtype`; unchanged when `dtype` is None."""
    return value if dtype is None else jnp.asarray(value, dtype)


def linear(
    d_in: int,
    d_out: int,
    *,
    bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Layer:
    """Create a fully connected layer, initialized like `torch.nn.Linear`.

    `weight` has shape `(d_in, d_out)` so that `x @ weight + bias` needs no
    transpose; `weight` and `bias` are drawn from U(-1/sqrt(d_in), 1/sqrt(d_in)),
    in `param_dtype` (float32 by default).

    Mixed precision (the Flax convention): with a compute `dtype`, `apply`
    casts `x` and the params to it and returns `dtype`; gradients with respect
    to the params still come back in their own dtype (the cast's transpose
    casts them back), so an optimizer updates float32 master weights.

    Args:
      d_in: input features.
      d_out: output features.
      bias: whether the layer has a `bias` leaf of shape `(d_out,)`.
      dtype: the compute dtype, for example `jnp.bfloat16`; None (the default)
        casts nothing.
      param_dtype: the dtype `init` creates the params in.

    Returns:
      A `Layer` whose `apply(params, x)` maps `x` of shape `(..., d_in)` (any
      leading batch axes) to `(..., d_out)`. `params` may be any `Mapping`
      with the keys of `init`'s dict.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> layer = fl.nn.linear(3, 2)
      >>> params = layer.init(jax.random.key(0))
      >>> {k: v.shape for k, v in params.items()}
      {'weight': (3, 2), 'bias': (2,)}
      >>> layer.apply(params, jnp.ones((5, 3))).shape
      (5, 2)
      >>> half = fl.nn.linear(3, 2, dtype=jnp.bfloat16)  # float32 params
      >>> half.apply(params, jnp.ones((4, 5, 3))).dtype
      dtype(bfloat16)
    """
    for name, value in (("d_in", d_in), ("d_out", d_out)):
        check_int(value, where="linear", name=name, minimum=1)
    dtype = _float_dtype(dtype, where="linear", name="dtype", optional=True)
    param_dtype = _float_dtype(
        param_dtype, where="linear", name="param_dtype", optional=False
    )
    bound = 1.0 / math.sqrt(d_in)

    def init(key: jax.Array) -> Params:
        w_key, b_key = jax.random.split(key)
        params = {
            "weight": jax.random.uniform(
                w_key, (d_in, d_out), param_dtype, -bound, bound
            )
        }
        if bias:
            params["bias"] = jax.random.uniform(
                b_key, (d_out,), param_dtype, -bound, bound
            )
        return params

    def apply(params: Params, x: jax.Array) -> jax.Array:
        _check_linear_apply(params, x, d_in, d_out, bias, dtype)
        y = dense(_cast(x, dtype), _cast(params["weight"], dtype))
        return _add_bias(y, _cast(params["bias"], dtype)) if bias else y

    return Layer(init, apply)


def _check_linear_apply(
    params: Any, x: Any, d_in: int, d_out: int, bias: bool, dtype: Any
) -> None:
    """Shapes and dtypes only: free under jit, where they are static."""
    where = f"linear({d_in}, {d_out}).apply"
    reject_torch(x, where=where, name="x")
    reject_torch(params, where=where, name="params")
    want = {"weight": (d_in, d_out)} | ({"bias": (d_out,)} if bias else {})
    if not isinstance(params, Mapping) or set(params) != set(want):
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise TypeError(
            f"{where}: `params` must be a dict with keys {sorted(want)} (or another "
            f"Mapping); got {got}. Create it with the layer's `init(key)`."
        )
    for key, shape in want.items():
        if jnp.shape(params[key]) != shape:
            raise ValueError(
                f"{where}: `params['{key}']` must have shape {shape}; got "
                f"{jnp.shape(params[key])}."
            )
        if dtype is not None and not jnp.issubdtype(
            jnp.result_type(params[key]), jnp.floating
        ):
            raise TypeError(
                f"{where}: `params['{key}']` must have a floating dtype to be cast "
                f"to the compute dtype {dtype}; got {jnp.result_type(params[key])}."
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

    Examples:
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
      target: targets, the same shape and dtype as `pred`. Half-precision
        inputs (bfloat16, float16) are upcast to float32 inside: the loss is
        summed, and returned, in float32.
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

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> fl.nn.mse_loss(jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0]))
      Array(5., dtype=float32)
      >>> fl.nn.mse_loss(jnp.array([1.0, 2.0]), jnp.zeros(2), reduction="mean")
      Array(2.5, dtype=float32)
      >>> half = jnp.array([1.0, 2.0], jnp.bfloat16)
      >>> fl.nn.mse_loss(half, jnp.zeros(2, jnp.bfloat16))
      Array(5., dtype=float32)
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(
            f'mse_loss: `reduction` must be "sum" or "mean"; got {reduction!r}.'
        )
    for name, value in (("pred", pred), ("target", target)):
        reject_torch(value, where="mse_loss", name=name)
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
    if jnp.dtype(pred_dtype).itemsize < 4:
        # Half precision: square and sum in float32 (8 bits of mantissa would
        # lose the small terms of a long sum).
        pred_dtype = jnp.dtype(jnp.float32)
        pred, target = jnp.asarray(pred, pred_dtype), jnp.asarray(target, pred_dtype)
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


def _check_array(value: Any, *, where: str, name: str) -> None:
    reject_torch(value, where=where, name=name)
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(
            f"{where}: `{name}` must be an array; got {type(value).__name__}."
        )


def _check_int_dtype(value: Any, *, where: str, name: str, what: str) -> None:
    _check_array(value, where=where, name=name)
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(
            f"{where}: `{name}` must have an integer dtype ({what}); got "
            f"{value.dtype}. Cast it, for example `.astype(jnp.int32)`."
        )


def _check_concrete_range(
    value: Any, upper: int, *, where: str, name: str, what: str, keep: Any = None
) -> None:
    """Raise `ValueError` if concrete `value` (where `keep`) leaves `[0, upper)`.

    A traced `value` cannot be read: its check is skipped, and the caller's
    NaN fill reports a bad entry instead.
    """
    if isinstance(value, Tracer):
        return
    values = np.asarray(value)
    if keep is not None:
        values = values[np.asarray(keep) != 0]
    bad = values[(values < 0) | (values >= upper)]
    if bad.size:
        raise ValueError(
            f"{where}: `{name}` must be {what} in [0, {upper}); got {int(bad.flat[0])}"
            f"{f' (and {bad.size - 1} more)' if bad.size > 1 else ''}."
        )


def embedding(
    num_embeddings: int,
    embedding_dim: int,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Layer:
    """Create a lookup table layer, initialized like `torch.nn.Embedding`.

    `weight` has shape `(num_embeddings, embedding_dim)`, one row per token
    (the same layout as torch, no transpose), drawn from N(0, 1), in
    `param_dtype` (float32 by default).

    Args:
      num_embeddings: the number of tokens (rows of the table).
      embedding_dim: the size of each token's vector.
      dtype: the compute dtype: the looked-up rows are cast to it (their
        gradient comes back in the table's dtype). None (the default) casts
        nothing.
      param_dtype: the dtype `init` creates the table in.

    Returns:
      A `Layer` whose `apply(params, ids)` maps integer `ids` of any shape to
      `params["weight"][ids]`, of shape `ids.shape + (embedding_dim,)`.
      Concrete `ids` outside `[0, num_embeddings)` raise `ValueError`. Traced
      ids (inside `jit`, `vmap`, `lax.scan` and the like) cannot be checked; the
      lookup uses `jnp.take(..., mode="fill", fill_value=nan)`, so an
      out-of-range id, negative ones included, gives a row of NaN (and no
      gradient) rather than JAX's default silent clamp or wrap-around.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> layer = fl.nn.embedding(10, 4)
      >>> params = layer.init(jax.random.key(0))
      >>> params["weight"].shape, params["weight"].dtype
      ((10, 4), dtype('float32'))
      >>> layer.apply(params, jnp.array([[1, 2, 3], [4, 5, 6]])).shape
      (2, 3, 4)
      >>> bool(jnp.all(layer.apply(params, jnp.array(7)) == params["weight"][7]))
      True
      >>> fl.nn.embedding(10, 4, dtype=jnp.bfloat16).apply(params, jnp.array(7)).dtype
      dtype(bfloat16)
    """
    for name, value in (
        ("num_embeddings", num_embeddings),
        ("embedding_dim", embedding_dim),
    ):
        check_int(value, where="embedding", name=name, minimum=1)
    num_embeddings, embedding_dim = int(num_embeddings), int(embedding_dim)
    dtype = _float_dtype(dtype, where="embedding", name="dtype", optional=True)
    param_dtype = _float_dtype(
        param_dtype, where="embedding", name="param_dtype", optional=False
    )

    def init(key: jax.Array) -> Params:
        return {
            "weight": jax.random.normal(
                key, (num_embeddings, embedding_dim), param_dtype
            )
        }

    def apply(params: Params, ids: jax.Array) -> jax.Array:
        where = f"embedding({num_embeddings}, {embedding_dim}).apply"
        reject_torch(ids, where=where, name="ids")
        reject_torch(params, where=where, name="params")
        _check_embedding_params(params, where, (num_embeddings, embedding_dim))
        _check_int_dtype(ids, where=where, name="ids", what="token indices")
        _check_concrete_range(
            ids, num_embeddings, where=where, name="ids", what="token indices"
        )
        rows = jnp.take(params["weight"], ids, axis=0, mode="fill", fill_value=jnp.nan)
        # Cast the rows, not the table: only what is looked up is converted.
        rows = _cast(rows, dtype)
        if jnp.issubdtype(ids.dtype, jnp.unsignedinteger):
            return rows
        # `jnp.take` wraps ids in [-num_embeddings, 0) around, as Python does;
        # an embedding has no such ids, so they become NaN too.
        negative = jnp.expand_dims(jnp.asarray(ids) < 0, -1)
        return jnp.where(negative, jnp.nan, rows)

    return Layer(init, apply)


def _check_embedding_params(params: Any, where: str, shape: tuple[int, int]) -> None:
    """Structure, shape and dtype only: free under jit, where they are static."""
    if not isinstance(params, Mapping) or set(params) != {"weight"}:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise TypeError(
            f"{where}: `params` must be a dict with keys ['weight'] (or another "
            f"Mapping); got {got}. Create it with the layer's `init(key)`."
        )
    weight = params["weight"]
    if jnp.shape(weight) != shape:
        raise ValueError(
            f"{where}: `params['weight']` must have shape {shape}; got "
            f"{jnp.shape(weight)}."
        )
    if not jnp.issubdtype(jnp.result_type(weight), jnp.floating):
        raise TypeError(
            f"{where}: `params['weight']` must have a floating dtype; got "
            f"{jnp.result_type(weight)}."
        )


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    *,
    mask: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Compute the softmax cross-entropy of `logits` against class `targets`.

    The semantics of `torch.nn.functional.cross_entropy` with class-index
    targets, except that the class axis is the LAST axis of `logits`
    (torch wants it at axis 1): for torch's `(N, C, T)` input, pass
    `(N, T, C)`, for example `jnp.moveaxis(x, 1, -1)`. The log-softmax is
    computed stably (shifted by the row maximum).

    Args:
      logits: unnormalized scores of shape `(..., C)`, floating dtype.
        Half-precision logits (bfloat16, float16) are upcast to float32
        inside: the log-softmax and the loss are computed, and returned, in
        float32.
      targets: class indices of shape `(...)` (the shape of `logits` without
        its last axis), integer dtype, in `[0, C)`. Concrete targets outside
        it raise `ValueError` (at real positions only, when `mask` is
        concrete); traced ones cannot be checked and give a NaN loss.
      mask: optional array shaped like `targets`, bool or numeric, 1 (or
        True) for real positions and 0 for padding. Padded positions add
        exactly nothing, to the loss and to its gradient, whatever their
        logits and targets hold (even NaN, Inf or an out-of-range class),
        as with torch's `ignore_index`. Other values weight their position,
        as in `mse_loss`.
      reduction: `"mean"` (divided by the number of real positions: all of
        them without `mask`, `sum(mask)` with it, as torch does with
        `ignore_index`), `"sum"`, or `"none"` (per-position losses of shape
        `targets.shape`, 0 at padded positions). With `"mean"`, a mask with
        no real position raises `ValueError` when concrete, and gives NaN
        when traced.

    Returns:
      A scalar, or an array of shape `targets.shape` for `"none"`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
      >>> fl.nn.cross_entropy(logits, jnp.array([0, 1])).round(4)
      Array(0.1269, dtype=float32)
      >>> fl.nn.cross_entropy(logits, jnp.array([0, 0]), reduction="none").round(4)
      Array([0.1269, 2.1269], dtype=float32)
      >>> mask = jnp.array([1.0, 0.0])  # the second position is padding
      >>> fl.nn.cross_entropy(logits, jnp.array([0, 0]), mask=mask).round(4)
      Array(0.1269, dtype=float32)
      >>> fl.nn.cross_entropy(logits.astype(jnp.bfloat16), jnp.array([0, 1])).dtype
      dtype('float32')
    """
    where = "cross_entropy"
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f'{where}: `reduction` must be "mean", "sum" or "none"; got {reduction!r}.'
        )
    _check_array(logits, where=where, name="logits")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(
            f"{where}: `logits` must have a floating dtype; got {logits.dtype}. "
            "Cast it, for example `.astype(jnp.float32)`."
        )
    _check_int_dtype(targets, where=where, name="targets", what="class indices")
    logits_shape, targets_shape = tuple(jnp.shape(logits)), tuple(jnp.shape(targets))
    if len(logits_shape) == 0 or logits_shape[-1] == 0:
        raise ValueError(
            f"{where}: `logits` must have shape (..., C) with C >= 1 classes on "
            f"the last axis; got {logits_shape}."
        )
    num_classes = logits_shape[-1]
    if logits_shape[:-1] != targets_shape:
        raise ValueError(
            f"{where}: `targets` must have shape {logits_shape[:-1]}, the shape of "
            f"`logits` {logits_shape} without its last (class) axis; got "
            f"{targets_shape}. The class axis is last, not at axis 1 as in torch: "
            "move it with `jnp.moveaxis(logits, 1, -1)`."
        )
    dtype = jax.dtypes.canonicalize_dtype(logits.dtype)
    if jnp.dtype(dtype).itemsize < 4:
        # Half precision: the log-softmax's sum of exponentials in float32.
        dtype = jnp.dtype(jnp.float32)
        logits = jnp.asarray(logits, dtype)
    if mask is not None:
        _check_array(mask, where=where, name="mask")
        if not (
            jnp.issubdtype(mask.dtype, jnp.bool_)
            or jnp.issubdtype(mask.dtype, jnp.integer)
            or jnp.issubdtype(mask.dtype, jnp.floating)
        ):
            raise TypeError(
                f"{where}: `mask` must have a bool, integer or floating dtype; got "
                f"{mask.dtype}."
            )
        if tuple(jnp.shape(mask)) != targets_shape:
            raise ValueError(
                f"{where}: `mask` must have the shape of `targets` {targets_shape}, "
                f"one weight per position; got {tuple(jnp.shape(mask))}."
            )
    concrete_mask = mask is not None and not isinstance(mask, Tracer)
    if reduction == "mean" and concrete_mask and not np.any(np.asarray(mask)):
        raise ValueError(
            f'{where}: with reduction="mean", `mask` must keep at least one '
            "position; got a mask of zeros, whose mean is undefined."
        )
    if mask is None or concrete_mask:
        _check_concrete_range(
            targets,
            num_classes,
            where=where,
            name="targets",
            what="class indices",
            keep=mask,
        )
    targets = jnp.asarray(targets)
    weights = None if mask is None else jnp.asarray(mask).astype(dtype)
    safe_logits = logits
    if weights is not None:
        # Select, do not multiply: 0 * Inf is NaN. The logits themselves are
        # selected, so that a padded position's log-softmax, and its gradient,
        # never see what it holds.
        safe_logits = jnp.where(jnp.expand_dims(weights != 0, -1), logits, 0)
    log_probs = jax.nn.log_softmax(safe_logits, axis=-1)
    in_range = targets >= 0
    if num_classes <= jnp.iinfo(targets.dtype).max:
        # Guarded: a weakly typed Python int too large for a narrow dtype
        # (300 in uint8) would wrap around, not compare.
        in_range &= targets < num_classes
    picked = jnp.take_along_axis(
        log_probs, jnp.expand_dims(jnp.where(in_range, targets, 0), -1), axis=-1
    )[..., 0]
    # A traced out-of-range target cannot raise: it shows as NaN.
    nll = jnp.where(in_range, -picked, jnp.nan)
    if weights is not None:
        nll = jnp.where(weights != 0, nll * weights, 0)
    if reduction == "none":
        return nll
    total = jnp.sum(nll)
    if reduction == "sum":
        return total
    if weights is None:
        return total / math.prod(targets_shape)
    return total / jnp.sum(weights)


# The recurrent layers live in their own module (one screenful of concepts per
# module); they are part of `fl.nn`. Imported last: they use `Layer`'s module.
from functorch_lite._recurrent import RecurrentLayer, lstm, rnn  # noqa: E402
