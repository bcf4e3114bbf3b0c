"""Recurrent layers over padded batches of variable-length sequences.

`lstm` and `rnn` return what PyTorch's `nn.LSTM` / `nn.RNN` return for a packed
batch (`pack_padded_sequence(..., enforce_sorted=False)` then
`pad_packed_sequence(..., total_length=T)`): outputs with zeros past each
sequence's length, and each sequence's final state at its own last step. The
reverse direction of a bidirectional layer starts at each sequence's own last
element.

How it runs: the input projection `x @ weight_ih` is one matmul over all steps
(the biases go in it, or for the static LSTM into each step); only
`h @ weight_hh` and the gates run per step. The static mode runs the
steps with the library's bounded loop (`functorch_lite._loop.bounded_scan`): the
loop and its reverse pass run to the batch's longest sequence, not to `T`, and
one compiled program serves every length pattern. The LSTM's static mode has
its own core (`_lstm_core`, at the end of this module) instead of the generic
loop, because it measures faster: 2.4x on the sequence workload's training
step with geometric lengths, 1.9x on lines of real text, with its loops in XLA
(bench/lstm_core.py, 2026-12-07, bench/RESULTS.md). The generic loop, at that
workload's size, stores carries rather than residuals (they exceed the loop's
4 MiB budget), so it recomputes each step's forward in its reverse pass, and
it sums `weight_hh`'s gradient one small matmul per step; the core's forward
stores each step's gate-gradient factors, its reverse loop does only the gate
gradients and one matmul per step, and `weight_hh`'s gradient is one matmul
over all steps. On the CPU the
core's two loops run as native kernels where they can (float32, a hidden size
that is a multiple of 16, a C++ compiler; functorch_lite/_native), another
1.32x-1.50x on the same step, which puts it ahead of PyTorch's oneDNN LSTM
(bench/RESULTS.md). The dynamic mode is a Python
loop over the padded length `T` (a static shape), one program per `T`. Rows past
their own length keep their state and output zeros, in both modes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer

from functorch_lite import _native
from functorch_lite._checks import check_int, check_traced_range, reject_torch
from functorch_lite._loop import _while_any_mode, bounded_scan
from functorch_lite._ops import dense

__all__ = ["RecurrentLayer", "lstm", "rnn"]

Params = Any
# The static mode's LSTM runs on its own core (below); False runs it on the
# generic bounded loop instead, for bench/lstm_core.py's comparison.
_FUSED_LSTM = True
# The core's loops run as native CPU kernels where they can
# (functorch_lite/_native); False keeps them in XLA, for the tests' and
# bench/lstm_core.py's comparisons.
_NATIVE_LSTM = True


class RecurrentLayer(NamedTuple):
    """A recurrent layer: `init(key) -> params`, `apply(params, xs, lengths, ...)`.

    `apply(params, xs, lengths, *, mode="static", initial_state=None)` returns
    `(out, state)`: `out` of shape `(N, T, D*H)` and the final state (`h_n`,
    or `(h_n, c_n)` for the LSTM), shaped `(num_layers*D, N, H)`.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[..., tuple[jax.Array, Any]]


def _float_dtype(value: Any, *, where: str, name: str, optional: bool) -> Any:
    """`value` as a canonical floating `jnp.dtype` (hashable), or None if allowed.

    Shared by the layers and models that take `dtype` / `param_dtype`.
    """
    if value is None and optional:
        return None
    expected = "a floating dtype" + (" or None" if optional else "")
    try:
        dtype = None if value is None else jnp.dtype(value)
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{where}: `{name}` must be {expected}, for example jnp.bfloat16 or "
            f"jnp.float32; got {value!r}."
        )
    return jax.dtypes.canonicalize_dtype(dtype)


def _keys(num_layers: int, directions: int) -> list[str]:
    """PyTorch's state_dict keys, in its order."""
    keys = []
    for layer in range(num_layers):
        for suffix in ("", "_reverse")[:directions]:
            keys += [
                f"{name}_l{layer}{suffix}"
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            ]
    return keys


