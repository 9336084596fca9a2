"""Every async test runs on uvloop, the loop the data plane is built for; the fixtures the test
folders share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
import uvloop

from tests.helpers import Upstreams


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    """Start recording upstreams with `await upstreams.start(name)`; all are stopped after the
    test, passed or failed."""
    started = Upstreams()
    try:
        yield started
    finally:
        await started.stop()
