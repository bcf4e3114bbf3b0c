"""The DynamicNet workload: when does compiling once beat retracing per depth?

Trains the reference DynamicNet (N=64, D_in=1000, H=100, D_out=10, summed MSE, SGD
lr 1e-4 momentum 0.9) with a depth drawn uniformly from [0, max_depth] each step
(one seeded sequence per max_depth, the same for every strategy). Strategies
(measured in this process) and peers (each in its own, bench/peers/) are listed
in bench/retrace_vs_scan.py, the command line that runs this module.


* total seconds: measured directly. Each (strategy, max_depth) starts one fresh run
  (new step function, fresh copy of the same initial params) and walks the depth
  sequence for max(steps) steps; the clock starts before the first call, so
  compiles are included, and is read (after a sync) at each step count of the
  sweep and on a log grid of step counts for the plot. The only
  exception is `dynamic-nocache`, which is measured over `--nocache-steps` steps
  and extrapolated beyond (marked "extrapolated" in the JSON, "~" in the table).
* first call: the first call of that run (trace + compile + one step; for `fused`,
  one call of K steps).
* compiles and compile seconds: the library's accounting (`step.stats`: trace,
  lowering and backend compile); for `plain-jax`, `fl.compile_counter` and the same
  three `jax.monitoring` events.
* steady per-step: after that run (which is the warm-up) and one more untimed
  block, `--repeats` timed blocks of the first `--block` depths of the sequence,
  each block ending with `block_until_ready`, divided by its step count. Median,
  min and max over the repeats. The repeats go round-robin over the strategies
  (rotating the order), with the garbage collector paused, so that load from
  other processes on a shared machine lands on every strategy alike.
  `dynamic-nocache`'s "steady" step is its measured steps, each timed alone.
* crossover: analytic. total(s) = compile seconds up to step s + s x steady
  median, where the dynamic path's compile seconds grow as new depths first appear
  in the sequence (depths not yet seen are priced from a linear fit of the
  measured compile seconds per depth). The crossover is the smallest s at which a
  static strategy's total is below `dynamic`'s.
* FLOPs per step: counted, matmuls only (2*m*n*k each; forward, and both backward
  products except the input layer's unused input gradient), for the depths of the
  timed block. XLA's `cost_analysis` is recorded once as a check: it prices a
  loop body once, whatever the trip count, so it cannot price the static graphs.
* matmul peak: a square float32 matmul timed the same way, in the same run.
* peers: each in a new Python process that imports only its framework
  (bench/peers/protocol.py), with that framework's defaults (threads included),
  from the same initial weights, data and depth sequence (written once to an
  `.npz`). The same plan: one run with the clock read at each mark, then timed
  blocks; their figures are not round-robin with ours, so the load average at
  each peer's start is recorded. `torch-eager-inprocess` (opt-in) is the
  reference program inside this process, labelled as such.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import functorch_lite as fl

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))

import _plain_jax  # noqa: E402
import _xla_threads  # noqa: E402
from _report import STATIC_NAMES, Progress  # noqa: E402
from peers import protocol  # noqa: E402

SCHEMA = "functorch_lite/bench/retrace_vs_scan/1"
STRATEGIES = (
    "dynamic",
    "dynamic-nocache",
    "static-scan",
    "static-masked",
    "static",
    "static-specialized",
    "fused",
    "fused-specialized",
    "plain-jax",
    "torch-eager-inprocess",
)
# Not run unless asked for: the torch reference program inside this process,
# which has already run JAX (slower than torch alone; labelled as such).
OPTIONAL_STRATEGIES = ("torch-eager-inprocess",)
STATIC_STRATEGIES = STATIC_NAMES  # one compile each; the report marks their wins
# Peers, each in its own fresh process (bench/peers/), with its own defaults.
PEERS = {
    "torch-eager": "torch_peer.py",
    "torch-compile": "torch_peer.py",
    "torch-compile-dynamic": "torch_peer.py",
    "tf-function-int": "tf_peer.py",
    "tf-function-tensor": "tf_peer.py",
    "tf-function-int-xla": "tf_peer.py",
    "tf-function-tensor-xla": "tf_peer.py",
}
PEERS_DIR = BENCH / "peers"
QUICK = {
    "depths": (3, 16),
    "steps": (10, 100, 500),
    "repeats": 5,
    "block": 50,
    "peers": ("torch-eager", "torch-compile", "tf-function-tensor"),
}
FULL = {
    "depths": (3, 8, 16, 32, 64),
    "steps": (10, 100, 500, 2000),
    "repeats": 7,
    "block": 100,
    "peers": tuple(PEERS),
}
HORIZON = 100_000  # steps of the depth sequence used to price the crossover
LR, MOMENTUM = 1e-4, 0.9
DEFAULT_OUT = BENCH / "results"

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# ----------------------------------------------------------------------- config


class _EventSeconds:
    """Trace, lowering and backend-compile seconds of one jitted function.

    A direct `jax.monitoring` listener, for the `plain-jax` peer, whose step is not
    an `fl.jit` and so has no `.stats`.
    """

    def __init__(self, fun_name: str) -> None:
        self.names = {fun_name, f"jit({fun_name})"}
        self.seconds = 0.0
        self.compiles = 0

    def __call__(self, event: str, duration: float, **kwargs: Any) -> None:
        if kwargs.get("fun_name") not in self.names:
            return
        if event in (_TRACE_EVENT, _LOWER_EVENT, _COMPILE_EVENT):
            self.seconds += duration
        if event == _COMPILE_EVENT:
            self.compiles += 1

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        jax.monitoring.register_event_duration_secs_listener(self)
        try:
            yield
        finally:
            jax.monitoring.unregister_event_duration_listener(self)


def _sync(tree: Any) -> None:
    jax.block_until_ready(tree)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Collect once, then keep the collector out of the timed region (as `timeit`)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------- runners


class _Runner:
    """One strategy's training loop: `reset()`, then `run(depths)` repeatedly.

    `unit` is the number of steps per call (K for `fused`, else 1); `run` is only
    given multiples of it. While `tracking`, `run` records the cumulative compile
    seconds after every step, so that the crossover can price each new depth.
    """

    unit = 1

    def __init__(self, name: str, record: int) -> None:
        self.name = name
        self.record = record
        self.tracking = False
        self.compile_trace: list[float] = []
        self.handles: list[Any] = []

    def reset(self) -> None:
        self.compile_trace = []
        self.handles = []

    def run(self, depths: Sequence[int]) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def compiles(self) -> int:
        return 0

    def compile_seconds(self) -> float:
        return 0.0

    def losses(self) -> list[float]:
        flat = np.concatenate([np.ravel(np.asarray(h)) for h in self.handles])
        return [float(v) for v in flat[: self.record]]

    def close(self) -> None:
        pass


class _StepRunner(_Runner):
    """A `make_step` strategy (`dynamic`, `static*`) or the `plain-jax` peer."""

    def __init__(
        self,
        name: str,
        make: Callable[[], tuple[Any, optax.GradientTransformation]],
        master: Any,
        x: jax.Array,
        y: jax.Array,
        record: int,
        *,
        events: _EventSeconds | None = None,
    ) -> None:
        super().__init__(name, record)
        self.make, self.master, self.x, self.y = make, master, x, y
        self.events = events
        self._stack = contextlib.ExitStack()

    def reset(self) -> None:
        super().reset()
        self.close()
        self.step, optimizer = self.make()
        # make_step donates params and opt_state: every run gets its own copy.
        self.params = jax.tree.map(jnp.copy, self.master)
        self.opt_state = optimizer.init(self.params)
        self.loss = None
        if self.events is not None:
            # Opened once per run, not per call, so that the peer's timed loop
            # carries no accounting the library's loop would not.
            self.counter = self._stack.enter_context(
                fl.compile_counter(fun_name="plain_jax_step")
            )
            self._stack.enter_context(self.events.listening())

    def run(self, depths: Sequence[int]) -> None:
        step, x, y = self.step, self.x, self.y
        params, opt_state = self.params, self.opt_state
        loss = self.loss
        for depth in depths:
            params, opt_state, loss = step(params, opt_state, x, y, depth)
            if len(self.handles) < self.record:
                self.handles.append(loss)
            if self.tracking:
                self.compile_trace.append(self.compile_seconds())
        self.params, self.opt_state, self.loss = params, opt_state, loss

    def sync(self) -> None:
        _sync((self.params, self.opt_state, self.loss))

    def compiles(self) -> int:
        if self.events is not None:
            return self.counter.compiles
        return self.step.stats.compiles

    def compile_seconds(self) -> float:
        if self.events is not None:
            return self.events.seconds
        return self.step.stats.compile_seconds

    def close(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()


class _NoCacheRunner(_StepRunner):
    """`dynamic-nocache`: a new `make_step`, so a new trace and compile, every step."""

    def reset(self) -> None:
        super().reset()
        self._compiles, self._seconds = 0, 0.0

    def run(self, depths: Sequence[int]) -> None:
        for depth in depths:
            step, _ = self.make()
            self.params, self.opt_state, self.loss = step(
                self.params, self.opt_state, self.x, self.y, depth
            )
            self._compiles += step.stats.compiles
            self._seconds += step.stats.compile_seconds
            if len(self.handles) < self.record:
                self.handles.append(self.loss)
            if self.tracking:
                self.compile_trace.append(self._seconds)

    def compiles(self) -> int:
        return self._compiles

    def compile_seconds(self) -> float:
        return self._seconds


class _FusedRunner(_StepRunner):
    """`fused`: K steps per call of `make_fused_step`, depths fed as a (K,) array."""

    def __init__(self, *args: Any, k: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unit = k

    def run(self, depths: Sequence[int]) -> None:
        k = self.unit
        params, opt_state, losses = self.params, self.opt_state, self.loss
        for i in range(0, len(depths), k):
            chunk = jnp.asarray(depths[i : i + k], dtype=jnp.int32)
            params, opt_state, losses = self.step(
                params, opt_state, self.x, self.y, chunk
            )
            if len(self.handles) * k < self.record:
                self.handles.append(losses)
            if self.tracking:
                self.compile_trace.extend([self.step.stats.compile_seconds] * k)
        self.params, self.opt_state, self.loss = params, opt_state, losses


class _TorchRunner(_Runner):
    """`torch-eager`: the PyTorch reference program, from the same initial weights."""

    def __init__(self, name: str, master_np: Any, x, y, record: int, device: str):
        super().__init__(name, record)
        self.master_np, self.x, self.y, self.device = master_np, x, y, device

    def reset(self) -> None:
        super().reset()
        from _torch_ref import TorchReference

        self.ref = TorchReference(
            self.master_np, self.x, self.y, lr=LR, momentum=MOMENTUM, device=self.device
        )

    def run(self, depths: Sequence[int]) -> None:
        for depth in depths:
            loss = self.ref.step(depth)
            if len(self.handles) < self.record:
                self.handles.append(loss)
            if self.tracking:
                self.compile_trace.append(0.0)

    def sync(self) -> None:
        self.ref.sync()

    def losses(self) -> list[float]:
        return self.ref.losses(self.handles)[: self.record]


# ------------------------------------------------------------------ measuring


def _steady(
    runners: dict[str, _Runner], window: list[int], repeats: int
) -> dict[str, dict[str, Any]]:
    """Time `repeats` blocks of `window` per runner; per-step median, min and max.

    The repeats go round-robin over the runners (each round in a rotated order),
    so that a burst of load from elsewhere on a shared machine lands on every
    strategy alike rather than on whichever happened to be running.
    """
    names = list(runners)
    for name in names:  # one more untimed block each: the warm-up
        runners[name].run(window)
        runners[name].sync()
    per_step: dict[str, list[float]] = {name: [] for name in names}
    with _no_gc():
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                runner = runners[name]
                start = time.perf_counter()
                runner.run(window)
                runner.sync()
                per_step[name].append((time.perf_counter() - start) / len(window))
    return {
        name: {
            "median": statistics.median(times),
            "min": min(times),
            "max": max(times),
            "repeats": repeats,
            "block_steps": len(window),
            "all": times,
        }
        for name, times in per_step.items()
    }


def _checkpoints(steps: list[int], unit: int) -> list[int]:
    """The sweep's step counts plus a log-spaced grid, all multiples of `unit`."""
    grid = np.unique(np.geomspace(1, max(steps), 24).round().astype(int))
    points = {int(-(-g // unit) * unit) for g in grid} | set(steps)
    return sorted(p for p in points if p <= max(steps))


def _measure(runner: _Runner, seq: list[int], cfg: dict[str, Any]) -> dict[str, Any]:
    """One fresh run of max(steps) steps, the clock read at each checkpoint.

    Checkpoints are the sweep's step counts (the table's totals) and a log grid
    (the plot's measured total-time line); each read follows a sync.
    """
    steps = cfg["steps"]
    runner.reset()
    runner.tracking = True
    gc.collect()
    start = time.perf_counter()
    unit = runner.unit
    runner.run(seq[:unit])
    runner.sync()
    first_call = time.perf_counter() - start
    marks: dict[int, dict[str, Any]] = {}
    curve: list[list[float]] = []
    done = unit
    for s in _checkpoints(steps, unit):
        if s > done:
            runner.run(seq[done:s])
            runner.sync()
            done = s
        total = time.perf_counter() - start if s > unit else first_call
        curve.append([s, total])
        if s in steps:
            marks[s] = {
                "total_seconds": total,
                "compiles": runner.compiles(),
                "compile_seconds": runner.compile_seconds(),
                "total_kind": "measured",
            }
    runner.tracking = False
    return {
        "first_call_seconds": first_call,
        "first_call_steps": unit,
        "marks": marks,
        "curve": curve,
        "compile_trace": list(runner.compile_trace),
        "losses": runner.losses(),
        "window": seq[: cfg["block_steps"]],
    }


def _measure_nocache(
    runner: _NoCacheRunner, seq: list[int], cfg: dict[str, Any]
) -> dict[str, Any]:
    """A few steps, each a fresh trace and compile, blocked and timed one by one."""
    n = cfg["nocache_steps"]
    runner.reset()
    per_step, totals, compiles, seconds = [], [], [], []
    start = time.perf_counter()
    for depth in seq[:n]:
        t = time.perf_counter()
        runner.run([depth])
        runner.sync()
        now = time.perf_counter()
        per_step.append(now - t)
        totals.append(now - start)
        compiles.append(runner.compiles())
        seconds.append(runner.compile_seconds())
    median = statistics.median(per_step)
    mean_compile = seconds[-1] / n
    marks = {}
    for s in cfg["steps"]:
        if s <= n:
            marks[s] = {
                "total_seconds": totals[s - 1],
                "compiles": compiles[s - 1],
                "compile_seconds": seconds[s - 1],
                "total_kind": "measured",
            }
        else:
            # Extrapolated: every further step is one more trace and compile.
            marks[s] = {
                "total_seconds": totals[-1] + (s - n) * median,
                "compiles": s,
                "compile_seconds": seconds[-1] + (s - n) * mean_compile,
                "total_kind": "extrapolated",
            }
    return {
        "first_call_seconds": per_step[0],
        "first_call_steps": 1,
        "marks": marks,
        "curve": [[i + 1, t] for i, t in enumerate(totals)],
        "steady": {
            "median": median,
            "min": min(per_step),
            "max": max(per_step),
            "repeats": n,
            "block_steps": 1,
            "all": per_step,
            "note": "each step is a new trace + compile + run, timed one by one",
        },
        "compile_trace": seconds,
        "losses": runner.losses(),
        "window": seq[:n],
    }


def count_flops(
    n: int, d_in: int, d_hidden: int, d_out: int, depth: int | float
) -> float:
    """Matmul FLOPs of one training step at `depth` (2*m*n*k per matmul).

    Forward and the weight gradient of every layer, and the input gradient of all
    but the input layer (its input `x` needs none). Biases, ReLU, loss and the
    optimizer are left out (well under 1%).
    """
    input_layer = 2 * n * d_in * d_hidden * 2
    middle = 2 * n * d_hidden * d_hidden * 3
    output_layer = 2 * n * d_hidden * d_out * 3
    return float(input_layer + depth * middle + output_layer)


def _matmul_peak(size: int, repeats: int) -> dict[str, Any]:
    """GFLOP/s of a square float32 matmul, median of `repeats` blocked calls."""
    key_a, key_b = jax.random.split(jax.random.key(1))
    a = jax.random.normal(key_a, (size, size), jnp.float32)
    b = jax.random.normal(key_b, (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    _sync(matmul(a, b))
    _sync(matmul(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _sync(matmul(a, b))
        times.append(time.perf_counter() - start)
    flops = 2.0 * size**3
    median = statistics.median(times)
    return {
        "size": size,
        "dtype": "float32",
        "flops": flops,
        "seconds_median": median,
        "seconds_min": min(times),
        "seconds_max": max(times),
        "repeats": repeats,
        "gflops": flops / median / 1e9,
        "gflops_best": flops / min(times) / 1e9,
    }


def _xla_flops_check(net: Any, master: Any, x, y, depth: int) -> dict[str, Any]:
    """XLA's cost analysis of one `dynamic` step (a fixed depth), beside the count."""

    def loss_fn(params, x, y, depth):
        return fl.nn.mse_loss(net.apply(params, x, depth, mode="dynamic"), y)

    optimizer = optax.sgd(LR, momentum=MOMENTUM)
    step = fl.train.make_step(loss_fn, optimizer, static_argnames=("depth",))
    try:
        analysis = step.lower(master, optimizer.init(master), x, y, depth)
        cost = analysis.compile().cost_analysis()
        if isinstance(cost, list | tuple):  # older JAX returned one dict per device
            cost = cost[0] if cost else {}
        xla = float(cost.get("flops", float("nan")))
    except Exception as err:  # cost analysis is best effort on some backends
        return {"depth": depth, "error": f"{type(err).__name__}: {err}"}
    counted = count_flops(x.shape[0], x.shape[1], net.d_hidden, y.shape[1], depth)
    return {
        "depth": depth,
        "xla_flops": xla,
        "counted_matmul_flops": counted,
        "ratio_xla_to_counted": xla / counted if counted else None,
    }


# ------------------------------------------------------------------ crossover


def crossover(
    static_compile: float,
    static_step: float,
    dynamic_compile: Sequence[float] | np.ndarray,
    dynamic_step: float,
) -> dict[str, Any]:
    """Where a static strategy's total time drops below `dynamic`'s, analytically.

    total_static(s) = static_compile + s * static_step and total_dynamic(s) =
    dynamic_compile[s-1] + s * dynamic_step, for s = 1..len(dynamic_compile);
    `dynamic_compile` is the cumulative compile seconds after each step (it must
    have stopped growing by its end: every depth seen). Past its end, the totals
    are two straight lines and the last change of lead is solved exactly.

    Returns:
      `static_wins_from`: the smallest s with total_static(s) < total_dynamic(s)
      (None if never); `dynamic_wins_again_from`: the s after which `dynamic` is
      ahead for good (None if static stays ahead); `static_ahead_at_end`.
    """
    cd = np.asarray(dynamic_compile, dtype=np.float64)
    s = np.arange(1, len(cd) + 1, dtype=np.float64)
    static_total = static_compile + s * static_step
    dynamic_total = cd + s * dynamic_step
    ahead = static_total < dynamic_total
    first = int(np.argmax(ahead)) + 1 if ahead.any() else None
    final_cd = float(cd[-1]) if len(cd) else 0.0
    horizon = len(cd)
    # Beyond the horizon both totals are lines; the lead changes at most once.
    if static_step < dynamic_step:
        static_ahead_at_end = True
        if first is None:
            first = max(
                horizon + 1,
                math.floor((static_compile - final_cd) / (dynamic_step - static_step))
                + 1,
            )
        again = None
    elif static_step > dynamic_step:
        static_ahead_at_end = False
        if first is None:
            again = None
        else:
            # Last s (within the horizon or beyond) where static is still ahead.
            last_in = int(np.nonzero(ahead)[0][-1]) + 1
            beyond = math.ceil(
                (final_cd - static_compile) / (static_step - dynamic_step)
            )  # static ahead while s < beyond
            last = max(last_in, beyond - 1) if beyond - 1 > horizon else last_in
            again = last + 1
    else:
        static_ahead_at_end = bool(ahead[-1]) if len(ahead) else False
        again = None
    return {
        "static_wins_from": first,
        "dynamic_wins_again_from": again,
        "static_ahead_at_end": static_ahead_at_end,
        "method": "analytic: total(s) = compile seconds up to step s + s * steady "
        "median; dynamic's compile seconds grow as new depths first appear",
    }


def _dynamic_compile_curve(
    trace: list[float], long_seq: np.ndarray, measured_steps: int
) -> np.ndarray:
    """Dynamic's cumulative compile seconds over `long_seq`, priced per new depth.

    The measured run gives the compile seconds of each depth it saw; later new
    depths are priced by a straight-line fit of those seconds against depth.
    """
    trace_arr = np.asarray(trace[:measured_steps], dtype=np.float64)
    deltas = np.diff(np.concatenate([[0.0], trace_arr]))
    seen: dict[int, float] = {}
    for i in range(len(trace_arr)):
        d = int(long_seq[i])
        if d not in seen:
            seen[d] = float(deltas[i])
    depths = np.array(sorted(seen), dtype=np.float64)
    costs = np.array([seen[int(d)] for d in depths])
    if len(depths) >= 2:
        slope, intercept = np.polyfit(depths, costs, 1)
    else:
        slope, intercept = 0.0, float(costs.mean()) if len(costs) else 0.0
    floor = float(costs.min()) if len(costs) else 0.0
    extra = np.zeros(len(long_seq))
    known = set(seen)
    for i in range(len(trace_arr), len(long_seq)):
        d = int(long_seq[i])
        if d not in known:
            known.add(d)
            extra[i] = max(floor, intercept + slope * d)
    curve = np.concatenate([trace_arr, np.zeros(len(long_seq) - len(trace_arr))])
    curve[len(trace_arr) :] = trace_arr[-1] if len(trace_arr) else 0.0
    return curve + np.cumsum(extra)


# ----------------------------------------------------------------------- main


def _environment(device: Any, torch_status: dict[str, Any]) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "optax": optax.__version__,
        "numpy": np.__version__,
        "functorch_lite": getattr(fl, "__version__", None),
        "torch": torch_status.get("version"),
        "torch_threads": torch_status.get("threads"),
        "torch_device": torch_status.get("device"),
        "torch_omp_wait_policy": torch_status.get("omp_wait_policy"),
        "matplotlib": version("matplotlib"),
        "backend": device.platform,
        "device": str(device),
        "device_kind": getattr(device, "device_kind", None),
        "cpu_count": _cores(),
        "cpu_model": protocol.cpu_model(),
        "load_average_at_start": (
            list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        ),
        "persistent_compilation_cache": jax.config.jax_compilation_cache_dir or None,
        **_xla_threads.record(),
    }


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _select_device(backend: str) -> Any:
    if backend == "auto":
        backend = "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"
    try:
        return jax.devices(backend)[0]
    except RuntimeError as err:
        raise SystemExit(
            f"--backend {backend}: JAX has no {backend} device here ({err}). Use "
            "--backend cpu, or install a GPU build of jaxlib."
        ) from err


def _torch_setup(device: Any, threads: int) -> dict[str, Any]:
    preloaded = "torch" in sys.modules
    # torch runs with its own OpenMP defaults unless the caller sets
    # OMP_WAIT_POLICY: on a quiet machine PASSIVE makes its steps about 2x
    # slower (measured here: 1.2 vs 2.3 ms/step at max_depth 3), which would
    # flatter us. On a loaded machine spinning threads can collapse instead;
    # run the benchmark on a quiet machine, or set the variable and say so.
    try:
        import torch
    except ImportError:
        return {"status": "skipped: torch not installed", "version": None}
    status: dict[str, Any] = {
        "version": torch.__version__,
        "omp_wait_policy": None if preloaded else os.environ.get("OMP_WAIT_POLICY"),
    }
    if device.platform == "gpu":
        if not torch.cuda.is_available():
            status["status"] = "skipped: torch has no CUDA device"
            return status
        status["device"] = "cuda"
    else:
        status["device"] = "cpu"
    torch.set_num_threads(threads)
    status["threads"] = torch.get_num_threads()
    # The first optimizer built in a process imports more of torch (seconds):
    # pay that here, not inside the first measured run.
    layer = torch.nn.Linear(2, 2).to(status["device"])
    warm = torch.optim.SGD(layer.parameters(), lr=LR, momentum=MOMENTUM)
    layer(torch.ones(1, 2, device=status["device"])).sum().backward()
    warm.step()
    status["status"] = "ok"
    return status


def _make_runners(
    cfg: dict[str, Any],
    max_depth: int,
    master: Any,
    master_np: Any,
    x,
    y,
    x_np,
    y_np,
    torch_status: dict[str, Any],
) -> dict[str, _Runner | str]:
    d_in, d_hidden, d_out = cfg["d_in"], cfg["d_hidden"], cfg["d_out"]
    record = cfg["record_losses"]

    def net(method: str = "bounded") -> Any:
        return fl.models.DynamicNet(
            d_in, d_hidden, d_out, max_depth=max_depth, static_method=method
        )

    def step_maker(
        method: str, mode: str, *, fused: bool = False, specialize: bool = False
    ) -> Callable:
        model = net(method)

        def loss_fn(params, x, y, depth):
            return fl.nn.mse_loss(model.apply(params, x, depth, mode=mode), y)

        def make() -> tuple[Any, optax.GradientTransformation]:
            optimizer = optax.sgd(LR, momentum=MOMENTUM)
            if fused:
                return (
                    fl.train.make_fused_step(
                        loss_fn,
                        optimizer,
                        shared_argnames=("x", "y"),
                        specialize={"depth": max_depth + 1} if specialize else None,
                    ),
                    optimizer,
                )
            if specialize:
                branches = {"depth": max_depth + 1}
                return fl.train.make_step(
                    loss_fn, optimizer, specialize=branches
                ), optimizer
            static = ("depth",) if mode == "dynamic" else ()
            return fl.train.make_step(
                loss_fn, optimizer, static_argnames=static
            ), optimizer

        return make

    common = (master, x, y, record)
    runners: dict[str, _Runner | str] = {}
    for name in cfg["strategies"]:
        if name == "dynamic":
            runners[name] = _StepRunner(name, step_maker("bounded", "dynamic"), *common)
        elif name == "dynamic-nocache":
            runners[name] = _NoCacheRunner(
                name, step_maker("bounded", "dynamic"), *common
            )
        elif name == "static-scan":
            runners[name] = _StepRunner(name, step_maker("scan", "static"), *common)
        elif name == "static-masked":
            runners[name] = _StepRunner(name, step_maker("masked", "static"), *common)
        elif name == "static":
            runners[name] = _StepRunner(name, step_maker("bounded", "static"), *common)
        elif name == "fused":
            runners[name] = _FusedRunner(
                name,
                step_maker("bounded", "static", fused=True),
                *common,
                k=cfg["fuse_k"],
            )
        elif name == "static-specialized":
            runners[name] = _StepRunner(
                name, step_maker("bounded", "dynamic", specialize=True), *common
            )
        elif name == "fused-specialized":
            # One compile of max_depth + 1 straight-line branches (the dynamic
            # path's programs), `lax.switch` picking each step's.
            runners[name] = _FusedRunner(
                name,
                step_maker("bounded", "dynamic", fused=True, specialize=True),
                *common,
                k=cfg["fuse_k"],
            )
        elif name == "plain-jax":

            def make_plain() -> tuple[Any, optax.GradientTransformation]:
                return _plain_jax.make_plain_jax_step(max_depth, LR, MOMENTUM)

            runners[name] = _StepRunner(
                name, make_plain, *common, events=_EventSeconds("plain_jax_step")
            )
        elif name == "torch-eager-inprocess":
            if torch_status["status"] != "ok":
                runners[name] = torch_status["status"]
            else:
                runners[name] = _TorchRunner(
                    name, master_np, x_np, y_np, record, torch_status["device"]
                )
    return runners


def _peer_inputs(
    cfg: dict[str, Any], max_depth: int, master_np: Any, x_np, y_np, seq, folder: Path
) -> Path:
    """Write what every peer process of this max_depth reads."""
    arrays = {"x": x_np, "y": y_np, "depths": np.asarray(seq, np.int32)}
    for layer, leaves in master_np.items():
        for leaf, value in leaves.items():
            arrays[f"{layer}.{leaf}"] = np.asarray(value, np.float32)
    config = {
        "workload": "dynamicnet",
        "max_depth": max_depth,
        "lr": LR,
        "momentum": MOMENTUM,
        "marks": _checkpoints(cfg["steps"], 1),
        "record": cfg["record_losses"],
        "block": cfg["block_steps"],
        "repeats": cfg["repeats"],
    }
    return protocol.save_inputs(folder / f"dynamicnet-{max_depth}.npz", config, arrays)


def _peer_result(res: dict[str, Any], seq: list[int], cfg: dict[str, Any]) -> dict:
    """A peer's JSON in the shape of an in-process strategy's measurement."""
    totals = {int(k): v for k, v in res["totals"].items()}
    compile_seconds = res.get("compile_seconds")
    marks = {
        s: {
            "total_seconds": totals[s],
            "compiles": res.get("compiles"),
            "compile_seconds": compile_seconds or 0.0,
            "total_kind": "measured",
        }
        for s in cfg["steps"]
    }
    steady = dict(res["steady"])
    return {
        "first_call_seconds": res["first_call_s"],
        "first_call_steps": 1,
        "marks": marks,
        "curve": sorted([s, t] for s, t in totals.items()),
        "compile_trace": [],
        "losses": res["losses"][: cfg["record_losses"]],
        "window": seq[: steady["block_steps"]],
        "steady": steady,
        "peer": {
            k: res.get(k)
            for k in (
                "versions",
                "threads",
                "notes",
                "environment",
                "process_wall_s",
                "recompile_limit_hit",
                "compile_per_depth",
            )
            if res.get(k) is not None
        },
    }


def _run_peers(
    cfg: dict[str, Any], inputs: Path, folder: Path, progress: Any, max_depth: int
) -> dict[str, dict[str, Any] | str]:
    """Run each peer in its own fresh process; a result, or why there is none."""
    out: dict[str, dict[str, Any] | str] = {}
    for peer in cfg["peers"]:
        res = protocol.run_peer(PEERS_DIR / PEERS[peer], peer, inputs, folder)
        out[peer] = res if res.get("status") == "ok" else str(res.get("status"))
        if isinstance(out[peer], str):
            progress.line(f"max_depth={max_depth:<3} {peer:<16} {out[peer]}")
        else:
            progress.line(
                f"max_depth={max_depth:<3} {peer:<16} (own process) "
                f"compiles={res.get('compiles')} first call="
                f"{res['first_call_s']:.3f}s steady="
                f"{res['steady']['median'] * 1e3:.3g} ms/step"
            )
    return out


def _crossovers(
    results: dict[str, dict[str, Any]],
    long_seq: np.ndarray,
    cfg: dict[str, Any],
    max_depth: int,
) -> list[dict[str, Any]]:
    """Each one-compile strategy against `dynamic` and against `torch-eager`."""
    out = []
    max_steps = max(cfg["steps"])
    for versus in ("dynamic", "torch-eager"):
        if versus not in results:
            continue
        other = results[versus]
        if versus == "dynamic":
            curve = _dynamic_compile_curve(other["compile_trace"], long_seq, max_steps)
        else:
            curve = np.zeros(max_steps)  # eager: nothing to compile
        for name in STATIC_STRATEGIES:
            if name not in results:
                continue
            res = results[name]
            x = crossover(
                res["marks"][max_steps]["compile_seconds"],
                res["steady"]["median"],
                curve,
                other["steady"]["median"],
            )
            measured = {}
            for s in cfg["steps"]:
                a = res["marks"][s]["total_seconds"]
                b = other["marks"][s]["total_seconds"]
                measured[str(s)] = {"total": a, "versus_total": b, "static_wins": a < b}
            out.append(
                {
                    "max_depth": max_depth,
                    "strategy": name,
                    "versus": versus,
                    **x,
                    "measured": measured,
                }
            )
    return out


def _cells_for(
    name: str,
    max_depth: int,
    result: dict[str, Any],
    cfg: dict[str, Any],
    peak_gflops: float,
) -> list[dict[str, Any]]:
    counted = [
        count_flops(cfg["n"], cfg["d_in"], cfg["d_hidden"], cfg["d_out"], d)
        for d in result["window"]
    ]
    flops = float(np.mean(counted))
    executed = (
        count_flops(cfg["n"], cfg["d_in"], cfg["d_hidden"], cfg["d_out"], max_depth)
        if name == "static-masked"
        else flops
    )
    steady = result["steady"]
    gflops = flops / steady["median"] / 1e9
    cells = []
    for s, mark in result["marks"].items():
        model = mark["compile_seconds"] + s * steady["median"]
        if name == "dynamic-nocache":
            model = s * steady["median"]
        cells.append(
            {
                "strategy": name,
                "max_depth": max_depth,
                "steps": s,
                "status": "ok",
                "compiles": mark["compiles"],
                "compile_seconds": mark["compile_seconds"],
                "first_call_seconds": result["first_call_seconds"],
                "first_call_steps": result["first_call_steps"],
                "steady_seconds": {
                    k: steady[k]
                    for k in ("median", "min", "max", "repeats", "block_steps")
                },
                "total_seconds": mark["total_seconds"],
                "total_kind": mark["total_kind"],
                "total_seconds_model": model,
                "flops_per_step": flops,
                "executed_flops_per_step": executed,
                "flops_source": "counted (matmuls; mean over the timed block's depths)",
                "gflops": gflops,
                "peak_fraction": gflops / peak_gflops if peak_gflops else None,
            }
        )
    return cells


def _skipped_cells(name: str, max_depth: int, status: str, steps: list[int]) -> list:
    keys = (
        "compiles",
        "compile_seconds",
        "first_call_seconds",
        "first_call_steps",
        "steady_seconds",
        "total_seconds",
        "total_kind",
        "total_seconds_model",
        "flops_per_step",
        "executed_flops_per_step",
        "flops_source",
        "gflops",
        "peak_fraction",
    )
    return [
        {
            "strategy": name,
            "max_depth": max_depth,
            "steps": s,
            "status": status,
            **dict.fromkeys(keys),
        }
        for s in steps
    ]


def run_benchmark(
    cfg: dict[str, Any],
    device: Any,
    quiet: bool,
    peak_size: int,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Measure every strategy at every max_depth; return the JSON-ready results."""
    wall_start = time.perf_counter()
    cores = _cores()
    if "torch-eager-inprocess" in cfg["strategies"]:
        torch_status = _torch_setup(device, torch_threads or cores)
    else:
        torch_status = {"status": "not run", "version": None}
    env = _environment(device, torch_status)
    peer_dir = Path(tempfile.mkdtemp(prefix="retrace_vs_scan-peers-"))
    n, d_in, d_out = cfg["n"], cfg["d_in"], cfg["d_out"]
    data_rng = np.random.default_rng(cfg["seed"])
    x_np = data_rng.standard_normal((n, d_in)).astype(np.float32)
    y_np = data_rng.standard_normal((n, d_out)).astype(np.float32)
    x = jax.device_put(x_np, device)
    y = jax.device_put(y_np, device)
    max_steps = max(cfg["steps"])

    n_cells = len(cfg["depths"]) * (len(cfg["strategies"]) + len(cfg["peers"]) + 1) + 2
    progress = Progress(n_cells, quiet)
    peak = _matmul_peak(peak_size, repeats=5)
    progress.line(
        f"matmul peak {peak_size}x{peak_size} float32: {peak['gflops']:.1f} GFLOP/s "
        f"on {env['device']} ({cores} cores)"
    )

    cells: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    crossovers: list[dict[str, Any]] = []
    sequences: dict[str, list[int]] = {}
    flops_check = None
    for max_depth in cfg["depths"]:
        long_seq = np.random.default_rng([cfg["seed"], max_depth]).integers(
            0, max_depth + 1, size=max(HORIZON, max_steps)
        )
        seq = [int(d) for d in long_seq[:max_steps]]
        sequences[str(max_depth)] = seq
        params_net = fl.models.DynamicNet(
            d_in, cfg["d_hidden"], d_out, max_depth=max_depth
        )
        master = jax.device_put(params_net.init(jax.random.key(cfg["seed"])), device)
        master_np = jax.tree.map(np.array, master)
        if flops_check is None:
            flops_check = _xla_flops_check(params_net, master, x, y, min(3, max_depth))
        runners = _make_runners(
            cfg, max_depth, master, master_np, x, y, x_np, y_np, torch_status
        )
        results: dict[str, dict[str, Any]] = {}
        live: dict[str, _Runner] = {}
        try:
            # Phase 1: one fresh run per strategy (first call, totals, compiles).
            for name, runner in runners.items():
                if isinstance(runner, str):
                    cells.extend(_skipped_cells(name, max_depth, runner, cfg["steps"]))
                    runs.append(
                        {
                            "strategy": name,
                            "max_depth": max_depth,
                            "status": runner,
                            "losses": [],
                        }
                    )
                    progress.line(f"max_depth={max_depth:<3} {name:<16} {runner}")
                    continue
                if name == "dynamic-nocache":
                    assert isinstance(runner, _NoCacheRunner)
                    result = _measure_nocache(runner, seq, cfg)
                    runner.close()
                else:
                    result = _measure(runner, seq, cfg)
                    live[name] = runner
                results[name] = result
                last = result["marks"][max_steps]
                progress.line(
                    f"max_depth={max_depth:<3} {name:<16} "
                    f"compiles={last['compiles']:<4} "
                    f"first call={result['first_call_seconds']:.3f}s "
                    f"total@{max_steps}={last['total_seconds']:.2f}s"
                    + (" (extrapolated)" if last["total_kind"] != "measured" else "")
                )
            # Phase 2: steady per-step time, round-robin over the strategies.
            window = seq[: cfg["block_steps"]]
            for name, steady in _steady(live, window, cfg["repeats"]).items():
                results[name]["steady"] = steady
        finally:
            for runner in live.values():
                runner.close()
        progress.line(
            f"max_depth={max_depth:<3} steady ms/step (median of {cfg['repeats']} "
            f"x {cfg['block_steps']} steps): "
            + ", ".join(
                f"{name} {res['steady']['median'] * 1e3:.3g}"
                for name, res in results.items()
            )
        )
        if cfg["peers"]:
            inputs = _peer_inputs(cfg, max_depth, master_np, x_np, y_np, seq, peer_dir)
            for peer, res in _run_peers(
                cfg, inputs, peer_dir, progress, max_depth
            ).items():
                if isinstance(res, str):
                    cells.extend(_skipped_cells(peer, max_depth, res, cfg["steps"]))
                    runs.append(
                        {
                            "strategy": peer,
                            "max_depth": max_depth,
                            "status": res,
                            "losses": [],
                        }
                    )
                else:
                    results[peer] = _peer_result(res, seq, cfg)
        for name, result in results.items():
            cells.extend(_cells_for(name, max_depth, result, cfg, peak["gflops"]))
            runs.append(
                {
                    "strategy": name,
                    "max_depth": max_depth,
                    "status": "ok",
                    "losses": result["losses"],
                    "steady_all_seconds": result["steady"]["all"],
                    "compiles_total": result["marks"][max_steps]["compiles"],
                    # [steps, measured total seconds] along the fresh run.
                    "total_curve": result["curve"],
                    "process": "own" if "peer" in result else "this",
                    **({"peer": result["peer"]} if "peer" in result else {}),
                }
            )
            if name == "dynamic":
                # Per step, for the plot's total-time line and the crossover.
                runs[-1]["compile_seconds_by_step"] = result["compile_trace"]
        crossovers.extend(_crossovers(results, long_seq, cfg, max_depth))
    # The peak again at the end: on a shared machine the load may have changed.
    peak_end = _matmul_peak(peak_size, repeats=5)
    progress.line(
        f"matmul peak again: {peak_end['gflops']:.1f} GFLOP/s (start "
        f"{peak['gflops']:.1f}); the higher one is reported as the peak"
    )
    progress.close()
    starting = peak
    peak = dict(max(peak, peak_end, key=lambda p: p["gflops"]))
    peak["gflops_start"], peak["gflops_end"] = starting["gflops"], peak_end["gflops"]
    for cell in cells:
        if cell.get("gflops") is not None:
            cell["peak_fraction"] = cell["gflops"] / peak["gflops"]
    shutil.rmtree(peer_dir, ignore_errors=True)
    for run in runs:  # the peers' framework versions, for the report
        for name, version in run.get("peer", {}).get("versions", {}).items():
            env.setdefault("peer_versions", {})[name] = version
    return {
        "schema": SCHEMA,
        "env": env,
        "torch_status": torch_status["status"],
        "peak": peak,
        "flops_check": flops_check,
        "cells": cells,
        "runs": runs,
        "crossover": crossovers,
        "depth_sequences": sequences,
        "wall_seconds": time.perf_counter() - wall_start,
    }
