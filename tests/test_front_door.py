"""No raw errors at the front door: the inputs a new user passes by mistake.

Each public entry point gets the wrong things a newcomer tries first (torch
tensors, Python lists and tuples, None, strings, float64 and integer arrays,
a loss where a step goes, an optimizer where params go, a loss that returns a
tuple). A call may succeed (NumPy and torch batches are accepted, float64
narrows to float32); if it fails, the error must be the library's own: a
TypeError or ValueError (or our subclasses) whose message starts with the
function it names, so that no raw JAX, XLA or NumPy error reaches the user.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functorch_lite as fl

NET = fl.models.DynamicNet(4, 5, 2, max_depth=3)
PARAMS = NET.init(jax.random.key(0))
OPT = optax.sgd(1e-3)
X = np.ones((3, 4), np.float32)
Y = np.zeros((3, 2), np.float32)


def _loss(p: Any, x: Any, y: Any, depth: Any) -> jax.Array:
    return fl.nn.mse_loss(NET.apply(p, x, depth), y)


def _tuple_loss(p: Any, x: Any, y: Any, depth: Any) -> tuple:
    loss = _loss(p, x, y, depth)
    return loss, {"loss": loss}


def _fresh() -> tuple[Any, Any]:
    params = jax.tree.map(jnp.copy, PARAMS)
    return params, OPT.init(params)


def _torch() -> Any:
    return pytest.importorskip("torch")


# What a newcomer puts where an array goes.
WRONG_ARRAYS: dict[str, Callable[[], Any]] = {
    "torch tensor": lambda: _torch().ones(3, 4),
    "list": lambda: [[1.0] * 4] * 3,
    "tuple": lambda: ((1.0,) * 4,) * 3,
    "None": lambda: None,
    "string": lambda: "x",
    "float64 array": lambda: np.ones((3, 4), np.float64),
    "int array": lambda: np.ones((3, 4), np.int32),
    "wrong shape": lambda: np.ones((3, 5), np.float32),
}
WRONG_DEPTHS: dict[str, Any] = {
    "None": None,
    "string": "2",
    "float": 2.0,
    "list": [1, 2, 3],
    "too large": 7,
    "negative": -1,
    "float array": np.ones(3, np.float32),
}


def _own_error(call: Callable[[], Any], where: str) -> None:
    """Run `call`; if it raises, the error must be ours and name `where`."""
    try:
        call()
    except (TypeError, ValueError, RuntimeError, OSError) as err:
        text = str(err)
        raw = type(err).__module__.startswith(("jax", "jaxlib", "numpy", "torch"))
        assert not raw, f"raw {type(err).__module__}.{type(err).__name__}: {text}"
        assert re.match(rf"^{re.escape(where)}\S*: ", text), (
            f"{type(err).__name__} does not name {where!r}: {text[:300]}"
        )
        assert len(text) > len(where) + 20, text


@pytest.mark.parametrize("what", list(WRONG_ARRAYS))
def test_model_apply(what: str) -> None:
    value = WRONG_ARRAYS[what]()
    _own_error(lambda: NET.apply(PARAMS, value, 1), "DynamicNet.apply")
    _own_error(lambda: NET.apply(PARAMS, X, 1, mode="dynamic"), "DynamicNet.apply")


@pytest.mark.parametrize("what", list(WRONG_DEPTHS))
def test_depths(what: str) -> None:
    depth = WRONG_DEPTHS[what]
    _own_error(lambda: NET.apply(PARAMS, X, depth), "DynamicNet.apply")
    _own_error(lambda: NET.apply(PARAMS, X, depth, mode="dynamic"), "DynamicNet.apply")
    step = fl.train.make_step(_loss, OPT)
    _own_error(lambda: step(*_fresh(), X, Y, depth), "")


@pytest.mark.parametrize("what", list(WRONG_ARRAYS))
def test_step_batches(what: str) -> None:
    value = WRONG_ARRAYS[what]()
    step = fl.train.make_step(_loss, OPT)
    _own_error(lambda: step(*_fresh(), value, Y, 1), "")
    fused = fl.train.make_fused_step(_loss, OPT, shared_argnames=("x", "y"))
    _own_error(lambda: fused(*_fresh(), value, Y, np.array([1, 2])), "")
    _own_error(
        lambda: fl.train.fit(step, *_fresh(), [(value, Y, 1)], progress=False), ""
    )


def test_steps_given_the_wrong_things() -> None:
    step = fl.train.make_step(_loss, OPT)
    params, opt_state = _fresh()
    _own_error(lambda: step(OPT, opt_state, X, Y, 1), "")  # an optimizer as params
    _own_error(lambda: step(*_fresh()[:1], None, X, Y, 1), "")  # no opt_state
    _own_error(lambda: step(params), "")  # no batch
    _own_error(lambda: fl.train.make_step(OPT, _loss), "make_step")  # swapped
    _own_error(lambda: fl.train.make_step(_loss, None), "make_step")
    _own_error(lambda: fl.train.make_step(None, OPT), "make_step")
    _own_error(lambda: fl.train.make_step(_loss, "sgd"), "make_step")
    tuple_step = fl.train.make_step(_tuple_loss, OPT)
    _own_error(lambda: tuple_step(*_fresh(), X, Y, 1), "make_step")
    fused = fl.train.make_fused_step(_tuple_loss, OPT, shared_argnames=("x", "y"))
    _own_error(lambda: fused(*_fresh(), X, Y, np.array([1])), "make_fused_step")


def test_fit_given_the_wrong_things() -> None:
    step = fl.train.make_step(_loss, OPT)
    params, opt_state = _fresh()
    _own_error(lambda: fl.train.fit(_loss, OPT, params, [(X, Y, 1)]), "fit")
    _own_error(lambda: fl.train.fit(step, params, opt_state, None), "fit")
    _own_error(lambda: fl.train.fit(step, params, opt_state, [X]), "fit")
    _own_error(lambda: fl.train.fit(step, params, opt_state, ["batch"]), "fit")
    _own_error(lambda: fl.train.fit(None, params, opt_state, []), "fit")
    _own_error(
        lambda: fl.train.fit(step, *_fresh(), [(X, Y, 1)], log_every="10"), "fit"
    )


@pytest.mark.parametrize("what", ["None", "string", "float", "list", "float array"])
def test_loops(what: str) -> None:
    n = WRONG_DEPTHS[what]
    _own_error(lambda: fl.repeat(lambda c: c * 2, 1.0, n, max_n=4), "repeat")
    _own_error(lambda: fl.repeat(lambda c: c * 2, 1.0, 2, max_n=n), "repeat")
    _own_error(
        lambda: fl.while_loop(lambda c: c < 9, lambda c: c * 2, 1.0, max_steps=n),
        "while_loop",
    )


@pytest.mark.parametrize("what", list(WRONG_ARRAYS))
def test_layers(what: str) -> None:
    value = WRONG_ARRAYS[what]()
    lin = fl.nn.linear(4, 2)
    _own_error(
        lambda: lin.apply(lin.init(jax.random.key(0)), value), "linear(4, 2).apply"
    )
    lstm = fl.nn.lstm(4, 3)
    lp = lstm.init(jax.random.key(0))
    _own_error(lambda: lstm.apply(lp, value, np.array([1, 2, 3])), "lstm")
    _own_error(lambda: lstm.apply(lp, np.ones((3, 2, 4), np.float32), value), "lstm")
    _own_error(lambda: fl.nn.mse_loss(value, Y), "mse_loss")
    _own_error(
        lambda: fl.nn.cross_entropy(value, np.zeros(3, np.int32)), "cross_entropy"
    )


def test_interop_and_checkpoints_given_the_wrong_things(tmp_path: Any) -> None:
    _own_error(lambda: fl.interop.from_torch_module("model"), "from_torch_module")
    _own_error(lambda: fl.interop.from_torch(None), "from_torch")
    _own_error(lambda: fl.checkpoint.save(None, PARAMS), "save")
    _own_error(lambda: fl.checkpoint.save(tmp_path / "a.safetensors", OPT), "save")
    _own_error(lambda: fl.checkpoint.load(tmp_path / "missing"), "load")
    _own_error(lambda: fl.parallel.data_parallel(None), "data_parallel")
    _own_error(
        lambda: fl.transforms.functional_call(None, PARAMS, X), "functional_call"
    )


def test_fit_says_where_it_resumed(
    tmp_path: Any, capsys: pytest.CaptureFixture
) -> None:
    step = fl.train.make_step(_loss, OPT)
    batches = [(X, Y, d) for d in (1, 2, 3, 0, 1, 2, 3, 0, 1, 2)]
    first = fl.train.fit(
        step,
        *_fresh(),
        batches,
        progress=False,
        checkpoint_every=10,
        checkpoint_dir=tmp_path,
    )
    assert first.resumed_from is None and first.skipped == 0
    # All ten batches were consumed by the checkpoint: nothing runs, and fit
    # says so instead of returning zero losses without a word.
    again = fl.train.fit(
        step, *_fresh(), batches, checkpoint_dir=tmp_path, resume=True, log_every=5
    )
    err = capsys.readouterr().err
    path = str(tmp_path / "ckpt_00000010.safetensors")
    assert again.resumed_from == (10, path)
    assert again.skipped == 10 and again.losses.shape == (0,)
    assert f"fit: resumed from step 10 ({path}); skipping the first 10 batches" in err
    assert "had consumed all 10 batches given; nothing was run" in err
    for a, b in zip(
        jax.tree.leaves(again.params), jax.tree.leaves(first.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # Twelve batches: two run after the checkpoint.
    more = fl.train.fit(
        step,
        *_fresh(),
        [*batches, (X, Y, 1), (X, Y, 2)],
        checkpoint_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert more.skipped == 10 and more.losses.shape == (2,)
    # An empty folder: a plain statement that it starts afresh.
    fresh = fl.train.fit(
        step, *_fresh(), batches[:2], checkpoint_dir=tmp_path / "none", resume=True
    )
    assert fresh.resumed_from is None and fresh.losses.shape == (2,)
    assert "found no checkpoint" in capsys.readouterr().err
    params, opt_state, losses = fresh  # still unpacks as a triple
    assert losses.shape == (2,)
