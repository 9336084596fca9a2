"""Drive the real data plane with arbitrary client and upstream byte streams, no sockets.

One input is split into sections (see `split`): two clients' request streams, the upstream's
response templates, and a schedule that decides, step by step, who sends how many bytes, when
a transport's writes block, when a side half-closes, resets, or a deadline passes. The client
connections are real `DownstreamProtocol`s of a real `DataPlane`; the upstream connections are
real `UpstreamConnection`s from its pools; only the transports are fakes, and the event loop is
stepped by hand, so a run is deterministic.

The upstream answers every request head it receives with the next template, its `@@` replaced by
a tag naming the client that sent the request and the request's serial number. A reference parse
of the expanded response finds where its framing ends; tags in bytes past that end are turned
into poison tags. Checked (an AssertionError is a finding):
- no exception escapes a callback, no error is logged, no task fails;
- a client receives only its own tags, in order, and never a poison tag (bytes an upstream sent
  beyond its response's end must reach nobody);
- every bound holds: a read that leaves a buffer over its bound has paused that side's reading;
- after the input ends and every connection closes, nothing is left: no connection, no request
  in flight, no busy upstream connection, no task.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from typing import Any

import httptools

from proxy.config.loader import parse_config
from proxy.http import protocol as client_protocol
from proxy.http import request_parsing
from proxy.http.exchange import MAX_BUFFERED_BODY
from proxy.http.plane import DataPlane
from proxy.routing.build import build_table
from proxy.upstream import connection as upstream_connection
from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.pool import UpstreamPool, UpstreamPools
from tests.helpers import FakeTransport

# The input's sections, in order: client 0's bytes, client 1's bytes, upstream templates, schedule.
SECTION = b"\n~~\n"
# Between two response templates.
TEMPLATE = b"\n==\n"
# Replaced by the tag of the request a template answers.
TAG_MARK = b"@@"
# A template that makes the upstream connection attempt fail.
REFUSE = b"REFUSE"
# A template's last line may say what the upstream does after sending it.
AFTER_CLOSE = b"\n#close"
AFTER_RESET = b"\n#reset"
AFTER_STALL = b"\n#stall"

CLIENTS = 2
NOBODY = 9  # the tag's client digit for a request no exchange owns any more
# Sizes a schedule byte can pick for one read (bytes), from its high bits.
SIZES = (1, 2, 3, 5, 8, 13, 32, 100, 512, 4096, 65536, 1 << 20)
# Schedule steps, and end-phase rounds, of one run: bounds a run's time whatever the input.
MAX_STEPS = 4096
MAX_SETTLE_ROUNDS = 64
# Far enough in the future that every armed deadline has passed.
LATER = 1e6

TAG = re.compile(rb"<([TP])(\d)(\d{5})>")

CONFIG = """
listen: 127.0.0.1:0
admin: {listen: 127.0.0.1:0}
limits: {max_header_bytes: 2048, max_request_line_bytes: 1024, max_body_bytes: 65536}
services:
  shop:
    match: {host: app.test}
    versions:
      blue: {endpoints: ["127.0.0.1:1"], weight: 50}
      green: {endpoints: ["127.0.0.1:1"], weight: 50}
    version_header: X-App-Version
"""


def split(data: bytes) -> tuple[list[bytes], list[bytes], bytes]:
    """(client streams, response templates, schedule) of one input; missing sections are empty."""
    parts = data.split(SECTION, CLIENTS + 1)
    parts += [b""] * (CLIENTS + 2 - len(parts))
    clients = [_sanitize(p) for p in parts[:CLIENTS]]
    templates = [_sanitize(t) for t in parts[CLIENTS].split(TEMPLATE)] if parts[CLIENTS] else []
    return clients, templates, parts[CLIENTS + 1]


def _sanitize(data: bytes) -> bytes:
    # Only the harness writes tags: input bytes that look like one could fake a finding.
    return data.replace(b"<T", b"<_").replace(b"<P", b"<_")


def tag(kind: bytes, client: int, serial: int) -> bytes:
    return b"<%s%d%05d>" % (kind, client, serial % 100000)


class Transport(FakeTransport):
    """A fake transport whose writes after a close are dropped: the schedule closes and resets
    transports under the proxy, and what it writes to them then reaches nobody."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__(peer)
        self.lost = False  # connection_lost was delivered

    def write(self, data: bytes) -> None:
        if not self.is_closing():
            super().write(data)


