"""The client commands of `laneswitch`: status, switch, weights, rollback, rollout.

Each command is one or a few HTTP calls to a running proxy's admin API, made with the standard
library so the client starts fast and needs nothing the proxy doesn't. Exit codes: 0 done, 1 the
proxy refused (its reason is printed) or could not be reached, 2 a usage error (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

DEFAULT_ADMIN = "http://127.0.0.1:9901"
ADMIN_ENV = "LANESWITCH_ADMIN"
TOKEN_ENV = "LANESWITCH_ADMIN_TOKEN"

# A one-shot admin call that takes longer than this is stuck; the proxy answers in milliseconds.
REQUEST_TIMEOUT = 10.0
WATCH_INTERVAL = 1.0
BAR_WIDTH = 20  # characters of the share bar in the status table

# Clear the screen and home the cursor before each --watch frame (only on a terminal).
CLEAR = "\x1b[H\x1b[2J"


class AdminError(Exception):
    """A call that did not succeed: printed as one line, exit status 1."""


class Refused(AdminError):
    def __init__(self, status: int, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = list(details)


class Unreachable(AdminError):
    pass


@dataclass(frozen=True)
class AdminClient:
    base: str  # e.g. http://127.0.0.1:9901, no trailing slash
    token: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdminClient:
        url = args.admin or os.environ.get(ADMIN_ENV) or DEFAULT_ADMIN
        if "://" not in url:
            url = f"http://{url}"
        return cls(url.rstrip("/"), os.environ.get(TOKEN_ENV) or None)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One admin call; the decoded JSON answer, or Refused/Unreachable."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            answer = exc.read()
            exc.close()
            raise _refusal(exc.code, answer) from None
        except urllib.error.URLError as exc:
            raise Unreachable(f"cannot reach the admin API at {self.base}: {exc.reason}") from None
        except (OSError, TimeoutError) as exc:  # a reset or timeout after connecting
            raise Unreachable(f"cannot reach the admin API at {self.base}: {exc}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise AdminError(f"{self.base}{path}: the answer is not JSON") from None


def _refusal(status: int, raw: bytes) -> Refused:
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        details = answer.get("errors")
        return Refused(status, answer["error"], details if isinstance(details, list) else ())
    text = raw.decode("utf-8", "replace").strip()
    return Refused(status, text or f"HTTP {status}")


def _fail(exc: AdminError, err: TextIO) -> int:
    if isinstance(exc, Refused):
        hint = f" (set {TOKEN_ENV})" if exc.status == 401 else ""
        print(f"laneswitch: refused ({exc.status}): {exc.message}{hint}", file=err)
        for line in exc.details:
            print(f"  {line}", file=err)
    else:
        print(f"laneswitch: {exc}", file=err)
    return 1


def _service_path(service: str, action: str) -> str:
    return f"/services/{quote(service, safe='')}/{action}"


# -- rendering ------------------------------------------------------------------------------------


def _weights_text(weights: dict[str, int]) -> str:
    return " ".join(f"{name}={weight}" for name, weight in weights.items())


def describe_change(verb: str, result: dict[str, Any]) -> str:
    """One line for a switch/weights/rollback answer: what moved, from what."""
    before = result.get("from") or {}
    after = result.get("to") or {}
    service = result.get("service", "?")
    if result.get("dry_run"):
        return (
            f"{service}: dry run, {verb} would set {_weights_text(after)} "
            f"(now {_weights_text(before)}); nothing changed"
        )
    if before == after:
        return f"{service}: {verb}: no change ({_weights_text(after)})"
    return f"{service}: {verb}: {_weights_text(after)} (was {_weights_text(before)})"


def _percent(value: float) -> str:
    return f"{value:.4g}%"


def _bar(share: float) -> str:
    filled = round(max(0.0, min(100.0, share)) * BAR_WIDTH / 100)
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"


def _clock(unix: Any) -> str:
    if not isinstance(unix, int | float):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def _decision(event: dict[str, Any]) -> str:
    text = (
        f"#{event.get('id')} {event.get('action')} by {event.get('actor')} "
        f"at {_clock(event.get('time'))}"
    )
    reason = event.get("reason")
    return f"{text}: {reason}" if reason else text


def render_status(status: dict[str, Any], admin: str) -> str:
    """The status table: one row per version, then each service's rollout and last decision."""
    config = status.get("config") or {}
    state = (
        "draining" if status.get("draining") else "ready" if status.get("ready") else "not ready"
    )
    lines = [
        f"laneswitch at {admin}: {state}; config {str(config.get('hash', '?'))[:12]} "
        f"loaded {_clock(config.get('loaded_at'))}"
    ]
    error = config.get("last_reload_error")
    if error:
        lines.append("last reload rejected:")
        lines.extend(f"  {line}" for line in error)
    window = "60s"
    rows: list[list[str]] = []
    notes: dict[int, list[str]] = {}
    for service_name, service in (status.get("services") or {}).items():
        first = True
        for version_name, version in (service.get("versions") or {}).items():
            endpoints = version.get("endpoints") or []
            healthy = sum(1 for endpoint in endpoints if endpoint.get("healthy"))
            stats = version.get("window") or {}
            window = f"{stats.get('seconds', 60):g}s"
            share = float(version.get("share") or 0.0)
            rate = stats.get("success_rate")
            p99 = stats.get("p99_ms")
            rows.append(
                [
                    service_name if first else "",
                    version_name,
                    f"{_bar(share)} {_percent(share)}",
                    f"{healthy}/{len(endpoints)}",
                    str(version.get("in_flight", 0)),
                    str(stats.get("requests", 0)),
                    _percent(rate) if rate is not None else "-",
                    f"{p99:g}ms" if p99 is not None else "-",
                ]
            )
            first = False
        extra: list[str] = []
        rollout = service.get("rollout")
        if rollout:
            extra.extend(render_rollout(rollout))
        last = service.get("last_decision")
        if last:
            extra.append(f"  last decision: {_decision(last)}")
        if extra:
            notes[len(rows) - 1] = extra
    header = [
        "SERVICE",
        "VERSION",
        "WEIGHT",
        "HEALTHY",
        "IN-FLIGHT",
        f"REQ/{window}",
        "SUCCESS",
        "P99",
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    lines.append(line(header).rstrip())
    for index, row in enumerate(rows):
        lines.append(line(row).rstrip())
        lines.extend(notes.get(index, []))
    if not rows:
        lines.append("(no services)")
    fleet = status.get("fleet")
    if isinstance(fleet, dict):
        lines.extend(render_fleet(fleet))
    return "\n".join(lines)


def render_fleet(fleet: dict[str, Any]) -> list[str]:
    """The members table of a fleet: who leads, what each applied, when it was last seen."""
    store = "up" if fleet.get("store_up") else "DOWN (no steps; changes 503 except rollback)"
    lines = [
        "",
        f"fleet {fleet.get('name', '?')}: leader {fleet.get('leader') or '-'}; store {store}; "
        f"generation {fleet.get('generation', '?')}; this member {fleet.get('member', '?')}",
    ]
    behind = fleet.get("config_behind") or {}
    for service, why in behind.items():
        lines.append(f"  config_behind {service}: {why}")
    header = ["MEMBER", "LEADER", "CONFIG", "APPLIED", "LAST SEEN", "STORE", "ADMIN"]
    rows = []
    for member in fleet.get("members") or []:
        seen = member.get("last_seen")
        rows.append(
            [
                str(member.get("id", "?")),
                "*" if member.get("leader") else "",
                str(member.get("config_hash") or "?")[:12],
                str(member.get("applied", "?")),
                (f"{seen:.1f}s ago" if isinstance(seen, int | float) else "?")
                + ("" if member.get("live") else " (gone)"),
                "up" if member.get("store_up") else "down",
                str(member.get("admin") or "-"),
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def _rate(value: Any) -> str:
    return f"{value:.4g}%" if isinstance(value, int | float) else "-"


def _millis(value: Any) -> str:
    return f"{value:.4g}ms" if isinstance(value, int | float) else "-"


def render_rollout(rollout: dict[str, Any]) -> list[str]:
    """A rollout's lines under its service: a progress bar (step k of n, the candidate's
    weight), phase and failed checks; what the last analysis measured for both versions; the
    last decision and why."""
    candidate = rollout.get("candidate", "?")
    baseline = rollout.get("baseline", "?")
    steps = int(rollout.get("steps") or 0)
    step = int(rollout.get("step") or 0)
    weight = float(rollout.get("weight") or 0.0)
    if rollout.get("strategy") == "blue-green":
        where = "switched" if step else "before the switch"
        progress = f"{where}, {candidate} at {_percent(weight)}"
    else:
        progress = f"step {step} of {steps}, {candidate} at {_percent(weight)}"
    phase = rollout.get("phase", "?")
    if rollout.get("awaiting_promotion"):
        phase += " (waiting for `laneswitch rollout promote`)"
    lines = [
        f"  rollout {rollout.get('strategy', '?')} {baseline} -> {candidate}: {_bar(weight)} "
        f"{progress}; {phase}; failed checks "
        f"{rollout.get('failed_checks', 0)}/{rollout.get('threshold', '?')}"
    ]
    reason = rollout.get("reason")
    if reason and phase in ("paused", "rolled_back", "aborted"):
        lines.append(f"    why: {reason}")
    analysis = rollout.get("last_analysis")
    if isinstance(analysis, dict):
        values = analysis.get("values") or {}
        lines.append(
            f"    last analysis ({analysis.get('verdict', '?')}): "
            f"{candidate} {_rate(values.get('success_rate'))} ok, "
            f"p99 {_millis(values.get('latency_p99_ms'))}, {values.get('requests', 0)} req; "
            f"{baseline} {_rate(values.get('stable_success_rate'))} ok, "
            f"p99 {_millis(values.get('stable_latency_p99_ms'))}, "
            f"{values.get('stable_requests', 0)} req"
        )
    decision = rollout.get("last_decision")
    if isinstance(decision, dict):
        lines.append(
            f"    rollout decision: {decision.get('action')} at {_clock(decision.get('time'))}: "
            f"{decision.get('reason', '')}"
        )
    return lines


# -- commands -------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    client = AdminClient.from_args(args)
    out = sys.stdout

    def frame() -> str:
        status = client.call("GET", "/status")
        if args.json:
            return json.dumps(status, indent=2, sort_keys=True)
        return render_status(status, client.base)

    if not args.watch:
        try:
            print(frame(), file=out)
        except AdminError as exc:
            return _fail(exc, sys.stderr)
        return 0
    clear = CLEAR if out.isatty() else ""
    try:
        while True:
            try:
                text = frame()
            except AdminError as exc:  # keep watching: the proxy may be restarting
                text = f"laneswitch: {exc}"
            stamp = time.strftime("%H:%M:%S")
            print(f"{clear}{text}\n(every {WATCH_INTERVAL:g}s, {stamp}; Ctrl-C to stop)", file=out)
            out.flush()
            time.sleep(WATCH_INTERVAL)
    except KeyboardInterrupt:
        return 0


def _change(args: argparse.Namespace, verb: str, method: str, action: str, body: Any) -> int:
    client = AdminClient.from_args(args)
    try:
        result = client.call(method, _service_path(args.service, action), body)
    except AdminError as exc:
        return _fail(exc, sys.stderr)
    print(describe_change(verb, result))
    return _acknowledged(result)


def _acknowledged(result: Any) -> int:
    """In a fleet: 1, naming them, when live members had not applied the change within the
    fleet's ack_timeout (the change is in the store; they apply it when they can)."""
    members = result.get("members") if isinstance(result, dict) else None
    if not isinstance(members, dict):
        return 0
    pending = members.get("pending") or []
    acknowledged = members.get("acknowledged") or []
    if pending:
        print(
            f"laneswitch: not yet applied by {len(pending)} member(s): {', '.join(pending)} "
            f"(applied by {', '.join(acknowledged) or 'none'})",
            file=sys.stderr,
        )
        return 1
    print(f"applied by every live member: {', '.join(acknowledged)}")
    return 0


def cmd_switch(args: argparse.Namespace) -> int:
    body = {"to": args.version, "force": args.force, "dry_run": args.dry_run}
    return _change(args, f"switch to {args.version}", "POST", "switch", body)


def cmd_weights(args: argparse.Namespace) -> int:
    weights: dict[str, int] = {}
    for version, weight in args.weights:
        if version in weights:
            print(f"laneswitch: {version} is given twice", file=sys.stderr)
            return 2
        weights[version] = weight
    return _change(args, "weights", "PUT", "weights", {"weights": weights})


def cmd_rollback(args: argparse.Namespace) -> int:
    return _change(args, "rollback", "POST", "rollback", None)


def cmd_rollout(args: argparse.Namespace) -> int:
    client = AdminClient.from_args(args)
    try:
        status = client.call("POST", _service_path(args.service, f"rollout/{args.action}"))
    except AdminError as exc:
        return _fail(exc, sys.stderr)
    print(f"{args.service}: rollout {args.action}: phase {status.get('phase', '?')}")
    for line in render_rollout(status):
        print(line)
    return _acknowledged(status)


def version_weight(text: str) -> tuple[str, int]:
    """argparse type of `VERSION=N`."""
    version, sep, number = text.partition("=")
    if not sep or not version:
        raise argparse.ArgumentTypeError(f"expected VERSION=N, got {text!r}")
    try:
        return version, int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{version}: weight must be an integer") from None


def _admin_url(text: str) -> str:
    url = text if "://" in text else f"http://{text}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return url


def add_client_commands(subparsers: Any) -> None:
    """Register status, switch, weights and rollback on an argparse subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        type=_admin_url,
        metavar="URL",
        help=f"admin API URL (default: ${ADMIN_ENV}, else {DEFAULT_ADMIN}); "
        f"the token comes from ${TOKEN_ENV}",
    )

    status = subparsers.add_parser(
        "status", parents=[common], help="versions, weights, health and decisions per service"
    )
    status.add_argument("--json", action="store_true", help="print the admin API's JSON")
    status.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")
    status.set_defaults(func=cmd_status)

    switch = subparsers.add_parser(
        "switch", parents=[common], help="send all of a service's traffic to one version now"
    )
    switch.add_argument("service", metavar="SERVICE")
    switch.add_argument("version", metavar="VERSION")
    switch.add_argument(
        "--force", action="store_true", help="switch even if VERSION has no healthy endpoint"
    )
    switch.add_argument(
        "--dry-run", action="store_true", help="show what would change, change nothing"
    )
    switch.set_defaults(func=cmd_switch)

    weights = subparsers.add_parser(
        "weights", parents=[common], help="set every version's weight (left out: 0)"
    )
    weights.add_argument("service", metavar="SERVICE")
    weights.add_argument("weights", metavar="VERSION=N", nargs="+", type=version_weight)
    weights.set_defaults(func=cmd_weights)

    rollback = subparsers.add_parser(
        "rollback", parents=[common], help="all traffic back to the stable/previous version"
    )
    rollback.add_argument("service", metavar="SERVICE")
    rollback.set_defaults(func=cmd_rollback)

    rollout = subparsers.add_parser(
        "rollout",
        parents=[common],
        help="drive a service's rollout: start, pause, resume, promote, abort",
        description="start: a new rollout from the stable (active) version; pause/resume: stop "
        "and continue the analysis; promote: skip the remaining steps (the confirm-promotion "
        "hooks still gate it); abort: all traffic back to the stable version.",
    )
    rollout.add_argument("action", choices=("start", "pause", "resume", "promote", "abort"))
    rollout.add_argument("service", metavar="SERVICE")
    rollout.set_defaults(func=cmd_rollout)
