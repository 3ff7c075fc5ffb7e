"""Checks of numeric values given by users: command-line options (as argparse ``type=``) and
method hyper-parameters (``--hp KEY=VALUE``, sweep files). One check per rule, so a bad value is
refused up front with one line ("argument --iterations: must be a positive integer, got 0")
instead of a traceback from deep inside training.

Every check takes a string (the command line) or an already parsed value (JSON) and returns the
value; numbers that already are numbers keep their type (``alpha=16`` stays an int), so a
checked hyper-parameter is recorded exactly as given."""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable, List


class OptionError(argparse.ArgumentTypeError, ValueError):
    """argparse shows its message after the option's name; elsewhere it is a ValueError, which
    ``bench`` prints as a one-line error."""


def _as_int(value: Any) -> int:
    if isinstance(value, bool):  # True is an int to Python, not to a user
        raise TypeError
    if isinstance(value, str):
        return int(value.strip())
    if isinstance(value, int):
        return value
    raise TypeError


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, str):
        return float(value.strip())
    if isinstance(value, (int, float)):
        return value
    raise TypeError


def _check(name: str, cast: Callable[[Any], Any], ok: Callable[[Any], bool], rule: str, bad: str) -> Callable:
    """A check called ``name``; ``rule`` completes "must be ..."; ``bad`` is a value it refuses
    (the tests feed it to every option that uses the check)."""
    def check(value):
        try:
            parsed = cast(value)
            valid = ok(parsed)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise OptionError(f"must be {rule}, got {value}")
        return parsed
    check.__name__ = check.__qualname__ = name
    check.rule, check.bad = rule, bad
    return check


def _finite(v) -> bool:
    return math.isfinite(v)


positive_int = _check("positive_int", _as_int, lambda v: v >= 1, "a positive integer", "0")
nonneg_int = _check("nonneg_int", _as_int, lambda v: v >= 0, "an integer >= 0", "-1")
positive_float = _check("positive_float", _as_float, lambda v: _finite(v) and v > 0, "a number > 0", "0")
nonneg_float = _check("nonneg_float", _as_float, lambda v: _finite(v) and v >= 0, "a number >= 0", "-0.001")
fraction = _check("fraction", _as_float, lambda v: 0 <= v < 1, "a number in [0, 1)", "1")
port = _check("port", _as_int, lambda v: 0 < v < 65536, "a port number in 1..65535", "70000")
seed = _check("seed", _as_int, lambda v: 0 <= v < 2**32, "an integer in 0..2^32-1 (numpy's seed range)", "-1")


def at_least(n: int) -> Callable:
    return _check(f"int_at_least_{n}", _as_int, lambda v: v >= n, f"an integer >= {n}", str(n - 1))


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise TypeError


boolean = _check("boolean", _as_bool, lambda v: True, "true or false", "maybe")


def comma_list(item: Callable) -> Callable:
    """A comma-separated list of values each passing ``item`` (at least one), e.g. ``--shots 1,3,5``."""
    def check(value) -> List:
        parts = value if isinstance(value, (list, tuple)) else [t for t in str(value).replace(" ", "").split(",") if t]
        try:
            if not parts:
                raise OptionError("")
            return [item(p) for p in parts]
        except OptionError:
            raise OptionError(f"must be {check.rule}, got {value}") from None
    check.__name__ = check.__qualname__ = f"comma_list_of_{item.__name__}"
    check.rule, check.bad = f"comma-separated values, each {item.rule}", f"1,{item.bad}"
    return check


def check_for_default(default: Any) -> Callable:
    """The check a hyper-parameter's default implies: its type, and no negative numbers (every
    numeric hyper-parameter of the suite is a count, a rate or a weight). Methods name stricter
    checks in ``Method.hp_checks``; non-numeric defaults (e.g. ``target="all"``) are the method's."""
    if isinstance(default, bool):
        return boolean
    if isinstance(default, int):
        return nonneg_int
    if isinstance(default, float):
        return nonneg_float
    return lambda value: value
