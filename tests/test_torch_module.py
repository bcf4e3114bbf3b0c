"""`fl.interop.from_torch_module` against torch, and torch data at the steps.

For each supported layer, and for nested stacks: the converted `apply` gives
the module's eval-mode output, and its gradients (with respect to the params
and to float inputs) equal torch autograd's, to float32 rounding. A module
with its own forward, or an unsupported layer, is refused by path and type.
The steps take a batch of torch tensors (a DataLoader's) as they are.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functorch_lite as fl

torch = pytest.importorskip("torch")
nn = torch.nn


def _cases() -> dict[str, tuple[Any, list]]:
    torch.manual_seed(0)
    return {
        "Linear": (nn.Linear(5, 3), [torch.randn(4, 5)]),
        "Linear-nobias-3d": (nn.Linear(5, 3, bias=False), [torch.randn(2, 4, 5)]),
        "Embedding": (nn.Embedding(9, 4), [torch.tensor([[1, 8, 0], [3, 3, 2]])]),
        "LSTM": (
            nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True),
            [torch.randn(3, 6, 4)],
        ),
        "LSTM-time-major-with-state": (
            nn.LSTM(4, 5),
            [torch.randn(6, 3, 4), (torch.randn(1, 3, 5), torch.randn(1, 3, 5))],
        ),
        "LSTM-unbatched": (nn.LSTM(4, 5), [torch.randn(6, 4)]),
        "RNN": (nn.RNN(4, 5, nonlinearity="relu", bias=False), [torch.randn(6, 3, 4)]),
        "ReLU": (nn.ReLU(), [torch.randn(4, 6)]),
        "Tanh": (nn.Tanh(), [torch.randn(4, 6)]),
        "Sigmoid": (nn.Sigmoid(), [torch.randn(4, 6)]),
        "GELU": (nn.GELU(), [torch.randn(4, 6)]),
        "GELU-tanh": (nn.GELU(approximate="tanh"), [torch.randn(4, 6)]),
        "SiLU": (nn.SiLU(), [torch.randn(4, 6)]),
        "Softmax": (nn.Softmax(dim=0), [torch.randn(4, 6)]),
        "LogSoftmax": (nn.LogSoftmax(dim=-1), [torch.randn(4, 6)]),
        "LayerNorm": (nn.LayerNorm((3, 6)), [torch.randn(2, 3, 6)]),
        "Dropout": (nn.Dropout(0.4), [torch.randn(4, 6)]),
        "Flatten": (nn.Flatten(), [torch.randn(2, 3, 4, 5)]),
        "Identity": (nn.Identity(), [torch.randn(4, 6)]),
        "Conv1d": (
            nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, bias=True),
            [torch.randn(2, 4, 9)],
        ),
        "Conv1d-same-reflect": (
            nn.Conv1d(3, 2, 4, padding="same", dilation=2, padding_mode="reflect"),
            [torch.randn(2, 3, 11)],
        ),
        "Conv2d": (
            nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0)),
            [torch.randn(2, 2, 6, 7)],
        ),
        "Conv2d-unbatched": (nn.Conv2d(2, 3, 3), [torch.randn(2, 5, 5)]),
        "nested": (
            nn.Sequential(
                nn.Conv1d(3, 4, 3, padding=1),
                nn.SiLU(),
                nn.Flatten(),
                nn.Sequential(
                    nn.Linear(4 * 8, 16), nn.GELU(), nn.LayerNorm(16), nn.Dropout(0.1)
                ),
                nn.Identity(),
                nn.Linear(16, 5),
                nn.LogSoftmax(dim=1),
            ),
            [torch.randn(3, 3, 8)],
        ),
        "embedding-lstm": (
            nn.Sequential(nn.Embedding(7, 4), nn.LSTM(4, 6, batch_first=True)),
            [torch.tensor([[1, 2, 3, 0], [6, 5, 4, 4]])],
        ),
    }


CASES = _cases()


def _np(tree: Any) -> list[np.ndarray]:
    is_t = lambda t: isinstance(t, torch.Tensor)  # noqa: E731
    leaves = jax.tree.leaves(tree, is_leaf=is_t)
    return [t.detach().numpy() if is_t(t) else np.asarray(t) for t in leaves]


def _jax_inputs(inputs: list) -> list:
    return jax.tree.map(
        lambda t: jnp.asarray(t.numpy()),
        inputs,
        is_leaf=lambda t: isinstance(t, torch.Tensor),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_output_and_gradients_match_torch(name: str) -> None:
    module, inputs = CASES[name]
    module.eval()
    params, apply = fl.interop.from_torch_module(module)
    floats = [
        t.detach().clone().requires_grad_(t.is_floating_point())
        for t in jax.tree.leaves(inputs, is_leaf=lambda t: isinstance(t, torch.Tensor))
    ]
    treedef = jax.tree.structure(inputs, is_leaf=lambda t: isinstance(t, torch.Tensor))
    t_inputs = jax.tree.unflatten(treedef, floats)
    out = module(*t_inputs)
    outs = jax.tree.leaves(out, is_leaf=lambda t: isinstance(t, torch.Tensor))
    rng = np.random.default_rng(0)
    cotangents = [rng.normal(size=o.shape).astype(np.float32) for o in outs]
    torch.autograd.backward(outs, [torch.from_numpy(c) for c in cotangents])

    x = _jax_inputs(inputs)
    got = apply(params, *x)
    for g, w in zip(_np(got), _np(out), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)

    def objective(p: Any, xs: list) -> jax.Array:
        leaves = jax.tree.leaves(apply(p, *xs))
        return sum(jnp.sum(o * c) for o, c in zip(leaves, cotangents, strict=True))

    float_x = [jnp.issubdtype(v.dtype, jnp.floating) for v in jax.tree.leaves(x)]
    if params:
        grads = jax.grad(objective)(params, x)
        torch_layout = fl.interop.to_torch(grads, like=module)
        for key, param in module.named_parameters():
            np.testing.assert_allclose(
                torch_layout[key].numpy(),
                param.grad.numpy(),
                rtol=1e-4,
                atol=1e-5,
                err_msg=key,
            )
    if any(float_x):
        dx = jax.tree.leaves(jax.grad(objective, argnums=1)(params, x))
        for d, t, is_float in zip(dx, floats, float_x, strict=True):
            if is_float:
                np.testing.assert_allclose(d, t.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_apply_composes_with_jit_vmap_and_grad() -> None:
    module, (x,) = CASES["nested"]
    params, apply = fl.interop.from_torch_module(module)
    xj = jnp.asarray(x.numpy())
    want = apply(params, xj)
    np.testing.assert_allclose(jax.jit(apply)(params, xj), want, rtol=1e-5, atol=1e-6)
    per_row = jax.vmap(lambda r: apply(params, r[None])[0])(xj)
    np.testing.assert_allclose(per_row, want, rtol=1e-5, atol=1e-6)
    g = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, xj))))(params)
    assert jax.tree.structure(g) == jax.tree.structure(params)


def test_dropout_key_runs_it_as_in_train_mode() -> None:
    params, apply = fl.interop.from_torch_module(nn.Dropout(0.25))
    x = jnp.ones((200, 50), jnp.float32)
    np.testing.assert_array_equal(apply(params, x), x)  # eval: the identity
    a = np.asarray(apply(params, x, key=jax.random.key(1)))
    b = np.asarray(apply(params, x, key=jax.random.key(1)))
    np.testing.assert_array_equal(a, b)
    dropped = np.mean(a == 0.0)
    assert 0.22 < dropped < 0.28, dropped
    np.testing.assert_allclose(a[a != 0.0], 1.0 / 0.75, rtol=1e-6)


class _Own(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: Any) -> Any:
        return self.fc(x) * 2


@pytest.mark.parametrize(
    ("module", "path", "kind"),
    [
        (lambda: nn.Sequential(nn.Linear(2, 2), _Own()), "module.1", "_Own"),
        (
            lambda: nn.Sequential(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))),
            "module.0.1",
            "BatchNorm1d",
        ),
        (lambda: _Own(), "module", "_Own"),
    ],
)
def test_unsupported_modules_are_named(module: Any, path: str, kind: str) -> None:
    with pytest.raises(TypeError, match=re.escape(f"`{path}` is a")) as info:
        fl.interop.from_torch_module(module())
    text = str(info.value)
    assert kind in text and "nn.Linear" in text and "fl.nn" in text


def test_functional_call_points_to_from_torch_module() -> None:
    with pytest.raises(TypeError, match="from_torch_module"):
        fl.transforms.functional_call(nn.Linear(10, 3), {}, (jnp.ones(10),))


def test_model_apply_names_the_conversion_for_a_tensor(key: jax.Array) -> None:
    net = fl.models.DynamicNet(10, 4, 3)
    with pytest.raises(TypeError, match=r"DynamicNet.apply: `x` holds a torch.Tensor"):
        net.apply(net.init(key), torch.ones(4, 10), 2)
    params, apply = fl.interop.from_torch_module(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"`inputs\[0\]` holds a torch.Tensor"):
        apply(params, torch.ones(2, 3))


def test_steps_and_fit_take_torch_batches(key: jax.Array) -> None:
    net = fl.models.DynamicNet(6, 4, 2)
    opt = optax.sgd(1e-2)

    def loss_fn(p: Any, x: Any, y: Any, depth: Any) -> jax.Array:
        return fl.nn.mse_loss(net.apply(p, x, depth), y)

    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
    data = torch.utils.data.TensorDataset(xs, ys)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    batches = [(x, y, 2) for x, y in loader]
    as_numpy = [(x.numpy(), y.numpy(), 2) for x, y in loader]
    as_jax = [(jnp.asarray(x), jnp.asarray(y), d) for x, y, d in as_numpy]

    def run(feed: list) -> Any:
        step = fl.train.make_step(loss_fn, opt)
        params = net.init(key)
        return fl.train.fit(step, params, opt.init(params), feed, progress=False)

    want = run(as_jax)
    for feed in (batches, as_numpy):
        got = run(feed)
        np.testing.assert_array_equal(got.losses, want.losses)
    fused = fl.train.make_fused_step(loss_fn, opt)
    params = net.init(key)
    stacked = (torch.stack([xs[:4], xs[4:]]), torch.stack([ys[:4], ys[4:]]))
    _, _, losses = fused(params, opt.init(params), *stacked, torch.tensor([2, 2]))
    np.testing.assert_allclose(losses, want.losses, rtol=1e-6)


def test_data_parallel_takes_torch_batches(key: jax.Array) -> None:
    net = fl.models.DynamicNet(6, 4, 2)
    opt = optax.sgd(1e-2)

    def loss_fn(p: Any, x: Any, y: Any, depth: Any) -> jax.Array:
        return fl.nn.mse_loss(net.apply(p, x, depth), y)

    x, y = torch.randn(4, 6), torch.randn(4, 2)
    losses = []
    for feed in ((x, y), (jnp.asarray(x.numpy()), jnp.asarray(y.numpy()))):
        dp = fl.parallel.data_parallel(fl.train.make_step(loss_fn, opt))
        params = net.init(key)
        _, _, loss = dp(params, opt.init(params), *feed, 2)
        losses.append(float(loss))
    assert losses[0] == losses[1]


def test_a_float32_cpu_tensor_converts_without_a_copy() -> None:
    from functorch_lite import _torch_data

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    a = _torch_data.tensor_to_jax(t, where="test", name="t")
    assert a.unsafe_buffer_pointer() == t.data_ptr()  # the same memory
    np.testing.assert_array_equal(a, t.numpy())
    # int64 narrows to int32 (jax_enable_x64 off): a copy, the same values.
    i = _torch_data.tensor_to_jax(torch.arange(5), where="test", name="i")
    assert i.dtype == jnp.int32 and i.tolist() == [0, 1, 2, 3, 4]
