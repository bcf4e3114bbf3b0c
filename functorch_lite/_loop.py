"""The bounded-loop core behind `repeat`, `while_loop` and per-example depth.

One private primitive, `bounded_while(cond, body, carry, max_steps, checkpoints)`:
`while i < max_steps and cond(i, carry): carry = body(i, carry); i += 1`, returning
the final carry and the number of steps run. It is reverse-mode differentiable,
and its gradient is that of the unrolled loop that ran exactly as many steps as
the forward pass did.

How the reverse pass works (`jax.custom_vjp`):

* When every step's residuals fit in `_DIRECT_BYTES` (`checkpoints=None`),
  the forward pass stores them. It traces one step and its pullback
  (`jax.vjp`) once, and closure-converts the pullback with `jax.make_jaxpr`
  (as `jax.closure_convert` does): the values it closes over are the step's
  residuals (the carry a matmul needs, an activation's mask or slope), and
  the converted pullback takes them as arguments. The forward loop writes
  each residual into a `(max_steps, ...)` buffer, except those that are the
  step's own inputs (the body's closed-over weights, the step's slice of the
  per-step inputs), which the backward pass reads where they already are,
  and those that depend on no per-step value (found from the traced step's
  jaxpr), which are kept once; the budget counts everything kept. The
  backward pass walks the steps in reverse and calls the converted pullback
  on each step's residuals. Both come from the one trace, so they always
  agree. No forward step is recomputed: on DynamicNet that recomputation was
  most of what the static path cost over the specialized programs
  (bench/RESULTS.md).
* Otherwise the forward pass stores carries, not the body's internals. The
  backward pass walks the steps in reverse; at each step it calls `jax.vjp`
  on the body at the stored carry (one recomputed body forward per step) and
  pulls the cotangent back.
* Either way, parameters that the body closes over are made explicit inputs
  (`_hoist`), and their cotangents are summed over the steps (weight
  sharing). Non-float carry leaves (counters, masks) ride along: they are
  stored and replayed, but carry no cotangent.
* `checkpoints=None` with residuals over the budget: every carry is stored.
  When `max_steps` carries fit in `_DIRECT_BYTES`, the forward pass writes
  them into one `(max_steps, ...)` buffer. Past that, allocating and filling
  that buffer would cost time in `max_steps` on every call, so the forward
  pass stores nothing and the backward pass first replays the forward into
  the smallest of a few buffer sizes (powers of 4) that holds the steps
  actually run: time grows with the steps run, memory stays bounded by
  `max_steps`.
* `checkpoints=k`: segments. With `S = ceil(max_steps / k)`, the forward pass
  keeps the carry at every `S`-th step (at most `k` of them); the backward pass
  replays one segment at a time into an `S`-step buffer and pulls back through
  it. Memory: `k + S` carries, `O(k + max_steps / k)`; one extra forward pass.
  The per-step computations are the same as with `checkpoints=None`, so the
  gradients are the same.

Higher order: the forward and backward rules are themselves loops, run by
`_while_any_mode`: a `lax.while_loop` whose own derivative rule (`custom_jvp`)
is that of an equivalent `lax.scan` over the bound. So `grad(grad(f))`, a
Hessian-vector product by double reverse, MAML-style gradients through an inner
training step, and forward-over-reverse (`jax.hessian`) all work, also under
`vmap` with a count per row (`_while_as_scan` says how); only pure forward mode
(`jax.jvp` of the loop itself) does not (`jax.custom_vjp`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
from jax import lax

__all__ = ["bounded_while"]

# Store every carry up front while max_steps of them take at most this much;
# past it, store the first carries within _FIRST_BYTES and replay the rest.
_DIRECT_BYTES = 4 * 2**20
_FIRST_BYTES = 2**20
# Store each step's residuals rather than its carry when all of them fit
# `_DIRECT_BYTES` (tests and benchmarks turn it off to compare).
_STORE_RESIDUALS = True


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _nbytes(x: Any) -> int:
    return math.prod(jnp.shape(x)) * jnp.result_type(x).itemsize


def _buffer(leaf: Any, size: int) -> jax.Array:
    # Entries past the steps run are never read. (`lax.empty` would skip the
    # fill on GPU, but under `vmap` it makes one buffer per example.)
    return jnp.zeros((size, *jnp.shape(leaf)), jnp.result_type(leaf))


def _write(bufs: list, index: jax.Array, leaves: list) -> list:
    return [
        lax.dynamic_update_index_in_dim(b, x, index, 0)
        for b, x in zip(bufs, leaves, strict=True)
    ]


def _lift_pvary(jaxpr: Any, consts: list) -> tuple[Any, list]:
    """Move the body's casts of replicated closed-over values out of the loop.

    Inside `shard_map`, a closed-over weight that does not vary over the mesh
    meets a carry that does, and JAX casts it (`pvary`) in the body. Its
    transpose is a `psum`, which then runs inside the reverse loop, once per
    step: devices that run different step counts wait on each other forever.
    A const whose every use is one such cast is cast once here instead, before
    the loop, and the casts leave the body; its gradient is summed once, after
    the loop. Casts inside nested calls of the body are left where they are.
    """
    var = jax.extend.core.Var
    uses: dict[Any, list] = {v: [] for v in jaxpr.constvars}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if isinstance(v, var) and v in uses:
                uses[v].append(eqn)
    outs = {v for v in jaxpr.outvars if isinstance(v, var)}
    lift: dict[Any, tuple] = {}
    for v, eqns in uses.items():
        axes = {tuple(e.params.get("axes", ())) for e in eqns}
        if (
            eqns
            and v not in outs
            and all(e.primitive.name == "pvary" and len(e.invars) == 1 for e in eqns)
            and len(axes) == 1
        ):
            lift[v] = axes.pop()
    if not lift:
        return jaxpr, consts
    consts = [
        lax.pcast(c, lift[v], to="varying") if v in lift else c
        for v, c in zip(jaxpr.constvars, consts, strict=True)
    ]

    def lifted(e: Any) -> bool:
        return (
            e.primitive.name == "pvary"
            and len(e.invars) == 1
            and isinstance(e.invars[0], var)
            and e.invars[0] in lift
        )

    renamed = {}
    for e in filter(lifted, jaxpr.eqns):
        renamed.update(zip(e.outvars, e.invars, strict=True))

    def sub(xs: list) -> list:
        return [renamed.get(x, x) if isinstance(x, var) else x for x in xs]

    eqns = [e.replace(invars=sub(e.invars)) for e in jaxpr.eqns if not lifted(e)]
    return jaxpr.replace(eqns=eqns, outvars=sub(jaxpr.outvars)), consts


def _hoist(
    fn: Callable, *example: Any, lift_pvary: bool = False
) -> tuple[Callable, list]:
    """Closure-convert `fn`: return `(converted, consts)`, every const hoisted.

    `converted(*args, *consts)` computes `fn(*args)`. Unlike
    `jax.closure_convert`, integer tracers are hoisted too, so that no rule
    below closes over a tracer of an outer transformation. With `lift_pvary`,
    inside `shard_map`, see `_lift_pvary`.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example)
    in_tree = jax.tree.structure(example)
    out_tree = jax.tree.structure(out_shape)
    jaxpr, consts = closed.jaxpr, list(closed.consts)
    if lift_pvary and jax.sharding.get_abstract_mesh().manual_axes:
        jaxpr, consts = _lift_pvary(jaxpr, consts)
    n_consts = len(consts)

    def converted(*args_and_consts: Any) -> Any:
        args, consts = (
            args_and_consts[: -n_consts or None],
            args_and_consts[len(args_and_consts) - n_consts :],
        )
        flat, tree = jax.tree.flatten(tuple(args))
        if tree != in_tree:
            raise TypeError(
                f"internal: loop function called with {tree}, not {in_tree}"
            )
        out = jax.extend.core.jaxpr_as_fun(
            jax.extend.core.ClosedJaxpr(jaxpr, list(consts))
        )(*flat)
        return jax.tree.unflatten(out_tree, out)

    return converted, consts


