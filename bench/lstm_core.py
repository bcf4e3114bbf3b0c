"""The static LSTM's core against the generic bounded loop and plain `lax.scan`.

One training step of the sequence workload's CharLSTM (bench/workloads/
sequence.py, its full size by default: batch 32, lines of real text cut at 80
characters, embedding 32, LSTM 128, masked cross-entropy, SGD momentum), run as:

  core          `fl.models.CharLSTM.loss(..., mode="static")`: the LSTM's own
                core (stored gate-gradient factors, a reverse loop of gate
                gradients, one matmul for `weight_hh`'s gradient), the loop
                running to each batch's longest line; one program for every batch
  core-xla      `core` with its loops in XLA (`while` loops in stages of
                rows) rather than the native CPU kernels (functorch_lite/
                _native) that `core` runs where they build: what they gain
  core-halving  `core-xla` with the stage schedule it had before 2026-12-07
                (rows halved down to 8: 32, 16, 8) rather than its finer one
                (32, 28, ..., 4): what the finer stages gain
  generic       the same step with the LSTM on the generic bounded loop
                (`functorch_lite._loop`), which recomputes each step in reverse
  per-length    `core` on each batch cut to its own longest line: one program
                per distinct length (the specialized programs)
  plain-scan    hand-written `lax.scan` over the padded length with masks

Every variant compiles first, then `--repeats` rounds each time `--block`
steps per variant, interleaved (rotating the order), and reports the median
ms/step, the spread (min-max over rounds) and the ratio to `core`. Also the
real (not padded) share of the positions and the matmul GFLOP/s that `core`
reaches. Then the PyTorch peers (`--peers`), each alone in a fresh process on
the same batches and weights (bench/peers/torch_peer.py): `torch-padded`, the
padded batch straight into `nn.LSTM` (oneDNN's fused kernel, exact for the
masked loss), and `torch-packed` (`pack_padded_sequence`). Prints a table and
writes `<out>/lstm_core[-geometric].json`.

`--lengths geometric` replaces the lines of real text by random lines of 97
symbols (98 with padding) whose lengths are geometric with mean 38, clipped
to [1, 80]: the performance issue's synthetic workload, where about 43% of
the padded positions are real.

    python bench/lstm_core.py [--lengths text|geometric] [--batch 32]
                              [--max-len 80] [--hidden 128] [--repeats 7]
                              [--block 20] [--peers torch-padded,torch-packed]
                              [--profile N] [--xla-threads N]
                              [--out bench/results]

`--profile N` traces `block` steps of `core` with jax.profiler after the timed
rounds and lists its N costliest XLA ops, in ms per step (also in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import functorch_lite as fl
from functorch_lite import _native, _recurrent

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import _op_times  # noqa: E402
import _xla_threads  # noqa: E402
from peers import protocol  # noqa: E402
from workloads import sequence  # noqa: E402

VARIANTS = ("core", "core-xla", "core-halving", "generic", "per-length", "plain-scan")
_STAGES = _recurrent._stages


def _halving_stages(n: int) -> tuple[int, ...]:
    """The core's stage schedule before 2026-12-07: N, then halves, down to 8."""
    sizes = [n]
    while sizes[-1] > 8:
        sizes.append((sizes[-1] + 1) // 2)
    return tuple(sizes)


@contextlib.contextmanager
def _as_variant(name: str):
    """The library's internals as variant `name` traces them: the generic loop
    for `generic`, the core's loops in XLA rather than the native kernels for
    `core-xla` and `core-halving`, and the latter with the old stage schedule."""
    _recurrent._FUSED_LSTM = name != "generic"
    _recurrent._NATIVE_LSTM = name not in ("core-xla", "core-halving")
    _recurrent._stages = _halving_stages if name == "core-halving" else _STAGES
    try:
        yield
    finally:
        _recurrent._FUSED_LSTM, _recurrent._NATIVE_LSTM = True, True
        _recurrent._stages = _STAGES


def _matmul_flops(lengths: np.ndarray, width: int, e: int, h: int, v: int) -> float:
    """Matmul FLOPs of one step of `core` (forward and backward).

    Input projection, head: over all padded positions (forward, and both
    gradients for the head; only the weight gradient for the input
    projection, whose input is an embedding lookup). Recurrent matmuls: per
    step up to the longest line, on every row (the rows past their length
    are masked, not skipped); the `weight_hh` gradient: one matmul over all
    padded positions.
    """
    n = lengths.shape[0]
    positions = n * width
    proj = 2 * positions * e * 4 * h * 2
    head = 2 * positions * h * v * 3
    steps = int(lengths.max())
    recurrent = 2 * steps * n * h * 4 * h * 2 + 2 * positions * h * 4 * h
    return float(proj + head + recurrent)


def _geometric_lines(max_len: int, mean: float = 38.0) -> list[str]:
    """Random lines of 97 symbols, lengths geometric with `mean`, in [1, max_len]."""
    rng = np.random.default_rng(38)
    symbols = [chr(c) for c in range(33, 33 + 97)]
    lengths = np.clip(rng.geometric(1.0 / mean, size=8192), 1, max_len)
    pool = rng.choice(symbols, size=int(lengths.sum()))
    lines, at = [], 0
    for n in lengths:
        lines.append("".join(pool[at : at + n]))
        at += n
    lines.append("".join(symbols))  # every symbol appears: a vocabulary of 97
    return lines


def _profile(run: dict, block: int, top: int) -> dict[str, Any]:
    """`block` steps of a warm variant under jax.profiler: time per XLA op
    (`_op_times.op_times`, CPU only)."""
    state, batches = run["state"], run["batches"]

    def steps() -> Any:
        loss = None
        for i in range(block):
            tok, n = batches[i % len(batches)]
            state[0], state[1], loss = run["step"](state[0], state[1], tok, n)
        return loss

    totals = _op_times.op_times(steps, block)
    return {
        "steps": block,
        "ops": [
            {"name": k, "ms_per_step": round(v[0] / 1e3, 4), "per_step": round(v[1], 2)}
            for k, v in _op_times.costliest(totals, top)
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="lstm_core.py", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=80)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps-data", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--block", type=int, default=20)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--lengths", choices=("text", "geometric"), default="text")
    p.add_argument("--peers", default="torch-padded,torch-packed")
    p.add_argument("--out", default=str(BENCH / "results"))
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="trace `core` with jax.profiler and list its N costliest XLA ops",
    )
    _xla_threads.add_argument(p)
    args = p.parse_args(argv)
    _xla_threads.start(args.xla_threads)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; choose from {VARIANTS}")
    cfg = sequence.config(
        True,
        batch=args.batch,
        max_len=args.max_len,
        d_hidden=args.hidden,
        steps_data=args.steps_data,
    )
    cfg["block"], cfg["repeats"] = args.block, args.repeats
    config, arrays = sequence.build(
        cfg, None if args.lengths == "text" else _geometric_lines(args.max_len)
    )
    model, master = sequence._params(config, arrays)
    opt = optax.sgd(config["lr"], momentum=config["momentum"])
    full = [
        (jnp.asarray(t), jnp.asarray(n))
        for t, n in zip(arrays["tokens"], arrays["lengths"], strict=True)
    ]
    cut = [(t[:, : int(n.max())], n) for t, n in full]

    def make(name: str) -> tuple[Any, list]:
        if name == "plain-scan":
            return sequence._plain_jax_step(config, opt), full
        step = fl.train.make_step(
            lambda p_, t, n: model.loss(p_, t, n, mode="static"), opt
        )
        return step, (cut if name == "per-length" else full)

    runs: dict[str, dict[str, Any]] = {}
    for name in variants:
        step, batches = make(name)
        params = jax.tree.map(jnp.copy, master)
        state = [params, opt.init(params)]
        start = time.perf_counter()
        with _as_variant(name):
            for tok, n in batches:  # compiles every program the variant needs
                state[0], state[1], loss = step(state[0], state[1], tok, n)
            jax.block_until_ready(loss)
        runs[name] = {
            "step": step,
            "batches": batches,
            "state": state,
            "warm_s": time.perf_counter() - start,
            "times": [],
            "first_losses": [],
        }
    order = list(variants)
    for r in range(args.repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            run = runs[name]
            state, batches = run["state"], run["batches"]
            start = time.perf_counter()
            with _as_variant(name):  # compiled already: no trace reads it
                for i in range(args.block):
                    tok, n = batches[i % len(batches)]
                    state[0], state[1], loss = run["step"](state[0], state[1], tok, n)
                jax.block_until_ready(loss)
            run["times"].append((time.perf_counter() - start) / args.block)
    profile = (
        _profile(runs["core"], args.block, args.profile)
        if (args.profile and "core" in runs)
        else None
    )
    # Agreement: two steps from the same state on the first two batches. The
    # second loss follows the first step's gradients.
    check = {}
    for name in variants:
        step, batches = make(name)
        params = jax.tree.map(jnp.copy, master)
        with _as_variant(name):
            params, opt_state, first = step(params, opt.init(params), *batches[0])
            _, _, second = step(params, opt_state, *batches[1 % len(batches)])
        check[name] = (float(first), float(second))
    lengths = arrays["lengths"][: args.block]
    width = arrays["tokens"].shape[2]
    real = float(np.sum(lengths)) / (lengths.size * width)
    flops = np.mean(
        [
            _matmul_flops(n, width, config["d_embed"], args.hidden, config["vocab"])
            for n in lengths
        ]
    )
    rows = {}
    for name, run in runs.items():
        rows[name] = {
            **protocol.ms_spread(run["times"]),
            "warm_s": run["warm_s"],
            "first_loss": check[name][0],
            "second_loss": check[name][1],
        }
    if "core" in rows:
        base = rows["core"]["ms_median"]
        for row in rows.values():
            row["ratio_to_core"] = row["ms_median"] / base
        rows["core"]["matmul_gflops"] = flops / (base * 1e-3) / 1e9
    result = {
        "benchmark": "lstm_core",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        **protocol.environment(),
        **_xla_threads.record(),
        "native_kernels": _native.status(),
        "config": {
            "batch": args.batch,
            "max_len": args.max_len,
            "hidden": args.hidden,
            "embed": config["d_embed"],
            "vocab": config["vocab"],
            "block": args.block,
            "repeats": args.repeats,
        },
        "lengths": args.lengths,
        "peers": {},
        "real_share_of_positions": real,
        "matmul_flops_per_step": flops,
        "variants": rows,
        "profile": profile,
    }
    print(
        f"lstm_core: batch {args.batch}, max_len {args.max_len}, hidden "
        f"{args.hidden}; {real:.0%} of the padded positions are real; jax "
        f"{jax.__version__} on {result['device']} ({result['cores']} cores)"
    )
    for name, row in rows.items():
        print(
            f"  {name:<11} {row['ms_median']:7.2f} ms/step "
            f"[{row['ms_min']:.2f}-{row['ms_max']:.2f}]  "
            f"{row.get('ratio_to_core', float('nan')):.2f}x core  "
            f"first loss {row['first_loss']:.6f}"
        )
    if profile:
        print(f"  core's {len(profile['ops'])} costliest XLA ops, ms per step:")
        for op in profile["ops"]:
            print(f"    {op['ms_per_step']:6.3f}  x{op['per_step']:<5g} {op['name']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peers = [q for q in args.peers.split(",") if q]
    if peers:
        with tempfile.TemporaryDirectory() as tmp:
            ran = sequence._peer_runs(config, arrays, peers, Path(tmp))
        base = rows.get("core", {}).get("ms_median")
        for name, res in ran.items():
            if res.get("status", "ok") != "ok":
                result["peers"][name] = {"status": res["status"]}
                print(f"  {name:<13} {res['status']}")
                continue
            row = {
                **protocol.ms_spread(res["steady"]["all"]),
                "first_loss": res["losses"][0],
                "process": "own",
            }
            if base:
                row["core_speed_ratio"] = row["ms_median"] / base
            result["peers"][name] = row
            print(
                f"  {name:<13} {row['ms_median']:7.2f} ms/step "
                f"[{row['ms_min']:.2f}-{row['ms_max']:.2f}]  own process; core is "
                f"{row.get('core_speed_ratio', float('nan')):.2f}x faster  "
                f"first loss {row['first_loss']:.6f}"
            )
    suffix = "" if args.lengths == "text" else "-geometric"
    (out / f"lstm_core{suffix}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
