"""Start JAX's CPU runtime with fewer threads than the machine has cores.

XLA's CPU client sizes its thread pool once, when JAX first uses the CPU, from
the cores the process may run on (its affinity mask); JAX has no other setting
for it. `start(n)` narrows the mask to `n` cores, starts the CPU backend, and
widens the mask again for every thread: the pool keeps `n` threads, and every
thread, and every process started later (the peers), may run on every core.
`taskset -c 0 python ...` gives the pool one thread too, but keeps the whole
process on one core.

Why a benchmark wants this: on a 2-core machine, DynamicNet's small steps gain
nothing from XLA's second thread, and programs with loops lose 10-25% to
handing work between the two threads (bench/RESULTS.md, "One XLA thread").
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
from jax._src import xla_bridge

_STARTED: dict[str, Any] = {"xla_cpu_threads": None}


def start(threads: int | None) -> dict[str, Any]:
    """Start JAX's CPU backend with a pool of `threads` threads (None: JAX's default).

    Must run before anything uses JAX's CPU backend; returns what to record.
    """
    if threads is None:
        return record()
    if not hasattr(os, "sched_setaffinity"):
        raise SystemExit("--xla-threads: needs os.sched_setaffinity (Linux).")
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(cores):
        raise SystemExit(
            f"--xla-threads: expected 1 to {len(cores)} (this process's cores); "
            f"got {threads}."
        )
    if xla_bridge.backends_are_initialized():
        raise SystemExit(
            "--xla-threads: JAX's backend already started; it must be set first."
        )
    os.sched_setaffinity(0, cores[:threads])
    try:
        jax.devices("cpu")  # creates the CPU client, and its pool, now
    finally:
        # Every thread started meanwhile (the pool's, JAX's own) may again run
        # on every core: the pool keeps its size.
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task), cores)
    _STARTED["xla_cpu_threads"] = threads
    _STARTED["xla_cpu_cores"] = cores[:threads]
    return record()


def record() -> dict[str, Any]:
    """`{"xla_cpu_threads": n or None (JAX's default: one per core), ...}`."""
    return dict(_STARTED)
