"""Test helpers: tree comparison and float64 NumPy references."""

from __future__ import annotations

import io
from typing import Any

import jax
import numpy as np


class Terminal(io.StringIO):
    """A text stream that says it is a terminal (for progress displays)."""

    def isatty(self) -> bool:
        return True


def tree_allclose(a: Any, b: Any, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Assert that two pytrees have one structure and close leaves."""
    sa, sb = jax.tree.structure(a), jax.tree.structure(b)
    assert sa == sb, f"tree structures differ:\n  {sa}\n  {sb}"
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(x),
            np.asarray(y),
            rtol=rtol,
            atol=atol,
            err_msg=f"leaf {jax.tree_util.keystr(path)}",
        )


def to_f64(tree: Any) -> Any:
    """Copy a pytree of arrays to float64 NumPy arrays."""
    return jax.tree.map(lambda x: np.asarray(x, dtype=np.float64), tree)


def dynamic_net_forward_np(params: Any, x: np.ndarray, depth: int) -> np.ndarray:
    """The reference DynamicNet forward pass in float64 NumPy, written independently."""
    p = to_f64(params)
    x = np.asarray(x, np.float64)
    h = np.maximum(x @ p["input_linear"]["weight"] + p["input_linear"]["bias"], 0.0)
    for _ in range(depth):
        h = np.maximum(
            h @ p["middle_linear"]["weight"] + p["middle_linear"]["bias"], 0.0
        )
    return h @ p["output_linear"]["weight"] + p["output_linear"]["bias"]


def dynamic_net_grads_np(
    params: Any, x: np.ndarray, y: np.ndarray, depth: int
) -> tuple[float, dict]:
    """Summed-MSE loss and its gradients for DynamicNet, by hand, in float64 NumPy.

    The backward pass is written out layer by layer; the shared middle layer's
    gradient is the sum of its per-use gradients.
    """
    p = to_f64(params)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    z0 = x @ p["input_linear"]["weight"] + p["input_linear"]["bias"]
    hs = [np.maximum(z0, 0.0)]
    zs = []
    for _ in range(depth):
        z = hs[-1] @ p["middle_linear"]["weight"] + p["middle_linear"]["bias"]
        zs.append(z)
        hs.append(np.maximum(z, 0.0))
    out = hs[-1] @ p["output_linear"]["weight"] + p["output_linear"]["bias"]
    loss = float(np.sum((out - y) ** 2))
    g_out = 2.0 * (out - y)
    grads = {
        "output_linear": {"weight": hs[-1].T @ g_out, "bias": g_out.sum(0)},
        "middle_linear": {
            "weight": np.zeros_like(p["middle_linear"]["weight"]),
            "bias": np.zeros_like(p["middle_linear"]["bias"]),
        },
    }
    g_h = g_out @ p["output_linear"]["weight"].T
    for i in reversed(range(depth)):
        g_z = g_h * (zs[i] > 0)
        grads["middle_linear"]["weight"] += hs[i].T @ g_z
        grads["middle_linear"]["bias"] += g_z.sum(0)
        g_h = g_z @ p["middle_linear"]["weight"].T
    g_z0 = g_h * (z0 > 0)
    grads["input_linear"] = {"weight": x.T @ g_z0, "bias": g_z0.sum(0)}
    return loss, grads


def torch_dynamic_net_module(d_in: int, d_hidden: int, d_out: int) -> Any:
    """The reference program's PyTorch DynamicNet, verbatim, freshly initialized.

    Written here independently of `fl.interop`, so that parity tests do not
    check the library against itself.
    """
    import torch

    class DynamicNet(torch.nn.Module):
        def __init__(self, d_in: int, h: int, d_out: int) -> None:
            super().__init__()
            self.input_linear = torch.nn.Linear(d_in, h)
            self.middle_linear = torch.nn.Linear(h, h)
            self.output_linear = torch.nn.Linear(h, d_out)

        def forward(self, x: Any, depth: int) -> Any:
            h_relu = self.input_linear(x).clamp(min=0)
            for _ in range(depth):
                h_relu = self.middle_linear(h_relu).clamp(min=0)
            return self.output_linear(h_relu)

    return DynamicNet(d_in, d_hidden, d_out)


def torch_dynamic_net(params: Any, dtype: Any = None) -> Any:
    """The PyTorch reference DynamicNet, loaded with `params` (weights transposed)."""
    import torch

    d_in, h = np.shape(params["input_linear"]["weight"])
    d_out = np.shape(params["output_linear"]["weight"])[1]
    model = torch_dynamic_net_module(d_in, h, d_out)
    dtype = dtype or torch.float32
    with torch.no_grad():
        for name in ("input_linear", "middle_linear", "output_linear"):
            layer = getattr(model, name)
            w = np.array(params[name]["weight"], np.float64).T.copy()
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(
                torch.from_numpy(np.array(params[name]["bias"], np.float64))
            )
    return model.to(dtype)


def primitives(jaxpr: Any) -> set[str]:
    """Every primitive name in `jaxpr`, sub-jaxprs (loops, conds, custom rules) too."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= primitives(inner)
    return names
