"""`fl.nn.embedding` and `fl.nn.cross_entropy`: NumPy float64, torch, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functorch_lite as fl

# ---------------------------------------------------------------------------
# References and helpers
# ---------------------------------------------------------------------------


def _ks_normal(samples):
    """The one-sample Kolmogorov-Smirnov statistic of `samples` vs N(0, 1)."""
    x = np.sort(np.asarray(samples, np.float64).ravel())
    n = x.size
    f = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


def _ks_two_sample(a, b):
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap of the ECDFs."""
    a, b = (np.sort(np.asarray(v, np.float64).ravel()) for v in (a, b))
    grid = np.concatenate([a, b])
    gap = np.searchsorted(a, grid, "right") / a.size
    gap -= np.searchsorted(b, grid, "right") / b.size
    return np.max(np.abs(gap))


def _np_cross_entropy(logits, targets, mask, reduction, cotangent=None):
    """Float64 loss and d(loss)/d(logits), written independently of the library.

    For `"none"` the gradient is that of `sum(cotangent * loss)`.
    """
    z = np.asarray(logits, np.float64)
    t = np.asarray(targets)
    w = np.ones(t.shape) if mask is None else np.asarray(mask, np.float64)
    real = w != 0
    z = np.where(real[..., None], z, 0.0)  # padding may hold NaN
    shifted = z - z.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    safe_t = np.where(real, t, 0)
    nll = -np.take_along_axis(log_p, safe_t[..., None], axis=-1)[..., 0]
    per = np.where(real, nll * w, 0.0)
    one_hot = np.eye(z.shape[-1])[safe_t]
    d_per = np.where(real, w, 0.0)[..., None] * (np.exp(log_p) - one_hot)
    if reduction == "none":
        g = np.asarray(cotangent, np.float64)
        return per, g[..., None] * d_per
    if reduction == "sum":
        return per.sum(), d_per
    denom = w.sum()
    return per.sum() / denom, d_per / denom


def _problem(seed, shape=(3, 5), num_classes=7, masked=True):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=shape + (num_classes,))
    targets = rng.integers(0, num_classes, size=shape)
    mask = None
    if masked:
        mask = (rng.random(shape) < 0.7).astype(np.float64)
        mask.flat[0] = 1.0  # at least one real position
        mask.flat[-1] = 0.0  # at least one padded position
    cotangent = rng.normal(size=shape)
    return logits, targets, mask, cotangent


def _fl_value_and_grad(logits, targets, mask, reduction, cotangent, dtype):
    logits = jnp.asarray(logits, dtype)
    targets = jnp.asarray(targets)
    mask = None if mask is None else jnp.asarray(mask, dtype)
    cotangent = jnp.asarray(cotangent, dtype)

    def f(z):
        return fl.nn.cross_entropy(z, targets, mask=mask, reduction=reduction)

    value, vjp = jax.vjp(f, logits)
    (grad,) = vjp(cotangent if reduction == "none" else jnp.ones((), dtype))
    return value, grad


# ---------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------


def test_embedding_init_shape_dtype_and_statistics(key):
    params = fl.nn.embedding(1000, 128).init(key)
    assert set(params) == {"weight"}
    w = params["weight"]
    assert w.shape == (1000, 128) and w.dtype == jnp.float32
    w = np.asarray(w, np.float64)
    # 128000 draws of N(0, 1): the mean's standard error is 0.0028, the std's
    # relative standard error 0.002.
    assert abs(w.mean()) < 0.015
    assert abs(w.std() - 1) < 0.01
    assert np.abs(w).max() > 3.5  # a normal, not a bounded, draw
    assert _ks_normal(w) < 1.95 / np.sqrt(w.size)  # 0.1% critical value
    # Deterministic in the key, different across keys.
    again = fl.nn.embedding(1000, 128).init(key)["weight"]
    np.testing.assert_array_equal(np.asarray(again, np.float64), w)
    other = fl.nn.embedding(1000, 128).init(jax.random.key(1))["weight"]
    assert not np.array_equal(np.asarray(other, np.float64), w)


