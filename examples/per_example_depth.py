"""The reference DynamicNet where each example draws its own depth in 0..3.

"For some models we may wish to perform different computation for each data
point": here every row of the batch runs the shared middle layer its own number
of times. Both paths train the same model from the same weights, data and
depths (summed MSE, SGD lr 1e-4, momentum 0.9):

* static: `net.apply(params, x, depths)` with `depths` an int array `(N,)`; one
  compiled step serves every depth pattern.
* dynamic: define-by-run. The rows are grouped by their concrete depth on the
  host; each distinct depth's rows run a Python loop of that length, one
  compiled program per distinct depth (not per pattern), and the groups'
  gradients are summed before the optimizer step.

It prints the compile counts, the loss curve of both paths and the time per
step against the batch-level-depth program (one depth for the whole batch).

    python examples/per_example_depth.py [--steps 500]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import functorch_lite as fl

N, D_IN, H, D_OUT = 64, 1000, 100, 10


def _fresh(tree):
    """A copy, since `make_step` donates (consumes) the params it is given."""
    return jax.tree.map(jnp.copy, tree)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-every", type=int, default=100)
    args = parser.parse_args(argv)

    key_x, key_y, key_params = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(key_x, (N, D_IN))
    y = jax.random.normal(key_y, (N, D_OUT))
    net = fl.models.DynamicNet(D_IN, H, D_OUT, max_depth=args.max_depth)
    params0 = net.init(key_params)
    optimizer = optax.sgd(1e-4, momentum=0.9)
    rng = np.random.default_rng(args.seed)
    depths = rng.integers(0, args.max_depth + 1, size=(args.steps, N))

    # Static path: one compiled step for every depth pattern.
    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth), y)

    step = fl.train.make_step(loss_fn, optimizer)
    params = _fresh(params0)
    opt_state = optimizer.init(params)
    static_losses = []
    for t in tqdm(range(args.steps), desc="static", disable=None, leave=False):
        if t == 1:  # time the steps after the first (compiling) one
            start = time.perf_counter()
        params, opt_state, loss = step(
            params, opt_state, x, y, jnp.asarray(depths[t], jnp.int32)
        )
        static_losses.append(float(loss))
    static_time = (time.perf_counter() - start) / max(1, args.steps - 1)

    # Dynamic path: group rows by their concrete depth, one program per depth.
    @functools.partial(jax.jit, static_argnames="depth")
    def group_grad(params, x, y, rows, depth):
        def group_loss(p):
            out = net.apply(p, x, depth, mode="dynamic")
            return fl.nn.mse_loss(out, y, mask=rows)

        return jax.value_and_grad(group_loss)(params)

    @jax.jit
    def apply_update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = _fresh(params0)
    opt_state = optimizer.init(params)
    dynamic_losses = []
    start = time.perf_counter()  # includes its compiles: one per new depth
    for t in tqdm(range(args.steps), desc="dynamic", disable=None, leave=False):
        loss, grads = 0.0, None
        for depth in np.unique(depths[t]):
            rows = jnp.asarray(depths[t] == depth, jnp.float32)
            group_loss, group_grads = group_grad(params, x, y, rows, int(depth))
            loss = loss + group_loss
            grads = (
                group_grads
                if grads is None
                else jax.tree.map(jnp.add, grads, group_grads)
            )
        params, opt_state = apply_update(params, opt_state, grads)
        dynamic_losses.append(float(loss))
    dynamic_time = (time.perf_counter() - start) / args.steps
    dynamic_programs = group_grad._cache_size()

    # The batch-level-depth program: one depth for the whole batch.
    batch_step = fl.train.make_step(loss_fn, optimizer)
    batch_depths = rng.integers(0, args.max_depth + 1, size=args.steps)
    p = _fresh(params0)
    s = optimizer.init(p)
    p, s, _ = batch_step(p, s, x, y, int(batch_depths[0]))
    jax.block_until_ready(p)
    start = time.perf_counter()
    for t in range(args.steps):
        p, s, loss = batch_step(p, s, x, y, int(batch_depths[t]))
    jax.block_until_ready(p)
    batch_time = (time.perf_counter() - start) / args.steps

    for t in range(0, args.steps, args.print_every or args.steps):
        print(
            f"step {t:4d}  loss static {static_losses[t]:12.4f}  "
            f"dynamic {dynamic_losses[t]:12.4f}"
        )
    gap = float(
        np.max(
            np.abs(np.subtract(static_losses, dynamic_losses)) / np.abs(dynamic_losses)
        )
    )
    print(f"largest relative gap between the two loss curves: {gap:.2e}")
    print(
        f"static: {step.stats.compiles} compile(s) for {args.steps} depth patterns, "
        f"{static_time * 1e3:.2f} ms/step"
    )
    print(
        f"dynamic: {dynamic_programs} gradient programs (one per distinct depth), "
        f"{dynamic_time * 1e3:.2f} ms/step"
    )
    print(
        f"batch-level depth (static): {batch_time * 1e3:.2f} ms/step; per-example "
        f"static / batch-level = {static_time / batch_time:.2f}"
    )
    return {
        "static_losses": np.array(static_losses),
        "dynamic_losses": np.array(dynamic_losses),
        "static_compiles": step.stats.compiles,
        "dynamic_programs": dynamic_programs,
        "times": {"static": static_time, "dynamic": dynamic_time, "batch": batch_time},
    }


if __name__ == "__main__":
    main()
