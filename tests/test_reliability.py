"""Guarded training, checkpointed fit and resume, batch buckets, reproducibility."""

import hashlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tree_allclose

import functorch_lite as fl

N, D_IN, H, D_OUT = 16, 12, 8, 4


def _setup(key, mode="static", **step_kwargs):
    kx, ky, kp = jax.random.split(key, 3)
    net = fl.models.DynamicNet(D_IN, H, D_OUT)
    x, y = jax.random.normal(kx, (N, D_IN)), jax.random.normal(ky, (N, D_OUT))
    opt = optax.sgd(1e-3, momentum=0.9)

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth, mode=mode), y)

    static = ("depth",) if mode == "dynamic" else ()
    step = fl.train.make_step(loss_fn, opt, static_argnames=static, **step_kwargs)
    params = net.init(kp)
    return step, params, opt.init(params), x, y


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _batches(x, y, n=20, bad_at=None):
    depths = np.random.default_rng(0).integers(0, 4, size=n)
    out = []
    for i, d in enumerate(depths):
        xi = x.at[0, 0].set(jnp.nan) if i == bad_at else x
        out.append((xi, y, int(d)))
    return out


def _bytes(tree):
    return b"".join(np.asarray(a).tobytes() for a in jax.tree.leaves(tree))


# ------------------------------------------------------------ guarded training


def test_nonfinite_loss_stops_fit_with_last_finite_state(key, tmp_path):
    step, params, state, x, y = _setup(key, guard=True)
    batches = _batches(x, y, bad_at=7)
    # The same run, stopped by hand after 7 good steps: the state to expect.
    ref_p, ref_s, _ = fl.train.fit(
        step, _copy(params), _copy(state), batches[:7], progress=False
    )
    with pytest.raises(
        FloatingPointError, match=r"fit: the loss at step 8 is nan.*after step 7"
    ) as info:
        fl.train.fit(
            step,
            _copy(params),
            _copy(state),
            batches,
            progress=False,
            checkpoint_dir=tmp_path,
        )
    err = info.value
    assert err.step == 7
    assert _bytes(err.params) == _bytes(ref_p)
    assert _bytes(err.opt_state) == _bytes(ref_s)
    saved_step, saved = fl.checkpoint.load_latest(
        tmp_path, like={"params": params, "opt_state": state, "step": 0}
    )
    assert saved_step == 7 and _bytes(saved["params"]) == _bytes(ref_p)


@pytest.mark.parametrize("log_every, bad_at", [(3, 7), (3, 6), (4, 0), (50, 19)])
def test_bad_step_in_any_window_gives_the_state_before_it(key, log_every, bad_at):
    # The bad step may open a window (bad_at 6 with windows of 3), close one,
    # or come first; fit finds it at the window's read-back and replays.
    step, params, state, x, y = _setup(key, guard=True)
    batches = _batches(x, y, bad_at=bad_at)
    ref_p, ref_s, _ = fl.train.fit(
        step, _copy(params), _copy(state), batches[:bad_at], progress=False
    )
    with pytest.raises(FloatingPointError, match=rf"step {bad_at + 1} is nan") as info:
        fl.train.fit(
            step,
            _copy(params),
            _copy(state),
            batches,
            progress=False,
            log_every=log_every,
        )
    assert info.value.step == bad_at
    assert _bytes(info.value.params) == _bytes(ref_p)
    assert _bytes(info.value.opt_state) == _bytes(ref_s)


class _Loss:
    """A host loss that records how many steps had run when it was read."""

    shape = ()

    def __init__(self, value, clock, reads):
        self.value, self.clock, self.reads = value, clock, reads

    def _read(self):
        self.reads.append(self.clock[0])
        return float(self.value)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._read(), dtype=dtype)

    def __float__(self):
        return self._read()

    def __bool__(self):
        return bool(self._read())


@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("progress", [False, True])
def test_fit_reads_losses_back_once_per_log_window(key, guard, progress, capsys):
    # Reading a loss waits for its step; fit must do it only every
    # `log_every` steps, so the host can queue steps ahead of the device.
    step, params, state, x, y = _setup(key, guard=guard)
    clock, reads = [0], []

    def counted(params, opt_state, x, y, depth):
        params, opt_state, loss = step(params, opt_state, x, y, depth)
        clock[0] += 1
        return params, opt_state, _Loss(loss, clock, reads)

    counted.guarded = guard
    _, _, losses = fl.train.fit(
        counted, params, state, _batches(x, y, n=20), progress=progress, log_every=6
    )
    assert clock[0] == 20 and np.isfinite(losses).all()
    assert set(reads) == {6, 12, 18, 20}, reads


