"""Tests for `fl.transforms`: agreement with JAX, with `torch.func`, and errors.

The torch comparisons run in float64 on both sides and skip without torch.
Forward mode (`jvp`, `jacfwd`) goes through `DynamicNet` only with
`static_method="scan"` or `mode="dynamic"`: the default `"bounded"` loop is a
`jax.custom_vjp`, which forward mode cannot differentiate (tested below).
`hessian` (forward-over-reverse) does go through it, and agrees.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose

import functorch_lite as fl
import functorch_lite.transforms as ft

# torch's forward-mode AD loads its decompositions on first use through
# `torch.jit.script`, which torch itself deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

# ------------------------------------------------------------------ fixtures


def _tree_fn(params, x):
    """A scalar function of a params pytree and an input."""
    h = jnp.tanh(x @ params["layer"]["w"] + params["layer"]["b"])
    return jnp.sum(h**2) + jnp.sum(params["scale"] * x)


def _vector_fn(params, x):
    """A pytree-valued function of a params pytree and an input."""
    h = jnp.tanh(x @ params["layer"]["w"] + params["layer"]["b"])
    return {"h": h, "s": jnp.sum(params["scale"] * x, axis=-1)}


@pytest.fixture
def tree(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {
        "layer": {
            "w": jax.random.normal(k1, (3, 4)),
            "b": jax.random.normal(k2, (4,)),
        },
        "scale": jax.random.normal(k3, (3,)),
    }
    x = jax.random.normal(k4, (3,))
    return params, x


# -------------------------------------------------------- agreement with JAX


@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0)], ids=str)
def test_grad_matches_jax(tree, argnums):
    params, x = tree
    tree_allclose(
        ft.grad(_tree_fn, argnums)(params, x),
        jax.grad(_tree_fn, argnums)(params, x),
    )


def test_grad_has_aux_and_kwargs(tree):
    params, x = tree

    def f(params, x, *, shift):
        value = _tree_fn(params, x) + shift
        return value, {"value": value}

    g, aux = ft.grad(f, has_aux=True)(params, x, shift=1.0)
    want_g, want_aux = jax.grad(f, has_aux=True)(params, x, shift=1.0)
    tree_allclose(g, want_g)
    tree_allclose(aux, want_aux)


def test_grad_and_value_is_torch_order(tree):
    params, x = tree
    g, value = ft.grad_and_value(_tree_fn)(params, x)
    want_value, want_g = jax.value_and_grad(_tree_fn)(params, x)
    tree_allclose(g, want_g)
    tree_allclose(value, want_value)

    def f(params, x):
        return _tree_fn(params, x), x * 2.0

    g, (value, aux) = ft.grad_and_value(f, argnums=(0, 1), has_aux=True)(params, x)
    (want_value, want_aux), want_g = jax.value_and_grad(
        f, argnums=(0, 1), has_aux=True
    )(params, x)
    tree_allclose((g, value, aux), (want_g, want_value, want_aux))


def test_vjp_matches_jax(tree):
    params, x = tree
    out, vjp_fn = ft.vjp(_vector_fn, params, x)
    want_out, want_vjp_fn = jax.vjp(_vector_fn, params, x)
    cotangent = jax.tree.map(jnp.ones_like, out)
    tree_allclose(out, want_out)
    tree_allclose(vjp_fn(cotangent), want_vjp_fn(cotangent))

    out, vjp_fn, aux = ft.vjp(lambda p: (_tree_fn(p, x), "aux"), params, has_aux=True)
    assert aux == "aux"
    tree_allclose(vjp_fn(jnp.float32(1.0)), (jax.grad(_tree_fn)(params, x),))


def test_jvp_matches_jax(tree):
    params, x = tree
    tangents = (jax.tree.map(jnp.ones_like, params), jnp.ones_like(x))
    tree_allclose(
        ft.jvp(_vector_fn, (params, x), tangents),
        jax.jvp(_vector_fn, (params, x), tangents),
    )
    # Lists are accepted as torch accepts them; has_aux returns a third item.
    out, tangent_out, aux = ft.jvp(
        lambda x: (jnp.sin(x), x), [x], [jnp.ones_like(x)], has_aux=True
    )
    tree_allclose((out, tangent_out, aux), (jnp.sin(x), jnp.cos(x), x))


@pytest.mark.parametrize("name", ["jacrev", "jacfwd"], ids=["jacrev", "jacfwd"])
@pytest.mark.parametrize("argnums", [0, 1, (0, 1)], ids=str)
def test_jacobians_match_jax(tree, name, argnums):
    params, x = tree
    ours = getattr(ft, name)(_vector_fn, argnums)(params, x)
    theirs = getattr(jax, name)(_vector_fn, argnums)(params, x)
    tree_allclose(ours, theirs)


@pytest.mark.parametrize("name", ["jacrev", "jacfwd"])
def test_jacobians_has_aux(tree, name):
    params, x = tree
    jac, aux = getattr(ft, name)(lambda x: (jnp.sin(x), x**2), has_aux=True)(x)
    tree_allclose(jac, jnp.diag(jnp.cos(x)))
    tree_allclose(aux, x**2)


@pytest.mark.parametrize("argnums", [0, 1, (0, 1)], ids=str)
def test_hessian_matches_jax(tree, argnums):
    params, x = tree
    tree_allclose(
        jax.jit(ft.hessian(_tree_fn, argnums))(params, x),
        jax.jit(jax.hessian(_tree_fn, argnums))(params, x),
    )


def test_transforms_compose_with_jit_and_each_other(tree):
    params, x = tree
    per_example = jax.jit(ft.vmap(ft.grad(_tree_fn), in_dims=(None, 0)))
    xs = jnp.stack([x, 2.0 * x, -x])
    tree_allclose(
        per_example(params, xs),
        jax.vmap(jax.grad(_tree_fn), in_axes=(None, 0))(params, xs),
    )

    # The wrappers keep `func`'s signature, so jit's static_argnames resolve.
    def f(params, x, power):
        return _tree_fn(params, x) ** power

    jitted = jax.jit(ft.grad(f), static_argnames=("power",))
    tree_allclose(jitted(params, x, power=2), jax.grad(f)(params, x, 2))


# ---------------------------------------------------------------------- vmap


def _stack2(tree):
    return jax.tree.map(lambda a: jnp.stack([a, 2.0 * a]), tree)


VMAP_CASES = {
    # name: (in_dims, out_dims, args from (params, x))
    "tuple": ((None, 0), 0, lambda p, x: (p, _stack2(x))),
    "list-out-tree": ([None, 0], {"h": 1, "s": 0}, lambda p, x: (p, _stack2(x))),
    "prefix-tree": (
        ({"layer": 0, "scale": None}, None),
        0,
        lambda p, x: ({"layer": _stack2(p["layer"]), "scale": p["scale"]}, x),
    ),
    "negative": (
        (None, -1),
        {"h": -1, "s": 0},
        lambda p, x: (p, jnp.stack([x, -x], axis=-1)),
    ),
}


@pytest.mark.parametrize("case", list(VMAP_CASES), ids=list(VMAP_CASES))
def test_vmap_matches_jax(tree, case):
    in_dims, out_dims, make_args = VMAP_CASES[case]
    args = make_args(*tree)
    in_axes = tuple(in_dims) if isinstance(in_dims, list) else in_dims
    tree_allclose(
        ft.vmap(_vector_fn, in_dims, out_dims)(*args),
        jax.vmap(_vector_fn, in_axes, out_dims)(*args),
    )


def test_vmap_leaves_keyword_arguments_unmapped(tree):
    params, x = tree
    xs = jnp.stack([x, -x])

    def f(x, *, params, mode):
        assert mode == "static"  # a string could not cross jax.vmap's kwargs
        return _tree_fn(params, x)

    got = ft.vmap(f)(xs, params=params, mode="static")
    tree_allclose(got, jax.vmap(_tree_fn, in_axes=(None, 0))(params, xs))


def test_vmap_per_example_grads_of_dynamic_net_match_a_loop(key):
    net = fl.models.DynamicNet(4, 6, 2, max_depth=3)
    params = net.init(key)
    x = jax.random.normal(key, (5, 4))
    y = jnp.zeros((5, 2))

    def loss(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth), y)

    per_example = ft.vmap(ft.grad(loss), in_dims=(None, 0, 0, None))
    got = jax.jit(per_example, static_argnums=3)(params, x, y, 2)
    single = jax.jit(jax.grad(loss), static_argnums=3)  # eager op-by-op is slow
    for i in range(5):
        want = single(params, x[i], y[i], 2)
        tree_allclose(jax.tree.map(lambda g, i=i: g[i], got), want)
    # The per-example grads sum to the batch gradient (summed loss).
    tree_allclose(jax.tree.map(lambda g: g.sum(0), got), single(params, x, y, 2))


# ------------------------------------------------- functional_call, stacking


def test_functional_call_dispatches_to_apply_or_function(key):
    net = fl.models.DynamicNet(4, 6, 2)
    params = net.init(key)
    x = jnp.ones((3, 4))
    tree_allclose(
        ft.functional_call(net, params, x, 2, mode="dynamic"),
        net.apply(params, x, 2, mode="dynamic"),
    )
    layer = fl.nn.linear(4, 2)
    layer_params = layer.init(key)
    tree_allclose(
        ft.functional_call(layer, layer_params, x), layer.apply(layer_params, x)
    )
    tree_allclose(
        ft.functional_call(lambda p, x, *, k: p["w"] * x * k, {"w": 2.0}, x, k=3.0),
        6.0 * x,
    )


def test_stack_params_and_vmap_make_an_ensemble(key):
    net = fl.models.DynamicNet(4, 6, 2)
    members = [net.init(k) for k in jax.random.split(key, 3)]
    stacked = ft.stack_params(members)
    assert jax.tree.map(lambda a: a.shape, stacked) == {
        "input_linear": {"weight": (3, 4, 6), "bias": (3, 6)},
        "middle_linear": {"weight": (3, 6, 6), "bias": (3, 6)},
        "output_linear": {"weight": (3, 6, 2), "bias": (3, 2)},
    }
    x = jnp.ones((5, 4))
    out = ft.vmap(lambda p, x: ft.functional_call(net, p, x, 2), in_dims=(0, None))(
        stacked, x
    )
    for i, member in enumerate(members):
        tree_allclose(out[i], net.apply(member, x, 2))


def test_stack_params_keeps_leaf_bits(key):
    members = [{"a": jnp.array([1.0, -0.0])}, {"a": jnp.array([jnp.nan, 2.0])}]
    stacked = ft.stack_params(tuple(members))
    np.testing.assert_array_equal(
        np.asarray(stacked["a"]).view(np.int32),
        np.stack([np.asarray(m["a"]) for m in members]).view(np.int32),
    )


# ----------------------------------------------------- forward mode, bounded


@pytest.fixture
def small_net_inputs(key):
    x = jax.random.normal(key, (3, 4))
    return x, jnp.zeros((3, 2))


@pytest.mark.parametrize("name", ["jvp", "jacfwd"])
def test_forward_mode_through_bounded_loop_raises_with_fix(key, small_net_inputs, name):
    net = fl.models.DynamicNet(4, 6, 2, max_depth=3)  # static_method="bounded"
    params = net.init(key)
    x, y = small_net_inputs

    def loss(x):
        return fl.nn.mse_loss(net.apply(params, x, 2), y)

    call = {
        "jvp": lambda: ft.jvp(loss, (x,), (x,)),
        "jacfwd": lambda: ft.jacfwd(loss)(x),
    }[name]
    with pytest.raises(TypeError, match=rf'{name}: .*static_method="scan"'):
        call()


def test_forward_mode_through_static_lstm_names_it_and_the_fix(key):
    """The static LSTM's core has its own reverse rule: forward mode names it
    and `mode="dynamic"`, which then works (against reverse mode)."""
    layer = fl.nn.lstm(3, 4)
    params = layer.init(key)
    xs = jax.random.normal(key, (2, 5, 3))
    lengths = jnp.array([5, 2])

    def out(x, mode):
        return layer.apply(params, x, lengths, mode=mode)[0]

    with pytest.raises(TypeError, match=r'jacfwd: .*`fl.nn.lstm`.*mode="dynamic"'):
        ft.jacfwd(lambda x: out(x, "static"))(xs)
    tree_allclose(
        jax.jit(ft.jacfwd(lambda x: out(x, "dynamic")))(xs),
        jax.jit(ft.jacrev(lambda x: out(x, "static")))(xs),
    )


def test_hessian_goes_through_bounded_loop(key, small_net_inputs):
    # Forward-over-reverse differentiates the loop's reverse rule, which is
    # plain JAX: the Hessian equals the scan loop's and the unrolled one's.
    x, y = small_net_inputs
    bounded = fl.models.DynamicNet(4, 6, 2, max_depth=3)
    scan = fl.models.DynamicNet(4, 6, 2, max_depth=3, static_method="scan")
    params = bounded.init(key)

    def loss(net, mode):
        return lambda p: fl.nn.mse_loss(net.apply(p, x, 2, mode=mode), y)

    # jit: op-by-op eager Hessians of a loop take seconds.
    want = jax.jit(ft.hessian(loss(scan, "static")))(params)
    tree_allclose(jax.jit(ft.hessian(loss(bounded, "static")))(params), want)
    tree_allclose(jax.jit(ft.hessian(loss(bounded, "dynamic")))(params), want)


@pytest.mark.parametrize(
    "mode, static_method",
    [("static", "scan"), ("dynamic", "bounded")],
    ids=["static-scan", "dynamic"],
)
def test_forward_mode_works_with_scan_or_dynamic(
    key, small_net_inputs, mode, static_method
):
    net = fl.models.DynamicNet(4, 6, 2, max_depth=3, static_method=static_method)
    params = net.init(key)
    x, y = small_net_inputs

    def out(x):
        return net.apply(params, x, 2, mode=mode)

    tree_allclose(jax.jit(ft.jacfwd(out))(x), jax.jit(ft.jacrev(out))(x))
    loss = lambda x: fl.nn.mse_loss(out(x), y)
    tree_allclose(
        jax.jit(ft.hessian(loss))(x), jax.jit(jax.jacrev(jax.jacrev(loss)))(x)
    )


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name", ["grad", "grad_and_value", "jacrev", "jacfwd", "hessian", "vmap"]
)
def test_func_must_be_callable(name):
    with pytest.raises(TypeError, match=rf"{name}: `func` must be callable; got 3"):
        getattr(ft, name)(3)


@pytest.mark.parametrize("name", ["grad", "grad_and_value", "jacrev", "jacfwd"])
def test_has_aux_must_be_bool(name):
    match = rf"{name}: `has_aux` must be a bool; got int 1"
    with pytest.raises(TypeError, match=match):
        getattr(ft, name)(_tree_fn, 0, has_aux=1)


@pytest.mark.parametrize(
    "argnums",
    [1.0, (), (0, "1"), True, None],
    ids=["float", "empty", "str", "bool", "none"],
)
def test_argnums_must_be_ints(argnums):
    with pytest.raises(TypeError, match=r"grad: `argnums` must be an int or a non-"):
        ft.grad(_tree_fn, argnums)


def test_argnums_must_not_repeat():
    with pytest.raises(ValueError, match=r"jacrev: `argnums` must not repeat"):
        ft.jacrev(_tree_fn, (0, 0))


@pytest.mark.parametrize("name", ["grad", "grad_and_value", "jacrev", "hessian"])
def test_argnums_out_of_range_names_the_call(tree, name):
    params, x = tree
    with pytest.raises(ValueError, match=rf"{name}: `argnums` 1 refers to .* 1 posit"):
        getattr(ft, name)(lambda p, x=x: _tree_fn(p, x), 1)(params)


def test_vjp_needs_a_primal_and_bool_has_aux():
    with pytest.raises(TypeError, match=r"vjp: pass at least one primal"):
        ft.vjp(jnp.sin)
    with pytest.raises(TypeError, match=r"vjp: `func` must be callable"):
        ft.vjp(None, jnp.ones(2))
    with pytest.raises(TypeError, match=r"vjp: `has_aux` must be a bool"):
        ft.vjp(jnp.sin, jnp.ones(2), has_aux="yes")


def test_jvp_argument_errors():
    x = jnp.ones(2)
    with pytest.raises(TypeError, match=r"jvp: `primals` must be a tuple .*Array"):
        ft.jvp(jnp.sin, x, (x,))
    with pytest.raises(TypeError, match=r"jvp: `tangents` must be a tuple"):
        ft.jvp(jnp.sin, (x,), x)
    with pytest.raises(ValueError, match=r"jvp: .*same length; got 1 and 2"):
        ft.jvp(jnp.sin, (x,), (x, x))
    with pytest.raises(TypeError, match=r"jvp: `func` must be callable"):
        ft.jvp("sin", (x,), (x,))
    with pytest.raises(TypeError, match=r"jvp: `has_aux` must be a bool"):
        ft.jvp(jnp.sin, (x,), (x,), has_aux=None)


def test_jvp_reraises_other_type_errors():
    with pytest.raises(TypeError, match="unsupported operand"):
        ft.jvp(lambda x: x + "a", (jnp.ones(2),), (jnp.ones(2),))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_dims": "0"}, r"vmap: `in_dims` must be an int, None, or a tuple"),
        ({"in_dims": {"a": 0}}, r"vmap: `in_dims` must be an int, None, or a tuple"),
        ({"in_dims": (0, 1.5)}, r"vmap: `in_dims` must be .* holds 1\.5"),
        ({"out_dims": "x"}, r"vmap: `out_dims` must be .* holds 'x'"),
    ],
    ids=["in-str", "in-dict", "in-float-leaf", "out-str"],
)
def test_vmap_dims_kinds(kwargs, match):
    with pytest.raises(TypeError, match=match):
        ft.vmap(_tree_fn, **kwargs)


def test_vmap_call_errors(tree):
    params, x = tree
    with pytest.raises(ValueError, match=r"vmap: `in_dims` has 3 entries, .* with 2"):
        ft.vmap(_tree_fn, in_dims=(None, 0, 0))(params, x)
    with pytest.raises(ValueError, match=r"vmap: `in_dims` maps no argument"):
        ft.vmap(_tree_fn, in_dims=(None, None))(params, x)
    with pytest.raises(ValueError, match=r"vmap: `in_dims` maps no argument"):
        ft.vmap(_tree_fn, in_dims=None)(params, x)


def test_functional_call_rejects_other_models():
    with pytest.raises(TypeError, match=r"functional_call: `model` must have an `ap"):
        ft.functional_call(object(), {}, jnp.ones(2))


def test_stack_params_errors():
    a = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"stack_params: `params_list` must be a list"):
        ft.stack_params(a)
    with pytest.raises(ValueError, match=r"stack_params: `params_list` must not be"):
        ft.stack_params([])
    with pytest.raises(
        TypeError,
        match=r"(?s)`params_list\[2\]` differs.*params_list\[0\]: PyTreeDef.*"
        r"params_list\[2\]: PyTreeDef\(\{'w'",
    ):
        ft.stack_params([a, a, {"w": jnp.ones((2, 3))}])
    with pytest.raises(
        ValueError, match=r"leaf \['w'\] of `params_list\[1\]` has shape"
    ):
        ft.stack_params([a, {"w": jnp.ones((3, 2)), "b": jnp.ones(3)}])
    with pytest.raises(ValueError, match=r"leaf \['b'\] .* dtype int32"):
        ft.stack_params([a, {"w": jnp.ones((2, 3)), "b": jnp.ones(3, jnp.int32)}])


# ------------------------------------------------- boundary errors, at call


DIFFERENTIATING = ["grad", "grad_and_value", "jacrev", "jacfwd", "hessian"]


def _two_args(a, b):
    return jnp.sum(a * 2.0) + jnp.sum(b * b)


@pytest.mark.parametrize("name", DIFFERENTIATING)
def test_negative_argnums_that_repeat_an_argument_raise(name):
    # (1, -1) both name `b` when there are two arguments: JAX would pass None.
    x, y = jnp.ones(2), jnp.ones(3)
    with pytest.raises(
        ValueError,
        match=rf"{name}: `argnums` must not repeat an argument; got \(1, -1\), "
        r"which with 2 positional arguments refers to .* \(1, 1\)",
    ):
        getattr(ft, name)(_two_args, argnums=(1, -1))(x, y)


@pytest.mark.parametrize("name", DIFFERENTIATING)
def test_negative_argnums_resolve_like_positive_ones(name):
    x, y = jnp.ones(2), jnp.array([1.0, 2.0, 3.0])
    transform = getattr(ft, name)
    tree_allclose(transform(_two_args, -1)(x, y), transform(_two_args, 1)(x, y))
    tree_allclose(
        transform(_two_args, (-1, 0))(x, y), transform(_two_args, (1, 0))(x, y)
    )


@pytest.mark.parametrize("name", DIFFERENTIATING)
def test_integer_inputs_raise_naming_the_argument(name):
    kinds = (
        "floating or complex"
        if name in ("grad", "grad_and_value", "jacrev")
        else ("real floating")
    )
    with pytest.raises(
        TypeError,
        match=rf"{name}: positional argument 0, .*must have a {kinds} dtype; "
        r"got int32",
    ):
        getattr(ft, name)(lambda x: jnp.sum(x**2))(jnp.array([1, 2]))
    with pytest.raises(
        TypeError, match=rf"{name}: positional argument 1\['w'\], .* got bool"
    ):
        getattr(ft, name)(_two_args, argnums=(0, 1))(
            jnp.ones(2), {"w": jnp.array([True])}
        )
    with pytest.raises(
        TypeError, match=rf"{name}: positional argument 0\[0\], .*be an array .*str"
    ):
        getattr(ft, name)(lambda x: 0.0)(["a"])


@pytest.mark.parametrize("name", ["jacfwd", "hessian"])
def test_forward_mode_rejects_complex_inputs(name):
    with pytest.raises(TypeError, match=rf"{name}: .*real floating dtype; got compl"):
        getattr(ft, name)(lambda x: jnp.sum(x.real**2))(jnp.ones(2, jnp.complex64))


def test_grad_takes_complex_inputs():
    x = jnp.array([1.0 + 2.0j])
    tree_allclose(
        ft.grad(lambda x: jnp.sum(jnp.abs(x) ** 2))(x),
        jax.grad(lambda x: jnp.sum(jnp.abs(x) ** 2))(x),
    )


@pytest.mark.parametrize("name", ["grad", "grad_and_value"])
def test_grad_needs_a_real_scalar_output(name):
    transform = getattr(ft, name)
    with pytest.raises(
        TypeError,
        match=rf"{name}: `func` must return a scalar \(shape \(\)\); got "
        r"shape \(2,\)",
    ):
        transform(lambda x: x**2)(jnp.ones(2))
    with pytest.raises(TypeError, match=rf"{name}: `func` must return a scalar arr"):
        transform(lambda x: {"y": jnp.sum(x)})(jnp.ones(2))
    with pytest.raises(TypeError, match=rf"{name}: .*real floating-point scalar; got"):
        transform(lambda x: jnp.sum(x > 0))(jnp.ones(2))
    # Under jit and with has_aux too: the check runs while JAX traces.
    with pytest.raises(TypeError, match=rf"{name}: .*got shape \(2,\)"):
        jax.jit(transform(lambda x: (x**2, x), has_aux=True))(jnp.ones(2))


@pytest.mark.parametrize(
    "name", ["grad", "grad_and_value", "jacrev", "jacfwd", "vjp", "jvp"]
)
def test_has_aux_needs_a_pair(name):
    x = jnp.ones(2)
    sq = lambda x: jnp.sum(x**2)  # noqa: E731
    call = {
        "vjp": lambda f: ft.vjp(f, x, has_aux=True),
        "jvp": lambda f: ft.jvp(f, (x,), (x,), has_aux=True),
    }.get(name, lambda f: getattr(ft, name)(f, has_aux=True)(x))
    with pytest.raises(
        TypeError,
        match=rf"{name}: with `has_aux=True`, `func` must return a pair \(output, "
        r"aux\); got an array of shape \(\) and dtype float32",
    ):
        call(sq)
    with pytest.raises(TypeError, match=rf"{name}: .*pair.*got a tuple of 3 items"):
        call(lambda x: (sq(x), x, x))


def test_vmap_sizes_that_differ_are_listed_per_argument():
    with pytest.raises(
        ValueError,
        match=r"vmap: every mapped axis must have the same size \(the batch size\); "
        r"got argument 0 axis 0: size 3, argument 1 axis 0: size 4\.",
    ):
        ft.vmap(lambda a, b: a + b)(jnp.ones(3), jnp.ones(4))
    with pytest.raises(
        ValueError,
        match=r"argument 0\['p'\] axis 0: size 2, argument 1 axis -1: size 5",
    ):
        ft.vmap(lambda p, b: p["p"] + b, in_dims=({"p": 0, "q": None}, -1))(
            {"p": jnp.ones(2), "q": jnp.ones(7)}, jnp.ones((3, 5))
        )


def test_vmap_in_dims_must_fit_the_arguments():
    with pytest.raises(
        ValueError,
        match=r"vmap: `in_dims\[0\]` maps axis 2 of positional argument 0, which "
        r"has shape \(2,\) \(rank 1\); the mapped axis must be in \[-1, 0\]",
    ):
        ft.vmap(lambda a: a, in_dims=(2,))(jnp.ones(2))
    with pytest.raises(ValueError, match=r"vmap: `in_dims` maps axis 0 .*rank 0"):
        ft.vmap(lambda a: a)(1.0)
    with pytest.raises(
        ValueError,
        match=r"vmap: `in_dims\[0\]` must be a pytree prefix of positional argument "
        r"0; got \{'x': 0\}",
    ):
        ft.vmap(lambda a: a, in_dims=({"x": 0},))({"y": jnp.ones(2)})
    with pytest.raises(
        TypeError, match=r"vmap: `in_dims` maps positional argument 1, .*got str"
    ):
        ft.vmap(lambda a, s: a)(jnp.ones(2), "s")
    with pytest.raises(
        ValueError, match=r"vmap: `in_dims` 0 maps no array of the 1 positional arg"
    ):
        ft.vmap(lambda a: a)({})


def test_vmap_out_dims_must_fit_the_output():
    x = jnp.ones((4, 3))
    with pytest.raises(
        ValueError,
        match=r"vmap: `out_dims` puts the mapped axis at 5 in the output of `func`, "
        r"which has rank 1 per example \(2 with the mapped axis\); it must be in "
        r"\[-2, 1\]",
    ):
        ft.vmap(lambda a: a, out_dims=5)(x)
    with pytest.raises(ValueError, match=r"vmap: `out_dims` puts .* at -3 .*\['h'\]"):
        jax.jit(ft.vmap(lambda a: {"h": a}, out_dims={"h": -3}))(x)
    with pytest.raises(
        ValueError, match=r"vmap: `out_dims` must be a pytree prefix of the output"
    ):
        ft.vmap(lambda a: {"y": a}, out_dims={"x": 0})(x)
    # Both ends of the valid range work.
    assert ft.vmap(lambda a: a, out_dims=1)(x).shape == (3, 4)
    assert ft.vmap(lambda a: a, out_dims=-2)(x).shape == (4, 3)


def test_vjp_cotangents_must_match_the_output():
    _, vjp_fn = ft.vjp(lambda x: {"a": x * 2.0, "b": jnp.sum(x)}, jnp.ones(3))
    good = {"a": jnp.ones(3), "b": jnp.float32(1.0)}
    with pytest.raises(
        ValueError,
        match=r"vjp: `cotangents`\['a'\] must have the shape of the output of "
        r"`func`\['a'\], \(3,\); got shape \(4,\)",
    ):
        vjp_fn({**good, "a": jnp.ones(4)})
    with pytest.raises(
        TypeError,
        match=r"vjp: `cotangents`\['b'\] must have dtype float32, .* has dtype "
        r"float32; got dtype float16",
    ):
        vjp_fn({**good, "b": jnp.float16(1.0)})
    with pytest.raises(
        TypeError,
        match=r"(?s)vjp: `cotangents` must have the tree structure .*"
        r"expected: PyTreeDef\(\{'a': \*, 'b': \*\}\)",
    ):
        vjp_fn({"a": jnp.ones(3)})
    with pytest.raises(TypeError, match=r"vjp: `vjp_fn` takes one argument.*got 2"):
        vjp_fn(good, good)
    with pytest.raises(TypeError, match=r"vjp: `cotangents`\['b'\] must be an array"):
        vjp_fn({**good, "b": "one"})


def test_vjp_fn_stays_a_pytree_that_can_leave_jit():
    f = lambda x: x**2  # noqa: E731
    vjp_fn = jax.jit(lambda x: ft.vjp(f, x)[1])(jnp.array([1.0, 2.0]))
    tree_allclose(vjp_fn(jnp.ones(2)), (jnp.array([2.0, 4.0]),))
    with pytest.raises(ValueError, match=r"vjp: `cotangents` must have the shape"):
        vjp_fn(jnp.ones(3))


def test_jvp_tangents_must_match_the_primals():
    x = jnp.ones(3)
    with pytest.raises(
        ValueError,
        match=r"jvp: `tangents\[0\]` must have the shape of `primals\[0\]`, \(3,\); "
        r"got shape \(4,\)",
    ):
        ft.jvp(jnp.sin, (x,), (jnp.ones(4),))
    with pytest.raises(
        TypeError,
        match=r"jvp: `tangents\[1\]`\['w'\] must have dtype float32, as "
        r"`primals\[1\]`\['w'\] has dtype float32; got dtype float16",
    ):
        ft.jvp(
            lambda a, p: a * p["w"],
            (x, {"w": x}),
            (x, {"w": jnp.ones(3, jnp.float16)}),
        )
    with pytest.raises(
        TypeError, match=r"jvp: `tangents\[0\]` must have the tree structure of"
    ):
        ft.jvp(lambda p: p["w"], ({"w": x},), (x,))
    with pytest.raises(TypeError, match=r"jvp: `tangents\[0\]` must have dtype float0"):
        ft.jvp(lambda i: i * 2, (jnp.array([1, 2]),), (jnp.ones(2),))
    with pytest.raises(TypeError, match=r"jvp: `primals\[0\]` must be an array; got s"):
        ft.jvp(lambda s: s, ("s",), ("s",))
    # An integer primal takes a float0 tangent, as in JAX.
    out, _ = ft.jvp(
        lambda i: i * 2, (jnp.array([1, 2]),), (np.zeros(2, jax.dtypes.float0),)
    )
    tree_allclose(out, jnp.array([2, 4]))


# ------------------------------------------------------- agreement with torch


@functools.cache
def _torch_net_class(torch):
    """The reference program's PyTorch DynamicNet (one class, for
    `torch.func.stack_module_state`)."""

    class TorchDynamicNet(torch.nn.Module):
        def __init__(self, d_in, d_hidden, d_out) -> None:
            super().__init__()
            self.input_linear = torch.nn.Linear(d_in, d_hidden)
            self.middle_linear = torch.nn.Linear(d_hidden, d_hidden)
            self.output_linear = torch.nn.Linear(d_hidden, d_out)

        def forward(self, x, depth):
            h = torch.relu(self.input_linear(x))
            for _ in range(depth):
                h = torch.relu(self.middle_linear(h))
            return self.output_linear(h)

    return TorchDynamicNet


def _torch_net(torch, d_in, d_hidden, d_out):
    """A float64 PyTorch DynamicNet, initialized from seed 0."""
    torch.manual_seed(0)
    return _torch_net_class(torch)(d_in, d_hidden, d_out).double()


def _nest_torch(tensors: dict, n_lead: int) -> dict:
    """Nest `{"a.weight": t}` like `from_torch`, for tensors with `n_lead` extra
    leading axes (per example, per output): their weights' last two axes swap."""
    flat = {}
    for name, t in tensors.items():
        a = t.detach().numpy()
        if name.endswith("weight") and a.ndim == n_lead + 2:
            a = np.swapaxes(a, -1, -2)
        flat[name] = a
    tree: dict = {}
    for name, a in flat.items():
        layer, leaf = name.split(".")
        tree.setdefault(layer, {})[leaf] = a
    return tree


