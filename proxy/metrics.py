"""The proxy's metric families, named as Linkerd's (linkerd-facts §11).

Label values are bounded: resolved namespace/service names (or ""), identities, status
codes, fixed error reasons — never a raw Host, path or header value. The hot path never
builds label tuples: a `Labels` object resolves its children once and caches them per
status code, so a request costs a few attribute adds.
"""

from __future__ import annotations

from tulle.metrics import REGISTRY, Registry

BASE = ("direction", "dst_namespace", "dst_service", "tls", "client_id", "server_id")


class ProxyMetrics:
    def __init__(self, registry: Registry = REGISTRY):
        r = registry
        self.registry = r
        self.request_total = r.counter("request_total", "HTTP requests the proxy received", BASE)
        self.response_total = r.counter(
            "response_total", "HTTP responses, by status code and classification", BASE + ("status_code", "classification"))
        self.response_latency_ms = r.histogram(
            "response_latency_ms", "Time from request start to the response's first byte, in milliseconds",
            BASE + ("status_code",))
        self.tcp_open_total = r.counter("tcp_open_total", "TCP connections opened", BASE)
        self.tcp_close_total = r.counter("tcp_close_total", "TCP connections closed", BASE)
        self.tcp_open_connections = r.gauge("tcp_open_connections", "TCP connections open now", BASE)
        self.tcp_read_bytes_total = r.counter("tcp_read_bytes_total", "Bytes read from the peer (counted at close)", BASE)
        self.tcp_write_bytes_total = r.counter("tcp_write_bytes_total", "Bytes written to the peer (counted at close)", BASE)
        self.http_errors = {
            "inbound": r.counter("inbound_http_errors_total", "HTTP errors the inbound proxy answered itself", ("error",)),
            "outbound": r.counter("outbound_http_errors_total", "HTTP errors the outbound proxy answered itself", ("error",)),
        }
        self.tcp_errors = {
            "inbound": r.counter("inbound_tcp_errors_total", "Connections the inbound proxy refused or failed", ("error",)),
            "outbound": r.counter("outbound_tcp_errors_total", "Connections the outbound proxy refused or failed", ("error",)),
        }
        self.http2_errors = r.counter(
            "http2_errors_total", "What HTTP/2 peers did that the proxy refused (RFC 9113 errors it answered, "
            "floods, oversized header sections), by reason", ("direction", "peer", "reason"))
        self.detect_total = r.counter("protocol_detect_total", "Accepted connections by detected protocol",
                                      ("direction", "protocol"))
        self._labels: dict[tuple[str, ...], Labels] = {}

    def labels(self, direction: str, dst_namespace: str = "", dst_service: str = "", tls: str = "no_identity",
               client_id: str = "", server_id: str = "") -> "Labels":
        key = (direction, dst_namespace, dst_service, tls, client_id, server_id)
        lab = self._labels.get(key)
        if lab is None:
            lab = self._labels[key] = Labels(self, key)
        return lab

    def all_labels(self) -> list["Labels"]:
        """Every label combination counted so far (read by proxy/traffic_stats.py once a second)."""
        return list(self._labels.values())

    def http_error(self, direction: str, error: str) -> None:
        self.http_errors[direction].labels(error).inc()

    def http2_error(self, direction: str, peer: str, reason: str) -> None:
        """`peer`: "src" (the client of this connection) or "dst" (the server upstream);
        `reason`: one of proxy.http2.events.REASONS (bounded)."""
        self.http2_errors.labels(direction, peer, reason).inc()

    def tcp_error(self, direction: str, error: str) -> None:
        self.tcp_errors[direction].labels(error).inc()


class Labels:
    """The metric children of one (direction, destination, tls, peer) combination."""

    __slots__ = ("m", "key", "requests", "_by_status", "tcp_open", "tcp_close", "tcp_gauge", "tcp_read", "tcp_write")

    def __init__(self, m: ProxyMetrics, key: tuple[str, ...]):
        self.m = m
        self.key = key
        self.requests = m.request_total.labels(*key)
        self._by_status: dict[int, tuple] = {}
        self.tcp_open = self.tcp_close = self.tcp_gauge = self.tcp_read = self.tcp_write = None

    def response(self, status: int, failure: bool | None = None) -> tuple:
        """(response_total child, latency histogram child) for a status; classification 5xx = failure by default."""
        cache_key = status if failure is None else (status, failure)
        got = self._by_status.get(cache_key)
        if got is None:
            if failure is None:
                failure = status >= 500
            code = str(status)
            got = (self.m.response_total.labels(*self.key, code, "failure" if failure else "success"),
                   self.m.response_latency_ms.labels(*self.key, code))
            self._by_status[cache_key] = got
        return got

    def totals(self) -> tuple[int, int, int, list[int], int, int, int, int]:
        """(requests, successes, failures, latency counts per bucket (+Inf last), TCP opened,
        TCP open now, bytes read, bytes written) so far — cumulative, for the traffic windows
        (proxy/traffic_stats.py), which read them once a second, never on the request path.
        Children shared by two cache entries (a status with and without an explicit
        classification) are counted once."""
        successes = failures = 0
        latency = [0] * (len(self.m.response_latency_ms.bounds) + 1)
        seen: set[int] = set()
        for cache_key, (resp, hist) in list(self._by_status.items()):
            if id(resp) not in seen:
                seen.add(id(resp))
                failed = cache_key[1] if isinstance(cache_key, tuple) else cache_key >= 500
                if failed:
                    failures += resp.value
                else:
                    successes += resp.value
            if id(hist) not in seen:
                seen.add(id(hist))
                for i, n in enumerate(hist.counts):
                    latency[i] += n
        if self.tcp_open is None:
            return self.requests.value, successes, failures, latency, 0, 0, 0, 0
        return (self.requests.value, successes, failures, latency, self.tcp_open.value, self.tcp_gauge.value,
                self.tcp_read.value, self.tcp_write.value)

    def tcp_opened(self) -> None:
        if self.tcp_open is None:
            m = self.m
            self.tcp_open = m.tcp_open_total.labels(*self.key)
            self.tcp_close = m.tcp_close_total.labels(*self.key)
            self.tcp_gauge = m.tcp_open_connections.labels(*self.key)
            self.tcp_read = m.tcp_read_bytes_total.labels(*self.key)
            self.tcp_write = m.tcp_write_bytes_total.labels(*self.key)
        self.tcp_open.value += 1
        self.tcp_gauge.value += 1

    def tcp_closed(self, read: int, written: int) -> None:
        self.tcp_close.value += 1
        self.tcp_gauge.value -= 1
        self.tcp_read.value += read
        self.tcp_write.value += written
