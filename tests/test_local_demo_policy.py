"""The bundled demo's authorization policy (examples/demo/policy.yaml), enforced by the
real proxies of a `tulle up` in network namespaces (root): only the web front end may call
the back ends; `tulle policy` explains it; denials show in /metrics and as CloudEvents."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, requires_netns, wait_until
from tests.local_support import read_record, tulle
from tulle.metrics import parse_text

pytestmark = [requires_netns, pytest.mark.root]

WEB_ID = "web.demo.serviceaccount.identity.tulle.cluster.local"
TRAFFIC_ID = "traffic.demo.serviceaccount.identity.tulle.cluster.local"
PYTHON = str(REPO / ".venv" / "bin" / "python")

# A gRPC call to books as the demo's web app makes it (demo/Books/GetBook, JSON messages).
GRPC_CALL = textwrap.dedent('''\
    import json, os
    os.environ["GRPC_DNS_RESOLVER"] = "native"
    import grpc
    channel = grpc.insecure_channel("books.demo.svc.cluster.local:9090")
    get_book = channel.unary_unary("/demo.Books/GetBook", request_serializer=lambda o: json.dumps(o).encode(),
                                   response_deserializer=json.loads)
    try:
        print(json.dumps({"book": get_book({"id": 3}, timeout=10)}))
    except grpc.RpcError as e:
        print(json.dumps({"code": e.code().name, "details": e.details()}))
''')


def in_netns(netns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30)


def curl(netns: str, url: str) -> tuple[int, dict, str]:
    """(status, lower-cased headers, body) of a GET made from inside a workload's namespace."""
    out = in_netns(netns, "curl", "-sS", "-i", "-m", "10", url)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def grpc_get_book(netns: str) -> dict:
    out = in_netns(netns, PYTHON, "-c", GRPC_CALL)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def metrics(admin: str) -> dict:
    out = subprocess.run(["curl", "-sS", "-m", "5", f"http://{admin}/metrics"], capture_output=True, text=True,
                         timeout=30)
    return parse_text(out.stdout)


