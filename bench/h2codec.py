"""CPU of the HTTP/2 codec per request + response, both ends, without any I/O.

    python -m bench.h2codec [--requests 20000] [--profile]

A client and a server session exchange a GET (6 header fields) and a 200 response with a
1 KiB body in memory, the way the proxy's adapters drive them: events out of feed(), the body
sent with send_data and consumed with consume(). Measured for the project's nghttp2 layer
(proxy.http2.H2Session) and for the pure-Python h2 library doing the same work (h2 is kept for
test clients). Also: 100 concurrent exchanges per round trip, and a 1 MiB upload across the
flow-control windows. Prints microseconds per exchange; figures only. --profile shows what
each nghttp2 callback (Python) costs per exchange.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import os
import platform
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import h2  # noqa: E402
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402

from proxy.http2 import _ffi  # noqa: E402
from proxy.http2.events import DataReceived, RequestReceived, StreamWritable  # noqa: E402
from proxy.http2.session import H2Session  # noqa: E402

BODY = b"x" * 1024
REQUEST = [(b":method", b"GET"), (b":path", b"/index"), (b":scheme", b"http"),
           (b":authority", b"svc.ns.svc.cluster.local:8080"), (b"user-agent", b"bench"),
           (b"accept", b"*/*")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"1024")]


def nghttp2_pair():
    c, s = H2Session(client=True), H2Session(client=False)
    for _ in range(3):
        s.feed(c.data_to_send())
        c.feed(s.data_to_send())
    return c, s


def nghttp2_exchanges(n: int, concurrent: int = 1) -> float:
    c, s = nghttp2_pair()
    t = time.perf_counter()
    for _ in range(n // concurrent):
        for _ in range(concurrent):
            c.send_request(REQUEST)
        for e in s.feed(c.data_to_send()):
            if e.__class__ is RequestReceived:
                s.send_response(e.stream_id, RESPONSE)
                s.send_data(e.stream_id, BODY, end_stream=True)
        for e in c.feed(s.data_to_send()):
            if e.__class__ is DataReceived:
                c.consume(e.stream_id, len(e.data))
        s.feed(c.data_to_send())
        s.pop_events()
    return (time.perf_counter() - t) / (n // concurrent * concurrent)


def h2_exchanges(n: int, concurrent: int = 1) -> float:
    cfg = dict(header_encoding=None)
    cc = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, **cfg))
    sc = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, **cfg))
    cc.initiate_connection()
    sc.initiate_connection()
    sc.receive_data(cc.data_to_send())
    cc.receive_data(sc.data_to_send())
    sc.receive_data(cc.data_to_send())
    t = time.perf_counter()
    for _ in range(n // concurrent):
        for _ in range(concurrent):
            cc.send_headers(cc.get_next_available_stream_id(), REQUEST, end_stream=True)
        for e in sc.receive_data(cc.data_to_send()):
            if isinstance(e, h2.events.RequestReceived):
                sc.send_headers(e.stream_id, RESPONSE)
                sc.send_data(e.stream_id, BODY, end_stream=True)
        for e in cc.receive_data(sc.data_to_send()):
            if isinstance(e, h2.events.DataReceived):
                cc.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        sc.receive_data(cc.data_to_send())
    return (time.perf_counter() - t) / (n // concurrent * concurrent)


POST = [(b":method", b"POST")] + REQUEST[1:]


def nghttp2_upload(size: int, rounds: int) -> float:
    """Seconds per POST of `size` bytes sent in 16 KiB chunks through 64 KiB stream windows:
    the sender honours send_data's backpressure, the receiver consumes what it got."""
    c, s = nghttp2_pair()
    chunk = b"u" * 16384
    t = time.perf_counter()
    for _ in range(rounds):
        sid = c.send_request(POST, end_stream=False)
        sent = received = 0
        writable = True
        while received < size:
            while writable and sent < size:
                sent += len(chunk)
                writable = c.send_data(sid, chunk, end_stream=sent >= size)
            for e in s.feed(c.data_to_send()):
                if e.__class__ is DataReceived:
                    received += len(e.data)
                    s.consume(e.stream_id, len(e.data))
            events = c.feed(s.data_to_send())  # also returns what c.data_to_send() caused
            writable = writable or any(e.__class__ is StreamWritable for e in events)
        s.send_response(sid, RESPONSE[:1], end_stream=True)
        c.feed(s.data_to_send())
        s.feed(c.data_to_send())
    return (time.perf_counter() - t) / rounds


