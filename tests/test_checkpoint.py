"""Tests for `fl.checkpoint`: round trips, error paths, atomic writes, rotation."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import safetensors.numpy
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import functorch_lite as fl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fl.__file__)))


# ----------------------------------------------------------------------- helpers


def _state(key: jax.Array) -> dict[str, Any]:
    """A training state: params, two optax states after one update, step, key."""
    net = fl.models.DynamicNet(4, 8, 2, max_depth=3)
    params = net.init(key)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    sgd = optax.sgd(1e-2, momentum=0.9)
    adam = optax.adam(1e-3)
    _, sgd_state = sgd.update(grads, sgd.init(params), params)
    # optax's Adam bias correction mixes a Python float and an int32 count.
    with jax.numpy_dtype_promotion("standard"):
        _, adam_state = adam.update(grads, adam.init(params), params)
    return {
        "params": params,
        "sgd_state": sgd_state,
        "adam_state": adam_state,
        "step": 7,
        "key": jax.random.split(key)[1],
    }


def _assert_bitwise_equal(a: Any, b: Any) -> None:
    """Assert one structure, one leaf type, dtype, shape and bytes for every leaf."""
    sa, sb = jax.tree.structure(a), jax.tree.structure(b)
    assert sa == sb, f"tree structures differ:\n  {sa}\n  {sb}"
    pairs = jax.tree_util.tree_flatten_with_path(a)[0]
    for (path, x), y in zip(pairs, jax.tree.leaves(b), strict=True):
        where = jax.tree_util.keystr(path)
        assert type(x) is type(y) or (
            isinstance(x, jax.Array) and isinstance(y, jax.Array)
        ), f"{where}: {type(x)} vs {type(y)}"
        if isinstance(x, bool | int | float):
            assert x == y or (x != x and y != y), where
            continue
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert x.dtype == y.dtype, where
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, where
        assert x.tobytes() == y.tobytes(), where


def _header(path: str) -> tuple[int, dict]:
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _flip_tensor_byte(path: str, name: str) -> None:
    n, header = _header(path)
    begin, end = header[name]["data_offsets"]
    _flip_byte(path, 8 + n + (begin + end) // 2)


def _write_raw(path: str, tensors: dict[str, np.ndarray], manifest: Any) -> None:
    """Write a safetensors file with a hand-made manifest and its correct checksum."""
    text = json.dumps(manifest)
    metadata = {
        "functorch_lite.manifest": text,
        "functorch_lite.manifest_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    with open(path, "wb") as f:
        f.write(safetensors.numpy.save(tensors, metadata=metadata))


def _entry(name: str, arr: np.ndarray) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "array",
        "dtype": arr.dtype.name,
        "shape": list(arr.shape),
        "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
    }


# -------------------------------------------------------------------- round trip


def test_round_trip_is_bitwise(tmp_path, key):
    state = _state(key)
    path = tmp_path / "state.safetensors"
    fl.checkpoint.save(path, state)
    restored = fl.checkpoint.load(path, like=state)
    _assert_bitwise_equal(state, restored)
    assert type(restored["step"]) is int
    assert isinstance(restored["sgd_state"][0], optax.TraceState)
    assert isinstance(restored["adam_state"][0], optax.ScaleByAdamState)
    assert isinstance(restored["adam_state"][1], optax.EmptyState)


def test_round_trip_into_shape_dtype_structs(tmp_path, key):
    state = _state(key)
    path = tmp_path / "state.safetensors"
    fl.checkpoint.save(path, state)
    # eval_shape turns the Python step into an int32 struct: the saved int64 step
    # fills it because 7 converts exactly.
    like = jax.eval_shape(lambda: state)
    restored = fl.checkpoint.load(path, like=like)
    assert restored["step"].dtype == jnp.int32 and int(restored["step"]) == 7
    _assert_bitwise_equal(
        {k: v for k, v in state.items() if k != "step"},
        {k: v for k, v in restored.items() if k != "step"},
    )


def test_restored_params_train_like_the_originals(tmp_path, key):
    state = _state(key)
    path = tmp_path / "state.safetensors"
    fl.checkpoint.save(path, state)
    restored = fl.checkpoint.load(path, like=state)
    net = fl.models.DynamicNet(4, 8, 2, max_depth=3)
    x = jax.random.normal(key, (5, 4))
    for depth in (0, 2):
        np.testing.assert_array_equal(
            net.apply(state["params"], x, depth),
            net.apply(restored["params"], x, depth),
        )
    sgd = optax.sgd(1e-2, momentum=0.9)
    grads = jax.tree.map(jnp.ones_like, state["params"])
    u1, _ = sgd.update(grads, state["sgd_state"], state["params"])
    u2, _ = sgd.update(grads, restored["sgd_state"], restored["params"])
    _assert_bitwise_equal(u1, u2)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"], ids=["threefry", "rbg"])
@pytest.mark.parametrize("shape", [(), (3,)], ids=["scalar", "batch"])
def test_typed_key_round_trip(tmp_path, impl, shape):
    key = jax.random.key(42, impl=impl)
    if shape:
        key = jax.random.split(key, shape[0])
    path = tmp_path / "key.safetensors"
    fl.checkpoint.save(path, {"key": key})
    restored = fl.checkpoint.load(path, like={"key": key})["key"]
    assert restored.dtype == key.dtype and restored.shape == key.shape
    assert str(jax.random.key_impl(restored)) == impl
    np.testing.assert_array_equal(
        jax.random.key_data(restored), jax.random.key_data(key)
    )
    draw = lambda k: jax.random.uniform(k if not shape else k[1], (4,))
    np.testing.assert_array_equal(draw(key), draw(restored))
    # A ShapeDtypeStruct `like` and the flat load give a typed key too.
    via_struct = fl.checkpoint.load(path, like=jax.eval_shape(lambda: {"key": key}))
    assert via_struct["key"].dtype == key.dtype
    flat = fl.checkpoint.load(path)
    assert flat["key"].dtype == key.dtype


def test_old_uint32_key_round_trip(tmp_path):
    key = jax.random.PRNGKey(3)
    path = tmp_path / "key.safetensors"
    fl.checkpoint.save(path, key)
    restored = fl.checkpoint.load(path, like=key)
    assert restored.dtype == jnp.uint32
    np.testing.assert_array_equal(
        jax.random.normal(key, (3,)), jax.random.normal(restored, (3,))
    )


@pytest.mark.parametrize(
    "dtype",
    [
        np.bool_,
        np.int8,
        np.uint16,
        np.int32,
        np.uint64,
        np.float16,
        np.float64,
        ml_dtypes.bfloat16,
        ml_dtypes.float8_e4m3fn,
        np.complex64,
    ],
    ids=lambda d: np.dtype(d).name,
)
def test_dtypes_round_trip(tmp_path, dtype):
    arr = (np.arange(6) % 3).astype(dtype).reshape(2, 3)
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, {"x": arr, "j": jnp.asarray(arr)})
    restored = fl.checkpoint.load(path, like={"x": arr, "j": jnp.asarray(arr)})
    _assert_bitwise_equal({"x": arr, "j": jnp.asarray(arr)}, restored)
    assert isinstance(restored["x"], np.ndarray)


def test_leaf_kinds_follow_like(tmp_path):
    tree = {
        "np": np.arange(3, dtype=np.int32),
        "np_scalar": np.float32(1.5),
        "f": 0.1,
        "b": True,
        "i": -(2**40),
        "empty": np.zeros((0, 3), np.float32),
        "none": None,
        "nested": [(jnp.ones(2),), {}],
    }
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, tree)
    restored = fl.checkpoint.load(path, like=tree)
    _assert_bitwise_equal(tree, restored)
    assert isinstance(restored["np_scalar"], np.float32)
    assert type(restored["f"]) is float and type(restored["b"]) is bool


def test_lone_array(tmp_path):
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, jnp.arange(4.0))
    assert fl.checkpoint.load(path, like=jnp.zeros(4)).tolist() == [0, 1, 2, 3]
    assert list(fl.checkpoint.load(path)) == [""]


def test_load_without_like_returns_flat_dict(tmp_path, key):
    state = _state(key)
    path = tmp_path / "state.safetensors"
    fl.checkpoint.save(path, state)
    flat = fl.checkpoint.load(path)
    assert flat["step"] == 7 and type(flat["step"]) is int
    assert isinstance(flat["params.input_linear.weight"], np.ndarray)
    assert flat["params.input_linear.weight"].shape == (4, 8)
    assert "sgd_state.0.trace.middle_linear.bias" in flat
    assert "adam_state.0.nu.output_linear.weight" in flat
    assert "adam_state.0.count" in flat
    assert len(flat) == len(jax.tree.leaves(state))


def test_file_is_plain_safetensors_with_manifest(tmp_path, key):
    state = _state(key)
    path = tmp_path / "state.safetensors"
    fl.checkpoint.save(path, state)
    tensors = safetensors.numpy.load_file(path)
    np.testing.assert_array_equal(
        tensors["params.middle_linear.weight"],
        state["params"]["middle_linear"]["weight"],
    )
    assert tensors["step"].dtype == np.int64 and tensors["step"].shape == ()
    _, header = _header(str(path))
    manifest = json.loads(header["__metadata__"]["functorch_lite.manifest"])
    assert manifest["version"] == fl.checkpoint.FORMAT_VERSION
    assert manifest["treedef"] == str(jax.tree.structure(state))
    key_entry = next(e for e in manifest["leaves"] if e["name"] == "key")
    assert key_entry["key_impl"] == "threefry2x32" and key_entry["dtype"] == "uint32"
    assert all(len(e["sha256"]) == 64 for e in manifest["leaves"])


def test_pytorch_reads_the_file(tmp_path, key):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    params = fl.models.DynamicNet(4, 8, 2).init(key)
    path = tmp_path / "params.safetensors"
    fl.checkpoint.save(path, params)
    state_dict = safetensors.torch.load_file(str(path))
    assert state_dict["input_linear.weight"].dtype == torch.float32
    np.testing.assert_array_equal(
        state_dict["input_linear.weight"].numpy(), params["input_linear"]["weight"]
    )


# ------------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="load: there is no checkpoint file"):
        fl.checkpoint.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello",
        b"just some text, not a checkpoint\n" * 4,
        b"\x05" + b"\0" * 7,
        (3).to_bytes(8, "little") + b"abc",
    ],
    ids=["empty", "short", "text", "garbage-header", "header-not-json"],
)
def test_not_a_checkpoint_file(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(
        fl.checkpoint.CheckpointError, match="not a readable checkpoint"
    ):
        fl.checkpoint.load(path)


def test_header_json_not_an_object(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes((2).to_bytes(8, "little") + b"[]")
    with pytest.raises(
        fl.checkpoint.CheckpointError, match="header is not safetensors"
    ):
        fl.checkpoint.load(path)


def test_plain_safetensors_file_is_rejected(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors.numpy.save_file({"w": np.ones(2, np.float32)}, path)
    with pytest.raises(
        fl.checkpoint.CheckpointError, match="no functorch_lite manifest"
    ):
        fl.checkpoint.load(path, like={"w": np.ones(2, np.float32)})


@pytest.mark.parametrize("keep", [0.5, 0.95, "header", 12, 5], ids=str)
def test_truncated_file(tmp_path, key, keep):
    path = tmp_path / "state.safetensors"
    fl.checkpoint.save(path, _state(key))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cut = (
        8 + n
        if keep == "header"
        else keep
        if isinstance(keep, int)
        else int(len(data) * keep)
    )
    path.write_bytes(data[:cut])
    with pytest.raises(
        fl.checkpoint.CheckpointError, match=r"truncated|fewer than"
    ) as e:
        fl.checkpoint.load(path, like=_state(key))
    assert str(path) in str(e.value)


def test_flipped_payload_byte_fails_the_checksum(tmp_path, key):
    state = _state(key)
    path = tmp_path / "state.safetensors"
    fl.checkpoint.save(path, state)
    _flip_tensor_byte(str(path), "params.middle_linear.weight")
    with pytest.raises(
        fl.checkpoint.CheckpointError,
        match=r"checksum mismatch on leaf 'params\.middle_linear\.weight'",
    ):
        fl.checkpoint.load(path, like=state)


def test_flipped_last_byte_fails_the_checksum(tmp_path, key):
    path = tmp_path / "state.safetensors"
    fl.checkpoint.save(path, _state(key))
    _flip_byte(str(path), os.path.getsize(path) - 1)
    with pytest.raises(fl.checkpoint.CheckpointError, match="checksum mismatch"):
        fl.checkpoint.load(path)


def test_flipped_manifest_byte_fails_the_manifest_checksum(tmp_path, key):
    path = tmp_path / "state.safetensors"
    fl.checkpoint.save(path, _state(key))
    offset = path.read_bytes().index(b"PyTreeDef")
    _flip_byte(str(path), offset)
    with pytest.raises(fl.checkpoint.CheckpointError, match="checksum of its manifest"):
        fl.checkpoint.load(path)


def test_newer_format_version(tmp_path):
    arr = np.ones(2, np.float32)
    path = tmp_path / "x.safetensors"
    _write_raw(path, {"w": arr}, {"version": 99, "leaves": [_entry("w", arr)]})
    with pytest.raises(fl.checkpoint.CheckpointError, match="format version 99"):
        fl.checkpoint.load(path)


@pytest.mark.parametrize(
    "manifest",
    [
        [],
        {"version": 1},
        {"version": 1, "leaves": [{"name": "w"}]},
        {"version": 1, "leaves": [_entry("w", np.ones(2, np.float32)) | {"kind": "?"}]},
        "{",
    ],
    ids=["list", "no-leaves", "bad-entry", "unknown-kind", "not-json"],
)
def test_malformed_manifest(tmp_path, manifest):
    path = tmp_path / "x.safetensors"
    arr = np.ones(2, np.float32)
    if manifest == "{":
        metadata = {
            "functorch_lite.manifest": "{",
            "functorch_lite.manifest_sha256": hashlib.sha256(b"{").hexdigest(),
        }
        path.write_bytes(safetensors.numpy.save({"w": arr}, metadata=metadata))
    else:
        _write_raw(path, {"w": arr}, manifest)
    with pytest.raises(fl.checkpoint.CheckpointError, match="manifest is malformed"):
        fl.checkpoint.load(path)


def test_manifest_and_tensor_table_disagree(tmp_path):
    arr = np.ones(2, np.float32)
    path = tmp_path / "x.safetensors"
    _write_raw(path, {"w": arr}, {"version": 1, "leaves": [_entry("v", arr)]})
    with pytest.raises(fl.checkpoint.CheckpointError, match="no tensor has that name"):
        fl.checkpoint.load(path)
    _write_raw(path, {"w": arr, "v": arr}, {"version": 1, "leaves": [_entry("w", arr)]})
    with pytest.raises(fl.checkpoint.CheckpointError, match="not in its manifest"):
        fl.checkpoint.load(path)
    entry = _entry("w", arr) | {"dtype": "int32"}
    _write_raw(path, {"w": arr}, {"version": 1, "leaves": [entry]})
    with pytest.raises(fl.checkpoint.CheckpointError, match="in the tensor table but"):
        fl.checkpoint.load(path)


def test_undecodable_tensor_table(tmp_path):
    # A valid header and manifest, but a tensor entry that safetensors rejects.
    manifest = json.dumps({"version": 1, "leaves": []})
    header = json.dumps(
        {
            "__metadata__": {
                "functorch_lite.manifest": manifest,
                "functorch_lite.manifest_sha256": hashlib.sha256(
                    manifest.encode()
                ).hexdigest(),
            },
            "w": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]},
        }
    ).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(
        fl.checkpoint.CheckpointError, match="safetensors cannot decode"
    ):
        fl.checkpoint.load(path)


# ------------------------------------------------------------- mismatch errors


def test_missing_leaf(tmp_path):
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, {"a": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"has no leaf 'b' that `like` has") as e:
        fl.checkpoint.load(path, like={"a": jnp.ones(2), "b": jnp.ones(2)})
    assert "PyTreeDef" in str(e.value) and str(path) in str(e.value)


def test_extra_leaf(tmp_path):
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, {"a": jnp.ones(2), "b": {"c": jnp.ones(2)}})
    with pytest.raises(TypeError, match=r"has leaf 'b\.c' that `like` lacks"):
        fl.checkpoint.load(path, like={"a": jnp.ones(2)})


def test_shape_mismatch(tmp_path):
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, {"w": jnp.ones((2, 3))})
    with pytest.raises(
        ValueError,
        match=r"leaf 'w' in .* is float32\(2, 3\); `like` expects float32\(3, 2\)",
    ):
        fl.checkpoint.load(path, like={"w": jnp.ones((3, 2))})


def test_dtype_mismatch(tmp_path):
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, {"w": jnp.ones(3)})
    with pytest.raises(
        ValueError, match=r"leaf 'w' .* float32\(3,\); `like` expects int32"
    ):
        fl.checkpoint.load(path, like={"w": jnp.ones(3, jnp.int32)})


@pytest.mark.parametrize(
    "saved, like",
    [
        (2**40, jax.ShapeDtypeStruct((), jnp.int32)),  # does not fit
        (0.1, jax.ShapeDtypeStruct((), jnp.float32)),  # not exact in float32
        (jnp.ones(()), 1),  # float into int
        (jnp.ones(2), 1.0),  # not 0-d
    ],
    ids=["int-overflow", "float-inexact", "float-to-int", "vector-to-scalar"],
)
def test_python_scalar_mismatch(tmp_path, saved, like):
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, {"s": saved})
    with pytest.raises(ValueError, match=r"leaf 's' .* `like` expects"):
        fl.checkpoint.load(path, like={"s": like})


@pytest.mark.parametrize(
    "saved, like",
    [
        (jax.random.key(0), jax.random.PRNGKey(0)),
        (jax.random.PRNGKey(0), jax.random.key(0)),
        (jax.random.key(0), jax.random.key(0, impl="rbg")),
        (jax.random.key(0), jax.random.split(jax.random.key(0), 2)),
    ],
    ids=["typed-into-uint32", "uint32-into-typed", "impl", "shape"],
)
def test_key_mismatch(tmp_path, saved, like):
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, {"key": saved})
    with pytest.raises(ValueError, match=r"leaf 'key' .* `like` expects"):
        fl.checkpoint.load(path, like={"key": like})


def test_like_may_hold_deleted_arrays(tmp_path):
    # `fit` donates params, so a `like` built from old params holds deleted
    # arrays; their shape, dtype and sharding are still known.
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, {"w": jnp.arange(3.0)})
    like = jnp.zeros(3)
    like.delete()
    assert fl.checkpoint.load(path, like={"w": like})["w"].tolist() == [0, 1, 2]


def test_unsupported_like_leaf(tmp_path):
    path = tmp_path / "x.safetensors"
    fl.checkpoint.save(path, {"w": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"leaf 'w' of `like` is a str"):
        fl.checkpoint.load(path, like={"w": "weights"})


# ----------------------------------------------------------------- save errors


def test_save_rejects_bad_leaves(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match=r"save: leaf 'name' is a str"):
        fl.checkpoint.save(path, {"name": "net"})
    with pytest.raises(TypeError, match=r"leaf 'z' has dtype complex128"):
        fl.checkpoint.save(path, {"z": np.ones(2, np.complex128)})
    with pytest.raises(ValueError, match=r"leaf 'n' is the int .* outside the int64"):
        fl.checkpoint.save(path, {"n": 2**70})
    with pytest.raises(ValueError, match=r"the same checkpoint name 'a\.b'"):
        fl.checkpoint.save(path, {"a.b": jnp.ones(1), "a": {"b": jnp.ones(1)}})
    assert not os.listdir(tmp_path)


def test_bad_path_arguments(tmp_path):
    with pytest.raises(TypeError, match=r"save: `path` must be a str or os.PathLike"):
        fl.checkpoint.save(3, {})
    with pytest.raises(TypeError, match=r"load: `path` must be a str or os.PathLike"):
        fl.checkpoint.load(None)
    with pytest.raises(FileNotFoundError, match=r"save: the folder .* does not exist"):
        fl.checkpoint.save(tmp_path / "no" / "x.safetensors", {})


def _q(path: Any) -> str:
    """A regex for `path` as a message quotes it: its repr."""
    return re.escape(repr(os.fspath(path)))


class _FsPath:
    def __init__(self, value: Any):
        self.value = value

    def __fspath__(self) -> Any:
        return self.value

    def __repr__(self) -> str:
        return f"_FsPath({self.value!r})"


@pytest.mark.parametrize(
    "call",
    [
        lambda p: fl.checkpoint.save(p, {}),
        fl.checkpoint.load,
        lambda p: fl.checkpoint.save_numbered(p, 1, {}),
        fl.checkpoint.latest,
        fl.checkpoint.load_latest,
    ],
    ids=["save", "load", "save_numbered", "latest", "load_latest"],
)
def test_pathlike_of_bytes_or_broken_fspath(call):
    with pytest.raises(
        TypeError,
        match=r"^\w+: `(path|directory)` must be a str or os.PathLike of str; got "
        r"_FsPath _FsPath\(b'x'\), whose path is the bytes b'x'\.",
    ):
        call(_FsPath(b"x"))
    with pytest.raises(
        TypeError,
        match=r"`(path|directory)` must be a str or os.PathLike of str; got _FsPath "
        r"_FsPath\(3\), whose __fspath__ failed",
    ):
        call(_FsPath(3))


def test_save_into_a_file_or_with_a_trailing_separator(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(
        NotADirectoryError,
        match=r"save: the folder '.*a_file' of `path` '.*a_file/x\.st' is a file, "
        "not a folder",
    ):
        fl.checkpoint.save(file / "x.st", {"w": jnp.ones(2)})
    with pytest.raises(
        IsADirectoryError, match=r"save: `path` '.*new/' ends with a path separator"
    ):
        fl.checkpoint.save(str(tmp_path / "new") + os.sep, {"w": jnp.ones(2)})
    assert os.listdir(tmp_path) == ["a_file"]


def test_save_with_a_name_near_the_length_limit(tmp_path):
    # The hidden temporary name is longer than the target: it is cut to fit.
    path = tmp_path / ("a" * 250)
    fl.checkpoint.save(path, {"w": jnp.ones(2)})
    assert fl.checkpoint.load(path)["w"].tolist() == [1.0, 1.0]
    assert os.listdir(tmp_path) == [path.name]
    # A target name over the limit fails naming `path`, not the temporary file.
    with pytest.raises(OSError, match=r"save: cannot write `path` '.*a{256}'") as e:
        fl.checkpoint.save(tmp_path / ("a" * 256), {"w": jnp.ones(2)})
    assert ".tmp" not in str(e.value) and e.value.errno == errno.ENAMETOOLONG
    assert os.listdir(tmp_path) == [path.name]


_LINUX_PSEUDO_FS = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.path.isdir("/proc/self")),
    reason="needs Linux /proc and /sys, which refuse new files even to root",
)


@_LINUX_PSEUDO_FS
@pytest.mark.parametrize(
    "folder, error, why",
    [
        ("/sys", PermissionError, "its folder '/sys' is not writable"),
        ("/proc", FileNotFoundError, "cannot create a file in its folder '/proc'"),
    ],
    ids=["sys", "proc"],
)
def test_save_into_a_folder_that_refuses_files(folder, error, why):
    path = os.path.join(folder, "a.st")
    with pytest.raises(
        error, match=rf"^save: cannot write `path` {_q(path)}: {why} \("
    ) as e:
        fl.checkpoint.save(path, {"w": jnp.ones(2)})
    assert ".tmp" not in str(e.value)
    assert isinstance(e.value.__cause__, error)
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]


@pytest.mark.parametrize(
    "code, error, why",
    [
        (errno.EACCES, PermissionError, "is not writable"),
        (errno.EROFS, OSError, "is not writable"),
        (errno.ENOSPC, OSError, "cannot create a file in its folder"),
    ],
    ids=["EACCES", "EROFS", "ENOSPC"],
)
def test_save_when_the_temporary_file_cannot_be_created(
    tmp_path, monkeypatch, code, error, why
):
    path = tmp_path / "ckpt.safetensors"
    fl.checkpoint.save(path, _versioned(1))

    def refuse(name, *args, **kwargs):
        raise OSError(code, os.strerror(code), name)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(
        error, match=rf"^save: cannot write `path` {_q(path)}: (its folder .* )?{why}"
    ) as e:
        fl.checkpoint.save(path, _versioned(2))
    monkeypatch.undo()
    assert ".tmp" not in str(e.value) and e.value.errno == code
    assert e.value.__cause__.errno == code
    assert _assert_complete_version(path, {1}) == 1
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_save_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    fl.checkpoint.save(path, _versioned(1))

    def refuse(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted", src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(
        PermissionError,
        match=rf"^save: cannot write `path` {_q(path)}: writing failed \(Operation "
        r"not permitted\); the file that was at that path, if any, is unchanged\.$",
    ) as e:
        fl.checkpoint.save(path, _versioned(2))
    monkeypatch.undo()
    assert ".tmp" not in str(e.value)
    assert _assert_complete_version(path, {1}) == 1
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


@_LINUX_PSEUDO_FS
def test_load_an_unreadable_file():
    # Reading /proc/self/mem from offset 0 fails with EIO.
    with pytest.raises(
        OSError, match=r"^load: cannot read `path` '/proc/self/mem' \(Input/output"
    ):
        fl.checkpoint.load("/proc/self/mem")


def test_load_a_file_it_may_not_read(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    fl.checkpoint.save(path, {"w": jnp.ones(2)})

    def refuse(name, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(fl.checkpoint, "open", refuse, raising=False)
    with pytest.raises(
        PermissionError,
        match=rf"^load: cannot read `path` {_q(path)} \(Permission denied\)\.$",
    ):
        fl.checkpoint.load(path)
    with pytest.raises(PermissionError, match=r"^load: cannot read `path` '.*ckpt_0"):
        fl.checkpoint.load_latest(_one_numbered(tmp_path / "run"))
    with pytest.raises(OSError, match=r"^load: cannot read `path` '.*a{300}'"):
        fl.checkpoint.load(tmp_path / ("a" * 300))


# -------------------------------------------------------------------- atomicity


def _versioned(version: int, n: int = 64) -> dict[str, Any]:
    return {f"w{i}": np.full(n, version, np.float32) for i in range(3)} | {
        "step": version
    }


def _assert_complete_version(path: Any, allowed: set[int], n: int = 64) -> int:
    tree = fl.checkpoint.load(path, like=_versioned(0, n))
    version = tree["step"]
    assert version in allowed, (version, allowed)
    for i in range(3):
        np.testing.assert_array_equal(tree[f"w{i}"], np.full(n, version, np.float32))
    return version


@pytest.mark.parametrize("fail", ["replace", "fsync", "write"])
def test_failure_before_rename_keeps_previous_file(tmp_path, monkeypatch, fail):
    path = tmp_path / "ckpt.safetensors"
    fl.checkpoint.save(path, _versioned(1))

    def crash(*args, **kwargs):
        raise OSError(f"simulated crash in {fail}")

    if fail == "write":
        real_fdopen = os.fdopen

        class HalfWriter:  # writes half of the bytes, then the process "dies"
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                crash()

        monkeypatch.setattr(os, "fdopen", lambda *a: HalfWriter(real_fdopen(*a)))
    else:
        monkeypatch.setattr(os, fail, crash)
    with pytest.raises(
        OSError, match=r"save: cannot write `path` .*: writing failed \(simulated crash"
    ):
        fl.checkpoint.save(path, _versioned(2))
    monkeypatch.undo()
    assert _assert_complete_version(path, {1}) == 1
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # temp file removed


_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import functorch_lite.checkpoint as ckpt

    path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def stalled_replace(src, dst):
        print("renaming", flush=True)
        time.sleep(600)

    for version in range(1, 10**6):
        tree = {f"w{i}": np.full(n, version, np.float32) for i in range(3)}
        tree["step"] = version
        if mode == "before_rename" and version == 2:
            os.replace = stalled_replace
        print("start", version, flush=True)
        ckpt.save(path, tree)
        print("done", version, flush=True)
    """
)


