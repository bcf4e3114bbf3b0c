"""Traced counts, depths and lengths are checked when the program runs.

For each primitive: an out-of-range traced value under `jax.jit`, under a
`make_step` step and inside a `make_fused_step` call raises the named error
with checks on; with `FUNCTORCH_LITE_CHECKS=0` the documented clamp, NaN or
stop follows instead. The checks run on the host before dispatch when the
value is an argument of the step (nothing donated is lost) and in the program
otherwise. A donated buffer passed again is refused before dispatch, with
nothing from XLA on stderr.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functorch_lite as fl

OPT = optax.sgd(1e-2)
# What a failed check inside a plain `jax.jit` program surfaces as: JAX raises
# a JaxRuntimeError from its first (Python) dispatch and a ValueError from its
# fast path; either way the message ends with ours.
JAX_RUNTIME = (jax.errors.JaxRuntimeError, ValueError)


@pytest.fixture(params=["on", "off"])
def checks(request: Any, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Checks on (the default) or off (`FUNCTORCH_LITE_CHECKS=0`)."""
    if request.param == "off":
        monkeypatch.setenv("FUNCTORCH_LITE_CHECKS", "0")
    else:
        monkeypatch.delenv("FUNCTORCH_LITE_CHECKS", raising=False)
    return request.param == "on"


# Each primitive as `forward(w, value) -> array`, with a value in range, one
# out of range, the error's type and message, and what the unchecked run
# gives for the bad value (computed from the clamped or cut run).
NET = fl.models.DynamicNet(3, 4, 2, max_depth=3)
NET_PARAMS = NET.init(jax.random.key(0))
LSTM = fl.nn.lstm(2, 3)
RNN = fl.nn.rnn(2, 3)
XS = jnp.linspace(-1.0, 1.0, 2 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 2)
X = jnp.linspace(-1.0, 1.0, 2 * 3, dtype=jnp.float32).reshape(2, 3)


def _repeat(w: jax.Array, n: Any) -> jax.Array:
    return fl.repeat(lambda c: c * w, jnp.ones(2, jnp.float32), n, max_n=5)


def _net(w: jax.Array, depth: Any) -> jax.Array:
    return NET.apply(jax.tree.map(lambda p: p * w, NET_PARAMS), X, depth)


def _recurrent(layer: Any) -> Any:
    params = layer.init(jax.random.key(1))

    def forward(w: jax.Array, lengths: Any) -> jax.Array:
        return layer.apply(jax.tree.map(lambda p: p * w, params), XS, lengths)[0]

    return forward


CASES = {
    "repeat": (
        _repeat,
        4,
        9,
        fl.TracedValueError,
        "repeat: `n` must be in [0, 5]; got 9",
    ),
    "repeat-per-example": (
        _repeat,
        np.array([1, 5], np.int32),
        np.array([1, 8], np.int32),
        fl.TracedValueError,
        "repeat: every `n` must be in [0, 5]; got 8 at row 1",
    ),
    "DynamicNet": (
        _net,
        2,
        7,
        fl.TracedValueError,
        "DynamicNet.apply: `depth` must be in [0, 3]; got 7",
    ),
    "DynamicNet-per-example": (
        _net,
        np.array([0, 3], np.int32),
        np.array([-1, 3], np.int32),
        fl.TracedValueError,
        "DynamicNet.apply: every `depth` must be in [0, 3]; got -1 at row 0",
    ),
    "lstm": (
        _recurrent(LSTM),
        np.array([4, 2], np.int32),
        np.array([4, 6], np.int32),
        fl.TracedValueError,
        "every `lengths` must be in [1, 4]; got 6 at row 1",
    ),
    "rnn": (
        _recurrent(RNN),
        np.array([1, 3], np.int32),
        np.array([0, 3], np.int32),
        fl.TracedValueError,
        "every `lengths` must be in [1, 4]; got 0 at row 0",
    ),
}


