"""The retrace-vs-scan benchmark, run in-process at a tiny size (seconds)."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Terminal

import functorch_lite as fl

BENCH = Path(__file__).resolve().parent.parent / "bench"
OURS = [
    "dynamic",
    "dynamic-nocache",
    "static-scan",
    "static-masked",
    "static",
    "static-specialized",
    "fused",
    "fused-specialized",
    "plain-jax",
]
PEERS = ["torch-eager"]  # in its own process; the others: tests/test_peers.py
STRATEGIES = OURS + PEERS
ONE_COMPILE = [s for s in OURS if not s.startswith("dynamic")]
DEPTHS = [3]
STEPS = [4, 8]
NOCACHE_STEPS = 2
TINY = [
    "--n", "4", "--d-in", "8", "--hidden", "6", "--d-out", "3",
    "--depths", ",".join(map(str, DEPTHS)), "--steps", ",".join(map(str, STEPS)),
    "--repeats", "5", "--block", "4", "--nocache-steps", str(NOCACHE_STEPS),
    "--fuse-k", "4", "--record", "8", "--peak-size", "64", "--name", "tiny",
    "--peers", ",".join(PEERS), "--workload", "dynamicnet",
]  # fmt: skip


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "retrace_vs_scan", BENCH / "retrace_vs_scan.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_script()


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    """One tiny run: (returned results, JSON read back, stdout, stderr, out dir)."""
    out = tmp_path_factory.mktemp("bench")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        returned = bench.main([*TINY, "--out", str(out)])
    on_disk = json.loads((out / "tiny.json").read_text())
    return returned, on_disk, stdout.getvalue(), stderr.getvalue(), out


def _cells(results, strategy):
    return [c for c in results["cells"] if c["strategy"] == strategy]


def _torch_importable() -> bool:
    return importlib.util.find_spec("torch") is not None


def test_json_schema(run):
    returned, results, *_ = run
    assert returned == results
    assert results["schema"] == "functorch_lite/bench/retrace_vs_scan/1"
    for key in ("name", "created", "command", "config", "strategies", "env", "peak",
                "flops_check", "cells", "runs", "crossover", "depth_sequences",
                "wall_seconds", "plot", "outputs"):  # fmt: skip
        assert key in results, key
    env = results["env"]
    for key in ("jax", "jaxlib", "optax", "numpy", "python", "backend",
                "device", "device_kind", "cpu_count"):  # fmt: skip
        assert key in env, key
    assert env["jax"] == jax.__version__
    assert env["backend"] == jax.devices()[0].platform
    assert isinstance(env["cpu_count"], int) and env["cpu_count"] >= 1
    assert results["peak"]["gflops"] > 0 and results["peak"]["size"] == 64
    assert results["config"]["depths"] == DEPTHS
    assert results["config"]["steps"] == STEPS
    # One cell per (strategy, max_depth, steps), each with every field.
    keys = {(c["strategy"], c["max_depth"], c["steps"]) for c in results["cells"]}
    assert keys == {(s, d, n) for s in STRATEGIES for d in DEPTHS for n in STEPS}
    assert len(results["cells"]) == len(keys)
    fields = {
        "status", "compiles", "compile_seconds", "first_call_seconds",
        "steady_seconds", "total_seconds", "total_kind", "total_seconds_model",
        "flops_per_step", "gflops", "peak_fraction",
    }  # fmt: skip
    for cell in results["cells"]:
        assert fields <= set(cell), cell["strategy"]
    # Crossover: each static strategy against `dynamic`, at each max_depth.
    versus = ["dynamic", "torch-eager"] if _torch_importable() else ["dynamic"]
    pairs = {(x["strategy"], x["max_depth"], x["versus"]) for x in results["crossover"]}
    assert pairs == {(s, d, v) for s in ONE_COMPILE for d in DEPTHS for v in versus}
    for x in results["crossover"]:
        first = x["static_wins_from"]
        assert first is None or (isinstance(first, int) and first >= 1)
        assert x["method"].startswith("analytic")


def test_every_strategy_ran(run):
    _, results, *_ = run
    assert results["strategies"] == STRATEGIES
    for cell in results["cells"]:
        if cell["strategy"] == "torch-eager" and not _torch_importable():
            assert cell["status"] == "skipped: torch not installed"
        else:
            assert cell["status"] == "ok", cell
            assert cell["steady_seconds"]["median"] > 0


def test_compile_counts(run):
    _, results, *_ = run
    for name in ONE_COMPILE:
        for cell in _cells(results, name):
            assert cell["compiles"] == 1, (name, cell["max_depth"], cell["steps"])
    for cell in _cells(results, "dynamic"):
        seq = results["depth_sequences"][str(cell["max_depth"])]
        assert cell["compiles"] == len(set(seq[: cell["steps"]])), cell
    for cell in _cells(results, "dynamic-nocache"):
        assert cell["compiles"] == cell["steps"]  # one per step, measured or not
    if _torch_importable():
        # Eager: nothing to compile.
        assert all(c["compiles"] is None for c in _cells(results, "torch-eager"))


def test_losses_match_across_strategies(run):
    _, results, *_ = run
    for depth in DEPTHS:
        runs = {
            r["strategy"]: r["losses"]
            for r in results["runs"]
            if r["max_depth"] == depth and r["status"] == "ok"
        }
        reference = np.asarray(runs["dynamic"])
        assert len(reference) == 8 and np.all(np.isfinite(reference))
        assert np.ptp(reference) > 0  # the params move
        for name, losses in runs.items():
            n = NOCACHE_STEPS if name == "dynamic-nocache" else 8
            assert len(losses) == n, name
            np.testing.assert_allclose(
                losses, reference[:n], rtol=1e-4, err_msg=f"{name}, max_depth={depth}"
            )


def test_timing_figures(run):
    _, results, *_ = run
    for cell in results["cells"]:
        if cell["status"] != "ok":
            continue
        st = cell["steady_seconds"]
        assert 0 < st["min"] <= st["median"] <= st["max"]
        if cell["strategy"] == "dynamic-nocache":
            assert st["repeats"] == NOCACHE_STEPS
            kind = "extrapolated" if cell["steps"] > NOCACHE_STEPS else "measured"
            assert cell["total_kind"] == kind
        else:
            assert st["repeats"] == 5 and st["block_steps"] == 4
            assert cell["total_kind"] == "measured"
        assert cell["first_call_seconds"] > 0
        assert cell["total_seconds"] >= cell["first_call_seconds"] * 0.999
        assert cell["flops_per_step"] > 0 and cell["gflops"] > 0
    for name in STRATEGIES:
        for depth in DEPTHS:
            totals = [
                c["total_seconds"]
                for c in _cells(results, name)
                if c["max_depth"] == depth and c["status"] == "ok"
            ]
            assert totals == sorted(totals)


def test_outputs(run):
    _, results, stdout, stderr, out = run
    markdown = (out / "tiny.md").read_text()
    for name in STRATEGIES:
        label = name + "*" if name in PEERS else name
        assert f"\n{label} " in stdout, name
        assert f"| {label} |" in markdown, name
    # stderr is not a terminal here: the progress display stays silent
    assert "max_depth=3" not in stderr and "[1/" not in stderr, stderr
    if importlib.util.find_spec("matplotlib") is not None:
        png = out / "tiny.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert results["outputs"]["png"] == "tiny.png"
        assert "tiny.png" in markdown
    else:
        assert results["plot"].startswith("skipped")


def test_progress_shows_each_cell_on_a_terminal(bench, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = bench._report.Progress(2, quiet=False)
    progress.line("max_depth=3   static   compiles=1")
    progress.line("max_depth=3   fused    compiles=1")
    progress.close()
    shown = terminal.getvalue()
    assert "[1/2]" in shown and "[2/2]" in shown and "fused    compiles=1" in shown
    quiet = bench._report.Progress(2, quiet=True)
    quiet.line("not shown")
    assert "not shown" not in terminal.getvalue()


def test_no_plot_flag(bench, tmp_path):
    # The cheapest real run: one strategy, one depth, no plot.
    with contextlib.redirect_stdout(io.StringIO()):
        results = bench.main(
            [
                *TINY,
                "--out",
                str(tmp_path),
                "--no-plot",
                "--quiet",
                "--strategies",
                "static",
                "--peers",
                "none",
                "--depths",
                "1",
            ]  # fmt: skip
        )
    assert results["plot"] == "skipped: --no-plot"
    assert not (tmp_path / "tiny.png").exists()
    assert (tmp_path / "tiny.json").exists() and (tmp_path / "tiny.md").exists()
    assert {c["strategy"] for c in results["cells"]} == {"static"}


def test_crossover_is_where_static_total_drops_below_dynamic(bench):
    # dynamic: 0.5 s compile at step 1, another 0.5 s when a new depth shows up
    # at step 3; 2 ms per step. static: 1 s compile, 1 ms per step.
    curve = [0.5, 0.5] + [1.0] * 98
    x = bench.dynamicnet.crossover(1.0, 0.001, curve, 0.002)
    assert x["static_wins_from"] == 3  # 1.003 < 1.006, and 1.002 > 0.504 before
    assert x["dynamic_wins_again_from"] is None and x["static_ahead_at_end"]
    # static slower per step: dynamic's cheaper steps repay its compiles, at
    # s > (1.5005 - 1.0) / (0.002 - 0.001) = 500.5, whether or not the curve
    # reaches that far.
    for length in (10, 1000):
        curve = [0.5, 0.5] + [1.5005] * (length - 2)
        x = bench.dynamicnet.crossover(1.0, 0.002, curve, 0.001)
        assert x["static_wins_from"] == 3
        assert x["dynamic_wins_again_from"] == 501
        assert not x["static_ahead_at_end"]
    # static faster per step but behind within the curve: solved past its end.
    x = bench.dynamicnet.crossover(3.0, 0.001, [1.0] * 10, 0.002)
    assert x["static_wins_from"] == 2001  # 3 + s*0.001 < 1 + s*0.002 from s=2001
    # never
    x = bench.dynamicnet.crossover(3.0, 0.002, [1.0] * 10, 0.001)
    assert x["static_wins_from"] is None and x["dynamic_wins_again_from"] is None


def test_counted_flops_agree_with_xla(bench):
    # At the reference size matmuls are nearly all the work: XLA's count of a
    # dynamic step (no loop to misprice) is within a few percent of ours.
    net = fl.models.DynamicNet(1000, 100, 10, max_depth=3)
    params = net.init(jax.random.key(0))
    x, y = jnp.ones((64, 1000), jnp.float32), jnp.zeros((64, 10), jnp.float32)
    check = bench.dynamicnet._xla_flops_check(net, params, x, y, 3)
    assert check["counted_matmul_flops"] == bench.dynamicnet.count_flops(
        64, 1000, 100, 10, 3
    )
    assert 1.0 <= check["ratio_xla_to_counted"] < 1.05, check
    assert math.isclose(
        bench.dynamicnet.count_flops(64, 1000, 100, 10, 0) + 3 * 2 * 64 * 100 * 100 * 3,
        bench.dynamicnet.count_flops(64, 1000, 100, 10, 3),
    )


def test_peers_do_not_use_the_library():
    outside = ("peers/torch_peer.py", "peers/tf_peer.py", "peers/protocol.py")
    for name in ("_plain_jax.py", "_torch_ref.py", *outside):
        tree = ast.parse((BENCH / name).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert "functorch_lite" not in imported, name
        if name in outside:  # run in their own processes: nothing of JAX
            assert not {"jax", "jaxlib", "optax"} & imported, name


@pytest.mark.skipif(
    any(d.platform == "gpu" for d in jax.devices()), reason="a GPU is present"
)
def test_gpu_backend_without_gpu_exits_cleanly(bench, tmp_path):
    with pytest.raises(SystemExit, match="no gpu device"):
        bench.main([*TINY, "--out", str(tmp_path), "--backend", "gpu"])


def _load_peak_gap():
    spec = importlib.util.spec_from_file_location("peak_gap", BENCH / "peak_gap.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_gap_measures_the_reference_step(tmp_path):
    """bench/peak_gap.py: its plain-JAX loss is the library's, and its bound is
    the sum of the matmul times it reports."""
    gap = _load_peak_gap()
    x, y, params = gap._data()
    net = fl.models.DynamicNet(gap.D_IN, gap.H, gap.D_OUT)
    for depth in range(4):
        ours = fl.nn.mse_loss(net.apply(params, x, depth), y)
        np.testing.assert_allclose(gap.plain_loss(params, x, y, depth), ours, rtol=1e-5)

    # The switch over specialized steps (--interleaved) trains as the library does,
    # and so does the fused step with static_method="scan".
    depths = np.array([3, 0, 2, 1], np.int32)
    switch_losses = gap._switch_call(depths)()[1]
    fused_losses = gap._fused_call(depths)()[2]
    np.testing.assert_allclose(switch_losses, fused_losses, rtol=1e-5)
    scan_losses = gap._fused_call(depths, "scan")()[2]
    np.testing.assert_allclose(scan_losses, fused_losses, rtol=1e-5)
    recompute_losses = gap._fused_call(depths, residuals=False)()[2]
    np.testing.assert_allclose(recompute_losses, fused_losses, rtol=1e-5)
    for call in (gap._minimal_call, gap._grad_switch_call):
        np.testing.assert_allclose(call(depths)()[1], fused_losses, rtol=1e-5)
    specialized_losses = gap._fused_call(depths, specialize=True)()[2]
    np.testing.assert_allclose(specialized_losses, fused_losses, rtol=1e-5)
    # The hand-written loop's reverse pass is the unrolled loss's gradient, with
    # no step and with every step run (float64, against JAX's own
    # differentiation of plain_loss). The training losses above also check
    # its updates at depths 3, 0 and 2 against the library's.
    with jax.enable_x64(True):
        p64, x64, y64 = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64), (params, x[:8], y[:8])
        )
        for depth in (0, 3):
            got = jax.grad(gap.minimal_loss)(p64, x64, y64, jnp.int32(depth))
            want = jax.grad(gap.plain_loss)(p64, x64, y64, depth)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)

    # --profile's per-op times: a program of one matmul and one tanh, run as
    # "2 steps" per call, lists both ops once per step.
    a = jnp.ones((64, 64))
    program = jax.jit(lambda a: jnp.tanh(a @ a))
    prof = gap._profile_ops(lambda: program(a), steps=2, top=10)
    names = [op["name"] for op in prof["ops"]]
    assert any("dot" in n or "ynn" in n for n in names), names
    assert any("tanh" in n for n in names), names
    assert prof["kernel_us_per_step"] > 0
    assert all(op["us_per_step"] >= 0 for op in prof["ops"])
    counted = [
        op for op in prof["ops"] if any(k in op["name"] for k in ("dot", "ynn", "tanh"))
    ]
    assert counted and all(op["per_step"] == 0.5 for op in counted), counted

    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert gap.main(["--repeats", "1", "--loop", "3", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("peak-gap-*.json")
    assert str(path) in out.getvalue()
    data = json.loads(path.read_text())
    assert data["environment"]["backend"] == jax.default_backend()
    assert data["environment"]["cpu_count"] >= 1
    assert data["peak"]["gflops"] > 0
    steps = data["steps"]
    assert [f"plain-jax unrolled, depth {d}" for d in range(4)] == list(steps)[:4]
    assert "functorch_lite fused (K=500, depths 0..3)" in steps
    for s in steps.values():
        t = s["time"]
        assert 0 < t["min"] <= t["median"] <= t["max"]
        assert s["peak_fraction"] == pytest.approx(s["gflops"] / data["peak"]["gflops"])

    def best(name):
        m = data["matmuls"][name]
        return min(m["xla"]["median"], m.get("torch", m["xla"])["median"])

    middle = sum(best(n) for n in data["matmuls"] if n.startswith("middle"))
    depth = data["bound"]["mean_depth"]
    flops = gap.count_flops(gap.N, gap.D_IN, gap.H, gap.D_OUT, depth)
    out_share = (flops - gap.count_flops(gap.N, gap.D_IN, gap.H, gap.D_OUT, 0)) / depth
    assert out_share == pytest.approx(6 * gap.N * gap.H * gap.H)
    seconds = data["bound"]["seconds"]
    # The bound: the input layer's two matmuls, `depth` middle layers and the
    # small output layer (1% of the FLOPs).
    core = best("input fwd x@W1") + best("input wgrad x.T@g") + depth * middle
    assert core <= seconds <= 1.05 * core
    assert data["bound"]["gflops"] == pytest.approx(flops / seconds / 1e9)


def test_fit_overhead_trains_the_same_params_both_ways(tmp_path):
    """bench/fit_overhead.py: fit and the bare loop run the same steps (same
    final params), and the report has every variant with a sane ratio."""
    spec = importlib.util.spec_from_file_location(
        "fit_overhead", BENCH / "fit_overhead.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    step, params, opt_state, x, y = module._setup("tiny", guard=False)
    batches = [(x, y, jnp.int32(d)) for d in (0, 3, 1, 2, 3)]
    bare = module._bare(step, module.copy(params), module.copy(opt_state), batches)
    fitted = module._fit(step, module.copy(params), module.copy(opt_state), batches)
    for a, b in zip(jax.tree.leaves(bare), jax.tree.leaves(fitted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with contextlib.redirect_stdout(io.StringIO()):
        result = module.main(
            [
                "--steps",
                "12",
                "--repeats",
                "1",
                "--sizes",
                "tiny",
                "--out",
                str(tmp_path),
            ]
        )
    names = [r["variant"] for r in result["rows"]]
    assert names == ["bare", "fit", "fit-ckpt", "bare-guarded", "fit-guarded"]
    for r in result["rows"]:
        assert 0 < r["min_us"] <= r["median_us"] <= r["max_us"]
        assert r["ratio_to_bare"] > 0
    saved = json.loads((tmp_path / "fit-overhead.json").read_text())
    assert saved["rows"] == result["rows"] and saved["cores"] >= 1


_LINUX_2_CORES = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity")
    or not os.path.isdir("/proc/self/task")
    or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and at least 2 cores",
)
_XLA_THREADS_PROBE = """
import collections, contextlib, json, os, sys
sys.path.insert(0, sys.argv[1])
import _xla_threads
record = _xla_threads.start(1)
import jax.numpy as jnp
(jnp.ones((256, 256)) @ jnp.ones((256, 256))).block_until_ready()
names, masks = collections.Counter(), set()
for t in os.listdir("/proc/self/task"):
    with contextlib.suppress(OSError):  # a thread that has ended meanwhile
        name = open(f"/proc/self/task/{t}/comm").read().strip()
        masks.add(tuple(sorted(os.sched_getaffinity(int(t)))))
        names[name] += 1
