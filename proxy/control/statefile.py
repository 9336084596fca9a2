"""The state file's writes: off the event loop, one at a time, and a failure where it is seen.

A failed write is counted and its error kept (GET /status, the metric) until a write succeeds,
not only logged: a restart would resume from an older state than the one in force.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable

from proxy.state import RuntimeState, save_state

log = logging.getLogger("laneswitch.control")


class StateWrites:
    """Writes of the runtime state file, and those that failed."""

    def __init__(self) -> None:
        self.failures = 0
        self.error: str | None = None  # the last write's, until one succeeds
        # Serialises the writes: some are made outside the control plane's lock (background
        # webhook verdicts, a refused rollout start), and two writes in flight at once could
        # land in the wrong order, an older state replacing a newer one.
        self._lock = asyncio.Lock()

    async def write(self, path: str | None, state: Callable[[], RuntimeState]) -> None:
        """Write `state()`, as it is once the writes before have landed, to `path` (None: no
        state file, nothing to do)."""
        if path is None:
            return
        async with self._lock:
            # A copy: the thread serialises it while the loop goes on changing the originals.
            snapshot = copy.deepcopy(state())
            try:
                await asyncio.to_thread(save_state, path, snapshot)
            except (OSError, TypeError, ValueError) as exc:
                self.failures += 1
                self.error = f"cannot write the state file {path}: {exc}"
                log.error("%s", self.error)
            else:
                self.error = None
