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
    the config file alone is a safe place to start from)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("state file %s ignored: %s", path, exc)
        return None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        log.warning("state file %s ignored: unknown format", path)
        return None
    try:
        return RuntimeState(
            weights=_weights(data.get("weights", {})),
            file_weights=_weights(data.get("file_weights", {})),
            previous_weights=_weights(data.get("previous_weights", {})),
            events=[e for e in data.get("events", []) if isinstance(e, dict)],
            rollouts=dict(data.get("rollouts", {})),
        )
    except (TypeError, ValueError) as exc:
        log.warning("state file %s ignored: %s", path, exc)
        return None


def _weights(data: Any) -> dict[str, dict[str, int]]:
    return {
        str(service): {str(version): int(weight) for version, weight in versions.items()}
        for service, versions in dict(data).items()
    }


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
