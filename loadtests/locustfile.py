"""Locust load test for laneswitch: sticky users, a mix of reads and writes, version checks.

Every simulated user has a stable id (`user-0001`, `user-0002`, ... in spawn order, the same on
every run), sent in the sticky header (`X-User-Id`), and checks the version header
(`X-App-Version`) of every response:

- `--sticky-check monotonic` (default): a user may move to another version only while weights
  move, and never back to a version it left. laneswitch's sticky hashing promises exactly this
  while the canary's weight rises; a
  rollback during the run moves users back on purpose and is reported as failures.
- `--sticky-check strict`: a user's version never changes (for runs at fixed weights).
- `--sticky-check off`: only count.

A response without the version header, or with a status >= 400, is a failure too. At the end
the version mix is printed (requests and users per version, users that moved) and, with
`--version-report FILE`, written as JSON.

    locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 1m --host http://127.0.0.1:8080

See loadtests/README.md.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
from collections import Counter
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment

_ids = itertools.count(1)
_lock = threading.Lock()
# Shared by every user of this process: requests per version, each user's current version and
# its history of moves.
requests_by_version: Counter[str] = Counter()
user_versions: dict[str, str] = {}
moves: Counter[tuple[str, str]] = Counter()
moved_users: dict[str, list[str]] = {}


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    parser.add_argument(
        "--sticky-header", default="X-User-Id", help="request header carrying the user id"
    )
    parser.add_argument(
        "--version-header", default="X-App-Version", help="response header naming the version"
    )
    parser.add_argument(
        "--sticky-check",
        choices=["monotonic", "strict", "off"],
        default="monotonic",
        help="monotonic: a user may move on, never back; strict: never moves; off: only count",
    )
    parser.add_argument("--user-prefix", default="user", help="prefix of the stable user ids")
    parser.add_argument("--version-report", default="", help="write the version mix as JSON")


class StickyUser(HttpUser):
    """One end user: browses, looks at products, places orders, uploads now and then."""

    wait_time = between(0.01, 0.1)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.sticky_header: str = options.sticky_header if options else "X-User-Id"
        self.version_header: str = options.version_header if options else "X-App-Version"
        self.check: str = options.sticky_check if options else "monotonic"
        prefix = options.user_prefix if options else "user"
        self.user_id = f"{prefix}-{next(_ids):04d}"
        self.versions: list[str] = []  # every version this user was served by, in order

    def _request(self, method: str, path: str, name: str, **kwargs: Any) -> None:
        headers = {self.sticky_header: self.user_id, **kwargs.pop("headers", {})}
        with self.client.request(
            method, path, name=name, headers=headers, catch_response=True, **kwargs
        ) as response:
            if response.status_code >= 400 or response.status_code == 0:
                response.failure(f"status {response.status_code}")
                return
            version = response.headers.get(self.version_header)
            if not version:
                response.failure(f"no {self.version_header} header")
                return
            problem = self._observe(version)
            if problem:
                response.failure(problem)
            else:
                response.success()

    def _observe(self, version: str) -> str | None:
        """Record `version` for this user; return what is wrong with it, if anything."""
        previous = self.versions[-1] if self.versions else None
        left = list(self.versions)
        if version != previous:
            self.versions.append(version)
        with _lock:
            requests_by_version[version] += 1
            user_versions[self.user_id] = version
            if previous is not None and version != previous:
                moves[(previous, version)] += 1
                moved_users[self.user_id] = list(self.versions)
        if previous is None or version == previous:
            return None
        if self.check == "strict":
            return f"{self.user_id} moved from {previous} to {version}"
        if self.check == "monotonic" and version in left:
            return f"{self.user_id} went back to {version} (served by {' -> '.join(left)} before)"
        return None

    @task(5)
    def home(self) -> None:
        self._request("GET", "/", name="GET /")

    @task(3)
    def product(self) -> None:
        self._request("GET", f"/products/{random.randint(1, 500)}", name="GET /products/[id]")

    @task(2)
    def order(self) -> None:
        body = {
            "user": self.user_id,
            "items": [
                {"sku": f"sku-{random.randint(1, 500)}", "qty": random.randint(1, 3)}
                for _ in range(random.randint(1, 5))
            ],
            "note": "x" * random.randint(0, 2000),
        }
        self._request("POST", "/orders", name="POST /orders", json=body)

    @task(1)
    def upload(self) -> None:
        data = random.randbytes(random.choice([1024, 64 * 1024, 256 * 1024]))
        headers = {"Content-Type": "application/octet-stream"}
        self._request("POST", "/uploads", name="POST /uploads", data=data, headers=headers)


def version_mix() -> dict[str, Any]:
    with _lock:
        users = Counter(user_versions.values())
        return {
            "requests": dict(sorted(requests_by_version.items())),
            "users": dict(sorted(users.items())),
            "moves": {f"{a} -> {b}": n for (a, b), n in sorted(moves.items())},
            "moved_users": {user: list(path) for user, path in sorted(moved_users.items())},
        }


def format_mix(mix: dict[str, Any]) -> str:
    total = sum(mix["requests"].values()) or 1
    lines = ["version mix:"]
    for version, count in mix["requests"].items():
        users = mix["users"].get(version, 0)
        lines.append(
            f"  {version:<16} {count:>9} requests {100 * count / total:6.2f} %"
            f"   {users:>5} users now"
        )
    lines.append(f"  users that moved: {len(mix['moved_users'])}")
    for move, count in mix["moves"].items():
        lines.append(f"    {move}: {count}")
    return "\n".join(lines)


@events.quitting.add_listener
def _report(environment: Environment, **_: Any) -> None:
    mix = version_mix()
    print(format_mix(mix), flush=True)
    options = environment.parsed_options
    if options is not None and options.version_report:
        with open(options.version_report, "w", encoding="utf-8") as out:
            json.dump(mix, out, indent=2)
