"""Tests for the streamed and the asynchronous checkpoint saves of `fl.checkpoint`.

`save` writes the safetensors header, then each leaf's bytes, one leaf at a time,
hashing them on the way; `save_async` / `save_numbered_async` copy the tree to
the host and write it on a background thread.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import functorch_lite as fl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fl.__file__)))
LINUX = sys.platform.startswith("linux") and os.path.isdir("/proc/self")


def _assert_bitwise_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    pairs = jax.tree_util.tree_flatten_with_path(a)[0]
    for (path, x), y in zip(pairs, jax.tree.leaves(b), strict=True):
        where = jax.tree_util.keystr(path)
        if isinstance(x, bool | int | float):
            assert type(x) is type(y) and (x == y or (x != x and y != y)), where
            continue
        assert type(x) is type(y) or (
            isinstance(x, jax.Array) and isinstance(y, jax.Array)
        ), where
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert x.dtype == y.dtype and str(jax.random.key_impl(x)) == str(
                jax.random.key_impl(y)
            ), where
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, where
        assert x.tobytes() == y.tobytes(), where


def _split(path: Any) -> tuple[bytes, dict, bytes]:
    """A file's header bytes, its parsed header, and its tensor bytes."""
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    return data[8 : 8 + n], json.loads(data[8 : 8 + n]), data[8 + n :]


_DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
]


# `safetensors.numpy` writes these but cannot read them back (NumPy has no such
# dtypes; safetensors 0.8 raises KeyError 'BF16'): read them with `load`.
_ML_ONLY = {"bfloat16", "float8_e4m3fn", "float8_e5m2"}


def _mixed_tree(ml_dtypes_too: bool = True) -> dict[str, Any]:
    """Every storable dtype (NumPy and jax), keys, scalars, odd shapes and names."""
    rng = np.random.default_rng(0)
    tree: dict[str, Any] = {"np": {}, "jax": {}}
    for i, dtype in enumerate(_DTYPES):
        if not ml_dtypes_too and np.dtype(dtype).name in _ML_ONLY:
            continue
        name = np.dtype(dtype).name
        values = rng.normal(size=(3, 5)) * 10
        arr = (values > 0) if dtype is np.bool_ else values.astype(dtype)
        tree["np"][name] = np.asarray(arr, dtype)
        if np.dtype(dtype).itemsize < 8 or jax.config.read("jax_enable_x64"):
            tree["jax"][name] = jnp.asarray(np.roll(arr, i))
    tree |= {
        "key": jax.random.key(3),
        "keys_rbg": jax.random.split(jax.random.key(4, impl="rbg"), 3),
        "old_key": jax.random.PRNGKey(5),
        "step": 12345,
        "lr": 0.125,
        "done": False,
        "neg": -(2**40),
        "np_scalar": np.float16(2.5),
        "empty": np.zeros((0, 4), np.float32),
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "big_endian": np.arange(6, dtype=">i4"),
        "strided": np.arange(20, dtype=np.int16)[::3],
        "scalar0d": jnp.asarray(7, jnp.int32),
        'ünïcode "name"\n': np.ones(2, np.float32),
        "none": None,
    }
    return tree


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("how", ["save", "save_async"])
def test_mixed_round_trip_is_bitwise(tmp_path, how):
    tree = _mixed_tree()
    path = tmp_path / "mixed.safetensors"
    if how == "save":
        fl.checkpoint.save(path, tree)
    else:
        assert fl.checkpoint.save_async(path, tree).wait() == str(path)
    # A big-endian leaf comes back little-endian: `like` says so.
    like = tree | {"big_endian": tree["big_endian"].astype("<i4")}
    restored = fl.checkpoint.load(path, like=like)
    _assert_bitwise_equal(like, restored)
    assert type(restored["step"]) is int and type(restored["done"]) is bool
    assert isinstance(restored["np_scalar"], np.float16)
    assert restored["np"]["bfloat16"].dtype == ml_dtypes.bfloat16
    assert sorted(os.listdir(tmp_path)) == ["mixed.safetensors"]


