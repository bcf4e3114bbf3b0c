"""`fl.parallel`: data parallel on 1 device here, on 8 devices and 2 processes aside.

The main test process has one CPU device, and its device count cannot change
once JAX has started. The 8-device checks (`_parallel_8dev.py`) run in their
own pytest process with `XLA_FLAGS=--xla_force_host_platform_device_count=8`;
the multi-process check starts two workers (`_parallel_worker.py`) with 4 CPU
devices each, joined by `jax.distributed.initialize` over gloo.
"""

import inspect
import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose
from jax.sharding import AxisType, PartitionSpec as P

import functorch_lite as fl
from tests import _parallel_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _tail(text, n=4000):
    return text[-n:]


# ------------------------------------------------------------------- one device


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_one_device_matches_step(mode):
    prob = worker.problem(mode, 6, steps=4)
    expected, expected_losses = worker.train(
        prob["make_step"](), prob, prob["x"], prob["y"], 4
    )
    dp = fl.parallel.data_parallel(prob["make_step"]())
    params, losses = worker.train(dp, prob, prob["x"], prob["y"], 4)
    tree_allclose(params, expected, rtol=1e-6)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
    assert params["input_linear"]["weight"].sharding.spec == P()
    distinct = len(set(prob["depths"]))
    assert dp.stats.compiles == (1 if mode == "static" else distinct)


def test_signature_and_repr():
    prob = worker.problem("dynamic", 4)
    step = prob["make_step"]()
    dp = fl.parallel.data_parallel(step)
    assert inspect.signature(dp) == inspect.signature(step.fun)
    assert dp.step is step and dp.axis == "data"
    assert repr(dp).startswith("<fl.parallel.data_parallel step axis='data' devices=")


def test_explicit_mesh_runs_auto():
    prob = worker.problem("static", 4)
    mesh = jax.make_mesh((1,), ("batch",), axis_types=(AxisType.Explicit,))
    dp = fl.parallel.data_parallel(prob["make_step"](), mesh=mesh, axis="batch")
    assert dp.mesh.axis_types == (AxisType.Auto,)
    assert dp.mesh.axis_names == ("batch",)
    params, _ = worker.train(dp, prob, prob["x"], prob["y"], 1)
    assert params["output_linear"]["bias"].sharding.mesh.axis_names == ("batch",)


def test_pad_on_one_device_is_a_no_op():
    prob = worker.problem("static", 5, steps=2)
    expected, _ = worker.train(prob["make_step"](), prob, prob["x"], prob["y"], 2)
    dp = fl.parallel.data_parallel(prob["make_step"](), pad=True)
    params, _ = worker.train(dp, prob, prob["x"], prob["y"], 2)
    tree_allclose(params, expected, rtol=1e-6)


# ----------------------------------------------------------------------- errors


def _setup():
    prob = worker.problem("static", 4)
    params = prob["net"].init(jax.random.key(0))
    return prob, params, prob["optimizer"].init(params)


def test_rejects_non_step():
    # Any callable is a step now (a jax.jit or plain function too); a value
    # that cannot be called is not.
    with pytest.raises(TypeError, match=r"data_parallel: `step` must be a callable"):
        fl.parallel.data_parallel(3)


def test_rejects_step_without_state():
    with pytest.raises(TypeError, match=r"`step\(params, opt_state, \*batch\)`"):
        fl.parallel.data_parallel(fl.jit(lambda x: x))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mesh": "cpu"}, TypeError, r"`mesh` must be a jax.sharding.Mesh"),
        ({"axis": 0}, TypeError, r"`axis` must be a str; got 0"),
        ({"axis": "model"}, ValueError, r"`axis` must be an axis of `mesh`.*'model'"),
        ({"pad": 1}, TypeError, r"`pad` must be a bool; got int 1"),
        (
            {"batch_argnames": ("z",)},
            ValueError,
            r"names 'z', but the step does not take it",
        ),
        (
            {"batch_argnames": {"x": -1}},
            ValueError,
            r"`batch_argnames\['x'\]` must be a non-negative int \(the batch axis "
            r"of 'x'\); got -1",
        ),
    ],
    ids=["mesh", "axis-type", "axis-name", "pad", "unknown-name", "bad-axis"],
)
def test_rejects_bad_options(kwargs, error, match):
    prob = worker.problem("static", 4)
    if kwargs.get("axis") == "model":
        kwargs = {**kwargs, "mesh": jax.make_mesh((1,), ("data",))}
    with pytest.raises(error, match=match):
        fl.parallel.data_parallel(prob["make_step"](), **kwargs)


