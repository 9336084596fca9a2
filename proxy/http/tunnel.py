"""A tunnel: once an upstream answers 101, bytes flow both ways untouched until both are done.

A tunnel belongs to the version that accepted the upgrade: it stays in that version's in-flight
gauge until it ends, a drain of the version cuts it at `drain_timeout` (a drain cut), and a
graceful stop waits for it like for any request in flight.

Each direction ends on its own: a FIN from one peer is passed on to the other as a FIN (a
half-close) while the other direction keeps flowing, and the tunnel ends once both directions
are closed. A peer whose connection is gone (reset) ends it at once: the other side is aborted,
so no connection is held for a peer that is not there. Silence in both directions for
`timeouts.idle` cuts it: an upstream timeout, unless the upstream had already closed its
direction and only the client kept the tunnel open (a client abort).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from proxy.metrics import VersionStats

if TYPE_CHECKING:
    from proxy.upstream.connection import UpstreamConnection


class TunnelClient(Protocol):
    """What a tunnel needs of the client connection it belongs to."""

    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def write_backlog(self) -> int: ...
    def tunnel_ended(self, tunnel: Tunnel, abort: bool) -> None: ...


class Tunnel:
    """Both directions of one upgraded connection (see the module docstring)."""

    __slots__ = (
        "client",
        "client_done",
        "deadline",
        "ended",
        "heard",
        "idle_timeout",
        "service",
        "started_at",
        "stats",
        "upstream",
        "upstream_done",
        "version",
    )

    def __init__(
        self,
        client: TunnelClient,
        upstream: UpstreamConnection,
        stats: VersionStats | None,
        started_at: float,
        idle_timeout: float,
    ) -> None:
        self.client = client
        self.upstream = upstream
        # The version it belongs to (its counters), and when its request started (monotonic).
        self.stats = stats
        self.service = stats.service if stats is not None else ""
        self.version = stats.version if stats is not None else ""
        self.started_at = started_at
        self.idle_timeout = idle_timeout
        # A byte went either way since the last check (one store per read, not a clock read);
        # silence is counted from the check that last found it set.
        self.heard = False
        self.deadline = time.monotonic() + idle_timeout
        self.client_done = False  # the client sent its FIN
        self.upstream_done = False  # the upstream sent its FIN
        self.ended = False

    def __repr__(self) -> str:
        return (
            f"<Tunnel {self.service}/{self.version} client_done={self.client_done} "
            f"upstream_done={self.upstream_done} ended={self.ended}>"
        )

    # -- bytes and FINs ---------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self.heard = True
        self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.heard = True
        self.client.write(data)

    def client_eof(self) -> None:
        """The client closed its direction: pass the FIN on, keep the other direction."""
        self.client_done = True
        self.heard = True
        if self.upstream_done:
            self._end(abort=False)
        else:
            self.upstream.write_eof()

    def upstream_eof(self) -> None:
        """The upstream closed its direction: pass the FIN on, keep the other direction."""
        self.upstream_done = True
        self.heard = True
        if self.client_done:
            self._end(abort=False)
        else:
            self.client.write_eof()

    # -- endings ----------------------------------------------------------------------------------

    def client_lost(self) -> None:
        """The client's connection is gone: free the upstream connection at once."""
        if self.ended:
            return
        if not self.client_done and self.stats is not None:
            self.stats.client_aborts += 1  # a reset, not a FIN: its bytes may be lost
        self._end(abort=True)

    def upstream_lost(self) -> None:
        """The upstream's connection is gone: the client is cut, not closed cleanly."""
        if self.ended:
            return
        if not self.upstream_done and self.stats is not None:
            self.stats.upstream_errors["reset"] += 1
        self._end(abort=True)

    def check_idle(self, now: float) -> None:
        """Called by the plane's ticker: cut the tunnel after `idle_timeout` of silence. Bytes
        queued for a peer that has not read them yet are no silence: that peer is the reason
        nothing moves (and backpressure has paused the other side)."""
        if self.ended:
            return
        if self.heard or self.client.write_backlog() or self.upstream.write_backlog():
            self.heard = False
            self.deadline = now + self.idle_timeout
            return
        if now < self.deadline:
            return
        stats = self.stats
        if stats is not None:
            if self.upstream_done and not self.client_done:
                stats.client_aborts += 1  # only the client holds it open
            else:
                stats.upstream_errors["timeout"] += 1
        self._end(abort=True)

    def belongs_to(self, service: str, version: str, started_before: float) -> bool:
        return (
            not self.ended
            and self.service == service
            and self.version == version
            and self.started_at <= started_before
        )

    def cut(self) -> int:
        """Cut at the drain timeout: counted as a drain cut. Returns how many were cut."""
        if self.ended:
            return 0
        if self.stats is not None:
            self.stats.drain_cut += 1
        self._end(abort=True)
        return 1

    def _end(self, abort: bool) -> None:
        self.ended = True
        stats = self.stats
        if stats is not None:
            stats.in_flight -= 1
        if abort:
            self.upstream.abort()
        else:
            self.upstream.close()
        self.client.tunnel_ended(self, abort)