def test_embedding_init_distribution_matches_torch(key):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    theirs = torch.nn.Embedding(500, 64).weight.detach().numpy()
    ours = fl.nn.embedding(500, 64).init(key)["weight"]
    assert ours.shape == theirs.shape  # same layout: rows are tokens
    assert _ks_two_sample(ours, theirs) < 1.95 * np.sqrt(2 / theirs.size)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.int64])
@pytest.mark.parametrize("shape", [(), (6,), (2, 3), (2, 1, 4)])
def test_embedding_apply_is_a_row_lookup(key, dtype, shape):
    layer = fl.nn.embedding(11, 5)
    params = layer.init(key)
    ids = np.random.default_rng(0).integers(0, 11, size=shape).astype(dtype)
    out = layer.apply(params, ids)
    assert out.shape == shape + (5,) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(params["weight"])[ids])
    # Jitted (traced ids), the same.
    jitted = jax.jit(layer.apply)(params, jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(out))


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16])
def test_embedding_narrow_ids_with_a_large_table(key, dtype):
    """A table larger than the ids' dtype can count: no overflow, no wrap."""
    layer = fl.nn.embedding(300, 2)
    params = layer.init(key)
    ids = np.array([0, 1, 100, 127], dtype)
    want = np.asarray(params["weight"])[ids.astype(np.int64)]
    np.testing.assert_array_equal(np.asarray(layer.apply(params, ids)), want)
    jitted = jax.jit(layer.apply)(params, jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(jitted), want)
    if np.issubdtype(dtype, np.signedinteger):
        bad = jax.jit(layer.apply)(params, jnp.asarray(np.array([-1, 5], dtype)))
        assert np.isnan(np.asarray(bad[0])).all()
        np.testing.assert_array_equal(
            np.asarray(bad[1]), np.asarray(params["weight"][5])
        )


def test_embedding_gradient_accumulates_repeated_ids(key):
    layer = fl.nn.embedding(4, 3)
    params = layer.init(key)
    ids = jnp.array([[0, 2, 2], [2, 3, 0]])
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, ids)))(params)
    counts = np.array([2.0, 0.0, 3.0, 1.0])
    np.testing.assert_array_equal(
        np.asarray(grads["weight"]), np.repeat(counts[:, None], 3, axis=1)
    )


@pytest.mark.parametrize(
    "dtype, rtol", [("float32", 1e-5), ("float64", 1e-10)], ids=["f32", "f64"]
)
def test_embedding_matches_torch_values_and_grads(dtype, rtol):
    torch = pytest.importorskip("torch")
    with jax.enable_x64(dtype == "float64"):
        rng = np.random.default_rng(3)
        weight = rng.normal(size=(13, 6)).astype(dtype)
        ids = rng.integers(0, 13, size=(4, 9))
        cotangent = rng.normal(size=(4, 9, 6)).astype(dtype)

        ref = torch.nn.Embedding(13, 6).to(getattr(torch, dtype))
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(weight))
        torch_out = ref(torch.from_numpy(ids))
        torch_out.backward(torch.from_numpy(cotangent))

        layer = fl.nn.embedding(13, 6)
        params = {"weight": jnp.asarray(weight)}
        assert params["weight"].dtype == jnp.dtype(dtype)
        out, vjp = jax.vjp(lambda p: layer.apply(p, jnp.asarray(ids)), params)
        (grads,) = vjp(jnp.asarray(cotangent))
        assert out.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(
            np.asarray(out), torch_out.detach().numpy(), rtol=rtol, atol=0
        )
        np.testing.assert_allclose(
            np.asarray(grads["weight"]),
            ref.weight.grad.numpy(),
            rtol=rtol,
            atol=10 * np.finfo(dtype).eps,
        )


def test_embedding_traced_out_of_range_ids_give_nan_rows(key):
    n = 5
    layer = fl.nn.embedding(n, 3)
    params = layer.init(key)
    ids = jnp.array([0, n, -1, -n, -n - 1, 4, 1000], jnp.int32)
    out = np.asarray(jax.jit(layer.apply)(params, ids))
    bad = np.array([False, True, True, True, True, False, True])
    assert np.isnan(out[bad]).all()  # not clamped, not wrapped around
    np.testing.assert_array_equal(out[~bad], np.asarray(params["weight"])[[0, 4]])
    # A bad id sends no gradient anywhere; the good ones still do. (The ids
    # are an argument of the jitted function, so that they are traced.)
    grads = jax.jit(
        jax.grad(lambda p, i: jnp.sum(jnp.where(bad[:, None], 0.0, layer.apply(p, i))))
    )(params, ids)["weight"]
    expected = np.zeros((n, 3), np.float32)
    expected[[0, 4]] = 1.0
    np.testing.assert_array_equal(np.asarray(grads), expected)


