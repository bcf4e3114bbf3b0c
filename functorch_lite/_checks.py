"""Private argument checks shared by the public functions' boundaries."""

from __future__ import annotations

from typing import Any, Literal, overload

import numpy as np


@overload
def check_int(
    value: Any,
    *,
    where: str,
    name: str,
    minimum: int,
    allow_none: Literal[False] = False,
    context: str = "",
    fix: str = "",
) -> int: ...


@overload
def check_int(
    value: Any,
    *,
    where: str,
    name: str,
    minimum: int,
    allow_none: bool,
    context: str = "",
    fix: str = "",
) -> int | None: ...


def check_int(
    value: Any,
    *,
    where: str,
    name: str,
    minimum: int,
    allow_none: bool = False,
    context: str = "",
    fix: str = "",
) -> int | None:
    """Return `value` as an int, or raise `TypeError` or `ValueError`.

    `TypeError` for a value that is not an int (a bool is not), `ValueError`
    for one below `minimum`. The message names the function (`where`), the
    argument (`name`), what was expected and what was given; `context` follows
    the expectation, `fix` ends it.
    """
    if value is None and allow_none:
        return None
    if minimum == 0:
        expected = "a non-negative int"
    elif minimum == 1:
        expected = "a positive int"
    else:
        expected = f"an int >= {minimum}"
    expected += " or None" if allow_none else ""
    expected += context
    fix = f" {fix}" if fix else ""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"{where}: `{name}` must be {expected}; got {type(value).__name__} "
            f"{value!r}.{fix}"
        )
    if value < minimum:
        raise ValueError(f"{where}: `{name}` must be {expected}; got {value!r}.{fix}")
    return int(value)


def check_bool(value: Any, *, where: str, name: str) -> bool:
    """Return `value`, or raise `TypeError` if it is not a bool (truthy is not)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(
            f"{where}: `{name}` must be a bool; got {type(value).__name__} {value!r}."
        )
    return bool(value)
