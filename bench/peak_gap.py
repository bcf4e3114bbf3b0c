"""Where the reference step's time goes, against the machine's matmul peak.

Issue 5's target 4b asks for the best static strategy to reach 50% of the measured
matmul peak on the reference DynamicNet step (N=64, D_in=1000, H=100, D_out=10).
This script measures, in one process and one after another, what bounds that
fraction on this machine:

1. the matmul peak (a 2048x2048 float32 matmul, XLA; and torch's, when installed);
2. each matmul of the step on its own, inside a compiled loop (no dispatch cost):
   the input layer's forward `x @ W1` (64x1000x100) and its weight gradient
   `x.T @ g` (1000x64x100), and the middle layer's three (64x100x100) matmuls;
   the sequence workload's LSTM matmuls (one step's `h @ W_hh` and its input
   gradient at 32, 16 and 8 rows, and `W_hh`'s gradient over 80 steps at once);
   the same shapes in torch, the best matmul library on this machine;
3. whole training steps: plain JAX (no functorch_lite) with the depth fixed and
   unrolled, 500 steps in one `lax.scan`, the least work the step can do in XLA;
   the library's `make_fused_step` (K=500, random depths 0..3); torch eager;
4. the bound: the fraction of peak a step would reach if its matmuls ran at the
   best speed measured in (2) and everything else (ReLU, loss, biases, optimizer,
   loop) cost nothing.

With `--flags`, the unrolled step and `x @ W1` are measured again in fresh
processes under each XLA CPU option that routes matmuls to another library
(XNNPACK, YNNPACK, oneDNN) or changes threading.

With `--interleaved ROUNDS`, the specialized programs, the fused step (also with
`static_method="scan"`, and with the loop's reverse pass recomputing each step
rather than storing its residuals, as it did before 2026-12-07's sixth session),
a `lax.switch` over the specialized steps, and a hand-written plain-JAX bounded loop
(`_minimal_loop`: two `lax.while_loop`s and a `jax.custom_vjp`, nothing else), and a
`lax.switch` over the specialized gradients (no loop), and the library's
`make_fused_step(..., specialize=...)`, which builds that switch, are timed
in turn, round after round, and the ratio to the specialized programs is taken
within each round (see `_interleaved`): on a shared machine whose speed drifts,
this is what settles a 5% target.

With `--profile DEPTHS` (for example `0,1`), the specialized program and the fused
step at each constant depth run under jax.profiler, and the XLA ops that take the
most time per step are listed for both (see `_profile`): where the loop's cost over
the straight-line program goes.

With `--xla-threads N`, JAX's CPU runtime starts with N threads instead of one
per core (bench/_xla_threads.py).

    python bench/peak_gap.py [--repeats 5] [--flags] [--interleaved 15]
                             [--profile 0,1] [--xla-threads 1] [--out bench/results]

Prints a table and writes `<out>/peak-gap-<timestamp>.json`. Timings are medians
of `--repeats`, with the spread; every figure is relative to the peak measured
in the same run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import functorch_lite as fl
from functorch_lite import _loop

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _op_times  # noqa: E402
import _xla_threads  # noqa: E402
from workloads.dynamicnet import (  # noqa: E402
    DEFAULT_OUT,
    LR,
    MOMENTUM,
    _environment,
    _matmul_peak,
    count_flops,
)

N, D_IN, H, D_OUT = 64, 1000, 100, 10
LSTM_H = 128  # the sequence workload's hidden size
LOOP = 500  # default iterations of each compiled loop (`--loop`)
FLAG_SETS = (
    "",
    "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_multi_thread_eigen=false",
)


def _median_spread(times: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
    }


def _time(fn: Callable[[], Any], repeats: int, per: int) -> dict[str, float]:
    """Seconds per iteration of `fn` (which runs `per` iterations), after a warm-up."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) / per)
    return _median_spread(times)


