"""Tests for `fl.interop` with recurrent layers and embeddings.

`torch.nn.LSTM` / `RNN` / `GRU` state_dicts map to flat dicts with torch's own
keys, `weight_ih_l{k}` / `weight_hh_l{k}` transposed to `(in, out)`; an
`Embedding`'s table is never transposed when its module is known (by type), or
when `like` shows its layout (by shape).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functorch_lite as fl

torch = pytest.importorskip("torch")

D_IN, HIDDEN = 3, 5  # non-square everywhere: a wrong transpose changes shapes
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _recurrent(kind: str, num_layers: int, bidirectional: bool, dtype):
    torch.manual_seed(0)
    cls = getattr(torch.nn, kind)
    return cls(
        D_IN, HIDDEN, num_layers=num_layers, bidirectional=bidirectional, bias=True
    ).to(dtype)


def _composite(num_embeddings: int = 11, dim: int = 6):
    """Embedding + LSTM + Linear, the shape of a small sequence classifier."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(num_embeddings, dim)
    model.lstm = torch.nn.LSTM(dim, HIDDEN, batch_first=True)
    model.head = torch.nn.Linear(HIDDEN, 2)
    return model


def _expected_shapes(kind: str, num_layers: int, bidirectional: bool) -> dict:
    """Our layout, written out by hand from torch's documented shapes."""
    width = GATES[kind] * HIDDEN
    dirs = 2 if bidirectional else 1
    shapes = {}
    for k in range(num_layers):
        d_in = D_IN if k == 0 else dirs * HIDDEN
        for suffix in ["", "_reverse"][:dirs]:
            shapes[f"weight_ih_l{k}{suffix}"] = (d_in, width)
            shapes[f"weight_hh_l{k}{suffix}"] = (HIDDEN, width)
            shapes[f"bias_ih_l{k}{suffix}"] = (width,)
            shapes[f"bias_hh_l{k}{suffix}"] = (width,)
    return shapes


def _assert_state_dicts_equal(got, want) -> None:
    """Same keys in the same order, same dtypes and shapes, equal bit for bit."""
    assert isinstance(got, collections.OrderedDict)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        # Bit for bit: torch.equal alone takes -0.0 for 0.0 and nan for unequal.
        bits = {4: torch.int32, 8: torch.int64}[want[k].element_size()]
        assert torch.equal(got[k].view(bits), want[k].contiguous().view(bits)), k
        if not want[k].isnan().any():
            assert torch.equal(got[k], want[k]), k


def _shapes(params) -> dict:
    return jax.tree.map(lambda a: tuple(a.shape), params)


def _x64(dtype_name: str):
    return jax.enable_x64(dtype_name == "float64")


