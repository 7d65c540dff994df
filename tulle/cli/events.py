"""`tulle events`: follow the mesh's CloudEvents (stream TULLE_EVENTS, subjects
`tulle.events.<kind>.<type>`), new ones or replayed from a point in time."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import sys
from datetime import datetime, timedelta, timezone
from typing import Optional

import click

from tulle.cli.common import connect_bus, nats_option

from tulle.errors import UserError

FORMATS = ("text", "json", "wide")


def event_kind_type(subject: str) -> str:
    """`tulle.events.destination.endpoints-changed` -> `destination.endpoints-changed`."""
    from tulle.schemas import EVENTS_PREFIX

    return subject[len(EVENTS_PREFIX) + 1:] if subject.startswith(EVENTS_PREFIX + ".") else subject


def type_matches(pattern: Optional[str], kind_type: str) -> bool:
    """--type: `<kind>.<type>` with `*` wildcards (`destination.*`, `*.ready`); a pattern
    without a dot matches either part (`ready`, `identity`)."""
    if not pattern:
        return True
    if "." not in pattern:
        kind, _, type_ = kind_type.partition(".")
        return fnmatch.fnmatchcase(kind, pattern) or fnmatch.fnmatchcase(type_, pattern)
    return fnmatch.fnmatchcase(kind_type, pattern)


def parse_since(value: Optional[str]) -> Optional[timedelta]:
    if value is None:
        return None
    from tulle.resources.parse import _Invalid, parse_duration_ms

    try:
        ms = parse_duration_ms(value, "--since")
    except _Invalid:
        raise UserError(f"--since: expected a duration such as '30s', '10m' or '2h', got {value!r}") from None
    return timedelta(milliseconds=ms)


def _summary(data: dict) -> str:
    parts = []
    for k, v in data.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, separators=(",", ":"))
            if len(v) > 60:
                v = v[:57] + "..."
        parts.append(f"{k}={v}")
    return " ".join(parts)


def format_event(raw: bytes, kind_type: str, output: str) -> str:
    """One line per event: json is the payload exactly as published."""
    if output == "json":
        return raw.decode("utf-8", errors="replace")
    try:
        ev = json.loads(raw)
    except ValueError:
        return f"{kind_type}  (not JSON: {raw[:80]!r})"
    time_ = str(ev.get("time", ""))
    data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
    if output == "wide":
        return f"{time_}  {kind_type:<34} {ev.get('source', '')}  id={ev.get('id', '')}" + \
            (f"  subject={ev['subject']}" if ev.get("subject") else "") + f"  {json.dumps(data, separators=(',', ':'))}"
    short_time = time_[11:23] if len(time_) >= 23 else time_
    return f"{short_time}  {kind_type:<34} {_summary(data)}"


@click.command()
@click.option("--type", "type_", metavar="PATTERN",
              help="only events whose <kind>.<type> matches, with * wildcards: destination.*, *.ready")
@click.option("--since", metavar="DURATION", help="replay kept events from this long ago (e.g. 10m), then follow")
@click.option("--count", type=click.IntRange(min=1), help="exit after this many events")
@click.option("-o", "--output", type=click.Choice(FORMATS), default="text", show_default=True,
              help="json: each CloudEvent exactly as published, one per line")
@nats_option("url")
@click.option("--timeout", type=float, help="give up after this many seconds without the events asked for (exit 1)")
def events(type_, since, count, output, url, timeout):
    """Print the mesh's events as they happen: services ready, certificates issued, endpoints changed..."""
    window = parse_since(since)
    try:
        code = asyncio.run(_follow(url, type_, window, count, output, timeout, since))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


async def _follow(url: str, pattern: Optional[str], since: Optional[timedelta], count: Optional[int], output: str,
                  timeout: Optional[float], since_text: Optional[str] = None) -> int:
    import nats.errors
    import nats.js.errors
    from nats.js import api as jsapi

    from tulle.cli.common import connect_bus
    from tulle.log import setup_logging
    from tulle.schemas import EVENTS_PREFIX, EVENTS_STREAM

    setup_logging("cli", level="error")  # stdout carries the events only
    bus = await connect_bus(url, what="events")
    sub = None
    try:
        # The control plane makes the stream when it starts; a reader cannot (it writes nothing).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        waited = False
        while True:
            try:
                await bus.js.stream_info(EVENTS_STREAM)
                break
            except nats.js.errors.NotFoundError:
                if not waited:
                    print(f"waiting for the event stream {EVENTS_STREAM} (made when the control plane starts)",
                          file=sys.stderr, flush=True)
                    waited = True
                if deadline is not None and loop.time() >= deadline:
                    print(f"tulle: no matching events within {timeout:g} s", file=sys.stderr)
                    return 1
                await asyncio.sleep(0.5)
        if since is not None:
            config = jsapi.ConsumerConfig(deliver_policy=jsapi.DeliverPolicy.BY_START_TIME,
                                          opt_start_time=datetime.now(timezone.utc) - since)
        elif waited:
            # The stream appeared after the command started: everything in it is new to us.
            config = jsapi.ConsumerConfig(deliver_policy=jsapi.DeliverPolicy.ALL)
        else:
            config = jsapi.ConsumerConfig(deliver_policy=jsapi.DeliverPolicy.NEW)
        sub = await bus.js.subscribe(f"{EVENTS_PREFIX}.>", stream=EVENTS_STREAM, ordered_consumer=True, config=config)
        # On stderr, so stdout stays events only; tells a script (and a person) we are listening.
        print(f"following {EVENTS_PREFIX}.> on {url}" + (f" from {since_text or since} ago" if since else ""),
              file=sys.stderr, flush=True)
        seen = 0
        out = sys.stdout
        while count is None or seen < count:
            wait = None if deadline is None else deadline - loop.time()
            if wait is not None and wait <= 0:
                print(f"tulle: no{' more' if seen else ''} matching events within {timeout:g} s", file=sys.stderr)
                return 1
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                continue
            kind_type = event_kind_type(msg.subject)
            if not type_matches(pattern, kind_type):
                continue
            out.write(format_event(msg.data, kind_type, output) + "\n")
            out.flush()
            seen += 1
        return 0
    finally:
        if sub is not None:
            try:
                await sub.unsubscribe()  # drop undelivered messages; closing then has nothing to drain
            except nats.errors.Error:
                pass
        await bus.close()
