"""Native CPU kernels for the static LSTM core, built at first use.

Why native code: on XLA's CPU backend each step of a recurrent loop runs as
20-odd small kernels around one small matmul, and every rewrite in JAX that
made XLA emit fewer of them measured slower (bench/RESULTS.md). `lstm.cc`
runs a whole loop in one XLA custom call (XLA's FFI): per step the recurrent
matmul, the gates and the state update in one pass, over the rows still
running. The XLA core in `functorch_lite._recurrent` stays the reference and
the path for everything the kernels do not cover (float64, accelerators,
higher derivatives).

The source is compiled once per machine with the C++ compiler that `$CXX`
names (default `c++`), with `-march=native`, into a cache directory
(`$FUNCTORCH_LITE_CACHE`, else `$XDG_CACHE_HOME/functorch_lite`, else
`~/.cache/functorch_lite`). The file's name hashes the source, the compiler,
jaxlib's version, the CPU's features and the C library's version, so a cache
shared between machines never loads code built for another CPU. Where no
compiler is found or the build fails, `available()` is False and the XLA core
runs (no error, and the same results to float32 rounding; `status()` says
why). `FUNCTORCH_LITE_NATIVE=0` turns the kernels off. A process whose
default backend is not the CPU does not build them.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

__all__ = ["available", "status"]

_SOURCE = Path(__file__).with_name("lstm.cc")
_TARGETS = ("FlLstmForward", "FlLstmForwardStore", "FlLstmReverse")
_FLAGS = (
    "-O3",
    "-march=native",
    "-std=c++17",
    "-ffp-contract=fast",
    "-shared",
    "-fPIC",
)
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    if os.environ.get("FUNCTORCH_LITE_CACHE"):
        return Path(os.environ["FUNCTORCH_LITE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "functorch_lite"


def _cpu_features() -> str:
    """The CPU's model and flags (`-march=native`) and the C library's version."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        cpu = "".join(sorted(set(lines)))
    except OSError:
        cpu = platform.processor()
    return cpu + repr(platform.libc_ver())


def _library_path(compiler: str, cpu: str) -> Path:
    """The cached library's path: a hash of everything the build depends on."""
    import jaxlib

    key = hashlib.sha256(_SOURCE.read_bytes())
    for part in (compiler, _FLAGS, jax.ffi.include_dir(), jaxlib.__version__, cpu):
        key.update(repr(part).encode())
    return _cache_dir() / f"lstm-{key.hexdigest()[:16]}.so"


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("FUNCTORCH_LITE_NATIVE", "1") == "0":
        return None, "turned off by FUNCTORCH_LITE_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"no kernels for this CPU ({platform.machine()})"
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        return None, "no C++ compiler found ($CXX, else c++)"
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cxx} --version failed: {e}"
    out = _library_path(version, _cpu_features())
    if not out.exists():
        # Build into a temporary file and rename: processes that build at once
        # (test workers) each load a whole library.
        tmp = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            cmd = [cxx, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(_SOURCE)]
            done = subprocess.run(
                [*cmd, "-o", tmp], capture_output=True, text=True, timeout=600
            )
            if done.returncode:
                return None, f"build failed: {' '.join(cmd)}\n{done.stderr[-2000:]}"
            os.replace(tmp, out)
            tmp = None
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"build failed: {e}"
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
    try:
        lib = ctypes.cdll.LoadLibrary(str(out))
        for name in _TARGETS:
            jax.ffi.register_ffi_target(
                f"functorch_lite_{name}",
                jax.ffi.pycapsule(getattr(lib, name)),
                platform="cpu",
            )
    except (OSError, AttributeError, ValueError) as e:
        return None, f"loading {out} failed: {e}"
    return lib, f"built and loaded: {out}"


def _ensure() -> dict:
    with _lock:
        if not _state:
            lib, why = _build()
            _state.update(lib=lib, why=why)
    return _state


def available() -> bool:
    """Whether the native LSTM kernels are built and registered with XLA.

    Builds them on the first call (a few seconds, once per machine).

    >>> isinstance(available(), bool)
    True
    """
    return _ensure()["lib"] is not None


def status() -> str:
    """Why the kernels are or are not in use, in words (for benchmarks' records).

    >>> isinstance(status(), str)
    True
    """
    return _ensure()["why"]
