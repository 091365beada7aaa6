"""Durations and sizes as people write them in config files: ``"250ms"``, ``"10m"``, ``"16MiB"``.

Parsing goes through ``Decimal`` so that ``"100ms"`` becomes exactly the float ``0.1`` and
``format_duration`` can always write a value back in a form that parses to the same float.
"""

from __future__ import annotations

import datetime
import math
import re
from decimal import Decimal, InvalidOperation

__all__ = ["format_duration", "format_size", "parse_duration", "parse_size"]

# Seconds per unit, largest first: format_duration picks the first unit that is exact.
_DURATION_UNITS: dict[str, Decimal] = {
    "d": Decimal(86400),
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
}

# Bytes per unit; binary units first so that format_size prefers "16MiB" over "16777216B".
_SIZE_UNITS: dict[str, int] = {
    "GiB": 1024**3,
    "MiB": 1024**2,
    "KiB": 1024,
    "GB": 1000**3,
    "MB": 1000**2,
    "KB": 1000,
    "B": 1,
}

# A non-negative decimal number (no sign, no exponent), optional spaces, then an optional unit.
_QUANTITY = re.compile(r"\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[A-Za-z]*)\s*")

_DURATION_HELP = (
    "expected a non-negative number of seconds or a number with a unit: "
    "ms, s, m, h, d (e.g. '250ms', '1.5s', '10m')"
)
_SIZE_HELP = (
    "expected a non-negative whole number of bytes or a number with a unit: "
    "B, KiB, MiB, GiB, KB, MB, GB (e.g. '512', '64KiB', '16MiB')"
)


def _split_quantity(text: str) -> tuple[Decimal, str] | None:
    """Split ``"1.5 s"`` into ``(Decimal("1.5"), "s")``, or return None if it is not a quantity."""
    match = _QUANTITY.fullmatch(text)
    if match is None:
        return None
    try:
        return Decimal(match["number"]), match["unit"]
    except InvalidOperation:  # pragma: no cover - the pattern only admits valid decimals
        return None


def _lookup_unit(unit: str, table: dict[str, Decimal] | dict[str, int]) -> str | None:
    """Find ``unit`` in ``table`` ignoring case (every unit there differs by more than case)."""
    for known in table:
        if known.lower() == unit.lower():
            return known
    return None


def parse_duration(value: str | int | float | datetime.timedelta, *, name: str = "duration") -> float:
    """Return ``value`` in seconds; accepts seconds as a number, a timedelta or strings like ``"250ms"``.

    Args:
        value: A non-negative number of seconds, a ``timedelta``, or a string made of a number and
            an optional unit (``ms``, ``s``, ``m``, ``h``, ``d``); a bare number means seconds.
        name: What the value is, used in the error message (e.g. ``"session_timeout"``).

    Returns:
        The duration in seconds.

    Raises:
        ValueError: If the value is negative, not finite, of an unknown unit or of the wrong type.
    """
    problem = f"invalid {name} {value!r}: {_DURATION_HELP}"
    if isinstance(value, bool):
        raise ValueError(problem)
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        quantity = _split_quantity(value)
        if quantity is None:
            raise ValueError(problem)
        number, unit = quantity
        known = _lookup_unit(unit or "s", _DURATION_UNITS)
        if known is None:
            raise ValueError(f"invalid {name} {value!r}: unknown unit {unit!r}; {_DURATION_HELP}")
        seconds = float(number * _DURATION_UNITS[known])
    else:
        raise ValueError(problem)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid {name} {value!r}: must be finite and not negative; {_DURATION_HELP}")
    return seconds


def format_duration(seconds: float) -> str:
    """Write ``seconds`` in the largest exact unit, e.g. ``600.0 -> "10m"``, ``0.25 -> "250ms"``."""
    exact = Decimal(repr(float(seconds)))
    if exact == 0:
        return "0s"
    for unit, per_unit in _DURATION_UNITS.items():
        count = exact / per_unit
        if count == count.to_integral_value():
            return f"{int(count)}{unit}"
    # Not a whole number of milliseconds: plain decimal seconds, which parse back to the same float.
    return f"{exact:f}s"


def parse_size(value: str | int, *, name: str = "size") -> int:
    """Return ``value`` in bytes; accepts whole numbers of bytes and strings like ``"64KiB"``.

    Args:
        value: A non-negative ``int`` of bytes, or a string made of a number and an optional unit
            (``B``, ``KiB``, ``MiB``, ``GiB`` in 1024s; ``KB``, ``MB``, ``GB`` in 1000s).
        name: What the value is, used in the error message (e.g. ``"max_message_bytes"``).

    Returns:
        The size in bytes.

    Raises:
        ValueError: If the value is negative, not a whole number of bytes, of an unknown unit or of
            the wrong type.
    """
    problem = f"invalid {name} {value!r}: {_SIZE_HELP}"
    if isinstance(value, bool):
        raise ValueError(problem)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        quantity = _split_quantity(value)
        if quantity is None:
            raise ValueError(problem)
        number, unit = quantity
        known = _lookup_unit(unit or "B", _SIZE_UNITS)
        if known is None:
            raise ValueError(f"invalid {name} {value!r}: unknown unit {unit!r}; {_SIZE_HELP}")
        exact = number * _SIZE_UNITS[known]
        if exact != exact.to_integral_value():
            raise ValueError(f"invalid {name} {value!r}: not a whole number of bytes; {_SIZE_HELP}")
        size = int(exact)
    else:
        raise ValueError(problem)
    if size < 0:
        raise ValueError(f"invalid {name} {value!r}: must not be negative; {_SIZE_HELP}")
    return size


def format_size(size_bytes: int) -> str:
    """Write ``size_bytes`` in the largest exact unit, e.g. ``16777216 -> "16MiB"``."""
    for unit, per_unit in _SIZE_UNITS.items():
        if size_bytes >= per_unit and size_bytes % per_unit == 0:
            return f"{size_bytes // per_unit}{unit}"
    return f"{size_bytes}B"