def _unchecked(name: str, forward: Any, w: jax.Array, bad: Any) -> jax.Array:
    """What the run gives for `bad` with the checks off, from in-range runs."""
    if name.startswith("repeat"):
        return forward(w, np.clip(bad, 0, 5))
    if name.startswith("DynamicNet"):
        out = np.array(forward(w, np.clip(bad, 0, 3)))
        rows = (np.asarray(bad) < 0) | (np.asarray(bad) > 3)
        out[np.broadcast_to(rows, out.shape[:1])] = np.nan
        return jnp.asarray(out)
    return forward(w, np.clip(bad, 1, 4))


@pytest.mark.parametrize("name", list(CASES))
def test_traced_value_under_jit(name: str, checks: bool) -> None:
    forward, good, bad, error, message = CASES[name]
    run = jax.jit(lambda w, v: forward(w, v))  # a fresh trace per test
    w = jnp.float32(1.0)
    np.testing.assert_allclose(run(w, good), forward(w, good), rtol=1e-6)
    if checks:
        with pytest.raises(JAX_RUNTIME, match=re.escape(message)):
            run(w, bad)
        # The library's own wrapper gives the error itself, not JAX's.
        with pytest.raises(error, match=re.escape(message)):
            fl.jit(forward)(w, bad)
    else:
        np.testing.assert_allclose(
            run(w, bad), _unchecked(name, forward, w, bad), rtol=1e-6
        )


@pytest.mark.parametrize("name", list(CASES))
def test_traced_value_under_make_step(name: str, checks: bool) -> None:
    forward, good, bad, error, message = CASES[name]

    def loss_fn(w: jax.Array, value: Any) -> jax.Array:
        return jnp.nansum(forward(w, value))

    step = fl.train.make_step(loss_fn, OPT)
    w = jnp.float32(1.0)
    state = OPT.init(w)
    w, state, _ = step(w, state, good)
    if checks:
        with pytest.raises(error, match=re.escape(message)):
            step(w, state, bad)
        # Checked on the host before dispatch: the donated params live on.
        assert not w.is_deleted()
        w, state, _ = step(w, state, good)
        assert step.stats.compiles == 1
    else:
        expected = jnp.nansum(_unchecked(name, forward, w, bad))
        _, _, loss = step(w, state, bad)
        np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_traced_value_inside_fused_step(name: str, checks: bool) -> None:
    forward, good, bad, error, message = CASES[name]

    def loss_fn(w: jax.Array, value: Any) -> jax.Array:
        return jnp.nansum(forward(w, value))

    fused = fl.train.make_fused_step(loss_fn, OPT)
    w = jnp.float32(1.0)
    stacked = np.stack([good, bad, good])
    if checks:
        # An argument: the whole stack is checked, on the host.
        where = "at step 1 of the fused call"
        message = message.replace(" at row", f" {where}, row")
        message += "" if " row " in message else f" {where}"
        with pytest.raises(error, match=re.escape(message)):
            fused(w, OPT.init(w), stacked)
        assert not w.is_deleted()  # refused before dispatch
    else:
        w_in = jnp.copy(w)
        w_out, _, losses = fused(w, OPT.init(w), stacked)
        assert losses.shape == (3,)
        # Step 2 ran on the unchecked value: its loss is the unchecked one.
        step_1 = fl.train.make_step(loss_fn, OPT, donate=False)
        w1, s1, _ = step_1(w_in, OPT.init(w_in), good)
        _, _, loss = step_1(w1, s1, bad)
        np.testing.assert_allclose(losses[1], loss, rtol=1e-6)
        np.testing.assert_allclose(
            loss, jnp.nansum(_unchecked(name, forward, w1, bad)), rtol=1e-6
        )


def test_a_value_computed_in_the_program_is_checked_in_the_program() -> None:
    # `m + 1` is not an argument: the check runs in the graph, and fl.jit
    # hands back the error itself.
    run = fl.jit(lambda m: _repeat(jnp.float32(2.0), m + 1))
    np.testing.assert_allclose(run(2), [8.0, 8.0])
    with pytest.raises(fl.TracedValueError, match="got 6"):
        run(5)


