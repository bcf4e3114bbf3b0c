"""Checkpoint save speed and memory: `fl.checkpoint.save` vs `safetensors` itself.

A state of float32 leaves of mixed sizes (256 MiB in all by default: 1/2, 1/4,
1/8, 1/16, 1/16 of it, plus a few small leaves and a step number) is written
by each of:

- `fl-save`: `functorch_lite.checkpoint.save` (streamed: header, then one leaf
  at a time, sha256 of every leaf, fsync, atomic rename, folder fsync);
- `fl-save-async`: `save_async`, timing the caller's part (the host copy)
  and the whole save (`.wait()`) separately;
- `st-save-file`: `safetensors.numpy.save_file` followed by an fsync of the
  file (the baseline the issue compares against).

Every run is a fresh Python process that builds the state (host NumPy leaves
for `st-save-file`; the same values as jax.Arrays on the default device for the
`fl-` rows), does one small warm-up save, resets its peak-memory counter
(`/proc/self/clear_refs`; without it, the process's peak so far is the
baseline), times one save into a new file and reports the peak resident memory
(`VmHWM`) above the resident memory (`VmRSS`) just before the save: the extra
memory of the save. Each row is the median of `--repeats` runs.

    python bench/checkpoint_speed.py [--mib 256] [--repeats 5]
        [--out [bench/results/checkpoint-speed.json]] [--dir DIR]

Prints a table with the ratios to `st-save-file` and writes JSON when `--out` is
given. Linux only (it reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "checkpoint-speed.json"
MIB = 1 << 20

CHILD = r"""
import json, os, sys, time
import numpy as np

mode, folder, total = sys.argv[1], sys.argv[2], int(sys.argv[3])


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Leaf sizes in float32 elements: 1/2, 1/4, 1/8, 1/16, 1/16 of the total, less
# the small leaves, which make up the rest.
n = total // 4
small = {f"bias{i}": 1000 + 37 * i for i in range(6)}
rest = n - sum(small.values())
big = [rest // 2, rest // 4, rest // 8, rest // 16]
big.append(rest - sum(big))
sizes = {f"layer{i}.weight": m for i, m in enumerate(big)} | small
state = {
    name: np.full(m, i + 0.5, np.float32) for i, (name, m) in enumerate(sizes.items())
}

if mode == "st-save-file":
    import safetensors.numpy

    def save(path, tree):
        safetensors.numpy.save_file(tree, path)
        fsync(path)

    tree = state
else:
    import jax, jax.numpy as jnp
    import functorch_lite as fl

    tree = {"params": {k: jnp.asarray(v) for k, v in state.items()}, "step": 1000}
    del state
    if mode == "fl-save":
        save = fl.checkpoint.save
    else:
        def save(path, tree):
            return fl.checkpoint.save_async(path, tree)
    jax.block_until_ready(tree)

warm = os.path.join(folder, f"warm-{mode}.safetensors")
small_tree = {"w": np.ones(4, np.float32)}
if mode != "st-save-file":
    small_tree = {"w": tree["params"]["bias0"]}
out = save(warm, small_tree)
if out is not None:
    out.wait()
os.unlink(warm)
path = os.path.join(folder, f"{mode}.safetensors")
if os.path.exists(path):
    os.unlink(path)
reset = reset_peak()
rss = status("VmRSS")
t0 = time.perf_counter()
out = save(path, tree)
t1 = time.perf_counter()
if out is not None:
    out.wait()
t2 = time.perf_counter()
peak = status("VmHWM")
size = os.path.getsize(path)
os.unlink(path)
print(json.dumps({
    "seconds": t2 - t0, "caller_seconds": t1 - t0, "extra_bytes": max(peak - rss, 0),
    "peak_reset": reset, "file_bytes": size,
    "largest_leaf_bytes": max(sizes.values()) * 4,
}))
"""


def run_once(mode: str, folder: str, mib: int) -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, folder, str(mib * MIB)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="state size in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out",
        nargs="?",
        const=str(DEFAULT_OUT),
        default=None,
        help=f"write JSON here (default {DEFAULT_OUT.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--dir", default=None, help="folder to write into (default: a temp folder)"
    )
    args = parser.parse_args(argv)

    modes = ["st-save-file", "fl-save", "fl-save-async"]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for i in range(args.repeats):
            # Interleaved, in a rotating order: a drift in disk speed, or one
            # row's file still being written back, hits every row alike.
            for mode in modes[i % 3 :] + modes[: i % 3]:
                runs[mode].append(run_once(mode, folder, args.mib))

    import jax

    rows = {}
    for mode, results in runs.items():
        rows[mode] = {
            "median_seconds": statistics.median(r["seconds"] for r in results),
            "min_seconds": min(r["seconds"] for r in results),
            "max_seconds": max(r["seconds"] for r in results),
            "median_caller_seconds": statistics.median(
                r["caller_seconds"] for r in results
            ),
            "median_extra_mib": statistics.median(r["extra_bytes"] for r in results)
            / MIB,
            "max_extra_mib": max(r["extra_bytes"] for r in results) / MIB,
            "runs": results,
        }
    base = rows["st-save-file"]
    for row in rows.values():
        row["time_ratio"] = row["median_seconds"] / base["median_seconds"]
    largest = runs["fl-save"][0]["largest_leaf_bytes"] / MIB
    report = {
        "schema": "functorch_lite/bench/checkpoint_speed/1",
        "state_mib": args.mib,
        "largest_leaf_mib": largest,
        "file_mib": runs["fl-save"][0]["file_bytes"] / MIB,
        "repeats": args.repeats,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "peak_reset": all(r["peak_reset"] for rs in runs.values() for r in rs),
        "rows": rows,
    }

    print(
        f"{args.mib} MiB of float32 leaves (largest {largest:.0f} MiB), median of "
        f"{args.repeats} fresh processes; jax {jax.__version__}, {os.cpu_count()} "
        "cores"
    )
    print(
        f"{'':16}{'seconds (min-max)':>22}{'vs save_file':>14}{'caller s':>10}"
        f"{'extra MiB':>11}{'/ largest':>11}"
    )
    for mode, row in rows.items():
        span = f"{row['median_seconds']:.3f} ({row['min_seconds']:.3f}-"
        span += f"{row['max_seconds']:.3f})"
        print(
            f"{mode:16}{span:>22}{row['time_ratio']:>13.2f}x"
            f"{row['median_caller_seconds']:>10.3f}{row['max_extra_mib']:>11.1f}"
            f"{row['max_extra_mib'] / largest:>10.2f}x"
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
