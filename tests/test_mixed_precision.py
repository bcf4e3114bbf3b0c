"""Mixed precision (`dtype` / `param_dtype`, the Flax convention) and input shapes.

The issue "Compose with the JAX ecosystem instead of boxing it in": bfloat16
compute over float32 params, `DynamicNet` over any leading batch axes, and
`linear.apply` over any `Mapping`.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functorch_lite as fl
from functorch_lite.models import _param_spec

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


def _dtypes(tree: Any) -> set:
    return {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)}


# ------------------------------------------------------------------- layers


def test_linear_dtype_and_param_dtype(key):
    layer = fl.nn.linear(3, 2, dtype=jnp.bfloat16)
    params = layer.init(key)
    assert _dtypes(params) == {F32}
    y = layer.apply(params, jnp.ones((4, 3), jnp.float32))
    assert y.dtype == BF16
    # bfloat16 input, float32 params: cast, not refused.
    assert layer.apply(params, jnp.ones((4, 3), jnp.bfloat16)).dtype == BF16
    want = fl.nn.linear(3, 2).apply(params, jnp.ones((4, 3)))
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)

    half_params = fl.nn.linear(3, 2, param_dtype="bfloat16").init(key)
    assert _dtypes(half_params) == {BF16}


def test_linear_without_dtype_casts_nothing(key):
    params = fl.nn.linear(3, 2).init(key)
    y = fl.nn.linear(3, 2).apply(params, jnp.ones((4, 3)))
    assert y.dtype == F32
    # No compute dtype: bf16 x against float32 params stays an error (strict
    # promotion in these tests), as before.
    with pytest.raises(Exception, match="bfloat16"):
        fl.nn.linear(3, 2).apply(params, jnp.ones((4, 3), jnp.bfloat16))


@pytest.mark.parametrize(
    ("make", "bad"),
    [
        (lambda d: fl.nn.linear(3, 2, dtype=d), jnp.int32),
        (lambda d: fl.nn.linear(3, 2, param_dtype=d), None),
        (lambda d: fl.nn.embedding(5, 2, dtype=d), "not-a-dtype"),
        (lambda d: fl.nn.lstm(3, 2, param_dtype=d), jnp.int8),
        (lambda d: fl.nn.rnn(3, 2, dtype=d), jnp.bool_),
        (lambda d: fl.models.TwoLayerNet(3, 2, 1, dtype=d), jnp.int32),
        (lambda d: fl.models.DynamicNet(3, 2, 1, param_dtype=d), None),
        (lambda d: fl.models.CharLSTM(5, 2, 3, dtype=d), jnp.complex64),
    ],
)
def test_bad_dtype_arguments_are_named(make, bad):
    with pytest.raises(TypeError, match=r"`(param_)?dtype` must be a floating dtype"):
        make(bad)


class _Params(Mapping):
    """A read-only Mapping that is not a dict."""

    def __init__(self, data: dict) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_linear_apply_accepts_any_mapping(key):
    layer = fl.nn.linear(3, 2)
    params = layer.init(key)
    x = jax.random.normal(key, (2, 5, 3))
    want = layer.apply(params, x)
    for mapping in (types.MappingProxyType(params), _Params(params)):
        np.testing.assert_array_equal(layer.apply(mapping, x), want)
    with pytest.raises(TypeError, match=r"`params` must be a dict with keys"):
        layer.apply(_Params({"weight": params["weight"]}), x)
    with pytest.raises(TypeError, match=r"`params` must be a dict .* got list"):
        layer.apply([params["weight"]], x)


def test_embedding_dtype(key):
    layer = fl.nn.embedding(6, 3, dtype=jnp.bfloat16)
    params = layer.init(key)
    assert _dtypes(params) == {F32}
    ids = jnp.array([[0, 5], [2, 3]])
    rows = layer.apply(params, ids)
    assert rows.dtype == BF16
    np.testing.assert_array_equal(
        rows, params["weight"][ids].astype(jnp.bfloat16), strict=False
    )
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, ids).astype(jnp.float32)))(params)
    assert _dtypes(grads) == {F32}
    # Traced out-of-range ids still show as NaN in the compute dtype.
    bad = jax.jit(layer.apply)(params, jnp.array([7, -1]))
    assert bad.dtype == BF16 and bool(jnp.all(jnp.isnan(bad)))


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_recurrent_bf16_compute(key, kind, mode):
    make = getattr(fl.nn, kind)
    full = make(3, 4, num_layers=2, bidirectional=True)
    half = make(3, 4, num_layers=2, bidirectional=True, dtype=jnp.bfloat16)
    params = full.init(key)
    assert _dtypes(params) == {F32}
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
    lengths = jnp.array([5, 3])
    # Compiled: run op by op, the loops' many small ops are the slow part.
    out32, state32 = jax.jit(lambda p: full.apply(p, xs, lengths, mode=mode))(params)
    out16, state16 = jax.jit(lambda p: half.apply(p, xs, lengths, mode=mode))(params)
    assert out16.dtype == BF16 and _dtypes(state16) == {BF16}
    # Five steps of bf16 gates, two layers, against float32. Measured max abs
    # error: 2.7e-3 (LSTM, outputs up to 0.26) and 4.0e-3 (RNN, up to 0.89),
    # about one bf16 roundoff (2**-8 = 3.9e-3); 5e-2 leaves room for errors
    # that accumulate over the steps.
    np.testing.assert_allclose(
        np.asarray(out16, np.float32), out32, rtol=5e-2, atol=5e-2
    )
    for a, b in zip(jax.tree.leaves(state16), jax.tree.leaves(state32), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=5e-2, atol=5e-2)
    # A float32 initial state is cast to the compute dtype.
    h0 = jnp.zeros((4, 2, 4), jnp.float32)
    initial = (h0, h0) if kind == "lstm" else h0
    out, _ = jax.jit(
        lambda p: half.apply(p, xs, lengths, mode=mode, initial_state=initial)
    )(params)
    assert out.dtype == BF16
    # Gradients come back float32.
    loss = lambda p: jnp.sum(half.apply(p, xs, lengths, mode=mode)[0]).astype(F32)
    assert _dtypes(jax.jit(jax.grad(loss))(params)) == {F32}


def test_recurrent_without_dtype_keeps_its_error(key):
    layer = fl.nn.lstm(3, 4)
    params = layer.init(key)
    with pytest.raises(TypeError, match=r"`xs` has dtype bfloat16 but `params"):
        layer.apply(params, jnp.ones((2, 5, 3), jnp.bfloat16), jnp.array([5, 2]))


# ------------------------------------------------------------------- losses


def test_losses_upcast_half_precision():
    rng = np.random.default_rng(0)
    pred = jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)
    p16, t16 = pred.astype(jnp.bfloat16), target.astype(jnp.bfloat16)
    for reduction in ("sum", "mean"):
        got = fl.nn.mse_loss(p16, t16, reduction=reduction)
        assert got.dtype == F32
        want = fl.nn.mse_loss(
            p16.astype(F32), t16.astype(F32), reduction=reduction
        )  # exactly the float32 loss of the rounded inputs
        np.testing.assert_allclose(got, want, rtol=1e-6)
    mask = jnp.asarray(np.arange(16) % 2, jnp.float32)
    assert fl.nn.mse_loss(p16, t16, mask=mask, reduction="mean").dtype == F32

    logits = jnp.asarray(rng.standard_normal((4, 5, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, (4, 5)), jnp.int32)
    l16 = logits.astype(jnp.bfloat16)
    got = fl.nn.cross_entropy(l16, targets)
    assert got.dtype == F32
    np.testing.assert_allclose(got, fl.nn.cross_entropy(l16.astype(F32), targets))
    assert fl.nn.cross_entropy(l16, targets, reduction="none").dtype == F32
    # The gradient with respect to bf16 logits is bf16.
    grad = jax.grad(lambda lg: fl.nn.cross_entropy(lg, targets))(l16)
    assert grad.dtype == BF16
    # Mixed dtypes stay refused by name.
    with pytest.raises(TypeError, match=r"mse_loss: `pred` and `target` must have"):
        fl.nn.mse_loss(p16, target)


# ------------------------------------------------------------------- models


def test_model_dtype_fields_are_hashable_and_normalized():
    a = fl.models.DynamicNet(3, 4, 2, dtype="bfloat16")
    b = fl.models.DynamicNet(3, 4, 2, dtype=jnp.bfloat16, param_dtype=np.float32)
    assert a == b and hash(a) == hash(b)
    assert a.dtype == BF16 and a.param_dtype == F32
    assert fl.models.TwoLayerNet(3, 4, 2).dtype is None


@pytest.mark.parametrize(
    "net",
    [
        fl.models.TwoLayerNet(3, 4, 2, param_dtype=jnp.bfloat16),
        fl.models.DynamicNet(3, 4, 2, param_dtype=jnp.bfloat16),
        fl.models.CharLSTM(5, 3, 4, param_dtype=jnp.bfloat16),
    ],
)
def test_param_spec_reflects_param_dtype(key, net):
    assert _dtypes(_param_spec(net)) == {BF16}
    assert _dtypes(net.init(key)) == {BF16}


def test_models_without_dtype_keep_the_dtype_error(key):
    x = jnp.ones((2, 3), jnp.bfloat16)
    two, dyn = fl.models.TwoLayerNet(3, 4, 2), fl.models.DynamicNet(3, 4, 2)
    match = r"`x` has dtype bfloat16 but `params.*compute `dtype`"
    with pytest.raises(TypeError, match=match):
        two.apply(two.init(key), x)
    with pytest.raises(TypeError, match=match):
        dyn.apply(dyn.init(key), x, 1)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_model_grads_are_float32_through_bf16(key, mode):
    x = jax.random.normal(jax.random.key(1), (5, 3))
    two = fl.models.TwoLayerNet(3, 4, 2, dtype=jnp.bfloat16)
    dyn = fl.models.DynamicNet(3, 4, 2, dtype=jnp.bfloat16)
    for net, fn in (
        (two, lambda p: two.apply(p, x)),
        (dyn, lambda p: dyn.apply(p, x, 2, mode=mode)),
    ):
        params = net.init(key)
        assert fn(params).dtype == BF16
        # Compiled: run op by op, the loops' many small ops are the slow part.
        grads = jax.jit(jax.grad(lambda p, fn=fn: jnp.sum(fn(p)).astype(F32)))(params)
        assert _dtypes(grads) == {F32}

    lm = fl.models.CharLSTM(5, 3, 4, dtype=jnp.bfloat16)
    params = lm.init(key)
    tokens, lengths = jnp.array([[1, 2, 3, 0], [4, 1, 0, 0]]), jnp.array([4, 2])
    assert lm.apply(params, tokens, lengths, mode=mode).dtype == BF16
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda p: lm.loss(p, tokens, lengths, mode=mode))
    )
    loss, grads = value_and_grad(params)
    assert loss.dtype == F32 and _dtypes(grads) == {F32}
    f32 = fl.models.CharLSTM(5, 3, 4)
    want = jax.jit(lambda p: f32.loss(p, tokens, lengths, mode=mode))(params)
    np.testing.assert_allclose(loss, want, rtol=2e-2)  # measured: 1.7e-4


def _train(dtype: Any, mode: str, steps: int = 50) -> tuple[np.ndarray, Any]:
    net = fl.models.DynamicNet(8, 32, 4, max_depth=3, dtype=dtype)
    kx, kw, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 8))
    y = jnp.tanh(x @ jax.random.normal(kw, (8, 4)))

    def loss_fn(params: Any, x: jax.Array, y: jax.Array, depth: Any) -> jax.Array:
        pred = net.apply(params, x, depth, mode=mode).astype(jnp.float32)
        return fl.nn.mse_loss(pred, y, reduction="mean")

    # Not adam: optax's adam fails under jax_numpy_dtype_promotion="strict".
    opt = optax.sgd(0.05, momentum=0.9)
    static = ("depth",) if mode == "dynamic" else ()
    step = fl.train.make_step(loss_fn, opt, static_argnames=static)
    params = net.init(kp)
    state = opt.init(params)
    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state, x, y, 2)
        losses.append(float(loss))
    return np.array(losses), params


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_bf16_training_tracks_float32(mode):
    """50 SGD steps with bf16 compute over float32 master weights.

    bf16 keeps 8 bits of mantissa (unit roundoff 2**-8, about 4e-3): the
    forward pass and the gradients are rounded at that precision, while the
    float32 master weights accumulate the updates exactly as in float32.
    Measured on CPU: the loss curves differ by at most 3.1e-3 relative (at
    any step; 4e-5 at the last) and the weights by 7e-3 of their largest
    entry. The tolerance, 2e-2 relative, is about 5 bf16 roundoffs, with
    room for other backends' accumulation orders.
    """
    full, p32 = _train(None, mode)
    half, p16 = _train(jnp.bfloat16, mode)
    assert _dtypes(p16) == {F32}
    assert full[-1] < 0.3 * full[0]  # it trains: the comparison is not vacuous
    np.testing.assert_allclose(half, full, rtol=2e-2)
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32), strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * scale)


# ----------------------------------------------------- DynamicNet input shapes


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_dynamic_net_accepts_leading_batch_axes(key, mode, dtype):
    net = fl.models.DynamicNet(3, 5, 2, max_depth=3, dtype=dtype)
    params = net.init(key)
    x = jax.random.normal(jax.random.key(1), (2, 4, 3))
    flat = x.reshape(-1, 3)
    want = net.apply(params, flat, 2, mode=mode)
    got = net.apply(params, x, 2, mode=mode)
    assert got.shape == (2, 4, 2)
    np.testing.assert_array_equal(got, want.reshape(2, 4, 2))
    # Four leading axes, and one example.
    x4 = flat.reshape(2, 1, 2, 2, 3)
    np.testing.assert_array_equal(
        net.apply(params, x4, 2, mode=mode), want.reshape(2, 1, 2, 2, 2)
    )
    # One example, and per-example depths with 2-D x (each row at its own
    # depth), against single examples: a vector-matrix product may round
    # differently from a matrix product, by an ulp of the compute dtype.
    tol = 1e-5 if dtype is None else 2e-2
    close = lambda a, b: np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
    )
    close(net.apply(params, flat[3], 2, mode=mode), want[3])
    depth = jnp.array([0, 1, 2, 3, 3, 2, 1, 0])
    per_row = net.apply(params, flat, depth, mode=mode)
    for i in range(8):
        close(per_row[i], net.apply(params, flat[i], int(depth[i]), mode=mode))
    # With more leading axes it must be flattened first, and says so.
    with pytest.raises(ValueError, match=r"DynamicNet.apply: a per-example `depth`"):
        net.apply(params, x, depth.reshape(2, 4), mode=mode)
    with pytest.raises(ValueError, match=r"flatten them"):
        net.apply(params, x, depth, mode=mode)


def test_dynamic_net_leading_axes_under_jit_with_traced_depth(key):
    net = fl.models.DynamicNet(3, 5, 2, max_depth=3)
    params = net.init(key)
    x = jax.random.normal(jax.random.key(1), (2, 4, 3))
    run = jax.jit(lambda p, x, d: net.apply(p, x, d))
    np.testing.assert_allclose(
        run(params, x, 3), net.apply(params, x.reshape(-1, 3), 3).reshape(2, 4, 2)
    )
    # A traced depth out of range is refused when the program runs.
    with pytest.raises((jax.errors.JaxRuntimeError, ValueError), match="got 9"):
        run(params, x, 9)


def test_dynamic_net_still_refuses_bad_x(key):
    net = fl.models.DynamicNet(3, 5, 2)
    params = net.init(key)
    with pytest.raises(
        ValueError, match=r"`x` must have shape \(N, 3\) .*\(\.\.\., 3\); got"
    ):
        net.apply(params, jnp.ones((2, 4, 5)), 1)
    with pytest.raises(
        ValueError, match=r"`x` must have shape \(N, 3\) .*\(\.\.\., 3\); got"
    ):
        net.apply(params, jnp.ones(()), 1)
    with pytest.raises(TypeError, match=r"`x` must have a floating dtype"):
        net.apply(params, jnp.ones((2, 4, 3), jnp.int32), 1)
