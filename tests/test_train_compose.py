"""make_step / make_update compose with optax: aux outputs, extra-args optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tree_allclose

import functorch_lite as fl


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's adam, reduce_on_plateau and lbfgs mix Python floats and int32
    # counters, which conftest.py's strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        yield


def _data():
    x = jax.random.normal(jax.random.key(0), (16, 3))
    w_true = jnp.array([1.0, -2.0, 0.5])
    return x, x @ w_true


def _loss_aux(w, x, y):
    err = x @ w - y
    return jnp.mean(err**2), {"max_err": jnp.max(jnp.abs(err))}


def test_has_aux_returns_the_metrics():
    x, y = _data()
    opt = optax.sgd(0.1)
    step = fl.train.make_step(_loss_aux, opt, has_aux=True, donate=False)
    w, state = jnp.zeros(3), opt.init(jnp.zeros(3))
    new, _, loss, aux = step(w, state, x, y)
    want_loss, want_aux = _loss_aux(w, x, y)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(aux["max_err"], want_aux["max_err"], rtol=1e-6)
    g = jax.grad(lambda w: _loss_aux(w, x, y)[0])(w)
    np.testing.assert_allclose(new, w - 0.1 * g, rtol=1e-6)


def test_tuple_loss_without_has_aux_names_the_fix():
    x, y = _data()
    opt = optax.sgd(0.1)
    step = fl.train.make_step(_loss_aux, opt, donate=False)
    with pytest.raises(
        TypeError,
        match=r"make_step: `loss_fn` returned a tuple.*"
        r"has_aux=True",
    ):
        step(jnp.zeros(3), opt.init(jnp.zeros(3)), x, y)
    aux_step = fl.train.make_step(
        lambda w, x, y: _loss_aux(w, x, y)[0], opt, has_aux=True, donate=False
    )
    with pytest.raises(
        TypeError,
        match=r"make_step: with has_aux=True, `loss_fn` "
        r"must return a pair",
    ):
        aux_step(jnp.zeros(3), opt.init(jnp.zeros(3)), x, y)


def test_make_update_is_pure_and_composes_with_jit_and_vmap():
    x, y = _data()
    opt = optax.adam(0.05)
    update = fl.train.make_update(_loss_aux, opt, has_aux=True)
    w0 = jnp.zeros(3)
    # vmap over an ensemble of 4 starting points, under the user's own jit.
    ws = jnp.stack([w0 + i for i in range(4)])
    states = jax.vmap(opt.init)(ws)
    new, _, losses, aux = jax.jit(jax.vmap(update, in_axes=(0, 0, None, None)))(
        ws, states, x, y
    )
    for i in range(4):
        one, _, loss, a = update(ws[i], opt.init(ws[i]), x, y)
        np.testing.assert_allclose(new[i], one, rtol=1e-6)
        np.testing.assert_allclose(losses[i], loss, rtol=1e-6)
        np.testing.assert_allclose(aux["max_err"][i], a["max_err"], rtol=1e-6)
    # Same numbers as the compiled step.
    step = fl.train.make_step(_loss_aux, opt, has_aux=True, donate=False)
    tree_allclose(step(w0, opt.init(w0), x, y), update(w0, opt.init(w0), x, y))


def test_reduce_on_plateau_gets_the_loss_value():
    x, y = _data()
    # Noise the targets: the loss then settles at a floor (a plateau).
    y = y + jax.random.normal(jax.random.key(9), y.shape)
    opt = optax.chain(
        optax.sgd(0.05),
        optax.contrib.reduce_on_plateau(patience=2, factor=0.5, cooldown=0),
    )
    loss = lambda w, x, y: _loss_aux(w, x, y)[0]  # noqa: E731
    step = fl.train.make_step(loss, opt, donate=False)
    update = jax.jit(fl.train.make_update(loss, opt))
    w = jnp.zeros(3)
    state, ref_state, ref_w = opt.init(w), opt.init(w), w
    # A constant batch whose loss cannot improve once converged: the plateau
    # scale must drop below 1, which happens only if `value` reaches it.
    for _ in range(150):
        w, state, _ = step(w, state, x, y)
        ref_w, ref_state, _ = update(ref_w, ref_state, x, y)
    scale = float(optax.tree_utils.tree_get(state, "scale"))
    assert scale < 1.0
    tree_allclose(w, ref_w, rtol=1e-6)


def test_lbfgs_gets_value_grad_and_value_fn():
    x, y = _data()
    opt = optax.lbfgs()
    loss = lambda w, x, y: _loss_aux(w, x, y)[0]  # noqa: E731
    step = fl.train.make_step(loss, opt, donate=False)
    w, state = jnp.zeros(3), opt.init(jnp.zeros(3))
    for _ in range(15):
        w, state, value = step(w, state, x, y)
    np.testing.assert_allclose(w, [1.0, -2.0, 0.5], atol=1e-3)
    assert float(value) < 1e-5


def test_fit_takes_a_has_aux_step():
    x, y = _data()
    opt = optax.sgd(0.1)
    step = fl.train.make_step(_loss_aux, opt, has_aux=True)
    w = jnp.zeros(3)
    _, _, losses = fl.train.fit(step, w, opt.init(w), [(x, y)] * 5, progress=False)
    assert losses.shape == (5,) and losses[-1] < losses[0]
