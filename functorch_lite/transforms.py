"""`torch.func`-style transforms over pytrees, backed by JAX.

The names and signatures follow `torch.func`, so that a functorch program reads
the same here; each function is a thin wrapper over its JAX twin that checks
its arguments at the boundary and says what went wrong.

| here             | torch.func                | JAX                        |
|------------------|---------------------------|----------------------------|
| `grad`           | `grad`                    | `jax.grad`                 |
| `grad_and_value` | `grad_and_value`          | `jax.value_and_grad`       |
| `vjp`            | `vjp`                     | `jax.vjp`                  |
| `jvp`            | `jvp`                     | `jax.jvp`                  |
| `jacrev`         | `jacrev`                  | `jax.jacrev`               |
| `jacfwd`         | `jacfwd`                  | `jax.jacfwd`               |
| `hessian`        | `hessian`                 | `jax.hessian`              |
| `vmap`           | `vmap`                    | `jax.vmap`                 |
| `functional_call`| `functional_call`         | `model.apply(params, ...)` |
| `stack_params`   | `stack_module_state`      | `jax.tree.map(jnp.stack)`  |

Differences from `torch.func`:

* Inputs and outputs are JAX arrays and pytrees of them (nested dicts, lists,
  tuples), not tensors. Everything composes with `jax.jit` and with each other.
* `grad_and_value` returns `(grads, value)`, torch's order, which is the
  reverse of `jax.value_and_grad`'s `(value, grads)`. With `has_aux=True` it
  returns `(grads, (value, aux))`, where JAX returns `((value, aux), grads)`.
* `vmap` takes no `randomness` argument (JAX randomness is explicit: map over
  keys) and no `chunk_size` (for bounded memory, use
  `jax.lax.map(f, xs, batch_size=...)`). As in torch and unlike `jax.vmap`,
  keyword arguments are passed through unmapped.
* `jacrev` takes no `chunk_size`: XLA computes all the VJPs in one batched
  call. `jacfwd` takes no `randomness`.
* `jvp` takes no `strict`.
* `functional_call(model, params, *args, **kwargs)` takes the model's
  arguments directly, not as an `args` tuple and a `kwargs` dict; `model` is
  anything with `.apply(params, *args)` (such as `fl.models.DynamicNet`) or a
  plain function `f(params, *args)`. `params` is one tree: there is no list of
  dicts to merge, and no `tie_weights` or `strict`.
* `stack_params(params_list)` takes params trees, not modules, and returns one
  stacked tree (there are no buffers), ready for `vmap(..., in_dims=(0, ...))`.

Forward mode (`jvp`, `jacfwd`) does not go through `jax.custom_vjp`
functions, such as `DynamicNet`'s static path with its default
`static_method="bounded"`; those raise `TypeError` saying so. Build the net
with `static_method="scan"`, or use `mode="dynamic"`, or use `jacrev`.
`hessian` does work there: it is forward-over-reverse, and the forward pass
then differentiates the custom reverse rule, which is ordinary JAX code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from functorch_lite._checks import check_bool
from functorch_lite._trees import leaf_pairs, structure_diff

__all__ = [
    "functional_call",
    "grad",
    "grad_and_value",
    "hessian",
    "jacfwd",
    "jacrev",
    "jvp",
    "stack_params",
    "vjp",
    "vmap",
]

Argnums = int | tuple[int, ...]

_FORWARD_MODE_FIX = (
    "Forward mode cannot differentiate a `jax.custom_vjp` function, such as "
    "the static loops of `fl.while_loop` and of `fl.repeat` (and DynamicNet) with "
    'static_method="bounded", and the static mode of `fl.nn.lstm` and `fl.nn.rnn`. '
    'For `repeat` or DynamicNet pass static_method="scan"; or use mode="dynamic"; '
    "or use reverse mode (`jacrev`, or `jax.hessian` for forward-over-reverse)."
)


# ---------------------------------------------------------------- validation


def _check_callable(func: Any, *, where: str, name: str = "func") -> None:
    if not callable(func):
        raise TypeError(f"{where}: `{name}` must be callable; got {func!r}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_argnums(argnums: Any, *, where: str) -> Argnums:
    """Return `argnums` as an int or a tuple of ints, or raise."""
    if _is_int(argnums):
        return argnums
    if (
        isinstance(argnums, tuple | list)
        and argnums
        and all(_is_int(a) for a in argnums)
    ):
        if len(set(argnums)) != len(argnums):
            raise ValueError(
                f"{where}: `argnums` must not repeat an argument; got {argnums!r}."
            )
        return tuple(argnums)
    raise TypeError(
        f"{where}: `argnums` must be an int or a non-empty tuple of ints; got "
        f"{argnums!r}."
    )


def _check_argnums_in_range(argnums: Argnums, n_args: int, *, where: str) -> None:
    for a in (argnums,) if isinstance(argnums, int) else argnums:
        if not -n_args <= a < n_args:
            raise ValueError(
                f"{where}: `argnums` {argnums!r} refers to positional argument {a}, "
                f"but the function was called with {n_args} positional "
                f"argument{'s' if n_args != 1 else ''}. Pass the argument to "
                "differentiate by position, not by keyword."
            )


def _normalize_argnums(argnums: Argnums, n_args: int, *, where: str) -> Argnums:
    """Return `argnums` with negative indices resolved against `n_args`, or raise.

    `(1, -1)` names positional argument 1 twice when there are two: JAX would
    then silently pass `None` for one of them.
    """
    _check_argnums_in_range(argnums, n_args, where=where)
    if isinstance(argnums, int):
        return argnums % n_args
    normalized = tuple(a % n_args for a in argnums)
    if len(set(normalized)) != len(normalized):
        raise ValueError(
            f"{where}: `argnums` must not repeat an argument; got {argnums!r}, "
            f"which with {n_args} positional argument{'s' if n_args != 1 else ''} "
            f"refers to positional arguments {normalized!r}."
        )
    return normalized


def _describe(value: Any) -> str:
    """Say what `value` is, for a message: an array's shape and dtype, or a type."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, tuple | list):
        n = len(value)
        return f"a {type(value).__name__} of {n} item{'s' if n != 1 else ''}"
    return type(value).__name__