try:
    _xla_threads.start(1)
    again = None
except SystemExit as err:
    again = str(err)
print(json.dumps({"record": record, "names": names, "masks": sorted(masks),
                  "again": again, "cores": sorted(os.sched_getaffinity(0))}))
"""


@_LINUX_2_CORES
def test_xla_threads_starts_the_cpu_runtime_with_one_thread():
    """bench/_xla_threads.py (`--xla-threads 1`): XLA's CPU pool gets one thread,
    while every thread of the process may still run on every core."""
    probe = subprocess.run(
        [sys.executable, "-c", _XLA_THREADS_PROBE, str(BENCH)],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("XLA_")},
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert got["record"]["xla_cpu_threads"] == 1
    pool = [n for n in got["names"] if "XLAEigen" in n]
    if not pool:
        pytest.skip(f"no XLA pool thread found by name in {sorted(got['names'])}")
    assert sum(got["names"][n] for n in pool) == 1, got["names"]
    assert got["masks"] == [got["cores"]]  # nothing left pinned
    assert "already started" in got["again"]


def test_xla_threads_rejects_a_count_it_cannot_give(monkeypatch):
    if not hasattr(os, "sched_getaffinity") or not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux")
    monkeypatch.syspath_prepend(str(BENCH))
    import _xla_threads  # noqa: PLC0415

    cores = len(os.sched_getaffinity(0))
    for bad in (0, cores + 1):
        with pytest.raises(SystemExit, match=f"expected 1 to {cores}.*got {bad}"):
            _xla_threads.start(bad)
    jax.devices()  # this process's JAX runs already, so it is too late
    with pytest.raises(SystemExit, match="already started"):
        _xla_threads.start(1)
    assert _xla_threads.start(None)["xla_cpu_threads"] is None


@_LINUX_2_CORES
def test_retrace_vs_scan_records_xla_threads(tmp_path):
    """`--xla-threads 1` reaches the run's JSON and its markdown report."""
    tiny = list(TINY)
    tiny[tiny.index("--peers") + 1] = "none"
    cmd = [sys.executable, str(BENCH / "retrace_vs_scan.py"), *tiny, "--quiet"]
    cmd += ["--strategies", "static", "--no-plot", "--xla-threads", "1"]
    run = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    env = json.loads((tmp_path / "tiny.json").read_text())["env"]
    assert env["xla_cpu_threads"] == 1 and env["cpu_count"] >= 2
    report = (tmp_path / "tiny.md").read_text()
    assert "JAX's CPU runtime ran 1 thread(s) (`--xla-threads 1`" in report
    assert "the peers had every core" not in report  # --peers none
