"""What does `fl.train.fit` cost over a bare Python loop of the same step?

Both run the same compiled `make_step` step over the same batches (the
reference DynamicNet with a traced depth 0..3, and a tiny net where the step
itself takes a few microseconds, so any per-step host work shows). Variants:

- `bare`: `for b in batches: params, opt_state, loss = step(params, opt_state, *b)`,
  then one `block_until_ready` at the end;
- `fit`: `fl.train.fit(step, ..., progress=False)` (losses read back every
  `log_every` = 50 steps, unguarded step);
- `fit-guarded`: a `guard=True` step under `fit` (it also keeps a copy of the
  state per 50-step window) against a bare loop of that guarded step;
- `fit-ckpt`: `fit` saving a checkpoint every 100 steps in the background.

Every variant runs `--steps` steps per repeat, interleaved with the others in
each repeat, from a copy of the same initial state. Reports the median time
per step, the spread (min-max) and the ratio to the bare loop of the same step.

    python bench/fit_overhead.py [--steps 500] [--repeats 7] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import functorch_lite as fl

BENCH = pathlib.Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from peers import protocol  # noqa: E402


def _setup(size: str, guard: bool):
    if size == "tiny":
        n, d_in, h, d_out = 2, 3, 4, 1
    else:  # the reference program
        n, d_in, h, d_out = 64, 1000, 100, 10
    net = fl.models.DynamicNet(d_in, h, d_out)
    opt = optax.sgd(1e-4, momentum=0.9)

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth), y, reduction="sum")

    step = fl.train.make_step(loss_fn, opt, guard=guard)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (n, d_in))
    y = jax.random.normal(ky, (n, d_out))
    params = net.init(kp)
    return step, params, opt.init(params), x, y


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _bare(step, params, opt_state, batches):
    loss = None
    for b in batches:
        params, opt_state, loss = step(params, opt_state, *b)
    jax.block_until_ready((params, loss))
    return params


def _fit(step, params, opt_state, batches, **kwargs):
    params, _, _ = fl.train.fit(
        step, params, opt_state, batches, progress=False, **kwargs
    )
    jax.block_until_ready(params)
    return params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", default="tiny,reference")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    depths = np.random.default_rng(0).integers(0, 4, size=args.steps)
    rows = []
    tmp = tempfile.TemporaryDirectory()
    for size in args.sizes.split(","):
        plain = _setup(size, guard=False)
        guarded = _setup(size, guard=True)
        runs = {}
        for name, (step, p0, s0, x, y) in (("", plain), ("-guarded", guarded)):
            batches = [(x, y, jnp.int32(d)) for d in depths]
            runs["bare" + name] = lambda st=step, p=p0, s=s0, b=batches: _bare(
                st, copy(p), copy(s), b
            )
            runs["fit" + name] = lambda st=step, p=p0, s=s0, b=batches: _fit(
                st, copy(p), copy(s), b
            )
            if not name:
                runs["fit-ckpt"] = lambda st=step, p=p0, s=s0, b=batches: _fit(
                    st,
                    copy(p),
                    copy(s),
                    b,
                    checkpoint_every=100,
                    checkpoint_dir=tmp.name,
                )
        for run in runs.values():  # compile and warm up
            run()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / args.steps * 1e6)
        print(f"{size}: {args.steps} steps, median us/step (min-max), ratio to bare")
        for name, ts in times.items():
            base = "bare-guarded" if name.endswith("guarded") else "bare"
            med = float(np.median(ts))
            ratio = med / float(np.median(times[base]))
            print(
                f"  {name:14s} {med:9.1f} ({min(ts):.1f}-{max(ts):.1f})  {ratio:5.2f}x"
            )
            rows.append(
                {
                    "size": size,
                    "variant": name,
                    "median_us": med,
                    "min_us": float(min(ts)),
                    "max_us": float(max(ts)),
                    "ratio_to_bare": ratio,
                }
            )
    tmp.cleanup()
    result = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    if args.out:
        protocol.write_result(args.out, "fit-overhead.json", result)
    return result


if __name__ == "__main__":
    main()