def _dtype_of(value: Any) -> Any:
    """Return the dtype JAX gives `value`, or None if it is not array-like.

    Only arrays and Python numbers: `jnp.result_type` would also read a str
    or a type as a dtype name.
    """
    if not (
        isinstance(value, bool | int | float | complex)
        or (hasattr(value, "shape") and hasattr(value, "dtype"))
    ):
        return None
    try:
        return jnp.result_type(value)
    except (TypeError, ValueError):
        return None


def _check_differentiable_inputs(
    args: tuple, argnums: Argnums, *, where: str, complex_ok: bool
) -> None:
    """Raise unless every leaf of `args[argnums]` has a differentiable dtype."""
    expected = "a floating or complex dtype" if complex_ok else "a real floating dtype"
    for i in (argnums,) if isinstance(argnums, int) else argnums:
        for path, leaf in jax.tree_util.tree_flatten_with_path(args[i])[0]:
            at = jax.tree_util.keystr(path)
            dtype = _dtype_of(leaf)
            if dtype is None:
                raise TypeError(
                    f"{where}: positional argument {i}{at}, differentiated as "
                    f"`argnums` asks, must be an array of {expected}; got "
                    f"{type(leaf).__name__}."
                )
            if not (
                jnp.issubdtype(dtype, jnp.floating)
                or (complex_ok and jnp.issubdtype(dtype, jnp.complexfloating))
            ):
                raise TypeError(
                    f"{where}: positional argument {i}{at}, differentiated as "
                    f"`argnums` asks, must have {expected}; got {dtype}. Convert it "
                    "(for example `x.astype(jnp.float32)`) or leave it out of "
                    "`argnums`."
                )


def _checked_output(
    func: Callable, *, where: str, has_aux: bool, scalar: bool
) -> Callable:
    """Wrap `func` to check, while JAX traces it, what it returns.

    Shapes and dtypes are static during tracing, so this raises before JAX
    does, with a message that names the transform.
    """
    if not (has_aux or scalar):
        return func

    @_wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        out = func(*args, **kwargs)
        value = out
        if has_aux:
            if not (isinstance(out, tuple | list) and len(out) == 2):
                raise TypeError(
                    f"{where}: with `has_aux=True`, `func` must return a pair "
                    f"(output, aux); got {_describe(out)}."
                )
            value = out[0]
        if scalar:
            _check_scalar_output(value, where=where)
        return out

    return checked


