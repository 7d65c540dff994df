"""The bounds' verdicts (proxy/limits.py) and their settings (proxy/config.py) — pure, no I/O."""

from __future__ import annotations

import socket

import pytest

from proxy import limits as bounds
from proxy.config import from_env
from proxy.limits import Limits
from proxy.listener import OpenSockets
from tulle import pki
from tulle.errors import UserError


@pytest.mark.parametrize("version, status, refused", [
    ("1.1", 200, False), ("1.0", 204, False), ("1.1", 100, False), ("1.1", 599, False),
    ("2.0", 200, True), ("0.9", 200, True), ("1.1", 0, True), ("1.1", 99, True), ("1.1", 600, True),
    ("1.1", 999, True),
])
def test_only_http_1x_status_lines_with_a_real_status_are_forwarded(version, status, refused):
    assert (bounds.response_line_error(version, status) is not None) is refused


def test_a_response_head_has_the_limits_a_request_head_has():
    limits = Limits(max_headers=100, max_head_bytes=16384)
    assert bounds.response_head_error(100, 16384, limits) is None
    assert "more than 100 headers" in bounds.response_head_error(101, 10, limits)
    assert "larger than 16384 bytes" in bounds.response_head_error(3, 16385, limits)


def test_interim_responses_and_pipelined_requests_are_counted_against_their_caps():
    limits = Limits(max_interim=10, max_pipeline=16)
    assert not bounds.too_many_interim(10, limits) and bounds.too_many_interim(11, limits)
    assert not bounds.pipeline_full(15, limits) and bounds.pipeline_full(16, limits)


def test_a_route_with_a_timeout_of_its_own_replaces_the_response_head_timeout():
    limits = Limits(response_head_timeout_s=60.0)
    assert bounds.response_head_timeout(False, limits) == 60.0
    assert bounds.response_head_timeout(True, limits) == 0.0  # the route's deadline governs


def test_clocks_expire_on_ticks_and_a_zero_timeout_never_does():
    assert not bounds.expired(3, 0.25, 1.0) and bounds.expired(4, 0.25, 1.0)
    assert not bounds.expired(10 ** 9, 1.0, 0.0)
    assert bounds.sweep_interval(10.0, 300.0, 60.0) == 1.0
    assert bounds.sweep_interval(0.5, 300.0) == 0.125
    assert bounds.sweep_interval(0.0, 0.001) == 0.01


def test_open_sockets_forgets_closed_ones_and_refuses_past_the_limit():
    clock = [0.0]
    opened = OpenSockets(limit=2, clock=lambda: clock[0])
    a, b, c = socket.socket(), socket.socket(), socket.socket()
    try:
        assert opened.admit(a) and opened.admit(b)
        assert not opened.admit(c)
        b.close()
        clock[0] += 1.0  # the full check is rate limited
        assert opened.admit(c) and opened.count() == 2
    finally:
        for s in (a, b, c):
            s.close()


def _env(**kw) -> dict:
    return {"TULLE_PROXY_NAMESPACE": "ns", "TULLE_PROXY_WORKLOAD": "w",
            "TULLE_PROXY_IDENTITY_TRUST_ANCHORS": pki.new_trust_anchor().cert_pem.decode(), **kw}


def test_every_bound_has_a_default_and_a_variable():
    cfg = from_env(_env())
    assert (cfg.max_pipelined_requests, cfg.max_interim_responses, cfg.max_connections,
            cfg.admin_max_connections, cfg.discovery_max_watches) == (16, 10, 10000, 64, 200)
    assert (cfg.request_body_idle_timeout_s, cfg.response_head_timeout_s, cfg.response_body_idle_timeout_s,
            cfg.tls_handshake_timeout_s, cfg.preamble_timeout_s, cfg.opaque_idle_timeout_s) == (60, 60, 60, 10, 10, 3600)
    assert (cfg.outbound_failfast_timeout_s, cfg.inbound_failfast_timeout_s) == (3.0, 1.0)
    assert (cfg.outbound_queue_capacity, cfg.inbound_queue_capacity, cfg.discovery_absent_ttl_s) == (10000, 10000, 5)
    assert cfg.profile_suffixes == ("svc.cluster.local.",)
    cfg = from_env(_env(TULLE_PROXY_MAX_PIPELINED_REQUESTS="4", TULLE_PROXY_RESPONSE_HEAD_TIMEOUT="2m",
                        TULLE_PROXY_OUTBOUND_FAILFAST_TIMEOUT="500ms", TULLE_PROXY_CLUSTER_DOMAIN="example.org",
                        TULLE_PROXY_DESTINATION_PROFILE_SUFFIXES="a.svc.example.org, b.svc.example.org.",
                        TULLE_PROXY_DESTINATION_PROFILE_NETWORKS="10.96.0.0/12"))
    assert (cfg.max_pipelined_requests, cfg.response_head_timeout_s, cfg.outbound_failfast_timeout_s) == (4, 120, 0.5)
    assert cfg.profile_suffixes == ("a.svc.example.org.", "b.svc.example.org.")
    assert cfg.profile_networks == ("10.96.0.0/12",)
    assert Limits.from_config(cfg).max_pipeline == 4


@pytest.mark.parametrize("name, value, message", [
    ("TULLE_PROXY_MAX_CONNECTIONS", "many", "TULLE_PROXY_MAX_CONNECTIONS: expected a whole number, got 'many'"),
    ("TULLE_PROXY_MAX_PIPELINED_REQUESTS", "0", "TULLE_PROXY_MAX_PIPELINED_REQUESTS: must be at least 1, got 0"),
    ("TULLE_PROXY_RESPONSE_HEAD_TIMEOUT", "soon", "TULLE_PROXY_RESPONSE_HEAD_TIMEOUT: expected seconds"),
    ("TULLE_PROXY_DESTINATION_PROFILE_NETWORKS", "10.0.0.0/33", "TULLE_PROXY_DESTINATION_PROFILE_NETWORKS: "),
    ("TULLE_PROXY_DESTINATION_PROFILE_SUFFIXES", "a..b", "TULLE_PROXY_DESTINATION_PROFILE_SUFFIXES: 'a..b'"),
])
def test_a_bad_bound_is_one_line_naming_the_variable(name, value, message):
    with pytest.raises(UserError) as e:
        from_env(_env(**{name: value}))
    assert str(e.value).startswith(message)
