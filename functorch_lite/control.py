"""The loop primitives: `repeat` (counted) and `while_loop` (data-dependent).

Two modes, the words of the two reference programs:

* `mode="static"` builds one graph for every trip count; the count (or the
  condition) may be traced, so `jax.jit` compiles once for all depths (the
  TensorFlow 1 static graph: define once, run many times, `tf.while_loop`).
* `mode="dynamic"` is a plain Python loop over concrete values (the PyTorch
  define-by-run program). Under `jax.jit` a count must be a static argument,
  so each distinct count is traced and compiled once, then cached.

Both modes compute the same function: same values, same gradients.

`repeat`'s static mode has three interchangeable mechanisms (`static_method`):

* `"bounded"` (default): the bounded-loop core that `while_loop` uses too
  (`functorch_lite._loop`): a `lax.while_loop` that runs exactly `n` steps, with
  its own reverse pass that also runs exactly `n` steps. Fastest. Reverse mode
  of any order, `jit`, `vmap` and forward-over-reverse (`jax.hessian`) compose
  with it; pure forward mode (`jax.jvp`, `jax.jacfwd`) does not.
* `"scan"`: `lax.scan` over `max_n` steps with the steps past `n` skipped by
  `lax.cond`. Every transformation composes with it, forward mode included.
* `"masked"`: `lax.scan` over `max_n` steps, all of them computed, the results
  past `n` masked out. Costs `max_n` bodies every call; shown for comparison.

Per-example counts: in either mode `n` may be an int array of shape `(N,)`
when every carry leaf has a leading batch axis of size `N`: row `r` then runs
`n[r]` steps. `body` must treat rows independently (row `r` of its output
depends only on row `r` of its input), as a batched layer does. The static
mode runs `max(n)` steps in one graph and keeps each row's carry once its own
count is reached; the dynamic mode runs each distinct count's rows as a group.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer

from functorch_lite._checks import (
    check_bool,
    check_int,
    check_traced_range,
    mark_in_range,
)
from functorch_lite._loop import bounded_while
from functorch_lite._trees import leaf_pairs, structure_diff

__all__ = ["STATIC_METHODS", "repeat", "while_loop"]

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


def _range_fix(name: str) -> str:
    return f"Raise `max_{name}` or pass a smaller `{name}`."


def check_static_count(n: Any, max_n: int, *, where: str, name: str) -> jax.Array:
    """Return `n` as an int32 scalar (maybe traced), or raise a clear error."""
    if isinstance(n, Tracer) or isinstance(n, np.ndarray | jax.Array):
        shape, dtype = jnp.shape(n), jnp.result_type(n)
        if shape != () or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"{where}: `{name}` must be an int or an integer scalar array (or "
                f"an int array of shape (N,), one per example); got an array of "
                f"shape {shape} and dtype {dtype}."
            )
        if not isinstance(n, Tracer):
            check_concrete_count(n, max_n, where=where, name=name)
        n = check_traced_range(
            n, 0, max_n, where=where, name=name, fix=_range_fix(name)
        )
        # Clamp in the count's own dtype, then narrow: a uint32 or int64 count
        # past the int32 range would otherwise wrap around.
        count = jnp.clip(n, 0, max_n).astype(jnp.int32)
        mark_in_range(count)
        return count
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


def _leading_axis_check(carry: Any, size: int, *, where: str, name: str) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(carry)[0]:
        shape = jnp.shape(leaf)
        if not shape or shape[0] != size:
            raise ValueError(
                f"{where}: a per-example `{name}` of shape ({size},) needs a leading "
                f"batch axis of size {size} on every carry leaf; leaf "
                f"{jax.tree_util.keystr(path) or '(the carry)'} has shape {shape}."
            )


def is_per_example(n: Any) -> bool:
    """Whether `n` is a per-example count (an array with one axis)."""
    return isinstance(n, Tracer | np.ndarray | jax.Array) and jnp.ndim(n) == 1


def check_per_example_counts(
    n: Any, max_n: int | None, carry: Any, *, where: str, name: str, dynamic: bool
) -> Any:
    """Check a per-example count array `(N,)` against `carry`; return it.

    Dynamic: a concrete NumPy int array. Static: an int32 array, clamped to
    `[0, max_n]` when traced.
    """
    dtype = jnp.result_type(n)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{where}: a per-example `{name}` must be an integer array of shape "
            f"(N,); got dtype {dtype}. Cast it, for example "
            f"`{name}.astype(jnp.int32)`."
        )
    size = jnp.shape(n)[0]
    _leading_axis_check(carry, size, where=where, name=name)
    if isinstance(n, Tracer):
        if dynamic:
            raise TypeError(
                f"{where}: a per-example `{name}` must be concrete in the dynamic "
                "path (its rows are grouped by value on the host); got a traced "
                'array. Call it outside `jit`, or use mode="static", whose loop '
                "takes a traced per-example count in one compiled program."
            )
        upper = max_n if max_n is not None else _INT32_MAX
        n = check_traced_range(
            n, 0, upper, where=where, name=name, fix=_range_fix(name)
        )
        counts = jnp.clip(n, 0, upper).astype(jnp.int32)
        mark_in_range(counts)
        return counts
    values = np.asarray(n)
    bad = np.nonzero((values < 0) | (values > (max_n if max_n is not None else 2**62)))
    if bad[0].size:
        row = int(bad[0][0])
        upper = "" if max_n is None else f", {max_n}"
        raise ValueError(
            f"{where}: every `{name}` must be in [0{upper}]; got {int(values[row])} "
            f"at row {row}."
        )
    return values.astype(np.int64) if dynamic else jnp.asarray(values, jnp.int32)


def _select_rows(keep: jax.Array, new: Any, old: Any) -> Any:
    """Rows of `new` where `keep` (shape `(N,)`) holds, else rows of `old`."""

    def pick(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.where(keep.reshape(keep.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


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
    two modes, the three static mechanisms and per-example counts.

    In the static mode the result equals this plain loop, with `n` clamped:

        for i in range(max_n):
            if i < n:
                carry = body(carry)

    A concrete `n` outside `[0, max_n]` raises `ValueError`. A *traced* `n`
    cannot be checked when the graph is built; it is checked when the program
    runs: out of range, the call raises `ValueError` with the same message
    (under a plain `jax.jit`, a `JaxRuntimeError` that ends with it). With
    `FUNCTORCH_LITE_CHECKS=0` it is clamped to `[0, max_n]` instead: a
    negative `n` runs no step, an `n` above `max_n` runs `max_n` steps.

    Args:
      body: a pure function `carry -> carry` that keeps the tree structure,
        shapes and dtypes of `carry`.
      carry: the initial pytree of arrays.
      n: the trip count. `mode="dynamic"`: a concrete int, or a concrete int
        array of shape `(N,)` (one count per row). `mode="static"`: an int or
        an int32 scalar, which may be traced, or an int array of shape `(N,)`.
        A per-example `n` needs a leading axis `N` on every carry leaf.
      max_n: the largest `n`; required with `mode="static"`, optional with
        `mode="dynamic"` (then only used for validation).
      mode: `"static"` or `"dynamic"`.
      static_method: `"bounded"`, `"scan"` or `"masked"`; ignored in the
        dynamic mode.

    Returns:
      The final carry.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> double = lambda c: 2.0 * c
      >>> fl.repeat(double, jnp.float32(1.0), 3, mode="dynamic")
      Array(8., dtype=float32)
      >>> run = jax.jit(lambda c, n: fl.repeat(double, c, n, max_n=5))
      >>> [float(run(jnp.float32(1.0), n)) for n in range(4)]
      [1.0, 2.0, 4.0, 8.0]
      >>> run(jnp.ones(3), jnp.array([0, 2, 3]))  # one count per row
      Array([1., 4., 8.], dtype=float32)
    """
    where = "repeat"
    if mode not in MODES:
        raise ValueError(
            f'{where}: `mode` must be "static" or "dynamic"; got {mode!r}.'
        )
    if not callable(body):
        raise TypeError(f"{where}: `body` must be callable; got {body!r}.")
    per_example = is_per_example(n)
    if mode == "dynamic":
        if max_n is not None:
            max_n = _check_max_n(max_n, where=where)
        if per_example:
            counts = check_per_example_counts(
                n, max_n, carry, where=where, name="n", dynamic=True
            )
            return _repeat_grouped(body, carry, counts, where=where)
        count = check_concrete_count(n, max_n, where=where, name="n")
        return _repeat_unrolled(body, carry, count, where=where)
    if static_method not in STATIC_METHODS:
        raise ValueError(
            f"{where}: `static_method` must be one of {STATIC_METHODS}; "
            f"got {static_method!r}."
        )
    max_count = _check_max_n(max_n, where=where)
    _check_body_keeps_structure(body, carry, where=where)
    if per_example:
        counts = check_per_example_counts(
            n, max_count, carry, where=where, name="n", dynamic=False
        )

        def step(i: jax.Array, c: Any) -> Any:
            return _select_rows(i < counts, body(c), c)

        count = jnp.max(counts, initial=0)
    else:
        # In [0, max_count]: a concrete count is checked, a traced one clamped.
        count = check_static_count(n, max_count, where=where, name="n")

        def step(i: jax.Array, c: Any) -> Any:
            del i
            return body(c)

    if max_count == 0:
        return carry
    if static_method == "scan":
        return _repeat_scan(step, carry, count, max_count)
    if static_method == "masked":
        return _repeat_masked(step, carry, count, max_count)
    out, _ = bounded_while(
        lambda i, c: i < count, step, carry, max_steps=max_count, checkpoints=None
    )
    return out


