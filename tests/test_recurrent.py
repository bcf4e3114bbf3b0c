"""`fl.nn.lstm` / `fl.nn.rnn` over variable-length padded batches.

References: real PyTorch with `pack_padded_sequence(enforce_sorted=False)` (skipped
without torch), and a float64 NumPy program written independently below.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tree_allclose

import functorch_lite as fl

X64 = jax.enable_x64(True)
N, T, D_IN, H = 4, 6, 3, 5
LENGTHS = np.array([6, 1, 3, 4])  # unsorted, includes 1 and T
CASES = list(itertools.product(("lstm", "rnn"), (1, 2), (False, True), (False, True)))


def _layer(kind, layers, bi, nonlinearity="tanh"):
    if kind == "lstm":
        return fl.nn.lstm(D_IN, H, num_layers=layers, bidirectional=bi)
    return fl.nn.rnn(
        D_IN, H, num_layers=layers, nonlinearity=nonlinearity, bidirectional=bi
    )


def _inputs(kind, layers, bi, with_state, dtype):
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(N, T, D_IN)).astype(dtype)
    count = layers * (2 if bi else 1)
    state = None
    if with_state:
        h0 = rng.normal(size=(count, N, H)).astype(dtype)
        c0 = rng.normal(size=(count, N, H)).astype(dtype)
        state = (h0, c0) if kind == "lstm" else h0
    return xs, state


def _loss_terms(kind, out, state):
    """A loss over the outputs and every final state (so all paths get gradient)."""
    h = state[0] if kind == "lstm" else state
    total = (out**2).sum() + (h**3).sum()
    if kind == "lstm":
        total = total + (state[1] ** 2).sum()
    return total


def _ours(kind, layer, params, xs, state, mode):
    def loss(p, x):
        st = jax.tree.map(jnp.asarray, state)
        out, fin = layer.apply(p, x, jnp.asarray(LENGTHS), mode=mode, initial_state=st)
        return _loss_terms(kind, out, fin), (out, fin)

    (val, (out, fin)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        params, jnp.asarray(xs)
    )
    return val, out, fin, grads


# ----------------------------------------------------------- NumPy reference


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _np_direction(kind, p, seq, h, c, act):
    """One direction over one sequence (T_r, F), float64; returns outs, h, c."""
    outs = []
    for x in seq:
        z = x @ p["wi"] + p["bi"] + h @ p["wh"] + p["bh"]
        if kind == "lstm":
            i, f, g, o = np.split(z, 4)
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
        else:
            h = act(z)
        outs.append(h)
    return np.array(outs), h, c


def _np_reference(kind, params, xs, state, layers, bi, act=np.tanh):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    dirs = 2 if bi else 1
    out = np.zeros((N, T, dirs * H))
    h_n = np.zeros((layers * dirs, N, H))
    c_n = np.zeros((layers * dirs, N, H))
    for r, length in enumerate(LENGTHS):
        inp = np.asarray(xs[r, :length], np.float64)
        for layer in range(layers):
            outs = []
            for d, suffix in enumerate(("", "_reverse")[:dirs]):
                idx = layer * dirs + d
                w = {
                    "wi": p[f"weight_ih_l{layer}{suffix}"],
                    "wh": p[f"weight_hh_l{layer}{suffix}"],
                    "bi": p[f"bias_ih_l{layer}{suffix}"],
                    "bh": p[f"bias_hh_l{layer}{suffix}"],
                }
                if state is None:
                    h0, c0 = np.zeros(H), np.zeros(H)
                elif kind == "lstm":
                    h0, c0 = state[0][idx, r], state[1][idx, r]
                else:
                    h0, c0 = state[idx, r], np.zeros(H)
                seq = inp if d == 0 else inp[::-1]
                o, h, c = _np_direction(kind, w, seq, h0, c0, act)
                outs.append(o if d == 0 else o[::-1])
                h_n[idx, r], c_n[idx, r] = h, c
            inp = np.concatenate(outs, axis=-1)
        out[r, :length] = inp
    return out, ((h_n, c_n) if kind == "lstm" else h_n)


@pytest.mark.parametrize(("kind", "layers", "bi", "with_state"), CASES)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_matches_float64_numpy(kind, layers, bi, with_state, mode):
    with X64:
        layer = _layer(kind, layers, bi)
        params = jax.tree.map(
            lambda a: a.astype(jnp.float64), layer.init(jax.random.key(1))
        )
        xs, state = _inputs(kind, layers, bi, with_state, np.float64)
        _, out, fin, _ = _ours(kind, layer, params, xs, state, mode)
        ref_out, ref_fin = _np_reference(kind, params, xs, state, layers, bi)
        np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)
        tree_allclose(fin, ref_fin, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kind", "layers", "bi", "with_state"), CASES)
def test_static_equals_dynamic_values_and_grads(kind, layers, bi, with_state):
    with X64:
        layer = _layer(kind, layers, bi)
        params = jax.tree.map(
            lambda a: a.astype(jnp.float64), layer.init(jax.random.key(2))
        )
        xs, state = _inputs(kind, layers, bi, with_state, np.float64)
        s = _ours(kind, layer, params, xs, state, "static")
        d = _ours(kind, layer, params, xs, state, "dynamic")
        tree_allclose(s, d, rtol=1e-11, atol=1e-13)


def test_relu_rnn_matches_numpy():
    with X64:
        layer = _layer("rnn", 2, True, "relu")
        params = jax.tree.map(
            lambda a: a.astype(jnp.float64), layer.init(jax.random.key(3))
        )
        xs, _ = _inputs("rnn", 2, True, False, np.float64)
        out, h_n = layer.apply(params, jnp.asarray(xs), jnp.asarray(LENGTHS))
        ref_out, ref_h = _np_reference(
            "rnn", params, xs, None, 2, True, act=lambda z: np.maximum(z, 0.0)
        )
        np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(h_n, ref_h, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------- PyTorch


def _torch_run(torch, kind, module, xs, state):
    xt = torch.tensor(xs, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        xt, torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False
    )
    st = None
    if state is not None:
        st = (
            tuple(torch.tensor(s) for s in state)
            if kind == "lstm"
            else torch.tensor(state)
        )
    out, fin = module(packed, st)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(
        out, batch_first=True, total_length=T
    )
    loss = _loss_terms(kind, out, fin)
    loss.backward()
    grads = {k: v.grad.numpy() for k, v in module.named_parameters()}
    return loss.item(), out.detach().numpy(), fin, grads, xt.grad.numpy()


@pytest.mark.parametrize(("kind", "layers", "bi", "with_state"), CASES)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_pytorch_packed(kind, layers, bi, with_state, mode, dtype):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.RNN
    module = cls(D_IN, H, num_layers=layers, bidirectional=bi, batch_first=True)
    module = module.double() if dtype == "float64" else module
    rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (1e-5, 1e-6)
    with jax.enable_x64(dtype == "float64"):
        params = fl.interop.from_torch(module)
        assert params["weight_ih_l0"].shape == (D_IN, (4 if kind == "lstm" else 1) * H)
        layer = _layer(kind, layers, bi)
        xs, state = _inputs(kind, layers, bi, with_state, np.dtype(dtype))
        val, out, fin, grads = _ours(kind, layer, params, xs, state, mode)
        t_val, t_out, t_fin, t_grads, t_xgrad = _torch_run(
            torch, kind, module, xs, state
        )
        np.testing.assert_allclose(out, t_out, rtol=rtol, atol=atol)
        np.testing.assert_allclose(val, t_val, rtol=rtol)
        t_fin = (
            tuple(s.detach().numpy() for s in t_fin)
            if kind == "lstm"
            else t_fin.detach().numpy()
        )
        tree_allclose(fin, t_fin, rtol=rtol, atol=atol)
        for key, g in t_grads.items():
            want = g.T if key.startswith("weight") else g
            np.testing.assert_allclose(
                grads[0][key], want, rtol=rtol, atol=atol, err_msg=key
            )
        np.testing.assert_allclose(grads[1], t_xgrad, rtol=rtol, atol=atol)


# ------------------------------------------------------------ composition


def test_lstm_core_matches_the_generic_loop_and_differentiates_twice(monkeypatch):
    """The static LSTM's own core (stored gate factors, its own reverse loop).

    Against the generic bounded loop (the core switched off) on values and
    gradients (both directions), and against the dynamic path on a
    Hessian-vector product and on a gradient of a gradient norm (the core's
    reverse rule differentiated again), with lengths batched under vmap too.
    The second-order checks use one direction: each direction runs the same
    core, and XLA takes about 8 s to compile each unrolled bidirectional
    dynamic program.
    """
    from functorch_lite import _recurrent

    with X64:
        layer = fl.nn.lstm(D_IN, H, num_layers=1, bidirectional=True)
        params = jax.tree.map(
            lambda a: a.astype(jnp.float64), layer.init(jax.random.key(3))
        )
        xs, state = _inputs("lstm", 1, True, True, np.float64)

        def f(p, x, n, mode):
            out, (h, c) = layer.apply(p, x, n, mode=mode, initial_state=state)
            return jnp.sum(out**2) + jnp.sum(jnp.sin(h)) + jnp.sum(c**3)

        n = jnp.asarray(LENGTHS)

        def value_and_grad():  # a new function: a new trace, reading the flag
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=3)

        core = value_and_grad()(params, xs, n, "static")
        monkeypatch.setattr(_recurrent, "_FUSED_LSTM", False)
        generic = value_and_grad()(params, xs, n, "static")
        monkeypatch.setattr(_recurrent, "_FUSED_LSTM", True)
        tree_allclose(core, generic, rtol=1e-11, atol=1e-13)

        layer = fl.nn.lstm(D_IN, H, num_layers=1)
        params = jax.tree.map(
            lambda a: a.astype(jnp.float64), layer.init(jax.random.key(4))
        )
        xs, state = _inputs("lstm", 1, False, True, np.float64)
        tangent = jax.tree.map(jnp.ones_like, params)

        def hvp(mode):
            grad = jax.grad(lambda p: f(p, xs, n, mode))
            return jax.jvp(grad, (params,), (tangent,))[1]

        def grad_of_grad_norm(mode):
            def norm(p):
                g = jax.grad(f, argnums=1)(p, xs, n, mode)
                return jnp.sum(g**2)

            return jax.grad(norm)(params)

        # Compiled: eager dispatch of every op of the loops is the slow part.
        hvp, grad_of_grad_norm = (
            jax.jit(fn, static_argnums=0) for fn in (hvp, grad_of_grad_norm)
        )
        tree_allclose(hvp("static"), hvp("dynamic"), rtol=1e-10, atol=1e-12)
        tree_allclose(
            grad_of_grad_norm("static"),
            grad_of_grad_norm("dynamic"),
            rtol=1e-10,
            atol=1e-12,
        )
        lens = jnp.stack([n, jnp.asarray([1, 1, 2, T])])
        batched = [
            jax.jit(
                jax.vmap(jax.grad(f, argnums=1), in_axes=(None, None, 0, None)),
                static_argnums=3,
            )(params, xs, lens, mode)
            for mode in ("static", "dynamic")
        ]
        np.testing.assert_allclose(batched[0], batched[1], rtol=1e-11, atol=1e-13)


def test_lstm_core_in_stages_matches_the_generic_loop(monkeypatch):
    """20 rows: the core runs them in five stages (20, 16, 12, 8, then 4 rows).

    Every length short of T, and padding that holds values: positions that
    no stage reaches keep what the core found there, which must not leak
    into any value or gradient. Both directions, an initial state, both
    biases; values and gradients against the generic bounded loop, and a
    zero gradient at every padded input.
    """
    from functorch_lite import _recurrent

    with X64:
        n, t = 20, 9
        assert _recurrent._stages(n) == (20, 16, 12, 8, 4)
        r = np.random.default_rng(11)
        layer = fl.nn.lstm(D_IN, H, bidirectional=True)
        params = jax.tree.map(
            lambda a: a.astype(jnp.float64), layer.init(jax.random.key(5))
        )
        xs = jnp.asarray(r.standard_normal((n, t, D_IN)))  # padding included
        lengths = jnp.asarray(np.r_[1, t - 1, r.integers(1, t, n - 2)])
        state = tuple(jnp.asarray(r.standard_normal((2, n, H))) for _ in range(2))
        weights = jnp.asarray(r.standard_normal((n, t, 2 * H)))

        def f(p, x, state):
            out, (h, c) = layer.apply(p, x, lengths, initial_state=state)
            return jnp.sum(weights * out) + jnp.sum(jnp.sin(h)) + jnp.sum(c**3)

        def value_and_grad():  # a new function: a new trace, reading the flag
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

        core = value_and_grad()(params, xs, state)
        monkeypatch.setattr(_recurrent, "_FUSED_LSTM", False)
        generic = value_and_grad()(params, xs, state)
        monkeypatch.setattr(_recurrent, "_FUSED_LSTM", True)
        tree_allclose(core, generic, rtol=1e-11, atol=1e-13)
        d_xs = np.asarray(core[1][1])
        padded = np.arange(t)[None, :] >= np.asarray(lengths)[:, None]
        assert padded.any() and not np.any(d_xs[padded])


def test_one_compile_for_every_length_pattern():
    layer = fl.nn.lstm(D_IN, H)
    params = layer.init(jax.random.key(0))
    xs = jnp.ones((N, T, D_IN))
    f = fl.jit(jax.grad(lambda p, n: jnp.sum(layer.apply(p, xs, n)[0] ** 2)))
    rng = np.random.default_rng(0)
    for _ in range(5):
        f(params, jnp.asarray(rng.integers(1, T + 1, N), jnp.int32))
    assert f.stats.traces == 1 and f.stats.compiles == 1


def test_dynamic_mode_takes_traced_lengths_one_program_per_padded_length():
    layer = fl.nn.rnn(D_IN, H)
    params = layer.init(jax.random.key(0))
    f = fl.jit(lambda p, x, n: layer.apply(p, x, n, mode="dynamic")[0])
    for t in (4, 6, 4, 6):
        f(params, jnp.ones((N, t, D_IN)), jnp.full((N,), 2, jnp.int32))
    assert f.stats.compiles == 2


def test_vmap_over_batches_and_make_step():
    layer = fl.nn.lstm(D_IN, H, bidirectional=True)
    params = layer.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (2, N, T, D_IN))
    lengths = jnp.array([[6, 1, 3, 4], [2, 2, 5, 6]])
    batched = jax.vmap(lambda x, n: layer.apply(params, x, n)[0])(xs, lengths)
    for b in range(2):
        np.testing.assert_allclose(
            batched[b], layer.apply(params, xs[b], lengths[b])[0], rtol=1e-5, atol=1e-6
        )

    def loss(p, x, n):
        return jnp.mean(layer.apply(p, x, n)[0] ** 2)

    opt = optax.sgd(0.1)
    step = fl.train.make_step(loss, opt, donate=False)
    new, _, _ = step(params, opt.init(params), xs[0], lengths[0])
    g = jax.grad(loss)(params, xs[0], lengths[0])
    tree_allclose(new, jax.tree.map(lambda a, b: a - 0.1 * b, params, g), rtol=1e-5)


def test_padding_content_does_not_matter():
    layer = fl.nn.lstm(D_IN, H, bidirectional=True)
    params = layer.init(jax.random.key(0))
    xs = np.random.default_rng(0).normal(size=(N, T, D_IN)).astype(np.float32)
    noisy = xs.copy()
    for r, length in enumerate(LENGTHS):
        noisy[r, length:] = 1e6
    a = layer.apply(params, jnp.asarray(xs), jnp.asarray(LENGTHS))
    b = layer.apply(params, jnp.asarray(noisy), jnp.asarray(LENGTHS))
    tree_allclose(a, b, rtol=0, atol=0)


def test_init_like_pytorch():
    layer = fl.nn.lstm(7, 64, num_layers=2, bidirectional=True)
    params = layer.init(jax.random.key(0))
    assert list(params)[:4] == [
        "weight_ih_l0",
        "weight_hh_l0",
        "bias_ih_l0",
        "bias_hh_l0",
    ]
    assert params["weight_ih_l1_reverse"].shape == (128, 256)
    flat = np.concatenate([np.ravel(v) for v in params.values()])
    bound = 1 / np.sqrt(64)
    assert flat.dtype == np.float32
    assert np.abs(flat).max() <= bound and np.abs(flat).max() > 0.99 * bound
    assert abs(flat.std() - bound / np.sqrt(3)) < 0.01 * bound


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("xs", "lengths", "kwargs", "exc", "match"),
    [
        (np.ones((N, T)), LENGTHS, {}, ValueError, r"`xs` must have shape \(N, T, 3\)"),
        (np.ones((N, T, 2)), LENGTHS, {}, ValueError, r"`xs` must have shape"),
        (
            np.ones((N, T, 3), np.int32),
            LENGTHS,
            {},
            TypeError,
            r"`xs` must have a floating",
        ),
        (
            np.ones((N, T, 3)),
            LENGTHS[:3],
            {},
            ValueError,
            r"`lengths` must have shape \(4,\)",
        ),
        (
            np.ones((N, T, 3)),
            LENGTHS.astype(np.float32),
            {},
            TypeError,
            r"`lengths` must be an integer",
        ),
        (
            np.ones((N, T, 3)),
            np.array([6, 0, 3, 4]),
            {},
            ValueError,
            r"every length must be in \[1, 6\].*got 0 at row 1",
        ),
        (
            np.ones((N, T, 3)),
            np.array([6, 7, 3, 4]),
            {},
            ValueError,
            r"every length .*got 7 at row 1",
        ),
        (
            np.ones((N, T, 3)),
            LENGTHS,
            {"initial_state": np.zeros((1, N, H))},
            TypeError,
            r"`initial_state` must be a pair",
        ),
        (
            np.ones((N, T, 3)),
            LENGTHS,
            {"initial_state": (np.zeros((2, N, H)),) * 2},
            ValueError,
            r"`initial_state` h_0 must have shape \(1, 4, 5\)",
        ),
        (np.ones((N, T, 3)), LENGTHS, {"mode": "eager"}, ValueError, r"`mode` must be"),
    ],
)
def test_errors_name_function_and_argument(xs, lengths, kwargs, exc, match):
    layer = fl.nn.lstm(D_IN, H)
    params = layer.init(jax.random.key(0))
    xs = jnp.asarray(xs, jnp.float32) if xs.dtype == np.float64 else jnp.asarray(xs)
    if "initial_state" in kwargs and not isinstance(kwargs["initial_state"], tuple):
        kwargs = {"initial_state": jnp.asarray(kwargs["initial_state"], jnp.float32)}
    elif "initial_state" in kwargs:
        kwargs = {
            "initial_state": tuple(
                jnp.asarray(s, jnp.float32) for s in kwargs["initial_state"]
            )
        }
    with pytest.raises(exc, match=r"lstm\(\.\.\.\)\.apply: " + match):
        layer.apply(params, xs, jnp.asarray(lengths), **kwargs)


def test_constructor_errors():
    with pytest.raises(
        ValueError, match=r'rnn: `nonlinearity` must be "tanh" or "relu"'
    ):
        fl.nn.rnn(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match=r"lstm: `num_layers` must be a positive int"):
        fl.nn.lstm(3, 4, num_layers=0)
    with pytest.raises(TypeError, match=r"lstm: `bidirectional` must be a bool"):
        fl.nn.lstm(3, 4, bidirectional=1)
