"""Train an ensemble of `DynamicNet`s at once: `vmap` over stacked params, one compile.

`fl.transforms.stack_params` stacks the members' params along a new axis 0;
`fl.transforms.vmap` runs every member's loss in one call, each member with
its own depth. The step minimizes the sum of the members' losses: a member's
params affect only its own loss, so each member gets exactly the gradient
(and, as SGD is elementwise, the update) it would get trained alone. The
static path takes the depths as a traced `(members,)` int32 array, so one
compile serves every step.

    python examples/ensemble.py [--members 8] [--steps 200] [--check]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import functorch_lite as fl


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--d-in", type=int, default=1000)
    parser.add_argument("--d-hidden", type=int, default=100)
    parser.add_argument("--d-out", type=int, default=10)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--check",
        action="store_true",
        help="also train member 0 alone and compare it with its ensemble copy",
    )
    args = parser.parse_args(argv)

    key_x, key_y, key_params = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(key_x, (args.batch, args.d_in))
    y = jax.random.normal(key_y, (args.batch, args.d_out))
    net = fl.models.DynamicNet(
        args.d_in, args.d_hidden, args.d_out, max_depth=args.max_depth
    )
    members = [net.init(k) for k in jax.random.split(key_params, args.members)]
    params = fl.transforms.stack_params(members)
    # Each member draws its own depth at every step.
    rng = np.random.default_rng(args.seed)
    depths = rng.integers(0, args.max_depth + 1, size=(args.steps, args.members))

    def member_loss(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth, mode="static"), y)

    # Members are mapped; the data is shared; each member has its own depth.
    member_losses = fl.transforms.vmap(member_loss, in_dims=(0, None, None, 0))

    def loss_fn(params, x, y, depths):
        return jnp.sum(member_losses(params, x, y, depths))

    optimizer = optax.sgd(args.lr, momentum=0.9)
    step = fl.train.make_step(loss_fn, optimizer)
    evaluate = jax.jit(member_losses)

    all_depth = jnp.full((args.members,), args.max_depth, jnp.int32)
    initial = np.asarray(evaluate(params, x, y, all_depth))
    opt_state = optimizer.init(params)
    totals = []
    for t in tqdm(range(args.steps), desc="ensemble", disable=None, leave=False):
        # make_step donates params and opt_state: keep only the returned ones.
        params, opt_state, loss = step(
            params, opt_state, x, y, jnp.asarray(depths[t], jnp.int32)
        )
        totals.append(loss)
    totals = np.asarray(jax.device_get(totals), np.float64)
    final = np.asarray(evaluate(params, x, y, all_depth))

    print(f"{args.members} members, {args.steps} steps, each with its own depths")
    print(f"loss at depth {args.max_depth}, before -> after training:")
    for i, (a, b) in enumerate(zip(initial, final, strict=True)):
        print(f"  member {i}: {a:12.4f} -> {b:12.4f}")
    print(f"compiles of the ensemble step: {step.stats.compiles}")
    out = {
        "initial_losses": initial,
        "final_losses": final,
        "total_losses": totals,
        "compiles": step.stats.compiles,
    }

    if args.check:
        alone = fl.train.make_step(member_loss, optimizer)
        p0 = members[0]
        s0 = optimizer.init(p0)
        for t in range(args.steps):
            p0, s0, _ = alone(p0, s0, x, y, jnp.int32(depths[t, 0]))
        diff = max(
            float(jnp.max(jnp.abs(a[0] - b)))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p0), strict=True)
        )
        print(f"member 0 trained alone vs in the ensemble: max |diff| = {diff:.3e}")
        out["alone_max_diff"] = diff
    return out


if __name__ == "__main__":
    main()
