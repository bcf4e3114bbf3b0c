"""Compile accounting: `jit` with stats, `compile_counter`, trace budgets, cache."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax import monitoring
from jax.core import Tracer

from functorch_lite._checks import check_int

__all__ = [
    "CACHE_ENV_VAR",
    "CompileCounter",
    "CompileStats",
    "Compiled",
    "compile_counter",
    "enable_persistent_cache",
    "jit",
]

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

CACHE_ENV_VAR = "FUNCTORCH_LITE_CACHE_DIR"


# --------------------------------------------------------------------------- events
# One process-wide jax.monitoring listener fans events out to whoever is active.
# jax.monitoring has no per-scope listeners, and registering one per call would
# leak listeners when a call raises.

_lock = threading.Lock()
_sinks: list[Callable[[str, float, dict], None]] = []
_installed = False
# The `fl.jit` functions being called on this thread, innermost last. A
# thread-local stack costs far less per call than registering a sink.
_calls = threading.local()
_JAX_DIR = os.path.dirname(jax.__file__)
_EAGER_DIRS = tuple(
    os.path.join(_JAX_DIR, "_src", sub) + os.sep for sub in ("numpy", "random")
)


def _listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
    # Matches jax.monitoring.EventDurationListenerWithMetadata.
    if event not in (_TRACE_EVENT, _LOWER_EVENT, _COMPILE_EVENT):
        return
    active = getattr(_calls, "stack", None)
    if active:
        active[-1]._sink(event, duration_secs, kwargs)
    with _lock:
        sinks = list(_sinks)
    for sink in sinks:
        sink(event, duration_secs, kwargs)


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:
            monitoring.register_event_duration_secs_listener(_listener)
            _installed = True


@contextlib.contextmanager
def _sink(fn: Callable[[str, float, dict], None]) -> Iterator[None]:
    _install()
    with _lock:
        _sinks.append(fn)
    try:
        yield
    finally:
        with _lock:
            _sinks.remove(fn)


def _is_eager_op_compile() -> bool:
    """Tell whether the compile in progress serves an eager op, not a user's jit.

    Creating or combining arrays outside `jit` (`jnp.ones`, `x + 1`,
    `jax.random.normal`) compiles one small program per primitive. Those come
    from `apply_primitive`, or enter JAX through `jax.numpy` or `jax.random`.
    """
    frame = sys._getframe(2)
    first_jax_file = None
    while frame is not None:
        code = frame.f_code
        if code.co_name == "apply_primitive":
            return True
        if code.co_filename.startswith(_JAX_DIR):
            first_jax_file = code.co_filename
        frame = frame.f_back
    return first_jax_file is not None and first_jax_file.startswith(_EAGER_DIRS)


# ----------------------------------------------------------------------- counter


@dataclasses.dataclass
class CompileCounter:
    """What `compile_counter` saw: backend compiles and their seconds.

    Attributes:
      compiles: backend compiles of jitted programs in the block, without the
        small per-primitive compiles of eager array code.
      seconds: backend compile seconds of those compiles.
      names: the `fun_name` of each counted compile, in order (`"jit(step)"`).
      eager_compiles: the per-primitive compiles that were left out.
    """

    compiles: int = 0
    seconds: float = 0.0
    names: list[str] = dataclasses.field(default_factory=list)
    eager_compiles: int = 0


@contextlib.contextmanager
def compile_counter(fun_name: str | None = None) -> Iterator[CompileCounter]:
    """Count the backend compiles that happen inside a `with` block.

    Args:
      fun_name: if given, count only programs of this name: the jitted
        function's `__name__`, with or without the `jit(...)` around it.

    Yields:
      A `CompileCounter`, filled in as the block runs.

    >>> import jax, jax.numpy as jnp
    >>> import functorch_lite as fl
    >>> f = jax.jit(lambda x: x * 2)
    >>> with fl.compile_counter() as counter:
    ...     _ = f(jnp.ones(3)); _ = f(jnp.ones(3)); _ = f(jnp.ones(4))
    >>> counter.compiles
    2
    """
    counter = CompileCounter()
    want = None
    if fun_name is not None:
        want = fun_name if fun_name.startswith("jit(") else f"jit({fun_name})"

    def sink(event: str, duration: float, kwargs: dict) -> None:
        if event != _COMPILE_EVENT:
            return
        name = kwargs.get("fun_name", "")
        if want is not None and name != want:
            return
        if want is None and _is_eager_op_compile():
            counter.eager_compiles += 1
            return
        counter.compiles += 1
        counter.seconds += duration
        counter.names.append(name)

    with _sink(sink):
        yield counter


# -------------------------------------------------------------------------- jit


@dataclasses.dataclass
class CompileStats:
    """What one `fl.jit` function has cost so far.

    Attributes:
      traces: times the Python function was traced (one per new signature).
      compiles: backend compiles of it (a persistent-cache hit still counts as
        a compile here when JAX reports it as one).
      compile_seconds: trace, lowering and backend-compile seconds together.
      calls: calls made through the wrapper.
    """

    traces: int = 0
    compiles: int = 0
    compile_seconds: float = 0.0
    calls: int = 0


def argnames(value: Any, *, where: str, name: str) -> tuple[str, ...]:
    """Read an argument-names option: a str is one name, None is none."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        names = tuple(value)
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"{where}: `{name}` must be a str or a sequence of str; got {value!r}."
        )
    return names


