"""Does the static loop do the work of the unrolled loop? Gradient time vs max_n.

One gradient of `repeat(lambda h: tanh(h @ W), h0, n, max_n=...)` with a
(256, 128) float32 carry, for n=2 and growing max_n, against the same loop
unrolled in Python (n fixed at trace time). A static loop whose cost followed
max_n instead of n would show it here (the previous core took 122 ms at
max_n=1024 against 0.7 ms unrolled). Then the cost of a checkpointed
`while_loop`'s gradient (`checkpoints=k`) against storing every carry.
Prints the tables and writes JSON.

    python bench/loop_cost.py [--repeats 7] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import functorch_lite as fl

BENCH = pathlib.Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from peers import protocol  # noqa: E402


def _median_ms(fn, args, repeats: int, inner: int = 20) -> tuple[float, float, float]:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner * 1e3)
    return float(np.median(times)), float(min(times)), float(max(times))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-n", default="8,64,1024")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    w = jax.random.normal(jax.random.key(0), (128, 128)) * 0.05
    h0 = jax.random.normal(jax.random.key(1), (256, 128))
    n = args.n

    def unrolled(w, h0):
        h = h0
        for _ in range(n):
            h = jnp.tanh(h @ w)
        return jnp.sum(h**2)

    rows = [
        (
            "unrolled",
            None,
            _median_ms(jax.jit(jax.grad(unrolled)), (w, h0), args.repeats),
        )
    ]
    for max_n in (int(m) for m in args.max_n.split(",")):
        for method in ("bounded", "scan"):

            def looped(w, h0, k, max_n=max_n, method=method):
                body = lambda h: jnp.tanh(h @ w)  # noqa: E731
                out = fl.repeat(body, h0, k, max_n=max_n, static_method=method)
                return jnp.sum(out**2)

            fn = jax.jit(jax.grad(looped))
            rows.append(
                (method, max_n, _median_ms(fn, (w, h0, jnp.int32(n)), args.repeats))
            )
    base = rows[0][2][0]
    print(
        f"gradient of a {n}-step loop, (256, 128) carry; "
        "median ms (min-max), ratio to unrolled"
    )
    for name, max_n, (med, lo, hi) in rows:
        label = name if max_n is None else f"{name} max_n={max_n}"
        print(f"  {label:24s} {med:8.3f} ({lo:.3f}-{hi:.3f})  {med / base:6.2f}x")
    checkpointed = _checkpoint_cost(w, h0, args.repeats)
    result = {
        "checkpoints": checkpointed,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "n": n,
        "rows": [
            {
                "strategy": name,
                "max_n": max_n,
                "median_ms": med,
                "min_ms": lo,
                "max_ms": hi,
            }
            for name, max_n, (med, lo, hi) in rows
        ],
    }
    if args.out:
        protocol.write_result(args.out, "loop-cost.json", result)
    return result


def _checkpoint_cost(w: jax.Array, h0: jax.Array, repeats: int) -> list[dict]:
    """Gradient of a 256-step `while_loop`, every carry stored or k kept.

    `checkpoints=k` keeps at most k carries and replays each segment in the
    backward pass; k = 16 = sqrt(256) is the memory-optimal choice. Prints the
    time against storing every carry (`checkpoints=None`).
    """
    max_steps = 256

    def loss(w, h0, checkpoints):
        out, _ = fl.while_loop(
            lambda c: c[1] < max_steps,
            lambda c: (jnp.tanh(c[0] @ w), c[1] + 1),
            (h0, jnp.int32(0)),
            max_steps=max_steps,
            checkpoints=checkpoints,
        )
        return jnp.sum(out**2)

    rows = []
    for k in (None, 16, 4):
        fn = jax.jit(jax.grad(lambda w, h0, k=k: loss(w, h0, k)))
        rows.append((k, _median_ms(fn, (w, h0), repeats, inner=5)))
    base = rows[0][1][0]
    print(f"gradient of a {max_steps}-step while_loop, (256, 128) carry; median ms")
    for k, (med, lo, hi) in rows:
        label = "every carry stored" if k is None else f"checkpoints={k}"
        print(f"  {label:24s} {med:8.3f} ({lo:.3f}-{hi:.3f})  {med / base:6.2f}x")
    return [
        {"checkpoints": k, "median_ms": med, "min_ms": lo, "max_ms": hi}
        for k, (med, lo, hi) in rows
    ]


if __name__ == "__main__":
    main()
