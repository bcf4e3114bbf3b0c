"""PyTorch interop: `from_torch` (state_dict to params) and `to_torch` (back).

A state_dict's dotted keys become nested dicts (`"input_linear.weight"` ->
`params["input_linear"]["weight"]`; `"lstm.weight_ih_l0"` ->
`params["lstm"]["weight_ih_l0"]`). Matrices that torch stores `(out, in)` are
transposed to our `(in, out)`, and back: a linear `weight` and a recurrent
layer's `weight_ih_l{k}` / `weight_hh_l{k}` (`_reverse` too). Every other
tensor, such as an embedding's `(num_embeddings, dim)` table or a bias, is
copied as it is.

Which tensors are transposed is decided, most exactly first:

1. by module type, when a `torch.nn.Module` is given (`from_torch(module)`,
   `to_torch(params, like=module)`): the submodule that owns each tensor is
   looked up in one layout table, used both ways: `Linear` transposes its
   `weight`; `Embedding` and `EmbeddingBag` transpose nothing; `LSTM`, `GRU`
   and `RNN` transpose their `weight_ih_l*` / `weight_hh_l*`. Tensors of
   other modules follow the name rule.
2. by shape, for a bare state_dict checked against `like`: a tensor that the
   name rule would transpose is transposed if its expected shape is its
   shape transposed, and kept if its expected shape is its own shape. When
   both fit (a square matrix), the name rule decides.
3. by name otherwise (the name rule): every 2-D tensor whose last name is
   `weight`, `weight_ih_l<k>` or `weight_hh_l<k>` (optionally `_reverse`).
   An embedding's 2-D `weight` is then transposed too; give `like` to keep
   it as it is.

Values are copied bit for bit and keep their float dtype (float16, float32,
float64, and bfloat16 and the float8s, as ml_dtypes' types), so
`from_torch(to_torch(params))` equals `params` and `to_torch(from_torch(sd))`
equals `sd` exactly, whenever both directions decide alike (the same module
or `like`, or the name rule both ways).

torch is optional: it is imported only when these functions run.
"""

from __future__ import annotations

import collections
import importlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["from_torch", "from_torch_module", "to_torch"]

Params = Any

_INSTALL_HINT = (
    "PyTorch is needed for `fl.interop` but is not installed. Install it with "
    "`pip install torch` (CPU wheels: `pip install torch --index-url "
    "https://download.pytorch.org/whl/cpu`); the rest of functorch_lite works "
    "without it."
)


def _import_torch(where: str) -> Any:
    try:
        return importlib.import_module("torch")
    except ImportError as err:
        raise ImportError(f"{where}: {_INSTALL_HINT}") from err


# A recurrent layer's input and hidden matrices, in torch's names.
_RNN_WEIGHTS = r"weight_(?:ih|hh)_l\d+(?:_reverse)?"

# The layout table, for both directions: for each torch module type (matched
# with isinstance, in this order, so subclasses count), the pattern of the
# names of its own 2-D tensors that torch stores `(out, in)` and we store
# `(in, out)`; None where there is none. Those are transposed; every other
# tensor of such a module is copied as it is. Tensors owned by a module of any
# other type follow the name rule, `_transposes`.
_LAYOUTS: tuple[tuple[str, str | None], ...] = (
    ("Linear", "weight"),
    ("Embedding", None),  # `(num_embeddings, dim)` both ways
    ("EmbeddingBag", None),
    ("LayerNorm", None),  # an elementwise `weight` of `normalized_shape`
    ("Conv1d", None),  # `(out, in / groups, k)` both ways
    ("Conv2d", None),
    ("LSTM", _RNN_WEIGHTS),
    ("GRU", _RNN_WEIGHTS),
    ("RNN", _RNN_WEIGHTS),
)

_NAME_RULE = re.compile(rf"weight|{_RNN_WEIGHTS}")


