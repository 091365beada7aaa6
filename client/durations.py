"""Client-side argument parsing: durations in the units the public API accepts."""

from __future__ import annotations

import datetime

from client.errors import InvalidArgumentError
from config.durations import parse_duration

Duration = str | int | float | datetime.timedelta


def duration_ms(value: Duration | None, *, name: str, default_ms: int = 0) -> int:
    """Milliseconds of a duration argument ("250ms", "1s", "5m", seconds, timedelta); None = default."""
    if value is None:
        return default_ms
    try:
        return round(parse_duration(value, name=name) * 1000)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