def h2_upload(size: int, rounds: int) -> float:
    cc = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    sc = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    cc.initiate_connection()
    sc.initiate_connection()
    sc.receive_data(cc.data_to_send())
    cc.receive_data(sc.data_to_send())
    sc.receive_data(cc.data_to_send())
    chunk = b"u" * 16384
    t = time.perf_counter()
    for _ in range(rounds):
        sid = cc.get_next_available_stream_id()
        cc.send_headers(sid, POST)
        sent = received = 0
        while received < size:
            while sent < size and cc.local_flow_control_window(sid) >= len(chunk):
                sent += len(chunk)
                cc.send_data(sid, chunk, end_stream=sent >= size)
            for e in sc.receive_data(cc.data_to_send()):
                if isinstance(e, h2.events.DataReceived):
                    received += len(e.data)
                    sc.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            cc.receive_data(sc.data_to_send())
        sc.send_headers(sid, RESPONSE[:1], end_stream=True)
        cc.receive_data(sc.data_to_send())
        sc.receive_data(cc.data_to_send())
    return (time.perf_counter() - t) / rounds


def callback_profile(n: int) -> None:
    """Where the time of one exchange goes: nghttp2 callbacks (Python) vs the rest."""
    prof = cProfile.Profile()
    prof.enable()
    nghttp2_exchanges(n)
    prof.disable()
    stats = pstats.Stats(prof).stats
    print(f"per exchange (cProfile inflates Python calls; compare the shares, not the totals):")
    rows = []
    for (path, _, func), (cc, nc, tt, ct, _) in stats.items():
        if path.endswith("session.py") and func.startswith("_on_") or func == "_read_data":
            rows.append((func, nc / n, ct / nc * 1e6 if nc else 0.0))
    for func, calls, us in sorted(rows, key=lambda r: -r[1] * r[2]):
        print(f"  {func:24s} {calls:5.1f} calls  {us:6.2f} us each (with what it calls)")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    n = args.requests
    print(f"python {platform.python_version()} on {cpu_model()} ({os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}), nghttp2 {_ffi.VERSION}, h2 {h2.__version__}")
    gc.collect()
    nghttp2_exchanges(2000)
    h2_exchanges(200)
    if args.profile:
        callback_profile(n)
        prof = cProfile.Profile()
        prof.enable()
        nghttp2_exchanges(n)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return
    rounds = [nghttp2_exchanges(n) for _ in range(3)]
    best = min(rounds)
    print(f"proxy.http2 (nghttp2): {best * 1e6:6.1f} us per GET + 1 KiB response, both ends "
          f"(rounds: {', '.join(f'{r * 1e6:.1f}' for r in rounds)})")
    conc = min(nghttp2_exchanges(n, 100) for _ in range(3))
    print(f"proxy.http2 (nghttp2): {conc * 1e6:6.1f} us per exchange, 100 concurrent per round trip")
    h2n = max(200, n // 10)
    h2r = [h2_exchanges(h2n) for _ in range(3)]
    print(f"h2 (pure Python):      {min(h2r) * 1e6:6.1f} us per GET + 1 KiB response, both ends "
          f"(rounds: {', '.join(f'{r * 1e6:.1f}' for r in h2r)})")
    print(f"ratio h2 / proxy.http2: {min(h2r) / best:.1f}x")
    up = min(nghttp2_upload(1 << 20, 20) for _ in range(3))
    h2up = min(h2_upload(1 << 20, 3) for _ in range(3))
    print(f"1 MiB POST through 64 KiB windows, both ends: proxy.http2 {up * 1e3:.2f} ms "
          f"({(1 << 20) / up / 1e6:.0f} MB/s), h2 {h2up * 1e3:.2f} ms ({(1 << 20) / h2up / 1e6:.0f} MB/s)")


if __name__ == "__main__":
    main()