def _transposes(name: str, ndim: int) -> bool:
    """Tell, by name alone, whether a leaf is a matrix stored `(out, in)` by torch.

    True for a 2-D leaf whose last name is `weight` (a linear layer's),
    `weight_ih_l<k>` or `weight_hh_l<k>`, optionally with `_reverse` (a
    recurrent layer's).
    """
    return ndim == 2 and _NAME_RULE.fullmatch(name.rsplit(".", 1)[-1]) is not None


def _module_transposes(
    torch: Any, module: Any, ndims: Mapping[str, int]
) -> dict[str, bool]:
    """Decide, for each state_dict name of `module`, whether it is transposed.

    Args:
      torch: the torch module.
      module: a `torch.nn.Module` (anything without `named_modules` gets the
        name rule throughout).
      ndims: each state_dict name of `module` with its tensor's ndim.

    Returns:
      `{name: transposes}`, from the type of the submodule that owns each
      tensor, through `_LAYOUTS`; from `_transposes` for a tensor whose owner
      is of another type or is not found.
    """
    owners: dict[str, Any] = {}
    if callable(getattr(module, "named_modules", None)):
        # Every path of a module used twice (tied weights) has its own keys.
        owners.update(module.named_modules(remove_duplicate=False))
    rules = [
        (getattr(torch.nn, kind), None if pattern is None else re.compile(pattern))
        for kind, pattern in _LAYOUTS
        if isinstance(getattr(torch.nn, kind, None), type)
    ]
    decisions = {}
    for name, ndim in ndims.items():
        path, _, local = name.rpartition(".")
        owner = owners.get(path)
        for kind, pattern in rules:
            if isinstance(owner, kind):
                decisions[name] = (
                    ndim == 2 and pattern is not None and bool(pattern.fullmatch(local))
                )
                break
        else:
            decisions[name] = _transposes(name, ndim)
    return decisions


def _fits(
    name: str, torch_shape: tuple[int, ...], our_shape: tuple[int, ...]
) -> bool | None:
    """Decide by shape whether a leaf is transposed; None where neither layout fits.

    Only a leaf that the name rule transposes may be kept as it is, when
    `our_shape` is `torch_shape` (an embedding's `weight`); when both fit (a
    square matrix), the name rule decides. Every other leaf is never
    transposed.
    """
    if _transposes(name, len(torch_shape)):
        if our_shape == torch_shape[::-1]:
            return True
        if our_shape == torch_shape:
            return False
        return None
    return False if our_shape == torch_shape else None


def _either(name: str, shape: tuple[int, ...]) -> str:
    """Describe the shapes a leaf may have in the other layout, for errors."""
    if _transposes(name, len(shape)) and shape != shape[::-1]:
        return f"{shape[::-1]} (or {shape}, as it is)"
    return str(shape)


def _flatten(tree: Any, *, where: str, arg: str) -> dict[str, Any]:
    """Flatten nested dicts to `{"a.b": leaf}`, in insertion order."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if not isinstance(key, str) or not key or "." in key:
                raise TypeError(
                    f"{where}: every key of `{arg}` must be a non-empty str without "
                    f"dots; got {key!r} at {prefix or 'the top level'!r}."
                )
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, Mapping):
                walk(value, name)
            else:
                flat[name] = value

    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{where}: `{arg}` must be a nested dict of arrays (like "
            f"`net.init(key)`); got {type(tree).__name__}."
        )
    walk(tree, "")
    return flat


def _unflatten(flat: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Turn `{"a.b": leaf}` into nested dicts, or raise on clashing names."""
    tree: dict[str, Any] = {}
    clashes = []
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                clashes.append(name)
                break
            node = child
        else:
            if leaf in node:
                clashes.append(name)
            else:
                node[leaf] = value
    if clashes:
        raise TypeError(
            f"{where}: these state_dict keys clash with a shorter key that is "
            f"already a tensor, so they cannot nest: {clashes!r}."
        )
    return tree


