"""Checkpoints: save and load pytrees to safetensors files, atomically and validated.

`save(path, tree)` writes any pytree of arrays (params, optax state, the step
number, PRNG keys) to one file; `load(path, like=tree)` reads it back into the
structure of `like`. `save_numbered`, `latest` and `load_latest` keep a folder
of periodic checkpoints for training loops; `save_async` and
`save_numbered_async` write in the background while training goes on.

Format: a safetensors file, written and parsed by the `safetensors` library.
Why safetensors and not NumPy `.npz`:

- other tools read it: `safetensors.torch.load_file` in PyTorch, Hugging Face
  tools, the Rust, JavaScript and C++ readers;
- it is a well-kept, audited library with a small, fixed layout (an 8-byte
  header length, a JSON header, raw little-endian tensor bytes) and loading
  never runs code (a pickle inside an `.npz` can);
- it stores `bfloat16` and `float8` tensors natively (`.npz` has no dtype for
  them) and has a string map in its header for our manifest.

Layout of a file written by `save`:

- one tensor per leaf, named by the leaf's tree path in dotted form:
  `input_linear.weight` for `params["input_linear"]["weight"]`, `0.mu.w` for
  field `mu` of the first element of a tuple. A lone array is named `""`.
- header metadata `functorch_lite.manifest`: JSON with the format version, the
  tree structure (`str(treedef)`, for people; `load` matches leaves by name),
  and per leaf its name, kind, dtype, shape and the sha256 of its bytes.
  `functorch_lite.manifest_sha256` guards the manifest itself.
- Python scalars (`int`, `float`, `bool`, such as the step number) are stored
  as 0-d `int64`, `float64` and `bool` tensors and come back as the Python type
  of the `like` leaf. New-style typed PRNG keys (`jax.random.key(0)`) are stored
  as their `jax.random.key_data` (`uint32`), with their implementation name, and
  rebuilt with `jax.random.wrap_key_data`. Old-style `uint32` keys are plain
  arrays.

`save` streams: it writes the safetensors header (computed from the leaves'
shapes and dtypes, its checksums filled in at the end: a sha256 hex digest has
a fixed length), then each leaf's bytes, one leaf at a time, hashing them on a
helper thread as they are written. It never builds the file in memory: beyond
the tree itself it holds at most one leaf's host copy (none for a leaf already
in host memory, NumPy or a CPU `jax.Array`). The tensors are laid out as the
`safetensors` writer lays them out (by dtype, widest first, then by name), so
any safetensors reader reads the file.

`save_async` and `save_numbered_async` copy the tree to host memory on the
calling thread (once), then write it on a background thread and return an
`AsyncSave` at once: training goes on while the file is written; `.wait()`
returns when it is on disk and raises the writer's error, if any. One save at
a time is in flight per folder: the next one waits for it.

Writes are atomic: the bytes go to a hidden temporary file in the same folder,
which is flushed and fsync'ed, then renamed over the target with `os.replace`,
and the folder is fsync'ed. A crash at any point leaves either the previous
file or the new one, never a mix; a temporary file left by a killed writer is
ignored by `latest` and removed by the next `save_numbered`.

Errors:

- `CheckpointError` (a `ValueError`): the file is not a readable checkpoint:
  truncated, a byte changed (checksum mismatch), not a safetensors file, or a
  safetensors file without our manifest. The message names the file.
- `TypeError`: the leaves in the file and the leaves of `like` differ (a
  missing or an extra leaf); `ValueError`: a leaf's shape or dtype differs from
  `like`. Both messages name the file and the leaf path.
- `FileNotFoundError`: there is no file at `path`.
- Other `OSError`s (`PermissionError`, ...): a file or folder cannot be
  written, created, read or listed. The error keeps the OS's class and errno,
  and its message names the function, the argument and the reason (never the
  hidden temporary file); the OS's own error is chained as `__cause__`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors

from functorch_lite._checks import check_int

__all__ = [
    "FORMAT_VERSION",
    "AsyncSave",
    "CheckpointError",
    "latest",
    "load",
    "load_latest",
    "save",
    "save_async",
    "save_numbered",
    "save_numbered_async",
]

FORMAT_VERSION = 1

_MANIFEST_KEY = "functorch_lite.manifest"
_MANIFEST_SHA_KEY = "functorch_lite.manifest_sha256"
_FORMAT_NAME = "functorch_lite.checkpoint"

# numpy dtype name -> safetensors dtype code. These are the dtypes that both the
# safetensors writer and PyTorch's reader understand.
_DTYPE_CODES = {
    "bool": "BOOL",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}
_ML_DTYPES = {
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}

_KINDS = ("array", "int", "float", "bool", "key")

_NUMBERED = re.compile(r"^ckpt_(\d+)\.safetensors$")
_TEMP = re.compile(
    r"^\.(?P<target>.+)\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$"
)

_log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A file is not a readable checkpoint: truncated, corrupted or of another kind.

    Raised by `load` (and `load_latest` when no checkpoint in the folder is
    readable). The message names the file. It subclasses `ValueError`, so
    `except ValueError` catches it too.
    """


# ----------------------------------------------------------------------- naming


def _key_name(entry: Any) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def _leaf_name(path: tuple) -> str:
    """Name a leaf by its tree path in dotted form: `input_linear.weight`."""
    return ".".join(_key_name(entry) for entry in path)