def _make(
    kind: str,
    d_in: int,
    d_hidden: int,
    num_layers: int,
    bidirectional: bool,
    cell: Callable[[jax.Array, tuple], tuple],
    gates: int,
    dtype: Any,
    param_dtype: Any,
) -> RecurrentLayer:
    where = kind
    compute_dtype = _float_dtype(dtype, where=where, name="dtype", optional=True)
    param_dtype = _float_dtype(
        param_dtype, where=where, name="param_dtype", optional=False
    )
    for name, value in (("d_in", d_in), ("d_hidden", d_hidden)):
        check_int(value, where=where, name=name, minimum=1)
    check_int(num_layers, where=where, name="num_layers", minimum=1)
    if not isinstance(bidirectional, bool | np.bool_):
        raise TypeError(
            f"{where}: `bidirectional` must be a bool; got "
            f"{type(bidirectional).__name__} {bidirectional!r}."
        )
    directions = 2 if bidirectional else 1
    hidden, width = d_hidden, gates * d_hidden
    is_lstm = kind == "lstm"

    def shapes() -> dict[str, tuple[int, ...]]:
        out = {}
        for layer in range(num_layers):
            size_in = d_in if layer == 0 else directions * hidden
            for suffix in ("", "_reverse")[:directions]:
                out[f"weight_ih_l{layer}{suffix}"] = (size_in, width)
                out[f"weight_hh_l{layer}{suffix}"] = (hidden, width)
                out[f"bias_ih_l{layer}{suffix}"] = (width,)
                out[f"bias_hh_l{layer}{suffix}"] = (width,)
        return out

    def init(key: jax.Array) -> Params:
        bound = 1.0 / math.sqrt(hidden)
        spec = shapes()
        keys = jax.random.split(key, len(spec))
        return {
            name: jax.random.uniform(k, shape, param_dtype, -bound, bound)
            for (name, shape), k in zip(spec.items(), keys, strict=True)
        }

    def apply(
        params: Params,
        xs: jax.Array,
        lengths: jax.Array,
        *,
        mode: str = "static",
        initial_state: Any = None,
    ) -> tuple[jax.Array, Any]:
        name = f"{kind}(...).apply"
        if mode not in ("static", "dynamic"):
            raise ValueError(
                f'{name}: `mode` must be "static" or "dynamic"; got {mode!r}.'
            )
        _check_params(params, shapes(), where=name)
        n, t = _check_xs(xs, d_in, where=name)
        if compute_dtype is None:
            dtype = jnp.result_type(xs)
            for key, leaf in params.items():
                if jnp.result_type(leaf) != dtype:
                    raise TypeError(
                        f"{name}: `xs` has dtype {dtype} but `params['{key}']` has "
                        f"{jnp.result_type(leaf)}; they must match, or give the "
                        "layer a compute `dtype` to cast both to."
                    )
        else:
            dtype = compute_dtype
            _check_float_leaves(params, where=name)
            params = {key: jnp.asarray(leaf, dtype) for key, leaf in params.items()}
            xs = jnp.asarray(xs, dtype)
        lengths = _check_lengths(lengths, n, t, where=name)
        h0, c0 = _initial(
            initial_state,
            num_layers * directions,
            n,
            hidden,
            dtype,
            is_lstm,
            name,
            cast=compute_dtype is not None,
        )
        inp = xs
        h_n, c_n = [], []
        for layer in range(num_layers):
            outs = []
            for d, suffix in enumerate(("", "_reverse")[:directions]):
                index = layer * directions + d
                p = {
                    k: params[f"{k}_l{layer}{suffix}"]
                    for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                }
                seq = inp if d == 0 else _reverse_padded(inp, lengths)
                state = (h0[index], c0[index]) if is_lstm else (h0[index],)
                out, state = _direction(cell, seq, p, state, lengths, mode, t)
                if d == 1:
                    out = _reverse_padded(out, lengths)
                outs.append(out)
                h_n.append(state[0])
                if is_lstm:
                    c_n.append(state[1])
            inp = outs[0] if directions == 1 else jnp.concatenate(outs, axis=-1)
        h_n = jnp.stack(h_n)
        return inp, ((h_n, jnp.stack(c_n)) if is_lstm else h_n)

    return RecurrentLayer(init, apply)


def _row(bias: jax.Array) -> jax.Array:
    return bias.reshape(1, 1, -1)


def _lstm_cell(gates: jax.Array, state: tuple) -> tuple:
    _, c = state
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, c


def _rnn_cell(nonlinearity: str) -> Callable[[jax.Array, tuple], tuple]:
    act = jnp.tanh if nonlinearity == "tanh" else jax.nn.relu

    def cell(gates: jax.Array, state: tuple) -> tuple:
        return (act(gates),)

    return cell


def _direction(
    cell: Callable,
    seq: jax.Array,
    p: dict,
    state: tuple,
    lengths: jax.Array,
    mode: str,
    t_max: int,
) -> tuple[jax.Array, tuple]:
    """Run one direction over `seq` (N, T, D_in); rows stop at their length."""
    if mode == "static":
        # Under `shard_map`, every input varies over the mesh axes that any
        # of them varies over: the loops' custom rules then see inputs and
        # cotangents of one type, and JAX's own rule for that cast sums the
        # gradients of replicated inputs (the weights, say) over those axes.
        names = sorted(p)
        seq, lengths, *rest = _vary_alike(seq, lengths, *state, *(p[k] for k in names))
        state = tuple(rest[: len(state)])
        p = dict(zip(names, rest[len(state) :], strict=True))
    if mode == "static" and cell is _lstm_cell and _FUSED_LSTM:
        return _lstm_static(seq, p, state, lengths)
    proj = dense(seq, p["weight_ih"]) + _row(p["bias_ih"] + p["bias_hh"])
    w_hh = p["weight_hh"]

    def step(i: Any, st: tuple, x: jax.Array) -> tuple:
        new = cell(x + st[0] @ w_hh, st)
        keep = (i < lengths)[:, None]
        st = tuple(jnp.where(keep, a, b) for a, b in zip(new, st, strict=True))
        return st, jnp.where(keep, new[0], jnp.zeros_like(new[0]))

    if mode == "dynamic":
        outs = []
        for i in range(t_max):
            state, y = step(i, state, proj[:, i])
            outs.append(y)
        return jnp.stack(outs, axis=1), state
    longest = jnp.max(lengths)
    state, ys = bounded_scan(
        step,
        state,
        jnp.swapaxes(proj, 0, 1),
        length=longest,
        max_steps=t_max,
    )
    return jnp.swapaxes(ys, 0, 1), state