def _like_shapes(like: Any, *, where: str) -> dict[str, tuple[int, ...]]:
    """Map each dotted name of `like` (a params tree or a model) to its shape."""
    init = getattr(like, "init", None)
    if callable(init):
        like = jax.eval_shape(init, jax.random.key(0))
    flat = _flatten(like, where=where, arg="like")
    shapes = {}
    for name, leaf in flat.items():
        if not hasattr(leaf, "shape"):
            raise TypeError(
                f"{where}: `like` must hold arrays; {name!r} is {type(leaf).__name__}."
            )
        shapes[name] = tuple(leaf.shape)
    return shapes


# NumPy's own float dtypes; the others (bfloat16, the float8s) are ml_dtypes',
# which JAX ships, and cross between torch and NumPy as raw bits.
_NUMPY_FLOATS = ("float16", "float32", "float64")


def _bits_dtypes(torch: Any, itemsize: int) -> tuple[Any, Any] | None:
    """Return (torch, NumPy) integer dtypes of `itemsize` bytes, to carry bits."""
    return {
        1: (torch.uint8, np.uint8),
        2: (torch.int16, np.int16),
        4: (torch.int32, np.int32),
        8: (torch.int64, np.int64),
    }.get(itemsize)


def _jax_dtype_for(torch: Any, dtype: Any) -> np.dtype | None:
    """Return the JAX (NumPy) dtype for a torch float dtype, or None.

    None where JAX has no dtype of the same name and size, such as for torch's
    packed `float4_e2m1fn_x2`.
    """
    name = str(dtype).removeprefix("torch.")
    scalar_type = getattr(jnp, name, None)
    if scalar_type is None:
        return None
    try:
        np_dtype = np.dtype(scalar_type)
    except TypeError:
        return None
    size = dtype.itemsize
    if np_dtype.itemsize != size or _bits_dtypes(torch, size) is None:
        return None
    return np_dtype


