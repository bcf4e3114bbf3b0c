"""Time per XLA op of a compiled CPU program, from a jax.profiler trace.

Shared by `peak_gap.py --profile` and `lstm_core.py --profile`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

# Events that are not one op: the profiler's thread-pool bookkeeping, the ends
# of asynchronous ops, and the whole program.
_BOOKKEEPING = ("Threadpool", "end:", "ThunkExecutor")


def op_times(run: Callable[[], Any], steps: int) -> dict[str, list[float]]:
    """Run `run()` once under jax.profiler: `{op: [microseconds, calls]}` per step.

    `run` runs `steps` training steps and returns what to wait for. Each op's
    events are summed over every thread that runs the program's ops (XLA's
    CPU client and worker threads; the Python thread is left out), per step. A
    `while` op's time includes the ops of its body, which are listed too. Ops
    on two cores can overlap, so the times need not add up to the step.
    """
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            jax.block_until_ready(run())
        (trace,) = Path(folder).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(trace))
    totals: dict[str, list[float]] = {}
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if event.name.startswith(_BOOKKEEPING):
                    continue
                total = totals.setdefault(event.name, [0.0, 0.0])
                total[0] += event.duration_ns / 1e3 / steps
                total[1] += 1 / steps
    return totals


def costliest(
    totals: dict[str, list[float]], top: int
) -> list[tuple[str, list[float]]]:
    """The `top` ops that took the most time, costliest first."""
    return sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
