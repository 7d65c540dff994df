"""`tulle events`: CloudEvents from the TULLE_EVENTS stream, printed for people and scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bus_support import cli_bus_args, server_for
from tulle.cli.events import event_kind_type, format_event, parse_since, type_matches
from tulle.errors import UserError
from tulle.natsserver import free_port

TULLE = str(Path(sys.executable).parent / "tulle")
CLOUDEVENT_FIELDS = {"specversion", "id", "source", "type", "time", "data"}


# --- pure pieces ------------------------------------------------------------------------


def test_type_patterns_match_kind_and_type_with_wildcards():
    assert type_matches("destination.*", "destination.endpoints-changed")
    assert type_matches("*.ready", "identity.ready") and not type_matches("*.ready", "identity.certificate-issued")
    assert type_matches("ready", "policy.ready") and type_matches("identity", "identity.issuer-reloaded")
    assert type_matches(None, "anything.at-all")
    assert not type_matches("destination.*", "policy.ready")


def test_the_kind_and_type_come_from_the_subject():
    assert event_kind_type("tulle.events.proxy.ready") == "proxy.ready"


def test_since_takes_durations_and_rejects_anything_else_as_a_user_error():
    assert parse_since("10m").total_seconds() == 600 and parse_since(None) is None
    with pytest.raises(UserError, match="--since"):
        parse_since("yesterday")


def test_json_output_is_the_event_exactly_as_published_and_text_is_one_line():
    raw = b'{"specversion":"1.0","id":"1","source":"/tulle/policy/x","type":"dev.tulle.policy.ready",' \
          b'"time":"2026-01-02T03:04:05.678Z","data":{"admin":"127.0.0.1:1","nested":{"a":[1,2]}}}'
    assert format_event(raw, "policy.ready", "json") == raw.decode()
    text = format_event(raw, "policy.ready", "text")
    assert "\n" not in text and text.startswith("03:04:05.678") and "policy.ready" in text and "admin=127.0.0.1:1" in text
    wide = format_event(raw, "policy.ready", "wide")
    assert "/tulle/policy/x" in wide and "id=1" in wide


# --- against a real NATS, with a real service -------------------------------------------------------


def _start_service(nats_url: str, log: Path) -> subprocess.Popen:
    admin = f"127.0.0.1:{free_port()}"
    return subprocess.Popen([sys.executable, "-m", "services.injector", "--nats", nats_url, "--admin", admin,
                             "--nats-creds", str(server_for(nats_url).seed_file("injector"))],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def test_events_prints_a_cloudevent_when_a_service_becomes_ready(nats_server, tmp_path):
    follower = subprocess.Popen([TULLE, "events", "-o", "json", "--count", "1", "--type", "injector.ready",
                                 *cli_bus_args(nats_server.url), "--timeout", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # It says on stderr when it listens (or, before any service made the stream, that it
        # waits for it: then it reads the stream from its start); only then may the service start.
        first = follower.stderr.readline()
        assert first.startswith((b"following tulle.events.>", b"waiting for the event stream TULLE_EVENTS")), first
        service = _start_service(nats_server.url, tmp_path / "injector.log")
        try:
            out, err = follower.communicate(timeout=60)
        finally:
            service.terminate()
            service.wait(10)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert CLOUDEVENT_FIELDS <= set(event)
    assert event["specversion"] == "1.0" and event["type"] == "dev.tulle.injector.ready"
    assert event["source"].startswith("/tulle/injector/") and event["data"]["pid"] == service.pid

    # The stream kept it: --since replays it to a reader that came later.
    replay = subprocess.run([TULLE, "events", "-o", "json", "--count", "1", "--type", "injector.ready",
                             "--since", "5m", *cli_bus_args(nats_server.url), "--timeout", "30"],
                            capture_output=True, timeout=60)
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout.decode().splitlines()[0])["type"] == "dev.tulle.injector.ready"


def test_events_gives_up_with_exit_1_when_nothing_matches_in_time(nats_server):
    proc = subprocess.run([TULLE, "events", "--type", "nothing.ever", *cli_bus_args(nats_server.url), "--timeout", "0.5"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == b""
    assert proc.stderr.decode().strip().splitlines()[-1] == "tulle: no matching events within 0.5 s"


def test_a_bad_since_is_one_line_and_exit_2():
    proc = subprocess.run([TULLE, "events", "--since", "a-while", "--nats", "nats://127.0.0.1:1"],
                          capture_output=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "--since" in lines[0] and "Traceback" not in proc.stderr.decode()
