"""The proxy's errors that carry an HTTP status, each mapped to it in one place (STYLE rule 6).

Every failure the data plane answers itself is a `Failure`; everything that maps a failure to a
status, a reason phrase, an upstream-error kind for the metrics or a `Retry-After` reads it from
here. A control operation refused is a `ControlError`, with the admin API's status for it.
"""

from __future__ import annotations

import enum


class Failure(enum.Enum):
    """A failure answered by the proxy itself: (status, upstream error kind or None, text)."""

    BAD_REQUEST = (400, None, "malformed request")
    HEADER_TIMEOUT = (408, None, "request head not received in time")
    BODY_TIMEOUT = (408, None, "request body stalled")
    METHOD_NOT_ALLOWED = (405, None, "method not supported by a reverse proxy")
    BODY_TOO_LARGE = (413, None, "request body over the limit")
    URI_TOO_LONG = (414, None, "request line over the limit")
    HEADERS_TOO_LARGE = (431, None, "request head over the limit")
    NO_SERVICE = (404, None, "no service matches this host and path")
    UPSTREAM_CONNECT = (502, "connect", "upstream refused the connection")
    UPSTREAM_CONNECT_TIMEOUT = (504, "connect", "upstream connect timed out")
    UPSTREAM_RESET = (502, "reset", "upstream closed the connection")
    UPSTREAM_PROTOCOL = (502, "protocol", "upstream sent an invalid response")
    UPSTREAM_TIMEOUT = (504, "timeout", "upstream did not answer in time")
    NO_HEALTHY_ENDPOINT = (503, None, "no healthy endpoint for this version")
    OVERLOADED = (503, None, "too many connections")
    SHUTTING_DOWN = (503, None, "shutting down")

    # The text names the failure for a reader and keeps members with the same status and kind
    # (the three 503s) distinct: equal values would make them aliases of one member.
    def __init__(self, status: int, upstream_kind: str | None, _text: str) -> None:
        self.status = status
        # The label of laneswitch_upstream_errors_total; None when the upstream is not to blame.
        self.upstream_kind = upstream_kind


class ControlError(Exception):
    """A refused control operation: `status` is the admin API's HTTP status for it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