def _output_buffers(spec: Any, y_avals: tuple) -> tuple:
    """Zeroed `(max_steps, ...)` buffers for the per-step outputs `(float, other)`."""
    return tuple(
        tuple(jnp.zeros((spec.max_steps, *a.shape), a.dtype) for a in part)
        for part in y_avals
    )


def _read(bufs: list, index: jax.Array) -> list:
    return [lax.dynamic_index_in_dim(b, index, 0, keepdims=False) for b in bufs]


# --- a while loop that every mode of autodiff can go through -----------------


def _varying(x: Any) -> frozenset:
    """The `shard_map` mesh axes `x` (a value or an aval) varies over."""
    aval = x if isinstance(x, jax.core.ShapedArray) else jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:  # jax 0.10 keeps it in the aval's manual axis type
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    return frozenset(vma or ())


def _align_carry(body: Callable, init: Any) -> Any:
    """Cast `init` to vary over every mesh axis `body(init)` varies over.

    Inside `shard_map` a loop's carry must keep its type, and a buffer made
    with `jnp.zeros` does not vary over the mesh while what the body writes
    into it may (the batch rows of each device). Outside `shard_map` this is
    one check of the context mesh.
    """
    if not jax.sharding.get_abstract_mesh().manual_axes:
        return init
    leaves, tree = jax.tree.flatten(init)
    for _ in range(len(leaves) + 1):
        outs = jax.make_jaxpr(body)(jax.tree.unflatten(tree, leaves)).out_avals
        missing = [_varying(a) - _varying(x) for x, a in zip(leaves, outs, strict=True)]
        if not any(missing):
            break
        leaves = [
            lax.pcast(x, tuple(sorted(m)), to="varying") if m else x
            for x, m in zip(leaves, missing, strict=True)
        ]
    return jax.tree.unflatten(tree, leaves)


