"""Private argument checks shared by the public functions' boundaries."""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import weakref
from typing import Any, Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer


@overload
def check_int(
    value: Any,
    *,
    where: str,
    name: str,
    minimum: int,
    allow_none: Literal[False] = False,
    context: str = "",
    fix: str = "",
) -> int: ...


@overload
def check_int(
    value: Any,
    *,
    where: str,
    name: str,
    minimum: int,
    allow_none: bool,
    context: str = "",
    fix: str = "",
) -> int | None: ...


def check_int(
    value: Any,
    *,
    where: str,
    name: str,
    minimum: int,
    allow_none: bool = False,
    context: str = "",
    fix: str = "",
) -> int | None:
    """Return `value` as an int, or raise `TypeError` or `ValueError`.

    `TypeError` for a value that is not an int (a bool is not), `ValueError`
    for one below `minimum`. The message names the function (`where`), the
    argument (`name`), what was expected and what was given; `context` follows
    the expectation, `fix` ends it.
    """
    if value is None and allow_none:
        return None
    if minimum == 0:
        expected = "a non-negative int"
    elif minimum == 1:
        expected = "a positive int"
    else:
        expected = f"an int >= {minimum}"
    expected += " or None" if allow_none else ""
    expected += context
    fix = f" {fix}" if fix else ""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"{where}: `{name}` must be {expected}; got {type(value).__name__} "
            f"{value!r}.{fix}"
        )
    if value < minimum:
        raise ValueError(f"{where}: `{name}` must be {expected}; got {value!r}.{fix}")
    return int(value)