class _Writer:
    """A writer subprocess running `_WRITER`, its stdout lines read by a thread."""

    def __init__(self, path: Any, mode: str, n: int):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), mode, str(n)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        """Return the next line that starts with `prefix`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise AssertionError(
                    f"writer never printed {prefix!r}; rc={self.proc.poll()}"
                ) from None
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def kill(self) -> list[str]:
        """SIGKILL the writer, reap it, and return every line it printed."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.seen


def test_kill_between_write_and_rename_keeps_previous_file(tmp_path):
    path = tmp_path / "ckpt_00000001.safetensors"
    n = 1 << 16
    writer = _Writer(path, "before_rename", n)
    try:
        writer.wait_for("done 1")
        writer.wait_for("renaming")  # version 2 is complete in its temp file
    finally:
        writer.kill()
    leftovers = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert len(leftovers) == 1
    assert _assert_complete_version(path, {1}, n) == 1
    assert fl.checkpoint.latest(tmp_path) == (1, str(path))
    # The next save_numbered removes the dead writer's temporary file.
    fl.checkpoint.save_numbered(tmp_path, 2, _versioned(2, n))
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt_00000001.safetensors",
        "ckpt_00000002.safetensors",
    ]


@pytest.mark.parametrize("fraction", [0.5, 0.8], ids=["mid", "late"])
def test_kill_during_save_loop_never_corrupts(tmp_path, fraction):
    """SIGKILL a process that overwrites one checkpoint in a loop, mid-save.

    Killing at these fractions of a measured save time mostly lands in the write
    of the temporary file (probed by hand: a partial temporary file is left in
    most runs); whatever the moment, the checkpoint must load as a whole version.
    """
    path = tmp_path / "ckpt.safetensors"
    n = 1 << 20  # 3 float32 leaves of 4 MiB: a save takes tens of milliseconds
    writer = _Writer(path, "loop", n)
    try:
        writer.wait_for("start 2")
        t0 = time.perf_counter()
        writer.wait_for("done 2")
        save_seconds = time.perf_counter() - t0
        writer.wait_for("start 3")
        time.sleep(fraction * save_seconds)
    finally:
        lines = writer.kill()
    # The kill may cut the last line short ("start" with no number yet).
    words = [line.split() for line in lines]
    started = max(
        int(w[1]) for w in words if len(w) == 2 and w[0] == "start" and w[1].isdigit()
    )
    assert started >= 3
    _assert_complete_version(path, set(range(2, started + 1)), n)


