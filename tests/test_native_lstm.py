"""The static LSTM core's native CPU kernels (functorch_lite/_native/lstm.cc).

References: the core's XLA loops in float64 (themselves checked against a
float64 NumPy program and PyTorch in test_recurrent.py) and in float32, and
the dynamic path. Every test that expects the kernels checks that the
compiled program calls them, so a silent fallback to XLA fails it.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose

import functorch_lite as fl
from functorch_lite import _native, _recurrent

X64 = jax.enable_x64(True)
D_IN = 3
needs_kernels = pytest.mark.skipif(
    not _native.available(), reason=f"no native kernels: {_native.status()}"
)


def test_kernels_build_where_a_compiler_exists():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine")
    assert _native.available(), _native.status()
    assert _native.status().startswith("built and loaded")


def _problem(n, t, h, bi, layers, seed, longest=None):
    """A loss over an LSTM's outputs and final states; the longest length is
    `t` unless `longest` is given (then every row ends before `t`)."""
    longest = t if longest is None else longest
    r = np.random.default_rng(seed)
    layer = fl.nn.lstm(D_IN, h, num_layers=layers, bidirectional=bi)
    params = layer.init(jax.random.key(seed))
    count = layers * (2 if bi else 1)
    xs = r.standard_normal((n, t, D_IN)).astype(np.float32)  # padding holds values
    lengths = np.r_[1, longest, r.integers(1, longest + 1, max(n - 2, 0))]
    lengths = lengths[:n].astype(np.int32)
    r.shuffle(lengths)
    state = tuple(
        (0.5 * r.standard_normal((count, n, h))).astype(np.float32) for _ in range(2)
    )
    width = h * (2 if bi else 1)
    weights = r.standard_normal((n, t, width)).astype(np.float32)

    def f(p, x, state):
        out, (hn, cn) = layer.apply(p, x, jnp.asarray(lengths), initial_state=state)
        return (
            jnp.sum(jnp.asarray(weights, out.dtype) * out)
            + jnp.sum(jnp.sin(hn))
            + jnp.sum(cn**3)
        )

    return f, params, jnp.asarray(xs), tuple(map(jnp.asarray, state)), lengths


def _calls_kernels(fn, *args) -> bool:
    return "functorch_lite_FlLstm" in jax.jit(fn).lower(*args).as_text()


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@needs_kernels
@pytest.mark.parametrize(
    "n, t, h, bi, layers, longest",
    [
        (5, 7, 16, False, 1, None),  # a row block of 4 and one of 1
        (13, 6, 48, True, 1, None),  # 48: the reverse matmul's narrow blocks only
        (3, 9, 80, False, 1, 6),  # 80: a wide block and a narrow one; all end early
        (2, 5, 16, True, 1, 3),  # a block of 2 rows, every row ends before T
        (1, 4, 32, False, 2, None),  # one row, two layers
        (20, 8, 128, False, 1, None),  # the sequence workload's width
    ],
)
def test_kernels_match_the_xla_core_in_float64(n, t, h, bi, layers, longest):
    """Values and gradients (weights, inputs, initial state) of the kernels,
    against the XLA core in float64, and a zero gradient at every padded
    input. (The XLA core in float32 is the same program as the float64 one,
    which test_recurrent.py checks against NumPy and PyTorch.)"""
    f, params, xs, state, lengths = _problem(n, t, h, bi, layers, n + h, longest)
    vg = jax.value_and_grad(f, argnums=(0, 1, 2))
    assert _calls_kernels(vg, params, xs, state)
    native = jax.jit(vg)(params, xs, state)
    with X64:  # float64: the XLA core (the kernels take float32 only)
        f64 = jax.value_and_grad(f, argnums=(0, 1, 2))
        assert not _calls_kernels(f64, *_f64((params, xs, state)))
        exact = jax.jit(f64)(*_f64((params, xs, state)))
    tree_allclose(_f64(native), exact, rtol=2e-5, atol=2e-5)
    padded = np.arange(t)[None, :] >= lengths[:, None]
    assert padded.any() and not np.any(np.asarray(native[1][1])[padded])


@needs_kernels
def test_kernels_differentiate_twice_and_vmap(monkeypatch):
    """Differentiated again, the kernels' custom_jvp hands over to the XLA
    loops, whose derivatives are known (a Hessian-vector product, a gradient
    of a gradient norm); a vmap over lengths runs the kernels once per batch
    member. Against the dynamic path."""
    n, t, h = 6, 5, 16
    f, params, xs, state, lengths = _problem(n, t, h, False, 1, seed=2)
    tangent = jax.tree.map(jnp.ones_like, params)
    layer = fl.nn.lstm(D_IN, h)

    def g(p, x, n_, mode):
        out, (hn, cn) = layer.apply(p, x, n_, mode=mode, initial_state=state)
        return jnp.sum(out**2) + jnp.sum(jnp.sin(hn)) + jnp.sum(cn**3)

    n_ = jnp.asarray(lengths)

    def hvp(mode):
        grad = jax.grad(lambda p: g(p, xs, n_, mode))
        return jax.jvp(grad, (params,), (tangent,))[1]

    def grad_of_grad_norm(mode):
        return jax.grad(
            lambda p: jnp.sum(jax.grad(g, argnums=1)(p, xs, n_, mode) ** 2)
        )(params)

    assert _calls_kernels(lambda: jax.grad(g)(params, xs, n_, "static"))
    for fn in (hvp, grad_of_grad_norm):
        tree_allclose(
            jax.jit(fn, static_argnums=0)("static"),
            jax.jit(fn, static_argnums=0)("dynamic"),
            rtol=2e-4,
            atol=2e-4,
        )
    lens = jnp.stack([n_, jnp.asarray([1, 1, 2, t, 3, 4])])

    def batched(mode):
        return jax.vmap(jax.grad(g, argnums=1), in_axes=(None, None, 0, None))(
            params, xs, lens, mode
        )

    assert _calls_kernels(lambda: batched("static"))
    np.testing.assert_allclose(
        jax.jit(lambda: batched("static"))(),
        jax.jit(lambda: batched("dynamic"))(),
        rtol=2e-5,
        atol=2e-5,
    )


@needs_kernels
def test_second_derivative_through_the_reverse_kernel_only(monkeypatch):
    """A forward-mode derivative of the gradient along the loss's weights
    alone: the forward loop gets no tangent, so it runs as the kernel, and
    the reverse loop's derivative runs the XLA loop over the factors the
    kernel stored, past each row's length too. Against the XLA core."""
    layer = fl.nn.lstm(D_IN, 16)
    params = layer.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (3, 4, D_IN))
    lengths = jnp.asarray([4, 2, 1], jnp.int32)
    weights = jnp.ones((3, 4, 16))

    def loss(p, w):
        out, (hn, cn) = layer.apply(p, xs, lengths)
        return jnp.sum(w * out) + jnp.sum(cn**3) + jnp.sum(jnp.sin(hn))

    def jvp_of_grad(w):
        return jax.jvp(lambda w: jax.grad(loss)(params, w), (w,), (w,))

    assert _calls_kernels(jvp_of_grad, weights)
    native = jax.jit(jvp_of_grad)(weights)
    monkeypatch.setattr(_recurrent, "_NATIVE_LSTM", False)
    xla = jax.jit(lambda w: jvp_of_grad(w))(weights)  # a new trace
    tree_allclose(native, xla, rtol=2e-5, atol=2e-6)


