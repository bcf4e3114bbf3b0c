"""Training: `make_step` (value_and_grad + optax, donated buffers) and `fit`."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from functorch_lite import _checks, checkpoint
from functorch_lite._checks import check_bool, check_int
from functorch_lite._trees import leaf_pairs, structure_diff
from functorch_lite.compile import Compiled, argnames, jit

__all__ = [
    "FitResult",
    "bucket_size",
    "fit",
    "make_fused_step",
    "make_step",
    "make_update",
    "pad_batch",
]


def _check_loss_fn(
    loss_fn: Any, optimizer: Any, where: str
) -> tuple[inspect.Signature, list[inspect.Parameter]]:
    if not callable(loss_fn):
        raise TypeError(f"{where}: `loss_fn` must be callable; got {loss_fn!r}.")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"{where}: `optimizer` must be an optax.GradientTransformation (for "
            f"example `optax.sgd(1e-4, momentum=0.9)`); got {optimizer!r}."
        )
    loss_sig = inspect.signature(loss_fn)
    loss_params = list(loss_sig.parameters.values())
    if not loss_params or loss_params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise TypeError(
            f"{where}: `loss_fn` must take `params` as its first positional "
            f"argument; its signature is {loss_sig}."
        )
    return loss_sig, loss_params


def _step_signature(
    loss_sig: inspect.Signature, loss_params: list[inspect.Parameter]
) -> inspect.Signature:
    # The step's signature is the loss's, with `opt_state` after `params`, so
    # that `static_argnames` resolve whether the caller passes them by position
    # or by keyword.
    return loss_sig.replace(
        parameters=[
            inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("opt_state", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            *loss_params[1:],
        ],
        return_annotation=inspect.Signature.empty,
    )


def make_step(
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    static_argnames: Sequence[str] = (),
    donate: bool = True,
    max_traces: int | None = None,
    skip_unused: bool | Callable[..., Any] = False,
    guard: bool = False,
    has_aux: bool = False,
    specialize: Mapping[str, int] | None = None,
) -> Compiled:
    """Build one compiled optimizer step from a loss and an optax optimizer.

    `step(params, opt_state, *batch) -> (params, opt_state, loss)` computes
    `loss_fn(params, *batch)` and its gradient with `jax.value_and_grad`, then
    applies `optimizer`. It replaces PyTorch's `zero_grad()`, `backward()` and
    `step()`: gradients are returned, never accumulated, so there is nothing to
    zero.

    The step is an `fl.jit` function: `step.stats` counts its traces and
    compiles. Arguments named in `static_argnames` are Python values and
    compile once per distinct value (the dynamic path: pass `depth` there).
    Every other argument is traced (the static path: one compile for all
    depths).

    Args:
      loss_fn: `loss_fn(params, *batch) -> scalar loss`.
      optimizer: any `optax.GradientTransformation`.
      static_argnames: names of `loss_fn` arguments to treat as static.
      donate: donate `params` and `opt_state` to the step, so that the update
        happens in place (the static graph's `assign`). The arrays passed in
        are then invalid: use the returned ones.
      max_traces: raise `RuntimeError` if the step would trace more often.
      skip_unused: reproduce PyTorch 2.x, where `zero_grad()` sets gradients
        to None and `optimizer.step()` skips every parameter whose gradient is
        None: a parameter the step did not use is not updated, and its
        optimizer state (momentum, Adam moments) does not advance. By default
        (False) every leaf is updated, as in PyTorch 1.x, whose `zero_grad()`
        zeroed the gradients (momentum then keeps moving unused leaves).
        `True` finds the unused leaves from the traced program: a params leaf
        that the loss's jaxpr never reads. That serves the dynamic path, where
        the depth is concrete. In the static path the loop reads every leaf,
        so pass a callable instead: `skip_unused(params, *batch)` returns a
        tree of bools (a prefix of the params tree will do), which may be
        traced; `DynamicNet.used_params(depth)` gives it. Optimizer state that
        is not shaped like params (Adam's step count) still advances: optax
        keeps one count for all leaves where PyTorch keeps one per parameter.
      guard: check in the graph that the loss and every gradient are finite;
        if not, return `params` and `opt_state` unchanged (so a NaN never
        reaches them, even though their buffers are donated) and return the
        loss as NaN. `fit` relies on this to hand back the last finite state.
        Costs one pass over the gradients and the state per step.
      has_aux: `loss_fn` returns `(loss, aux)` (metrics, say); the step then
        returns `(params, opt_state, loss, aux)`.
      specialize: `{name: count}`: the int argument `name` (traced, not in
        `static_argnames`) takes the values `0..count-1`, and the one compile
        holds a branch for each, with `loss_fn` traced on the Python int as the
        dynamic path would (write it for the dynamic path: `DynamicNet`'s
        `mode="dynamic"`). A value out of range raises `ValueError` (under
        your own `jax.jit`, the program fails with the same message). See
        `make_fused_step`, where it pays off most.

    Optimizers that need extra arguments (`optax.GradientTransformationExtraArgs`:
    `optax.contrib.reduce_on_plateau`, `optax.lbfgs`) get `value=loss`,
    `grad=grads` and `value_fn`. `fl.train.make_update` gives the same update
    uncompiled, to `jit`, `vmap` or `shard_map` yourself.

    Returns:
      The compiled step; `step.guarded` tells whether `guard` is on.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import functorch_lite as fl
      >>> net = fl.models.DynamicNet(4, 8, 2)
      >>> def loss_fn(params, x, y, depth):
      ...     return fl.nn.mse_loss(net.apply(params, x, depth), y)
      >>> opt = optax.sgd(1e-4, momentum=0.9)
      >>> step = fl.train.make_step(loss_fn, opt)
      >>> params = net.init(jax.random.key(0)); opt_state = opt.init(params)
      >>> x, y = jnp.ones((3, 4)), jnp.zeros((3, 2))
      >>> for depth in [0, 3, 1]:
      ...     params, opt_state, loss = step(params, opt_state, x, y, depth)
      >>> step.stats.compiles
      1
    """
    loss_sig, loss_params = _check_loss_fn(loss_fn, optimizer, "make_step")
    static_argnames = argnames(
        static_argnames, where="make_step", name="static_argnames"
    )
    check_bool(donate, where="make_step", name="donate")
    check_int(
        max_traces, where="make_step", name="max_traces", minimum=1, allow_none=True
    )
    check_bool(guard, where="make_step", name="guard")
    check_bool(has_aux, where="make_step", name="has_aux")
    batch_names = {p.name for p in loss_params[1:]}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in loss_params)
    unknown = [n for n in static_argnames if n not in batch_names and not takes_kwargs]
    if unknown:
        raise ValueError(
            f"make_step: `static_argnames` names {unknown}, which `loss_fn` does not "
            f"take; its arguments after `params` are {sorted(batch_names)}."
        )
    if isinstance(skip_unused, bool | np.bool_):
        # A Python bool: `_optimizer_update` tests `skip_unused is True`.
        skip_unused = bool(skip_unused)
    elif not callable(skip_unused):
        raise TypeError(
            "make_step: `skip_unused` must be a bool or a callable returning a tree "
            f"of bools; got {skip_unused!r}."
        )
    branch_on = _check_specialize(
        specialize, loss_params, static_argnames, where="make_step"
    )
    step = _optimizer_update(
        loss_fn,
        optimizer,
        where="make_step",
        skip_unused=skip_unused,
        guard=guard,
        has_aux=has_aux,
        specialize=branch_on,
    )
    step.__signature__ = _step_signature(loss_sig, loss_params)  # type: ignore[attr-defined]
    step.__name__ = "step"
    compiled = jit(
        step,
        static_argnames=tuple(static_argnames),
        donate_argnames=("params", "opt_state") if donate else (),
        max_traces=max_traces,
    )
    compiled.guarded = bool(guard)  # type: ignore[attr-defined]
    compiled.has_aux = bool(has_aux)  # type: ignore[attr-defined]
    return compiled


def _leaves_read(fn: Callable[[Any], Any], params: Any) -> Any:
    """Return a tree of Python bools: which `params` leaves `fn`'s jaxpr reads."""
    jaxpr = jax.make_jaxpr(fn)(params).jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    read |= {id(v) for v in jaxpr.outvars}
    flags = [id(v) in read for v in jaxpr.invars]
    return jax.tree.unflatten(jax.tree.structure(params), flags)


def _broadcast_used(used: Any, params: Any) -> Any:
    """Expand a prefix tree of bools to one bool per params leaf."""
    try:
        return jax.tree.map(lambda u, sub: jax.tree.map(lambda _: u, sub), used, params)
    except ValueError as err:
        raise TypeError(
            "make_step: `skip_unused` must return a tree of bools shaped like params "
            f"(or a prefix of it); got {jax.tree.structure(used)} for params "
            f"{jax.tree.structure(params)}."
        ) from err


def _keep_unused(used: Any, new: Any, old: Any) -> Any:
    """Per leaf: `new` where used, `old` where not (static bools select in Python)."""

    def pick(u: Any, a: Any, b: Any) -> Any:
        if isinstance(u, bool):
            return a if u else b
        return jax.numpy.where(u, a, b)

    return jax.tree.map(pick, used, new, old)


def _keep_unused_state(used: Any, new: Any, old: Any, params: Any) -> Any:
    """Hold back every params-shaped part of an optimizer state (momentum, moments)."""
    params_def = jax.tree.structure(params)
    shaped = lambda t: jax.tree.structure(t) == params_def  # noqa: E731

    def hold(n: Any, o: Any) -> Any:
        return _keep_unused(used, n, o) if shaped(n) else n

    return jax.tree.map(hold, new, old, is_leaf=shaped)


def _check_opt_state(optimizer: Any, params: Any, opt_state: Any, where: str) -> None:
    want = jax.eval_shape(optimizer.init, params)
    if (diff := structure_diff(opt_state, want)) is not None:
        raise TypeError(
            f"{where}: `opt_state` does not match `optimizer.init(params)`.\n"
            f"{diff}\nCreate it with `optimizer.init(params)` for these params."
        )
    for path, g, w in leaf_pairs(opt_state, want):
        if (jnp.shape(g), jnp.result_type(g)) != (w.shape, w.dtype):
            raise TypeError(
                f"{where}: `opt_state{path}` must be "
                f"{w.dtype}{list(w.shape)}; got {jnp.result_type(g)}"
                f"{list(jnp.shape(g))}. Create it with `optimizer.init(params)`."
            )


def _all_finite(tree: Any) -> jax.Array:
    """One bool: whether every element of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _optimizer_update(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    where: str,
    skip_unused: bool | Callable[..., Any] = False,
    guard: bool = False,
    has_aux: bool = False,
    specialize: tuple[str, int, int] | None = None,
) -> Callable[..., tuple]:
    """The body shared by `make_step`, `make_fused_step` and `make_update`.

    `specialize=(name, count, position)`: the argument `name` (passed by name,
    or at `position` in `batch`) is an int scalar in `range(count)`; the loss
    and its gradient are traced once per value, with the Python int, and
    `lax.switch` picks the branch (the optimizer update stays outside the
    switch, so the branches only read the params).
    """
    extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    def update(params: Any, opt_state: Any, *batch: Any, **kwargs: Any) -> tuple:
        _check_opt_state(optimizer, params, opt_state, where)
        if specialize is None:
            loss, grads, aux = loss_and_grads(params, batch, kwargs)
            return finish(params, opt_state, loss, grads, aux, batch, kwargs)
        name, count, position = specialize
        if name in kwargs:
            kwargs = dict(kwargs)
            index = kwargs.pop(name)

            def at(k: int, b: tuple, kw: dict) -> tuple:
                return b, {**kw, name: k}
        elif position < len(batch):
            index, batch = batch[position], batch[:position] + batch[position + 1 :]

            def at(k: int, b: tuple, kw: dict) -> tuple:
                return (*b[:position], k, *b[position:]), kw
        else:
            raise TypeError(
                f"{where}: `{name}`, named in `specialize`, was not passed; pass "
                "it with every call (its branch is chosen from it)."
            )
        if hasattr(index, "dtype"):
            got = f"{jnp.result_type(index)}{list(jnp.shape(index))}"
            is_int = jnp.ndim(index) == 0 and jnp.issubdtype(index.dtype, jnp.integer)
        else:
            got = type(index).__name__
            is_int = isinstance(index, int | np.integer) and not isinstance(index, bool)
        if not is_int:
            raise TypeError(
                f"{where}: `{name}`, named in `specialize`, must be an int scalar; "
                f"got {got}."
            )
        if not isinstance(index, jax.core.Tracer):
            # A concrete value (an eager `make_update`): `lax.switch` would clamp it.
            given = int(index)
            if not 0 <= given < count:
                raise ValueError(
                    f"{where}: `{name}` must be in [0, {count - 1}]; got {given}. "
                    f"It picks one of the {count} branches of `specialize`."
                )
        index = _checks.check_traced_range(
            index,
            0,
            count - 1,
            where=where,
            name=name,
            fix=f"It picks one of the {count} branches of `specialize`.",
        )

        def grad_at(k: int) -> Callable:
            return lambda p, b, kw: loss_and_grads(p, *at(k, b, kw))

        def value_at(k: int) -> Callable:
            return lambda p, b, kw: value(p, *at(k, b, kw))[0]

        branches = [grad_at(k) for k in range(count)]
        try:
            loss, grads, aux = lax.switch(index, branches, params, batch, kwargs)
        except TypeError as err:
            if not str(err).startswith("switch branches must have equal output"):
                raise
            raise TypeError(
                f"{where}: with `specialize={{{name!r}: {count}}}`, `loss_fn` must "
                f"return the same dtypes and shapes (loss, and aux with has_aux) "
                f"for every value of `{name}`; they differ between branches: {err}"
            ) from err

        def value_fn(p: Any) -> Any:
            fns = [value_at(k) for k in range(count)]
            return lax.switch(index, fns, p, batch, kwargs)

        def read_by_branch(_: Any, params: Any) -> Any:
            # `skip_unused=True`: the leaves the chosen branch reads.
            read = [
                _leaves_read(lambda p, k=k: value_at(k)(p, batch, kwargs), params)
                for k in range(count)
            ]
            return jax.tree.map(lambda *r: jnp.asarray(r)[index], *read)

        # `skip_unused`'s callable sees the arguments as passed.
        full_batch, full_kwargs = at(index, batch, kwargs)
        return finish(
            params,
            opt_state,
            loss,
            grads,
            aux,
            full_batch,
            full_kwargs,
            value_fn,
            read_by_branch,
        )

    def value(p: Any, batch: tuple, kwargs: dict) -> Any:
        out = loss_fn(p, *batch, **kwargs)
        if has_aux:
            if not isinstance(out, tuple | list) or len(out) != 2:
                raise TypeError(
                    f"{where}: with has_aux=True, `loss_fn` must return a pair "
                    f"(loss, aux); got {type(out).__name__}."
                )
            return out[0], out[1]
        if isinstance(out, tuple | list):
            raise TypeError(
                f"{where}: `loss_fn` returned a {type(out).__name__} of "
                f"{len(out)} items; it must return a float scalar. If it "
                "returns (loss, metrics), pass has_aux=True: the step then "
                "returns the metrics too."
            )
        return out, None

    def loss_and_grads(params: Any, batch: tuple, kwargs: dict) -> tuple:
        loss, pullback, aux = jax.vjp(
            lambda p: value(p, batch, kwargs), params, has_aux=True
        )
        if jnp.shape(loss) != () or not jnp.issubdtype(
            jnp.result_type(loss), jnp.floating
        ):
            raise TypeError(
                f"{where}: `loss_fn` must return a float scalar; got "
                f"{jnp.result_type(loss)}{list(jnp.shape(loss))}. Reduce it with "
                "`.sum()` or `.mean()`."
            )
        (grads,) = pullback(jnp.ones_like(loss))
        return loss, grads, aux

    def finish(
        params: Any,
        opt_state: Any,
        loss: Any,
        grads: Any,
        aux: Any,
        batch: tuple,
        kwargs: dict,
        value_fn: Callable | None = None,
        read_by: Callable[[Callable, Any], Any] = _leaves_read,
    ) -> tuple:
        if value_fn is None:
            value_fn = lambda p: value(p, batch, kwargs)[0]  # noqa: E731
        if extra_args:
            # reduce_on_plateau reads `value`; lbfgs reads `value`, `grad` and
            # `value_fn`; every other transformation ignores them.
            updates, new_state = optimizer.update(
                grads,
                opt_state,
                params,
                value=loss,
                grad=grads,
                value_fn=value_fn,
            )
        else:
            updates, new_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if skip_unused is not False:
            if skip_unused is True:
                used = read_by(value_fn, params)
            else:
                used = _broadcast_used(skip_unused(params, *batch, **kwargs), params)
            new_params = _keep_unused(used, new_params, params)
            new_state = _keep_unused_state(used, new_state, opt_state, params)
        if guard:
            finite = _all_finite((loss, grads))
            new_params = jax.tree.map(partial(jnp.where, finite), new_params, params)
            new_state = jax.tree.map(partial(jnp.where, finite), new_state, opt_state)
            loss = jnp.where(finite, loss, jnp.nan)
        if has_aux:
            return new_params, new_state, loss, aux
        return new_params, new_state, loss

    return update


def make_update(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    skip_unused: bool | Callable[..., Any] = False,
    guard: bool = False,
    specialize: Mapping[str, int] | None = None,
) -> Callable[..., tuple]:
    """The pure optimizer update, not compiled: yours to `jit`, `vmap` or `shard_map`.

    `update(params, opt_state, *batch) -> (params, opt_state, loss[, aux])` is
    what `make_step` compiles: the loss and its gradient, then `optimizer`.
    Nothing is donated, nothing is counted, nothing is cached: it is a plain
    function of arrays, as optax's own `update` is. Optimizers that need extra
    arguments (`optax.GradientTransformationExtraArgs`, such as
    `optax.contrib.reduce_on_plateau` or `optax.lbfgs`) get `value=loss`,
    `grad=grads` and `value_fn`.

    Args:
      loss_fn: `loss_fn(params, *batch) -> scalar loss`, or `(loss, aux)` with
        `has_aux=True`.
      optimizer: any `optax.GradientTransformation`.
      has_aux: `loss_fn` returns `(loss, aux)`; `update` then returns `aux`
        last.
      skip_unused: as for `make_step`.
      guard: as for `make_step`.
      specialize: as for `make_step`.

    Returns:
      The update function, with the signature `(params, opt_state, ...)`,
      where `...` are `loss_fn`'s arguments after `params`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import functorch_lite as fl
      >>> def loss_fn(w, x):
      ...     err = x @ w - 1.0
      ...     return jnp.sum(err**2), {"max_err": jnp.max(jnp.abs(err))}
      >>> opt = optax.sgd(0.1)
      >>> update = jax.jit(fl.train.make_update(loss_fn, opt, has_aux=True))
      >>> w, state = jnp.zeros(2), opt.init(jnp.zeros(2))
      >>> w, state, loss, aux = update(w, state, jnp.eye(2))
      >>> float(loss), float(aux["max_err"])
      (2.0, 1.0)
    """
    loss_sig, loss_params = _check_loss_fn(loss_fn, optimizer, "make_update")
    check_bool(has_aux, where="make_update", name="has_aux")
    check_bool(guard, where="make_update", name="guard")
    update = _optimizer_update(
        loss_fn,
        optimizer,
        where="make_update",
        skip_unused=skip_unused,
        guard=guard,
        has_aux=has_aux,
        specialize=_check_specialize(specialize, loss_params, (), where="make_update"),
    )
    # The loss's argument names, so that `jax.jit(update, static_argnames=...)`
    # and `data_parallel` can name them.
    update.__signature__ = _step_signature(loss_sig, loss_params)  # type: ignore[attr-defined]
    update.__name__ = "update"
    return update


def make_fused_step(
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    shared_argnames: Sequence[str] = (),
    specialize: Mapping[str, int] | None = None,
    donate: bool = True,
    max_traces: int | None = None,
) -> Compiled:
    """Build one compiled call that runs K optimizer steps with `lax.scan`.

    `fused(params, opt_state, *batch) -> (params, opt_state, losses)`. Every
    argument of `loss_fn` after `params` carries a leading steps axis of
    length K, which the scan walks, except those named in `shared_argnames`,
    which every step sees whole (fixed training data, say). `losses` has shape
    `(K,)`: the loss of each step, logged without leaving the graph.

    Feed the depths as a `(K,)` int array, or draw them in the graph: pass
    `(K,)` keys (`jax.random.split(key, K)`) and call `jax.random.randint` in
    `loss_fn`. Either way one compile serves every depth sequence; this is the
    static path only (a depth that changes per step cannot be a static
    argument).

    `specialize={"depth": 4}` compiles the dynamic path's programs into the
    one call instead: `loss_fn` is traced once for each value `0..3` of the
    per-step int argument `depth`, which it receives as a Python int, and
    `lax.switch` runs the branch of each step's value (the optimizer update
    stays outside the switch). Write `loss_fn` as for the dynamic path (for
    `DynamicNet`, `mode="dynamic"`), so that each branch is a straight-line
    program with no loop. Still one compile, now of `count` branches: worth it
    when the values are few. On a 2-core CPU with JAX's default threads, a
    loop in the step costs a fixed share of it that the branches do not pay
    (bench/RESULTS.md, "A loop's fixed cost on two XLA threads"). A value
    outside `range(count)` raises `ValueError` before the call; under your own
    `jax.jit` or `jax.vmap` the check runs in the program and fails it with
    the same message (a `JaxRuntimeError`). With `FUNCTORCH_LITE_CHECKS=0` the
    value is clamped into range, as `lax.switch` does. Under `jax.vmap` with
    a value per example, `lax.switch` computes every branch and selects.

    Args:
      loss_fn: `loss_fn(params, *batch) -> scalar loss`, as for `make_step`.
      optimizer: any `optax.GradientTransformation`.
      shared_argnames: `loss_fn` arguments without the steps axis.
      specialize: `{name: count}`, one per-step int argument of `loss_fn` and
        how many values it takes (`0..count-1`, `count >= 2`); None (default):
        none.
      donate: donate `params` and `opt_state` (see `make_step`).
      max_traces: raise `RuntimeError` if the call would trace more often.

    Returns:
      The compiled multi-step function.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import functorch_lite as fl
      >>> net = fl.models.DynamicNet(4, 8, 2)
      >>> def loss_fn(params, x, y, depth):
      ...     return fl.nn.mse_loss(net.apply(params, x, depth), y)
      >>> opt = optax.sgd(1e-4, momentum=0.9)
      >>> fused = fl.train.make_fused_step(loss_fn, opt, shared_argnames=("x", "y"))
      >>> params = net.init(jax.random.key(0)); opt_state = opt.init(params)
      >>> depths = jnp.array([0, 3, 1, 2])
      >>> params, opt_state, losses = fused(
      ...     params, opt_state, jnp.ones((3, 4)), jnp.zeros((3, 2)), depths)
      >>> losses.shape, fused.stats.compiles
      ((4,), 1)

      Specialized branches, one per depth, in the same single compile:

      >>> def loss_unrolled(params, x, y, depth):
      ...     y_hat = net.apply(params, x, depth, mode="dynamic")
      ...     return fl.nn.mse_loss(y_hat, y)
      >>> fast = fl.train.make_fused_step(
      ...     loss_unrolled, opt, shared_argnames=("x", "y"), specialize={"depth": 4})
      >>> _, _, losses = fast(params, opt_state, jnp.ones((3, 4)), jnp.zeros((3, 2)),
      ...                     depths)
      >>> losses.shape, fast.stats.compiles
      ((4,), 1)
    """
    loss_sig, loss_params = _check_loss_fn(loss_fn, optimizer, "make_fused_step")
    shared_argnames = argnames(
        shared_argnames, where="make_fused_step", name="shared_argnames"
    )
    check_bool(donate, where="make_fused_step", name="donate")
    check_int(
        max_traces,
        where="make_fused_step",
        name="max_traces",
        minimum=1,
        allow_none=True,
    )
    names = [p.name for p in loss_params[1:]]
    unknown = [n for n in shared_argnames if n not in names]
    if unknown:
        raise ValueError(
            f"make_fused_step: `shared_argnames` names {unknown}, which `loss_fn` "
            f"does not take by name; its arguments after `params` are {names}."
        )
    branch_on = _check_specialize(
        specialize, loss_params, shared_argnames, where="make_fused_step"
    )
    update = _optimizer_update(
        loss_fn, optimizer, where="make_fused_step", specialize=branch_on
    )
    shared = frozenset(shared_argnames)

    def fused(params: Any, opt_state: Any, *batch: Any, **kwargs: Any) -> tuple:
        bound = inspect.signature(loss_fn).bind(params, *batch, **kwargs)
        args = dict(list(bound.arguments.items())[1:])
        stacked = {k: v for k, v in args.items() if k not in shared}
        fixed = {k: v for k, v in args.items() if k in shared}
        lengths = {
            f"{k}{jax.tree_util.keystr(path)}": jnp.shape(leaf)[0]
            if jnp.ndim(leaf)
            else None
            for k, v in stacked.items()
            for path, leaf in jax.tree_util.tree_flatten_with_path(v)[0]
        }
        if not lengths or len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(
                "make_fused_step: the per-step arguments must share one leading "
                f"steps axis; got leading lengths {lengths} (None: a scalar). Stack "
                "them, or name fixed arguments in `shared_argnames`."
            )

        if branch_on is not None:
            if branch_on[0] not in stacked:
                raise TypeError(
                    f"make_fused_step: `{branch_on[0]}`, named in `specialize`, was "
                    "not passed; pass one value per step, a (K,) int array."
                )
            _check_branch_values(stacked[branch_on[0]], branch_on[0])

        def body(carry: tuple, per_step: dict) -> tuple:
            p, s = carry
            # A traced check on a step's slice of an argument runs on the
            # whole argument before the call (see `_checks`).
            _checks.alias_inputs(jax.tree.leaves(stacked), jax.tree.leaves(per_step))
            p, s, loss = update(p, s, **fixed, **per_step)
            return (p, s), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), stacked)
        return params, opt_state, losses

    fused.__signature__ = _step_signature(loss_sig, loss_params)  # type: ignore[attr-defined]
    fused.__name__ = "fused_step"
    compiled = jit(
        fused,
        donate_argnames=("params", "opt_state") if donate else (),
        max_traces=max_traces,
    )
    # Data parallelism reads this to shard per-step arguments on axis 1.
    compiled.shared_argnames = tuple(shared_argnames)  # type: ignore[attr-defined]
    return compiled


def _check_specialize(
    specialize: Any, loss_params: list, excluded: Sequence[str], *, where: str
) -> tuple[str, int, int] | None:
    """`specialize` as `(name, count, position after params)`, or None.

    `excluded`: argument names that cannot be specialized (shared or static).
    """
    if specialize is None:
        return None
    kind = "a per-step argument" if where == "make_fused_step" else "an argument"
    if not isinstance(specialize, Mapping) or len(specialize) != 1:
        raise TypeError(
            f"{where}: `specialize` must be a dict of one argument name and its "
            f"number of values, like {{'depth': 4}}; got {specialize!r}."
        )
    ((name, count),) = specialize.items()
    named = []
    for p in loss_params[1:]:
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            break  # after *args, positions are unknown
        named.append(p.name)
    allowed = [n for n in named if n not in excluded]
    if name not in allowed:
        why = (
            f" ({name!r} is static or shared: it has no per-call value to branch on)"
            if name in excluded
            else ""
        )
        raise ValueError(
            f"{where}: `specialize` names {name!r}, which is not {kind} of "
            f"`loss_fn` that can be specialized{why}; those are {allowed}."
        )
    # One value leaves nothing to branch on: use `static_argnames` for it.
    check_int(count, where=where, name=f"specialize[{name!r}]", minimum=2)
    return name, int(count), named.index(name)


def _check_branch_values(values: Any, name: str) -> None:
    """The `specialize` argument must be an int array of shape `(K,)`."""
    dtype = jnp.result_type(values)
    if jnp.ndim(values) != 1 or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"make_fused_step: `{name}`, named in `specialize`, must be an int "
            f"array of shape (K,), one value per step; got {dtype}"
            f"{list(jnp.shape(values))}."
        )


def _progress_bar(enabled: bool, total: int | None, done: int) -> Any:
    """A tqdm bar on stderr when it is a terminal, else None (no output)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # noqa: PLC0415 - only when a bar is shown

    return tqdm(
        total=total, initial=done, desc="fit", unit="step", file=sys.stderr,
        dynamic_ncols=True, mininterval=0.2,
    )  # fmt: skip


def _batch_call(
    step: Callable, params: Any, opt_state: Any, batch: Any, i: int
) -> tuple:
    if isinstance(batch, dict):
        out = step(params, opt_state, **batch)
    elif isinstance(batch, tuple | list):
        out = step(params, opt_state, *batch)
    else:
        out = None
    if out is not None:
        # A `has_aux` step returns its aux last; `fit` keeps the loss only.
        return tuple(out[:3])
    raise TypeError(
        "fit: each item of `batches` must be a tuple of step arguments or a dict "
        f"of keyword arguments; item {i} is {type(batch).__name__}."
    )


def _nonfinite_inputs(batch: Any) -> list[str]:
    """Name every floating input leaf of `batch` that holds a NaN or an Inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
            if not np.all(np.isfinite(np.asarray(leaf))):
                bad.append(jax.tree_util.keystr(path) or "<batch>")
    return bad


def _check_fit_step(step: Any, params: Any) -> None:
    """`fit(loss_fn, optimizer, ...)` is a common first try: say how to fix it."""
    if isinstance(params, optax.GradientTransformation):
        raise TypeError(
            "fit: the first argument must be a step, and the second the params; "
            f"got {getattr(step, '__name__', type(step).__name__)!r} and an optax "
            "optimizer. Build the step from the loss and the optimizer first: "
            "`step = fl.train.make_step(loss_fn, optimizer)`, then "
            "`fit(step, params, optimizer.init(params), batches)`."
        )


def _check_fit_options(
    on_nonfinite: str,
    checkpoint_every: int | None,
    checkpoint_dir: Any,
    resume: bool,
    log_every: int,
    step: Any,
    keep: Any = 3,
) -> None:
    check_int(log_every, where="fit", name="log_every", minimum=1)
    check_bool(resume, where="fit", name="resume")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(
            f'fit: `on_nonfinite` must be "raise" or "skip"; got {on_nonfinite!r}.'
        )
    if on_nonfinite == "skip" and not getattr(step, "guarded", False):
        raise ValueError(
            'fit: `on_nonfinite="skip"` needs a step that skips non-finite updates '
            "itself; build it with `make_step(..., guard=True)`."
        )
    check_int(
        checkpoint_every,
        where="fit",
        name="checkpoint_every",
        minimum=1,
        allow_none=True,
    )
    if not callable(step):
        raise TypeError(
            f"fit: `step` must be callable (from `make_step`); got {step!r}."
        )
    if hasattr(step, "shared_argnames"):
        raise TypeError(
            "fit: `step` is a fused step from `make_fused_step`, which runs K steps "
            "per call and returns K losses; `fit` runs one step per batch. Call the "
            "fused step in a loop, or pass a step from `make_step`."
        )
    check_int(
        keep,
        where="fit",
        name="keep",
        minimum=1,
        allow_none=True,
        fix="Pass None to keep every checkpoint.",
    )
    if checkpoint_dir is not None:
        if not isinstance(checkpoint_dir, str | os.PathLike):
            raise TypeError(
                "fit: `checkpoint_dir` must be a str or os.PathLike; got "
                f"{type(checkpoint_dir).__name__} {checkpoint_dir!r}."
            )
        if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            raise ValueError(
                f"fit: `checkpoint_dir` {os.fspath(checkpoint_dir)!r} is a file, not "
                "a folder."
            )
        if checkpoint_every is not None:
            # Find out now, not after the first `checkpoint_every` steps have
            # consumed the caller's (donated) params.
            try:
                os.makedirs(checkpoint_dir, exist_ok=True)
            except OSError as err:
                raise ValueError(
                    f"fit: cannot create `checkpoint_dir` "
                    f"{os.fspath(checkpoint_dir)!r}: {err.strerror or err}."
                ) from err
            if not os.access(checkpoint_dir, os.W_OK | os.X_OK):
                raise ValueError(
                    f"fit: `checkpoint_dir` {os.fspath(checkpoint_dir)!r} is not "
                    "writable."
                )
    if (checkpoint_every is not None or resume) and checkpoint_dir is None:
        raise ValueError(
            "fit: `checkpoint_every` and `resume` need `checkpoint_dir`; got "
            "checkpoint_dir=None."
        )


def fit(
    step: Callable[..., tuple],
    params: Any,
    opt_state: Any,
    batches: Iterable[Any],
    *,
    progress: bool = True,
    log_every: int = 50,
    total: int | None = None,
    on_nonfinite: str = "raise",
    check_inputs: bool = False,
    checkpoint_every: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    keep: int | None = 3,
    resume: bool = False,
) -> FitResult:
    """Run `step` over `batches` and return the final state and the loss history.

    Guarded training: with `on_nonfinite="raise"` (the default), the first
    step whose loss is NaN or Inf stops `fit` with a `FloatingPointError` that
    names the step. Its `.params`, `.opt_state` and `.step` attributes hold the
    last finite state, which is also saved to `checkpoint_dir` if given. The
    state can only be the last finite one if the step did not apply the bad
    update over donated buffers: build it with `make_step(..., guard=True)`
    (the error says so otherwise). `on_nonfinite="skip"` (guarded steps only)
    carries on past such steps, leaving the state as it was.

    `fit` does not wait for each step: it keeps each loss on the device and
    reads them back together every `log_every` steps (and at each
    checkpoint), so the host queues the next steps while the device runs
    (JAX's asynchronous dispatch) and a loop over a small model runs as fast
    as a bare Python loop over the same step. A non-finite loss is found at
    the next read-back, and the error names the first such step. To hand
    back the state before it, a guarded step's run keeps a copy of params
    and opt_state from the start of each window, and the window's batches,
    and replays the window's finite steps (same program, same inputs: the
    same state bit for bit). Smaller `log_every` means shorter windows. For
    the last few percent of speed, use `make_fused_step`, which runs many
    steps per call.

    Checkpoints: every `checkpoint_every` steps, `{"params", "opt_state",
    "step"}` is saved atomically to `checkpoint_dir` (the newest `keep` are
    kept). The save runs in the background (`checkpoint.save_numbered_async`)
    while training goes on; `fit` waits for it before the next save and
    before it returns or raises, so no checkpoint is lost. With
    `resume=True`, `fit` restores the newest readable checkpoint there and
    skips that many items of `batches`, so that a resumed run, fed the same
    batches, ends with bitwise the same params as an uninterrupted one.

    Several processes (`fl.parallel.initialize`, a `data_parallel` step):
    one process writes each folder's checkpoints (the lowest-numbered of the
    processes that share it; each process its own folder when none is
    shared), and `resume=True` starts every process from the newest step
    that all of them can read, agreed before the first step (none anywhere:
    all start fresh; some but none in common: all raise `CheckpointError`).

    Args:
      step: a step from `make_step`.
      params: the initial params (donated to the first step).
      opt_state: the initial optimizer state.
      batches: an iterable; each item is a tuple of positional arguments for
        the step after `opt_state`, or a dict of keyword arguments.
      progress: show a progress bar (tqdm) on stderr with the step, the loss
        and steps/s, updated every `log_every` steps, when stderr is a
        terminal; nothing otherwise. Also say when resuming (see below).
      log_every: how often to read the losses back (and update the bar).
      total: the number of batches, for the progress display.
      on_nonfinite: `"raise"` or `"skip"`, see above.
      check_inputs: look for NaN or Inf in each batch's float arrays before
        training on it (a host-side check; off by default, as it costs a copy).
        A bad batch raises `FloatingPointError` naming the step and the input,
        or is skipped (its loss recorded as NaN) with `on_nonfinite="skip"`.
      checkpoint_every: save every this many steps; None saves nothing.
      checkpoint_dir: the folder for checkpoints.
      keep: how many checkpoints to keep; None keeps them all.
      resume: continue from the newest good checkpoint in `checkpoint_dir`.

    Returns:
      A `FitResult`: `(params, opt_state, losses)`, `losses` a float NumPy
      array with one entry per step run in this call, and `.resumed_from`
      (the checkpoint's step and file, or None) and `.skipped` (the batches
      that checkpoint had consumed). With `progress`, `fit` also says on
      stderr where it resumed from, or that `resume=True` found no checkpoint
      and starts afresh.

    Raises:
      FloatingPointError: a non-finite loss, or a non-finite input with
        `check_inputs=True`.

    Whatever stops a run part-way (a bad batch, a failed save, Ctrl-C), the
    exception carries `.params`, `.opt_state` and `.step`: the state after the
    last completed step. The arrays passed in were donated to the first step,
    so this is where the trained state lives.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import functorch_lite as fl
      >>> net = fl.models.TwoLayerNet(3, 4, 1)
      >>> step = fl.train.make_step(
      ...     lambda p, x, y: fl.nn.mse_loss(net.apply(p, x), y), optax.sgd(1e-3))
      >>> params = net.init(jax.random.key(0))
      >>> opt_state = optax.sgd(1e-3).init(params)
      >>> data = [(jnp.ones((2, 3)), jnp.zeros((2, 1)))] * 5
      >>> params, opt_state, losses = fl.train.fit(
      ...     step, params, opt_state, data, progress=False)
      >>> losses.shape, bool(losses[-1] < losses[0])
      ((5,), True)
    """
    _check_fit_step(step, params)
    check_bool(progress, where="fit", name="progress")
    check_bool(check_inputs, where="fit", name="check_inputs")
    _check_fit_options(
        on_nonfinite, checkpoint_every, checkpoint_dir, resume, log_every, step, keep
    )
    try:
        batches = iter(batches)
    except TypeError as err:
        raise TypeError(
            "fit: `batches` must be an iterable of tuples or dicts; got "
            f"{type(batches).__name__}."
        ) from err
    done = 0
    seen = 0  # items of `batches` read so far
    resumed_from: tuple[int, str] | None = None
    writer = True  # whether this process writes the checkpoints
    if checkpoint_dir is not None and jax.process_count() > 1:
        writer = _is_writer(os.fspath(checkpoint_dir))
    if resume:
        like = {"params": params, "opt_state": opt_state, "step": 0}
        if jax.process_count() > 1:
            found = _agreed_checkpoint(os.fspath(checkpoint_dir), like)  # type: ignore[arg-type]
        else:
            found = checkpoint.load_latest(checkpoint_dir, like=like)  # type: ignore[arg-type]
        if found is not None:
            done, tree = found
            params, opt_state = tree["params"], tree["opt_state"]
            _note_checkpoint(checkpoint_dir, done)
            resumed_from = (done, _checkpoint_file(checkpoint_dir, done))
            _say(
                progress,
                f"fit: resumed from step {done} ({resumed_from[1]}); skipping the "
                f"first {done} batches",
            )
        else:
            _say(
                progress,
                f"fit: resume=True found no checkpoint in "
                f"{os.fspath(checkpoint_dir)!r}; starting from the given params",  # type: ignore[arg-type]
            )

    losses: list[Any] = []  # the unread window: one device scalar per step
    history: list[np.ndarray] = []  # the losses read back so far
    unread = done  # the step count before the window's first step
    completed = done  # the state in `params` is that after this many steps
    # With a guarded step, `fit` can hand back exactly the state before the
    # first non-finite step without waiting for each step: it keeps a copy of
    # the state at the start of each window of unread losses, and the window's
    # batches, and replays the finite steps before the bad one.
    replay = on_nonfinite == "raise" and bool(getattr(step, "guarded", False))
    window: list[Any] = []  # with `replay`: the unread steps' batches
    snapshot = _copy_tree((params, opt_state)) if replay else None
    pending: checkpoint.AsyncSave | None = None
    pending_step = 0  # the step that `pending` saves

    def wait_for_save() -> None:
        nonlocal pending
        if pending is not None:
            running, pending = pending, None
            running.wait()
            _note_checkpoint(checkpoint_dir, pending_step)

    def save(at: int, state: tuple) -> None:
        nonlocal pending, pending_step
        wait_for_save()
        if not writer:  # another process writes this folder's checkpoints
            _note_checkpoint(checkpoint_dir, at)
            return
        tree = {"params": state[0], "opt_state": state[1], "step": at}
        pending = checkpoint.save_numbered_async(checkpoint_dir, at, tree, keep=keep)  # type: ignore[arg-type]
        pending_step = at

    def read_back() -> float:
        """Read the unread losses; stop at the first non-finite one ("raise")."""
        nonlocal unread, snapshot, window, params, opt_state, completed
        values = _read_losses(losses, unread)
        first = unread
        unread += len(losses)
        losses.clear()
        history.append(values)
        bad = np.flatnonzero(~np.isfinite(values))
        if on_nonfinite == "raise" and bad.size:
            number = first + int(bad[0]) + 1
            value = values[bad[0]]
            message = f"fit: the loss at step {number} is {value}. "
            if replay:
                # The steps before `number` in this window were finite: rerun
                # them from the window's start (same program, same inputs,
                # bitwise the same state).
                params, opt_state = snapshot  # type: ignore[misc]
                snapshot = None
                for i, batch in enumerate(window[: int(bad[0])]):
                    if batch is not None:
                        params, opt_state, _ = _batch_call(
                            step, params, opt_state, batch, first + i + 1
                        )
                completed = number - 1
                message += (
                    f"params and opt_state are those after step {number - 1}, the "
                    "last finite ones"
                )
                if checkpoint_dir is not None:
                    wait_for_save()
                    checkpoint.save_numbered(
                        checkpoint_dir,  # type: ignore[arg-type]
                        number - 1,
                        {"params": params, "opt_state": opt_state, "step": number - 1},
                        keep=keep,
                    )
                    message += f", saved to {os.fspath(checkpoint_dir)!r}"
                message += "."
            else:
                message += (
                    "The step was not guarded, so its update may have reached "
                    "params; build it with `make_step(..., guard=True)` to keep "
                    "the last finite state"
                    + (
                        f", or resume from the checkpoints in {checkpoint_dir!r}."
                        if checkpoint_dir is not None
                        else "."
                    )
                )
            raise _nonfinite_error(message, params, opt_state, completed)
        if replay:
            snapshot = _copy_tree((params, opt_state))
            window = []
        return float(values[-1]) if values.size else float("nan")

    def next_read_after(n: int) -> int:
        """The step after which the losses are next read back."""
        at = (n // log_every + 1) * log_every
        if checkpoint_every is not None:
            at = min(at, (n // checkpoint_every + 1) * checkpoint_every)
        return min(at, n + log_every) if replay else at

    read_at = next_read_after(done)
    bar = _progress_bar(progress, total, done)
    try:
        for i, batch in enumerate(batches):
            seen = i + 1
            if i < done:
                continue  # consumed before the checkpoint we resumed from
            if check_inputs and (bad := _nonfinite_inputs(batch)):
                message = (
                    f"fit: step {i + 1} has non-finite values in its input "
                    f"{', '.join(bad)}; it was not trained on."
                )
                if on_nonfinite == "raise":
                    read_back()  # an earlier non-finite loss is reported first
                    raise _nonfinite_error(message, params, opt_state, i)
                losses.append(np.float64(np.nan))
                batch = None  # nothing to replay
            elif type(batch) is tuple:  # the common case, kept short
                params, opt_state, loss, *_ = step(params, opt_state, *batch)
                losses.append(loss)
            else:
                params, opt_state, loss = _batch_call(
                    step, params, opt_state, batch, i + 1
                )
                losses.append(loss)
            completed = i + 1
            if replay:
                window.append(batch)
            if completed >= read_at:
                read_at = next_read_after(completed)
                last = read_back()
                if checkpoint_every is not None and completed % checkpoint_every == 0:
                    save(completed, (params, opt_state))
                if bar is not None:
                    bar.update(completed - bar.n)
                    bar.set_postfix(loss=f"{last:.6g}", refresh=False)
        final = read_back()
        if bar is not None:
            bar.update(completed - bar.n)
            if not np.isnan(final):  # nan: nothing was left to read
                bar.set_postfix(loss=f"{final:.6g}", refresh=False)
            bar.close()
            bar = None
        wait_for_save()
        if done and seen <= done:
            _say(
                progress,
                f"fit: the checkpoint resumed from (step {done}) had consumed all "
                f"{seen} batches given; nothing was run",
            )
    except BaseException as err:
        if bar is not None:
            bar.close()
        if jax.process_count() > 1:  # a collective may fail for a lost peer
            from functorch_lite import parallel  # noqa: PLC0415

            parallel.wait_for_lost_peer(err)
        # The caller's params were donated to the first step: whatever stopped
        # the run, hand back the state after the last completed step, and
        # finish the checkpoint being written.
        _attach_state(err, params, opt_state, completed)
        if pending is not None:
            try:
                pending.wait()
            except Exception as save_err:  # noqa: BLE001 - reported with `err`
                err.add_note(
                    f"fit: the checkpoint save in flight also failed: {save_err}"
                )
        raise
    return FitResult(
        params,
        opt_state,
        np.concatenate([np.zeros(0), *history]),
        resumed_from=resumed_from,
        skipped=min(done, seen),
    )


class FitResult(tuple):
    """What `fit` returns: `(params, opt_state, losses)`, and what it did.

    It unpacks as the 3-tuple (`params, opt_state, losses = fit(...)`), and
    also says where a resumed run started:

    - `resumed_from`: `(step, path)` of the checkpoint restored with
      `resume=True`, or None (no `resume`, or no checkpoint found: a fresh
      start);
    - `skipped`: how many items of `batches` were skipped because that
      checkpoint had consumed them.
    """

    resumed_from: tuple[int, str] | None
    skipped: int

    def __new__(
        cls,
        params: Any,
        opt_state: Any,
        losses: np.ndarray,
        *,
        resumed_from: tuple[int, str] | None = None,
        skipped: int = 0,
    ) -> FitResult:
        """Build the result; `fit` makes it."""
        self = super().__new__(cls, (params, opt_state, losses))
        self.resumed_from = resumed_from
        self.skipped = skipped
        return self

    @property
    def params(self) -> Any:
        """The final params."""
        return self[0]

    @property
    def opt_state(self) -> Any:
        """The final optimizer state."""
        return self[1]

    @property
    def losses(self) -> np.ndarray:
        """One loss per step run in this call (float64)."""
        return self[2]

    def __repr__(self) -> str:
        return (
            f"FitResult(steps run={self[2].shape[0]}, resumed_from="
            f"{self.resumed_from!r}, skipped={self.skipped})"
        )


# --- Runs that span processes ------------------------------------------------
#
# Checkpoints of replicated state (params and optimizer state under
# `data_parallel`) have one writer per folder: the processes that see the
# same folder (a shared file system) let the lowest-numbered of them write,
# and a process that sees no other's files (a folder per host) writes its
# own. Every file is still written atomically and validated on load. A
# resumed run starts from the newest step that every process can read, agreed
# before the first step; with none, all start fresh if no process has a
# checkpoint, and all stop with one error otherwise.

_MAX_STEPS_AGREED = 64  # the newest readable checkpoints each process reports


def _say(enabled: bool, message: str) -> None:
    """One line on stderr, as the progress display writes."""
    if enabled:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def _checkpoint_file(directory: Any, step: int) -> str:
    for found, path in checkpoint._numbered("fit", os.fspath(directory)):
        if found == step:
            return path
    return os.path.join(os.fspath(directory), f"ckpt_{step:08d}.safetensors")


def _note_checkpoint(directory: Any, step: int) -> None:
    from functorch_lite import parallel  # noqa: PLC0415 - imported late: a cycle

    parallel.note_checkpoint(os.fspath(directory), int(step))


def _allgather_ints(values: list[int], size: int) -> np.ndarray:
    """Every process's `values` (at most `size`, padded with -1): (P, size)."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    row = np.full(size, -1, np.int32)
    row[: len(values)] = values[:size]
    return np.asarray(multihost_utils.process_allgather(row)).reshape(-1, size)


