"""Running a coroutine on the event loop the data plane is built for (uvloop)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import uvloop


def run_forever(main: Coroutine[Any, Any, None]) -> int:
    """Run `main` on uvloop; 0 once it returns (a graceful stop)."""
    try:
        uvloop.run(main)
    except KeyboardInterrupt:
        return 130
    return 0