def test_rejects_static_batch_argname():
    prob = worker.problem("dynamic", 4)
    with pytest.raises(ValueError, match=r"'depth', but it is a static argument"):
        fl.parallel.data_parallel(prob["make_step"](), batch_argnames=["depth"])


def test_rejects_mismatched_batch_sizes():
    prob, params, opt_state = _setup()
    dp = fl.parallel.data_parallel(prob["make_step"]())
    with pytest.raises(ValueError, match=r"must have one batch size; got sizes"):
        dp(params, opt_state, prob["x"], prob["y"][:3], 1)


def test_rejects_named_argument_without_batch_axis():
    prob, params, opt_state = _setup()
    dp = fl.parallel.data_parallel(prob["make_step"](), batch_argnames={"x": 2})
    with pytest.raises(ValueError, match=r"`x` must hold arrays with a dimension 2"):
        dp(params, opt_state, prob["x"], prob["y"], 1)


def test_rejects_call_without_batch():
    prob, params, opt_state = _setup()
    dp = fl.parallel.data_parallel(prob["make_step"](), batch_argnames=())
    with pytest.raises(ValueError, match=r"no argument to split over the batch"):
        dp(params, opt_state, prob["x"], prob["y"], 1)


def test_rejects_bad_arguments():
    prob, params, opt_state = _setup()
    dp = fl.parallel.data_parallel(prob["make_step"]())
    with pytest.raises(TypeError, match=r"do not match the step's signature"):
        dp(params, opt_state, prob["x"])


def test_initialize_rejects_bad_cpu_devices():
    with pytest.raises(ValueError, match=r"`cpu_devices` must be a positive int"):
        fl.parallel.initialize("127.0.0.1:1", 1, 0, cpu_devices=0)


# ------------------------------------------------------------------ 8 devices


def test_eight_devices():
    """One and 50 sharded steps equal one device; sharding; compiles; padding; fused."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",  # one process: xdist workers would only add start-up time
            os.path.join(TESTS, "_parallel_8dev.py"),
        ],
        cwd=ROOT,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, _tail(out)
    assert " passed" in out and "skipped" not in out, _tail(out)


# ---------------------------------------------------------------- 2 processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes(tmp_path):
    """Two processes x 4 CPU devices train 20 steps like one process does."""
    port, n_proc = _free_port(), 2
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(TESTS, "_parallel_worker.py"),
                f"--process-id={i}",
                f"--num-processes={n_proc}",
                f"--port={port}",
                f"--out={tmp_path}",
                "--cpu-devices=4",
            ],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n_proc)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, _tail(out)
    # Process 0's coordination service (a child of it, functorch_lite._coordinator)
    # stops a short grace period after the normal exit, not after the crash
    # linger (2 x heartbeat + 10 s), and only then removes its pid file and its
    # log (the log is kept after a crash).
    from functorch_lite import _coordinator

    files = [_coordinator.pid_file(str(port)), _coordinator.log_file(str(port))]
    deadline = time.monotonic() + _coordinator.NORMAL_EXIT_GRACE_S + 8
    while any(map(os.path.exists, files)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(files[0]), "the service outlived its grace period"
    assert not os.path.exists(files[1]), "a normal exit kept the service's log"

    compiles = {}
    for name, (mode, n) in worker.SCENARIOS.items():
        prob = worker.problem(mode, n, depths=worker.DEPTHS[mode])
        compiles[name] = 1 if mode == "static" else len(set(prob["depths"]))
        params, losses = worker.train(
            prob["make_step"](), prob, prob["x"], prob["y"], worker.STEPS
        )
        leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(params)]
        for i in range(n_proc):
            got = np.load(tmp_path / f"process{i}.npz")
            for j, leaf in enumerate(leaves):
                np.testing.assert_allclose(
                    got[f"{name}/{j}"], leaf, rtol=1e-4, atol=1e-6, err_msg=name
                )
            np.testing.assert_allclose(
                got[f"{name}/losses"], [float(x) for x in losses], rtol=1e-4
            )
    for i in range(n_proc):
        info = json.loads((tmp_path / f"process{i}.json").read_text())
        assert (info["process_count"], info["device_count"]) == (2, 8)
        assert info["local_device_count"] == 4
        for name in worker.SCENARIOS:
            assert info[name]["params_spec"] == "P()"
            assert info[name]["params_devices"] == 8
            assert info[name]["fully_addressable"] is False
            assert info[name]["compiles"] == compiles[name]


def test_data_parallel_rejects_scalar_only_call():
    prob, params, opt_state = _setup()
    dp = fl.parallel.data_parallel(prob["make_step"]())
    with pytest.raises(ValueError, match=r"no argument to split"):
        dp(params, opt_state, jnp.float32(1.0), jnp.float32(0.0), 1)
