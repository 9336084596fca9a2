"""The bound on bytes a parser holds without progress, counted read by read.

httptools keeps a header line, a chunk-size line or a trailer field until it ends, so a peer
that never ends one makes us buffer it. Both sides of an exchange count such reads in a row
against their limit: the client's request head and chunk framing, the upstream's response head
and chunk framing. Resetting is a plain store (`held.count = 0`), kept off any method call
because it runs once per message on the request path.
"""

from __future__ import annotations


class HeldBytes:
    """Bytes of reads fed to the parser since it last made progress."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def over(self, size: int, limit: int) -> bool:
        """Count one more read of `size` bytes; True once they pass `limit`."""
        self.count += size
        return self.count > limit

    def __repr__(self) -> str:
        return f"HeldBytes({self.count})"
