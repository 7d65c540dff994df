"""The proxy's resource bounds and the decisions they make — pure, tested without I/O.

Every bound the proxy enforces on a connection lives in `Limits` (one object per
direction, built from ProxyConfig), and every verdict that compares a peer's behaviour
with a bound is a small function here, so the wire adapters (proxy/http1/, proxy/http2/,
proxy/tcp.py, proxy/listener.py) only count and act:

- heads, both ways: bytes (counted across reads), header count, a valid HTTP/1.x status
  line, at most `max_interim` 1xx responses before the final one;
- pipelining: at most `max_pipeline` requests read ahead of the one being answered;
- time: the request head (408), the request body going idle (408, or close once the
  response started), the response head (504; a profile route's own timeout replaces it),
  the response body going idle (close), keep-alive idle, opaque connections idle.

Timers are driven by a sweeper that calls every connection's `tick(interval)` (no timer per
request); a clock is a count of ticks that some progress resets.
"""

from __future__ import annotations

from typing import Any

VALID_VERSIONS = frozenset({"1.0", "1.1"})


class Limits:
    """The bounds of one direction's HTTP/1 connections (attribute reads on the hot path)."""

    __slots__ = ("max_headers", "max_head_bytes", "header_timeout_s", "idle_timeout_s", "max_pipeline",
                 "max_interim", "body_idle_timeout_s", "response_head_timeout_s", "response_idle_timeout_s")

    def __init__(self, max_headers: int = 100, max_head_bytes: int = 65536, header_timeout_s: float = 10.0,
                 idle_timeout_s: float = 300.0, *, max_pipeline: int = 16, max_interim: int = 10,
                 body_idle_timeout_s: float = 60.0, response_head_timeout_s: float = 60.0,
                 response_idle_timeout_s: float = 60.0):
        self.max_headers = max_headers
        self.max_head_bytes = max_head_bytes
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_pipeline = max_pipeline  # requests read ahead of the one being answered
        self.max_interim = max_interim  # 1xx responses passed on before the final one
        self.body_idle_timeout_s = body_idle_timeout_s
        self.response_head_timeout_s = response_head_timeout_s
        self.response_idle_timeout_s = response_idle_timeout_s

    @classmethod
    def from_config(cls, cfg: Any) -> "Limits":
        return cls(cfg.max_headers, cfg.max_header_bytes, cfg.header_read_timeout_s, cfg.idle_timeout_s,
                   max_pipeline=cfg.max_pipelined_requests, max_interim=cfg.max_interim_responses,
                   body_idle_timeout_s=cfg.request_body_idle_timeout_s,
                   response_head_timeout_s=cfg.response_head_timeout_s,
                   response_idle_timeout_s=cfg.response_body_idle_timeout_s)

    def timeouts(self) -> tuple[float, ...]:
        """Every timeout the sweeper must be fine-grained enough for."""
        return (self.header_timeout_s, self.idle_timeout_s, self.body_idle_timeout_s, self.response_head_timeout_s,
                self.response_idle_timeout_s)


def expired(ticks: int, interval: float, timeout: float) -> bool:
    """A clock of `ticks` sweeps of `interval` seconds has run out (a timeout of 0 is off)."""
    return timeout > 0 and ticks * interval >= timeout


def sweep_interval(*timeouts: float, most: float = 1.0, least: float = 0.01) -> float:
    """How often to sweep so that every timeout fires within a quarter of its length."""
    finite = [t for t in timeouts if t > 0]
    return max(min([most, *(t / 4 for t in finite)]), least)


# --- response heads ------------------------------------------------------------------------


def response_line_error(version: str, status: int) -> str | None:
    """Why a response's status line is not one to forward, or None when it is fine.

    llhttp reads `HTTP/2.0 200` and status codes such as 000 or 999 without complaint; an
    HTTP/1 proxy must not pass them on as if they were HTTP/1.x responses.
    """
    if version not in VALID_VERSIONS:
        return f"upstream answered with HTTP/{version}, not HTTP/1.x"
    if not 100 <= status <= 599:
        return f"upstream answered with status code {status}"
    return None


def response_head_error(nheaders: int, head_bytes: int, limits: Limits) -> str | None:
    """Why a response head (so far) exceeds the bounds a request head has, or None."""
    if nheaders > limits.max_headers:
        return f"upstream response has more than {limits.max_headers} headers"
    if head_bytes > limits.max_head_bytes:
        return f"upstream response head is larger than {limits.max_head_bytes} bytes"
    return None


def too_many_interim(count: int, limits: Limits) -> bool:
    """`count` 1xx responses were received for one request: more than the proxy passes on?"""
    return count > limits.max_interim


def pipeline_full(queued: int, limits: Limits) -> bool:
    """`queued` requests already wait behind the one being answered: may another be read?"""
    return queued >= limits.max_pipeline


def response_head_timeout(route_deadline: bool, limits: Limits) -> float:
    """How long an upstream may take to send a response head (0 = no bound of this kind).

    A request on a profile route with a timeout of its own is bounded by that deadline
    instead, whichever is longer: the operator's route configuration wins.
    """
    return 0.0 if route_deadline else limits.response_head_timeout_s