def _while_any_mode(cond: Callable, body: Callable, init: Any, bound: int) -> Any:
    """`lax.while_loop(cond, body, init)` that runs at most `bound` iterations.

    Runs as a `while_loop`; differentiated (either mode, any order) as the
    equivalent `lax.scan` of `bound` iterations with the finished ones skipped.
    Used for the loops inside the custom rules, so that those rules can be
    differentiated again.
    """
    init = _align_carry(body, init)
    body_c, body_k = _hoist(body, init)
    cond_c, cond_k = _hoist(cond, init)
    return _while_jvp(body_c, cond_c, bound, init, tuple(body_k), tuple(cond_k))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _while_jvp(body: Callable, cond: Callable, bound: int, init, body_k, cond_k):
    def c(state: tuple) -> jax.Array:
        i, x = state
        return (i < bound) & cond(x, *cond_k)

    def b(state: tuple) -> tuple:
        i, x = state
        return i + 1, body(x, *body_k)

    return lax.while_loop(c, b, (jnp.int32(0), init))[1]


# `_any_row(flag)`: `flag` itself, except under `vmap`, where it is whether any
# row's flag is set, one value for the whole batch. A primitive so that its
# batching rule can see the batch axis and reduce over it.
_any_row_p = jax.extend.core.Primitive("functorch_lite_any_row")
_any_row_p.def_impl(lambda flag: flag)
_any_row_p.def_abstract_eval(lambda flag: flag)
jax.interpreters.mlir.register_lowering(
    _any_row_p, jax.interpreters.mlir.lower_fun(lambda flag: flag, False)
)


def _any_row_batched(args: tuple, dims: tuple) -> tuple:
    (flag,), (dim,) = args, dims
    if dim is None:
        return _any_row_p.bind(flag), None
    return _any_row_p.bind(jnp.any(flag, axis=dim)), None


jax.interpreters.batching.primitive_batchers[_any_row_p] = _any_row_batched


def _keep_unless(active: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `active`, else `old`, leaf by leaf (`active` is a bool scalar)."""
    return jax.tree.map(lambda a, b: lax.select(active, a, b), new, old)


def _while_as_scan(body: Callable, cond: Callable, bound: int, init, body_k, cond_k):
    """The loop as a `lax.scan` of `bound` steps that skips the finished ones.

    A step runs under `lax.cond` on whether any row is still running, never on a
    batched predicate: `vmap` would turn such a `cond` into a select whose
    operands pass through `stop_gradient`, and when the `cond` is already a JVP
    that puts `stop_gradient` on tangents, which reverse mode cannot transpose
    (grad of grad of a vmapped loop). Within the step, the finished rows keep
    their carry through a select, and their inputs to `body` are cut from
    differentiation, so that whatever `body` computes on them (an `inf`, a
    `nan`) cannot reach a gradient.
    """

    def step(state: tuple, _: None) -> tuple:
        active, x = state
        active = active & cond(x, *cond_k)

        def run(x: Any) -> Any:
            safe = _keep_unless(active, (x, body_k), lax.stop_gradient((x, body_k)))
            return _keep_unless(active, body(safe[0], *safe[1]), x)

        x = lax.cond(_any_row_p.bind(active), run, lambda x_: x_, x)
        return (active, x), None

    (_, out), _ = lax.scan(step, (jnp.bool_(True), init), None, length=bound)
    return out


@_while_jvp.defjvp
def _while_jvp_rule(body, cond, bound, primals, tangents):
    return jax.jvp(
        functools.partial(_while_as_scan, body, cond, bound), primals, tangents
    )


# --- the core ----------------------------------------------------------------


class _Split(NamedTuple):
    """How one pytree splits into float leaves (differentiated) and the rest."""

    treedef: Any
    is_float: tuple[bool, ...]

    @classmethod
    def of(cls, tree: Any) -> _Split:
        leaves, treedef = jax.tree.flatten(tree)
        return cls(treedef, tuple(_is_float(x) for x in leaves))

    def join(self, fl: tuple, nl: tuple) -> Any:
        f, n = iter(fl), iter(nl)
        leaves = [next(f) if isf else next(n) for isf in self.is_float]
        return jax.tree.unflatten(self.treedef, leaves)

    def split(self, tree: Any) -> tuple[tuple, tuple]:
        leaves = jax.tree.leaves(tree)
        fl = tuple(x for x, isf in zip(leaves, self.is_float, strict=True) if isf)
        nl = tuple(x for x, isf in zip(leaves, self.is_float, strict=True) if not isf)
        return fl, nl


class _Spec(NamedTuple):
    """Static description of one loop (hashable: a `custom_vjp` nondiff arg).

    `body(i, carry, x, *consts) -> (carry, y)`: `x` is step `i`'s slice of the
    per-step inputs `xs`, `y` goes to step `i`'s slot of the per-step outputs.
    """

    body: Callable
    cond: Callable  # cond(i, carry, *cond_k) -> bool scalar
    max_steps: int
    checkpoints: int | None
    carry: _Split
    x: _Split
    y: _Split
    body_k_float: tuple[bool, ...]

    def step(self, i: Any, fl: tuple, nl: tuple, x: tuple, body_k: tuple) -> tuple:
        """One step on split values: `((fl, nl), (y float, y other))`.

        `x` is `(float leaves, other leaves)` of step `i`'s inputs (see
        `_x_at`); `body_k` is `(float consts, other consts)`.
        """
        x = self.x.join(*x)
        f, n = iter(body_k[0]), iter(body_k[1])
        consts = [next(f) if isf else next(n) for isf in self.body_k_float]
        carry, y = self.body(i, self.carry.join(fl, nl), x, *consts)
        return self.carry.split(carry), self.y.split(y)

    def keep_going(self, i: Any, fl: tuple, nl: tuple, cond_k: tuple) -> jax.Array:
        carry = self.carry.join(fl, nl)
        return (i < self.max_steps) & self.cond(i, carry, *cond_k)


def _x_at(xs: tuple, i: Any) -> tuple:
    """Step `i`'s slice of the split per-step inputs `(float, other)`."""
    return tuple(tuple(_read(list(part), i)) for part in xs)


