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
#   wraps it in a `JaxRuntimeError` whose message ends with ours.
#
# `FUNCTORCH_LITE_CHECKS=0` in the environment turns both off (read when a
# program is traced): a traced value out of range is then clamped (`repeat`,
# the recurrent layers' lengths), gives NaN (`DynamicNet`) or stops the loop
# (`while_loop`), as documented at each function.

ENV_VAR = "FUNCTORCH_LITE_CHECKS"


def checks_enabled() -> bool:
    """Whether traced values are checked (`FUNCTORCH_LITE_CHECKS`, default on)."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    return value not in ("0", "false", "off", "no")


class TracedValueError(ValueError):
    """A traced count, depth or length was out of range when the program ran."""


class TracedLoopError(RuntimeError):
    """A static `while_loop` reached `max_steps` with its condition still true."""


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
) -> None:
    """Check a traced `value` against `[low, high]` when the program runs.

    Every element must be in range (see the notes above). A concrete `value`
    is left to the concrete checks.
    """
    if not isinstance(value, Tracer) or not checks_enabled():
        return
    known = _IN_RANGE.get(id(value))
    if known is not None and known() is value:
        return
    inputs = _INPUTS.get()
    found = inputs.find(value) if inputs is not None else None
    if found is not None:
        position, leaf, stacked = found
        check = HostCheck(
            position, leaf, low, high, where, name, fix, stacked, jnp.ndim(value) > 0
        )
        inputs.host.append(check)  # type: ignore[union-attr]
        return
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

    _error_if(jnp.any(bad), report, flat[row], row)


def mark_in_range(value: Any) -> None:
    """Record that `value` (a clamped copy, say) needs no further check."""
    if isinstance(value, Tracer):
        if len(_IN_RANGE) > 4096:  # forget values whose trace has ended
            for key in [k for k, ref in _IN_RANGE.items() if ref() is None]:
                del _IN_RANGE[key]
        _IN_RANGE[id(value)] = weakref.ref(value)


def check_traced_loop(failed: Any, *, where: str, max_steps: int) -> None:
    """Raise `TracedLoopError` when the program runs if `failed` (a traced bool)."""
    if not checks_enabled():
        return
    message = (
        f"{where}: `cond_fun` was still true after `max_steps`={max_steps} steps "
        '(mode="static"). Raise `max_steps`, or check the condition; to stop '
        "there instead, pass `return_steps=True` and test `steps == max_steps`."
    )
    if not isinstance(failed, Tracer):
        if bool(np.any(np.asarray(failed))):
            raise TracedLoopError(message)
        return

    def report(flag: Any) -> None:
        if bool(np.any(flag)):
            _fail(TracedLoopError(message))

    _error_if(jnp.any(failed), report)


def _error_if(failed: jax.Array, report: Any, *operands: Any) -> None:
    # The callback is called only when `failed` (under `vmap` both branches of
    # the cond may run: `report` tests the flag again).
    def call(*ops: Any) -> None:
        jax.debug.callback(report, *ops)

    lax.cond(failed, call, lambda *ops: None, failed, *operands)


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
        return not isinstance(exc, TracedValueError | TracedLoopError)


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


def check_in_graph(check: HostCheck, args: tuple) -> None:
    """Emit `check` in the program being traced, on its argument's tracer."""
    if check.position >= len(args):
        return
    leaves = jax.tree.leaves(args[check.position])
    if check.leaf < len(leaves) and isinstance(leaves[check.leaf], Tracer):
        check_traced_range(
            leaves[check.leaf],
            check.low,
            check.high,
            where=check.where,
            name=check.name,
            fix=check.fix,
        )