def _in_loop(
    matmul: Callable, a: jax.Array, b: jax.Array, loop: int
) -> Callable[[], Any]:
    """`matmul(a, b)` `loop` times in one compiled loop, each iteration depending on
    the last (so that XLA cannot hoist or drop it).

    The dependence is one element of `a`, updated in place in the loop's carry:
    an elementwise pass over a whole operand (`b + c`, as the first version
    did) costs several microseconds at these sizes, which the torch loop does
    not pay.
    """

    @jax.jit
    def looped(a, b):
        def body(a, _):
            r = matmul(a, b).sum()
            return a.at[0, 0].add(1e-30 * r), r

        return lax.scan(body, a, None, length=loop)[1]

    return lambda: looped(a, b)


def _matmuls(repeats: int, loop: int) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(keys[0], (N, D_IN))
    w1 = jax.random.normal(keys[1], (D_IN, H))
    g = jax.random.normal(keys[2], (N, H))
    wm = jax.random.normal(keys[3], (H, H))
    # The sequence workload's LSTM (batch 32, hidden 128; the core's stages
    # shrink the batch to 16 and 8 rows): one step's recurrent matmul forward
    # and backward, and the weight gradient over 80 steps at once.
    lk = jax.random.split(jax.random.key(3), 4)
    h32 = jax.random.normal(lk[0], (32, LSTM_H))
    w_hh = jax.random.normal(lk[1], (LSTM_H, 4 * LSTM_H))
    d32 = jax.random.normal(lk[2], (32, 4 * LSTM_H))
    h_all = jax.random.normal(lk[3], (80 * 32, LSTM_H))
    d_all = jnp.tile(d32, (80, 1))
    shapes: dict[str, tuple[Callable, jax.Array, jax.Array, int]] = {
        "input fwd x@W1": (jnp.matmul, x, w1, 2 * N * D_IN * H),
        "input wgrad x.T@g": (lambda a, b: a.T @ b, x, g, 2 * N * D_IN * H),
        "middle fwd h@Wm": (jnp.matmul, g, wm, 2 * N * H * H),
        "middle wgrad h.T@g": (lambda a, b: a.T @ b, g, g, 2 * N * H * H),
        "middle dgrad g@Wm.T": (lambda a, b: a @ b.T, g, wm, 2 * N * H * H),
    }
    for rows in (32, 16, 8):
        flops = 2 * rows * LSTM_H * 4 * LSTM_H
        shapes[f"lstm fwd h@Whh ({rows} rows)"] = (jnp.matmul, h32[:rows], w_hh, flops)
        shapes[f"lstm dgrad d@Whh.T ({rows} rows)"] = (
            lambda a, b: a @ b.T,
            d32[:rows],
            w_hh,
            flops,
        )
    shapes["lstm wgrad h.T@d (80 steps)"] = (
        lambda a, b: a.T @ b,
        h_all,
        d_all,
        2 * 80 * 32 * LSTM_H * 4 * LSTM_H,
    )
    out: dict[str, Any] = {}
    for name, (matmul, a, b, flops) in shapes.items():
        t = _time(_in_loop(matmul, a, b, loop), repeats, loop)
        out[name] = {"flops": flops, "xla": t}
    torch = _torch()
    if torch is None:
        return out
    tx, tw1, tg, twm = (torch.from_numpy(np.array(a)) for a in (x, w1, g, wm))
    calls = {
        "input fwd x@W1": lambda: tx @ tw1,
        "input wgrad x.T@g": lambda: tx.T @ tg,
        "middle fwd h@Wm": lambda: tg @ twm,
        "middle wgrad h.T@g": lambda: tg.T @ tg,
        "middle dgrad g@Wm.T": lambda: tg @ twm.T,
    }
    th, tw, td, tha, tda = (
        torch.from_numpy(np.array(a)) for a in (h32, w_hh, d32, h_all, d_all)
    )
    for rows in (32, 16, 8):
        calls[f"lstm fwd h@Whh ({rows} rows)"] = lambda r=rows: th[:r] @ tw
        calls[f"lstm dgrad d@Whh.T ({rows} rows)"] = lambda r=rows: td[:r] @ tw.T
    calls["lstm wgrad h.T@d (80 steps)"] = lambda: tha.T @ tda
    for name, call in calls.items():

        def many(call=call):
            for _ in range(loop):
                r = call()
            return r

        out[name]["torch"] = _time(many, repeats, loop)
    return out


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(_cores())
    return torch


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _data() -> tuple[jax.Array, jax.Array, Any]:
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (N, D_IN))
    y = jax.random.normal(ky, (N, D_OUT))
    params = fl.models.DynamicNet(D_IN, H, D_OUT).init(kp)
    return x, y, params


