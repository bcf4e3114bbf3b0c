"""Compile accounting: `jit` with stats, `compile_counter`, trace budgets, cache.

How compiles are counted. JAX reports every trace, lowering and backend
compile as a `jax.monitoring` duration event that carries the program's
`fun_name`. `compile_counter` registers a listener when its block starts and
unregisters it when the block ends; an `fl.jit` function registers one for the
span of each direct call (`jax.monitoring.register_event_duration_secs_listener`
/ `unregister_event_duration_listener`, both public). No listener outlives the
block or call that registered it, even when the call raises, and nothing
inspects JAX's stack frames or file names. A call's listener takes only events
of its own thread and of its own program's name, so that concurrent calls of
other functions are not charged to it. Registering and removing a listener
costs well under a microsecond, far less than a jitted call's dispatch.

Why listeners, not ahead-of-time `lower(...).compile()` with our own cache: an
own cache would need a key for every call (shapes, dtypes, weak types,
shardings, static values, tree structures) that matches `jax.jit`'s cache
exactly; any difference miscounts or compiles twice, and computing it costs
tens of microseconds per call. `jax.jit` keeps its own cache and fast path, and
its events say exactly when it compiles.

Outer transformations. An `fl.jit` function called inside the caller's
`jax.jit`, `jax.vmap`, `jax.grad` (any argument is a `jax.core.Tracer`)
behaves as a `jax.jit` function there: it is inlined into the outer program,
which is what compiles, when and as often as the outer transformation
decides. Its own stats then cannot be known: such a call counts in
`CompileStats.transformed_calls`, not `calls`, and sets `compiles` and
`compile_seconds` to None (unknown) from then on. `traces` stays exact, and the
trace budget holds, because every trace runs the wrapped Python function.
Nothing is donated there: `jax.grad` and `jax.vmap` run parts of the function
eagerly, and a donated argument would be deleted while the transformation, or
the caller, still needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.extend.core
import jax.extend.core.primitives
from jax import monitoring
from jax.core import Tracer

from functorch_lite import _checks, _torch_data
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

Listener = Callable[..., None]  # jax.monitoring.EventDurationListenerWithMetadata


class _listening:  # noqa: N801 (used as a context manager, like a function)
    """Register a `jax.monitoring` duration listener for a `with` block only.

    A class rather than a generator context manager: it is entered on every
    call of an `fl.jit` function, and this costs a fraction of a microsecond.
    """

    __slots__ = ("listener",)

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def __enter__(self) -> None:
        monitoring.register_event_duration_secs_listener(self.listener)

    def __exit__(self, *exc: object) -> None:
        monitoring.unregister_event_duration_listener(self.listener)


@functools.cache
def _primitive_names() -> frozenset[str]:
    """The names of JAX's primitives (`add`, `broadcast_in_dim`, `stage`, ...).

    Those that JAX exports: `jax.extend.core.primitives` and `jax.lax`'s `*_p`.
    """
    return frozenset(
        value.name
        for module in (jax.extend.core.primitives, jax.lax)
        for value in vars(module).values()
        if isinstance(value, jax.extend.core.Primitive)
    )


def _is_eager_op_compile(fun_name: str) -> bool:
    """Tell whether a compile is one primitive's program, run op by op.

    Creating or combining arrays outside `jit` (`jnp.ones`, `x + 1`) compiles
    one small program per primitive, named `jit(<primitive>)`.
    """
    return (
        fun_name.startswith("jit(")
        and fun_name.endswith(")")
        and fun_name[4:-1] in _primitive_names()
    )


try:  # private JAX: whether no transformation is tracing right now
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # pragma: no cover - an older or newer JAX: scan the leaves

    def _trace_state_clean() -> bool:
        return False


def _any_deleted(tree: Any) -> bool:
    """Whether a leaf of `tree` is an array whose buffer was donated or deleted.

    Run on every call for the donated arguments: a loop over the leaves with
    the method looked up on each (a leaf without one, a number, is skipped),
    which is cheaper than an `isinstance(leaf, jax.Array)` per leaf.
    """
    for leaf in jax.tree_util.tree_leaves(tree):
        deleted = getattr(leaf, "is_deleted", None)
        if deleted is not None and deleted():
            return True
    return False


def _has_tracer(args: tuple, kwargs: dict) -> bool:
    """Whether any argument leaf is a tracer: the call is under a transformation.

    Outside every transformation no argument can be one, and that is the
    common case of a training loop: it is told in a fraction of a microsecond,
    where walking the leaves of params and optimizer state takes several.
    """
    if _trace_state_clean():
        return False
    leaves = jax.tree_util.tree_leaves((args, kwargs) if kwargs else args)
    return any(isinstance(leaf, Tracer) for leaf in leaves)


# ----------------------------------------------------------------------- counter


@dataclasses.dataclass
class CompileCounter:
    """What `compile_counter` saw: backend compiles and their seconds.

    Attributes:
      compiles: backend compiles of jitted programs in the block, without the
        small per-primitive programs of eager array code. Programs that JAX
        itself jits (`jax.random.normal`'s `jit(_normal)`) are jitted
        programs and count.
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

    The block's `jax.monitoring` listener is registered on entry and removed
    on exit. It counts the compiles of every thread.

    Args:
      fun_name: if given, count only programs of this name: the jitted
        function's `__name__`, with or without the `jit(...)` around it.

    Yields:
      A `CompileCounter`, filled in as the block runs.

    Examples:
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

    def listener(event: str, duration: float, **kwargs: str | int) -> None:
        if event != _COMPILE_EVENT:
            return
        name = str(kwargs.get("fun_name", ""))
        if want is not None and name != want:
            return
        if want is None and _is_eager_op_compile(name):
            counter.eager_compiles += 1
            return
        counter.compiles += 1
        counter.seconds += duration
        counter.names.append(name)

    with _listening(listener):
        yield counter


# -------------------------------------------------------------------------- jit


@dataclasses.dataclass
class CompileStats:
    """What one `fl.jit` function has cost so far.

    Attributes:
      traces: times the Python function was traced (one per new signature),
        under an outer transformation too. Always exact.
      compiles: backend compiles of it (a persistent-cache hit still counts as
        a compile here when JAX reports it as one). None (unknown) once the
        function was called under an outer transformation: its work then
        compiles as part of the outer program.
      compile_seconds: trace, lowering and backend-compile seconds together;
        None (unknown) when `compiles` is.
      calls: direct calls, each one run of the compiled program.
      transformed_calls: calls under an outer `jax.jit`, `jax.vmap`,
        `jax.grad`, ... (an argument was a tracer). Each is one time the outer
        function was traced, not one run.
    """

    traces: int = 0
    compiles: int | None = 0
    compile_seconds: float | None = 0.0
    calls: int = 0
    transformed_calls: int = 0


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
    """A jitted function that records its own `CompileStats` (see `fl.jit`).

    Direct calls are counted exactly; calls under an outer transformation are
    inlined and make `compiles` and `compile_seconds` unknown (None).
    """

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
        self._program = f"jit({self.name})"

        # Host checks per trace signature (see `_checks.signature_key`).
        self._host_checks: dict[tuple, list[_checks.HostCheck]] = {}
        self._pending = threading.local()  # the arguments of the call in flight
        self._pending.args = None
        self._donated = tuple(
            i for i, n in enumerate(params) if n in set(donate_argnames)
        )
        self._static = frozenset(
            i for i, n in enumerate(params) if n in set(static_argnames)
        )
        # Arguments that are not batch data: neither converted from torch nor
        # part of a trace signature.
        self._not_batch = frozenset(
            i
            for i, n in enumerate(params)
            if n in set(donate_argnames) or n in ("params", "opt_state")
        )
        self._names = tuple(params)

        @functools.wraps(fun)
        def traced(*args: Any, **kwargs: Any) -> Any:
            # Traced values that are arguments themselves are checked before
            # each call, on the host (see `_checks`), not in the program.
            self._on_trace(args, kwargs)
            inputs, token = _checks.tracing_inputs(args)
            try:
                return fun(*args, **kwargs)
            finally:
                _checks._INPUTS.reset(token)
                if inputs.host:
                    key = _checks.signature_key(args, self._not_batch, self._static)
                    found = self._host_checks.setdefault(key, [])
                    found.extend(c for c in inputs.host if c not in found)
                # The call being traced runs next: check its arguments now.
                pending = self._pending.args
                self._pending.args = None
                if inputs.host and pending is not None:
                    _checks.run_host_checks(inputs.host, pending)

        traced.__name__ = self.name
        self._jitted = jax.jit(
            traced,
            static_argnames=tuple(static_argnames),
            donate_argnames=tuple(donate_argnames),
        )
        # Under an outer transformation nothing is donated: `jax.grad` and
        # `jax.vmap` run parts eagerly, and would delete concrete arguments
        # that the rest of the transformation (or the caller) still uses.
        self._inlined = (
            jax.jit(traced, static_argnames=tuple(static_argnames))
            if donate_argnames
            else self._jitted
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

    def _listener(self) -> Listener:
        """A listener that charges this thread's events of this program to stats."""
        stats, name, program = self.stats, self.name, self._program
        thread = threading.get_ident()

        def listener(event: str, duration: float, **kwargs: str | int) -> None:
            if stats.compiles is None or threading.get_ident() != thread:
                return
            fun_name = kwargs.get("fun_name")
            if event == _COMPILE_EVENT:
                if fun_name == program:
                    stats.compiles += 1
                    stats.compile_seconds += duration  # type: ignore[operator]
            elif event == _LOWER_EVENT:
                if fun_name == program:
                    stats.compile_seconds += duration  # type: ignore[operator]
            elif event == _TRACE_EVENT and fun_name == name:
                stats.compile_seconds += duration  # type: ignore[operator]

        return listener

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
        """Call the compiled function, tracing and compiling on a new signature.

        Under an outer transformation (an argument is a tracer) the call is
        inlined into the outer program and its stats become unknown (see
        `CompileStats`).
        """
        if kwargs:
            args, kwargs = self._canonical(args, kwargs)
        # Batches from PyTorch (a DataLoader's tensors) become JAX arrays.
        args, kwargs = _torch_data.convert_args(
            args, kwargs, self._names, self._not_batch, self.name
        )
        stats = self.stats
        if _has_tracer(args, kwargs):
            stats.transformed_calls += 1
            stats.compiles = None
            stats.compile_seconds = None
            out = self._run(args, kwargs, self._inlined)
            # The host checks cannot run on an outer program's values: they
            # go into that program instead, tied to the outputs so that they
            # stay in it.
            zeros = []
            if self._host_checks and _checks.checks_enabled():
                key = _checks.signature_key(args, self._not_batch, self._static)
                zeros = [
                    z
                    for check in self._host_checks.get(key, ())
                    if (z := _checks.check_in_graph(check, args)) is not None
                ]
            if zeros:
                zero = sum(zeros[1:], zeros[0])
                out = jax.tree.map(
                    lambda o: (
                        o + zero.astype(o.dtype)
                        if isinstance(o, jax.Array) and o.dtype != bool
                        else o
                    ),
                    out,
                )
            return out
        stats.calls += 1
        if self._donated:
            self._check_donated(args)
        if self._host_checks and _checks.checks_enabled():
            checks = self._host_checks.get(
                _checks.signature_key(args, self._not_batch, self._static)
            )
            if checks:
                _checks.run_host_checks(checks, args)
        self._pending.args = args  # for the host checks a new trace finds
        if stats.compiles is None:
            return self._run(args, kwargs, self._jitted)
        with _listening(self._listener()):
            return self._run(args, kwargs, self._jitted)

    def _check_donated(self, args: tuple) -> None:
        """Refuse a donated argument that an earlier call consumed.

        Before dispatch: XLA would log an error line first.
        """
        for i in self._donated:
            if i < len(args) and _any_deleted(args[i]):
                bound = dict(zip(self._signature.parameters, args, strict=False))
                found = donation_error(self.name, self.donate_argnames, bound)
                if found is not None:
                    raise found

    def _run(self, args: tuple, kwargs: dict, jitted: Callable) -> Any:
        try:
            return jitted(*args, **kwargs)
        except TypeError as err:
            try:
                self._signature.bind(*args, **kwargs)
            except TypeError as bind_err:
                raise TypeError(
                    f"jit({self.name}): {bind_err}; it is called as "
                    f"{self.name}{self._signature}."
                ) from None
            text = str(err)
            found = re.search(
                r"of type <class '([^']+)'>.*? at path (\S+?)\.(?:\s|$)", text, re.S
            )
            if "as an abstract array" not in text or found is None:
                raise
            kind, path = found.groups()
            raise TypeError(
                f"jit({self.name}): argument `{path}` must be an array or a number (a "
                f"JAX, NumPy or torch array, or a Python scalar); got {kind}. If "
                "it is a Python option rather than data, name it in "
                "`static_argnames`."
            ) from None
        except (ValueError, RuntimeError) as err:
            # Found only after jax.jit refused, so the hot path pays nothing.
            text = str(err)
            failure = _checks.pop_failure()
            if failure is not None and str(failure) in text:
                raise failure from None  # a traced check's, raised in a callback
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
    traces, backend compiles, compile seconds and calls. It composes as a
    `jax.jit` function does: call it inside your own `jax.jit`, `jax.vmap` or
    `jax.grad`, or pass it to `jax.jit`. There it is inlined into the outer
    program, donates nothing, and its `compiles` and `compile_seconds` become
    None (unknown); `traces` and the trace budget still hold.

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

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> def power(x, n):
      ...     return x**n
      >>> f = fl.jit(power, static_argnames=("n",), max_traces=2)
      >>> _ = f(jnp.ones(3), n=2); _ = f(jnp.ones(3), n=2); _ = f(jnp.ones(3), n=3)
      >>> f.stats.traces, f.stats.compiles, f.stats.calls
      (2, 2, 3)
      >>> import jax
      >>> g = fl.jit(lambda x: x * 2)
      >>> jax.jit(g)(jnp.ones(2)).tolist()
      [2.0, 2.0]
      >>> jax.grad(lambda x: g(x).sum())(jnp.ones(2)).tolist()
      [2.0, 2.0]
      >>> g.stats.traces, g.stats.compiles, g.stats.calls, g.stats.transformed_calls
      (1, None, 0, 2)
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