def test_embedding_errors(key):
    with pytest.raises(
        ValueError, match=r"embedding: `num_embeddings` must be a positive int; got 0"
    ):
        fl.nn.embedding(0, 3)
    with pytest.raises(
        TypeError, match=r"embedding: `embedding_dim` must be a positive int; got float"
    ):
        fl.nn.embedding(3, 2.5)
    with pytest.raises(
        TypeError, match=r"embedding: `num_embeddings` must be a positive int; got bool"
    ):
        fl.nn.embedding(True, 3)
    layer = fl.nn.embedding(5, 3)
    params = layer.init(key)
    where = r"embedding\(5, 3\)\.apply: "
    with pytest.raises(
        TypeError, match=where + r"`ids` must have an integer dtype.*got float32"
    ):
        layer.apply(params, jnp.array([1.0, 2.0]))
    with pytest.raises(
        TypeError, match=where + r"`ids` must have an integer dtype.*got bool"
    ):
        layer.apply(params, jnp.array([True, False]))
    with pytest.raises(TypeError, match=where + r"`ids` must be an array; got list"):
        layer.apply(params, [1, 2])
    with pytest.raises(
        ValueError,
        match=where + r"`ids` must be token indices in \[0, 5\); got 5\.",
    ):
        layer.apply(params, jnp.array([0, 5, 1]))
    with pytest.raises(
        ValueError,
        match=where + r"`ids` must be token indices in \[0, 5\); got -1 \(and 1 more\)",
    ):
        layer.apply(params, np.array([[-1, 2], [7, 0]]))
    with pytest.raises(
        TypeError, match=where + r"`params` must be a dict with keys \['weight'\]"
    ):
        layer.apply({"w": params["weight"]}, jnp.array([0]))
    with pytest.raises(
        ValueError,
        match=where + r"`params\['weight'\]` must have shape \(5, 3\); got \(3, 5\)",
    ):
        layer.apply({"weight": params["weight"].T}, jnp.array([0]))
    with pytest.raises(
        TypeError, match=where + r"`params\['weight'\]` must have a floating dtype"
    ):
        layer.apply({"weight": jnp.zeros((5, 3), jnp.int32)}, jnp.array([0]))


# ---------------------------------------------------------------------------
# cross_entropy: references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "shape, masked",
    # A single (0-d) position cannot be both real and padded: no masked 0-d case.
    [((), False), ((8,), False), ((8,), True), ((3, 5), False), ((3, 5), True)],
    ids=["0d", "1d", "1d-masked", "2d", "2d-masked"],
)
def test_cross_entropy_matches_numpy_float32(reduction, masked, shape):
    logits, targets, mask, cotangent = _problem(0, shape, masked=masked)
    ref, ref_grad = _np_cross_entropy(logits, targets, mask, reduction, cotangent)
    got, grad = _fl_value_and_grad(
        logits, targets, mask, reduction, cotangent, jnp.float32
    )
    assert got.dtype == grad.dtype == jnp.float32
    assert got.shape == (shape if reduction == "none" else ())
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_cross_entropy_matches_numpy_float64(reduction, masked):
    logits, targets, mask, cotangent = _problem(1, (4, 6), masked=masked)
    ref, ref_grad = _np_cross_entropy(logits, targets, mask, reduction, cotangent)
    with jax.enable_x64(True):
        got, grad = _fl_value_and_grad(
            logits, targets, mask, reduction, cotangent, jnp.float64
        )
        assert got.dtype == grad.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize(
    "dtype, rtol", [("float32", 1e-5), ("float64", 1e-10)], ids=["f32", "f64"]
)
def test_cross_entropy_matches_torch(reduction, masked, dtype, rtol):
    """Torch's class axis is 1 and its padding is `ignore_index`."""
    torch = pytest.importorskip("torch")
    logits, targets, mask, cotangent = _problem(2, (3, 5), num_classes=7, masked=masked)
    logits, cotangent = logits.astype(dtype), cotangent.astype(dtype)
    atol = 10 * np.finfo(dtype).eps

    z = torch.tensor(logits, requires_grad=True)
    torch_targets = torch.tensor(targets, dtype=torch.int64)
    if masked:
        torch_targets[torch.tensor(mask == 0)] = -100
    loss = torch.nn.functional.cross_entropy(
        z.permute(0, 2, 1), torch_targets, ignore_index=-100, reduction=reduction
    )
    loss.backward(torch.tensor(cotangent) if reduction == "none" else None)

    with jax.enable_x64(dtype == "float64"):
        got, grad = _fl_value_and_grad(
            logits, targets, mask, reduction, cotangent, jnp.dtype(dtype)
        )
        assert got.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(
            np.asarray(got), loss.detach().numpy(), rtol=rtol, atol=atol
        )
        np.testing.assert_allclose(
            np.asarray(grad), z.grad.numpy(), rtol=rtol, atol=atol
        )


