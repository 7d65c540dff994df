"""Readiness probes, as the kubelet runs them: an HTTP GET (2xx/3xx is ready) or a TCP connect."""

from __future__ import annotations

import asyncio
from typing import Optional


async def http_get_status(host: str, port: int, path: str = "/ready", timeout: float = 1.0) -> Optional[int]:
    """The status code of `GET path`, or None when nothing answers in time."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: tulle-probe\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
            return int(parts[1])
        return None
    except (OSError, asyncio.TimeoutError, ValueError):
        return None
    finally:
        if writer is not None:
            writer.close()


async def http_get(host: str, port: int, path: str, timeout: float = 1.0,
                   limit: int = 1 << 20) -> Optional[tuple[int, bytes]]:
    """(status, body) of `GET path` (the body up to `limit` bytes), or None when nothing
    answers in time."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: tulle-probe\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()

        async def whole() -> bytes:
            data = b""
            while len(data) <= limit and (chunk := await reader.read(65536)):
                data += chunk
            return data

        raw = await asyncio.wait_for(whole(), timeout)
        head, _, body = raw.partition(b"\r\n\r\n")
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
            return int(parts[1]), body[:limit]
        return None
    except (OSError, asyncio.TimeoutError, ValueError):
        return None
    finally:
        if writer is not None:
            writer.close()


async def http_ready(host: str, port: int, path: str = "/ready", timeout: float = 1.0) -> bool:
    status = await http_get_status(host, port, path, timeout)
    return status is not None and 200 <= status < 400


async def tcp_ready(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)