# ------------------------------------------------- LSTM and RNN, exactly


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("source", ["state_dict", "module"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_recurrent_round_trip_is_exact(
    kind, num_layers, bidirectional, source, dtype_name
):
    dtype = getattr(torch, dtype_name)
    layer = _recurrent(kind, num_layers, bidirectional, dtype)
    state_dict = layer.state_dict()
    with torch.no_grad():  # values that a lossy path would change
        state_dict["bias_hh_l0"][:3] = torch.tensor([-0.0, float("nan"), 1e-40])
    with _x64(dtype_name):
        params = fl.interop.from_torch(layer if source == "module" else state_dict)
        # A flat dict with torch's keys, in torch's order, in our layout.
        assert list(params) == list(state_dict)
        assert _shapes(params) == _expected_shapes(kind, num_layers, bidirectional)
        assert {leaf.dtype for leaf in params.values()} == {jnp.dtype(dtype_name)}
        for name, tensor in state_dict.items():
            want = tensor.numpy().T if name.startswith("weight_") else tensor.numpy()
            np.testing.assert_array_equal(np.asarray(params[name]), want, name)
        back = fl.interop.to_torch(params)
        back_like = fl.interop.to_torch(params, like=layer)
    _assert_state_dicts_equal(back, state_dict)
    _assert_state_dicts_equal(back_like, state_dict)
    fresh = _recurrent(kind, num_layers, bidirectional, dtype)
    fresh.load_state_dict(back)  # strict: every key matched
    _assert_state_dicts_equal(fresh.state_dict(), state_dict)


def test_lstm_layout_is_torch_transposed_with_gates_in_torch_order():
    layer = _recurrent("LSTM", 1, True, torch.float32)
    params = fl.interop.from_torch(layer)
    for suffix in ["", "_reverse"]:
        w_ih = getattr(layer, f"weight_ih_l0{suffix}").detach().numpy()
        w_hh = getattr(layer, f"weight_hh_l0{suffix}").detach().numpy()
        assert params[f"weight_ih_l0{suffix}"].shape == (D_IN, 4 * HIDDEN)
        np.testing.assert_array_equal(
            np.asarray(params[f"weight_ih_l0{suffix}"]), w_ih.T
        )
        np.testing.assert_array_equal(
            np.asarray(params[f"weight_hh_l0{suffix}"]), w_hh.T
        )
        # Gate g (the third block of H columns) is torch's third block of rows.
        np.testing.assert_array_equal(
            np.asarray(params[f"weight_ih_l0{suffix}"])[:, 2 * HIDDEN : 3 * HIDDEN],
            w_ih[2 * HIDDEN : 3 * HIDDEN].T,
        )


def test_gru_follows_the_same_rule():
    layer = _recurrent("GRU", 2, False, torch.float32)
    params = fl.interop.from_torch(layer)
    assert _shapes(params) == _expected_shapes("GRU", 2, False)
    _assert_state_dicts_equal(fl.interop.to_torch(params), layer.state_dict())


def test_lstm_without_bias_and_nested_names():
    model = torch.nn.Module()
    model.encoder = torch.nn.Module()
    model.encoder.rnn = torch.nn.LSTM(D_IN, HIDDEN, bias=False)
    params = fl.interop.from_torch(model.state_dict())
    assert _shapes(params) == {
        "encoder": {
            "rnn": {
                "weight_ih_l0": (D_IN, 4 * HIDDEN),
                "weight_hh_l0": (HIDDEN, 4 * HIDDEN),
            }
        }
    }
    _assert_state_dicts_equal(fl.interop.to_torch(params), model.state_dict())


@pytest.mark.parametrize(
    ("name", "transposed"),
    [
        ("weight_ih_l0", True),
        ("weight_hh_l12", True),
        ("weight_ih_l3_reverse", True),
        ("lstm.weight_hh_l0_reverse", True),
        ("weight", True),
        ("weight_ih_l", False),
        ("weight_ih_lx", False),
        ("weight_ih_l0_reversed", False),
        ("weight_hr_l0", False),  # an LSTM's projection (proj_size): not ours
        ("my_weight_ih_l0", False),
        ("bias_ih_l0", False),
    ],
)
def test_name_rule_for_bare_state_dicts(name, transposed):
    tensor = torch.arange(6.0).reshape(2, 3)
    params = fl.interop.from_torch({name: tensor})
    leaf = params
    for part in name.split("."):
        leaf = leaf[part]
    assert leaf.shape == ((3, 2) if transposed else (2, 3))
    # Only 2-D tensors are ever transposed.
    one_d = fl.interop.from_torch({name: torch.arange(4.0)})
    assert jax.tree.leaves(one_d)[0].shape == (4,)


def test_matches_fl_nn_recurrent_layers():
    # The other half of the contract: `fl.nn.lstm` / `fl.nn.rnn` params have
    # exactly the keys and shapes that `from_torch` produces.
    if not (hasattr(fl.nn, "lstm") and hasattr(fl.nn, "rnn")):
        pytest.skip("fl.nn.lstm / fl.nn.rnn are not available")
    makers = {"LSTM": getattr(fl.nn, "lstm"), "RNN": getattr(fl.nn, "rnn")}  # noqa: B009
    for kind, make in makers.items():
        for num_layers, bidirectional in [(1, False), (2, True)]:
            layer = _recurrent(kind, num_layers, bidirectional, torch.float32)
            ours = make(
                D_IN, HIDDEN, num_layers=num_layers, bidirectional=bidirectional
            )
            params = fl.interop.from_torch(layer, like=ours)
            spec = jax.eval_shape(ours.init, jax.random.key(0))
            assert _shapes(params) == _shapes(spec)
            assert list(fl.interop.to_torch(params)) == list(layer.state_dict())


# ---------------------------------------------- embeddings: type and shape


def test_composite_module_converts_each_tensor_by_its_module_type():
    model = _composite()
    params = fl.interop.from_torch(model)
    assert _shapes(params) == {
        "embed": {"weight": (11, 6)},  # as torch: not transposed
        "lstm": {
            "weight_ih_l0": (6, 4 * HIDDEN),
            "weight_hh_l0": (HIDDEN, 4 * HIDDEN),
            "bias_ih_l0": (4 * HIDDEN,),
            "bias_hh_l0": (4 * HIDDEN,),
        },
        "head": {"weight": (HIDDEN, 2), "bias": (2,)},  # transposed
    }
    np.testing.assert_array_equal(
        np.asarray(params["embed"]["weight"]), model.embed.weight.detach().numpy()
    )
    np.testing.assert_array_equal(
        np.asarray(params["head"]["weight"]), model.head.weight.detach().numpy().T
    )
    np.testing.assert_array_equal(
        np.asarray(params["lstm"]["weight_ih_l0"]),
        model.lstm.weight_ih_l0.detach().numpy().T,
    )


def test_square_embedding_is_decided_by_type_not_by_shape():
    # (6, 6): no shape can tell the layout, the module's type does.
    model = _composite(num_embeddings=6, dim=6)
    table = model.embed.weight.detach().numpy()
    assert not np.array_equal(table, table.T)
    params = fl.interop.from_torch(model)
    np.testing.assert_array_equal(np.asarray(params["embed"]["weight"]), table)
    _assert_state_dicts_equal(
        fl.interop.to_torch(params, like=model), model.state_dict()
    )
    # A bare state_dict has only names: the name rule transposes, even with
    # `like`, as the docs say (a square `weight` is ambiguous by shape).
    bare = fl.interop.from_torch(model.state_dict(), like=params)
    np.testing.assert_array_equal(np.asarray(bare["embed"]["weight"]), table.T)


def test_shared_modules_and_tied_weights_follow_each_owner():
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(11, 6)
    model.decoder_embed = model.embed  # one module at two paths
    model.lstm = torch.nn.LSTM(6, HIDDEN)
    model.lstm_again = model.lstm
    model.head = torch.nn.Linear(6, 11, bias=False)
    model.head.weight = model.embed.weight  # tied: (11, 6) in torch
    params = fl.interop.from_torch(model)
    table = model.embed.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]["weight"]), table)
    np.testing.assert_array_equal(np.asarray(params["decoder_embed"]["weight"]), table)
    np.testing.assert_array_equal(np.asarray(params["head"]["weight"]), table.T)
    assert params["lstm_again"]["weight_ih_l0"].shape == (6, 4 * HIDDEN)
    _assert_state_dicts_equal(
        fl.interop.to_torch(params, like=model), model.state_dict()
    )


