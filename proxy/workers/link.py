"""One worker process as the parent sees it (its link) and its place in the pool (its slot)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Any

from proxy.workers.channel import MAX_CHANNEL_BACKLOG, Channel, encode
from proxy.workers.counters import StatsKey

log = logging.getLogger("laneswitch.workers")


class WorkerState(enum.Enum):
    STARTING = "starting"
    JOINING = "joining"
    LISTENING = "listening"
    STOPPING = "stopping"
    EXITED = "exited"


# States in which a worker may place requests (or is about to): table acks wait for these.
ADMITTED = frozenset({WorkerState.JOINING, WorkerState.LISTENING, WorkerState.STOPPING})


class WorkerLink:
    """One worker process as the parent sees it."""

    __slots__ = (
        "answered",
        "applied",
        "channel",
        "cut",
        "in_flight",
        "process",
        "slot",
        "started_at",
        "state",
    )

    def __init__(self, slot: WorkerSlot, process: asyncio.subprocess.Process) -> None:
        self.slot = slot
        self.process = process
        self.channel: Channel | None = None
        self.state = WorkerState.STARTING
        self.applied = 0  # highest table generation the worker reported as in force
        self.answered = 0  # highest REPORT seq it answered
        self.in_flight: dict[StatsKey, int] = {}  # its current gauge per version
        self.cut = 0  # requests it cut at the drain timeout on its way out
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.state is not WorkerState.EXITED

    @property
    def total_in_flight(self) -> int:
        return sum(self.in_flight.values())

    def send(self, message: tuple[Any, ...]) -> None:
        self.send_frame(encode(message))

    def send_frame(self, frame: bytes) -> None:
        channel = self.channel
        if channel is None or not self.alive:
            return
        channel.send_frame(frame)
        if channel.backlog > MAX_CHANNEL_BACKLOG:
            log.error(
                "worker %d (pid %d) does not read its channel (%d bytes queued): restarting it",
                self.slot.index,
                self.pid,
                channel.backlog,
            )
            self.kill()

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    def __repr__(self) -> str:
        return (
            f"<WorkerLink {self.slot.index} pid={self.pid} {self.state.value} "
            f"applied={self.applied}>"
        )


class WorkerSlot:
    """A worker's place in the pool: it outlives the processes that fill it."""

    __slots__ = ("connections", "delay", "index", "link", "restarts")

    def __init__(self, index: int) -> None:
        self.index = index
        self.link: WorkerLink | None = None
        self.restarts = 0
        self.connections = 0  # accepted by every process that held this slot
        self.delay = 0.0  # before the next restart

    @property
    def up(self) -> bool:
        return self.link is not None and self.link.state is WorkerState.LISTENING

    @property
    def in_flight(self) -> int:
        return self.link.total_in_flight if self.link is not None else 0