def response_end(response: bytes, head_only: bool) -> int | None:
    """Where `response`'s framing ends (the offset past its last byte), as a fresh parser sees
    it fed one byte at a time; None: it does not end (close-delimited, cut short, or a 101 whose
    tunnel bytes follow)."""
    state = {"done": False, "status": 0}

    class Events:
        def on_headers_complete(self) -> None:
            state["status"] = parser.get_status_code()
            if state["status"] == 101 or (head_only and state["status"] >= 200):
                state["done"] = True

        def on_message_complete(self) -> None:
            if state["status"] >= 200:
                state["done"] = True

    parser = httptools.HttpResponseParser(Events())
    for offset in range(len(response)):
        try:
            parser.feed_data(response[offset : offset + 1])
        except httptools.HttpParserUpgrade:
            return None
        except httptools.HttpParserError:
            # The proxy refuses the response at this byte: nothing from here on may reach
            # a client (a head already gone out is followed by a cut, not more bytes).
            return offset
        if state["done"]:
            return None if state["status"] == 101 else offset + 1
    return None


class FakeUpstream:
    """The far side of one upstream connection: reads requests, answers with templates."""

    def __init__(self, harness: Harness, conn: UpstreamConnection) -> None:
        self.harness = harness
        self.conn = conn
        self.transport = Transport(("127.0.0.1", 1))
        self.parser = httptools.HttpRequestParser(self)
        self.seen = 0  # bytes of the transport's writes parsed
        self.parsing = True  # False after an upgrade or a request it cannot parse
        self.pending = bytearray()  # response bytes not delivered yet
        self.after = b""  # what to do once `pending` is delivered
        self.method = b""
        self.write_blocked = False

    def read_requests(self) -> None:
        """Parse what the proxy wrote since the last call; answer each new request head."""
        written = self.transport.written
        if not self.parsing or self.seen == len(written):
            return
        data = bytes(written[self.seen :])
        self.seen = len(written)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.parsing = False
        except httptools.HttpParserCallbackError as exc:
            raise (exc.__context__ or exc) from None  # an invariant broken in on_headers_complete
        except httptools.HttpParserError as exc:
            raise AssertionError(
                f"the proxy sent an upstream bytes it cannot parse: {data!r}"
            ) from exc

    def on_headers_complete(self) -> None:
        self.method = self.parser.get_method()
        sink = self.conn.sink
        owner = self.harness.client_of(sink)
        self.harness.serial += 1
        template = self.harness.next_template()
        after = b""
        for directive in (AFTER_CLOSE, AFTER_RESET, AFTER_STALL):
            if template.endswith(directive):
                template, after = template[: -len(directive)], directive
        response = template.replace(TAG_MARK, tag(b"T", owner, self.harness.serial))
        end = response_end(response, self.method == b"HEAD")
        if end is None:
            after = after or AFTER_CLOSE  # a body that ends with the connection, or a tunnel
        else:
            rest = response[end:].replace(b"<T", b"<P")
            response = response[:end] + rest
        self.pending += response
        if after:
            self.after = after

    def deliver(self, size: int) -> bool:
        """Send up to `size` pending bytes to the proxy, or do what follows them; False: nothing
        to do now."""
        if self.transport.lost or not self.transport.reading:
            return False
        if self.transport.is_closing():
            return False
        if self.pending:
            data = bytes(self.pending[:size])
            del self.pending[:size]
            self.conn.data_received(data)
            return True
        after, self.after = self.after, b""
        if after == AFTER_CLOSE:
            self.fin()
            return True
        if after == AFTER_RESET:
            self.reset()
            return True
        return False

    def fin(self) -> None:
        if not self.transport.lost:
            self.conn.eof_received()
            self.lose(None)

    def reset(self) -> None:
        if not self.transport.lost:
            self.lose(ConnectionResetError(104, "Connection reset by peer"))

    def lose(self, exc: Exception | None) -> None:
        self.transport.lost = True
        self.transport.closed = True
        self.conn.connection_lost(exc)


class Client:
    def __init__(self, harness: Harness, index: int, stream: bytes) -> None:
        self.index = index
        self.stream = stream
        self.sent = 0
        self.transport = Transport((f"192.0.2.{index + 1}", 40000 + index))
        self.protocol = harness.plane.protocol()
        self.write_blocked = False
        self.eof = False
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]

    def feed(self, size: int) -> bool:
        t = self.transport
        if t.lost or t.is_closing() or not t.reading or self.eof or self.sent >= len(self.stream):
            return False
        data = self.stream[self.sent : self.sent + size]
        self.sent += len(data)
        self.protocol.data_received(data)
        return True

    def half_close(self) -> None:
        t = self.transport
        if self.eof or t.lost:
            return
        self.eof = True
        if not t.is_closing() and not self.protocol.eof_received():
            t.close()

    def lose(self) -> None:
        if not self.transport.lost:
            self.transport.lost = True
            self.transport.closed = True
            self.protocol.connection_lost(None)


