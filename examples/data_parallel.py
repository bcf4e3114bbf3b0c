"""Train DynamicNet data parallel on every available device, one host or several.

The training program of `examples/dynamic_net.py` (summed MSE, SGD lr 1e-4
with momentum 0.9, a depth in 0..3 drawn per step), with one change: the step
is wrapped by `fl.parallel.data_parallel`. The batch of 64 rows is split over
the devices; params and optimizer state are replicated; the compiler sums the
gradients across devices. The loss is not touched.

One host (here 8 CPU devices stand in for 8 accelerators; on a GPU or TPU host
leave out `--cpu-devices` to use every accelerator):

    python examples/data_parallel.py --cpu-devices 8 [--mode static|dynamic]

Several hosts or processes: run one command per process, the same on each but
for `--process-id`; each process feeds its own rows of the batch:

    python examples/data_parallel.py --coordinator HOST0:1234 \
        --num-processes 2 --process-id I [--cpu-devices 4]

Checkpoints and restarts: `--checkpoint-dir DIR` trains with `fl.train.fit`,
saving every `--checkpoint-every` steps (one writer per folder: process 0 when
the processes share DIR, each process when each has its own), and `--resume`
continues from the newest step that every process can read. If a process
dies, the others stop within `--heartbeat` seconds with one line that names
it and the checkpoint to resume from (exit status 75); run the same commands
again with `--resume`:

    python examples/data_parallel.py --coordinator HOST0:1234 --num-processes 2 \
        --process-id I --checkpoint-dir run/ckpt [--resume]

`--check` also trains the plain single-device step and prints how far apart
the two final losses are. The programs compute the same function, but the
devices sum the gradient in another order, and 500 float32 steps of this
training amplify that rounding to about 1e-2 in the final loss (1e-6 after 100
steps). With `--x64` (float64 throughout) they agree to about 1e-14.
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
    parser.add_argument("--mode", choices=("static", "dynamic"), default="static")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-every", type=int, default=50)
    parser.add_argument("--cpu-devices", type=int, default=None)
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--x64", action="store_true", help="train in float64")
    parser.add_argument(
        "--checkpoint-dir", default=None, help="train with fit, saving here"
    )
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument(
        "--resume", action="store_true", help="resume from --checkpoint-dir"
    )
    parser.add_argument("--heartbeat", type=float, default=30.0, help="seconds")
    args = parser.parse_args(argv)

    # Both must come before anything touches a device.
    if args.coordinator is not None:
        fl.parallel.initialize(
            args.coordinator,
            args.num_processes,
            args.process_id,
            cpu_devices=args.cpu_devices,
            heartbeat_timeout_s=args.heartbeat,
        )
    elif args.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = np.float64 if args.x64 else np.float32
    lead = jax.process_index() == 0

    # Every process draws the same global batch and keeps its own rows.
    key_x, key_y, key_params = jax.random.split(jax.random.key(args.seed), 3)
    x = np.asarray(jax.random.normal(key_x, (N, D_IN), np.float32), dtype)
    y = np.asarray(jax.random.normal(key_y, (N, D_OUT), np.float32), dtype)
    rows = N // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)

    net = fl.models.DynamicNet(D_IN, H, D_OUT, max_depth=args.max_depth)

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth, mode=args.mode), y)

    optimizer = optax.sgd(1e-4, momentum=0.9)
    static = ("depth",) if args.mode == "dynamic" else ()

    def make_step():
        return fl.train.make_step(loss_fn, optimizer, static_argnames=static)

    def init():
        return jax.tree.map(lambda a: np.asarray(a, dtype), net.init(key_params))

    step = fl.parallel.data_parallel(make_step())
    params = init()
    opt_state = optimizer.init(params)
    # Place the data once; each step then reads it where it lies.
    (params, opt_state, x_dev, y_dev, _), _ = step.place(
        params, opt_state, x[mine], y[mine], 0
    )
    if lead:
        print(
            f"{jax.device_count()} devices in {jax.process_count()} process(es), "
            f"mesh {dict(step.mesh.shape)}; x {x_dev.shape} split as "
            f"{x_dev.sharding.spec}, {x_dev.addressable_shards[0].data.shape} "
            "per device"
        )

    # The same depths on every process: in the dynamic path they pick the program.
    rng = np.random.default_rng(args.seed)
    depths = rng.integers(0, args.max_depth + 1, size=args.steps).tolist()
    losses = []
    if args.checkpoint_dir is not None:
        # `fit` checkpoints in the background and, with --resume, skips the
        # batches before the step every process resumes from.
        params, opt_state, history = fl.train.fit(
            step,
            params,
            opt_state,
            [(x_dev, y_dev, depth) for depth in depths],
            progress=lead and bool(args.print_every),
            log_every=args.print_every or 50,
            checkpoint_every=args.checkpoint_every,
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
        )
        losses = [float(v) for v in history]
        if lead:
            print(f"ran steps {args.steps - len(losses)}..{args.steps - 1} in this run")
    for t, depth in enumerate(depths if args.checkpoint_dir is None else []):
        params, opt_state, loss = step(params, opt_state, x_dev, y_dev, depth)
        losses.append(float(loss))
        if (
            lead
            and args.print_every
            and (t % args.print_every == 0 or t == args.steps - 1)
        ):
            print(f"step {t:4d}  depth {depth}  loss {losses[-1]:.6f}")
    if lead:
        print(
            f"mode {args.mode}: compiles {step.stats.compiles} "
            f"(distinct depths seen: {len(set(depths))})"
        )
    result = {
        "losses": np.array(losses),
        "compiles": step.stats.compiles,
        "devices": jax.device_count(),
        "params_sharding": str(params["middle_linear"]["weight"].sharding.spec),
    }

    if args.check:
        one = make_step()
        ref_params = init()
        ref_state = optimizer.init(ref_params)
        for depth in depths:
            ref_params, ref_state, ref_loss = one(ref_params, ref_state, x, y, depth)
        rel = abs(losses[-1] - float(ref_loss)) / abs(float(ref_loss))
        result["relative_difference"] = rel
        if lead:
            print(
                f"one device: final loss {float(ref_loss):.6f}; relative "
                f"difference {rel:.2e}"
            )
    return result


if __name__ == "__main__":
    main()
