"""The benchmark's peers (bench/peers/): each trains the same model as the library.

The PyTorch and TensorFlow peers run in their own processes in the benchmark;
here most are called in-process (to keep the suite short) and one per
framework through `protocol.run_peer`, a real fresh process. Their recorded
losses are checked against the library training the same model from the same
inputs. Skipped when the framework is not installed.
"""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functorch_lite as fl

PEERS_DIR = Path(__file__).resolve().parent.parent / "bench" / "peers"
sys.path.insert(0, str(PEERS_DIR))

import protocol  # noqa: E402

PLAN = {"marks": [1, 3, 6], "record": 6, "block": 2, "repeats": 1}
FIELDS = ("first_call_s", "totals", "steady", "losses", "compiles", "versions")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, PEERS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def _sequence_inputs(tmp_path):
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
    path = protocol.save_inputs(tmp_path / "sequence.npz", config, arrays)
    return path, config, arrays


def _reference_losses(config, arrays, steps=6):
    """The library training the same model on the same inputs."""
    opt = optax.sgd(config["lr"], momentum=config["momentum"])
    if config["workload"] == "dynamicnet":
        d_in, h = arrays["input_linear.weight"].shape
        net = fl.models.DynamicNet(d_in, h, arrays["output_linear.weight"].shape[1])
        names = ("input_linear", "middle_linear", "output_linear")
        params = {
            n: {k: jnp.asarray(arrays[f"{n}.{k}"]) for k in ("weight", "bias")}
            for n in names
        }

        def loss(p, i):
            depth = int(arrays["depths"][i % len(arrays["depths"])])
            pred = net.apply(p, jnp.asarray(arrays["x"]), depth)
            return fl.nn.mse_loss(pred, jnp.asarray(arrays["y"]), reduction="sum")

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

        def loss(p, i):
            s = i % len(arrays["tokens"])
            tokens = jnp.asarray(arrays["tokens"][s])
            return model.loss(p, tokens, jnp.asarray(arrays["lengths"][s]))

    state, out = opt.init(params), []
    for i in range(steps):
        value, grads = jax.value_and_grad(loss)(params, i)
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


# ------------------------------------------------------------------- PyTorch


# torch.compile imports torch.jit, which warns of its own deprecation.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_peers_train_the_same_model(tmp_path):
    pytest.importorskip("torch")
    torch_peer = _load("torch_peer")
    path, config, arrays = _dynamicnet_inputs(tmp_path)
    # One peer as the benchmark runs it: alone in a fresh process.
    result = protocol.run_peer(
        PEERS_DIR / "torch_peer.py", "torch-eager", path, tmp_path
    )
    _check(result, config, arrays)
    assert result["compiles"] is None and result["threads"] >= 1
    assert result["environment"]["cores"] >= 1 and result["process_wall_s"] > 0
    result = torch_peer.run("torch-compile", config, arrays)
    _check(result, config, arrays)
    assert result["compiles"] == 4 and not result["recompile_limit_hit"]
    assert set(result["compile_per_depth"]) == {"0", "1", "2", "3"}

    path, config, arrays = _sequence_inputs(tmp_path)
    for peer in ("torch-packed", "torch-padded"):
        _check(torch_peer.run(peer, config, arrays), config, arrays)


def test_torch_compile_reports_its_recompile_limit(tmp_path):
    pytest.importorskip("torch")
    # Six distinct depths against a limit of 3: dynamo falls back to eager.
    path, config, arrays = _dynamicnet_inputs(
        tmp_path, depths=list(range(6)) * 2, torch_recompile_limit=3
    )
    result = protocol.run_peer(
        PEERS_DIR / "torch_peer.py", "torch-compile", path, tmp_path
    )
    assert result["status"] == "ok"
    assert result["recompile_limit_hit"] and result["compiles"] == 3
    assert any("recompile limit (3)" in n for n in result["notes"])


# ---------------------------------------------------------------- TensorFlow


def test_tf_peers_train_the_same_model(tmp_path):
    pytest.importorskip("tensorflow")
    path, config, arrays = _dynamicnet_inputs(tmp_path)
    result = protocol.run_peer(
        PEERS_DIR / "tf_peer.py", "tf-function-tensor", path, tmp_path
    )
    _check(result, config, arrays)
    # One graph for every depth (plus Keras's first-call retrace).
    assert result["compiles"] <= 2
    tf_peer = _load("tf_peer")
    result = tf_peer.run("tf-function-int", config, arrays)
    _check(result, config, arrays)
    assert result["compiles"] >= 4  # one trace per distinct depth
    assert set(result["compile_per_depth"]) == {"0", "1", "2", "3"}
    # XLA cannot differentiate the zero-trip loop of depth 0: a clean skip.
    result = tf_peer.run("tf-function-tensor-xla", config, arrays)
    assert result["status"].startswith("skipped: XLA refused the step at depth 0")

    path, config, arrays = _sequence_inputs(tmp_path)
    _check(tf_peer.run("tf-keras-lstm", config, arrays), config, arrays)


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
