"""How a log line is shown: unchanged when piped (so `| jq` works), readable on a terminal.

Tulle's processes log structlog JSON lines (tulle/log.py):

    {"subject": "tulle.identity.v1.certify", "event": "answering certify requests",
     "component": "identity", "level": "info", "timestamp": "2026-01-02T03:04:05.678901Z"}

and on a terminal that becomes

    2026-01-02T03:04:05.678 info    answering certify requests  subject=tulle.identity.v1.certify

Anything else (nats-server's own lines, an app's prints, the runner's `--- ... starting`
markers) is shown as it is.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Optional

import click

# One colour per stream, in order; enough to tell a handful of pods apart.
PALETTE = ("cyan", "magenta", "yellow", "green", "blue", "bright_cyan", "bright_magenta", "bright_yellow",
           "bright_green", "bright_blue")
LEVEL_COLOURS = {"critical": "red", "error": "red", "exception": "red", "warning": "yellow", "warn": "yellow",
                 "info": "green", "debug": "bright_black"}
# Shown in their own place, or said by the prefix already.
_SHOWN_APART = ("timestamp", "level", "event", "component", "exception")

RUNNER_MARKER = "--- "  # tulle/local/procs.py: the line written before each (re)start


def parse_json_line(line: str) -> Optional[dict[str, Any]]:
    """The fields of a structlog JSON line, or None for any other line."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "event" in doc else None


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v if v and not any(c.isspace() for c in v) and '"' not in v else json.dumps(v, ensure_ascii=False)
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def _exception_lines(exc: Any) -> list[str]:
    """structlog's dict_tracebacks: [{exc_type, exc_value, frames: [{filename, lineno, name}]}]."""
    out = []
    if isinstance(exc, list) and all(isinstance(e, dict) for e in exc):
        for e in exc:
            for fr in e.get("frames") or []:
                if isinstance(fr, dict):
                    out.append(f"    at {fr.get('filename', '?')}:{fr.get('lineno', '?')} in {fr.get('name', '?')}")
            out.append(f"    {e.get('exc_type', 'Exception')}: {e.get('exc_value', '')}")
        return out
    text = exc if isinstance(exc, str) else json.dumps(exc)
    return ["    " + ln for ln in text.splitlines()]


def readable(line: str, colour: bool) -> str:
    """A line for a person: JSON lines as time, level, event and key=value; others as they are."""
    doc = parse_json_line(line)
    if doc is None:
        if colour and line.startswith(RUNNER_MARKER):
            return click.style(line, dim=True)
        return line
    level = str(doc.get("level", "")).lower()
    stamp = str(doc.get("timestamp", ""))[:23]
    fields = " ".join(f"{k}={_value(v)}" for k, v in doc.items() if k not in _SHOWN_APART)
    event = str(doc.get("event", ""))
    if colour:
        level_text = click.style(f"{level:<7}", fg=LEVEL_COLOURS.get(level), bold=level in ("error", "critical"))
        text = f"{click.style(stamp, dim=True)} {level_text} {click.style(event, bold=True)}"
        fields = click.style(fields, fg="bright_black") if fields else ""
    else:
        text = f"{stamp} {level:<7} {event}"
    out = f"{text}  {fields}" if fields else text
    if "exception" in doc:
        out += "\n" + "\n".join(_exception_lines(doc["exception"]))
    return out


def prefix(label: str, index: int, colour: bool) -> str:
    text = f"[{label}]"
    return click.style(text, fg=PALETTE[index % len(PALETTE)]) + " " if colour else text + " "


def line_time(line: str) -> Optional[dt.datetime]:
    """When a line was written, if it says: a JSON line's `timestamp` (UTC), or the local
    time of the runner's `--- <time> starting` marker."""
    doc = parse_json_line(line)
    if doc is not None:
        return _parse_time(str(doc.get("timestamp", "")), utc=True)
    if line.startswith(RUNNER_MARKER):
        return _parse_time(line[len(RUNNER_MARKER):].split(" ", 1)[0], utc=False)
    return None


def _parse_time(text: str, *, utc: bool) -> Optional[dt.datetime]:
    if not text:
        return None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc) if utc else t.astimezone()  # naive local time -> aware
    return t
