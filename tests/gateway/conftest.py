"""Fixtures for the gateway tests (the server itself is in gateway_helpers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gateway_helpers import TEST_SETTINGS, RunningGateway, serve_gateway

from pgjobs.gateway.settings import GatewaySettings


@pytest.fixture
def gateway_settings() -> GatewaySettings:
    return TEST_SETTINGS


@pytest.fixture
async def gateway(
    dsn: str, storage_dir: Path, gateway_settings: GatewaySettings
) -> AsyncIterator[RunningGateway]:
    async with serve_gateway(dsn, storage_dir, gateway_settings) as gw:
        yield gw