def test_safetensors_reads_the_file_with_identical_arrays(tmp_path):
    tree = _mixed_tree(ml_dtypes_too=False)
    path = tmp_path / "mixed.safetensors"
    fl.checkpoint.save(path, tree)
    flat = fl.checkpoint.load(path)
    tensors = safetensors.numpy.load_file(path)
    assert sorted(tensors) == sorted(flat)
    np.testing.assert_array_equal(tensors["jax.float16"], tree["jax"]["float16"])
    np.testing.assert_array_equal(tensors["big_endian"], tree["big_endian"])
    np.testing.assert_array_equal(tensors["key"], jax.random.key_data(tree["key"]))
    assert tensors["step"].dtype == np.int64 and tensors["step"] == 12345
    for name, arr in tensors.items():
        want = flat[name]
        if isinstance(want, jax.Array):  # a typed key comes back typed
            want = jax.random.key_data(want)
        want = np.asarray(want)
        assert arr.dtype == want.dtype and arr.shape == want.shape, name
        assert arr.tobytes() == want.tobytes(), name
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(flat)
        np.testing.assert_array_equal(f.get_tensor("fortran"), tree["fortran"])
        meta = f.metadata()
    manifest = json.loads(meta["functorch_lite.manifest"])
    assert manifest["version"] == fl.checkpoint.FORMAT_VERSION
    assert (
        hashlib.sha256(meta["functorch_lite.manifest"].encode()).hexdigest()
        == (meta["functorch_lite.manifest_sha256"])
    )


def test_layout_is_that_of_the_safetensors_writer(tmp_path):
    """The same tensor table, header length and tensor bytes as safetensors'
    own writer given the same tensors and metadata (only the order of the two
    metadata keys is left to the writer's map)."""
    tree = _mixed_tree()
    path = tmp_path / "mixed.safetensors"
    fl.checkpoint.save(path, tree)
    raw, header, payload = _split(path)
    tensors = {
        name: np.asarray(jax.random.key_data(v) if isinstance(v, jax.Array) else v)
        for name, v in fl.checkpoint.load(path).items()
    }
    assert tensors["np.bfloat16"].dtype == ml_dtypes.bfloat16
    theirs = safetensors.numpy.save(tensors, metadata=header["__metadata__"])
    n = int.from_bytes(theirs[:8], "little")
    assert n == len(raw) and n % 8 == 0
    assert json.loads(theirs[8 : 8 + n]) == header
    assert theirs[8 + n :] == payload
    # Manifest checksums are those of the leaves' bytes.
    manifest = json.loads(header["__metadata__"]["functorch_lite.manifest"])
    for entry in manifest["leaves"]:
        begin, end = header[entry["name"]]["data_offsets"]
        assert hashlib.sha256(payload[begin:end]).hexdigest() == entry["sha256"]


def test_chunked_hashing_and_writeback(tmp_path, monkeypatch):
    # Small chunks: many chunks per leaf, the helper hashing thread, and the
    # writeback hint after every chunk, on leaves that cross chunk bounds.
    monkeypatch.setattr(fl.checkpoint, "_CHUNK", 1 << 12)
    monkeypatch.setattr(fl.checkpoint, "_HASH_ASIDE", 1 << 10)
    rng = np.random.default_rng(1)
    tree = {
        "a": rng.normal(size=10_001).astype(np.float32),
        "b": jnp.asarray(rng.normal(size=(33, 65)).astype(ml_dtypes.bfloat16)),
        "c": rng.integers(0, 255, size=4095, dtype=np.uint8),
        "tiny": np.ones(3, np.float64),
    }
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, tree)
    _assert_bitwise_equal(tree, fl.checkpoint.load(path, like=tree))
    np.testing.assert_array_equal(safetensors.numpy.load_file(path)["a"], tree["a"])