def test_checks_compose_with_vmap_and_grad() -> None:
    per_row = jax.jit(jax.vmap(lambda n: _repeat(jnp.float32(2.0), n)))
    np.testing.assert_allclose(per_row(jnp.array([0, 3])), [[1.0, 1.0], [8.0, 8.0]])
    with pytest.raises(JAX_RUNTIME, match="got 7"):
        per_row(jnp.array([0, 7]))
    grad = jax.jit(jax.grad(lambda w, n: jnp.sum(_repeat(w, n))))
    np.testing.assert_allclose(grad(jnp.float32(2.0), 3), 2 * 3 * 4.0)
    with pytest.raises(JAX_RUNTIME, match="got 6"):
        grad(jnp.float32(2.0), 6)


def test_while_loop_reaching_max_steps_stops_without_error() -> None:
    # A data-dependent halt, not a count the caller gave (DESIGN's settled
    # points): the loop stops there, checks on or off.
    run = jax.jit(
        lambda: fl.while_loop(lambda c: c < 100.0, lambda c: c * 2, 1.0, max_steps=3)
    )
    assert float(run()) == 8.0


def test_failing_check_prints_nothing(capfd: pytest.CaptureFixture) -> None:
    run = jax.jit(lambda n: _repeat(jnp.float32(2.0), n))
    with pytest.raises(JAX_RUNTIME):
        run(9)
    with pytest.raises(fl.TracedValueError):
        fl.jit(lambda m: _repeat(jnp.float32(2.0), m + 1))(8)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_donated_buffer_is_refused_before_dispatch(
    capfd: pytest.CaptureFixture,
) -> None:
    step = fl.train.make_step(lambda w, x: jnp.sum((w * x) ** 2), OPT)
    w = jnp.ones(3, jnp.float32)
    state = OPT.init(w)
    new_w, new_state, _ = step(w, state, jnp.ones(3, jnp.float32))
    capfd.readouterr()
    with pytest.raises(ValueError, match=r"`params` was donated to an earlier call"):
        step(w, new_state, jnp.ones(3, jnp.float32))
    out, err = capfd.readouterr()
    assert out == "" and err == "", err
    assert not new_w.is_deleted()  # nothing else was consumed


def test_fit_stops_on_a_bad_depth_with_the_state_intact(key: jax.Array) -> None:
    net = fl.models.DynamicNet(3, 4, 2, max_depth=3)
    params = net.init(key)
    x, y = jnp.ones((2, 3), jnp.float32), jnp.zeros((2, 2), jnp.float32)
    step = fl.train.make_step(
        lambda p, x, y, d: fl.nn.mse_loss(net.apply(p, x, d), y), OPT
    )
    with pytest.raises(
        fl.TracedValueError, match=r"`depth` must be in \[0, 3\]; got 5"
    ) as info:
        fl.train.fit(
            step, params, OPT.init(params), [(x, y, 1), (x, y, 5)], progress=False
        )
    # Refused before dispatch: the state after step 1 is whole.
    assert info.value.step == 1
    for leaf in jax.tree.leaves(info.value.params):
        assert not leaf.is_deleted()
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_uint_depths_past_int32_are_out_of_range() -> None:
    run = jax.jit(lambda d: _net(jnp.float32(1.0), d))
    with pytest.raises(JAX_RUNTIME, match="got 4294967295"):
        run(np.uint32(2**32 - 1))


def test_a_step_inside_the_users_jit_keeps_its_checks() -> None:
    def loss_fn(w: jax.Array, n: Any) -> jax.Array:
        return jnp.sum(_repeat(w, n))

    step = fl.train.make_step(loss_fn, OPT, donate=False)
    w = jnp.float32(1.0)
    step(w, OPT.init(w), 2)  # traced on its own first: a host check
    outer = jax.jit(lambda w, s, n: step(w, s, n)[2])
    np.testing.assert_allclose(outer(w, OPT.init(w), 2), 2.0)
    with pytest.raises(JAX_RUNTIME, match=re.escape("got 9")):
        outer(w, OPT.init(w), 9)
    # And inside an fl.jit, the outer function's own host check catches it.
    with pytest.raises(fl.TracedValueError, match="got 8"):
        fl.jit(lambda w, s, n: step(w, s, n)[2])(w, OPT.init(w), 8)
