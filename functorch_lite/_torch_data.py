"""Batches from PyTorch: `torch.Tensor`s become JAX arrays at the boundary.

The steps (`make_step`, `make_fused_step`, `fit`, `data_parallel`) take a
batch straight from a `torch.utils.data.DataLoader`: each tensor argument is
converted through DLPack, without a copy where the dtype and layout allow it
(a CPU tensor JAX can hold; with `jax_enable_x64` off, int64 and float64
narrow to int32 and float32 as they do for NumPy arrays). torch is never
imported here: a tensor is recognized by its type's module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def is_torch_tensor(value: Any) -> bool:
    """Whether `value` is a `torch.Tensor` (or a subclass, a `Parameter`)."""
    module = type(value).__module__
    return (module == "torch" or module.startswith("torch.")) and hasattr(
        value, "__dlpack__"
    )


def tensor_to_jax(tensor: Any, *, where: str, name: str) -> jax.Array:
    """A JAX array with the values of `tensor` (see the module notes)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    try:
        return jax.dlpack.from_dlpack(t)
    except Exception as err:  # noqa: BLE001 - any refusal: say what to do
        try:
            return jax.numpy.asarray(np.asarray(t.numpy()))
        except Exception:  # noqa: BLE001
            raise TypeError(
                f"{where}: `{name}` is a torch.Tensor of dtype {t.dtype}, which JAX "
                "cannot hold; convert it first, for example `.float()` or "
                "`.to(torch.int32)`."
            ) from err


def convert(value: Any, *, where: str, name: str) -> Any:
    """Convert every torch tensor in `value` (or in its tuples, lists, dicts).

    Returns the same object when there is none.
    """
    if is_torch_tensor(value):
        return tensor_to_jax(value, where=where, name=name)
    if isinstance(value, tuple | list | Mapping):
        leaves = jax.tree.leaves(value, is_leaf=is_torch_tensor)
        if any(is_torch_tensor(leaf) for leaf in leaves):
            return jax.tree.map(
                lambda x: (
                    tensor_to_jax(x, where=where, name=name)
                    if is_torch_tensor(x)
                    else x
                ),
                value,
                is_leaf=is_torch_tensor,
            )
    return value


def convert_args(
    args: tuple, kwargs: dict, names: tuple[str, ...], skip: frozenset[int], where: str
) -> tuple[tuple, dict]:
    """Convert the torch tensors in every argument but those at `skip`."""
    new_args = None
    for i, arg in enumerate(args):
        if i in skip or not (
            is_torch_tensor(arg) or isinstance(arg, tuple | list | dict)
        ):
            continue
        label = names[i] if i < len(names) else f"argument {i}"
        out = convert(arg, where=where, name=label)
        if out is not arg:
            new_args = list(args) if new_args is None else new_args
            new_args[i] = out
    if kwargs:
        kwargs = {k: convert(v, where=where, name=k) for k, v in kwargs.items()}
    return (tuple(new_args) if new_args is not None else args), kwargs
