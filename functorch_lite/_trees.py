"""Private helpers to compare a pytree against an expected one, for error messages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax


def structure_diff(got: Any, want: Any) -> str | None:
    """Return both treedefs, ready for a message, if `got` and `want` differ."""
    got_def, want_def = jax.tree.structure(got), jax.tree.structure(want)
    if got_def == want_def:
        return None
    return f"  expected: {want_def}\n  got:      {got_def}"


def leaf_pairs(got: Any, want: Any) -> Iterator[tuple[str, Any, Any]]:
    """Yield `(path, got_leaf, want_leaf)` over two trees of the same structure."""
    for (path, want_leaf), got_leaf in zip(
        jax.tree_util.tree_flatten_with_path(want)[0],
        jax.tree.leaves(got),
        strict=True,
    ):
        yield jax.tree_util.keystr(path), got_leaf, want_leaf
