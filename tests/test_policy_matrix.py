"""The authorization matrix: every default policy (and a Server admitting one identity)
against the four kinds of client, over opaque TCP and HTTP/1.1 — exactly as specified.

The table (`CLIENTS`, `EXPECTED`, `CASES`, `web_only_manifests`) is data on purpose: the
end-to-end test through real proxies imports it and runs the same cases over real
sockets and real mTLS, with its own addresses (`Client.with_ip`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import pytest

from tulle.policy import InboundPolicy
from services.policy.compile import Settings, compile_policies
from tulle.resources.parse import parse_object
from tulle.schemas import DEFAULT_CLUSTER_NETWORKS, identity_name

NAMESPACE = "demo"
APP_PORT = 9090
AUTHORIZED_SA = "web"
AUTHORIZED = identity_name(AUTHORIZED_SA, NAMESPACE)  # same trust domain as the server
UNAUTHORIZED = identity_name("traffic", NAMESPACE)


@dataclass(frozen=True)
class Client:
    what: str
    ip: str
    identity: Optional[str]  # verified mesh identity, None for an unmeshed client
    tls: bool  # the server's proxy terminated TLS (mesh traffic)

    def with_ip(self, ip: str) -> "Client":
        return replace(self, ip=ip)


CLIENTS: dict[str, Client] = {
    "meshed": Client("a meshed client of the same trust domain", "10.42.0.5", AUTHORIZED, True),
    "meshed-unauthorized": Client("a meshed client whose identity is not authorized", "10.42.0.6", UNAUTHORIZED, True),
    "unmeshed-cluster": Client("an unmeshed client from a cluster network", "10.42.0.7", None, False),
    "unmeshed-outside": Client("an unmeshed client from outside the cluster networks", "203.0.113.9", None, False),
}
CLIENT_ORDER = ("meshed", "meshed-unauthorized", "unmeshed-cluster", "unmeshed-outside")

# Which clients each policy admits, in CLIENT_ORDER. Default policies do not tell one
# identity from another (any identity is "authenticated"); the last row is the port
# covered by a Server whose only ServerAuthorization names the authorized client.
EXPECTED: dict[str, tuple[bool, bool, bool, bool]] = {
    "all-unauthenticated": (True, True, True, True),
    "all-authenticated": (True, True, False, False),
    "cluster-unauthenticated": (True, True, True, False),
    "cluster-authenticated": (True, True, False, False),
    "deny": (False, False, False, False),
    "server-web-only": (True, False, False, False),
}
TRANSPORTS = ("opaque-tcp", "http/1.1")


@dataclass(frozen=True)
class MatrixCase:
    policy: str  # a default policy, or "server-web-only"
    client: str  # a key of CLIENTS
    transport: str  # opaque-tcp or http/1.1
    allowed: bool

    @property
    def id(self) -> str:
        return f"{self.policy}-{self.client}-{self.transport}-{'allowed' if self.allowed else 'denied'}"


CASES: list[MatrixCase] = [
    MatrixCase(policy, client, transport, EXPECTED[policy][i])
    for policy in EXPECTED for i, client in enumerate(CLIENT_ORDER) for transport in TRANSPORTS
]


def web_only_manifests(namespace: str = NAMESPACE, pod_labels: dict | None = None, port: int | str = APP_PORT,
                       service_account: str = AUTHORIZED_SA) -> list[dict]:
    """The Server + ServerAuthorization of the "server-web-only" row, as manifests."""
    return [
        {"apiVersion": "policy.tulle.dev/v1alpha1", "kind": "Server",
         "metadata": {"name": "matrix", "namespace": namespace},
         "spec": {"podSelector": {"matchLabels": pod_labels or {"app": "matrix"}}, "port": port}},
        {"apiVersion": "policy.tulle.dev/v1alpha1", "kind": "ServerAuthorization",
         "metadata": {"name": "matrix-web-only", "namespace": namespace},
         "spec": {"server": {"name": "matrix"},
                  "client": {"meshTLS": {"serviceAccounts": [{"name": service_account}]}}}},
    ]


# --- the pure run of the matrix: resources -> compile -> decide ---------------------------------


def _pod() -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "matrix-0", "namespace": NAMESPACE, "labels": {"app": "matrix"}},
            "spec": {"serviceAccountName": "matrix", "containers": [
                {"name": "app", "ports": [{"containerPort": APP_PORT, "name": "http"}]},
                {"name": "tulle-proxy"}]},
            "status": {"podIP": "10.42.0.100"}}


def _policy_for(row: str) -> InboundPolicy:
    objects = [parse_object(_pod())]
    default = row
    if row == "server-web-only":
        objects += [parse_object(o) for o in web_only_manifests()]
        default = "all-unauthenticated"  # the Server must win over the most open default
    compiled = compile_policies(objects, Settings(default_policy=default, cluster_networks=DEFAULT_CLUSTER_NETWORKS))
    policy = InboundPolicy("deny")
    policy.update(compiled.policies[f"{NAMESPACE}.matrix-0"])
    return policy


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_authorization_matrix(case: MatrixCase):
    policy = _policy_for(case.policy)
    c = CLIENTS[case.client]
    if case.transport == "opaque-tcp":
        decision = policy.decide_connection(APP_PORT, c.ip, c.identity, c.tls)
    else:
        decision = policy.decide_request(APP_PORT, c.ip, c.identity, c.tls, "GET", "/books")
    assert decision.allowed is case.allowed, decision.reason
    assert bool(decision.authorization) is case.allowed


def test_the_matrix_covers_every_default_policy_client_and_transport():
    from tulle.schemas import DEFAULT_POLICIES

    assert set(DEFAULT_POLICIES) < set(EXPECTED)
    assert len(CASES) == len(EXPECTED) * len(CLIENTS) * len(TRANSPORTS)