def _reverse_padded(a: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reverse each row's first `lengths[r]` steps; the padding stays put."""
    t = a.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)[None, :]
    lens = lengths[:, None]
    index = jnp.where(pos < lens, lens - 1 - pos, pos)
    return jnp.take_along_axis(a, index[:, :, None], axis=1)


def _check_params(params: Any, shapes: dict, *, where: str) -> None:
    if not isinstance(params, Mapping) or set(params) != set(shapes):
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise TypeError(
            f"{where}: `params` must be the dict from `init` (or another Mapping) "
            f"with keys {sorted(shapes)}; got {got}."
        )
    for key, shape in shapes.items():
        got = tuple(jnp.shape(params[key]))
        if got != shape:
            raise ValueError(
                f"{where}: `params['{key}']` must have shape {shape}; got {got}."
            )


def _check_float_leaves(params: Mapping, *, where: str) -> None:
    """Before a cast to the compute dtype: only floating leaves may be cast."""
    for key, leaf in params.items():
        got = jnp.result_type(leaf)
        if not jnp.issubdtype(got, jnp.floating):
            raise TypeError(
                f"{where}: `params['{key}']` must have a floating dtype; got {got}."
            )


def _check_xs(xs: Any, d_in: int, *, where: str) -> tuple[int, int]:
    reject_torch(xs, where=where, name="xs")
    if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
        raise TypeError(
            f"{where}: `xs` must be a float array of shape (N, T, {d_in}); got "
            f"{type(xs).__name__}."
        )
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise TypeError(f"{where}: `xs` must have a floating dtype; got {xs.dtype}.")
    if xs.ndim != 3 or xs.shape[-1] != d_in:
        raise ValueError(
            f"{where}: `xs` must have shape (N, T, {d_in}) (batch first); got "
            f"{tuple(xs.shape)}."
        )
    if xs.shape[1] == 0:
        raise ValueError(f"{where}: `xs` must have at least one step; got T = 0.")
    return xs.shape[0], xs.shape[1]


def _check_lengths(lengths: Any, n: int, t: int, *, where: str) -> jax.Array:
    reject_torch(lengths, where=where, name="lengths")
    if isinstance(lengths, list | tuple) and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in lengths
    ):
        lengths = np.asarray(lengths, np.int32)
    if not hasattr(lengths, "shape") or not hasattr(lengths, "dtype"):
        raise TypeError(
            f"{where}: `lengths` must be an integer array of shape ({n},), one "
            f"length per sequence; got {type(lengths).__name__} {lengths!r:.60}."
        )
    shape = jnp.shape(lengths)
    dtype = jnp.result_type(lengths)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{where}: `lengths` must be an integer array of shape ({n},); got "
            f"dtype {dtype}."
        )
    if shape != (n,):
        raise ValueError(
            f"{where}: `lengths` must have shape ({n},), one per sequence; got {shape}."
        )
    if not isinstance(lengths, Tracer):
        values = np.asarray(lengths)
        bad = np.nonzero((values < 1) | (values > t))[0]
        if bad.size:
            row = int(bad[0])
            raise ValueError(
                f"{where}: every length must be in [1, {t}] (T, the padded "
                f"length of `xs`); got {int(values[row])} at row {row}."
            )
    lengths = check_traced_range(
        lengths,
        1,
        t,
        where=where,
        name="lengths",
        fix="Every length must be at least 1 and at most T, the padded length of `xs`.",
    )
    return jnp.clip(jnp.asarray(lengths), 1, t).astype(jnp.int32)


