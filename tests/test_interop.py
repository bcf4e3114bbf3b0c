"""Tests for `fl.interop`: torch state_dict <-> params, exact round trips, errors."""

from __future__ import annotations

import collections
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functorch_lite as fl


@pytest.fixture(name="torch")
def torch_fixture():
    """torch, or a skip: the tests that do not request it run without torch."""
    return pytest.importorskip("torch")


def _torch_net(torch, d_in: int, d_hidden: int, d_out: int):
    """A module with the reference program's layer names (forward not needed)."""
    model = torch.nn.Module()
    model.input_linear = torch.nn.Linear(d_in, d_hidden)
    model.middle_linear = torch.nn.Linear(d_hidden, d_hidden)
    model.output_linear = torch.nn.Linear(d_hidden, d_out)
    return model


def _bits(x) -> np.ndarray:
    """The raw bits of a float array or tensor, for bitwise comparison."""
    if type(x).__module__.startswith("torch"):
        import torch

        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        return x.detach().view(bits).numpy()
    x = np.asarray(x)
    return x.view({2: np.int16, 4: np.int32, 8: np.int64}[x.dtype.itemsize])


def _assert_trees_bitwise_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_bits(x), _bits(y))


def _assert_state_dicts_bitwise_equal(a, b) -> None:
    assert list(a) == list(b)  # same keys, same order
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(_bits(a[k]), _bits(b[k]), err_msg=k)


SHAPES = {
    "input_linear": {"weight": (5, 7), "bias": (7,)},
    "middle_linear": {"weight": (7, 7), "bias": (7,)},
    "output_linear": {"weight": (7, 3), "bias": (3,)},
}


# ------------------------------------------------------------------ layout


def test_from_torch_transposes_weights_and_nests_names(torch):
    model = _torch_net(torch, 5, 7, 3)
    params = fl.interop.from_torch(model.state_dict())
    assert jax.tree.map(lambda a: a.shape, params) == SHAPES
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))
    np.testing.assert_array_equal(
        np.asarray(params["middle_linear"]["weight"]),
        model.middle_linear.weight.detach().numpy().T,
    )


def test_module_and_state_dict_give_the_same_params(torch):
    model = _torch_net(torch, 5, 7, 3)
    _assert_trees_bitwise_equal(
        fl.interop.from_torch(model), fl.interop.from_torch(model.state_dict())
    )


