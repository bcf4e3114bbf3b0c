"""The models: `TwoLayerNet`, `DynamicNet` and `CharLSTM`, built from `nn` and loops.

`TwoLayerNet` and `DynamicNet` are the two reference programs; `CharLSTM` is a
character-level language model over variable-length lines.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from functorch_lite import nn
from functorch_lite._checks import check_int, reject_torch
from functorch_lite._recurrent import _float_dtype
from functorch_lite._trees import leaf_pairs, structure_diff
from functorch_lite.control import (
    STATIC_METHODS,
    check_concrete_count,
    check_per_example_counts,
    check_static_count,
    is_per_example,
    repeat,
)

__all__ = ["CharLSTM", "DynamicNet", "TwoLayerNet", "check_params", "check_x"]

Params = Any


def check_x(x: Any, d_in: int, *, where: str, leading_axes: bool = False) -> None:
    """Raise a clear error unless `x` is float with shape `(d_in,)` or `(N, d_in)`.

    The input check of the models' `apply`, public for models of your own.

    Args:
      x: the input to check.
      d_in: the expected number of features.
      where: the function to name in the error.
      leading_axes: accept any number of leading batch axes, `(..., d_in)`,
        as `fl.nn.linear` does.

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> fl.models.check_x(jnp.ones((2, 3)), 3, where="MyNet.apply")
      >>> fl.models.check_x(jnp.ones((2, 4)), 3, where="MyNet.apply")
      Traceback (most recent call last):
      ...
      ValueError: MyNet.apply: `x` must have shape (N, 3) or (3,); got (2, 4).
      >>> fl.models.check_x(jnp.ones((2, 5, 3)), 3, where="MyNet", leading_axes=True)
    """
    reject_torch(x, where=where, name="x")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(
            f"{where}: `x` must be a float array of shape (N, {d_in}); got "
            f"{type(x).__name__}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{where}: `x` must have a floating dtype; got {x.dtype}. Cast it, for "
            "example `x.astype(jnp.float32)`."
        )
    if leading_axes:
        if x.ndim < 1 or x.shape[-1] != d_in:
            raise ValueError(
                f"{where}: `x` must have shape (N, {d_in}) or ({d_in},), or more "
                f"leading batch axes (..., {d_in}); got {tuple(x.shape)}."
            )
        return
    if x.ndim not in (1, 2) or x.shape[-1] != d_in:
        raise ValueError(
            f"{where}: `x` must have shape (N, {d_in}) or ({d_in},); got "
            f"{tuple(x.shape)}."
        )


def check_params(params: Any, expected: Any, *, where: str) -> None:
    """Raise a clear error unless `params` has `expected`'s tree and shapes.

    Every leaf must also have a floating dtype (which one is not checked
    here). The params check of the models' `apply`, public for models of your
    own.

    Args:
      params: the tree to check.
      expected: a tree of `jax.ShapeDtypeStruct`, from `jax.eval_shape(init, key)`.
      where: the function to name in the error.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> layer = fl.nn.linear(3, 2)
      >>> spec = jax.eval_shape(layer.init, jax.random.key(0))
      >>> fl.models.check_params(layer.init(jax.random.key(1)), spec, where="MyNet")
      >>> fl.models.check_params({"weight": jnp.ones((3, 2))}, spec, where="MyNet")
      Traceback (most recent call last):
      ...
      TypeError: MyNet: `params` has the wrong tree structure.
      ...
    """
    reject_torch(params, where=where, name="params")
    if (diff := structure_diff(params, expected)) is not None:
        raise TypeError(
            f"{where}: `params` has the wrong tree structure.\n{diff}\n"
            "Create params with `init(key)` (or `fl.interop.from_torch`)."
        )
    for name, got, want in leaf_pairs(params, expected):
        shape = tuple(getattr(got, "shape", ()))
        dtype = getattr(got, "dtype", None)
        if shape != want.shape:
            raise ValueError(
                f"{where}: `params{name}` must have shape {want.shape}; got {shape}."
            )
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{where}: `params{name}` must have a floating dtype; got "
                f"{dtype if dtype is not None else type(got).__name__}."
            )


def check_dtypes(params: Any, x: Any, *, where: str) -> None:
    """Raise a clear error unless every `params` leaf has `x`'s (canonical) dtype."""
    want = jax.dtypes.canonicalize_dtype(x.dtype)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        got = jax.dtypes.canonicalize_dtype(leaf.dtype)
        if got != want:
            raise TypeError(
                f"{where}: `x` has dtype {want} but `params"
                f"{jax.tree_util.keystr(path)}` has {got}; they must match. Cast "
                f"one of them, for example `x.astype(jnp.{got})`, or give the "
                "model a compute `dtype` (for example `dtype=jnp.bfloat16`) to "
                "cast both to."
            )