def _check_scalar_output(value: Any, *, where: str) -> None:
    dtype = _dtype_of(value)
    if dtype is None:
        raise TypeError(
            f"{where}: `func` must return a scalar array; got {_describe(value)}."
        )
    shape = jnp.shape(value)
    if shape != ():
        raise TypeError(
            f"{where}: `func` must return a scalar (shape ()); got shape {shape}. "
            "Reduce it first (for example with `jnp.sum`), or use `jacrev` for "
            "the Jacobian of a non-scalar output."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{where}: `func` must return a real floating-point scalar; got dtype "
            f"{dtype}."
        )


def _check_tangent_tree(
    got: Any, want: Any, *, where: str, got_name: str, want_name: str
) -> None:
    """Raise unless `got` matches `want` in structure, shapes and dtypes.

    `want` holds arrays or `jax.ShapeDtypeStruct`s; a leaf of an inexact dtype
    needs that dtype, an integer or bool one needs `float0` in `jvp` (only
    its shape is checked in `vjp`, which accepts any float there).
    """
    diff = structure_diff(got, want)
    if diff is not None:
        raise TypeError(
            f"{where}: `{got_name}` must have the tree structure of "
            f"{want_name};\n{diff}"
        )
    for path, got_leaf, want_leaf in leaf_pairs(got, want):
        want_dtype = jnp.result_type(want_leaf)
        got_dtype = _dtype_of(got_leaf)
        if got_dtype is None:
            raise TypeError(
                f"{where}: `{got_name}`{path} must be an array; got "
                f"{type(got_leaf).__name__}."
            )
        got_shape, want_shape = jnp.shape(got_leaf), jnp.shape(want_leaf)
        if got_shape != want_shape:
            raise ValueError(
                f"{where}: `{got_name}`{path} must have the shape of "
                f"{want_name}{path}, {want_shape}; got shape {got_shape}."
            )
        if jnp.issubdtype(want_dtype, jnp.inexact):
            need = want_dtype
        elif where == "jvp":
            need = jax.dtypes.float0
        else:
            continue
        if got_dtype != need:
            if need == jax.dtypes.float0:
                need = "float0 (`jax.dtypes.float0`)"
            raise TypeError(
                f"{where}: `{got_name}`{path} must have dtype {need}, as "
                f"{want_name}{path} has dtype {want_dtype}; got dtype {got_dtype}."
            )


def _wraps(func: Callable) -> Callable[[Callable], Callable]:
    # Keep `func`'s name, doc and signature (so `jax.jit(static_argnames=...)`
    # resolves names), but not its `__dict__`: `fl.jit` objects carry stats.
    return functools.wraps(func, updated=())


def _differentiated(
    make: Callable[[Argnums], Callable],
    func: Callable,
    argnums: Argnums,
    *,
    where: str,
    forward_mode: bool = False,
    complex_ok: bool = True,
) -> Callable:
    """Wrap a JAX derivative of `func` with argument checks and error hints.

    `make(argnums)` builds the JAX transform; it runs at call time, once the
    number of positional arguments resolves negative `argnums`. `complex_ok`
    is False where JAX's forward mode needs real inputs (`jacfwd`, `hessian`).
    """
    built: dict[Argnums, Callable] = {}

    @_wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nums = _normalize_argnums(argnums, len(args), where=where)
        _check_differentiable_inputs(args, nums, where=where, complex_ok=complex_ok)
        if nums not in built:
            built[nums] = make(nums)
        transformed = built[nums]
        if not forward_mode:
            return transformed(*args, **kwargs)
        return _forward_mode_call(transformed, args, kwargs, where=where)

    return wrapper


def _forward_mode_call(fn: Callable, args: tuple, kwargs: dict, *, where: str) -> Any:
    try:
        return fn(*args, **kwargs)
    except TypeError as err:
        if "custom_vjp" in str(err):
            raise TypeError(f"{where}: {_FORWARD_MODE_FIX} ({err})") from err
        raise


# -------------------------------------------------------------- reverse mode