_DONATION_ERRORS = (
    "has been deleted or donated",
    "Array has been deleted",
    "donate the same buffer twice",
)


def donation_error(
    where: str, donate_argnames: Sequence[str], arguments: dict[str, Any]
) -> ValueError | None:
    """The error for a donated argument that cannot be donated, or None.

    An array donated to an earlier call is deleted (its buffer became an
    output); one array passed in two donated places would be reused twice.
    """
    seen: dict[int, str] = {}
    for name in donate_argnames:
        if name not in arguments:
            continue
        flat = jax.tree_util.tree_flatten_with_path(arguments[name])[0]
        for path, leaf in flat:
            if not isinstance(leaf, jax.Array) or isinstance(leaf, Tracer):
                continue
            label = f"`{name}{jax.tree_util.keystr(path)}`"
            if leaf.is_deleted():
                return ValueError(
                    f"{where}: {label} was donated to an earlier call, which reused "
                    "its buffer for that call's outputs, so it cannot be passed "
                    "again. Pass the arrays the call returned (`params, opt_state, "
                    "loss = step(params, opt_state, ...)`), or build the step with "
                    "`donate=False` to keep its inputs."
                )
            if id(leaf) in seen:
                return ValueError(
                    f"{where}: {seen[id(leaf)]} and {label} are the same array, and "
                    "both are donated: one buffer cannot be reused twice. Pass a "
                    "copy (`jnp.copy`) in one place, or build the step with "
                    "`donate=False`."
                )
            seen[id(leaf)] = label
    return None


def _describe(value: Any) -> Any:
    """A comparable summary of one argument: shapes and dtypes, or the value."""
    leaves, treedef = jax.tree_util.tree_flatten(value)
    out = []
    for leaf in leaves:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out.append(f"{leaf.dtype}{list(leaf.shape)}")
        else:
            out.append(repr(leaf))
    if treedef.num_leaves == 1 and treedef == jax.tree.structure(0):
        return out[0]
    return f"{treedef} {out}"