def plain_loss(p: Any, x: jax.Array, y: jax.Array, depth: int) -> jax.Array:
    """The reference loss in plain JAX (no functorch_lite), the depth unrolled."""

    def linear(layer, h):
        return h @ p[layer]["weight"] + p[layer]["bias"][None, :]

    h = jax.nn.relu(linear("input_linear", x))
    for _ in range(depth):
        h = jax.nn.relu(linear("middle_linear", h))
    out = linear("output_linear", h)
    return jnp.sum((out - y) ** 2)


def _plain_step(depth: int, opt: optax.GradientTransformation) -> Callable:
    """Plain JAX: one training step at a fixed, unrolled depth,
    `step(p, s, x, y) -> (p, s, loss)`."""

    def step(p, s, x, y):
        value, grads = jax.value_and_grad(plain_loss)(p, x, y, depth)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    return step


@jax.custom_vjp
def _minimal_loop(h: jax.Array, w: jax.Array, b: jax.Array, n: jax.Array) -> jax.Array:
    """`n` (traced, at most 3) layers `h = relu(h @ w + b)`: the least a bounded
    loop with its own reverse pass does, written by hand in plain JAX."""
    return _minimal_fwd(h, w, b, n)[0]


def _minimal_fwd(h, w, b, n):
    def body(state):
        i, h, inputs, masks = state
        z = h @ w + b[None, :]
        inputs = lax.dynamic_update_index_in_dim(inputs, h, i, 0)
        masks = lax.dynamic_update_index_in_dim(masks, z > 0, i, 0)
        return i + 1, jax.nn.relu(z), inputs, masks

    bufs = (jnp.zeros((3, *h.shape), h.dtype), jnp.zeros((3, *h.shape), bool))
    _, h, inputs, masks = lax.while_loop(
        lambda s: s[0] < n, body, (jnp.int32(0), h, *bufs)
    )
    return h, (inputs, masks, w, n)


def _minimal_bwd(res, g):
    inputs, masks, w, n = res

    def body(state):
        i, g, dw, db = state
        j = n - 1 - i
        h = lax.dynamic_index_in_dim(inputs, j, 0, keepdims=False)
        gz = jnp.where(lax.dynamic_index_in_dim(masks, j, 0, keepdims=False), g, 0)
        return i + 1, gz @ w.T, dw + h.T @ gz, db + gz.sum(0)

    init = (jnp.int32(0), g, jnp.zeros_like(w), jnp.zeros(w.shape[1], w.dtype))
    _, g, dw, db = lax.while_loop(lambda s: s[0] < n, body, init)
    return g, dw, db, None


_minimal_loop.defvjp(_minimal_fwd, _minimal_bwd)


def minimal_loss(p: Any, x: jax.Array, y: jax.Array, depth: jax.Array) -> jax.Array:
    """The reference loss in plain JAX with the middle layers in `_minimal_loop`."""

    def linear(layer, h):
        return h @ p[layer]["weight"] + p[layer]["bias"][None, :]

    h = jax.nn.relu(linear("input_linear", x))
    mid = p["middle_linear"]
    h = _minimal_loop(h, mid["weight"], mid["bias"], depth)
    return jnp.sum((linear("output_linear", h) - y) ** 2)


def _scan_call(depths: np.ndarray, value_and_grad: Callable) -> Callable[[], Any]:
    """Plain JAX, one program for every depth: each step
    `value_and_grad(p, x, y, depth)` and the optimizer update, in one `lax.scan`
    over the depths, fed as an array."""
    x, y, params = _data()
    opt = optax.sgd(LR, momentum=MOMENTUM)

    @jax.jit
    def train(p, s, x, y, ds):
        def body(carry, d):
            p, s = carry
            value, grads = value_and_grad(p, x, y, d)
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), value

        return lax.scan(body, (p, s), ds)

    state, d = opt.init(params), jnp.asarray(depths)
    return lambda: train(params, state, x, y, d)


