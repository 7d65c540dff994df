"""Cost of one inbound authorization decision, and of compiling a mesh's policies.

    python -m bench.policy [--decisions 200000] [--pods 1000]

Decisions: the proxy's core (tulle/policy.py) on a Server port with several
authorizations (exact identity, wildcard, identity + networks with except, probes), per
connection and per request, allowed and denied. Compile: the policy service's pure
compile for `--pods` meshed pods in 10 namespaces, each with a Server and two
ServerAuthorizations. Figures only: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tulle.policy import InboundPolicy, default_port_policy  # noqa: E402
from tulle.schemas import (DEFAULT_CLUSTER_NETWORKS, Authorization, Network, PortPolicy,  # noqa: E402
                           WorkloadPolicy, identity_name)


def decisions(n: int) -> dict[str, float]:
    web = identity_name("web", "demo")
    wp = WorkloadPolicy("demo", "books", "cluster-authenticated",
                        default_port_policy("cluster-authenticated", DEFAULT_CLUSTER_NETWORKS), [
                            PortPolicy(9090, "books", "Server", "gRPC", [
                                Authorization("a", identities=[identity_name("x", "demo")]),
                                Authorization("b", identities=["*.other.serviceaccount.identity.tulle.cluster.local"]),
                                Authorization("web", identities=[web], networks=[Network("10.0.0.0/8", ["10.9.0.0/16"])]),
                                Authorization("probe", kind="probe", unauthenticated=True,
                                              networks=[Network("0.0.0.0/0"), Network("::/0")], paths=["/ready"])])])
    p = InboundPolicy("deny")
    p.update(wp)
    cases = {
        "connection allowed (3rd rule, with networks)": lambda: p.decide_connection(9090, "10.1.2.3", web, True),
        "request allowed": lambda: p.decide_request(9090, "10.1.2.3", web, True, "POST", "/books.Books/List"),
        "request allowed as a probe": lambda: p.decide_request(9090, "10.1.2.3", None, False, "GET", "/ready"),
        "connection on a default-policy port": lambda: p.decide_connection(8080, "10.1.2.3", web, True),
        "connection denied": lambda: p.decide_connection(9090, "10.1.2.3", None, False),
    }
    return {name: timeit.timeit(fn, number=n) / n * 1e6 for name, fn in cases.items()}


def compile_cost(pods: int) -> tuple[float, int]:
    from services.policy.compile import compile_policies
    from tulle.resources.parse import parse_object

    objects = []
    for i in range(pods):
        ns = f"ns{i % 10}"
        objects.append(parse_object({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"app{i // 10}-{i}", "namespace": ns, "labels": {"app": f"app{i // 10 % 20}"}},
            "spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
                                     "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}},
                                    {"name": "tulle-proxy"}]}}))
    for ns in range(10):
        for app in range(20):
            objects.append(parse_object({"apiVersion": "policy.tulle.dev/v1alpha1", "kind": "Server",
                                         "metadata": {"name": f"app{app}", "namespace": f"ns{ns}"},
                                         "spec": {"podSelector": {"matchLabels": {"app": f"app{app}"}}, "port": "http"}}))
            for j in range(2):
                objects.append(parse_object({
                    "apiVersion": "policy.tulle.dev/v1alpha1", "kind": "ServerAuthorization",
                    "metadata": {"name": f"app{app}-{j}", "namespace": f"ns{ns}"},
                    "spec": {"server": {"name": f"app{app}"},
                             "client": {"meshTLS": {"serviceAccounts": [{"name": f"client{j}"}]}}}}))
    started = time.perf_counter()
    compiled = compile_policies(objects)
    return time.perf_counter() - started, len(compiled.policies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decisions", type=int, default=200_000)
    ap.add_argument("--pods", type=int, default=1000)
    args = ap.parse_args()
    figures = decisions(args.decisions)
    print("| decision | µs |\n|---|---|")
    for name, us in figures.items():
        print(f"| {name} | {us:.2f} |")
    seconds, n = compile_cost(args.pods)
    print(f"\ncompile of {n} workloads (10 namespaces, 200 Servers, 400 ServerAuthorizations): {seconds * 1000:.0f} ms")
    print(json.dumps({"decision_us": figures, "compile_ms": seconds * 1000, "workloads": n}))


if __name__ == "__main__":
    main()
