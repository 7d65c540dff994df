"""The proxy's decision core (tulle/policy.py): who each kind of authorization admits,
probes, updates, and `explain` agreeing with the decisions. Pure, no I/O."""

from __future__ import annotations

import itertools

import pytest

from tulle.policy import InboundPolicy, default_port_policy, describe_authorization, explain
from tulle.schemas import DEFAULT_CLUSTER_NETWORKS, Authorization, Network, PortPolicy, WorkloadPolicy, identity_name

WEB = identity_name("web", "demo")
BOOKS = identity_name("books", "demo")
OTHER_NS = identity_name("web", "shop")
PORT = 9090


def server_policy(*authorizations: Authorization, port: int = PORT, default: str = "all-unauthenticated",
                  protocol: str = "unknown") -> InboundPolicy:
    wp = WorkloadPolicy("demo", "books", default, default_port_policy(default, DEFAULT_CLUSTER_NETWORKS),
                        [PortPolicy(port, "books-api", "Server", protocol, list(authorizations), "Server demo/books-api")])
    p = InboundPolicy("deny")
    p.update(wp)
    return p


def allowed(p: InboundPolicy, ip="10.1.2.3", identity=None, tls=None, port=PORT) -> bool:
    tls = identity is not None if tls is None else tls
    return p.decide_connection(port, ip, identity, tls).allowed


def test_an_exact_identity_admits_that_identity_only():
    p = server_policy(Authorization("web-only", identities=[WEB]))
    assert allowed(p, identity=WEB)
    assert not allowed(p, identity=BOOKS)
    assert not allowed(p, identity=OTHER_NS)
    assert not allowed(p, tls=True)  # TLS without a client certificate
    assert not allowed(p)  # plain text


def test_an_identity_only_counts_over_tls():
    p = server_policy(Authorization("web-only", identities=[WEB]))
    assert not allowed(p, identity=WEB, tls=False)


def test_star_admits_any_authenticated_client_and_nobody_else():
    p = server_policy(Authorization("meshed", identities=["*"]))
    assert allowed(p, identity=WEB) and allowed(p, identity=OTHER_NS) and allowed(p, identity="x.example")
    assert not allowed(p, tls=True)
    assert not allowed(p)


def test_a_wildcard_suffix_admits_every_service_account_of_a_namespace():
    p = server_policy(Authorization("demo-ns", identities=["*.demo.serviceaccount.identity.tulle.cluster.local"]))
    assert allowed(p, identity=WEB) and allowed(p, identity=BOOKS)
    assert not allowed(p, identity=OTHER_NS)
    assert not allowed(p, identity="demo.serviceaccount.identity.tulle.cluster.local")  # no label before the suffix
    assert not allowed(p, identity="web.demo.serviceaccount.identity.tulle.cluster.local.evil")
    assert not allowed(p, identity="webdemo.serviceaccount.identity.tulle.cluster.local")


def test_unauthenticated_tls_admits_any_tls_client_but_not_plain_text():
    p = server_policy(Authorization("tls", unauthenticated_tls=True))
    assert allowed(p, tls=True)
    assert allowed(p, identity=WEB)
    assert not allowed(p)


def test_unauthenticated_admits_anyone_from_its_networks():
    p = server_policy(Authorization("anyone", unauthenticated=True))
    assert allowed(p) and allowed(p, ip="203.0.113.1") and allowed(p, identity=WEB) and allowed(p, ip="2001:db8::1")
    p = server_policy(Authorization("lan", unauthenticated=True, networks=[Network("192.168.0.0/16")]))
    assert allowed(p, ip="192.168.3.4")
    assert not allowed(p, ip="10.1.2.3")


@pytest.mark.parametrize("cidr, excepted, inside, excluded, outside", [
    ("10.0.0.0/8", ["10.1.0.0/16", "10.2.3.4/32"], ["10.0.0.1", "10.3.0.1", "10.2.3.5"], ["10.1.2.3", "10.2.3.4"],
     ["11.0.0.1", "192.168.1.1", "fd00::1"]),
    ("fd00::/8", ["fd00:bad::/32"], ["fd00::1", "fd12:3456::9"], ["fd00:bad::1", "fd00:bad:ffff::2"],
     ["fe80::1", "2001:db8::1", "10.0.0.1"]),
])
def test_networks_with_except_admit_exactly_the_addresses_inside_and_not_excepted(cidr, excepted, inside, excluded,
                                                                                    outside):
    p = server_policy(Authorization("net", unauthenticated=True, networks=[Network(cidr, excepted)]))
    for ip in inside:
        assert allowed(p, ip=ip), ip
    for ip in excluded + outside:
        assert not allowed(p, ip=ip), ip


def test_an_ipv4_client_seen_on_a_dual_stack_socket_matches_ipv4_networks():
    p = server_policy(Authorization("net", unauthenticated=True, networks=[Network("10.0.0.0/8")]))
    assert allowed(p, ip="::ffff:10.9.8.7")
    assert not allowed(p, ip="::ffff:11.9.8.7")


