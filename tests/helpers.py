"""Test doubles on real loopback sockets: a recording upstream, scripted raw upstreams, a raw
client that reads exactly one HTTP response, and a proxy started in-process on port 0; and for
protocol units, a fake transport that a client connection's bytes are fed through."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest

from proxy.config.loader import parse_config
from proxy.demo_fleet_processes import Redis as RedisServer
from proxy.demo_fleet_processes import free_port
from proxy.http.plane import DataPlane
from proxy.http.protocol import DownstreamProtocol
from proxy.routing.build import build_table
from proxy.server import Server
from proxy.upstream.connection import UpstreamConnection

ROOT = Path(__file__).resolve().parent.parent


def laneswitch_command() -> list[str]:
    """The installed `laneswitch` script next to this Python, else `python -m proxy`."""
    script = Path(sys.executable).parent / "laneswitch"
    if script.exists():
        return [str(script)]
    found = shutil.which("laneswitch")
    return [found] if found else [sys.executable, "-m", "proxy"]


async def spawn_laneswitch(
    *args: str,
    env: dict[str, str] | None = None,
    stdout: Any = None,
    stderr: Any = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """`laneswitch ARGS...` started in its own process from the repository root; its stderr is
    a pipe unless told otherwise, its stdout this process's."""
    return await asyncio.create_subprocess_exec(
        *laneswitch_command(), *args, cwd=ROOT, env=env, stdout=stdout, stderr=stderr
    )


