"""The state file: runtime weights and the decision record, so a restart resumes where it was.

Written atomically (temp file in the same directory, fsync, rename, fsync of the directory) so a
crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.events import Event
from proxy.jsonfields import Unreadable

log = logging.getLogger("laneswitch.state")

STATE_VERSION = 1


@dataclass
class RuntimeState:
    weights: dict[str, dict[str, int]] = field(default_factory=dict)
    # The config file's weights when they were last applied (see ControlPlane.reload).
    file_weights: dict[str, dict[str, int]] = field(default_factory=dict)
    previous_weights: dict[str, dict[str, int]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Entries of the file that did not parse and were left out (set by `load_state` only).
    skipped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "weights": self.weights,
            "file_weights": self.file_weights,
            "previous_weights": self.previous_weights,
            "rollouts": self.rollouts,
            "events": self.events,
        }


def load_state(path: str | os.PathLike[str]) -> RuntimeState | None:
    """The saved state, or None when there is none or it cannot be read (logged, not fatal:
    the config file alone is a safe place to start from).

    A file written by another laneswitch version never stops start-up: unknown fields are
    ignored, and each entry (a service's weights, an event, a rollout) that does not parse is
    left out with a warning and counted in `RuntimeState.skipped`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("state file %s ignored: %s", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("state file %s ignored: not a JSON object", path)
        return None
    if data.get("version") != STATE_VERSION:
        log.warning(
            "state file %s has format %r (this version writes %d): reading what fits",
            path,
            data.get("version"),
            STATE_VERSION,
        )
    reader = _Reader(str(path))
    state = RuntimeState(
        weights=reader.weights(data, "weights"),
        file_weights=reader.weights(data, "file_weights"),
        previous_weights=reader.weights(data, "previous_weights"),
        events=reader.events(data.get("events")),
        rollouts=reader.objects(data, "rollouts"),
    )
    state.skipped = reader.skipped
    return state


class _Reader:
    """Reads the entries of one state file, counting (and logging) those left out."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.skipped = 0

    def skip(self, where: str, why: object) -> None:
        self.skipped += 1
        log.warning("state file %s: %s skipped: %s", self.path, where, why)

    def _mapping(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if isinstance(value, dict):
            return value
        self.skip(key, f"expected an object, got {type(value).__name__}")
        return {}

    def weights(self, data: dict[str, Any], key: str) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        for service, versions in self._mapping(data, key).items():
            if isinstance(versions, dict) and all(
                isinstance(w, int) and not isinstance(w, bool) for w in versions.values()
            ):
                found[str(service)] = {str(version): w for version, w in versions.items()}
            else:
                self.skip(f"{key}.{service}", f"not a map of version to integer: {versions!r}")
        return found

    def objects(self, data: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for name, value in self._mapping(data, key).items():
            if isinstance(value, dict):
                found[str(name)] = value
            else:
                self.skip(f"{key}.{name}", f"expected an object, got {type(value).__name__}")
        return found

    def events(self, value: Any) -> list[dict[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.skip("events", f"expected a list, got {type(value).__name__}")
            return []
        found: list[dict[str, Any]] = []
        for index, entry in enumerate(value):
            try:
                Event.from_json(entry)
            except Unreadable as exc:
                self.skip(f"events[{index}]", exc)
                continue
            found.append(entry)
        return found


def save_state(path: str | os.PathLike[str], state: RuntimeState) -> None:
    """Replace the state file atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(state.to_json(), indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
