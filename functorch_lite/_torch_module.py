"""`from_torch_module`: a PyTorch module's forward pass as a pure JAX function.

The module is read once, when it is converted: each supported layer becomes a
small JAX function of its own params (`from_torch`'s layout) and its input,
with the layer's hyperparameters (sizes, strides, `eps`, `dim`) fixed in the
closure. `nn.Sequential` (nested too) chains them as torch does. What comes
out computes what `module(*inputs)` computes in eval mode, and runs under
`jax.grad`, `jax.vmap` and `jax.jit`. A layer with its own `forward` (any
module type not listed in `SUPPORTED`, subclasses included) is refused with a
message that says how to write the apply by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from functorch_lite._checks import reject_torch

# fn(params, inputs, key) -> output; `inputs` a tuple, `key` a PRNG key or None.
LayerFn = Callable[[Any, tuple, Any], Any]

SUPPORTED = (
    "Sequential",
    "Linear",
    "Embedding",
    "LSTM",
    "RNN",
    "ReLU",
    "Tanh",
    "Sigmoid",
    "GELU",
    "SiLU",
    "Softmax",
    "LogSoftmax",
    "LayerNorm",
    "Dropout",
    "Flatten",
    "Identity",
    "Conv1d",
    "Conv2d",
)


def build(torch: Any, module: Any, path: str) -> LayerFn:
    """The JAX function of `module` (at `path`, for errors)."""
    kind = type(module)
    name = kind.__name__
    if name not in SUPPORTED or getattr(torch.nn, name, None) is not kind:
        raise _unsupported(kind, path)
    return _BUILDERS[name](torch, module, path)


def _unsupported(kind: type, path: str) -> TypeError:
    own = kind.__module__.split(".")[0] != "torch"
    why = (
        "it has its own `forward`, which cannot be read"
        if own
        else "it is not among the layers it converts"
    )
    return TypeError(
        f"from_torch_module: `{path}` is a {kind.__module__}.{kind.__qualname__}: "
        f"{why}. Supported: nn.{', nn.'.join(SUPPORTED)} (Sequential nested too). "
        "Write the apply yourself over the converted params: `params = "
        "fl.interop.from_torch(module)`, then a function that calls `fl.nn` "
        "pieces on them, for example `fl.nn.linear(d_in, d_out).apply("
        "params['fc'], x)` for a `self.fc = nn.Linear(d_in, d_out)`."
    )


def _lead(value: Any, ndim: int) -> Any:
    """`value` with leading axes of size 1 up to `ndim` (explicit broadcasting)."""
    return value.reshape((1,) * (ndim - value.ndim) + value.shape)


def _first(inputs: tuple, path: str, kind: str) -> Any:
    if len(inputs) != 1:
        raise TypeError(
            f"from_torch_module: `{path}` ({kind}) takes one input; got {len(inputs)}."
        )
    return inputs[0]


def _sequential(torch: Any, module: Any, path: str) -> LayerFn:
    children = [
        (name, build(torch, child, f"{path}.{name}"))
        for name, child in module.named_children()
    ]

    def run(params: Any, inputs: tuple, key: Any) -> Any:
        if not children:
            return _first(inputs, path, "Sequential")
        out = None
        for i, (name, fn) in enumerate(children):
            sub = params.get(name, {}) if isinstance(params, dict) else {}
            k = None if key is None else jax.random.fold_in(key, i)
            out = fn(sub, inputs, k)
            inputs = (out,)
        return out

    return run


def _linear(torch: Any, module: Any, path: str) -> LayerFn:
    def run(params: Any, inputs: tuple, key: Any) -> Any:
        x = _first(inputs, path, "Linear")
        y = jnp.matmul(x, params["weight"])
        return y + _lead(params["bias"], y.ndim) if "bias" in params else y

    return run


def _embedding(torch: Any, module: Any, path: str) -> LayerFn:
    if module.max_norm is not None or module.scale_grad_by_freq:
        raise TypeError(
            f"from_torch_module: `{path}` (Embedding) uses max_norm or "
            "scale_grad_by_freq, which change its weights or gradients in place; "
            "only a plain Embedding converts."
        )

    def run(params: Any, inputs: tuple, key: Any) -> Any:
        ids = _first(inputs, path, "Embedding")
        return jnp.take(params["weight"], ids, axis=0)

    return run


def _recurrent(torch: Any, module: Any, path: str) -> LayerFn:
    from functorch_lite import nn  # noqa: PLC0415 - nn imports this package

    kind = type(module).__name__
    if getattr(module, "proj_size", 0):
        raise TypeError(
            f"from_torch_module: `{path}` ({kind}) with proj_size > 0 does not convert."
        )
    d_in, hidden, layers = module.input_size, module.hidden_size, module.num_layers
    bidir, batch_first, bias = module.bidirectional, module.batch_first, module.bias
    if kind == "LSTM":
        layer = nn.lstm(d_in, hidden, layers, bidir)
    else:
        layer = nn.rnn(d_in, hidden, layers, module.nonlinearity, bidir)

    def run(params: Any, inputs: tuple, key: Any) -> Any:
        if not 1 <= len(inputs) <= 2:
            raise TypeError(
                f"from_torch_module: `{path}` ({kind}) takes an input and an "
                f"optional initial state; got {len(inputs)} inputs."
            )
        xs = inputs[0]
        state = inputs[1] if len(inputs) == 2 else None
        unbatched = xs.ndim == 2  # (T, D) whatever batch_first says
        if unbatched:
            xs = xs[None]
            if state is not None:
                state = jax.tree.map(lambda s: s[:, None], state)
        elif not batch_first:
            xs = jnp.swapaxes(xs, 0, 1)
        p = dict(params)
        if not bias:  # torch without biases: ours are zeros, with no gradient
            for k in [k for k in p if k.startswith("weight_ih")]:
                zeros = jnp.zeros(p[k].shape[1], p[k].dtype)
                p[k.replace("weight_ih", "bias_ih")] = zeros
                p[k.replace("weight_ih", "bias_hh")] = zeros
        n, t = xs.shape[0], xs.shape[1]
        lengths = jnp.full((n,), t, jnp.int32)
        out, final = layer.apply(p, xs, lengths, initial_state=state)
        if unbatched:
            out = out[0]
            final = jax.tree.map(lambda s: s[:, 0], final)
        elif not batch_first:
            out = jnp.swapaxes(out, 0, 1)
        return out, final

    return run


def _activation(fn: Callable[[Any], Any], kind: str) -> Callable[..., LayerFn]:
    def builder(torch: Any, module: Any, path: str) -> LayerFn:
        def run(params: Any, inputs: tuple, key: Any) -> Any:
            return fn(_first(inputs, path, kind))

        return run

    return builder


def _gelu(torch: Any, module: Any, path: str) -> LayerFn:
    tanh = module.approximate == "tanh"

    def run(params: Any, inputs: tuple, key: Any) -> Any:
        return jax.nn.gelu(_first(inputs, path, "GELU"), approximate=tanh)

    return run


def _softmax_dim(dim: Any, ndim: int) -> int:
    # torch's implicit dim (deprecated there, kept for parity).
    if dim is None:
        return 0 if ndim in (0, 1, 3) else 1
    return dim


def _softmax(torch: Any, module: Any, path: str) -> LayerFn:
    log = type(module).__name__ == "LogSoftmax"
    fn = jax.nn.log_softmax if log else jax.nn.softmax

    def run(params: Any, inputs: tuple, key: Any) -> Any:
        x = _first(inputs, path, type(module).__name__)
        return fn(x, axis=_softmax_dim(module.dim, x.ndim))

    return run


def _layer_norm(torch: Any, module: Any, path: str) -> LayerFn:
    axes = tuple(range(-len(module.normalized_shape), 0))
    eps = float(module.eps)

    def run(params: Any, inputs: tuple, key: Any) -> Any:
        x = _first(inputs, path, "LayerNorm")
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        y = (x - mean) * lax.rsqrt(var + eps)
        if "weight" in params:
            y = y * _lead(params["weight"], y.ndim)
        if "bias" in params:
            y = y + _lead(params["bias"], y.ndim)
        return y

    return run


def _dropout(torch: Any, module: Any, path: str) -> LayerFn:
    p = float(module.p)

    def run(params: Any, inputs: tuple, key: Any) -> Any:
        x = _first(inputs, path, "Dropout")
        if key is None or p == 0.0:  # eval mode: the identity
            return x
        if p == 1.0:
            return jnp.zeros_like(x)
        keep = jax.random.bernoulli(key, 1.0 - p, jnp.shape(x))
        return jnp.where(keep, x / (1.0 - p), jnp.zeros_like(x))

    return run


def _flatten(torch: Any, module: Any, path: str) -> LayerFn:
    start, end = module.start_dim, module.end_dim

    def run(params: Any, inputs: tuple, key: Any) -> Any:
        x = _first(inputs, path, "Flatten")
        shape = x.shape
        s = start % len(shape) if shape else 0
        e = end % len(shape) if shape else 0
        return x.reshape(shape[:s] + (math.prod(shape[s : e + 1]),) + shape[e + 1 :])

    return run


def _identity(torch: Any, module: Any, path: str) -> LayerFn:
    def run(params: Any, inputs: tuple, key: Any) -> Any:
        return inputs[0] if len(inputs) == 1 else inputs

    return run


_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _conv(torch: Any, module: Any, path: str) -> LayerFn:
    kind = type(module).__name__
    dims = 1 if kind == "Conv1d" else 2
    stride, dilation = tuple(module.stride), tuple(module.dilation)
    groups, kernel = module.groups, tuple(module.kernel_size)
    if module.padding_mode != "zeros" and module.padding_mode not in _PAD_MODES:
        raise TypeError(
            f"from_torch_module: `{path}` ({kind}) has padding_mode "
            f"{module.padding_mode!r}, which does not convert."
        )
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pads = [(0, 0)] * dims
        else:  # "same": torch puts the odd extra on the right
            total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(p, p) for p in module.padding]
    spatial = "H" if dims == 1 else "HW"
    numbers = (f"NC{spatial}", f"OI{spatial}", f"NC{spatial}")

    def run(params: Any, inputs: tuple, key: Any) -> Any:
        x = _first(inputs, path, kind)
        unbatched = x.ndim == dims + 1
        if unbatched:
            x = x[None]
        padding = pads
        if module.padding_mode != "zeros":
            x = jnp.pad(
                x, [(0, 0), (0, 0), *pads], mode=_PAD_MODES[module.padding_mode]
            )
            padding = [(0, 0)] * dims
        y = lax.conv_general_dilated(
            x,
            params["weight"],
            window_strides=stride,
            padding=padding,
            rhs_dilation=dilation,
            dimension_numbers=numbers,
            feature_group_count=groups,
        )
        if "bias" in params:
            y = y + params["bias"].reshape((1, -1) + (1,) * dims)
        return y[0] if unbatched else y

    return run


_BUILDERS: dict[str, Callable[[Any, Any, str], LayerFn]] = {
    "Sequential": _sequential,
    "Linear": _linear,
    "Embedding": _embedding,
    "LSTM": _recurrent,
    "RNN": _recurrent,
    "ReLU": _activation(jax.nn.relu, "ReLU"),
    "Tanh": _activation(jnp.tanh, "Tanh"),
    "Sigmoid": _activation(jax.nn.sigmoid, "Sigmoid"),
    "GELU": _gelu,
    "SiLU": _activation(jax.nn.silu, "SiLU"),
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "LayerNorm": _layer_norm,
    "Dropout": _dropout,
    "Flatten": _flatten,
    "Identity": _identity,
    "Conv1d": _conv,
    "Conv2d": _conv,
}


def wrap(fn: LayerFn) -> Callable[..., Any]:
    """The public `apply(params, *inputs, key=None)` over a built function."""

    def apply(params: Any, *inputs: Any, key: Any = None) -> Any:
        """Run the converted module: `module(*inputs)` in eval mode.

        Pass `key` (a PRNG key) to run its dropout layers as in train mode.
        """
        for i, value in enumerate(inputs):
            reject_torch(value, where="from_torch_module apply", name=f"inputs[{i}]")
        reject_torch(params, where="from_torch_module apply", name="params")
        return fn(params, inputs, key)

    return apply
