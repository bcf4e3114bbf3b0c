"""`fl.while_loop` and the bounded-loop core: values and gradients of every order.

References: the unrolled Python loop of the same length, finite differences in
float64, and the `"scan"` mechanism (JAX's own reverse mode through `lax.scan`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tree_allclose
from jax.test_util import check_grads

import functorch_lite as fl
from functorch_lite import _loop

X64 = jax.enable_x64(True)


def _newton(a, tol=1e-10, max_steps=64, checkpoints=None):
    return fl.while_loop(
        lambda x: jnp.abs(x * x - a) > tol,
        lambda x: 0.5 * (x + a / x),
        a,
        max_steps=max_steps,
        checkpoints=checkpoints,
        return_steps=True,
    )


def _newton_unrolled(a, steps):
    x = a
    for _ in range(steps):
        x = 0.5 * (x + a / x)
    return x


@pytest.mark.parametrize("a", [2.0, 9.0, 1e4])
@pytest.mark.parametrize("checkpoints", [None, 3])
def test_newton_sqrt_value_and_grad(a, checkpoints):
    with X64:
        a = jnp.float64(a)
        x, steps = _newton(a, checkpoints=checkpoints)
        steps = int(steps)
        assert 0 < steps < 64
        np.testing.assert_allclose(x, np.sqrt(float(a)), rtol=1e-10)
        g = jax.grad(lambda a: _newton(a, checkpoints=checkpoints)[0])(a)
        g_unrolled = jax.grad(_newton_unrolled)(a, steps)
        np.testing.assert_allclose(g, g_unrolled, rtol=1e-12)
        # The unrolled loop converged, so its gradient is the analytic one.
        np.testing.assert_allclose(g, 0.5 / np.sqrt(float(a)), rtol=1e-8)


def _shared_weights(key):
    kw, kb, kh = jax.random.split(key, 3)
    w = 0.4 * jax.random.normal(kw, (5, 5), jnp.float64)
    b = 0.1 * jax.random.normal(kb, (5,), jnp.float64)
    h0 = jax.random.normal(kh, (3, 5), jnp.float64)
    return w, b, h0


def _until_small(w, b, h0, *, max_steps=12, checkpoints=None, steps=False):
    """Weight sharing: the body closes over `w` and `b`; stops on a norm test."""
    h, n = fl.while_loop(
        lambda c: jnp.sum(c["h"] ** 2) > 0.7,
        lambda c: {"h": jnp.tanh(c["h"] @ w + b[None]) * 0.8, "i": c["i"] + 1},
        {"h": h0, "i": jnp.int32(0)},  # an integer leaf rides along
        max_steps=max_steps,
        checkpoints=checkpoints,
        return_steps=True,
    )
    assert h["i"].dtype == jnp.int32
    return (jnp.sum(h["h"] ** 3), n) if steps else jnp.sum(h["h"] ** 3)


def _until_small_unrolled(w, b, h0, steps):
    h = h0
    for _ in range(steps):
        h = jnp.tanh(h @ w + b[None]) * 0.8
    return jnp.sum(h**3)


@pytest.mark.parametrize("checkpoints", [None, 1, 2, 5])
def test_weight_sharing_equals_unrolled_and_finite_differences(key, checkpoints):
    with X64:
        w, b, h0 = _shared_weights(key)
        val, steps = _until_small(w, b, h0, checkpoints=checkpoints, steps=True)
        steps = int(steps)
        assert 1 < steps < 12, steps
        np.testing.assert_allclose(val, _until_small_unrolled(w, b, h0, steps))
        grad = jax.jit(
            jax.grad(lambda *a: _until_small(*a, checkpoints=checkpoints), (0, 1, 2))
        )(w, b, h0)
        ref = jax.grad(_until_small_unrolled, (0, 1, 2))(w, b, h0, steps)
        tree_allclose(grad, ref, rtol=1e-12, atol=1e-14)
        # Finite differences: the step count is locally constant at this point.
        check_grads(
            lambda w, b: _until_small(w, b, h0, checkpoints=checkpoints),
            (w, b),
            order=1,
            modes=["rev"],
            eps=1e-6,
        )


def test_checkpoints_give_bitwise_identical_float64_gradients(key):
    with X64:
        w, b, h0 = _shared_weights(key)
        grads = [
            jax.jit(
                jax.grad(lambda *a, k=k: _until_small(*a, checkpoints=k), (0, 1, 2))
            )(w, b, h0)
            for k in (None, 1, 2, 3, 12)
        ]
        for g in grads[1:]:
            for x, y in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(g), strict=True):
                np.testing.assert_array_equal(x, y)


def test_checkpoints_float32_gradients_close(key):
    with X64:
        w, b, h0 = _shared_weights(key)
    w, b, h0 = (jnp.asarray(np.asarray(a), jnp.float32) for a in (w, b, h0))
    g0 = jax.grad(lambda *a: _until_small(*a), (0, 1))(w, b, h0)
    g3 = jax.grad(lambda *a: _until_small(*a, checkpoints=3), (0, 1))(w, b, h0)
    tree_allclose(g0, g3, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("checkpoints", [None, 2])
def test_second_order_through_a_vmapped_loop_with_per_example_counts(checkpoints):
    """grad of grad, and the Hessian, of a loss over a vmapped `while_loop` whose
    rows run different step counts, against each row's loop unrolled alone.

    The rows that finish first keep going through the batch's steps. Row 0
    starts at 0, where `sqrt(h * w)` has an infinite derivative, and runs no step:
    its share of the gradient must be exactly what running no step gives, not a
    `nan` from the steps it skips. A PRNG key rides in the carry.
    """
    with X64:
        xs = jnp.array([0.0, 0.4, 0.9, 1.7])
        ns = (0, 1, 3, 5)

        def looped(w, x, n):
            def body(c):
                i, h, k = c
                k, sub = jax.random.split(k)
                noise = 1e-3 * jax.random.normal(sub, dtype=jnp.float64)
                return i + 1, jnp.sqrt(h * w) + noise * w, k

            init = (0, x, jax.random.key(3))
            _, h, _ = fl.while_loop(
                lambda c: c[0] < n, body, init, max_steps=6, checkpoints=checkpoints
            )
            return h**2 + h

        def unrolled(w, x, n):  # each row alone, exactly its n steps
            h, k = x, jax.random.key(3)
            for _ in range(n):
                k, sub = jax.random.split(k)
                noise = 1e-3 * jax.random.normal(sub, dtype=jnp.float64)
                h = jnp.sqrt(h * w) + noise * w
            return h**2 + h

        def batched(w):
            return jnp.sum(jax.vmap(looped, (None, 0, 0))(w, xs, jnp.array(ns)))

        def reference(w):
            return sum(unrolled(w, x, n) for x, n in zip(xs, ns, strict=True))

        w = jnp.float64(0.8)
        for order in (jax.grad, lambda f: jax.grad(jax.grad(f)), jax.hessian):
            got, want = order(batched)(w), order(reference)(w)
            assert np.isfinite(got), got
            np.testing.assert_allclose(got, want, rtol=1e-12)


def test_collectives_in_the_body_under_a_named_vmap():
    """A body that calls `jax.lax.pmean` over a `vmap` axis name: the value is
    the unrolled loop's, rows stopping at different steps included; reverse
    mode says clearly that it is not supported (it gave an unbound-axis error
    from inside JAX; binding the axis again gave a wrong gradient when the rows
    ran different step counts, since a stopped row still feeds the collective)."""
    with X64:
        xs = jnp.linspace(0.1, 1.0, 4)
        ns = jnp.array([1, 3, 3, 2])

        def looped(w, x, n):
            def body(c):
                i, h = c
                h = jnp.tanh(h * w)
                return i + 1, h - 0.5 * jax.lax.pmean(h, "batch")

            _, h = fl.while_loop(lambda c: c[0] < n, body, (0, x), max_steps=5)
            return jnp.sum(h**2)

        def unrolled(w, x, n):  # every row computes each step, as under vmap
            h = x
            for k in range(5):
                new = jnp.tanh(h * w)
                new = new - 0.5 * jax.lax.pmean(new, "batch")
                h = jnp.where(k < n, new, h)
            return jnp.sum(h**2)

        def total(fun):
            def loss(w):
                per_row = jax.vmap(fun, (None, 0, 0), axis_name="batch")
                return jnp.sum(per_row(w, xs, ns))

            return loss

        w = jnp.float64(0.7)
        np.testing.assert_allclose(total(looped)(w), total(unrolled)(w), rtol=1e-12)
        with pytest.raises(
            NotImplementedError,
            match=r"while_loop: reverse mode through a loop whose body calls a "
            r"collective over the named axis 'batch'",
        ):
            jax.grad(total(looped))(w)


def test_halting_under_vmap_each_example_stops_on_its_own(key):
    """A halting loop: each example of the vmap batch stops at its own step."""
    with X64:
        w = 0.3 * jax.random.normal(key, (4, 4), jnp.float64)
        xs = jnp.array(
            [[0.1, 0.0, 0.0, 0.0], [1.0, 2.0, 0.5, 0.0], [3.0, -3.0, 2.0, 1.0]]
        )

        def run(x, w):
            c, n = fl.while_loop(
                lambda c: jnp.sum(c**2) > 0.05,
                lambda c: 0.6 * jnp.tanh(c @ w),
                x,
                max_steps=40,
                return_steps=True,
            )
            return jnp.sum(jnp.sin(c)), n

        vals, steps = jax.vmap(run, in_axes=(0, None))(xs, w)
        assert len(set(np.asarray(steps).tolist())) == 3, steps
        g_batched = jax.vmap(jax.grad(lambda x, w: run(x, w)[0], (0, 1)), (0, None))(
            xs, w
        )
        for r in range(3):
            val, n = run(xs[r], w)
            assert int(n) == int(steps[r])
            np.testing.assert_allclose(vals[r], val, rtol=1e-13)
            g_alone = jax.grad(lambda x, w: run(x, w)[0], (0, 1))(xs[r], w)
            tree_allclose((g_batched[0][r], g_batched[1][r]), g_alone, rtol=1e-12)

            def unrolled(x, w, n=int(n)):
                for _ in range(n):
                    x = 0.6 * jnp.tanh(x @ w)
                return jnp.sum(jnp.sin(x))

            tree_allclose(g_alone, jax.grad(unrolled, (0, 1))(xs[r], w), rtol=1e-12)


def test_max_steps_reached_static_stops_and_reports(key):
    out, steps = fl.while_loop(
        lambda c: c < 100.0, lambda c: c + 1.0, 0.0, max_steps=7, return_steps=True
    )
    assert float(out) == 7.0 and int(steps) == 7


def test_dynamic_mode_matches_static_and_raises_at_max_steps():
    out, steps = fl.while_loop(
        lambda c: c < 10.0,
        lambda c: c * 2.0,
        1.0,
        max_steps=8,
        mode="dynamic",
        return_steps=True,
    )
    ref, ref_steps = fl.while_loop(
        lambda c: c < 10.0, lambda c: c * 2.0, 1.0, max_steps=8, return_steps=True
    )
    assert (float(out), steps) == (float(ref), int(ref_steps)) == (16.0, 4)
    with pytest.raises(RuntimeError, match=r"while_loop: `cond_fun` was still true"):
        fl.while_loop(
            lambda c: c < 100.0, lambda c: c + 1.0, 0.0, max_steps=3, mode="dynamic"
        )


def test_dynamic_mode_refuses_a_traced_condition():
    f = jax.jit(
        lambda x: fl.while_loop(
            lambda c: c < 3.0, lambda c: c + 1.0, x, max_steps=8, mode="dynamic"
        )
    )
    with pytest.raises(TypeError, match=r'while_loop: .*traced.*mode="static"'):
        f(0.0)


def test_one_compile_for_every_trip_count():
    f = fl.jit(
        jax.grad(
            lambda a: fl.while_loop(
                lambda x: jnp.abs(x * x - a) > 1e-4,
                lambda x: 0.5 * (x + a / x),
                a,
                max_steps=64,
            )
        )
    )
    for a in (1.5, 4.0, 1e3, 1e6):
        f(jnp.float32(a))
    assert f.stats.traces == 1 and f.stats.compiles == 1


# --- second order and composition -------------------------------------------


def _loss_methods(w, b, h0, n, method):
    out = fl.repeat(
        lambda h: jnp.tanh(h @ w + b[None]), h0, n, max_n=5, static_method=method
    )
    return jnp.sum(out**3)


@pytest.mark.parametrize("n", [0, 2, 5])
def test_grad_of_grad_and_double_reverse_hvp_equal_scan(key, n):
    with X64:
        w, b, h0 = _shared_weights(key)
        v = jax.random.normal(jax.random.key(7), w.shape, jnp.float64)

        @functools.partial(jax.jit, static_argnums=0)  # one program each
        def second_order(method, w):
            def loss(w):
                return _loss_methods(w, b, h0, n, method)

            g = jax.grad(loss)
            gg = jax.grad(lambda w: jnp.sum(g(w) ** 2))(w)
            hvp_rev_rev = jax.grad(lambda w: jnp.vdot(g(w), v))(w)
            return gg, hvp_rev_rev, jax.hessian(loss)(w)

        (gg, hvp, h), (gg_ref, hvp_ref, h_ref) = (
            second_order(m, w) for m in ("bounded", "scan")
        )
        tree_allclose(gg, gg_ref, rtol=1e-11, atol=1e-13)
        tree_allclose(hvp, hvp_ref, rtol=1e-11, atol=1e-13)
        tree_allclose(h, h_ref, rtol=1e-10, atol=1e-12)


def test_second_order_through_while_loop_checkpoints(key):
    with X64:
        w, b, h0 = _shared_weights(key)
        steps = int(_until_small(w, b, h0, steps=True)[1])
        g_ref = jax.grad(lambda w: _until_small_unrolled(w, b, h0, steps))
        gg_ref = jax.grad(lambda w: jnp.sum(g_ref(w) ** 2))(w)
        for k in (None, 2):
            g = jax.grad(lambda w, k=k: _until_small(w, b, h0, checkpoints=k))
            gg = jax.grad(lambda w, g=g: jnp.sum(g(w) ** 2))(w)
            tree_allclose(gg, gg_ref, rtol=1e-11, atol=1e-13)


def test_maml_gradient_through_an_inner_step(key):
    """`jax.grad` of a loss after one inner optimizer step (MAML-style)."""
    with X64:
        net = fl.models.DynamicNet(4, 6, 2, max_depth=3)
        params = jax.tree.map(
            lambda a: a.astype(jnp.float64), net.init(jax.random.key(1))
        )
        x = jax.random.normal(key, (5, 4), jnp.float64)
        y = jax.random.normal(jax.random.key(2), (5, 2), jnp.float64)
        opt = optax.sgd(0.1)
        outer = {}
        for method in ("bounded", "scan"):
            net_m = fl.models.DynamicNet(4, 6, 2, max_depth=3, static_method=method)

            def loss(p, net_m=net_m):
                return fl.nn.mse_loss(net_m.apply(p, x, 2), y)

            def meta(p, loss=loss):
                g = jax.grad(loss)(p)
                upd, _ = opt.update(g, opt.init(p), p)
                return loss(optax.apply_updates(p, upd))

            outer[method] = jax.jit(jax.grad(meta))(params)
        tree_allclose(outer["bounded"], outer["scan"], rtol=1e-11, atol=1e-13)


# --- memory ------------------------------------------------------------------


def _grad_temp_bytes(max_steps, checkpoints, carry_shape=(64, 64)):
    w = jnp.ones((carry_shape[1], carry_shape[1]), jnp.float32) * 0.01

    def loss(w, h0):
        h = fl.while_loop(
            lambda c: jnp.sum(c) > 0.0,
            lambda c: jnp.tanh(c @ w),
            h0,
            max_steps=max_steps,
            checkpoints=checkpoints,
        )
        return jnp.sum(h)

    h0 = jnp.ones(carry_shape, jnp.float32)
    compiled = jax.jit(jax.grad(loss)).lower(w, h0).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_saved_memory_is_pinned(monkeypatch):
    """checkpoints=None stores each step's residuals while all of them fit the
    4 MiB budget: for `tanh(c @ w)` the carry, `tanh` and `1 - tanh` (three
    16 KiB arrays a step, no recomputed forward); past the budget, or with
    residuals off, one carry per step."""
    carry = 64 * 64 * 4
    bounds = {32: 3, 128: 1}  # 32 * 48 KiB fits 4 MiB, 128 * 48 KiB does not
    for m, per_step in bounds.items():
        temp = _grad_temp_bytes(m, None)
        assert m * per_step * carry <= temp <= (m * per_step + 24) * carry, (m, temp)
    monkeypatch.setattr(_loop, "_STORE_RESIDUALS", False)
    temp = _grad_temp_bytes(32, None)
    assert 32 * carry <= temp <= (32 + 24) * carry, temp


def test_checkpointed_memory_grows_with_k_not_max_steps(monkeypatch):
    monkeypatch.setattr(_loop, "_STORE_RESIDUALS", False)  # carries at both sizes
    carry = 64 * 64 * 4
    full = [_grad_temp_bytes(m, None) for m in (64, 256)]
    assert full[1] > full[0] + 150 * carry  # grows with max_steps
    k4 = [_grad_temp_bytes(m, 4) for m in (64, 256)]
    # k + max_steps/k carries: 4 + 16 at 64, 4 + 64 at 256; never max_steps.
    for m, temp in zip((64, 256), k4, strict=True):
        assert temp <= (4 + m // 4 + 24) * carry, (m, temp)
    assert k4[1] < full[1] / 3


def test_long_loops_keep_memory_sublinear():
    """Large carries past the direct budget: first steps + sqrt(max) checkpoints."""
    temp = _grad_temp_bytes(4096, None, carry_shape=(128, 128))
    carry = 128 * 128 * 4
    assert temp < 300 * carry, temp  # storing every step would be 4096 carries


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cond", "match"),
    [
        (lambda c: c, r"`cond_fun` must return a boolean scalar; got shape \(3,\)"),
        (lambda c: jnp.sum(c), r"`cond_fun` must return a boolean scalar.*float32"),
    ],
)
def test_bad_cond(cond, match):
    with pytest.raises(TypeError, match="while_loop: " + match):
        fl.while_loop(cond, lambda c: c, jnp.ones(3), max_steps=3)


def test_body_must_keep_the_carry():
    with pytest.raises(TypeError, match=r"while_loop: `body_fun` must return a carry"):
        fl.while_loop(lambda c: c[0] > 0, lambda c: (c[0],), (1.0, 2.0), max_steps=3)
    with pytest.raises(TypeError, match=r"while_loop: `body_fun` must keep each"):
        fl.while_loop(
            lambda c: jnp.all(c > 0), lambda c: c[:2], jnp.ones(3), max_steps=3
        )
    with pytest.raises(TypeError, match=r"while_loop: `body_fun` must keep each"):
        fl.while_loop(
            lambda c: jnp.all(c > 0),
            lambda c: c.astype(jnp.int32),
            jnp.ones(3),
            max_steps=3,
        )


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"max_steps": 0}, ValueError, r"`max_steps` must be a positive int"),
        ({"max_steps": 2.5}, TypeError, r"`max_steps` must be a positive int"),
        ({"max_steps": 4, "checkpoints": 0}, ValueError, r"`checkpoints` must be"),
        ({"max_steps": 4, "checkpoints": "2"}, TypeError, r"`checkpoints` must be"),
        ({"max_steps": 4, "mode": "eager"}, ValueError, r"`mode` must be"),
    ],
)
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match="while_loop: " + match):
        fl.while_loop(lambda c: c < 3.0, lambda c: c + 1.0, 0.0, **kwargs)


def test_forward_mode_through_while_loop_names_the_fix():
    def f(a):
        return fl.while_loop(
            lambda x: jnp.abs(x * x - a) > 1e-5,
            lambda x: 0.5 * (x + a / x),
            a,
            max_steps=32,
        )

    with pytest.raises(TypeError, match=r"jvp: Forward mode .*`fl.while_loop`.*jacrev"):
        fl.transforms.jvp(f, (2.0,), (1.0,))
    # Forward-over-reverse works: it equals the unrolled loop's Hessian.
    steps = int(
        fl.while_loop(
            lambda x: jnp.abs(x * x - 2.0) > 1e-5,
            lambda x: 0.5 * (x + 2.0 / x),
            2.0,
            max_steps=32,
            return_steps=True,
        )[1]
    )
    want = jax.hessian(lambda a: _newton_unrolled(a, steps))(2.0)
    np.testing.assert_allclose(jax.hessian(f)(2.0), want, rtol=1e-5)


def test_maml_gradient_through_a_make_step_step():
    """`jax.grad` through a compiled `make_step` step, bounded equal to scan."""
    with X64:
        x = jax.random.normal(jax.random.key(4), (5, 4), jnp.float64)
        y = jax.random.normal(jax.random.key(5), (5, 2), jnp.float64)
        opt = optax.sgd(0.1, momentum=0.9)
        grads = {}
        for method in ("bounded", "scan"):
            net = fl.models.DynamicNet(4, 6, 2, max_depth=3, static_method=method)
            params = jax.tree.map(
                lambda a: a.astype(jnp.float64), net.init(jax.random.key(1))
            )

            def loss(p, x, y, depth, net=net):
                return fl.nn.mse_loss(net.apply(p, x, depth), y)

            step = fl.train.make_step(loss, opt, donate=False)

            def meta(p, step=step, loss=loss):
                new, _, _ = step(p, opt.init(p), x, y, 2)
                return loss(new, x, y, 2)

            grads[method] = jax.grad(meta)(params)
        tree_allclose(grads["bounded"], grads["scan"], rtol=1e-11, atol=1e-13)
        assert float(jnp.abs(grads["bounded"]["middle_linear"]["weight"]).sum()) > 0


# --- stored residuals --------------------------------------------------------


def _tanh_grad_hlo(m: int) -> str:
    w = jnp.ones((8, 8), jnp.float32) * 0.1

    def loss(w, h0):
        h = fl.while_loop(
            lambda c: jnp.sum(c) > 0.0, lambda c: jnp.tanh(c @ w), h0, max_steps=m
        )
        return jnp.sum(h)

    return jax.jit(jax.grad(loss)).lower(w, jnp.ones((4, 8))).compile().as_text()


def test_reverse_pass_recomputes_no_forward_step(monkeypatch):
    """With residuals stored, the compiled gradient evaluates `tanh` once (the
    forward loop); storing carries, the reverse loop evaluates it again."""
    assert _tanh_grad_hlo(16).count(" tanh(") == 1
    monkeypatch.setattr(_loop, "_STORE_RESIDUALS", False)
    assert _tanh_grad_hlo(16).count(" tanh(") == 2


@jax.custom_vjp
def _clipped_square(x):
    return x * x


_clipped_square.defvjp(
    lambda x: (x * x, x), lambda x, g: (jnp.clip(2.0 * x * g, -1.0, 1.0),)
)


def _mixed_scan(w, u, b, h0, xs, n):
    """A body with everything a pullback can hold: closed-over weights, an
    integer counter in the carry, the step index, a per-step input and output,
    a mask, a user `custom_vjp`, and a constant made inside the body."""

    def body(i, carry, x):
        h, count = carry
        pre = h @ w + x @ u + (b * (i + 1).astype(h.dtype))[None, :]
        h = jnp.where(pre > 0, pre, 0.1 * pre) + jnp.full(h.shape, 0.01, h.dtype)
        h = jnp.tanh(h) + 0.1 * _clipped_square(h)
        return (h, count + 1), jnp.sum(h * h, axis=-1)

    (h, count), ys = _loop.bounded_scan(
        body, (h0, jnp.int32(0)), xs, length=n, max_steps=xs.shape[0]
    )
    weights = jnp.arange(1, ys.shape[0] + 1, dtype=ys.dtype)
    return jnp.sum(h) + jnp.sum(ys * weights[:, None]) + count.astype(h.dtype)


def _mixed_unrolled(w, u, b, h0, xs, n):
    h, total = h0, 0.0
    for i in range(n):
        pre = h @ w + xs[i] @ u + (b * (i + 1))[None, :]
        h = jnp.where(pre > 0, pre, 0.1 * pre) + 0.01
        h = jnp.tanh(h) + 0.1 * _clipped_square(h)
        total = total + (i + 1) * jnp.sum(h * h)
    return jnp.sum(h) + total + n


@pytest.mark.parametrize("n", [0, 1, 4, 6])
def test_stored_residuals_match_recomputation_and_unrolled(key, n, monkeypatch):
    with X64:
        ks = jax.random.split(key, 5)
        args = (
            0.4 * jax.random.normal(ks[0], (5, 5)),
            0.4 * jax.random.normal(ks[1], (3, 5)),
            0.1 * jax.random.normal(ks[2], (5,)),
            jax.random.normal(ks[3], (2, 5)),
            jax.random.normal(ks[4], (6, 2, 3)),
        )
        argnums = (0, 1, 2, 3, 4)
        ref = jax.grad(_mixed_unrolled, argnums)(*args, n)
        stored = jax.jit(jax.grad(_mixed_scan, argnums), static_argnums=5)(*args, n)
        traced_n = jax.jit(jax.grad(_mixed_scan, argnums))(*args, n)
        monkeypatch.setattr(_loop, "_STORE_RESIDUALS", False)
        recomputed = jax.jit(jax.grad(_mixed_scan, argnums))(*args, n)
        tree_allclose(stored, ref, rtol=1e-12, atol=1e-12)
        tree_allclose(traced_n, ref, rtol=1e-12, atol=1e-12)
        tree_allclose(recomputed, ref, rtol=1e-12, atol=1e-12)


def test_stored_residuals_second_order_and_vmap(key):
    """Grad of grad and vmap through the stored-residual path, against the
    unrolled loop."""
    with X64:
        ks = jax.random.split(key, 5)
        w, u, b, h0, xs = (
            0.4 * jax.random.normal(ks[0], (5, 5)),
            0.4 * jax.random.normal(ks[1], (3, 5)),
            0.1 * jax.random.normal(ks[2], (5,)),
            jax.random.normal(ks[3], (2, 5)),
            jax.random.normal(ks[4], (6, 2, 3)),
        )

        def outer(f):
            return lambda w: jnp.sum(jax.grad(f)(w, u, b, h0, xs, 4) ** 2)

        tree_allclose(
            jax.jit(jax.grad(outer(_mixed_scan)))(w),
            jax.grad(outer(_mixed_unrolled))(w),
            rtol=1e-10,
            atol=1e-12,
        )
        h0s = jnp.stack([h0, h0 + 1.0, -h0])
        g = jax.jit(jax.vmap(jax.grad(_mixed_scan, 3), (None, None, None, 0, None, 0)))(
            w, u, b, h0s, xs, jnp.array([0, 3, 6], jnp.int32)
        )
        for r, n in enumerate((0, 3, 6)):
            tree_allclose(
                g[r], jax.grad(_mixed_unrolled, 3)(w, u, b, h0s[r], xs, n), rtol=1e-12
            )


def test_nested_loops_store_residuals_and_match_unrolled(key):
    """An inner loop inside the outer body: the inner loop's own stored
    residuals become the outer step's residuals. Gradient and Hessian against
    the unrolled loops, float64."""

    def nested(w, h, n, m):
        def outer_body(c):
            inner = fl.repeat(lambda d: jnp.tanh(d @ w), c, m, max_n=4)
            return inner * 0.9 + 0.1

        return jnp.sum(fl.repeat(outer_body, h, n, max_n=3) ** 2)

    def unrolled(w, h, n, m):
        for _ in range(n):
            c = h
            for _ in range(m):
                c = jnp.tanh(c @ w)
            h = c * 0.9 + 0.1
        return jnp.sum(h**2)

    with X64:
        w = 0.5 * jax.random.normal(key, (4, 4))
        h = jax.random.normal(jax.random.key(1), (2, 4))
        for n, m in [(0, 2), (2, 3), (3, 4), (1, 0)]:
            tree_allclose(
                jax.jit(jax.grad(nested, (0, 1)), static_argnums=(2, 3))(w, h, n, m),
                jax.grad(unrolled, (0, 1))(w, h, n, m),
                rtol=1e-12,
                atol=1e-14,
            )
        tree_allclose(
            jax.jit(jax.hessian(nested), static_argnums=(2, 3))(w, h, 2, 3),
            jax.hessian(unrolled)(w, h, 2, 3),
            rtol=1e-10,
            atol=1e-12,
        )


def test_residuals_made_from_weights_count_against_the_budget(monkeypatch):
    """A residual computed from the weights alone (here `0.5 * w`, 4 MiB) is
    kept once, and counts against the 4 MiB budget: with it the loop stores
    carries, and the compiled gradient needs no more memory than the
    recomputing loop. An index array the body closes over is read where it
    is, not copied."""
    w = jnp.eye(1024, dtype=jnp.float32) * 0.3
    idx = jnp.arange(1024, dtype=jnp.int32)[::-1]

    def loss(w, h0):
        h = fl.repeat(lambda h: jnp.tanh(h[:, idx] @ (0.5 * w)), h0, 3, max_n=16)
        return jnp.sum(h)

    def temp() -> int:
        compiled = jax.jit(jax.grad(loss)).lower(w, jnp.ones((2, 1024))).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    stored = temp()
    monkeypatch.setattr(_loop, "_STORE_RESIDUALS", False)
    recomputed = temp()
    assert stored <= recomputed + 2**16, (stored, recomputed)
    with X64:
        h0 = jax.random.normal(jax.random.key(0), (2, 1024))
        w64 = w.astype(jnp.float64)
        g = jax.grad(loss)(w64, h0)

        def unrolled(w):
            h = h0
            for _ in range(3):
                h = jnp.tanh(h[:, idx] @ (0.5 * w))
            return jnp.sum(h)

        tree_allclose(g, jax.grad(unrolled)(w64), rtol=1e-12, atol=1e-14)
