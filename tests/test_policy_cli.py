"""`tulle policy` through the real console script, against a real policy service serving
the demo's manifests (with the Pods the local runner would write), over a real nats-server.

Also pins the demo's policy: only the web front end may call the back ends."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tulle.policy import InboundPolicy
from services.policy.compile import compile_policies
from tests.bus_support import cli_bus_args, server_for
from tests.conftest import REPO
from tests.policy_support import PolicyProcess
from tulle import pki
from tulle.local.plan import Placement, inject, install_values, pod_file_name, pod_manifest
from tulle.resources import model as m
from tulle.resources.parse import load_dir
from tulle.schemas import identity_name

TULLE = str(REPO / ".venv" / "bin" / "tulle")
DEMO = REPO / "examples" / "demo"
ADDRESSES = {"web": "10.77.0.2", "books": "10.77.0.3", "authors": "10.77.0.4", "traffic": "10.77.0.5",
             "books-2": "10.77.0.6"}  # books runs two replicas
WEB, TRAFFIC, AUTHORS = (identity_name(n, "demo") for n in ("web", "traffic", "authors"))


def runtime_pods(folder: Path) -> Path:
    """The Pods the local runner writes for the demo's Workloads (its own code does it)."""
    runtime = folder / "runtime"
    runtime.mkdir(parents=True)
    values = install_values(trust_anchors_pem=pki.new_trust_anchor().cert_pem.decode(), nats_url="nats://10.77.0.1:4222")
    namespaces = {o.meta.name: o for o in load_dir(DEMO) if isinstance(o, m.Namespace)}
    for w in (o for o in load_dir(DEMO) if isinstance(o, m.Workload)):
        doc = pod_manifest(w, Placement("netns", ADDRESSES[w.meta.name], True), ready=True,
                           injection=inject(w, namespaces.get(w.meta.namespace), values))
        (runtime / pod_file_name(w.meta.namespace, w.meta.name)).write_text(json.dumps(doc))
    return runtime


# --- the demo's policy, decided by the proxy's own core --------------------------------------------------


def demo_policies(tmp_path) -> dict[str, InboundPolicy]:
    objects = load_dir(DEMO) + load_dir(runtime_pods(tmp_path))
    compiled = compile_policies(objects)
    assert compiled.rejected == []
    out = {}
    for key, wp in compiled.policies.items():
        out[key.split(".", 1)[1]] = p = InboundPolicy("deny")
        p.update(wp)
    return out


@pytest.mark.parametrize("backend, port", [("books", 9090), ("authors", 8080)])
def test_the_demo_lets_only_web_call_the_back_ends(tmp_path, backend, port):
    p = demo_policies(tmp_path)[backend]
    assert p.decide_connection(port, ADDRESSES["web"], WEB, True).allowed
    assert p.decide_request(port, ADDRESSES["web"], WEB, True, "POST", "/any").allowed
    for client_ip, identity in [(ADDRESSES["traffic"], TRAFFIC), (ADDRESSES["traffic"], None),
                                ("203.0.113.1", None), (ADDRESSES["authors"], AUTHORS)]:
        assert not p.decide_connection(port, client_ip, identity, identity is not None).allowed
        assert not p.decide_request(port, client_ip, identity, identity is not None, "GET", "/").allowed


def test_the_demo_back_ends_stay_ready_and_web_stays_open(tmp_path):
    policies = demo_policies(tmp_path)
    assert policies["books"].decide_request(8086, "10.77.0.1", None, False, "GET", "/ready").allowed
    assert policies["authors"].decide_request(8080, "10.77.0.1", None, False, "GET", "/ready").allowed
    assert policies["web"].decide_request(8080, "10.77.0.1", TRAFFIC, True, "GET", "/").allowed
    assert policies["books"].protocol(9090) == "gRPC" and policies["authors"].protocol(8080) == "HTTP/1"


# --- the CLI against a running service ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.bus_support import MeshNats

    tmp = tmp_path_factory.mktemp("policy-cli")
    nats = MeshNats(tmp / "nats").start()
    svc = PolicyProcess(nats.url, ["--manifests", str(DEMO), "--manifests", str(runtime_pods(tmp))],
                        tmp / "policy.log").start()
    try:
        from tests.conftest import wait_until

        wait_until(svc.ready, 20, 0.05, "policy service ready")
        yield nats.url
    finally:
        svc.stop()
        nats.close()


def tulle(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TULLE, "policy", *args, *cli_bus_args(url)], capture_output=True, text=True, timeout=30)


