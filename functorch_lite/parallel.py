"""Data parallelism for compiled steps over a `jax.sharding` device mesh.

`data_parallel(step)` runs a training step (one from `fl.train.make_step` or
`make_fused_step`, a `jax.jit` function, or a plain function) on every device
of a mesh: the batch is split along one mesh
axis, params and optimizer state are replicated on every device. The program is
the same global-view program as on one device; JAX's partitioner (GSPMD) splits
it and inserts the collectives, so the gradient of a summed loss is summed
across devices and the gradient of a mean loss is averaged, with no change to
the loss. Several processes (hosts) join with `initialize`, which calls
`jax.distributed.initialize`; each then feeds its own rows of the batch.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from functorch_lite import _torch_data
from functorch_lite._checks import check_bool, check_int
from functorch_lite.compile import (
    Compiled,
    CompileStats,
    argnames,
    donation_error,
    jit,
)

__all__ = ["DataParallel", "LOST_PEER_EXIT", "data_parallel", "initialize"]

# The static argument that carries the real (unpadded) row count into the
# compiled program. It is an argument, not a closure, so that each padded
# shape is one cached compile and the trace budget names it.
_ROWS_ARG = "dp_rows"

# XLA's CPU runtime runs each host device's share of a program on one shared
# thread pool. With two programs in flight, the shares of the later one can hold
# the threads that the earlier one's all-reduce is waiting for, and both hang:
# with 8 host devices on 2 cores, a loop of asynchronously dispatched steps dies
# with "Expected 8 threads to join the rendezvous, but only 7 of them arrived".
# So on CPU at most one data-parallel program is in flight: a call first waits
# for the outputs of the previous one (host devices share the same cores, so
# little overlap is lost; accelerators are not affected).
_cpu_in_flight: list[list[jax.Array]] = []


def _wait_for_cpu_in_flight() -> None:
    while _cpu_in_flight:
        for leaf in _cpu_in_flight.pop():
            if not leaf.is_deleted():
                leaf.block_until_ready()


def _jit_option(step: Callable, name: str) -> tuple[str, ...]:
    """Read `static_argnames` or `donate_argnames` of an `fl.jit` step.

    Any other step has none: nothing static, nothing donated.
    """
    if not isinstance(step, Compiled):
        return ()
    return tuple(getattr(step, name, ()))


def _is_jax_jit(step: Callable) -> bool:
    """Whether `step` looks like a `jax.jit` function (its AOT methods)."""
    return not isinstance(step, Compiled) and all(
        callable(getattr(step, name, None)) for name in ("lower", "trace", "eval_shape")
    )


def _named_options(
    step: Callable,
    option: str,
    given: Sequence[str] | None,
    params: list[inspect.Parameter],
) -> tuple[str, ...]:
    """`static_argnames` or `donate_argnames`: given, else the step's own."""
    if given is None:
        return _jit_option(step, option)
    names = argnames(given, where="data_parallel", name=option)
    known = {p.name for p in params}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    unknown = [n for n in names if n not in known and not takes_kwargs]
    if unknown:
        raise ValueError(
            f"data_parallel: `{option}` names {unknown}, which the step does not "
            f"take; its arguments are {[p.name for p in params]}."
        )
    return tuple(names)


def _shared_argnames(step: Callable) -> frozenset[str] | None:
    """The arguments without a steps axis of a fused step; None for a plain step."""
    shared = getattr(step, "shared_argnames", None)
    return None if shared is None else frozenset(shared)


def _step_fun(step: Callable) -> Callable:
    """The Python function to compile: an `fl.jit` step's own, else the step.

    A `jax.jit` step is called as it is inside the data-parallel program, where
    it is inlined.
    """
    return step.fun if isinstance(step, Compiled) else step


def _step_name(step: Callable) -> str:
    if isinstance(step, Compiled):
        return step.name
    name = getattr(step, "__name__", None)
    return name if isinstance(name, str) else type(step).__name__


def _auto_mesh(mesh: Mesh) -> Mesh:
    # Data parallelism relies on the automatic partitioner: it shards what it
    # must, pads uneven shards and masks the padding. A mesh with `Explicit`
    # axes would make sharding part of every array's type and reject, for
    # example, the slice that drops padded rows; only its devices and names
    # are used.
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(
        mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim
    )


def _leaves_ok(value: Any, axis: int) -> bool:
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(
        hasattr(leaf, "shape") and len(leaf.shape) > axis for leaf in leaves
    )


