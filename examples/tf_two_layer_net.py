"""The TensorFlow 1 static-graph program, written with functorch_lite.

TensorFlow 1 builds a graph once (placeholders for x and y, variables w1 and w2,
`tf.gradients`, an in-graph `assign` update) and runs it 500 times with
`feed_dict`. Here the graph is one compiled step: x and y are arguments (the
placeholders), params come from `init(key)` (the variables), the update is
applied to donated buffers (the `assign`), and calling the step is
`Session.run`. It compiles exactly once.

    python examples/tf_two_layer_net.py [--steps 500]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

import functorch_lite as fl

N, D_IN, H, D_OUT = 64, 1000, 100, 10


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-every", type=int, default=50)
    args = parser.parse_args(argv)

    key_x, key_y, key_params = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(key_x, (N, D_IN))  # fed on every step, like feed_dict
    y = jax.random.normal(key_y, (N, D_OUT))

    net = fl.models.TwoLayerNet(D_IN, H, D_OUT)
    params = net.init(key_params)  # w1, w2 ~ N(0, 1)
    initial_params = jax.tree.map(np.asarray, params)

    def loss_fn(params, x, y):
        return fl.nn.mse_loss(net.apply(params, x), y, reduction="sum")

    optimizer = optax.sgd(1e-6)  # plain gradient descent
    opt_state = optimizer.init(params)
    step = fl.train.make_step(loss_fn, optimizer)  # the graph, built once

    losses = []
    for t in range(args.steps):
        params, opt_state, loss = step(params, opt_state, x, y)  # Session.run
        losses.append(float(loss))
        if args.print_every and (t % args.print_every == 0 or t == args.steps - 1):
            print(f"step {t:4d}  loss {losses[-1]:.6e}")
    print(f"compiles: {step.stats.compiles}")
    return {
        "losses": np.array(losses),
        "compiles": step.stats.compiles,
        "x": np.asarray(x),
        "y": np.asarray(y),
        "initial_params": initial_params,
    }


if __name__ == "__main__":
    main()