def test_fit_finishes_a_checkpoint_in_flight_when_stopped(key, tmp_path):
    step, params, state, x, y = _setup(key)
    batches = _batches(x, y, n=6)

    def stop_after_four():
        yield from batches[:4]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        fl.train.fit(
            step,
            _copy(params),
            _copy(state),
            stop_after_four(),
            progress=False,
            checkpoint_every=4,
            checkpoint_dir=tmp_path,
        )
    assert info.value.step == 4
    like = {"params": params, "opt_state": state, "step": 0}
    saved_step, saved = fl.checkpoint.load_latest(tmp_path, like=like)
    assert saved_step == 4
    assert _bytes(saved["params"]) == _bytes(info.value.params)
    assert not [f for f in os.listdir(tmp_path) if not f.endswith(".safetensors")]


def test_a_failed_background_save_stops_fit_with_the_state(key, tmp_path, monkeypatch):
    step, params, state, x, y = _setup(key)

    class Failed:  # a background save that failed after it started
        def __init__(self, at):
            self.at = at

        def done(self):
            return True

        def wait(self, timeout=None):
            raise OSError(f"disk full at step {self.at}")

    def failing(directory, at, tree, *, keep):
        return Failed(at)

    monkeypatch.setattr(fl.checkpoint, "save_numbered_async", failing)
    with pytest.raises(OSError, match="disk full at step 2") as info:
        fl.train.fit(
            step,
            _copy(params),
            _copy(state),
            _batches(x, y, n=6),
            progress=False,
            checkpoint_every=2,
            checkpoint_dir=tmp_path,
        )
    # Found when fit waits for it, before the next save at step 4.
    assert info.value.step == 4


def test_unguarded_step_says_how_to_keep_the_state(key):
    step, params, state, x, y = _setup(key)
    with pytest.raises(
        FloatingPointError, match=r"step 3 is nan.*not guarded.*guard=True"
    ):
        fl.train.fit(step, params, state, _batches(x, y, bad_at=2), progress=False)


def test_nonfinite_gradient_with_finite_loss_is_caught(key):
    opt = optax.sgd(0.1)
    # sqrt has an infinite gradient at 0 while the loss there is finite.
    step = fl.train.make_step(
        lambda p, t: jnp.sum(jnp.sqrt(jnp.abs(p["w"] - t))), opt, guard=True
    )
    params = {"w": jnp.ones(3)}
    new, _, loss = step(_copy(params), opt.init(params), jnp.array([1.0, 0.0, 0.0]))
    assert np.isnan(float(loss))
    np.testing.assert_array_equal(new["w"], params["w"])


def test_skip_carries_on_past_bad_steps(key):
    step, params, state, x, y = _setup(key, guard=True)
    batches = _batches(x, y, bad_at=4)
    p, s, losses = fl.train.fit(
        step, _copy(params), _copy(state), batches, progress=False, on_nonfinite="skip"
    )
    assert np.isnan(losses[4]) and np.isfinite(np.delete(losses, 4)).all()
    good = batches[:4] + batches[5:]
    p_ref, _, _ = fl.train.fit(step, _copy(params), _copy(state), good, progress=False)
    assert _bytes(p) == _bytes(p_ref)


def test_check_inputs_reports_the_input_and_skips(key):
    step, params, state, x, y = _setup(key, guard=True)
    batches = _batches(x, y, bad_at=3)
    with pytest.raises(
        FloatingPointError, match=r"step 4 has non-finite values in its input \[0\]"
    ):
        fl.train.fit(
            step,
            _copy(params),
            _copy(state),
            batches,
            progress=False,
            check_inputs=True,
        )
    _, _, losses = fl.train.fit(
        step,
        _copy(params),
        _copy(state),
        batches,
        progress=False,
        check_inputs=True,
        on_nonfinite="skip",
    )
    assert np.isnan(losses[3]) and np.isfinite(np.delete(losses, 3)).all()