def test_save_rejects_reserved_and_deleted_leaves(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"^save: a leaf of `tree` is named "):
        fl.checkpoint.save(path, {"__metadata__": np.ones(2)})
    gone = jnp.ones(3)
    gone.delete()
    with pytest.raises(
        ValueError, match=r"^save_async: leaf 'w' of `tree` is a deleted jax.Array"
    ):
        fl.checkpoint.save_async(path, {"w": gone})
    with pytest.raises(TypeError, match=r"^save_numbered_async: leaf 's' is a str"):
        fl.checkpoint.save_numbered_async(tmp_path, 1, {"s": "x"})
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------- memory


_MEMORY_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import jax, jax.numpy as jnp
    import functorch_lite as fl

    folder = sys.argv[1]
    n = 8 << 20  # float32 elements: 32 MiB a leaf

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    def extra(save):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = status("VmRSS")
        save()
        return status("VmHWM") - before

    tree = {
        "a": np.full(n, 1.0, np.float32),
        "b": jnp.full(n, 2.0, jnp.float32),
        "c": {"d": jnp.full(n, 3.0, jnp.float32), "e": np.full(n, 4.0, np.float32)},
        "step": 3,
    }
    jax.block_until_ready(tree)
    path = os.path.join(folder, "m.safetensors")
    fl.checkpoint.save(path, {"w": tree["b"][:8], "v": np.ones(3)})  # warm up
    fl.checkpoint.save_async(path, {"w": tree["b"][:8], "v": np.ones(3)}).wait()
    sync = extra(lambda: fl.checkpoint.save(path, tree))
    os.unlink(path)
    asynchronous = extra(lambda: fl.checkpoint.save_async(path, tree).wait())
    print(json.dumps({"sync": sync, "async": asynchronous, "leaf": 4 * n}))
    """
)


@pytest.mark.skipif(
    not (LINUX and os.access("/proc/self/clear_refs", os.W_OK)),
    reason="needs Linux /proc/self/clear_refs to reset the peak memory",
)
def test_peak_memory_is_about_one_leaf(tmp_path):
    """Saving 4 leaves of 32 MiB (2 NumPy, 2 jax) costs at most about a leaf.

    Building the whole file in memory would cost the whole 128 MiB (or twice
    it); the bound is 1.5 leaves plus 16 MiB for allocator and interpreter
    noise. The asynchronous save holds one host copy of the tree (128 MiB),
    and no second one.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    leaf, mib = got["leaf"], 1 << 20
    assert got["sync"] < 1.5 * leaf + 16 * mib, got
    assert got["async"] < 4 * leaf + 0.5 * leaf + 16 * mib, got


# --------------------------------------------------------------------- async


@pytest.fixture
def gate(monkeypatch):
    """Hold every writer at the opening of its temporary file until released."""
    opened, release = threading.Event(), threading.Event()
    real_fdopen = os.fdopen

    def gated(*args):
        opened.set()
        assert release.wait(60), "the test never released the writer"
        return real_fdopen(*args)

    monkeypatch.setattr(os, "fdopen", gated)
    yield opened, release
    release.set()


def test_training_loop_with_donated_buffers(tmp_path):
    """Each checkpoint holds the state of its step, though training goes on
    (and donates and overwrites the buffers) while it is written."""
    step_fn = jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)
    params = {"w": jnp.zeros((256, 256)), "b": jnp.zeros(256, jnp.int32)}
    pending = []
    for step in range(1, 13):
        params = step_fn(params)
        if step % 3 == 0:
            pending.append(
                fl.checkpoint.save_numbered_async(
                    tmp_path, step, {"params": params, "step": step}, keep=2
                )
            )
    paths = [p.wait() for p in pending]
    assert all(p.done() for p in pending)
    assert paths[-1] == str(tmp_path / "ckpt_00000012.safetensors")
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt_00000009.safetensors",
        "ckpt_00000012.safetensors",
    ]
    like = {"params": params, "step": 0}
    for step in (9, 12):
        tree = fl.checkpoint.load(tmp_path / f"ckpt_{step:08d}.safetensors", like=like)
        assert tree["step"] == step
        np.testing.assert_array_equal(tree["params"]["w"], np.full((256, 256), step))
        np.testing.assert_array_equal(tree["params"]["b"], np.full(256, step))
    assert fl.checkpoint.load_latest(tmp_path, like=like)[0] == 12