@pytest.fixture
def torch_setup():
    torch = pytest.importorskip("torch")
    d_in, d_hidden, d_out, n = 4, 5, 3, 6
    model = _torch_net(torch, d_in, d_hidden, d_out)
    tparams = {k: v.detach() for k, v in model.named_parameters()}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d_in))
    y = rng.standard_normal((n, d_out))
    with jax.enable_x64(True):
        yield {
            "torch": torch,
            "model": model,
            "tparams": tparams,
            "params": fl.interop.from_torch(model),
            "tx": torch.from_numpy(x),
            "ty": torch.from_numpy(y),
            "x": jnp.asarray(x),
            "y": jnp.asarray(y),
            "sizes": (d_in, d_hidden, d_out),
        }


FL_NETS = [("static", "bounded"), ("dynamic", "bounded")]
FL_FORWARD_NETS = [("static", "scan"), ("dynamic", "bounded")]


def _fl_net(s, static_method):
    return fl.models.DynamicNet(*s["sizes"], max_depth=3, static_method=static_method)


@pytest.mark.parametrize("mode, method", FL_NETS, ids=["static", "dynamic"])
def test_per_example_grads_match_torch_func(torch_setup, mode, method):
    s, torch = torch_setup, torch_setup["torch"]
    tf = torch.func
    net = _fl_net(s, method)
    depth = 2

    def tloss(p, x, y):
        out = tf.functional_call(s["model"], p, (x[None], depth))
        return torch.nn.functional.mse_loss(out, y[None], reduction="sum")

    def loss(p, x, y):
        out = ft.functional_call(net, p, x[None], depth, mode=mode)
        return fl.nn.mse_loss(out, y[None])

    want = tf.vmap(tf.grad(tloss), in_dims=(None, 0, 0))(s["tparams"], s["tx"], s["ty"])
    per_example = jax.jit(ft.vmap(ft.grad(loss), in_dims=(None, 0, 0)))
    got = per_example(s["params"], s["x"], s["y"])
    tree_allclose(got, _nest_torch(want, 1), rtol=1e-10, atol=1e-12)

    # And grad_and_value, torch's (grads, value) order.
    tg, tv = tf.grad_and_value(tloss)(s["tparams"], s["tx"][0], s["ty"][0])
    g, v = ft.grad_and_value(loss)(s["params"], s["x"][0], s["y"][0])
    tree_allclose((g, v), (_nest_torch(tg, 0), tv.numpy()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "mode, method", FL_FORWARD_NETS, ids=["static-scan", "dynamic"]
)
@pytest.mark.parametrize("name", ["jacrev", "jacfwd"])
def test_jacobian_wrt_input_matches_torch_func(torch_setup, mode, method, name):
    s, torch = torch_setup, torch_setup["torch"]
    net = _fl_net(s, method)
    want = getattr(torch.func, name)(lambda x: s["model"](x, 3))(s["tx"])
    jac = getattr(ft, name)(lambda x: net.apply(s["params"], x, 3, mode=mode))
    got = jax.jit(jac)(s["x"])
    assert got.shape == (6, 3, 6, 4)
    tree_allclose(got, want.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode, method", FL_NETS, ids=["static", "dynamic"])
def test_jacobian_wrt_params_matches_torch_func(torch_setup, mode, method):
    s, torch = torch_setup, torch_setup["torch"]
    net = _fl_net(s, method)
    want = torch.func.jacrev(
        lambda p: torch.func.functional_call(s["model"], p, (s["tx"], 1))
    )(s["tparams"])
    got = jax.jit(ft.jacrev(lambda p: net.apply(p, s["x"], 1, mode=mode)))(s["params"])
    tree_allclose(got, _nest_torch(want, 2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "mode, method", FL_FORWARD_NETS, ids=["static-scan", "dynamic"]
)
def test_hessian_of_a_small_loss_matches_torch_func(torch_setup, mode, method):
    s, torch = torch_setup, torch_setup["torch"]
    net = _fl_net(s, method)

    def tloss(x):
        out = s["model"](x, 2)
        return torch.nn.functional.mse_loss(out, s["ty"], reduction="sum")

    def loss(x):
        return fl.nn.mse_loss(net.apply(s["params"], x, 2, mode=mode), s["y"])

    want = torch.func.hessian(tloss)(s["tx"])
    got = jax.jit(ft.hessian(loss))(s["x"])
    assert got.shape == (6, 4, 6, 4)
    tree_allclose(got, want.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "mode, method", FL_FORWARD_NETS, ids=["static-scan", "dynamic"]
)
def test_vjp_and_jvp_match_torch_func(torch_setup, mode, method):
    s, torch = torch_setup, torch_setup["torch"]
    net = _fl_net(s, method)
    f_torch = lambda x: s["model"](x, 3)
    f = lambda x: net.apply(s["params"], x, 3, mode=mode)
    cotangent = np.linspace(-1.0, 1.0, 18).reshape(6, 3)
    tangent = np.linspace(-1.0, 1.0, 24).reshape(6, 4)

    t_out, t_vjp = torch.func.vjp(f_torch, s["tx"])
    out, vjp_fn = ft.vjp(f, s["x"])
    tree_allclose(out, t_out.detach().numpy(), rtol=1e-10, atol=1e-12)
    tree_allclose(
        vjp_fn(jnp.asarray(cotangent))[0],
        t_vjp(torch.from_numpy(cotangent))[0].detach().numpy(),
        rtol=1e-10,
        atol=1e-12,
    )
    _, t_tangent_out = torch.func.jvp(f_torch, (s["tx"],), (torch.from_numpy(tangent),))
    _, tangent_out = ft.jvp(f, (s["x"],), (jnp.asarray(tangent),))
    tree_allclose(tangent_out, t_tangent_out.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_ensemble_matches_torch_stack_module_state(torch_setup):
    s, torch = torch_setup, torch_setup["torch"]
    models = [_torch_net(torch, *s["sizes"]) for _ in range(3)]
    for i, m in enumerate(models):
        torch.manual_seed(i)
        for p in m.parameters():
            torch.nn.init.normal_(p.data)
    t_params, _ = torch.func.stack_module_state(models)
    want = torch.func.vmap(
        lambda p, x: torch.func.functional_call(models[0], p, (x, 2)),
        in_dims=(0, None),
    )(t_params, s["tx"])
    net = _fl_net(s, "bounded")
    stacked = ft.stack_params([fl.interop.from_torch(m) for m in models])
    got = ft.vmap(lambda p, x: ft.functional_call(net, p, x, 2), in_dims=(0, None))(
        stacked, s["x"]
    )
    tree_allclose(got, want.detach().numpy(), rtol=1e-10, atol=1e-12)
