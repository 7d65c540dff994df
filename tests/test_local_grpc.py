"""gRPC through the mesh in local mode with network namespaces (root): `tulle up` runs two
replicas of a grpcio server behind one Service, a caller and an intruder, each in its own
namespace behind its own proxy with iptables redirection. A grpcio client run inside the
caller's namespace (as the app itself would be) makes every kind of call by the service's
DNS name — unary, server streaming, client streaming, bidirectional — and sees per-request
balancing, retries within the budget, a route timeout as DEADLINE_EXCEEDED; the intruder,
whom the Server's authorization does not admit, gets PERMISSION_DENIED.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import requires_netns
from tests.local_support import read_record, tulle

pytestmark = [requires_netns, pytest.mark.root]

NS = "grpc"
TARGET = f"echo.{NS}.svc.cluster.local:9090"

SERVER = textwrap.dedent('''\
    import itertools, os, threading, time
    from concurrent import futures
    from http.server import BaseHTTPRequestHandler, HTTPServer
    import grpc

    NAME = os.environ["TULLE_WORKLOAD"].encode()
    flaky_calls = itertools.count(1)

    def unary(request, context):
        return NAME + b":" + request

    def server_stream(request, context):
        for i in range(int(request)):
            yield b"%d" % i

    def client_stream(requests, context):
        return b"%d" % sum(len(r) for r in requests)

    def bidi(requests, context):
        for r in requests:
            yield b"re: " + r

    def flaky(request, context):
        if next(flaky_calls) % 3 == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "busy")
        return NAME

    def slow(request, context):
        time.sleep(2)
        return NAME

    handlers = {"Unary": grpc.unary_unary_rpc_method_handler(unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
                "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
                "Slow": grpc.unary_unary_rpc_method_handler(slow)}
    server = grpc.server(futures.ThreadPoolExecutor(16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    server.add_insecure_port("%s:%s" % (os.environ["HOST"], os.environ["PORT_GRPC"]))
    server.start()

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    HTTPServer((os.environ["HOST"], int(os.environ["PORT_HEALTH"])), Ready).serve_forever()
''')

CALLER = textwrap.dedent('''\
    import json, sys, time
    from concurrent import futures
    import grpc

    channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_retries", 0)])
    m = lambda name: "/test.Echo/" + name

    def outcome(fn):
        try:
            return {"ok": fn().decode()}
        except grpc.RpcError as e:
            meta = dict(e.trailing_metadata() or ())
            return {"code": e.code().name, "details": e.details(), "proxy_error": meta.get("tulle-proxy-error")}

    case = sys.argv[2]
    out = {}
    if case == "kinds":
        out["unary"] = channel.unary_unary(m("Unary"))(b"dune", timeout=10).decode()
        out["server_stream"] = len(list(channel.unary_stream(m("ServerStream"))(b"100", timeout=10)))
        out["client_stream"] = channel.stream_unary(m("ClientStream"))(iter([b"x" * 1000] * 100), timeout=10).decode()
        out["bidi"] = [r.decode() for r in channel.stream_stream(m("Bidi"))(iter([b"a", b"b", b"c"]), timeout=10)]
    elif case == "spread":
        call = channel.unary_unary(m("Unary"))
        with futures.ThreadPoolExecutor(8) as pool:
            served = list(pool.map(lambda i: call(b"%d" % i, timeout=10).split(b":")[0].decode(), range(200)))
        out = {name: served.count(name) for name in set(served)}
    elif case == "flaky":
        out = [outcome(lambda: channel.unary_unary(m("Flaky"))(b"", timeout=10)) for _ in range(60)]
    elif case in ("slow", "unary"):
        out = outcome(lambda: channel.unary_unary(m("Slow" if case == "slow" else "Unary"))(b"x", timeout=10))
    print(json.dumps(out))
''')


def workload(name: str, app: str, sa: str, command: str, grpc_port: bool) -> str:
    ports = textwrap.dedent('''\
          ports:
            - name: grpc
              containerPort: 9090
            - name: health
              containerPort: 8086
          readinessProbe:
            httpGet:
              path: /ready
              port: health
    ''') if grpc_port else ""
    return textwrap.dedent(f'''\
        apiVersion: tulle.dev/v1alpha1
        kind: Workload
        metadata:
          name: {name}
          namespace: {NS}
          labels:
            app: {app}
        spec:
          serviceAccountName: {sa}
          command: [python, {command}]
    ''') + textwrap.indent(ports, "  ")


MANIFESTS = textwrap.dedent(f'''\
    apiVersion: v1
    kind: Service
    metadata:
      name: echo
      namespace: {NS}
    spec:
      selector:
        app: echo
      ports:
        - name: grpc
          port: 9090
          targetPort: grpc
    ---
    apiVersion: tulle.dev/v1alpha1
    kind: ServiceProfile
    metadata:
      name: echo.{NS}.svc.cluster.local
      namespace: {NS}
    spec:
      routes:
        - name: POST /test.Echo/Flaky
          condition:
            method: POST
            pathRegex: /test\\.Echo/Flaky
          isRetryable: true
        - name: POST /test.Echo/Slow
          condition:
            method: POST
            pathRegex: /test\\.Echo/Slow
          timeout: 300ms
      retryBudget:
        retryRatio: 0.5
        minRetriesPerSecond: 10
        ttl: 10s
    ---
    apiVersion: policy.tulle.dev/v1alpha1
    kind: Server
    metadata:
      name: echo-grpc
      namespace: {NS}
    spec:
      podSelector:
        matchLabels:
          app: echo
      port: grpc
      proxyProtocol: gRPC
    ---
    apiVersion: policy.tulle.dev/v1alpha1
    kind: ServerAuthorization
    metadata:
      name: echo-from-caller
      namespace: {NS}
    spec:
      server:
        name: echo-grpc
      client:
        meshTLS:
          serviceAccounts:
            - name: caller
''')


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("local-grpc")
    manifests, state = base / "manifests", base / "state"
    manifests.mkdir()
    (manifests / "echo_server.py").write_text(SERVER)
    (manifests / "call.py").write_text(CALLER)
    (manifests / "idle.py").write_text("import time\nwhile True:\n    time.sleep(3600)\n")
    docs = [MANIFESTS,
            workload("echo-a", "echo", "echo", "echo_server.py", True),
            workload("echo-b", "echo", "echo", "echo_server.py", True),
            workload("caller", "caller", "caller", "idle.py", False),
            workload("intruder", "intruder", "intruder", "idle.py", False)]
    (manifests / "echo.yaml").write_text("---\n".join(docs))
    up = tulle("up", str(manifests), "--detach", "--isolation", "netns", "--timeout", "150", state=state, timeout=200)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        record = read_record(state)
        yield {"state": state, "script": str(manifests / "call.py"),
               "netns": {w["name"]: w["netns"] for w in record["workloads"]}}
    finally:
        tulle("down", state=state)


def call(run, case: str, workload: str = "caller"):
    """A grpcio client inside the workload's namespace: its connection is the app's, redirected
    into that workload's proxy."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["GRPC_DNS_RESOLVER"] = "native"  # /etc/netns/<name>/hosts maps the service name
    out = subprocess.run(["ip", "netns", "exec", run["netns"][workload], sys.executable, run["script"], TARGET, case],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_unary_and_streaming_calls_of_every_kind_work_through_the_mesh(run):
    got = call(run, "kinds")
    assert got["unary"].split(":") in (["echo-a", "dune"], ["echo-b", "dune"])
    assert got["server_stream"] == 100
    assert got["client_stream"] == "100000"
    assert got["bidi"] == ["re: a", "re: b", "re: c"]


def test_calls_on_one_connection_are_balanced_over_both_replicas(run):
    served = call(run, "spread")
    assert set(served) == {"echo-a", "echo-b"} and sum(served.values()) == 200
    assert min(served.values()) >= 20


def test_failed_calls_of_a_retryable_route_are_retried_within_the_budget(run):
    outcomes = call(run, "flaky")
    assert all("ok" in o for o in outcomes), [o for o in outcomes if "ok" not in o]


def test_a_route_timeout_is_deadline_exceeded_with_the_proxys_reason(run):
    got = call(run, "slow")
    assert got["code"] == "DEADLINE_EXCEEDED"
    assert got["proxy_error"] == "route 'POST /test.Echo/Slow' timed out after 0.3s"


def test_a_caller_the_server_does_not_authorize_gets_permission_denied(run):
    got = call(run, "unary", workload="intruder")
    assert got["code"] == "PERMISSION_DENIED"
    assert got["proxy_error"] == "unauthorized request on server echo-grpc"
    assert "ok" in call(run, "unary")  # the authorized caller still gets through