@needs_kernels
def test_kernels_are_deterministic_and_compile_once():
    """Rows are split between threads; each row's arithmetic is the same
    whichever thread runs it, so repeated calls agree to the bit. One
    compiled program serves every length pattern."""
    layer = fl.nn.lstm(D_IN, 32)
    params = layer.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (9, 12, D_IN))
    f = fl.jit(jax.grad(lambda p, n: jnp.sum(layer.apply(p, xs, n)[0] ** 2)))
    rng = np.random.default_rng(0)
    lengths = jnp.asarray(rng.integers(1, 13, 9), jnp.int32)
    first = f(params, lengths)
    for _ in range(3):
        tree_allclose(f(params, lengths), first, rtol=0, atol=0)
    for _ in range(4):
        f(params, jnp.asarray(rng.integers(1, 13, 9), jnp.int32))
    assert f.stats.traces == 1 and f.stats.compiles == 1
    assert _calls_kernels(lambda p: f(p, lengths), params)


@pytest.mark.parametrize(
    "env, why",
    [
        ({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
        ({"FUNCTORCH_LITE_NATIVE": "0"}, "turned off"),
    ],
)
def test_without_kernels_the_xla_core_runs(monkeypatch, env, why):
    """No compiler, or the kernels turned off: no error, the same results
    from the XLA loops, and `status()` says why."""
    f, params, xs, state, _ = _problem(5, 6, 16, False, 1, seed=0)
    before = jax.jit(f)(params, xs, state)
    monkeypatch.setattr(_native, "_state", {})  # as in a fresh process
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert not _native.available()
    assert why in _native.status()
    vf = jax.value_and_grad(f)  # a new trace
    assert not _calls_kernels(vf, params, xs, state)
    after = jax.jit(lambda *a: f(*a))(params, xs, state)  # a new trace
    np.testing.assert_allclose(after, before, rtol=2e-5)


def test_the_cached_library_is_named_for_its_compiler_and_cpu(monkeypatch, tmp_path):
    """A cache shared between machines never loads code built for another
    CPU (-march=native) or by another compiler."""
    monkeypatch.setenv("FUNCTORCH_LITE_CACHE", str(tmp_path))
    a = _native._library_path("g++ 12", "flags: avx512f")
    assert a.parent == tmp_path
    assert a == _native._library_path("g++ 12", "flags: avx512f")
    assert a != _native._library_path("g++ 12", "flags: avx2")
    assert a != _native._library_path("g++ 13", "flags: avx512f")


@needs_kernels
def test_kernels_match_pytorch_packed_sequences():
    """Against PyTorch's LSTM over packed sequences (the recurrent issue's
    parity): outputs, final states and gradients, two bidirectional layers
    with an initial state, float32. Skipped without torch."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    n, t, h = 6, 7, 16
    module = torch.nn.LSTM(D_IN, h, num_layers=2, bidirectional=True, batch_first=True)
    params = fl.interop.from_torch(module)
    layer = fl.nn.lstm(D_IN, h, num_layers=2, bidirectional=True)
    r = np.random.default_rng(3)
    xs = r.standard_normal((n, t, D_IN)).astype(np.float32)
    lengths = np.array([7, 1, 4, 6, 2, 7])
    state = tuple(r.standard_normal((4, n, h)).astype(np.float32) for _ in range(2))

    def loss(p, x):
        out, (hn, cn) = layer.apply(p, x, jnp.asarray(lengths), initial_state=state)
        return jnp.sum(out**2) + jnp.sum(hn**3) + jnp.sum(cn**2), (out, hn, cn)

    vg = jax.value_and_grad(loss, (0, 1), has_aux=True)
    assert _calls_kernels(lambda p, x: vg(p, x)[1], params, jnp.asarray(xs))
    (val, (out, hn, cn)), (g_p, g_x) = jax.jit(vg)(params, jnp.asarray(xs))

    xt = torch.tensor(xs, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        xt, torch.tensor(lengths), batch_first=True, enforce_sorted=False
    )
    t_out, (t_hn, t_cn) = module(packed, tuple(torch.tensor(s) for s in state))
    t_out, _ = torch.nn.utils.rnn.pad_packed_sequence(
        t_out, batch_first=True, total_length=t
    )
    t_loss = (t_out**2).sum() + (t_hn**3).sum() + (t_cn**2).sum()
    t_loss.backward()
    np.testing.assert_allclose(val, t_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hn, t_hn.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cn, t_cn.detach().numpy(), rtol=1e-5, atol=1e-5)
    for key, p in module.named_parameters():
        want = p.grad.numpy().T if key.startswith("weight") else p.grad.numpy()
        np.testing.assert_allclose(g_p[key], want, rtol=1e-4, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(g_x, xt.grad.numpy(), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_a_nan_propagates_as_in_the_xla_loops(monkeypatch):
    """A NaN in one row's input reaches that row's later outputs and its final
    state, and no other row, as in the XLA loops (the kernels' exp clamps its
    argument, and must not clamp a NaN into a number)."""
    layer = fl.nn.lstm(D_IN, 16)
    params = layer.init(jax.random.key(0))
    xs = np.asarray(jax.random.normal(jax.random.key(1), (3, 5, D_IN))).copy()
    xs[1, 2, 0] = np.nan
    lengths = jnp.asarray([5, 4, 3], jnp.int32)

    def run(p, x):
        return layer.apply(p, x, lengths)

    assert _calls_kernels(run, params, jnp.asarray(xs))
    native = jax.jit(run)(params, jnp.asarray(xs))
    monkeypatch.setattr(_recurrent, "_NATIVE_LSTM", False)
    xla = jax.jit(lambda p, x: run(p, x))(params, jnp.asarray(xs))  # a new trace
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(xla), strict=True):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    out = np.asarray(native[0])
    assert np.isnan(out[1, 2:4]).all() and not np.isnan(out[[0, 2]]).any()


def test_jax_export_needs_the_kernels_off(monkeypatch):
    """`jax.export` refuses custom calls without compatibility guarantees, so a
    program that calls the kernels cannot be serialized; with the kernels off
    (and the traced-value checks, whose host callbacks export cannot
    serialize either) it exports, and the exported program runs."""
    layer = fl.nn.lstm(D_IN, 16)
    params = layer.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (2, 4, D_IN))
    lengths = jnp.asarray([4, 2], jnp.int32)
    monkeypatch.setenv("FUNCTORCH_LITE_CHECKS", "0")
    f = jax.jit(lambda p, x, n: layer.apply(p, x, n)[0])
    if _native.available():
        with pytest.raises(ValueError, match="functorch_lite_FlLstm"):
            jax.export.export(f)(params, xs, lengths)
    expected = f(params, xs, lengths)
    monkeypatch.setattr(_native, "_state", {})  # as in a fresh process
    monkeypatch.setenv("FUNCTORCH_LITE_NATIVE", "0")
    g = jax.jit(lambda p, x, n: layer.apply(p, x, n)[0])  # a new trace
    exported = jax.export.export(g)(params, xs, lengths)
    np.testing.assert_allclose(
        exported.call(params, xs, lengths), expected, rtol=2e-5, atol=2e-6
    )


@pytest.mark.parametrize(
    "kind, native", [("lstm", True), ("lstm", False), ("rnn", False)]
)
def test_static_recurrent_layers_under_shard_map(monkeypatch, kind, native):
    """The static LSTM (kernels or XLA loops) and RNN (the generic bounded
    loop) inside the user's own `shard_map`, weights replicated and the batch
    split over a mesh axis: the gradient of the psum'd loss is the
    single-program gradient (the loops' custom rules see inputs that vary
    over the axis, and JAX's own rules sum the replicated weights'
    gradients)."""
    if native and not _native.available():
        pytest.skip(f"no native kernels: {_native.status()}")
    monkeypatch.setattr(_recurrent, "_NATIVE_LSTM", native)
    layer = (fl.nn.lstm if kind == "lstm" else fl.nn.rnn)(D_IN, 16)
    params = layer.init(jax.random.key(0))
    n = 2 * jax.device_count()
    xs = jax.random.normal(jax.random.key(1), (n, 5, D_IN))
    lengths = jnp.asarray(np.resize([5, 2, 3, 1], n), jnp.int32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("b",))
    spec = jax.sharding.PartitionSpec

    def loss(p, x, n_):
        return jnp.sum(layer.apply(p, x, n_)[0] ** 2)

    def local(p, x, n_):
        return jax.lax.psum(loss(p, x, n_), "b")

    sharded = jax.jit(
        jax.shard_map(
            jax.grad(local),
            mesh=mesh,
            in_specs=(spec(), spec("b"), spec("b")),
            out_specs=spec(),
        )
    )
    assert _calls_kernels(sharded, params, xs, lengths) == native
    tree_allclose(
        sharded(params, xs, lengths),
        jax.jit(jax.grad(loss))(params, xs, lengths),
        rtol=1e-5,
        atol=1e-6,
    )


@needs_kernels
def test_kernels_refuse_shapes_they_do_not_expect():
    """The kernels check every buffer's shape before touching memory: a call
    that breaks the Python side's promise fails with the kernel's message
    rather than reading or writing out of bounds."""
    t, n, h = 3, 2, 16
    f32 = jnp.float32
    spec = jax.ShapeDtypeStruct
    call = jax.ffi.ffi_call(
        "functorch_lite_FlLstmReverse",
        [spec((t, n, 4 * h), f32), spec((n, h), f32), spec((n, h), f32)],
    )
    good = (
        jnp.zeros((t, n, 4 * h)),
        jnp.zeros((t, n, 2 * h)),
        jnp.zeros((h, 4 * h)),
        jnp.zeros((t, n, h)),
        jnp.zeros((n, h)),
        jnp.zeros((n, h)),
        jnp.ones((n,), jnp.int32),
    )
    jax.block_until_ready(call(*good))
    bad = (good[0], jnp.zeros((t, n, h)), *good[2:])  # tf too narrow
    with pytest.raises(Exception, match="functorch_lite LSTM kernel: reverse"):
        jax.block_until_ready(call(*bad))
