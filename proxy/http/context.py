"""What an exchange and its client connection see of each other and of the process: interfaces.

An `Exchange` talks to its client connection through `ClientConnection` (as the upstream
connection talks to the exchange through `ResponseSink`), and reads the process's shared state
(the current route table and what is derived from it, the pools, the loop, the request ids)
through `ExchangeContext`; a client connection reads it through `ConnectionContext`. The
exchange's life is one explicit `Phase`, and it ends once, for one `End` reason.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from proxy.codec.wire import HeaderKinds
    from proxy.errors import Failure
    from proxy.http.upstream_head import ForwardingCache, RequestIds
    from proxy.metrics import StatsRegistry
    from proxy.routing.table import RouteTable, Settings
    from proxy.upstream.connection import UpstreamConnection
    from proxy.upstream.pool import UpstreamPools


class Phase(enum.Enum):
    """Where an exchange is in its life; it only moves forward."""

    WAITING = "waiting"  # parsed (or being parsed), not routed yet: queued behind another
    PLACED = "placed"  # routed and counted in flight; the upstream side is under way
    RESPONDING = "responding"  # the response head went to the client
    TUNNEL = "tunnel"  # the upstream switched protocols: a `Tunnel` carries it from here on
    DONE = "done"  # ended (see `End`); nothing more happens to it


class End(enum.Enum):
    """Why an exchange ended: what its version's counters record."""

    ANSWERED = "answered"  # a whole answer went out (the upstream's or a local one): its status
    CUT = "cut"  # the response was cut for the upstream's sake: its status (502, 504)
    CLIENT_ABORT = "client abort"  # the client left or broke its request: never the version's
    DRAIN_CUT = "drain cut"  # cut at the drain timeout of its version or of the process


# The members as module constants: the request path compares them by identity, and a global
# is one lookup where `Phase.DONE` is two.
WAITING = Phase.WAITING
PLACED = Phase.PLACED
RESPONDING = Phase.RESPONDING
TUNNEL = Phase.TUNNEL
DONE = Phase.DONE
ANSWERED = End.ANSWERED
CUT = End.CUT
CLIENT_ABORT = End.CLIENT_ABORT
DRAIN_CUT = End.DRAIN_CUT


class ExchangeContext(Protocol):
    """What an exchange reads of its process's data plane; the table and what is derived from
    it change when a new table is installed, between two requests' placements."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def table(self) -> RouteTable: ...
    @property
    def stats(self) -> StatsRegistry: ...
    @property
    def pools(self) -> UpstreamPools: ...
    @property
    def request_ids(self) -> RequestIds: ...
    @property
    def response_kinds(self) -> HeaderKinds: ...
    @property
    def draining(self) -> bool: ...


Connection = TypeVar("Connection")


class ConnectionContext(ExchangeContext, Protocol[Connection]):
    """What a client connection reads of its process's data plane, and the set it joins."""

    @property
    def header_kinds(self) -> HeaderKinds: ...
    @property
    def connections(self) -> set[Connection]: ...
    def check_drained(self) -> None: ...


Ex = TypeVar("Ex")


class ClientConnection(Protocol[Ex]):
    """What an exchange (`Ex`) needs of the client connection it belongs to."""

    @property
    def settings(self) -> Settings: ...
    @property
    def plane(self) -> ExchangeContext: ...
    @property
    def forwarding(self) -> ForwardingCache: ...
    @property
    def write_blocked(self) -> bool: ...
    @property
    def parsing(self) -> Ex | None: ...
    def write(self, data: bytes) -> None: ...
    def gate_pause(self, reason: int) -> None: ...
    def gate_resume(self, reason: int) -> None: ...
    def fail_request(self, ex: Ex, failure: Failure) -> None: ...
    def answer(self, ex: Ex, failure: Failure) -> None: ...
    def finish(self, ex: Ex, status: int) -> None: ...
    def abort(self, ex: Ex, status: int | None = ...) -> None: ...
    def start_tunnel(self, ex: Ex, conn: UpstreamConnection) -> None: ...