def matching(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    state = tmp_path_factory.mktemp("demo-policy") / "state"
    up = tulle("up", "--detach", "--isolation", "netns", "--timeout", "150", state=state, timeout=200)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        record = read_record(state)
        yield {"state": state, "netns": {w["name"]: w["netns"] for w in record["workloads"]},
               "admin": {w["name"]: w["proxy"]["admin"] for w in record["workloads"]}}
    finally:
        tulle("down", state=state)


def test_tulle_policy_shows_that_only_web_may_call_books_and_authors(demo):
    for workload, port, server, protocol in (("books", "9090", "books-grpc", "gRPC"),
                                             ("authors", "8080", "authors-http", "HTTP/1")):
        out = tulle("policy", workload, "-n", "demo", state=demo["state"], timeout=30)
        assert out.returncode == 0, out.stderr
        row = next(line for line in out.stdout.splitlines() if line.startswith(port + " "))
        assert row.split()[1:3] == [server, protocol]
        assert f"backends-from-web: {WEB_ID} from anywhere" in row


def test_tulle_policy_explains_why_traffic_is_denied_and_web_is_allowed_on_authors(demo):
    denied = tulle("policy", "authors", "-n", "demo", "--port", "8080", "--explain", "--from", TRAFFIC_ID,
                   state=demo["state"], timeout=30)
    assert denied.returncode == 1, denied.stderr
    assert (f"port 8080 (authors-http): denied: no authorization on Server authors-http admits identity {TRAFFIC_ID}"
            in denied.stdout)
    allowed = tulle("policy", "authors", "-n", "demo", "--port", "8080", "--explain", "--from", WEB_ID,
                    state=demo["state"], timeout=30)
    assert allowed.returncode == 0, allowed.stderr
    assert "port 8080 (authors-http): allowed by backends-from-web on authors-http" in allowed.stdout


def test_traffic_calling_authors_directly_gets_403_while_web_is_answered(demo):
    status, headers, _ = curl(demo["netns"]["traffic"], "http://authors.demo.svc.cluster.local:8080/authors/3")
    assert status == 403 and headers["tulle-proxy-error"] == "unauthorized request on server authors-http"
    status, _, body = curl(demo["netns"]["web"], "http://authors.demo.svc.cluster.local:8080/debug/headers")
    assert status == 200 and json.loads(body)["headers"]["tulle-client-id"] == [WEB_ID]
    samples = metrics(demo["admin"]["authors"])
    assert matching(samples, "inbound_http_authz_deny_total", srv_name="authors-http", client_id=TRAFFIC_ID) >= 1
    assert matching(samples, "inbound_http_authz_allow_total", srv_name="authors-http",
                    authz_name="backends-from-web", client_id=WEB_ID) >= 1


def test_traffic_calling_books_over_grpc_is_refused_while_web_gets_its_book(demo):
    # gRPC is parsed: each call is judged, and a denied one is a gRPC status, not a reset.
    denied = grpc_get_book(demo["netns"]["traffic"])
    assert denied["code"] == "PERMISSION_DENIED" and denied["details"] == "unauthorized request on server books-grpc"
    got = grpc_get_book(demo["netns"]["web"])
    assert got.get("book", {}).get("title") == "Kindred", got
    # books runs two replicas: the calls may have gone to either one.
    samples = [metrics(demo["admin"][replica]) for replica in ("books", "books-2")]
    assert sum(matching(s, "inbound_http_authz_deny_total", srv_name="books-grpc", client_id=TRAFFIC_ID)
               for s in samples) >= 1
    assert sum(matching(s, "inbound_http_authz_allow_total", srv_name="books-grpc", client_id=WEB_ID)
               for s in samples) >= 1


def test_the_front_end_still_joins_books_and_authors_for_its_callers(demo):
    def a_joined_book():
        status, _, body = curl(demo["netns"]["traffic"], "http://web.demo.svc.cluster.local/books/3")
        return status == 200 and "author" in json.loads(body) and json.loads(body)

    body = wait_until(a_joined_book, timeout=30, interval=0.2, what="web to join a book with its author")
    assert body["author"]["name"] == "Octavia E. Butler"


def test_a_denial_is_published_as_a_policy_denied_cloudevent(demo):
    curl(demo["netns"]["traffic"], "http://authors.demo.svc.cluster.local:8080/authors/1")
    out = tulle("events", "--type", "proxy.denied", "--since", "10m", "--count", "1", "-o", "json", "--timeout", "20",
                state=demo["state"], timeout=40)
    assert out.returncode == 0, out.stderr
    event = json.loads(out.stdout.splitlines()[0])
    assert event["type"] == "dev.tulle.proxy.denied" and event["subject"] in ("demo/authors", "demo/books")
    assert event["data"]["client_identity"] == TRAFFIC_ID


def run_secrets(state: Path, record: dict) -> dict[str, bytes]:
    """Every secret this run made, in the forms that could leak: whole tokens and their MACs,
    the token secret, the issuer's key, the bus's nkey seeds."""
    secrets: dict[str, bytes] = {}
    for w in record["workloads"]:
        if w.get("token_file"):
            token = Path(w["token_file"]).read_bytes().strip()
            secrets[f"token of {w['name']}"] = token
            secrets[f"token MAC of {w['name']}"] = token.rsplit(b".", 1)[1]
    ident = state / "identity"
    secrets["local token secret"] = (ident / "token-secret").read_bytes().strip()
    key_lines = [ln for ln in (ident / "issuer.key").read_bytes().splitlines() if ln and not ln.startswith(b"-----")]
    secrets["issuer key"] = max(key_lines, key=len)
    for seed in sorted((state / "nats" / "keys").glob("*.nk")):
        secrets[f"nkey seed {seed.stem}"] = seed.read_bytes().strip()
    return secrets


def all_events(record: dict) -> list[bytes]:
    """Every CloudEvent the run's stream kept, read as a tool would (the observer credential)."""
    import asyncio

    import nats

    async def read() -> list[bytes]:
        nc = await nats.connect(record["nats"]["url"], nkeys_seed=record["nats"]["observer_creds"])
        try:
            sub = await nc.jetstream().subscribe("tulle.events.>", ordered_consumer=True)
            out = []
            while True:
                try:
                    msg = await sub.next_msg(timeout=2)
                except nats.errors.TimeoutError:
                    return out
                out.append(msg.data)
        finally:
            await nc.close()

    return asyncio.run(read())


def test_no_secret_the_run_made_appears_in_any_log_or_event(demo):
    # A denial and a refused bus login first, so the logs hold the paths that handle secrets.
    curl(demo["netns"]["traffic"], "http://authors.demo.svc.cluster.local:8080/authors/1")
    record = read_record(demo["state"])
    secrets = run_secrets(demo["state"], record)
    assert len(secrets) >= 10
    texts = {str(p): p.read_bytes() for p in (demo["state"] / "logs").glob("*.log")}
    events = all_events(record)
    assert len(texts) >= 10 and len(events) >= 10
    texts["events"] = b"\n".join(events)
    leaks = [(what, where) for what, secret in secrets.items() for where, text in texts.items() if secret in text]
    assert leaks == []
    assert not any(b"PRIVATE KEY" in text for text in texts.values())