def test_fit_option_errors(key, tmp_path):
    step, params, state, x, y = _setup(key)
    with pytest.raises(
        ValueError, match=r'`on_nonfinite="skip"` needs a step .* guard=True'
    ):
        fl.train.fit(step, params, state, [], on_nonfinite="skip")
    with pytest.raises(
        ValueError, match=r'fit: `on_nonfinite` must be "raise" or "skip"'
    ):
        fl.train.fit(step, params, state, [], on_nonfinite="warn")
    with pytest.raises(
        ValueError, match=r"fit: `checkpoint_every` must be a positive int"
    ):
        fl.train.fit(
            step, params, state, [], checkpoint_every=0, checkpoint_dir=tmp_path
        )
    with pytest.raises(ValueError, match=r"need `checkpoint_dir`"):
        fl.train.fit(step, params, state, [], resume=True)


# ----------------------------------------------------------- checkpoint + resume


class _Crash(Exception):
    pass


def _crashing(batches, at):
    for i, b in enumerate(batches):
        if i == at:
            raise _Crash
        yield b


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_resumed_run_is_bitwise_identical(key, tmp_path, mode):
    step, params, state, x, y = _setup(key, mode)
    batches = _batches(x, y, n=23)
    full_p, full_s, full_losses = fl.train.fit(
        step, _copy(params), _copy(state), batches, progress=False
    )
    with pytest.raises(_Crash):
        fl.train.fit(
            step,
            _copy(params),
            _copy(state),
            _crashing(batches, 17),
            progress=False,
            checkpoint_every=5,
            checkpoint_dir=tmp_path,
            keep=2,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_00000010.safetensors",
        "ckpt_00000015.safetensors",
    ]
    p, s, losses = fl.train.fit(
        step,
        _copy(params),
        _copy(state),
        batches,
        progress=False,
        checkpoint_every=5,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert len(losses) == 23 - 15
    np.testing.assert_array_equal(losses, full_losses[15:])
    assert _bytes(p) == _bytes(full_p)
    assert _bytes(s) == _bytes(full_s)


def test_resume_skips_a_corrupted_newest_checkpoint(key, tmp_path):
    step, params, state, x, y = _setup(key)
    batches = _batches(x, y, n=12)
    full_p, _, _ = fl.train.fit(
        step, _copy(params), _copy(state), batches, progress=False
    )
    fl.train.fit(
        step,
        _copy(params),
        _copy(state),
        batches[:10],
        progress=False,
        checkpoint_every=5,
        checkpoint_dir=tmp_path,
    )
    newest = tmp_path / "ckpt_00000010.safetensors"
    newest.write_bytes(newest.read_bytes()[:-20])  # truncated
    p, _, losses = fl.train.fit(
        step,
        _copy(params),
        _copy(state),
        batches,
        progress=False,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert len(losses) == 12 - 5
    assert _bytes(p) == _bytes(full_p)


# ------------------------------------------------------------------ bucketing


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n", [1, 3, 8, 13, 100])
def test_padded_batch_gives_the_unpadded_loss_and_grads(key, reduction, n):
    net = fl.models.DynamicNet(D_IN, H, D_OUT)
    params = net.init(key)
    kx, ky = jax.random.split(jax.random.key(n))
    x, y = jax.random.normal(kx, (n, D_IN)), jax.random.normal(ky, (n, D_OUT))

    def loss(params, x, y, mask=None):
        return fl.nn.mse_loss(
            net.apply(params, x, 2), y, reduction=reduction, mask=mask
        )

    (xp, yp), mask = fl.train.pad_batch(x, y)
    assert xp.shape[0] == fl.train.bucket_size(n) >= n
    ref_val, ref_grad = jax.value_and_grad(loss)(params, x, y)
    val, grad = jax.value_and_grad(loss)(params, xp, yp, mask)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    tree_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_every_batch_size_to_256_compiles_at_most_9_times(key):
    net = fl.models.DynamicNet(D_IN, H, D_OUT)
    opt = optax.sgd(1e-3)

    def loss_fn(params, x, y, mask, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth), y, mask=mask)

    step = fl.train.make_step(loss_fn, opt, max_traces=9)
    params = net.init(key)
    state = opt.init(params)
    rng = np.random.default_rng(0)  # host data, as a data loader yields it
    x_all = rng.normal(size=(256, D_IN)).astype(np.float32)
    y_all = rng.normal(size=(256, D_OUT)).astype(np.float32)
    with fl.compile_counter() as counter:
        for n in range(1, 257):
            (x, y), mask = fl.train.pad_batch(x_all[:n], y_all[:n])
            params, state, _ = step(params, state, x, y, mask, n % 4)
    assert step.stats.compiles == 9
    assert counter.compiles == 9  # pad_batch pads on the host: no programs of its own


def test_bucket_errors():
    with pytest.raises(
        ValueError, match=r"bucket_size: `n` must be a positive int; got 0"
    ):
        fl.train.bucket_size(0)
    with pytest.raises(ValueError, match=r"larger than the largest bucket 64"):
        fl.train.bucket_size(65, buckets=[8, 64])
    with pytest.raises(
        ValueError,
        match=r"pad_batch: every array must have the same batch size; got \[3, 4\]",
    ):
        fl.train.pad_batch(jnp.ones((3, 2)), jnp.ones((4, 2)))
    with pytest.raises(
        ValueError,
        match=r"pad_batch: argument 0 must be an array with a batch dimension",
    ):
        fl.train.pad_batch(jnp.float32(1.0))
    with pytest.raises(TypeError, match="pad_batch: give at least one array"):
        fl.train.pad_batch()
    with pytest.raises(
        ValueError, match=r"mse_loss: `mask` must have shape \(N,\) = \(4,\)"
    ):
        fl.nn.mse_loss(jnp.ones((4, 2)), jnp.ones((4, 2)), mask=jnp.ones(3))
    assert fl.train.bucket_size(64) == 64 and fl.train.bucket_size(65) == 128


# ------------------------------------------------------------ reproducibility


def _train_digest(mode: str, fused: bool) -> str:
    step, params, state, x, y = _setup(jax.random.key(42), mode)
    batches = _batches(x, y, n=15)
    if fused:
        net = fl.models.DynamicNet(D_IN, H, D_OUT)
        fused_step = fl.train.make_fused_step(
            lambda p, x, y, depth: fl.nn.mse_loss(net.apply(p, x, depth), y),
            optax.sgd(1e-3, momentum=0.9),
            shared_argnames=("x", "y"),
        )
        depths = jnp.array([b[2] for b in batches])
        params, state, _ = fused_step(params, state, x, y, depths)
    else:
        params, state, _ = fl.train.fit(step, params, state, batches, progress=False)
    return hashlib.sha256(_bytes(params) + _bytes(state)).hexdigest()


def _loop_digest(mode: str) -> str:
    """`_train_digest(mode, False)` written out: a plain loop over the step."""
    step, params, state, x, y = _setup(jax.random.key(42), mode)
    for batch in _batches(x, y, n=15):
        params, state, _ = step(params, state, *batch)
    assert step.stats.calls == 15
    return hashlib.sha256(_bytes(params) + _bytes(state)).hexdigest()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_fit_gives_bitwise_the_params_of_a_plain_step_loop(mode):
    """Same key, same data: `fit` ends bitwise where an independent loop does."""
    assert _train_digest(mode, False) == _loop_digest(mode)


def test_fused_run_is_bitwise_repeatable_and_close_to_the_loop():
    """A fused run repeats bitwise from fresh compiles, and ends where the loop
    does (one scan, not 15 calls: bitwise equal on CPU here, but the compiler
    may round the two programs differently, so within float32 tolerance)."""
    assert _train_digest("static", True) == _train_digest("static", True)
    step, params, state, x, y = _setup(jax.random.key(42), "static")
    batches = _batches(x, y, n=15)
    net = fl.models.DynamicNet(D_IN, H, D_OUT)
    fused = fl.train.make_fused_step(
        lambda p, x, y, depth: fl.nn.mse_loss(net.apply(p, x, depth), y),
        optax.sgd(1e-3, momentum=0.9),
        shared_argnames=("x", "y"),
    )
    fp, fs, _ = fused(
        _copy(params), _copy(state), x, y, jnp.array([b[2] for b in batches])
    )
    for batch in batches:
        params, state, _ = step(params, state, *batch)
    tree_allclose((fp, fs), (params, state), rtol=1e-5, atol=1e-6)


def test_reproducible_across_processes():
    # The child imports this file, and the very functorch_lite this process
    # runs, by absolute path: whatever the working directory.
    paths = [
        os.path.dirname(os.path.dirname(os.path.abspath(fl.__file__))),
        os.path.dirname(os.path.abspath(__file__)),
    ]
    code = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = {paths!r}
        import functorch_lite
        assert functorch_lite.__file__ == {os.path.abspath(fl.__file__)!r}
        from test_reliability import _train_digest
        print(
            _train_digest("static", False),
            _train_digest("dynamic", False),
            _train_digest("static", True),
        )
        """
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert len(runs[0]) == 3
    # And each fresh process equals this one, and an independent loop here.
    assert runs[0] == [
        _loop_digest("static"),
        _loop_digest("dynamic"),
        _train_digest("static", True),
    ]
