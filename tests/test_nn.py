"""Layers and losses against NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functorch_lite as fl


def test_linear_matches_numpy_and_torch_init_bounds(key):
    layer = fl.nn.linear(6, 4)
    params = layer.init(key)
    assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
        "weight": ((6, 4), jnp.float32),
        "bias": ((4,), jnp.float32),
    }
    bound = 1 / np.sqrt(6)
    assert all(float(jnp.max(jnp.abs(v))) <= bound for v in params.values())
    x = np.random.default_rng(1).normal(size=(3, 6))
    expected = x @ np.asarray(params["weight"], np.float64) + np.asarray(
        params["bias"], np.float64
    )
    np.testing.assert_allclose(
        layer.apply(params, jnp.asarray(x, jnp.float32)), expected, rtol=1e-5, atol=1e-6
    )
    no_bias = fl.nn.linear(6, 4, bias=False)
    assert set(no_bias.init(key)) == {"weight"}


def test_relu_layer():
    layer = fl.nn.relu()
    assert layer.init(jax.random.key(0)) == {}
    np.testing.assert_array_equal(
        layer.apply({}, jnp.array([-2.0, 0.0, 3.0])), [0.0, 0.0, 3.0]
    )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mse_loss_matches_numpy(reduction):
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    ref = (
        ((pred - target) ** 2).sum()
        if reduction == "sum"
        else ((pred - target) ** 2).mean()
    )
    got = fl.nn.mse_loss(
        jnp.asarray(pred, jnp.float32),
        jnp.asarray(target, jnp.float32),
        reduction=reduction,
    )
    assert float(got) == pytest.approx(ref, rel=1e-5)


def test_nn_errors():
    with pytest.raises(
        ValueError, match=r'mse_loss: `reduction` must be "sum" or "mean"; got \'max\''
    ):
        fl.nn.mse_loss(jnp.ones(2), jnp.ones(2), reduction="max")
    with pytest.raises(
        ValueError,
        match=r"mse_loss: `pred` and `target` must have the same shape; "
        r"got \(4,\) and \(4, 1\)",
    ):
        fl.nn.mse_loss(jnp.ones(4), jnp.ones((4, 1)))
    with pytest.raises(
        ValueError, match=r"linear: `d_in` must be a positive int; got 0"
    ):
        fl.nn.linear(0, 3)
    with pytest.raises(
        TypeError, match=r"linear: `d_out` must be a positive int; got float 2.5"
    ):
        fl.nn.linear(3, 2.5)
    assert fl.nn.linear(np.int64(3), 2).init(jax.random.key(0))["weight"].shape == (
        3,
        2,
    )