def test_an_address_that_does_not_parse_matches_no_network():
    p = server_policy(Authorization("net", unauthenticated=True, networks=[Network("0.0.0.0/0")]))
    assert not allowed(p, ip="not-an-ip")


def test_a_network_that_does_not_parse_admits_no_one_rather_than_everyone():
    p = server_policy(Authorization("broken", unauthenticated=True, networks=[Network("10.0.0.0/8", ["nonsense"])]),
                      Authorization("web-only", identities=[WEB]))
    assert not allowed(p, ip="10.1.1.1")
    assert allowed(p, identity=WEB)


def test_several_authorizations_admit_the_union_and_the_decision_names_the_one_that_matched():
    p = server_policy(Authorization("a-web", identities=[WEB]),
                      Authorization("b-lan", unauthenticated=True, networks=[Network("192.168.0.0/16")]))
    d = p.decide_connection(PORT, "10.1.1.1", WEB, True)
    assert d.allowed and d.server == "books-api" and d.authorization == "a-web"
    d = p.decide_connection(PORT, "192.168.1.1", None, False)
    assert d.allowed and d.authorization == "b-lan"
    d = p.decide_connection(PORT, "10.1.1.1", BOOKS, True)
    assert not d.allowed and d.authorization == ""
    assert BOOKS in d.reason and "10.1.1.1" in d.reason and "books-api" in d.reason


def test_a_server_port_without_authorizations_denies_everything_but_probes():
    wp = WorkloadPolicy("demo", "books", "all-unauthenticated",
                        default_port_policy("all-unauthenticated", DEFAULT_CLUSTER_NETWORKS),
                        [PortPolicy(PORT, "books-api", "Server", "HTTP/1", [
                            Authorization("probe", kind="probe", unauthenticated=True,
                                          networks=[Network("0.0.0.0/0"), Network("::/0")], paths=["/ready", "/live"])])])
    p = InboundPolicy("all-unauthenticated")
    p.update(wp)
    for ip, ident in [("10.1.1.1", WEB), ("10.1.1.1", None), ("203.0.113.5", None)]:
        assert not p.decide_connection(PORT, ip, ident, ident is not None).allowed
        assert not p.decide_request(PORT, ip, ident, ident is not None, "GET", "/books").allowed
        d = p.decide_request(PORT, ip, ident, ident is not None, "GET", "/ready")
        assert d.allowed and d.authorization == "default:probe"
    assert p.decide_request(PORT, "10.1.1.1", None, False, "HEAD", "/live").allowed
    assert p.decide_request(PORT, "10.1.1.1", None, False, "GET", "/ready?verbose=1").allowed
    assert not p.decide_request(PORT, "10.1.1.1", None, False, "POST", "/ready").allowed
    assert not p.decide_request(PORT, "10.1.1.1", None, False, "GET", "/ready/x").allowed
    assert not p.decide_request(PORT, "10.1.1.1", None, False, "GET", "/readyz").allowed
    d = p.decide_request(PORT, "10.1.1.1", None, False, "GET", "/books")
    assert "books-api has no authorization" in d.reason
    # Other ports keep the default policy.
    assert p.decide_connection(8080, "203.0.113.5", None, False).allowed


def test_probes_are_admitted_only_from_the_probe_networks():
    wp = WorkloadPolicy("demo", "books", "deny", default_port_policy("deny", DEFAULT_CLUSTER_NETWORKS),
                        [PortPolicy(PORT, "default:deny", "default", "unknown", [
                            Authorization("probe", kind="probe", unauthenticated=True,
                                          networks=[Network("10.0.0.0/8")], paths=["/ready"])])])
    p = InboundPolicy("deny")
    p.update(wp)
    assert p.decide_request(PORT, "10.0.0.9", None, False, "GET", "/ready").allowed
    assert not p.decide_request(PORT, "203.0.113.5", None, False, "GET", "/ready").allowed


def test_before_the_first_policy_the_configured_default_applies_to_every_port():
    p = InboundPolicy("cluster-unauthenticated", ["10.0.0.0/8"])
    assert not p.has_policy
    assert p.decide_connection(1234, "10.2.3.4", None, False).allowed
    assert not p.decide_connection(1234, "192.168.1.1", None, False).allowed
    d = p.decide_connection(1234, "10.2.3.4", None, False)
    assert d.server == "default:cluster-unauthenticated" and d.authorization == "default:cluster-unauthenticated"
    p.update(WorkloadPolicy("demo", "x", "deny", default_port_policy("deny", ["10.0.0.0/8"])))
    assert p.has_policy
    d = p.decide_connection(1234, "10.2.3.4", None, False)
    assert not d.allowed and "deny" in d.reason