class Compiled:
    """A jitted function that records its own `CompileStats` (see `fl.jit`)."""

    def __init__(
        self,
        fun: Callable,
        *,
        static_argnames: Sequence[str] = (),
        donate_argnames: Sequence[str] = (),
        max_traces: int | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(fun):
            raise TypeError(f"jit: `fun` must be callable; got {fun!r}.")
        static_argnames = argnames(static_argnames, where="jit", name="static_argnames")
        donate_argnames = argnames(donate_argnames, where="jit", name="donate_argnames")
        check_int(
            max_traces, where="jit", name="max_traces", minimum=1, allow_none=True
        )
        self.fun = fun
        self.name = name or getattr(fun, "__name__", "fun")
        self.static_argnames = tuple(static_argnames)
        self.donate_argnames = tuple(donate_argnames)
        self.stats = CompileStats()
        self.max_traces = max_traces
        self._signature = inspect.signature(fun)
        params = self._signature.parameters
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for label, names in (
            ("static_argnames", static_argnames),
            ("donate_argnames", donate_argnames),
        ):
            unknown = [n for n in names if n not in params and not has_var_kw]
            if unknown:
                raise ValueError(
                    f"jit: `{label}` names {unknown}, which `{self.name}` does not "
                    f"take; its arguments are {list(params)}."
                )
        self._last: dict[str, Any] | None = None
        _install()

        @functools.wraps(fun)
        def traced(*args: Any, **kwargs: Any) -> Any:
            self._on_trace(args, kwargs)
            return fun(*args, **kwargs)

        traced.__name__ = self.name
        self._jitted = jax.jit(
            traced,
            static_argnames=tuple(static_argnames),
            donate_argnames=tuple(donate_argnames),
        )
        functools.update_wrapper(self, fun)

    def _on_trace(self, args: tuple, kwargs: dict) -> None:
        try:
            bound = self._signature.bind(*args, **kwargs)
            described = {k: _describe(v) for k, v in bound.arguments.items()}
        except TypeError:
            described = {"<args>": _describe((args, kwargs))}
        if self.max_traces is not None and self.stats.traces >= self.max_traces:
            changed = []
            if self._last is not None:
                for key in described.keys() | self._last.keys():
                    old, new = self._last.get(key), described.get(key)
                    if old != new:
                        changed.append(f"`{key}` changed from {old} to {new}")
            detail = (
                "; ".join(sorted(changed)) or "no argument changed its shape or value"
            )
            raise RuntimeError(
                f"jit({self.name}): trace budget exceeded: this would be trace "
                f"{self.stats.traces + 1}, and max_traces={self.max_traces}. "
                f"Since the last trace, {detail}. Every new shape, dtype or static "
                "value compiles anew: keep them fixed (pad the batch, pass the depth "
                "as a traced array in the static path), or raise `max_traces`."
            )
        self.stats.traces += 1
        self._last = described

    def _sink(self, event: str, duration: float, kwargs: dict) -> None:
        name = kwargs.get("fun_name")
        if event == _COMPILE_EVENT and name == f"jit({self.name})":
            self.stats.compiles += 1
            self.stats.compile_seconds += duration
        elif event == _TRACE_EVENT and name == self.name:
            self.stats.compile_seconds += duration
        elif event == _LOWER_EVENT and name == f"jit({self.name})":
            self.stats.compile_seconds += duration

    def _canonical(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # jax.jit caches `f(x, 3)` and `f(x, n=3)` separately: pass every
        # argument that can go by position by position, so that one signature
        # compiles once however the caller spells it.
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError:
            return args, kwargs  # let jax.jit report the mismatch
        return bound.args, bound.kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the compiled function, tracing and compiling on a new signature."""
        self.stats.calls += 1
        if kwargs:
            args, kwargs = self._canonical(args, kwargs)
        try:
            stack = _calls.stack
        except AttributeError:
            stack = _calls.stack = []
        stack.append(self)
        try:
            return self._jitted(*args, **kwargs)
        except (ValueError, RuntimeError) as err:
            # Found only after jax.jit refused, so the hot path pays nothing.
            text = str(err)
            if "Non-hashable static arguments" in text:
                raise self._unhashable(args, kwargs) from err
            if self.donate_argnames and any(m in text for m in _DONATION_ERRORS):
                try:
                    bound = self._signature.bind(*args, **kwargs).arguments
                except TypeError:
                    raise err from None
                found = donation_error(f"{self.name}", self.donate_argnames, bound)
                if found is not None:
                    raise found from err
            raise
        finally:
            stack.pop()

    def _unhashable(self, args: tuple, kwargs: dict) -> TypeError:
        bound = self._signature.bind(*args, **kwargs).arguments
        for name in self.static_argnames:
            try:
                hash(bound.get(name))
            except TypeError:
                return TypeError(
                    f"jit({self.name}): static argument `{name}` must be hashable "
                    f"(a Python int, str, tuple); got {type(bound[name]).__name__}. "
                    f"Pass a Python value, or do not mark `{name}` static."
                )
        return TypeError(f"jit({self.name}): a static argument is not hashable.")

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """Lower for these arguments, as `jax.jit(...).lower` (counts as a trace)."""
        return self._jitted.lower(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<fl.jit {self.name} {self.stats}>"


def jit(
    fun: Callable,
    *,
    static_argnames: Sequence[str] = (),
    donate_argnames: Sequence[str] = (),
    max_traces: int | None = None,
    name: str | None = None,
) -> Compiled:
    """Compile `fun` with `jax.jit` and account for what it costs.

    The result is called like `fun`. Its `.stats` (`CompileStats`) counts
    traces, backend compiles, compile seconds and calls.

    Args:
      fun: a pure function of arrays.
      static_argnames: arguments that are Python values; each distinct value
        traces and compiles anew (the dynamic path's depth).
      donate_argnames: arguments whose buffers the result may reuse (params
        and optimizer state in a training step): do not use them after the call.
      max_traces: if given, tracing more often raises `RuntimeError` naming the
        argument that changed since the last trace.
      name: the program's name in the stats and in XLA dumps (default:
        `fun.__name__`).

    Returns:
      A `Compiled` callable.

    >>> import jax.numpy as jnp
    >>> import functorch_lite as fl
    >>> def power(x, n):
    ...     return x**n
    >>> f = fl.jit(power, static_argnames=("n",), max_traces=2)
    >>> _ = f(jnp.ones(3), n=2); _ = f(jnp.ones(3), n=2); _ = f(jnp.ones(3), n=3)
    >>> f.stats.traces, f.stats.compiles, f.stats.calls
    (2, 2, 3)
    """
    return Compiled(
        fun,
        static_argnames=static_argnames,
        donate_argnames=donate_argnames,
        max_traces=max_traces,
        name=name,
    )


# ------------------------------------------------------------- persistent cache


def enable_persistent_cache(path: str | os.PathLike | None = None) -> str:
    """Switch on JAX's persistent compilation cache (off by default).

    Compiled programs are written to `path` and loaded by later processes, so a
    new process skips most of its compile time. Setting the environment
    variable `FUNCTORCH_LITE_CACHE_DIR` before importing functorch_lite does
    the same.

    Args:
      path: the cache folder; default `$FUNCTORCH_LITE_CACHE_DIR`, else
        `~/.cache/functorch_lite/jax`.

    Returns:
      The cache folder in use.
    """
    folder = os.fspath(
        path
        or os.environ.get(CACHE_ENV_VAR)
        or os.path.join(os.path.expanduser("~"), ".cache", "functorch_lite", "jax")
    )
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    # Cache every program: ours compile in well under JAX's default 1 s floor.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


if os.environ.get(CACHE_ENV_VAR):
    enable_persistent_cache()
