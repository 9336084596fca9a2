"""Noticing that the config file changed, including Kubernetes' atomic ConfigMap update.

A mounted ConfigMap is a symlink chain (`file -> ..data/file`, `..data -> ..2024_..`) that
Kubernetes swaps in one rename: inotify on the file itself misses it, but `stat()` through the
path sees a different inode. Polling once a second is cheap and sees every kind of change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

log = logging.getLogger("laneswitch.watch")

# How often the file is checked.
POLL_SECONDS = 1.0

Fingerprint = tuple[int, int, int, int] | None


def fingerprint(path: str) -> Fingerprint:
    """What identifies the file's current content: (device, inode, mtime, size) of the target."""
    try:
        st = os.stat(path)  # follows symlinks: a swapped ..data link changes the inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class ConfigWatcher:
    """Calls `on_change()` when the file at `path` changes (or appears after vanishing)."""

    def __init__(
        self, path: str, on_change: Callable[[], Awaitable[object]], poll: float = POLL_SECONDS
    ) -> None:
        self.path = path
        self.on_change = on_change
        self.poll = poll
        self._seen = fingerprint(path)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            current = fingerprint(self.path)
            if current is None or current == self._seen:
                continue  # a missing file is a mid-swap moment or a mistake: keep serving
            self._seen = current
            log.info("%s changed: reloading", self.path)
            try:
                await self.on_change()
            except Exception:
                log.exception("reload after a change of %s failed", self.path)