def _minimal_call(depths: np.ndarray) -> Callable[[], Any]:
    """Each step `minimal_loss`'s gradient: the hand-written loop."""
    return _scan_call(depths, jax.value_and_grad(minimal_loss))


def _unrolled_call(depth: int, loop: int) -> Callable[[], Any]:
    """Plain JAX: `loop` steps at a fixed, unrolled depth in one `lax.scan`."""
    x, y, params = _data()
    opt = optax.sgd(LR, momentum=MOMENTUM)
    step = _plain_step(depth, opt)

    @jax.jit
    def train(p, s, x, y):
        def body(carry, _):
            p, s, value = step(*carry, x, y)
            return (p, s), value

        return lax.scan(body, (p, s), None, length=loop)

    state = opt.init(params)
    return lambda: train(params, state, x, y)


def _unrolled(depth: int, repeats: int, loop: int) -> dict[str, float]:
    return _time(_unrolled_call(depth, loop), repeats, loop)


def _switch_call(depths: np.ndarray) -> Callable[[], Any]:
    """Plain JAX, one program for every depth: each step a `lax.switch` over the
    four training steps specialized to depths 0..3 (the unrolled ones above)."""
    x, y, params = _data()
    opt = optax.sgd(LR, momentum=MOMENTUM)
    branches = [_plain_step(d, opt) for d in range(4)]

    @jax.jit
    def train(p, s, x, y, ds):
        def body(carry, d):
            p, s, value = lax.switch(d, branches, *carry, x, y)
            return (p, s), value

        return lax.scan(body, (p, s), ds)

    state, d = opt.init(params), jnp.asarray(depths)
    return lambda: train(params, state, x, y, d)


def _grad_switch_call(depths: np.ndarray) -> Callable[[], Any]:
    """No loop: each step a `lax.switch` over the four specialized gradients (the
    depth unrolled in each branch), the optimizer update outside the switch."""
    branches = [
        functools.partial(jax.value_and_grad(plain_loss), depth=d) for d in range(4)
    ]
    return _scan_call(depths, lambda p, x, y, d: lax.switch(d, branches, p, x, y))


def _fused_call(
    depths: np.ndarray,
    static_method: str = "bounded",
    residuals: bool = True,
    specialize: bool = False,
) -> Callable[[], Any]:
    """The library: one `make_fused_step` call over all `depths`, fed as an array.

    `residuals=False` traces the loop's reverse pass as it was before it
    stored each step's residuals: storing carries and recomputing each middle
    layer's forward (`functorch_lite/_loop.py`). `specialize=True`: no loop,
    `make_fused_step(..., specialize={"depth": 4})` over the dynamic path's
    straight-line programs.
    """
    x, y, params = _data()
    net = fl.models.DynamicNet(D_IN, H, D_OUT, static_method=static_method)
    opt = optax.sgd(LR, momentum=MOMENTUM)

    mode = "dynamic" if specialize else "static"

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth, mode=mode), y)

    fused = fl.train.make_fused_step(
        loss_fn,
        opt,
        shared_argnames=("x", "y"),
        donate=False,
        specialize={"depth": 4} if specialize else None,
    )
    state = opt.init(params)
    d = jnp.asarray(depths)
    _loop._STORE_RESIDUALS = residuals
    try:  # the flag is read when the step is traced: trace it now
        jax.block_until_ready(fused(params, state, x, y, d))
    finally:
        _loop._STORE_RESIDUALS = True
    return lambda: fused(params, state, x, y, d)


def _fused(depths: np.ndarray, repeats: int) -> dict[str, float]:
    return _time(_fused_call(depths), repeats, len(depths))


def _profile_ops(call: Callable[[], Any], steps: int, top: int) -> dict[str, Any]:
    """Run `call` (which runs `steps` training steps) twice under jax.profiler:
    the ops that take the most time per step (`_op_times.op_times`)."""
    jax.block_until_ready(call())

    def twice() -> Any:
        jax.block_until_ready(call())
        return call()

    totals = _op_times.op_times(twice, 2 * steps)
    kernels = sum(
        v[0] for k, v in totals.items() if not k.startswith(("while", "Slinky"))
    )
    return {
        "kernel_us_per_step": kernels,
        "ops": [
            {"name": k, "us_per_step": round(v[0], 3), "per_step": round(v[1], 3)}
            for k, v in _op_times.costliest(totals, top)
        ],
    }


