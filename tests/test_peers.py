"""The benchmark's peers (bench/peers/): each trains the same model as the library.

The PyTorch and TensorFlow peers run in their own processes in the benchmark;
here each framework's peers share one fresh process (tests/_peer_driver.py), so
that neither framework is imported into the pytest process. The benchmark's own
path, one peer per process through `protocol.run_peer`, is exercised by
tests/test_bench.py and tests/test_bench_sequence.py. Their recorded
losses are checked against the library training the same model from the same
inputs. Skipped when the framework is not installed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functorch_lite as fl

PEERS_DIR = Path(__file__).resolve().parent.parent / "bench" / "peers"
DRIVER = Path(__file__).resolve().parent / "_peer_driver.py"
sys.path.insert(0, str(PEERS_DIR))

import protocol  # noqa: E402

PLAN = {"marks": [1, 3, 6], "record": 6, "block": 2, "repeats": 1}
FIELDS = ("first_call_s", "totals", "steady", "losses", "compiles", "versions")


def _dynamicnet_inputs(tmp_path, depths=(0, 1, 2, 3, 3, 1, 0, 2), **extra):
    r = np.random.default_rng(0)
    d_in, h, d_out, n = 8, 6, 3, 4
    arrays = {
        "x": r.standard_normal((n, d_in)).astype(np.float32),
        "y": r.standard_normal((n, d_out)).astype(np.float32),
        "depths": np.array(depths, np.int32),
    }
    shapes = {
        "input_linear": (d_in, h),
        "middle_linear": (h, h),
        "output_linear": (h, d_out),
    }
    for name, (i, o) in shapes.items():
        arrays[f"{name}.weight"] = (r.standard_normal((i, o)) * 0.3).astype(np.float32)
        arrays[f"{name}.bias"] = (r.standard_normal(o) * 0.1).astype(np.float32)
    config = {"workload": "dynamicnet", "lr": 1e-3, "momentum": 0.9, "max_depth": 3}
    config.update(PLAN, **extra)
    path = protocol.save_inputs(tmp_path / "dynamicnet.npz", config, arrays)
    return path, config, arrays


def _sequence_inputs(tmp_path, **extra):
    r = np.random.default_rng(1)
    v, e, h, s, b, t = 7, 4, 5, 4, 3, 9
    lengths = r.integers(2, t + 1, (s, b)).astype(np.int32)
    tokens = np.zeros((s, b, t), np.int32)
    for i in range(s):
        for j in range(b):
            tokens[i, j, : lengths[i, j]] = r.integers(1, v, lengths[i, j])

    def w(*shape, scale=0.3):
        return (r.standard_normal(shape) * scale).astype(np.float32)

    arrays = {
        "tokens": tokens,
        "lengths": lengths,
        "embedding.weight": w(v, e, scale=1.0),
        "lstm.weight_ih_l0": w(e, 4 * h),
        "lstm.weight_hh_l0": w(h, 4 * h),
        "lstm.bias_ih_l0": w(4 * h, scale=0.1),
        "lstm.bias_hh_l0": w(4 * h, scale=0.1),
        "head.weight": w(h, v),
        "head.bias": np.zeros(v, np.float32),
    }
    config = {"workload": "sequence", "vocab": v, "d_embed": e, "d_hidden": h}
    config.update(lr=0.5, momentum=0.9, **PLAN)
    config.update(extra)
    path = protocol.save_inputs(tmp_path / "sequence.npz", config, arrays)
    return path, config, arrays


_REFERENCE: dict = {}


def _reference_losses(config, arrays, steps=6):
    """The library training the same model on the same inputs (once per inputs:
    several peers train from the same ones)."""
    key = (
        config["workload"],
        config["lr"],
        config["momentum"],
        steps,
        tuple(
            (k, v.dtype.str, v.shape, v.tobytes()) for k, v in sorted(arrays.items())
        ),
    )
    if key not in _REFERENCE:
        _REFERENCE[key] = _train_reference(config, arrays, steps)
    return list(_REFERENCE[key])


def _train_reference(config, arrays, steps):
    opt = optax.sgd(config["lr"], momentum=config["momentum"])
    if config["workload"] == "dynamicnet":
        d_in, h = arrays["input_linear.weight"].shape
        net = fl.models.DynamicNet(d_in, h, arrays["output_linear.weight"].shape[1])
        names = ("input_linear", "middle_linear", "output_linear")
        params = {
            n: {k: jnp.asarray(arrays[f"{n}.{k}"]) for k in ("weight", "bias")}
            for n in names
        }

        def loss(p, depth):
            pred = net.apply(p, jnp.asarray(arrays["x"]), depth)
            return fl.nn.mse_loss(pred, jnp.asarray(arrays["y"]), reduction="sum")

        def inputs(i):
            return (int(arrays["depths"][i % len(arrays["depths"])]),)

        grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # one per depth

    else:
        model = fl.models.CharLSTM(
            vocab_size=config["vocab"],
            d_embed=config["d_embed"],
            d_hidden=config["d_hidden"],
        )
        lstm = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        params = {
            "embedding": {"weight": jnp.asarray(arrays["embedding.weight"])},
            "lstm": {k: jnp.asarray(arrays[f"lstm.{k}"]) for k in lstm},
            "head": {k: jnp.asarray(arrays[f"head.{k}"]) for k in ("weight", "bias")},
        }

        def inputs(i):
            s = i % len(arrays["tokens"])
            return jnp.asarray(arrays["tokens"][s]), jnp.asarray(arrays["lengths"][s])

        grad = jax.jit(jax.value_and_grad(model.loss))  # one program

    state, out = opt.init(params), []
    for i in range(steps):
        value, grads = grad(params, *inputs(i))
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(float(value))
    return out


def _check(result, config, arrays, rtol=1e-4):
    assert result.get("status", "ok") == "ok", result["status"]
    for key in FIELDS:
        assert key in result, key
    assert set(result["totals"]) == {str(m) for m in config["marks"]}
    totals = [result["totals"][str(m)] for m in config["marks"]]
    assert totals == sorted(totals) and totals[0] == result["first_call_s"] > 0
    st = result["steady"]
    assert 0 < st["min"] <= st["median"] <= st["max"] and st["block_steps"] == 2
    assert len(result["losses"]) == config["record"]
    want = _reference_losses(config, arrays)
    np.testing.assert_allclose(result["losses"], want, rtol=rtol)
    assert want[-1] < want[0]  # it trains


def _run_in_one_process(tmp_path, jobs):
    """Run (script, peer, inputs) jobs in one fresh process; their results."""
    out = tmp_path / "results.json"
    args = [f"{script}:{peer}:{inputs}" for script, peer, inputs in jobs]
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


# ------------------------------------------------------------------- PyTorch


def test_torch_peers_train_the_same_model(tmp_path):
    pytest.importorskip("torch")
    dyn, dyn_config, dyn_arrays = _dynamicnet_inputs(tmp_path)
    seq, seq_config, seq_arrays = _sequence_inputs(tmp_path)
    # torch.compile's default backend (inductor) runs once, on DynamicNet at
    # one depth (one graph and its backward); the other compiled peers check
    # dynamo's graphs and guards, which do not depend on the backend, under
    # the cheaper "aot_eager": inductor's C++ builds took 42 s of the test's
    # 46 s with four depths, cold.
    (tmp_path / "inductor").mkdir()
    one, one_config, one_arrays = _dynamicnet_inputs(
        tmp_path / "inductor", depths=(2,) * 8
    )
    cheap = {"torch_compile_backend": "aot_eager"}
    (tmp_path / "cheap").mkdir()
    dyn_cheap, *_ = _dynamicnet_inputs(tmp_path / "cheap", **cheap)
    seq_cheap, *_ = _sequence_inputs(tmp_path / "cheap", **cheap)
    # Six distinct depths against a limit of 3: dynamo falls back to eager.
    (tmp_path / "limit").mkdir()
    lim, *_ = _dynamicnet_inputs(
        tmp_path / "limit", depths=list(range(6)) * 2, torch_recompile_limit=3, **cheap
    )
    script = "torch_peer.py"
    eager, inductor, compiled, dynamic, packed, padded, seq_compiled, limited = (
        _run_in_one_process(
            tmp_path,
            [
                (script, "torch-eager", dyn),
                (script, "torch-compile", one),
                (script, "torch-compile", dyn_cheap),
                (script, "torch-compile-dynamic", dyn_cheap),
                (script, "torch-packed", seq),
                (script, "torch-padded", seq),
                (script, "torch-compile", seq_cheap),
                (script, "torch-compile", lim),
            ],
        )
    )
    _check(eager, dyn_config, dyn_arrays)
    assert eager["compiles"] is None and eager["threads"] >= 1
    _check(inductor, one_config, one_arrays)
    assert inductor["compiles"] == 1 and inductor["compile_backend"] == "inductor"
    _check(compiled, dyn_config, dyn_arrays)
    assert compiled["compile_backend"] == "aot_eager"
    assert compiled["compiles"] == 4 and not compiled["recompile_limit_hit"]
    assert set(compiled["compile_per_depth"]) == {"0", "1", "2", "3"}
    _check(dynamic, dyn_config, dyn_arrays)
    assert dynamic["compiles"] >= 1 and not dynamic["recompile_limit_hit"]
    assert set(dynamic["compile_per_depth"]) == {"0", "1", "2", "3"}
    _check(packed, seq_config, seq_arrays)
    _check(padded, seq_config, seq_arrays)
    _check(seq_compiled, seq_config, seq_arrays)
    assert limited["status"] == "ok"
    assert limited["recompile_limit_hit"] and limited["compiles"] == 3
    assert any("recompile limit (3)" in n for n in limited["notes"])


# ---------------------------------------------------------------- TensorFlow


def test_tf_peers_train_the_same_model(tmp_path):
    pytest.importorskip("tensorflow")
    dyn, config, arrays = _dynamicnet_inputs(tmp_path)
    seq, seq_config, seq_arrays = _sequence_inputs(tmp_path)
    script = "tf_peer.py"
    tensor, by_int, tensor_xla, int_xla, keras, keras_xla = _run_in_one_process(
        tmp_path,
        [
            (script, "tf-function-tensor", dyn),
            (script, "tf-function-int", dyn),
            (script, "tf-function-tensor-xla", dyn),
            (script, "tf-function-int-xla", dyn),
            (script, "tf-keras-lstm", seq),
            (script, "tf-keras-lstm-xla", seq),
        ],
    )
    _check(tensor, config, arrays)
    # One graph for every depth (plus Keras's first-call retrace).
    assert tensor["compiles"] <= 2
    _check(by_int, config, arrays)
    assert by_int["compiles"] >= 4  # one trace per distinct depth
    assert set(by_int["compile_per_depth"]) == {"0", "1", "2", "3"}
    # XLA cannot differentiate the zero-trip loop of depth 0: a clean skip.
    assert tensor_xla["status"].startswith("skipped: XLA refused the step at depth 0")
    _check(int_xla, config, arrays)
    assert set(int_xla["compile_per_depth"]) == {"0", "1", "2", "3"}
    _check(keras, seq_config, seq_arrays)
    _check(keras_xla, seq_config, seq_arrays)


def test_a_missing_framework_is_a_one_line_skip(tmp_path, monkeypatch):
    path, config, arrays = _dynamicnet_inputs(tmp_path)
    out = tmp_path / "r.json"
    # A fresh process whose import of torch fails.
    blocker = tmp_path / "torch.py"
    blocker.write_text("raise ImportError('no torch here', name='torch')\n")
    result = protocol.run_peer(
        PEERS_DIR / "torch_peer.py",
        "torch-eager",
        path,
        tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result["status"] == "skipped: torch not installed", result
    assert not out.exists()
