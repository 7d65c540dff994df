"""The bundled demo, meshed, in network namespaces (root): `tulle up` with no folder runs
examples/demo, every app behind its proxy, iptables redirecting like proxy-init — and the
demo's calls flow through both proxies with mTLS, with no change to the demo's code."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import requires_netns, wait_until
from tests.local_support import read_record, recorded_pids, status_json, tulle
from tulle.local.state import process_alive
from tulle.metrics import parse_text

pytestmark = [requires_netns, pytest.mark.root]

WEB_ID = "web.demo.serviceaccount.identity.tulle.cluster.local"
AUTHORS_ID = "authors.demo.serviceaccount.identity.tulle.cluster.local"


def in_netns(netns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def curl_json(netns: str, url: str, *headers: str) -> dict:
    args = [a for h in headers for a in ("-H", h)]
    return json.loads(in_netns(netns, "curl", "-sS", "-m", "10", *args, url))


def metrics(admin: str) -> dict:
    text = subprocess.run(["curl", "-sS", "-m", "5", f"http://{admin}/metrics"], capture_output=True, text=True,
                          timeout=30).stdout
    return parse_text(text)


def matching(samples: dict, name: str, **labels: str) -> float:
    """Sum of `name` over every sample carrying these labels (others free)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    state = tmp_path_factory.mktemp("demo-meshed") / "state"
    up = tulle("up", "--detach", "--isolation", "netns", "--timeout", "150", state=state, timeout=200)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        record = read_record(state)
        yield {"state": state, "netns": {w["name"]: w["netns"] for w in record["workloads"]},
               "admin": {w["name"]: w["proxy"]["admin"] for w in record["workloads"]},
               "address": {w["name"]: w["address"] for w in record["workloads"]}}
    finally:
        tulle("down", state=state)


def test_the_bundled_demo_comes_up_meshed_with_every_proxy_ready(demo):
    view = status_json(demo["state"])
    assert view["isolation"] == "netns" and view["manifests"].endswith("examples/demo")
    assert {w["name"] for w in view["workloads"]} == {"web", "books", "books-2", "authors", "traffic"}
    for w in view["workloads"]:
        assert w["ready"] and w["meshed"] and w["proxy"]["ready"], w
    assert {s["name"]: sorted(e["workload"] for e in s["endpoints"]) for s in view["services"]} == \
        {"web": ["web"], "books": ["books", "books-2"], "authors": ["authors"]}


def test_web_calls_authors_through_both_proxies_with_mtls(demo):
    # Whatever runs in web's namespace is web: its connection is redirected into web's proxy.
    seen = curl_json(demo["netns"]["web"], "http://authors.demo.svc.cluster.local:8080/debug/headers")
    assert seen["app"] == "authors" and seen["headers"]["tulle-client-id"] == [WEB_ID]

    def inbound_mtls_counted():
        return matching(metrics(demo["admin"]["authors"]), "request_total", direction="inbound", tls="true",
                        client_id=WEB_ID) >= 1

    wait_until(inbound_mtls_counted, timeout=20, what="authors' proxy to count an mTLS request from web")

    def outbound_mtls_counted():
        return matching(metrics(demo["admin"]["web"]), "request_total", direction="outbound", tls="true",
                        server_id=AUTHORS_ID) >= 1

    wait_until(outbound_mtls_counted, timeout=20, what="web's proxy to count an mTLS request to authors")


def test_a_spoofed_client_id_sent_by_the_client_never_reaches_the_server(demo):
    seen = curl_json(demo["netns"]["web"], "http://authors.demo.svc.cluster.local:8080/debug/headers",
                     "tulle-client-id: admin.kube-system.serviceaccount.identity.tulle.cluster.local")
    assert seen["headers"]["tulle-client-id"] == [WEB_ID]


def test_a_client_id_sent_from_outside_the_mesh_is_removed(demo):
    # From the host: plain TCP to web's pod address, redirected into web's inbound proxy.
    out = subprocess.run(["curl", "-sS", "-m", "10", "-H", f"tulle-client-id: {WEB_ID}",
                          f"http://{demo['address']['web']}:8080/debug/headers"], capture_output=True, text=True,
                         timeout=30)
    assert "tulle-client-id" not in json.loads(out.stdout)["headers"]


def test_the_front_end_answers_with_a_book_from_grpc_and_its_author_over_http(demo):
    def a_joined_book():
        body = curl_json(demo["netns"]["traffic"], "http://web.demo.svc.cluster.local/books/3")
        return body if "author" in body else None  # authors fails a known fraction: try again

    body = wait_until(a_joined_book, timeout=30, interval=0.2, what="web to join a book with its author")
    assert body["book"]["title"] == "Kindred" and body["author"]["name"] == "Octavia E. Butler"


def test_the_traffic_generator_gets_answers_through_the_mesh(demo):
    def enough_successes():
        stats = curl_json(demo["netns"]["traffic"], "http://127.0.0.1:8080/stats")
        return stats if stats.get("status_200", 0) >= 20 else None

    stats = wait_until(enough_successes, timeout=60, interval=0.5, what="twenty successful demo requests")
    assert stats["status_200"] >= stats["requests"] // 2


def test_the_traffic_generator_gets_no_503_while_the_demo_starts(demo):
    """Its first requests leave before web has an endpoint: they wait in the outbound
    proxy's fail-fast queue instead of being refused (proxy/failfast.py)."""
    log = demo["state"] / "logs" / "workload-demo-traffic.log"

    def first_statuses():
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        statuses = [line["status"] for line in lines if "status" in line]
        return statuses[:30] if len(statuses) >= 30 else None

    statuses = wait_until(first_statuses, timeout=60, interval=0.5, what="the demo's first 30 requests logged")
    assert 503 not in statuses, statuses


def test_down_leaves_nothing_running(demo):
    record = read_record(demo["state"])
    processes = recorded_pids(record)
    assert tulle("down", state=demo["state"]).returncode == 0
    assert [pid for pid, start in processes if process_alive(pid, start)] == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(w["netns"] in namespaces for w in record["workloads"])