async def run_cli(
    *args: str, timeout: float = 30, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """`laneswitch ARGS...` to its end (bounded): (exit status, stdout, stderr)."""
    process = await spawn_laneswitch(*args, env=env, stdout=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@dataclass
class ReceivedRequest:
    """One request exactly as an upstream received it."""

    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw_head: bytes = b""
    received_at: float = field(default_factory=time.time)  # Unix time its head began

    def header(self, name: str) -> bytes | None:
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[bytes]:
        lname = name.lower().encode()
        return [value for key, value in self.headers if key.lower() == lname]


Responder = Callable[[ReceivedRequest], bytes]


def ok_response(body: bytes = b"ok\n", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class _RecordingProtocol(asyncio.Protocol):
    def __init__(self, upstream: RecordingUpstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: ReceivedRequest | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.upstream.connections += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.current = ReceivedRequest(b"", b"", [], b"")

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        request = self.current
        assert request is not None and self.transport is not None
        self.upstream.requests.append(request)
        self.upstream.arrived.set()
        self.transport.write(self.upstream.responder(request))


@dataclass
class RecordingUpstream:
    """An HTTP/1.1 keep-alive upstream that records every request it receives."""

    name: str = "upstream"
    responder: Responder = field(default=lambda request: ok_response())
    requests: list[ReceivedRequest] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> RecordingUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _RecordingProtocol(self), "127.0.0.1", self.port
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)


class Upstreams:
    """The recording upstreams one test starts (the `upstreams` fixture stops them all at its
    end, whatever happened)."""

    def __init__(self) -> None:
        self.started: list[RecordingUpstream] = []

    async def start(
        self, name: str = "upstream", responder: Responder | None = None
    ) -> RecordingUpstream:
        upstream = (
            RecordingUpstream(name) if responder is None else RecordingUpstream(name, responder)
        )
        self.started.append(upstream)
        return await upstream.start()

    async def stop(self) -> None:
        for upstream in self.started:
            await upstream.stop()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_upstream(handler: RawHandler) -> AsyncIterator[str]:
    """A TCP server whose every connection runs `handler`: for scripted faults."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@dataclass
class ReadCounter:
    """Bytes the proxy's upstream connections have read from their sockets."""

    total: int = 0


def count_upstream_reads(monkeypatch: pytest.MonkeyPatch) -> ReadCounter:
    """Count every byte the proxy reads from upstream sockets from now on (connections made
    later). What a bound protects is what the proxy reads and holds: the bytes an upstream
    managed to write depend on how large the kernel lets socket buffers grow."""
    counter = ReadCounter()
    original = UpstreamConnection.data_received

    def counting(conn: UpstreamConnection, data: bytes) -> None:
        counter.total += len(data)
        original(conn, data)

    monkeypatch.setattr(UpstreamConnection, "data_received", counting)
    return counter


async def read_until_closed(
    reader: asyncio.StreamReader, timeout: float = 5.0
) -> tuple[bytes, bool]:
    """Everything the proxy sends until it ends the connection, and whether that was a reset
    (not a FIN)."""
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                piece = await reader.read(65536)
            except ConnectionResetError:
                return data, True
            if not piece:
                return data, False
            data += piece


def reset_on_close(writer: asyncio.StreamWriter) -> None:
    """Make the next close of this socket send RST instead of FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool  # the message ended by its framing, not by a dropped connection

    def header(self, name: str) -> bytes | None:
        lname = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


class _ResponseStream:
    """Every response on one connection, in order, however their bytes are split into reads.

    One parser lives as long as the connection, so two answers in one read are two responses.
    A response to HEAD ends at its head (the parser cannot know the request was HEAD); the
    next one gets a fresh parser.
    """

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.ready: deque[Response] = deque()
        self.head_requests: deque[bool] = deque()  # per awaited response: was it HEAD?
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.started = False  # a final response's head is complete and it has not ended

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            return
        self.started = True
        if status == 101 or (self.head_requests and self.head_requests[0]):
            self._finish(status)
            self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200 and self.started:
            self._finish(status)

    def _finish(self, status: int) -> None:
        self.ready.append(Response(status, self.headers, self.body, True))
        self.started = False
        if self.head_requests:
            self.head_requests.popleft()

    def cut(self) -> Response | None:
        """The response the connection ended inside, if any (complete=False)."""
        if not self.started:
            return None
        self.started = False
        return Response(self.parser.get_status_code(), self.headers, self.body, False)


async def read_response(
    reader: asyncio.StreamReader, head_request: bool = False, timeout: float = 5.0
) -> Response:
    """Read exactly one final response (interim 1xx are skipped) from a fresh `reader`."""
    stream = _ResponseStream()
    return await _next_response(reader, stream, head_request, timeout)


async def _next_response(
    reader: asyncio.StreamReader, stream: _ResponseStream, head_request: bool, timeout: float
) -> Response:
    stream.head_requests.append(head_request)
    async with asyncio.timeout(timeout):
        while not stream.ready:
            try:
                data = await reader.read(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                cut = stream.cut()
                if cut is not None:
                    return cut
                raise ConnectionError("connection closed before a response head")
            # On a 101 the response is complete; what follows is the tunnel.
            with contextlib.suppress(httptools.HttpParserUpgrade):
                stream.parser.feed_data(data)
    return stream.ready.popleft()


class Client:
    """A raw client connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.stream = _ResponseStream()

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, head_request: bool = False, timeout: float = 5.0) -> Response:
        """The next response on this connection (two answers in one read are two responses)."""
        return await _next_response(self.reader, self.stream, head_request, timeout)

    async def request(self, data: bytes, head_request: bool = False) -> Response:
        await self.send(data)
        return await self.response(head_request)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the proxy has closed the connection (reads EOF), draining what is left;
        then this side is closed too."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
        self.writer.close()
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def get(path: str = "/", host: str = "app.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


@dataclass
class RunningProxy:
    server: Server

    @property
    def port(self) -> int:
        return self.server.addresses[0][1]

    async def client(self) -> Client:
        return await Client.connect(self.port)

    def stats(self, service: str, version: str):  # type: ignore[no-untyped-def]
        return self.server.plane.stats.get(service, version)


def two_version_config(
    blue: str,
    green: str,
    blue_weight: int = 90,
    green_weight: int = 10,
    extra_service: str = "",
    extra_top: str = "",
) -> str:
    return f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
{extra_top}
services:
  shop:
    versions:
      blue: {{endpoints: ["{blue}"], weight: {blue_weight}}}
      green: {{endpoints: ["{green}"], weight: {green_weight}}}
    version_header: X-App-Version
{extra_service}
"""


def only_blue(endpoint: str, extra_top: str = "") -> str:
    """All traffic to one upstream (green shares the endpoint but gets weight 0)."""
    return two_version_config(endpoint, endpoint, 100, 0, extra_top=extra_top)


@contextlib.asynccontextmanager
async def running_proxy(config_text: str) -> AsyncIterator[RunningProxy]:
    server = Server(parse_config(config_text, env={}))
    await server.start()
    try:
        yield RunningProxy(server)
    finally:
        await server.stop(drain_timeout=0.5)


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[RedisServer]:
    server = await RedisServer().start()
    try:
        yield server
    finally:
        await server.stop()


@dataclass
class TrapRelay:
    """A TCP relay on loopback in front of a server (here: one member's Redis) that cuts the
    link the moment a client sends bytes containing `trap` (once armed): from then on nothing
    passes in either direction and no connection is closed, as if the member froze or was cut
    off exactly there; the trapped bytes are held. `release()` delivers them to the server late
    and returns what it answered; then everything passes again."""

    target_port: int
    trap: bytes | None = None  # armed when set
    port: int = 0
    server: asyncio.Server | None = None
    trapped: asyncio.Event = field(default_factory=asyncio.Event)
    passing: asyncio.Event = field(default_factory=asyncio.Event)
    held: tuple[bytes, asyncio.StreamWriter] | None = None
    trapped_link: asyncio.StreamWriter | None = None
    answer: asyncio.Future[bytes] | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> TrapRelay:
        self.passing.set()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.passing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        loop = asyncio.get_running_loop()
        self.tasks |= {
            loop.create_task(self._pump(up_reader, writer, up=None, link=up_writer)),
            loop.create_task(self._pump(reader, up_writer, up=up_writer, link=up_writer)),
        }

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        up: asyncio.StreamWriter | None,
        link: asyncio.StreamWriter,
    ) -> None:
        """Bytes from `source` to `sink`; `up` is set on the client-to-server direction, `link`
        (the writer to the server) names the connection."""
        try:
            while data := await source.read(65536):
                if up is not None and self.trap is not None and self.trap in data:
                    self.trap = None
                    self.passing.clear()
                    self.held = (data, up)
                    self.trapped_link = up
                    self.answer = asyncio.get_running_loop().create_future()
                    self.trapped.set()
                    return
                if up is None and link is self.trapped_link and self.answer is not None:
                    # The server's answer to the held bytes: for `release`, not the client.
                    if not self.answer.done():
                        self.answer.set_result(data)
                    continue
                await self.passing.wait()
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if up is None or link is not self.trapped_link:
                sink.close()

    async def release(self, timeout: float = 5.0) -> bytes:
        """Deliver the held bytes; the server's answer to them."""
        assert self.held is not None and self.answer is not None
        data, up_writer = self.held
        self.held = None
        up_writer.write(data)
        await up_writer.drain()
        answer = await asyncio.wait_for(self.answer, timeout)
        up_writer.close()
        self.passing.set()
        return answer

    async def stop(self) -> None:
        self.passing.set()
        if self.server is not None:
            self.server.close()
        for task in self.tasks:
            task.cancel()


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait (bounded) for a condition on state the proxy updates from its own callbacks."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


@contextlib.contextmanager
def refused_endpoint() -> Iterator[str]:
    """A port that is bound (so nobody else takes it) but not listening: connects are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# -- protocol units: a client connection fed raw bytes --------------------------------------------


class FakeTransport:
    """Stands in for a client's socket: records what the proxy writes and does to it."""

    def __init__(self, peer: tuple[str, int] = ("192.0.2.7", 40000)) -> None:
        self.peer = peer
        self.written = bytearray()
        self.reading = True
        self.eof_written = False
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.is_closing() or not data, "write after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def responses(self) -> list[Response]:
        """Every complete response written so far, in order."""
        stream = _ResponseStream()
        stream.parser.feed_data(bytes(self.written))
        return list(stream.ready)


@dataclass
class FedConnection:
    """One client connection of a real data plane, its socket a `FakeTransport`."""

    plane: DataPlane
    protocol: DownstreamProtocol
    transport: FakeTransport

    def feed(self, data: bytes) -> None:
        self.protocol.data_received(data)


def fed_connection(config_text: str) -> FedConnection:
    """A data plane for `config_text` (on the running loop) and one client connection of it."""
    table = build_table(parse_config(config_text, env={}))
    plane = DataPlane(asyncio.get_running_loop(), table)
    protocol = plane.protocol()
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return FedConnection(plane, protocol, transport)


def version_responder(name: str) -> Responder:
    """An upstream answering every request with its own name (the version that served)."""
    return lambda request: ok_response(name.encode())


@dataclass
class Member:
    """One `laneswitch run` process of a fleet, on fixed free loopback ports, logging to a file
    (a pipe nobody reads would block it)."""

    name: str
    config: Path
    data_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def log(self) -> Path:
        return self.config.with_suffix(".log")

    async def start(self, *, ready: bool = True, timeout: float = 20.0) -> Member:
        text = self.config.read_text()
        text = text.replace("DATA_PORT", str(self.data_port))
        text = text.replace("ADMIN_PORT", str(self.admin_port))
        self.config.write_text(text)
        with self.log.open("ab") as log:
            self.process = await spawn_laneswitch("run", "-c", str(self.config), stderr=log)
        if ready:
            await self.wait_ready(timeout)
        return self

    async def wait_ready(self, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                assert self.process is not None and self.process.returncode is None, (
                    self.log.read_text()[-3000:]
                )
                try:
                    status, _ = await admin_call(self.admin_port, "GET", "/readyz")
                except OSError:
                    status = 0
                if status == 200:
                    return
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)


async def admin_call(
    port: int,
    method: str,
    path: str,
    body: object = None,
    timeout: float = 10.0,
    token: str | None = None,
) -> tuple[int, dict]:  # type: ignore[type-arg]
    """One admin API call on loopback (with `token` as its bearer token): (status, decoded
    JSON or {})."""
    import json as _json

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = _json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        if token is not None:
            head += f"Authorization: Bearer {token}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        head += f"Content-Length: {len(data)}\r\n\r\n"
        writer.write(head.encode() + data)
        response = await read_response(reader, timeout=timeout)
    finally:
        writer.close()
    try:
        decoded = _json.loads(response.body) if response.body else {}
    except ValueError:
        decoded = {}
    return response.status, decoded


def fleet_config(
    path: Path,
    member: str,
    redis_url: str,
    blue: str,
    green: str,
    *,
    lease: str = "2s",
    ack_timeout: str = "2s",
    weights: tuple[int, int] = (100, 0),
    service_extra: str = "",
    top_extra: str = "",
    versions_extra: str = "",
) -> Path:
    """A member's config: blue and green of service `shop`, in the fleet `shop` on `redis_url`
    (ports filled in by `Member.start`)."""
    path.write_text(
        f"""
listen: 127.0.0.1:DATA_PORT
admin: {{listen: 127.0.0.1:ADMIN_PORT}}
drain_timeout: 1s
fleet:
  {{redis: "{redis_url}", name: shop, member: {member}, lease: {lease}, ack_timeout: {ack_timeout}}}
{top_extra}
services:
  shop:
    versions:
      blue: {{endpoints: ["{blue}"], weight: {weights[0]}}}
      green: {{endpoints: ["{green}"], weight: {weights[1]}}}
{versions_extra}
    version_header: X-App-Version
{service_extra}
"""
    )
    return path


@dataclass
class Traffic:
    """Requests in a loop through one proxy port, on keep-alive connections, counting each
    answer by status and body until `stop()`."""

    port: int
    answers: dict[tuple[int, bytes], int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    pause: float = 0.005  # between requests: a steady rate, not a flood

    def start(self) -> Traffic:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        client: Client | None = None
        try:
            while True:
                try:
                    if client is None:
                        client = await Client.connect(self.port)
                    response = await client.request(get())
                    key = (response.status, response.body)
                    self.answers[key] = self.answers.get(key, 0) + 1
                    if response.header("Connection") == b"close":
                        await client.close()
                        client = None
                except (OSError, ConnectionError, TimeoutError) as exc:
                    self.errors.append(repr(exc))
                    if client is not None:
                        await client.close()
                    client = None
                await asyncio.sleep(self.pause)
        finally:
            # Stopped (cancelled) between or inside requests: the connection in use closes too.
            if client is not None:
                client.writer.close()

    def count(self, status: int | None = None, body: bytes | None = None) -> int:
        return sum(
            n
            for (code, text), n in self.answers.items()
            if (status is None or code == status) and (body is None or text == body)
        )

    @property
    def failed(self) -> int:
        return len(self.errors) + sum(n for (code, _), n in self.answers.items() if code >= 500)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class Fleet:
    redis: RedisServer
    blue: RecordingUpstream
    green: RecordingUpstream
    members: list[Member]
    tmp: Path

    def member(self, name: str, redis: str | None = None, **options: object) -> Member:
        config = fleet_config(
            self.tmp / f"{name}.yaml",
            name,
            redis or self.redis.url,
            self.blue.endpoint,
            self.green.endpoint,
            **options,  # type: ignore[arg-type]
        )
        member = Member(name, config)
        self.members.append(member)
        return member


@contextlib.asynccontextmanager
async def running_fleet(tmp: Path, green: Responder | None = None) -> AsyncIterator[Fleet]:
    """A redis-server, upstreams blue and green (answering with their names), and the members
    the test adds with `Fleet.member(...)` and starts; all stopped at the end."""
    blue_upstream = await RecordingUpstream("blue", version_responder("blue")).start()
    green_upstream = await RecordingUpstream("green", green or version_responder("green")).start()
    async with redis_server() as redis:
        found = Fleet(redis, blue_upstream, green_upstream, [], tmp)
        try:
            yield found
        finally:
            await asyncio.gather(*(m.stop() for m in found.members))
            await blue_upstream.stop()
            await green_upstream.stop()


async def served_by(port: int, requests: int = 20) -> set[bytes]:
    """The bodies (here: version names) of `requests` answers through a proxy port."""
    client = await Client.connect(port)
    try:
        seen = set()
        for _ in range(requests):
            response = await client.request(get())
            assert response.status == 200
            seen.add(response.body)
        return seen
    finally:
        await client.close()


@dataclass
class LaneswitchProcess:
    """`laneswitch run -c FILE` in its own process, with the ports it printed."""

    process: asyncio.subprocess.Process
    port: int  # the first data listener
    admin_url: str

    @property
    def stderr(self) -> asyncio.StreamReader:
        assert self.process.stderr is not None
        return self.process.stderr

    async def stop(self, timeout: float = 15) -> int:
        """SIGTERM (if still running); the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout)


async def wait_for_line(stream: asyncio.StreamReader, pattern: str, timeout: float = 15) -> str:
    """The first line of `stream` matching `pattern` (lines before it are consumed)."""
    regex = re.compile(pattern)
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"process ended before printing {pattern!r}")
            if regex.search(line):
                return line


async def start_laneswitch(config: Path) -> LaneswitchProcess:
    """Run the proxy of `config` (listen and admin on 127.0.0.1 port 0) until it listens."""
    process = await spawn_laneswitch("run", "-c", str(config))
    assert process.stderr is not None
    try:
        line = await wait_for_line(process.stderr, r"admin API on 127\.0\.0\.1:(\d+)")
        admin = re.search(r"127\.0\.0\.1:(\d+)", line)
        line = await wait_for_line(process.stderr, r"listening on 127\.0\.0\.1:(\d+)")
        data = re.search(r"127\.0\.0\.1:(\d+)", line)
    except BaseException:
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise
    assert admin is not None and data is not None
    return LaneswitchProcess(process, int(data.group(1)), f"http://127.0.0.1:{admin.group(1)}")