@pytest.mark.parametrize("like_kind", ["module", "state_dict"])
def test_to_torch_with_like_round_trips_the_composite(like_kind):
    model = _composite()
    like = model if like_kind == "module" else model.state_dict()
    params = fl.interop.from_torch(model)
    back = fl.interop.to_torch(params, like=like)
    _assert_state_dicts_equal(back, model.state_dict())
    fresh = _composite()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(back)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    # And once more round: ours -> torch -> ours is exact too.
    again = fl.interop.from_torch(back, like=params)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_to_torch_without_like_transposes_an_embedding_by_name():
    # Documented: without `like`, the name rule transposes every 2-D `weight`.
    model = _composite()
    params = fl.interop.from_torch(model)
    back = fl.interop.to_torch(params)
    assert tuple(back["embed.weight"].shape) == (6, 11)
    with pytest.raises(RuntimeError, match="embed.weight"):
        _composite().load_state_dict(back)


@pytest.mark.parametrize("like_kind", ["params", "eval_shape", "fl_embedding"])
def test_like_keeps_an_embedding_of_a_bare_state_dict(like_kind):
    model = _composite()
    from_module = fl.interop.from_torch(model)
    like = {
        "params": from_module,
        "eval_shape": jax.eval_shape(lambda: from_module),
        "fl_embedding": {
            **from_module,
            "embed": fl.nn.embedding(11, 6).init(jax.random.key(0)),
        },
    }[like_kind]
    params = fl.interop.from_torch(model.state_dict(), like=like)
    assert _shapes(params) == _shapes(from_module)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(from_module), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ errors


