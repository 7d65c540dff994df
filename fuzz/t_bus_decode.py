"""Every bus message decode (tulle/codec.py `decode` for each schema class of tulle/schemas.py,
and `decode_event` for CloudEvents): the first byte of the input picks the schema, the rest is
the payload, as a subscriber would receive it from NATS.

Invariants: decoding answers an instance of the class or raises DecodeError (the one error a
subscriber counts and drops; anything else would stop its watch); what decodes encodes back
to a payload that decodes to the same message.
"""

from __future__ import annotations

import dataclasses

from tulle import schemas
from tulle.codec import DecodeError, decode, encode

INSTRUMENT = ("tulle.codec", "tulle.schemas")

# Every top-level bus message: the dataclasses that carry a schema version.
MESSAGES = tuple(sorted((c for c in vars(schemas).values()
                         if isinstance(c, type) and dataclasses.is_dataclass(c) and hasattr(c, "VERSION")),
                        key=lambda c: c.__name__))
ALL = (*MESSAGES, schemas.CloudEvent)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    cls = ALL[data[0] % len(ALL)]
    payload = data[1:]
    try:
        msg = schemas.decode_event(payload) if cls is schemas.CloudEvent else decode(cls, payload)
    except DecodeError as e:
        assert e.reason in ("malformed", "not-object", "version", "field"), e.reason
        return
    assert isinstance(msg, cls)
    again = decode(cls, encode(msg))
    assert again == msg, (msg, again)


def examples() -> list:
    """One message of each kind, filled in as the services write them."""
    ident = "web.demo.serviceaccount.identity.tulle.cluster.local"
    return [
        schemas.EndpointSet("demo", "web", 80, [schemas.Endpoint("10.0.0.1", 8080, ident, "h2", labels={"app": "web"},
                                                                 proxy_port=4143)], cluster_ips=["10.96.0.9"]),
        schemas.Profile("demo", "web", "web.demo.svc.cluster.local", routes=[schemas.Route(
            "get /", schemas.RequestMatch(all_=[schemas.RequestMatch(method="GET"),
                                                schemas.RequestMatch(not_=schemas.RequestMatch(path_regex="/x"))]),
            [schemas.ResponseClass(schemas.ResponseMatch(status=schemas.StatusRange(500, 599)), True)], True, 300)],
            opaque_ports=[3306]),
        schemas.WorkloadPolicy("demo", "web-1", "all-unauthenticated",
                               default=schemas.PortPolicy(0, "default:all-unauthenticated"),
                               ports=[schemas.PortPolicy(8080, "web-http", "Server", "HTTP/1", [
                                   schemas.Authorization("from-web", identities=["*.demo.serviceaccount.identity.tulle.cluster.local"],
                                                         networks=[schemas.Network("10.0.0.0/8", ["10.1.0.0/16"])])])],
                               sources={"default_policy": "Namespace demo"}, warnings=["w"]),
        schemas.CertifyRequest(ident, "tok", "-----BEGIN CERTIFICATE REQUEST-----"),
        schemas.CertifyResponse(leaf="-----BEGIN CERTIFICATE-----", chain=["x"], expiry=1.5, serial="01"),
        schemas.CertifyResponse(error=schemas.CertifyError("unauthenticated", "bad token")),
        schemas.TrustBundle("-----BEGIN CERTIFICATE-----"),
        schemas.ProxyHeartbeat("demo", "web-1", "0.1.0", ident, True, trust_anchors=["ab"]),
        schemas.StatsRequest(workloads=["demo.web"]),
        schemas.StatsReply("demo", "web-1", 60.0, [schemas.RouteWindow("demo.backend", "[DEFAULT]", 3, 2, 4, 2,
                                                                        [1.0, 10.0], [1, 2, 0])]),
        schemas.TrafficRequest(),
        schemas.TrafficReply("demo", "web-1", ident, 60.0, [schemas.TrafficEdge("inbound", "demo", "web", ident, True,
                                                                                3, 2, 1)]),
        schemas.Lease("host-1-abc", "destination", 1.0),
        schemas.CloudEvent("1", "/tulle/proxy/demo.web", "dev.tulle.proxy.ready", "2026-01-01T00:00:00Z",
                           {"a": [1, {"b": None}]}, subject="x"),
    ]


def seeds() -> list[bytes]:
    out = []
    for msg in examples():
        out.append(bytes([ALL.index(type(msg))]) + encode(msg))
    return out