def grad(
    func: Callable[..., Any], argnums: Argnums = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """Return a function that computes the gradient of scalar `func`.

    Args:
      func: `func(*args, **kwargs)` returning a scalar (or `(scalar, aux)`
        with `has_aux=True`). Keyword arguments are not differentiated.
      argnums: the positional argument(s) to differentiate, each a pytree of
        float arrays.
      has_aux: `func` returns `(output, aux)`; the result is then
        `(grads, aux)`.

    Returns:
      `grads` (or `(grads, aux)`), with the structure of `args[argnums]`, a
      tuple of such trees if `argnums` is a tuple.

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> fl.transforms.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      {'w': Array([2., 4.], dtype=float32)}
    """
    where = "grad"
    _check_callable(func, where=where)
    argnums = _check_argnums(argnums, where=where)
    check_bool(has_aux, where=where, name="has_aux")
    checked = _checked_output(func, where=where, has_aux=has_aux, scalar=True)
    return _differentiated(
        lambda nums: jax.grad(checked, argnums=nums, has_aux=has_aux),
        func,
        argnums,
        where=where,
    )


def grad_and_value(
    func: Callable[..., Any], argnums: Argnums = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """Return a function that computes `(grads, value)` of scalar `func`.

    The order is torch's: `(grads, value)`, the reverse of
    `jax.value_and_grad`'s `(value, grads)`. With `has_aux=True` the result is
    `(grads, (value, aux))`, where `jax.value_and_grad` gives
    `((value, aux), grads)`.

    Args:
      func: `func(*args, **kwargs)` returning a scalar (or `(scalar, aux)`).
      argnums: the positional argument(s) to differentiate.
      has_aux: `func` returns `(output, aux)`.

    Returns:
      A function returning `(grads, value)` or `(grads, (value, aux))`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> g, value = fl.transforms.grad_and_value(lambda x: jnp.sum(x**2))(
      ...     jnp.array([1.0, 3.0]))
      >>> g, value
      (Array([2., 6.], dtype=float32), Array(10., dtype=float32))
    """
    where = "grad_and_value"
    _check_callable(func, where=where)
    argnums = _check_argnums(argnums, where=where)
    check_bool(has_aux, where=where, name="has_aux")
    checked = _checked_output(func, where=where, has_aux=has_aux, scalar=True)
    value_and_grad = _differentiated(
        lambda nums: jax.value_and_grad(checked, argnums=nums, has_aux=has_aux),
        func,
        argnums,
        where=where,
    )

    @_wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        value, grads = value_and_grad(*args, **kwargs)
        return grads, value

    return wrapper


def vjp(
    func: Callable[..., Any], *primals: Any, has_aux: bool = False
) -> tuple[Any, ...]:
    """Evaluate `func(*primals)` and return it with its vector-Jacobian product.

    Args:
      func: a function of the positional `primals`.
      *primals: pytrees of float arrays, at least one.
      has_aux: `func` returns `(output, aux)`.

    Returns:
      `(output, vjp_fn)` or, with `has_aux`, `(output, vjp_fn, aux)`.
      `vjp_fn(cotangents)` takes a tree shaped like `output` and returns a
      tuple with one gradient tree per primal.

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> out, vjp_fn = fl.transforms.vjp(lambda x: x**2, jnp.array([1.0, 2.0]))
      >>> vjp_fn(jnp.ones(2))
      (Array([2., 4.], dtype=float32),)
    """
    where = "vjp"
    _check_callable(func, where=where)
    check_bool(has_aux, where=where, name="has_aux")
    if not primals:
        raise TypeError(
            f"{where}: pass at least one primal after `func`, as in "
            "`vjp(func, x)`; got none."
        )
    checked = _checked_output(func, where=where, has_aux=has_aux, scalar=False)
    output, vjp_fn, *aux = jax.vjp(checked, *primals, has_aux=has_aux)
    spec = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf)),
        output,
    )
    # A `Partial`, as JAX's own `vjp_fn` is a pytree: it can leave a `jax.jit`.
    checked_vjp_fn = jax.tree_util.Partial(
        functools.partial(_call_vjp_fn, spec=spec), vjp_fn
    )
    return (output, checked_vjp_fn, *aux)