def _profile(depths: list[int], loop: int, top: int = 25) -> dict[str, Any]:
    """The specialized program and the fused step at each constant depth, profiled."""
    out: dict[str, Any] = {}
    for depth in depths:
        out[f"unrolled@{depth}"] = _profile_ops(_unrolled_call(depth, loop), loop, top)
        fused = _fused_call(np.full(loop, depth, np.int32))
        out[f"fused@{depth}"] = _profile_ops(fused, loop, top)
    return out


def _interleaved(depths: np.ndarray, rounds: int) -> dict[str, Any]:
    """Target 1a, settled on a noisy machine: the specialized programs, the fused
    step and a `lax.switch` over specialized steps, timed in turn in every round.

    Each round times every program once (the order rotating) and takes the
    ratio of `fused` (and `switch`, and `fused-scan`: the fused step with
    `static_method="scan"`, whose reverse pass is JAX's own and stores the
    body's residuals through `lax.cond`, and `fused-recompute`: the fused
    step whose loop stores carries and recomputes each step in its reverse
    pass, and `minimal-loop`: plain JAX whose middle layers run in the least
    bounded loop with its own reverse pass, written by hand, `_minimal_loop`;
    `grad-switch`: no loop, a `lax.switch` over the specialized gradients;
    and `fused-specialized`: the library's `make_fused_step(...,
    specialize={"depth": 4})`, which builds that switch) to the specialized
    programs weighted by the depths' frequencies in that same round; drift between
    rounds cancels. Also `fused` and `minimal-loop` at each constant depth
    (`fused@d`, `minimal-loop@d`), against `unrolled@d`: what a step of the
    library's loop, and of any such loop, costs beyond the straight-line program.
    """
    loop = len(depths)
    freq = np.bincount(depths, minlength=4) / loop
    calls: dict[str, Callable[[], Any]] = {
        f"unrolled@{d}": _unrolled_call(d, loop) for d in range(4)
    }
    calls["fused"] = _fused_call(depths)
    calls["switch"] = _switch_call(depths)
    calls["fused-scan"] = _fused_call(depths, "scan")
    calls["fused-recompute"] = _fused_call(depths, residuals=False)
    calls["minimal-loop"] = _minimal_call(depths)
    calls["grad-switch"] = _grad_switch_call(depths)
    calls["fused-specialized"] = _fused_call(depths, specialize=True)
    for d in range(4):
        calls[f"fused@{d}"] = _fused_call(np.full(loop, d, np.int32))
    for d in range(4):
        calls[f"minimal-loop@{d}"] = _minimal_call(np.full(loop, d, np.int32))
    for call in calls.values():
        jax.block_until_ready(call())
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {
        n: []
        for n in (
            "fused",
            "switch",
            "fused-scan",
            "fused-recompute",
            "minimal-loop",
            "grad-switch",
            "fused-specialized",
        )
    }
    for r in range(rounds):
        row = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(calls[name]())
            row[name] = (time.perf_counter() - start) / loop
            times[name].append(row[name])
        weighted = sum(freq[d] * row[f"unrolled@{d}"] for d in range(4))
        for name in ratios:
            ratios[name].append(row[name] / weighted)
    return {
        "rounds": rounds,
        "depth_frequencies": freq.tolist(),
        "times": {n: _median_spread(t) for n, t in times.items()},
        "ratio_to_specialized": {n: _median_spread(r) for n, r in ratios.items()},
    }


def _torch_steps(depths: np.ndarray, repeats: int) -> dict[str, float] | None:
    if _torch() is None:
        return None
    from _torch_ref import TorchReference

    x, y, params = _data()
    ref = TorchReference(
        jax.tree.map(np.asarray, params),
        np.asarray(x),
        np.asarray(y),
        lr=LR,
        momentum=MOMENTUM,
    )
    seq = [int(d) for d in depths]

    def run():
        for d in seq:
            loss = ref.step(d)
        return float(loss)

    return _time(run, repeats, len(seq))


