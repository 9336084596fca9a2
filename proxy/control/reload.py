"""Reloading the config file: reading it off the loop, coalescing requests, the event's reason.

The control plane adopts what `read_config` returns under its lock (`ControlPlane.reload`);
everything here runs outside it, so a switch or a rollback never waits for the disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config.loader import ConfigError, config_digest, parse_config
from proxy.config.model import Config


@dataclass
class ReloadResult:
    ok: bool
    errors: list[str] = field(default_factory=list)
    changed: bool = False  # the file differed from the one in force


class Coalescing:
    """Runs reloads one at a time: requests that arrive while one runs are coalesced into one
    more, begun when the running one ends (so it reads the file as it is after every one of
    them); they all get its result."""

    def __init__(self, reload: Callable[[str], Awaitable[ReloadResult]]) -> None:
        self._reload = reload
        # The reload running now and the one coalescing every request made meanwhile.
        self._running: asyncio.Task[ReloadResult] | None = None
        self._next: asyncio.Task[ReloadResult] | None = None

    async def __call__(self, actor: str) -> ReloadResult:
        loop = asyncio.get_running_loop()
        running = self._running
        if running is None:
            task = self._running = loop.create_task(self._run(None, actor))
        elif self._next is not None:
            task = self._next
        else:
            task = self._next = loop.create_task(self._run(running, actor))
        # Shielded: a caller that goes away (an admin client disconnecting) must not cancel a
        # reload other callers wait for.
        return await asyncio.shield(task)

    async def _run(self, after: asyncio.Task[ReloadResult] | None, actor: str) -> ReloadResult:
        if after is not None:
            await asyncio.wait([after])
            self._running, self._next = self._next, None
        try:
            return await self._reload(actor)
        finally:
            if self._running is asyncio.current_task():
                self._running = None


async def read_config(path: str | None) -> tuple[Config, str] | list[str]:
    """The config file at `path`, parsed, and its digest; or the errors that reject it."""
    if path is None:
        return ["no config file to reload (embedded config)"]
    try:
        text = await asyncio.to_thread(Path(path).read_text, "utf-8")
        config = parse_config(text, source=path)
    except ConfigError as exc:
        return exc.errors
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{path}: cannot read: {exc}"]
    return config, config_digest(text)


def reload_reason(old: Config, new: Config) -> str:
    """The reload event's reason: what an operator must know beyond "applied" (never the
    token itself)."""
    notes = ["config applied"]
    if old.admin.token != new.admin.token:
        if new.admin.token is None:
            notes.append("admin token removed: the admin API takes calls without a token")
        elif old.admin.token is None:
            notes.append("admin token set: calls without it are refused from now on")
        else:
            notes.append("admin token changed: the old token is refused from now on")
    if old.admin.listen != new.admin.listen:
        notes.append(f"admin.listen {new.admin.listen} takes effect at the next start")
    return "; ".join(notes)
