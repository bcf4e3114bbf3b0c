"""Training parity with the PyTorch reference program, step by step.

A PyTorch `DynamicNet` written exactly as in the reference program trains next
to `fl.models.DynamicNet` from the same weights (copied with `fl.interop`),
on the same data and the same depth sequence, with summed MSE and
SGD(lr, momentum=0.9). Both fl modes are compared against torch.

torch runs with `optimizer.zero_grad(set_to_none=False)`: PyTorch 1.x
semantics, in which a layer that got no gradient this step (the middle layer
at depth 0) still takes its momentum step, as optax does.
"""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import torch_dynamic_net_module, tree_allclose

import functorch_lite as fl

torch = pytest.importorskip("torch")

MODES = ["static", "dynamic"]


def _setup(n, d_in, d_hidden, d_out, *, dtype, seed=0):
    """A torch model, its data, and the same weights as an fl params tree."""
    torch.manual_seed(seed)
    model = torch_dynamic_net_module(d_in, d_hidden, d_out).to(dtype)
    x = torch.randn(n, d_in, dtype=dtype)
    y = torch.randn(n, d_out, dtype=dtype)
    params = fl.interop.from_torch(model)
    return model, x, y, params


def _depths(steps: int, max_depth: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(0, max_depth) for _ in range(steps)]


def _train_torch(model, x, y, depths, lr):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for depth in depths:
        loss = torch.nn.functional.mse_loss(model(x, depth), y, reduction="sum")
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
    return np.array(losses)


def _train_fl(net, params, x, y, depths, lr, mode):
    optimizer = optax.sgd(lr, momentum=0.9)

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth, mode=mode), y)

    static_argnames = ("depth",) if mode == "dynamic" else ()
    step = fl.train.make_step(loss_fn, optimizer, static_argnames=static_argnames)
    opt_state = optimizer.init(params)
    x, y = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
    losses = []
    for depth in depths:
        # make_step donates params and opt_state: only the returned ones live on.
        params, opt_state, loss = step(params, opt_state, x, y, depth)
        losses.append(loss)
    expected_compiles = 1 if mode == "static" else len(set(depths))
    assert step.stats.compiles == expected_compiles
    return np.asarray(jax.device_get(losses), np.float64), params


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.mark.parametrize("mode", MODES, ids=MODES)
def test_float32_losses_match_torch_reference_sizes(mode):
    # The reference program: N=64, D_in=1000, H=100, D_out=10, depth in [0, 3].
    model, x, y, params = _setup(64, 1000, 100, 10, dtype=torch.float32)
    net = fl.models.DynamicNet(1000, 100, 10, max_depth=3)
    depths = _depths(100, 3)
    torch_losses = _train_torch(model, x, y, depths, lr=1e-4)
    fl_losses, _ = _train_fl(net, params, x, y, depths, 1e-4, mode)
    np.testing.assert_allclose(fl_losses, torch_losses, rtol=1e-4)
    assert torch_losses[-1] < 0.5 * torch_losses[0]  # it trained


@pytest.mark.parametrize("mode", MODES, ids=MODES)
def test_float64_losses_and_params_match_torch(mode):
    steps = 200
    with jax.enable_x64(True):
        model, x, y, params = _setup(32, 200, 50, 10, dtype=torch.float64, seed=1)
        assert params["input_linear"]["weight"].dtype == jnp.float64
        net = fl.models.DynamicNet(200, 50, 10, max_depth=3)
        depths = _depths(steps, 3, seed=1)
        torch_losses = _train_torch(model, x, y, depths, lr=1e-4)
        fl_losses, fl_params = _train_fl(net, params, x, y, depths, 1e-4, mode)
        np.testing.assert_allclose(fl_losses, torch_losses, rtol=1e-9)
        tree_allclose(fl_params, fl.interop.from_torch(model), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", MODES, ids=MODES)
@pytest.mark.parametrize("depth", [0, 3], ids=["depth0", "depth3"])
def test_step0_grads_match_torch(mode, depth):
    model, x, y, params = _setup(64, 1000, 100, 10, dtype=torch.float32)
    net = fl.models.DynamicNet(1000, 100, 10, max_depth=3)
    loss = torch.nn.functional.mse_loss(model(x, depth), y, reduction="sum")
    loss.backward()
    # At depth 0 the middle layer takes no part: torch leaves its grad None.
    torch_grads = {
        name: p.grad if p.grad is not None else torch.zeros_like(p)
        for name, p in model.named_parameters()
    }

    def loss_fn(params):
        pred = net.apply(params, jnp.asarray(x.numpy()), depth, mode=mode)
        return fl.nn.mse_loss(pred, jnp.asarray(y.numpy()))

    fl_loss, grads = jax.value_and_grad(loss_fn)(params)
    np.testing.assert_allclose(float(fl_loss), loss.item(), rtol=1e-5)
    tree_allclose(grads, fl.interop.from_torch(torch_grads), rtol=1e-5, atol=1e-4)


CONFIGS = [
    # (n, d_in, d_hidden, d_out, max_depth, lr, static_method)
    (16, 32, 24, 5, 6, 1e-3, "bounded"),
    (8, 20, 16, 3, 2, 5e-3, "scan"),
]


@pytest.mark.parametrize("mode", MODES, ids=MODES)
@pytest.mark.parametrize(
    "config", CONFIGS, ids=["maxdepth6-lr1e-3", "maxdepth2-lr5e-3-scan"]
)
def test_other_configurations_match_torch_float64(mode, config):
    n, d_in, d_hidden, d_out, max_depth, lr, static_method = config
    with jax.enable_x64(True):
        model, x, y, params = _setup(n, d_in, d_hidden, d_out, dtype=torch.float64)
        net = fl.models.DynamicNet(
            d_in, d_hidden, d_out, max_depth=max_depth, static_method=static_method
        )
        depths = _depths(100, max_depth, seed=2)
        torch_losses = _train_torch(model, x, y, depths, lr=lr)
        fl_losses, fl_params = _train_fl(net, params, x, y, depths, lr, mode)
        np.testing.assert_allclose(fl_losses, torch_losses, rtol=1e-9)
        tree_allclose(fl_params, fl.interop.from_torch(model), rtol=1e-9, atol=1e-12)


def test_weights_copied_from_fl_to_torch_give_the_same_forward(key):
    # The other direction: fl initializes, torch loads the weights.
    net = fl.models.DynamicNet(12, 8, 4, max_depth=3)
    params = net.init(key)
    model = torch_dynamic_net_module(12, 8, 4)
    model.load_state_dict(fl.interop.to_torch(params))
    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    for depth in range(4):
        with torch.no_grad():
            want = model(torch.from_numpy(x), depth).numpy()
        for mode in MODES:
            got = net.apply(params, jnp.asarray(x), depth, mode=mode)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
