"""A raw HTTP/1.1 client for hostile requests that aiohttp's own client refuses to send.

aiohttp (and every well-behaved client) will not put raw non-ASCII bytes in a header or send a
body that contradicts its declared encoding; attackers and broken proxies do. This writes the
request bytes exactly as given and reads the whole response (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def build(
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> bytes:
    """The bytes of one request; ``Host``, ``Content-Length`` and ``Connection`` are added."""
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers or []]
    lines += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def send(host: str, port: int, request: bytes) -> RawResponse:
    """Write ``request`` to ``host:port`` and parse the response."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(30):
            data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in header_lines if ": " in line]
    return RawResponse(int(status_line.split(" ")[1]), headers, body)  # type: ignore[arg-type]


async def request(
    host: str,
    port: int,
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> RawResponse:
    return await send(host, port, build(method, target, headers, body))
