"""Per-example depth: each row at its own depth, equal to running it alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tree_allclose

import functorch_lite as fl

X64 = jax.enable_x64(True)
DEPTHS = np.array([0, 3, 1, 2, 3, 0, 1])


def _setup(dtype=jnp.float64):
    """The net, params and data; float64 inside `X64`, else float32."""
    net = fl.models.DynamicNet(6, 5, 3, max_depth=3)
    params = jax.tree.map(lambda a: a.astype(dtype), net.init(jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (7, 6), dtype)
    y = jax.random.normal(jax.random.key(2), (7, 3), dtype)
    return net, params, x, y


def _loss(net, params, x, y, depth, mode):
    return fl.nn.mse_loss(net.apply(params, x, depth, mode=mode), y)


def _row_by_row(net, params, x, y):
    """Each row alone, at its own concrete depth: the reference."""
    outs, grads = [], []
    for r, d in enumerate(DEPTHS):
        xr, yr = x[r : r + 1], y[r : r + 1]
        outs.append(net.apply(params, xr, int(d), mode="dynamic")[0])
        grads.append(
            jax.grad(
                lambda p, xr=xr, yr=yr, d=d: _loss(net, p, xr, yr, int(d), "dynamic")
            )(params)
        )
    return jnp.stack(outs), jax.tree.map(lambda *g: sum(g), *grads)


@pytest.mark.parametrize("method", fl.control.STATIC_METHODS)
def test_static_per_example_equals_each_row_alone(method):
    with X64:
        net, params, x, y = _setup()
        net = fl.models.DynamicNet(6, 5, 3, max_depth=3, static_method=method)
        ref_out, ref_grad = _row_by_row(net, params, x, y)
        run = jax.jit(jax.value_and_grad(lambda p, d: _loss(net, p, x, y, d, "static")))
        out = jax.jit(lambda p, d: net.apply(p, x, d))(params, jnp.asarray(DEPTHS))
        np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-14)
        _, grad = run(params, jnp.asarray(DEPTHS))
        tree_allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_dynamic_per_example_groups_rows_and_equals_each_row_alone():
    with X64:
        net, params, x, y = _setup()
        ref_out, ref_grad = _row_by_row(net, params, x, y)
        out = net.apply(params, x, DEPTHS, mode="dynamic")
        np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-14)
        grad = jax.grad(lambda p: _loss(net, p, x, y, DEPTHS, "dynamic"))(params)
        tree_allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_repeat_per_example_both_modes():
    w = jnp.array([[0.5, -0.2], [0.3, 0.9]])
    h0 = jnp.arange(8.0).reshape(4, 2) / 8
    n = np.array([2, 0, 3, 1])
    body = lambda h: jnp.tanh(h @ w)  # noqa: E731
    static = fl.repeat(body, h0, jnp.asarray(n), max_n=3)
    dynamic = fl.repeat(body, h0, n, mode="dynamic")
    for r in range(4):
        alone = fl.repeat(body, h0[r : r + 1], int(n[r]), mode="dynamic")
        np.testing.assert_allclose(static[r], alone[0], rtol=1e-6)
        np.testing.assert_allclose(dynamic[r], alone[0], rtol=1e-6)


def test_one_compile_across_depth_patterns():
    net, params, x, y = _setup(jnp.float32)
    opt = optax.sgd(1e-3, momentum=0.9)
    step = fl.train.make_step(
        lambda p, x, y, depth: _loss(net, p, x, y, depth, "static"), opt
    )
    state = opt.init(params)
    rng = np.random.default_rng(0)
    for _ in range(6):
        depths = jnp.asarray(rng.integers(0, 4, size=7), jnp.int32)
        params, state, loss = step(params, state, x, y, depths)
        assert np.isfinite(float(loss))
    assert step.stats.traces == 1 and step.stats.compiles == 1


def test_make_step_per_example_equals_optax_by_hand():
    net, params, x, y = _setup(jnp.float32)
    opt = optax.sgd(1e-2, momentum=0.9)
    loss = lambda p, x, y, depth: _loss(net, p, x, y, depth, "static")  # noqa: E731
    step = fl.train.make_step(loss, opt, donate=False)
    depths = jnp.asarray(DEPTHS, jnp.int32)
    new, _, _ = step(params, opt.init(params), x, y, depths)
    g = jax.grad(loss)(params, x, y, depths)
    upd, _ = opt.update(g, opt.init(params), params)
    tree_allclose(new, optax.apply_updates(params, upd), rtol=1e-6, atol=1e-7)


def test_fused_step_draws_per_example_depths_in_graph():
    net, params, x, y = _setup(jnp.float32)
    opt = optax.sgd(1e-3, momentum=0.9)

    def loss(p, x, y, key):
        depths = jax.random.randint(key, (x.shape[0],), 0, net.max_depth + 1)
        return _loss(net, p, x, y, depths, "static")

    fused = fl.train.make_fused_step(
        loss, opt, shared_argnames=("x", "y"), donate=False
    )
    keys = jax.random.split(jax.random.key(3), 5)
    p_fused, _, losses = fused(params, opt.init(params), x, y, keys)
    # The same five steps, one at a time, with the same keys.
    step = fl.train.make_step(loss, opt, donate=False)
    p, s = params, opt.init(params)
    ref = []
    for k in keys:
        p, s, lo = step(p, s, x, y, k)
        ref.append(lo)
    np.testing.assert_allclose(losses, jnp.stack(ref), rtol=1e-5)
    tree_allclose(p_fused, p, rtol=1e-5, atol=1e-6)
    assert fused.stats.compiles == 1


def test_fit_takes_per_example_depths():
    net, params, x, y = _setup(jnp.float32)
    opt = optax.sgd(1e-3, momentum=0.9)
    step = fl.train.make_step(
        lambda p, x, y, depth: _loss(net, p, x, y, depth, "static"), opt
    )
    rng = np.random.default_rng(1)
    batches = [(x, y, jnp.asarray(rng.integers(0, 4, 7), jnp.int32)) for _ in range(4)]
    _, _, losses = fl.train.fit(step, params, opt.init(params), batches, progress=False)
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert step.stats.compiles == 1


# --- bad input ---------------------------------------------------------------


def test_per_example_depth_errors():
    net, params, x, _ = _setup(jnp.float32)
    with pytest.raises(
        ValueError,
        match=r"DynamicNet.apply: a per-example `depth` of "
        r"shape \(6,\) needs a leading batch axis of size 6",
    ):
        net.apply(params, x, jnp.zeros(6, jnp.int32))
    with pytest.raises(
        TypeError,
        match=r"DynamicNet.apply: a per-example `depth` must"
        r" be an integer array.*float32",
    ):
        net.apply(params, x, jnp.zeros(7, jnp.float32))
    with pytest.raises(
        ValueError,
        match=r"DynamicNet.apply: every `depth` must be in "
        r"\[0, 3\]; got 4 at row 2",
    ):
        net.apply(params, x, jnp.array([0, 1, 4, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"every `depth` must be in \[0, 3\]; got -1"):
        net.apply(params, x, np.array([0, 1, 1, 0, 0, -1, 0]), mode="dynamic")
    with pytest.raises(
        TypeError,
        match=r"per-example `depth` must be concrete in the "
        r"dynamic path",
    ):
        jax.jit(lambda d: net.apply(params, x, d, mode="dynamic"))(
            jnp.zeros(7, jnp.int32)
        )
    with pytest.raises(ValueError, match=r"needs `x` of shape \(N, 6\)"):
        net.apply(params, x[0], jnp.zeros(1, jnp.int32))


def test_repeat_per_example_needs_a_batch_axis_on_every_leaf():
    with pytest.raises(
        ValueError,
        match=r"repeat: a per-example `n` of shape \(3,\) "
        r"needs a leading batch axis of size 3 on every carry leaf; "
        r"leaf \[1\] has shape \(\)",
    ):
        fl.repeat(
            lambda c: c, (jnp.ones(3), jnp.float32(0)), jnp.ones(3, jnp.int32), max_n=2
        )


def test_traced_out_of_range_per_example_depth_gives_nan_rows(monkeypatch):
    # With checks off; with them on it raises (tests/test_traced_checks.py).
    monkeypatch.setenv("FUNCTORCH_LITE_CHECKS", "0")
    net, params, x, _ = _setup(jnp.float32)
    out = jax.jit(lambda d: net.apply(params, x, d))(jnp.array([0, 1, 9, 2, 3, -1, 1]))
    bad = np.isnan(np.asarray(out)).all(axis=1)
    assert bad.tolist() == [False, False, True, False, False, True, False]