def test_async_copies_the_tree_before_returning(tmp_path, gate):
    opened, release = gate
    arr = np.zeros(1000, np.float32)
    device = jnp.zeros(1000)
    handle = fl.checkpoint.save_async(tmp_path / "x.st", {"a": arr, "d": device})
    assert opened.wait(30)  # the writer is held before it writes a byte
    assert not handle.done() and "running" in repr(handle)
    arr[:] = 7  # the caller changes its arrays at once
    device.delete()
    release.set()
    handle.wait()
    tree = fl.checkpoint.load(tmp_path / "x.st")
    assert not tree["a"].any() and not tree["d"].any()
    assert "done" in repr(handle)


def test_wait_times_out_and_checks_its_argument(tmp_path, gate):
    opened, release = gate
    handle = fl.checkpoint.save_async(tmp_path / "x.st", {"a": np.ones(2)})
    with pytest.raises(TimeoutError, match=r"^AsyncSave.wait: the save of '.*x\.st'"):
        handle.wait(timeout=0.05)
    with pytest.raises(TypeError, match=r"`timeout` must be None or a number"):
        handle.wait(timeout=-1)
    release.set()
    assert handle.wait(timeout=60) == str(tmp_path / "x.st")


def test_one_save_in_flight_per_folder(tmp_path, gate):
    opened, release = gate
    path = tmp_path / "ckpt.st"
    first = fl.checkpoint.save_async(path, {"v": np.full(4, 1.0)})
    assert opened.wait(30)
    results: queue.Queue = queue.Queue()

    def second() -> None:
        results.put(fl.checkpoint.save_async(path, {"v": np.full(4, 2.0)}))

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.3)
    assert results.empty() and thread.is_alive()  # waits for the first one
    # A save into another folder is not held up.
    (tmp_path / "sub").mkdir()
    other = fl.checkpoint.save_async(tmp_path / "sub" / "x.st", {"v": np.ones(1)})
    release.set()
    thread.join(30)
    second_handle = results.get(timeout=30)
    first.wait()
    second_handle.wait()
    other.wait()
    # The later save wins.
    assert fl.checkpoint.load(path)["v"].tolist() == [2.0] * 4