def _check_body_keeps_structure(
    body: Callable, carry: Any, *, where: str, name: str = "body"
) -> None:
    _check_same_carry(carry, jax.eval_shape(body, carry), where=where, name=name)


def _check_same_carry(carry: Any, out: Any, *, where: str, name: str = "body") -> None:
    if (diff := structure_diff(out, carry)) is not None:
        raise TypeError(
            f"{where}: `{name}` must return a carry with the structure of its input "
            f"(expected: the input's, got: the output's).\n{diff}"
        )
    for path, b, a in leaf_pairs(out, carry):
        a_shape, a_dtype = jnp.shape(a), jnp.result_type(a)
        b_shape, b_dtype = jnp.shape(b), jnp.result_type(b)
        if (a_shape, a_dtype) != (b_shape, b_dtype):
            raise TypeError(
                f"{where}: `{name}` must keep each carry leaf's shape and dtype; leaf "
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


def _repeat_grouped(
    body: Callable, carry: Any, counts: np.ndarray, *, where: str
) -> Any:
    """Per-example counts, define-by-run: each distinct count's rows as a group.

    The rows of each distinct count are gathered, run `count` times in a
    Python loop, and scattered back into place.
    """
    out = carry
    for count in np.unique(counts):
        if count == 0:
            continue
        rows = np.nonzero(counts == count)[0]
        group = jax.tree.map(lambda a, rows=rows: a[rows], carry)
        group = _repeat_unrolled(body, group, int(count), where=where)
        out = jax.tree.map(lambda a, g, rows=rows: a.at[rows].set(g), out, group)
    return out


def _repeat_scan(body: Callable, carry: Any, n: jax.Array, max_n: int) -> Any:
    """`lax.scan` over `max_n` steps, skipping those past `n` with `lax.cond`.

    `body(i, carry)`; equivalent to
    `for i in range(max_n): carry = body(i, carry) if i < n else carry`.
    """

    def step(c: Any, i: jax.Array) -> tuple[Any, None]:
        return lax.cond(i < n, lambda c_: body(i, c_), lambda c_: c_, c), None

    carry, _ = lax.scan(step, carry, _step_indices(max_n))
    return carry


def _repeat_masked(body: Callable, carry: Any, n: jax.Array, max_n: int) -> Any:
    """`lax.scan` over `max_n` steps, all computed, the ones past `n` discarded."""

    def step(c: Any, i: jax.Array) -> tuple[Any, None]:
        new = body(i, c)
        keep = i < n
        return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, c), None

    carry, _ = lax.scan(step, carry, _step_indices(max_n))
    return carry


