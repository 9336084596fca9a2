"""Flow control between the two transports of an exchange (STYLE rule 2).

Every transport gets the same explicit write-buffer limits, so asyncio and uvloop pause at the same
points; reading is paused for named reasons and resumed only when none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

# Bytes queued in one transport before its writer pauses the peer's reading. This is what bounds
# the memory of a connection with a slow reader on the other side, whatever the body size.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024

# Reasons to stop reading a transport (bit flags).
PEER_WRITE_BLOCKED = 1  # the other side's transport is over its high-water mark
PIPELINE_FULL = 2  # enough parsed requests are queued behind the active one
BODY_BUFFER_FULL = 4  # a request body is waiting for its upstream connection
TUNNEL_PENDING = 8  # an Upgrade request waits for the upstream's 101


def set_write_limits(transport: asyncio.Transport) -> None:
    transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)


def write_backlog(transport: asyncio.Transport | None) -> int:
    """Bytes written to `transport` that its peer has not read yet (0 once it is gone)."""
    return transport.get_write_buffer_size() if transport is not None else 0


def write_eof(transport: asyncio.Transport | None) -> None:
    """Send our FIN after what is queued (a tunnelled half-close), where the transport can."""
    if transport is not None and not transport.is_closing() and transport.can_write_eof():
        transport.write_eof()


_LINGER_OFF = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


def reset(transport: asyncio.Transport) -> None:
    """Abort with a TCP reset. `abort()` alone closes with a FIN on asyncio and uvloop, which a
    peer reading a body to the end of the connection (HTTP/1.0) takes for a clean end."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
    transport.abort()


class ReadGate:
    """Pauses a transport's reading while any reason holds."""

    __slots__ = ("reasons", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            self.transport.pause_reading()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons and not self.transport.is_closing():
                self.transport.resume_reading()

    def clear(self) -> None:
        """Resume reading, whatever paused it: from now on the connection only discards."""
        if self.reasons:
            self.reasons = 0
            if not self.transport.is_closing():
                self.transport.resume_reading()
