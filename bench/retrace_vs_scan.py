"""Retrace vs scan, the main benchmark: when does compiling once beat retracing?

Trains the reference DynamicNet (N=64, D_in=1000, H=100, D_out=10, summed MSE, SGD
lr 1e-4 momentum 0.9) with a depth drawn uniformly from [0, max_depth] each step
(one seeded sequence per max_depth, the same for every strategy), under:

  dynamic          retrace once per distinct depth, cached (`static_argnames`)
  dynamic-nocache  a new step function, so a new trace and compile, every step
  static-scan      `lax.scan` over max_depth, steps past depth skipped (`lax.cond`)
  static-masked    all max_depth layers computed, the ones past depth masked
  static           the library default: a bounded `while_loop` with a custom VJP
  static-specialized  `make_step(..., specialize={"depth": max_depth + 1})`: one
                   compile, a straight-line branch per depth picked by `lax.switch`
  fused            K optimizer steps in one compiled `lax.scan`, depths fed as an array
  fused-specialized  `fused` with `specialize={"depth": max_depth + 1}`: one compile of
                   a straight-line branch per depth, `lax.switch` picking each step's
  plain-jax        hand-written `jax.jit` + optax, no functorch_lite (peer)

and the peers, each run alone in its own fresh process with its framework's
defaults (bench/peers/; quick: torch-eager, torch-compile, tf-function-tensor):

  torch-eager                 the PyTorch reference program
  torch-compile[-dynamic]     `torch.compile(model)`, defaults / `dynamic=True`
  tf-function-int[-xla]       `tf.function`, Python int depth: one trace per depth
  tf-function-tensor[-xla]    `tf.function`, tensor depth, `tf.range` loop: one graph

`--workload sequence` (also part of the default `all`) runs the variable-length
workload of bench/workloads/sequence.py: a character LSTM over lines of real text.

Usage:
  python bench/retrace_vs_scan.py              # both workloads, quick: about 3 min
  python bench/retrace_vs_scan.py --full       # the whole sweep
  python bench/retrace_vs_scan.py --workload dynamicnet --peers none
  python bench/retrace_vs_scan.py --out DIR --name NAME --backend cpu|gpu
  python bench/retrace_vs_scan.py --depths 3,8 --steps 10,100 --no-plot
  python bench/retrace_vs_scan.py --xla-threads 1   # JAX's CPU runtime on one thread
  (tiny sizes for tests: --n 4 --d-in 8 --hidden 6 --d-out 3; see --help)

Writes <out>/<name>.json (every figure, versions, device), <name>.md (summary with
findings in words) and <name>.png (total time vs steps, compile time vs max_depth,
steady step time vs max_depth; needs matplotlib, the `bench` extra), and prints a
table. Progress goes to stderr, one line per measured cell.

How each figure is measured (all clocks are read after `block_until_ready`, or
`torch.cuda.synchronize` for torch on a GPU):

The layout is workloads x strategies x peers: bench/workloads/dynamicnet.py and
bench/workloads/sequence.py measure our strategies, bench/peers/ runs each peer
family in its own process, bench/_report.py writes tables, findings, markdown
and plots; this file is only the command line. How each figure is measured is
written at the top of each workload module.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report  # noqa: E402
import _xla_threads  # noqa: E402
from workloads import dynamicnet, sequence  # noqa: E402
from workloads.dynamicnet import (  # noqa: E402
    DEFAULT_OUT,
    FULL,
    LR,
    MOMENTUM,
    OPTIONAL_STRATEGIES,
    PEERS,
    QUICK,
    SCHEMA,
    STRATEGIES,
)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints; got {text!r}"
        ) from err
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative ints; got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retrace_vs_scan.py",
        description="Static (compile once) vs dynamic (retrace per depth) training "
        "of the reference DynamicNet, with torch and plain-JAX peers.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output folder (default: bench/results/)",
    )
    p.add_argument(
        "--name", default=None, help="file stem of the outputs (default: a timestamp)"
    )
    p.add_argument(
        "--full",
        action="store_true",
        help=f"sweep max_depth {FULL['depths']} and steps {FULL['steps']}",
    )
    p.add_argument(
        "--depths",
        type=_int_list,
        default=None,
        help=f"max_depth values, comma-separated (quick: {QUICK['depths']})",
    )
    p.add_argument(
        "--steps",
        type=_int_list,
        default=None,
        help=f"step counts, comma-separated (quick: {QUICK['steps']})",
    )
    p.add_argument(
        "--strategies",
        default=",".join(s for s in STRATEGIES if s not in OPTIONAL_STRATEGIES),
        help="comma-separated subset of: " + ", ".join(STRATEGIES),
    )
    p.add_argument(
        "--peers",
        default=None,
        help="comma-separated peers, each run in its own process, or 'none' "
        f"(quick: {','.join(QUICK['peers'])}; full: all of {', '.join(PEERS)})",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed blocks for the steady figures (quick 5, full 7; >= 5 advised)",
    )
    p.add_argument(
        "--block",
        type=int,
        default=None,
        help="steps per timed block (quick 50, full 100; capped at max(steps))",
    )
    p.add_argument(
        "--nocache-steps",
        type=int,
        default=5,
        help="steps measured for dynamic-nocache; more are extrapolated",
    )
    p.add_argument(
        "--fuse-k",
        type=int,
        default=10,
        help="steps per fused call (reduced to divide every step count)",
    )
    p.add_argument(
        "--record",
        type=int,
        default=10,
        help="losses recorded per run for the parity check",
    )
    p.add_argument("--n", type=int, default=64, help="batch size")
    p.add_argument("--d-in", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--d-out", type=int, default=10)
    p.add_argument(
        "--peak-size",
        type=int,
        default=None,
        help="side of the square matmul for the peak (default 2048 on "
        "CPU, 8192 on GPU)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the torch peer (default: the core count)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--backend",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where JAX (and torch) run; auto: a GPU when there is one",
    )
    p.add_argument(
        "--plot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the PNG (needs matplotlib, the `bench` extra)",
    )
    _xla_threads.add_argument(p)
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar (shown on a terminal)"
    )
    p.add_argument(
        "--workload",
        choices=("all", "dynamicnet", "sequence"),
        default="all",
        help="dynamicnet: the reference DynamicNet over depths; sequence: a "
        "character LSTM over lines of varied length (bench/workloads/sequence.py)",
    )
    p.add_argument(
        "--sequence-config",
        type=json.loads,
        default=None,
        help="JSON overrides of the sequence workload's config, e.g. '{\"batch\": 8}'",
    )
    return p


def _config(args: argparse.Namespace) -> dict[str, Any]:
    preset = FULL if args.full else QUICK
    depths = tuple(sorted(set(args.depths or preset["depths"])))
    steps = tuple(sorted(set(args.steps or preset["steps"])))
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"--strategies: unknown {unknown}; choose from {STRATEGIES}.")
    strategies = tuple(s for s in STRATEGIES if s in strategies)
    if args.peers is None:
        peers = preset["peers"]
    elif args.peers.strip() == "none":
        peers = ()
    else:
        peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
        unknown = [p for p in peers if p not in PEERS]
        if unknown:
            raise SystemExit(f"--peers: unknown {unknown}; choose from {list(PEERS)}.")
    if min(steps) < 1:
        raise SystemExit("--steps: every step count must be >= 1.")
    if args.repeats is None:
        args.repeats = preset["repeats"]
    if args.block is None:
        args.block = preset["block"]
    for flag in (
        "repeats",
        "block",
        "nocache_steps",
        "fuse_k",
        "record",
        "n",
        "d_in",
        "hidden",
        "d_out",
    ):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1.")
    # One fused program for the whole run: K must divide every step count.
    fuse_k = math.gcd(args.fuse_k, *steps)
    max_steps = max(steps)
    block = min(args.block, max_steps)
    block = max(fuse_k, block - block % fuse_k)
    return {
        "n": args.n,
        "d_in": args.d_in,
        "d_hidden": args.hidden,
        "d_out": args.d_out,
        "loss": "mse, reduction=sum",
        "optimizer": f"optax.sgd(learning_rate={LR}, momentum={MOMENTUM})",
        "lr": LR,
        "momentum": MOMENTUM,
        "depths": list(depths),
        "steps": list(steps),
        "strategies": list(strategies),
        "peers": list(peers),
        "repeats": args.repeats,
        "block_steps": block,
        "nocache_steps": min(args.nocache_steps, max_steps),
        "fuse_k": fuse_k,
        "record_losses": min(args.record, max_steps),
        "seed": args.seed,
        "preset": "full" if args.full else "quick",
        "depth_sequence": "numpy.random.default_rng([seed, max_depth])"
        ".integers(0, max_depth + 1), one draw per step",
    }


# -------------------------------------------------------------------- plumbing
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating | float):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _write_sequence_only(
    results: dict[str, Any], out: Path, name: str, plot: bool
) -> dict[str, Any]:
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    png_path = out / f"{name}-sequence.png"
    note = _report.sequence_plot(results["sequence"], png_path) if plot else "--no-plot"
    results["outputs"] = {
        "json": json_path.name,
        "markdown": md_path.name,
        "sequence_png": png_path.name if note is None else None,
    }
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    text = _report.sequence_markdown(results["sequence"])
    md_path.write_text(f"# retrace_vs_scan: {name}\n\n" + text)
    print(text)
    print(f"wrote {json_path}")
    print(f"wrote {md_path}")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table; write JSON, markdown and (maybe) PNG.

    Returns the results dict (as written to the JSON), for tests.
    """
    args = _parser().parse_args(argv)
    cfg = _config(args)
    _xla_threads.start(args.xla_threads)
    device = dynamicnet._select_device(args.backend)
    peak_size = args.peak_size or (8192 if device.platform == "gpu" else 2048)
    name = args.name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/retrace_vs_scan.py" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    if jax.config.jax_compilation_cache_dir:
        sys.stderr.write(
            "retrace_vs_scan: warning: JAX's persistent compilation cache is on "
            f"({jax.config.jax_compilation_cache_dir}); compiles may be cache hits. "
            "Unset FUNCTORCH_LITE_CACHE_DIR for honest compile figures.\n"
        )
    if not args.quiet:
        sys.stderr.write(
            f"retrace_vs_scan: {cfg['preset']} sweep, max_depth {cfg['depths']}, "
            f"steps {cfg['steps']}, on {device}\n"
        )
    head = {
        "schema": SCHEMA,
        "name": name,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "workload": args.workload,
    }
    results: dict[str, Any] = dict(head)
    if args.workload in ("all", "dynamicnet"):
        with jax.default_device(device):
            measured = dynamicnet.run_benchmark(
                cfg, device, args.quiet, peak_size, torch_threads=args.torch_threads
            )
        measured.pop("schema")
        results.update(
            config=cfg, strategies=cfg["strategies"] + cfg["peers"], **measured
        )
        results["loss_agreement"] = _report.loss_agreement(results)
    sequence_result = None
    if args.workload in ("all", "sequence"):
        seq_cfg = sequence.config(args.full, **(args.sequence_config or {}))
        if args.sequence_config and "peers" in args.sequence_config:
            seq_cfg["peers"] = tuple(args.sequence_config["peers"])
        progress = _report.Progress(None, args.quiet)
        with jax.default_device(device):
            sequence_result = sequence.run(seq_cfg, progress=progress.line)
        progress.close()
        results["sequence"] = sequence_result
    results = _jsonable(results)
    if args.workload == "sequence":
        return _write_sequence_only(results, out, name, args.plot)
    json_path = out / f"{name}.json"
    png_path = out / f"{name}.png"
    md_path = out / f"{name}.md"
    plot_note = None
    if args.plot:
        plot_note = _report.plot(results, png_path)
    else:
        plot_note = "skipped: --no-plot"
    results["plot"] = plot_note if plot_note else png_path.name
    results["outputs"] = {
        "json": json_path.name,
        "markdown": md_path.name,
        "png": png_path.name if plot_note is None else None,
    }
    seq_png = out / f"{name}-sequence.png"
    if "sequence" in results:
        note = (
            _report.sequence_plot(results["sequence"], seq_png) if args.plot else "no"
        )
        results["outputs"]["sequence_png"] = seq_png.name if note is None else None
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    text = _report.markdown(results)
    if "sequence" in results:
        text += "\n" + _report.sequence_markdown(results["sequence"])
        if results["outputs"].get("sequence_png"):
            text += f"\n![sequence workload]({seq_png.name})\n"
    md_path.write_text(text)
    print(_report.table(results))
    print()
    for line in _report.findings(results):
        print("- " + line)
    print()
    if "sequence" in results:
        print(_report.sequence_markdown(results["sequence"]))
    print(f"wrote {json_path}")
    print(f"wrote {md_path}")
    if plot_note is None:
        print(f"wrote {png_path}")
    else:
        print(f"plot {plot_note}")
    return results


if __name__ == "__main__":
    main()