def test_params_drive_fl_dynamic_net_like_torch(torch, key):
    model = _torch_net(torch, 5, 7, 3)
    params = fl.interop.from_torch(model)
    x = torch.randn(4, 5)
    with torch.no_grad():
        h = torch.relu(model.input_linear(x))
        h = torch.relu(model.middle_linear(h))
        want = model.output_linear(h).numpy()
    net = fl.models.DynamicNet(5, 7, 3)
    got = net.apply(params, jnp.asarray(x.numpy()), 1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_to_torch_loads_into_the_module(torch, key):
    params = fl.models.DynamicNet(5, 7, 3).init(key)
    state_dict = fl.interop.to_torch(params)
    assert isinstance(state_dict, collections.OrderedDict)
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == {
        "input_linear.weight": (7, 5),
        "input_linear.bias": (7,),
        "middle_linear.weight": (7, 7),
        "middle_linear.bias": (7,),
        "output_linear.weight": (3, 7),
        "output_linear.bias": (3,),
    }
    model = _torch_net(torch, 5, 7, 3)
    model.load_state_dict(state_dict)  # strict: every key matched
    assert all(t.is_contiguous() for t in state_dict.values())


def test_deeper_nesting_and_1d_weights(torch):
    # Any tree of layers: dotted names nest; only 2-D `weight`s are transposed.
    model = torch.nn.Module()
    model.block = torch.nn.Module()
    model.block.proj = torch.nn.Linear(4, 6)
    model.block.norm = torch.nn.LayerNorm(6)
    model.head = torch.nn.Linear(6, 2, bias=False)
    params = fl.interop.from_torch(model)
    assert jax.tree.map(lambda a: a.shape, params) == {
        "block": {
            "proj": {"weight": (4, 6), "bias": (6,)},
            "norm": {"weight": (6,), "bias": (6,)},
        },
        "head": {"weight": (6, 2)},
    }
    _assert_state_dicts_bitwise_equal(fl.interop.to_torch(params), model.state_dict())


# ------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_state_dict_round_trip_is_bitwise(torch, dtype_name):
    dtype = getattr(torch, dtype_name)
    model = _torch_net(torch, 5, 7, 3).to(dtype)
    with torch.no_grad():
        # Values that a lossy path would change: -0.0, nan, inf, subnormals.
        model.input_linear.bias[:4] = torch.tensor(
            [-0.0, float("nan"), float("inf"), 1e-40]
        ).to(dtype)
    state_dict = model.state_dict()
    _assert_state_dicts_bitwise_equal(
        fl.interop.to_torch(fl.interop.from_torch(state_dict)), state_dict
    )


FLOAT8 = [
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
]


@pytest.mark.parametrize("dtype_name", FLOAT8)
def test_float8_round_trips_are_bitwise(torch, dtype_name):
    # NumPy has no float8: the bits cross as uint8, viewed as ml_dtypes' type.
    if not hasattr(torch, dtype_name):
        pytest.skip(f"this torch has no {dtype_name}")
    dtype = getattr(torch, dtype_name)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    state_dict = collections.OrderedDict(
        [
            ("a.weight", every_byte.reshape(16, 16).view(dtype)),
            ("a.bias", every_byte[:7].view(dtype)),
            ("scale", every_byte[100].view(dtype)),  # 0-d
        ]
    )
    params = fl.interop.from_torch(state_dict)
    assert params["a"]["weight"].dtype == jnp.dtype(dtype_name)
    np.testing.assert_array_equal(
        np.asarray(params["a"]["weight"]).view(np.uint8),
        every_byte.reshape(16, 16).numpy().T,
    )
    back = fl.interop.to_torch(params)
    assert list(back) == list(state_dict)
    for k, tensor in state_dict.items():
        assert back[k].dtype == dtype and back[k].shape == tensor.shape, k
        assert torch.equal(back[k].view(torch.uint8), tensor.view(torch.uint8)), k
    params_back = fl.interop.from_torch(back)
    for a, b in zip(jax.tree.leaves(params_back), jax.tree.leaves(params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(
            np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)
        )


def test_float_dtypes_without_a_counterpart_raise(torch):
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("this torch has no float4_e2m1fn_x2")
    packed = torch.zeros(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(
        TypeError,
        match=r"from_torch: .*float dtype that JAX has no array type for: "
        r"\{'a': 'float4_e2m1fn_x2'\}",
    ) as info:
        fl.interop.from_torch({"a": packed, "b": torch.ones(2)})
    assert "'b'" not in str(info.value)
    with pytest.raises(
        TypeError,
        match=r"to_torch: every leaf of `params` must have a floating dtype that "
        r"torch also has; these do not: \{'a': 'float8_e3m4'\}",
    ):
        fl.interop.to_torch({"a": jnp.ones(2, jnp.float8_e3m4), "b": jnp.ones(2)})


def test_params_round_trip_is_bitwise(torch, key):
    params = fl.models.DynamicNet(5, 7, 3).init(key)
    params["output_linear"]["bias"] = jnp.array([-0.0, jnp.nan, jnp.inf])
    _assert_trees_bitwise_equal(
        fl.interop.from_torch(fl.interop.to_torch(params)), params
    )


def test_float64_is_kept_both_ways(torch):
    model = _torch_net(torch, 5, 7, 3).double()
    with jax.enable_x64(True):
        params = fl.interop.from_torch(model)
        assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {
            jnp.dtype(jnp.float64)
        }
        back = fl.interop.to_torch(params)
        assert {t.dtype for t in back.values()} == {torch.float64}
        _assert_state_dicts_bitwise_equal(back, model.state_dict())


def test_float64_without_x64_raises(torch):
    model = _torch_net(torch, 5, 7, 3).double()
    with pytest.raises(ValueError, match=r"from_torch: .*float64.*enable_x64"):
        fl.interop.from_torch(model)


def test_from_torch_copies_the_data(torch):
    model = torch.nn.Linear(3, 2)
    params = fl.interop.from_torch(model)
    before = np.asarray(params["bias"]).copy()
    with torch.no_grad():
        model.bias.add_(1.0)
    np.testing.assert_array_equal(np.asarray(params["bias"]), before)


def test_from_torch_accepts_tensors_that_require_grad(torch):
    model = torch.nn.Linear(3, 2)
    params = fl.interop.from_torch(dict(model.named_parameters()))
    assert params["weight"].shape == (3, 2)


# ------------------------------------------------------------------ errors


def test_like_reports_every_missing_extra_and_non_float_key(torch, key):
    net = fl.models.DynamicNet(5, 7, 3)
    state_dict = _torch_net(torch, 5, 7, 3).state_dict()
    del state_dict["middle_linear.weight"]
    del state_dict["output_linear.bias"]
    state_dict["extra.weight"] = torch.ones(2, 2)
    state_dict["steps"] = torch.tensor(3)
    state_dict["input_linear.bias"] = torch.ones(6)  # wrong shape, too
    with pytest.raises(TypeError) as info:
        fl.interop.from_torch(state_dict, like=net)
    message = str(info.value)
    assert message.startswith("from_torch: ")
    for name in [
        "'middle_linear.weight'",
        "'output_linear.bias'",
        "'extra.weight'",
        "'steps'",
        "'input_linear.bias' has shape (6,), expected (7,)",
    ]:
        assert name in message, name
    assert "missing keys" in message and "unexpected keys" in message


def test_like_accepts_params_and_reports_each_shape_mismatch(torch, key):
    params = fl.models.DynamicNet(5, 7, 3).init(key)
    state_dict = _torch_net(torch, 5, 8, 3).state_dict()
    with pytest.raises(ValueError, match=r"from_torch: .*wrong shapes") as info:
        fl.interop.from_torch(state_dict, like=params)
    message = str(info.value)
    for name in [
        "'input_linear.weight' has shape (8, 5), expected (7, 5)",
        "'input_linear.bias' has shape (8,), expected (7,)",
        "'middle_linear.weight' has shape (8, 8), expected (7, 7)",
        "'middle_linear.bias' has shape (8,), expected (7,)",
        "'output_linear.weight' has shape (3, 8), expected (3, 7)",
    ]:
        assert name in message, name
    assert "output_linear.bias" not in message


def test_like_matching_passes(torch, key):
    model = _torch_net(torch, 5, 7, 3)
    spec = jax.eval_shape(fl.models.DynamicNet(5, 7, 3).init, key)
    _assert_trees_bitwise_equal(
        fl.interop.from_torch(model, like=spec), fl.interop.from_torch(model)
    )


def test_non_float_tensors_raise_without_like(torch):
    state_dict = {
        "a.weight": torch.ones(2, 3, dtype=torch.int64),
        "a.bias": torch.ones(2),
        "mask": torch.ones(2, dtype=torch.bool),
    }
    with pytest.raises(TypeError, match=r"from_torch: .*not floating point") as info:
        fl.interop.from_torch(state_dict)
    assert "'a.weight': 'int64'" in str(info.value)
    assert "'mask': 'bool'" in str(info.value)
    assert "a.bias" not in str(info.value)


def test_from_torch_rejects_other_inputs(torch):
    with pytest.raises(TypeError, match=r"from_torch: `state_dict_or_module` must"):
        fl.interop.from_torch([torch.ones(2)])
    with pytest.raises(TypeError, match=r"from_torch: .*must be a torch.Tensor.*'b'"):
        fl.interop.from_torch({"a": torch.ones(2), "b": np.ones(2)})
    with pytest.raises(TypeError, match=r"from_torch: .*dotted names.*'a\.\.b'"):
        fl.interop.from_torch({"a..b": torch.ones(2)})
    with pytest.raises(TypeError, match=r"from_torch: .*clash.*\['a\.b'\]"):
        fl.interop.from_torch({"a": torch.ones(2), "a.b": torch.ones(2)})
    with pytest.raises(TypeError, match=r"from_torch: `like` must be a nested dict"):
        fl.interop.from_torch({"a": torch.ones(2)}, like=[jnp.ones(2)])
    with pytest.raises(TypeError, match=r"from_torch: `like` must hold arrays; 'a'"):
        fl.interop.from_torch({"a": torch.ones(2)}, like={"a": 1.0})


def test_to_torch_reports_every_bad_leaf(torch):
    params = {
        "a": {"weight": jnp.ones((2, 3), jnp.int32), "bias": jnp.ones(3)},
        "b": jnp.array([True]),
    }
    with pytest.raises(TypeError, match=r"to_torch: .*floating dtype") as info:
        fl.interop.to_torch(params)
    assert "'a.weight': 'int32'" in str(info.value)
    assert "'b': 'bool'" in str(info.value)
    with pytest.raises(TypeError, match=r"to_torch: every leaf .* array.*'a'"):
        fl.interop.to_torch({"a": 1.0})


@pytest.mark.parametrize(
    "params",
    [[jnp.ones(2)], {"a.b": jnp.ones(2)}, {1: jnp.ones(2)}, {"": jnp.ones(2)}],
    ids=["list", "dotted-key", "int-key", "empty-key"],
)
def test_to_torch_rejects_trees_that_do_not_map_to_names(torch, params):
    with pytest.raises(TypeError, match=r"to_torch: .*`params`"):
        fl.interop.to_torch(params)


# ------------------------------------------------------- torch is optional


def test_import_does_not_import_torch():
    code = (
        "import sys, functorch_lite, functorch_lite.interop, "
        "functorch_lite.transforms; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("fn", ["from_torch", "to_torch"])
def test_missing_torch_raises_import_error_with_install_hint(monkeypatch, fn):
    # A None entry in sys.modules makes `import torch` raise ImportError.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=rf"{fn}: .*`pip install torch`"):
        getattr(fl.interop, fn)({})
