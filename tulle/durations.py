"""Durations as people write them — Go's form ('300ms', '1m30s', '10s') — for manifests,
flags and the proxy's environment alike. Pure.

`parse_ms` is the one parser; `seconds` is the flavour for configuration values, which
also accept a bare number of seconds and fail as one `UserError` line naming the setting.
"""

from __future__ import annotations

import re
from typing import Any

from tulle.errors import UserError

_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1, "s": 1000, "m": 60000, "h": 3600000}


def parse_ms(value: Any) -> int:
    """A Go duration string in whole milliseconds; ValueError when it is not one."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a duration such as '300ms' or '10s', got {value!r}")
    pos, total = 0, 0.0
    for match in _PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _MS[match.group(2)]
        pos = match.end()
    if pos != len(value):
        raise ValueError(f"expected a duration such as '300ms' or '10s', got {value!r}")
    return int(round(total))


def seconds(value: str, name: str) -> float:
    """A configuration value in seconds: '2.5' or a duration ('10s', '500ms'). `name` (the
    variable or flag) goes into the one-line error."""
    try:
        return float(value) if value.replace(".", "", 1).isdigit() else parse_ms(value) / 1000
    except ValueError:
        raise UserError(f"{name}: expected seconds or a duration such as '10s', got {value!r}") from None


def bounded_seconds(value: str, flag: str, lo: float, hi: float, command: str) -> float:
    """A command's duration flag (`-t 1m`, `--timeout 5s`) in seconds, within [lo, hi]; a
    bad one is one UserError line naming the command and the flag."""
    try:
        seconds = parse_ms(value) / 1000.0
    except ValueError:
        raise UserError(f"{command}: {flag} {value!r}: expected a duration such as 30s, 1m or 10m") from None
    if not lo <= seconds <= hi:
        raise UserError(f"{command}: {flag} {value!r}: must be from {short(lo)} to {short(hi)}")
    return seconds


def short(seconds: float) -> str:
    """A duration as a person writes it back: '10m', '30s', '0.5s'."""
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"
