"""Errors at the public boundary: donated buffers, interrupted `fit`, loose options.

Each case is a mistake users make; each must give an error that names the
function and the argument (or hand back the trained state), never a raw XLA
error, a crash or a silent wrong answer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functorch_lite as fl

NET = fl.models.DynamicNet(6, 5, 3)
OPT = optax.sgd(1e-3, momentum=0.9)


def _loss(params, x, y, depth):
    return fl.nn.mse_loss(NET.apply(params, x, depth), y)


def _state(seed=0):
    params = NET.init(jax.random.key(seed))
    return params, OPT.init(params)


def _batch(rows=4, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (rows, 6)), jax.random.normal(ky, (rows, 3))


# ------------------------------------------------------------- donated buffers


def test_reusing_donated_params_names_the_argument():
    step = fl.train.make_step(_loss, OPT)
    params, opt_state = _state()
    x, y = _batch()
    new_params, new_state, _ = step(params, opt_state, x, y, 1)
    with pytest.raises(
        ValueError,
        match=r"step: `params\['input_linear'\]\['bias'\]` was donated to an earlier "
        r"call.*Pass the arrays the call returned.*donate=False",
    ):
        step(params, new_state, x, y, 1)
    # The error is raised before anything runs: the fresh state still works.
    _, _, loss = step(new_params, new_state, x, y, 1)
    assert np.isfinite(float(loss))


def test_a_donated_leaf_is_found_beside_plain_numbers(capfd):
    # The check runs on every call, before dispatch (XLA would log an error
    # line first), over leaves that need not be arrays.
    double = fl.jit(
        lambda params: jax.tree.map(lambda v: v * 2, params),
        donate_argnames=("params",),
    )
    params = {"scale": 1.5, "w": jnp.ones(3)}
    out = double(params)
    np.testing.assert_allclose(out["w"], 2.0)
    with pytest.raises(ValueError, match=r"`params\['w'\]` was donated to an earlier"):
        double({"scale": 1.5, "w": params["w"]})
    assert "deleted or donated" not in capfd.readouterr().err
    np.testing.assert_allclose(double(out)["w"], 4.0)  # the returned arrays still work


def test_one_array_donated_twice_is_named():
    def loss(params, x):
        return jnp.sum(params["w"] * x)

    opt = optax.GradientTransformation(
        init=lambda p: {"copy": p["w"]},
        update=lambda g, s, p=None: (g, s),
    )
    step = fl.train.make_step(loss, opt)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)  # the very array in params
    with pytest.raises(
        ValueError,
        match=r"`params\['w'\]` and `opt_state\['copy'\]` are the same array",
    ):
        step(params, state, jnp.ones(3))


def test_data_parallel_checks_donated_buffers_before_running():
    # On a multi-device CPU mesh a deleted buffer crashes the process instead
    # of raising; the check happens before dispatch, whatever the mesh.
    dp = fl.parallel.data_parallel(fl.train.make_step(_loss, OPT))
    params, opt_state = _state()
    x, y = _batch()
    new_params, new_state, _ = dp(params, opt_state, x, y, 1)
    with pytest.raises(
        ValueError, match=r"data_parallel\(step\): `opt_state.*` was donated"
    ):
        dp(new_params, opt_state, x, y, 1)


# ------------------------------------------------------------- fit, interrupted


def _plain_steps(batches, seed=0):
    step = fl.train.make_step(_loss, OPT, donate=False)
    params, opt_state = _state(seed)
    for batch in batches:
        params, opt_state, _ = step(params, opt_state, *batch)
    return params, opt_state


def test_fit_hands_back_the_state_when_a_batch_is_bad():
    x, y = _batch()
    good = [(x, y, d) for d in (0, 2, 1)]
    bad = (jnp.ones((4, 7)), y, 1)  # x has the wrong width
    params, opt_state = _state()
    with pytest.raises(ValueError, match=r"DynamicNet.apply: `x`") as info:
        fl.train.fit(
            fl.train.make_step(_loss, OPT),
            params,
            opt_state,
            [*good, bad],
            progress=False,
        )
    err = info.value
    assert err.step == 3
    want_params, want_state = _plain_steps(good)
    for got, want in zip(
        jax.tree.leaves((err.params, err.opt_state)),
        jax.tree.leaves((want_params, want_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def test_fit_hands_back_the_state_on_keyboard_interrupt():
    x, y = _batch()

    def batches():
        yield (x, y, 1)
        yield (x, y, 2)
        raise KeyboardInterrupt

    params, opt_state = _state()
    with pytest.raises(KeyboardInterrupt) as info:
        fl.train.fit(
            fl.train.make_step(_loss, OPT), params, opt_state, batches(), progress=False
        )
    assert info.value.step == 2
    want, _ = _plain_steps([(x, y, 1), (x, y, 2)])
    np.testing.assert_array_equal(
        info.value.params["middle_linear"]["weight"], want["middle_linear"]["weight"]
    )


def test_fit_checks_checkpoint_dir_before_the_first_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    params, opt_state = _state()
    x, y = _batch()
    with pytest.raises(ValueError, match=r"fit: cannot create `checkpoint_dir`"):
        fl.train.fit(
            fl.train.make_step(_loss, OPT),
            params,
            opt_state,
            [(x, y, 1)] * 4,
            progress=False,
            checkpoint_every=2,
            checkpoint_dir=blocker / "sub",
        )
    assert not params["input_linear"]["weight"].is_deleted()  # nothing ran


def test_fit_rejects_a_fused_step():
    fused = fl.train.make_fused_step(_loss, OPT, shared_argnames=("x", "y"))
    params, opt_state = _state()
    x, y = _batch()
    with pytest.raises(TypeError, match=r"fit: `step` is a fused step"):
        fl.train.fit(
            fused, params, opt_state, [(x, y, jnp.array([1, 2]))], progress=False
        )
    assert not params["input_linear"]["weight"].is_deleted()


def test_fit_rejects_a_step_returning_many_losses():
    def many(params, opt_state, x, y):  # not a make_step step: K losses
        return params, opt_state, jnp.zeros(3)

    params, opt_state = _state()
    x, y = _batch()
    with pytest.raises(TypeError, match=r"fit: the step returned a loss of shape") as e:
        fl.train.fit(many, params, opt_state, [(x, y)], progress=False)
    assert e.value.step == 1


# --------------------------------------------------------------- loose options


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: fl.train.make_step(_loss, OPT, guard="no"),
            r"make_step: `guard` must be a bool; got ",
        ),
        (
            lambda: fl.train.make_step(_loss, OPT, donate=1),
            r"make_step: `donate` must be a bool; got ",
        ),
        (
            lambda: fl.train.make_fused_step(_loss, OPT, donate="yes"),
            r"make_fused_step: `donate` must be a bool; got ",
        ),
        (
            lambda: fl.train.fit(
                fl.train.make_step(_loss, OPT), *_state(), [], resume="no"
            ),
            r"fit: `resume` must be a bool; got ",
        ),
        (
            lambda: fl.train.fit(
                fl.train.make_step(_loss, OPT), *_state(), [], progress=None
            ),
            r"fit: `progress` must be a bool; got ",
        ),
        (
            lambda: fl.jit(lambda x: x, static_argnames=3),
            r"jit: `static_argnames` must be a str or a sequence of str",
        ),
    ],
)
def test_options_of_the_wrong_type(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_argnames_as_a_str_or_none():
    def power(x, n):
        return x**n

    f = fl.jit(power, static_argnames="n")
    assert float(f(jnp.float32(2.0), 3)) == 8.0
    g = fl.jit(power, static_argnames=None, donate_argnames=None)
    assert g.static_argnames == () and g.donate_argnames == ()
    fused = fl.train.make_fused_step(_loss, OPT, shared_argnames=None)
    assert fused.shared_argnames == ()


def test_fused_step_errors_name_make_fused_step():
    fused = fl.train.make_fused_step(_loss, OPT, shared_argnames=("y",))
    params, _ = _state()
    x, y = _batch()
    xs = jnp.stack([x, x])
    with pytest.raises(TypeError, match=r"make_fused_step: `opt_state` does not"):
        fused(params, optax.adam(1e-3).init(params), xs, y, jnp.array([1, 2]))
    with pytest.raises(ValueError, match=r"make_fused_step: .*one leading steps axis"):
        fused(params, OPT.init(params), xs, y, jnp.array([1, 2, 3]))


@pytest.mark.parametrize(
    ("buckets", "error", "match"),
    [
        ([2.5, 8], TypeError, r"bucket_size: `buckets\[0\]` must be a positive int"),
        ("64", TypeError, r"bucket_size: `buckets` must be a sequence"),
        (8, TypeError, r"bucket_size: `buckets` must be a sequence"),
        ([-4, 8], ValueError, r"`buckets\[0\]` must be a positive int; got -4"),
        ([], ValueError, r"bucket_size: `buckets` is empty"),
        ([2], ValueError, r"larger than the largest bucket 2"),
    ],
)
def test_bad_buckets(buckets, error, match):
    with pytest.raises(error, match=match):
        fl.train.bucket_size(3, buckets=buckets)


def test_pad_batch_names_itself():
    with pytest.raises(ValueError, match=r"pad_batch: the batch is empty"):
        fl.train.pad_batch(jnp.ones((0, 3)))
    with pytest.raises(ValueError, match=r"pad_batch: a batch of 9 rows"):
        fl.train.pad_batch(jnp.ones((9, 3)), buckets=[4, 8])


# ------------------------------------------------------------------- the loss


def test_masked_rows_add_nothing_even_inf_or_nan():
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((5, 2)).astype(np.float32)
    target = rng.standard_normal((5, 2)).astype(np.float32)
    poisoned = pred.copy()
    poisoned[3] = np.inf
    poisoned[4] = np.nan
    mask = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    for reduction in ("sum", "mean"):

        def masked(p, reduction=reduction):
            t = jnp.asarray(target)
            return fl.nn.mse_loss(p, t, reduction=reduction, mask=mask)

        value, grad = jax.value_and_grad(masked)(jnp.asarray(poisoned))
        diff = pred[:3].astype(np.float64) - target[:3]
        want = (diff**2).sum() / (1 if reduction == "sum" else diff.size)
        want_grad = 2 * diff / (1 if reduction == "sum" else diff.size)
        np.testing.assert_allclose(value, want, rtol=1e-6)
        np.testing.assert_allclose(grad[:3], want_grad, rtol=1e-5)
        np.testing.assert_array_equal(grad[3:], 0.0)


def test_loss_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match=r'mse_loss: with reduction="mean", `mask`'):
        fl.nn.mse_loss(
            jnp.ones((2, 2)), jnp.zeros((2, 2)), reduction="mean", mask=jnp.zeros(2)
        )
    with pytest.raises(TypeError, match=r"mse_loss: `pred` must have a floating dtype"):
        fl.nn.mse_loss(jnp.array([1j]), jnp.array([0j]))
    with pytest.raises(TypeError, match=r"got int8"):
        fl.nn.mse_loss(jnp.array([100], jnp.int8), jnp.array([-100], jnp.int8))


def test_linear_apply_checks_its_inputs():
    layer = fl.nn.linear(3, 2)
    params = layer.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"linear\(3, 2\).apply: `x` must have shape"):
        layer.apply(params, jnp.ones((5, 4)))
    with pytest.raises(TypeError, match=r"`x` must have a floating dtype; got int32"):
        layer.apply(params, jnp.ones((5, 3), jnp.int32))
    with pytest.raises(TypeError, match=r"`params` must be a dict with keys"):
        layer.apply({"weight": params["weight"]}, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=r"`params\['bias'\]` must have shape \(2,\)"):
        layer.apply({"weight": params["weight"], "bias": jnp.ones(3)}, jnp.ones(3))


# ------------------------------------------------------------------ the loop


def test_wide_traced_counts_are_clamped_not_wrapped(monkeypatch):
    # With checks off; on, they raise (tests/test_traced_checks.py).
    monkeypatch.setenv("FUNCTORCH_LITE_CHECKS", "0")

    def double(c):
        return 2.0 * c

    run = jax.jit(lambda n: fl.repeat(double, jnp.float32(1.0), n, max_n=5))
    assert float(run(jnp.uint32(2**32 - 1))) == 32.0  # clamped to 5 steps
    assert float(run(jnp.uint32(2**31 + 3))) == 32.0
    assert float(run(jnp.uint32(3))) == 8.0
    with pytest.raises(ValueError, match=r"repeat: `max_n` must be at most 2\*\*31"):
        fl.repeat(double, jnp.float32(1.0), 2**40, max_n=2**41)


def test_dynamic_loop_takes_python_scalars_in_the_carry():
    assert fl.repeat(lambda c: 2.0 * c, 1.0, 3, mode="dynamic") == 8.0
    count, value = fl.repeat(
        lambda c: (c[0] + 1, c[1] * 2), (0, jnp.float32(1)), 3, mode="dynamic"
    )
    assert count == 3 and float(value) == 8.0
    with pytest.raises(TypeError, match=r"repeat: `body` must keep each carry leaf"):
        fl.repeat(lambda c: jnp.ones(2) * c, 1.0, 2, mode="dynamic")
