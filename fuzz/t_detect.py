"""Protocol detection (proxy/detect.py): any first bytes get a verdict, never an exception.

Invariants: `classify` answers a Kind; a verdict other than NEED_MORE does not change when
more bytes arrive (the listener may call it with any prefix, depending on how the bytes
were split by the network); `client_hello` answers a ClientHello whose SNI is lower-case
ASCII without a trailing dot.
"""

from __future__ import annotations

from proxy import detect

INSTRUMENT = ("proxy.detect",)


def test_one_input(data: bytes) -> None:
    kind = detect.classify(data)
    assert isinstance(kind, detect.Kind), kind
    if kind is not detect.Kind.NEED_MORE:
        # The listener judges prefixes as they arrive: the first definite verdict must be
        # the one the whole stream gets.
        n = len(data)
        for cut in [*range(1, min(n, 48)), *range(48, n, max(1, n // 16))]:
            early = detect.classify(data[:cut])
            if early is not detect.Kind.NEED_MORE:
                assert early is kind, (cut, early, kind)
                break
    hello = detect.client_hello(data)
    assert isinstance(hello, detect.ClientHello)
    if hello.sni is not None:
        assert hello.complete and hello.valid
        assert hello.sni == hello.sni.lower() and not hello.sni.endswith("."), hello.sni
    for proto in hello.alpn:
        assert isinstance(proto, str)


def client_hello_bytes(sni: str, alpn: list[str]) -> bytes:
    """A real ClientHello, as the ssl module (OpenSSL) writes it."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def seeds() -> list[bytes]:
    return [
        b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
        b"\r\nPOST /api?x=1 HTTP/1.0\r\ncontent-length: 0\r\n\r\n",
        b"CONNECT books:8080 HTTP/1.1\r\n\r\n",
        detect.H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        b"\x16\x03\x01\x00",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"*1\r\n$4\r\nPING\r\n",
        client_hello_bytes("web.demo.serviceaccount.identity.tulle.cluster.local", ["tulle/1"]),
        client_hello_bytes("example.com.", ["h2", "http/1.1"]),
    ]