def _pad_rows(leaf: Any, axis: int, rows: int) -> Any:
    """Pad `leaf` along `axis` to `rows` by repeating its last row."""
    widths = [(0, 0)] * len(leaf.shape)
    widths[axis] = (0, rows - leaf.shape[axis])
    # Repeat a real row rather than append zeros: the padded rows are dropped
    # before the loss, but the partitioner may still compute on them, and a
    # real row keeps a loss such as log() finite there.
    if isinstance(leaf, np.ndarray | np.generic):
        return np.pad(leaf, widths, mode="edge")
    return jnp.pad(leaf, widths, mode="edge")


def _unpad(x: jax.Array, axis: int, groups: int, rows: int) -> jax.Array:
    """Keep the first `rows` of each of `groups` equal blocks along `axis`.

    One process holds one block: its rows, padded. With one process this is
    `x[:rows]` along `axis`. The result's size is not a multiple of the device
    count; the partitioner keeps it sharded with a padded last shard and masks
    the padding out of every reduction, so the loss and the gradients are
    those of the unpadded batch.
    """
    if groups == 1:
        return lax.slice_in_dim(x, 0, rows, axis=axis)
    shape = tuple(x.shape)
    blocked = x.reshape(
        shape[:axis] + (groups, shape[axis] // groups) + shape[axis + 1 :]
    )
    kept = lax.slice_in_dim(blocked, 0, rows, axis=axis + 1)
    return kept.reshape(shape[:axis] + (groups * rows,) + shape[axis + 1 :])


class DataParallel:
    """A step that runs data parallel over a device mesh (see `data_parallel`).

    Call it like the step it wraps. Treat the attributes as read-only.

    Attributes:
      step: the wrapped step.
      name: the step's name (an `fl.jit` step's `name`, else its `__name__`).
      mesh: the device mesh (its axes are `AxisType.Auto`).
      axis: the mesh axis that splits the batch.
      pad: whether a batch that does not divide is padded.
      fun: the Python function that is compiled.
      stats: the compiled program's `CompileStats`.
      replicated: the sharding of params and optimizer state, `P()`.
    """

    def __init__(
        self,
        step: Callable,
        *,
        mesh: Mesh,
        axis: str,
        batch_argnames: Sequence[str] | Mapping[str, int] | None,
        pad: bool,
        static_argnames: Sequence[str] | None = None,
        donate_argnames: Sequence[str] | None = None,
    ) -> None:
        self.step = step
        self.name = _step_name(step)
        self.mesh = mesh
        self.axis = axis
        self.pad = pad
        self.replicated = NamedSharding(mesh, PartitionSpec())
        try:
            self._signature = inspect.signature(_step_fun(step))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"data_parallel: `step` must have a Python signature "
                f"`step(params, opt_state, *batch)`; {self.name!r} has none: {err}."
            ) from err
        self._shared = _shared_argnames(step)
        self._multiprocess = jax.process_count() > 1

        params = list(self._signature.parameters.values())
        if (
            len(params) < 2
            or params[0].name != "params"
            or params[1].name != "opt_state"
        ):
            raise TypeError(
                "data_parallel: `step` must be called as `step(params, opt_state, "
                f"*batch)`, like the result of `fl.train.make_step`; its signature "
                f"is {self._signature}."
            )
        self._declared_static = static_argnames is not None
        self._static = frozenset(
            _named_options(step, "static_argnames", static_argnames, params)
        )
        self._donate = _named_options(step, "donate_argnames", donate_argnames, params)
        candidates = [p.name for p in params[2:] if p.name not in self._static]
        # Each batch argument: (axis of the batch dimension, strict). Inferred
        # arguments shard only if every leaf has that axis; named ones must.
        self._batch: dict[str, tuple[int, bool]] = {}
        if batch_argnames is None:
            for name in candidates:
                self._batch[name] = (self._default_axis(name), False)
        else:
            if isinstance(batch_argnames, str):
                batch_argnames = (batch_argnames,)
            items = (
                list(batch_argnames.items())
                if isinstance(batch_argnames, Mapping)
                else [(name, None) for name in batch_argnames]
            )
            for name, axis_index in items:
                if name not in candidates:
                    why = (
                        "it is a static argument of the step, and static arguments "
                        "are Python values, never sharded"
                        if name in self._static
                        else "the step does not take it"
                    )
                    raise ValueError(
                        f"data_parallel: `batch_argnames` names {name!r}, but {why}. "
                        f"The step's batch arguments are {candidates}."
                    )
                if axis_index is None:
                    axis_index = self._default_axis(name)
                check_int(
                    axis_index,
                    where="data_parallel",
                    name=f"batch_argnames[{name!r}]",
                    minimum=0,
                    context=f" (the batch axis of {name!r})",
                )
                self._batch[name] = (axis_index, True)

        # Devices along `axis` that belong to this process: its rows are split
        # over them, and the other processes hold the other blocks.
        axis_pos = mesh.axis_names.index(axis)
        me = jax.process_index()
        coords = sorted(
            {
                index[axis_pos]
                for index, device in np.ndenumerate(mesh.devices)
                if device.process_index == me
            }
        )
        if not coords:
            raise ValueError(
                f"data_parallel: `mesh` has no device of this process "
                f"(process {me}); got devices {mesh.devices.ravel().tolist()}."
            )
        self._local_parts = len(coords)
        self._groups = mesh.shape[axis] // self._local_parts
        self._contiguous = coords == list(range(coords[0], coords[0] + len(coords)))

        self._serialize = mesh.devices.size > 1 and any(
            device.platform == "cpu" for device in mesh.devices.flat
        )
        self.fun = self._make_fun()
        self._compiled = jit(
            self.fun,
            static_argnames=(*sorted(self._static), _ROWS_ARG),
            donate_argnames=self._donate,
            max_traces=step.max_traces if isinstance(step, Compiled) else None,
            name=f"dp_{self.name}",
        )
        self.__signature__ = self._signature
        self.__doc__ = getattr(step, "__doc__", None)
        self.__name__ = f"dp_{self.name}"

    def _default_axis(self, name: str) -> int:
        # A fused step stacks per-step arguments on a leading steps axis; the
        # batch is the next one.
        return 0 if self._shared is None or name in self._shared else 1

    @property
    def stats(self) -> CompileStats:
        """The traces, compiles and compile seconds of the data-parallel program."""
        return self._compiled.stats

    def batch_sharding(self, batch_axis: int = 0) -> NamedSharding:
        """The sharding of an array whose dimension `batch_axis` is the batch."""
        return NamedSharding(self.mesh, PartitionSpec(*(None,) * batch_axis, self.axis))

    def _make_fun(self) -> Callable[..., Any]:
        fun, signature = _step_fun(self.step), self._signature
        replicated = self.replicated
        batch = self._batch
        hint = None
        if _is_jax_jit(self.step) and not self._declared_static:
            hint = (
                f"data_parallel({self.name}): `step` is a `jax.jit` function, and "
                "data_parallel cannot read its static arguments, so it traced "
                "every argument. If it has static arguments, name them: "
                "`data_parallel(step, static_argnames=(...))`."
            )

        def data_parallel_step(*args: Any, **kwargs: Any) -> Any:
            rows = kwargs.pop(_ROWS_ARG, None)
            bound = signature.bind(*args, **kwargs)
            if rows is not None:
                groups, local_rows, names = rows
                for name in names:
                    batch_axis = batch[name][0]
                    bound.arguments[name] = jax.tree.map(
                        lambda x, a=batch_axis: _unpad(x, a, groups, local_rows),
                        bound.arguments[name],
                    )
            try:
                out = fun(*bound.args, **bound.kwargs)
            except (TypeError, ValueError) as err:
                text = str(err)
                if hint is not None and (
                    "hashable" in text or "Tracer" in type(err).__name__
                ):
                    raise TypeError(f"{hint} The step raised: {text}") from err
                raise
            params, opt_state, *rest = out
            # Pin the new state to the replicated layout it came in with, so
            # that the next call takes it as is (and can donate it).
            params = lax.with_sharding_constraint(params, replicated)
            opt_state = lax.with_sharding_constraint(opt_state, replicated)
            return (params, opt_state, *rest)

        parameters = list(signature.parameters.values())
        extra = inspect.Parameter(
            _ROWS_ARG, inspect.Parameter.KEYWORD_ONLY, default=None
        )
        at = len(parameters)
        if parameters and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD:
            at -= 1
        parameters.insert(at, extra)
        data_parallel_step.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=parameters
        )
        data_parallel_step.__name__ = f"dp_{self.name}"
        return data_parallel_step

    # ---------------------------------------------------------------- placing

    def _put(self, value: Any, sharding: NamedSharding) -> Any:
        def put(leaf: Any) -> Any:
            if isinstance(leaf, jax.Array):
                # Equal, not merely equivalent: a single-device array is
                # equivalent to a 1-device mesh's sharding, but jit caches on
                # the sharding itself, so passing it on would retrace next call.
                if leaf.sharding == sharding:
                    return leaf
                if not leaf.is_fully_addressable:
                    return jax.device_put(leaf, sharding)
            elif not isinstance(leaf, np.ndarray | np.generic):
                # Python scalars stay as they are: jit treats them as weakly
                # typed, as the wrapped step would.
                return leaf
            if self._multiprocess:
                # Each process passes its own rows; the global array is their
                # concatenation in mesh order (replicated values: its own copy).
                return jax.make_array_from_process_local_data(sharding, leaf)
            return jax.device_put(leaf, sharding)

        return jax.tree.map(put, value)

    def _bind(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        try:
            return self._signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(
                f"data_parallel({self.name}): the arguments do not match the "
                f"step's signature {self._signature}: {err}."
            ) from err

    def _prepare(
        self, bound: inspect.BoundArguments, *, allow_pad: bool
    ) -> tuple | None:
        """Place the bound arguments in place; return the padding record or None."""
        where = f"data_parallel({self.name})"
        # Checked before dispatch: a deleted (donated) buffer on a CPU mesh
        # crashes the process instead of raising.
        donated = self._compiled.donate_argnames
        if donated and (found := donation_error(where, donated, bound.arguments)):
            raise found
        sharded: dict[str, int] = {}
        for name, (batch_axis, strict) in self._batch.items():
            if name not in bound.arguments:
                continue
            value = bound.arguments[name]
            if _leaves_ok(value, batch_axis):
                sharded[name] = batch_axis
            elif strict:
                shapes = [
                    getattr(leaf, "shape", type(leaf).__name__)
                    for leaf in jax.tree.leaves(value)
                ]
                raise ValueError(
                    f"{where}: batch argument `{name}` must hold arrays with a "
                    f"dimension {batch_axis} (its batch axis); got leaves of shape "
                    f"{shapes}. Fix its axis in `batch_argnames`."
                )
        if not sharded:
            raise ValueError(
                f"{where}: no argument to split over the batch: every argument is "
                "static or has too few dimensions. Pass the batch as arrays with a "
                "leading batch axis, or name them in `batch_argnames`."
            )
        sizes = {
            f"{name}{jax.tree_util.keystr(path)}": leaf.shape[batch_axis]
            for name, batch_axis in sharded.items()
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                bound.arguments[name]
            )[0]
        }
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"{where}: the batch arguments must have one batch size; got sizes "
                f"{sizes}. Name the batch arguments in `batch_argnames` (the others "
                "are replicated)."
            )
        local_rows = next(iter(sizes.values()))
        parts = self._local_parts
        rows = None
        if local_rows % parts:
            whose = (
                "this process's batch size" if self._multiprocess else "the batch size"
            )
            if not (self.pad and allow_pad):
                fix = (
                    f"`place` does not pad: use a multiple of {parts}, or call the "
                    "step itself, which pads."
                    if self.pad
                    else f"Use a batch size that is a multiple of {parts}, or pass "
                    "`pad=True` to pad the batch and drop the padded rows from the "
                    "loss."
                )
                raise ValueError(
                    f"{where}: {whose} must be divisible by the {parts} devices of "
                    f"mesh axis {self.axis!r}; got {local_rows} (sizes {sizes}). "
                    f"{fix}"
                )
            if self._groups > 1 and not self._contiguous:
                raise ValueError(
                    f"{where}: `pad=True` needs each process's devices to be "
                    f"consecutive along mesh axis {self.axis!r}; got "
                    f"{self.mesh.devices.tolist()}. Build the mesh with "
                    "`jax.make_mesh`, or pass a divisible batch."
                )
            padded = math.ceil(local_rows / parts) * parts
            for name, batch_axis in sharded.items():
                bound.arguments[name] = jax.tree.map(
                    lambda x, a=batch_axis: _pad_rows(x, a, padded),
                    bound.arguments[name],
                )
            rows = (self._groups, local_rows, tuple(sorted(sharded)))
        for name, value in bound.arguments.items():
            if name in self._static:
                continue
            if name in sharded:
                bound.arguments[name] = self._put(
                    value, self.batch_sharding(sharded[name])
                )
            else:
                bound.arguments[name] = self._put(value, self.replicated)
        return rows

    def place(self, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        """Place arguments on the mesh as a call would, without running the step.

        Params, optimizer state and non-batch arguments are replicated; batch
        arguments are split along the mesh axis. Pass the placed arrays to the
        step to skip the copy on every call (data fed once, reused). The batch
        must divide: padding happens only inside a call.

        Returns:
          `(args, kwargs)`, ready for `self(*args, **kwargs)`.
        """
        bound = self._bind(args, kwargs)
        self._prepare(bound, allow_pad=False)
        return bound.args, bound.kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the step on the mesh: place, pad if asked, run, drop the padding."""
        args, kwargs = _torch_data.convert_args(
            args, kwargs, (), frozenset({0, 1}), f"data_parallel({self.name})"
        )
        bound = self._bind(args, kwargs)
        rows = self._prepare(bound, allow_pad=True)
        if not self._serialize:
            return self._compiled(*bound.args, **bound.kwargs, **{_ROWS_ARG: rows})
        _wait_for_cpu_in_flight()
        out = self._compiled(*bound.args, **bound.kwargs, **{_ROWS_ARG: rows})
        # The loss finishes with the program; params and opt_state may be
        # donated to the next call before anyone waits on them.
        _cpu_in_flight.append(
            [leaf for leaf in jax.tree.leaves(out[2:]) if isinstance(leaf, jax.Array)]
        )
        return out

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """Lower for these arguments, as `jax.jit(...).lower` (counts as a trace)."""
        bound = self._bind(args, kwargs)
        rows = self._prepare(bound, allow_pad=True)
        return self._compiled.lower(*bound.args, **bound.kwargs, **{_ROWS_ARG: rows})

    def __repr__(self) -> str:
        return (
            f"<fl.parallel.data_parallel {self.name} axis={self.axis!r} "
            f"devices={self.mesh.shape[self.axis]} {self.stats}>"
        )


def data_parallel(
    step: Callable,
    *,
    mesh: Mesh | None = None,
    axis: str = "data",
    batch_argnames: Sequence[str] | Mapping[str, int] | None = None,
    pad: bool = False,
    static_argnames: Sequence[str] | None = None,
    donate_argnames: Sequence[str] | None = None,
) -> DataParallel:
    """Run a step data parallel: batch split over devices, state replicated.

    The result is called like `step`:
    `dp(params, opt_state, *batch) -> (params, opt_state, loss)`. It places
    `params`, `opt_state` and the non-batch arguments replicated on every
    device of `mesh` (`PartitionSpec()`), splits each batch argument along
    `axis` (`PartitionSpec(axis)` on its batch dimension), and runs one
    compiled program over all of them. The loss is unchanged: it still sees
    the whole batch, and the compiler inserts the all-reduce that sums the
    gradients of a summed loss and averages those of a mean loss. Static
    arguments (the dynamic path's `depth`) are Python values, never sharded.

    Batch arguments: by default every non-static argument after `opt_state`
    whose leaves all have the batch dimension: dimension 0, or for a step from
    `fl.train.make_fused_step` dimension 1 of the stacked per-step arguments
    (dimension 0 is the steps axis) and 0 of the `shared_argnames` ones.
    Arguments without it (a scalar depth, `(K,)` depths or keys) are
    replicated.

    On CPU devices (host devices for testing) one call waits for the
    previous one to finish before it starts: XLA's CPU runtime can deadlock
    with two data-parallel programs in flight. Accelerators keep asynchronous
    dispatch.

    Several processes: call `initialize` first; then each process passes its
    own rows, and the global batch is their concatenation in process order.
    Arrays already placed (the returned state, or `place`'s result) are used
    as they are.

    Padding (`pad=True`): a batch whose size does not divide by the devices
    along `axis` is padded by repeating its last row, and the compiled program
    drops the padded rows again before the loss (a static slice back to the
    real size, which the partitioner keeps sharded with a masked last shard).
    The loss and gradients are those of the unpadded batch for any loss, summed
    or mean, with no mask in the loss. Each batch size compiles once, as it
    does without padding.

    Args:
      step: any jit-compatible step called as `step(params, opt_state,
        *batch)`. A step from `fl.train.make_step` or `make_fused_step` (an
        `fl.jit` function) carries over its static arguments, donated
        arguments, trace budget and `shared_argnames`. Any other callable (a
        `jax.jit` function, which is inlined, or a plain function) gets the
        defaults: no static arguments (every argument is traced, so a Python
        `depth` becomes a traced scalar), nothing donated, no trace budget,
        and no `shared_argnames` (batch dimension 0). Name a `jax.jit` step's
        static arguments with `static_argnames`: JAX does not expose them.
      mesh: the devices; default all devices, `jax.make_mesh((n,), (axis,))`.
        Its axes are used as `AxisType.Auto`.
      axis: the mesh axis that splits the batch.
      batch_argnames: which arguments to split: a sequence of names (batch
        dimension as above), or a mapping from name to batch dimension. The
        others are replicated.
      pad: pad a batch that does not divide (see above), instead of raising
        `ValueError`.
      static_argnames: the step's arguments that are Python values, compiled
        once per distinct value. Default: those of an `fl.jit` step, none for
        any other.
      donate_argnames: the arguments whose buffers the data-parallel program
        may reuse (`("params", "opt_state")` to update in place). Default:
        those of an `fl.jit` step, none for any other.

    Returns:
      A `DataParallel` callable with the step's signature and `.stats`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import functorch_lite as fl
      >>> from functorch_lite import parallel
      >>> net = fl.models.DynamicNet(4, 8, 2)
      >>> def loss_fn(params, x, y, depth):
      ...     return fl.nn.mse_loss(net.apply(params, x, depth), y)
      >>> opt = optax.sgd(1e-4, momentum=0.9)
      >>> dp = parallel.data_parallel(fl.train.make_step(loss_fn, opt))
      >>> params = net.init(jax.random.key(0)); opt_state = opt.init(params)
      >>> n = len(jax.devices())
      >>> x, y = jnp.ones((2 * n, 4)), jnp.zeros((2 * n, 2))
      >>> for depth in [0, 3, 1]:
      ...     params, opt_state, loss = dp(params, opt_state, x, y, depth)
      >>> params["output_linear"]["bias"].sharding.is_fully_replicated
      True
      >>> x_placed = dp.place(params, opt_state, x, y, 0)[0][2]
      >>> x_placed.sharding.spec == jax.sharding.PartitionSpec("data")
      True
      >>> dp.stats.compiles
      1
    """
    if not callable(step):
        raise TypeError(
            "data_parallel: `step` must be a callable step "
            "`step(params, opt_state, *batch) -> (params, opt_state, loss)`, such "
            "as one from `fl.train.make_step`, a `jax.jit` function or a plain "
            f"function; got {type(step).__name__} {step!r}."
        )
    if not isinstance(axis, str):
        raise TypeError(f"data_parallel: `axis` must be a str; got {axis!r}.")
    check_bool(pad, where="data_parallel", name="pad")
    if mesh is None:
        mesh = jax.make_mesh(
            (jax.device_count(),), (axis,), axis_types=(AxisType.Auto,)
        )
    elif not isinstance(mesh, Mesh):
        raise TypeError(
            f"data_parallel: `mesh` must be a jax.sharding.Mesh (for example "
            f"`jax.make_mesh((8,), ({axis!r},))`); got {type(mesh).__name__}."
        )
    elif axis not in mesh.axis_names:
        raise ValueError(
            f"data_parallel: `axis` must be an axis of `mesh`, one of "
            f"{list(mesh.axis_names)}; got {axis!r}."
        )
    return DataParallel(
        step,
        mesh=_auto_mesh(mesh),
        axis=axis,
        batch_argnames=batch_argnames,
        pad=pad,
        static_argnames=static_argnames,
        donate_argnames=donate_argnames,
    )


LOST_PEER_EXIT = 75  # the exit status of a process stopped for a lost peer


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_devices: int | None = None,
    heartbeat_timeout_s: float = 30.0,
    separate_service: bool = True,
) -> None:
    """Join this process to a multi-process run with `jax.distributed.initialize`.

    Call it first, before any other JAX work, in every process. After it,
    `jax.devices()` lists the devices of all processes, and `data_parallel`'s
    default mesh spans them. On CPU, collectives across processes use gloo
    (`jax_cpu_collectives_implementation`); GPUs and TPUs use their own.

    When a process dies, the others would wait in their next collective
    until JAX's coordination service aborts them (SIGABRT and a C++ stack
    trace, 100 s later by default, or at once when process 0, which holds the
    service, is the one that died). So process 0 runs the service in a child
    process (`separate_service`), and every process runs a small
    heartbeat thread: each second or so it posts a counter to the coordination
    service and reads the others'. A process whose counter has not moved for
    `heartbeat_timeout_s` seconds (or a coordinator that no longer answers) is
    lost; the survivors then print one line to stderr that names the lost
    process and the checkpoint to resume from (the newest one `fit` saved in
    this process, if any), and exit with status `LOST_PEER_EXIT` (75). To
    restart: start every process again with `fit(..., resume=True)`.

    Args:
      coordinator_address: `"host:port"` of process 0, reachable from every
        process. None lets JAX detect it (SLURM, Cloud TPU, ...).
      num_processes: how many processes join.
      process_id: this process's index in `[0, num_processes)`.
      cpu_devices: if given, the number of CPU devices this process shows
        (`jax_num_cpu_devices`): several host devices for testing on one
        machine.
      heartbeat_timeout_s: seconds without a heartbeat after which a process
        counts as lost (a positive number; 30 by default). JAX's own timeout
        is set above it, so that this one acts first.
      separate_service: run JAX's coordination service in a child process of
        process 0 rather than inside it (the default, when the address, the
        count and the id are given). Inside process 0, the service dies with
        it, and JAX then aborts every other process at once (SIGABRT, a C++
        stack trace) before this library can say anything; apart, it outlives
        process 0's trainer, whose loss the others then report like any
        other. The child ends with process 0 (after a grace period when
        process 0 died, so that the others can stop cleanly). False: JAX's
        own `jax.distributed.initialize`, service inside process 0.

    Examples:
      >>> import functorch_lite as fl
      >>> fl.parallel.initialize("10.0.0.1:1234", 2, 0)  # doctest: +SKIP
    """
    if cpu_devices is not None:
        check_int(cpu_devices, where="initialize", name="cpu_devices", minimum=1)
    if (
        isinstance(heartbeat_timeout_s, bool)
        or not isinstance(heartbeat_timeout_s, int | float)
        or not heartbeat_timeout_s > 0
    ):
        raise ValueError(
            "initialize: `heartbeat_timeout_s` must be a positive number of "
            f"seconds; got {heartbeat_timeout_s!r}."
        )
    check_bool(separate_service, where="initialize", name="separate_service")
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax_timeout = max(100, math.ceil(3 * heartbeat_timeout_s))
    explicit = None not in (coordinator_address, num_processes, process_id)
    if separate_service and explicit and num_processes != 1:
        _join_with_separate_service(
            coordinator_address,  # type: ignore[arg-type]
            num_processes,  # type: ignore[arg-type]
            process_id,  # type: ignore[arg-type]
            jax_timeout,
            linger_s=2 * float(heartbeat_timeout_s) + 10,
        )
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            heartbeat_timeout_seconds=jax_timeout,
        )
    if jax.process_count() > 1:
        _heartbeat[0] = _Heartbeat(float(heartbeat_timeout_s))
        _heartbeat[0].start()


_heartbeat: list[_Heartbeat | None] = [None]


def _join_with_separate_service(
    address: str, count: int, index: int, jax_timeout: int, linger_s: float
) -> None:
    """`jax.distributed.initialize`, with the service in a child of process 0.

    The client side is JAX's own, set up as `jax.distributed.initialize` does
    it (jax 0.10's `distributed.global_state`), minus the in-process service.
    """
    from jax._src import distributed  # noqa: PLC0415 - JAX's client state
    from jax._src.lib import _jax  # noqa: PLC0415  # pyright: ignore[reportPrivateImportUsage]

    state = distributed.global_state
    if state.client is not None:
        raise RuntimeError("initialize: this process has already joined a run.")
    check_int(count, where="initialize", name="num_processes", minimum=1)
    check_int(index, where="initialize", name="process_id", minimum=0)
    if not 0 <= index < count:
        raise ValueError(
            "initialize: `process_id` must be in [0, num_processes); got "
            f"process_id={index}, num_processes={count}."
        )
    if index == 0:
        _start_service(address, count, jax_timeout, linger_s)
    state.coordinator_address = address
    state.process_id = index
    state.num_processes = count
    client = _jax.get_distributed_runtime_client(
        address,
        index,
        init_timeout=300,
        use_compression=True,
        heartbeat_timeout=jax_timeout,
    )
    state.client = client
    client.connect()
    state.initialize_preemption_sync_manager()


def _start_service(address: str, count: int, jax_timeout: int, linger_s: float) -> None:
    """Start the coordination service in a child process (`_coordinator`)."""
    import subprocess  # noqa: PLC0415

    from functorch_lite import _coordinator  # noqa: PLC0415

    port = address.rsplit(":", 1)[1]
    _end_stale_service(_coordinator.pid_file(port))
    # Its log goes to a file: a child holding this process's stderr would keep
    # a pipe that reads this process's output open after it ends.
    log_path = _coordinator.log_file(port)
    log = open(log_path, "w")  # noqa: SIM115 - the child owns it from here
    child = subprocess.Popen(
        [
            sys.executable, "-m", "functorch_lite._coordinator",
            "--bind", f"[::]:{port}", "--num-processes", str(count),
            "--heartbeat-timeout", str(jax_timeout), "--linger", str(linger_s),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,  # a Ctrl-C meant for the trainer leaves it be
        text=True,
    )  # fmt: skip
    log.close()
    assert child.stdout is not None and child.stdin is not None
    ready = child.stdout.readline().strip()
    if ready != "ready":
        child.kill()
        with open(log_path) as f:
            said = f.read()[-2000:]
        raise RuntimeError(
            f"initialize: the coordination service did not start on port {port} "
            f"(exit status {child.wait()}); its log ({log_path}) ends:\n{said}"
        )
    stdin = child.stdin

    def release() -> None:  # a normal exit: the service stops shortly after
        with contextlib.suppress(OSError, ValueError):
            stdin.write("exit\n")
            stdin.flush()

    atexit.register(release)
    _service_child[0] = child


# Process 0's coordination-service child (`_start_service`), kept alive here.
_service_child: list[Any] = [None]


def _end_stale_service(path: str) -> None:
    """End a service that a crashed run left on this port (see `_coordinator`)."""
    import signal  # noqa: PLC0415

    try:
        with open(path) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            ours = b"functorch_lite._coordinator" in f.read()
    except (OSError, ValueError):
        return
    if not ours:
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether process `pid` runs (an exited one waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for_lost_peer(err: BaseException) -> None:
    """After a failed collective, give the heartbeat time to name the lost peer.

    In a run over several processes, a collective whose peer died may fail
    (gloo: "Connection reset by peer") rather than wait. The heartbeat then
    stops this process within its timeout, with its one-line message; if it
    does not (no peer is lost), this returns and the caller re-raises `err`.
    """
    beat = _heartbeat[0]
    # A collective whose peer died fails as JAX's runtime error, or (from
    # JAX's fast dispatch path) as a `ValueError` with gloo's message.
    lost = isinstance(err, jax.errors.JaxRuntimeError) or (
        isinstance(err, ValueError) and "gloo" in str(err).lower()
    )
    if beat is None or beat.done or not lost:
        return
    deadline = time.monotonic() + 2 * beat.timeout + 1
    while time.monotonic() < deadline and not beat.done:
        time.sleep(0.05)


# The newest checkpoint `fit` saved or resumed from in this process: the
# heartbeat's message names it. (directory, step) or None.
_last_checkpoint: list[tuple[str, int] | None] = [None]


def note_checkpoint(directory: str, step: int) -> None:
    """Record the newest checkpoint of this process (called by `fit`)."""
    _last_checkpoint[0] = (directory, step)


class _Heartbeat(threading.Thread):
    """Posts this process's heartbeat and stops it when a peer is lost."""

    _PREFIX = "functorch_lite/heartbeat/"

    def __init__(self, timeout: float) -> None:
        super().__init__(name="functorch_lite-heartbeat", daemon=True)
        from jax._src import distributed  # the coordination service's client

        client = distributed.global_state.client
        assert client is not None, "initialize joins the run before the heartbeat"
        self.client = client
        self.me = jax.process_index()
        self.count = jax.process_count()
        self.timeout = timeout
        self.interval = min(1.0, timeout / 4)
        self.done = False
        atexit.register(self._finish)

    def _finish(self) -> None:
        # A clean exit is not a loss: tell the others, and stop watching. An
        # exit on an uncaught exception is one: tell them too, and leave now,
        # rather than wait in JAX's shutdown barrier for peers that wait in a
        # collective for this process.
        self.done = True
        failed = getattr(sys, "last_value", None) is not None
        with contextlib.suppress(Exception):
            self.client.key_value_set(
                f"{self._PREFIX}{self.me}",
                "failed" if failed else "done",
                allow_overwrite=True,
            )
        if failed:
            sys.stderr.flush()
            os._exit(1)

    def run(self) -> None:
        seen = {p: ("", time.monotonic()) for p in range(self.count) if p != self.me}
        beat = 0
        while not self.done:
            now = time.monotonic()
            try:
                beat += 1
                self.client.key_value_set(
                    f"{self._PREFIX}{self.me}", str(beat), allow_overwrite=True
                )
                values = dict(self.client.key_value_dir_get(self._PREFIX))
            except Exception:  # noqa: BLE001 - any failure: the service is gone
                if self.done:
                    return
                self._stop(0, "process 0's coordination service stopped answering")
                return
            for peer, (last, since) in list(seen.items()):
                value = values.get(f"{self._PREFIX}{peer}", "")
                if value == "done":
                    del seen[peer]
                elif value == "failed":
                    self._stop(
                        peer, f"process {peer} stopped with an error (see its log)"
                    )
                    return
                elif value != last:
                    seen[peer] = (value, now)
                elif now - since > self.timeout:
                    self._stop(
                        peer,
                        f"process {peer} sent no heartbeat for {self.timeout:g} s",
                    )
                    return
            time.sleep(self.interval)

    def _stop(self, peer: int, why: str) -> None:
        self.done = True
        found = _last_checkpoint[0]
        if found is None:
            resume = "no checkpoint was saved or resumed in this process"
        else:
            # The folder says what is complete: a background save may have
            # finished since, and another process's may never finish (this
            # process notes the steps that the folder's writer saves).
            from functorch_lite import checkpoint  # noqa: PLC0415

            newest = None
            with contextlib.suppress(Exception):
                newest = checkpoint.latest(found[0])
            if newest is None:
                resume = f"no complete checkpoint in {found[0]!r} yet"
            else:
                resume = (
                    f"resume from step {newest[0]}, the newest checkpoint in "
                    f"{found[0]!r}"
                )
        sys.stderr.write(
            f"functorch_lite: lost process {peer} of {self.count}: {why}. Stopping "
            f"process {self.me} (exit status {LOST_PEER_EXIT}); {resume}. Restart "
            "every process with `fit(..., resume=True)`.\n"
        )
        sys.stderr.flush()
        os._exit(LOST_PEER_EXIT)
