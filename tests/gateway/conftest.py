"""Fixtures for the gateway tests (the server itself is in gateway_helpers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from gateway_helpers import TEST_SETTINGS, RunningGateway, serve_gateway

from pgjobs.gateway.settings import GatewaySettings


def pytest_itemcollected(item: pytest.Item) -> None:
    """The gateway's streams read below the transaction horizon, which a database being
    cloned or dropped for another test would hold (tests/conftest.py)."""
    item.add_marker(pytest.mark.quiet_databases)


@pytest.fixture
def gateway_settings() -> GatewaySettings:
    return TEST_SETTINGS


@pytest.fixture
async def gateway(
    dsn: str, storage_dir: Path, gateway_settings: GatewaySettings
) -> AsyncIterator[RunningGateway]:
    async with serve_gateway(dsn, storage_dir, gateway_settings) as gw:
        yield gw


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_gateway(
    shared_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningGateway]:
    """One gateway (TEST_SETTINGS) on the module's ``shared_dsn``, for tests that send it
    requests it must refuse without writing anything, and check that nothing was written:
    none can see another's effects. Its tests run in the module's event loop
    (``@pytest.mark.asyncio(loop_scope="module")``)."""
    async with serve_gateway(shared_dsn, tmp_path_factory.mktemp("storage")) as gw:
        yield gw
