"""What do the checks on traced values cost per step?

The same `make_step` step built twice, once with the checks on (the default)
and once traced with `FUNCTORCH_LITE_CHECKS=0`, and a hand-written `jax.jit`
step with nothing of ours around it, on the two workloads:

- `dynamicnet`: the reference DynamicNet step (N=64, D_in=1000, H=100,
  D_out=10, summed MSE, SGD momentum) with a traced depth drawn from 0..3:
  the depth is an argument, so its check runs on the host before each call;
- `sequence`: the sequence workload's CharLSTM step (batch 32, lines of real
  text padded to 80, hidden 128) with traced lengths, checked the same way.

Each variant runs `--steps` steps per round, the variants interleaved in each
round, `--repeats` rounds; reports the median ms/step, the spread (min-max)
and the ratio of `checks on` to `checks off`. Prints a table and writes
`<out>/check_cost.json`.

    python bench/check_cost.py [--steps 300] [--repeats 7] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import functorch_lite as fl

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from peers import protocol  # noqa: E402
from workloads import sequence  # noqa: E402

ENV = "FUNCTORCH_LITE_CHECKS"


def _dynamicnet() -> tuple[Any, Any, list]:
    net = fl.models.DynamicNet(1000, 100, 10)
    opt = optax.sgd(1e-4, momentum=0.9)

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth), y, reduction="sum")

    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 1000))
    y = jax.random.normal(ky, (64, 10))
    depths = np.random.default_rng(0).integers(0, 4, 64)
    batches = [(x, y, int(d)) for d in depths]
    return (loss_fn, opt, net.init(kp)), opt, batches


def _sequence() -> tuple[Any, Any, list]:
    cfg = sequence.config(True, batch=32, max_len=80, d_hidden=128, steps_data=16)
    config, arrays = sequence.build(cfg)
    model, params = sequence._params(config, arrays)
    opt = optax.sgd(config["lr"], momentum=config["momentum"])

    def loss_fn(p, tokens, lengths):
        return model.loss(p, tokens, lengths, mode="static")

    batches = [
        (jnp.asarray(t), np.asarray(n))
        for t, n in zip(arrays["tokens"], arrays["lengths"], strict=True)
    ]
    return (loss_fn, opt, params), opt, batches


def _plain(loss_fn: Any, opt: Any) -> Any:
    def step(params, opt_state, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def measure(workload: str, steps: int, repeats: int) -> dict[str, Any]:
    (loss_fn, opt, master), _, batches = (
        _dynamicnet() if workload == "dynamicnet" else _sequence()
    )
    variants: dict[str, dict[str, Any]] = {}
    for name in ("checks on", "checks off", "plain jax.jit"):
        if name == "checks off":
            os.environ[ENV] = "0"
        else:
            os.environ.pop(ENV, None)
        if name == "plain jax.jit":  # traced with the checks on, as users get
            step = _plain(loss_fn, opt)
        else:
            step = fl.train.make_step(loss_fn, opt)
        params = jax.tree.map(jnp.copy, master)
        state = [params, opt.init(params)]
        for b in batches:  # compiles whatever the variant needs
            state[0], state[1], loss = step(state[0], state[1], *b)
        jax.block_until_ready(loss)
        variants[name] = {"step": step, "state": state, "times": []}
    os.environ.pop(ENV, None)
    order = list(variants)
    for r in range(repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            v = variants[name]
            if name == "checks off":
                os.environ[ENV] = "0"
            step, state = v["step"], v["state"]
            start = time.perf_counter()
            for i in range(steps):
                state[0], state[1], loss = step(
                    state[0], state[1], *batches[i % len(batches)]
                )
            jax.block_until_ready(loss)
            v["times"].append((time.perf_counter() - start) / steps)
            os.environ.pop(ENV, None)
    rows = {}
    for name, v in variants.items():
        rows[name] = protocol.ms_spread(v["times"])
    off = rows["checks off"]["ms_median"]
    for row in rows.values():
        row["ratio_to_checks_off"] = row["ms_median"] / off
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="check_cost.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--workloads", default="dynamicnet,sequence")
    p.add_argument("--out", default=str(BENCH / "results"))
    args = p.parse_args(argv)
    result: dict[str, Any] = {
        "benchmark": "check_cost",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        **protocol.environment(),
        "steps": args.steps,
        "repeats": args.repeats,
        "workloads": {},
    }
    print(
        f"check_cost: jax {jax.__version__} on {result['device']} "
        f"({result['cores']} cores), {args.repeats} rounds of {args.steps} steps"
    )
    for workload in [w for w in args.workloads.split(",") if w]:
        steps = args.steps if workload == "dynamicnet" else max(args.steps // 10, 10)
        rows = measure(workload, steps, args.repeats)
        result["workloads"][workload] = rows
        for name, row in rows.items():
            print(
                f"  {workload:<11} {name:<14} {row['ms_median']:8.3f} ms/step "
                f"[{row['ms_min']:.3f}-{row['ms_max']:.3f}]  "
                f"{row['ratio_to_checks_off']:.3f}x checks off"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