def _call_vjp_fn(vjp_fn: Callable, *cotangents: Any, spec: Any) -> tuple[Any, ...]:
    """Check the cotangents against `func`'s output, then run JAX's `vjp_fn`."""
    where = "vjp"
    if len(cotangents) != 1:
        raise TypeError(
            f"{where}: `vjp_fn` takes one argument, the cotangents (a tree shaped "
            f"like the output of `func`); got {len(cotangents)}."
        )
    _check_tangent_tree(
        cotangents[0],
        spec,
        where=where,
        got_name="cotangents",
        want_name="the output of `func`",
    )
    return vjp_fn(cotangents[0])


# -------------------------------------------------------------- forward mode


def jvp(
    func: Callable[..., Any],
    primals: tuple | list,
    tangents: tuple | list,
    *,
    has_aux: bool = False,
) -> tuple[Any, ...]:
    """Evaluate `func(*primals)` and its Jacobian-vector product with `tangents`.

    Args:
      func: a function of the positional `primals`.
      primals: a tuple of pytrees of float arrays, the point.
      tangents: a tuple of the same length and structure, the direction.
      has_aux: `func` returns `(output, aux)`.

    Returns:
      `(output, jvp_out)` or, with `has_aux`, `(output, jvp_out, aux)`.

    Raises:
      TypeError: if `func` contains a `jax.custom_vjp` function (see the
        module docstring).

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> fl.transforms.jvp(lambda x: x**2, (jnp.array([1.0, 2.0]),),
      ...                   (jnp.array([1.0, 0.0]),))
      (Array([1., 4.], dtype=float32), Array([2., 0.], dtype=float32))
    """
    where = "jvp"
    _check_callable(func, where=where)
    check_bool(has_aux, where=where, name="has_aux")
    for name, value in (("primals", primals), ("tangents", tangents)):
        if not isinstance(value, tuple | list):
            raise TypeError(
                f"{where}: `{name}` must be a tuple with one entry per argument of "
                f"`func`, as in `jvp(f, (x,), (v,))`; got {type(value).__name__}."
            )
    if len(primals) != len(tangents):
        raise ValueError(
            f"{where}: `primals` and `tangents` must have the same length; got "
            f"{len(primals)} and {len(tangents)}."
        )
    for i, (primal, tangent) in enumerate(zip(primals, tangents, strict=True)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(primal)[0]:
            if _dtype_of(leaf) is None:
                raise TypeError(
                    f"{where}: `primals[{i}]`{jax.tree_util.keystr(path)} must be "
                    f"an array; got {type(leaf).__name__}."
                )
        _check_tangent_tree(
            tangent,
            primal,
            where=where,
            got_name=f"tangents[{i}]",
            want_name=f"`primals[{i}]`",
        )
    checked = _checked_output(func, where=where, has_aux=has_aux, scalar=False)
    return _forward_mode_call(
        jax.jvp,
        (checked, tuple(primals), tuple(tangents)),
        {"has_aux": has_aux},
        where=where,
    )


# ----------------------------------------------------------------- Jacobians


def jacrev(
    func: Callable[..., Any], argnums: Argnums = 0, *, has_aux: bool = False
) -> Callable[..., Any]:
    """Return a function that computes the Jacobian of `func` by reverse mode.

    Args:
      func: a function of pytrees of float arrays.
      argnums: the positional argument(s) to differentiate.
      has_aux: `func` returns `(output, aux)`; the result is `(jac, aux)`.

    Returns:
      A function returning the Jacobian: the structure of the output, each
      leaf a tree shaped like `args[argnums]` whose leaves have shape
      `out_leaf.shape + in_leaf.shape` (a tuple over `argnums` if it is one).

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> fl.transforms.jacrev(lambda x: x**2)(jnp.array([1.0, 2.0]))
      Array([[2., 0.],
             [0., 4.]], dtype=float32)
    """
    where = "jacrev"
    _check_callable(func, where=where)
    argnums = _check_argnums(argnums, where=where)
    check_bool(has_aux, where=where, name="has_aux")
    checked = _checked_output(func, where=where, has_aux=has_aux, scalar=False)
    return _differentiated(
        lambda nums: jax.jacrev(checked, argnums=nums, has_aux=has_aux),
        func,
        argnums,
        where=where,
    )


def jacfwd(
    func: Callable[..., Any], argnums: Argnums = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """Return a function that computes the Jacobian of `func` by forward mode.

    Same result as `jacrev`; cheaper when there are fewer inputs than outputs.

    Args:
      func: a function of pytrees of float arrays, without `jax.custom_vjp`
        inside (see the module docstring).
      argnums: the positional argument(s) to differentiate.
      has_aux: `func` returns `(output, aux)`; the result is `(jac, aux)`.

    Returns:
      A function returning the Jacobian, laid out as `jacrev`'s.

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> fl.transforms.jacfwd(lambda x: x**2)(jnp.array([1.0, 2.0]))
      Array([[2., 0.],
             [0., 4.]], dtype=float32)
    """
    where = "jacfwd"
    _check_callable(func, where=where)
    argnums = _check_argnums(argnums, where=where)
    check_bool(has_aux, where=where, name="has_aux")
    checked = _checked_output(func, where=where, has_aux=has_aux, scalar=False)
    return _differentiated(
        lambda nums: jax.jacfwd(checked, argnums=nums, has_aux=has_aux),
        func,
        argnums,
        where=where,
        forward_mode=True,
        complex_ok=False,
    )


def hessian(func: Callable[..., Any], argnums: Argnums = 0) -> Callable[..., Any]:
    """Return a function that computes the Hessian of scalar `func`.

    Computed as `jacfwd(jacrev(func))`, as in torch and JAX. This goes
    through `DynamicNet`'s `"bounded"` static loop too: forward mode then
    differentiates its reverse rule, not the `jax.custom_vjp` function itself.

    Args:
      func: a function returning a scalar.
      argnums: the positional argument(s) to differentiate.

    Returns:
      A function returning the Hessian; for one array input `x`, of shape
      `x.shape + x.shape`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> fl.transforms.hessian(lambda x: jnp.sum(x**3))(jnp.array([1.0, 2.0]))
      Array([[ 6.,  0.],
             [ 0., 12.]], dtype=float32)
    """
    where = "hessian"
    _check_callable(func, where=where)
    argnums = _check_argnums(argnums, where=where)
    return _differentiated(
        lambda nums: jax.hessian(func, argnums=nums),
        func,
        argnums,
        where=where,
        complex_ok=False,
    )


# ---------------------------------------------------------------------- vmap


def _is_dims_leaf(value: Any) -> bool:
    return value is None


def _check_dims(dims: Any, *, where: str, name: str) -> None:
    leaves = jax.tree.leaves(dims, is_leaf=_is_dims_leaf)
    bad = [leaf for leaf in leaves if leaf is not None and not _is_int(leaf)]
    if bad:
        raise TypeError(
            f"{where}: `{name}` must be an int, None, or a tuple (or pytree) of "
            f"ints and Nones; got {dims!r}, which holds {bad[0]!r}."
        )


def _dims_with_leaves(
    dims: Any, tree: Any, *, where: str, name: str, what: str
) -> list[tuple[str, Any, Any]]:
    """Broadcast the prefix `dims` over `tree`: `(path, dim, leaf)` per leaf."""
    found: list[tuple[str, Any, Any]] = []

    def visit(path: Any, dim: Any, subtree: Any) -> None:
        for sub_path, leaf in jax.tree_util.tree_flatten_with_path(subtree)[0]:
            found.append((jax.tree_util.keystr((*path, *sub_path)), dim, leaf))

    try:
        jax.tree_util.tree_map_with_path(visit, dims, tree, is_leaf=_is_dims_leaf)
    except ValueError as err:
        raise ValueError(
            f"{where}: `{name}` must be a pytree prefix of {what}; got {dims!r} "
            f"for {what} of structure {jax.tree.structure(tree)}."
        ) from err
    return found


def _check_mapped_sizes(args: tuple, in_dims: Any, *, where: str) -> None:
    """Raise unless every mapped axis exists and all have one size."""
    per_arg = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
    sizes = []
    for i, (dims, arg) in enumerate(zip(per_arg, args, strict=True)):
        name = f"in_dims[{i}]" if isinstance(in_dims, tuple) else "in_dims"
        what = f"positional argument {i}"
        for path, dim, leaf in _dims_with_leaves(
            dims, arg, where=where, name=name, what=what
        ):
            if dim is None:
                continue
            if _dtype_of(leaf) is None:
                raise TypeError(
                    f"{where}: `{name}` maps {what}{path}, which must then be an "
                    f"array; got {type(leaf).__name__}."
                )
            shape = jnp.shape(leaf)
            if not -len(shape) <= dim < len(shape):
                raise ValueError(
                    f"{where}: `{name}` maps axis {dim} of {what}{path}, which has "
                    f"shape {shape} (rank {len(shape)}); the mapped axis must be "
                    f"in [{-len(shape)}, {len(shape) - 1}], or None to not map it."
                )
            sizes.append((f"argument {i}{path} axis {dim}", shape[dim]))
    if not sizes:
        raise ValueError(
            f"{where}: `in_dims` {in_dims!r} maps no array of the {len(args)} "
            f"positional argument{'s' if len(args) != 1 else ''}; map at least one "
            "array."
        )
    if len({size for _, size in sizes}) > 1:
        listed = ", ".join(f"{at}: size {size}" for at, size in sizes)
        raise ValueError(
            f"{where}: every mapped axis must have the same size (the batch size); "
            f"got {listed}."
        )


def _check_out_dims(out: Any, out_dims: Any, *, where: str) -> None:
    """Raise unless `out_dims` fits `func`'s per-example output (while tracing)."""
    what = "the output of `func`"
    for path, dim, leaf in _dims_with_leaves(
        out_dims, out, where=where, name="out_dims", what=what
    ):
        if dim is None or _dtype_of(leaf) is None:
            continue
        rank = len(jnp.shape(leaf))
        if not -(rank + 1) <= dim <= rank:
            raise ValueError(
                f"{where}: `out_dims` puts the mapped axis at {dim} in "
                f"{what}{path}, which has rank {rank} per example ({rank + 1} "
                f"with the mapped axis); it must be in [{-(rank + 1)}, {rank}]."
            )


def vmap(
    func: Callable[..., Any],
    in_dims: Any = 0,
    out_dims: Any = 0,
) -> Callable[..., Any]:
    """Vectorize `func` over an axis of its positional arguments.

    Args:
      func: a function of pytrees of arrays.
      in_dims: the mapped axis of each positional argument: an int (every
        argument), `None` (not mapped), or a tuple with one entry per
        positional argument, each an int, `None` or a pytree prefix of them.
        Keyword arguments are passed through unmapped, as in torch.
      out_dims: where the mapped axis goes in each output: an int, `None` or
        a pytree prefix of the output.

    Returns:
      The vectorized function.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> net = fl.models.DynamicNet(3, 4, 2)
      >>> params = net.init(jax.random.key(0))
      >>> def loss(params, x, y):
      ...     return fl.nn.mse_loss(net.apply(params, x, 2), y)
      >>> per_example = fl.transforms.vmap(
      ...     fl.transforms.grad(loss), in_dims=(None, 0, 0))
      >>> grads = per_example(params, jnp.ones((5, 3)), jnp.zeros((5, 2)))
      >>> grads["middle_linear"]["weight"].shape
      (5, 4, 4)
    """
    where = "vmap"
    _check_callable(func, where=where)
    if isinstance(in_dims, list):
        in_dims = tuple(in_dims)
    if not (in_dims is None or _is_int(in_dims) or isinstance(in_dims, tuple)):
        raise TypeError(
            f"{where}: `in_dims` must be an int, None, or a tuple with one entry "
            f"per positional argument; got {in_dims!r}."
        )
    _check_dims(in_dims, where=where, name="in_dims")
    _check_dims(out_dims, where=where, name="out_dims")

    @_wraps(func)
    def mapped(*args: Any, **kwargs: Any) -> Any:
        if isinstance(in_dims, tuple) and len(in_dims) != len(args):
            raise ValueError(
                f"{where}: `in_dims` has {len(in_dims)} entries, one per positional "
                f"argument, but the function was called with {len(args)} positional "
                f"argument{'s' if len(args) != 1 else ''}."
            )
        if in_dims is None or (
            isinstance(in_dims, tuple)
            and all(d is None for d in jax.tree.leaves(in_dims, is_leaf=_is_dims_leaf))
        ):
            raise ValueError(
                f"{where}: `in_dims` maps no argument ({in_dims!r}); map at least "
                "one, for example `in_dims=(None, 0)`."
            )
        _check_mapped_sizes(args, in_dims, where=where)
        # Close over keyword arguments: torch leaves them unmapped, while
        # `jax.vmap` would map them over axis 0.
        f = functools.partial(func, **kwargs) if kwargs else func

        def checked(*args: Any) -> Any:
            out = f(*args)
            _check_out_dims(out, out_dims, where=where)
            return out

        return jax.vmap(checked, in_axes=in_dims, out_axes=out_dims)(*args)

    return mapped


# ------------------------------------------------------------ params helpers


def functional_call(model: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `model` with `params`: `model.apply(params, *args, **kwargs)`.

    Args:
      model: anything with `.apply(params, *args)` (`fl.models.DynamicNet`,
        an `fl.nn.Layer`), or a plain function `f(params, *args)`.
      params: the parameter pytree.
      *args: the model's positional arguments, such as `x` and `depth`.
      **kwargs: the model's keyword arguments, such as `mode`.

    Returns:
      The model's output.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> net = fl.models.DynamicNet(3, 4, 2)
      >>> params = net.init(jax.random.key(0))
      >>> fl.transforms.functional_call(net, params, jnp.ones((5, 3)), 1).shape
      (5, 2)
    """
    if any(
        c.__module__.startswith("torch.nn") and c.__name__ == "Module"
        for c in type(model).__mro__
    ):
        raise TypeError(
            f"functional_call: `model` is a torch module ({type(model).__name__}), "
            "which runs in PyTorch, not JAX. Convert it first: `params, apply = "
            "fl.interop.from_torch_module(module)`, then `apply(params, *inputs)` "
            "(or `functional_call(apply, params, *inputs)`)."
        )
    apply = getattr(model, "apply", None)
    if callable(apply):
        return apply(params, *args, **kwargs)
    if callable(model):
        return model(params, *args, **kwargs)
    raise TypeError(
        "functional_call: `model` must have an `apply(params, *args)` method (such "
        "as `fl.models.DynamicNet`) or be a function `f(params, *args)`; got "
        f"{model!r}."
    )


def stack_params(params_list: Sequence[Any]) -> Any:
    """Stack a list of params trees leaf by leaf along a new axis 0.

    The result maps with `vmap(..., in_dims=(0, ...))`: an ensemble of models
    evaluated (and trained) as one.

    Args:
      params_list: a non-empty list of pytrees with one structure, and leaves of
        one shape and dtype at each position.

    Returns:
      A tree of that structure whose leaves have shape
      `(len(params_list), *leaf.shape)`.

    Examples:
      >>> import jax
      >>> import functorch_lite as fl
      >>> net = fl.models.DynamicNet(3, 4, 2)
      >>> keys = jax.random.split(jax.random.key(0), 8)
      >>> stacked = fl.transforms.stack_params([net.init(k) for k in keys])
      >>> stacked["input_linear"]["weight"].shape
      (8, 3, 4)
    """
    where = "stack_params"
    if not isinstance(params_list, Sequence) or isinstance(params_list, str | bytes):
        raise TypeError(
            f"{where}: `params_list` must be a list of params trees; got "
            f"{type(params_list).__name__}."
        )
    if not params_list:
        raise ValueError(
            f"{where}: `params_list` must not be empty; got {params_list!r}."
        )
    first_leaves, first_def = jax.tree_util.tree_flatten_with_path(params_list[0])
    for i, params in enumerate(params_list[1:], start=1):
        treedef = jax.tree.structure(params)
        if treedef != first_def:
            raise TypeError(
                f"{where}: every tree in `params_list` must have the structure of "
                f"`params_list[0]`; `params_list[{i}]` differs.\n"
                f"  params_list[0]: {first_def}\n  params_list[{i}]: {treedef}"
            )
        for (path, a), b in zip(first_leaves, jax.tree.leaves(params), strict=True):
            want = (jnp.shape(a), jnp.result_type(a))
            got = (jnp.shape(b), jnp.result_type(b))
            if want != got:
                raise ValueError(
                    f"{where}: leaf {jax.tree_util.keystr(path)} of "
                    f"`params_list[{i}]` has shape {got[0]} and dtype {got[1]}; "
                    f"`params_list[0]` has shape {want[0]} and dtype {want[1]}."
                )
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *params_list)
