"""The upstreams of the hostile-peers loadtest: one good server and deliberately bad ones.

    python loadtests/hostile_upstreams.py --ports-file FILE [--max-seconds 600]

Runs in its own process (started by `loadtests/hostile.py`), so that its work does not share an
event loop with the load generator. Listens on loopback port 0 and writes the ports it got to
FILE as JSON, `{"good": P, "bad": P, "noread": P}`, once every server listens:

- good: HTTP/1.1 keep-alive, pipelining; `GET /good/big` answers 1 MiB, any other target
  answers `good <target> <request body length>\\n`, so that a client can tell that the answer
  it got is the one to its own request;
- bad: reads one request head, then misbehaves as its path says (see BEHAVIOURS);
- noread: accepts connections and never reads from them, never answers.

Every connection ends when its peer closes it, and the process exits after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import struct
import sys
from pathlib import Path

HOST = "127.0.0.1"
BIG_BYTES = 1 << 20
BIG_BODY = (b"0123456789abcdef" * (BIG_BYTES // 16))[:BIG_BYTES]
MAX_HEAD = 64 * 1024
# A stalling bad upstream keeps its connection at most this long: far longer than any proxy
# timeout of the loadtest, so only the proxy can be the one that ends it.
STALL_SECONDS = 300.0
_LINGER_RESET = struct.pack("ii", 1, 0)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)

# What the bad upstream does after reading a request head, by the request's path.
BEHAVIOURS = {
    "/bad/stall-head": "sends a head announcing 100 bytes, then nothing",
    "/bad/stall-body": "sends a head announcing 100 bytes and 3 of them, then nothing",
    "/bad/cl-more": "announces 5 bytes and sends 5, then a second response in the same write",
    "/bad/cl-less": "announces 100 bytes, sends 10 and closes",
    "/bad/reset": "announces 100000 bytes, sends 1000 and resets the connection",
    "/bad/no-answer": "reads the request and never answers",
    "/bad/garbage": "answers with bytes that are no HTTP response",
}


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """One request head, None at the end of the connection."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None


def target_of(head: bytes) -> str:
    parts = head.split(b" ", 2)
    return parts[1].decode("latin-1") if len(parts) > 2 else "/"


async def good(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while (head := await read_head(reader)) is not None:
        target = target_of(head)
        length = _CONTENT_LENGTH.search(head)
        body_length = int(length.group(1)) if length else 0
        if body_length:
            await reader.readexactly(body_length)
        body = BIG_BODY if target == "/good/big" else f"good {target} {body_length}\n".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()


async def wait_closed_by_peer(reader: asyncio.StreamReader) -> None:
    """Hold the connection until the proxy closes it (bounded by STALL_SECONDS)."""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(STALL_SECONDS):
            while await reader.read(65536):
                pass


async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while (head := await read_head(reader)) is not None:
        target = target_of(head)
        if target == "/bad/stall-head":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        elif target == "/bad/stall-body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        elif target == "/bad/cl-more":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
            )
            await writer.drain()
            continue  # as if keep-alive: the proxy must not take the second response
        elif target == "/bad/cl-less":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            await writer.drain()
            return
        elif target == "/bad/reset":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            await writer.drain()
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            writer.transport.abort()
            return
        elif target == "/bad/garbage":
            writer.write(b"\x00\x01 this is no HTTP \xff\r\n\r\n")
        await writer.drain()
        await wait_closed_by_peer(reader)
        return


async def serve(
    handler_name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    handler = good if handler_name == "good" else bad
    try:
        await handler(reader, writer)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.transport.abort()


async def noread(listener: socket.socket) -> None:
    """Accept and hold: the proxy's request stays in the socket buffers, never read."""
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    while True:
        conn, _ = await loop.sock_accept(listener)
        held.append(conn)  # closed with the process


async def main(ports_file: Path, max_seconds: float) -> None:
    servers = {
        name: await asyncio.start_server(
            lambda r, w, name=name: serve(name, r, w), HOST, 0, limit=MAX_HEAD, backlog=1024
        )
        for name in ("good", "bad")
    }
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen(1024)
    listener.setblocking(False)
    ports = {name: server.sockets[0].getsockname()[1] for name, server in servers.items()}
    ports["noread"] = listener.getsockname()[1]
    partial = ports_file.with_suffix(".tmp")
    partial.write_text(json.dumps(ports))
    os.replace(partial, ports_file)  # the reader never sees a half-written file
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max_seconds):
            await noread(listener)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ports-file", type=Path, required=True)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    asyncio.run(main(args.ports_file, args.max_seconds))
    sys.exit(0)