def _step_indices(max_n: int) -> np.ndarray:
    """The step indices `0, ..., max_n - 1`, as a constant of the program.

    `jnp.arange` would be an iota computed when the program runs; fed to
    `lax.scan` as its per-step input, it made the whole DynamicNet step 1.29x
    slower on one XLA thread (bench/RESULTS.md, "One XLA thread").
    """
    return np.arange(max_n, dtype=np.int32)


def _check_cond_output(cond_fun: Callable, carry: Any, *, where: str) -> None:
    out = jax.eval_shape(cond_fun, carry)
    shape = getattr(out, "shape", None)
    dtype = getattr(out, "dtype", None)
    if shape != () or dtype != jnp.bool_:
        got = (
            f"shape {shape} and dtype {dtype}"
            if shape is not None
            else type(out).__name__
        )
        raise TypeError(
            f"{where}: `cond_fun` must return a boolean scalar; got {got}. Reduce "
            "it, for example `jnp.all(...)` or `(err > tol).any()`."
        )


def while_loop(
    cond_fun: Callable[[Carry], Any],
    body_fun: Callable[[Carry], Carry],
    init: Carry,
    *,
    max_steps: int,
    mode: str = "static",
    checkpoints: int | None = None,
    return_steps: bool = False,
) -> Any:
    """Run `while cond_fun(carry): carry = body_fun(carry)`, at most `max_steps` times.

    A data-dependent loop that training can differentiate (`tf.while_loop`
    with a reverse pass). `cond_fun` may depend on the carry: a convergence
    test, a halting unit, a counter.

    * `mode="static"`: one compiled program for every trip count; `cond_fun`
      is traced. Reverse mode (`jax.grad`, `jax.vjp`, `make_step`, and again
      for higher orders) gives the gradient of the unrolled loop that ran
      exactly as many steps as the forward pass did. Parameters that
      `body_fun` closes over get their gradients summed over the steps. `jit`,
      `vmap` (each example stops at its own step) and forward-over-reverse
      (`jax.hessian`) compose; pure forward mode (`jax.jvp`) does not.
      Reaching `max_steps` with `cond_fun` still true stops the loop there
      (a data-dependent halt, not an error): pass `return_steps=True` to see
      the steps run (`steps == max_steps` with `cond_fun(carry)` still true
      means it was cut).
    * `mode="dynamic"`: a plain Python `while` on concrete values, run
      eagerly (define-by-run). Under `jit` the condition is traced, which this
      mode refuses with a clear error. Reaching `max_steps` with `cond_fun`
      still true raises `RuntimeError`.

    `checkpoints` trades memory for time in the static mode's gradient.
    `None` is the fastest, with memory growing with `max_steps`: while all
    `max_steps` steps' residuals (what the body's derivative needs, such as
    its input and an activation's slope) fit in 4 MiB, each step's are
    stored and the backward pass recomputes nothing; past that, the carry at
    every step is stored and each step's forward recomputed in the backward
    pass (for large carries only the first steps and a checkpoint every
    `sqrt(max_steps)` steps are kept, and longer runs replay segments).
    An int `k` keeps at most `k` carries (one every `ceil(max_steps / k)`
    steps) and recomputes each segment during the backward pass: memory
    `O(k + max_steps / k)` carries, one extra forward pass, the same gradients.

    Args:
      cond_fun: `carry -> bool scalar`.
      body_fun: `carry -> carry`, keeping the tree structure, shapes and dtypes.
        Non-float leaves (step counters) ride along without gradients.
      init: the initial carry, a pytree of arrays.
      max_steps: the most steps to run, a positive int.
      mode: `"static"` or `"dynamic"`.
      checkpoints: `None` or a positive int (static mode; see above).
      return_steps: also return the number of steps run.

    Returns:
      The final carry, or `(carry, steps)` with `return_steps=True` (`steps`
      an int32 scalar in the static mode, an int in the dynamic mode).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> def newton_sqrt(a):  # x <- (x + a / x) / 2 until |x*x - a| < 1e-5
      ...     return fl.while_loop(
      ...         lambda x: jnp.abs(x * x - a) > 1e-5,
      ...         lambda x: 0.5 * (x + a / x),
      ...         a,
      ...         max_steps=32,
      ...     )
      >>> round(float(newton_sqrt(2.0)), 4)
      1.4142
      >>> # d sqrt(a) / da = 1 / (2 sqrt(a))
      >>> round(float(jax.grad(newton_sqrt)(2.0)), 4)
      0.3536
      >>> fl.while_loop(lambda c: c < 10, lambda c: c * 2, 1, max_steps=8,
      ...               mode="dynamic", return_steps=True)
      (16, 4)
    """
    where = "while_loop"
    if mode not in MODES:
        raise ValueError(
            f'{where}: `mode` must be "static" or "dynamic"; got {mode!r}.'
        )
    for name, fn in (("cond_fun", cond_fun), ("body_fun", body_fun)):
        if not callable(fn):
            raise TypeError(f"{where}: `{name}` must be callable; got {fn!r}.")
    bound = check_int(max_steps, where=where, name="max_steps", minimum=1)
    if bound > _INT32_MAX:
        raise ValueError(
            f"{where}: `max_steps` must be at most 2**31 - 1 (the loop counts in "
            f"int32); got {bound}."
        )
    check_int(checkpoints, where=where, name="checkpoints", minimum=1, allow_none=True)
    check_bool(return_steps, where=where, name="return_steps")
    if mode == "dynamic":
        carry, steps = _while_dynamic(cond_fun, body_fun, init, bound, where=where)
        return (carry, steps) if return_steps else carry
    _check_cond_output(cond_fun, init, where=where)
    _check_body_keeps_structure(body_fun, init, where=where, name="body_fun")
    carry, steps = bounded_while(
        lambda i, c: cond_fun(c),
        lambda i, c: body_fun(c),
        init,
        max_steps=bound,
        checkpoints=checkpoints,
    )
    return (carry, steps) if return_steps else carry


def _while_dynamic(
    cond_fun: Callable, body_fun: Callable, carry: Any, max_steps: int, *, where: str
) -> tuple[Any, int]:
    steps = 0
    while True:
        pred = cond_fun(carry)
        if isinstance(pred, Tracer):
            raise TypeError(
                f"{where}: `cond_fun` returned a traced value, which the dynamic "
                "mode cannot branch on (it runs eagerly). Call it outside `jit`, or "
                'use mode="static", whose loop traces the condition.'
            )
        if jnp.shape(pred) != () or jnp.result_type(pred) != jnp.bool_:
            raise TypeError(
                f"{where}: `cond_fun` must return a boolean scalar; got shape "
                f"{jnp.shape(pred)} and dtype {jnp.result_type(pred)}."
            )
        if not bool(pred):
            return carry, steps
        if steps == max_steps:
            raise RuntimeError(
                f"{where}: `cond_fun` was still true after `max_steps`={max_steps} "
                'steps (mode="dynamic"). Raise `max_steps`, or check the condition.'
            )
        new = body_fun(carry)
        if steps == 0:
            _check_same_carry(carry, new, where=where, name="body_fun")
        carry = new
        steps += 1