def _named_leaves(fn: str, arg: str, tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """Flatten `tree` to `(name, leaf)` pairs, checking that names are unique."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named: list[tuple[str, Any]] = []
    seen: dict[str, str] = {}
    for path, leaf in pairs:
        name = _leaf_name(path)
        keystr = jax.tree_util.keystr(path)
        if name in seen:
            raise ValueError(
                f"{fn}: two leaves of `{arg}`, {seen[name]} and {keystr}, have "
                f"the same checkpoint name {name!r}. Rename a key so that the "
                "dotted paths differ."
            )
        seen[name] = keystr
        named.append((name, leaf))
    return named, treedef


def _check_path(fn: str, path: Any, arg: str = "path") -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"{fn}: `{arg}` must be a str or os.PathLike; got {type(path).__name__} "
            f"{path!r}."
        )
    given = path
    try:
        path = os.fspath(path)
    except TypeError as err:  # A __fspath__ that returns neither str nor bytes.
        raise TypeError(
            f"{fn}: `{arg}` must be a str or os.PathLike of str; got "
            f"{type(given).__name__} {given!r}, whose __fspath__ failed: {err}."
        ) from err
    if not isinstance(path, str):
        raise TypeError(
            f"{fn}: `{arg}` must be a str or os.PathLike of str; got "
            f"{type(given).__name__} {given!r}, whose path is the "
            f"{type(path).__name__} {path!r}."
        )
    if not path:
        raise ValueError(f"{fn}: `{arg}` is empty.")
    if "\0" in path:
        raise ValueError(f"{fn}: `{arg}` {path!r} contains a NUL byte.")
    return path


def _reason(err: OSError) -> str:
    """The OS's words for `err`, without the file names it may carry."""
    return err.strerror or str(err)


def _os_error(err: OSError, message: str) -> OSError:
    """An error of the same OSError subclass and errno as `err`, with `message`."""
    try:
        new = type(err)(message)
    except Exception:  # A subclass with another constructor.
        new = OSError(message)
    new.errno = err.errno
    return new


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(_ML_DTYPES.get(name, name))


# ------------------------------------------------------------------------ save


# Where each tensor goes in the file: safetensors' own order (by dtype, widest
# first, then by name), which keeps every tensor aligned to its item size. The
# ranks are the order of safetensors' `Dtype` enum.
_DTYPE_RANK = {
    code: rank
    for rank, code in enumerate(
        ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16"]
        + ["I32", "U32", "F32", "C64", "F64", "I64", "U64"]
    )
}

# A leaf's bytes go to the file and to its hash in chunks of this size; the hash
# of a leaf at least _HASH_ASIDE bytes long runs on a helper thread, beside the
# write (hashlib and file writes release the GIL).
_CHUNK = 16 << 20
_HASH_ASIDE = 1 << 20
# The header is written first with this in place of each sha256, and rewritten
# once the leaves are hashed: a hex digest always has 64 characters, so the
# header keeps its length.
_NO_HASH = "0" * 64
# Linux: ask the kernel to start writing each chunk out as soon as it is in
# the page cache (and to drop it from the cache once it is on disk), so that
# the final fsync has little left to wait for.
_KICK_WRITEBACK = sys.platform.startswith("linux") and hasattr(os, "posix_fadvise")


class _Leaf:
    """One leaf to save: its manifest entry, its tensor-table fields, its value."""

    __slots__ = ("code", "entry", "host", "name", "nbytes", "shape", "value")

    def __init__(self, name: str, kind: str, value: Any, extra: dict[str, Any]):
        dtype = np.dtype(value.dtype)
        self.name = name
        self.value = value  # a jax.Array (on any device) or a NumPy array
        self.host: np.ndarray | None = None  # set by `fetch`
        self.code = _DTYPE_CODES[dtype.name]
        self.shape = [int(d) for d in value.shape]
        self.nbytes = math.prod(self.shape) * dtype.itemsize
        self.entry: dict[str, Any] = {"name": name, **extra}
        self.entry.update(kind=kind, dtype=dtype.name, shape=self.shape)

    def fetch(self) -> None:
        """Copy the value to host memory now, into memory that only this leaf holds."""
        self.host = _host_array(self.value, private=True)
        self.value = None

    def array(self) -> np.ndarray:
        """The bytes to write: a contiguous little-endian host array."""
        if self.host is not None:
            return self.host
        return _host_array(self.value, private=False)


def _device_to_host(x: jax.Array) -> tuple[np.ndarray, bool]:
    """`x` as a NumPy array, and whether that array is a copy of its own."""
    if not x.is_fully_addressable:
        # A run over several processes: a replicated array (params and
        # optimizer state under data parallelism) has its whole value here.
        if not x.is_fully_replicated:
            raise ValueError(
                f"an array of shape {x.shape} is split across processes "
                f"({x.sharding}); gather it first (`jax.experimental."
                "multihost_utils.process_allgather`) or save each process's part."
            )
        x = x.addressable_data(0)
    devices = x.devices()
    if len(devices) == 1 and next(iter(devices)).platform == "cpu":
        return np.asarray(x), False  # A view of the CPU buffer: no copy.
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # No CPU backend (JAX_PLATFORMS excludes it).
        return np.asarray(jax.device_get(x)), False
    # Through a new CPU array rather than np.asarray(x), which would keep its
    # host copy cached on `x`: for a save of leaf after leaf, that would hold
    # every leaf in host memory at once.
    return np.asarray(jax.device_put(x, cpu)), True


def _host_array(value: Any, private: bool) -> np.ndarray:
    """`value` as a C-contiguous little-endian host array (a copy when `private`)."""
    if isinstance(value, jax.Array):
        arr, own = _device_to_host(value)
    else:
        arr, own = value, False
    if arr.dtype.byteorder == ">":
        arr, own = arr.astype(arr.dtype.newbyteorder("<")), True
    if not arr.flags.c_contiguous:
        arr, own = np.ascontiguousarray(arr), True
    if private and not own:
        arr = arr.copy()
    return arr


def _plan_leaf(fn: str, name: str, leaf: Any) -> _Leaf:
    """Check one leaf and describe it, without copying its bytes anywhere."""
    if name == "__metadata__":
        raise ValueError(
            f"{fn}: a leaf of `tree` is named '__metadata__', a name that safetensors "
            "keeps for its own header. Rename that key."
        )
    is_deleted = getattr(leaf, "is_deleted", None)
    if isinstance(leaf, jax.Array) and callable(is_deleted) and is_deleted():
        raise ValueError(
            f"{fn}: leaf {name!r} of `tree` is a deleted jax.Array (its buffer was "
            "donated to a jitted step, or deleted); save the arrays that the step "
            "returned instead."
        )
    extra: dict[str, Any] = {}
    if _is_key(leaf) and isinstance(leaf, jax.Array):
        kind = "key"
        extra["key_dtype"] = str(leaf.dtype)
        extra["key_impl"] = str(jax.random.key_impl(leaf))
        extra["key_shape"] = list(leaf.shape)
        value = jax.random.key_data(leaf)
    elif isinstance(leaf, jax.Array):
        kind, value = "array", leaf
    elif isinstance(leaf, np.ndarray | np.generic):
        # Before the Python types: np.float64 subclasses float.
        kind, value = "array", np.asarray(leaf)
    elif isinstance(leaf, bool):
        kind, value = "bool", np.asarray(leaf, dtype=np.bool_)
    elif isinstance(leaf, int):
        try:
            kind, value = "int", np.asarray(leaf, dtype=np.int64)
        except OverflowError as err:
            raise ValueError(
                f"{fn}: leaf {name!r} is the int {leaf!r}, outside the int64 range "
                "that a checkpoint stores. Store it as a smaller int or an array."
            ) from err
    elif isinstance(leaf, float):
        kind, value = "float", np.asarray(leaf, dtype=np.float64)
    else:
        raise TypeError(
            f"{fn}: leaf {name!r} is a {type(leaf).__name__} ({leaf!r}); expected a "
            "jax.Array, a NumPy array or a Python int, float or bool."
        )
    dtype_name = np.dtype(value.dtype).name
    if dtype_name not in _DTYPE_CODES:
        raise TypeError(
            f"{fn}: leaf {name!r} has dtype {dtype_name}, which safetensors "
            f"cannot store; expected one of {sorted(_DTYPE_CODES)}. Cast the leaf "
            "first."
        )
    return _Leaf(name, kind, value, extra)


def _plan(fn: str, tree: Any) -> tuple[list[_Leaf], str]:
    """Check every leaf of `tree` (before any file is touched) and describe them."""
    named, treedef = _named_leaves(fn, "tree", tree)
    return [_plan_leaf(fn, name, leaf) for name, leaf in named], str(treedef)


def _header(treedef: str, leaves: list[_Leaf], table: dict[str, Any]) -> bytes:
    """The safetensors header: its 8-byte length and its JSON, padded to 8 bytes.

    The JSON is what the `safetensors` writer makes: compact, UTF-8, the
    `__metadata__` map (our manifest) first, then the tensor table in data
    order, padded with spaces so that the tensor bytes start 8-byte aligned.
    """
    manifest = json.dumps(
        {
            "format": _FORMAT_NAME,
            "version": FORMAT_VERSION,
            "treedef": treedef,
            "leaves": [leaf.entry for leaf in leaves],
        },
        sort_keys=True,
    )
    metadata = {
        _MANIFEST_KEY: manifest,
        _MANIFEST_SHA_KEY: hashlib.sha256(manifest.encode()).hexdigest(),
    }
    text = json.dumps(
        {"__metadata__": metadata, **table}, separators=(",", ":"), ensure_ascii=False
    ).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class _Stream:
    """Write leaves' bytes to an open file, hashing them on the way."""

    def __init__(self, f: Any, fd: int, pos: int):
        self.f, self.fd, self.pos, self.kicked = f, fd, pos, 0
        self.kick = _KICK_WRITEBACK
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def write(self, arr: np.ndarray) -> str:
        """Write `arr`'s bytes; return their sha256."""
        data = arr.reshape(-1).view(np.uint8).data
        digest = hashlib.sha256()
        if len(data) < _HASH_ASIDE:
            digest.update(data)
            self.f.write(data)
            self.pos += len(data)
            return digest.hexdigest()
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="functorch_lite-checkpoint-hash"
            )
        pending = []
        try:
            for start in range(0, len(data), _CHUNK):
                chunk = data[start : start + _CHUNK]
                pending.append(self.pool.submit(digest.update, chunk))
                self.f.write(chunk)
                self.pos += len(chunk)
                self._kick_writeback()
        finally:  # The hasher reads `arr`: let it finish before `arr` goes.
            concurrent.futures.wait(pending)
        for job in pending:
            job.result()
        return digest.hexdigest()

    def _kick_writeback(self) -> None:
        if not self.kick or self.pos - self.kicked < _CHUNK:
            return
        self.f.flush()
        try:
            os.posix_fadvise(
                self.fd, self.kicked, self.pos - self.kicked, os.POSIX_FADV_DONTNEED
            )
        except OSError:  # Only a hint: a file system may refuse it.
            self.kick = False
        self.kicked = self.pos

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _fsync_dir(directory: str) -> None:
    # Make the rename itself durable. Not every platform can open a folder, and
    # some file systems refuse to fsync one; the new file is in place by now, so
    # a refusal must not turn a finished save into an error.
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


