"""Every bus message decodes strictly: bad payloads become typed errors, never exceptions of another kind."""

import pytest

from tulle import schemas
from tulle.codec import DecodeError, decode, encode

GOOD = [
    schemas.EndpointSet("demo", "web", 80, [schemas.Endpoint("10.0.0.1", 8080, "web.demo.serviceaccount.identity.tulle.cluster.local", "h2", labels={"pod": "web-1"})]),
    schemas.Profile("demo", "web", "web.demo.svc.cluster.local", routes=[schemas.Route(
        "get /", schemas.RequestMatch(all_=[schemas.RequestMatch(method="GET"), schemas.RequestMatch(not_=schemas.RequestMatch(path_regex="/x"))]),
        [schemas.ResponseClass(schemas.ResponseMatch(status=schemas.StatusRange(500, 599)), True)], True, 300)]),
    schemas.WorkloadPolicy("demo", "web-1", "all-unauthenticated",
                           default=schemas.PortPolicy(0, "default:all-unauthenticated"),
                           ports=[schemas.PortPolicy(8080, "web-http", "Server", "HTTP/1", [
                               schemas.Authorization("from-web", identities=["*.demo.serviceaccount.identity.tulle.cluster.local"],
                                                     networks=[schemas.Network("10.0.0.0/8", ["10.1.0.0/16"])])])]),
    schemas.CertifyRequest("a.b.serviceaccount.identity.tulle.cluster.local", "tok", "-----BEGIN CERTIFICATE REQUEST-----"),
    schemas.CertifyResponse(error=schemas.CertifyError("unauthenticated", "bad token")),
    schemas.TrustBundle("-----BEGIN CERTIFICATE-----"),
    schemas.ProxyHeartbeat("demo", "web-1", "0.1.0", "x", True),
    schemas.StatsReply("demo", "web-1", 60.0, [schemas.RouteWindow("demo.backend", "[DEFAULT]", 3, 2, 4, 2)]),
]


@pytest.mark.parametrize("msg", GOOD, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert decode(type(msg), encode(msg)) == msg


def test_python_keyword_fields_use_plain_names_on_the_wire():
    wire = encode(schemas.Network("10.0.0.0/8", ["10.1.0.0/16"]))
    assert b'"except"' in wire and b"except_" not in wire


@pytest.mark.parametrize("payload,reason", [
    (b"{not json", "malformed"),
    (b'{"v": 1, "namespace": "demo"', "malformed"),  # truncated
    (b"", "malformed"),
    (b"[1, 2]", "not-object"),
    (b'"text"', "not-object"),
    (b'{"namespace": "demo", "service": "web", "port": 80, "endpoints": []}', "version"),  # no v
    (b'{"v": 2, "namespace": "demo", "service": "web", "port": 80, "endpoints": []}', "version"),
    (b'{"v": true, "namespace": "demo", "service": "web", "port": 80, "endpoints": []}', "version"),
    (b'{"v": 1, "namespace": "demo", "service": "web", "endpoints": []}', "field"),  # missing port
    (b'{"v": 1, "namespace": "demo", "service": "web", "port": "80", "endpoints": []}', "field"),  # wrong type
    (b'{"v": 1, "namespace": "demo", "service": "web", "port": 80, "endpoints": {}}', "field"),
    (b'{"v": 1, "namespace": "demo", "service": "web", "port": 80, "endpoints": [{"address": 1, "port": 2}]}', "field"),
    (b'{"v": 1, "namespace": "demo", "service": "web", "port": 80, "endpoints": [{"address": "a", "port": 2, "protocol_hint": "h3"}]}', "field"),
    (b'{"v": 1, "namespace": "demo", "service": "web", "port": true, "endpoints": []}', "field"),
])
def test_bad_payloads_are_typed_errors(payload, reason):
    with pytest.raises(DecodeError) as e:
        decode(schemas.EndpointSet, payload)
    assert e.value.reason == reason
    assert "EndpointSet" in str(e.value)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    msg = decode(schemas.TrustBundle, b'{"v": 1, "anchors_pem": "x", "new_field": [1]}')
    assert msg.anchors_pem == "x"


def test_nested_recursive_matches_are_checked():
    bad = b'{"v":1,"namespace":"d","service":"s","fqdn":"f","routes":[{"name":"r","condition":{"not":{"method":5}}}]}'
    with pytest.raises(DecodeError) as e:
        decode(schemas.Profile, bad)
    assert "routes[0].condition.not.method" in str(e.value)


def test_ip_endpoint_keys_are_valid_kv_keys():
    assert schemas.ip_endpoints_key("10.96.0.1", 80) == "_ip.10-96-0-1.80"
    assert schemas.ip_endpoints_key("fd00::1", 80) == "_ip.fd00--1.80"


def test_cloud_event_requires_its_core_attributes():
    with pytest.raises(DecodeError):
        schemas.decode_event(b'{"id": "1", "source": "/x", "time": "t", "data": {}}')
    ev = schemas.decode_event(b'{"specversion": "1.0", "id": "1", "source": "/x", "type": "t", "time": "t", "data": {}}')
    assert ev.type == "t"
