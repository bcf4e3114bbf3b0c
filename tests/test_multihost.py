"""Runs that span processes survive a crash (2 processes x 2 CPU devices).

Each launch starts two `_resume_worker.py` processes on 127.0.0.1, bounded in
time and killed on the way out whatever happens. One uninterrupted run is the
reference; every resumed run must end bitwise equal to it:

- a shared folder, process 1 SIGKILLed at step 8 of 14: process 0 stops
  within the heartbeat timeout with one line naming the lost process and the
  checkpoint to resume from, and exits with `LOST_PEER_EXIT`; both resume;
- a folder per process where process 1 lacks the newest checkpoint: both
  resume from the newest step that both can read;
- process 0 (the writer) killed half-way through writing a checkpoint;
- a checkpoint written by the 2-process run loads in this 1-process pytest,
  and one written here resumes the 2-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

import functorch_lite as fl

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_resume_worker.py"
HEARTBEAT_S = 3.0
LIMIT_S = 180  # per launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, plan: list[dict]) -> list[tuple[int, str, float]]:
    """Run both processes to the end; (return code, output, end time) of each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), env.get("PYTHONPATH")])
    )
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                f"--process-id={i}",
                "--num-processes=2",
                f"--port={port}",
                f"--out={out}",
                f"--plan={json.dumps(plan)}",
                f"--heartbeat={HEARTBEAT_S}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    try:
        for proc in procs:
            text = proc.communicate(timeout=LIMIT_S)[0]
            results.append((proc.returncode, text, time.time()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def _ok(results: list) -> None:
    for code, text, _ in results:
        assert code == 0, text[-4000:]


def _params(out: Path, name: str, i: int) -> dict[str, np.ndarray]:
    with np.load(out / f"{name}.process{i}.npz") as f:
        return {k: f[k] for k in f.files if k != "losses"}


def _info(out: Path, name: str, i: int) -> dict[str, Any]:
    return json.loads((out / f"{name}.process{i}.json").read_text())


def _bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The uninterrupted run, in a shared folder."""
    out = tmp_path_factory.mktemp("reference")
    _ok(_launch(out, [{"name": "ref", "dir": str(out / "ref")}]))
    params = _params(out, "ref", 0)
    _bitwise_equal(params, _params(out, "ref", 1))
    # One writer for the shared folder: process 0 wrote every checkpoint.
    assert _info(out, "ref", 0)["saves"] == [3, 6, 9, 12]
    assert _info(out, "ref", 1)["saves"] == []
    return out, params


def test_kill_and_resume_shared_and_per_process_folders(reference, tmp_path) -> None:
    ref_out, ref = reference
    shared = tmp_path / "shared"
    results = _launch(tmp_path, [{"name": "killed", "dir": str(shared), "kill_at": 8}])
    (code0, text0, end0), (code1, _, _) = results
    assert code1 == -signal.SIGKILL
    # The survivor stops by itself, soon, with one line and a clear status.
    assert code0 == fl.parallel.LOST_PEER_EXIT, text0[-4000:]
    line = [t for t in text0.splitlines() if t.startswith("functorch_lite: lost")]
    assert len(line) == 1, text0[-4000:]
    assert "lost process 1 of 2" in line[0]
    assert f"resume from step 6, the newest checkpoint in {str(shared)!r}" in line[0]
    # Within a generous bound: 3x the heartbeat timeout after process 1 died.
    seconds0 = end0 - float((tmp_path / "killed_at").read_text())
    assert seconds0 < 3 * HEARTBEAT_S, seconds0
    assert "Traceback" not in text0 and "SIGABRT" not in text0
    assert fl.checkpoint.latest(shared)[0] == 6

    # A folder per process, process 1's without its newest checkpoint.
    for i in (0, 1):
        shutil.copytree(shared, tmp_path / f"own{i}")
    os.remove(tmp_path / "own1" / "ckpt_00000006.safetensors")
    # A checkpoint written by this one process resumes the 2-process run: the
    # reference's step-12 state, loaded here and saved again.
    like = {"params": _like_params(), "opt_state": _like_state(), "step": 0}
    step, tree = fl.checkpoint.load_latest(ref_out / "ref", like=like)
    assert step == 12
    fl.checkpoint.save_numbered(tmp_path / "single", 12, tree)

    plan = [
        {"name": "shared", "dir": str(shared), "resume": True},
        {"name": "own", "dir": str(tmp_path / "own{i}"), "resume": True},
        {"name": "single", "dir": str(tmp_path / "single"), "resume": True},
        # No checkpoint anywhere: every process starts fresh, together.
        {"name": "fresh", "dir": str(tmp_path / "empty{i}"), "resume": True},
    ]
    _ok(_launch(tmp_path, plan))
    for name, resumed_from in (("shared", 6), ("own", 3), ("single", 12), ("fresh", 0)):
        for i in (0, 1):
            _bitwise_equal(_params(tmp_path, name, i), ref)
            assert _info(tmp_path, name, i)["resumed_from"] == resumed_from, name
    # A folder per process: each process writes its own.
    assert _info(tmp_path, "own", 0)["saves"] == [6, 9, 12]
    assert _info(tmp_path, "own", 1)["saves"] == [6, 9, 12]
    assert _info(tmp_path, "shared", 1)["saves"] == []


def test_no_common_checkpoint_stops_every_process(reference, tmp_path) -> None:
    ref_out, _ = reference
    # Process 0 holds step 12, process 1 nothing: no step both can read.
    shutil.copytree(ref_out / "ref", tmp_path / "p0")
    (tmp_path / "p1").mkdir()
    results = _launch(
        tmp_path, [{"name": "x", "dir": str(tmp_path / "p{i}"), "resume": True}]
    )
    for code, text, _ in results:
        assert code != 0
        assert "no checkpoint step is readable by every process" in text, text[-3000:]
        assert "process 0: [6, 9, 12]; process 1: none" in text, text[-3000:]


def test_writer_killed_while_writing(reference, tmp_path) -> None:
    _, ref = reference
    folder = tmp_path / "w"
    run = {"name": "w", "dir": str(folder), "kill_writing_at": 9}
    (code0, _, _), (code1, text1, _) = _launch(tmp_path, [run])
    assert code0 == -signal.SIGKILL
    # The coordination service runs beside process 0, not in it, so it
    # outlives it: the survivor names the lost process and exits cleanly
    # (in process 0, JAX would abort it at once with a C++ stack trace).
    assert code1 == fl.parallel.LOST_PEER_EXIT, text1[-4000:]
    assert "lost process 0 of 2" in text1, text1[-4000:]
    assert "resume from step 6" in text1, text1[-4000:]
    assert "SIGABRT" not in text1 and "Check failure" not in text1, text1[-4000:]
    # The half-written file is a temporary one: the newest checkpoint is 6.
    assert fl.checkpoint.latest(folder)[0] == 6
    _ok(_launch(tmp_path, [{"name": "w2", "dir": str(folder), "resume": True}]))
    for i in (0, 1):
        _bitwise_equal(_params(tmp_path, "w2", i), ref)
        assert _info(tmp_path, "w2", i)["resumed_from"] == 6


def test_two_process_checkpoint_loads_in_one_process(reference) -> None:
    out, ref = reference
    like = {"params": _like_params(), "opt_state": _like_state(), "step": 0}
    step, tree = fl.checkpoint.load_latest(out / "ref", like=like)
    assert step == 12 and int(tree["step"]) == 12
    # Continue the last 2 steps here, on one device: close to the 2-process
    # result (a different reduction order, so not bitwise).
    sys.path.insert(0, str(ROOT / "tests"))
    import _resume_worker as worker  # noqa: PLC0415

    prob = worker._problem()
    step_fn = prob["make_step"]()
    params, opt_state = tree["params"], tree["opt_state"]
    for depth in prob["depths"][12:]:
        params, opt_state, _ = step_fn(params, opt_state, prob["x"], prob["y"], depth)
    for j, leaf in enumerate(jax.tree.leaves(params)):
        np.testing.assert_allclose(leaf, ref[str(j)], rtol=1e-5, atol=1e-6)


def _like_params() -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    import _resume_worker as worker  # noqa: PLC0415

    return worker._problem()["net"].init(jax.random.key(0))


def _like_state() -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    import _resume_worker as worker  # noqa: PLC0415

    prob = worker._problem()
    return prob["optimizer"].init(_like_params())


def test_a_service_left_by_a_crashed_run_is_ended_by_the_next(tmp_path) -> None:
    """gRPC lets two services bind one port: a new process 0 ends the old one."""
    from functorch_lite import _coordinator, parallel  # noqa: PLC0415

    port = str(_free_port())
    old = subprocess.Popen(
        [sys.executable, "-m", "functorch_lite._coordinator", f"--bind=[::]:{port}",
         "--num-processes=2", "--heartbeat-timeout=100", "--linger=120"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert old.stdout.readline().strip() == "ready"
        old.stdin.close()  # its process 0 died: it lingers for 120 s
        time.sleep(0.5)
        assert old.poll() is None
        parallel._end_stale_service(_coordinator.pid_file(port))
        assert old.wait(timeout=15) == -signal.SIGTERM
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
        old.stdout.close()