def test_an_update_applies_to_the_very_next_decision():
    p = server_policy(Authorization("web-only", identities=[WEB]))
    assert allowed(p, identity=WEB) and not allowed(p, identity=BOOKS)
    g = p.generation
    p.update(server_policy(Authorization("books-only", identities=[BOOKS])).policy)
    assert p.generation == g + 1
    assert not allowed(p, identity=WEB) and allowed(p, identity=BOOKS)


def test_allowed_decisions_are_shared_objects_so_the_hot_path_does_not_allocate_them():
    p = server_policy(Authorization("web-only", identities=[WEB]))
    assert p.decide_connection(PORT, "10.0.0.1", WEB, True) is p.decide_connection(PORT, "10.0.0.2", WEB, True)


def test_protocol_of_a_port_comes_from_its_server():
    p = server_policy(Authorization("x", unauthenticated=True), protocol="opaque")
    assert p.protocol(PORT) == "opaque" and p.protocol(1) == "unknown"


# --- explain ----------------------------------------------------------------------------------


POLICIES = {
    "web-only": server_policy(Authorization("web-only", identities=[WEB])).policy,
    "lan-except": server_policy(Authorization("lan", unauthenticated=True,
                                              networks=[Network("10.0.0.0/8", ["10.9.0.0/16"])])).policy,
    "tls": server_policy(Authorization("tls", unauthenticated_tls=True)).policy,
    "cluster-authenticated": WorkloadPolicy("demo", "x", "cluster-authenticated", default_port_policy(
        "cluster-authenticated", DEFAULT_CLUSTER_NETWORKS)),
    "deny": WorkloadPolicy("demo", "x", "deny", default_port_policy("deny", DEFAULT_CLUSTER_NETWORKS)),
}
CLIENT_GRID = list(itertools.product(["10.1.1.1", "10.9.1.1", "203.0.113.7", "fd00::5"], [None, WEB, BOOKS],
                                     [False, True]))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_explain_agrees_with_the_decisions_for_every_client(name):
    wp = POLICIES[name]
    p = InboundPolicy("deny")
    p.update(wp)
    for ip, identity, tls in CLIENT_GRID:
        if identity is not None and not tls:
            continue
        d = p.decide_connection(PORT, ip, identity, tls)
        e = explain(wp, PORT, client_ip=ip, client_identity=identity, tls=tls)
        assert (e.allowed, e.authorization, e.server) == (d.allowed, d.authorization, d.server), (ip, identity, tls)
        assert not e.condition


def test_explain_says_why_each_authorization_did_not_admit_the_client():
    e = explain(POLICIES["web-only"], PORT, client_ip="10.1.1.1", client_identity=BOOKS, tls=True)
    assert not e.allowed
    assert e.rules[0].authorization == "web-only" and not e.rules[0].admits
    assert f"identity {BOOKS} is not {WEB}" == e.rules[0].why
    e = explain(POLICIES["lan-except"], PORT, client_ip="10.9.1.1")
    assert "10.0.0.0/8 except 10.9.0.0/16" in e.rules[0].why


def test_explain_without_an_address_allows_on_condition_of_the_networks():
    e = explain(POLICIES["cluster-authenticated"], 80, client_identity=WEB, tls=True)
    assert e.allowed and e.condition == "if the client connects from the cluster networks"
    assert e.reason == "allowed by the default policy cluster-authenticated, if the client connects from the cluster networks"
    e = explain(POLICIES["web-only"], PORT, client_identity=WEB, tls=True)
    assert e.allowed and not e.condition


def test_explain_of_a_probe_request():
    wp = WorkloadPolicy("demo", "books", "deny", default_port_policy("deny", DEFAULT_CLUSTER_NETWORKS),
                        [PortPolicy(PORT, "books-api", "Server", "HTTP/1", [
                            Authorization("probe", kind="probe", unauthenticated=True,
                                          networks=[Network("0.0.0.0/0")], paths=["/ready"])])])
    assert explain(wp, PORT, client_ip="203.0.113.1", method="GET", path="/ready").authorization == "default:probe"
    e = explain(wp, PORT, client_ip="203.0.113.1")
    assert not e.allowed and e.reason == "Server books-api has no authorization (probes aside)"


def test_describe_authorization_says_who_from_where():
    assert describe_authorization(Authorization("web-only", identities=[WEB])) == f"web-only: {WEB} from anywhere"
    cluster = default_port_policy("cluster-unauthenticated", DEFAULT_CLUSTER_NETWORKS).authorizations[0]
    assert describe_authorization(cluster, DEFAULT_CLUSTER_NETWORKS) == \
        "default:cluster-unauthenticated: any client from the cluster networks"
    probe = Authorization("probe", kind="probe", unauthenticated=True, networks=[Network("0.0.0.0/0")],
                          paths=["/ready", "/live"])
    assert describe_authorization(probe) == "default:probe: GET/HEAD /live, /ready from 0.0.0.0/0"
