"""make_step, make_fused_step and fit: optax equivalence, parity, compile counts."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import Terminal, primitives, tree_allclose

import functorch_lite as fl

N, D_IN, H, D_OUT = 64, 1000, 100, 10


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _problem(key, sizes=(N, D_IN, H, D_OUT), max_depth=3):
    n, d_in, h, d_out = sizes
    kx, ky, kp = jax.random.split(key, 3)
    net = fl.models.DynamicNet(d_in, h, d_out, max_depth=max_depth)
    x = jax.random.normal(kx, (n, d_in))
    y = jax.random.normal(ky, (n, d_out))
    return net, net.init(kp), x, y


def _loss_fn(net, mode):
    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth, mode=mode), y)

    return loss_fn


def _make(net, mode, opt, **kwargs):
    static = ("depth",) if mode == "dynamic" else ()
    return fl.train.make_step(
        _loss_fn(net, mode), opt, static_argnames=static, **kwargs
    )


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_one_step_equals_handwritten_optax(key, mode):
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.sgd(1e-2, momentum=0.9)
    state = opt.init(params)
    # Hand-written: two steps, so that the momentum buffer matters.
    p_ref, s_ref = _copy(params), _copy(state)
    for depth in (2, 1):
        grads = jax.grad(_loss_fn(net, "dynamic"))(p_ref, x, y, depth)
        updates, s_ref = opt.update(grads, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, updates)
    step = _make(net, mode, opt)
    p, s = _copy(params), _copy(state)
    for depth in (2, 1):
        p, s, _ = step(p, s, x, y, depth)
    tree_allclose(p, p_ref)
    tree_allclose(s, s_ref)
    assert jax.tree.structure(s) == jax.tree.structure(state)
    assert jax.tree.structure(p) == jax.tree.structure(params)


def test_two_scalar_steps_match_closed_form():
    lr, m, c, w0 = 0.1, 0.9, 3.0, 2.0
    opt = optax.sgd(lr, momentum=m)
    step = fl.train.make_step(lambda p, c: 0.5 * c * jnp.sum(p["w"] ** 2), opt)
    params = {"w": jnp.array([w0], jnp.float32)}
    state = opt.init(params)
    params, state, loss0 = step(params, state, c)
    params, state, loss1 = step(params, state, c)
    # v1 = g0, w1 = w0 - lr g0; v2 = m v1 + g1, w2 = w1 - lr v2; g = c w.
    g0 = c * w0
    w1 = w0 - lr * g0
    w2 = w1 - lr * (m * g0 + c * w1)
    assert float(loss0) == pytest.approx(0.5 * c * w0**2, rel=1e-6)
    assert float(loss1) == pytest.approx(0.5 * c * w1**2, rel=1e-6)
    assert float(params["w"][0]) == pytest.approx(w2, rel=1e-6)


def test_quadratic_converges():
    target = jnp.arange(4.0)
    opt = optax.sgd(0.1, momentum=0.9)
    step = fl.train.make_step(lambda p, t: jnp.sum((p["w"] - t) ** 2), opt)
    params = {"w": jnp.zeros(4)}
    state = opt.init(params)
    for _ in range(200):
        params, state, loss = step(params, state, target)
    assert float(loss) < 1e-8
    np.testing.assert_allclose(params["w"], target, atol=1e-4)


def test_donated_buffers_are_consumed(key):
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.sgd(1e-3)
    step = _make(net, "static", opt)
    state = opt.init(params)
    new_params, _, _ = step(params, state, x, y, 1)
    assert all(a.is_deleted() for a in jax.tree.leaves(params))
    assert not any(a.is_deleted() for a in jax.tree.leaves(new_params))
    keep = _make(net, "static", opt, donate=False)
    p2 = _copy(new_params)
    keep(p2, opt.init(p2), x, y, 1)
    assert not any(a.is_deleted() for a in jax.tree.leaves(p2))


def test_static_and_dynamic_training_agree_and_compile_counts(key):
    net, params, x, y = _problem(key)
    opt = optax.sgd(1e-4, momentum=0.9)
    depths = np.random.default_rng(0).integers(0, 4, size=200)
    results = {}
    for mode in ("static", "dynamic"):
        traces = []
        loss_fn = _loss_fn(net, mode)

        def counted(params, x, y, depth, loss_fn=loss_fn, traces=traces):
            traces.append(depth)
            return loss_fn(params, x, y, depth)

        static = ("depth",) if mode == "dynamic" else ()
        step = fl.train.make_step(counted, opt, static_argnames=static)
        p, s = _copy(params), opt.init(params)
        losses = []
        with fl.compile_counter() as counter:
            for d in depths:
                p, s, loss = step(p, s, x, y, int(d))
                losses.append(float(loss))
        results[mode] = (np.array(losses), jax.tree.map(np.asarray, p))
        distinct = len(set(depths.tolist()))
        expected = 1 if mode == "static" else distinct
        assert len(traces) == expected
        assert step.stats.traces == expected
        assert step.stats.compiles == expected
        assert counter.compiles == expected
        assert step.stats.calls == 200
    # Measured (CPU, float32): the two compiled programs round differently, by
    # at most 6.3e-7 relative over the first 100 losses and 1.3e-5 over all 200
    # (the error grows with training); the final params differ by at most
    # 4.5e-5 absolute (middle_linear.weight, |w| <= 0.34). Bounds: ~3x those.
    (static_losses, static_p), (dynamic_losses, dynamic_p) = (
        results["static"],
        results["dynamic"],
    )
    assert static_losses.shape == dynamic_losses.shape == (200,)
    np.testing.assert_allclose(static_losses[:100], dynamic_losses[:100], rtol=2e-6)
    np.testing.assert_allclose(static_losses, dynamic_losses, rtol=4e-5)
    tree_allclose(static_p, dynamic_p, rtol=0, atol=1.5e-4)


def test_repeated_depth_and_second_call_compile_nothing(key):
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.sgd(1e-3, momentum=0.9)
    for mode in ("static", "dynamic"):
        step = _make(net, mode, opt)
        p, s = _copy(params), opt.init(params)
        p, s, _ = step(p, s, x, y, 2)
        with fl.compile_counter() as counter:
            p, s, _ = step(p, s, x, y, 2)
            p, s, _ = step(p, s, x, y, depth=2)
        assert counter.compiles == 0, mode


def test_trace_budget_in_make_step_names_depth(key):
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.sgd(1e-3)
    step = _make(net, "dynamic", opt, max_traces=2)
    p, s = _copy(params), opt.init(params)
    p, s, _ = step(p, s, x, y, 0)
    p, s, _ = step(p, s, x, y, 1)
    with pytest.raises(RuntimeError, match=r"`depth` changed from 1 to 2"):
        step(p, s, x, y, 2)


def test_fused_equals_separate_steps(key):
    net, params, x, y = _problem(key, (16, 12, 8, 4))
    opt = optax.sgd(1e-3, momentum=0.9)
    depths = jnp.array([0, 3, 1, 2, 2, 0, 3, 3, 1, 0])
    step = _make(net, "static", opt)
    p, s = _copy(params), opt.init(params)
    ref_losses = []
    for d in depths.tolist():
        p, s, loss = step(p, s, x, y, d)
        ref_losses.append(float(loss))
    fused = fl.train.make_fused_step(
        _loss_fn(net, "static"), opt, shared_argnames=("x", "y")
    )
    fp, fs, losses = fused(_copy(params), opt.init(params), x, y, depths)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    tree_allclose(fp, p, rtol=1e-5)
    tree_allclose(fs, s, rtol=1e-5)
    assert fused.stats.compiles == 1
    fused(fp, fs, x, y, depths[::-1])
    assert fused.stats.compiles == 1


def _specialized_and_loop(net, opt):
    """The fused step with `specialize` (branches) and without (the bounded loop)."""
    fast = fl.train.make_fused_step(
        _loss_fn(net, "dynamic"),
        opt,
        shared_argnames=("x", "y"),
        specialize={"depth": 4},
        donate=False,
    )
    loop = fl.train.make_fused_step(
        _loss_fn(net, "static"), opt, shared_argnames=("x", "y"), donate=False
    )
    return fast, loop


def test_fused_specialize_equals_the_loop_and_the_dynamic_steps(key):
    """`specialize`: one branch per depth; the same training as the bounded
    loop's fused step and as the dynamic path's steps, at every depth."""
    net, params, x, y = _problem(key, (16, 12, 8, 4))
    opt = optax.sgd(1e-3, momentum=0.9)
    fast, loop = _specialized_and_loop(net, opt)
    dynamic = _make(net, "dynamic", opt)
    mixed = jnp.array([0, 3, 1, 2, 2, 0, 3, 3, 1, 0], jnp.int32)
    for depths in [mixed, *(jnp.full(10, d, jnp.int32) for d in range(4))]:
        p, s = _copy(params), opt.init(params)
        ref_losses = []
        for d in depths.tolist():
            p, s, loss = dynamic(p, s, x, y, d)
            ref_losses.append(float(loss))
        fp, fs, losses = fast(params, opt.init(params), x, y, depths)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        tree_allclose(fp, p, rtol=1e-5)
        tree_allclose(fs, s, rtol=1e-5)
        lp, ls, loop_losses = loop(params, opt.init(params), x, y, depths)
        np.testing.assert_allclose(losses, loop_losses, rtol=1e-5)
        tree_allclose(fp, lp, rtol=1e-5)
    assert fast.stats.compiles == 1 and fast.stats.traces == 1


def test_fused_specialize_traces_straight_line_branches(key):
    """The step's program switches over four branches, none with a loop."""
    net, params, x, y = _problem(key, (4, 3, 5, 2))
    opt = optax.sgd(1e-3)
    fast = fl.train.make_fused_step(
        _loss_fn(net, "dynamic"),
        opt,
        shared_argnames=("x", "y"),
        specialize={"depth": 4},
    )
    depths = jnp.array([1, 3], jnp.int32)
    jaxpr = jax.make_jaxpr(fast)(params, opt.init(params), x, y, depths).jaxpr

    def conds(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "cond":
                yield eqn
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    yield from conds(inner)

    # One switch over the four depths; traced here outside a call, the range
    # check adds its own two-way cond (an error callback), and nothing else does.
    found = list(conds(jaxpr))
    (switch,) = [e for e in found if len(e.params["branches"]) == 4]
    assert all(len(e.params["branches"]) == 2 for e in found if e is not switch)
    branches = switch.params["branches"]
    assert all("while" not in primitives(b.jaxpr) for b in branches)
    # The optimizer update is outside the switch: the branches return the loss
    # and one gradient per param leaf, nothing else.
    assert len(switch.outvars) == 1 + len(jax.tree.leaves(params))


def test_fused_specialize_with_an_optimizer_that_reads_the_loss(key):
    """Optimizers given `value_fn` (L-BFGS's line search) call the same branch."""
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.lbfgs()
    depths = jnp.array([2, 0, 3], jnp.int32)
    fast, loop = _specialized_and_loop(net, opt)
    fp, _, losses = fast(params, opt.init(params), x, y, depths)
    lp, _, loop_losses = loop(params, opt.init(params), x, y, depths)
    np.testing.assert_allclose(losses, loop_losses, rtol=1e-4)
    tree_allclose(fp, lp, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("by_name", [False, True])
def test_step_specialize_equals_the_dynamic_path_per_call(key, by_name):
    """`make_step(..., specialize=...)`: one compile, each call the dynamic
    path's program for its depth: same losses, params and state."""
    net, params, x, y = _problem(key, (16, 12, 8, 4))
    opt = optax.sgd(1e-3, momentum=0.9)
    fast = fl.train.make_step(
        _loss_fn(net, "dynamic"), opt, specialize={"depth": 4}, donate=False
    )
    dynamic = _make(net, "dynamic", opt, donate=False)
    p, s = _copy(params), opt.init(params)
    fp, fs = _copy(params), opt.init(params)
    for d in [0, 3, 1, 2, 2, 0, 3]:
        p, s, loss = dynamic(p, s, x, y, d)
        if by_name:
            fp, fs, fast_loss = fast(fp, fs, x, y, depth=jnp.int32(d))
        else:
            fp, fs, fast_loss = fast(fp, fs, x, y, d)
        np.testing.assert_allclose(fast_loss, loss, rtol=1e-5)
    tree_allclose(fp, p, rtol=1e-5)
    tree_allclose(fs, s, rtol=1e-5)
    assert fast.stats.compiles == 1


def test_step_specialize_skips_the_leaves_its_branch_leaves_unused(key):
    """`skip_unused=True` under `specialize` skips what the chosen depth's branch
    does not read, as it does on the dynamic path."""
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.sgd(1e-2, momentum=0.9)
    fast = fl.train.make_step(
        _loss_fn(net, "dynamic"),
        opt,
        specialize={"depth": 4},
        skip_unused=True,
        donate=False,
    )
    dynamic = _make(net, "dynamic", opt, skip_unused=True, donate=False)
    p, s = _copy(params), opt.init(params)
    fp, fs = _copy(params), opt.init(params)
    for d in [2, 0, 0, 3]:
        p, s, _ = dynamic(p, s, x, y, d)
        fp, fs, _ = fast(fp, fs, x, y, d)
        tree_allclose(fp, p, rtol=1e-5)
        tree_allclose(fs, s, rtol=1e-5)
    # At depth 0 the middle layer is not read: its weights and momentum hold.
    before = _copy(fp)
    fp, _, _ = fast(fp, fs, x, y, 0)
    tree_allclose(fp["middle_linear"], before["middle_linear"], rtol=0, atol=0)
    assert not np.allclose(
        fp["input_linear"]["weight"], before["input_linear"]["weight"]
    )


def test_update_specialize_with_aux_guard_and_vmap(key):
    """`make_update(..., specialize=...)` under `jax.vmap` over a depth per
    problem, with `has_aux` and `guard`: each row is the dynamic path's update."""
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.sgd(1e-2, momentum=0.9)

    def loss_fn(params, x, y, depth):
        loss = fl.nn.mse_loss(net.apply(params, x, depth, mode="dynamic"), y)
        return loss, {"depth_seen": jnp.float32(depth)}

    update = fl.train.make_update(
        loss_fn, opt, has_aux=True, guard=True, specialize={"depth": 4}
    )
    depths = jnp.array([3, 0, 2], jnp.int32)
    xs = jnp.stack([x, 2 * x, -x])
    state = opt.init(params)
    batched = jax.vmap(update, in_axes=(None, None, 0, None, 0))
    new_params, _, losses, aux = jax.jit(batched)(params, state, xs, y, depths)
    np.testing.assert_array_equal(aux["depth_seen"], [3.0, 0.0, 2.0])
    for row, d in enumerate(depths.tolist()):
        ref = fl.train.make_update(loss_fn, opt, has_aux=True, guard=True)
        p, _, loss, _ = jax.jit(ref, static_argnames="depth")(
            params, state, xs[row], y, depth=d
        )
        np.testing.assert_allclose(losses[row], loss, rtol=1e-5)
        tree_allclose(jax.tree.map(lambda a, r=row: a[r], new_params), p, rtol=1e-5)


def test_fused_specialize_bad_input(key):
    net, params, x, y = _problem(key, (4, 3, 5, 2))
    opt = optax.sgd(1e-3)
    loss_fn = _loss_fn(net, "dynamic")

    def make(spec):
        return fl.train.make_fused_step(
            loss_fn, opt, shared_argnames=("x", "y"), specialize=spec, donate=False
        )

    with pytest.raises(ValueError, match=r"make_fused_step: `specialize` names 'x'"):
        make({"x": 2})
    with pytest.raises(ValueError, match=r"specialize\['depth'\]` must be .*2"):
        make({"depth": 1})
    with pytest.raises(TypeError, match=r"`specialize` must be a dict of one"):
        make({"depth": 4, "y": 2})
    fast = make({"depth": 4})
    state = opt.init(params)
    for bad, got in [([0, 4], "got 4 at step 1"), ([-1, 2], "got -1 at step 0")]:
        with pytest.raises(ValueError, match=rf"`depth` must be in \[0, 3\]; {got}"):
            fast(params, state, x, y, jnp.array(bad, jnp.int32))
    with pytest.raises(TypeError, match=r"`depth`, named in `specialize`, must be an"):
        fast(params, state, x, y, jnp.array([0.0, 1.0]))
    with pytest.raises(Exception, match=r"make_fused_step: every `depth` must be in"):
        jax.block_until_ready(
            jax.jit(fast)(params, state, x, y, jnp.array([0, 7], jnp.int32))
        )

    step = fl.train.make_step(loss_fn, opt, specialize={"depth": 4}, donate=False)
    with pytest.raises(
        ValueError, match=r"make_step: `depth` must be in \[0, 3\]; got 5"
    ):
        step(params, state, x, y, 5)
    with pytest.raises(TypeError, match=r"make_step: `depth`, named in `specialize`"):
        step(params, state, x, y, 1.0)
    with pytest.raises(
        ValueError, match=r"make_step: `specialize` names 'depth'.*static"
    ):
        fl.train.make_step(
            loss_fn, opt, static_argnames=("depth",), specialize={"depth": 4}
        )
    with pytest.raises(TypeError, match=r"must be an int scalar; got NoneType"):
        step(params, state, x, y, None)
    eager = fl.train.make_update(loss_fn, opt, specialize={"depth": 4})
    # Not traced: checked in Python, not clamped by lax.switch.
    with pytest.raises(ValueError, match=r"make_update: `depth` must be in \[0, 3\]"):
        eager(params, state, x, y, 7)

    def loss_default(params, x, y, depth=0):
        return loss_fn(params, x, y, depth)

    omitted = fl.train.make_step(loss_default, opt, specialize={"depth": 4})
    with pytest.raises(
        TypeError, match=r"make_step: `depth`, named in `specialize`, was not passed"
    ):
        omitted(params, state, x, y)

    def loss_depth_dtype(params, x, y, depth):  # float32 at depth 0, float16 past it
        loss = loss_fn(params, x, y, depth)
        return loss if depth == 0 else loss.astype(jnp.float16)

    mixed = fl.train.make_step(loss_depth_dtype, opt, specialize={"depth": 2})
    with pytest.raises(TypeError, match=r"make_step: with `specialize=\{'depth': 2\}`"):
        mixed(params, state, x, y, 1)


@pytest.mark.parametrize("donate", [True, False])
def test_fused_step_donates_params_and_state(key, donate):
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.sgd(1e-3, momentum=0.9)
    fused = fl.train.make_fused_step(
        _loss_fn(net, "static"), opt, shared_argnames=("x", "y"), donate=donate
    )
    p, s = _copy(params), opt.init(params)
    depths = jnp.array([0, 2, 1])
    new_p, new_s, losses = fused(p, s, x, y, depths)
    inputs = jax.tree.leaves((p, s))
    assert len(inputs) == 12  # 6 params leaves, 6 momentum leaves
    deleted = [a.is_deleted() for a in inputs]
    assert deleted == [donate] * len(inputs)
    assert not any(a.is_deleted() for a in jax.tree.leaves((new_p, new_s, x, y)))
    assert not depths.is_deleted()
    if not donate:  # the kept inputs are the untouched initial state
        tree_allclose(p, params, rtol=0, atol=0)
    # The returned state feeds the next call (donated again, or kept).
    fused(new_p, new_s, x, y, depths)
    assert [a.is_deleted() for a in jax.tree.leaves((new_p, new_s))] == [donate] * 12


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_fit_equals_a_plain_step_loop_bitwise(key, mode):
    """`fit` is one step per batch, in order: a hand-written loop replays it."""
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.sgd(1e-3, momentum=0.9)
    depths = [0, 3, 1, 2, 2, 0, 3, 1]
    # Tuples and dicts, as `fit` documents.
    batches = [
        (x, y, d) if i % 2 else {"x": x, "y": y, "depth": d}
        for i, d in enumerate(depths)
    ]
    ref_step = _make(net, mode, opt)
    p, s = _copy(params), opt.init(params)
    ref_losses = []
    for d in depths:
        p, s, loss = ref_step(p, s, x, y, d)
        ref_losses.append(float(loss))

    step = _make(net, mode, opt)
    fp, fs, losses = fl.train.fit(
        step, _copy(params), opt.init(params), batches, progress=False
    )
    assert step.stats.calls == len(depths)
    np.testing.assert_array_equal(losses, np.array(ref_losses, np.float64))
    tree_allclose(fp, p, rtol=0, atol=0)
    tree_allclose(fs, s, rtol=0, atol=0)


def test_fused_draws_depths_in_graph(key):
    net, params, x, y = _problem(key, (16, 12, 8, 4))
    opt = optax.sgd(1e-3)

    def loss_fn(params, x, y, key):
        depth = jax.random.randint(key, (), 0, net.max_depth + 1)
        return fl.nn.mse_loss(net.apply(params, x, depth), y)

    keys = jax.random.split(jax.random.key(4), 6)
    fused = fl.train.make_fused_step(loss_fn, opt, shared_argnames=("x", "y"))
    fp, fs, losses = fused(_copy(params), opt.init(params), x, y, keys)
    # The depths are drawn in the graph: one compile, whatever keys come next.
    assert fused.stats.compiles == 1
    fused(fp, fs, x, y, jax.random.split(jax.random.key(5), 6))
    assert (fused.stats.traces, fused.stats.compiles, fused.stats.calls) == (1, 1, 2)
    step = fl.train.make_step(loss_fn, opt)
    p, s = _copy(params), opt.init(params)
    for i in range(6):
        p, s, loss = step(p, s, x, y, keys[i])
        assert float(loss) == pytest.approx(float(losses[i]), rel=1e-5)
    assert step.stats.compiles == 1


def test_fit_returns_history_and_shows_progress(key, capsys):
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.sgd(1e-3, momentum=0.9)
    step = _make(net, "static", opt)
    batches = [(x, y, d) for d in [0, 1, 2, 3] * 3]
    p, s, losses = fl.train.fit(
        step, params, opt.init(params), batches, log_every=4, total=12
    )
    assert losses.shape == (12,) and losses.dtype == np.float64
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert capsys.readouterr().err == ""  # stderr is not a terminal: quiet
    _, _, again = fl.train.fit(
        step, _copy(p), s, [{"x": x, "y": y, "depth": 1}], progress=False
    )
    assert again.shape == (1,)


def test_fit_shows_a_progress_bar_on_a_terminal(key, monkeypatch):
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.sgd(1e-3, momentum=0.9)
    step = _make(net, "static", opt)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _, _, losses = fl.train.fit(
        step, params, opt.init(params), [(x, y, 2)] * 12, log_every=4, total=12
    )
    shown = terminal.getvalue()
    assert "fit:" in shown and "12/12" in shown and "step/s" in shown
    assert f"loss={losses[-1]:.6g}" in shown


def test_train_errors(key):
    net, params, x, y = _problem(key, (8, 6, 5, 3))
    opt = optax.sgd(1e-3)
    with pytest.raises(TypeError, match="make_step: `loss_fn` must be callable"):
        fl.train.make_step(None, opt)
    with pytest.raises(TypeError, match="make_step: `optimizer` must be an optax"):
        fl.train.make_step(_loss_fn(net, "static"), lambda g: g)
    with pytest.raises(
        ValueError, match=r"make_step: `static_argnames` names \['dept'\]"
    ):
        fl.train.make_step(_loss_fn(net, "static"), opt, static_argnames=("dept",))
    with pytest.raises(TypeError, match="must take `params` as its first positional"):
        fl.train.make_step(lambda *, params: 0.0, opt)
    with pytest.raises(
        ValueError, match=r"make_fused_step: `shared_argnames` names \['z'\]"
    ):
        fl.train.make_fused_step(_loss_fn(net, "static"), opt, shared_argnames=("z",))
    fused = fl.train.make_fused_step(
        _loss_fn(net, "static"), opt, shared_argnames=("x",)
    )
    with pytest.raises(ValueError, match="must share one leading steps axis"):
        fused(
            params,
            opt.init(params),
            x,
            jnp.zeros((3, 8, 3)),
            jnp.zeros((4,), jnp.int32),
        )
    step = _make(net, "static", opt)
    with pytest.raises(TypeError, match="fit: each item of `batches` must be a tuple"):
        fl.train.fit(step, params, opt.init(params), [x], progress=False)
    with pytest.raises(ValueError, match="fit: `log_every` must be a positive int"):
        fl.train.fit(step, params, opt.init(params), [], log_every=0)