def _check_model_dtypes(model: Any, where: str) -> None:
    """Normalize a frozen model's `dtype` / `param_dtype` fields (hashable dtypes)."""
    object.__setattr__(
        model,
        "dtype",
        _float_dtype(model.dtype, where=where, name="dtype", optional=True),
    )
    object.__setattr__(
        model,
        "param_dtype",
        _float_dtype(
            model.param_dtype, where=where, name="param_dtype", optional=False
        ),
    )


def _cast_inputs(
    model: Any, params: Params, x: jax.Array, *, where: str
) -> tuple[Params, jax.Array]:
    """Cast `params` and `x` to the model's compute dtype; check them without one."""
    if model.dtype is None:
        check_dtypes(params, x, where=where)
        return params, x
    cast = lambda a: jnp.asarray(a, model.dtype)
    return jax.tree.map(cast, params), cast(x)


@functools.lru_cache(maxsize=64)
def _param_spec(model: Any) -> Any:
    # Models are frozen dataclasses, so hashable: the expected tree is traced once.
    return jax.eval_shape(model.init, jax.random.key(0))


def _init_layers(layers: dict[str, Any], key: jax.Array) -> Params:
    """`{name: layer.init(k)}`, splitting `key` once per layer, in order."""
    keys = jax.random.split(key, len(layers))
    return {
        name: layer.init(k)
        for (name, layer), k in zip(layers.items(), keys, strict=True)
    }


def _check_sizes(where: str, **sizes: Any) -> None:
    for name, value in sizes.items():
        check_int(value, where=where, name=name, minimum=1)


@dataclasses.dataclass(frozen=True)
class TwoLayerNet:
    """The TensorFlow 1 reference net: `relu(x @ w1) @ w2`, no biases.

    Weights are drawn from N(0, 1), as in the reference program.

    Mixed precision (the Flax convention): `param_dtype` (float32 by default)
    is the dtype `init` creates the params in; `dtype` is the compute dtype.
    With `dtype` given, `apply` casts the params and `x` to it and returns
    it; gradients with respect to the params come back in `param_dtype` (the
    cast's transpose casts them back), so an optimizer updates float32 master
    weights. With `dtype=None` (the default) nothing is cast, and `x` must
    have the params' dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> net = fl.models.TwoLayerNet(4, 3, 2)
      >>> params = net.init(jax.random.key(0))
      >>> {k: v.shape for k, v in params.items()}
      {'w1': (4, 3), 'w2': (3, 2)}
      >>> net.apply(params, jnp.ones((5, 4))).shape
      (5, 2)
      >>> half = fl.models.TwoLayerNet(4, 3, 2, dtype=jnp.bfloat16)
      >>> half.apply(params, jnp.ones((5, 4))).dtype
      dtype(bfloat16)
    """

    d_in: int
    d_hidden: int
    d_out: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _check_sizes(
            "TwoLayerNet", d_in=self.d_in, d_hidden=self.d_hidden, d_out=self.d_out
        )
        _check_model_dtypes(self, "TwoLayerNet")

    def init(self, key: jax.Array) -> Params:
        """Draw `w1` `(d_in, d_hidden)` and `w2` `(d_hidden, d_out)` from N(0, 1)."""
        k1, k2 = jax.random.split(key)
        dtype = self.param_dtype
        return {
            "w1": jax.random.normal(k1, (self.d_in, self.d_hidden), dtype),
            "w2": jax.random.normal(k2, (self.d_hidden, self.d_out), dtype),
        }

    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        """Compute `relu(x @ w1) @ w2` for `x` of shape `(N, d_in)`, float."""
        where = "TwoLayerNet.apply"
        check_params(params, _param_spec(self), where=where)
        check_x(x, self.d_in, where=where)
        params, x = _cast_inputs(self, params, x, where=where)
        return jax.nn.relu(x @ params["w1"]) @ params["w2"]


