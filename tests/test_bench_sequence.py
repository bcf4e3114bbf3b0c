"""bench/workloads/sequence.py through the main benchmark, at a tiny size."""

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import functorch_lite as fl

BENCH = Path(__file__).resolve().parent.parent / "bench"
TINY = {
    "batch": 4,
    "steps_data": 3,
    "max_len": 8,
    "d_embed": 4,
    "d_hidden": 8,
    "marks": [1, 3, 6],
    "record": 6,
    "block": 2,
    "repeats": 1,
    "sweep": [1, 2],
    "sweep_strategies": ["static"],
    "peers": ["torch-padded"],
}


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    bench = _load("retrace_vs_scan", BENCH / "retrace_vs_scan.py")
    argv = ["--workload", "sequence", "--sequence-config", json.dumps(TINY)]
    argv += ["--out", str(out), "--name", "seq", "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        returned = bench.main(argv)
    return returned, json.loads((out / "seq.json").read_text()), stdout.getvalue(), out


def test_every_strategy_and_peer_ran(run):
    _, results, stdout, out = run
    seq = results["sequence"]
    runs = seq["runs"]
    ours = ["dynamic", "bucketed", "static-padded", "static", "fused", "plain-jax"]
    assert list(runs) == [*ours, "torch-padded"]
    for name in ours:
        r = runs[name]
        assert r["process"] == "this"
        st = r["steady"]
        assert 0 < st["min"] <= st["median"] <= st["max"]
        assert r["first_call_s"] > 0 and r["compile_seconds"] > 0
        assert r["us_per_real_token"] >= r["us_per_padded_token"] > 0
        assert r["real_tokens_per_step"] <= r["padded_tokens_per_step"]
    peer = runs["torch-padded"]
    if importlib.util.find_spec("torch") is None:
        assert peer["status"] == "skipped: torch not installed"
    else:
        assert peer["status"] == "ok" and peer["process"] == "own"
    for name in [*ours, "torch-padded"]:
        assert f"| {name}" in (out / "seq.md").read_text(), name
        assert f"| {name}" in stdout


def test_compile_counts_follow_the_distinct_lengths(run):
    _, results, *_ = run
    seq = results["sequence"]
    sys.path.insert(0, str(BENCH))
    from workloads import sequence

    config, arrays = sequence.build(sequence.config(False, **TINY))
    longest = arrays["lengths"].max(axis=1)  # every batch is used (6 steps, 3 batches)
    runs = seq["runs"]
    assert runs["dynamic"]["compiles"] == len(set(longest.tolist()))
    buckets = {
        min(fl.train.bucket_size(int(n)), arrays["tokens"].shape[2]) for n in longest
    }
    assert runs["bucketed"]["compiles"] == len(buckets)
    for name in ("static", "static-padded", "fused", "plain-jax"):
        assert runs[name]["compiles"] == 1, name


def test_losses_agree_across_strategies_and_peers(run):
    _, results, *_ = run
    seq = results["sequence"]
    agree = seq["agreement"]
    ok = [n for n, r in seq["runs"].items() if r.get("status", "ok") == "ok"]
    assert set(agree) == set(ok)
    for name, a in agree.items():
        assert a["steps"] == 6 and a["max_rel_dev"] < 1e-4, name
    losses = seq["runs"]["static"]["losses"]
    assert losses[-1] < losses[0]


def test_inputs_file_round_trips(tmp_path):
    sys.path.insert(0, str(BENCH))
    from peers import protocol
    from workloads import sequence

    config, arrays = sequence.build(sequence.config(False, **TINY))
    path = protocol.save_inputs(tmp_path / "in.npz", config, arrays)
    config2, arrays2 = protocol.load_inputs(path)
    assert config2 == json.loads(json.dumps(config))
    s, b, t = arrays2["tokens"].shape
    assert (s, b) == (3, 4) == arrays2["lengths"].shape and t == TINY["max_len"]
    assert arrays2["tokens"].dtype == np.int32
    rows = arrays2["tokens"].reshape(-1, t)
    for row, n in zip(rows, arrays2["lengths"].ravel(), strict=True):
        assert (row[:n] > 0).all() and (row[n:] == 0).all()
    assert arrays2["lstm.weight_ih_l0"].shape == (4, 32)
    assert arrays2["head.weight"].shape == (8, config["vocab"])


def test_sweep_and_plot(run):
    _, results, _, out = run
    sweep = results["sequence"]["sweep"]
    assert [r["distinct_lengths"] for r in sweep] == [1, 2]
    assert [len(r["widths"]) for r in sweep] == [1, 2]
    assert all(list(r["strategies"]) == ["static"] for r in sweep)
    for row in sweep:
        assert row["distinct_lengths"] >= 1
        for v in row["strategies"].values():
            assert v["us_per_real_token"] > 0 and v["compiles"] >= 1
    if importlib.util.find_spec("matplotlib") is not None:
        png = out / "seq-sequence.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lstm_core_benchmark_agrees_and_profiles_the_core(tmp_path, monkeypatch):
    """bench/lstm_core.py at a tiny size: the core (on the native kernels
    where they build), the core's XLA loops, those with their old stage
    schedule and the generic loop train alike (the loss after one step, which
    follows the gradients), and `--profile` lists the core's costliest XLA ops
    (the loops among them: the kernels' calls, else `while` loops)."""
    bench = _load("lstm_core", BENCH / "lstm_core.py")
    halving, calls = bench._halving_stages, []

    def spy(n):
        calls.append(n)
        return halving(n)

    monkeypatch.setattr(bench, "_halving_stages", spy)
    argv = ["--batch", "20", "--max-len", "8", "--hidden", "16", "--steps-data", "3",
            "--repeats", "1", "--block", "4",
            "--variants", "core,core-xla,core-halving,generic",
            "--lengths", "geometric", "--peers", "", "--profile", "200",
            "--out", str(tmp_path)]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        result = bench.main(argv)
    on_disk = json.loads((tmp_path / "lstm_core-geometric.json").read_text())
    assert on_disk["variants"] == result["variants"] and on_disk["profile"]
    rows = result["variants"]
    # The machine is named in the record (the CPU model, read here apart).
    info = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (info.read_text().splitlines() if info.exists() else [])
        if line.startswith("model name")
    ]
    assert on_disk["cpu_model"] == (names[0] if names else None)
    assert on_disk["cores"] >= 1
    for name in ("core-xla", "generic"):
        np.testing.assert_allclose(
            rows["core"]["second_loss"], rows[name]["second_loss"], rtol=1e-5
        )
    assert on_disk["native_kernels"] == bench._native.status()
    # 20 rows: the finer stages (20, 16, 12, 8, 4) against halving (20, 10, 5).
    np.testing.assert_allclose(
        rows["core"]["second_loss"], rows["core-halving"]["second_loss"], rtol=1e-5
    )
    assert 20 in calls and halving(20) == (20, 10, 5)  # `core-halving` used them
    assert bench._recurrent._stages is bench._STAGES  # and they were put back
    assert bench._recurrent._NATIVE_LSTM is True
    assert rows["core"]["second_loss"] != rows["core"]["first_loss"]
    ops = result["profile"]["ops"]
    # All of the tiny program's ops (at most 200): at this size the kernels
    # are too cheap to rank among the costliest few.
    assert 0 < len(ops) <= 200
    times = [op["ms_per_step"] for op in ops]
    assert times == sorted(times, reverse=True) and times[0] > 0 and times[-1] >= 0
    loop = "ffi_call" if bench._native.available() else "while"
    assert any(op["name"].startswith(loop) for op in ops), ops
    assert "costliest XLA ops" in stdout.getvalue()


