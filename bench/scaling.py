"""Scaling table: the data-parallel DynamicNet step on 1, 2, 4 and 8 devices.

Trains the reference DynamicNet (N=64, D_in=1000, H=100, D_out=10, summed MSE,
SGD lr 1e-4 momentum 0.9, a depth in 0..3 drawn per step) with
`fl.parallel.data_parallel` over the first k devices, for k in `--devices`, in
the static and the dynamic path, next to the plain single-device step.

On a CPU host the devices are host devices (`jax_num_cpu_devices`) that share
the same cores: the table shows that the results agree and what splitting
costs, not a speed-up.

    python bench/scaling.py [--steps 200] [--repeats 3] [--devices 1 2 4 8]
        [--out bench/results]

How each figure is measured:

* first call: one fresh step function's first call (trace, compile, one step).
* compiles: the step's own accounting (`stats.compiles`) after every call.
* steps/s: `--repeats` timed runs of `--steps` steps, each from the same
  initial params with the data already placed, ending in `block_until_ready`;
  the best run. ms/step is its inverse.
* loss diffs: the largest relative difference between the run's per-step
  losses and the plain step's, over the same depth sequence: over the first 20
  steps (float32 rounding) and over all (that rounding, amplified by training).

Writes `scaling.json` and `scaling.md` to `--out` (the default, `bench/results`,
holds the recorded run that RESULTS.md quotes: pass another `--out` to keep it);
`run()` returns the same dict and `markdown()` renders it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import optax

import functorch_lite as fl

N, D_IN, H, D_OUT, MAX_DEPTH = 64, 1000, 100, 10, 3
DEVICES = (1, 2, 4, 8)
MODES = ("static", "dynamic")
# Steps over which the losses must agree to float32 rounding; later, training
# amplifies that rounding (in float64 the paths agree to 1e-14 after 500 steps).
EARLY = 20


def _problem(mode: str, steps: int, seed: int) -> dict:
    key_x, key_y, key_params = jax.random.split(jax.random.key(seed), 3)
    net = fl.models.DynamicNet(D_IN, H, D_OUT, max_depth=MAX_DEPTH)
    optimizer = optax.sgd(1e-4, momentum=0.9)

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth, mode=mode), y)

    static = ("depth",) if mode == "dynamic" else ()
    depths = np.random.default_rng(seed).integers(0, MAX_DEPTH + 1, size=steps)
    return {
        "make_step": lambda: fl.train.make_step(
            loss_fn, optimizer, static_argnames=static
        ),
        "init": lambda: net.init(key_params),
        "optimizer": optimizer,
        "x": np.asarray(jax.random.normal(key_x, (N, D_IN), np.float32)),
        "y": np.asarray(jax.random.normal(key_y, (N, D_OUT), np.float32)),
        "depths": [int(d) for d in depths],
    }


def _measure(prob: dict, devices: int | None, repeats: int) -> dict:
    """Time one configuration; `devices=None` is the plain, unwrapped step."""
    step = prob["make_step"]()
    if devices is not None:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))
        step = fl.parallel.data_parallel(step, mesh=mesh)

    def start() -> tuple:
        params = prob["init"]()
        opt_state = prob["optimizer"].init(params)
        if devices is None:
            return params, opt_state, prob["x"], prob["y"]
        args, _ = step.place(params, opt_state, prob["x"], prob["y"], 0)
        return args[:4]

    depths = prob["depths"]
    params, opt_state, x, y = start()
    jax.block_until_ready((params, opt_state, x, y))
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, x, y, depths[0])
    jax.block_until_ready(loss)
    first_call = time.perf_counter() - t0
    # Warm every program the depth sequence needs (the dynamic path has one
    # per depth), then time whole runs.
    for depth in sorted(set(depths)):
        params, opt_state, loss = step(params, opt_state, x, y, depth)
    jax.block_until_ready(loss)

    best, losses = float("inf"), None
    for _ in range(repeats):
        params, opt_state, x, y = start()
        jax.block_until_ready((params, opt_state, x, y))
        run_losses = []
        t0 = time.perf_counter()
        for depth in depths:
            params, opt_state, loss = step(params, opt_state, x, y, depth)
            run_losses.append(loss)
        jax.block_until_ready((params, opt_state, loss))
        best = min(best, time.perf_counter() - t0)
        if losses is None:
            losses = np.array([float(v) for v in run_losses])
    return {
        "first_call_s": first_call,
        "compiles": step.stats.compiles,
        "steps_per_s": len(depths) / best,
        "ms_per_step": 1e3 * best / len(depths),
        "losses": losses,
        "params_spec": str(jax.tree.leaves(params)[0].sharding.spec)
        if devices is not None
        else None,
    }


def run(
    devices: Sequence[int] = DEVICES,
    *,
    modes: Sequence[str] = MODES,
    steps: int = 200,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Measure the scaling table; needs at least `max(devices)` devices.

    Returns:
      A JSON-ready dict: `env` (jax version, backend, device kind and count,
      CPU cores), `config`, and `rows`, one per (mode, devices), `devices` 0
      standing for the plain single-device step.
    """
    available = jax.device_count()
    if max(devices) > available:
        raise ValueError(
            f"scaling.run: `devices` asks for {max(devices)} devices; found "
            f"{available}. On CPU, start the process with "
            f"`jax.config.update('jax_num_cpu_devices', {max(devices)})` (as "
            "main() does) or XLA_FLAGS=--xla_force_host_platform_device_count."
        )
    rows = []
    for mode in modes:
        prob = _problem(mode, steps, seed)
        base = _measure(prob, None, repeats)
        for k in (None, *devices):
            m = base if k is None else _measure(prob, k, repeats)
            diff = np.abs(m["losses"] - base["losses"]) / np.abs(base["losses"])
            rows.append(
                {
                    "mode": mode,
                    "devices": 0 if k is None else k,
                    "rows_per_device": N // (k or 1),
                    "steps_per_s": m["steps_per_s"],
                    "ms_per_step": m["ms_per_step"],
                    "first_call_s": m["first_call_s"],
                    "compiles": m["compiles"],
                    "distinct_depths": len(set(prob["depths"])),
                    "max_rel_loss_diff_20": float(np.max(diff[:EARLY])),
                    "max_rel_loss_diff": float(np.max(diff)),
                    "params_spec": m["params_spec"],
                }
            )
    device = jax.devices()[0]
    return {
        "name": "scaling",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "env": {
            "jax": jax.__version__,
            "python": platform.python_version(),
            "backend": jax.default_backend(),
            "device_kind": device.device_kind,
            "device_count": available,
            "cpu_cores": os.cpu_count(),
            "shared_cores": jax.default_backend() == "cpu",
        },
        "config": {
            "N": N,
            "d_in": D_IN,
            "d_hidden": H,
            "d_out": D_OUT,
            "max_depth": MAX_DEPTH,
            "steps": steps,
            "repeats": repeats,
            "seed": seed,
            "devices": list(devices),
            "modes": list(modes),
        },
        "rows": rows,
    }


