"""How `tulle logs` shows a line, and how it reads and follows a log file (real files,
the polling follower in a thread)."""

from __future__ import annotations

import datetime as dt
import json
import queue
import threading

from tulle.logs.local import file_lines
from tulle.logs.select import Window, name_matches
from tulle.logs.view import line_time, prefix, readable

LINE = json.dumps({"subject": "tulle.identity.v1.certify", "queue": "identity", "event": "answering certify requests",
                   "component": "identity", "level": "info", "timestamp": "2026-01-02T03:04:05.678901Z"})


def test_a_structlog_line_reads_as_time_level_event_and_its_fields():
    assert readable(LINE, colour=False) == \
        "2026-01-02T03:04:05.678 info    answering certify requests  subject=tulle.identity.v1.certify queue=identity"


def test_values_with_spaces_or_structure_are_quoted_as_json():
    line = json.dumps({"event": "not ready", "level": "warning", "waiting_for": ["nats", "issuer"],
                       "why": "no route to host", "timestamp": "2026-01-02T03:04:05Z"})
    assert readable(line, colour=False) == \
        '2026-01-02T03:04:05Z warning not ready  waiting_for=["nats","issuer"] why="no route to host"'


def test_an_exception_is_shown_frame_by_frame_under_its_line():
    line = json.dumps({"event": "supervisor failed", "level": "error", "timestamp": "2026-01-02T03:04:05Z",
                       "exception": [{"exc_type": "OSError", "exc_value": "no space left",
                                      "frames": [{"filename": "runner.py", "lineno": 42, "name": "save"}]}]})
    assert readable(line, colour=False).splitlines() == [
        "2026-01-02T03:04:05Z error   supervisor failed", "    at runner.py:42 in save", "    OSError: no space left"]


def test_other_lines_are_shown_as_they_are():
    for line in ("[16477] 2026/12/06 00:41:49.009265 [INF] Starting nats-server", "GET / 200", "{not json",
                 '{"no": "event field"}'):
        assert readable(line, colour=False) == line


def test_colour_is_ansi_and_prefixes_take_a_colour_each():
    assert "\x1b[" in readable(LINE, colour=True)
    assert prefix("pod/web-1/web", 0, colour=False) == "[pod/web-1/web] "
    assert prefix("a", 0, colour=True) != prefix("a", 1, colour=True)


def test_the_time_of_a_line_from_its_timestamp_or_the_runners_marker():
    assert line_time(LINE) == dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)
    marker = line_time("--- 2026-01-02T03:04:05 starting identity: python -m services.identity")
    assert marker == dt.datetime(2026, 1, 2, 3, 4, 5).astimezone()  # the runner writes local time
    assert line_time("GET / 200") is None


def test_a_workload_name_matches_its_pods():
    assert name_matches("web-7d9f8-x2x9k", "web") and name_matches("web", "web") and name_matches("nats-0", "nats")
    assert not name_matches("webhook-1", "web")


def test_tail_reads_the_last_lines_of_a_long_file(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(50000)) + "half a li")
    lines = list(file_lines(log, Window(tail=3), threading.Event()))
    assert lines == ["line 49997", "line 49998", "line 49999"]
    assert list(file_lines(log, Window(tail=0), threading.Event())) == []


def test_since_keeps_recent_lines_and_lines_without_a_time_go_with_the_one_before(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)

    def stamped(event, ago):
        return json.dumps({"event": event, "timestamp": (now - ago).isoformat().replace("+00:00", "Z")})

    log = tmp_path / "x.log"
    log.write_text("\n".join(["printed before anything", stamped("old", dt.timedelta(hours=2)), "printed then",
                              stamped("new", dt.timedelta(minutes=1)), "printed now"]) + "\n")
    lines = list(file_lines(log, Window(since=dt.timedelta(minutes=10)), threading.Event()))
    assert lines == ["printed before anything", stamped("new", dt.timedelta(minutes=1)), "printed now"]


def test_follow_yields_each_line_once_complete_and_survives_truncation(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("old\n")
    stop, got = threading.Event(), queue.Queue()

    def follow():
        for line in file_lines(log, Window(tail=1, follow=True), stop, poll=0.01):
            got.put(line)

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        assert got.get(timeout=10) == "old"
        with open(log, "a") as f:
            f.write("new, in two wri")
            f.flush()
            f.write("tes\n")
        assert got.get(timeout=10) == "new, in two writes"
        log.write_text("after truncation\n")  # a new run starts the file over
        assert got.get(timeout=10) == "after truncation"
    finally:
        stop.set()
        reader.join(10)
    assert got.empty() and not reader.is_alive()
