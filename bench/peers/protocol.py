"""How a peer runs in its own fresh process, and what it reports.

Every peer (PyTorch, TensorFlow, ...) is measured the way its users run it: in a
new Python process that has imported nothing but its own framework, with that
framework's defaults (threads included). The parent (the benchmark, which has
already run JAX) writes the inputs once, starts the peer with
`python <script> --inputs DIR/inputs.npz --peer NAME --out DIR/NAME.json`, and
reads the JSON the peer writes. This module imports only NumPy and the standard
library, so a peer that imports it loads nothing of JAX.

Inputs (`inputs.npz`): the arrays of the workload (initial weights in the layout
named by the workload, the data, the per-step schedule) and `config`, a JSON
string with the workload's name, sizes, optimizer settings and the measuring
plan (`marks`: the step counts at which the total time is read; `record`: how
many per-step losses to return; `block` and `repeats`: the steady-state plan).

Result (one JSON object per peer):

    status          "ok", "skipped: <one-line reason>" or "failed: <reason>"
    peer            the peer's name
    versions        {"python": ..., "<framework>": ...}
    threads         the framework's intra-op thread count (its default)
    first_call_s    seconds of the first step (tracing/compiling included)
    totals          {"<mark>": seconds from before the first step to after step <mark>}
    steady          {"median", "min", "max"} seconds per step over `repeats`
                    blocks of `block` steps after the run, plus "repeats",
                    "block_steps", "all"
    losses          the first `record` losses (floats, before each update)
    compiles        graphs/programs built during the run (None: not applicable)
    compile_seconds seconds spent building them, where the framework says
    notes           free-form facts (recompile limits hit, fallbacks, ...)
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "environment",
    "load_inputs",
    "measure",
    "measure_plan",
    "peer_main",
    "run_peer",
    "save_inputs",
    "write_result",
]


def save_inputs(path: str | os.PathLike, config: dict, arrays: dict) -> Path:
    """Write the workload's `config` and `arrays` to `path` (an `.npz`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, config=np.array(json.dumps(config)), **arrays)
    return path


def load_inputs(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read what `save_inputs` wrote: `(config, arrays)`."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "config"}
        config = json.loads(str(data["config"]))
    return config, arrays


def write_result(out: str | os.PathLike, name: str, result: dict) -> Path:
    """Write a benchmark's `result` to `<out>/<name>` as JSON; print the path."""
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def environment() -> dict[str, Any]:
    """Facts about the machine at the time of the measurement."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": load,
    }


def ms_spread(seconds: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-step seconds, in milliseconds."""
    return {
        "ms_median": statistics.median(seconds) * 1e3,
        "ms_min": min(seconds) * 1e3,
        "ms_max": max(seconds) * 1e3,
    }


def measure(
    step: Callable[[int], Any],
    sync: Callable[[Any], None],
    loss_value: Callable[[Any], float],
    *,
    marks: Sequence[int],
    record: int,
    block: int,
    repeats: int,
) -> dict[str, Any]:
    """Time a training run the benchmark's way.

    `step(i)` runs training step `i` (the schedule's step `i % len`, the
    peer's business) and returns a handle on its loss; `sync(handle)` waits
    until that step is done; `loss_value(handle)` reads the loss.

    One run of `max(marks)` steps from the first call (so building graphs is
    included): the clock is read after a sync at each mark, and the first
    step is timed alone. Then one untimed block, then `repeats` timed blocks
    of `block` steps (steps 0..block-1 of the schedule, each block synced),
    with the garbage collector paused.
    """
    marks = sorted(set(int(m) for m in marks))
    totals: dict[str, float] = {}
    handles: list[Any] = []
    start = time.perf_counter()
    first = step(0)
    sync(first)
    first_call = time.perf_counter() - start
    handles.append(first)
    last = first
    for i in range(1, marks[-1]):
        if i in marks:  # i steps are done
            sync(last)
            totals[str(i)] = time.perf_counter() - start
        last = step(i)
        if len(handles) < record:
            handles.append(last)
    sync(last)
    totals[str(marks[-1])] = time.perf_counter() - start
    if 1 in marks:
        totals["1"] = first_call
    losses = [loss_value(h) for h in handles[:record]]

    def run_block() -> None:
        h = None
        for i in range(block):
            h = step(i)
        sync(h)

    run_block()  # warm-up
    per_step = []
    gc.disable()
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            run_block()
            per_step.append((time.perf_counter() - t) / block)
    finally:
        gc.enable()
    return {
        "first_call_s": first_call,
        "totals": totals,
        "losses": losses,
        "steady": {
            "median": statistics.median(per_step),
            "min": min(per_step),
            "max": max(per_step),
            "repeats": repeats,
            "block_steps": block,
            "all": per_step,
        },
    }


def measure_plan(
    step: Callable[[int], Any],
    sync: Callable[[Any], None],
    loss_value: Callable[[Any], float],
    config: dict,
) -> dict[str, Any]:
    """`measure` with the plan (`marks`, `record`, `block`, `repeats`) of `config`."""
    plan = {k: config[k] for k in ("marks", "record", "block", "repeats")}
    return measure(step, sync, loss_value, **plan)


def peer_main(
    run: Callable[[str, dict, dict], dict], peers: Sequence[str], argv=None
) -> int:
    """The command line of a peer script: parse, run, write the JSON.

    `run(peer, config, arrays)` returns the result dict (see the module
    docstring) or raises `ImportError` (reported as skipped) or anything else
    (reported as failed, with the error).
    """
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--peer", required=True, choices=list(peers))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    config, arrays = load_inputs(args.inputs)
    try:
        result = run(args.peer, config, arrays)
    except ImportError as err:
        result = {"status": f"skipped: {err.name or err} not installed"}
    except Exception as err:  # noqa: BLE001 - reported in the result
        result = {"status": f"failed: {type(err).__name__}: {err}"[:2000]}
    result.setdefault("status", "ok")
    result["peer"] = args.peer
    result["environment"] = environment()
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    return 0


def run_peer(
    script: str | os.PathLike,
    peer: str,
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    timeout: float = 1800,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one peer in a fresh process; return its result (or why it has none).

    The child gets the parent's environment minus JAX/XLA settings, so that it
    runs with its own framework's defaults.
    """
    out = Path(out_dir) / f"{peer}.json"
    out.unlink(missing_ok=True)
    child_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("XLA_", "JAX_", "TF_XLA_"))
    }
    child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    child_env.update(env or {})
    cmd = [
        sys.executable,
        str(script),
        "--inputs",
        str(inputs),
        "--peer",
        peer,
        "--out",
        str(out),
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=child_env
        )
    except subprocess.TimeoutExpired:
        return {"peer": peer, "status": f"failed: timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {
            "peer": peer,
            "status": f"failed: exit {proc.returncode}: {tail[0][:300]}",
        }
    result = json.loads(out.read_text())
    result["process_wall_s"] = wall
    return result