def markdown(result: dict) -> str:
    """Render `run()`'s result as a markdown section with one table."""
    env, cfg = result["env"], result["config"]
    lines = [
        "## Scaling out: data parallel on 1, 2, 4 and 8 devices",
        "",
        f"DynamicNet N={cfg['N']}, D_in={cfg['d_in']}, H={cfg['d_hidden']}, "
        f"D_out={cfg['d_out']}; {cfg['steps']} steps, depth in 0..{cfg['max_depth']} "
        f"per step; best of {cfg['repeats']} runs. jax {env['jax']}, "
        f"{env['backend']} ({env['device_kind']}), {env['device_count']} devices.",
    ]
    if env["shared_cores"]:
        lines.append(
            f"The devices are host devices sharing {env['cpu_cores']} CPU cores: "
            "this shows correctness and the overhead of splitting the batch, not "
            "a speed-up."
        )
    lines += [
        "Loss columns: the largest relative difference from the plain step's "
        "losses over the same depths. The first steps agree to float32 rounding; "
        "over hundreds of steps training amplifies that rounding (the devices sum "
        "the gradient in another order), while in float64 the two agree to 1e-14 "
        "(`examples/data_parallel.py --check --x64`).",
        "",
        "| path | devices | rows/device | steps/s | ms/step | first call (s) "
        f"| compiles | loss vs plain step, first {EARLY} steps | all steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        devices = "1 (plain step)" if r["devices"] == 0 else str(r["devices"])
        lines.append(
            f"| {r['mode']} | {devices} | {r['rows_per_device']} "
            f"| {r['steps_per_s']:.0f} | {r['ms_per_step']:.2f} "
            f"| {r['first_call_s']:.2f} | {r['compiles']} "
            f"| {r['max_rel_loss_diff_20']:.1e} | {r['max_rel_loss_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=list(DEVICES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--backend",
        choices=("cpu", "default"),
        default="cpu",
        help="cpu: host devices, as many as --devices needs (default)",
    )
    args = parser.parse_args(argv)
    if args.backend == "cpu":
        # Before anything touches a device: the device count is fixed then.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", max(args.devices))
    result = run(
        args.devices,
        modes=args.modes,
        steps=args.steps,
        repeats=args.repeats,
        seed=args.seed,
    )
    result["command"] = " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    text = markdown(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "scaling.md").write_text(text)
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.md'}")
    return result


if __name__ == "__main__":
    main()
