"""Layers and losses against NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functorch_lite as fl


def _ks_uniform(samples, bound):
    """The one-sample Kolmogorov-Smirnov statistic of `samples` vs U(-bound, bound)."""
    x = np.sort(np.asarray(samples, np.float64).ravel())
    n = x.size
    f = np.clip((x + bound) / (2 * bound), 0.0, 1.0)
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


def _ks_two_sample(a, b):
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap of the ECDFs."""
    a, b = (np.sort(np.asarray(v, np.float64).ravel()) for v in (a, b))
    grid = np.concatenate([a, b])
    gap = np.searchsorted(a, grid, "right") / a.size
    gap -= np.searchsorted(b, grid, "right") / b.size
    return np.max(np.abs(gap))


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


def test_linear_init_fills_the_torch_interval(key):
    """weight and bias ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), as torch.nn.Linear."""
    d_in, d_out = 400, 300
    bound = 1 / np.sqrt(d_in)
    params = fl.nn.linear(d_in, d_out).init(key)
    w = np.asarray(params["weight"], np.float64)
    b = np.asarray(params["bias"], np.float64)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    # 120000 draws. U(-b, b) has std b/sqrt(3); the sample std's standard
    # error is 0.13% (measured: +0.13%), and max|w| misses b by ~3e-5 b.
    assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.03
    assert abs(w.mean()) < 0.01 * bound
    assert np.abs(w).max() > 0.98 * bound
    assert _ks_uniform(w, bound) < 1.95 / np.sqrt(w.size)  # 0.1% critical value
    assert np.abs(b).max() > 0.9 * bound  # P(miss) = 0.9**300 ~ 2e-14
    assert _ks_uniform(b, bound) < 1.95 / np.sqrt(b.size)
    # The bias comes from its own key: not a prefix of the weight's draw.
    assert not np.array_equal(w.ravel()[:d_out], b)
    assert np.isin(b, w).sum() < 30


def test_linear_init_distribution_matches_torch(key):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    d_in, d_out = 400, 300
    ref = torch.nn.Linear(d_in, d_out)
    params = fl.nn.linear(d_in, d_out).init(key)
    # Two-sample KS against torch's own draw, at the 0.1% critical value.
    for name, ours, theirs in [
        ("weight", params["weight"], ref.weight.detach().numpy().T),
        ("bias", params["bias"], ref.bias.detach().numpy()),
    ]:
        assert np.shape(ours) == theirs.shape, name
        n = theirs.size
        assert _ks_two_sample(ours, theirs) < 1.95 * np.sqrt(2 / n), name


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