def check_bool(value: Any, *, where: str, name: str) -> bool:
    """Return `value`, or raise `TypeError` if it is not a bool (truthy is not)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(
            f"{where}: `{name}` must be a bool; got {type(value).__name__} {value!r}."
        )
    return bool(value)


# --- Checks on traced values -------------------------------------------------
#
# A count, depth or length that is traced (an argument of a `jit` function, a
# `make_step` step) cannot be checked when the graph is built. Two ways to
# check it when the program runs, chosen per value:
#
# * Before dispatch, on the host, for free: when the traced value is one of the
#   arguments of an `fl.jit` function (which every `make_step` step is), the
#   argument itself is checked before the call. The program carries nothing,
#   and nothing donated to the call is lost.
# * In the graph, otherwise (a value computed in the graph, or a plain
#   `jax.jit`): a `lax.cond` that calls back to the host only when a value is
#   out of range, in the manner of Equinox's `error_if`; the callback raises.
#   Under `fl.jit` the error comes out as itself; under a plain `jax.jit` JAX
#   wraps it in its runtime error (`JaxRuntimeError`, or `ValueError` from its
#   fast dispatch path) whose message ends with ours.
#
# `FUNCTORCH_LITE_CHECKS=0` in the environment turns both off (read when a
# program is traced): a traced value out of range is then clamped (`repeat`,
# the recurrent layers' lengths) or gives NaN (`DynamicNet`), as documented at
# each function. A `while_loop` that reaches `max_steps` is a data-dependent
# halt, not a caller's count: it stops there, checked or not.

ENV_VAR = "FUNCTORCH_LITE_CHECKS"


def checks_enabled() -> bool:
    """Whether traced values are checked (`FUNCTORCH_LITE_CHECKS`, default on)."""
    value = os.environ.get(ENV_VAR)
    return value is None or value.strip().lower() not in ("0", "false", "off", "no")


class TracedValueError(ValueError):
    """A traced count, depth or length was out of range when the program ran."""


_FAILED: list[BaseException] = []  # raised by callbacks; `fl.jit` re-raises them
_FAILED_LOCK = threading.Lock()


class HostCheck(NamedTuple):
    """A range check on one argument leaf of an `fl.jit` function."""

    position: int  # of the argument
    leaf: int  # index among the argument's leaves
    low: int
    high: int
    where: str
    name: str
    fix: str
    stacked: bool  # the checked value is one step's slice of the argument
    per_row: bool  # the checked value has one entry per row


class _Inputs:
    """The argument tracers of an `fl.jit` trace, and the host checks found."""

    def __init__(self, args: tuple) -> None:
        self.index: dict[int, tuple[Any, int, int, bool]] = {}
        for position, arg in enumerate(args):
            for leaf, value in enumerate(jax.tree.leaves(arg)):
                if isinstance(value, Tracer):  # static arguments are not
                    self.index[id(value)] = (weakref.ref(value), position, leaf, False)
        self.host: list[HostCheck] = []

    def find(self, value: Any) -> tuple[int, int, bool] | None:
        entry = self.index.get(id(value))
        if entry is None or entry[0]() is not value:
            return None
        return entry[1], entry[2], entry[3]


_INPUTS: contextvars.ContextVar[_Inputs | None] = contextvars.ContextVar(
    "functorch_lite_inputs", default=None
)
_IN_RANGE: dict[int, Any] = {}  # id -> weakref of values already checked


def tracing_inputs(args: tuple) -> tuple[_Inputs, contextvars.Token]:
    """Start collecting host checks for a trace of an `fl.jit` function."""
    inputs = _Inputs(args)
    return inputs, _INPUTS.set(inputs)


def alias_inputs(outer: list, inner: list) -> None:
    """Check `inner[i]` (a loop's slice of `outer[i]`, say) as `outer[i]`.

    A range check on every slice of a stacked argument is the same check on
    the whole argument, so it can run on the host as well.
    """
    inputs = _INPUTS.get()
    if inputs is None:
        return
    for o, i in zip(outer, inner, strict=True):
        entry = inputs.index.get(id(o))
        if entry is not None and entry[0]() is o:
            inputs.index[id(i)] = (weakref.ref(i), entry[1], entry[2], True)


def range_message(
    where: str,
    name: str,
    low: int,
    high: int,
    value: int,
    row: int | None,
    fix: str,
    step: int | None = None,
) -> str:
    at = [] if step is None else [f"step {step} of the fused call"]
    at += [] if row is None else [f"row {row}"]
    every = "every " if row is not None else ""
    place = f" at {', '.join(at)}" if at else ""
    return (
        f"{where}: {every}`{name}` must be in [{low}, {high}]; got {value}{place} "
        f"(a traced value, checked when the program ran). {fix}".rstrip()
    )


def check_host(check: HostCheck, value: Any) -> None:
    """Run a host check on a concrete argument leaf; raise `TracedValueError`."""
    values = np.asarray(value)
    if not np.issubdtype(values.dtype, np.integer):
        return
    bad = (values < check.low) | (values > check.high)
    if not bad.any():
        return
    index = np.unravel_index(int(np.argmax(bad)), values.shape)
    step = int(index[0]) if check.stacked else None
    row = int(index[-1]) if check.per_row else None
    raise TracedValueError(
        range_message(
            check.where,
            check.name,
            check.low,
            check.high,
            int(values[index]),
            row,
            check.fix,
            step,
        )
    )


def check_traced_range(
    value: Any, low: int, high: int, *, where: str, name: str, fix: str = ""
) -> Any:
    """Check a traced `value` against `[low, high]` when the program runs.

    Every element must be in range (see the notes above). Returns `value`;
    use what it returns: an in-graph check makes it depend on the check, so
    that the check stays in the program. A concrete `value` is left to the
    concrete checks.
    """
    if not isinstance(value, Tracer) or not checks_enabled():
        return value
    known = _IN_RANGE.get(id(value))
    if known is not None and known() is value:
        return value
    inputs = _INPUTS.get()
    found = inputs.find(value) if inputs is not None else None
    if found is not None:
        position, leaf, stacked = found
        check = HostCheck(
            position, leaf, low, high, where, name, fix, stacked, jnp.ndim(value) > 0
        )
        inputs.host.append(check)  # type: ignore[union-attr]
        return value
    flat = jnp.reshape(value, (-1,))
    bad = (flat < low) | (flat > high)
    row = jnp.argmax(bad)
    per_row = jnp.ndim(value) > 0

    def report(failed: Any, got: Any, at: Any) -> None:
        # Arrays with a leading batch axis under `vmap`: report the first.
        failed = np.asarray(failed).reshape(-1)
        if failed.any():
            k = int(np.argmax(failed))
            got = int(np.asarray(got).reshape(-1)[k])
            at = int(np.asarray(at).reshape(-1)[k]) if per_row else None
            _fail(TracedValueError(range_message(where, name, low, high, got, at, fix)))

    zero = _error_if(jnp.any(bad), report, flat[row], row)
    return value + zero.astype(value.dtype)


def mark_in_range(value: Any) -> None:
    """Record that `value` (a clamped copy, say) needs no further check."""
    if isinstance(value, Tracer):
        if len(_IN_RANGE) > 4096:  # forget values whose trace has ended
            for key in [k for k, ref in _IN_RANGE.items() if ref() is None]:
                del _IN_RANGE[key]
        _IN_RANGE[id(value)] = weakref.ref(value)


def _error_if(failed: jax.Array, report: Any, *operands: Any) -> jax.Array:
    """A zero (int32) that comes from a host call of `report` when `failed`.

    The callback is called only when `failed` (under `vmap` both branches of
    the cond may run: `report` tests the flag again). A `pure_callback` whose
    result the program uses: `jax.debug.callback`, an effect, made each call
    of the reference step about 200 us slower on CPU (466 against 260 us), and
    this costs nothing measurable (249 us). Being pure, it is checked where
    the value matters: XLA drops a check whose value no output depends on.
    """
    zero = jax.ShapeDtypeStruct((), jnp.int32)

    def call(*ops: Any) -> jax.Array:
        def host(*values: Any) -> np.ndarray:
            report(*values)
            # Under `vmap`, one zero per example (the flag's batch shape).
            return np.zeros(np.shape(values[0]), np.int32)

        return jax.pure_callback(host, zero, *ops, vmap_method="broadcast_all")

    return lax.cond(failed, call, lambda *ops: jnp.int32(0), failed, *operands)


def _fail(error: BaseException) -> None:
    with _FAILED_LOCK:
        _FAILED.append(error)
    raise error


def pop_failure() -> BaseException | None:
    """The newest error raised by a traced check's callback, if any."""
    with _FAILED_LOCK:
        if not _FAILED:
            return None
        error = _FAILED[-1]
        _FAILED.clear()
        return error


class _QuietOwnErrors(logging.Filter):
    """Drop JAX's log record for a callback that raised one of our errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, TracedValueError)


for _name in ("jax._src.debugging", "jax._src.callback"):
    logging.getLogger(_name).addFilter(_QuietOwnErrors())


def reject_torch(value: Any, *, where: str, name: str) -> None:
    """Raise `TypeError` if `value` (or a leaf of it) is a `torch.Tensor`.

    Model and layer `apply` functions are traced JAX code: they take JAX or
    NumPy arrays. (The steps convert a batch of tensors themselves.)
    """
    from functorch_lite._torch_data import is_torch_tensor  # noqa: PLC0415

    leaves = jax.tree.leaves(value, is_leaf=is_torch_tensor)
    for leaf in leaves:
        if is_torch_tensor(leaf):
            raise TypeError(
                f"{where}: `{name}` holds a torch.Tensor ({leaf.dtype}, shape "
                f"{tuple(leaf.shape)}); JAX functions take JAX or NumPy arrays. "
                f"Convert it: `jnp.asarray({name}.numpy())`, or without a copy "
                f"`jax.dlpack.from_dlpack({name})`; parameters from a torch "
                "module: `fl.interop.from_torch(module)`. (A step from "
                "`fl.train.make_step` converts a batch of tensors itself.)"
            )


def check_in_graph(check: HostCheck, args: tuple) -> Any:
    """Emit `check` in the program being traced, on its argument's tracer.

    Returns an int32 zero that depends on the check (add it to an output so
    that the check stays in the program), or None.
    """
    if check.position >= len(args):
        return None
    leaves = jax.tree.leaves(args[check.position])
    value = leaves[check.leaf] if check.leaf < len(leaves) else None
    if not isinstance(value, Tracer):
        return None
    checked = check_traced_range(
        value, check.low, check.high, where=check.where, name=check.name, fix=check.fix
    )
    if checked is value:
        return None
    return jnp.sum(checked - value).astype(jnp.int32)


_CANONICAL: dict[Any, Any] = {}
_INT_KEY = ((), jax.dtypes.canonicalize_dtype(np.int64), True)  # a Python int


def _canonical(dtype: Any) -> Any:
    found = _CANONICAL.get(dtype)
    if found is None:
        found = _CANONICAL[dtype] = jax.dtypes.canonicalize_dtype(dtype)
    return found


def _leaf_key(value: Any) -> tuple:
    """What a trace of `value` sees: shape, canonical dtype, weak type."""
    if type(value) is int:
        return _INT_KEY
    if isinstance(value, Tracer):
        aval = value.aval
        return (aval.shape, _canonical(aval.dtype), aval.weak_type)
    if isinstance(value, jax.Array):
        return (value.shape, value.dtype, value.weak_type)  # canonical already
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return (
            tuple(shape),
            _canonical(value.dtype),
            bool(getattr(value, "weak_type", False)),
        )
    try:
        aval = jax.typeof(value)
    except TypeError:
        return ("?", type(value).__name__)
    return (aval.shape, _canonical(aval.dtype), aval.weak_type)


def signature_key(args: tuple, skip: frozenset[int], static: frozenset[int]) -> tuple:
    """A key for the trace that `args` get.

    The batch arguments' shapes and dtypes and the static arguments' values
    (params and state, at `skip`, are left out). Host checks are kept per
    key: their bounds may follow a shape (a sequence length is at most the
    padded length `T` of `xs`).
    """
    key = []
    for i, arg in enumerate(args):
        if i in skip:
            continue
        if i in static:
            try:
                hash(arg)
            except TypeError:
                arg = id(arg)
            key.append(("static", arg))
        elif hasattr(arg, "shape") or isinstance(arg, int | float | bool):
            key.append(_leaf_key(arg))
        else:
            key.append(tuple(_leaf_key(leaf) for leaf in jax.tree.leaves(arg)))
    return tuple(key)


def run_host_checks(checks: list[HostCheck], args: tuple) -> None:
    """Run host checks on the concrete arguments of a call, before dispatch."""
    for check in checks:
        if check.position >= len(args):
            continue
        arg = args[check.position]
        if type(arg) is int and check.leaf == 0:  # the common case, kept short
            if check.low <= arg <= check.high:
                continue
            check_host(check, arg)
            continue
        leaves = jax.tree.leaves(arg)
        if check.leaf < len(leaves) and not isinstance(leaves[check.leaf], Tracer):
            check_host(check, leaves[check.leaf])