def bounded_while(
    cond: Callable[[jax.Array, Any], jax.Array],
    body: Callable[[jax.Array, Any], Any],
    carry: Any,
    *,
    max_steps: int,
    checkpoints: int | None = None,
) -> tuple[Any, jax.Array]:
    """Run `while i < max_steps and cond(i, c): c = body(i, c)`; return `(c, steps)`.

    `i` is the int32 step index. `body` must keep the carry's structure, shapes
    and dtypes (the callers check this with a clear error). Reverse-mode
    differentiable; see the module docstring.
    """
    carry, _, steps = _run(
        cond,
        lambda i, c, x: (body(i, c), ()),
        carry,
        (),
        max_steps=max_steps,
        checkpoints=checkpoints,
    )
    return carry, steps


def bounded_scan(
    body: Callable[[jax.Array, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any,
    *,
    length: Any,
    max_steps: int,
    checkpoints: int | None = None,
) -> tuple[Any, Any]:
    """A `lax.scan` that runs only `length` (maybe traced) of `max_steps` steps.

    `body(i, carry, x) -> (carry, y)`, `x` step `i`'s slice of `xs` (every
    leaf has a leading `max_steps` axis). Returns `(carry, ys)`; `ys` has the
    steps axis first and zeros past `length`. Both the forward and the reverse
    pass run `length` steps.
    """
    carry, ys, _ = _run(
        lambda i, c: i < length,
        body,
        carry,
        xs,
        max_steps=max_steps,
        checkpoints=checkpoints,
    )
    return carry, ys


def _run(cond, body, carry, xs, *, max_steps, checkpoints):
    i0 = jnp.int32(0)
    x0 = jax.tree.map(lambda a: a[0], xs)
    # Inside `shard_map`, a replicated carry that the body makes vary (a
    # per-device weight) varies from the start, so that the body is traced,
    # and hoisted, with the carry type every step has.
    carry = _align_carry(lambda c: body(i0, c, x0)[0], carry)
    body_c, body_k = _hoist(body, i0, carry, x0, lift_pvary=True)
    cond_c, cond_k = _hoist(cond, i0, carry)
    y_shape = jax.eval_shape(lambda c, x: body(i0, c, x)[1], carry, x0)
    k_float = tuple(_is_float(k) for k in body_k)
    spec = _Spec(
        body_c,
        cond_c,
        max_steps,
        checkpoints,
        _Split.of(carry),
        _Split.of(x0),
        _Split.of(y_shape),
        k_float,
    )
    fl, nl = spec.carry.split(carry)
    xs_split = spec.x.split(xs)
    body_kf = tuple(k for k, isf in zip(body_k, k_float, strict=True) if isf)
    body_kn = tuple(k for k, isf in zip(body_k, k_float, strict=True) if not isf)
    out_fl, out_nl, steps, yf, yn = _loop(
        spec, fl, nl, (body_kf, body_kn), tuple(cond_k), xs_split
    )
    return spec.carry.join(out_fl, out_nl), spec.y.join(yf, yn), steps


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loop(spec: _Spec, fl: tuple, nl: tuple, body_k: tuple, cond_k: tuple, xs: tuple):
    out_fl, out_nl, steps, ys, _ = _forward(
        spec,
        fl,
        nl,
        body_k,
        cond_k,
        xs,
        start=jnp.int32(0),
        count=None,
        bound=spec.max_steps,
        stores=[],
        outputs=True,
        any_mode=False,
    )
    return out_fl, out_nl, steps, *ys


def _carry_bytes(fl: tuple, nl: tuple) -> int:
    return sum(_nbytes(x) for x in (*fl, *nl))


def _plan(spec: _Spec, fl: tuple, nl: tuple) -> tuple[str, list[tuple[int, int]]]:
    """Choose how the forward pass stores carries: `(strategy, [(size, every)])`.

    Each `(size, every)` is one buffer of `size` carries, stored every `every`
    steps: `"direct"` stores every carry; `"segments"` every `every`-th one;
    `"long"` stores the first few carries (short runs need no replay) and a
    segment checkpoint every `ceil(sqrt(max_steps))` steps.
    """
    m, k = spec.max_steps, spec.checkpoints
    if k is not None and k < m:
        every = -(-m // k)
        return "segments", [(-(-m // every), every)]
    nbytes = max(1, _carry_bytes(fl, nl))
    if m * nbytes <= _DIRECT_BYTES:
        return "direct", [(m, 1)]
    first = max(1, min(m, _FIRST_BYTES // nbytes))
    every = math.isqrt(m - 1) + 1
    return "long", [(first, 1), (-(-m // every), every)]


def _forward(
    spec: _Spec,
    fl: tuple,
    nl: tuple,
    body_k: tuple,
    cond_k: tuple,
    xs: tuple,
    *,
    start: Any,
    count: Any | None,
    bound: int,
    stores: list[tuple[int, int]],
    outputs: bool,
    any_mode: bool = True,
) -> tuple[tuple, tuple, jax.Array, tuple, list]:
    """Run from step index `start`, storing carries as `stores` says.

    Runs `count` steps if given, else while `cond` holds and `max_steps` is not
    reached; at most `bound` steps. For each `(size, every)` in `stores`, the
    carry before every `every`-th step goes into a buffer of `size` entries
    (float leaves first); past `size * every` steps the last entry is
    overwritten, and the caller then does not read that buffer. With
    `outputs`, the per-step outputs go into `(max_steps, ...)` buffers at
    their step index. Returns the final carry, the steps run, the output
    buffers `(float, other)` and one carry buffer list per store.
    """
    bufs = [[_buffer(x, size) for x in (*fl, *nl)] for size, _ in stores]
    if outputs:
        y_avals = jax.eval_shape(
            lambda f, n: spec.step(start, f, n, _x_at(xs, start), body_k)[1], fl, nl
        )
        ys = _output_buffers(spec, y_avals)
    else:
        ys = ((), ())

    def c(state: tuple) -> jax.Array:
        t, fl_, nl_, _, _ = state
        if count is not None:
            return t < count
        return spec.keep_going(start + t, fl_, nl_, cond_k)

    def b(state: tuple) -> tuple:
        t, fl_, nl_, bufs_, ys_ = state
        new_bufs = []
        for (size, every), bs in zip(stores, bufs_, strict=True):
            slot = jnp.minimum(t // every, size - 1)
            if every == 1:
                bs = _write(bs, slot, [*fl_, *nl_])
            else:
                # Under `vmap` rows may be at different steps: the branch runs
                # when any row stores, and each row keeps its old slot unless
                # it does (a `cond` on the batched flag would not transpose
                # once differentiated again; see `_while_as_scan`).
                now = t % every == 0

                def store(bs_: list, slot: Any = slot, now: Any = now) -> list:
                    old = _read(bs_, slot)
                    return _write(bs_, slot, _keep_unless(now, [*fl_, *nl_], old))

                bs = lax.cond(_any_row_p.bind(now), store, lambda bs_: bs_, bs)
            new_bufs.append(bs)
        i = start + t
        (fl_, nl_), y = spec.step(i, fl_, nl_, _x_at(xs, i), body_k)
        if outputs:
            ys_ = tuple(
                tuple(_write(list(buf), i, list(part)))
                for buf, part in zip(ys_, y, strict=True)
            )
        return t + 1, fl_, nl_, new_bufs, ys_

    init = (jnp.int32(0), fl, nl, bufs, ys)
    if any_mode:
        t, fl, nl, bufs, ys = _while_any_mode(c, b, init, bound)
    else:
        t, fl, nl, bufs, ys = lax.while_loop(c, b, _align_carry(b, init))
    return fl, nl, t, ys, bufs


def _reverse(
    spec: _Spec,
    bufs: list,
    start: Any,
    count: Any,
    state: tuple,
    body_k: tuple,
    xs: tuple,
    ct_ys: tuple,
    size: int,
) -> tuple:
    """Pull the cotangents back through `count` stored steps (`start + t`).

    `state` is `(ct_fl, ct_k, ct_xs)`: the carry's cotangent, the float
    consts' accumulated cotangent and the float per-step inputs' cotangent
    buffers, which each step writes at its index.
    """
    n_float = sum(spec.carry.is_float)

    def c(st: tuple) -> jax.Array:
        return st[0] > 0

    def b(st: tuple) -> tuple:
        t, ct_fl_, ct_k_, ct_xs_ = st
        t = t - 1
        i = start + t
        stored = _read(bufs, t)
        fl_t, nl_t = tuple(stored[:n_float]), tuple(stored[n_float:])

        xf_t, xn_t = _x_at(xs, i)

        def one(f: tuple, kf: tuple, xf: tuple) -> tuple:
            (out_f, _), (y_f, _) = spec.step(i, f, nl_t, (xf, xn_t), (kf, body_k[1]))
            return out_f, y_f

        _, pullback = jax.vjp(one, fl_t, body_k[0], xf_t)
        ct_y_t = tuple(_read(list(ct_ys), i))
        d_fl, d_k, d_x = pullback((ct_fl_, ct_y_t))
        ct_xs_ = tuple(_write(list(ct_xs_), i, list(d_x)))
        return t, d_fl, jax.tree.map(jnp.add, ct_k_, d_k), ct_xs_

    out = _while_any_mode(c, b, (count, *state), size)
    return out[1:]


class _Tape:
    """One step and its pullback, from one trace (see the module docstring).

    Static (a `custom_vjp` residual's aux data, compared by identity).
    `source[j]` says where the pullback's residual `j` comes from in the
    backward pass: `("step", m)` the `m`-th per-step buffer; `("fixed", m)`
    the `m`-th residual that depends on no per-step value (kept once, not
    per step); or, never stored, an input of the step itself: `("kf", m)`
    or `("kn", m)` the `m`-th float or other const (a weight the body closes
    over), `("xf", m)` or `("xn", m)` the `m`-th leaf of the step's slice of
    the per-step inputs.
    """

    def __init__(self, fn, pullback, out_shape, source, step_avals, fixed_avals):
        self.fn = fn  # (i, *fl, *nl, *consts, *x) -> (*outputs, *residuals)
        self.pullback = pullback  # (cotangents, *residuals) -> (d_f, d_k, d_x)
        self.out_tree = jax.tree.structure(out_shape)
        self.y_avals = out_shape[2:]  # the step's outputs: (float, other)
        self.source = source
        self.step_avals = step_avals
        self.fixed_avals = fixed_avals

    def stored_bytes(self, max_steps: int) -> int:
        """What the forward pass keeps for the backward pass, in bytes."""
        size = lambda a: math.prod(a.shape) * a.dtype.itemsize  # noqa: E731
        return max_steps * sum(map(size, self.step_avals)) + sum(
            map(size, self.fixed_avals)
        )


jax.tree_util.register_static(_Tape)


def _per_step_vars(jaxpr: Any, per_step: set) -> set:
    """The variables of `jaxpr` that depend on any variable in `per_step`."""
    dependent = set(per_step)
    for eqn in jaxpr.eqns:
        if any(
            not isinstance(v, jax.extend.core.Literal) and v in dependent
            for v in eqn.invars
        ):
            dependent.update(eqn.outvars)
    return dependent


def _tape(spec: _Spec, fl: tuple, nl: tuple, body_k: tuple, xs: tuple) -> _Tape:
    """Trace one step together with its pullback, once; see `_Tape`."""
    kf, kn = body_k

    def step_and_pullback(i, f, n, kf_, kn_, x):
        def one(f_: tuple, k_: tuple, xf_: tuple) -> tuple:
            (out_f, out_n), (y_f, y_n) = spec.step(i, f_, n, (xf_, x[1]), (k_, kn_))
            return (out_f, y_f), (out_n, y_n)

        (out_f, y_f), pullback, (out_n, y_n) = jax.vjp(one, f, kf_, x[0], has_aux=True)
        # The values the pullback closes over are the step's residuals.
        converted, residuals = _hoist(pullback, (out_f, y_f))
        box.append(converted)
        return (out_f, out_n, y_f, y_n), residuals

    box: list = []
    i0 = jnp.int32(0)
    closed, out_shape = jax.make_jaxpr(step_and_pullback, return_shape=True)(
        i0, fl, nl, kf, kn, _x_at(xs, i0)
    )
    (pullback,) = box
    n_out = jax.tree.structure(out_shape[0]).num_leaves
    jaxpr = closed.jaxpr
    n_f, n_n, n_kf, n_kn = len(fl), len(nl), len(kf), len(kn)
    invars = jaxpr.invars
    n_xf = sum(spec.x.is_float)
    start = 1 + n_f + n_n
    inputs = {  # the step's own inputs, which the backward pass has anyway
        "kf": invars[start : start + n_kf],
        "kn": invars[start + n_kf : start + n_kf + n_kn],
        "xf": invars[start + n_kf + n_kn : start + n_kf + n_kn + n_xf],
        "xn": invars[start + n_kf + n_kn + n_xf :],
    }
    per_step = invars[:start] + inputs["xf"] + inputs["xn"]
    dependent = _per_step_vars(jaxpr, set(per_step))
    where = {v: (kind, m) for kind, vs in inputs.items() for m, v in enumerate(vs)}
    source, step_avals, fixed_avals = [], [], []
    for v, aval in zip(jaxpr.outvars[n_out:], closed.out_avals[n_out:], strict=True):
        if not isinstance(v, jax.extend.core.Literal) and v in where:
            source.append(where[v])
        elif not isinstance(v, jax.extend.core.Literal) and v in dependent:
            source.append(("step", len(step_avals)))
            step_avals.append(aval)
        else:
            source.append(("fixed", len(fixed_avals)))
            fixed_avals.append(aval)
    return _Tape(
        jax.extend.core.jaxpr_as_fun(closed),
        pullback,
        out_shape[0],
        tuple(source),
        tuple(step_avals),
        tuple(fixed_avals),
    )


def _forward_taped(
    spec: _Spec, tape: _Tape, fl, nl, body_k, cond_k, xs
) -> tuple[tuple, tuple, jax.Array, tuple, list, list]:
    """The forward pass that stores each step's pullback residuals."""
    n_out = tape.out_tree.num_leaves
    bufs = [jnp.zeros((spec.max_steps, *a.shape), a.dtype) for a in tape.step_avals]
    fixed = [jnp.zeros(a.shape, a.dtype) for a in tape.fixed_avals]
    ys = _output_buffers(spec, tape.y_avals)
    flat_k = jax.tree.leaves(body_k)

    def c(state: tuple) -> jax.Array:
        t, fl_, nl_, _, _, _ = state
        return spec.keep_going(t, fl_, nl_, cond_k)

    def b(state: tuple) -> tuple:
        t, fl_, nl_, bufs_, fixed_, ys_ = state
        flat = tape.fn(t, *fl_, *nl_, *flat_k, *jax.tree.leaves(_x_at(xs, t)))
        out_f, out_n, y_f, y_n = jax.tree.unflatten(tape.out_tree, flat[:n_out])
        kinds = [kind for kind, _ in tape.source]
        per_step = [x for x, k in zip(flat[n_out:], kinds, strict=True) if k == "step"]
        fixed_ = [x for x, k in zip(flat[n_out:], kinds, strict=True) if k == "fixed"]
        ys_ = tuple(
            tuple(_write(list(buf), t, list(part)))
            for buf, part in zip(ys_, (y_f, y_n), strict=True)
        )
        return (
            t + 1,
            tuple(out_f),
            tuple(out_n),
            _write(bufs_, t, per_step),
            fixed_,
            ys_,
        )

    init = (jnp.int32(0), fl, nl, bufs, fixed, ys)
    t, fl, nl, bufs, fixed, ys = _while_any_mode(c, b, init, spec.max_steps)
    return fl, nl, t, ys, bufs, fixed


def _reverse_taped(
    spec: _Spec,
    tape: _Tape,
    bufs: list,
    fixed: list,
    count: Any,
    state: tuple,
    body_k: tuple,
    xs: tuple,
    ct_ys: tuple,
) -> tuple:
    """Pull the cotangents back through `count` steps from their stored pullbacks."""

    def b(st: tuple) -> tuple:
        t, ct_fl_, ct_k_, ct_xs_ = st
        t = t - 1
        xf_t, xn_t = _x_at(xs, t)
        pick = {
            "step": _read(bufs, t),
            "fixed": fixed,
            "kf": body_k[0],
            "kn": body_k[1],
            "xf": xf_t,
            "xn": xn_t,
        }
        leaves = [pick[kind][m] for kind, m in tape.source]
        ct_y_t = tuple(_read(list(ct_ys), t))
        d_fl, d_k, d_x = tape.pullback((ct_fl_, ct_y_t), *leaves)
        ct_xs_ = tuple(_write(list(ct_xs_), t, list(d_x)))
        return t, d_fl, jax.tree.map(jnp.add, ct_k_, d_k), ct_xs_

    out = _while_any_mode(lambda st: st[0] > 0, b, (count, *state), spec.max_steps)
    return out[1:]


def _loop_fwd(
    spec: _Spec, fl: tuple, nl: tuple, body_k: tuple, cond_k: tuple, xs: tuple
):
    strategy, stores = _plan(spec, fl, nl)
    if strategy == "direct" and _STORE_RESIDUALS:
        tape = _tape(spec, fl, nl, body_k, xs)
        if tape.stored_bytes(spec.max_steps) <= _DIRECT_BYTES:
            out_fl, out_nl, steps, ys, bufs, fixed = _forward_taped(
                spec, tape, fl, nl, body_k, cond_k, xs
            )
            residuals = (tape, bufs, fixed, steps, body_k, cond_k, xs, nl)
            return (out_fl, out_nl, steps, *ys), residuals
    out_fl, out_nl, steps, ys, bufs = _forward(
        spec,
        fl,
        nl,
        body_k,
        cond_k,
        xs,
        start=jnp.int32(0),
        count=None,
        bound=spec.max_steps,
        stores=stores,
        outputs=True,
    )
    residuals = (bufs, steps, body_k, cond_k, xs, fl, nl)
    return (out_fl, out_nl, steps, *ys), residuals


def _loop_bwd(spec: _Spec, residuals: tuple, cts: tuple):
    try:
        return _loop_bwd_traced(spec, residuals, cts)
    except NameError as err:
        # The backward rule of a `custom_vjp` under `vmap(..., axis_name=...)`
        # runs outside that vmap's scope, where a collective of the body
        # (`jax.lax.pmean(h, "batch")`) finds its axis name unbound. Binding
        # it again gives the right gradient only when every row runs the same
        # step count: a row that has stopped still feeds the collective in the
        # forward pass, a path our reverse pass does not follow. So say so.
        found = re.search(r"unbound axis name: (\S+?)\.?(?:\s|$)", str(err))
        if found is None:
            raise
        raise NotImplementedError(
            "while_loop: reverse mode through a loop whose body calls a collective "
            f"over the named axis {found.group(1)!r} of an enclosing `vmap` is not "
            "supported. "
            "Move the collective out of the loop body, or write the loop with "
            "`jax.lax.scan` (static_method='scan' for the library's models)."
        ) from None


def _loop_bwd_traced(spec: _Spec, residuals: tuple, cts: tuple):
    ct_fl = tuple(cts[0])
    ct_ys = tuple(cts[3])
    if isinstance(residuals[0], _Tape):
        return _loop_bwd_taped(spec, residuals, ct_fl, ct_ys)
    bufs, steps, body_k, cond_k, xs, fl, nl = residuals
    n_float = len(fl)
    strategy, stores = _plan(spec, fl, nl)
    zero = jnp.int32(0)

    def pull(stored: list, start: Any, length: Any, size: int, *state):
        return _reverse(spec, stored, start, length, state, body_k, xs, ct_ys, size)

    def replay(init: list, start: Any, length: Any, size: int, *state):
        _, _, _, _, (seg,) = _forward(
            spec,
            tuple(init[:n_float]),
            tuple(init[n_float:]),
            body_k,
            cond_k,
            xs,
            start=start,
            count=length,
            bound=size,
            stores=[(size, 1)],
            outputs=False,
        )
        return pull(seg, start, length, size, *state)

    def segments(ckpts: list, every: int, *state):
        # Walk the segments backwards; replay each from its checkpoint into an
        # `every`-step buffer, then pull the cotangents back through it.
        def seg(st: tuple) -> tuple:
            j = st[0] - 1
            start = j * every
            length = jnp.minimum(every, steps - start)
            return (j, *replay(_read(ckpts, j), start, length, every, *st[1:]))

        n_seg = -(-steps // every)
        bound = -(-spec.max_steps // every)
        return _while_any_mode(lambda st: st[0] > 0, seg, (n_seg, *state), bound)[1:]

    state = _start_cotangents(ct_fl, body_k, xs)
    if strategy == "direct":
        state = pull(bufs[0], zero, steps, spec.max_steps, *state)
    elif strategy == "segments":
        state = segments(bufs[0], stores[0][1], *state)
    else:  # long: the first carries if the run was short, else segments
        first = stores[0][0]
        state = lax.cond(
            steps <= first,
            functools.partial(pull, bufs[0], zero, steps, first),
            functools.partial(segments, bufs[1], stores[1][1]),
            *state,
        )
    return _cotangents(*state, nl, body_k, cond_k, xs)


def _start_cotangents(ct_fl: tuple, body_k: tuple, xs: tuple) -> tuple:
    """`(ct_fl, zeros for the float consts, zeros for the float per-step inputs)`."""
    return (
        ct_fl,
        jax.tree.map(jnp.zeros_like, body_k[0]),
        tuple(jnp.zeros_like(x) for x in xs[0]),
    )


def _cotangents(ct_fl, ct_k, ct_xs, nl, body_k, cond_k, xs) -> tuple:
    """`_loop`'s cotangents: `None` for every non-float input."""
    none = lambda tree: tuple(None for _ in tree)  # noqa: E731
    return (
        ct_fl,
        none(nl),
        (ct_k, none(body_k[1])),
        none(cond_k),
        (ct_xs, none(xs[1])),
    )


def _loop_bwd_taped(spec: _Spec, residuals: tuple, ct_fl: tuple, ct_ys: tuple):
    tape, bufs, fixed, steps, body_k, cond_k, xs, nl = residuals
    state = _start_cotangents(ct_fl, body_k, xs)
    state = _reverse_taped(spec, tape, bufs, fixed, steps, state, body_k, xs, ct_ys)
    return _cotangents(*state, nl, body_k, cond_k, xs)


_loop.defvjp(_loop_fwd, _loop_bwd)