# --------------------------------------------------------------------- rotation


def test_save_numbered_keeps_the_newest(tmp_path):
    paths = [
        fl.checkpoint.save_numbered(tmp_path, step, {"s": step}, keep=3)
        for step in range(0, 60, 10)
    ]
    assert paths[-1] == str(tmp_path / "ckpt_00000050.safetensors")
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt_00000030.safetensors",
        "ckpt_00000040.safetensors",
        "ckpt_00000050.safetensors",
    ]
    assert fl.checkpoint.latest(tmp_path) == (50, paths[-1])
    assert fl.checkpoint.load_latest(tmp_path, like={"s": 0}) == (50, {"s": 50})


def test_save_numbered_keep_none_and_older_step(tmp_path):
    for step in (100, 200):
        fl.checkpoint.save_numbered(tmp_path, step, {"s": step}, keep=None)
    # An older step than the newest is kept (it was just written); the folder
    # then holds `keep` files: it and the newest other.
    path = fl.checkpoint.save_numbered(tmp_path, 50, {"s": 50}, keep=2)
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt_00000050.safetensors",
        "ckpt_00000200.safetensors",
    ]
    assert os.path.exists(path)
    big = fl.checkpoint.save_numbered(tmp_path, 1_234_567_890, {"s": 1}, keep=1)
    assert os.listdir(tmp_path) == [os.path.basename(big)]
    assert fl.checkpoint.latest(tmp_path)[0] == 1_234_567_890