def _child(flags: str, repeats: int, loop: int) -> dict[str, Any]:
    """Measure the depth-0 unrolled step and `x @ W1` in a fresh process."""
    env = dict(os.environ, XLA_FLAGS=flags)
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import peak_gap as g; "
        "print(json.dumps(g._child_main(int(sys.argv[2]), int(sys.argv[3]))))"
    )
    here = str(Path(__file__).resolve().parent)
    proc = subprocess.run(
        [sys.executable, "-c", code, here, str(repeats), str(loop)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {"flags": flags, "error": proc.stderr.strip().splitlines()[-1:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["flags"] = flags
    return result


def _child_main(repeats: int, loop: int) -> dict[str, Any]:
    x = jax.random.normal(jax.random.key(0), (N, D_IN))
    w1 = jax.random.normal(jax.random.key(1), (D_IN, H))
    return {
        "x@W1": _time(_in_loop(jnp.matmul, x, w1, loop), repeats, loop)["median"],
        "step_depth0": _unrolled(0, repeats, loop)["median"],
        "step_depth3": _unrolled(3, repeats, loop)["median"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--loop", type=int, default=LOOP, help="steps (iterations) per compiled loop"
    )
    p.add_argument("--flags", action="store_true", help="sweep XLA CPU options")
    p.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time the specialized programs, the fused step and a switch "
        "over specialized steps in turn, ROUNDS rounds (target 1a)",
    )
    p.add_argument(
        "--profile",
        default="",
        metavar="DEPTHS",
        help="comma-separated depths: profile the specialized program and the "
        "fused step at each (the XLA ops that take the most time per step)",
    )
    _xla_threads.add_argument(p)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.loop < 1:
        raise SystemExit("--repeats and --loop must be >= 1.")
    _xla_threads.start(args.xla_threads)
    loop = args.loop

    device = jax.devices()[0]
    torch = _torch()
    env = _environment(
        device,
        {"version": getattr(torch, "__version__", None), "threads": _cores()},
    )
    depths = np.random.default_rng(0).integers(0, 4, size=loop).astype(np.int32)
    mean_depth = float(depths.mean())

    peak = _matmul_peak(2048, repeats=args.repeats)
    torch_peak = None
    if torch is not None:
        a = torch.randn(2048, 2048)
        t = _time(lambda: a @ a, args.repeats, 1)
        torch_peak = 2 * 2048**3 / t["median"] / 1e9
    print(f"matmul peak 2048 float32: XLA {peak['gflops']:.1f} GFLOP/s", end="")
    print(f", torch {torch_peak:.1f}" if torch_peak else "")

    matmuls = _matmuls(args.repeats, loop)
    head = f"{'XLA us':>8} {'GFLOP/s':>8} {'torch us':>9} {'GFLOP/s':>8}"
    print(f"\n{'matmul':30} {head}")
    for name, m in matmuls.items():
        xla = m["xla"]["median"]
        line = f"{name:30} {xla * 1e6:8.1f} {m['flops'] / xla / 1e9:8.1f}"
        if "torch" in m:
            tt = m["torch"]["median"]
            line += f" {tt * 1e6:9.1f} {m['flops'] / tt / 1e9:8.1f}"
        print(line)

    steps: dict[str, Any] = {}
    for depth in range(4):
        steps[f"plain-jax unrolled, depth {depth}"] = {
            "time": _unrolled(depth, args.repeats, loop),
            "flops": count_flops(N, D_IN, H, D_OUT, depth),
        }
    steps["functorch_lite fused (K=500, depths 0..3)"] = {
        "time": _fused(depths, args.repeats),
        "flops": count_flops(N, D_IN, H, D_OUT, mean_depth),
    }
    torch_steps = _torch_steps(depths, args.repeats)
    if torch_steps is not None:
        steps["torch eager (same depths)"] = {
            "time": torch_steps,
            "flops": count_flops(N, D_IN, H, D_OUT, mean_depth),
        }

    def best(name: str) -> float:
        m = matmuls[name]
        return min(m["xla"]["median"], m.get("torch", m["xla"])["median"])

    def matmul_only(depth: float) -> float:
        middle = (
            best("middle fwd h@Wm")
            + best("middle wgrad h.T@g")
            + best("middle dgrad g@Wm.T")
        )
        # The output layer's matmuls are 1% of the FLOPs; priced at the middle
        # layer's rate per FLOP.
        out_flops = count_flops(N, D_IN, H, D_OUT, 0) - 4 * N * D_IN * H
        out = middle * out_flops / (6 * N * H * H)
        return best("input fwd x@W1") + best("input wgrad x.T@g") + depth * middle + out

    print(f"\n{'step':44} {'us/step':>8} {'spread':>15} {'GFLOP/s':>8} {'% peak':>7}")
    for name, s in steps.items():
        t = s["time"]
        s["gflops"] = s["flops"] / t["median"] / 1e9
        s["peak_fraction"] = s["gflops"] / peak["gflops"]
        spread = f"[{t['min'] * 1e6:.0f}-{t['max'] * 1e6:.0f}]"
        print(
            f"{name:44} {t['median'] * 1e6:8.1f} {spread:>15} "
            f"{s['gflops']:8.1f} {100 * s['peak_fraction']:6.1f}%"
        )
    bound_time = matmul_only(mean_depth)
    bound_flops = count_flops(N, D_IN, H, D_OUT, mean_depth)
    bound = {
        "seconds": bound_time,
        "gflops": bound_flops / bound_time / 1e9,
        "peak_fraction": bound_flops / bound_time / 1e9 / peak["gflops"],
        "mean_depth": mean_depth,
    }
    print(
        f"\nbound (matmuls only, each at the best library's speed, mean depth "
        f"{mean_depth:.2f}): {bound_time * 1e6:.1f} us/step = "
        f"{bound['gflops']:.1f} GFLOP/s = {100 * bound['peak_fraction']:.1f}% of peak"
    )

    interleaved = None
    if args.interleaved:
        interleaved = _interleaved(depths, args.interleaved)
        print(f"\ninterleaved, {args.interleaved} rounds: us/step median [min-max]")
        for name, t in interleaved["times"].items():
            print(
                f"  {name:12} {t['median'] * 1e6:8.1f} "
                f"[{t['min'] * 1e6:.0f}-{t['max'] * 1e6:.0f}]"
            )
        for name, r in interleaved["ratio_to_specialized"].items():
            print(
                f"  {name} / specialized (weighted, per round): {r['median']:.3f} "
                f"[{r['min']:.3f}-{r['max']:.3f}]"
            )

    profile = None
    if args.profile:
        try:
            profile_depths = [int(d) for d in args.profile.split(",")]
        except ValueError:
            raise SystemExit(
                f"--profile takes depths like 0,1; got {args.profile!r}."
            ) from None
        profile = _profile(profile_depths, loop)
        for name, prof in profile.items():
            print(
                f"\nprofile {name}: {prof['kernel_us_per_step']:.1f} us/step in "
                "kernels (not while loops); the costliest ops, us/step (calls/step):"
            )
            for op in prof["ops"]:
                name, us, n = op["name"], op["us_per_step"], op["per_step"]
                print(f"  {name:44} {us:8.2f} ({n:g})")

    flag_results = []
    if args.flags:
        print(f"\n{'XLA_FLAGS':72} {'x@W1 us':>8} {'d0 us':>7} {'d3 us':>7}")
        for flags in FLAG_SETS:
            r = _child(flags, args.repeats, loop)
            flag_results.append(r)
            if "error" in r:
                print(f"{flags or '(default)':72} error: {r['error']}")
            else:
                print(
                    f"{flags or '(default)':72} {r['x@W1'] * 1e6:8.1f} "
                    f"{r['step_depth0'] * 1e6:7.1f} {r['step_depth3'] * 1e6:7.1f}"
                )

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"peak-gap-{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "schema": "functorch_lite/bench/peak_gap/1",
                "environment": env,
                "peak": peak,
                "torch_peak_gflops": torch_peak,
                "matmuls": matmuls,
                "steps": steps,
                "bound": bound,
                "flags": flag_results,
                "interleaved": interleaved,
                "profile": profile,
                "loop": loop,
                "repeats": args.repeats,
            },
            indent=2,
        )
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
