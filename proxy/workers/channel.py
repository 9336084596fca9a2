"""The parent-worker channel: length-prefixed pickles over a socketpair, and the messages.

Only our own processes are at either end (the parent and the workers it started), so pickle is
safe here; the frame bound still keeps a confused peer from making the other side buffer much.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import struct
from collections.abc import Callable
from typing import Any, cast

log = logging.getLogger("laneswitch.workers")

# Largest message either side accepts; a route table of thousands of services is far below. Bounds
# what a confused peer can make the other side buffer.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Bytes queued to one worker that it has not read yet; above this it is stuck and is replaced.
MAX_CHANNEL_BACKLOG = 8 * 1024 * 1024
# A worker sends its counter deltas at least this often (seconds) when something changed.
REPORT_INTERVAL = 0.25

# -- messages --------------------------------------------------------------------------------------
# Each message is a tuple whose first item is one of these tags.

# parent -> worker
INIT = "init"  # (INIT, index, [(host, port), ...], backlog)
TABLE = "table"  # (TABLE, RouteTable)
SERVE = "serve"  # (SERVE,): bind the listeners and take connections
REPORT = "report"  # (REPORT, seq): send counters now, answering with seq
STOP = "stop"  # (STOP, drain_timeout): graceful stop, then exit 0
# worker -> parent
LOADED = "loaded"  # (LOADED,): the first table is installed
APPLIED = "applied"  # (APPLIED, generation): the table in force
LISTENING = "listening"  # (LISTENING, [(host, port), ...])
COUNTERS = "counters"  # (COUNTERS, seq, [CounterDelta, ...], connections accepted since last)
STOPPED = "stopped"  # (STOPPED, requests cut at the drain timeout)

_HEADER = struct.Struct("!I")


def encode(message: tuple[Any, ...]) -> bytes:
    """One frame: a 4-byte big-endian length, then the pickle."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{message[0]} message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return _HEADER.pack(len(body)) + body


class Channel(asyncio.Protocol):
    """One end of a parent-worker socketpair: frames in, `on_message` per message."""

    def __init__(
        self,
        on_message: Callable[[tuple[Any, ...]], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()
        # Holds at most one frame being received (<= MAX_MESSAGE_BYTES) plus one read.
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        end_of_data = len(buffer)
        while end_of_data - offset >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, offset)
            if size > MAX_MESSAGE_BYTES:
                log.error("channel: a %d-byte message exceeds the bound; closing", size)
                self.abort()
                return
            end = offset + _HEADER.size + size
            if end > end_of_data:
                break
            message = pickle.loads(buffer[offset + _HEADER.size : end])
            offset = end
            try:
                self.on_message(message)
            except Exception:
                log.exception("channel: handling a %r message failed", message[0])
                self.abort()
                return
        if offset:
            del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)
        self.on_lost()

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, message: tuple[Any, ...]) -> None:
        self.send_frame(encode(message))

    def send_frame(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    @property
    def backlog(self) -> int:
        """Bytes written but not yet taken by the peer's socket."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def close(self) -> None:
        """Close after what is queued has been sent."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
