"""Start JAX's CPU runtime with fewer threads than the machine has cores.

XLA's CPU client sizes its thread pool once, when JAX first uses the CPU, from
the cores that the starting thread may run on (Linux keeps an affinity mask per
thread, and a new thread inherits its creator's); JAX has no other setting for
it. `start(n)` narrows the calling thread's mask to `n` cores, starts the CPU
backend, and widens the masks again (its own, and those of the threads started
meanwhile): the pool keeps `n` threads, and every thread, and every process
started later (the peers), may run on every core. `taskset -c 0 python ...`
gives the pool one thread too, but keeps the whole process on one core.

Why a benchmark wants this: on the 2-core Intel Xeon of 2026-12-07, DynamicNet's
small steps ran 9-27% faster on one XLA thread than on JAX's default two
(bench/RESULTS.md, "One XLA thread"), while the LSTM core's native kernels,
which split rows over XLA's threads, ran 1.38x slower.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any

import jax

_STARTED: dict[str, Any] = {"xla_cpu_threads": None}
_TASKS = "/proc/self/task"


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--xla-threads N` to a benchmark's command line; pass it to `start`."""
    parser.add_argument(
        "--xla-threads",
        type=int,
        default=None,
        metavar="N",
        help="start JAX's CPU runtime with N threads instead of one per core "
        "(bench/_xla_threads.py); processes started later keep every core",
    )


def _backend_started() -> bool:
    try:  # JAX's own answer; private, so it may move
        from jax._src import xla_bridge  # noqa: PLC0415
    except ImportError:
        return False  # then `start` cannot tell, and trusts its caller
    started = getattr(xla_bridge, "backends_are_initialized", None)
    if started is None:  # a JAX without it: ask for the backends' cache instead
        return bool(getattr(xla_bridge, "_backends", {}))
    return started()


def _threads() -> set[int]:
    return {int(t) for t in os.listdir(_TASKS)}


def start(threads: int | None) -> dict[str, Any]:
    """Start JAX's CPU backend with a pool of `threads` threads (None: JAX's default).

    Must run before anything uses JAX's backend; returns what to record.
    """
    if threads is None:
        return record()
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir(_TASKS):
        raise SystemExit("--xla-threads: needs Linux (os.sched_setaffinity, /proc).")
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(cores):
        raise SystemExit(
            f"--xla-threads: expected 1 to {len(cores)} (this process's cores); "
            f"got {threads}."
        )
    if _backend_started():
        raise SystemExit(
            "--xla-threads: JAX's backend already started; it must be set first."
        )
    before = _threads()
    os.sched_setaffinity(0, cores[:threads])
    try:
        jax.devices("cpu")  # creates the CPU client, and its pool, now
    finally:
        os.sched_setaffinity(0, cores)
        # The threads started meanwhile (the pool's, JAX's own) may again run on
        # every core; the pool keeps its size. A thread may start another while
        # we go, so look again until no new one shows up.
        widened: set[int] = set()
        while new := _threads() - before - widened:
            for task in new:
                with contextlib.suppress(ProcessLookupError):  # it has ended
                    os.sched_setaffinity(task, cores)
            widened |= new
    _STARTED["xla_cpu_threads"] = threads
    _STARTED["xla_cpu_cores"] = cores[:threads]
    return record()


def record() -> dict[str, Any]:
    """`{"xla_cpu_threads": n or None (JAX's default: one per core), ...}`."""
    return dict(_STARTED)
