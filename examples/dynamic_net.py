"""The PyTorch dynamic-graph program (`DynamicNet`), written with functorch_lite.

Each forward pass draws a depth in 0..3 and applies the same middle layer that
many times (control flow plus weight sharing); training uses summed MSE and SGD
with momentum (lr 1e-4, momentum 0.9).

`--mode static` compiles one graph whose loop takes the depth as a traced value:
1 compile. `--mode dynamic` runs a Python loop over a concrete depth: one
compile per distinct depth, each cached.

    python examples/dynamic_net.py --mode static|dynamic [--steps 500]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from tqdm import tqdm

import functorch_lite as fl

N, D_IN, H, D_OUT = 64, 1000, 100, 10


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("static", "dynamic"), default="static")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-every", type=int, default=50)
    args = parser.parse_args(argv)

    key_x, key_y, key_params = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(key_x, (N, D_IN))
    y = jax.random.normal(key_y, (N, D_OUT))

    net = fl.models.DynamicNet(D_IN, H, D_OUT, max_depth=args.max_depth)
    params = net.init(key_params)

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth, mode=args.mode), y)

    optimizer = optax.sgd(1e-4, momentum=0.9)
    opt_state = optimizer.init(params)
    # The dynamic path retraces per depth, so depth is a static argument there;
    # the static path traces it once as an int32.
    static = ("depth",) if args.mode == "dynamic" else ()
    step = fl.train.make_step(loss_fn, optimizer, static_argnames=static)

    rng = np.random.default_rng(args.seed)
    depths = rng.integers(0, args.max_depth + 1, size=args.steps)
    losses = []
    # A progress bar on a terminal (stderr), nothing otherwise (disable=None).
    for t, depth in enumerate(tqdm(depths, desc=args.mode, disable=None, leave=False)):
        params, opt_state, loss = step(params, opt_state, x, y, int(depth))
        losses.append(float(loss))
        if args.print_every and (t % args.print_every == 0 or t == args.steps - 1):
            tqdm.write(f"step {t:4d}  depth {depth}  loss {losses[-1]:.6f}")
    distinct = len(set(depths.tolist()))
    print(
        f"mode {args.mode}: compiles: {step.stats.compiles} "
        f"(distinct depths seen: {distinct})"
    )
    return {
        "losses": np.array(losses),
        "depths": depths,
        "compiles": step.stats.compiles,
        "distinct_depths": distinct,
    }


if __name__ == "__main__":
    main()
