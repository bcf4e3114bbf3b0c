"""Shared problems for the data-parallel tests, and their multi-process worker.

Not collected by pytest. `test_parallel.py` starts two of these, each with 4
CPU devices, joined by `jax.distributed.initialize` on 127.0.0.1:

    python tests/_parallel_worker.py --process-id 0 --num-processes 2 \
        --port 12345 --out DIR

Each process feeds its own rows of the global batch, trains `STEPS` steps per
scenario, and writes the final params and losses to `DIR/process<i>.npz`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax
import numpy as np
import optax

import functorch_lite as fl

D_IN, D_HIDDEN, D_OUT, MAX_DEPTH = 4, 8, 2, 3
STEPS = 20
LEARNING_RATE = {"sum": 2e-3, "mean": 2e-2}
# name: (mode, global batch size); 10 rows over 2 processes x 4 devices pads.
SCENARIOS = {
    "static": ("static", 16),
    "dynamic": ("dynamic", 16),
    "static_padded": ("static", 10),
}
# The depths each path draws from: every depth for the static path (one
# compile), two for the dynamic path (two compiles, to keep the test short).
DEPTHS = {"static": (0, 1, 2, 3), "dynamic": (1, 3)}


def problem(
    mode: str,
    n: int,
    *,
    reduction: str = "sum",
    steps: int = STEPS,
    depths: tuple[int, ...] = tuple(range(MAX_DEPTH + 1)),
) -> dict:
    """Build one deterministic training problem: model, loss, step factory, data.

    The depth of each step is drawn from `depths` (fewer distinct depths, fewer
    compiles in the dynamic path).
    """
    net = fl.models.DynamicNet(D_IN, D_HIDDEN, D_OUT, max_depth=MAX_DEPTH)

    def loss_fn(params: Any, x: jax.Array, y: jax.Array, depth: Any) -> jax.Array:
        pred = net.apply(params, x, depth, mode=mode)
        return fl.nn.mse_loss(pred, y, reduction=reduction)

    optimizer = optax.sgd(LEARNING_RATE[reduction], momentum=0.9)
    static = ("depth",) if mode == "dynamic" else ()
    rng = np.random.default_rng(1234)
    return {
        "net": net,
        "optimizer": optimizer,
        "make_step": lambda: fl.train.make_step(
            loss_fn, optimizer, static_argnames=static
        ),
        "x": rng.normal(size=(n, D_IN)).astype(np.float32),
        "y": rng.normal(size=(n, D_OUT)).astype(np.float32),
        "depths": [int(d) for d in rng.choice(depths, size=steps)],
    }


def train(step: Any, prob: dict, x: Any, y: Any, steps: int) -> tuple[Any, list]:
    """Run `steps` steps from the problem's initial params; return params, losses."""
    params = prob["net"].init(jax.random.key(0))
    opt_state = prob["optimizer"].init(params)
    losses = []
    for depth in prob["depths"][:steps]:
        params, opt_state, loss = step(params, opt_state, x, y, depth)
        losses.append(loss)
    return params, losses


def process_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every worker process of the multi-process tests takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = process_parser(__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, default=4)
    args = parser.parse_args(argv)

    fl.parallel.initialize(
        f"127.0.0.1:{args.port}",
        args.num_processes,
        args.process_id,
        cpu_devices=args.cpu_devices,
    )
    # The strictness of tests/conftest.py.
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")

    arrays: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
    }
    for name, (mode, n) in SCENARIOS.items():
        prob = problem(mode, n, depths=DEPTHS[mode])
        dp = fl.parallel.data_parallel(prob["make_step"](), pad=True)
        rows = n // args.num_processes
        mine = slice(args.process_id * rows, (args.process_id + 1) * rows)
        params, losses = train(dp, prob, prob["x"][mine], prob["y"][mine], STEPS)
        for i, leaf in enumerate(jax.tree.leaves(params)):
            # Replicated on every device: this process's copy is the value.
            arrays[f"{name}/{i}"] = np.asarray(leaf.addressable_data(0))
        arrays[f"{name}/losses"] = np.array([float(loss) for loss in losses])
        leaf = jax.tree.leaves(params)[0]
        info[name] = {
            "compiles": dp.stats.compiles,
            "params_spec": str(leaf.sharding.spec),
            "params_devices": len(leaf.sharding.device_set),
            "fully_addressable": leaf.is_fully_addressable,
        }
    np.savez(os.path.join(args.out, f"process{args.process_id}.npz"), **arrays)
    with open(os.path.join(args.out, f"process{args.process_id}.json"), "w") as f:
        json.dump(info, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