class Harness:
    def __init__(self, loop: asyncio.AbstractEventLoop, table: Any, data: bytes) -> None:
        streams, templates, self.schedule = split(data)
        self.loop = loop
        self.templates = deque(templates)
        self.serial = 0
        self.upstreams: list[FakeUpstream] = []
        self.plane = DataPlane(loop, table)
        self.plane.pools = _Pools(self)
        self.clients = [Client(self, i, s) for i, s in enumerate(streams)]

    def client_of(self, sink: object) -> int:
        """The client whose exchange owns an upstream connection; NOBODY when none does (the
        exchange gave the connection up after writing the request)."""
        proto = getattr(sink, "proto", None)
        for client in self.clients:
            if client.protocol is proto:
                return client.index
        return NOBODY

    def next_template(self) -> bytes:
        if self.templates:
            return self.templates.popleft()
        return b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n@@"

    def connect(self, pool: UpstreamPool) -> UpstreamConnection:
        if self.templates and self.templates[0] == REFUSE:
            self.templates.popleft()
            raise ConnectionRefusedError(111, "Connection refused")
        conn = UpstreamConnection(pool, pool.generation, pool.endpoint.key)
        upstream = FakeUpstream(self, conn)
        conn.connection_made(upstream.transport)  # type: ignore[arg-type]
        conn.take()
        pool.busy.add(conn)
        self.upstreams.append(upstream)
        return conn

    # -- running --------------------------------------------------------------------------------

    def run(self) -> None:
        for step, byte in enumerate(self.schedule[:MAX_STEPS]):
            self.act(byte)
            self.settle()
            self.check_bounds(step)
        for _ in range(MAX_SETTLE_ROUNDS):  # the rest of the input, in big reads
            moved = any([c.feed(1 << 20) for c in self.clients])
            self.settle()
            moved = any([u.deliver(1 << 20) for u in self.upstreams]) or moved
            self.settle()
            self.check_bounds(-1)
            if not moved:
                break
        self.end()
        self.check_delivery()
        self.check_nothing_left()

    def act(self, byte: int) -> None:
        action, size = byte & 7, SIZES[(byte >> 3) % len(SIZES)]
        if action < CLIENTS:
            self.clients[action].feed(size)
        elif action == 2:
            for upstream in self.upstreams:
                if upstream.deliver(size):
                    break
        elif action == 3:
            self.step_loop()
        elif action == 4:
            client = self.clients[(byte >> 3) % CLIENTS]
            if not client.transport.is_closing():
                client.write_blocked = not client.write_blocked
                if client.write_blocked:
                    client.protocol.pause_writing()
                else:
                    client.protocol.resume_writing()
        elif action == 5:
            live = [u for u in self.upstreams if not u.transport.is_closing()]
            if live:
                upstream = live[(byte >> 3) % len(live)]
                upstream.write_blocked = not upstream.write_blocked
                if upstream.write_blocked:
                    upstream.conn.pause_writing()
                else:
                    upstream.conn.resume_writing()
        elif action == 6:
            client = self.clients[(byte >> 3) % CLIENTS]
            if client.sent >= len(client.stream):
                client.half_close()
            elif self.upstreams:
                self.upstreams[(byte >> 3) % len(self.upstreams)].reset()
        else:
            self.fire_deadlines()

    def fire_deadlines(self) -> None:
        now = time.monotonic() + LATER
        for conn in list(self.plane.connections):
            conn.check_deadlines(now)

    def step_loop(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))

    def settle(self) -> None:
        """What the loop would do next: run ready callbacks, deliver connection_lost to closed
        transports, let the upstreams read what was written to them."""
        for _ in range(MAX_SETTLE_ROUNDS):
            self.step_loop()
            changed = False
            for upstream in list(self.upstreams):
                before = len(upstream.pending)
                upstream.read_requests()
                changed = changed or len(upstream.pending) != before
                if upstream.transport.is_closing() and not upstream.transport.lost:
                    upstream.lose(None)
                    changed = True
            for client in self.clients:
                t = client.transport
                if t.is_closing() and not t.lost:
                    client.lose()
                    changed = True
            if not changed and not _ready(self.loop):
                return
        raise AssertionError("the loop did not settle")

    def end(self) -> None:
        """The input is over: clients half-close, deadlines pass, upstreams close, clients go."""
        for client in self.clients:
            client.half_close()
        self.settle()
        for _ in range(3):
            self.fire_deadlines()
            self.settle()
        for upstream in list(self.upstreams):
            upstream.fin()
            self.settle()
        for client in self.clients:
            client.lose()
        self.settle()

    # -- invariants -----------------------------------------------------------------------------

    def check_bounds(self, step: int) -> None:
        settings = self.plane.table.settings
        for client in self.clients:
            proto = client.protocol
            if client.transport.is_closing() or proto.closing:
                continue
            reading = client.transport.reading
            where = f"client {client.index}, step {step}"
            if len(proto.pipeline) >= request_parsing.MAX_PIPELINE:
                assert not reading, f"{where}: {len(proto.pipeline)} requests queued, still reading"
            buffered = sum(ex.body_buffered for ex in (proto.parsing, *proto.pipeline) if ex)
            if proto.active is not None:
                buffered += proto.active.body_buffered
            if buffered > MAX_BUFFERED_BODY:
                assert not reading, f"{where}: {buffered} body bytes held, still reading"
            early = sum(len(d) for d in proto.early_bytes or ())
            if early > client_protocol.MAX_UPGRADE_EARLY_BYTES:
                assert not reading, f"{where}: {early} early upgrade bytes held, still reading"
            assert proto.held.count <= settings.max_header_bytes, (
                f"{where}: head_fed over the limit"
            )
            active = proto.active
            if active is not None:
                assert not active.out, f"{where}: response bytes held after a read: {active.out}"
        for upstream in self.upstreams:
            if not upstream.transport.is_closing():
                assert upstream.conn.held.count <= upstream_connection.MAX_RESPONSE_HEAD_BYTES

    def check_delivery(self) -> None:
        for client in self.clients:
            last = -1
            for match in TAG.finditer(bytes(client.transport.written)):
                kind, owner, serial = match.group(1), int(match.group(2)), int(match.group(3))
                assert kind == b"T", (
                    f"client {client.index} got bytes past a response's end: {match.group()!r}"
                )
                assert owner == client.index, f"client {client.index} got client {owner}'s bytes"
                assert serial >= last, f"client {client.index} got request {serial} after {last}"
                last = serial

    def check_nothing_left(self) -> None:
        plane = self.plane
        assert not plane.connections, f"client connections left: {plane.connections}"
        assert plane.in_flight() == 0
        for stats in plane.stats.all():
            assert stats.in_flight == 0, f"in_flight left: {stats.in_flight}"
        for pool in plane.pools.pools.values():
            assert not pool.busy, f"busy upstream connections left: {pool.busy}"
        for upstream in self.upstreams:
            assert upstream.conn.sink is None, (
                f"an upstream connection still has a sink: {upstream.conn}"
            )
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        assert not tasks, f"tasks left: {tasks}"


