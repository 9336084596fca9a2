"""The lingering close of a client connection after a local answer, within its two bounds.

A connection closed after a local answer while the request body may still be arriving lingers:
the answer is followed by a FIN, and the client's bytes are read and discarded for up to
LINGER_SECONDS and LINGER_MAX_BYTES before the socket closes. Closed with unread bytes, the kernel
sends a reset, which fails the client's upload and can destroy the answer before the client reads
it (nginx's lingering_close). The bounds keep a client that never stops sending from holding it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 1024 * 1024


class Linger:
    """What one lingering connection may still discard, and the timer that ends it."""

    __slots__ = ("left", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, end: Callable[[], None]) -> None:
        self.left = LINGER_MAX_BYTES
        self.timer = loop.call_later(LINGER_SECONDS, end)

    def discard(self, size: int) -> bool:
        """`size` more bytes were read and dropped; True once the byte bound is reached."""
        self.left -= size
        return self.left <= 0

    def cancel(self) -> None:
        self.timer.cancel()
