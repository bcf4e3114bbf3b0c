"""`make_step(skip_unused=...)` reproduces PyTorch 2.x's skipping of unused params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import dynamic_net_grads_np, to_f64, torch_dynamic_net, tree_allclose

import functorch_lite as fl


def _setup(key, sizes=(16, 12, 8, 4), max_depth=3):
    n, d_in, h, d_out = sizes
    kx, ky, kp = jax.random.split(key, 3)
    net = fl.models.DynamicNet(d_in, h, d_out, max_depth=max_depth)
    return (
        net,
        net.init(kp),
        jax.random.normal(kx, (n, d_in)),
        jax.random.normal(ky, (n, d_out)),
    )


def _steps(net, opt, mode):
    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth, mode=mode), y)

    if mode == "dynamic":
        return fl.train.make_step(
            loss_fn, opt, static_argnames=("depth",), skip_unused=True
        )
    return fl.train.make_step(
        loss_fn, opt, skip_unused=lambda params, x, y, depth: net.used_params(depth)
    )


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_unused_leaves_and_their_state_do_not_move(key, mode):
    net, params, x, y = _setup(key)
    opt = optax.sgd(1e-2, momentum=0.9)
    step = _steps(net, opt, mode)
    p, s = jax.tree.map(jnp.copy, params), opt.init(params)
    p, s, _ = step(p, s, x, y, 2)  # momentum is now non-zero everywhere
    before_p, before_s = jax.tree.map(np.asarray, p), jax.tree.map(np.asarray, s)
    p, s, _ = step(p, s, x, y, 0)
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(
            p["middle_linear"][name], before_p["middle_linear"][name]
        )
        np.testing.assert_array_equal(
            s[0].trace["middle_linear"][name], before_s[0].trace["middle_linear"][name]
        )
        assert not np.array_equal(
            p["input_linear"][name], before_p["input_linear"][name]
        )
    # Without the option, momentum keeps moving the unused layer (PyTorch 1.x).
    plain = fl.train.make_step(
        lambda params, x, y, depth: fl.nn.mse_loss(net.apply(params, x, depth), y), opt
    )
    q, t, _ = plain(
        jax.tree.map(jnp.copy, before_p), jax.tree.map(jnp.copy, before_s), x, y, 0
    )
    assert not np.array_equal(
        q["middle_linear"]["weight"], before_p["middle_linear"]["weight"]
    )


def _skip_unused_sgd_np(params, x, y, depths, lr, momentum):
    """PyTorch 2.x SGD with momentum in float64 NumPy: a layer the forward pass
    did not use (the middle one at depth 0) keeps its params and momentum."""
    p = to_f64(params)
    trace = jax.tree.map(np.zeros_like, p)
    for d in depths:
        _, g = dynamic_net_grads_np(p, x, y, d)
        for name in p:
            if name == "middle_linear" and d == 0:
                continue
            for leaf in p[name]:
                trace[name][leaf] = g[name][leaf] + momentum * trace[name][leaf]
                p[name][leaf] = p[name][leaf] - lr * trace[name][leaf]
    return p, trace


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_used_leaves_and_their_state_move_at_depth_one(key, mode):
    net, params, x, y = _setup(key)
    lr, momentum = 1e-2, 0.9
    opt = optax.sgd(lr, momentum=momentum)
    step = _steps(net, opt, mode)
    depths = [0, 1, 1, 0, 2, 1]
    p, s = jax.tree.map(jnp.copy, params), opt.init(params)
    p, s, _ = step(p, s, x, y, 0)
    # Unused at depth 0, from the initial state: params and momentum untouched.
    np.testing.assert_array_equal(
        p["middle_linear"]["weight"], params["middle_linear"]["weight"]
    )
    assert not np.any(np.asarray(s[0].trace["middle_linear"]["weight"]))
    before_p, before_s = jax.tree.map(np.asarray, p), jax.tree.map(np.asarray, s)
    p, s, _ = step(p, s, x, y, 1)
    # Depth 1 uses every layer: each leaf and its momentum move.
    for name in ("input_linear", "middle_linear", "output_linear"):
        for leaf in ("weight", "bias"):
            assert not np.array_equal(p[name][leaf], before_p[name][leaf]), name
            assert not np.array_equal(
                s[0].trace[name][leaf], before_s[0].trace[name][leaf]
            ), name
    for d in depths[2:]:
        p, s, _ = step(p, s, x, y, d)
    ref_p, ref_trace = _skip_unused_sgd_np(params, x, y, depths, lr, momentum)
    tree_allclose(to_f64(p), ref_p, rtol=1e-5, atol=1e-6)
    tree_allclose(to_f64(s[0].trace), ref_trace, rtol=1e-5, atol=1e-5)
    # Static path: one compile for every depth; dynamic: one per distinct depth.
    expected = 1 if mode == "static" else len(set(depths))
    assert (step.stats.traces, step.stats.compiles) == (expected, expected)
    assert step.stats.calls == len(depths)


def test_dynamic_detection_reads_the_jaxpr(key):
    net, params, x, y = _setup(key)
    loss = lambda p, d: fl.nn.mse_loss(net.apply(p, x, d, mode="dynamic"), y)
    used0 = fl.train._leaves_read(lambda p: loss(p, 0), params)
    used2 = fl.train._leaves_read(lambda p: loss(p, 2), params)
    assert used0 == {
        "input_linear": {"bias": True, "weight": True},
        "middle_linear": {"bias": False, "weight": False},
        "output_linear": {"bias": True, "weight": True},
    }
    assert all(jax.tree.leaves(used2))


def test_skip_unused_errors(key):
    net, params, x, y = _setup(key)
    opt = optax.sgd(1e-2)
    with pytest.raises(
        TypeError, match="make_step: `skip_unused` must be a bool or a callable"
    ):
        fl.train.make_step(lambda p, x: 0.0, opt, skip_unused="yes")
    step = fl.train.make_step(
        lambda params, x, y, depth: fl.nn.mse_loss(net.apply(params, x, depth), y),
        opt,
        skip_unused=lambda params, x, y, depth: {"input_linear": True},
    )
    with pytest.raises(
        TypeError, match="must return a tree of bools shaped like params"
    ):
        step(params, opt.init(params), x, y, 1)


def _torch_run(params, x, y, depths, make_opt, dtype):
    torch = pytest.importorskip("torch")
    model = torch_dynamic_net(params, dtype)
    opt = make_opt(model.parameters())
    xt = torch.from_numpy(np.array(x, np.float64)).to(dtype)
    yt = torch.from_numpy(np.array(y, np.float64)).to(dtype)
    losses = []
    for d in depths:
        loss = torch.nn.functional.mse_loss(model(xt, int(d)), yt, reduction="sum")
        opt.zero_grad()  # PyTorch 2.x: set_to_none=True, so unused params are skipped
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = {
        name: {
            "weight": getattr(model, name).weight.detach().numpy().T,
            "bias": getattr(model, name).bias.detach().numpy(),
        }
        for name in ("input_linear", "middle_linear", "output_linear")
    }
    return np.array(losses), final


def _fl_run(net, params, x, y, depths, opt, mode):
    step = _steps(net, opt, mode)
    p, s = jax.tree.map(jnp.copy, params), opt.init(params)
    losses = []
    for d in depths:
        p, s, loss = step(p, s, x, y, int(d))
        losses.append(float(loss))
    return np.array(losses), p


SGD_VARIANTS = {
    "momentum": (
        lambda: optax.sgd(1e-4, momentum=0.9),
        lambda ps, t: t.optim.SGD(ps, lr=1e-4, momentum=0.9),
    ),
    "nesterov": (
        lambda: optax.sgd(1e-4, momentum=0.9, nesterov=True),
        lambda ps, t: t.optim.SGD(ps, lr=1e-4, momentum=0.9, nesterov=True),
    ),
    "plain": (lambda: optax.sgd(1e-4), lambda ps, t: t.optim.SGD(ps, lr=1e-4)),
}


@pytest.mark.parametrize("variant", sorted(SGD_VARIANTS))
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_float32_matches_torch_default_zero_grad(key, mode, variant):
    torch = pytest.importorskip("torch")
    net, params, x, y = _setup(key, (64, 1000, 100, 10))
    depths = np.random.default_rng(1).integers(0, 4, size=100)
    depths[:3] = 0  # unused middle layer from the first step on
    make_fl, make_torch = SGD_VARIANTS[variant]
    ours, _ = _fl_run(net, params, x, y, depths, make_fl(), mode)
    theirs, _ = _torch_run(
        params, x, y, depths, lambda ps: make_torch(ps, torch), torch.float32
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_float64_matches_torch_default_zero_grad(key, mode):
    torch = pytest.importorskip("torch")
    with jax.enable_x64(True):
        net, params, x, y = _setup(key, (32, 50, 20, 5), max_depth=4)
        params, x, y = jax.tree.map(lambda a: a.astype(jnp.float64), (params, x, y))
        depths = np.random.default_rng(2).integers(0, 5, size=200)
        opt = optax.sgd(3e-4, momentum=0.9)
        ours, p = _fl_run(net, params, x, y, depths, opt, mode)
        theirs, final = _torch_run(
            params,
            x,
            y,
            depths,
            lambda ps: torch.optim.SGD(ps, lr=3e-4, momentum=0.9),
            torch.float64,
        )
        np.testing.assert_allclose(ours, theirs, rtol=1e-9)
        tree_allclose(jax.tree.map(np.asarray, p), final, rtol=1e-9, atol=1e-12)


def test_adam_against_torch_documents_the_step_count_difference(key):
    """optax's Adam keeps one step count; PyTorch keeps one per parameter.

    A skipped parameter therefore gets a different bias correction on its next
    update. Here the middle layer is skipped for steps 0-3; its first update
    (step 4) uses count 1 in PyTorch and count 5 in optax. Measured: losses
    agree to 4e-6 through step 4, then drift apart to 2.7e-2 relative by step
    19 (CPU, float32). A run that never skips matches to float32 rounding.
    """
    torch = pytest.importorskip("torch")
    # optax's Adam mixes a float and its int32 count: fine under JAX's standard
    # promotion, which users have; the suite otherwise runs strict.
    jax.config.update("jax_numpy_dtype_promotion", "standard")
    try:
        _adam_parity(key, torch)
    finally:
        jax.config.update("jax_numpy_dtype_promotion", "strict")


def _adam_parity(key, torch):
    net, params, x, y = _setup(key, (64, 1000, 100, 10))
    never = np.random.default_rng(3).integers(1, 4, size=20)
    ours, _ = _fl_run(net, params, x, y, never, optax.adam(1e-3), "dynamic")
    theirs, _ = _torch_run(
        params, x, y, never, lambda ps: torch.optim.Adam(ps, lr=1e-3), torch.float32
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)

    skips = never.copy()
    skips[:4] = 0
    ours, _ = _fl_run(net, params, x, y, skips, optax.adam(1e-3), "dynamic")
    theirs, _ = _torch_run(
        params, x, y, skips, lambda ps: torch.optim.Adam(ps, lr=1e-3), torch.float32
    )
    np.testing.assert_allclose(
        ours[:5], theirs[:5], rtol=1e-4
    )  # before the count matters
    gap = np.max(np.abs(ours - theirs) / np.abs(theirs))
    assert 1e-4 < gap < 5e-2, gap
