"""Shared pytest set-up: strict numerics and a fresh `key` per test."""

import contextlib
import os
import shutil
import tempfile
import warnings

import jax
import pytest

# On a failing property test, hypothesis imports libcst to suggest a patch; that
# import warns (a DeprecationWarning from mypy_extensions), and
# `filterwarnings = error` turns it into an INTERNALERROR that hides every
# result. Import it quietly up front.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with contextlib.suppress(ImportError):
        import libcst  # noqa: F401

# Catch silent broadcasting and silent dtype upcasts in the library.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


# One persistent compilation cache per test run, in a fresh folder: the xdist
# workers and the processes that tests start (multi-host, resume, examples)
# compile many of the same programs. Here it took the suite from 882 to 697 s,
# with the other trims of the same commit. Compile counts are unchanged (a
# cache hit still counts as a compile, see fl.compile). A cache folder the
# caller set (JAX_COMPILATION_CACHE_DIR) is used as is, and kept.
_CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"
_CACHE_FLOOR = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_OWN_CACHE = pytest.StashKey[tuple[str, dict]]()


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and not os.environ.get(_CACHE_DIR):
        # The controller, before it starts the workers, which inherit it.
        folder = tempfile.mkdtemp(prefix="functorch-lite-tests-")
        before = {k: os.environ.get(k) for k in (_CACHE_DIR, _CACHE_FLOOR)}
        config.stash[_OWN_CACHE] = (folder, before)
        os.environ[_CACHE_DIR] = folder
        os.environ.setdefault(_CACHE_FLOOR, "0.2")
    if os.environ.get(_CACHE_DIR):
        # jax read the environment when conftest imported it: set it here too.
        jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_DIR])
        if os.environ.get(_CACHE_FLOOR):
            floor = float(os.environ[_CACHE_FLOOR])
            jax.config.update("jax_persistent_cache_min_compile_time_secs", floor)


def pytest_unconfigure(config: pytest.Config) -> None:
    own = config.stash.get(_OWN_CACHE, None)
    if own is not None:
        folder, before = own
        shutil.rmtree(folder, ignore_errors=True)
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# The files that take longest, longest first (measured with --durations). The
# two workers take whole files (`--dist loadfile`) in collection order
# (`--no-loadscope-reorder`; xdist's default order, most tests first, left
# the few-test, long files such as the peers' and multi-host runs to the end,
# with one worker idle while the other finished them).
_LONGEST_FIRST = (
    "test_peers.py",
    "test_multihost.py",
    "test_docs.py",
    "test_while_loop.py",
    "test_mixed_precision.py",
    "test_parallel.py",
    "test_bench.py",
    "test_recurrent.py",
    "test_reliability.py",
    "test_torch_module.py",
    "test_skip_unused.py",
    "test_examples.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def key() -> jax.Array:
    """A fresh PRNG key; the same for every test so that failures reproduce."""
    return jax.random.key(0)
