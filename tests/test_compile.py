"""Compile accounting: counters, per-function stats, trace budgets, cache switch."""

import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import functorch_lite as fl

# Shapes no other test uses, one per call: eager ops and jitted functions on
# them must compile afresh, whatever ran before in this process.
_FRESH = itertools.count(7919)


def _fresh_size():
    return next(_FRESH)


def test_compile_counter_counts_jit_and_ignores_eager_ops():
    f = jax.jit(lambda x: x * 2)
    n = _fresh_size()
    with fl.compile_counter() as counter:
        # Eager ops compile small programs, once per new shape: these are new.
        a = jnp.ones(n) + jnp.arange(n, dtype=jnp.float32)
        f(a)
        f(a)
        f(jnp.ones(n + 1))
    assert counter.compiles == 2
    assert counter.names == ["jit(<lambda>)", "jit(<lambda>)"]
    assert counter.eager_compiles >= 1
    assert counter.seconds > 0
    # jax.random's functions are jitted programs of JAX's own: they count.
    with fl.compile_counter() as counter:
        jax.random.normal(jax.random.key(3), (n, 3))
    assert counter.compiles >= 1


def test_compile_counter_filters_by_name():
    def double(x):
        return x * 2

    f, g = jax.jit(double), jax.jit(lambda x: x + 1)
    with fl.compile_counter("double") as counter:
        f(jnp.ones(7)), g(jnp.ones(7)), f(jnp.ones(8))
    assert counter.compiles == 2
    with fl.compile_counter("jit(double)") as again:
        f(jnp.ones(9))
    assert again.compiles == 1


def test_counter_stops_counting_after_block():
    f = jax.jit(lambda x: x - 1)
    with fl.compile_counter() as counter:
        pass
    f(jnp.ones(11))
    assert counter.compiles == 0


def test_jit_stats_static_argument_retraces_per_value():
    traces = []

    def power(x, n):
        traces.append(n)
        return x**n

    f = fl.jit(power, static_argnames=("n",))
    x = jnp.ones(_fresh_size())
    for n in [2, 3, 2, 2, 4]:
        f(x, n=n)
    assert traces == [2, 3, 4]
    assert (f.stats.traces, f.stats.compiles, f.stats.calls) == (3, 3, 5)
    assert f.stats.compile_seconds > 0
    f(x, 3)  # positional static argument hits the same cache entry
    assert f.stats.compiles == 3


def test_trace_budget_names_the_changed_argument():
    f = fl.jit(lambda x, n: x * n, static_argnames=("n",), max_traces=2)
    f(jnp.ones(3), n=1)
    f(jnp.ones(3), n=2)
    with pytest.raises(
        RuntimeError, match=r"trace budget exceeded.*`n` changed from 2 to 3"
    ):
        f(jnp.ones(3), n=3)
    with pytest.raises(
        RuntimeError, match=r"`x` changed from float32\[3\] to float32\[4\]"
    ):
        f(jnp.ones(4), n=2)
    assert f.stats.traces == 2


def test_jit_argument_errors():
    with pytest.raises(TypeError, match="jit: `fun` must be callable"):
        fl.jit(3)
    with pytest.raises(ValueError, match="jit: `max_traces` must be a positive int"):
        fl.jit(lambda x: x, max_traces=0)
    with pytest.raises(ValueError, match=r"jit: `static_argnames` names \['depth'\]"):
        fl.jit(lambda x: x, static_argnames=("depth",))


def test_persistent_cache_switch(tmp_path):
    code = (
        "import functorch_lite as fl, jax, jax.numpy as jnp\n"
        "print(jax.config.jax_compilation_cache_dir)\n"
        "f = fl.jit(lambda x: jnp.sin(x) * 2)\n"
        "f(jnp.ones(3))\n"
    )
    env = {"FUNCTORCH_LITE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir()), "no compiled program was cached"
    before = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
        jax.config.jax_persistent_cache_min_entry_size_bytes,
    )
    folder = fl.enable_persistent_cache(tmp_path / "other")
    try:
        assert folder == str(tmp_path / "other")
        assert jax.config.jax_compilation_cache_dir == folder
    finally:  # the suite's own cache (tests/conftest.py), if any
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", before[2])