def _initial(
    initial_state: Any,
    count: int,
    n: int,
    hidden: int,
    dtype: Any,
    is_lstm: bool,
    where: str,
    *,
    cast: bool,
) -> tuple[jax.Array, jax.Array | None]:
    """The initial `(h_0, c_0)` (`c_0` None for the RNN), checked.

    With `cast` (the layer has a compute dtype), floating parts are cast to
    `dtype`; otherwise they must already have it.
    """
    shape = (count, n, hidden)
    if initial_state is None:
        zeros = jnp.zeros(shape, dtype)
        return zeros, (zeros if is_lstm else None)
    parts = initial_state if is_lstm else (initial_state,)
    names = ("h_0", "c_0") if is_lstm else ("h_0",)
    if is_lstm and (not isinstance(initial_state, tuple | list) or len(parts) != 2):
        raise TypeError(
            f"{where}: `initial_state` must be a pair (h_0, c_0), each of shape "
            f"{shape}; got {type(initial_state).__name__}."
        )
    checked = []
    for name, part in zip(names, parts, strict=True):
        got = tuple(jnp.shape(part))
        if got != shape:
            raise ValueError(
                f"{where}: `initial_state` {name} must have shape {shape} "
                f"(num_layers * directions, N, H); got {got}."
            )
        if cast and jnp.issubdtype(jnp.result_type(part), jnp.floating):
            part = jnp.asarray(part, dtype)
        checked.append(part)
        if jnp.result_type(part) != dtype:
            raise TypeError(
                f"{where}: `initial_state` {name} must have dtype {dtype}, like "
                f"`xs`; got {jnp.result_type(part)}."
            )
    return (checked[0], checked[1]) if is_lstm else (checked[0], None)