@pytest.mark.parametrize("shape", [(), (9,)], ids=["0d", "1d"])
def test_cross_entropy_matches_torch_without_extra_axes(shape):
    """Torch's `(C,)` and `(N, C)` inputs, whose class axis is already last."""
    torch = pytest.importorskip("torch")
    logits, targets, _, _ = _problem(4, shape, num_classes=5, masked=False)
    logits = logits.astype(np.float32)
    z = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(z, torch.tensor(targets))
    loss.backward()
    got, grad = jax.value_and_grad(fl.nn.cross_entropy)(
        jnp.asarray(logits), jnp.asarray(targets)
    )
    np.testing.assert_allclose(float(got), loss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), z.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_cross_entropy_is_numerically_stable():
    logits, targets, _, _ = _problem(5, (6,), num_classes=4, masked=False)
    ref, _ = _np_cross_entropy(logits, targets, None, "none")
    for offset in (1e4, -1e4):
        # Per-row offsets that would overflow (or underflow) a naive softmax.
        shifted = jnp.asarray(logits + offset, jnp.float32)
        got = fl.nn.cross_entropy(shifted, jnp.asarray(targets), reduction="none")
        grad = jax.grad(fl.nn.cross_entropy)(shifted, jnp.asarray(targets))
        assert np.isfinite(np.asarray(got)).all()
        assert np.isfinite(np.asarray(grad)).all()
        # float32 spacing at 1e4 is ~1e-3: the logits themselves lost that much.
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=5e-3)
    # A confident, correct prediction: log(1 + e^-100) ~ 4e-44 underflows to 0
    # in float32, not to -inf or NaN.
    confident = jnp.array([[100.0, 0.0]], jnp.float32)
    loss = fl.nn.cross_entropy(confident, jnp.array([0]))
    assert float(loss) == 0.0
    wrong = fl.nn.cross_entropy(confident, jnp.array([1]))
    assert float(wrong) == pytest.approx(100.0, rel=1e-6)


