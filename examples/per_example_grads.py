"""Per-example gradients of `DynamicNet` with `vmap(grad(...))`, checked against a loop.

`fl.transforms.vmap(fl.transforms.grad(loss), in_dims=(None, 0, 0, None))`
computes one gradient per example in a single compiled call: `params` and
`depth` are shared (`None`), `x` and `y` are mapped over their first axis. A
Python loop of single-example gradients gives the same numbers, one call per
example; the script prints the largest difference and both timings.

    python examples/per_example_grads.py [--mode static|dynamic] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import functorch_lite as fl


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("static", "dynamic"), default="static")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--d-in", type=int, default=1000)
    parser.add_argument("--d-hidden", type=int, default=100)
    parser.add_argument("--d-out", type=int, default=10)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    key_x, key_y, key_params = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(key_x, (args.batch, args.d_in))
    y = jax.random.normal(key_y, (args.batch, args.d_out))
    net = fl.models.DynamicNet(
        args.d_in, args.d_hidden, args.d_out, max_depth=args.max_depth
    )
    params = net.init(key_params)

    def loss(params, x, y, depth):
        """Summed squared error of one example: `x` (d_in,), `y` (d_out,)."""
        return fl.nn.mse_loss(net.apply(params, x, depth, mode=args.mode), y)

    # The dynamic path needs a concrete depth: make it static under jit.
    static = ("depth",) if args.mode == "dynamic" else ()
    per_example = jax.jit(
        fl.transforms.vmap(fl.transforms.grad(loss), in_dims=(None, 0, 0, None)),
        static_argnames=static,
    )
    single = jax.jit(fl.transforms.grad(loss), static_argnames=static)

    start = time.perf_counter()
    batched = jax.block_until_ready(per_example(params, x, y, args.depth))
    vmap_seconds = time.perf_counter() - start

    start = time.perf_counter()
    looped = [single(params, x[i], y[i], args.depth) for i in range(args.batch)]
    looped = jax.block_until_ready(fl.transforms.stack_params(looped))
    loop_seconds = time.perf_counter() - start

    max_diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(looped), strict=True)
    )
    max_grad = max(
        float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(batched)
    )
    for name, layer in batched.items():
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in layer.items())
        print(f"{name:14s} {shapes}")
    print(
        f"mode {args.mode}, depth {args.depth}: vmap(grad) {vmap_seconds:.3f} s "
        f"(with compile), loop of {args.batch} grads {loop_seconds:.3f} s "
        "(with compile)"
    )
    print(
        f"max |vmap - loop| = {max_diff:.3e}  (largest gradient entry {max_grad:.3e})"
    )
    return {"grads": batched, "max_diff": max_diff, "max_grad": max_grad}


if __name__ == "__main__":
    main()