def test_two_layer_state_dict_against_one_layer_like_names_the_extra_keys():
    one = fl.interop.from_torch(_recurrent("LSTM", 1, False, torch.float32))
    two = _recurrent("LSTM", 2, False, torch.float32).state_dict()
    with pytest.raises(TypeError, match=r"^from_torch: .*unexpected keys") as info:
        fl.interop.from_torch(two, like=one)
    message = str(info.value)
    for k in ["weight_ih_l1", "weight_hh_l1", "bias_ih_l1", "bias_hh_l1"]:
        assert repr(k) in message, k
    assert "'weight_ih_l0'" not in message
    # The other way round: keys of `like` that the state_dict lacks.
    with pytest.raises(TypeError, match=r"^from_torch: .*missing keys") as info:
        fl.interop.from_torch(
            _recurrent("LSTM", 1, False, torch.float32),
            like=fl.interop.from_torch(two),
        )
    assert "'weight_hh_l1'" in str(info.value)


def test_hidden_size_mismatch_names_each_key_and_shape():
    small = torch.nn.LSTM(4, 8)
    big = fl.interop.from_torch(torch.nn.LSTM(4, 16))
    with pytest.raises(ValueError, match=r"^from_torch: .*wrong shapes") as info:
        fl.interop.from_torch(small.state_dict(), like=big)
    message = str(info.value)
    for fragment in [
        "'weight_ih_l0' has shape (32, 4), expected (64, 4)",
        "'weight_hh_l0' has shape (32, 8), expected (64, 16)",
        "'bias_ih_l0' has shape (32,), expected (64,)",
        "'bias_hh_l0' has shape (32,), expected (64,)",
    ]:
        assert fragment in message, fragment
    # A module is checked against `like` the same way.
    with pytest.raises(
        ValueError, match=r"'weight_ih_l0' has shape \(32, 4\), expected \(64, 4\)"
    ):
        fl.interop.from_torch(small, like=big)


def test_bidirectional_against_unidirectional_like():
    bi = _recurrent("LSTM", 1, True, torch.float32)
    uni = fl.interop.from_torch(_recurrent("LSTM", 1, False, torch.float32))
    with pytest.raises(TypeError, match=r"unexpected keys: \['weight_ih_l0_reverse'"):
        fl.interop.from_torch(bi, like=uni)


@pytest.mark.parametrize("like_kind", ["module", "state_dict"])
def test_to_torch_like_of_another_architecture_raises(like_kind):
    def as_like(module):
        return module if like_kind == "module" else module.state_dict()

    one = fl.interop.from_torch(_recurrent("LSTM", 1, False, torch.float32))
    two = as_like(_recurrent("LSTM", 2, False, torch.float32))
    with pytest.raises(TypeError, match=r"^to_torch: .*missing keys") as info:
        fl.interop.to_torch(one, like=two)
    assert "'weight_ih_l1'" in str(info.value)
    assert "'weight_ih_l0'" not in str(info.value)

    small = fl.interop.from_torch(torch.nn.LSTM(4, 8))
    with pytest.raises(ValueError, match=r"^to_torch: .*wrong shapes") as info:
        fl.interop.to_torch(small, like=as_like(torch.nn.LSTM(4, 16)))
    message = str(info.value)
    assert "'weight_ih_l0' has shape (4, 32), expected (4, 64)" in message
    assert "'bias_hh_l0' has shape (32,), expected (64,)" in message

    composite = fl.interop.from_torch(_composite())
    with pytest.raises(TypeError, match=r"^to_torch: .*unexpected keys") as info:
        fl.interop.to_torch(
            composite, like=as_like(_recurrent("LSTM", 1, False, torch.float32))
        )
    assert "'embed.weight'" in str(info.value)


def test_to_torch_rejects_a_bad_like():
    params = fl.interop.from_torch(torch.nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"^to_torch: `like` must be a torch.nn.Module"):
        fl.interop.to_torch(params, like=[1])
    with pytest.raises(TypeError, match=r"^to_torch: every value of `like`.*'bias'"):
        fl.interop.to_torch(params, like={"weight": torch.ones(2, 3), "bias": 1.0})