def test_latest_ignores_other_files(tmp_path):
    assert fl.checkpoint.latest(tmp_path / "missing") is None
    assert fl.checkpoint.load_latest(tmp_path / "missing", like={}) is None
    assert fl.checkpoint.latest(tmp_path) is None
    # A live writer's temporary file (this process's) and another host's.
    live = fl.checkpoint._temp_path(str(tmp_path / "ckpt_00000099.safetensors"))
    other_host = ".ckpt_00000098.safetensors.0123abcd.999999999.0a1b2c3d.tmp"
    names = [
        "notes.txt",
        "ckpt_abc.safetensors",
        "ckpt_00000009.safetensors.bak",
        os.path.basename(live),
        other_host,
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert fl.checkpoint.latest(tmp_path) is None
    fl.checkpoint.save_numbered(tmp_path, 5, {"s": 5})
    assert fl.checkpoint.latest(tmp_path) == (
        5,
        str(tmp_path / "ckpt_00000005.safetensors"),
    )
    # save_numbered removes only this host's temporaries of dead writers.
    assert sorted(os.listdir(tmp_path)) == sorted([*names, "ckpt_00000005.safetensors"])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_load_latest_skips_a_damaged_newest_file(tmp_path, caplog, damage):
    for step in (1, 2, 3):
        fl.checkpoint.save_numbered(tmp_path, step, _versioned(step))
    newest = str(tmp_path / "ckpt_00000003.safetensors")
    if damage == "flip":
        _flip_tensor_byte(newest, "w1")
    else:
        os.truncate(newest, os.path.getsize(newest) // 2)
    with caplog.at_level(logging.WARNING, logger="functorch_lite.checkpoint"):
        step, tree = fl.checkpoint.load_latest(tmp_path, like=_versioned(0))
    assert step == 2
    _assert_bitwise_equal(tree, _versioned(2))
    assert "ckpt_00000003.safetensors" in caplog.text


def test_load_latest_raises_when_none_is_readable(tmp_path):
    for step in (1, 2):
        path = fl.checkpoint.save_numbered(tmp_path, step, {"s": step})
        os.truncate(path, 10)
    with pytest.raises(fl.checkpoint.CheckpointError, match="no readable checkpoint"):
        fl.checkpoint.load_latest(tmp_path, like={"s": 0})


def test_load_latest_does_not_skip_a_mismatch(tmp_path):
    fl.checkpoint.save_numbered(tmp_path, 1, {"w": jnp.ones(2)})
    fl.checkpoint.save_numbered(tmp_path, 2, {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"leaf 'w'"):
        fl.checkpoint.load_latest(tmp_path, like={"w": jnp.ones(2)})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"step": -1}, ValueError, r"`step` must be a non-negative int; got -1"),
        ({"step": 1.0}, TypeError, r"`step` must be a non-negative int; got float"),
        ({"step": True}, TypeError, r"`step` must be a non-negative int; got bool"),
        ({"keep": 0}, ValueError, r"`keep` must be a positive int or None; got 0"),
        ({"keep": "3"}, TypeError, r"`keep` must be a positive int or None; got str"),
    ],
    ids=["negative-step", "float-step", "bool-step", "zero-keep", "str-keep"],
)
def test_save_numbered_bad_arguments(tmp_path, kwargs, error, match):
    kwargs = {"step": 1} | kwargs
    with pytest.raises(error, match="save_numbered: " + match):
        fl.checkpoint.save_numbered(tmp_path, tree={}, **kwargs)