def _tensor_to_numpy(torch: Any, tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    name = str(tensor.dtype).removeprefix("torch.")
    if name in _NUMPY_FLOATS:
        return tensor.numpy()
    # NumPy has no bfloat16 or float8; move the bits, then view them as
    # ml_dtypes' type of the same name (which `from_torch` checked exists).
    np_dtype = _jax_dtype_for(torch, tensor.dtype)
    bits = _bits_dtypes(torch, tensor.element_size())
    assert bits is not None  # `_jax_dtype_for` found a dtype: its size has bits.
    torch_bits, _ = bits
    return tensor.view(torch_bits).numpy().view(np_dtype)


def from_torch(state_dict_or_module: Any, *, like: Any = None) -> Params:
    """Convert a PyTorch state_dict (or module) to a params tree.

    Args:
      state_dict_or_module: a mapping from dotted names to float tensors (a
        `state_dict()`), or a `torch.nn.Module`, whose `state_dict()` is used.
        For the reference `DynamicNet`: `"input_linear.weight"` of shape
        `(d_hidden, d_in)`, `"input_linear.bias"`, and so on. Given a module,
        each tensor's layout follows the type of the submodule that owns it
        (`Linear`, `Embedding`, `LSTM`, `GRU`, `RNN`; see the module
        docstring); given a state_dict, its name (and `like`) decides.
      like: optional expected structure: a params tree (arrays or
        `jax.ShapeDtypeStruct`s, in our layout) or a model with `init(key)`.
        Every missing key, extra key and wrong shape is then reported, all in
        one error. For a state_dict, it also settles by shape whether a 2-D
        `weight` is transposed: an embedding's `(num_embeddings, dim)` table
        expected as it is stays as it is (a square one follows the name
        rule, and is transposed; pass the module instead).

    Returns:
      Nested dicts of `jax.Array`s: `{"input_linear": {"weight": (d_in,
      d_hidden), "bias": (d_hidden,)}, ...}`, each leaf with its tensor's
      float dtype; linear `weight`s and recurrent `weight_ih_l{k}` /
      `weight_hh_l{k}` transposed to `(in, out)`, such as `(d_in, 4 *
      d_hidden)` for an LSTM's `weight_ih_l0`; everything else as it is.

    Raises:
      ImportError: torch is not installed.
      TypeError: a tensor is not floating point, or has a float dtype that JAX
        has no array type for (such as `float4_e2m1fn_x2`), or, with `like`,
        keys are missing or unexpected, such as a second layer's
        `weight_ih_l1` against a one-layer `like` (every such key is named,
        with any shape mismatches too); a value is not a tensor; the input
        is neither a mapping nor a module.
      ValueError: with `like`, shapes differ (and nothing else is wrong), each
        key named with its shape and the expected one, such as a hidden size
        of 8 against 16; or a float64 tensor while JAX's 64-bit mode is off.

    Examples:
      >>> import pytest; torch = pytest.importorskip("torch")
      >>> import functorch_lite as fl
      >>> layer = torch.nn.Linear(3, 2)
      >>> params = fl.interop.from_torch(layer.state_dict())
      >>> params["weight"].shape, params["bias"].shape
      ((3, 2), (2,))
      >>> lstm = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True)
      >>> params = fl.interop.from_torch(lstm)
      >>> params["weight_ih_l0"].shape, params["weight_hh_l1_reverse"].shape
      ((3, 20), (5, 20))
      >>> model = torch.nn.Module()
      >>> model.embed = torch.nn.Embedding(10, 3)
      >>> model.lstm = torch.nn.LSTM(3, 5)
      >>> params = fl.interop.from_torch(model)  # the module: by type
      >>> params["embed"]["weight"].shape, params["lstm"]["weight_ih_l0"].shape
      ((10, 3), (3, 20))
      >>> bare = fl.interop.from_torch(model.state_dict())  # by name: transposed
      >>> bare["embed"]["weight"].shape
      (3, 10)
      >>> back = fl.interop.from_torch(model.state_dict(), like=params)
      >>> back["embed"]["weight"].shape
      (10, 3)
    """
    where = "from_torch"
    torch = _import_torch(where)
    state_dict: Mapping[Any, Any]
    module = None
    if isinstance(state_dict_or_module, Mapping):
        state_dict = state_dict_or_module
    else:
        if not callable(getattr(state_dict_or_module, "state_dict", None)):
            raise TypeError(
                f"{where}: `state_dict_or_module` must be a state_dict (a mapping "
                f"from names to tensors) or a torch.nn.Module; got "
                f"{type(state_dict_or_module).__name__}."
            )
        module = state_dict_or_module
        state_dict = module.state_dict()

    not_tensor = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensor:
        raise TypeError(
            f"{where}: every state_dict value must be a torch.Tensor; these are "
            f"not: {not_tensor!r}."
        )
    bad_keys = [k for k in state_dict if not isinstance(k, str) or "" in k.split(".")]
    if bad_keys:
        raise TypeError(
            f"{where}: state_dict keys must be dotted names such as "
            f"'input_linear.weight', without empty parts; got {bad_keys!r}."
        )

    # Collect every problem, so that one run names every offending key.
    kind_problems: list[str] = []
    no_data = [
        k for k, v in state_dict.items() if v.is_meta or v.layout != torch.strided
    ]
    if no_data:
        kind_problems.append(
            f"tensors without dense data (meta or sparse): {no_data!r} (load or "
            "materialize them first, or `.to_dense()`)"
        )
    value_problems: list[str] = []
    not_float = {
        k: str(v.dtype).removeprefix("torch.")
        for k, v in state_dict.items()
        if not v.is_floating_point()
    }
    if not_float:
        kind_problems.append(
            f"tensors that are not floating point: {not_float!r} (drop them from "
            "the state_dict or convert them with `.float()`)"
        )
    no_jax_dtype = {
        k: str(v.dtype).removeprefix("torch.")
        for k, v in state_dict.items()
        if v.is_floating_point() and _jax_dtype_for(torch, v.dtype) is None
    }
    if no_jax_dtype:
        kind_problems.append(
            f"tensors of a float dtype that JAX has no array type for: "
            f"{no_jax_dtype!r} (convert them with `.float()`)"
        )
    # By module type when a module is given, else by name; refined below by
    # shape where `like` tells.
    ndims = {k: v.ndim for k, v in state_dict.items()}
    if module is not None:
        transposes = _module_transposes(torch, module, ndims)
    else:
        transposes = {k: _transposes(k, n) for k, n in ndims.items()}
    if like is not None:
        ours = _like_shapes(like, where=where)
        missing = [k for k in ours if k not in state_dict]
        extra = [k for k in state_dict if k not in ours]
        if missing:
            kind_problems.append(f"missing keys: {missing!r}")
        if extra:
            kind_problems.append(f"unexpected keys: {extra!r}")
        wrong = []
        for k, our in ours.items():
            if k not in state_dict:
                continue
            shape = tuple(state_dict[k].shape)
            if module is not None:
                # The module's types decide; `like` only checks the shapes.
                want = our[::-1] if transposes.get(k) else our
                if shape != want:
                    wrong.append(f"{k!r} has shape {shape}, expected {want}")
                continue
            fit = _fits(k, shape, our)
            if fit is None:
                wrong.append(f"{k!r} has shape {shape}, expected {_either(k, our)}")
            else:
                transposes[k] = fit
        if wrong:
            value_problems.append(
                "wrong shapes (torch layout, `weight` as (out, in)): "
                + ", ".join(wrong)
            )
    if kind_problems or value_problems:
        # TypeError for the wrong kind or structure, ValueError for shapes only.
        error = TypeError if kind_problems else ValueError
        against = " (checked against `like`)" if like is not None else ""
        raise error(
            f"{where}: the state_dict cannot be converted{against}: "
            + "; ".join(kind_problems + value_problems)
            + "."
        )
    if not jax.config.read("jax_enable_x64"):
        wide = [k for k, v in state_dict.items() if v.dtype == torch.float64]
        if wide:
            raise ValueError(
                f"{where}: these tensors are float64, which JAX keeps only in "
                f"64-bit mode: {wide!r}. Run inside `with jax.enable_x64(True):`, "
                "or convert the model with `.float()` first."
            )

    flat = {}
    for name, tensor in state_dict.items():
        array = _tensor_to_numpy(torch, tensor)
        if transposes[name]:
            array = array.T
        # Copy: on CPU, JAX may alias a NumPy buffer, which torch could mutate.
        flat[name] = jnp.asarray(np.array(array, copy=True, order="C"))
    return _unflatten(flat, where=where)


def from_torch_module(module: Any) -> tuple[Params, Any]:
    """Convert a PyTorch module to `(params, apply)`: its weights and its forward.

    `params` is what `from_torch(module)` gives. `apply(params, *inputs,
    key=None)` is a pure JAX function that computes what `module(*inputs)`
    computes in eval mode (dropout off), and runs under `jax.grad`,
    `jax.vmap` and `jax.jit`; pass a PRNG `key` to run dropout as in train
    mode. Converted: `nn.Sequential` (nested too) of `Linear`, `Embedding`,
    `LSTM`, `RNN` (they return `(output, state)` as torch does), `ReLU`,
    `Tanh`, `Sigmoid`, `GELU`, `SiLU`, `Softmax`, `LogSoftmax`,
    `LayerNorm`, `Dropout`, `Flatten`, `Identity`, `Conv1d` and `Conv2d`. A
    module with its own `forward`, or another layer, raises `TypeError`
    naming its path and type; write its apply with `fl.nn` pieces over
    `from_torch(module)`'s params then.

    Args:
      module: a `torch.nn.Module` built from the layers above.

    Returns:
      `(params, apply)`.

    Examples:
      >>> import torch, jax.numpy as jnp
      >>> import functorch_lite as fl
      >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
      ...                           torch.nn.Linear(4, 2))
      >>> params, apply = fl.interop.from_torch_module(net)
      >>> apply(params, jnp.ones((5, 3))).shape
      (5, 2)
    """
    torch = _import_torch("from_torch_module")
    from functorch_lite import _torch_module  # noqa: PLC0415

    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            "from_torch_module: `module` must be a torch.nn.Module; got "
            f"{type(module).__name__}. For a state_dict, use `from_torch`."
        )
    fn = _torch_module.build(torch, module, "module")
    return from_torch(module), _torch_module.wrap(fn)


