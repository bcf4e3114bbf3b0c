"""`repeat`: the one loop primitive, run as a static graph or define-by-run.

Two modes, the words of the two reference programs:

* `mode="static"` builds one graph for every trip count `n` in `[0, max_n]`; `n`
  may be a traced int32 scalar, so `jax.jit` compiles once for all depths (the
  TensorFlow 1 static graph: define once, run many times).
* `mode="dynamic"` is a plain Python loop over a concrete int `n` (the PyTorch
  define-by-run program). Under `jax.jit` the trip count must be a static
  argument, so each distinct `n` is traced and compiled once, then cached.

Both modes compute the same function: same values, same gradients.

The static mode has three interchangeable loop mechanisms (`static_method`):

* `"bounded"` (default): a `lax.while_loop` that runs exactly `n` iterations,
  with its own reverse-mode rule (`jax.custom_vjp`) that saves each iteration's
  residuals in a `(max_n, ...)` buffer and runs the backward loop exactly `n`
  times. Fastest; reverse mode, `jit`, `vmap` and forward-over-reverse
  (`hessian`) compose with it; pure forward mode (`jvp`, `jacfwd`) does not.
* `"scan"`: `lax.scan` over `max_n` steps with the steps past `n` skipped by
  `lax.cond`. Every transformation composes with it, forward mode included.
* `"masked"`: `lax.scan` over `max_n` steps, all of them computed, the results
  past `n` masked out. Costs `max_n` bodies every call; shown for comparison.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer

from functorch_lite._checks import check_int
from functorch_lite._trees import leaf_pairs, structure_diff

__all__ = ["STATIC_METHODS", "repeat"]

Carry = TypeVar("Carry")

MODES = ("static", "dynamic")
_INT32_MAX = 2**31 - 1
STATIC_METHODS = ("bounded", "scan", "masked")


def _is_concrete_int(n: Any) -> bool:
    if isinstance(n, bool | np.bool_):
        return False
    if isinstance(n, int | np.integer):
        return True
    # A 0-d, non-traced integer array is as good as an int.
    if isinstance(n, np.ndarray | jax.Array) and not isinstance(n, Tracer):
        return n.ndim == 0 and jnp.issubdtype(n.dtype, jnp.integer)
    return False


def check_concrete_count(n: Any, max_n: int | None, *, where: str, name: str) -> int:
    """Return `n` as an int, or raise a clear error (for the dynamic path)."""
    if isinstance(n, Tracer):
        raise TypeError(
            f"{where}: `{name}` must be a concrete Python int in the dynamic path; "
            f"got a traced value {n!r}. Mark `{name}` static "
            f'(`static_argnames=("{name}",)`), or use mode="static", whose loop '
            "takes a traced count."
        )
    if not _is_concrete_int(n):
        raise TypeError(
            f"{where}: `{name}` must be an int; got {n!r} of type {type(n).__name__}."
        )
    value = operator.index(n)
    upper = "" if max_n is None else f", {max_n}"
    if value < 0 or (max_n is not None and value > max_n):
        fix = (
            f"Raise `max_{name}` or pass a smaller `{name}`."
            if max_n is not None
            else f"Pass a non-negative `{name}`."
        )
        raise ValueError(
            f"{where}: `{name}` must be an int in [0{upper}]; got {value}. {fix}"
        )
    return value


def check_static_count(n: Any, max_n: int, *, where: str, name: str) -> jax.Array:
    """Return `n` as an int32 scalar (maybe traced), or raise a clear error."""
    if isinstance(n, Tracer) or isinstance(n, np.ndarray | jax.Array):
        shape, dtype = jnp.shape(n), jnp.result_type(n)
        if shape != () or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"{where}: `{name}` must be an int or an integer scalar array; got "
                f"an array of shape {shape} and dtype {dtype}."
            )
        if not isinstance(n, Tracer):
            check_concrete_count(n, max_n, where=where, name=name)
        # Clamp in the count's own dtype, then narrow: a uint32 or int64 count
        # past the int32 range would otherwise wrap around.
        return jnp.clip(n, 0, max_n).astype(jnp.int32)
    check_concrete_count(n, max_n, where=where, name=name)
    return jnp.asarray(n, jnp.int32)


def _check_max_n(max_n: Any, *, where: str) -> int:
    value = check_int(
        max_n, where=where, name="max_n", minimum=0, context=' with mode="static"'
    )
    if value > _INT32_MAX:
        raise ValueError(
            f"{where}: `max_n` must be at most 2**31 - 1 (the loop counts in "
            f"int32); got {value}."
        )
    return value


def repeat(
    body: Callable[[Carry], Carry],
    carry: Carry,
    n: int | jax.Array,
    *,
    max_n: int | None = None,
    mode: str = "static",
    static_method: str = "bounded",
) -> Carry:
    """Apply `body` to `carry` `n` times: `carry = body(carry)`, `n` times.

    This is the loop that `DynamicNet` is built on; use it to build your own
    variable-depth models. `body` may close over parameters (weight sharing):
    their gradients sum over the iterations. See the module docstring for the
    two modes and the three static mechanisms.

    In the static mode the result equals this plain loop, with `n` clamped:

        for i in range(max_n):
            if i < n:
                carry = body(carry)

    A concrete `n` outside `[0, max_n]` raises `ValueError`. A *traced* `n`
    cannot be checked when the graph is built, so it is clamped to
    `[0, max_n]`: a negative `n` runs no step, an `n` above `max_n` runs
    `max_n` steps.

    Args:
      body: a pure function `carry -> carry` that keeps the tree structure,
        shapes and dtypes of `carry`.
      carry: the initial pytree of arrays.
      n: the trip count. `mode="dynamic"`: a concrete int. `mode="static"`: an
        int or an int32 scalar, which may be traced.
      max_n: the largest `n`; required with `mode="static"`, optional with
        `mode="dynamic"` (then only used for validation).
      mode: `"static"` or `"dynamic"`.
      static_method: `"bounded"`, `"scan"` or `"masked"`; ignored in the
        dynamic mode.

    Returns:
      The final carry.

    >>> import jax, jax.numpy as jnp
    >>> import functorch_lite as fl
    >>> double = lambda c: 2.0 * c
    >>> fl.repeat(double, jnp.float32(1.0), 3, mode="dynamic")
    Array(8., dtype=float32)
    >>> run = jax.jit(lambda c, n: fl.repeat(double, c, n, max_n=5))
    >>> [float(run(jnp.float32(1.0), n)) for n in range(4)]
    [1.0, 2.0, 4.0, 8.0]
    """
    where = "repeat"
    if mode not in MODES:
        raise ValueError(
            f'{where}: `mode` must be "static" or "dynamic"; got {mode!r}.'
        )
    if not callable(body):
        raise TypeError(f"{where}: `body` must be callable; got {body!r}.")
    if mode == "dynamic":
        if max_n is not None:
            max_n = _check_max_n(max_n, where=where)
        count = check_concrete_count(n, max_n, where=where, name="n")
        return _repeat_unrolled(body, carry, count, where=where)
    if static_method not in STATIC_METHODS:
        raise ValueError(
            f"{where}: `static_method` must be one of {STATIC_METHODS}; "
            f"got {static_method!r}."
        )
    max_count = _check_max_n(max_n, where=where)
    # In [0, max_count]: a concrete count is checked, a traced one clamped.
    count = check_static_count(n, max_count, where=where, name="n")
    _check_body_keeps_structure(body, carry, where=where)
    if max_count == 0:
        return carry
    if static_method == "scan":
        return _repeat_scan(body, carry, count, max_count)
    if static_method == "masked":
        return _repeat_masked(body, carry, count, max_count)
    return _repeat_bounded(body, carry, count, max_count)


def _check_body_keeps_structure(body: Callable, carry: Any, *, where: str) -> None:
    _check_same_carry(carry, jax.eval_shape(body, carry), where=where)


def _check_same_carry(carry: Any, out: Any, *, where: str) -> None:
    if (diff := structure_diff(out, carry)) is not None:
        raise TypeError(
            f"{where}: `body` must return a carry with the structure of its input "
            f"(expected: the input's, got: the output's).\n{diff}"
        )
    for path, b, a in leaf_pairs(out, carry):
        a_shape, a_dtype = jnp.shape(a), jnp.result_type(a)
        b_shape, b_dtype = jnp.shape(b), jnp.result_type(b)
        if (a_shape, a_dtype) != (b_shape, b_dtype):
            raise TypeError(
                f"{where}: `body` must keep each carry leaf's shape and dtype; leaf "
                f"{path} went from {a_shape} {a_dtype} to {b_shape} {b_dtype}."
            )


def _repeat_unrolled(
    body: Callable, carry: Any, n: int, *, where: str = "repeat"
) -> Any:
    """Run `body` `n` times in Python (the dynamic twin of `_repeat_scan`)."""
    for i in range(n):
        new = body(carry)
        if i == 0:  # same structure after one step: the same after every step
            _check_same_carry(carry, new, where=where)
        carry = new
    return carry


def _repeat_scan(body: Callable, carry: Any, n: jax.Array, max_n: int) -> Any:
    """`lax.scan` over `max_n` steps, skipping those past `n` with `lax.cond`.

    The static twin of `_repeat_unrolled`; equivalent to
    `for i in range(max_n): carry = body(carry) if i < n else carry`.
    """

    def step(c: Any, i: jax.Array) -> tuple[Any, None]:
        return lax.cond(i < n, body, lambda c_: c_, c), None

    carry, _ = lax.scan(step, carry, jnp.arange(max_n, dtype=jnp.int32))
    return carry


def _repeat_masked(body: Callable, carry: Any, n: jax.Array, max_n: int) -> Any:
    """`lax.scan` over `max_n` steps, all computed, the ones past `n` discarded."""

    def step(c: Any, i: jax.Array) -> tuple[Any, None]:
        new = body(c)
        keep = i < n
        return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, c), None

    carry, _ = lax.scan(step, carry, jnp.arange(max_n, dtype=jnp.int32))
    return carry


def _all_inexact(tree: Any) -> bool:
    return all(
        jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jax.tree.leaves(tree)
    )


def _repeat_bounded(body: Callable, carry: Any, n: jax.Array, max_n: int) -> Any:
    """Run exactly `n` iterations forward and backward, saving residuals.

    The fast static twin of `_repeat_unrolled`: a `lax.while_loop` for the
    forward pass and a custom reverse pass (another `while_loop`, walking the
    saved residuals backwards). Gradients are those of the unrolled loop.
    """
    # closure_convert turns the parameters that `body` closes over (the shared
    # weights) into explicit inputs, so that custom_vjp can return their
    # gradients instead of silently treating them as constants.
    converted, consts = jax.closure_convert(body, carry)
    if not (_all_inexact(carry) and _all_inexact(consts)):
        # Integer carries have float0 cotangents, which the hand-written
        # backward loop does not carry; the scan form handles them.
        return _repeat_scan(body, carry, n, max_n)
    return _bounded_loop(converted, max_n, carry, n, tuple(consts))


def _pullback_layout(fn: Callable, carry: Any, consts: tuple) -> tuple[Any, list]:
    """Trace one VJP of `fn` and describe where each residual comes from.

    Returns the pullback's treedef and, per residual leaf, either `("const", j)`
    (it is `consts[j]`, loop-invariant: not stored per step) or
    `("saved", aval)` (stored in a `(max_n, ...)` buffer).
    """
    layout: list = []
    treedef_box: list = []

    def probe(c: Any, k: tuple) -> list:
        _, pullback = jax.vjp(lambda c_, *k_: fn(c_, *k_), c, *k)
        leaves, treedef = jax.tree.flatten(pullback)
        treedef_box.append(treedef)
        saved = []
        for leaf in leaves:
            j = next((j for j, kj in enumerate(k) if leaf is kj), None)
            if j is None:
                layout.append(("saved", None))
                saved.append(leaf)
            else:
                layout.append(("const", j))
        return saved

    avals = jax.eval_shape(probe, carry, consts)
    it = iter(avals)
    layout = [(kind, next(it) if kind == "saved" else j) for kind, j in layout]
    return treedef_box[0], layout


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bounded_loop(fn: Callable, max_n: int, carry: Any, n: jax.Array, consts: tuple):
    def cond(state: tuple) -> jax.Array:
        return state[0] < n

    def step(state: tuple) -> tuple:
        i, c = state
        return i + 1, fn(c, *consts)

    return lax.while_loop(cond, step, (jnp.int32(0), carry))[1]


def _bounded_fwd(fn: Callable, max_n: int, carry: Any, n: jax.Array, consts: tuple):
    _, layout = _pullback_layout(fn, carry, consts)
    buffers = [
        jnp.zeros((max_n, *aval.shape), aval.dtype)
        for kind, aval in layout
        if kind == "saved"
    ]

    def cond(state: tuple) -> jax.Array:
        return state[0] < n

    def step(state: tuple) -> tuple:
        i, c, bufs = state
        c_new, pullback = jax.vjp(lambda c_, *k_: fn(c_, *k_), c, *consts)
        leaves = jax.tree.leaves(pullback)
        saved = [
            leaf
            for leaf, (kind, _) in zip(leaves, layout, strict=True)
            if kind == "saved"
        ]
        bufs = [
            lax.dynamic_update_index_in_dim(b, r, i, 0)
            for b, r in zip(bufs, saved, strict=True)
        ]
        return i + 1, c_new, bufs

    _, out, buffers = lax.while_loop(cond, step, (jnp.int32(0), carry, buffers))
    return out, (n, consts, buffers, carry)


def _bounded_bwd(fn: Callable, max_n: int, residuals: tuple, ct_out: Any):
    n, consts, buffers, carry = residuals
    treedef, layout = _pullback_layout(fn, carry, consts)

    def cond(state: tuple) -> jax.Array:
        return state[0] > 0

    def step(state: tuple) -> tuple:
        i, ct_c, ct_k = state
        i = i - 1
        saved = iter(
            [lax.dynamic_index_in_dim(b, i, 0, keepdims=False) for b in buffers]
        )
        leaves = [next(saved) if kind == "saved" else consts[j] for kind, j in layout]
        pullback = jax.tree.unflatten(treedef, leaves)
        ct_c, *ct_ki = pullback(ct_c)
        ct_k = jax.tree.map(jnp.add, ct_k, tuple(ct_ki))
        return i, ct_c, ct_k

    zeros = jax.tree.map(jnp.zeros_like, consts)
    _, ct_carry, ct_consts = lax.while_loop(cond, step, (n, ct_out, zeros))
    return ct_carry, None, ct_consts


_bounded_loop.defvjp(_bounded_fwd, _bounded_bwd)