def _one_numbered(folder: Any) -> Any:
    fl.checkpoint.save_numbered(folder, 1, {"w": jnp.ones(2)})
    return folder


@_LINUX_PSEUDO_FS
def test_save_numbered_cannot_create_the_directory():
    with pytest.raises(
        FileNotFoundError,
        match=r"^save_numbered: cannot create `directory` '/proc/nope': cannot "
        r"create it \(No such file or directory\)\.$",
    ) as e:
        fl.checkpoint.save_numbered("/proc/nope", 1, {"w": jnp.ones(2)})
    assert isinstance(e.value.__cause__, FileNotFoundError)


def test_save_numbered_may_not_create_the_directory(tmp_path, monkeypatch):
    def refuse(name, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.raises(
        PermissionError,
        match=r"^save_numbered: cannot create `directory` '.*run': the folder it "
        r"goes in is not writable \(Permission denied\)\.$",
    ):
        fl.checkpoint.save_numbered(tmp_path / "run", 1, {"w": jnp.ones(2)})


@_LINUX_PSEUDO_FS
def test_save_numbered_into_an_unwritable_directory():
    with pytest.raises(
        PermissionError,
        match=r"^save_numbered: cannot write checkpoint 'ckpt_00000001\.safetensors' "
        r"in `directory` '/sys': its folder '/sys' is not writable",
    ) as e:
        fl.checkpoint.save_numbered("/sys", 1, {"w": jnp.ones(2)})
    assert ".tmp" not in str(e.value)
    assert not [name for name in os.listdir("/sys") if name.endswith(".tmp")]


@pytest.mark.parametrize("fn", ["latest", "load_latest"])
def test_latest_of_a_file(tmp_path, fn):
    file = tmp_path / "ckpt.safetensors"
    fl.checkpoint.save(file, {"w": jnp.ones(2)})
    call = getattr(fl.checkpoint, fn)
    with pytest.raises(
        NotADirectoryError,
        match=rf"^{fn}: `directory` {_q(file)} is a file, not a folder; pass the "
        "folder of numbered checkpoints",
    ):
        call(file)
    # A folder below a file does not exist: no checkpoint, as for a missing one.
    assert call(file / "run") is None


@pytest.mark.parametrize("fn", ["latest", "load_latest"])
def test_latest_of_a_folder_it_may_not_list(tmp_path, monkeypatch, fn):
    def refuse(name, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(
        PermissionError,
        match=rf"^{fn}: cannot list `directory` {_q(tmp_path)} \(Permission denied\)",
    ):
        getattr(fl.checkpoint, fn)(tmp_path)


def test_a_folder_named_like_a_checkpoint_is_not_one(tmp_path):
    (tmp_path / "ckpt_00000009.safetensors").mkdir()
    assert fl.checkpoint.latest(tmp_path) is None
    assert fl.checkpoint.load_latest(tmp_path) is None
    path = fl.checkpoint.save_numbered(tmp_path, 1, {"s": 1}, keep=1)
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt_00000001.safetensors",
        "ckpt_00000009.safetensors",
    ]
    assert fl.checkpoint.latest(tmp_path) == (1, path)
    assert fl.checkpoint.load_latest(tmp_path, like={"s": 0}) == (1, {"s": 1})


def test_prune_failure_warns_and_keeps_the_new_checkpoint(
    tmp_path, monkeypatch, caplog
):
    old = fl.checkpoint.save_numbered(tmp_path, 1, {"s": 1})
    real_unlink = os.unlink

    def refuse_old(name, *args, **kwargs):
        if os.fspath(name) == old:
            raise PermissionError(errno.EPERM, "Operation not permitted", name)
        return real_unlink(name, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse_old)
    with caplog.at_level(logging.WARNING, logger="functorch_lite.checkpoint"):
        new = fl.checkpoint.save_numbered(tmp_path, 2, {"s": 2}, keep=1)
    assert "cannot delete old checkpoint" in caplog.text and old in caplog.text
    assert sorted(os.listdir(tmp_path)) == [
        os.path.basename(old),
        os.path.basename(new),
    ]
    assert fl.checkpoint.load_latest(tmp_path, like={"s": 0}) == (2, {"s": 2})


# --------------------------------------------------------------------- property

_DTYPES = [
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int32,
    np.int64,
    np.uint8,
    np.uint32,
    np.bool_,
    np.complex64,
]
_arrays = st.sampled_from(_DTYPES).flatmap(
    lambda dtype: hnp.arrays(
        dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
    )
)
_names = st.text(alphabet="abcxyz_", min_size=1, max_size=4)
_trees = st.dictionaries(
    _names, _arrays | st.dictionaries(_names, _arrays, max_size=3), max_size=4
)


@settings(max_examples=25, deadline=None)
@given(tree=_trees)
def test_random_trees_round_trip_exactly(tree):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.safetensors")
        fl.checkpoint.save(path, tree)
        _assert_bitwise_equal(tree, fl.checkpoint.load(path, like=tree))