# ---------------------------------------------------------------------------
# cross_entropy: masks and padding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_cross_entropy_padding_cannot_leak(reduction, jit, poison):
    logits, targets, mask, cotangent = _problem(6, (4, 6), num_classes=5)
    pad = mask == 0
    assert pad.any() and (~pad).any()
    clean, clean_grad = _np_cross_entropy(logits, targets, mask, reduction, cotangent)
    poisoned = logits.copy()
    poisoned[pad] = poison  # every class at padded positions
    poisoned_targets = np.where(pad, -100, targets)  # torch's ignore_index, say

    f = fl.nn.cross_entropy
    if jit:
        f = jax.jit(f, static_argnames="reduction")
    z = jnp.asarray(poisoned, jnp.float32)
    t, m = jnp.asarray(poisoned_targets), jnp.asarray(mask, jnp.float32)
    g = jnp.asarray(cotangent, jnp.float32)
    value, vjp = jax.vjp(lambda z: f(z, t, mask=m, reduction=reduction), z)
    (grad,) = vjp(g if reduction == "none" else jnp.ones((), jnp.float32))

    value, grad = np.asarray(value), np.asarray(grad)
    assert np.isfinite(value).all()
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[pad], 0.0)  # exactly zero
    if reduction == "none":
        np.testing.assert_array_equal(value[pad], 0.0)
    np.testing.assert_allclose(value, clean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, clean_grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_masked_mean_equals_unpadded_mean():
    logits, targets, mask, _ = _problem(7, (2, 8), num_classes=6)
    assert mask is not None
    real = mask != 0
    z, t = jnp.asarray(logits, jnp.float32), jnp.asarray(targets)
    unpadded = fl.nn.cross_entropy(z[real], t[real])
    for m in (mask, mask.astype(bool), mask.astype(np.int32)):
        got = fl.nn.cross_entropy(z, t, mask=jnp.asarray(m))
        np.testing.assert_allclose(float(got), float(unpadded), rtol=1e-6)
        total = fl.nn.cross_entropy(z, t, mask=jnp.asarray(m), reduction="sum")
        np.testing.assert_allclose(float(total), float(got) * real.sum(), rtol=1e-6)


def test_cross_entropy_all_padding():
    z = jnp.zeros((2, 3), jnp.float32)
    t = jnp.array([0, 1])
    zeros = jnp.zeros(2, jnp.float32)
    assert float(fl.nn.cross_entropy(z, t, mask=zeros, reduction="sum")) == 0.0
    none = fl.nn.cross_entropy(z, t, mask=zeros, reduction="none")
    np.testing.assert_array_equal(np.asarray(none), [0.0, 0.0])
    # Traced, the mean cannot raise: 0 / 0 is NaN.
    traced = jax.jit(lambda m: fl.nn.cross_entropy(z, t, mask=m))(zeros)
    assert np.isnan(float(traced))


def test_cross_entropy_traced_out_of_range_targets_give_nan():
    z = jnp.zeros((4, 3), jnp.float32)
    f = jax.jit(fl.nn.cross_entropy, static_argnames="reduction")
    none = np.asarray(f(z, jnp.array([0, 3, -1, 2]), reduction="none"))
    np.testing.assert_allclose(none[[0, 3]], np.log(3), rtol=1e-6)
    assert np.isnan(none[[1, 2]]).all()  # not clamped, not wrapped around
    assert np.isnan(float(f(z, jnp.array([0, 1, 2, 7]), reduction="mean")))
    # In range, the jitted loss equals the eager one.
    t = jnp.array([0, 1, 2, 1])
    np.testing.assert_allclose(
        float(f(z, t, reduction="mean")), float(fl.nn.cross_entropy(z, t)), rtol=1e-6
    )


def test_cross_entropy_unsigned_and_narrow_targets():
    logits, targets, _, _ = _problem(8, (10,), num_classes=300, masked=False)
    z = jnp.asarray(logits, jnp.float32)
    ref = fl.nn.cross_entropy(z, jnp.asarray(targets, jnp.int32))
    small = targets % 100
    for dtype in (np.uint8, np.int8, np.int16, np.uint16):
        t = small.astype(dtype)
        want = fl.nn.cross_entropy(z, jnp.asarray(small, jnp.int32))
        np.testing.assert_allclose(float(fl.nn.cross_entropy(z, t)), float(want))
        jitted = jax.jit(fl.nn.cross_entropy)(z, jnp.asarray(t))
        np.testing.assert_allclose(float(jitted), float(want), rtol=1e-6)
    np.testing.assert_allclose(
        float(fl.nn.cross_entropy(z, targets.astype(np.int16))), float(ref)
    )
    # Traced, a narrow out-of-range target is still NaN, and an in-range one
    # is not (300 classes do not fit in int8: the bound check must not wrap).
    few = jnp.zeros((2, 3), jnp.float32)
    for dtype in (np.uint8, np.int8):
        t = jnp.asarray(np.array([1, 5], dtype))
        none = jax.jit(fl.nn.cross_entropy, static_argnames="reduction")(
            few, t, reduction="none"
        )
        assert np.isfinite(float(none[0])) and np.isnan(float(none[1]))


# ---------------------------------------------------------------------------
# cross_entropy: errors
# ---------------------------------------------------------------------------


def test_cross_entropy_errors():
    z = jnp.zeros((2, 4, 3), jnp.float32)
    t = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(
        ValueError,
        match=r'cross_entropy: `reduction` must be "mean", "sum" or "none"; '
        r"got 'max'",
    ):
        fl.nn.cross_entropy(z, t, reduction="max")
    with pytest.raises(
        TypeError,
        match=r"cross_entropy: `logits` must have a floating dtype; got int32",
    ):
        fl.nn.cross_entropy(t, t)
    with pytest.raises(TypeError, match=r"cross_entropy: `logits` must be an array"):
        fl.nn.cross_entropy([[0.0, 1.0]], t)
    with pytest.raises(
        TypeError,
        match=r"cross_entropy: `targets` must have an integer dtype.*got float32",
    ):
        fl.nn.cross_entropy(z, t.astype(jnp.float32))
    with pytest.raises(
        TypeError, match=r"cross_entropy: `targets` must have an integer dtype.*bool"
    ):
        fl.nn.cross_entropy(z, t > 0)
    with pytest.raises(TypeError, match=r"cross_entropy: `targets` must be an array"):
        fl.nn.cross_entropy(z[0, 0], 1)
    with pytest.raises(
        ValueError,
        match=r"cross_entropy: `targets` must have shape \(2, 4\).*got \(2, 3\)\. "
        r"The class axis is last",
    ):
        fl.nn.cross_entropy(z, jnp.zeros((2, 3), jnp.int32))  # torch's layout
    with pytest.raises(
        ValueError,
        match=r"cross_entropy: `targets` must have shape \(2, 4\).*got \(8,\)",
    ):
        fl.nn.cross_entropy(z, jnp.zeros(8, jnp.int32))
    with pytest.raises(
        ValueError, match=r"cross_entropy: `logits` must have shape \(\.\.\., C\)"
    ):
        fl.nn.cross_entropy(jnp.float32(1.0), jnp.int32(0))
    with pytest.raises(
        ValueError, match=r"cross_entropy: `logits` must have shape \(\.\.\., C\)"
    ):
        fl.nn.cross_entropy(jnp.zeros((2, 0)), jnp.zeros(2, jnp.int32))
    with pytest.raises(
        ValueError,
        match=r"cross_entropy: `mask` must have the shape of `targets` \(2, 4\).*"
        r"got \(2, 4, 1\)",
    ):
        fl.nn.cross_entropy(z, t, mask=jnp.ones((2, 4, 1)))
    with pytest.raises(
        TypeError, match=r"cross_entropy: `mask` must have a bool, integer or floating"
    ):
        fl.nn.cross_entropy(z, t, mask=jnp.ones((2, 4), jnp.complex64))
    with pytest.raises(TypeError, match=r"cross_entropy: `mask` must be an array"):
        fl.nn.cross_entropy(z, t, mask=1.0)
    with pytest.raises(
        ValueError,
        match=r"cross_entropy: `targets` must be class indices in \[0, 3\); got 3\.",
    ):
        fl.nn.cross_entropy(z, t.at[1, 2].set(3))
    with pytest.raises(
        ValueError,
        match=r"cross_entropy: `targets` must be class indices in \[0, 3\); "
        r"got -100 \(and 1 more\)",
    ):
        fl.nn.cross_entropy(z, t.at[0, 0].set(-100).at[1, 1].set(-100))
    with pytest.raises(
        ValueError,
        match=r'cross_entropy: with reduction="mean", `mask` must keep at least one '
        r"position; got a mask of zeros",
    ):
        fl.nn.cross_entropy(z, t, mask=jnp.zeros((2, 4)))


def test_cross_entropy_range_check_skips_padding():
    """Padded targets may hold anything, as torch's `ignore_index` does."""
    z = jnp.zeros((2, 4, 3), jnp.float32)
    t = jnp.zeros((2, 4), jnp.int32).at[1, 3].set(-100)
    mask = jnp.ones((2, 4), jnp.float32).at[1, 3].set(0.0)
    np.testing.assert_allclose(
        float(fl.nn.cross_entropy(z, t, mask=mask)), np.log(3), rtol=1e-6
    )
    # At a real position, the same target is still an error.
    with pytest.raises(ValueError, match=r"cross_entropy: `targets`.*got -100"):
        fl.nn.cross_entropy(z, t, mask=mask.at[1, 3].set(1.0))
