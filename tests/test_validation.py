"""The shared argument checks of `hf_models.validation`."""

import math
import re

import pytest

from hf_models.validation import check_count, is_int, is_number


def test_is_int():
    assert is_int(0) and is_int(-3) and is_int(10**20)
    for bad in (True, False, 1.0, "1", None):
        assert not is_int(bad), bad


def test_is_number():
    assert is_number(0) and is_number(-2) and is_number(0.5) and is_number(1e300)
    for bad in (math.nan, math.inf, -math.inf, True, "1.0", None):
        assert not is_number(bad), bad


def test_check_count_accepts_counts():
    for value in (1, 2, 10**12):
        check_count("n", value)
        check_count("n", value, optional=True)
    check_count("n", None, optional=True)


def test_check_count_refuses():
    for bad in (0, -1, True, False, 1.0, "2", None):
        with pytest.raises(ValueError, match=re.escape(f"num_steps={bad!r} is invalid: expected an int >= 1")) as info:
            check_count("num_steps", bad)
        assert "or None" not in str(info.value)
    for bad in (0, True, 1.0):
        message = f"top_k={bad!r} is invalid: expected an int >= 1 or None"
        with pytest.raises(ValueError, match=re.escape(message) + "$"):
            check_count("top_k", bad, optional=True)


def test_check_count_hint():
    with pytest.raises(ValueError, match=re.escape("rounds=0 is invalid: expected an int >= 1 (1: once)") + "$"):
        check_count("rounds", 0, hint=" (1: once)")
    with pytest.raises(ValueError, match=re.escape("k=-2 is invalid: expected an int >= 1 or None (off)") + "$"):
        check_count("k", -2, optional=True, hint=" (off)")