# The longest file name, in bytes, on the common file systems (ext4, XFS, btrfs,
# APFS, NTFS): the temporary name is cut to fit it.
_NAME_MAX = 255


def _temp_path(path: str) -> str:
    """Name a hidden temporary file beside `path`, tagged with host and pid."""
    directory, base = os.path.split(os.path.abspath(path))
    tag = f"{_host_tag()}.{os.getpid()}.{secrets.token_hex(4)}"
    # A target name near the limit must not make its longer temporary name fail.
    room = _NAME_MAX - len(f"..{tag}.tmp")
    while len(os.fsencode(base)) > room:
        base = base[:-1]
    return os.path.join(directory, f".{base}.{tag}.tmp")


def _write_file(path: str, treedef: str, leaves: list[_Leaf], what: str) -> None:
    """Stream `leaves` into a safetensors file at `path`, atomically.

    The header goes first (with placeholder hashes), then each leaf's bytes, one
    leaf at a time, hashed on the way; then the header is rewritten with the
    hashes (the same length), and the file is fsync'ed and renamed over `path`.
    Host memory in use beyond the tree itself: one leaf's host copy (none for a
    leaf already in host memory). `what` opens the message of an OSError.
    """
    order = sorted(leaves, key=lambda leaf: (-_DTYPE_RANK[leaf.code], leaf.name))
    table: dict[str, Any] = {}
    offset = 0
    for leaf in order:
        end = offset + leaf.nbytes
        table[leaf.name] = {
            "dtype": leaf.code,
            "shape": leaf.shape,
            "data_offsets": [offset, end],
        }
        offset = end
    for leaf in leaves:
        leaf.entry["sha256"] = _NO_HASH
    placeholder = _header(treedef, leaves, table)

    directory = os.path.dirname(os.path.abspath(path))
    tmp = _temp_path(path)
    # os.open with mode 0o666 lets the umask decide the final permissions, as
    # for a file created with open().
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(tmp, flags, 0o666)
    except OSError as err:  # Its message would name the hidden temporary file.
        if isinstance(err, PermissionError) or err.errno == errno.EROFS:
            why = f"its folder {directory!r} is not writable"
        else:
            why = f"cannot create a file in its folder {directory!r}"
        raise _os_error(err, f"{what}: {why} ({_reason(err)}).") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(placeholder)
            stream = _Stream(f, fd, len(placeholder))
            try:
                for leaf in order:
                    leaf.entry["sha256"] = stream.write(leaf.array())
                    leaf.host = None  # An asynchronous save's copy: done with it.
            finally:
                stream.close()
            header = _header(treedef, leaves, table)
            if len(header) != len(placeholder):  # Cannot happen: hex digests.
                raise AssertionError("the checkpoint header changed its length")
            f.seek(0)
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _os_error(
                err,
                f"{what}: writing failed ({_reason(err)}); the file that was at "
                "that path, if any, is unchanged.",
            ) from err
        raise
    _fsync_dir(directory)