@dataclasses.dataclass(frozen=True)
class DynamicNet:
    """The PyTorch reference net: a shared middle layer applied `depth` times.

    `y = output_linear(relu(middle_linear)^depth(relu(input_linear(x))))`. Each
    linear layer is initialized like `torch.nn.Linear`.

    Attributes:
      d_in, d_hidden, d_out: layer sizes.
      max_depth: the largest `depth` that `apply` accepts.
      static_method: the loop mechanism of the static path (see `fl.repeat`):
        `"bounded"` (default, fastest), `"scan"` (also forward-mode
        differentiable) or `"masked"`.
      dtype: the compute dtype, for example `jnp.bfloat16`, or None (the
        default): no cast, and `x` must have the params' dtype. With a
        `dtype`, `apply` casts the params and `x` to it and returns it;
        gradients with respect to the params come back in `param_dtype` (the
        cast's transpose casts them back), so an optimizer updates float32
        master weights (the Flax convention).
      param_dtype: the dtype `init` creates the params in (float32).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> net = fl.models.DynamicNet(4, 8, 2, max_depth=3)
      >>> params = net.init(jax.random.key(0))
      >>> sorted(params)
      ['input_linear', 'middle_linear', 'output_linear']
      >>> x = jnp.ones((5, 4))
      >>> y_static = net.apply(params, x, 2, mode="static")
      >>> y_dynamic = net.apply(params, x, 2, mode="dynamic")
      >>> bool(jnp.allclose(y_static, y_dynamic, rtol=1e-6))
      True
      >>> net.apply(params, jnp.ones((2, 5, 4)), 2).shape  # any leading batch axes
      (2, 5, 2)
      >>> half = fl.models.DynamicNet(4, 8, 2, max_depth=3, dtype=jnp.bfloat16)
      >>> half.apply(params, x, 2).dtype
      dtype(bfloat16)
    """

    d_in: int
    d_hidden: int
    d_out: int
    max_depth: int = 3
    static_method: str = "bounded"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _check_sizes(
            "DynamicNet", d_in=self.d_in, d_hidden=self.d_hidden, d_out=self.d_out
        )
        check_int(self.max_depth, where="DynamicNet", name="max_depth", minimum=0)
        if self.static_method not in STATIC_METHODS:
            raise ValueError(
                f"DynamicNet: `static_method` must be one of {STATIC_METHODS}; got "
                f"{self.static_method!r}."
            )
        _check_model_dtypes(self, "DynamicNet")

    @property
    def _layers(self) -> dict[str, nn.Layer]:
        dtypes = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        return {
            "input_linear": nn.linear(self.d_in, self.d_hidden, **dtypes),
            "middle_linear": nn.linear(self.d_hidden, self.d_hidden, **dtypes),
            "output_linear": nn.linear(self.d_hidden, self.d_out, **dtypes),
        }

    def init(self, key: jax.Array) -> Params:
        """Initialize the three linear layers, splitting `key` once per layer."""
        return _init_layers(self._layers, key)

    def used_params(self, depth: int | jax.Array) -> dict[str, Any]:
        """Tell which layers a forward pass at `depth` uses: a prefix tree of bools.

        `middle_linear` is used iff `depth > 0`; a traced depth gives a traced
        bool. Pass it to `make_step(..., skip_unused=...)` to reproduce PyTorch
        2.x, which skips parameters that received no gradient. `depth` is
        checked as in `apply`.

        Examples:
          >>> import functorch_lite as fl
          >>> fl.models.DynamicNet(4, 8, 2).used_params(0)
          {'input_linear': True, 'middle_linear': False, 'output_linear': True}
        """
        where = "DynamicNet.used_params"
        if is_per_example(depth):
            dtype = jnp.result_type(depth)
            if not jnp.issubdtype(dtype, jnp.integer):
                raise TypeError(
                    f"{where}: a per-example `depth` must be an integer array; got "
                    f"dtype {dtype}."
                )
            if not isinstance(depth, Tracer):
                counts = jnp.asarray(depth)
                check_per_example_counts(
                    depth,
                    self.max_depth,
                    counts,
                    where=where,
                    name="depth",
                    dynamic=True,
                )
            middle_used: Any = jnp.any(jnp.asarray(depth) > 0)
            return {
                "input_linear": True,
                "middle_linear": middle_used,
                "output_linear": True,
            }
        if isinstance(depth, Tracer):
            check_static_count(depth, self.max_depth, where=where, name="depth")
            middle: Any = depth > 0
        else:
            middle = (
                check_concrete_count(depth, self.max_depth, where=where, name="depth")
                > 0
            )
        return {"input_linear": True, "middle_linear": middle, "output_linear": True}

    def apply(
        self,
        params: Params,
        x: jax.Array,
        depth: int | jax.Array,
        *,
        mode: str = "static",
    ) -> jax.Array:
        """Run the net for `x` of shape `(..., d_in)`, float.

        Args:
          params: the tree from `init`.
          x: the input batch, with any leading batch axes: `(N, d_in)`,
            `(B, T, d_in)`, or one example `(d_in,)`.
          depth: how many times the shared middle layer runs. With
            `mode="dynamic"`, a concrete int in `[0, max_depth]` (under `jit`,
            make it a static argument). With `mode="static"`, an int or an
            integer scalar that may be traced: one compiled graph serves every
            depth. In either mode it may also be an int array of shape `(N,)`
            for `x` of shape `(N, d_in)` (2-D `x` only: flatten more leading
            axes first, `x.reshape(-1, d_in)` with `depth.reshape(-1)`):
            each row runs at its own depth (the
            static mode in one compiled program for every depth pattern; the
            dynamic mode needs it concrete and runs each distinct depth's rows
            as a group). A concrete depth outside `[0, max_depth]` raises
            `ValueError`. A traced one (a depth passed to a `make_step`
            step is traced) is checked when the program runs, and raises
            `ValueError` with the same message (under a plain `jax.jit`, a
            `JaxRuntimeError` that ends with it). With
            `FUNCTORCH_LITE_CHECKS=0` the output (of each such row) is NaN
            instead, so that the loss shows it and `fit` stops on it; its
            gradients are zero.
          mode: `"static"` or `"dynamic"`.

        Returns:
          The output, shape `(..., d_out)`: `x`'s leading axes, `d_out`.
        """
        where = "DynamicNet.apply"
        if mode not in ("static", "dynamic"):
            raise ValueError(
                f'{where}: `mode` must be "static" or "dynamic"; got {mode!r}.'
            )
        check_params(params, _param_spec(self), where=where)
        check_x(x, self.d_in, where=where, leading_axes=True)
        # Cast once here, not in each pass of the loop (the layers' own casts
        # are then no-ops).
        params, x = _cast_inputs(self, params, x, where=where)
        lead = tuple(jnp.shape(x)[:-1])
        depth_array = isinstance(depth, Tracer | np.ndarray | jax.Array)
        if len(lead) != 1 and (
            is_per_example(depth)
            or (len(lead) > 1 and depth_array and jnp.ndim(depth) > 0)
        ):
            raise ValueError(
                f"{where}: a per-example `depth` of shape {jnp.shape(depth)} "
                f"needs `x` of shape (N, {self.d_in}); got {jnp.shape(x)}. For "
                f"more leading axes, flatten them: `x.reshape(-1, {self.d_in})` and "
                "`depth.reshape(-1)`."
            )
        if len(lead) > 1:
            # Any leading batch axes: run the flattened batch, then restore them.
            flat = jnp.reshape(x, (math.prod(lead), self.d_in))
            out = self._apply(params, flat, depth, mode=mode, where=where)
            return jnp.reshape(out, (*lead, self.d_out))
        return self._apply(params, x, depth, mode=mode, where=where)

    def _apply(
        self, params: Params, x: jax.Array, depth: Any, *, mode: str, where: str
    ) -> jax.Array:
        """`apply` for checked, cast `x` of shape `(N, d_in)` or `(d_in,)`."""
        layers = self._layers
        middle = layers["middle_linear"]
        h = jax.nn.relu(layers["input_linear"].apply(params["input_linear"], x))
        given = depth
        if is_per_example(depth):
            # `repeat` checks it against `h` (one row per example). The
            # checked value is used: an in-graph check stays in the program.
            depth = check_per_example_counts(
                depth,
                self.max_depth,
                h,
                where=where,
                name="depth",
                dynamic=mode == "dynamic",
            )
        else:
            check = check_concrete_count if mode == "dynamic" else check_static_count
            depth = check(depth, self.max_depth, where=where, name="depth")
        h = repeat(
            lambda h: jax.nn.relu(middle.apply(params["middle_linear"], h)),
            h,
            depth,
            max_n=self.max_depth,
            mode=mode,
            static_method=self.static_method,
        )
        out = layers["output_linear"].apply(params["output_linear"], h)
        if isinstance(given, Tracer):
            # Compared in the depth's own dtype: no int32 wrap-around.
            in_range = (given >= 0) & (given <= self.max_depth)
            if jnp.ndim(given) == 1:
                in_range = in_range[:, None]
            out = jnp.where(in_range, out, jnp.nan)
        return out