def _ready(loop: asyncio.AbstractEventLoop) -> bool:
    return bool(getattr(loop, "_ready", ()))


class _Pool(UpstreamPool):
    """A pool whose new connections are the harness's fakes."""

    harness: Harness

    async def connect(self, within: float) -> UpstreamConnection:
        return self.harness.connect(self)


class _Pools(UpstreamPools):
    def __init__(self, harness: Harness) -> None:
        super().__init__(harness.loop, harness.plane.table.settings.idle_timeout)
        self.harness = harness

    def get(self, endpoint: Any) -> UpstreamPool:
        pool = self.pools.get(endpoint.key)
        if pool is None:
            pool = _Pool(self.loop, endpoint, self.idle_timeout)
            pool.harness = self.harness
            self.pools[endpoint.key] = pool
        return pool


class _Errors(logging.Handler):
    """Errors the data plane logs: a swallowed exception is a finding too."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Runner:
    """Runs inputs one after another on one loop (a fuzzer calls `one` many times a second)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.failures: list[str] = []
        self.loop.set_exception_handler(self._loop_error)
        self.config = parse_config(CONFIG, env={})
        self.errors = _Errors()
        logging.getLogger("proxy").addHandler(self.errors)
        # Expected warnings (an upstream overrun) are not findings; keep them off stderr.
        logging.getLogger("proxy").setLevel(logging.ERROR)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.failures.append(repr(context.get("exception") or context.get("message")))

    def one(self, data: bytes) -> None:
        self.failures.clear()
        self.errors.records.clear()
        # A new table per input: its weighted round-robin position is part of the state.
        Harness(self.loop, build_table(self.config), data).run()
        assert not self.failures, f"the loop reported errors: {self.failures}"
        assert not self.errors.records, "the data plane logged an error: " + "; ".join(
            f"{r.getMessage()} {r.exc_info!r}" for r in self.errors.records
        )

    def close(self) -> None:
        logging.getLogger("proxy").removeHandler(self.errors)
        self.loop.close()
