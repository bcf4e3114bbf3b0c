"""Data parallel on 8 CPU devices: parity with one device, sharding, compiles, padding.

Not collected by the main run, which sees one CPU device: `test_parallel.py`
runs this file in its own pytest process with 8 host devices. To run it alone:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m pytest -q -p no:cacheprovider tests/_parallel_8dev.py
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tree_allclose
from jax.sharding import PartitionSpec as P

import functorch_lite as fl
from tests._parallel_worker import D_IN, D_OUT, DEPTHS, problem, train

DEVICES = 8
STEPS = 50


@pytest.fixture(autouse=True)
def _eight_devices() -> None:
    if jax.device_count() < DEVICES:
        pytest.skip(
            f"needs {DEVICES} devices, found {jax.device_count()}: run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}"
        )


def _numpy(tree):
    # Copy now: the next step donates these buffers.
    return jax.tree.map(lambda leaf: np.asarray(leaf), tree)


def _trajectory(step, prob, steps=STEPS):
    """Params after the first and the last step, and every loss."""
    params = prob["net"].init(jax.random.key(0))
    opt_state = prob["optimizer"].init(params)
    first, losses = None, []
    for depth in prob["depths"][:steps]:
        params, opt_state, loss = step(params, opt_state, prob["x"], prob["y"], depth)
        losses.append(float(loss))
        if first is None:
            first = _numpy(params)
    return first, _numpy(params), np.array(losses)


@functools.cache
def _reference(mode, n, reduction):
    """The single-device trajectory (the plain step, on device 0)."""
    prob = problem(mode, n, reduction=reduction, steps=STEPS, depths=DEPTHS[mode])
    return _trajectory(prob["make_step"](), prob)


# n=10 does not divide by 8 devices: it runs padded (pad=True), where a mean
# loss must still divide by 10, not 16.
CASES = [
    (mode, reduction, n)
    for mode in ("static", "dynamic")
    for reduction, n in (("sum", 16), ("sum", 10), ("mean", 10))
]


@pytest.mark.parametrize(
    "mode, reduction, n", CASES, ids=[f"{m}-{r}-n{n}" for m, r, n in CASES]
)
def test_matches_single_device(mode, reduction, n):
    prob = problem(mode, n, reduction=reduction, steps=STEPS, depths=DEPTHS[mode])
    dp = fl.parallel.data_parallel(prob["make_step"](), pad=n % DEVICES != 0)
    first, last, losses = _trajectory(dp, prob)
    ref_first, ref_last, ref_losses = _reference(mode, n, reduction)
    tree_allclose(first, ref_first, rtol=1e-5)
    np.testing.assert_allclose(losses[0], ref_losses[0], rtol=1e-5)
    tree_allclose(last, ref_last, rtol=1e-4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    # Static path: one compile for every depth; dynamic: one per distinct depth.
    expected = 1 if mode == "static" else len(set(prob["depths"]))
    assert (dp.stats.traces, dp.stats.compiles) == (expected, expected)
    with fl.compile_counter() as counter:
        train(dp, prob, prob["x"], prob["y"], 10)
    assert counter.compiles == 0, counter.names
    assert dp.stats.compiles == expected


def test_arrays_are_sharded():
    prob = problem("static", 16)
    dp = fl.parallel.data_parallel(prob["make_step"]())
    assert dict(dp.mesh.shape) == {"data": DEVICES}
    params = prob["net"].init(jax.random.key(0))
    opt_state = prob["optimizer"].init(params)
    args, kwargs = dp.place(params, opt_state, prob["x"], prob["y"], 2)
    x = args[2]
    assert x.sharding.spec == P("data")
    assert len(x.sharding.device_set) == DEVICES
    assert [shard.data.shape for shard in x.addressable_shards] == [(2, D_IN)] * 8
    compiled = dp.lower(*args, **kwargs).compile()
    # The gradient all-reduce is the compiler's, not ours.
    assert "all-reduce" in compiled.as_text()
    in_shardings = compiled.input_shardings[0]
    assert in_shardings[2].spec == P("data") and in_shardings[3].spec == P("data")

    placed_state = jax.tree.leaves(args[:2])
    assert len(placed_state) == 12  # 6 params leaves, 6 momentum leaves
    params, opt_state, loss = dp(*args, **kwargs)
    # Donated: the placed params and opt_state became the outputs' buffers; the
    # batch was not donated.
    assert all(leaf.is_deleted() for leaf in placed_state)
    assert not args[2].is_deleted() and not args[3].is_deleted()
    with pytest.raises(ValueError, match=r"`params\[.*was donated to an earlier"):
        dp(*args, **kwargs)
    for leaf in jax.tree.leaves((params, opt_state, loss)):
        assert leaf.sharding.is_fully_replicated
        assert len(leaf.sharding.device_set) == DEVICES
    assert params["middle_linear"]["weight"].sharding.spec == P()
    # The returned state is used as it is: no copy, and it is donated.
    again = dp.place(params, opt_state, prob["x"], prob["y"], 2)[0]
    assert again[0]["middle_linear"]["weight"] is params["middle_linear"]["weight"]


@pytest.mark.parametrize("donate", [True, False], ids=["donate", "keep"])
def test_step_donation_carries_over(donate):
    """`data_parallel` donates params and opt_state iff the wrapped step does."""
    prob = problem("static", 16)
    net, optimizer = prob["net"], prob["optimizer"]

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth), y)

    dp = fl.parallel.data_parallel(
        fl.train.make_step(loss_fn, optimizer, donate=donate)
    )
    params = net.init(jax.random.key(0))
    opt_state = optimizer.init(params)
    # Placed arrays are passed to the program as they are: exactly the arrays
    # given to the call are donated (unplaced ones are first put on the mesh).
    args, kwargs = dp.place(params, opt_state, prob["x"], prob["y"], 1)
    state = jax.tree.leaves(args[:2])
    assert len(state) == 12
    new_params, new_state, _ = dp(*args, **kwargs)
    assert [leaf.is_deleted() for leaf in state] == [donate] * 12
    assert not args[2].is_deleted() and not args[3].is_deleted()
    if not donate:  # kept, and untouched
        tree_allclose(_numpy(args[0]), _numpy(params), rtol=0, atol=0)
        tree_allclose(_numpy(args[1]), _numpy(opt_state), rtol=0, atol=0)
    # The returned state is donated (or kept) by the next call in turn.
    dp(new_params, new_state, *args[2:], **kwargs)
    after = jax.tree.leaves((new_params, new_state))
    assert [leaf.is_deleted() for leaf in after] == [donate] * 12
    assert dp.stats.compiles == 1


def test_batch_not_divisible_raises():
    prob = problem("static", 10)
    dp = fl.parallel.data_parallel(prob["make_step"]())
    params = prob["net"].init(jax.random.key(0))
    with pytest.raises(
        ValueError,
        match=r"the batch size must be divisible by the 8 devices of mesh axis "
        r"'data'; got 10 .*pad=True",
    ):
        dp(params, prob["optimizer"].init(params), prob["x"], prob["y"], 1)


def test_place_does_not_pad():
    prob = problem("static", 10)
    dp = fl.parallel.data_parallel(prob["make_step"](), pad=True)
    params = prob["net"].init(jax.random.key(0))
    with pytest.raises(ValueError, match="`place` does not pad"):
        dp.place(params, prob["optimizer"].init(params), prob["x"], prob["y"], 1)


def test_pad_leaves_divisible_batch_alone():
    prob = problem("static", 16, steps=STEPS)
    dp = fl.parallel.data_parallel(prob["make_step"](), pad=True)
    first, last, losses = _trajectory(dp, prob)
    ref_first, ref_last, ref_losses = _reference("static", 16, "sum")
    tree_allclose(first, ref_first, rtol=1e-5)
    tree_allclose(last, ref_last, rtol=1e-4)
    assert dp.stats.compiles == 1


FUSED = [((), 16), (("x", "y"), 13)]


@pytest.mark.parametrize(
    "shared, n", FUSED, ids=[f"shared{len(s)}-n{n}" for s, n in FUSED]
)
def test_fused_matches_single_device(shared, n):
    k = 5
    prob = problem("static", n, steps=k)
    net, optimizer = prob["net"], prob["optimizer"]

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth), y)

    rng = np.random.default_rng(0)
    shape = (n,) if shared else (k, n)
    x = rng.normal(size=(*shape, D_IN)).astype(np.float32)
    y = rng.normal(size=(*shape, D_OUT)).astype(np.float32)
    depths = jnp.array(prob["depths"])

    def run(fused):
        params = net.init(jax.random.key(0))
        return fused(params, optimizer.init(params), x, y, depths)

    make = functools.partial(
        fl.train.make_fused_step, loss_fn, optimizer, shared_argnames=shared
    )
    dp = fl.parallel.data_parallel(make(), pad=n % DEVICES != 0)
    params, _, losses = run(dp)
    ref_params, _, ref_losses = run(make())
    tree_allclose(params, ref_params, rtol=1e-5)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses.shape == (k,)
    assert dp.stats.compiles == 1
    if n % DEVICES == 0:
        placed = dp.place(params, optimizer.init(params), x, y, depths)[0]
        # Stacked per-step batches split on axis 1 (axis 0 is the steps axis);
        # shared ones on axis 0; the (K,) depths are replicated.
        assert placed[2].sharding.spec == (P("data") if shared else P(None, "data"))
        assert placed[4].sharding.spec == P()


def test_batch_argnames():
    prob = problem("static", 16, steps=STEPS)
    # Only `x` split: `y` is replicated, and the compiler reconciles the two.
    dp = fl.parallel.data_parallel(prob["make_step"](), batch_argnames=("x",))
    first, last, _ = _trajectory(dp, prob)
    ref_first, ref_last, _ = _reference("static", 16, "sum")
    tree_allclose(first, ref_first, rtol=1e-5)
    tree_allclose(last, ref_last, rtol=1e-4)
    params = prob["net"].init(jax.random.key(0))
    opt_state = prob["optimizer"].init(params)
    args = dp.place(params, opt_state, prob["x"], prob["y"], 0)[0]
    assert args[2].sharding.spec == P("data") and args[3].sharding.spec == P()
    mapped = fl.parallel.data_parallel(
        prob["make_step"](), batch_argnames={"x": 0, "y": 0}
    )
    args = mapped.place(params, opt_state, prob["x"], prob["y"], 0)[0]
    assert args[2].sharding.spec == P("data") and args[3].sharding.spec == P("data")


def test_two_axis_mesh():
    prob = problem("static", 16, steps=STEPS)
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    dp = fl.parallel.data_parallel(prob["make_step"](), mesh=mesh)
    first, last, _ = _trajectory(dp, prob)
    ref_first, ref_last, _ = _reference("static", 16, "sum")
    tree_allclose(first, ref_first, rtol=1e-5)
    tree_allclose(last, ref_last, rtol=1e-4)
    params = prob["net"].init(jax.random.key(0))
    opt_state = prob["optimizer"].init(params)
    x = dp.place(params, opt_state, prob["x"], prob["y"], 0)[0][2]
    # Split 4 ways over "data", replicated over "model".
    assert {shard.data.shape for shard in x.addressable_shards} == {(4, D_IN)}


def test_async_steps_do_not_deadlock():
    """Regression: steps dispatched without waiting hung in the CPU all-reduce.

    With the reference sizes (64 x 1000), XLA's CPU runtime dispatches each
    step asynchronously; two steps in flight on 8 host devices deadlocked
    ("Expected 8 threads to join the rendezvous, but only 7 of them arrived",
    then the process aborted after 40 s). `data_parallel` now keeps one in
    flight on CPU.
    """
    net = fl.models.DynamicNet(1000, 100, 10)
    optimizer = optax.sgd(1e-4, momentum=0.9)

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth), y)

    dp = fl.parallel.data_parallel(fl.train.make_step(loss_fn, optimizer))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1000)).astype(np.float32)
    y = rng.normal(size=(64, 10)).astype(np.float32)
    params = net.init(jax.random.key(0))
    (params, opt_state, x, y, _), _ = dp.place(params, optimizer.init(params), x, y, 0)
    # Without the fix, 300 steps hung within a run or two out of two.
    for i in range(300):
        params, opt_state, loss = dp(params, opt_state, x, y, i % 4)
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("cast", [True, False])
def test_while_loop_with_different_step_counts_per_device(cast):
    """`fl.while_loop` inside the user's `shard_map`, each device's rows
    stopping after a different number of steps: the gradient is the
    single-program one. The replicated weight's cast to vary over the mesh
    (which the loop's body gets from JAX, and whose transpose sums the
    gradient over the devices) runs once, before the loop, whether the user
    writes it there (`cast`) or not: inside the reverse loop it would sum once
    per step, and the devices would wait for each other forever."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("b",))
    w = 0.9 * jax.random.normal(jax.random.key(0), (3, 3))
    x = (
        jax.random.normal(jax.random.key(1), (DEVICES, 3))
        * jnp.linspace(0.2, 3.0, DEVICES)[:, None]
    )

    def run(w, h):
        return fl.while_loop(
            lambda c: jnp.sum(c**2) > 0.1,
            lambda c: 0.8 * (c @ w) / (1.0 + jnp.sum(c * c)),
            h,
            max_steps=8,
            return_steps=True,
        )

    def local(w, h):
        out, _ = run(jax.lax.pcast(w, "b", to="varying") if cast else w, h)
        return jax.lax.psum(jnp.sum(out**2), "b")

    sharded = jax.jit(
        jax.shard_map(jax.grad(local), mesh=mesh, in_specs=(P(), P("b")), out_specs=P())
    )
    steps = [int(run(w, x[i : i + 1])[1]) for i in range(DEVICES)]
    assert len(set(steps)) > 1, steps  # the devices do run different step counts
    expected = jax.grad(
        lambda w: sum(jnp.sum(run(w, x[i : i + 1])[0] ** 2) for i in range(DEVICES))
    )(w)
    tree_allclose(sharded(w, x), expected, rtol=1e-5, atol=1e-6)


