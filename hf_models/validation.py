"""Argument checks shared across hf_models: ints, finite numbers and counts (ints >= 1).

The configuration and modeling files of a model family do not import this module: `register_for_auto_class` ships
them as remote code, which may only import torch, transformers and its own folder, so they keep private copies.
"""

import math


def is_int(value) -> bool:
    """Whether `value` is an int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """Whether `value` is a finite int or float (a bool is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_count(name: str, value, *, optional: bool = False, hint: str = "") -> None:
    """Refuse `value` unless it is an int >= 1 (a bool is not a count), or `None` when `optional`; `hint` is appended
    to the error message."""
    if optional and value is None:
        return
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1{' or None' if optional else ''}{hint}")
