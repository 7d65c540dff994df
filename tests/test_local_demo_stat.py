"""`tulle stat` and `tulle edges` on the bundled demo in local mode (loopback addresses, no
root): the real `tulle up`, services, proxies and demo apps, and the real `tulle` console
script reading the figures the proxies gather. The demo's traffic app logs one JSON line
per request it made; the figures must agree with that count."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.local_support import TULLE, proxy_logs, read_record, tulle

WINDOW = "10m"  # the whole run: every request since the proxies started is in it


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    state = tmp_path_factory.mktemp("demo-stat") / "state"
    up = tulle("up", "--detach", "--isolation", "none", "--timeout", "120", state=state, timeout=180)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        yield state
    finally:
        tulle("down", state=state, timeout=60)


def traffic_log(state: Path) -> Path:
    return Path(next(w["app"]["log"] for w in read_record(state)["workloads"] if w["name"] == "traffic"))


def requests_logged(state: Path) -> list[dict]:
    """The traffic generator's own account: one line per request it made (and its status)."""
    out = []
    for line in traffic_log(state).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if "path" in entry and "status" in entry:
                out.append(entry)
    return out


def stat_json(state: Path, *args: str) -> dict[str, dict]:
    proc = tulle("stat", *args, "-o", "json", state=state, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


def test_stat_counts_the_requests_the_traffic_generator_made(demo):
    wait_until(lambda: len(requests_logged(demo)) >= 50, timeout=120, interval=0.5,
               what="50 requests logged by the demo's traffic app")
    before = len(requests_logged(demo))
    sent = stat_json(demo, "deploy/traffic", "-n", "demo", "--to", "svc/web", "-t", WINDOW)["traffic"]
    received = stat_json(demo, "deploy/web", "-n", "demo", "--from", "deploy/traffic", "-t", WINDOW)["web"]
    logged = requests_logged(demo)
    after = len(logged)
    # The generator calls one request at a time and logs it once answered: its proxy has
    # counted every request logged before the command ran, and at most the one in flight more.
    answered = sent["successes"] + sent["failures"]
    assert before <= answered <= after + 1, (before, sent, after, proxy_logs(demo))
    # Not 5xx to the generator = success to its proxy.
    assert sent["successes"] >= sum(1 for e in logged[:before] if 0 < e["status"] < 500)
    # web's proxy saw the same calls, but for those traffic's proxy answered itself at start-up
    # (503 while web had no endpoint yet).
    unanswered_at_start = sum(1 for e in logged if e["status"] == 503)
    got = received["successes"] + received["failures"]
    assert before - unanswered_at_start <= got <= after + 1, (before, received, after)
    assert sent["meshed"] == received["meshed"] == "1/1"


def test_stat_lists_the_demos_workloads_in_linkerds_columns(demo):
    wait_until(lambda: stat_json(demo, "-n", "demo").get("web", {}).get("rps"), timeout=60, interval=0.5,
               what="web's figures")
    proc = tulle("stat", "-n", "demo", state=demo, timeout=60)
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.splitlines()
    assert header.split() == ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99",
                              "TCP_CONN"]
    rows = {line.split()[0]: line.split() for line in lines}
    assert sorted(rows) == ["authors", "books", "books-2", "traffic", "web"]
    wait_until(lambda: stat_json(demo, "-n", "demo").get("books", {}).get("rps"), timeout=60, interval=0.5,
               what="books's figures")
    rows = {line.split()[0]: line.split() for line in tulle("stat", "-n", "demo", state=demo, timeout=60)
            .stdout.splitlines()[1:]}
    # web speaks HTTP/1; books gRPC, parsed per call since issue 13: both have HTTP figures
    for name in ("web", "books"):
        row = rows[name]
        assert row[1] == "1/1"
        assert re.fullmatch(r"\d+\.\d\d%", row[2]) and re.fullmatch(r"\d+\.\drps", row[3]), row
        assert all(re.fullmatch(r"\d+ms", cell) for cell in row[4:7]) and row[7].isdigit(), row
    wide = tulle("stat", "-n", "demo", "-o", "wide", state=demo, timeout=60)
    assert wide.stdout.splitlines()[0].split()[-2:] == ["READ_BYTES/SEC", "WRITE_BYTES/SEC"]
    books = next(line.split() for line in wide.stdout.splitlines() if line.startswith("books "))
    assert all(re.fullmatch(r"\d+\.\dB/s", cell) for cell in books[-2:])


def test_edges_show_traffic_to_web_to_books_and_authors_secured(demo):
    def edges() -> list[dict]:
        proc = tulle("edges", "-n", "demo", "-o", "json", state=demo, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    # web's calls to books spread over its two replicas (books and books-2)
    wait_until(lambda: len(edges()) >= 4, timeout=60, interval=0.5, what="the demo's four edges")
    got = {(e["src"], e["dst"]): e for e in edges()}
    assert set(got) == {("traffic", "web"), ("web", "books"), ("web", "books-2"), ("web", "authors")}
    assert all(e["secured"] and e["no_tls_reason"] == "" for e in got.values())
    assert (got[("web", "authors")]["client_id"], got[("web", "authors")]["server_id"]) == ("web.demo",
                                                                                            "authors.demo")
    table = tulle("edges", "-n", "demo", "-o", "wide", state=demo, timeout=60)
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["SRC", "DST", "SRC_NS", "DST_NS", "CLIENT_ID", "SERVER_ID", "SECURED"]
    assert sorted(line.split() for line in lines) == [
        ["traffic", "web", "demo", "demo", "traffic.demo", "web.demo", "√"],
        ["web", "authors", "demo", "demo", "web.demo", "authors.demo", "√"],
        ["web", "books", "demo", "demo", "web.demo", "books.demo", "√"],
        ["web", "books-2", "demo", "demo", "web.demo", "books.demo", "√"],  # one service account
    ]


def test_watch_refreshes_the_table_until_interrupted(demo):
    env = dict(os.environ, TULLE_STATE_DIR=str(demo))
    env.pop("TULLE_NATS_URL", None)
    proc = subprocess.Popen([TULLE, "stat", "-n", "demo", "-w", "--interval", "0.5s"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        tables = 0
        for line in proc.stdout:  # piped: one table per refresh
            if line.startswith("NAME "):
                tables += 1
                if tables == 2:
                    break
        assert tables == 2, proc.stderr.read() if proc.poll() is not None else "stdout closed"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0  # Ctrl-C is how a watch ends
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
