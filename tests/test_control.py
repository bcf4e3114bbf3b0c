"""`fl.repeat`: every static mechanism equals the unrolled loop, values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import primitives, tree_allclose
from jax.test_util import check_grads

import functorch_lite as fl

METHODS = fl.control.STATIC_METHODS


def _setup(key):
    kw, kb, kh = jax.random.split(key, 3)
    w = 0.5 * jax.random.normal(kw, (5, 5))
    b = jax.random.normal(kb, (5,))
    h0 = jax.random.normal(kh, (3, 5))
    return w, b, h0


def _loss(w, b, h0, n, mode, method="bounded"):
    body = lambda h: jnp.tanh(h @ w + b[None])
    out = fl.repeat(body, h0, n, max_n=4, mode=mode, static_method=method)
    return jnp.sum(out**2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", range(5), ids=lambda n: f"n{n}")
def test_static_equals_unrolled(key, method, n):
    w, b, h0 = _setup(key)
    ref_val = _loss(w, b, h0, n, "dynamic")
    ref_grad = jax.grad(_loss, argnums=(0, 1, 2))(w, b, h0, n, "dynamic")
    f = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1, 2)), static_argnums=(4, 5))
    val, grad = f(w, b, h0, jnp.int32(n), "static", method)
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    tree_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_plain_python_reference(key):
    """The scan docstring's loop, written out in NumPy float64."""
    w, b, h0 = (np.asarray(a, np.float64) for a in _setup(key))
    for n in range(5):
        h = h0
        for i in range(4):
            if i < n:
                h = np.tanh(h @ w + b)
        out = fl.repeat(
            lambda c: jnp.tanh(
                c @ jnp.asarray(w, jnp.float32) + jnp.asarray(b, jnp.float32)[None]
            ),
            jnp.asarray(h0, jnp.float32),
            n,
            max_n=4,
        )
        np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_check_grads_float64(key, method):
    with jax.enable_x64(True):
        w, b, h0 = (a.astype(jnp.float64) for a in _setup(key))
        for n in (0, 1, 3):
            check_grads(
                lambda w, b, h0, n=n: _loss(w, b, h0, n, "static", method),
                (w, b, h0),
                order=1,
                modes=["rev"],
            )


def test_scan_method_supports_forward_mode(key):
    w, b, h0 = _setup(key)
    fwd = jax.jacfwd(_loss)(w, b, h0, 2, "static", "scan")
    rev = jax.jacrev(_loss)(w, b, h0, 2, "dynamic")
    np.testing.assert_allclose(fwd, rev, rtol=1e-5, atol=1e-6)


def test_bounded_rejects_forward_mode_clearly(key):
    w, b, h0 = _setup(key)
    with pytest.raises(TypeError, match="forward-mode|jvp"):
        jax.jacfwd(_loss)(w, b, h0, 2, "static", "bounded")


@pytest.mark.parametrize("method", METHODS)
def test_vmap_over_n_and_jit_vs_eager(key, method):
    w, b, h0 = _setup(key)
    ns = jnp.array([0, 4, 1, 3])
    grads = jax.vmap(jax.grad(_loss), in_axes=(None, None, None, 0, None, None))(
        w, b, h0, ns, "static", method
    )
    for i, n in enumerate(ns.tolist()):
        np.testing.assert_allclose(
            grads[i], jax.grad(_loss)(w, b, h0, n, "dynamic"), rtol=1e-5, atol=1e-6
        )
    eager = _loss(w, b, h0, 3, "static", method)
    jitted = jax.jit(_loss, static_argnums=(4, 5))(w, b, h0, 3, "static", method)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_traced_n_is_clamped_with_checks_off(method, monkeypatch):
    # With checks on (the default) it raises: tests/test_traced_checks.py.
    monkeypatch.setenv("FUNCTORCH_LITE_CHECKS", "0")
    f = jax.jit(
        lambda n: fl.repeat(
            lambda c: c + 1.0, jnp.float32(0.0), n, max_n=3, static_method=method
        )
    )
    assert [float(f(n)) for n in (-2, 0, 2, 3, 7)] == [0.0, 0.0, 2.0, 3.0, 3.0]


def test_integer_carry_and_pytree_carry():
    def body(c):
        i, x = c
        return i + 1, {"v": x["v"] * 2.0}

    carry = (jnp.int32(0), {"v": jnp.ones(2)})
    for method in METHODS:
        i, x = jax.jit(
            lambda n, m=method: fl.repeat(body, carry, n, max_n=5, static_method=m)
        )(3)
        assert int(i) == 3
        np.testing.assert_allclose(x["v"], [8.0, 8.0])


def test_max_n_zero():
    assert float(fl.repeat(lambda c: c + 1.0, jnp.float32(1.0), 0, max_n=0)) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"mode": "eager"},
            ValueError,
            r'repeat: `mode` must be "static" or "dynamic"',
        ),
        (
            {"static_method": "while"},
            ValueError,
            r"repeat: `static_method` must be one of",
        ),
        ({"max_n": None}, TypeError, r"repeat: `max_n` must be a non-negative int"),
        ({"max_n": -1}, ValueError, r"repeat: `max_n` must be a non-negative int"),
        ({"n": 6}, ValueError, r"repeat: `n` must be an int in \[0, 5\]; got 6"),
        ({"n": 2.0}, TypeError, r"repeat: `n` must be an int; got 2.0"),
        (
            {"n": 2.0, "mode": "dynamic"},
            TypeError,
            r"repeat: `n` must be an int; got 2.0",
        ),
        (
            {"n": -1, "mode": "dynamic"},
            ValueError,
            r"repeat: `n` must be an int in \[0, 5\]",
        ),
        ({"body": 3}, TypeError, r"repeat: `body` must be callable"),
        (
            {"body": lambda c: (c, c)},
            TypeError,
            r"repeat: `body` must return a carry with the structure",
        ),
        (
            {"body": lambda c: jnp.ones(3)},
            TypeError,
            r"keep each carry leaf's shape and dtype",
        ),
    ],
)
def test_repeat_errors(kwargs, error, match):
    call = {"body": lambda c: c * 2.0, "n": 2, "max_n": 5, "mode": "static", **kwargs}
    body, n = call.pop("body"), call.pop("n")
    with pytest.raises(error, match=match):
        fl.repeat(body, jnp.ones(2), n, **call)


def test_dynamic_mode_rejects_traced_n():
    f = jax.jit(lambda n: fl.repeat(lambda c: c * 2.0, jnp.ones(2), n, mode="dynamic"))
    with pytest.raises(
        TypeError, match=r"must be a concrete Python int in the dynamic path"
    ):
        f(2)


@pytest.mark.parametrize("method", ["scan", "masked"])
def test_scan_methods_index_steps_with_a_constant(method):
    """The step indices fed to `lax.scan` are a constant of the program, not an
    iota computed when it runs (which made the DynamicNet step 1.29x slower on
    one XLA thread; bench/RESULTS.md)."""
    w = jnp.eye(3)

    def f(h, n):
        return fl.control.repeat(
            lambda c: jnp.tanh(c @ w), h, n, max_n=4, static_method=method
        )

    jaxpr = jax.make_jaxpr(jax.grad(lambda h, n: f(h, n).sum()))(jnp.ones(3), 2)

    names = primitives(jaxpr.jaxpr)
    assert "scan" in names
    assert "iota" not in names, sorted(names)