def lstm(
    d_in: int,
    d_hidden: int,
    num_layers: int = 1,
    bidirectional: bool = False,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> RecurrentLayer:
    """Create an LSTM layer over padded batches, like `torch.nn.LSTM`.

    Params: a flat dict with PyTorch's state_dict keys (`weight_ih_l0`,
    `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`, `..._reverse`, `..._l1`),
    weights stored `(in, out)`: `weight_ih_l0` is `(d_in, 4H)`, `weight_hh_l0`
    `(H, 4H)`; gates in PyTorch's order (i, f, g, o); every leaf drawn from
    U(-1/sqrt(H), 1/sqrt(H)), in `param_dtype` (float32 by default), as
    PyTorch does.

    `apply(params, xs, lengths, *, mode="static", initial_state=None)`:
    `xs` `(N, T, d_in)` (batch first), `lengths` `(N,)` ints in `[1, T]`, in
    any order. Returns `(out, (h_n, c_n))`: `out` `(N, T, D*H)` with zeros past
    each length (what `pad_packed_sequence(..., total_length=T)` gives), and
    `h_n`, `c_n` `(num_layers*D, N, H)` at each sequence's own last step.
    `initial_state` is `(h_0, c_0)` shaped like `(h_n, c_n)`. `mode="static"`
    takes traced lengths: one compiled program for every length pattern, the
    loop running to the longest sequence. `mode="dynamic"` is a Python loop
    over `T` steps, one program per padded length `T`.

    Mixed precision (the Flax convention): with a compute `dtype`, `apply`
    casts the params, `xs` and `initial_state` to it, and the projections, the
    gates and the state updates all run in it, so `out`, `h_n` and `c_n` come
    back in `dtype`. The cell state `c` accumulates in `dtype` too (bfloat16
    keeps 8 bits of mantissa: long sequences drift further from float32 than
    short ones). Gradients with respect to the params come back in their own
    dtype (`param_dtype`), as the cast's transpose casts them back.

    Args:
      d_in: input features.
      d_hidden: hidden size `H`.
      num_layers: stacked layers.
      bidirectional: add a reverse direction (`D = 2`).
      dtype: the compute dtype, for example `jnp.bfloat16`; None (the default)
        casts nothing, and then `xs`, the params and `initial_state` must have
        one dtype.
      param_dtype: the dtype `init` creates the params in.

    Returns:
      A `RecurrentLayer`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> layer = fl.nn.lstm(3, 4)
      >>> params = layer.init(jax.random.key(0))
      >>> sorted(params)
      ['bias_hh_l0', 'bias_ih_l0', 'weight_hh_l0', 'weight_ih_l0']
      >>> out, (h_n, c_n) = layer.apply(params, jnp.ones((2, 5, 3)), jnp.array([5, 2]))
      >>> out.shape, h_n.shape, float(jnp.abs(out[1, 2:]).sum())
      ((2, 5, 4), (1, 2, 4), 0.0)
      >>> half = fl.nn.lstm(3, 4, dtype=jnp.bfloat16)  # float32 params
      >>> out, (h_n, c_n) = half.apply(params, jnp.ones((2, 5, 3)), jnp.array([5, 2]))
      >>> out.dtype, c_n.dtype
      (dtype(bfloat16), dtype(bfloat16))
    """
    return _make(
        "lstm",
        d_in,
        d_hidden,
        num_layers,
        bidirectional,
        _lstm_cell,
        4,
        dtype,
        param_dtype,
    )


def rnn(
    d_in: int,
    d_hidden: int,
    num_layers: int = 1,
    nonlinearity: str = "tanh",
    bidirectional: bool = False,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> RecurrentLayer:
    """Create an Elman RNN layer over padded batches, like `torch.nn.RNN`.

    `h_t = act(x_t @ weight_ih + bias_ih + h_{t-1} @ weight_hh + bias_hh)` with
    `act` tanh or relu. Params, `apply` and the modes as for `lstm`, with
    `(H, ...)`-wide gates instead of `4H`; `apply` returns `(out, h_n)` and
    `initial_state` is `h_0`. `dtype` and `param_dtype` as for `lstm`.

    Args:
      d_in: input features.
      d_hidden: hidden size `H`.
      num_layers: stacked layers.
      nonlinearity: `"tanh"` or `"relu"`.
      bidirectional: add a reverse direction.
      dtype: the compute dtype, or None (no cast).
      param_dtype: the dtype `init` creates the params in.

    Returns:
      A `RecurrentLayer`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> layer = fl.nn.rnn(3, 4, num_layers=2, bidirectional=True)
      >>> params = layer.init(jax.random.key(0))
      >>> out, h_n = layer.apply(params, jnp.ones((2, 5, 3)), jnp.array([1, 5]))
      >>> out.shape, h_n.shape
      ((2, 5, 8), (4, 2, 4))
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(
            f'rnn: `nonlinearity` must be "tanh" or "relu"; got {nonlinearity!r}.'
        )
    return _make(
        "rnn",
        d_in,
        d_hidden,
        num_layers,
        bidirectional,
        _rnn_cell(nonlinearity),
        1,
        dtype,
        param_dtype,
    )


# ------------------------------------------------------------------ LSTM core
#
# The static mode's LSTM runs on its own core rather than the generic bounded
# loop, because it measures faster (bench/RESULTS.md, "Performance, round
# two"). It is built the way fused RNN kernels are: the forward loop stores, for
# each step, the factors that turn the state gradients into gate gradients; the
# reverse loop computes the gate gradients and carries the state gradient
# through `weight_hh` and nothing else; the gradient of `weight_hh` is one
# matmul over all steps after the loop, and the gradient of the input
# projection (which the caller computed as one matmul over all steps) is the
# stacked gate gradients. Both loops work in place, in the buffer that held the
# projection, and everything around them is time-major and in sorted row order
# from the start: a profile of the step (bench/RESULTS.md) showed zero fills,
# transposes and scatters taking a third of it. The generic loop
# instead recomputes each step's forward in the reverse pass (when its residuals
# exceed the loop's budget, as they do at the sequence workload's size) and sums
# `weight_hh`'s gradient one small matmul per step. Both loops run to the
# batch's longest sequence, and run as `_while_any_mode`, so the core can be
# differentiated again.


def _lstm_static(
    seq: jax.Array,
    p: dict,
    state: tuple,
    lengths: jax.Array,
) -> tuple[jax.Array, tuple]:
    """The LSTM over `seq` (N, T, D_in) in the static mode; as `_direction`.

    The rows run longest first (a stable sort by length), so that the core
    can drop the rows that have finished, in stages; the results go back to
    the caller's order. The input is sorted and made time-major before the
    projection, where it is D_in wide rather than 4H: the projection then
    comes out in the core's layout, and neither it nor its gradient is
    transposed or permuted (they were 2 of the 15 ms of the sequence
    workload's step, bench/RESULTS.md).
    """
    h0, c0 = (jnp.asarray(s) for s in state)
    order = jnp.argsort(-lengths, stable=True)
    back = jnp.argsort(order)
    lengths = lengths[order]
    xs = _permute(jnp.swapaxes(seq, 0, 1), order, back, 1)
    # Zero past each length (the core's contract); the bias is added per step.
    past = jnp.arange(xs.shape[0], dtype=jnp.int32)[:, None] >= lengths[None, :]
    xs = jnp.where(past[..., None], jnp.zeros((), xs.dtype), xs)
    ys, h_n, c_n = _lstm_core(
        dense(xs, p["weight_ih"]),
        p["bias_ih"] + p["bias_hh"],
        p["weight_hh"],
        _permute(h0, order, back, 0),
        _permute(c0, order, back, 0),
        lengths,
    )
    ys = jnp.swapaxes(_permute(ys, back, order, 1), 0, 1)
    return ys, (_permute(h_n, back, order, 0), _permute(c_n, back, order, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _permute(a: jax.Array, index: jax.Array, inverse: jax.Array, axis: int):
    """`a`'s entries along `axis` in the order `index`, a permutation.

    Its gradient is the inverse permutation, a gather: as an ordinary gather,
    it would be a scatter-add into zeros, two passes over the array.
    """
    return jnp.take(a, index, axis=axis)


def _permute_fwd(a, index, inverse, axis):
    return jnp.take(a, index, axis=axis), inverse


def _permute_bwd(axis, inverse, ct):
    return jnp.take(ct, inverse, axis=axis), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _stages(n: int) -> tuple[int, ...]:
    """Batch sizes of the XLA loops' stages: N, then N/8 fewer (at least 4) each time.

    (The native kernels follow the running rows exactly and need no stages.)
    Up to 8 rows run as one stage. Each stage is a loop of its own in the
    compiled program, so finer stages cost compile time (1.4 -> 3.2 s for the
    core of the sequence workload, 32 rows), but they follow the running
    rows more closely: there, the loops run 47% of the padded rows rather
    than 58% (42% are real), and the training step is 7-10% faster than
    with halving stages (32, 16, 8) (bench/RESULTS.md; bench/lstm_core.py
    times both as `core-xla` and `core-halving`).
    """
    if n <= 8:
        return (n,)
    return tuple(range(n, 0, -max(4, -(-n // 8))))


def _bounds(lengths: jax.Array, sizes: tuple[int, ...]) -> tuple[list, list]:
    """Steps `[start, end)` of each stage, for lengths sorted longest first.

    Stage `j` runs the first `sizes[j]` rows from the step where at most that
    many rows are still running (`lengths[sizes[j]]`) to the step where at
    most `sizes[j + 1]` are (or to the end of the longest row).
    """
    starts = [jnp.int32(0)] + [lengths[b] for b in sizes[1:]]
    ends = starts[1:] + [lengths[0]]
    return starts, ends


def _lstm_gates(pre: jax.Array) -> jax.Array:
    """Activated gates (i, f, g, o): sigmoid, sigmoid, tanh, sigmoid."""
    i, f, g, o = jnp.split(pre, 4, axis=-1)
    return jnp.concatenate(
        [jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)],
        axis=-1,
    )


def _rows(a: jax.Array, i: jax.Array, b: int) -> jax.Array:
    """`a[i, :b]` for a time-major `a`, `i` traced."""
    return lax.dynamic_slice_in_dim(a, i, 1, axis=0)[0, :b]


def _put(a: jax.Array, value: jax.Array, i: jax.Array) -> jax.Array:
    """`a` with `a[i, :len(value)] = value`."""
    zero = jnp.zeros((), jnp.asarray(i).dtype)
    return lax.dynamic_update_slice(a, value[None], (i, *(zero,) * (a.ndim - 1)))


def _lstm_forward(proj, bias, w_hh, h0, c0, lengths, store: bool):
    """Time-major forward over rows sorted longest first: `proj` (T, N, 4H).

    Returns ys, h_n, c_n and, with `store`, what the reverse pass reads:
    `k` (T, N, 4H), per step and row the factors that turn the state
    gradients [dc, dc, dc, dh] into the gate gradients (i, f, g, o), zero
    past the row's length; and `tf` (T, N, 2H), [to_c, f]: the cell state's
    gradient gains dh * to_c, and passes to the step before times f (0 and
    1 past the length). Positions that no stage reaches keep `proj` in `k`
    and zeros in `tf`.
    """
    t, n = proj.shape[:2]
    hidden = h0.shape[-1]
    sizes = _stages(n)
    starts, ends = _bounds(lengths, sizes)
    ys = jnp.zeros((t, *h0.shape), h0.dtype)
    # With `store`, the loop turns `proj` into the gate factors `k` in place:
    # step i reads its projection from `k[i]` and then writes its factors
    # there. A separate zeroed buffer of that shape, filled and then copied,
    # took 1.4 ms of the 15 ms step in the profile (bench/RESULTS.md).
    k, tf = proj, (jnp.zeros((t, n, 2 * hidden), proj.dtype) if store else ())
    h, c, done = h0, c0, []
    for j, b in enumerate(sizes):
        if j:  # rows b.. finished before this stage: keep their final state
            done.append((h[b:], c[b:]))
            h, c = h[:b], c[:b]
        running = lengths[:b]

        def body(carry: tuple, b: int = b, running: jax.Array = running) -> tuple:
            i, h, c, ys, k, tf = carry
            pre = _rows(k if store else proj, i, b) + bias[None, :]
            act = _lstm_gates(pre + h @ w_hh)
            gi, gf, gg, go = jnp.split(act, 4, axis=-1)
            c_new = gf * c + gi * gg
            tanh_c = jnp.tanh(c_new)
            h_new = go * tanh_c
            keep = (i < running)[:, None]
            if store:
                # The gate gradients are [dc, dc, dc, dh] * k_i (dc and dh the
                # gradients of c_new and h_new); rows past their length get
                # zero factors, so no gate gradient.
                zero = jnp.zeros((), act.dtype)
                k_i = jnp.concatenate(
                    [
                        gg * gi * (1 - gi),
                        c * gf * (1 - gf),
                        gi * (1 - gg * gg),
                        tanh_c * go * (1 - go),
                    ],
                    axis=-1,
                )
                # dc_new gets dh_new * to_c; dc_prev = dc_new * f, and past
                # the length both pass through unchanged (to_c 0, f 1).
                tf_i = jnp.concatenate(
                    [
                        jnp.where(keep, go * (1 - tanh_c * tanh_c), zero),
                        jnp.where(keep, gf, jnp.ones((), act.dtype)),
                    ],
                    axis=-1,
                )
                k = _put(k, jnp.where(keep, k_i, zero), i)
                tf = _put(tf, tf_i, i)
            h = jnp.where(keep, h_new, h)
            c = jnp.where(keep, c_new, c)
            ys = _put(ys, jnp.where(keep, h_new, jnp.zeros_like(h_new)), i)
            return i + 1, h, c, ys, k, tf

        end = ends[j]
        _, h, c, ys, k, tf = _while_any_mode(
            lambda s, end=end: s[0] < end,
            body,
            (starts[j], h, c, ys, k if store else (), tf),
            t,
        )
    h_n = jnp.concatenate([h] + [d[0] for d in reversed(done)])
    c_n = jnp.concatenate([c] + [d[1] for d in reversed(done)])
    return (ys, h_n, c_n, (k, tf)) if store else (ys, h_n, c_n)


@jax.custom_vjp
def _lstm_core(proj, bias, w_hh, h0, c0, lengths):
    """The LSTM over `proj` (T, N, 4H), rows sorted longest first.

    `proj` must be zero past each row's length (the caller masks the input
    before the projection): the reverse pass leaves the gradient of `proj`
    as it found `proj` where no stage runs. `bias` (4H,) is added per step.
    """
    return _forward_loops(proj, bias, w_hh, h0, c0, lengths, False)


def _lstm_core_fwd(proj, bias, w_hh, h0, c0, lengths):
    ys, h, c, (k, tf) = _forward_loops(proj, bias, w_hh, h0, c0, lengths, True)
    return (ys, h, c), (ys, k, tf, w_hh, h0, lengths)


def _lstm_reverse(k, tf, w_hh, d_ys, d_hn, d_cn, lengths):
    """The reverse loops: the gate gradients (in place of `k`), dh0 and dc0."""
    t, n, hidden = d_ys.shape
    sizes = _stages(n)
    starts, ends = _bounds(lengths, sizes)
    w_t = w_hh.T
    dh, dc = d_hn[: sizes[-1]], d_cn[: sizes[-1]]
    # Everything the loop needs that does not depend on the carried gradients
    # was stored by the forward loop (`k`, `tf`): the loop body is one matmul
    # and one small fusion. It turns `k` into the gate gradients in place.
    # Positions that no stage reaches are past their row's length, where
    # `proj`, and so `k`, is zero: so is their gradient.
    d_proj = k
    for j in reversed(range(len(sizes))):
        b = sizes[j]
        if j < len(sizes) - 1:  # rows that finished before the next stage
            dh = jnp.concatenate([dh, d_hn[sizes[j + 1] : b]])
            dc = jnp.concatenate([dc, d_cn[sizes[j + 1] : b]])
        running = lengths[:b]

        def body(carry: tuple, b: int = b, running: jax.Array = running) -> tuple:
            i, dh, dc, d_proj = carry
            i = i - 1
            keep = (i < running)[:, None]
            dh_all = dh + jnp.where(keep, _rows(d_ys, i, b), jnp.zeros_like(dh))
            to_c, f = jnp.split(_rows(tf, i, b), 2, axis=-1)
            dc_all = dc + dh_all * to_c
            d_gates = jnp.concatenate(
                [jnp.tile(dc_all, (1, 3)), dh_all], axis=-1
            ) * _rows(d_proj, i, b)
            dh = d_gates @ w_t + jnp.where(keep, jnp.zeros_like(dh_all), dh_all)
            dc = dc_all * f
            return i, dh, dc, _put(d_proj, d_gates, i)

        start = starts[j]
        _, dh, dc, d_proj = _while_any_mode(
            lambda s, start=start: s[0] > start, body, (ends[j], dh, dc, d_proj), t
        )
    return d_proj, dh, dc


def _lstm_core_bwd(residuals, cts):
    ys, k, tf, w_hh, h0, lengths = residuals
    d_ys, d_hn, d_cn = cts
    hidden = ys.shape[-1]
    d_proj, dh, dc = _reverse_loops(k, tf, w_hh, d_ys, d_hn, d_cn, lengths)
    # h_{i-1} for every step: h0, then the outputs (equal to h wherever a row
    # is still running, and d_proj is zero wherever it is not).
    h_prev = jnp.concatenate([h0[None], ys[:-1]], axis=0)
    # One (H, T*N) @ (T*N, 4H) matmul (measured faster than the einsum form).
    d_w = h_prev.reshape(-1, hidden).T @ d_proj.reshape(-1, d_proj.shape[-1])
    return d_proj, d_proj.sum(axis=(0, 1)), d_w, dh, dc, None


_lstm_core.defvjp(_lstm_core_fwd, _lstm_core_bwd)


# ------------------------------------------------------- native CPU kernels
#
# On the CPU, the core's forward and reverse loops run as native kernels
# (functorch_lite/_native/lstm.cc), each a single XLA custom call, where they
# can: float32, a hidden size that is a multiple of 16, and a C++ compiler on
# the machine. They compute what `_lstm_forward` and `_lstm_reverse` compute,
# over exactly the rows still running at each step rather than in stages, and
# measure faster (bench/RESULTS.md): XLA runs each step of those loops as some
# 20 small kernels. `lax.platform_dependent` lowers the XLA loops for every
# other platform, and a `custom_jvp` differentiates the kernels through the
# XLA loops, so that derivatives of any order, `vmap` and `jit` see one
# function.


def _native_ok(*arrays: jax.Array) -> bool:
    # The default backend: a process that computes on an accelerator does not
    # build CPU kernels (a program lowered for the CPU there runs the XLA loops).
    return (
        _NATIVE_LSTM
        and all(a.dtype == jnp.float32 for a in arrays)
        and arrays[0].shape[-1] % 64 == 0  # 4H, H a multiple of 16
        and jax.default_backend() == "cpu"
        and _native.available()
    )


def _varying(a: jax.Array) -> frozenset:
    """The manual mesh axes (`shard_map`) that `a` varies over."""
    return jax.typeof(a).manual_axis_type.varying


def _vary_alike(*arrays: jax.Array, like: tuple = ()) -> tuple:
    """`arrays`, each cast to vary over the manual mesh axes of all of them.

    Those of `like` too; a no-op outside `shard_map`.
    """
    axes = frozenset().union(*map(_varying, arrays + tuple(like)))
    return tuple(
        lax.pcast(a, tuple(sorted(axes - _varying(a))), to="varying")
        if axes - _varying(a)
        else a
        for a in arrays
    )


def _ffi(name: str, outs: list, aliases: dict | None):
    return jax.ffi.ffi_call(
        f"functorch_lite_{name}",
        outs,
        vmap_method="sequential",
        input_output_aliases=aliases,
    )


def _native_forward(proj, bias, w_hh, h0, c0, lengths, store: bool):
    t, n, _ = proj.shape
    spec = functools.partial(jax.ShapeDtypeStruct, dtype=proj.dtype)
    outs = [spec((t, *h0.shape)), spec(h0.shape), spec(c0.shape)]
    if store:
        outs += [spec(proj.shape), spec((t, n, 2 * h0.shape[-1]))]
    call = _ffi("FlLstmForwardStore" if store else "FlLstmForward", outs, None)
    args = (proj, bias, w_hh, h0, c0, lengths.astype(jnp.int32))
    # The kernel's results vary over no mesh axis; the XLA loops' vary as
    # their inputs do, and `platform_dependent` needs both alike.
    res = _vary_alike(*call(*args), like=args)
    return (*res[:3], tuple(res[3:])) if store else tuple(res)


def _native_reverse(k, tf, w_hh, d_ys, d_hn, d_cn, lengths):
    spec = functools.partial(jax.ShapeDtypeStruct, dtype=k.dtype)
    call = _ffi(
        "FlLstmReverse", [spec(k.shape), spec(d_hn.shape), spec(d_cn.shape)], {0: 0}
    )
    args = (k, tf, w_hh, d_ys, d_hn, d_cn, lengths.astype(jnp.int32))
    return _vary_alike(*call(*args), like=args)


def _kernel_or_xla(native: Callable, xla: Callable) -> Callable:
    """`native` where the program is lowered for the CPU, `xla` elsewhere.

    Differentiated through `xla`: the kernels have no derivative rules.
    """

    @jax.custom_jvp
    def run(*args):
        return lax.platform_dependent(*args, cpu=native, default=xla)

    run.defjvp(lambda primals, tangents: jax.jvp(xla, primals, tangents))
    return run


_FORWARD = {
    store: _kernel_or_xla(
        functools.partial(_native_forward, store=store),
        functools.partial(_lstm_forward, store=store),
    )
    for store in (False, True)
}
_REVERSE = _kernel_or_xla(_native_reverse, _lstm_reverse)


def _forward_loops(proj, bias, w_hh, h0, c0, lengths, store: bool):
    if not _native_ok(proj, bias, w_hh, h0, c0):
        return _lstm_forward(proj, bias, w_hh, h0, c0, lengths, store=store)
    return _FORWARD[store](proj, bias, w_hh, h0, c0, lengths)


def _reverse_loops(k, tf, w_hh, d_ys, d_hn, d_cn, lengths):
    if not _native_ok(k, tf, w_hh, d_ys, d_hn, d_cn):
        return _lstm_reverse(k, tf, w_hh, d_ys, d_hn, d_cn, lengths)
    return _REVERSE(k, tf, w_hh, d_ys, d_hn, d_cn, lengths)