def to_torch(params: Params, *, like: Any = None) -> collections.OrderedDict:
    """Convert a params tree to a PyTorch state_dict; the inverse of `from_torch`.

    Args:
      params: nested dicts (str keys without dots) of float arrays, such as
        `net.init(key)`.
      like: optional torch target: a `torch.nn.Module` or its `state_dict()`
        (only the shapes are read). Every missing key, extra key and wrong
        shape is then reported, all in one error. A module decides each
        tensor's layout by the type of the submodule that owns it, as
        `from_torch(module)` does; a state_dict decides by shape, as
        `from_torch(state_dict, like=params)` does. Without `like`, the name
        rule transposes every 2-D `weight`, so params holding an embedding
        need `like` to come back in torch's `(num_embeddings, dim)` layout.

    Returns:
      An `OrderedDict` from dotted names to CPU tensors, in the tree's
      insertion order, with each leaf's dtype; linear `weight`s and recurrent
      `weight_ih_l{k}` / `weight_hh_l{k}` are transposed to torch's `(out,
      in)`, everything else is copied as it is. Load it with
      `module.load_state_dict(...)`.

    Raises:
      ImportError: torch is not installed.
      TypeError: `params` is not nested dicts, or a leaf is not a float array
        of a dtype torch also has (each such key is named); `like` is neither
        a module nor a mapping of tensors; or, with `like`, keys are missing
        or unexpected (every such key is named, with any shape mismatches
        too).
      ValueError: with `like`, shapes differ (and nothing else is wrong),
        each key named with its shape and the expected one.

    Examples:
      >>> import pytest; torch = pytest.importorskip("torch")
      >>> import jax
      >>> import functorch_lite as fl
      >>> params = fl.nn.linear(3, 2).init(jax.random.key(0))
      >>> state_dict = fl.interop.to_torch(params)
      >>> {k: tuple(v.shape) for k, v in state_dict.items()}
      {'weight': (2, 3), 'bias': (2,)}
      >>> torch.nn.Linear(3, 2).load_state_dict(state_dict)
      <All keys matched successfully>
      >>> model = torch.nn.Module()
      >>> model.embed = torch.nn.Embedding(10, 3)
      >>> model.head = torch.nn.Linear(3, 2)
      >>> params = {
      ...     "embed": fl.nn.embedding(10, 3).init(jax.random.key(1)),
      ...     "head": fl.nn.linear(3, 2).init(jax.random.key(2)),
      ... }
      >>> state_dict = fl.interop.to_torch(params, like=model)
      >>> {k: tuple(v.shape) for k, v in state_dict.items()}
      {'embed.weight': (10, 3), 'head.weight': (2, 3), 'head.bias': (2,)}
      >>> model.load_state_dict(state_dict)
      <All keys matched successfully>
    """
    where = "to_torch"
    torch = _import_torch(where)
    flat = _flatten(params, where=where, arg="params")
    not_array = [k for k, v in flat.items() if not hasattr(v, "dtype")]
    if not_array:
        raise TypeError(
            f"{where}: every leaf of `params` must be an array; these are not: "
            f"{not_array!r}."
        )
    not_float = {
        k: str(v.dtype) for k, v in flat.items() if _torch_dtype_for(torch, v) is None
    }
    if not_float:
        raise TypeError(
            f"{where}: every leaf of `params` must have a floating dtype that torch "
            f"also has; these do not: {not_float!r}."
        )
    transposes = {k: _transposes(k, np.ndim(v)) for k, v in flat.items()}
    if like is not None:
        transposes = _to_torch_layout(torch, flat, like, where=where)
    state_dict: collections.OrderedDict = collections.OrderedDict()
    for name, leaf in flat.items():
        # A writable copy: torch.from_numpy warns on read-only buffers.
        array = np.array(leaf, copy=True)
        if transposes[name]:
            array = array.T
        # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
        array = np.array(array, order="C")
        if array.dtype.name in _NUMPY_FLOATS:
            tensor = torch.from_numpy(array)
        else:
            # bfloat16, float8: torch.from_numpy knows no ml_dtypes type, so
            # move the bits and view them as torch's dtype of the same name.
            bits = _bits_dtypes(torch, array.dtype.itemsize)
            # `_torch_dtype_for` accepted the leaf above: its size has bits.
            assert bits is not None
            _, np_bits = bits
            tensor = torch.from_numpy(array.view(np_bits)).view(
                _torch_dtype_for(torch, array)
            )
        state_dict[name] = tensor
    return state_dict


