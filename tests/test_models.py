"""DynamicNet and TwoLayerNet: float64 references, static/dynamic parity, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    dynamic_net_forward_np,
    dynamic_net_grads_np,
    primitives,
    to_f64,
    tree_allclose,
)
from jax.test_util import check_grads

import functorch_lite as fl

METHODS = fl.control.STATIC_METHODS


def _ks_statistic(samples, cdf):
    """The one-sample Kolmogorov-Smirnov statistic of `samples` against `cdf`."""
    x = np.sort(np.asarray(samples, np.float64).ravel())
    n = x.size
    f = cdf(x)
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(0, n) / n))


def _ks_bound(n):
    # Asymptotic 0.1% critical value: 1.95 / sqrt(n).
    return 1.95 / np.sqrt(n)


def _uniform_cdf(bound):
    return lambda x: np.clip((x + bound) / (2 * bound), 0.0, 1.0)


def _normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _data(key, n=8, d_in=6, d_out=3):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, d_in)), jax.random.normal(ky, (n, d_out))


def _loss(net, mode):
    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth, mode=mode), y)

    return loss_fn


def test_dynamic_net_params_shapes_and_dtypes(key):
    params = fl.models.DynamicNet(1000, 100, 10).init(key)
    shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), params)
    assert shapes == {
        "input_linear": {
            "weight": ((1000, 100), "float32"),
            "bias": ((100,), "float32"),
        },
        "middle_linear": {
            "weight": ((100, 100), "float32"),
            "bias": ((100,), "float32"),
        },
        "output_linear": {"weight": ((100, 10), "float32"), "bias": ((10,), "float32")},
    }


def test_dynamic_net_init_is_torch_default_and_deterministic(key):
    net = fl.models.DynamicNet(400, 50, 10)
    a, b = net.init(key), net.init(key)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert (np.asarray(x) == np.asarray(y)).all()
    for name, fan_in in [
        ("input_linear", 400),
        ("middle_linear", 50),
        ("output_linear", 50),
    ]:
        # torch.nn.Linear: weight and bias both U(-b, b), b = 1/sqrt(fan_in).
        bound = 1 / np.sqrt(fan_in)
        for leaf_name, leaf in a[name].items():
            leaf = np.asarray(leaf, np.float64)
            where = f"{name}.{leaf_name} {leaf.shape}"
            assert leaf.min() >= -bound and leaf.max() <= bound, where
            ks = _ks_statistic(leaf, _uniform_cdf(bound))
            assert ks < _ks_bound(leaf.size), (where, ks)
            if leaf.size >= 2000:  # 20000 and 2500 draws
                # U(-b, b) has std b/sqrt(3); measured within 0.4% here.
                assert abs(leaf.std() / (bound / np.sqrt(3)) - 1) < 0.03, where
            if leaf.size >= 500:  # P(max|w| <= 0.98 b) = 0.98**500 < 5e-5
                assert np.abs(leaf).max() > 0.98 * bound, where
        # The weight and the bias come from different keys.
        w, b = (np.asarray(a[name][k]).ravel() for k in ("weight", "bias"))
        assert not np.array_equal(w[: b.size], b), name
    c = net.init(jax.random.key(1))
    assert not np.array_equal(
        c["middle_linear"]["weight"], a["middle_linear"]["weight"]
    )


@pytest.mark.parametrize("depth", range(4), ids=lambda d: f"depth{d}")
@pytest.mark.parametrize("method", METHODS)
def test_static_matches_dynamic_and_numpy(key, depth, method):
    net = fl.models.DynamicNet(6, 5, 3, max_depth=3, static_method=method)
    params = net.init(key)
    x, y = _data(jax.random.key(7))
    y_dyn = net.apply(params, x, depth, mode="dynamic")
    y_static = jax.jit(lambda p, x, d: net.apply(p, x, d))(params, x, depth)
    y_eager = net.apply(params, x, depth, mode="static")
    np.testing.assert_allclose(y_static, y_dyn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y_eager, y_dyn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        y_dyn, dynamic_net_forward_np(params, x, depth), rtol=1e-5, atol=1e-5
    )

    g_dyn = jax.grad(_loss(net, "dynamic"))(params, x, y, depth)
    g_static = jax.jit(jax.grad(_loss(net, "static")))(params, x, y, depth)
    tree_allclose(g_static, g_dyn, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(g_static) == jax.tree.structure(params)
    loss_np, g_np = dynamic_net_grads_np(params, x, y, depth)
    tree_allclose(to_f64(g_dyn), g_np, rtol=1e-4, atol=1e-4)
    assert float(_loss(net, "dynamic")(params, x, y, depth)) == pytest.approx(
        loss_np, rel=1e-5
    )


def test_weight_sharing_gradient_is_sum_of_per_use_gradients(key):
    """Untie the middle layer into 3 copies: the tied gradient is their sum."""
    net = fl.models.DynamicNet(6, 5, 3, max_depth=3)
    params = net.init(key)
    x, y = _data(jax.random.key(3))

    def untied_loss(params, middles):
        h = jax.nn.relu(
            x @ params["input_linear"]["weight"] + params["input_linear"]["bias"][None]
        )
        for m in middles:
            h = jax.nn.relu(h @ m["weight"] + m["bias"][None])
        out = (
            h @ params["output_linear"]["weight"]
            + params["output_linear"]["bias"][None]
        )
        return jnp.sum((out - y) ** 2)

    copies = [params["middle_linear"]] * 3
    per_use = jax.grad(untied_loss, argnums=1)(params, copies)
    expected = jax.tree.map(lambda *g: sum(g), *per_use)
    for mode in ("static", "dynamic"):
        tied = jax.grad(_loss(net, mode))(params, x, y, 3)["middle_linear"]
        tree_allclose(tied, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("depth", [0, 2, 3], ids=lambda d: f"depth{d}")
def test_check_grads_float64(key, method, depth):
    with jax.enable_x64(True):
        net = fl.models.DynamicNet(4, 3, 2, max_depth=3, static_method=method)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), net.init(key))
        x, y = (a.astype(jnp.float64) for a in _data(jax.random.key(5), 5, 4, 2))
        order_modes = ["rev"]
        check_grads(
            lambda p: _loss(net, "static")(p, x, y, depth),
            (params,),
            order=1,
            modes=order_modes,
        )
        check_grads(lambda p: _loss(net, "dynamic")(p, x, y, depth), (params,), order=2)


def test_traced_out_of_range_depth_gives_nan_with_checks_off(key, monkeypatch):
    """Documented: with FUNCTORCH_LITE_CHECKS=0, a traced depth outside
    [0, max_depth] makes the output NaN, whatever its integer dtype (no int32
    wrap-around), and no other depth. (Checks on: tests/test_traced_checks.py.)"""
    monkeypatch.setenv("FUNCTORCH_LITE_CHECKS", "0")
    net = fl.models.DynamicNet(6, 5, 3, max_depth=3)
    params = net.init(key)
    x, y = _data(key)
    f = jax.jit(lambda p, x, d: net.apply(p, x, d))
    for depth in (-4, 4, 9, np.uint32(2**32 - 1), np.uint32(2**31 + 1)):
        assert np.all(np.isnan(f(params, x, depth))), depth
    for depth in range(4):
        np.testing.assert_allclose(
            f(params, x, depth), net.apply(params, x, depth, mode="dynamic"), rtol=1e-6
        )
    # A step built by make_step traces the depth: the loss is NaN, and `fit`
    # stops on it instead of training at another depth.
    opt = optax.sgd(1e-3)
    step = fl.train.make_step(
        lambda p, x, y, d: fl.nn.mse_loss(net.apply(p, x, d), y), opt
    )
    with pytest.raises(FloatingPointError, match="the loss at step 2 is nan"):
        fl.train.fit(
            step, params, opt.init(params), [(x, y, 1), (x, y, 5)], progress=False
        )


def test_used_params_checks_depth(key):
    net = fl.models.DynamicNet(6, 5, 3, max_depth=3)
    assert net.used_params(2)["middle_linear"] is True
    assert net.used_params(1)["middle_linear"] is True
    assert net.used_params(3) == {
        "input_linear": True,
        "middle_linear": True,
        "output_linear": True,
    }
    assert net.used_params(np.int64(0))["middle_linear"] is False
    traced = jax.jit(lambda d: net.used_params(d)["middle_linear"])
    assert bool(traced(1)) and not bool(traced(0))
    with pytest.raises(ValueError, match=r"used_params: `depth` must be an int in"):
        net.used_params(4)
    with pytest.raises(ValueError, match=r"used_params: `depth` must be an int in"):
        net.used_params(-1)
    for bad in (None, True, 1.0):
        with pytest.raises(TypeError, match=r"used_params: `depth` must be an int"):
            net.used_params(bad)


def test_vmap_over_depth(key):
    net = fl.models.DynamicNet(6, 5, 3, max_depth=3)
    params = net.init(key)
    x, y = _data(key)
    depths = jnp.arange(4)
    ys = jax.vmap(lambda d: net.apply(params, x, d))(depths)
    gs = jax.vmap(lambda d: jax.grad(_loss(net, "static"))(params, x, y, d))(depths)
    for d in range(4):
        np.testing.assert_allclose(
            ys[d], net.apply(params, x, d, mode="dynamic"), rtol=1e-5, atol=1e-6
        )
        tree_allclose(
            jax.tree.map(lambda g, d=d: g[d], gs),
            jax.grad(_loss(net, "dynamic"))(params, x, y, d),
        )


def test_single_example_input(key):
    net = fl.models.DynamicNet(6, 5, 3)
    params = net.init(key)
    x, _ = _data(key)
    np.testing.assert_allclose(
        net.apply(params, x[0], 2), net.apply(params, x, 2)[0], rtol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"x": np.ones((4, 7), np.float32)},
            ValueError,
            r"DynamicNet.apply: `x` must have shape \(N, 6\)",
        ),
        (
            {"x": np.ones((2, 4, 7), np.float32)},
            ValueError,
            r"`x` must have shape .*got \(2, 4, 7\)",
        ),
        ({"x": np.float32(1.0)}, ValueError, r"`x` must have shape"),
        (
            {"x": np.ones((4, 6), np.int32)},
            TypeError,
            r"`x` must have a floating dtype; got int32",
        ),
        ({"x": [[1.0] * 6]}, TypeError, r"`x` must be a float array"),
        ({"depth": -1}, ValueError, r"`depth` must be an int in \[0, 3\]; got -1"),
        (
            {"depth": 4},
            ValueError,
            r"`depth` must be an int in \[0, 3\]; got 4. Raise `max_depth`",
        ),
        (
            {"depth": 4, "mode": "dynamic"},
            ValueError,
            r"`depth` must be an int in \[0, 3\]; got 4",
        ),
        (
            {"depth": 1.0, "mode": "dynamic"},
            TypeError,
            r"`depth` must be an int; got 1.0",
        ),
        (
            {"depth": True, "mode": "dynamic"},
            TypeError,
            r"`depth` must be an int; got True",
        ),
        (
            {"depth": jnp.float32(1.0)},
            TypeError,
            r"`depth` must be an int or an integer scalar",
        ),
        (
            {"depth": jnp.array([[1, 2]])},
            TypeError,
            r"`depth` must be an int or an integer scalar",
        ),
        (
            {"mode": "eager"},
            ValueError,
            r'`mode` must be "static" or "dynamic"; got \'eager\'',
        ),
    ],
    ids=lambda v: None,
)
def test_apply_errors(key, kwargs, error, match):
    net = fl.models.DynamicNet(6, 5, 3, max_depth=3)
    params = net.init(key)
    call = {"x": np.ones((4, 6), np.float32), "depth": 1, "mode": "static", **kwargs}
    with pytest.raises(error, match=match):
        net.apply(params, call["x"], call["depth"], mode=call["mode"])


def test_traced_depth_in_dynamic_mode_is_rejected(key):
    net = fl.models.DynamicNet(6, 5, 3)
    params = net.init(key)
    f = jax.jit(lambda d: net.apply(params, jnp.ones((2, 6)), d, mode="dynamic"))
    with pytest.raises(
        TypeError, match=r"`depth` must be a concrete Python int in the dynamic path"
    ):
        f(1)


def test_params_errors(key):
    net = fl.models.DynamicNet(6, 5, 3)
    params = net.init(key)
    x = jnp.ones((2, 6))
    missing = {k: v for k, v in params.items() if k != "middle_linear"}
    with pytest.raises(
        TypeError, match=r"`params` has the wrong tree structure(.|\n)*expected"
    ):
        net.apply(missing, x, 1)
    bad = jax.tree.map(lambda a: a, params)
    bad["middle_linear"]["weight"] = jnp.ones((5, 4))
    with pytest.raises(
        ValueError,
        match=r"`params\['middle_linear'\]\['weight'\]` must have shape "
        r"\(5, 5\); got \(5, 4\)",
    ):
        net.apply(bad, x, 1)
    bad["middle_linear"]["weight"] = jnp.ones((5, 5), jnp.int32)
    with pytest.raises(TypeError, match=r"must have a floating dtype; got int32"):
        net.apply(bad, x, 1)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 5, 3), r"DynamicNet: `d_in` must be a positive int; got 0"),
        ((6, 5.0, 3), r"`d_hidden` must be a positive int; got float 5.0"),
        ((6, 5, 3, -1), r"`max_depth` must be a non-negative int; got -1"),
        ((6, 5, 3, True), r"`max_depth` must be a non-negative int; got bool True"),
    ],
)
def test_constructor_errors(args, match):
    error = ValueError if "got -1" in match or "got 0" in match else TypeError
    with pytest.raises(error, match=match):
        fl.models.DynamicNet(*args)
    with pytest.raises(ValueError, match=r"`static_method` must be one of"):
        fl.models.DynamicNet(6, 5, 3, static_method="loop")


def test_two_layer_net_init_is_standard_normal(key):
    """Documented: w1 and w2 are drawn from N(0, 1), from different keys."""
    net = fl.models.TwoLayerNet(1000, 100, 10)
    params = net.init(key)
    w1, w2 = (np.asarray(params[k], np.float64) for k in ("w1", "w2"))
    assert (w1.shape, w2.shape) == ((1000, 100), (100, 10))
    assert params["w1"].dtype == params["w2"].dtype == jnp.float32
    # 1e5 draws: the mean's standard error is 0.0032, the std's 0.0022.
    assert abs(w1.mean()) < 0.015
    assert abs(w1.std() - 1) < 0.03
    assert _ks_statistic(w1, _normal_cdf) < _ks_bound(w1.size)
    assert abs(w2.mean()) < 0.15 and abs(w2.std() - 1) < 0.1
    assert _ks_statistic(w2, _normal_cdf) < _ks_bound(w2.size)
    # Different keys: w2 is no prefix (or other part) of w1's draw.
    flat1, flat2 = w1.ravel(), w2.ravel()
    assert not np.array_equal(flat1[: flat2.size], flat2)
    # float32 normals take some 1e7 values: ~15 of w2's 1000 recur in w1 by
    # chance (measured: 15); drawn with w1's key, all 1000 would.
    assert np.isin(flat2, flat1).sum() < 100
    # Deterministic in the key, and another key draws other weights.
    again = net.init(key)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    other = net.init(jax.random.key(1))
    assert not np.isin(np.asarray(other["w1"]).ravel()[:1000], flat1).all()


@pytest.mark.parametrize("method", METHODS)
def test_static_method_selects_the_loop(key, method, monkeypatch):
    """`DynamicNet(static_method=m)` really runs `m`'s loop: the three compute
    the same values (tested above), so look at the program and at forward mode.
    (Checks off: the traced depth's range check adds a `cond` of its own.)
    """
    monkeypatch.setenv("FUNCTORCH_LITE_CHECKS", "0")
    net = fl.models.DynamicNet(6, 5, 3, max_depth=3, static_method=method)
    params = net.init(key)
    x, _ = _data(key)
    jaxpr = jax.make_jaxpr(lambda p, x, d: net.apply(p, x, d))(params, x, 2).jaxpr
    prims = primitives(jaxpr)
    expected = {
        # A while loop of exactly `depth` iterations, no scan.
        "bounded": ({"while"}, {"scan", "cond"}),
        # A scan over max_depth steps, the ones past `depth` skipped by cond.
        "scan": ({"scan", "cond"}, {"while"}),
        # A scan over max_depth steps, all computed, no cond, no while.
        "masked": ({"scan"}, {"while", "cond"}),
    }[method]
    present, absent = expected
    assert present <= prims, (method, sorted(prims))
    assert not (absent & prims), (method, sorted(prims))

    # Forward mode: scan and masked support it; bounded (a custom_vjp) does not.
    fwd = jax.jacfwd(lambda x: net.apply(params, x, jnp.int32(2)))
    if method == "bounded":
        with pytest.raises(TypeError):
            fwd(x[0])
    else:
        rev = jax.jacrev(lambda x: net.apply(params, x, 2, mode="dynamic"))(x[0])
        np.testing.assert_allclose(fwd(x[0]), rev, rtol=1e-5, atol=1e-6)


def test_two_layer_net_matches_numpy(key):
    net = fl.models.TwoLayerNet(7, 5, 3)
    params = net.init(key)
    assert jax.tree.map(lambda a: a.shape, params) == {"w1": (7, 5), "w2": (5, 3)}
    x = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    p = to_f64(params)
    expected = np.maximum(x.astype(np.float64) @ p["w1"], 0) @ p["w2"]
    np.testing.assert_allclose(net.apply(params, x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"TwoLayerNet.apply: `x` must have shape \(N, 7\)"
    ):
        net.apply(params, np.ones((4, 3), np.float32))
    with pytest.raises(
        TypeError, match=r"TwoLayerNet.apply: `params` has the wrong tree"
    ):
        net.apply({"w1": params["w1"]}, x)
