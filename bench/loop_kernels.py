"""What a recurrent loop's step costs in XLA's CPU runtime, against torch's matmul.

The measurements behind bench/RESULTS.md's account of why PyTorch's padded
(oneDNN) LSTM still leads the static core on CPU. Each XLA figure is one
iteration of a compiled `lax.fori_loop` of `--iterations` steps (so that the
call's dispatch is spread over them), median of `--repeats` calls:

  matmul R      `h @ W_hh` of the sequence workload, (R, 128) @ (128, 512),
                then `tanh` of one (R, 128) slice, so each iteration depends
                on the last (as the LSTM's does): the forward step's matmul
  trivial       `x * 0.5 + 1` on a (32, 512) array: one small kernel, the
                floor that every kernel in a loop body pays
  sigmoid/tanh  `sigmoid(x)` and `tanh(x)` on a (32, 512) array, in ns per
                element

and, in a fresh process of its own with its defaults (its thread count, then
one thread), `torch.mm` of the same matmul shapes, median us per call of
`--repeats` blocks.

    python bench/loop_kernels.py [--iterations 800] [--repeats 7]
                                 [--rows 32,16,8,4] [--no-torch] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BENCH = pathlib.Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from peers import protocol  # noqa: E402

HIDDEN, GATES = 128, 512

# Run by the subprocess: torch.mm of each shape, default threads then one.
_TORCH = r"""
import json, sys, time
import torch
rows, repeats, calls = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out = {"torch": torch.__version__, "default_threads": torch.get_num_threads()}
for threads in (torch.get_num_threads(), 1):
    torch.set_num_threads(threads)
    res = {}
    for r in rows:
        h, w = torch.randn(r, 128), torch.randn(128, 512) * 0.05
        for _ in range(50):
            torch.mm(h, w)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                torch.mm(h, w)
            times.append((time.perf_counter() - start) / calls * 1e6)
        times.sort()
        res[str(r)] = {
            "median_us": times[len(times) // 2], "min_us": times[0], "max_us": times[-1]
        }
    out[f"threads_{threads}"] = res
print(json.dumps(out))
"""


def _per_iteration_us(step, x0, iterations: int, repeats: int) -> dict:
    """Median (min, max) us per iteration of `fori_loop(step)` from `x0`."""
    run = jax.jit(lambda x: lax.fori_loop(0, iterations, lambda i, x: step(x), x))
    jax.block_until_ready(run(x0))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(x0))
        times.append((time.perf_counter() - start) / iterations * 1e6)
    return {
        "median_us": float(np.median(times)),
        "min_us": float(min(times)),
        "max_us": float(max(times)),
    }


def _torch_alone(rows: list[int], repeats: int, calls: int) -> dict | None:
    """torch.mm timings from a fresh process, or None without torch."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TORCH, json.dumps(rows), str(repeats), str(calls)],
            capture_output=True,
            text=True,
            check=True,
        )
    except subprocess.CalledProcessError as err:
        if "No module named 'torch'" in err.stderr:
            return None
        raise
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", default="32,16,8,4")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((HIDDEN, GATES)), jnp.float32) * 0.05
    x = jnp.asarray(rng.standard_normal((32, GATES)), jnp.float32)

    def matmul_step(h):
        return jnp.tanh((h @ w)[:, :HIDDEN])

    matmul = {}
    for r in rows:
        h0 = jnp.asarray(rng.standard_normal((r, HIDDEN)), jnp.float32)
        cell = _per_iteration_us(matmul_step, h0, args.iterations, args.repeats)
        cell["gflops"] = 2 * r * HIDDEN * GATES / cell["median_us"] / 1e3
        matmul[str(r)] = cell
    elementwise = {
        name: _per_iteration_us(fn, x, args.iterations, args.repeats)
        for name, fn in (
            ("trivial", lambda x: x * 0.5 + 1.0),
            ("sigmoid", jax.nn.sigmoid),
            ("tanh", jnp.tanh),
        )
    }
    for cell in elementwise.values():
        cell["ns_per_element"] = cell["median_us"] * 1e3 / x.size
    calls = max(1, args.iterations // 4)
    torch = None if args.no_torch else _torch_alone(rows, args.repeats, calls)
    result = {
        "benchmark": "loop_kernels",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        **protocol.environment(),
        "iterations": args.iterations,
        "repeats": args.repeats,
        "xla_matmul": matmul,
        "xla_elementwise": elementwise,
        "torch_alone": torch,
    }
    print(
        f"loop_kernels: jax {jax.__version__} on {result['device']} "
        f"({result['cores']} cores); us per loop iteration, median (min-max)"
    )
    head = "  matmul (R,128)@(128,512)    XLA in a loop"
    if torch:
        threads = torch["default_threads"]
        head += f"   torch alone, {threads} threads / 1 thread"
    print(head)
    for r in rows:
        cell = matmul[str(r)]
        line = (
            f"  R={r:<3d} {cell['median_us']:8.1f} ({cell['min_us']:.1f}-"
            f"{cell['max_us']:.1f}) {cell['gflops']:6.1f} GFLOP/s"
        )
        if torch:
            many = torch[f"threads_{torch['default_threads']}"][str(r)]["median_us"]
            one = torch["threads_1"][str(r)]["median_us"]
            line += f"   {many:8.1f} / {one:8.1f}"
        print(line)
    for name, cell in elementwise.items():
        print(
            f"  {name:8s} on (32, 512): {cell['median_us']:6.2f} us "
            f"({cell['ns_per_element']:.2f} ns per element)"
        )
    if args.out:
        protocol.write_result(args.out, "loop-kernels.json", result)
    return result


if __name__ == "__main__":
    main()