def _to_torch_layout(
    torch: Any, flat: Mapping[str, Any], like: Any, *, where: str
) -> dict[str, bool]:
    """Check `flat` params against `like`; decide which leaves are transposed.

    Args:
      torch: the torch module.
      flat: `{"a.b": leaf}`, our params.
      like: a `torch.nn.Module` or a state_dict, the torch target.
      where: the public function, for errors.

    Returns:
      `{name: transposes}` for every name of `flat`.

    Raises:
      TypeError: `like` is neither a module nor a mapping of arrays; keys
        are missing or unexpected.
      ValueError: only shapes differ.
    """
    module = None
    if isinstance(like, Mapping):
        target = like
    elif callable(getattr(like, "state_dict", None)):
        module = like
        target = like.state_dict()
    else:
        raise TypeError(
            f"{where}: `like` must be a torch.nn.Module or a state_dict (a mapping "
            f"from dotted names to tensors); got {type(like).__name__}."
        )
    not_array = [k for k, v in target.items() if not hasattr(v, "shape")]
    if not_array:
        raise TypeError(
            f"{where}: every value of `like` must be a tensor; these are not: "
            f"{not_array!r}."
        )
    shapes = {k: tuple(v.shape) for k, v in target.items()}
    transposes: dict[str, bool] = {}
    if module is not None:
        transposes = _module_transposes(
            torch, module, {k: len(v) for k, v in shapes.items()}
        )
    problems = []
    missing = [k for k in shapes if k not in flat]
    extra = [k for k in flat if k not in shapes]
    if missing:
        problems.append(f"missing keys: {missing!r}")
    if extra:
        problems.append(f"unexpected keys: {extra!r}")
    decisions = {}
    wrong = []
    for name, leaf in flat.items():
        if name not in shapes:
            continue
        ours, theirs = tuple(np.shape(leaf)), shapes[name]
        if module is not None:
            # The module's types decide; its shapes only check.
            decisions[name] = transposes[name]
            want = theirs[::-1] if transposes[name] else theirs
            if ours != want:
                wrong.append(f"{name!r} has shape {ours}, expected {want}")
            continue
        fit = _fits(name, theirs, ours)
        if fit is None:
            wrong.append(f"{name!r} has shape {ours}, expected {_either(name, theirs)}")
        else:
            decisions[name] = fit
    if wrong:
        problems.append(
            "wrong shapes (our layout, `weight` as (in, out)): " + ", ".join(wrong)
        )
    if problems:
        # TypeError for the wrong structure, ValueError for shapes only.
        error = TypeError if missing or extra else ValueError
        raise error(
            f"{where}: `params` do not match `like`: " + "; ".join(problems) + "."
        )
    return decisions


def _torch_dtype_for(torch: Any, leaf: Any) -> Any:
    """Return torch's dtype for a float leaf, or None where torch has none."""
    try:
        dtype = np.dtype(leaf.dtype)
    except TypeError:  # JAX's extended dtypes, such as PRNG keys
        return None
    if not jnp.issubdtype(dtype, jnp.floating):
        return None
    torch_dtype = getattr(torch, dtype.name, None)
    if (
        torch_dtype is None
        or not isinstance(torch_dtype, torch.dtype)
        or not torch_dtype.is_floating_point
    ):
        return None
    if _jax_dtype_for(torch, torch_dtype) != dtype:
        return None
    return torch_dtype