def _check_target(fn: str, path: str) -> None:
    """Check that `path` names a file in an existing folder, before any work."""
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{fn}: `path` {path!r} is a folder; pass a file path inside it."
        )
    if path.endswith((os.sep, os.altsep or os.sep)):
        raise IsADirectoryError(
            f"{fn}: `path` {path!r} ends with a path separator, so it names a "
            "folder; pass a file path."
        )
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(
            f"{fn}: the folder {directory!r} of `path` {path!r} is a file, not a "
            "folder."
        )
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{fn}: the folder {directory!r} of `path` {path!r} does not exist; "
            "create it first."
        )


# ------------------------------------------------------------ one save a folder


class _Folder:
    """The saves into one folder: `lock` is held while one is in flight."""

    __slots__ = ("failed", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # The last asynchronous save here, when it failed and nobody has seen
        # its error yet.
        self.failed: AsyncSave | None = None


_FOLDERS: dict[str, _Folder] = {}
_FOLDERS_LOCK = threading.Lock()


def _claim(directory: str) -> _Folder:
    """Wait until no save into `directory` is in flight, then hold the folder.

    Raises the error of the previous asynchronous save into the folder when it
    failed and its `AsyncSave.wait` was not called: a background failure is
    never lost. The caller releases `lock` when its save is over.
    """
    key = os.path.normcase(os.path.abspath(directory))
    with _FOLDERS_LOCK:
        folder = _FOLDERS.setdefault(key, _Folder())
    folder.lock.acquire()
    failed, folder.failed = folder.failed, None
    if failed is not None and not failed._seen and failed._error is not None:
        failed._seen = True
        folder.lock.release()
        raise failed._error
    return folder


def _save(fn: str, path: str, tree: Any, what: str, keep: int | None = None) -> None:
    """Save `tree` to `path` now; prune the folder to `keep` when not `None`."""
    leaves, treedef = _plan(fn, tree)
    directory = os.path.dirname(os.path.abspath(path))
    folder = _claim(directory)
    try:
        _write_file(path, treedef, leaves, what)
        if keep is not None:
            _prune(fn, directory, path, keep)
    finally:
        folder.lock.release()


class AsyncSave:
    """A checkpoint being written in the background; `save_async` returns one.

    Attributes:
      path: the file being written (complete and renamed into place once the
        save is done without error).
    """

    def __init__(self, fn: str, path: str):
        self.path = path
        self._fn = fn
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._seen = False

    def done(self) -> bool:
        """Whether the save is over, done or failed (`wait` then does not block)."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> str:
        """Wait until the file is written and return its path.

        Args:
          timeout: the most seconds to wait; `None` waits as long as it takes.

        Returns:
          `path`, now complete on disk.

        Raises:
          TimeoutError: the save is still running after `timeout` seconds.
          OSError, and any error the writer met: the save failed; the message
            names the file, as for `save`. The file that was at `path`, if
            any, is unchanged, and no temporary file is left behind.
        """
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not timeout >= 0
        ):
            raise TypeError(
                "AsyncSave.wait: `timeout` must be None or a number of seconds "
                f">= 0; got {type(timeout).__name__} {timeout!r}."
            )
        if not self._finished.wait(timeout):
            raise TimeoutError(
                f"AsyncSave.wait: the save of {self.path!r} is still running after "
                f"{timeout} s."
            )
        if self._error is not None:
            self._seen = True
            raise self._error
        return self.path

    def __repr__(self) -> str:
        if not self.done():
            state = "running"
        elif self._error is not None:
            state = f"failed: {type(self._error).__name__}"
        else:
            state = "done"
        return f"<AsyncSave {self.path!r} ({state}), from {self._fn}>"


def _start(fn: str, path: str, tree: Any, what: str, keep: int | None) -> AsyncSave:
    """Copy `tree` to the host now and write it on a background thread."""
    leaves, treedef = _plan(fn, tree)
    directory = os.path.dirname(os.path.abspath(path))
    folder = _claim(directory)
    try:
        for leaf in leaves:  # The one host copy, before the caller moves on.
            leaf.fetch()
        handle = AsyncSave(fn, path)
        threading.Thread(
            target=_background,
            args=(handle, folder, directory, treedef, leaves, what, keep),
            name=f"functorch_lite-checkpoint-{os.path.basename(path)}",
        ).start()
    except BaseException:
        folder.lock.release()
        raise
    return handle


def _background(
    handle: AsyncSave,
    folder: _Folder,
    directory: str,
    treedef: str,
    leaves: list[_Leaf],
    what: str,
    keep: int | None,
) -> None:
    try:
        _write_file(handle.path, treedef, leaves, what)
        if keep is not None:
            _prune(handle._fn, directory, handle.path, keep)
    except BaseException as err:
        handle._error = err
        folder.failed = handle
        _log.warning(
            "%s: the background save of %r failed (%s); AsyncSave.wait() raises "
            "the error.",
            handle._fn,
            handle.path,
            err,
        )
    finally:
        leaves.clear()  # Free the host copy before anyone waits on the next save.
        handle._finished.set()
        folder.lock.release()


def save(path: str | os.PathLike, tree: Any) -> None:
    """Write `tree` to a safetensors checkpoint at `path`, atomically.

    The previous file at `path`, if any, stays intact until the new one is
    complete on disk; see the module docstring for the layout.

    Args:
      path: the file to write. Its folder must exist.
      tree: a pytree whose leaves are `jax.Array`s (typed PRNG keys included),
        NumPy arrays or Python `int`, `float` or `bool`: params, optax state,
        the step number, a key. `None` and empty nodes (optax `EmptyState`)
        have no leaves and need no storage.

    Raises:
      TypeError: a leaf is of another kind, or its dtype cannot be stored; or
        `path` is not a str or os.PathLike.
      ValueError: two leaves get the same dotted name, or an int does not fit
        in int64; or `path` is empty or holds a NUL byte.
      FileNotFoundError: the folder of `path` does not exist.
      NotADirectoryError: the folder of `path` is a file.
      IsADirectoryError: `path` is a folder, or ends with a path separator.
      OSError: the file cannot be written (`PermissionError`: its folder is
        not writable; the OS's error class otherwise). The message names
        `path` and the reason; the OS's error is chained as `__cause__`. No
        temporary file is left behind, and a file already at `path` is kept.

    Examples:
      >>> import os, tempfile, jax, optax
      >>> import functorch_lite as fl
      >>> net = fl.models.TwoLayerNet(3, 4, 1)
      >>> params = net.init(jax.random.key(0))
      >>> state = {"params": params, "opt_state": optax.adam(1e-3).init(params),
      ...          "step": 7, "key": jax.random.key(1)}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = os.path.join(tmp, "state.safetensors")
      ...     fl.checkpoint.save(path, state)
      ...     restored = fl.checkpoint.load(path, like=state)
      >>> restored["step"], bool((restored["params"]["w1"] == params["w1"]).all())
      (7, True)
    """
    path = _check_path("save", path)
    _check_target("save", path)
    _save("save", path, tree, f"save: cannot write `path` {path!r}")


def save_async(path: str | os.PathLike, tree: Any) -> AsyncSave:
    """Start writing `tree` to `path` in the background; return at once.

    The tree is copied to host memory on the calling thread (one copy of every
    leaf: device arrays are transferred, host arrays are copied), so the caller
    may go on at once, donate or overwrite its arrays; a background thread
    then writes the file exactly as `save` does: streamed, checksummed and
    atomic. Call `.wait()` on the result to know that the file is on disk, and
    to get the writer's error, if any.

    At most one save into a folder is in flight: a save (`save`, `save_async`,
    `save_numbered`, ...) into a folder with an asynchronous save in flight
    first waits for it to finish. If that save failed and its `.wait()` has
    not been called, the new save raises its error instead of starting, so a
    background failure is never lost. The background thread is not a daemon:
    a program that exits with a save in flight finishes writing it first.

    Args:
      path: the file to write. Its folder must exist.
      tree: the pytree to save, as for `save`.

    Returns:
      An `AsyncSave`: `.wait()` blocks until the file is complete and returns
      `path` (or raises the writer's error); `.done()` tells whether it is over.

    Raises:
      TypeError, ValueError, OSError: on the calling thread, at once, the
        argument errors of `save` (a bad `path`, a missing folder, a leaf of
        an unsupported kind or dtype); or, whatever its type, the error of the
        previous asynchronous save into the same folder (see above).
      OSError: from `.wait()`, the write errors of `save`, naming `path`.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = os.path.join(tmp, "state.safetensors")
      ...     pending = fl.checkpoint.save_async(path, {"w": jnp.ones(3), "step": 1})
      ...     # ... training goes on here while the file is written ...
      ...     written = pending.wait()
      ...     like = {"w": jnp.zeros(3), "step": 0}
      ...     restored = fl.checkpoint.load(written, like=like)
      >>> pending.done(), restored["step"], restored["w"].tolist()
      (True, 1, [1.0, 1.0, 1.0])
    """
    path = _check_path("save_async", path)
    _check_target("save_async", path)
    return _start(
        "save_async", path, tree, f"save_async: cannot write `path` {path!r}", None
    )


# ------------------------------------------------------------------------ load


def _corrupt(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"load: {path!r} is not a readable checkpoint: {what}")


def _check_entry(entry: Any) -> None:
    """Check one manifest entry's fields, raising ValueError when one is wrong."""
    fields = ["name", "kind", "dtype", "shape", "sha256"]
    if isinstance(entry, dict) and entry.get("kind") == "key":
        fields += ["key_dtype", "key_impl", "key_shape"]
    if not isinstance(entry, dict) or any(f not in entry for f in fields):
        raise ValueError(f"a leaf entry lacks one of {fields}: {entry!r}")
    if entry["kind"] not in _KINDS or entry["dtype"] not in _DTYPE_CODES:
        raise ValueError(f"unknown kind or dtype in {entry!r}")


def _read(path: str) -> tuple[dict[str, Any], dict[str, tuple[dict, bytes]]]:
    """Read and verify a checkpoint file: its manifest and `{name: (entry, bytes)}`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError) as err:
        raise FileNotFoundError(
            f"load: there is no checkpoint file at `path` {path!r}."
        ) from err
    except IsADirectoryError as err:
        raise IsADirectoryError(
            f"load: `path` {path!r} is a folder, not a checkpoint file; use "
            "`load_latest` for a folder of numbered checkpoints."
        ) from err
    except OSError as err:  # Not readable: permissions, a device error, a name.
        raise _os_error(
            err, f"load: cannot read `path` {path!r} ({_reason(err)})."
        ) from err

    # The safetensors layout: u64 little-endian header size, JSON header, bytes.
    if len(data) < 8:
        raise _corrupt(path, f"it has {len(data)} bytes, fewer than a header needs.")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise _corrupt(
            path,
            f"its header claims {header_len} bytes but the file has {len(data)}; "
            "it is truncated or not a safetensors file.",
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        if not isinstance(header, dict):
            raise TypeError(f"the header is a {type(header).__name__}, not an object")
    except (ValueError, TypeError) as err:
        raise _corrupt(
            path,
            f"its header is not safetensors JSON ({err}); it is not a "
            "safetensors file or it is corrupted.",
        ) from err
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or _MANIFEST_KEY not in metadata:
        raise _corrupt(
            path,
            "it has no functorch_lite manifest, so it was not written by "
            "functorch_lite.checkpoint.save (read plain safetensors files with "
            "`safetensors.numpy.load_file`).",
        )
    manifest_text = metadata[_MANIFEST_KEY]
    digest = hashlib.sha256(str(manifest_text).encode()).hexdigest()
    if digest != metadata.get(_MANIFEST_SHA_KEY):
        raise _corrupt(path, "the checksum of its manifest does not match.")
    try:
        manifest = json.loads(manifest_text)
        version = manifest["version"]
        entries = manifest["leaves"]
        for entry in entries:
            _check_entry(entry)
    except (ValueError, TypeError, KeyError) as err:
        raise _corrupt(path, f"its manifest is malformed ({err!r}).") from err
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _corrupt(
            path,
            f"it has format version {version!r}; this functorch_lite reads versions "
            f"up to {FORMAT_VERSION}. Upgrade functorch_lite.",
        )

    # Truncation: the tensor bytes must reach as far as the header says.
    payload = len(data) - 8 - header_len
    needed = max(
        (
            info["data_offsets"][1]
            for name, info in header.items()
            if name != "__metadata__"
            and isinstance(info, dict)
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and isinstance(info["data_offsets"][1], int)
        ),
        default=0,
    )
    if payload < needed:
        raise _corrupt(
            path,
            f"it is truncated: the header lists {needed} bytes of tensor data but "
            f"the file holds {payload}.",
        )
    try:
        views = dict(safetensors.deserialize(data))
    except Exception as err:  # The decoder's own error type varies by version.
        raise _corrupt(path, f"safetensors cannot decode it ({err}).") from err

    leaves: dict[str, tuple[dict, bytes]] = {}
    for entry in entries:
        name = entry["name"]
        if name not in views:
            raise _corrupt(
                path, f"its manifest lists leaf {name!r} but no tensor has that name."
            )
        view = views.pop(name)
        if _DTYPE_CODES.get(entry["dtype"]) != view["dtype"] or list(
            view["shape"]
        ) != list(entry["shape"]):
            raise _corrupt(
                path,
                f"leaf {name!r} is {view['dtype']}{list(view['shape'])} in the "
                f"tensor table but {entry['dtype']}{entry['shape']} in the manifest.",
            )
        raw = bytes(view["data"])
        if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise _corrupt(
                path,
                f"checksum mismatch on leaf {name!r}: its bytes changed after it "
                "was written.",
            )
        leaves[name] = (entry, raw)
    if views:
        raise _corrupt(path, f"tensors {sorted(views)} are not in its manifest.")
    return manifest, leaves


def _decode(entry: dict, raw: bytes) -> np.ndarray:
    dtype = _np_dtype(entry["dtype"]).newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).reshape(entry["shape"]).copy()


def _as_python(entry: dict, arr: np.ndarray) -> Any:
    kind = entry["kind"]
    if kind == "key":
        return jax.random.wrap_key_data(jnp.asarray(arr), impl=entry["key_impl"])
    if kind in ("int", "float", "bool"):
        return {"int": int, "float": float, "bool": bool}[kind](arr.item())
    return arr


def _short(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return shown + more


def _kind_of(dtype: Any) -> str:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "bool"
    if jnp.issubdtype(dtype, jnp.integer):
        return "int"
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    return dtype.name


def _restore(path: str, name: str, entry: dict, raw: bytes, like: Any) -> Any:
    """Rebuild one leaf as the kind of its `like` leaf, checking shape and dtype."""
    arr = _decode(entry, raw)
    kind = entry["kind"]
    got = (
        f"{entry['key_dtype']}{tuple(entry['key_shape'])}"
        if kind == "key"
        else f"{entry['dtype']}{tuple(entry['shape'])}"
    )

    def mismatch(expected: str) -> ValueError:
        return ValueError(
            f"load: leaf {name!r} in {path!r} is {got}; `like` expects {expected}. "
            "Pass a `like` that matches the checkpoint, or convert it after loading."
        )

    # `like` a Python scalar: any 0-d leaf of the same kind converts exactly.
    if isinstance(like, bool | int | float) and not isinstance(like, np.generic):
        if isinstance(like, bool):
            want = "bool"
        elif isinstance(like, int):
            want = "int"
        else:
            want = "float"
        if kind == "key" or arr.shape != () or _kind_of(arr.dtype) != want:
            raise mismatch(f"a Python {type(like).__name__} (a 0-d {want} tensor)")
        return type(like)(arr.item())

    if isinstance(like, jax.Array | jax.ShapeDtypeStruct | np.ndarray | np.generic):
        want_shape, want_dtype = tuple(like.shape), like.dtype
    else:
        raise TypeError(
            f"load: leaf {name!r} of `like` is a {type(like).__name__} ({like!r}); "
            "expected a jax.Array, a jax.ShapeDtypeStruct, a NumPy array or a "
            "Python int, float or bool."
        )
    expected = f"{want_dtype}{want_shape}"

    if _is_key(like):
        if kind != "key" or str(want_dtype) != entry["key_dtype"]:
            raise mismatch(expected)
        if tuple(entry["key_shape"]) != want_shape:
            raise mismatch(expected)
        value = jax.random.wrap_key_data(jnp.asarray(arr), impl=entry["key_impl"])
    else:
        if kind == "key" or arr.shape != want_shape:
            raise mismatch(expected)
        want_dtype = np.dtype(want_dtype)
        if arr.dtype != want_dtype:
            # A Python scalar (such as the step number, stored as int64) may fill a
            # 0-d leaf of another dtype of its kind when the value converts exactly.
            if kind not in ("int", "float") or _kind_of(want_dtype) != kind:
                raise mismatch(expected)
            with np.errstate(all="ignore"):  # Overflow shows in the check below.
                converted = arr.astype(want_dtype)
                back = converted.astype(arr.dtype)
            if not np.array_equal(back, arr, equal_nan=kind == "float"):
                raise mismatch(expected)
            arr = converted
        if isinstance(like, np.ndarray):
            return arr
        if isinstance(like, np.generic):
            return arr[()]
        value = arr
    sharding = getattr(like, "sharding", None)
    if sharding is not None:
        return jax.device_put(value, sharding)
    return jax.device_put(value)


def load(path: str | os.PathLike, like: Any = None) -> Any:
    """Read a checkpoint written by `save`, verifying its checksums.

    Args:
      path: the file to read.
      like: a pytree with the structure to restore (the tree that was saved,
        or one of `jax.ShapeDtypeStruct`s such as `jax.eval_shape` returns).
        Each leaf of the result has the kind of its `like` leaf: a `jax.Array`
        (placed with the `like` leaf's sharding, when it has one) for a
        `jax.Array` or `jax.ShapeDtypeStruct`, a NumPy array for a NumPy array,
        and the same Python type for a Python `int`, `float` or `bool`. A
        Python scalar saved in the file fills a 0-d leaf of another dtype of its
        kind when its value converts exactly (a saved step `7` into an `int32`
        leaf). When `like` is `None`, return a flat `{name: leaf}` dict in the
        saved order: NumPy arrays, Python scalars and typed PRNG keys.

    Returns:
      The restored tree, with the structure of `like`.

    Raises:
      CheckpointError: the file is truncated, corrupted (checksum mismatch) or
        not a checkpoint. Names the file.
      FileNotFoundError: there is no file at `path`.
      IsADirectoryError: `path` is a folder.
      OSError: the file cannot be read (`PermissionError`, a device error);
        the message names `path` and the reason.
      TypeError: the file lacks a leaf of `like`, or has a leaf that `like`
        lacks; or a `like` leaf is of an unsupported kind. Names the leaf. Or
        `path` is not a str or os.PathLike.
      ValueError: a leaf's shape or dtype differs from `like`. Names the leaf.

    Examples:
      >>> import os, tempfile, jax, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> tree = {"w": jnp.arange(3.0), "step": 10}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     path = os.path.join(tmp, "ckpt.safetensors")
      ...     fl.checkpoint.save(path, tree)
      ...     shapes = jax.eval_shape(lambda: {"w": jnp.zeros(3), "step": 0})
      ...     restored = fl.checkpoint.load(path, like=shapes)
      ...     flat = fl.checkpoint.load(path)
      >>> restored["w"].tolist(), int(restored["step"]), sorted(flat)
      ([0.0, 1.0, 2.0], 10, ['step', 'w'])
    """
    path = _check_path("load", path)
    manifest, leaves = _read(path)
    if like is None:
        return {
            name: _as_python(entry, _decode(entry, raw))
            for name, (entry, raw) in leaves.items()
        }

    named, like_def = _named_leaves("load", "like", like)
    like_names = {name for name, _ in named}
    missing = [name for name, _ in named if name not in leaves]
    extra = [name for name in leaves if name not in like_names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"has no leaf {_short(missing)} that `like` has")
        if extra:
            parts.append(f"has leaf {_short(extra)} that `like` lacks")
        raise TypeError(
            f"load: checkpoint {path!r} " + " and ".join(parts) + ". The file's "
            f"tree is {manifest.get('treedef')}; `like`'s tree is {like_def}. Pass "
            "a `like` with the saved structure."
        )
    values = [_restore(path, name, *leaves[name], leaf) for name, leaf in named]
    return jax.tree.unflatten(like_def, values)


# -------------------------------------------------------------------- rotation


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _numbered(fn: str, directory: str) -> list[tuple[int, str]]:
    """List `(step, path)` of the numbered checkpoints in `directory`, newest first.

    A missing folder has none; a `directory` that is a file, or that cannot be
    listed, raises an error naming `fn`. Only regular files (or links to them)
    count: a folder named like a checkpoint is not one.
    """
    try:
        with os.scandir(directory) as it:
            entries = [(e.name, e.path) for e in it if _is_file(e)]
    except FileNotFoundError:
        return []
    except NotADirectoryError as err:
        if not os.path.exists(directory):
            return []  # A part of the path above it is a file: it does not exist.
        raise NotADirectoryError(
            f"{fn}: `directory` {directory!r} is a file, not a folder; pass the "
            "folder of numbered checkpoints (read one checkpoint file with `load`)."
        ) from err
    except OSError as err:
        raise _os_error(
            err, f"{fn}: cannot list `directory` {directory!r} ({_reason(err)})."
        ) from err
    found = []
    for name, path in entries:
        match = _NUMBERED.match(name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, but another user's.
        return True
    return True


def _remove_stale_temps(directory: str) -> None:
    """Remove temporary files of numbered checkpoints whose writer has died."""
    # os.kill(pid, 0) only probes on POSIX (elsewhere it would end the process),
    # and it sees only this machine's processes: in a folder shared between
    # hosts, other hosts' temporaries (another host tag) are left alone, and
    # `latest` ignores them anyway.
    if os.name != "posix":
        return
    host = _host_tag()
    try:
        names = os.listdir(directory)
    except OSError:  # Only housekeeping: the save itself reports a real problem.
        return
    for name in names:
        match = _TEMP.match(name)
        if (
            match
            and match.group("host") == host
            and _NUMBERED.match(match.group("target"))
            and not _pid_alive(int(match.group("pid")))
        ):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def save_numbered(
    directory: str | os.PathLike, step: int, tree: Any, *, keep: int | None = 3
) -> str:
    """Save `tree` as checkpoint number `step` in `directory`, then prune old ones.

    The file is `directory/ckpt_{step:08d}.safetensors`, written atomically by
    `save`. Only after it is complete are other checkpoints deleted: the folder
    keeps the one just written and the `keep - 1` others with the highest step
    numbers. Temporary files of writers that were killed (on this machine) are
    removed first (those tagged with this host and a dead process id).

    Args:
      directory: the folder of checkpoints; created if missing.
      step: the step number, an int >= 0.
      tree: the pytree to save, as for `save`.
      keep: how many checkpoints to keep, >= 1; `None` keeps them all.

    Returns:
      The path of the new checkpoint.

    Raises:
      TypeError: `step` is not an int, or `keep` is neither an int nor `None`;
        or `directory` is not a str or os.PathLike.
      ValueError: `step` is negative or `keep` is below 1.
      NotADirectoryError: `directory`, or a part of it, is a file.
      OSError: `directory` cannot be created, or the checkpoint cannot be
        written in it (`PermissionError`: the folder is not writable; the OS's
        error class otherwise). The message names `directory` and the reason.
        No temporary file is left behind.

    An old checkpoint that cannot be deleted is left in place with a warning on
    the `functorch_lite.checkpoint` logger: the new one is saved by then.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     for step in range(0, 500, 100):
      ...         _ = fl.checkpoint.save_numbered(tmp, step, {"w": jnp.ones(2)}, keep=2)
      ...     print(sorted(os.listdir(tmp)))
      ['ckpt_00000300.safetensors', 'ckpt_00000400.safetensors']
    """
    directory, path = _numbered_target("save_numbered", directory, step, keep)
    _save(
        "save_numbered",
        path,
        tree,
        f"save_numbered: cannot write checkpoint {os.path.basename(path)!r} in "
        f"`directory` {directory!r}",
        keep,
    )
    return path


def save_numbered_async(
    directory: str | os.PathLike, step: int, tree: Any, *, keep: int | None = 3
) -> AsyncSave:
    """`save_numbered` in the background: copy `tree` to the host, write it later.

    The arguments are checked, `directory` is created and `tree` is copied to
    host memory on the calling thread; a background thread then writes
    `directory/ckpt_{step:08d}.safetensors` atomically and prunes the folder to
    `keep` checkpoints, as `save_numbered` does. A training loop calls it every
    few steps and goes on training while the file is written; one save at a
    time is in flight per folder (see `save_async`).

    Args:
      directory: the folder of checkpoints; created if missing.
      step: the step number, an int >= 0.
      tree: the pytree to save, as for `save`.
      keep: how many checkpoints to keep, >= 1; `None` keeps them all.

    Returns:
      An `AsyncSave` whose `path` is the new checkpoint; `.wait()` returns it
      once it is on disk (and the folder pruned) or raises the writer's error.

    Raises:
      TypeError, ValueError, OSError: on the calling thread, the argument
        and folder errors of `save_numbered` or a bad leaf; or, whatever its
        type, the unseen error of the previous asynchronous save into
        `directory`.
      OSError: from `.wait()`, the write errors of `save_numbered`.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     w = jnp.zeros(2)
      ...     for step in range(1, 5):
      ...         w = w + 1  # a training step
      ...         pending = fl.checkpoint.save_numbered_async(
      ...             tmp, step, {"w": w}, keep=2)
      ...     _ = pending.wait()  # before the process reads or ends
      ...     print(sorted(os.listdir(tmp)))
      ...     step, tree = fl.checkpoint.load_latest(tmp, like={"w": w})
      ['ckpt_00000003.safetensors', 'ckpt_00000004.safetensors']
      >>> step, tree["w"].tolist()
      (4, [4.0, 4.0])
    """
    directory, path = _numbered_target("save_numbered_async", directory, step, keep)
    return _start(
        "save_numbered_async",
        path,
        tree,
        f"save_numbered_async: cannot write checkpoint {os.path.basename(path)!r} "
        f"in `directory` {directory!r}",
        keep,
    )


def _numbered_target(fn: str, directory: Any, step: Any, keep: Any) -> tuple[str, str]:
    """Check the arguments of `fn`, create `directory`; return it and the path."""
    directory = _check_path(fn, directory, "directory")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(
            f"{fn}: `directory` {directory!r} is a file, not a folder."
        )
    step = check_int(step, where=fn, name="step", minimum=0)
    check_int(
        keep,
        where=fn,
        name="keep",
        minimum=1,
        allow_none=True,
        fix="Pass None to keep every checkpoint.",
    )
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise NotADirectoryError(
            f"{fn}: cannot create `directory` {directory!r}: a part of it is a file."
        ) from err
    except OSError as err:
        if isinstance(err, PermissionError) or err.errno == errno.EROFS:
            why = "the folder it goes in is not writable"
        else:
            why = "cannot create it"
        raise _os_error(
            err,
            f"{fn}: cannot create `directory` {directory!r}: {why} ({_reason(err)}).",
        ) from err
    _remove_stale_temps(directory)
    return directory, os.path.join(directory, f"ckpt_{int(step):08d}.safetensors")


def _prune(fn: str, directory: str, path: str, keep: int) -> None:
    """Delete all but `path` and the `keep - 1` newest other checkpoints.

    `path` is saved by now, so a failure here only warns: raising would report
    a finished save as failed.
    """
    try:
        others = [p for _, p in _numbered(fn, directory) if p != path]
    except OSError as err:
        _log.warning("%s: cannot prune old checkpoints: %s", fn, err)
        return
    for old in others[keep - 1 :]:
        try:
            os.unlink(old)
        except FileNotFoundError:  # Pruned by a concurrent save_numbered.
            pass
        except OSError as err:
            _log.warning(
                "%s: cannot delete old checkpoint %r (%s); it is left in place.",
                fn,
                old,
                _reason(err),
            )


def latest(directory: str | os.PathLike) -> tuple[int, str] | None:
    """Find the numbered checkpoint with the highest step in `directory`.

    Only names `ckpt_<digits>.safetensors` count; temporary files do not. The
    file is not opened: use `load_latest` to skip unreadable ones.

    Args:
      directory: the folder of checkpoints.

    Returns:
      `(step, path)`, or `None` when the folder has no checkpoint or does not
      exist.

    Raises:
      TypeError: `directory` is not a str or os.PathLike.
      NotADirectoryError: `directory` is a file.
      OSError: the folder cannot be listed (`PermissionError`); the message
        names `directory` and the reason.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     print(fl.checkpoint.latest(tmp))
      ...     _ = fl.checkpoint.save_numbered(tmp, 12, {"w": jnp.ones(2)})
      ...     step, path = fl.checkpoint.latest(tmp)
      None
      >>> step, os.path.basename(path)
      (12, 'ckpt_00000012.safetensors')
    """
    directory = _check_path("latest", directory, "directory")
    found = _numbered("latest", directory)
    return found[0] if found else None


def load_latest(
    directory: str | os.PathLike, like: Any = None
) -> tuple[int, Any] | None:
    """Load the newest readable numbered checkpoint in `directory`.

    Checkpoints are tried from the highest step down. One that is truncated or
    corrupted (a `CheckpointError`) is skipped with a warning on the
    `functorch_lite.checkpoint` logger (not `warnings.warn`, so that test suites
    run with warnings as errors can exercise it), and the next older one is
    tried. A mismatch against `like` is not skipped: it is raised, because
    older checkpoints of the same run would not match either.

    Args:
      directory: the folder of checkpoints.
      like: the structure to restore, as for `load`.

    Returns:
      `(step, tree)`, or `None` when the folder has no checkpoint or does not
      exist.

    Raises:
      CheckpointError: every checkpoint in the folder is unreadable; the
        message names each one.
      TypeError, ValueError: the newest readable checkpoint does not match
        `like`, as for `load`.
      NotADirectoryError: `directory` is a file.
      OSError: the folder cannot be listed, or a checkpoint cannot be read
        (`PermissionError`); the message names the folder or file.

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     for step in (10, 20):
      ...         _ = fl.checkpoint.save_numbered(tmp, step, {"w": jnp.full(2, step)})
      ...     step, tree = fl.checkpoint.load_latest(tmp, like={"w": jnp.zeros(2, int)})
      >>> step, tree["w"].tolist()
      (20, [20, 20])
    """
    directory = _check_path("load_latest", directory, "directory")
    errors = []
    for step, path in _numbered("load_latest", directory):
        try:
            return step, load(path, like)
        except CheckpointError as err:
            _log.warning("load_latest: skipping unreadable checkpoint: %s", err)
            errors.append(str(err))
        except FileNotFoundError:  # Pruned by a concurrent save_numbered.
            continue
    if errors:
        raise CheckpointError(
            f"load_latest: no readable checkpoint in {directory!r}; " + " ".join(errors)
        )
    return None