def test_wait_reraises_the_writers_failure(tmp_path, monkeypatch, caplog):
    path = tmp_path / "ckpt.st"
    fl.checkpoint.save(path, {"v": np.full(4, 1.0)})

    def refuse(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted", src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    handle = fl.checkpoint.save_async(path, {"v": np.full(4, 2.0)})
    with pytest.raises(
        PermissionError,
        match=r"^save_async: cannot write `path` '.*ckpt\.st': writing failed "
        r"\(Operation not permitted\); the file that was at that path, if any, is "
        r"unchanged\.$",
    ) as e:
        handle.wait()
    assert isinstance(e.value.__cause__, PermissionError)
    assert handle.done() and "failed: PermissionError" in repr(handle)
    with pytest.raises(PermissionError):  # again, for every waiter
        handle.wait()
    monkeypatch.undo()
    assert "background save" in caplog.text
    assert fl.checkpoint.load(path)["v"].tolist() == [1.0] * 4
    assert os.listdir(tmp_path) == ["ckpt.st"]  # no temporary file left
    # Its error was seen: the next save goes ahead.
    fl.checkpoint.save_async(path, {"v": np.full(4, 3.0)}).wait()
    assert fl.checkpoint.load(path)["v"].tolist() == [3.0] * 4


@pytest.mark.skipif(not LINUX, reason="needs Linux /sys, which refuses new files")
def test_async_save_into_an_unwritable_folder():
    handle = fl.checkpoint.save_numbered_async("/sys", 1, {"w": jnp.ones(2)})
    with pytest.raises(
        PermissionError,
        match=r"^save_numbered_async: cannot write checkpoint "
        r"'ckpt_00000001\.safetensors' in `directory` '/sys': its folder '/sys' is "
        r"not writable",
    ):
        handle.wait()
    handle = fl.checkpoint.save_async("/sys/a.st", {"w": jnp.ones(2)})
    with pytest.raises(PermissionError, match=r"^save_async: cannot write `path`"):
        handle.wait()


def test_an_unseen_failure_is_raised_by_the_next_save(tmp_path, monkeypatch):
    def crash(*args):
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(os, "fsync", crash)
    failed = fl.checkpoint.save_numbered_async(tmp_path, 1, {"s": 1})
    while not failed.done():
        time.sleep(0.01)
    monkeypatch.undo()
    # Nobody called failed.wait(): the next save into the folder raises it.
    with pytest.raises(OSError, match=r"simulated I/O error") as e:
        fl.checkpoint.save_numbered(tmp_path, 2, {"s": 2})
    assert "ckpt_00000001.safetensors" in str(e.value)
    assert fl.checkpoint.latest(tmp_path) is None
    # Once raised, it is not raised again.
    fl.checkpoint.save_numbered_async(tmp_path, 2, {"s": 2}).wait()
    assert fl.checkpoint.load_latest(tmp_path, like={"s": 0}) == (2, {"s": 2})


def test_async_argument_errors_are_raised_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^save_async: the folder .* does "):
        fl.checkpoint.save_async(tmp_path / "no" / "x.st", {})
    with pytest.raises(IsADirectoryError, match=r"^save_async: `path` .* is a folder"):
        fl.checkpoint.save_async(tmp_path, {})
    with pytest.raises(ValueError, match=r"^save_numbered_async: `step` must be"):
        fl.checkpoint.save_numbered_async(tmp_path, -1, {})
    with pytest.raises(TypeError, match=r"^save_async: `path` must be a str"):
        fl.checkpoint.save_async(3, {})


_ASYNC_KILL = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import functorch_lite.checkpoint as ckpt

    folder = sys.argv[1]
    tree = lambda v: {"w": np.full(1 << 20, v, np.float32), "step": v}
    ckpt.save_numbered(folder, 1, tree(1))
    real_fdopen = os.fdopen

    class Stalling:  # writes the first piece, then hangs mid-file
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def write(self, data):
            self.f.write(data)
            self.f.flush()
            print("writing", flush=True)
            time.sleep(600)

    os.fdopen = lambda *a: Stalling(real_fdopen(*a))
    handle = ckpt.save_numbered_async(folder, 2, tree(2))
    print("returned", flush=True)
    handle.wait()
    """
)


def test_kill_during_an_async_write_leaves_no_partial_file(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", _ASYNC_KILL, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        # Two threads print; their lines may interleave, so read words.
        seen: set[str] = set()
        while not {"writing", "returned"} <= seen:
            line = proc.stdout.readline()
            assert line, seen
            seen |= {w for w in ("writing", "returned") if w in line}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    names = sorted(os.listdir(tmp_path))
    assert "ckpt_00000002.safetensors" not in names
    (temp,) = [n for n in names if n.endswith(".tmp")]
    assert os.path.getsize(tmp_path / temp) > 0  # a partial file, hidden
    like = {"w": np.zeros(1 << 20, np.float32), "step": 0}
    step, tree = fl.checkpoint.load_latest(tmp_path, like=like)
    assert step == 1 and tree["step"] == 1 and (tree["w"] == 1).all()
    # The next save removes the dead writer's temporary file.
    fl.checkpoint.save_numbered_async(tmp_path, 3, {"s": 3}).wait()
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt_00000001.safetensors",
        "ckpt_00000003.safetensors",
    ]