def _is_writer(directory: str) -> bool:
    """Whether this process writes `directory`'s checkpoints (see above)."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    me = jax.process_index()
    token = int(multihost_utils.broadcast_one_to_all(np.int32(os.getpid() % 2**31)))
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, f".fl_probe_{token}_{me}")
    with open(marker, "w"):
        pass
    multihost_utils.sync_global_devices("functorch_lite fit: probe written")
    prefix = f".fl_probe_{token}_"
    names = os.listdir(directory)
    seen = [int(n[len(prefix) :]) for n in names if n.startswith(prefix)]
    multihost_utils.sync_global_devices("functorch_lite fit: probe read")
    os.remove(marker)
    return min(seen, default=me) == me


def _agreed_checkpoint(directory: str, like: Any) -> tuple[int, Any] | None:
    """The newest checkpoint every process can read, loaded (see above)."""
    readable: dict[int, str] = {}  # step -> path, each one loaded once
    newest: tuple[int, Any] | None = None
    for step, path in checkpoint._numbered("fit", directory):
        if len(readable) == _MAX_STEPS_AGREED:
            break
        try:
            tree = checkpoint.load(path, like)
        except checkpoint.CheckpointError as err:
            checkpoint._log.warning("fit: skipping unreadable checkpoint: %s", err)
            continue
        except FileNotFoundError:
            continue
        readable[step] = path
        if newest is None:
            newest = (step, tree)
    table = _allgather_ints(sorted(readable, reverse=True), _MAX_STEPS_AGREED)
    per_process = [{int(v) for v in row if v >= 0} for row in table]
    common = set.intersection(*per_process)
    if not common:
        if any(per_process):
            have = "; ".join(
                f"process {i}: {sorted(steps) or 'none'}"
                for i, steps in enumerate(per_process)
            )
            raise checkpoint.CheckpointError(
                "fit: resume=True, but no checkpoint step is readable by every "
                f"process, so the processes cannot agree where to start ({have}; "
                f"this process reads {directory!r}). Copy a checkpoint to every "
                "process's folder, or start afresh with resume=False."
            )
        return None
    step = max(common)
    if newest is not None and newest[0] == step:
        return newest
    return step, checkpoint.load(readable[step], like)


@jax.jit
def _copy_tree(tree: Any) -> Any:
    """A copy of every leaf in its own buffers (safe from donation), one dispatch."""
    return jax.tree.map(jnp.copy, tree)


@partial(jax.jit, static_argnums=1)
def _stack_padded(losses: list[Any], size: int) -> jax.Array:
    return jnp.stack(losses + losses[-1:] * (size - len(losses)))


def _read_losses(losses: list[Any], first: int) -> np.ndarray:
    """Read a window of device scalars back to the host in one transfer.

    One `device_get` per scalar costs about 9 us on CPU, as much as a small
    step; stacking them on the device first makes it one transfer per window.
    The stack is padded to a power of two, so that a few programs serve every
    window length.
    """
    if not losses:
        return np.zeros(0)
    if all(isinstance(v, jax.Array) for v in losses):
        size = 1 << (len(losses) - 1).bit_length()
        try:
            stacked = _stack_padded(losses, size)
        except (TypeError, ValueError):  # mixed shapes, dtypes or devices
            pass
        else:
            if stacked.shape == (size,):
                return np.asarray(stacked, dtype=np.float64)[: len(losses)]
    for i, v in enumerate(losses):
        if np.shape(v) != ():
            raise TypeError(
                f"fit: the step returned a loss of shape {np.shape(v)} at step "
                f"{first + i + 1}; `fit` needs a step that returns one scalar loss, "
                "as `make_step` builds."
            )
    return np.asarray(jax.device_get(losses), dtype=np.float64).reshape(-1)


def _nonfinite_error(
    message: str, params: Any, opt_state: Any, step: int
) -> FloatingPointError:
    err = FloatingPointError(message)
    _attach_state(err, params, opt_state, step)
    return err


def _attach_state(err: BaseException, params: Any, opt_state: Any, step: int) -> None:
    """Give `err` `.params`, `.opt_state` and `.step`, unless it already has them."""
    if hasattr(err, "params"):
        return
    try:
        err.params = params  # type: ignore[attr-defined]
        err.opt_state = opt_state  # type: ignore[attr-defined]
        err.step = step  # type: ignore[attr-defined]
    except AttributeError:  # an exception type without a __dict__
        pass


def bucket_size(n: int, buckets: Sequence[int] | None = None) -> int:
    """Return the bucket a batch of `n` rows is padded to.

    Args:
      n: the batch size, >= 1.
      buckets: the allowed sizes; default: powers of two.

    Examples:
      >>> import functorch_lite as fl
      >>> fl.train.bucket_size(100), fl.train.bucket_size(3, buckets=[8, 64])
      (128, 8)
    """
    return _bucket_size(n, buckets, "bucket_size")


def _bucket_size(n: Any, buckets: Any, where: str) -> int:
    n = check_int(n, where=where, name="n", minimum=1)
    if buckets is None:
        return 1 << (n - 1).bit_length()
    if isinstance(buckets, str | bytes) or not isinstance(buckets, Iterable):
        raise TypeError(
            f"{where}: `buckets` must be a sequence of positive ints or None; got "
            f"{type(buckets).__name__} {buckets!r}."
        )
    sizes = sorted(
        check_int(b, where=where, name=f"buckets[{i}]", minimum=1)
        for i, b in enumerate(buckets)
    )
    if not sizes:
        raise ValueError(f"{where}: `buckets` is empty; give at least one size.")
    fits = [b for b in sizes if b >= n]
    if not fits:
        raise ValueError(
            f"{where}: a batch of {n} rows is larger than the largest bucket "
            f"{sizes[-1]}; add a larger bucket to `buckets`."
        )
    return fits[0]


def pad_batch(
    *arrays: Any, buckets: Sequence[int] | None = None
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Pad a batch to its bucket size, so that one compile serves many sizes.

    A TensorFlow 1 placeholder of shape `(None, d_in)` serves every batch size
    with one graph; `jax.jit` compiles once per shape instead. Padding each
    batch with zero rows to the next bucket (powers of two by default) bounds
    the compiles by the number of buckets: 9 for every size from 1 to 256.
    Pass the returned `mask` to the loss (`fl.nn.mse_loss(..., mask=mask)`),
    which drops the padded rows, so that loss and gradients equal those of the
    unpadded batch.

    Args:
      *arrays: arrays with the same leading (batch) dimension N.
      buckets: allowed sizes; default: powers of two.

    Returns:
      `(padded_arrays, mask)`: the arrays padded to the bucket size along axis
      0, and a float32 `(bucket,)` mask, 1 for real rows and 0 for padding.

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> (x, y), mask = fl.train.pad_batch(jnp.ones((5, 3)), jnp.ones((5, 1)))
      >>> x.shape, y.shape, mask.tolist()
      ((8, 3), (8, 1), [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    """
    if not arrays:
        raise TypeError("pad_batch: give at least one array.")
    sizes = []
    for i, a in enumerate(arrays):
        if not hasattr(a, "shape") or len(a.shape) == 0:
            raise ValueError(
                f"pad_batch: argument {i} must be an array with a batch dimension; "
                f"got {type(a).__name__} of shape {getattr(a, 'shape', None)}."
            )
        sizes.append(a.shape[0])
    if len(set(sizes)) != 1:
        raise ValueError(
            f"pad_batch: every array must have the same batch size; got {sizes}."
        )
    n = sizes[0]
    if n == 0:
        raise ValueError("pad_batch: the batch is empty (0 rows); nothing to pad.")
    size = _bucket_size(n, buckets, "pad_batch")
    # Pad on the host: `jnp.pad` would compile one small program per input
    # size, which is the very cost that buckets exist to avoid.
    padded = tuple(
        jnp.asarray(np.pad(np.asarray(a), [(0, size - n)] + [(0, 0)] * (a.ndim - 1)))
        for a in arrays
    )
    mask = jnp.asarray((np.arange(size) < n).astype(np.float32))
    return padded, mask