def test_policy_shows_each_port_its_server_protocol_authorizations_and_source(served):
    r = tulle(served, "books")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "demo/books: default policy all-unauthenticated (from cluster default (--default-policy))"
    assert lines[1].split() == ["PORT", "SERVER", "PROTOCOL", "AUTHORIZATIONS", "SOURCE"]
    rows = {line.split()[0]: line for line in lines[2:] if line and not line.startswith(" ")}
    assert rows["8086"].split()[:3] == ["8086", "default:all-unauthenticated", "unknown"]
    assert "default:probe: GET/HEAD /ready from 0.0.0.0/0, ::/0" in r.stdout
    assert rows["9090"].split() == ["9090", "books-grpc", "gRPC", "backends-from-web:", WEB, "from", "anywhere",
                                    "Server", "demo/books-grpc"]
    assert rows["other"].split()[:4] == ["other", "default:all-unauthenticated", "unknown",
                                         "default:all-unauthenticated:"]


def test_policy_of_one_port_as_json(served):
    r = tulle(served, "authors", "-n", "demo", "--port", "8080", "-o", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    (port,) = data["ports"]
    assert (port["port"], port["server"], port["protocol"]) == (8080, "authors-http", "HTTP/1")
    assert [(a["name"], a["kind"], a["identities"], a["paths"]) for a in port["authorizations"]] == [
        ("backends-from-web", "ServerAuthorization", [WEB], []), ("probe", "probe", [], ["/ready"])]


def test_policy_of_one_server_shows_only_the_ports_it_selects(served):
    r = tulle(served, "books", "-n", "demo", "--server", "books-grpc")
    assert r.returncode == 0, r.stderr
    ports = [line.split()[0] for line in r.stdout.splitlines()[2:] if line and not line.startswith(" ")]
    assert ports == ["9090"]
    other = tulle(served, "books", "-n", "demo", "--server", "authors-http")
    assert other.returncode == 1
    assert other.stderr == "tulle: no port of demo/books is selected by Server authors-http (its Servers: books-grpc)\n"


def test_explain_says_the_front_end_is_allowed_and_by_which_rule(served):
    r = tulle(served, "books", "--explain", "--from", WEB, "--port", "9090")
    assert r.returncode == 0, r.stderr
    assert "port 9090 (books-grpc): allowed by backends-from-web on books-grpc" in r.stdout


def test_explain_says_another_workload_is_denied_and_why_and_exits_1(served):
    r = tulle(served, "books", "--explain", "--from", f"{TRAFFIC}@{ADDRESSES['traffic']}", "--port", "9090")
    assert r.returncode == 1
    assert (f"port 9090 (books-grpc): denied: no authorization on Server books-grpc admits identity {TRAFFIC} "
            f"from {ADDRESSES['traffic']}") in r.stdout
    assert f"- backends-from-web: identity {TRAFFIC} is not {WEB}" in r.stdout


def test_explain_of_an_unmeshed_address_over_every_port(served):
    r = tulle(served, "authors", "--explain", "--from", "203.0.113.7")
    assert r.returncode == 1  # denied on the Server's port
    assert "port 8080 (authors-http): denied: no authorization on Server authors-http admits an unauthenticated " \
           "client from 203.0.113.7" in r.stdout
    assert "other ports (default:all-unauthenticated): allowed by the default policy all-unauthenticated" in r.stdout


def test_explain_of_a_probe_request(served):
    r = tulle(served, "authors", "--explain", "--from", "203.0.113.7", "--port", "8080", "--path", "/ready")
    assert r.returncode == 0, r.stdout
    assert "allowed by default:probe on authors-http" in r.stdout


def test_an_unknown_workload_says_so_and_exits_1(served):
    r = tulle(served, "nothing", "-n", "demo")
    assert r.returncode == 1
    assert r.stderr.strip() == ("tulle: no policy published for demo/nothing: the workload does not exist, is not "
                                "meshed, or the policy service has not seen it yet")


@pytest.mark.parametrize("args, message", [
    (["books", "--explain"], "tulle: policy: --explain needs --from IDENTITY, --from IP or --from IDENTITY@IP"),
    (["books", "--from", "10.0.0.1"], "tulle: policy: --from is only used with --explain"),
    (["books", "--explain", "--from", f"{WEB}@nope"], f"tulle: policy: --from '{WEB}@nope': 'nope' is not an IP address"),
    (["books", "--explain", "--from", WEB, "--no-tls"],
     "tulle: policy: --no-tls: a client with an identity always connects over mesh TLS"),
])
def test_bad_input_is_one_line_and_exit_2(served, args, message):
    r = tulle(served, *args)
    assert r.returncode == 2 and r.stderr.strip() == message and r.stdout == ""
