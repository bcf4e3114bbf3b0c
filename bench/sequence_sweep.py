"""The sequence workload's sweep alone: steady time per real token against the
number of distinct padded lengths.

`python bench/retrace_vs_scan.py --full` runs this sweep as part of the whole
benchmark; this script runs only it, at the full size by default (batch 32,
lines of real text cut at 80 characters, LSTM 128), for k = 1, 2, 4, 8
distinct lengths: batch i's lines are cut to the i % k-th of k widths spread
up to the shortest of the batches' longest lines (`workloads.sequence.sweep`).
`dynamic` compiles k programs, `bucketed` one per power of two, `static` one.
Prints a table and writes
`<out>/<name>.json`, `.md` and `.png`.

    python bench/sequence_sweep.py [--quick] [--sweep 1,2,4,8]
                                   [--strategies dynamic,bucketed,static]
                                   [--name sequence-sweep] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import _report  # noqa: E402
from peers import protocol  # noqa: E402
from workloads import sequence  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the quick size")
    p.add_argument("--sweep", default=None, help="distinct-length counts")
    p.add_argument("--strategies", default=None)
    p.add_argument("--name", default="sequence-sweep")
    p.add_argument("--out", type=Path, default=BENCH / "results")
    args = p.parse_args(argv)
    cfg = sequence.config(not args.quick)
    if args.sweep:
        cfg["sweep"] = tuple(int(k) for k in args.sweep.split(","))
    if args.strategies:
        cfg["sweep_strategies"] = tuple(args.strategies.split(","))
    progress = _report.Progress(len(cfg["sweep"]), quiet=False)
    start = time.perf_counter()
    rows = sequence.sweep(cfg, sequence._lines(), progress.line)
    progress.close()
    result = {
        "command": "python bench/sequence_sweep.py " + " ".join(sys.argv[1:]),
        "environment": protocol.environment(),
        "jax": jax.__version__,
        "config": {k: v for k, v in cfg.items() if k != "peers"},
        "sweep": rows,
        "wall_seconds": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    names = list(rows[0]["strategies"])
    table = [
        "| distinct lengths | widths | "
        + " | ".join(f"{n} us/token (compiles)" for n in names)
        + " |",
        "|" + "---|" * (2 + len(names)),
    ]
    for row in rows:
        table.append(
            f"| {row['distinct_lengths']} | {', '.join(map(str, row['widths']))} | "
            + " | ".join(
                f"{v['us_per_real_token']:.3g} ({v['compiles']})"
                for v in row["strategies"].values()
            )
            + " |"
        )
    text = "\n".join(table)
    print(text)
    (args.out / f"{args.name}.md").write_text(
        f"# {args.name}\n\nCommand: `{result['command']}`, "
        f"{result['wall_seconds']:.0f} s wall.\n\n{text}\n"
    )
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r["distinct_lengths"] for r in rows]
    for n in names:
        ax.plot(ks, [r["strategies"][n]["us_per_real_token"] for r in rows], "o-",
                label=n)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("distinct padded lengths")
    ax.set_ylabel("steady time per real token (us)")
    ax.set_title("CharLSTM, steady step time per real token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{args.name}.png", dpi=110)


if __name__ == "__main__":
    main()