def test_second_order_through_a_loop_inside_shard_map():
    """Grad of grad of a vmapped `fl.while_loop` inside the user's `shard_map`,
    every device running the same count (docs/scaling-out.md): the
    single-program second derivative."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("b",))
    xs = jnp.linspace(0.1, 1.5, 2 * DEVICES)

    def loss(w, x, n):
        def body(c):
            i, h = c
            return i + 1, jnp.tanh(h * w) + 0.1 * w

        _, h = fl.while_loop(lambda c: c[0] < n, body, (0, x), max_steps=6)
        return h**2

    def second(w, xs, n):
        g = jax.grad(lambda w: jnp.sum(jax.vmap(loss, (None, 0, None))(w, xs, n)))
        return jax.grad(g)(w)

    sharded = jax.jit(
        jax.shard_map(second, mesh=mesh, in_specs=(P(), P("b"), P()), out_specs=P())
    )
    w, n = jnp.float32(0.7), jnp.int32(4)
    placed = jax.device_put(xs, jax.sharding.NamedSharding(mesh, P("b")))
    np.testing.assert_allclose(sharded(w, placed, n), second(w, xs, n), rtol=1e-5)


def test_while_loop_with_a_per_device_weight_and_a_replicated_carry():
    """Inside `shard_map`, a loop whose replicated starting carry meets a weight
    that differs per device: the loop makes the carry vary from the start (a
    plain `lax.while_loop` refuses the carry's changing type). Values and
    weight gradients equal each device's loop run alone."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("b",))
    ws = 0.5 * jax.random.normal(jax.random.key(2), (DEVICES, 3, 3))
    h0 = jnp.array([[0.3, -0.2, 0.9]])

    def run(w, h):
        def body(c):
            i, h = c
            return i + 1, jnp.tanh(h @ w)

        _, out = fl.while_loop(lambda c: c[0] < 4, body, (0, h), max_steps=6)
        return jnp.sum(out**2)

    def local(w, h):
        value, grad = jax.value_and_grad(run)(w[0], h)
        return value[None], grad[None]

    sharded = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(P("b"), P()), out_specs=(P("b"), P("b"))
        )
    )
    placed = jax.device_put(ws, jax.sharding.NamedSharding(mesh, P("b")))
    values, grads = sharded(placed, h0)
    for d in range(DEVICES):
        value, grad = jax.value_and_grad(run)(ws[d], h0)
        np.testing.assert_allclose(values[d], value, rtol=1e-6)
        np.testing.assert_allclose(grads[d], grad, rtol=1e-5, atol=1e-7)