@dataclasses.dataclass(frozen=True)
class CharLSTM:
    """A character-level language model: embedding, LSTM, linear head.

    `apply(params, tokens, lengths)` maps int tokens `(N, T)` to next-token
    logits `(N, T, vocab_size)`; `loss` is the cross-entropy of predicting
    `tokens[:, t + 1]` from `tokens[:, :t + 1]`, with the positions past each
    line masked out. Params: `{"embedding": {"weight"}, "lstm": {...},
    "head": {"weight", "bias"}}`, PyTorch's layouts and initializations
    (`nn.Embedding`, `nn.LSTM`, `nn.Linear`).

    Mixed precision (the Flax convention): `param_dtype` (float32 by default)
    is the dtype `init` creates the params in; `dtype` is the compute dtype of
    the embedding's rows, the LSTM and the head (None, the default: no cast).
    `loss` computes the cross-entropy in float32 whatever the logits' dtype,
    and its gradients come back in `param_dtype`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> model = fl.models.CharLSTM(vocab_size=5, d_embed=4, d_hidden=8)
      >>> params = model.init(jax.random.key(0))
      >>> tokens = jnp.array([[1, 2, 3, 0], [4, 1, 0, 0]])
      >>> model.apply(params, tokens, jnp.array([4, 2])).shape
      (2, 4, 5)
      >>> float(model.loss(params, tokens, jnp.array([4, 2]))) > 0
      True
      >>> half = fl.models.CharLSTM(vocab_size=5, d_embed=4, d_hidden=8,
      ...                           dtype=jnp.bfloat16)
      >>> half.apply(params, tokens, jnp.array([4, 2])).dtype
      dtype(bfloat16)
    """

    vocab_size: int
    d_embed: int
    d_hidden: int
    num_layers: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _check_sizes(
            "CharLSTM",
            vocab_size=self.vocab_size,
            d_embed=self.d_embed,
            d_hidden=self.d_hidden,
            num_layers=self.num_layers,
        )
        _check_model_dtypes(self, "CharLSTM")

    @property
    def _layers(self) -> dict[str, Any]:
        dtypes = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        return {
            "embedding": nn.embedding(self.vocab_size, self.d_embed, **dtypes),
            "lstm": nn.lstm(
                self.d_embed, self.d_hidden, num_layers=self.num_layers, **dtypes
            ),
            "head": nn.linear(self.d_hidden, self.vocab_size, **dtypes),
        }

    def init(self, key: jax.Array) -> Params:
        """Initialize the embedding, the LSTM and the head, one key each."""
        return _init_layers(self._layers, key)

    def apply(
        self,
        params: Params,
        tokens: jax.Array,
        lengths: jax.Array,
        *,
        mode: str = "static",
        initial_state: Any = None,
        return_state: bool = False,
    ) -> Any:
        """Next-token logits `(N, T, vocab_size)` for int `tokens` `(N, T)`.

        Args:
          params: the tree from `init`.
          tokens: int token ids, padded to `T`.
          lengths: `(N,)` ints in `[1, T]`; positions past them give zeros
            from the LSTM (their logits are the head's bias).
          mode: `"static"` or `"dynamic"`, as for `fl.nn.lstm`.
          initial_state: `(h_0, c_0)`, as for `fl.nn.lstm`.
          return_state: also return the LSTM's final `(h_n, c_n)`.

        Returns:
          The logits, or `(logits, (h_n, c_n))`.
        """
        layers = self._layers
        x = layers["embedding"].apply(params["embedding"], tokens)
        out, state = layers["lstm"].apply(
            params["lstm"], x, lengths, mode=mode, initial_state=initial_state
        )
        logits = layers["head"].apply(params["head"], out)
        return (logits, state) if return_state else logits

    def loss(
        self,
        params: Params,
        tokens: jax.Array,
        lengths: jax.Array,
        *,
        mode: str = "static",
    ) -> jax.Array:
        """Mean next-character cross-entropy over the real positions.

        Position `t` predicts `tokens[:, t + 1]`; a line of length `L` has
        `L - 1` targets, and the positions past them are masked out.
        """
        logits = self.apply(params, tokens, lengths, mode=mode)
        targets = jnp.concatenate(
            [tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1
        )
        steps = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        mask = steps < (jnp.asarray(lengths, jnp.int32)[:, None] - 1)
        return nn.cross_entropy(logits, targets, mask=mask)