def test_loop_kernels_benchmark_writes_its_figures(tmp_path):
    """bench/loop_kernels.py at a tiny size: XLA's per-iteration figures, the
    GFLOP/s that follow from them, and torch.mm from a process of its own
    (None when torch is missing)."""
    bench = _load("loop_kernels", BENCH / "loop_kernels.py")
    argv = ["--iterations", "8", "--repeats", "2", "--rows", "4,2",
            "--out", str(tmp_path)]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        result = bench.main(argv)
    on_disk = json.loads((tmp_path / "loop-kernels.json").read_text())
    assert on_disk == json.loads(json.dumps(result)) and on_disk["cores"] >= 1
    assert set(result["xla_matmul"]) == {"4", "2"}
    for rows, cell in result["xla_matmul"].items():
        assert 0 < cell["min_us"] <= cell["median_us"] <= cell["max_us"]
        flops = 2 * int(rows) * bench.HIDDEN * bench.GATES
        assert cell["gflops"] == pytest.approx(flops / cell["median_us"] / 1e3)
    assert set(result["xla_elementwise"]) == {"trivial", "sigmoid", "tanh"}
    for cell in result["xla_elementwise"].values():
        assert cell["ns_per_element"] == pytest.approx(cell["median_us"] * 1e3 / 16384)
    torch = result["torch_alone"]
    if importlib.util.find_spec("torch") is None:
        assert torch is None
    else:
        for threads in {torch["default_threads"], 1}:
            assert set(torch[f"threads_{threads}"]) == {"4", "2"}
            assert all(c["median_us"] > 0 for c in torch[f"threads_{threads}"].values())
        assert "torch alone" in stdout.getvalue()
