"""`fl.jit` composes with JAX: outer jit/vmap/grad, jax.jit of it, data_parallel.

Stats are exact for direct calls and None (unknown) once a call ran under an
outer transformation; accounting listeners live only as long as a call or a
`compile_counter` block.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose

import functorch_lite as fl
from tests import _parallel_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy(tree):
    # make_step donates params and opt_state: each run gets its own buffers.
    return jax.tree.map(jnp.copy, tree)


def _start(prob):
    params = prob["net"].init(jax.random.key(0))
    return params, prob["optimizer"].init(params)


def _direct(prob, steps):
    """Params and losses of `steps` direct calls of a fresh make_step."""
    step = prob["make_step"]()
    params, losses = worker.train(step, prob, prob["x"], prob["y"], steps)
    return jax.tree.map(np.asarray, params), np.array([float(v) for v in losses])


def _assert_unknown(stats, transformed_calls):
    assert stats.compiles is None
    assert stats.compile_seconds is None
    assert stats.transformed_calls == transformed_calls
    assert stats.calls == 0


# --------------------------------------------------------- outer transformations


def test_make_step_inside_outer_jit_matches_and_says_unknown():
    prob = worker.problem("static", 6, steps=4)
    expected_params, expected_losses = _direct(prob, 4)
    step = prob["make_step"]()
    outer = jax.jit(lambda p, s, x, y, d: step(p, s, x, y, d))
    params, opt_state = _start(prob)
    losses = []
    for depth in prob["depths"]:
        params, opt_state, loss = outer(params, opt_state, prob["x"], prob["y"], depth)
        losses.append(float(loss))
    tree_allclose(jax.tree.map(np.asarray, params), expected_params, rtol=1e-6)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
    # The outer jit traced (and compiled) once: the step was inlined there.
    assert step.stats.traces == 1
    _assert_unknown(step.stats, transformed_calls=1)


def test_make_step_under_vmap_matches_per_member_calls():
    prob = worker.problem("static", 6)
    keys = jax.random.split(jax.random.key(1), 3)
    members = [prob["net"].init(k) for k in keys]
    opt = prob["optimizer"]
    x, y, depth = prob["x"], prob["y"], 2
    expected = []
    for p in members:
        out = prob["make_step"]()(_copy(p), opt.init(p), x, y, depth)
        expected.append(jax.tree.map(np.asarray, out))
    step = prob["make_step"]()
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)
    batched = jax.vmap(step, in_axes=(0, 0, None, None, None))
    params, _, losses = batched(stacked, jax.vmap(opt.init)(stacked), x, y, depth)
    for i, (want_params, _, want_loss) in enumerate(expected):
        tree_allclose(
            jax.tree.map(lambda a, i=i: np.asarray(a[i]), params), want_params
        )
        np.testing.assert_allclose(losses[i], want_loss, rtol=1e-6)
    _assert_unknown(step.stats, transformed_calls=1)


def test_make_step_loss_under_grad_matches_loss_fn_grad():
    prob = worker.problem("static", 6)
    net, x, y, depth = prob["net"], prob["x"], prob["y"], 1
    params, opt_state = _start(prob)

    def loss_fn(x):
        return fl.nn.mse_loss(net.apply(params, x, depth), y)

    expected = jax.grad(loss_fn)(jnp.asarray(x))
    step = prob["make_step"]()
    got = jax.grad(lambda x: step(_copy(params), _copy(opt_state), x, y, depth)[2])(
        jnp.asarray(x)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    _assert_unknown(step.stats, transformed_calls=1)


def test_jit_function_under_vmap_and_grad():
    f = fl.jit(lambda x: jnp.sum(jnp.sin(x) ** 2))
    xs = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
    np.testing.assert_allclose(
        jax.vmap(f)(xs), jnp.sum(jnp.sin(xs) ** 2, axis=1), rtol=1e-6
    )
    np.testing.assert_allclose(
        jax.grad(f)(xs[0]), 2 * jnp.sin(xs[0]) * jnp.cos(xs[0]), rtol=1e-5
    )
    assert f.stats.traces == 1  # float32[4] under both: traced once, reused
    _assert_unknown(f.stats, transformed_calls=2)
    # Later direct calls are counted, but the totals stay unknown.
    f(xs[0])
    assert f.stats.calls == 1 and f.stats.compiles is None


def test_jax_jit_of_compiled():
    f = fl.jit(lambda x, n: x**n, static_argnames="n")
    x = jnp.arange(4.0, dtype=jnp.float32)
    g = jax.jit(f, static_argnames="n")
    np.testing.assert_allclose(g(x, 3), x**3)
    np.testing.assert_allclose(g(x, n=2), x**2)
    _assert_unknown(f.stats, transformed_calls=2)

    prob = worker.problem("static", 6, steps=3)
    expected_params, expected_losses = _direct(prob, 3)
    step = prob["make_step"]()
    params, losses = worker.train(jax.jit(step), prob, prob["x"], prob["y"], 3)
    tree_allclose(jax.tree.map(np.asarray, params), expected_params, rtol=1e-6)
    np.testing.assert_allclose([float(v) for v in losses], expected_losses, rtol=1e-6)
    _assert_unknown(step.stats, transformed_calls=1)


# ------------------------------------------------------------------ direct calls


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_direct_counts_stay_exact(mode):
    prob = worker.problem(mode, 6, steps=12)
    step = prob["make_step"]()
    with fl.compile_counter() as counter:
        worker.train(step, prob, prob["x"], prob["y"], 12)
    distinct = len(set(prob["depths"]))
    expected = 1 if mode == "static" else distinct
    assert (step.stats.traces, step.stats.compiles) == (expected, expected)
    assert (step.stats.calls, step.stats.transformed_calls) == (12, 0)
    assert step.stats.compile_seconds > 0
    assert counter.compiles == expected
    assert counter.names == [f"jit({step.name})"] * expected
    with fl.compile_counter() as again:
        worker.train(step, prob, prob["x"], prob["y"], 3)
    assert again.compiles == 0
    assert step.stats.compiles == expected and step.stats.calls == 15


def test_stats_ignore_other_programs_compiled_during_a_call():
    other = jax.jit(lambda x: x * 3)

    def uses_other(x):
        # Compiled eagerly while `f` traces: another program, not `f`'s.
        with jax.ensure_compile_time_eval():
            other(jnp.ones(5))
        return x + 1

    f = fl.jit(uses_other)
    with fl.compile_counter() as counter:
        f(jnp.ones(3))
    assert f.stats.compiles == 1
    assert counter.compiles == 2


def test_compile_counter_counts_jit_programs_not_eager_ops():
    f = fl.jit(lambda x: x * 2, name="double_it")
    n = 6151  # a size no other test uses: eager ops on it compile afresh
    with fl.compile_counter() as counter:
        a = jnp.ones(n) + jnp.arange(n, dtype=jnp.float32)
        f(a)
        f(a)
    assert counter.names == ["jit(double_it)"]
    assert counter.eager_compiles >= 2
    with fl.compile_counter("double_it") as named:
        f(jnp.ones(n + 1))
    assert named.compiles == 1 and f.stats.compiles == 2


def test_trace_budget_names_changed_argument_directly_and_under_jit():
    f = fl.jit(lambda x, n: x * n, static_argnames="n", max_traces=1)
    f(jnp.ones(3), n=1)
    with pytest.raises(
        RuntimeError, match=r"trace budget exceeded.*`n` changed from 1 to 2"
    ):
        f(jnp.ones(3), n=2)
    g = fl.jit(lambda x: x + 1, max_traces=1)
    jax.jit(g)(jnp.ones(3))
    with pytest.raises(
        RuntimeError, match=r"`x` changed from float32\[3\] to float32\[4\]"
    ):
        jax.jit(g)(jnp.ones(4))
    assert g.stats.traces == 1


# ---------------------------------------------------------------------- listeners


@pytest.fixture
def listener_spy(monkeypatch):
    """Record every jax.monitoring duration listener registered and removed."""
    live, seen = [], []
    register = jax.monitoring.register_event_duration_secs_listener
    unregister = jax.monitoring.unregister_event_duration_listener

    def spy_register(listener):
        live.append(listener)
        seen.append(listener)
        register(listener)

    def spy_unregister(listener):
        live.remove(listener)
        unregister(listener)

    monkeypatch.setattr(
        jax.monitoring, "register_event_duration_secs_listener", spy_register
    )
    monkeypatch.setattr(
        jax.monitoring, "unregister_event_duration_listener", spy_unregister
    )
    return live, seen


def test_no_listener_outlives_a_call_or_block(listener_spy):
    live, seen = listener_spy
    f = fl.jit(lambda x, n: x * n, static_argnames="n", max_traces=2)
    f(jnp.ones(3), n=1)  # compiles
    assert len(seen) == 1 and live == []
    f(jnp.ones(3), n=1)  # cache hit
    f(jnp.ones(3), n=2)
    with pytest.raises(RuntimeError, match="trace budget exceeded"):
        f(jnp.ones(3), n=3)
    with pytest.raises(TypeError, match="static argument `n` must be hashable"):
        f(jnp.ones(3), n=[1])
    assert len(seen) == 5 and live == []
    with pytest.raises(ZeroDivisionError), fl.compile_counter():
        assert len(live) == 1
        f(jnp.ones(3), n=1)
        assert len(live) == 1
        raise ZeroDivisionError
    assert len(seen) == 7 and live == []
    jax.jit(lambda x: f(x, 2))(jnp.ones(3))  # transformed: nothing to listen to
    f(jnp.ones(3), n=1)  # stats unknown from now on: nothing either
    assert len(seen) == 7 and live == []


# -------------------------------------------------------------------- namespace


def test_star_import_does_not_shadow_compile():
    scope = {}
    exec("from functorch_lite import *", scope)
    assert "compile" not in scope
    assert fl.compile.jit is fl.jit
    assert "compile" not in fl.__all__


# ----------------------------------------------------------------- data_parallel


def _plain_update(prob, mode="static"):
    """An unjitted step with the make_step signature."""
    update = fl.train.make_update(
        lambda params, x, y, depth: fl.nn.mse_loss(
            prob["net"].apply(params, x, depth, mode=mode), y
        ),
        prob["optimizer"],
    )

    def plain_step(params, opt_state, x, y, depth):
        return update(params, opt_state, x, y, depth)

    return plain_step


@pytest.mark.parametrize("kind", ["jax.jit", "unjitted"])
def test_data_parallel_takes_any_jit_compatible_step(kind):
    prob = worker.problem("static", 6, steps=4)
    expected_params, expected_losses = _direct(prob, 4)
    plain = _plain_update(prob)
    step = jax.jit(plain) if kind == "jax.jit" else plain
    dp = fl.parallel.data_parallel(step)
    assert dp.name == "plain_step"
    assert dp.stats.compiles == 0
    params, losses = worker.train(dp, prob, prob["x"], prob["y"], 4)
    tree_allclose(jax.tree.map(np.asarray, params), expected_params, rtol=1e-6)
    np.testing.assert_allclose([float(v) for v in losses], expected_losses, rtol=1e-6)
    # Depth is traced (no static arguments): one compile for every depth.
    assert (dp.stats.traces, dp.stats.compiles, dp.stats.calls) == (1, 1, 4)
    assert repr(dp).startswith("<fl.parallel.data_parallel plain_step axis='data'")


_EIGHT_DEVICES = textwrap.dedent(
    """
    import jax, numpy as np
    import functorch_lite as fl
    from tests import _parallel_worker as worker
    from tests.test_compile_compose import _direct, _plain_update
    assert jax.device_count() == 8, jax.devices()
    prob = worker.problem("static", 16, steps=5)
    want_params, want_losses = _direct(prob, 5)
    plain = _plain_update(prob)
    for step in (jax.jit(plain), plain):
        dp = fl.parallel.data_parallel(step)
        params, losses = worker.train(dp, prob, prob["x"], prob["y"], 5)
        leaf = params["input_linear"]["weight"]
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([float(v) for v in losses], want_losses, rtol=1e-5)
        assert dp.stats.compiles == 1, dp.stats
    # A jax.jit step with a static depth (the dynamic path): named here, since
    # JAX does not expose them; donated as the step would be.
    prob = worker.problem("dynamic", 16, steps=5, depths=(1, 3))
    want_params, want_losses = _direct(prob, 5)
    step = jax.jit(_plain_update(prob, "dynamic"), static_argnames="depth")
    dp = fl.parallel.data_parallel(
        step, static_argnames=("depth",), donate_argnames=("params", "opt_state")
    )
    params, losses = worker.train(dp, prob, prob["x"], prob["y"], 5)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(v) for v in losses], want_losses, rtol=1e-5)
    assert dp.stats.compiles == len(set(prob["depths"])) == 2, dp.stats
    p0 = prob["net"].init(jax.random.key(0))
    dp(p0, prob["optimizer"].init(p0), prob["x"], prob["y"], 1)
    assert p0["input_linear"]["weight"].is_deleted()  # donated
    # make_update under the user's own shard_map: each device takes 2 rows,
    # the loss is averaged over devices, and the update equals the whole-batch one.
    from jax.sharding import PartitionSpec as P
    net, opt = prob["net"], prob["optimizer"]
    def local_loss(params, x, y):
        mean = fl.nn.mse_loss(net.apply(params, x, 2), y, reduction="mean")
        return jax.lax.pmean(mean, "data")
    update = fl.train.make_update(local_loss, opt)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.jit(jax.shard_map(
        update, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P(), P(), P())))
    whole = fl.train.make_update(
        lambda p, x, y: fl.nn.mse_loss(net.apply(p, x, 2), y, reduction="mean"), opt)
    p0 = net.init(jax.random.key(0))
    got = sharded(p0, opt.init(p0), prob["x"], prob["y"])
    want = whole(p0, opt.init(p0), prob["x"], prob["y"])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
    w0, w1 = p0["input_linear"]["weight"], got[0]["input_linear"]["weight"]
    assert not np.allclose(w1, w0)
    print("OK")
    """
)


def test_data_parallel_needs_a_jax_jit_steps_static_argnames():
    prob = worker.problem("dynamic", 6, steps=2, depths=(1, 3))
    step = jax.jit(_plain_update(prob, "dynamic"), static_argnames="depth")
    params = prob["net"].init(jax.random.key(0))
    state = prob["optimizer"].init(params)
    dp = fl.parallel.data_parallel(step)
    with pytest.raises(
        TypeError,
        match=r"data_parallel\(plain_step\): `step` is a `jax.jit` function.*"
        r"static_argnames=",
    ):
        dp(params, state, prob["x"], prob["y"], 1)
    with pytest.raises(ValueError, match=r"`static_argnames` names \['dpeth'\]"):
        fl.parallel.data_parallel(step, static_argnames=("dpeth",))
    with pytest.raises(TypeError, match=r"`donate_argnames` must be"):
        fl.parallel.data_parallel(step, donate_argnames=3)
    dp = fl.parallel.data_parallel(step, static_argnames=["depth"])
    _, _, loss = dp(params, state, prob["x"], prob["y"], 1)
    assert np.isfinite(float(loss)) and dp.stats.compiles == 1


def test_data_parallel_plain_steps_on_eight_devices():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH")])
    )
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    result = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert result.stdout.strip().endswith("OK")
